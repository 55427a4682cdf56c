//! Loyalty subscriptions cancelled at an effective date (seed 000: the outbox combined with
//! state for deferred processing).
//!
//! A customer asks to cancel from a future date. The service stores the request
//! (`CancellationScheduled`, with the date) and enqueues `CancellationDue` with `available_at` =
//! that date, in one transaction. The relay hands nothing over before the date; at the date the
//! typed handler cancels the subscription.
//!
//! - `POST /api/subscriptions` `{"customer": "..."}` → `{"subscriptionId": "..."}`
//! - `POST /api/subscriptions/{id}/cancellation` `{"effectiveInSeconds": 5}` or
//!   `{"effectiveAt": "2030-01-01T00:00:00Z"}` → 202 `{"effectiveAt": "..."}`
//! - `GET /api/subscriptions/{id}` → `{"status": "Active" | "CancellationScheduled" | "Cancelled", ...}`

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Json;
use chrono::{DateTime, Utc};
use outbox::{Dispatcher, HandlerContext, HandlerError, Outbox, OutboxEvent, Relay};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;
use uuid::Uuid;

type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// The cancellation of a subscription has come due.
#[derive(Debug, Clone, Serialize, Deserialize, OutboxEvent)]
#[outbox(
    event_type = "subscription.cancellation_due",
    aggregate_type = "subscription"
)]
pub struct CancellationDue {
    #[outbox(aggregate_id)]
    pub subscription_id: Uuid,
    pub effective_at: DateTime<Utc>,
}

/// A subscription as stored.
#[derive(Debug, Clone)]
pub struct SubscriptionRow {
    pub status: String,
    pub effective_at: Option<i64>,
    pub cancelled_at: Option<i64>,
}

/// The service's queries: identical SQL on PostgreSQL and SQLite (times as epoch milliseconds).
pub trait Store: outbox::Backend {
    fn create_schema(pool: &sqlx::Pool<Self>) -> BoxFuture<'_, sqlx::Result<()>>;
    fn insert(
        pool: &sqlx::Pool<Self>,
        id: Uuid,
        customer: String,
    ) -> BoxFuture<'_, sqlx::Result<()>>;
    /// Records the request on an active subscription; `false` if it is not active.
    fn schedule<'c>(
        conn: &'c mut Self::Connection,
        id: Uuid,
        effective_at: i64,
    ) -> BoxFuture<'c, sqlx::Result<bool>>;
    /// Cancels a scheduled subscription whose date has come; `false` if there was nothing to do.
    fn cancel<'c>(
        conn: &'c mut Self::Connection,
        id: Uuid,
        now: i64,
    ) -> BoxFuture<'c, sqlx::Result<bool>>;
    fn get(
        pool: &sqlx::Pool<Self>,
        id: Uuid,
    ) -> BoxFuture<'_, sqlx::Result<Option<SubscriptionRow>>>;
}

macro_rules! store {
    ($db:ty) => {
        impl Store for $db {
            fn create_schema(pool: &sqlx::Pool<Self>) -> BoxFuture<'_, sqlx::Result<()>> {
                Box::pin(async move {
                    sqlx::query(
                        "CREATE TABLE IF NOT EXISTS subscriptions (
                            id TEXT PRIMARY KEY, customer TEXT NOT NULL, status TEXT NOT NULL,
                            effective_at BIGINT, cancelled_at BIGINT)",
                    )
                    .execute(pool)
                    .await?;
                    Ok(())
                })
            }

            fn insert(pool: &sqlx::Pool<Self>, id: Uuid, customer: String) -> BoxFuture<'_, sqlx::Result<()>> {
                Box::pin(async move {
                    sqlx::query("INSERT INTO subscriptions (id, customer, status) VALUES ($1, $2, 'Active')")
                        .bind(id.to_string())
                        .bind(customer)
                        .execute(pool)
                        .await?;
                    Ok(())
                })
            }

            fn schedule<'c>(conn: &'c mut Self::Connection, id: Uuid, effective_at: i64) -> BoxFuture<'c, sqlx::Result<bool>> {
                Box::pin(async move {
                    let done = sqlx::query(
                        "UPDATE subscriptions SET status = 'CancellationScheduled', effective_at = $1
                         WHERE id = $2 AND status = 'Active'",
                    )
                    .bind(effective_at)
                    .bind(id.to_string())
                    .execute(&mut *conn)
                    .await?;
                    Ok(done.rows_affected() == 1)
                })
            }

            fn cancel<'c>(conn: &'c mut Self::Connection, id: Uuid, now: i64) -> BoxFuture<'c, sqlx::Result<bool>> {
                Box::pin(async move {
                    let done = sqlx::query(
                        "UPDATE subscriptions SET status = 'Cancelled', cancelled_at = $1
                         WHERE id = $2 AND status = 'CancellationScheduled' AND effective_at <= $1",
                    )
                    .bind(now)
                    .bind(id.to_string())
                    .execute(&mut *conn)
                    .await?;
                    Ok(done.rows_affected() == 1)
                })
            }

            fn get(pool: &sqlx::Pool<Self>, id: Uuid) -> BoxFuture<'_, sqlx::Result<Option<SubscriptionRow>>> {
                Box::pin(async move {
                    let row: Option<(String, Option<i64>, Option<i64>)> = sqlx::query_as(
                        "SELECT status, effective_at, cancelled_at FROM subscriptions WHERE id = $1",
                    )
                    .bind(id.to_string())
                    .fetch_optional(pool)
                    .await?;
                    Ok(row.map(|(status, effective_at, cancelled_at)| SubscriptionRow { status, effective_at, cancelled_at }))
                })
            }
        }
    };
}

