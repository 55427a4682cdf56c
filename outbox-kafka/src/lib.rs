//! Kafka for the outbox framework (`rdkafka`, librdkafka bundled).
//!
//! - [`KafkaTransport`] publishes outbox events with the idempotent producer (`acks=all`,
//!   `enable.idempotence=true`): message key = aggregate id, so one aggregate stays in one
//!   partition and in order; topic = the event's route; headers carry the outbox id, event
//!   type, aggregate, sequence, schema version, content type, correlation id and trace context.
//!   A batch is handed to librdkafka at once and every delivery report awaited: the relay's
//!   batch is already a batch, so the producer does not linger (`linger.ms=0` by default here).
//! - [`KafkaConsumer`] reads topics in a consumer group into the same typed handlers as the
//!   relay: the core's [`Consumer`] loop over a [`KafkaSource`]. Offsets are committed per
//!   partition only up to the first message not yet handled; failures are retried in place
//!   (later messages of the aggregate wait, other aggregates flow), and a message that failed
//!   for good is published to a dead-letter topic `<topic>.dlq` before its offset counts.
//!
//! TLS is behind the `tls` feature.
//!
//! ```no_run
//! # async fn demo<DB: outbox_core::Backend>(outbox: outbox_core::Outbox<DB>) -> Result<(), Box<dyn std::error::Error>> {
//! use outbox_core::{CancellationToken, Relay};
//! use outbox_kafka::KafkaTransport;
//!
//! let kafka = KafkaTransport::new("127.0.0.1:9092")?;
//! Relay::builder(outbox, kafka).build()?.run(CancellationToken::new()).await?;
//! # Ok(()) }
//! ```

use futures_util::future::join_all;
use outbox_core::consumer::{Consumer, Received, Source};
use outbox_core::{DeliveryError, DeliveryResult, Envelope, Error, StoppedRuns, Transport};
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{CommitMode, Consumer as _, StreamConsumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, Headers, OwnedHeaders, OwnedMessage};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use rdkafka::{Message, Offset, TopicPartitionList};
use std::collections::{BTreeSet, HashMap};
use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::Duration;

pub use rdkafka;

/// Creates `topic` with `partitions` partitions (replication 1) unless it exists, and its
/// dead-letter topic `<topic>.dlq` likewise. For development and tests; production topics are
/// usually managed elsewhere.
pub async fn ensure_topic(brokers: &str, topic: &str, partitions: i32) -> Result<(), KafkaError> {
    use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
    let admin: AdminClient<rdkafka::client::DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .create()?;
    let dlq = dead_letter_topic(topic);
    let topics = [
        NewTopic::new(topic, partitions, TopicReplication::Fixed(1)),
        NewTopic::new(&dlq, 1, TopicReplication::Fixed(1)),
    ];
    for result in admin.create_topics(&topics, &AdminOptions::new()).await? {
        match result {
            Ok(_) | Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((name, code)) => {
                return Err(KafkaError::AdminOp(code)).inspect_err(
                    |_| tracing::error!(topic = %name, ?code, "cannot create Kafka topic"),
                )
            }
        }
    }
    Ok(())
}

/// The header holding the reason a message went to the dead-letter topic.
pub const DEAD_REASON: &str = "outbox-dead-reason";

/// The producer settings the transport starts from: idempotent, `acks=all`, `linger.ms=0`,
/// `message.timeout.ms=20000`. The message timeout must stay below three quarters of the
/// relay's lease (30 s by default): a delivery the relay has given up on must not be confirmed
/// later, behind events another relay delivered meanwhile. Lower it with a shorter lease:
/// [`RelayBuilder::build`](outbox_core::RelayBuilder::build) refuses a lease it does not fit.
/// Lingering buys nothing when the relay hands over whole batches; on the benchmark
/// (`BENCHMARKS.md`) 5 ms of linger added 10 ms to the median commit-to-confirmation latency
/// and no throughput.
/// Anything you set afterwards on the [`ClientConfig`] wins, except idempotence and acks, which
/// the outbox's guarantees depend on.
pub fn producer_config(brokers: &str) -> ClientConfig {
    let mut config = ClientConfig::new();
    config
        .set("bootstrap.servers", brokers)
        .set("linger.ms", "0")
        .set("message.timeout.ms", "20000");
    config
}

