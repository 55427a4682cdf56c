//! All three broker features in one build, and one relay routing to all three brokers.

use futures_util::StreamExt;
use lapin::options::{BasicAckOptions, BasicConsumeOptions};
use lapin::types::FieldTable;
use outbox::amqp::{AmqpTransport, Topology};
use outbox::kafka::KafkaTransport;
use outbox::nats::{ensure_stream, NatsTransport};
use outbox::{OutboxEvent, Relay, Router};
use outbox_tests::{
    eventually, init_tracing, ItemChanged, NobodyListens, RunningRelay, TestDb, Unrouted,
};
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::Message;
use sqlx::Postgres;
use std::time::Duration;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_relay_routes_to_kafka_rabbitmq_and_nats() {
    init_tracing();
    let id = &uuid::Uuid::new_v4().simple().to_string()[..10];
    let prefix = format!("r{id}");
    let kafka_brokers =
        std::env::var("OUTBOX_TEST_KAFKA_BROKERS").unwrap_or_else(|_| "127.0.0.1:9092".to_owned());
    let amqp_url = std::env::var("OUTBOX_TEST_AMQP_URL")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".to_owned());
    let nats_url =
        std::env::var("OUTBOX_TEST_NATS_URL").unwrap_or_else(|_| "127.0.0.1:4222".to_owned());

    // Kafka: the topic of ItemChanged.
    let kafka_topic = format!("{prefix}.{}", ItemChanged::TOPIC);
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", &kafka_brokers)
        .create()
        .unwrap();
    for r in admin
        .create_topics(
            &[NewTopic::new(&kafka_topic, 1, TopicReplication::Fixed(1))],
            &AdminOptions::new(),
        )
        .await
        .unwrap()
    {
        r.unwrap();
    }
    // NATS: a stream for everything under the prefix.
    let js = async_nats::jetstream::new(async_nats::connect(&nats_url).await.unwrap());
    let stream = format!("R{id}").to_uppercase();
    ensure_stream(&js, &stream, vec![format!("{prefix}.>")])
        .await
        .unwrap();
    // RabbitMQ: one exchange and queue.
    let (exchange, queue) = (format!("x-{prefix}"), format!("q-{prefix}"));
    let connection = lapin::Connection::connect(&amqp_url, lapin::ConnectionProperties::default())
        .await
        .unwrap();
    let channel = connection.create_channel().await.unwrap();
    Topology::new(&exchange)
        .queue(&queue, ["#"])
        .declare(&channel)
        .await
        .unwrap();

    let router = Router::builder()
        .transport(
            KafkaTransport::new(&kafka_brokers)
                .unwrap()
                .topic_prefix(&prefix),
        )
        .transport(NatsTransport::new(js.clone()).subject_prefix(&prefix))
        .transport(AmqpTransport::new(&amqp_url).exchange(&exchange))
        .route_event::<ItemChanged>("kafka")
        .route_event::<Unrouted>("nats")
        .default_transport("amqp")
        .build()
        .unwrap();

    let outbox = Postgres::fresh().await;
    let mut tx = outbox.pool().begin().await.unwrap();
    for n in 1..=5 {
        outbox
            .enqueue(
                &mut *tx,
                &ItemChanged {
                    item: "to-kafka".into(),
                    n,
                },
            )
            .await
            .unwrap();
        outbox
            .enqueue(
                &mut *tx,
                &Unrouted {
                    item: format!("to-nats-{n}"),
                },
            )
            .await
            .unwrap();
        outbox
            .enqueue(
                &mut *tx,
                &NobodyListens {
                    item_id: format!("to-amqp-{n}"),
                },
            )
            .await
            .unwrap();
    }
    tx.commit().await.unwrap();
    let relay = RunningRelay::start(
        Relay::builder(outbox.clone(), router).poll_interval(Duration::from_millis(50)),
    );
    eventually("all 15 delivered", Duration::from_secs(60), || async {
        Postgres::count_status(&outbox, "delivered").await == 15
    })
    .await;
    relay.stop().await;

    // Kafka got the five ItemChanged, in order.
    let consumer: StreamConsumer = ClientConfig::new()
        .set("bootstrap.servers", &kafka_brokers)
        .set("group.id", format!("g{id}"))
        .set("auto.offset.reset", "earliest")
        .create()
        .unwrap();
    consumer.subscribe(&[&kafka_topic]).unwrap();
    for n in 1..=5u64 {
        let m = tokio::time::timeout(Duration::from_secs(30), consumer.recv())
            .await
            .unwrap()
            .unwrap();
        let event: ItemChanged = serde_json::from_slice(m.payload().unwrap()).unwrap();
        assert_eq!(event.n, n);
    }
    // NATS got the five Unrouted.
    let info = js
        .get_stream(&stream)
        .await
        .unwrap()
        .info()
        .await
        .unwrap()
        .clone();
    assert_eq!(info.state.messages, 5);
    // RabbitMQ got the five NobodyListens, through the default route.
    let mut deliveries = channel
        .basic_consume(
            queue.as_str().into(),
            "check".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    for _ in 0..5 {
        let d = tokio::time::timeout(Duration::from_secs(10), deliveries.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        assert_eq!(d.routing_key.as_str(), "item.test.nobody_listens");
        d.acker.ack(BasicAckOptions::default()).await.unwrap();
    }
    js.delete_stream(&stream).await.unwrap();
    Postgres::drop_tables(&outbox).await;
}
