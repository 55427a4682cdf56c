//! The Kafka transport and consumer against a real Kafka-protocol broker (tansu on
//! 127.0.0.1:9092, or `OUTBOX_TEST_KAFKA_BROKERS`), plus a private tansu for the outage test
//! (`OUTBOX_TEST_TANSU`, default `/opt/outbox-tools/tansu-0.6.0/bin/tansu`).

use outbox::kafka::{
    dead_letter_topic, producer_config, KafkaConsumer, KafkaSource, KafkaTransport, DEAD_REASON,
};
use outbox::{Relay, RetryPolicy};
use outbox_tests::scenarios::enqueue_backlog;
use outbox_tests::{assert_dead_at_once, enqueue_poison, wait_for_recorded_failure};
use outbox_tests::{
    broker_retry, eventually, init_tracing, AfterCommit, Applier, Huge, ItemChanged, RunningRelay,
    TestDb,
};
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::{BorrowedMessage, Headers};
use rdkafka::Message;
use sqlx::Postgres;
use std::collections::{BTreeMap, HashSet};
use std::time::Duration;

const WAIT: Duration = Duration::from_secs(120);

fn brokers() -> String {
    std::env::var("OUTBOX_TEST_KAFKA_BROKERS").unwrap_or_else(|_| "127.0.0.1:9092".to_owned())
}

fn unique(what: &str) -> String {
    format!(
        "{what}-{}",
        &uuid::Uuid::new_v4().simple().to_string()[..10]
    )
}

async fn create_topics(brokers: &str, topics: &[&str]) {
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .create()
        .unwrap();
    let new: Vec<_> = topics
        .iter()
        .map(|t| NewTopic::new(t, 3, TopicReplication::Fixed(1)))
        .collect();
    for result in admin
        .create_topics(&new, &AdminOptions::new())
        .await
        .unwrap()
    {
        result.unwrap();
    }
}

/// A plain rdkafka consumer in a group of its own, reading `topic` from the start.
fn raw_consumer(brokers: &str, topic: &str) -> StreamConsumer {
    let consumer: StreamConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", unique("raw"))
        .set("auto.offset.reset", "earliest")
        .set("enable.auto.commit", "false")
        .create()
        .unwrap();
    consumer.subscribe(&[topic]).unwrap();
    consumer
}

struct Received {
    key: String,
    headers: BTreeMap<String, String>,
    payload: Vec<u8>,
}

fn received(m: &BorrowedMessage<'_>) -> Received {
    Received {
        key: String::from_utf8(m.key().unwrap().to_vec()).unwrap(),
        headers: m
            .headers()
            .map(|h| {
                h.iter()
                    .map(|h| {
                        (
                            h.key.to_owned(),
                            String::from_utf8(h.value.unwrap().to_vec()).unwrap(),
                        )
                    })
                    .collect()
            })
            .unwrap_or_default(),
        payload: m.payload().unwrap_or_default().to_vec(),
    }
}