/// Publishes outbox events to Kafka.
pub struct KafkaTransport {
    config: ClientConfig,
    producer: Mutex<Arc<FutureProducer>>,
    name: String,
    topic_prefix: Option<String>,
    /// librdkafka's effective `message.timeout.ms` (`Duration::MAX`: for ever).
    delivery_timeout: Duration,
}

impl fmt::Debug for KafkaTransport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The configuration may hold SASL passwords: never print it.
        f.debug_struct("KafkaTransport")
            .field("name", &self.name)
            .field("topic_prefix", &self.topic_prefix)
            .finish_non_exhaustive()
    }
}

impl KafkaTransport {
    /// A transport named `"kafka"` producing to `brokers` (`host:port,host:port`) with
    /// [`producer_config`].
    pub fn new(brokers: &str) -> Result<Self, KafkaError> {
        Self::from_config(producer_config(brokers))
    }

    /// A transport producing with `config`, plus `enable.idempotence=true` and `acks=all`.
    pub fn from_config(mut config: ClientConfig) -> Result<Self, KafkaError> {
        config.set("enable.idempotence", "true").set("acks", "all");
        // `delivery.timeout.ms` is an alias of `message.timeout.ms`: with both in the map
        // librdkafka applies whichever it meets last. The alias, set after `producer_config`,
        // is what the caller meant.
        if let Some(alias) = config.get("delivery.timeout.ms").map(str::to_owned) {
            config.remove("delivery.timeout.ms");
            config.set("message.timeout.ms", alias);
        }
        // What librdkafka will really use; 0 means it retries for ever.
        let ms: u64 = config
            .create_native_config()?
            .get("message.timeout.ms")?
            .parse()
            .unwrap_or(0);
        let delivery_timeout = match ms {
            0 => Duration::MAX,
            ms => Duration::from_millis(ms),
        };
        let producer = config.create::<FutureProducer>()?;
        Ok(Self {
            config,
            producer: Mutex::new(Arc::new(producer)),
            name: "kafka".to_owned(),
            topic_prefix: None,
            delivery_timeout,
        })
    }

    /// Names the transport for a [`Router`](outbox_core::Router) (default `"kafka"`).
    pub fn named(mut self, name: impl Into<String>) -> Self {
        self.name = name.into();
        self
    }

    /// Puts `prefix.` before every topic. A prefix that is not a legal topic name makes the
    /// relay's `build` fail.
    pub fn topic_prefix(mut self, prefix: impl Into<String>) -> Self {
        self.topic_prefix = Some(prefix.into());
        self
    }

    /// The topic of an event: `[<prefix>.]<topic>`.
    pub fn topic(&self, envelope: &Envelope) -> String {
        match &self.topic_prefix {
            Some(prefix) => format!("{prefix}.{}", envelope.topic),
            None => envelope.topic.clone(),
        }
    }

    fn producer(&self) -> Arc<FutureProducer> {
        self.producer.lock().expect("producer lock").clone()
    }

    /// An idempotent producer that hit a fatal error can never send again, and one whose
    /// messages timed out may be stuck on producer state the broker lost (a restarted broker):
    /// replace it. Every message it held has its result by now.
    fn replace_if_stuck(&self, producer: &FutureProducer, timed_out: bool) {
        let fatal = producer.client().fatal_error();
        if fatal.is_some() || timed_out {
            tracing::warn!(?fatal, timed_out, transport = %self.name, "replacing the Kafka producer");
            match self.config.create::<FutureProducer>() {
                Ok(fresh) => *self.producer.lock().expect("producer lock") = Arc::new(fresh),
                Err(error) => tracing::error!(%error, "cannot create a Kafka producer"),
            }
        }
    }
}

/// The Kafka headers of an event.
pub fn headers(envelope: &Envelope) -> OwnedHeaders {
    envelope
        .wire_headers()
        .iter()
        .fold(OwnedHeaders::new(), |headers, (key, value)| {
            headers.insert(Header {
                key,
                value: Some(value.as_bytes()),
            })
        })
}

