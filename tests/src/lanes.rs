//! One fresh lane per test on each real broker (a JetStream stream, a RabbitMQ quorum queue with
//! dead-lettering, a Kafka topic), so the same consumer test body runs against all three.

use crate::nats::{jetstream, nats_url, read_stored};
use async_nats::jetstream::consumer as js_consumer;
use futures_util::StreamExt;
use outbox::amqp::{AmqpConsumer, AmqpSource, AmqpTransport, Topology};
use outbox::kafka::{dead_letter_topic, ensure_topic, KafkaConsumer, KafkaSource, KafkaTransport};
use outbox::nats::{ensure_stream, NatsConsumer, NatsTransport};
use outbox::{CancellationToken, Dispatcher, Envelope, Inbox, RetryPolicy, Transport};
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{Consumer as _, StreamConsumer};
use rdkafka::message::Headers as _;
use rdkafka::Message as _;
use sqlx::Postgres;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::task::JoinHandle;
use uuid::Uuid;

/// The brokers a consumer can read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Broker {
    Nats,
    Amqp,
    Kafka,
}

pub fn amqp_url() -> String {
    std::env::var("OUTBOX_TEST_AMQP_URL")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".to_owned())
}

pub fn kafka_brokers() -> String {
    std::env::var("OUTBOX_TEST_KAFKA_BROKERS").unwrap_or_else(|_| "127.0.0.1:9092".to_owned())
}

/// A stream, queue or topic of its own, and what the test needs to read it back.
#[derive(Debug)]
pub struct Lane {
    pub broker: Broker,
    /// The events' route: the subject base, the exchange and queue, the topic.
    pub name: String,
    nats: Option<(
        async_nats::jetstream::Context,
        async_nats::jetstream::stream::Stream,
    )>,
    /// Stream sequences of the messages JetStream terminated (its dead-lettering).
    terminated: Arc<Mutex<Vec<u64>>>,
}

/// A message the consumer dead-lettered.
#[derive(Debug, Clone)]
pub struct Dead {
    pub id: Uuid,
    /// The reason, where the broker carries it (Kafka's `outbox-dead-reason` header).
    pub reason: Option<String>,
}

/// A consumer running in a task of its own.
#[derive(Debug)]
pub struct Running {
    shutdown: CancellationToken,
    task: JoinHandle<outbox::Result<()>>,
    amqp: Option<lapin::Connection>,
}

impl Running {
    /// Stops gracefully and returns what `run` returned.
    pub async fn stop(self) -> outbox::Result<()> {
        self.shutdown.cancel();
        let outcome = self.task.await.expect("the consumer task panicked");
        if let Some(connection) = self.amqp {
            connection.close(0, "done".into()).await.ok();
        }
        outcome
    }

    /// Dies as a crashed process would: nothing more is sent, the connection is gone.
    pub async fn crash(self) {
        self.task.abort();
        let _ = self.task.await;
        if let Some(connection) = self.amqp {
            connection.close(0, "crash".into()).await.ok();
        }
    }

    /// Waits until the consumer ends by itself.
    pub async fn wait(self) -> outbox::Result<()> {
        self.task.await.expect("the consumer task panicked")
    }

    pub fn is_finished(&self) -> bool {
        self.task.is_finished()
    }

    pub fn shutdown_token(&self) -> CancellationToken {
        self.shutdown.clone()
    }
}

/// How a test wants its consumer.
#[derive(Debug, Clone)]
pub struct Setup {
    pub retry: RetryPolicy,
    pub concurrency: usize,
    pub shutdown_timeout: Duration,
    pub attempts_in: Option<Inbox<Postgres>>,
    /// JetStream's redelivery timeout for unacknowledged messages.
    pub ack_wait: Duration,
}

impl Default for Setup {
    fn default() -> Self {
        Self {
            retry: RetryPolicy::exponential(Duration::from_millis(50))
                .max_delay(Duration::from_millis(200))
                .jitter(false),
            concurrency: 8,
            shutdown_timeout: Duration::from_secs(10),
            attempts_in: None,
            ack_wait: Duration::from_secs(30),
        }
    }
}