async fn read(consumer: &StreamConsumer, expected: usize) -> Vec<Received> {
    let mut out = Vec::with_capacity(expected);
    while out.len() < expected {
        let m = tokio::time::timeout(Duration::from_secs(30), consumer.recv())
            .await
            .expect("the topic delivered fewer messages than expected")
            .unwrap();
        out.push(received(&m));
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relay_publishes_10k_events_keyed_by_aggregate_in_order() {
    init_tracing();
    let prefix = unique("t");
    let topic = format!("{prefix}.items");
    create_topics(&brokers(), &[&topic]).await;
    let outbox = Postgres::fresh().await;
    enqueue_backlog(&outbox, 100, 100).await;
    let relay = RunningRelay::start(
        Relay::builder(
            outbox.clone(),
            KafkaTransport::new(&brokers())
                .unwrap()
                .topic_prefix(&prefix),
        )
        .batch_size(100)
        .workers(2)
        .poll_interval(Duration::from_millis(50)),
    );
    eventually("all 10,000 acknowledged", WAIT, || async {
        Postgres::count_status(&outbox, "delivered").await == 10_000
    })
    .await;
    relay.stop().await;

    let consumer = raw_consumer(&brokers(), &topic);
    let messages = read(&consumer, 10_000).await;
    let mut last: BTreeMap<String, i64> = BTreeMap::new();
    let mut ids = HashSet::new();
    for m in &messages {
        let event: ItemChanged = serde_json::from_slice(&m.payload).unwrap();
        assert_eq!(m.key, event.item, "the key is the aggregate id");
        assert_eq!(m.headers["outbox-aggregate-id"], event.item);
        assert_eq!(m.headers["outbox-event-type"], "test.item_changed");
        assert_eq!(m.headers["outbox-aggregate-type"], "item");
        assert_eq!(m.headers["outbox-schema-version"], "1");
        assert_eq!(m.headers["content-type"], "application/json");
        assert!(
            ids.insert(m.headers["outbox-id"].clone()),
            "duplicate message"
        );
        let sequence: i64 = m.headers["outbox-sequence"].parse().unwrap();
        assert_eq!(sequence, event.n as i64);
        let previous = last.insert(event.item.clone(), sequence).unwrap_or(0);
        assert_eq!(sequence, previous + 1, "{}: out of order", event.item);
    }
    assert_eq!(last.len(), 100);
    Postgres::drop_tables(&outbox).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversize_event_goes_dead_with_the_reason() {
    init_tracing();
    let prefix = unique("t");
    create_topics(&brokers(), &[&format!("{prefix}.items")]).await;
    let outbox = Postgres::fresh().await;
    let mut tx = outbox.pool().begin().await.unwrap();
    let huge = outbox
        .enqueue(
            &mut *tx,
            &Huge {
                item: "big".into(),
                blob: "x".repeat(2 * 1024 * 1024),
            },
        )
        .await
        .unwrap();
    tx.commit().await.unwrap();
    enqueue_backlog(&outbox, 10, 2).await;
    let relay = RunningRelay::start(
        Relay::builder(
            outbox.clone(),
            KafkaTransport::new(&brokers())
                .unwrap()
                .topic_prefix(&prefix),
        )
        .retry(broker_retry())
        .poll_interval(Duration::from_millis(50)),
    );
    eventually(
        "the oversize event is dead, the rest delivered",
        WAIT,
        || async {
            Postgres::count_status(&outbox, "dead").await == 1
                && Postgres::count_status(&outbox, "delivered").await == 20
        },
    )
    .await;
    relay.stop().await;
    assert_dead_at_once(&outbox, huge, "too large").await;
    Postgres::drop_tables(&outbox).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_outage_loses_nothing_and_needs_no_restart() {
    init_tracing();
    let mut tansu = outbox_tests::faults::servers::private_kafka().await;
    let topic = "outage.items";
    create_topics(&tansu.address(), &[topic]).await;
    let outbox = Postgres::fresh().await;
    let mut config = producer_config(&tansu.address());
    config.set("message.timeout.ms", "3000");
    let relay = RunningRelay::start(
        Relay::builder(
            outbox.clone(),
            KafkaTransport::from_config(config)
                .unwrap()
                .topic_prefix("outage"),
        )
        .retry(broker_retry())
        .poll_interval(Duration::from_millis(50)),
    );
    enqueue_backlog(&outbox, 1, 1).await;
    eventually("the first event is delivered", WAIT, || async {
        Postgres::count_status(&outbox, "delivered").await == 1
    })
    .await;

    tansu.stop();
    enqueue_backlog(&outbox, 100, 10).await;
    wait_for_recorded_failure(&outbox).await;
    tansu.restart().await;
    create_topics(&tansu.address(), &[topic]).await;
    eventually("all delivered once the broker is back", WAIT, || async {
        Postgres::count_status(&outbox, "delivered").await == 1001
    })
    .await;
    relay.stop().await;
    assert_eq!(Postgres::count_status(&outbox, "dead").await, 0);
    // The restarted broker (memory storage) holds everything enqueued during the outage.
    let consumer = raw_consumer(&tansu.address(), topic);
    let mut ids = HashSet::new();
    while ids.len() < 1000 {
        for m in read(&consumer, 1).await {
            ids.insert(m.headers["outbox-id"].clone());
        }
    }
    Postgres::drop_tables(&outbox).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consumer_applies_once_with_the_inbox_and_dead_letters_poison() {
    init_tracing();
    let prefix = unique("t");
    let topic = format!("{prefix}.items");
    let dlq = dead_letter_topic(&topic);
    create_topics(&brokers(), &[&topic, &dlq]).await;
    let outbox = Postgres::fresh().await;
    // The consuming service: the first delivery of each aggregate's first event loses its ack.
    let applier = Applier::new(&outbox, "stock").await;

    enqueue_poison(&outbox).await;
    enqueue_backlog(&outbox, 5, 4).await;
    let relay = RunningRelay::start(
        Relay::builder(
            outbox.clone(),
            KafkaTransport::new(&brokers())
                .unwrap()
                .topic_prefix(&prefix),
        )
        .poll_interval(Duration::from_millis(50)),
    );
    eventually("all published", WAIT, || async {
        Postgres::count_status(&outbox, "delivered").await == 21
    })
    .await;
    relay.stop().await;

    let consumer = KafkaConsumer::new(
        KafkaSource::new(&brokers(), &unique("group"), &[&topic]).unwrap(),
        applier.dispatcher(AfterCommit::LoseFirstAck {
            first_events_only: true,
        }),
    )
    .retry(RetryPolicy::exponential(Duration::from_millis(20)).max_attempts(3));
    let shutdown = outbox::CancellationToken::new();
    let consuming = tokio::spawn({
        let shutdown = shutdown.clone();
        async move { consumer.run(shutdown).await.unwrap() }
    });
    eventually("every event applied", WAIT, || async {
        applier.applied().await == 20
    })
    .await;
    let dead = read(&raw_consumer(&brokers(), &dlq), 1).await;
    assert_eq!(dead[0].key, "poison");
    assert!(
        dead[0].headers[DEAD_REASON].contains("missing field `n`"),
        "{:?}",
        dead[0].headers
    );
    shutdown.cancel();
    consuming.await.unwrap();
    // 20 events; the 5 first events of each aggregate came twice; state changed 20 times.
    assert_eq!(applier.calls(), 25);
    applier.drop_tables().await;
    Postgres::drop_tables(&outbox).await;
}

/// librdkafka retries a message on its own until `message.timeout.ms`: a relay whose lease is
/// shorter than four thirds of it could see a delivery it gave up on confirmed after another
/// relay took the aggregate over. `build` refuses it, naming the setting; a shorter client
/// timeout makes the short lease fine, and the default settings suit the default lease.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lease_shorter_than_the_kafka_message_timeout_is_refused() {
    let outbox = Postgres::fresh().await;
    let refused = Relay::builder(outbox.clone(), KafkaTransport::new(&brokers()).unwrap())
        .lease(Duration::from_secs(2))
        .build()
        .map(|_| ())
        .unwrap_err();
    assert!(
        matches!(&refused, outbox::Error::Config(m) if m.contains("message.timeout.ms")),
        "{refused}"
    );
    let mut config = producer_config(&brokers());
    config.set("message.timeout.ms", "1200");
    Relay::builder(outbox.clone(), KafkaTransport::from_config(config).unwrap())
        .lease(Duration::from_secs(2))
        .build()
        .expect("1.2 s of client timeout fits the 1.35 s a delivery gets of a 2 s lease");
    // 0 is "for ever" to librdkafka: no lease fits it.
    let mut config = producer_config(&brokers());
    config.set("message.timeout.ms", "0");
    assert!(
        Relay::builder(outbox.clone(), KafkaTransport::from_config(config).unwrap())
            .lease(outbox::MAX_LEASE)
            .build()
            .is_err()
    );
    // The alias set after `producer_config` is what counts.
    let mut config = producer_config(&brokers());
    config.set("delivery.timeout.ms", "600000");
    let alias = Relay::builder(outbox.clone(), KafkaTransport::from_config(config).unwrap())
        .build()
        .map(|_| ())
        .unwrap_err();
    assert!(alias.to_string().contains("600s"), "{alias}");
    let mut config = producer_config(&brokers());
    config.remove("message.timeout.ms");
    let librdkafka_default =
        Relay::builder(outbox.clone(), KafkaTransport::from_config(config).unwrap())
            .build()
            .map(|_| ())
            .unwrap_err();
    assert!(
        librdkafka_default.to_string().contains("300s"),
        "{librdkafka_default}"
    );
    Relay::builder(outbox.clone(), KafkaTransport::new(&brokers()).unwrap())
        .build()
        .expect("the transport's 20 s fit the default 30 s lease");
    Postgres::drop_tables(&outbox).await;
}
