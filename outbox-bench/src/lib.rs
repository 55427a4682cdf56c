//! The outbox benchmark harness.
//!
//! One run measures the raw limits of the servers (plain SQL claim-and-mark, each broker's
//! pipelined publish with confirmation through its plain client) and the outbox's own paths on
//! the same servers (enqueue overhead, relay throughput, commit-to-confirmation latency, relay
//! memory), so every figure is reported as a ratio that holds on a noisy machine.
//! `BENCHMARKS.md` at the workspace root explains the figures and how to reproduce them:
//!
//! ```text
//! cargo run --release -p outbox-bench -- --out bench-results
//! ```

mod brokers;
mod pg;
mod relay;
mod report;
pub mod sys;

use outbox::OutboxEvent;
use serde::{Deserialize, Serialize};
use std::path::PathBuf;
use std::time::Duration;

pub use pg::{mean_ms, percentile_ms};
pub use report::Report;

/// Any error of the harness: it reports and stops.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Where the relay delivers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Target {
    /// Typed handlers in the relay's process (`Dispatcher`).
    Handlers,
    /// NATS JetStream.
    Nats,
    /// RabbitMQ with publisher confirms.
    Amqp,
    /// A Kafka-protocol broker.
    Kafka,
}

impl Target {
    /// Every target, in report order.
    pub const ALL: [Target; 4] = [Target::Handlers, Target::Nats, Target::Amqp, Target::Kafka];

    /// The name used on the command line and in the report.
    pub fn name(self) -> &'static str {
        match self {
            Target::Handlers => "handlers",
            Target::Nats => "nats",
            Target::Amqp => "amqp",
            Target::Kafka => "kafka",
        }
    }

    /// Parses a command-line name.
    pub fn parse(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|t| t.name() == name)
    }
}

/// What to measure, against which servers.
#[derive(Debug, Clone)]
pub struct Config {
    /// PostgreSQL (`OUTBOX_BENCH_DATABASE_URL`).
    pub database_url: String,
    /// RabbitMQ (`OUTBOX_BENCH_AMQP_URL`).
    pub amqp_url: String,
    /// NATS (`OUTBOX_BENCH_NATS_URL`).
    pub nats_url: String,
    /// Kafka bootstrap servers (`OUTBOX_BENCH_KAFKA_BROKERS`).
    pub kafka_brokers: String,
    /// `linger.ms` of the Kafka producers, raw and the transport's (`None`: the transport's
    /// default).
    pub kafka_linger_ms: Option<u32>,
    /// Prefix of every table, stream, queue and topic the run creates.
    pub prefix: String,
    /// Where the relay delivers in the throughput and latency runs.
    pub targets: Vec<Target>,
    /// Backlog sizes drained by the relays.
    pub backlogs: Vec<usize>,
    /// How many relays drain a backlog side by side.
    pub relays: Vec<usize>,
    /// Distinct aggregates the events belong to.
    pub aggregates: usize,
    /// Size of each event's JSON payload in bytes.
    pub payload_bytes: usize,
    /// Events claimed per batch by one relay worker, or `None` to share the aggregates between
    /// the workers of all relays.
    pub batch_size: Option<usize>,
    /// Workers (batches in flight) per relay, or `None` for two batches in flight over all the
    /// relays (the best setting measured on 2 cores).
    pub workers: Option<usize>,
    /// Events of one aggregate delivered per claim (the relay's `run_length`).
    pub run_length: usize,
    /// Events per batch at most (the relay's `max_batch_events`).
    pub max_batch_events: usize,
    /// Aggregate counts of the hot-aggregate runs: a backlog of `hot_backlog` events spread
    /// over this many aggregates, drained by one relay.
    pub hot_aggregates: Vec<usize>,
    /// Backlog of each hot-aggregate run.
    pub hot_backlog: usize,
    /// Rows or messages per raw-limit measurement.
    pub raw_events: usize,
    /// Messages in flight in the raw broker measurements (Kafka gets four times as many: its
    /// client batches internally).
    pub raw_in_flight: usize,
    /// Concurrent writers in the enqueue-overhead runs.
    pub writers: Vec<usize>,
    /// Duration of each enqueue-overhead run.
    pub enqueue_duration: Duration,
    /// Offered rates (events per second) of the latency runs.
    pub latency_rates: Vec<u32>,
    /// Duration of each latency run.
    pub latency_duration: Duration,
    /// Drains each throughput backlog a second time with a transaction holding a snapshot open
    /// on another connection (a report or a stuck session elsewhere in the database: vacuum
    /// cannot remove what the drain leaves dead), and measures the dead tuples and table sizes
    /// at its end.
    pub hold_open: bool,
    /// The relay runs use the partitioned layout (`TableLayout::Partitioned`, four hour-long
    /// partitions) in a table of its own, instead of the standard one.
    pub partitioned: bool,
    /// Drops the tables, streams, queues and topics at the end (the smoke run does).
    pub cleanup: bool,
    /// Where to write `results.json`, `results.md` and the plots.
    pub out_dir: Option<PathBuf>,
}

