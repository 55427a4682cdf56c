//! Operating an outbox: the dashboard and the metrics in one axum app.
//!
//! `app` mounts the dashboard at `/outbox` (with requeue buttons: in your service, put it
//! behind your authentication layer) and the Prometheus text format at `/metrics`;
//! `demo_traffic` writes a trickle of events, one in ten of which its handler refuses, so the
//! page has something to show.

use axum::routing::get;
use axum::Router;
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use outbox::dashboard::Dashboard;
use outbox::{HandlerContext, HandlerError, Outbox, OutboxEvent, Registry};
use serde::{Deserialize, Serialize};
use sqlx::Sqlite;
use std::time::Duration;

/// The demo's event.
#[derive(Debug, Serialize, Deserialize, OutboxEvent)]
#[outbox(event_type = "shop.order_placed", aggregate_type = "order")]
pub struct OrderPlaced {
    #[outbox(aggregate_id)]
    pub order_id: String,
    pub total_cents: i64,
}

/// Installs the Prometheus recorder: every `outbox_*` metric from here on is in its scrape.
pub fn prometheus() -> PrometheusHandle {
    PrometheusBuilder::new()
        .install_recorder()
        .expect("no other metrics recorder in this process")
}

/// The dashboard at `/outbox` and the scrape at `/metrics`.
pub fn app(outbox: Outbox<Sqlite>, metrics: PrometheusHandle) -> Router {
    Router::new()
        .nest("/outbox", Dashboard::new(outbox).allow_actions().router())
        .route(
            "/metrics",
            get(move || std::future::ready(metrics.render())),
        )
}

/// The handlers: orders over 900 dollars are refused for good (they go dead), the rest are
/// handled.
pub fn registry() -> Registry {
    Registry::builder()
        .handler(
            "ship",
            |order: OrderPlaced, _ctx: HandlerContext| async move {
                if order.total_cents > 90_000 {
                    return Err(HandlerError::fatal(format!(
                        "order {} over the credit limit ({} cents)",
                        order.order_id, order.total_cents
                    )));
                }
                Ok(())
            },
        )
        .expect("one handler")
        .build()
}

/// Writes `count` orders, one every `every`.
pub async fn demo_traffic(
    outbox: Outbox<Sqlite>,
    count: u64,
    every: Duration,
) -> outbox::Result<()> {
    for n in 0..count {
        let mut tx = outbox.pool().begin().await?;
        let order = OrderPlaced {
            order_id: format!("o-{n}"),
            total_cents: if n % 10 == 9 {
                99_000 + n as i64
            } else {
                1_000 + n as i64
            },
        };
        outbox.enqueue(&mut *tx, &order).await?;
        tx.commit().await?;
        tokio::time::sleep(every).await;
    }
    Ok(())
}