fn failure(error: &KafkaError) -> DeliveryError {
    let reason = format!("Kafka: {error}");
    match error.rdkafka_error_code() {
        Some(
            RDKafkaErrorCode::MessageSizeTooLarge
            | RDKafkaErrorCode::InvalidTopic
            | RDKafkaErrorCode::TopicAuthorizationFailed
            | RDKafkaErrorCode::InvalidRecord,
        ) => DeliveryError::permanent(reason),
        // The cluster is unreachable or electing: an outage, not the message's fault.
        Some(
            RDKafkaErrorCode::MessageTimedOut
            | RDKafkaErrorCode::AllBrokersDown
            | RDKafkaErrorCode::BrokerTransportFailure
            | RDKafkaErrorCode::Resolve
            | RDKafkaErrorCode::LeaderNotAvailable
            | RDKafkaErrorCode::NotLeaderForPartition
            | RDKafkaErrorCode::RequestTimedOut
            | RDKafkaErrorCode::NetworkException
            | RDKafkaErrorCode::NotEnoughReplicas
            | RDKafkaErrorCode::NotEnoughReplicasAfterAppend,
        ) => DeliveryError::unavailable(reason),
        _ => DeliveryError::retry(reason),
    }
}

impl Transport for KafkaTransport {
    fn name(&self) -> &str {
        &self.name
    }

    /// The topic prefix must be a legal topic name: ASCII letters, digits, `.`, `_`, `-`.
    fn validate(&self) -> Result<(), Error> {
        let Some(prefix) = &self.topic_prefix else {
            return Ok(());
        };
        let reject = |reason| {
            Err(Error::InvalidField {
                field: format!("Kafka topic prefix {prefix:?}"),
                reason,
            })
        };
        if prefix.is_empty() || prefix.len() > 200 {
            return reject("it must be 1 to 200 bytes (a topic name takes at most 249)");
        }
        if !prefix
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
        {
            return reject("topic names take only ASCII letters, digits, '.', '_' and '-'");
        }
        Ok(())
    }

    /// librdkafka retries a message on its own until `message.timeout.ms` (or its alias
    /// `delivery.timeout.ms`; librdkafka's default is 300 s, and 0 means for ever): the relay's
    /// lease must outlast it.
    fn delivery_timeout(&self) -> Option<Duration> {
        Some(self.delivery_timeout)
    }

    async fn publish(&self, batch: &[Envelope]) -> Vec<DeliveryResult> {
        let producer = self.producer();
        let mut pending = Vec::with_capacity(batch.len());
        // Aggregates whose run failed at send time (too large, say): nothing more of them is
        // produced, so nothing overtakes the failed event.
        let mut stopped = StoppedRuns::new();
        for envelope in batch {
            if stopped.contains(envelope) {
                pending.push(Err(None));
                continue;
            }
            let _span = tracing::debug_span!(
                "outbox.publish",
                transport = %self.name,
                event_id = %envelope.id,
                event_type = %envelope.event_type,
                aggregate_type = %envelope.aggregate_type,
                aggregate_id = %envelope.aggregate_id,
                attempt = envelope.attempt,
            )
            .entered();
            let topic = self.topic(envelope);
            let record = FutureRecord::to(&topic)
                .key(&envelope.aggregate_id)
                .payload(&envelope.payload)
                .headers(headers(envelope));
            let sent = producer
                .send_result(record)
                .map_err(|(error, _)| Some(error));
            if sent.is_err() {
                stopped.stop(envelope);
            }
            pending.push(sent);
        }
        let outcomes = join_all(pending.into_iter().zip(batch).map(
            |(sent, envelope)| async move {
                let id = envelope.id;
                match sent {
                    Ok(delivery) => match delivery.await {
                        Ok(Ok(delivery)) => {
                            tracing::debug!(
                                event_id = %id,
                                partition = delivery.partition,
                                offset = delivery.offset,
                                "Kafka confirmed the event"
                            );
                            Ok(())
                        }
                        Ok(Err((error, _))) => Err(Some(error)),
                        Err(_) => Err(Some(KafkaError::Canceled)),
                    },
                    Err(error) => Err(error),
                }
            },
        ))
        .await;
        let timed_out = outcomes.iter().any(|o| {
            matches!(o, Err(Some(e)) if e.rdkafka_error_code() == Some(RDKafkaErrorCode::MessageTimedOut))
        });
        self.replace_if_stuck(&producer, timed_out);
        outcomes
            .into_iter()
            .map(|o| {
                o.map_err(|e| match e {
                    Some(error) => failure(&error),
                    None => DeliveryError::held_back(),
                })
            })
            .collect()
    }
}

