//! The fault matrix: relays (and consumers) in separate OS processes, private servers that the
//! runner stops and restarts, writers committing under load, and a ledger that compares what
//! was committed with what arrived.
//!
//! One cell is one [`Fault`] on one [`Dest`]ination. Writers commit `Probe { account, n }`
//! events, `n` counting up per account in the business transaction (a row lock on the account
//! orders concurrent writers of one account, as a real application's row would); the fault is
//! driven while they write; then the runner waits until the outbox has nothing pending, reads
//! back everything the destination received, in arrival order, and tallies [`Figures`]: lost
//! (committed, never delivered), phantoms (delivered, never committed: a rolled-back event),
//! duplicates, per-account order violations on first arrival, dead events.
//!
//! `tests/fault_matrix.rs` runs the short form in the test suite and the long form (every
//! fault on every destination, and the soak) with `--ignored`; RELIABILITY.md reports it.

pub mod servers;

use crate::nats::read_stored;
use crate::PrivateServer;
use outbox::amqp::Topology;
use outbox::kafka::ensure_topic;
use outbox::nats::ensure_stream;
use outbox::{
    Dispatcher, EnqueueOptions, HandlerContext, HandlerError, Outbox, OutboxEvent, Registry,
    Retention, TableName,
};
use rdkafka::consumer::Consumer as _;
use rdkafka::Message as _;
use serde::{Deserialize, Serialize};
use servers::{PrivatePostgres, PrivateRabbit};
use sqlx::{PgPool, Postgres};
use std::collections::{HashMap, HashSet};
use std::fmt;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use uuid::Uuid;

/// The event of the matrix: the `n`-th change of `account`.
#[derive(Debug, Clone, Serialize, Deserialize, OutboxEvent)]
#[outbox(
    event_type = "fault.probe",
    aggregate_type = "account",
    topic = "probe"
)]
pub struct Probe {
    #[outbox(aggregate_id)]
    pub account: String,
    pub n: i64,
}

/// A `fault.probe` whose payload the `Probe` handler cannot decode (`n` is text).
#[derive(Debug, Clone, Serialize, Deserialize, OutboxEvent)]
#[outbox(
    event_type = "fault.probe",
    aggregate_type = "account",
    topic = "probe"
)]
pub struct MalformedProbe {
    #[outbox(aggregate_id)]
    pub account: String,
    pub n: String,
}

/// An event type nobody handles.
#[derive(Debug, Clone, Serialize, Deserialize, OutboxEvent)]
#[outbox(
    event_type = "fault.unknown",
    aggregate_type = "account",
    topic = "probe"
)]
pub struct UnknownProbe {
    #[outbox(aggregate_id)]
    pub account: String,
}

/// An event over every broker's message size limit (1 MiB here).
#[derive(Debug, Clone, Serialize, Deserialize, OutboxEvent)]
#[outbox(event_type = "fault.huge", aggregate_type = "account", topic = "probe")]
pub struct HugeProbe {
    #[outbox(aggregate_id)]
    pub account: String,
    pub blob: String,
}

/// An event on a route no stream, queue or binding captures.
#[derive(Debug, Clone, Serialize, Deserialize, OutboxEvent)]
#[outbox(
    event_type = "fault.unrouted",
    aggregate_type = "account",
    topic = "nowhere"
)]
pub struct UnroutedProbe {
    #[outbox(aggregate_id)]
    pub account: String,
}

/// `Probe::n` values that make the typed handler misbehave (the poison cell).
pub const PANICS: i64 = -1;
pub const ALWAYS_FAILS: i64 = -2;
pub const NUL_REASON: i64 = -3;

/// The typed `Probe` handler of the `handler` destination: records each call in `effects`
/// (`id, account, n`, in arrival order).
pub fn probe_dispatcher(pool: PgPool, effects: &str) -> outbox::Result<Dispatcher> {
    let table = TableName::new(effects)?;
    let insert: Arc<str> =
        format!(r#"INSERT INTO "{table}" (id, account, n) VALUES ($1, $2, $3)"#).into();
    let registry = Registry::builder()
        .handler::<Probe, _, _>("record probe", move |ev: Probe, ctx: HandlerContext| {
            let insert = insert.clone();
            async move {
                match ev.n {
                    PANICS => panic!("the probe handler panics on purpose"),
                    ALWAYS_FAILS => return Err(HandlerError::retry("this handler always fails")),
                    NUL_REASON => return Err(HandlerError::fatal("a reason with a NUL \0 byte")),
                    _ => {}
                }
                let pool = ctx.state::<PgPool>()?;
                sqlx::query(&insert)
                    .bind(ctx.event_id())
                    .bind(&ev.account)
                    .bind(ev.n)
                    .execute(pool)
                    .await
                    .map_err(HandlerError::retry)?;
                Ok(())
            }
        })?
        .build();
    Ok(Dispatcher::new(registry).state(pool))
}

/// Creates the effects table a `Probe` handler writes to.
pub async fn create_effects(pool: &PgPool, effects: &str) {
    sqlx::query(&format!(
        r#"CREATE TABLE IF NOT EXISTS "{effects}" (arrival bigserial PRIMARY KEY, id uuid NOT NULL,
           account text NOT NULL, n bigint NOT NULL)"#
    ))
    .execute(pool)
    .await
    .unwrap();
}

/// Where the relays deliver.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Dest {
    Nats,
    Amqp,
    Kafka,
    /// The typed `Probe` handler, run by the relay itself.
    Handler,
}

impl Dest {
    pub const ALL: [Dest; 4] = [Dest::Nats, Dest::Amqp, Dest::Kafka, Dest::Handler];

    pub fn name(self) -> &'static str {
        match self {
            Dest::Nats => "nats",
            Dest::Amqp => "amqp",
            Dest::Kafka => "kafka",
            Dest::Handler => "handler",
        }
    }
}

/// One fault of the matrix (numbered as in issue 12).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Fault {
    /// 1. SIGKILL mid-run, and aborts right after the broker confirmed / right before publishing.
    Kill,
    /// 2. SIGTERM while draining.
    Term,
    /// 3. SIGSTOP past the lease, then SIGCONT.
    Stall,
    /// 4. The broker stopped for 10 s and started again.
    BrokerBounce,
    /// 5. `pg_ctl restart -m fast`.
    PgRestart,
    /// 6. Poison and bad input.
    Poison,
    /// 7. A long application transaction holding locks and vacuum back.
    LongTransaction,
    /// 8. Rollbacks under load, 8 writers committing out of id order.
    Rollbacks,
    /// 9. The consumer killed between its effect and its acknowledgement, with the inbox.
    ConsumerKill,
    /// The soak: 4 relays, one killed every few seconds, the broker bounced twice.
    Soak,
}

impl Fault {
    pub const MATRIX: [Fault; 9] = [
        Fault::Kill,
        Fault::Term,
        Fault::Stall,
        Fault::BrokerBounce,
        Fault::PgRestart,
        Fault::Poison,
        Fault::LongTransaction,
        Fault::Rollbacks,
        Fault::ConsumerKill,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Fault::Kill => "1 relay SIGKILL / abort",
            Fault::Term => "2 relay SIGTERM",
            Fault::Stall => "3 relay SIGSTOP past lease",
            Fault::BrokerBounce => "4 broker down 10 s",
            Fault::PgRestart => "5 PostgreSQL restart",
            Fault::Poison => "6 poison and bad input",
            Fault::LongTransaction => "7 long transaction",
            Fault::Rollbacks => "8 rollbacks, 8 writers",
            Fault::ConsumerKill => "9 consumer SIGKILL, inbox",
            Fault::Soak => "soak",
        }
    }

    /// The number of the fault in issue 12 (`soak` for the soak).
    pub fn key(self) -> String {
        match Fault::MATRIX.iter().position(|f| *f == self) {
            Some(i) => (i + 1).to_string(),
            None => "soak".to_owned(),
        }
    }

    /// Whether the cell means something for `dest` (no broker to bounce behind the handler;
    /// the consumer cell needs a broker between relay and consumer).
    pub fn applies_to(self, dest: Dest) -> bool {
        !matches!(
            (self, dest),
            (Fault::BrokerBounce | Fault::ConsumerKill, Dest::Handler)
        )
    }
}