store!(sqlx::Postgres);
store!(sqlx::Sqlite);

/// What the handler needs, whatever the database.
pub trait Cancellations: Send + Sync + 'static {
    fn cancel(&self, id: Uuid) -> BoxFuture<'_, Result<bool, HandlerError>>;
}

struct App<DB: Store> {
    outbox: Outbox<DB>,
}

impl<DB: Store> Cancellations for App<DB> {
    fn cancel(&self, id: Uuid) -> BoxFuture<'_, Result<bool, HandlerError>> {
        Box::pin(async move {
            let mut tx = self.outbox.pool().begin().await?;
            let cancelled = DB::cancel(&mut *tx, id, Utc::now().timestamp_millis()).await?;
            tx.commit().await?;
            Ok(cancelled)
        })
    }
}

#[outbox::handler]
async fn on_cancellation_due(
    event: CancellationDue,
    ctx: HandlerContext,
) -> Result<(), HandlerError> {
    let now = Utc::now();
    if now < event.effective_at {
        // The relay never delivers early; a clock skew between database and service could.
        return Err(HandlerError::retry_after(
            (event.effective_at - now).to_std().unwrap_or_default(),
            "the effective date has not come yet",
        ));
    }
    let app = ctx.state::<Arc<dyn Cancellations>>()?;
    if app.cancel(event.subscription_id).await? {
        println!(
            "subscription {} cancelled (effective {})",
            event.subscription_id, event.effective_at
        );
    }
    Ok(())
}

fn error(status: StatusCode, message: &str) -> Response {
    (status, Json(json!({ "error": message }))).into_response()
}

async fn create<DB: Store>(State(app): State<Arc<App<DB>>>, Json(body): Json<Value>) -> Response {
    let Some(customer) = body
        .get("customer")
        .and_then(Value::as_str)
        .filter(|c| !c.trim().is_empty())
    else {
        return error(StatusCode::BAD_REQUEST, "customer is required");
    };
    let id = Uuid::now_v7();
    match DB::insert(app.outbox.pool(), id, customer.to_owned()).await {
        Ok(()) => (StatusCode::CREATED, Json(json!({ "subscriptionId": id }))).into_response(),
        Err(e) => error(StatusCode::SERVICE_UNAVAILABLE, &e.to_string()),
    }
}

async fn request_cancellation<DB: Store>(
    State(app): State<Arc<App<DB>>>,
    Path(id): Path<String>,
    Json(body): Json<Value>,
) -> Response {
    let Ok(id) = Uuid::parse_str(&id) else {
        return error(StatusCode::BAD_REQUEST, "not a subscription id");
    };
    let effective_at = match (body.get("effectiveAt"), body.get("effectiveInSeconds")) {
        (Some(Value::String(at)), None) => match DateTime::parse_from_rfc3339(at) {
            Ok(at) => at.with_timezone(&Utc),
            Err(_) => {
                return error(
                    StatusCode::UNPROCESSABLE_ENTITY,
                    "effectiveAt must be an RFC 3339 date",
                )
            }
        },
        (None, Some(Value::Number(n))) if n.as_u64().is_some() => {
            Utc::now() + chrono::Duration::seconds(n.as_u64().unwrap_or_default() as i64)
        }
        _ => {
            return error(
                StatusCode::BAD_REQUEST,
                "give effectiveAt or effectiveInSeconds",
            )
        }
    };
    let scheduled = async {
        let mut tx = app.outbox.pool().begin().await.map_err(|e| e.to_string())?;
        if !DB::schedule(&mut *tx, id, effective_at.timestamp_millis())
            .await
            .map_err(|e| e.to_string())?
        {
            return Ok(false);
        }
        // Not delivered before the effective date: the relay only claims due events.
        let event = CancellationDue {
            subscription_id: id,
            effective_at,
        };
        app.outbox
            .enqueue_at(&mut *tx, &event, effective_at)
            .await
            .map_err(|e| e.to_string())?;
        tx.commit().await.map_err(|e| e.to_string())?;
        Ok::<_, String>(true)
    }
    .await;
    match scheduled {
        Ok(true) => (
            StatusCode::ACCEPTED,
            Json(json!({ "subscriptionId": id, "effectiveAt": effective_at })),
        )
            .into_response(),
        Ok(false) => error(StatusCode::CONFLICT, "no active subscription with that id"),
        Err(e) => error(StatusCode::SERVICE_UNAVAILABLE, &e),
    }
}

