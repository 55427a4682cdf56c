//! The shop and the inventory agree after a burst of concurrent stock changes, with the
//! inventory's consumer stopped and restarted midway. Real PostgreSQL (two databases) and a
//! Kafka-protocol broker (`OUTBOX_TEST_DATABASE_URL`, `OUTBOX_TEST_KAFKA_BROKERS`).

use std::time::{Duration, Instant};
use stock_sync::{Inventory, Shop};

fn admin_url() -> String {
    std::env::var("OUTBOX_TEST_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".to_owned())
}

fn brokers() -> String {
    std::env::var("OUTBOX_TEST_KAFKA_BROKERS").unwrap_or_else(|_| "127.0.0.1:9092".to_owned())
}

async fn fresh_database(admin: &sqlx::PgPool, name: &str) -> sqlx::PgPool {
    sqlx::query(&format!("CREATE DATABASE {name}"))
        .execute(admin)
        .await
        .unwrap();
    let url = format!("{}/{name}", admin_url().rsplit_once('/').unwrap().0);
    sqlx::PgPool::connect(&url).await.unwrap()
}

async fn count(pool: &sqlx::PgPool, sql: &str) -> i64 {
    sqlx::query_scalar(sql).fetch_one(pool).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inventory_agrees_with_the_shop_across_a_consumer_restart() {
    let id = &uuid::Uuid::new_v4().simple().to_string()[..10];
    let admin = sqlx::PgPool::connect(&admin_url()).await.unwrap();
    let (shop_db, inventory_db) = (format!("shop_{id}"), format!("inventory_{id}"));
    let shop = Shop::new(fresh_database(&admin, &shop_db).await)
        .await
        .unwrap();
    let inventory = Inventory::new(fresh_database(&admin, &inventory_db).await)
        .await
        .unwrap();
    let topic = format!("t{id}.stock");
    let group = format!("inventory-{id}");
    outbox::kafka::ensure_topic(&brokers(), &topic, 3)
        .await
        .unwrap();

    let shutdown = outbox::CancellationToken::new();
    // One record per batch: tansu 0.6.0 (memory storage) answers a fetch that starts inside a
    // record batch from the next batch, skipping the rest of that one, which a consumer that
    // resumes from a committed offset mid-batch would lose. Real Kafka does not.
    let mut producer = outbox::kafka::producer_config(&brokers());
    producer.set("batch.num.messages", "1");
    let relay = shop
        .relay(
            outbox::kafka::KafkaTransport::from_config(producer)
                .unwrap()
                .topic_prefix(format!("t{id}")),
        )
        .unwrap();
    let relay_task = tokio::spawn({
        let shutdown = shutdown.clone();
        async move { relay.run(shutdown).await.unwrap() }
    });
    let start_consumer = || {
        let consumer = inventory.consumer(&brokers(), &group, &topic).unwrap();
        let stop = outbox::CancellationToken::new();
        let token = stop.clone();
        (
            stop,
            tokio::spawn(async move { consumer.run(token).await.unwrap() }),
        )
    };
    let (stop_first, first) = start_consumer();

    // 8 clerks, 40 changes each, over 20 products.
    let clerks: Vec<_> = (0..8)
        .map(|_| {
            let shop = shop.clone();
            tokio::spawn(async move {
                for _ in 0..40 {
                    let sku = format!("SKU-{:02}", fastrand::u8(0..20));
                    shop.adjust(&sku, fastrand::i64(-3..=5)).await.unwrap();
                }
            })
        })
        .collect();

    // Midway: the inventory's consumer stops (a deploy), and comes back later.
    let deadline = Instant::now() + Duration::from_secs(120);
    while count(&inventory.pool, "SELECT count(*) FROM inbox").await < 40 {
        assert!(Instant::now() < deadline, "the consumer applied nothing");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    stop_first.cancel();
    first.await.unwrap();
    let applied_before_restart = count(&inventory.pool, "SELECT count(*) FROM inbox").await;
    for clerk in clerks {
        clerk.await.unwrap();
    }
    let (stop_second, second) = start_consumer();

    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let (a, b) = (
            shop.stock().await.unwrap(),
            inventory.stock().await.unwrap(),
        );
        if a == b && count(&inventory.pool, "SELECT count(*) FROM inbox").await == 320 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the inventory did not catch up:\nshop {a:?}\ninventory {b:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        applied_before_restart < 320,
        "the restart happened after everything was applied"
    );
    assert_eq!(
        count(
            shop.outbox.pool(),
            "SELECT count(*) FROM outbox WHERE status = 'delivered'"
        )
        .await,
        320
    );

    stop_second.cancel();
    second.await.unwrap();
    shutdown.cancel();
    relay_task.await.unwrap();
    shop.outbox.pool().close().await;
    inventory.pool.close().await;
    for db in [shop_db, inventory_db] {
        sqlx::query(&format!("DROP DATABASE {db} WITH (FORCE)"))
            .execute(&admin)
            .await
            .unwrap();
    }
}