/// What one cell measured.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Figures {
    pub dest: String,
    pub fault: String,
    pub committed: u64,
    pub delivered: u64,
    /// Committed, not poison, never delivered.
    pub lost: u64,
    /// Delivered but never committed (a rolled-back event).
    pub phantoms: u64,
    /// Arrivals beyond the first of an event.
    pub duplicates: u64,
    /// First arrivals of an account's event after a later event of that account.
    pub order_violations: u64,
    /// Events that are not poison but went dead.
    pub dead: u64,
    /// Poison events, and how many of them ended dead with a reason.
    pub poison: u64,
    pub poison_dead_with_reason: u64,
    /// Bad input that enqueue refused with a clear error.
    pub refused_at_enqueue: u64,
    /// Effects applied twice (the consumer cell, with the inbox).
    pub duplicate_effects: u64,
    /// Relay or consumer deaths the cell caused.
    pub deaths: u64,
    /// Writer transactions that failed (a database restart) and were not retried as such.
    pub writer_errors: u64,
    /// From the end of the last fault until everything committed before it was settled.
    pub recovery_ms: Option<u64>,
    /// Whole cell, from the first write to the last settled event.
    pub seconds: f64,
    /// Peak resident set of any relay process (VmHWM), in MiB.
    pub peak_rss_mib: Option<f64>,
    /// Free-form figures: leases left, dead tuples, table sizes.
    pub notes: Vec<String>,
    /// Guarantees of the cell's own that did not hold.
    pub failures: Vec<String>,
    /// A documented limitation of this cell ([`known_limitation`]).
    pub known: Option<String>,
}

/// Cells where a guarantee is known not to hold, and why (RELIABILITY.md): they are run and
/// reported, with the figure, but not counted as violations.
pub fn known_limitation(dest: Dest, fault: Fault) -> Option<&'static str> {
    match (dest, fault) {
        (Dest::Kafka, Fault::ConsumerKill) => Some(
            "known limitation of tansu 0.6, not handled in time: after SIGKILLs of members, \
             the lone consumer is elected leader, its range assignor gives itself all 4 \
             partitions, and tansu's SyncGroup answer hands it back only 2 (the dead member's \
             old share is never handed out again; librdkafka's `debug=cgrp` log shows both, \
             see RELIABILITY.md); in 3 of 4 runs, 5,145 of 10,003 applied then nothing in \
             300 s; not compared with Apache Kafka, which this machine does not have",
        ),
        _ => None,
    }
}

impl Figures {
    /// The guarantees: nothing lost, invented or reordered; poison dead with a reason; no
    /// duplicate effect with the inbox.
    pub fn violations(&self) -> Vec<String> {
        if self.known.is_some() {
            return Vec::new();
        }
        let mut out = Vec::new();
        let mut check = |ok: bool, what: String| {
            if !ok {
                out.push(format!("{} / {}: {what}", self.dest, self.fault));
            }
        };
        check(self.lost == 0, format!("{} events lost", self.lost));
        check(
            self.phantoms == 0,
            format!("{} phantom events", self.phantoms),
        );
        check(
            self.order_violations == 0,
            format!("{} order violations", self.order_violations),
        );
        check(self.dead == 0, format!("{} good events dead", self.dead));
        check(
            self.poison == self.poison_dead_with_reason,
            format!(
                "{} of {} poison events dead with a reason",
                self.poison_dead_with_reason, self.poison
            ),
        );
        check(
            self.duplicate_effects == 0,
            format!("{} duplicate effects", self.duplicate_effects),
        );
        check(self.committed > 0, "nothing was committed".into());
        for failure in &self.failures {
            check(false, failure.clone());
        }
        out
    }
}

/// Events per business transaction in the soak.
const SOAK_EVENTS_PER_TX: usize = 10;

/// How big the cells are.
#[derive(Debug, Clone)]
pub struct Size {
    /// Events committed per cell.
    pub events: u64,
    /// Events of the soak.
    pub soak_events: u64,
    pub accounts: usize,
    /// The relay processes' lease.
    pub lease: Duration,
    /// Events committed per second in a cell (the soak writes as fast as it can), so that the
    /// writers keep committing while the faults happen.
    pub rate: u32,
}

impl Size {
    /// The form `.ci/run` runs.
    pub fn short() -> Self {
        Self {
            events: 3_000,
            soak_events: 20_000,
            accounts: 50,
            lease: Duration::from_millis(3000),
            rate: 300,
        }
    }

    /// The form RELIABILITY.md reports.
    pub fn full() -> Self {
        Self {
            events: 10_000,
            soak_events: 1_000_000,
            accounts: 1_000,
            lease: Duration::from_millis(3000),
            rate: 1_000,
        }
    }
}

/// The private servers of one run, started on first use.
#[derive(Debug)]
pub struct Servers {
    pub pg: PrivatePostgres,
    pub pool: PgPool,
    nats: Option<PrivateServer>,
    rabbit: Option<PrivateRabbit>,
    kafka: Option<PrivateServer>,
}

impl Servers {
    pub async fn start() -> Self {
        let pg = tokio::task::spawn_blocking(PrivatePostgres::start)
            .await
            .unwrap();
        let pool = pool(&pg.url(), 32).await;
        Self {
            pg,
            pool,
            nats: None,
            rabbit: None,
            kafka: None,
        }
    }

    async fn broker(&mut self, dest: Dest) -> String {
        match dest {
            Dest::Nats => {
                if self.nats.is_none() {
                    self.nats = Some(servers::private_nats().await);
                }
                self.nats.as_ref().unwrap().address()
            }
            Dest::Amqp => {
                if self.rabbit.is_none() {
                    self.rabbit = Some(
                        tokio::task::spawn_blocking(PrivateRabbit::start)
                            .await
                            .unwrap(),
                    );
                }
                self.rabbit.as_ref().unwrap().url()
            }
            Dest::Kafka => {
                if self.kafka.is_none() {
                    self.kafka = Some(servers::private_kafka().await);
                }
                self.kafka.as_ref().unwrap().address()
            }
            Dest::Handler => "-".to_owned(),
        }
    }

    fn stop_broker(&mut self, dest: Dest) {
        match dest {
            Dest::Nats => self.nats.as_mut().unwrap().stop(),
            Dest::Amqp => self.rabbit.as_mut().unwrap().stop(),
            Dest::Kafka => self.kafka.as_mut().unwrap().stop(),
            Dest::Handler => {}
        }
    }

    async fn start_broker(&mut self, dest: Dest) {
        match dest {
            Dest::Nats => self.nats.as_mut().unwrap().restart().await,
            Dest::Amqp => {
                let mut rabbit = self.rabbit.take().unwrap();
                let rabbit = tokio::task::spawn_blocking(move || {
                    rabbit.restart();
                    rabbit
                })
                .await
                .unwrap();
                self.rabbit = Some(rabbit);
            }
            Dest::Kafka => self.kafka.as_mut().unwrap().restart().await,
            Dest::Handler => {}
        }
    }
}

async fn pool(url: &str, connections: u32) -> PgPool {
    sqlx::postgres::PgPoolOptions::new()
        .max_connections(connections)
        .acquire_timeout(Duration::from_secs(10))
        .connect(url)
        .await
        .unwrap_or_else(|e| panic!("cannot reach the private PostgreSQL: {e}"))
}

/// The programs the runner starts.
#[derive(Debug, Clone)]
pub struct Programs {
    pub relay: PathBuf,
    pub consumer: PathBuf,
}

/// Events arriving at the destination, in arrival order.
#[derive(Debug, Clone)]
pub struct Arrival {
    pub id: Uuid,
    pub account: Option<String>,
    pub n: Option<i64>,
}

fn arrival(id: Option<&str>, payload: &[u8]) -> Option<Arrival> {
    let id = Uuid::parse_str(id?).ok()?;
    let v: serde_json::Value = serde_json::from_slice(payload).unwrap_or_default();
    Some(Arrival {
        id,
        account: v["account"].as_str().map(str::to_owned),
        n: v["n"].as_i64(),
    })
}