async fn status<DB: Store>(State(app): State<Arc<App<DB>>>, Path(id): Path<String>) -> Response {
    let Ok(id) = Uuid::parse_str(&id) else {
        return error(StatusCode::BAD_REQUEST, "not a subscription id");
    };
    let millis = |t: Option<i64>| t.and_then(DateTime::from_timestamp_millis);
    match DB::get(app.outbox.pool(), id).await {
        Ok(Some(row)) => Json(json!({
            "subscriptionId": id,
            "status": row.status,
            "effectiveAt": millis(row.effective_at),
            "cancelledAt": millis(row.cancelled_at),
        }))
        .into_response(),
        Ok(None) => error(StatusCode::NOT_FOUND, "no such subscription"),
        Err(e) => error(StatusCode::SERVICE_UNAVAILABLE, &e.to_string()),
    }
}

/// A running service.
#[derive(Debug)]
pub struct Running {
    pub addr: SocketAddr,
    shutdown: outbox::CancellationToken,
    tasks: Vec<tokio::task::JoinHandle<Result<(), String>>>,
}

impl Running {
    /// Waits for the service to stop.
    pub async fn wait(self) -> Result<(), String> {
        for task in self.tasks {
            task.await.map_err(|e| e.to_string())??;
        }
        Ok(())
    }

    /// Graceful stop.
    pub async fn stop(self) -> Result<(), String> {
        self.shutdown.cancel();
        self.wait().await
    }
}

/// Starts API and relay on `database_url` (PostgreSQL), or a SQLite file when `None`.
pub async fn start(
    database_url: Option<String>,
    listen: SocketAddr,
    shutdown: outbox::CancellationToken,
) -> Result<Running, String> {
    match database_url {
        Some(url) => {
            let pool = sqlx::PgPool::connect(&url)
                .await
                .map_err(|e| format!("cannot connect to PostgreSQL: {e}"))?;
            start_with(pool, listen, shutdown).await
        }
        None => {
            let path = std::env::temp_dir().join("outbox-subscriptions.db");
            let pool = sqlx::sqlite::SqlitePoolOptions::new()
                .connect_with(
                    sqlx::sqlite::SqliteConnectOptions::new()
                        .filename(&path)
                        .create_if_missing(true)
                        .journal_mode(sqlx::sqlite::SqliteJournalMode::Wal),
                )
                .await
                .map_err(|e| format!("cannot open {}: {e}", path.display()))?;
            start_with(pool, listen, shutdown).await
        }
    }
}

async fn start_with<DB: Store>(
    pool: sqlx::Pool<DB>,
    listen: SocketAddr,
    shutdown: outbox::CancellationToken,
) -> Result<Running, String> {
    let outbox = Outbox::new(pool.clone());
    outbox.migrate().await.map_err(|e| e.to_string())?;
    DB::create_schema(&pool).await.map_err(|e| e.to_string())?;
    let app = Arc::new(App {
        outbox: outbox.clone(),
    });

    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .map_err(|e| e.to_string())?;
    let addr = listener.local_addr().map_err(|e| e.to_string())?;
    let router = axum::Router::new()
        .route("/api/subscriptions", post(create::<DB>))
        .route("/api/subscriptions/{id}", get(status::<DB>))
        .route(
            "/api/subscriptions/{id}/cancellation",
            post(request_cancellation::<DB>),
        )
        .with_state(app.clone());

    let registry = outbox::Registry::from_inventory().map_err(|e| e.to_string())?;
    registry
        .require_event::<CancellationDue>()
        .map_err(|e| e.to_string())?;
    let cancellations: Arc<dyn Cancellations> = app;
    // Polling finds deferred events when they come due; 200 ms keeps the demo snappy.
    let relay = Relay::builder(outbox, Dispatcher::new(registry).state(cancellations))
        .poll_interval(Duration::from_millis(200))
        .build()
        .map_err(|e| e.to_string())?;

    let api_shutdown = shutdown.clone();
    let relay_shutdown = shutdown.clone();
    let tasks = vec![
        tokio::spawn(async move {
            axum::serve(listener, router)
                .with_graceful_shutdown(async move { api_shutdown.cancelled().await })
                .await
                .map_err(|e| e.to_string())
        }),
        tokio::spawn(async move { relay.run(relay_shutdown).await.map_err(|e| e.to_string()) }),
    ];
    Ok(Running {
        addr,
        shutdown,
        tasks,
    })
}
