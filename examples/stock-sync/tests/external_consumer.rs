//! A consumer written without this library (plain rdkafka, through the facade's re-export)
//! reads the shop's topic: each change once, keyed by SKU, in order per SKU, with the outbox
//! headers and the payload as serde wrote it. Real PostgreSQL and a Kafka-protocol broker
//! (`OUTBOX_TEST_DATABASE_URL`, `OUTBOX_TEST_KAFKA_BROKERS`).

use outbox::kafka::rdkafka;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::{Headers, Message};
use std::collections::BTreeMap;
use std::time::{Duration, Instant};
use stock_sync::Shop;

fn admin_url() -> String {
    std::env::var("OUTBOX_TEST_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".to_owned())
}

fn brokers() -> String {
    std::env::var("OUTBOX_TEST_KAFKA_BROKERS").unwrap_or_else(|_| "127.0.0.1:9092".to_owned())
}

#[derive(Debug, serde::Deserialize)]
struct Change {
    sku: String,
    quantity: i64,
    change: i64,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plain_kafka_consumer_sees_every_change_in_order() {
    let id = &uuid::Uuid::new_v4().simple().to_string()[..10];
    let admin = sqlx::PgPool::connect(&admin_url()).await.unwrap();
    let shop_db = format!("shop_{id}");
    sqlx::query(&format!("CREATE DATABASE {shop_db}"))
        .execute(&admin)
        .await
        .unwrap();
    let url = format!("{}/{shop_db}", admin_url().rsplit_once('/').unwrap().0);
    let shop = Shop::new(sqlx::PgPool::connect(&url).await.unwrap())
        .await
        .unwrap();
    let topic = format!("t{id}.stock");
    outbox::kafka::ensure_topic(&brokers(), &topic, 3)
        .await
        .unwrap();

    // 60 changes over 5 products, before and while the relay runs.
    let changes: Vec<(String, i64)> = (0..60)
        .map(|n| (format!("SKU-{}", n % 5), (n % 7) - 2))
        .collect();
    for (sku, change) in &changes[..30] {
        shop.adjust(sku, *change).await.unwrap();
    }
    let mut producer = outbox::kafka::producer_config(&brokers());
    producer.set("batch.num.messages", "1"); // tansu 0.6.0: see the README
    let relay = shop
        .relay(
            outbox::kafka::KafkaTransport::from_config(producer)
                .unwrap()
                .topic_prefix(format!("t{id}")),
        )
        .unwrap();
    let shutdown = outbox::CancellationToken::new();
    let relay_task = tokio::spawn({
        let shutdown = shutdown.clone();
        async move { relay.run(shutdown).await.unwrap() }
    });
    for (sku, change) in &changes[30..] {
        shop.adjust(sku, *change).await.unwrap();
    }

    // The outside consumer: nothing of this library but the re-exported client.
    let consumer: StreamConsumer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", brokers())
        .set("group.id", format!("outside-{id}"))
        .set("auto.offset.reset", "earliest")
        .set("enable.auto.commit", "false")
        .create()
        .unwrap();
    consumer.subscribe(&[&topic]).unwrap();
    let mut per_sku: BTreeMap<String, Vec<(i64, Change)>> = BTreeMap::new();
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut received = 0;
    while received < changes.len() {
        let left = deadline.saturating_duration_since(Instant::now());
        let message = tokio::time::timeout(left, consumer.recv())
            .await
            .unwrap_or_else(|_| panic!("only {received} of {} messages", changes.len()))
            .unwrap();
        let header = |name: &str| -> String {
            let headers = message.headers().expect("the message has headers");
            let found = headers
                .iter()
                .find(|h| h.key == name)
                .unwrap_or_else(|| panic!("no {name} header"));
            String::from_utf8(found.value.unwrap().to_vec()).unwrap()
        };
        assert_eq!(header("outbox-event-type"), "stock.changed");
        assert_eq!(header("content-type"), "application/json");
        let sku = header("outbox-aggregate-id");
        assert_eq!(message.key(), Some(sku.as_bytes()), "keyed by SKU");
        let sequence: i64 = header("outbox-sequence").parse().unwrap();
        let change: Change = serde_json::from_slice(message.payload().unwrap()).unwrap();
        assert_eq!(change.sku, sku);
        per_sku.entry(sku).or_default().push((sequence, change));
        received += 1;
    }

    // Each product's changes once, in order: sequences 1..n, and the changes in the order the
    // shop made them, the last quantity being the shop's.
    let shop_stock: BTreeMap<String, i64> = shop.stock().await.unwrap().into_iter().collect();
    assert_eq!(per_sku.len(), 5);
    for (sku, seen) in &per_sku {
        let sequences: Vec<i64> = seen.iter().map(|(s, _)| *s).collect();
        assert_eq!(sequences, (1..=12).collect::<Vec<_>>(), "{sku}");
        let made: Vec<i64> = changes
            .iter()
            .filter(|(s, _)| s == sku)
            .map(|(_, c)| *c)
            .collect();
        let read: Vec<i64> = seen.iter().map(|(_, c)| c.change).collect();
        assert_eq!(read, made, "{sku}");
        assert_eq!(seen.last().unwrap().1.quantity, shop_stock[sku], "{sku}");
    }

    shutdown.cancel();
    relay_task.await.unwrap();
    shop.outbox.pool().close().await;
    sqlx::query(&format!("DROP DATABASE {shop_db} WITH (FORCE)"))
        .execute(&admin)
        .await
        .unwrap();
}