impl Lane {
    pub async fn new(broker: Broker) -> Self {
        let name = format!("lane{}", &Uuid::new_v4().simple().to_string()[..10]);
        let terminated = Arc::new(Mutex::new(Vec::new()));
        let mut nats = None;
        match broker {
            Broker::Nats => {
                let js = jetstream(&nats_url()).await;
                let stream_name = name.to_uppercase();
                let stream = ensure_stream(&js, &stream_name, vec![format!("{name}.>")])
                    .await
                    .unwrap();
                let client = async_nats::connect(nats_url()).await.unwrap();
                let mut advisories = client
                    .subscribe(format!(
                        "$JS.EVENT.ADVISORY.CONSUMER.MSG_TERMINATED.{stream_name}.*"
                    ))
                    .await
                    .unwrap();
                client.flush().await.unwrap();
                let seen = terminated.clone();
                tokio::spawn(async move {
                    let _client = client;
                    while let Some(advisory) = advisories.next().await {
                        let v: serde_json::Value =
                            serde_json::from_slice(&advisory.payload).unwrap();
                        seen.lock().unwrap().push(v["stream_seq"].as_u64().unwrap());
                    }
                });
                nats = Some((js, stream));
            }
            Broker::Amqp => {
                let (connection, channel) = amqp_channel().await;
                Topology::new(&name)
                    .queue(&name, ["#"])
                    .quorum()
                    .with_dead_letters()
                    .declare(&channel)
                    .await
                    .unwrap();
                connection.close(0, "declared".into()).await.ok();
            }
            Broker::Kafka => ensure_topic(&kafka_brokers(), &name, 1).await.unwrap(),
        }
        Self {
            broker,
            name,
            nats,
            terminated,
        }
    }

    /// The lane `name` that another process created with [`new`](Self::new).
    pub async fn open(broker: Broker, name: &str) -> Self {
        let nats = match broker {
            Broker::Nats => {
                let js = jetstream(&nats_url()).await;
                let stream = js.get_stream(name.to_uppercase()).await.unwrap();
                Some((js, stream))
            }
            Broker::Amqp | Broker::Kafka => None,
        };
        Self {
            broker,
            name: name.to_owned(),
            nats,
            terminated: Arc::default(),
        }
    }

    /// A Kafka lane whose topic name is as long as Kafka allows (249 bytes), so its dead-letter
    /// topic `<topic>.dlq` cannot exist and every dead-letter publish fails.
    pub async fn kafka_without_dead_letters() -> Self {
        use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
        let id = Uuid::new_v4().simple().to_string();
        let name = format!("lane{}{}", &id[..10], "x".repeat(249 - 14));
        let admin: AdminClient<rdkafka::client::DefaultClientContext> = ClientConfig::new()
            .set("bootstrap.servers", kafka_brokers())
            .create()
            .unwrap();
        for result in admin
            .create_topics(
                &[NewTopic::new(&name, 1, TopicReplication::Fixed(1))],
                &AdminOptions::new(),
            )
            .await
            .unwrap()
        {
            result.unwrap();
        }
        Self {
            broker: Broker::Kafka,
            name,
            nats: None,
            terminated: Arc::default(),
        }
    }

    /// The `n`-th `ItemChanged` of `item`, as a relay would publish it.
    pub fn envelope(&self, item: &str, n: u64) -> Envelope {
        Envelope {
            id: Uuid::now_v7(),
            created_at: chrono::Utc::now(),
            event_type: "test.item_changed".into(),
            aggregate_type: "item".into(),
            aggregate_id: item.into(),
            sequence: n as i64,
            schema_version: 1,
            topic: self.name.clone(),
            payload: serde_json::json!({ "item": item, "n": n }).to_string(),
            headers: Default::default(),
            attempt: 1,
        }
    }

    /// Publishes `batch` in order through the broker's transport; every publish confirmed.
    pub async fn publish(&self, batch: &[Envelope]) {
        let results = match self.broker {
            Broker::Nats => {
                let (js, _) = self.nats.as_ref().unwrap();
                NatsTransport::new(js.clone()).publish(batch).await
            }
            Broker::Amqp => AmqpTransport::new(amqp_url()).publish(batch).await,
            Broker::Kafka => {
                KafkaTransport::new(&kafka_brokers())
                    .unwrap()
                    .publish(batch)
                    .await
            }
        };
        for result in results {
            result.expect("published");
        }
    }