/// A cell's route on its destination: a stream, an exchange and queue, a topic, or an effects
/// table; named after the cell's outbox table.
#[derive(Debug, Clone)]
struct Route {
    dest: Dest,
    address: String,
    name: String,
    /// The cell's outbox table.
    table: String,
}

const KAFKA_PARTITIONS: i32 = 4;

impl Route {
    async fn create(dest: Dest, address: String, name: String, table: &str, pool: &PgPool) -> Self {
        let route = Self {
            dest,
            address,
            name,
            table: table.to_owned(),
        };
        route.declare(pool).await;
        route
    }

    async fn declare(&self, pool: &PgPool) {
        match self.dest {
            Dest::Nats => {
                let js = crate::nats::jetstream(&self.address).await;
                ensure_stream(&js, &self.stream(), vec![format!("{}.probe.>", self.name)])
                    .await
                    .unwrap();
            }
            Dest::Amqp => {
                let connection = lapin::Connection::connect(&self.address, Default::default())
                    .await
                    .unwrap();
                let channel = connection.create_channel().await.unwrap();
                // A classic durable queue: a single-node quorum queue killed with SIGKILL
                // stayed without a leader after the restart (RabbitMQ 3.10).
                Topology::new(&self.name)
                    .queue(&self.name, ["probe.#"])
                    .declare(&channel)
                    .await
                    .unwrap();
                connection.close(0, "declared".into()).await.ok();
            }
            Dest::Kafka => ensure_topic(&self.address, &self.topic(), KAFKA_PARTITIONS)
                .await
                .unwrap(),
            Dest::Handler => create_effects(pool, &self.name).await,
        }
    }

    fn stream(&self) -> String {
        self.name.to_uppercase()
    }

    fn topic(&self) -> String {
        format!("{}.probe", self.name)
    }

    /// The relay's destination arguments: broker, address, prefix / exchange / effects table.
    fn relay_args(&self) -> [String; 3] {
        [
            self.dest.name().to_owned(),
            self.address.clone(),
            self.name.clone(),
        ]
    }

    /// Everything the destination holds, in arrival order (per partition on Kafka, which
    /// orders only within a partition; an account stays on its partition).
    async fn read(&self, pool: &PgPool) -> Vec<Arrival> {
        match self.dest {
            Dest::Nats => {
                let js = crate::nats::jetstream(&self.address).await;
                let stream = js.get_stream(self.stream()).await.unwrap();
                read_stored(&stream)
                    .await
                    .iter()
                    .filter_map(|m| {
                        let id = m.headers.as_ref()?.get(outbox::wire::ID)?.as_str();
                        arrival(Some(id), &m.payload)
                    })
                    .collect()
            }
            Dest::Amqp => {
                let connection = lapin::Connection::connect(&self.address, Default::default())
                    .await
                    .unwrap();
                let channel = connection.create_channel().await.unwrap();
                let mut out = Vec::new();
                while let Some(m) = channel
                    .basic_get(
                        self.name.as_str().into(),
                        lapin::options::BasicGetOptions { no_ack: true },
                    )
                    .await
                    .unwrap()
                {
                    let id = m.properties.message_id().as_ref().map(|s| s.to_string());
                    out.extend(arrival(id.as_deref(), &m.data));
                }
                connection.close(0, "read".into()).await.ok();
                out
            }
            Dest::Kafka => {
                // Read until two reads agree: a read that ends early (tansu 0.6 can report a
                // stale high watermark) must not pass for a lost event. What a later read adds
                // is said; an event no read finds stays lost, and the relays' confirmations
                // of it are reported (`explain_kafka_losses`).
                let mut read = read_kafka(&self.address, &self.topic()).await;
                for _ in 0..3 {
                    tokio::time::sleep(Duration::from_secs(3)).await;
                    let again = read_kafka(&self.address, &self.topic()).await;
                    if again.len() <= read.len() {
                        break;
                    }
                    eprintln!(
                        "kafka: a second read of {} found {} records, the first {}",
                        self.topic(),
                        again.len(),
                        read.len()
                    );
                    read = again;
                }
                read
            }
            Dest::Handler => {
                let rows: Vec<(Uuid, String, i64)> = sqlx::query_as(&format!(
                    r#"SELECT id, account, n FROM "{}" ORDER BY arrival"#,
                    self.name
                ))
                .fetch_all(pool)
                .await
                .unwrap();
                rows.into_iter()
                    .map(|(id, account, n)| Arrival {
                        id,
                        account: Some(account),
                        n: Some(n),
                    })
                    .collect()
            }
        }
    }
}

/// Every record of `topic`, partition after partition, from the start.
async fn read_kafka(brokers: &str, topic: &str) -> Vec<Arrival> {
    read_kafka_records(brokers, topic)
        .await
        .into_iter()
        .map(|(_, _, arrival)| arrival)
        .collect()
}

/// Every record of `topic` with its partition and offset, partition after partition.
async fn read_kafka_records(brokers: &str, topic: &str) -> Vec<(i32, i64, Arrival)> {
    use rdkafka::config::ClientConfig;
    use rdkafka::consumer::StreamConsumer;
    use rdkafka::message::Headers as _;
    let mut out = Vec::new();
    let meta: rdkafka::consumer::BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .create()
        .unwrap();
    let metadata = meta
        .fetch_metadata(Some(topic), Duration::from_secs(10))
        .unwrap();
    let partitions = metadata.topics()[0].partitions().len() as i32;
    assert_eq!(partitions, KAFKA_PARTITIONS, "partitions of {topic}");
    for partition in 0..partitions {
        // Fetches large enough for whole record batches: tansu 0.6 answers a fetch from the
        // middle of a batch with the next batch, skipping the rest of the first.
        let consumer: StreamConsumer = ClientConfig::new()
            .set("bootstrap.servers", brokers)
            .set("group.id", format!("reader-{}", Uuid::new_v4().simple()))
            .set("enable.auto.commit", "false")
            .set("fetch.max.bytes", "104857600")
            .set("max.partition.fetch.bytes", "104857600")
            .create()
            .unwrap();
        let (low, _) = consumer
            .fetch_watermarks(topic, partition, Duration::from_secs(10))
            .unwrap();
        let mut assignment = rdkafka::TopicPartitionList::new();
        assignment
            .add_partition_offset(topic, partition, rdkafka::Offset::Offset(low))
            .unwrap();
        consumer.assign(&assignment).unwrap();
        let mut next = low;
        // Tansu 0.6 can answer a watermark query with a stale high watermark (seen: the last
        // two records of a partition missing from it): read on until the partition stays quiet
        // and the watermark is behind what was read.
        loop {
            let m = match tokio::time::timeout(Duration::from_secs(2), consumer.recv()).await {
                Ok(m) => m.unwrap(),
                Err(_) => {
                    let (_, high) = consumer
                        .fetch_watermarks(topic, partition, Duration::from_secs(10))
                        .unwrap();
                    if next >= high {
                        break;
                    }
                    continue;
                }
            };
            assert_eq!(
                m.offset(),
                next,
                "partition {partition} of {topic}: offset {} after {}",
                m.offset(),
                next - 1
            );
            next = m.offset() + 1;
            let id = m.headers().and_then(|h| {
                h.iter()
                    .find(|h| h.key == outbox::wire::ID)
                    .and_then(|h| std::str::from_utf8(h.value?).ok().map(str::to_owned))
            });
            match arrival(id.as_deref(), m.payload().unwrap_or_default()) {
                Some(a) => out.push((partition, m.offset(), a)),
                None => panic!(
                    "record {partition}@{} of {topic} has no readable outbox-id header",
                    m.offset()
                ),
            }
        }
    }
    out
}

/// A relay or consumer in a process of its own.
#[derive(Debug)]
struct Proc {
    program: PathBuf,
    args: Vec<String>,
    env: Vec<(String, String)>,
    child: Child,
    started: Instant,
    peak_rss_kib: u64,
    /// Where its stderr goes (appended, shared by the processes of a cell); inherited if none.
    log: Option<PathBuf>,
}