/// The dead-letter topic of `topic`: `<topic>.dlq`.
pub fn dead_letter_topic(topic: &str) -> String {
    format!("{topic}.dlq")
}

/// Topics read in a consumer group, as the [`Source`] of a [`Consumer`].
///
/// Offsets are committed per partition up to the first message not yet handled or
/// dead-lettered, never past it: a message that is retrying holds back the commit of its
/// partition (not its handling: later messages of other aggregates are handled meanwhile, and
/// come again after a crash; an [`Inbox`](outbox_core::Inbox) makes that harmless). A message
/// that failed for good is published to `<topic>.dlq` with the reason in the
/// [`DEAD_REASON`] header, and its offset counts as handled only once that publish is
/// confirmed. Kafka does not count deliveries: give the consumer an inbox
/// ([`Consumer::attempts_in`](outbox_core::Consumer::attempts_in)) so that a message that
/// kills the process is dead-lettered after the retry policy's last attempt.
///
/// librdkafka expects to be polled within `max.poll.interval.ms` (5 minutes by default): size
/// the consumer's [`window`](outbox_core::Consumer::window) so that failing aggregates do not
/// hold all of it for that long.
pub struct KafkaSource {
    consumer: StreamConsumer,
    dead_letters: FutureProducer,
    name: String,
    partitions: Mutex<HashMap<(String, i32), Partition>>,
}

/// Which offsets of a partition are received and not yet handled.
#[derive(Debug, Default)]
struct Partition {
    outstanding: BTreeSet<i64>,
    /// One past the highest offset received.
    next: i64,
    /// The offset stored for the next commit.
    stored: i64,
}

impl fmt::Debug for KafkaSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KafkaSource")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

impl KafkaSource {
    /// Joins `group` on `brokers`, subscribed to `topics`. Offsets are stored by the source
    /// only (`enable.auto.offset.store=false`) and committed every second and at shutdown; new
    /// groups start at the earliest offset.
    pub fn new(brokers: &str, group: &str, topics: &[&str]) -> Result<Self, KafkaError> {
        let mut config = ClientConfig::new();
        config
            .set("bootstrap.servers", brokers)
            .set("group.id", group)
            .set("auto.offset.reset", "earliest");
        Self::from_config(config, topics)
    }

    /// Like [`new`](Self::new), from a configuration of your own (`bootstrap.servers` and
    /// `group.id` set). The settings the source relies on are set over it:
    /// `enable.auto.offset.store=false`, `enable.auto.commit=true`.
    pub fn from_config(mut config: ClientConfig, topics: &[&str]) -> Result<Self, KafkaError> {
        let brokers = config
            .get("bootstrap.servers")
            .unwrap_or("127.0.0.1:9092")
            .to_owned();
        let group = config.get("group.id").unwrap_or_default().to_owned();
        if config.get("auto.commit.interval.ms").is_none() {
            config.set("auto.commit.interval.ms", "1000");
        }
        let consumer: StreamConsumer = config
            // Only offsets of handled messages are ever stored, never ones merely fetched.
            .set("enable.auto.offset.store", "false")
            .set("enable.auto.commit", "true")
            .create()?;
        consumer.subscribe(topics)?;
        let dead_letters = producer_config(&brokers)
            .set("enable.idempotence", "true")
            .set("acks", "all")
            .create()?;
        Ok(Self {
            consumer,
            dead_letters,
            name: format!("kafka:{group}/{}", topics.join(",")),
            partitions: Mutex::default(),
        })
    }

    /// The consumer, for what the source does not cover (assignment, lag).
    pub fn consumer(&self) -> &StreamConsumer {
        &self.consumer
    }

    fn received(&self, message: &OwnedMessage) {
        let mut partitions = self.partitions.lock().expect("not poisoned");
        let partition = partitions
            .entry((message.topic().to_owned(), message.partition()))
            .or_insert_with(|| Partition {
                stored: message.offset(),
                ..Partition::default()
            });
        partition.outstanding.insert(message.offset());
        partition.next = partition.next.max(message.offset() + 1);
    }