    /// Starts a consumer (a durable JetStream consumer, a connection of its own to RabbitMQ,
    /// a member of a Kafka group) named `group`.
    pub async fn consume(&self, group: &str, dispatcher: Dispatcher, setup: &Setup) -> Running {
        let shutdown = CancellationToken::new();
        let token = shutdown.clone();
        macro_rules! configured {
            ($consumer:expr) => {{
                let mut consumer = $consumer
                    .retry(setup.retry.clone())
                    .concurrency(setup.concurrency)
                    .shutdown_timeout(setup.shutdown_timeout);
                if let Some(inbox) = &setup.attempts_in {
                    consumer = consumer.attempts_in(inbox.clone());
                }
                consumer
            }};
        }
        match self.broker {
            Broker::Nats => {
                let (_, stream) = self.nats.as_ref().unwrap();
                let pull = stream
                    .get_or_create_consumer(
                        group,
                        js_consumer::pull::Config {
                            durable_name: Some(group.into()),
                            ack_policy: js_consumer::AckPolicy::Explicit,
                            ack_wait: setup.ack_wait,
                            ..Default::default()
                        },
                    )
                    .await
                    .unwrap();
                let consumer = configured!(NatsConsumer::new(pull, dispatcher));
                Running {
                    shutdown,
                    task: tokio::spawn(async move { consumer.run(token).await }),
                    amqp: None,
                }
            }
            Broker::Amqp => {
                let (connection, channel) = amqp_channel().await;
                let consumer = configured!(AmqpConsumer::new(
                    AmqpSource::new(channel, &self.name),
                    dispatcher
                ));
                Running {
                    shutdown,
                    task: tokio::spawn(async move { consumer.run(token).await }),
                    amqp: Some(connection),
                }
            }
            Broker::Kafka => {
                // A member that died without leaving is replaced after the session timeout.
                let mut config = ClientConfig::new();
                config
                    .set("bootstrap.servers", kafka_brokers())
                    .set("group.id", group)
                    .set("auto.offset.reset", "earliest")
                    .set("session.timeout.ms", "6000")
                    .set("heartbeat.interval.ms", "1000");
                let source = KafkaSource::from_config(config, &[&self.name]).unwrap();
                let consumer = configured!(KafkaConsumer::new(source, dispatcher));
                Running {
                    shutdown,
                    task: tokio::spawn(async move { consumer.run(token).await }),
                    amqp: None,
                }
            }
        }
    }

    /// Waits until `expected` messages were dead-lettered (or `timeout`), and returns them.
    pub async fn dead_lettered(&self, expected: usize, timeout: Duration) -> Vec<Dead> {
        let deadline = tokio::time::Instant::now() + timeout;
        match self.broker {
            Broker::Nats => {
                while self.terminated.lock().unwrap().len() < expected
                    && tokio::time::Instant::now() < deadline
                {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                let (_, stream) = self.nats.as_ref().unwrap();
                let stored = read_stored(stream).await;
                let terminated = self.terminated.lock().unwrap().clone();
                terminated
                    .into_iter()
                    .map(|seq| {
                        let message = stored
                            .iter()
                            .find(|m| m.info().unwrap().stream_sequence == seq)
                            .expect("a terminated message is in the stream");
                        let id = message.headers.as_ref().unwrap().get("outbox-id").unwrap();
                        Dead {
                            id: id.as_str().parse().unwrap(),
                            reason: None,
                        }
                    })
                    .collect()
            }
            Broker::Amqp => {
                let (connection, channel) = amqp_channel().await;
                let queue = Topology::dead_letter_queue(&self.name);
                let mut dead = Vec::new();
                while dead.len() < expected && tokio::time::Instant::now() < deadline {
                    let got = channel
                        .basic_get(queue.as_str().into(), Default::default())
                        .await
                        .unwrap();
                    match got {
                        Some(message) => {
                            let id = message.properties.message_id().as_ref().unwrap();
                            dead.push(Dead {
                                id: id.as_str().parse().unwrap(),
                                reason: None,
                            });
                            message.ack(Default::default()).await.unwrap();
                        }
                        None => tokio::time::sleep(Duration::from_millis(50)).await,
                    }
                }
                connection.close(0, "read".into()).await.ok();
                dead
            }
            Broker::Kafka => {
                let reader: StreamConsumer = ClientConfig::new()
                    .set("bootstrap.servers", kafka_brokers())
                    .set(
                        "group.id",
                        format!("dlq-reader-{}", Uuid::new_v4().simple()),
                    )
                    .set("auto.offset.reset", "earliest")
                    .set("enable.auto.commit", "false")
                    .create()
                    .unwrap();
                reader.subscribe(&[&dead_letter_topic(&self.name)]).unwrap();
                let mut dead = Vec::new();
                while dead.len() < expected {
                    let Ok(Ok(message)) = tokio::time::timeout_at(deadline, reader.recv()).await
                    else {
                        break;
                    };
                    let header = |key: &str| {
                        message.headers().and_then(|h| {
                            h.iter()
                                .find(|h| h.key == key)
                                .and_then(|h| h.value)
                                .map(|v| String::from_utf8_lossy(v).into_owned())
                        })
                    };
                    dead.push(Dead {
                        id: header("outbox-id").unwrap().parse().unwrap(),
                        reason: header(outbox::kafka::DEAD_REASON),
                    });
                }
                dead
            }
        }
    }
}

async fn amqp_channel() -> (lapin::Connection, lapin::Channel) {
    let connection =
        lapin::Connection::connect(&amqp_url(), lapin::ConnectionProperties::default())
            .await
            .unwrap_or_else(|e| panic!("cannot reach RabbitMQ: {e}"));
    let channel = connection.create_channel().await.unwrap();
    (connection, channel)
}
