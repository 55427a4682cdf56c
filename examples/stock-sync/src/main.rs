//! `cargo run -p stock-sync`: a burst of concurrent stock changes in the shop, synchronised to
//! the inventory service through Kafka; prints both tables when they agree.
//!
//! Needs PostgreSQL (`SHOP_DATABASE_URL`, `INVENTORY_DATABASE_URL`; defaults: databases `shop`
//! and `inventory` on 127.0.0.1, created if missing) and a Kafka-protocol broker
//! (`KAFKA_BROKERS`, default 127.0.0.1:9092; `scripts/services.sh` starts one).

use std::time::Duration;
use stock_sync::{Inventory, Shop};

async fn database(url_var: &str, name: &str) -> Result<sqlx::PgPool, String> {
    if let Ok(url) = std::env::var(url_var) {
        return sqlx::PgPool::connect(&url).await.map_err(|e| e.to_string());
    }
    let admin = sqlx::PgPool::connect("postgres://postgres@127.0.0.1:5432/postgres")
        .await
        .map_err(|e| format!("cannot reach PostgreSQL (set {url_var}): {e}"))?;
    let exists: bool =
        sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_database WHERE datname = $1)")
            .bind(name)
            .fetch_one(&admin)
            .await
            .map_err(|e| e.to_string())?;
    if !exists {
        sqlx::query(&format!("CREATE DATABASE {name}"))
            .execute(&admin)
            .await
            .map_err(|e| e.to_string())?;
    }
    sqlx::PgPool::connect(&format!("postgres://postgres@127.0.0.1:5432/{name}"))
        .await
        .map_err(|e| e.to_string())
}

#[tokio::main]
async fn main() -> Result<(), String> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .init();
    let brokers = std::env::var("KAFKA_BROKERS").unwrap_or_else(|_| "127.0.0.1:9092".into());
    let shop = Shop::new(database("SHOP_DATABASE_URL", "shop").await?)
        .await
        .map_err(|e| e.to_string())?;
    let inventory = Inventory::new(database("INVENTORY_DATABASE_URL", "inventory").await?)
        .await
        .map_err(|e| e.to_string())?;
    outbox::kafka::ensure_topic(&brokers, "stock", 3)
        .await
        .map_err(|e| e.to_string())?;
    let shutdown = outbox::CancellationToken::new();
    // One record per batch: tansu 0.6.0 (memory storage) skips the rest of a record batch
    // when a consumer resumes from a committed offset inside it. Drop this against real Kafka.
    let mut producer = outbox::kafka::producer_config(&brokers);
    producer.set("batch.num.messages", "1");
    let kafka = outbox::kafka::KafkaTransport::from_config(producer).map_err(|e| e.to_string())?;
    let relay = shop.relay(kafka).map_err(|e| e.to_string())?;
    let consumer = inventory
        .consumer(&brokers, "inventory", "stock")
        .map_err(|e| e.to_string())?;
    let relay_task = tokio::spawn({
        let shutdown = shutdown.clone();
        async move { relay.run(shutdown).await }
    });
    let consumer_task = tokio::spawn({
        let shutdown = shutdown.clone();
        async move { consumer.run(shutdown).await }
    });

    println!("4 clerks change the stock of 10 products 50 times each...");
    let clerks: Vec<_> = (0..4)
        .map(|_| {
            let shop = shop.clone();
            tokio::spawn(async move {
                for _ in 0..50 {
                    let sku = format!("SKU-{:02}", fastrand::u8(0..10));
                    shop.adjust(&sku, fastrand::i64(-3..=5)).await?;
                }
                Ok::<_, outbox::Error>(())
            })
        })
        .collect();
    for clerk in clerks {
        clerk
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| e.to_string())?;
    }
    for _ in 0..600 {
        let (a, b) = (
            shop.stock().await.map_err(|e| e.to_string())?,
            inventory.stock().await.map_err(|e| e.to_string())?,
        );
        if a == b {
            println!("{:<8} {:>6} {:>10}", "sku", "shop", "inventory");
            for ((sku, q), (_, r)) in a.iter().zip(&b) {
                println!("{sku:<8} {q:>6} {r:>10}");
            }
            println!("the inventory agrees with the shop");
            shutdown.cancel();
            let _ = relay_task.await;
            let _ = consumer_task.await;
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Err("the inventory did not catch up within a minute".into())
}
