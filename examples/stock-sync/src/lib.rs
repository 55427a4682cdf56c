//! Stock synchronisation through Kafka (seed 000).
//!
//! The **shop** changes a product's stock and enqueues `StockChanged` in the same transaction;
//! its relay publishes to Kafka, keyed by SKU so one product's changes stay in order. The
//! **inventory** service, with its own database, consumes with [`KafkaConsumer`] and an
//! [`Inbox`], and keeps its own stock table in sync. Neither reads the other's database.

use outbox::kafka::{KafkaConsumer, KafkaSource, KafkaTransport};
use outbox::{
    Dispatcher, HandlerContext, HandlerError, Inbox, Outbox, OutboxEvent, Registry, Relay,
};
use serde::{Deserialize, Serialize};
use sqlx::PgPool;
use std::time::Duration;

/// A product's stock changed; `quantity` is the new level, so applying the events of one SKU in
/// order reproduces the shop's state.
#[derive(Debug, Clone, Serialize, Deserialize, OutboxEvent)]
#[outbox(
    event_type = "stock.changed",
    aggregate_type = "product",
    topic = "stock"
)]
pub struct StockChanged {
    #[outbox(aggregate_id)]
    pub sku: String,
    pub quantity: i64,
    pub change: i64,
}

/// The shop: products, and the outbox its changes go through.
#[derive(Debug, Clone)]
pub struct Shop {
    pub outbox: Outbox<sqlx::Postgres>,
}

impl Shop {
    /// Creates the shop's tables.
    pub async fn new(pool: PgPool) -> Result<Self, outbox::Error> {
        let outbox = Outbox::new(pool);
        outbox.migrate().await?;
        sqlx::query(
            "CREATE TABLE IF NOT EXISTS products (sku text PRIMARY KEY, quantity bigint NOT NULL)",
        )
        .execute(outbox.pool())
        .await?;
        Ok(Self { outbox })
    }

    /// Adds `change` (negative: sold) to the stock of `sku`, and records the event, in one
    /// transaction. The row lock orders concurrent changes of one SKU, and the event sequence
    /// follows.
    pub async fn adjust(&self, sku: &str, change: i64) -> Result<i64, outbox::Error> {
        let mut tx = self.outbox.pool().begin().await?;
        let quantity: i64 = sqlx::query_scalar(
            "INSERT INTO products (sku, quantity) VALUES ($1, $2)
             ON CONFLICT (sku) DO UPDATE SET quantity = products.quantity + EXCLUDED.quantity
             RETURNING quantity",
        )
        .bind(sku)
        .bind(change)
        .fetch_one(&mut *tx)
        .await?;
        let event = StockChanged {
            sku: sku.to_owned(),
            quantity,
            change,
        };
        self.outbox.enqueue(&mut *tx, &event).await?;
        tx.commit().await?;
        Ok(quantity)
    }

    /// The relay publishing the shop's events to Kafka.
    pub fn relay(
        &self,
        kafka: KafkaTransport,
    ) -> Result<Relay<sqlx::Postgres, KafkaTransport>, outbox::Error> {
        Relay::builder(self.outbox.clone(), kafka)
            .batch_size(200)
            .poll_interval(Duration::from_millis(100))
            .build()
    }

    /// Every product's stock.
    pub async fn stock(&self) -> Result<Vec<(String, i64)>, sqlx::Error> {
        sqlx::query_as("SELECT sku, quantity FROM products ORDER BY sku")
            .fetch_all(self.outbox.pool())
            .await
    }
}

/// The inventory service's own database.
#[derive(Debug, Clone)]
pub struct Inventory {
    pub pool: PgPool,
    pub inbox: Inbox<sqlx::Postgres>,
}

impl Inventory {
    /// Creates the inventory's tables.
    pub async fn new(pool: PgPool) -> Result<Self, outbox::Error> {
        let inbox = Inbox::new(pool.clone(), "inbox", "inventory")?;
        inbox.migrate().await?;
        sqlx::query(
            "CREATE TABLE IF NOT EXISTS inventory_stock (
                sku text PRIMARY KEY, quantity bigint NOT NULL, version bigint NOT NULL)",
        )
        .execute(&pool)
        .await?;
        Ok(Self { pool, inbox })
    }

    /// A consumer of `topic` in the consumer group `group`, applying `StockChanged`.
    pub fn consumer(
        &self,
        brokers: &str,
        group: &str,
        topic: &str,
    ) -> Result<KafkaConsumer, outbox::kafka::rdkafka::error::KafkaError> {
        let registry = Registry::builder()
            .handler::<StockChanged, _, _>("inventory::apply", apply)
            .expect("one handler")
            .build();
        // The inbox also counts attempts: Kafka does not, and a message that crashes the
        // consumer must not crash it for ever.
        Ok(KafkaConsumer::new(
            KafkaSource::new(brokers, group, &[topic])?,
            Dispatcher::new(registry).state(self.inbox.clone()),
        )
        .attempts_in(self.inbox.clone()))
    }

    /// Every product's stock, as the inventory sees it.
    pub async fn stock(&self) -> Result<Vec<(String, i64)>, sqlx::Error> {
        sqlx::query_as("SELECT sku, quantity FROM inventory_stock ORDER BY sku")
            .fetch_all(&self.pool)
            .await
    }
}

/// Applies one change: through the inbox, so a redelivered message changes nothing, and only if
/// it is newer than what the table holds.
async fn apply(event: StockChanged, ctx: HandlerContext) -> Result<(), HandlerError> {
    let inbox = ctx.state::<Inbox<sqlx::Postgres>>()?;
    let Some(mut tx) = inbox.begin(&ctx).await? else {
        return Ok(());
    };
    sqlx::query(
        "INSERT INTO inventory_stock (sku, quantity, version) VALUES ($1, $2, $3)
         ON CONFLICT (sku) DO UPDATE SET quantity = EXCLUDED.quantity, version = EXCLUDED.version
         WHERE inventory_stock.version < EXCLUDED.version",
    )
    .bind(&event.sku)
    .bind(event.quantity)
    .bind(ctx.sequence())
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(())
}
