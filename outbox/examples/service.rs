use outbox::nats::{async_nats, ensure_stream, NatsTransport};
use outbox::{CancellationToken, Outbox, OutboxEvent, Relay};
use serde::{Deserialize, Serialize};

#[derive(Serialize, Deserialize, OutboxEvent)]
#[outbox(event_type = "order.placed", topic = "orders")]
struct OrderPlaced {
    #[outbox(aggregate_id)]
    order_id: outbox::uuid::Uuid,
    total_cents: i64,
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let pool = sqlx::SqlitePool::connect("sqlite://orders.db?mode=rwc").await?;
    let outbox = Outbox::new(pool.clone());
    outbox.migrate().await?;
    sqlx::query("CREATE TABLE IF NOT EXISTS orders (id TEXT PRIMARY KEY, total_cents INTEGER)")
        .execute(&pool)
        .await?;

    // The order and its event commit together, or neither does.
    let order = OrderPlaced {
        order_id: outbox::uuid::Uuid::now_v7(),
        total_cents: 4200,
    };
    let mut tx = pool.begin().await?;
    sqlx::query("INSERT INTO orders (id, total_cents) VALUES ($1, $2)")
        .bind(order.order_id.to_string())
        .bind(order.total_cents)
        .execute(&mut *tx)
        .await?;
    outbox.enqueue(&mut *tx, &order).await?;
    tx.commit().await?;

    // The relay publishes it to NATS JetStream, subject `orders.order.placed`; Ctrl-C stops it.
    let js = async_nats::jetstream::new(async_nats::connect("127.0.0.1:4222").await?);
    ensure_stream(&js, "ORDERS", vec!["orders.>".into()]).await?;
    let shutdown = CancellationToken::new();
    let stop = shutdown.clone();
    tokio::spawn(async move { tokio::signal::ctrl_c().await.map(|()| stop.cancel()) });
    Relay::builder(outbox, NatsTransport::new(js))
        .build()?
        .run(shutdown)
        .await?;
    Ok(())
}