impl Config {
    /// The full run of `BENCHMARKS.md`: about half an hour on a 2-core machine.
    pub fn full() -> Self {
        Self {
            database_url: env_or(
                "OUTBOX_BENCH_DATABASE_URL",
                "postgres://postgres@127.0.0.1:5432/outbox_bench",
            ),
            amqp_url: env_or(
                "OUTBOX_BENCH_AMQP_URL",
                "amqp://guest:guest@127.0.0.1:5672/%2f",
            ),
            nats_url: env_or("OUTBOX_BENCH_NATS_URL", "nats://127.0.0.1:4222"),
            kafka_brokers: env_or("OUTBOX_BENCH_KAFKA_BROKERS", "127.0.0.1:9092"),
            kafka_linger_ms: None,
            prefix: "obench".to_owned(),
            targets: Target::ALL.to_vec(),
            backlogs: vec![100_000, 1_000_000],
            relays: vec![1, 4],
            aggregates: 1000,
            payload_bytes: 256,
            batch_size: None,
            workers: None,
            run_length: 500,
            max_batch_events: 5000,
            hot_aggregates: vec![1, 10, 1000],
            hot_backlog: 100_000,
            raw_events: 100_000,
            raw_in_flight: 256,
            writers: vec![1, 8],
            enqueue_duration: Duration::from_secs(10),
            latency_rates: vec![1000, 5000],
            latency_duration: Duration::from_secs(15),
            hold_open: false,
            partitioned: false,
            cleanup: false,
            out_dir: None,
        }
    }

    /// A few seconds of everything at tiny sizes: proves the harness still works, measures
    /// nothing worth reading.
    pub fn smoke() -> Self {
        Self {
            prefix: format!("obsmoke{:04x}", std::process::id() & 0xffff),
            backlogs: vec![2_000],
            relays: vec![1, 2],
            aggregates: 50,
            hot_aggregates: vec![1, 5],
            hot_backlog: 500,
            raw_events: 2_000,
            writers: vec![1, 2],
            enqueue_duration: Duration::from_millis(300),
            latency_rates: vec![200],
            latency_duration: Duration::from_millis(500),
            hold_open: false,
            cleanup: true,
            ..Self::full()
        }
    }

    /// Workers of each relay when `relays` relays drain together.
    pub fn workers_for(&self, relays: usize) -> usize {
        self.workers.unwrap_or(2 / relays.max(1)).max(1)
    }

    /// Aggregates leased per claim by each worker when `relays` relays drain together: the
    /// aggregates shared out between the workers.
    pub fn batch_for(&self, relays: usize) -> usize {
        self.batch_size
            .unwrap_or_else(|| self.aggregates / (relays * self.workers_for(relays)).max(1))
            .clamp(1, 1000)
    }
}

fn env_or(name: &str, default: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| default.to_owned())
}

/// The benchmark event: an order placed on an account, padded to the configured payload size.
#[derive(Debug, Serialize, Deserialize, OutboxEvent)]
#[outbox(
    event_type = "bench.order_placed",
    aggregate_type = "account",
    topic = "bench"
)]
pub struct OrderPlaced {
    /// `acct-NNNN`.
    #[outbox(aggregate_id)]
    pub account: String,
    /// The event's number in its run.
    pub n: u64,
    /// Filler up to the payload size.
    pub pad: String,
}

impl OrderPlaced {
    /// Event `n` of a run, on aggregate `n % aggregates`, serialising to `bytes` bytes.
    pub fn new(n: u64, aggregates: usize, bytes: usize) -> Self {
        let mut event = Self {
            account: account(n as usize % aggregates),
            n,
            pad: String::new(),
        };
        let base = serde_json::to_string(&event).map_or(0, |s| s.len());
        event.pad = "x".repeat(bytes.saturating_sub(base));
        event
    }
}

/// The id of aggregate `i`.
pub fn account(i: usize) -> String {
    format!("acct-{i:05}")
}

/// Runs every measurement of `config` and returns the report (also written to
/// `config.out_dir` when set).
pub async fn run(config: &Config) -> Result<Report, BoxError> {
    let mut report = Report::new(config);
    let servers = pg::Servers::connect(config).await?;
    report.versions = servers.versions().await;
    eprintln!("[bench] servers: {:?}", report.versions);

    // The report is written after each section: a failure late in a long run keeps the
    // figures measured before it.
    let save = |report: &Report| match &config.out_dir {
        Some(dir) => report.write(dir),
        None => Ok(()),
    };
    let result = async {
        eprintln!("[bench] raw PostgreSQL claim-and-mark");
        report.raw_pg = pg::raw_claim(&servers, config).await?;
        eprintln!("[bench] raw broker publish rates");
        report.raw_brokers = brokers::raw_limits(&servers, config).await?;
        save(&report)?;
        eprintln!("[bench] enqueue overhead");
        report.enqueue = pg::enqueue_overhead(&servers, config).await?;
        save(&report)?;
        eprintln!("[bench] relay throughput");
        report.relay = relay::throughput(&servers, config, &report).await?;
        save(&report)?;
        eprintln!("[bench] hot aggregates");
        report.hot = relay::hot_aggregates(&servers, config, &report).await?;
        save(&report)?;
        eprintln!("[bench] latency");
        report.latency = relay::latency(&servers, config).await?;
        save(&report)?;
        Ok::<_, BoxError>(())
    }
    .await;
    if config.cleanup {
        servers.cleanup(config).await;
    }
    result?;
    if let Some(dir) = &config.out_dir {
        eprintln!("[bench] wrote {}", dir.display());
    }
    Ok(report)
}
