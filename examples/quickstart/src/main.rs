//! The outbox quickstart: `cargo run -p quickstart`. No server needed.
//!
//! 1. Opens a SQLite file, creates a business table and the outbox tables.
//! 2. Places three orders: each order row and its two events (placed, paid) are written in one
//!    transaction.
//! 3. Runs a relay that hands the events to typed handlers, which print a line each, in order
//!    per order.
//! 4. Shuts the relay down gracefully once every event is handled.

use outbox::{Dispatcher, HandlerContext, HandlerError, Outbox, OutboxEvent, Relay};
use serde::{Deserialize, Serialize};
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::Notify;
use uuid::Uuid;

#[derive(Debug, Serialize, Deserialize, OutboxEvent)]
#[outbox(
    event_type = "order.placed",
    aggregate_type = "order",
    topic = "orders"
)]
struct OrderPlaced {
    #[outbox(aggregate_id)]
    order_id: Uuid,
    customer: String,
    total_cents: i64,
}

#[derive(Debug, Serialize, Deserialize, OutboxEvent)]
#[outbox(event_type = "order.paid", aggregate_type = "order", topic = "orders")]
struct OrderPaid {
    #[outbox(aggregate_id)]
    order_id: Uuid,
}

/// Shared with the handlers through `Dispatcher::state`.
struct Progress {
    handled: AtomicUsize,
    expected: usize,
    done: Notify,
}

impl Progress {
    fn tick(&self) {
        if self.handled.fetch_add(1, Ordering::SeqCst) + 1 == self.expected {
            self.done.notify_one();
        }
    }
}

#[outbox::handler]
async fn on_order_placed(event: OrderPlaced, ctx: HandlerContext) -> Result<(), HandlerError> {
    println!(
        "handled order.placed  order={} seq={} customer={} total={}.{:02}",
        event.order_id,
        ctx.sequence(),
        event.customer,
        event.total_cents / 100,
        event.total_cents % 100
    );
    ctx.state::<Arc<Progress>>()?.tick();
    Ok(())
}

#[outbox::handler]
async fn on_order_paid(event: OrderPaid, ctx: HandlerContext) -> Result<(), HandlerError> {
    println!(
        "handled order.paid    order={} seq={}",
        event.order_id,
        ctx.sequence()
    );
    ctx.state::<Arc<Progress>>()?.tick();
    Ok(())
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .init();

    let path = std::env::temp_dir().join("outbox-quickstart.db");
    for suffix in ["", "-wal", "-shm"] {
        let _ = std::fs::remove_file(format!("{}{suffix}", path.display()));
    }
    let pool = SqlitePoolOptions::new()
        .connect_with(
            SqliteConnectOptions::new()
                .filename(&path)
                .create_if_missing(true)
                .journal_mode(SqliteJournalMode::Wal),
        )
        .await?;
    println!("database: {}", path.display());

    sqlx::query("CREATE TABLE orders (id TEXT PRIMARY KEY, customer TEXT NOT NULL, total_cents INTEGER NOT NULL)")
        .execute(&pool)
        .await?;
    let outbox = Outbox::new(pool.clone());
    outbox.migrate().await?;

    // The business row and its events commit together, or not at all.
    let orders = [("ada", 4_200), ("grace", 1_999), ("linus", 12_500)];
    for (customer, total_cents) in orders {
        let order_id = Uuid::now_v7();
        let mut tx = pool.begin().await?;
        sqlx::query("INSERT INTO orders (id, customer, total_cents) VALUES (?1, ?2, ?3)")
            .bind(order_id.to_string())
            .bind(customer)
            .bind(total_cents)
            .execute(&mut *tx)
            .await?;
        let placed = OrderPlaced {
            order_id,
            customer: customer.to_owned(),
            total_cents,
        };
        outbox.enqueue(&mut *tx, &placed).await?;
        outbox.enqueue(&mut *tx, &OrderPaid { order_id }).await?;
        tx.commit().await?;
        println!("committed order {order_id} for {customer} with 2 events");
    }

    let registry = outbox::Registry::from_inventory()?;
    // Fail at start-up, not at delivery, if a handler is missing from the binary.
    registry.require_event::<OrderPlaced>()?;
    registry.require_event::<OrderPaid>()?;
    let progress = Arc::new(Progress {
        handled: AtomicUsize::new(0),
        expected: orders.len() * 2,
        done: Notify::new(),
    });
    let dispatcher = Dispatcher::new(registry).state(progress.clone());
    let relay = Relay::builder(outbox.clone(), dispatcher)
        .poll_interval(Duration::from_millis(50))
        .build()?;

    let shutdown = outbox::CancellationToken::new();
    let running = tokio::spawn({
        let shutdown = shutdown.clone();
        async move { relay.run(shutdown).await }
    });
    tokio::select! {
        _ = progress.done.notified() => println!("all {} events handled; shutting down", progress.expected),
        _ = tokio::signal::ctrl_c() => println!("interrupted; shutting down"),
    }
    shutdown.cancel();
    running.await??;
    pool.close().await;
    Ok(())
}