impl Proc {
    fn spawn(program: &PathBuf, args: &[String], env: &[(String, String)]) -> Self {
        Self::spawn_logged(program, args, env, None)
    }

    fn spawn_logged(
        program: &PathBuf,
        args: &[String],
        env: &[(String, String)],
        log: Option<PathBuf>,
    ) -> Self {
        let stderr = match &log {
            Some(path) => Stdio::from(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(path)
                    .unwrap_or_else(|e| panic!("cannot open {}: {e}", path.display())),
            ),
            None => Stdio::inherit(),
        };
        let child = Command::new(program)
            .args(args)
            .envs(env.iter().cloned())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", program.display()));
        Self {
            program: program.clone(),
            args: args.to_vec(),
            env: env.to_vec(),
            child,
            started: Instant::now(),
            peak_rss_kib: 0,
            log,
        }
    }

    fn signal(&self, signal: &str) {
        let _ = Command::new("kill")
            .args([format!("-{signal}"), self.child.id().to_string()])
            .status();
    }

    /// Reads the process's peak resident set so far.
    fn sample_rss(&mut self) {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id()));
        if let Some(kib) = status.ok().and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmHWM:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        }) {
            self.peak_rss_kib = self.peak_rss_kib.max(kib);
        }
    }

    /// SIGKILL, then the same program again; with `env` added for the new process.
    fn kill_and_restart(&mut self, extra_env: &[(String, String)]) {
        self.sample_rss();
        let _ = self.child.kill();
        let _ = self.child.wait();
        let mut env = self.env.clone();
        env.extend(extra_env.iter().cloned());
        let peak = self.peak_rss_kib;
        let (program, args, base_env) = (self.program.clone(), self.args.clone(), self.env.clone());
        *self = Self::spawn_logged(&program, &args, &env, self.log.clone());
        self.env = base_env;
        self.peak_rss_kib = peak;
    }

    /// Restarts it (clean environment) if it died. One that exited by itself soon after it
    /// started (a configuration error) fails the cell instead of being restarted for ever.
    fn revive(&mut self) -> bool {
        let Some(status) = self.child.try_wait().unwrap() else {
            return false;
        };
        assert!(
            status.code().is_none() || self.started.elapsed() > Duration::from_secs(5),
            "{} exited with {status} right after it started (its stderr says why)",
            self.program.display()
        );
        let peak = self.peak_rss_kib;
        *self = Self::spawn_logged(
            &self.program.clone(),
            &self.args.clone(),
            &self.env.clone(),
            self.log.clone(),
        );
        self.peak_rss_kib = peak;
        true
    }

    /// SIGTERM and wait for the exit; `None` if it did not exit in `timeout` (then SIGKILL).
    async fn terminate(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        self.sample_rss();
        self.signal("TERM");
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return Some(status);
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                let _ = self.child.wait();
                return None;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// What the writers did.
#[derive(Debug, Default)]
struct Written {
    rolled_back: HashSet<Uuid>,
    errors: u64,
}

/// How the writers behave.
#[derive(Debug, Clone)]
struct WriterPlan {
    writers: usize,
    accounts: usize,
    /// One transaction in this many rolls back after enqueueing.
    rollback_one_in: Option<u32>,
    /// Transactions hold their locks up to this long before committing, so that commits come
    /// out of id order.
    hold_max: Duration,
    /// Transactions per second, all writers together (`None`: as fast as they can).
    rate: Option<u32>,
    /// Events each transaction enqueues for its account (an order and its lines).
    events_per_tx: usize,
}

/// Commits `target` `Probe` events from `plan.writers` tasks; each transaction locks its
/// account's business row, counts `n` up and enqueues the event.
async fn write(
    outbox: Outbox<Postgres>,
    plan: WriterPlan,
    target: u64,
    committed: Arc<AtomicU64>,
) -> Written {
    let business = format!("{}_business", outbox.table());
    let upsert: Arc<str> = format!(
        r#"INSERT INTO "{business}" AS b (account, n) VALUES ($1, 1)
           ON CONFLICT (account) DO UPDATE SET n = b.n + 1 RETURNING n"#
    )
    .into();
    let mut tasks = Vec::new();
    for _ in 0..plan.writers {
        let (outbox, plan, committed, upsert) = (
            outbox.clone(),
            plan.clone(),
            committed.clone(),
            upsert.clone(),
        );
        tasks.push(tokio::spawn(async move {
            let mut written = Written::default();
            let mut pace = plan.rate.map(|rate| {
                let mut every = tokio::time::interval(Duration::from_secs_f64(
                    plan.writers as f64 / f64::from(rate.max(1)),
                ));
                every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                every
            });
            while committed.load(Ordering::SeqCst) < target {
                if let Some(pace) = pace.as_mut() {
                    pace.tick().await;
                }
                let account = format!("acct-{}", fastrand::usize(..plan.accounts));
                let rollback = plan
                    .rollback_one_in
                    .is_some_and(|one_in| fastrand::u32(..one_in) == 0);
                let hold = plan.hold_max.mul_f64(fastrand::f64());
                match write_one(
                    &outbox,
                    &upsert,
                    account,
                    plan.events_per_tx,
                    rollback,
                    hold,
                )
                .await
                {
                    Ok((ids, true)) => {
                        committed.fetch_add(ids.len() as u64, Ordering::SeqCst);
                    }
                    Ok((ids, false)) => {
                        written.rolled_back.extend(ids);
                    }
                    Err(_) => {
                        // The database went away (a restart): the outcome of a failed commit is
                        // unknown, and the ledger reads what was committed from the table.
                        written.errors += 1;
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                }
            }
            written
        }));
    }
    let mut all = Written::default();
    for task in tasks {
        let w = task.await.unwrap();
        all.rolled_back.extend(w.rolled_back);
        all.errors += w.errors;
    }
    all
}

/// One business transaction: `events` times, count the account up and enqueue the event.
async fn write_one(
    outbox: &Outbox<Postgres>,
    upsert: &str,
    account: String,
    events: usize,
    rollback: bool,
    hold: Duration,
) -> outbox::Result<(Vec<Uuid>, bool)> {
    let mut tx = outbox.pool().begin().await?;
    let mut ids = Vec::with_capacity(events);
    for _ in 0..events {
        let n: i64 = sqlx::query_scalar(upsert)
            .bind(&account)
            .fetch_one(&mut *tx)
            .await?;
        let probe = Probe {
            account: account.clone(),
            n,
        };
        ids.push(outbox.enqueue(&mut *tx, &probe).await?);
    }
    if !hold.is_zero() {
        tokio::time::sleep(hold).await;
    }
    if rollback {
        tx.rollback().await?;
        return Ok((ids, false));
    }
    tx.commit().await?;
    Ok((ids, true))
}

/// One cell of the matrix, from fresh tables to its figures.
pub async fn run_cell(
    servers: &mut Servers,
    programs: &Programs,
    size: &Size,
    dest: Dest,
    fault: Fault,
) -> Figures {
    let started = Instant::now();
    let table = format!("f_{}", &Uuid::new_v4().simple().to_string()[..10]);
    let outbox = Outbox::<Postgres>::builder(servers.pool.clone())
        .table(table.as_str())
        .build()
        .unwrap();
    outbox.migrate().await.unwrap();
    sqlx::query(&format!(
        r#"CREATE TABLE "{table}_business" (account text PRIMARY KEY, n bigint NOT NULL)"#
    ))
    .execute(&servers.pool)
    .await
    .unwrap();
    let address = servers.broker(dest).await;
    // The handler's effects go to a table of their own; brokers name the route after the cell.
    let route_name = match dest {
        Dest::Handler => format!("{table}_effects"),
        _ => table.clone(),
    };
    let route = Route::create(dest, address, route_name, &table, &servers.pool).await;
    let mut figures = Figures {
        dest: dest.name().to_owned(),
        fault: fault.name().to_owned(),
        known: known_limitation(dest, fault).map(str::to_owned),
        ..Figures::default()
    };

    let events = if fault == Fault::Soak {
        size.soak_events
    } else {
        size.events
    };
    let relay_count = match fault {
        Fault::Term | Fault::ConsumerKill => 1,
        Fault::Soak => 4,
        _ => 2,
    };
    let mut relay_log_level =
        std::env::var("OUTBOX_FAULTS_RELAY_LOG").unwrap_or_else(|_| "error".into());
    // Kafka cells keep every confirmation (partition, offset) the relays received, in a file,
    // so that an event the topic lacks can be traced to what the broker confirmed.
    let relay_log = (dest == Dest::Kafka && fault != Fault::Soak).then(|| {
        relay_log_level.push_str(",outbox_kafka=debug");
        std::env::temp_dir().join(format!("{table}-relays.log"))
    });
    let mut relay_env = vec![("RUST_LOG".to_owned(), relay_log_level)];
    if fault == Fault::Poison {
        relay_env.push(("OUTBOX_RELAY_MAX_ATTEMPTS".into(), "3".into()));
    }
    if fault == Fault::Soak {
        relay_env.push(("OUTBOX_RELAY_BATCH".into(), "100".into()));
    }
    let relay_args: Vec<String> = [
        // Named, so that cell 7 can see whether a relay statement waits on a lock.
        format!("{}?application_name={RELAY_APPLICATION}", servers.pg.url()),
        table.clone(),
        size.lease.as_millis().to_string(),
    ]
    .into_iter()
    .chain(route.relay_args())
    .collect();
    let relays = Arc::new(Mutex::new(
        (0..relay_count)
            .map(|_| {
                Proc::spawn_logged(&programs.relay, &relay_args, &relay_env, relay_log.clone())
            })
            .collect::<Vec<_>>(),
    ));

    let mut consumer = (fault == Fault::ConsumerKill).then(|| {
        let args = vec![
            servers.pg.url(),
            table.clone(),
            dest.name().to_owned(),
            route.address.clone(),
            route.name.clone(),
        ];
        Proc::spawn(
            &programs.consumer,
            &args,
            &[
                (
                    "RUST_LOG".into(),
                    std::env::var("OUTBOX_FAULTS_CONSUMER_LOG").unwrap_or_else(|_| "error".into()),
                ),
                ("OUTBOX_FAULT_ABORT_ONE_IN".into(), "200".into()),
            ],
        )
    });
    if consumer.is_some() {
        create_effects(&servers.pool, &format!("{table}_effects")).await;
    }

    let plan = WriterPlan {
        writers: if fault == Fault::Rollbacks { 8 } else { 4 },
        accounts: size.accounts,
        rollback_one_in: (fault == Fault::Rollbacks).then_some(4),
        hold_max: if fault == Fault::Rollbacks {
            Duration::from_millis(3)
        } else {
            Duration::ZERO
        },
        rate: (fault != Fault::Soak).then_some(size.rate),
        // The soak writes as fast as it can: orders of several lines, so that a million events
        // take minutes, not an hour, on two cores shared with the servers and the relays.
        events_per_tx: if fault == Fault::Soak {
            SOAK_EVENTS_PER_TX
        } else {
            1
        },
    };

    // Fault 7: an application transaction that stays open for the whole cell, holding the
    // lock of an account's business row and of its outbox aggregate, and the xmin horizon.
    let mut long_tx = None;
    if fault == Fault::LongTransaction {
        let mut tx = servers.pool.begin().await.unwrap();
        sqlx::query("SELECT txid_current()")
            .execute(&mut *tx)
            .await
            .unwrap();
        let held = write_in(&outbox, &mut tx, "held-account").await;
        long_tx = Some((tx, held, LockWaits::watch(servers.pool.clone())));
    }

    let mut poison = HashSet::new();
    if fault == Fault::Poison {
        let (ids, refused) = enqueue_poison(&outbox, dest).await;
        poison = ids;
        figures.refused_at_enqueue = refused;
        figures
            .notes
            .push(format!("bad input refused at enqueue: {refused} of 2"));
        if refused != 2 {
            figures.failures.push(format!(
                "enqueue refused {refused} of the 2 bad inputs (a header a broker cannot carry, \
                 an oversize aggregate id)"
            ));
        }
    }

    let committed = Arc::new(AtomicU64::new(0));
    let writers = tokio::spawn(write(outbox.clone(), plan, events, committed.clone()));

    // Drive the fault while the writers write.
    let mut collected = Vec::new();
    let fault_ended = drive(
        fault,
        dest,
        servers,
        &route,
        &relays,
        &mut consumer,
        &committed,
        events,
        size,
        &mut figures,
        &mut collected,
    )
    .await;
    if let (Some(ended), false) = (fault_ended, fault == Fault::ConsumerKill) {
        figures.recovery_ms = Some(recovered(&outbox, ended).await.as_millis() as u64);
    }
    let written = writers.await.unwrap();
    figures.writer_errors = written.errors;

    if let Some((tx, held, lock_waits)) = long_tx.take() {
        // Everything else drained while the transaction held its locks.
        wait_drained(&outbox, Duration::from_secs(300), &relays).await;
        let LockWaitFigures {
            samples,
            waiting,
            on_application,
            seen,
        } = lock_waits.stop().await;
        figures.notes.push(format!(
            "relay statements seen waiting on a lock in {samples} samples of pg_stat_activity: \
             {waiting}, {on_application} of them on the application"
        ));
        for (what, times) in seen {
            figures.notes.push(format!("{times} × {what}"));
        }
        if on_application > 0 || samples == 0 {
            figures.failures.push(format!(
                "{on_application} relay statements waited on a lock held by the application \
                 ({samples} samples)"
            ));
        }
        let seconds = started.elapsed().as_secs_f64();
        let (dead_tuples, cursor_dead): (i64, i64) = dead_tuples(&servers.pool, &table).await;
        figures.notes.push(format!(
            "while an application transaction stayed open: {} events settled in {seconds:.1} s \
             ({:.0} ev/s); dead tuples it kept from vacuum: outbox {dead_tuples}, cursors \
             {cursor_dead}",
            committed.load(Ordering::SeqCst),
            committed.load(Ordering::SeqCst) as f64 / seconds
        ));
        tx.commit().await.unwrap();
        poison.remove(&held);
    }

    // Everything committed reaches the destination.
    wait_drained(&outbox, Duration::from_secs(600), &relays).await;
    if let Some(consumer) = consumer.as_mut() {
        let effects = format!("{table}_effects");
        let expected = count(&servers.pool, &format!(r#"SELECT count(*) FROM "{table}""#)).await;
        let deadline = Instant::now() + Duration::from_secs(300);
        // The catch-up: one more SIGKILL, then a consumer that no longer aborts itself (each
        // restart costs NATS the ack wait and a Kafka group a rebalance, so aborts one event in
        // 200 would make the catch-up a crash loop). A death of its own still counts, and
        // recovery runs from the last one.
        consumer
            .env
            .retain(|(name, _)| name != "OUTBOX_FAULT_ABORT_ONE_IN");
        consumer.kill_and_restart(&[]);
        figures.deaths += 1;
        let mut last_death = Some(Instant::now());
        loop {
            if consumer.revive() {
                figures.deaths += 1;
                last_death = Some(Instant::now());
            }
            let distinct = count(
                &servers.pool,
                &format!(r#"SELECT count(DISTINCT id) FROM "{effects}""#),
            )
            .await;
            if distinct >= expected || Instant::now() > deadline {
                // The consumer's recovery: from its last death until it applied everything.
                figures.recovery_ms = last_death.map(|t| t.elapsed().as_millis() as u64);
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        consumer.terminate(Duration::from_secs(20)).await;
    }
    let mut peak = 0;
    for relay in relays.lock().unwrap().iter_mut() {
        relay.sample_rss();
        peak = peak.max(relay.peak_rss_kib);
    }
    figures.peak_rss_mib = Some(peak as f64 / 1024.0);
    let relays = std::mem::take(&mut *relays.lock().unwrap());
    for mut relay in relays {
        relay.terminate(Duration::from_secs(20)).await;
    }
    figures.seconds = started.elapsed().as_secs_f64();

    // Tally.
    let arrivals = if fault == Fault::ConsumerKill {
        let effects = Route {
            dest: Dest::Handler,
            address: String::new(),
            name: format!("{table}_effects"),
            table: table.clone(),
        };
        effects.read(&servers.pool).await
    } else {
        collected.extend(route.read(&servers.pool).await);
        collected
    };
    let lost = tally(
        &mut figures,
        &servers.pool,
        &table,
        &written.rolled_back,
        &poison,
        &arrivals,
    )
    .await;
    if let Some(path) = relay_log {
        let log = std::fs::read_to_string(&path).unwrap_or_default();
        let _ = std::fs::remove_file(&path);
        // The relays' own warnings and errors still reach the test's output.
        for line in log.lines().map(strip_ansi) {
            if !line.contains("DEBUG") {
                eprintln!("relay: {line}");
            }
        }
        if !lost.is_empty() {
            explain_kafka_losses(&mut figures, &route, &lost, &log).await;
        }
    }
    if fault == Fault::ConsumerKill {
        figures.duplicate_effects = figures.duplicates;
    }
    if fault == Fault::Soak {
        let before = table_bytes(&servers.pool, &table).await;
        outbox
            .purge(&Retention::delete_after(Duration::ZERO).batch_size(10_000))
            .await
            .unwrap();
        sqlx::query(&format!(r#"VACUUM "{table}""#))
            .execute(&servers.pool)
            .await
            .unwrap();
        let after = table_bytes(&servers.pool, &table).await;
        figures.notes.push(format!(
            "outbox table {:.1} MiB before retention, {:.1} MiB after delete + VACUUM",
            before as f64 / 1048576.0,
            after as f64 / 1048576.0
        ));
    }
    drop_cell(&servers.pool, &table).await;
    figures
}

async fn write_in(
    outbox: &Outbox<Postgres>,
    tx: &mut sqlx::Transaction<'static, Postgres>,
    account: &str,
) -> Uuid {
    let business = format!("{}_business", outbox.table());
    let n: i64 = sqlx::query_scalar(&format!(
        r#"INSERT INTO "{business}" AS b (account, n) VALUES ($1, 1)
           ON CONFLICT (account) DO UPDATE SET n = b.n + 1 RETURNING n"#
    ))
    .bind(account)
    .fetch_one(&mut **tx)
    .await
    .unwrap();
    outbox
        .enqueue(
            &mut **tx,
            &Probe {
                account: account.to_owned(),
                n,
            },
        )
        .await
        .unwrap()
}

/// Enqueues the poison of fault 6 on accounts of their own; returns their ids and how many
/// bad inputs enqueue refused.
async fn enqueue_poison(outbox: &Outbox<Postgres>, dest: Dest) -> (HashSet<Uuid>, u64) {
    let mut ids = HashSet::new();
    let mut tx = outbox.pool().begin().await.unwrap();
    let account = |k: &str| format!("poison-{k}");
    let mut add = |id: Uuid| {
        ids.insert(id);
    };
    match dest {
        Dest::Handler => {
            for (k, n) in [
                ("panics", PANICS),
                ("always-fails", ALWAYS_FAILS),
                ("nul", NUL_REASON),
            ] {
                let probe = Probe {
                    account: account(k),
                    n,
                };
                add(outbox.enqueue(&mut *tx, &probe).await.unwrap());
            }
            let malformed = MalformedProbe {
                account: account("undecodable"),
                n: "not a number".into(),
            };
            add(outbox.enqueue(&mut *tx, &malformed).await.unwrap());
            let unknown = UnknownProbe {
                account: account("unknown-type"),
            };
            add(outbox.enqueue(&mut *tx, &unknown).await.unwrap());
        }
        Dest::Nats | Dest::Amqp | Dest::Kafka => {
            let huge = HugeProbe {
                account: account("oversize"),
                blob: "x".repeat(2 << 20),
            };
            add(outbox.enqueue(&mut *tx, &huge).await.unwrap());
            if dest != Dest::Kafka {
                // Kafka creates topics on first use; NATS and RabbitMQ refuse the route.
                let unrouted = UnroutedProbe {
                    account: account("unrouted"),
                };
                add(outbox.enqueue(&mut *tx, &unrouted).await.unwrap());
            }
        }
    }
    tx.commit().await.unwrap();
    // A header no broker can carry, and an oversize aggregate id: refused at enqueue, before
    // the business transaction commits, with nothing written.
    let mut refused = 0;
    let mut tx = outbox.pool().begin().await.unwrap();
    let bad_header = EnqueueOptions::new().header("tenant", "a\r\nInjected: yes");
    let probe = Probe {
        account: account("header"),
        n: 1,
    };
    if let Err(outbox::Error::InvalidField { .. }) =
        outbox.enqueue_with(&mut *tx, &probe, bad_header).await
    {
        refused += 1;
    }
    let long_id = Probe {
        account: "a".repeat(100_000),
        n: 1,
    };
    if let Err(outbox::Error::InvalidField { .. }) = outbox.enqueue(&mut *tx, &long_id).await {
        refused += 1;
    }
    tx.rollback().await.unwrap();
    (ids, refused)
}

/// Drives `fault` until the writers are done; returns when the last fault ended (for the
/// recovery time), if it has an end.
#[allow(clippy::too_many_arguments)]
async fn drive(
    fault: Fault,
    dest: Dest,
    servers: &mut Servers,
    route: &Route,
    relays: &Arc<Mutex<Vec<Proc>>>,
    consumer: &mut Option<Proc>,
    committed: &AtomicU64,
    target: u64,
    size: &Size,
    figures: &mut Figures,
    collected: &mut Vec<Arrival>,
) -> Option<Instant> {
    let progress = || committed.load(Ordering::SeqCst) as f64 / target as f64;
    let until = |fraction: f64| async move {
        while progress() < fraction {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    let pause = |ms: u64| tokio::time::sleep(Duration::from_millis(ms));
    match fault {
        Fault::Kill => {
            // SIGKILL at random moments, and aborts at the two precise windows: right after
            // the broker confirmed a batch (before the outcome is written) and right before a
            // batch is published.
            let mut round = 0;
            let mut ended = None;
            while progress() < 0.9 {
                pause(300 + fastrand::u64(..700)).await;
                let mode = round % 3;
                round += 1;
                figures.deaths += 1;
                let mut relays = relays.lock().unwrap();
                match mode {
                    0 => relays[0].kill_and_restart(&[]),
                    1 => relays[0].kill_and_restart(&[(
                        "OUTBOX_FAULT".into(),
                        format!("abort-after-publish:{}", 1 + fastrand::u64(..20)),
                    )]),
                    _ => relays[0].kill_and_restart(&[(
                        "OUTBOX_FAULT".into(),
                        format!("abort-before-publish:{}", 1 + fastrand::u64(..20)),
                    )]),
                }
                ended = Some(Instant::now());
            }
            // Whatever aborted by itself is started again, clean.
            until(1.0).await;
            for relay in relays.lock().unwrap().iter_mut() {
                relay.revive();
            }
            ended
        }
        Fault::Term => {
            until(0.4).await;
            let mut relay = relays.lock().unwrap().remove(0);
            let status = relay.terminate(Duration::from_secs(30)).await;
            let left = leases_left(&servers.pool, &route.table).await;
            figures.notes.push(format!(
                "SIGTERM while draining: exited {} ; leases left behind: {} (longest {} ms, \
                 lease {} ms)",
                match status {
                    Some(s) if s.success() => "cleanly".to_owned(),
                    Some(s) => format!("with {s}"),
                    None => "not within 30 s".to_owned(),
                },
                left.0,
                left.1,
                size.lease.as_millis()
            ));
            // A graceful stop gives every lease back: none may be left to expire.
            if !status.is_some_and(|s| s.success()) || left.0 > 0 {
                figures
                    .failures
                    .push("the graceful stop failed or left leases behind".into());
            }
            let restarted = Proc::spawn(&relay.program, &relay.args, &relay.env);
            relays.lock().unwrap().push(restarted);
            Some(Instant::now())
        }
        Fault::Stall => {
            let mut ended = None;
            for fraction in [0.2, 0.45, 0.7] {
                until(fraction).await;
                relays.lock().unwrap()[0].signal("STOP");
                tokio::time::sleep(size.lease * 2).await;
                relays.lock().unwrap()[0].signal("CONT");
                ended = Some(Instant::now());
            }
            ended
        }
        Fault::BrokerBounce => {
            until(0.3).await;
            bounce(
                dest,
                servers,
                route,
                relays,
                collected,
                Duration::from_secs(10),
            )
            .await;
            Some(Instant::now())
        }
        Fault::PgRestart => {
            let mut ended = None;
            for fraction in [0.25, 0.6] {
                until(fraction).await;
                let started = Instant::now();
                let pg = &servers.pg;
                tokio::task::block_in_place(|| pg.restart_fast());
                figures.notes.push(format!(
                    "pg_ctl restart -m fast took {} ms",
                    started.elapsed().as_millis()
                ));
                ended = Some(Instant::now());
            }
            ended
        }
        Fault::ConsumerKill => {
            let consumer = consumer.as_mut().unwrap();
            let effects = format!(r#"SELECT count(*) FROM "{}_effects""#, route.table);
            let mut ended = None;
            while progress() < 1.0 {
                // Each kill lands while the consumer is applying effects: once it has applied
                // some since its start (a restarting NATS consumer first waits out the ack
                // wait), a little later.
                let before = count(&servers.pool, &effects).await;
                let deadline = Instant::now() + Duration::from_secs(30);
                while count(&servers.pool, &effects).await <= before
                    && Instant::now() < deadline
                    && progress() < 1.0
                {
                    pause(20).await;
                }
                pause(100 + fastrand::u64(..600)).await;
                consumer.kill_and_restart(&[]);
                figures.deaths += 1;
                ended = Some(Instant::now());
            }
            ended
        }
        Fault::Soak => {
            let mut ended = None;
            let mut bounced = 0;
            while progress() < 1.0 {
                pause(2000 + fastrand::u64(..2000)).await;
                {
                    let mut relays = relays.lock().unwrap();
                    let victim = fastrand::usize(..relays.len());
                    for relay in relays.iter_mut() {
                        relay.sample_rss();
                    }
                    relays[victim].kill_and_restart(&[]);
                }
                figures.deaths += 1;
                if dest != Dest::Handler && bounced < 2 && progress() > [0.3, 0.6][bounced] {
                    bounce(
                        dest,
                        servers,
                        route,
                        relays,
                        collected,
                        Duration::from_secs(10),
                    )
                    .await;
                    bounced += 1;
                }
                ended = Some(Instant::now());
            }
            ended
        }
        Fault::Poison | Fault::LongTransaction | Fault::Rollbacks => None,
    }
}

/// Stops the cell's broker for `down` and starts it again. Tansu keeps its records in memory:
/// everything it holds is read first, with the relays paused so that nothing lands in between.
async fn bounce(
    dest: Dest,
    servers: &mut Servers,
    route: &Route,
    relays: &Arc<Mutex<Vec<Proc>>>,
    collected: &mut Vec<Arrival>,
    down: Duration,
) {
    if dest == Dest::Kafka {
        for relay in relays.lock().unwrap().iter() {
            relay.signal("STOP");
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
        collected.extend(read_kafka(&route.address, &route.topic()).await);
    }
    servers.stop_broker(dest);
    if dest == Dest::Kafka {
        for relay in relays.lock().unwrap().iter() {
            relay.signal("CONT");
        }
    }
    tokio::time::sleep(down).await;
    servers.start_broker(dest).await;
    if dest == Dest::Kafka {
        route.declare(&servers.pool).await;
    }
}

/// How long after `ended` (the end of the last fault) every event committed before it was
/// settled, while the writers go on writing.
async fn recovered(outbox: &Outbox<Postgres>, ended: Instant) -> Duration {
    let deadline = Instant::now() + Duration::from_secs(600);
    let pending = format!(
        r#"SELECT count(*) FROM "{}" WHERE status = 'pending'
           AND created_at <= clock_timestamp() - $1 * interval '1 millisecond'"#,
        outbox.table()
    );
    loop {
        // `created_at` is the writing transaction's start: anything begun before the fault
        // ended counts.
        let since = ended.elapsed().as_millis() as f64;
        if let Ok(0) = sqlx::query_scalar::<_, i64>(&pending)
            .bind(since)
            .fetch_one(outbox.pool())
            .await
        {
            return ended.elapsed();
        }
        assert!(Instant::now() < deadline, "no recovery within 600 s");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Waits until nothing is pending in the outbox; relays that died are started again.
async fn wait_drained(
    outbox: &Outbox<Postgres>,
    timeout: Duration,
    relays: &Arc<Mutex<Vec<Proc>>>,
) {
    let deadline = Instant::now() + timeout;
    let pending = format!(
        r#"SELECT count(*) FROM "{}" WHERE status = 'pending'"#,
        outbox.table()
    );
    loop {
        for relay in relays.lock().unwrap().iter_mut() {
            relay.revive();
        }
        match sqlx::query_scalar::<_, i64>(&pending)
            .fetch_one(outbox.pool())
            .await
        {
            Ok(0) => return,
            Ok(left) => assert!(
                Instant::now() < deadline,
                "{left} events still pending after {timeout:?}"
            ),
            Err(_) => {}
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn count(pool: &PgPool, sql: &str) -> i64 {
    sqlx::query_scalar(sql).fetch_one(pool).await.unwrap()
}

/// The `application_name` of the relay processes' connections.
const RELAY_APPLICATION: &str = "outbox-relay";

/// Samples `pg_stat_activity` every 20 ms for relay connections waiting on a lock, with what
/// they run and who blocks them.
struct LockWaits {
    stop: Arc<std::sync::atomic::AtomicBool>,
    task: tokio::task::JoinHandle<LockWaitFigures>,
}

#[derive(Debug, Default)]
struct LockWaitFigures {
    samples: u64,
    /// Relay connections seen waiting, all samples together.
    waiting: u64,
    /// Of those, waiting on a connection that is not a relay's (the application's).
    on_application: u64,
    /// How often each (lock, relay statement, blocking statement) was seen.
    seen: std::collections::BTreeMap<String, u64>,
}

impl LockWaits {
    fn watch(pool: PgPool) -> Self {
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let task = tokio::spawn({
            let stop = stop.clone();
            async move {
                let mut figures = LockWaitFigures::default();
                while !stop.load(Ordering::SeqCst) {
                    let waits: Vec<(String, String, String, bool)> = sqlx::query_as(
                        "SELECT coalesce(a.wait_event, ''), \
                                regexp_replace(left(a.query, 90), '\\s+', ' ', 'g'), \
                                coalesce(b.who, ''), coalesce(b.application, false) \
                         FROM pg_stat_activity a \
                         LEFT JOIN LATERAL ( \
                             SELECT string_agg(CASE WHEN x.application_name = $1 THEN 'relay' \
                                                    ELSE 'application' END \
                                 || ': ' || regexp_replace(left(x.query, 90), '\\s+', ' ', 'g'), \
                                 ' | ') AS who, \
                                 bool_or(x.application_name IS DISTINCT FROM $1) AS application \
                             FROM pg_stat_activity x \
                             WHERE x.pid = ANY (pg_blocking_pids(a.pid))) b ON true \
                         WHERE a.application_name = $1 AND a.wait_event_type = 'Lock'",
                    )
                    .bind(RELAY_APPLICATION)
                    .fetch_all(&pool)
                    .await
                    .unwrap();
                    figures.samples += 1;
                    figures.waiting += waits.len() as u64;
                    for (lock, query, blocker, application) in waits {
                        figures.on_application += u64::from(application);
                        *figures
                            .seen
                            .entry(format!("{lock} lock: `{query}` behind `{blocker}`"))
                            .or_default() += 1;
                    }
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                figures
            }
        });
        Self { stop, task }
    }

    async fn stop(self) -> LockWaitFigures {
        self.stop.store(true, Ordering::SeqCst);
        self.task.await.unwrap()
    }
}

/// Cursors still leased (by a relay that is gone): how many, and the longest time left.
async fn leases_left(pool: &PgPool, table: &str) -> (i64, i64) {
    sqlx::query_as(&format!(
        r#"SELECT count(*), coalesce(max(extract(epoch FROM due_at - now()) * 1000), 0)::bigint
           FROM "{table}_cursors" WHERE leased_by IS NOT NULL AND due_at > now()"#
    ))
    .fetch_one(pool)
    .await
    .unwrap()
}

async fn dead_tuples(pool: &PgPool, table: &str) -> (i64, i64) {
    let _ = sqlx::query("SELECT pg_stat_force_next_flush()")
        .execute(pool)
        .await;
    tokio::time::sleep(Duration::from_millis(700)).await;
    let read = |name: String| async move {
        sqlx::query_scalar::<_, i64>(
            "SELECT coalesce(n_dead_tup, 0) FROM pg_stat_user_tables WHERE relname = $1",
        )
        .bind(name)
        .fetch_optional(pool)
        .await
        .unwrap()
        .unwrap_or(0)
    };
    (
        read(table.to_owned()).await,
        read(format!("{table}_cursors")).await,
    )
}

async fn table_bytes(pool: &PgPool, table: &str) -> i64 {
    sqlx::query_scalar("SELECT pg_total_relation_size($1::regclass)")
        .bind(format!(r#""{table}""#))
        .fetch_one(pool)
        .await
        .unwrap()
}

/// What the broker confirmed of events the topic lacks, and whether a second read finds them:
/// a loss in the broker, in the relay or in the reading.
async fn explain_kafka_losses(figures: &mut Figures, route: &Route, lost: &[Uuid], log: &str) {
    tokio::time::sleep(Duration::from_secs(5)).await;
    let again = read_kafka_records(&route.address, &route.topic()).await;
    let at: HashMap<(i32, i64), Uuid> = again.iter().map(|(p, o, a)| ((*p, *o), a.id)).collect();
    let found: HashSet<Uuid> = again.iter().map(|(_, _, a)| a.id).collect();
    for id in lost.iter().take(5) {
        let needle = format!("event_id={id} ");
        let confirmations: Vec<String> = log
            .lines()
            .map(strip_ansi)
            .filter(|line| line.contains(&needle))
            .map(|line| {
                let field = |name: &str| {
                    line.split(&format!("{name}="))
                        .nth(1)
                        .and_then(|v| v.split_whitespace().next())
                        .and_then(|v| v.parse::<i64>().ok())
                        .unwrap_or(-1)
                };
                let (partition, offset) = (field("partition") as i32, field("offset"));
                let holds = match at.get(&(partition, offset)) {
                    Some(other) if other == id => "it".to_owned(),
                    Some(other) => format!("event {other}"),
                    None => "nothing".to_owned(),
                };
                format!("confirmed at {partition}@{offset}, which holds {holds}")
            })
            .collect();
        figures.failures.push(format!(
            "kafka: {id}: {}; a second read of the topic {} it",
            if confirmations.is_empty() {
                "no relay logged a confirmation".to_owned()
            } else {
                confirmations.join(", ")
            },
            if found.contains(id) { "finds" } else { "lacks" }
        ));
    }
}

/// `line` without the terminal colour codes of the relays' log.
fn strip_ansi(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// Compares the outbox table (what was committed) with the arrivals; returns the events lost.
async fn tally(
    figures: &mut Figures,
    pool: &PgPool,
    table: &str,
    rolled_back: &HashSet<Uuid>,
    poison: &HashSet<Uuid>,
    arrivals: &[Arrival],
) -> Vec<Uuid> {
    let rows: Vec<(Uuid, String, Option<String>)> =
        sqlx::query_as(&format!(r#"SELECT id, status, last_error FROM "{table}""#))
            .fetch_all(pool)
            .await
            .unwrap();
    let mut committed = HashMap::new();
    for (id, status, reason) in rows {
        if poison.contains(&id) {
            figures.poison += 1;
            if status == "dead" && reason.is_some_and(|r| !r.is_empty()) {
                figures.poison_dead_with_reason += 1;
            }
            continue;
        }
        if status == "dead" {
            figures.dead += 1;
        }
        committed.insert(id, status);
    }
    figures.committed = committed.len() as u64;
    let mut seen = HashSet::new();
    let mut highest: HashMap<&str, i64> = HashMap::new();
    for a in arrivals {
        if poison.contains(&a.id) {
            continue;
        }
        if !seen.insert(a.id) {
            figures.duplicates += 1;
            continue;
        }
        if !committed.contains_key(&a.id) || rolled_back.contains(&a.id) {
            figures.phantoms += 1;
            continue;
        }
        if let (Some(account), Some(n)) = (a.account.as_deref(), a.n) {
            let top = highest.entry(account).or_insert(0);
            if n < *top {
                figures.order_violations += 1;
            }
            *top = (*top).max(n);
        }
    }
    figures.delivered = seen.iter().filter(|id| committed.contains_key(id)).count() as u64;
    let lost: Vec<Uuid> = committed
        .keys()
        .filter(|id| !seen.contains(id))
        .copied()
        .collect();
    figures.lost += lost.len() as u64;
    if !lost.is_empty() {
        // What the table says about the first few, to start an investigation from.
        let rows: Vec<(Uuid, String, i64, String, i32, Option<String>)> = sqlx::query_as(&format!(
            r#"SELECT id, aggregate_id, seq, status, attempts, last_error FROM "{table}"
               WHERE id = ANY($1) ORDER BY aggregate_id, seq LIMIT 5"#
        ))
        .bind(&lost)
        .fetch_all(pool)
        .await
        .unwrap();
        for (id, account, seq, status, attempts, error) in rows {
            figures.failures.push(format!(
                "lost: {id} {account} seq {seq} ({status}, {attempts} attempts, last error \
                 {error:?})"
            ));
        }
    }
    lost
}

async fn drop_cell(pool: &PgPool, table: &str) {
    for suffix in [
        "",
        "_business",
        "_effects",
        "_aggregates",
        "_archive",
        "_cursors",
        "_new",
        "_keys",
        "_migrations",
        "_inbox",
        "_inbox_attempts",
    ] {
        let _ = sqlx::query(&format!(
            r#"DROP TABLE IF EXISTS "{table}{suffix}" CASCADE"#
        ))
        .execute(pool)
        .await;
    }
}

/// The figures as a Markdown table.
pub fn markdown(all: &[Figures]) -> String {
    let mut out = String::from(
        "| destination | fault | committed | delivered | lost | order violations | duplicates \
         | phantoms | dead (good) | poison dead w/ reason | dup. effects | deaths | recovery \
         | time | peak RSS |\n|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n",
    );
    for f in all {
        out.push_str(&format!(
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {}/{} | {} | {} | {} | {:.1} s | {} |\n",
            f.dest,
            f.fault,
            f.committed,
            f.delivered,
            f.lost,
            f.order_violations,
            f.duplicates,
            f.phantoms,
            f.dead,
            f.poison_dead_with_reason,
            f.poison,
            f.duplicate_effects,
            f.deaths,
            f.recovery_ms
                .map(|ms| format!("{:.1} s", ms as f64 / 1000.0))
                .unwrap_or_else(|| "-".into()),
            f.seconds,
            f.peak_rss_mib
                .map(|m| format!("{m:.0} MiB"))
                .unwrap_or_else(|| "-".into()),
        ));
    }
    let notes: Vec<String> = all
        .iter()
        .flat_map(|f| {
            f.notes
                .iter()
                .chain(&f.known)
                .chain(&f.failures)
                .map(move |n| format!("- {} / {}: {n}", f.dest, f.fault))
        })
        .collect();
    if !notes.is_empty() {
        out.push('\n');
        out.push_str(&notes.join("\n"));
        out.push('\n');
    }
    out
}

impl fmt::Display for Figures {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} / {}: committed {} delivered {} lost {} order {} dup {} phantoms {} dead {} \
             poison {}/{} dup-effects {} deaths {} recovery {:?} ms, {:.1} s",
            self.dest,
            self.fault,
            self.committed,
            self.delivered,
            self.lost,
            self.order_violations,
            self.duplicates,
            self.phantoms,
            self.dead,
            self.poison_dead_with_reason,
            self.poison,
            self.duplicate_effects,
            self.deaths,
            self.recovery_ms,
            self.seconds
        )
    }
}