    /// Marks `message` handled and stores the offset its partition may be committed to.
    fn handled(&self, message: &OwnedMessage) -> Result<(), KafkaError> {
        let mut partitions = self.partitions.lock().expect("not poisoned");
        let Some(partition) =
            partitions.get_mut(&(message.topic().to_owned(), message.partition()))
        else {
            return Ok(());
        };
        partition.outstanding.remove(&message.offset());
        let commit = partition
            .outstanding
            .first()
            .copied()
            .unwrap_or(partition.next);
        if commit <= partition.stored {
            return Ok(());
        }
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition_offset(message.topic(), message.partition(), Offset::Offset(commit))?;
        self.consumer.store_offsets(&tpl)?;
        partition.stored = commit;
        Ok(())
    }
}

/// Reads Kafka topics in a consumer group into typed handlers: the core's [`Consumer`] over a
/// [`KafkaSource`].
///
/// ```no_run
/// # async fn demo<DB: outbox_core::Backend>(inbox: outbox_core::Inbox<DB>) -> Result<(), Box<dyn std::error::Error>> {
/// use outbox_core::{CancellationToken, Dispatcher};
/// use outbox_kafka::{KafkaConsumer, KafkaSource};
///
/// let source = KafkaSource::new("127.0.0.1:9092", "billing", &["payments"])?;
/// KafkaConsumer::new(source, Dispatcher::from_inventory()?.state(inbox.clone()))
///     .attempts_in(inbox)
///     .run(CancellationToken::new())
///     .await?;
/// # Ok(()) }
/// ```
pub type KafkaConsumer = Consumer<KafkaSource>;

impl Source for KafkaSource {
    type Message = OwnedMessage;

    fn name(&self) -> &str {
        &self.name
    }

    async fn receive(&self) -> outbox_core::Result<Option<Received<OwnedMessage>>> {
        let mut failures = 0u32;
        loop {
            match self.consumer.recv().await {
                Ok(message) => {
                    let message = message.detach();
                    self.received(&message);
                    let envelope = envelope(&message);
                    return Ok(Some(Received::new(message, envelope, None)));
                }
                Err(error) => {
                    failures += 1;
                    tracing::warn!(source = %self.name, %error, "Kafka consumer error; continuing");
                    tokio::time::sleep(Duration::from_millis(50 << failures.min(5))).await;
                }
            }
        }
    }

    async fn ack(&self, message: &OwnedMessage) -> outbox_core::Result<()> {
        self.handled(message).map_err(Error::broker)
    }

    async fn dead_letter(&self, message: &OwnedMessage, reason: &str) -> outbox_core::Result<()> {
        let mut headers = message.headers().cloned().unwrap_or_default();
        headers = headers.insert(Header {
            key: DEAD_REASON,
            value: Some(reason.as_bytes()),
        });
        let topic = dead_letter_topic(message.topic());
        let mut record = FutureRecord::to(&topic).headers(headers);
        if let Some(key) = message.key() {
            record = record.key(key);
        }
        if let Some(payload) = message.payload() {
            record = record.payload(payload);
        }
        self.dead_letters
            .send(record, Duration::from_secs(30))
            .await
            .map_err(|(error, _)| Error::broker(error))?;
        self.handled(message).map_err(Error::broker)
    }

    async fn close(&self) -> outbox_core::Result<()> {
        let mut tpl = TopicPartitionList::new();
        for ((topic, partition), state) in self.partitions.lock().expect("not poisoned").iter() {
            tpl.add_partition_offset(topic, *partition, Offset::Offset(state.stored))
                .map_err(Error::broker)?;
        }
        if tpl.count() == 0 {
            return Ok(());
        }
        // Partitions revoked meanwhile refuse the commit; their new owner goes on from its own.
        self.consumer
            .commit(&tpl, CommitMode::Sync)
            .map_err(Error::broker)
    }
}

fn envelope(message: &OwnedMessage) -> Result<Envelope, String> {
    let payload = message
        .payload()
        .map(|p| std::str::from_utf8(p).map(str::to_owned))
        .unwrap_or(Ok(String::new()))
        .map_err(|e| format!("payload is not UTF-8: {e}"))?;
    let headers: Vec<(&str, &str)> = message
        .headers()
        .map(|h| {
            h.iter()
                .filter_map(|h| Some((h.key, std::str::from_utf8(h.value?).ok()?)))
                .collect()
        })
        .unwrap_or_default();
    Envelope::from_wire(headers, payload, 1)
}
