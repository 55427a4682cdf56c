//! The log-tailing relay (`WalRelay`) against the raw limits of the same slot and brokers, and
//! against the polling relay on the same server, in one run.
//!
//! `cargo run --release -p outbox-bench --bin wal_bench -- [--smoke] [--backlog N]
//! [--tx-events N] [--targets handlers,nats,kafka] [--out DIR]`
//!
//! Needs a PostgreSQL with `wal_level = logical`: `OUTBOX_BENCH_WAL_DATABASE_URL`, by default
//! the private cluster `scripts/services.sh pg-logical` starts on 127.0.0.1:5434.
//!
//! - Raw limits: reading a backlog of one-event transactions through a slot with `pg_walstream`
//!   and nothing else (the slot's ceiling); pipelined JetStream publishes with acknowledgement;
//!   pipelined Kafka produces with acknowledgement.
//! - Drains: a backlog written in transactions of `--tx-events` events, over 1 and over 1,000
//!   aggregates, delivered by the log-tailing relay (message mode and table mode) and by the
//!   polling relay, to typed handlers, NATS and Kafka; events/s, ratio to the raw limit it can
//!   reach at most, PostgreSQL CPU per event, and WAL bytes per event written.
//! - Latency: commit → destination confirmation at an offered 1,000 events/s, one event per
//!   transaction, message mode to NATS and to Kafka.

use futures_util::stream::{FuturesUnordered, StreamExt};
use outbox::kafka::KafkaTransport;
use outbox::nats::NatsTransport;
use outbox::wal::WalRelay;
use outbox::{
    CancellationToken, DeliveryResult, Destination, Dispatcher, Envelope, Outbox, Registry, Relay,
    TailMode,
};
use outbox_bench::{percentile_ms, sys, BoxError, OrderPlaced};
use pg_walstream::{EventType, LogicalReplicationStream, ReplicationStreamConfig};
use rdkafka::producer::{FutureProducer, FutureRecord};
use sqlx::postgres::{PgPool, PgPoolOptions};
use sqlx::Postgres;
use std::collections::HashMap;
use std::fmt::Write as _;
use std::future::IntoFuture;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use uuid::Uuid;

#[derive(Clone)]
struct Settings {
    url: String,
    nats_url: String,
    kafka_brokers: String,
    backlog: usize,
    tx_events: usize,
    payload_bytes: usize,
    targets: Vec<String>,
    latency_seconds: u64,
    out: Option<std::path::PathBuf>,
}

impl Settings {
    fn from_args() -> Result<Self, BoxError> {
        let args: Vec<String> = std::env::args().skip(1).collect();
        let smoke = args.iter().any(|a| a == "--smoke");
        let mut s = Settings {
            url: std::env::var("OUTBOX_BENCH_WAL_DATABASE_URL")
                .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5434/postgres".into()),
            nats_url: std::env::var("OUTBOX_BENCH_NATS_URL")
                .unwrap_or_else(|_| "nats://127.0.0.1:4222".into()),
            kafka_brokers: std::env::var("OUTBOX_BENCH_KAFKA_BROKERS")
                .unwrap_or_else(|_| "127.0.0.1:9092".into()),
            backlog: if smoke { 2_000 } else { 200_000 },
            tx_events: 1,
            payload_bytes: 200,
            targets: vec!["handlers".into(), "nats".into(), "kafka".into()],
            latency_seconds: if smoke { 2 } else { 15 },
            out: None,
        };
        let mut it = args.iter();
        while let Some(flag) = it.next() {
            let mut value = || it.next().cloned().ok_or(format!("{flag} needs a value"));
            match flag.as_str() {
                "--smoke" => {}
                "--backlog" => s.backlog = value()?.parse()?,
                "--tx-events" => s.tx_events = value()?.parse::<usize>()?.max(1),
                "--targets" => s.targets = value()?.split(',').map(str::to_owned).collect(),
                "--latency-seconds" => s.latency_seconds = value()?.parse()?,
                "--out" => s.out = Some(value()?.into()),
                other => return Err(format!("unknown option {other}").into()),
            }
        }
        Ok(s)
    }
}

/// Counts what the real destination confirmed, and when each event was confirmed.
struct Probe<D> {
    inner: D,
    delivered: Arc<AtomicU64>,
    confirmations: Option<Arc<Mutex<HashMap<Uuid, Instant>>>>,
}

impl<D: Destination> Destination for Probe<D> {
    async fn deliver(&self, batch: &[Envelope]) -> Vec<DeliveryResult> {
        let results = self.inner.deliver(batch).await;
        let at = Instant::now();
        let ok = results.iter().filter(|r| r.is_ok()).count();
        self.delivered.fetch_add(ok as u64, Ordering::Relaxed);
        if let Some(confirmations) = &self.confirmations {
            let mut confirmations = confirmations.lock().expect("probe lock");
            for (e, r) in batch.iter().zip(&results) {
                if r.is_ok() {
                    confirmations.entry(e.id).or_insert(at);
                }
            }
        }
        results
    }

    fn delivery_timeout(&self) -> Option<Duration> {
        self.inner.delivery_timeout()
    }
}

/// A destination of one of the three kinds, behind one type.
enum Target {
    Handlers(Dispatcher),
    Nats(NatsTransport),
    Kafka(KafkaTransport),
}

impl Destination for Target {
    async fn deliver(&self, batch: &[Envelope]) -> Vec<DeliveryResult> {
        match self {
            Target::Handlers(d) => d.deliver(batch).await,
            Target::Nats(t) => t.deliver(batch).await,
            Target::Kafka(t) => t.deliver(batch).await,
        }
    }

    fn delivery_timeout(&self) -> Option<Duration> {
        match self {
            Target::Handlers(d) => d.delivery_timeout(),
            Target::Nats(t) => Destination::delivery_timeout(t),
            Target::Kafka(t) => Destination::delivery_timeout(t),
        }
    }
}

struct Bench {
    s: Settings,
    pool: PgPool,
    prefix: String,
    js: async_nats::jetstream::Context,
    report: String,
    /// The slot's raw read rate, events/s.
    slot_rate: f64,
}

/// How events get from the table or slot to the destination.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Mode {
    Messages,
    Table,
    Polling,
}

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Mode::Messages => "log tailing, messages",
            Mode::Table => "log tailing, table",
            Mode::Polling => "polling relay",
        }
    }
}

impl Bench {
    async fn target(&self, name: &str) -> Result<Target, BoxError> {
        Ok(match name {
            "handlers" => {
                let registry = Registry::builder()
                    .handler::<OrderPlaced, _, _>("bench", |_e, _ctx| async { Ok(()) })?
                    .build();
                Target::Handlers(Dispatcher::new(registry))
            }
            "nats" => {
                let stream = format!("{}_WAL", self.prefix.to_uppercase());
                let s = outbox::nats::ensure_stream(
                    &self.js,
                    &stream,
                    vec![format!("{}.>", self.prefix)],
                )
                .await?;
                s.purge().await?;
                Target::Nats(NatsTransport::new(self.js.clone()).subject_prefix(&self.prefix))
            }
            "kafka" => {
                let topic = format!("{}.bench", self.prefix);
                outbox::kafka::ensure_topic(&self.s.kafka_brokers, &topic, 4).await?;
                Target::Kafka(
                    KafkaTransport::new(&self.s.kafka_brokers)?.topic_prefix(&self.prefix),
                )
            }
            other => return Err(format!("unknown target {other}").into()),
        })
    }

    fn outbox(&self, table: &str, mode: Mode) -> Result<Outbox<Postgres>, BoxError> {
        let builder = Outbox::builder(self.pool.clone()).table(table);
        Ok(match mode {
            Mode::Messages => builder.log_tailing(TailMode::Messages),
            Mode::Table => builder.log_tailing(TailMode::Table),
            Mode::Polling => builder,
        }
        .build()?)
    }

    async fn drop_outbox(&self, table: &str) {
        // The slot keeps WAL until dropped; the stopped relay's walsender may take a moment to
        // let it go.
        if let Ok(outbox) = self.outbox(table, Mode::Messages) {
            if let Ok(slot) = outbox::wal::slot_name(&outbox).await {
                for _ in 0..100 {
                    let dropped = sqlx::query(
                        "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots \
                         WHERE slot_name = $1",
                    )
                    .bind(&slot)
                    .execute(&self.pool)
                    .await;
                    if dropped.is_ok() {
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
        let _ = sqlx::query(&format!(r#"DROP PUBLICATION IF EXISTS "{table}_relay""#))
            .execute(&self.pool)
            .await;
        for suffix in [
            "",
            "_aggregates",
            "_archive",
            "_migrations",
            "_cursors",
            "_new",
            "_keys",
        ] {
            let _ = sqlx::query(&format!(r#"DROP TABLE IF EXISTS "{table}{suffix}""#))
                .execute(&self.pool)
                .await;
        }
    }

    async fn wal_lsn(&self) -> Result<i64, BoxError> {
        Ok(
            sqlx::query_scalar("SELECT (pg_current_wal_lsn() - '0/0'::pg_lsn)::int8")
                .fetch_one(&self.pool)
                .await?,
        )
    }

    /// Writes `n` events over `aggregates` in transactions of `tx_events`, from 4 writers;
    /// returns the WAL bytes written.
    async fn write_backlog(
        &self,
        outbox: &Outbox<Postgres>,
        n: usize,
        aggregates: usize,
    ) -> Result<i64, BoxError> {
        let before = self.wal_lsn().await?;
        let writers = 4;
        let mut tasks = tokio::task::JoinSet::new();
        for w in 0..writers {
            let (outbox, pool, s) = (outbox.clone(), self.pool.clone(), self.s.clone());
            tasks.spawn(async move {
                let mut i = w;
                while i < n {
                    let mut events = Vec::with_capacity(s.tx_events);
                    // Each writer owns its aggregates, so that sequence order is write order.
                    while events.len() < s.tx_events && i < n {
                        let agg = if aggregates == 1 { 0 } else { i % aggregates };
                        let mut e = OrderPlaced::new(i as u64, usize::MAX, s.payload_bytes);
                        e.account = outbox_bench::account(agg);
                        events.push(e);
                        i += writers;
                    }
                    if aggregates == 1 {
                        // One aggregate: one writer at a time keeps the benchmark about the
                        // relay, not about lock waits on the counter row.
                        static ONE: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
                        let _one = ONE.lock().await;
                        let mut tx = pool.begin().await?;
                        outbox.enqueue_batch(&mut *tx, &events).await?;
                        tx.commit().await?;
                    } else {
                        let mut tx = pool.begin().await?;
                        outbox.enqueue_batch(&mut *tx, &events).await?;
                        tx.commit().await?;
                    }
                }
                Ok::<_, BoxError>(())
            });
        }
        while let Some(done) = tasks.join_next().await {
            done??;
        }
        Ok(self.wal_lsn().await? - before)
    }

    /// The slot's ceiling: a backlog of one-event transactions read through a slot with
    /// nothing done per event.
    async fn raw_slot(&mut self) -> Result<(), BoxError> {
        let table = format!("{}_raw", self.prefix);
        let outbox = self.outbox(&table, Mode::Messages)?;
        outbox.migrate().await?;
        let n = self.s.backlog;
        self.write_backlog(&outbox, n, 1000).await?;
        let url = replication_url(&self.s.url);
        let config = ReplicationStreamConfig::builder(
            outbox::wal::slot_name(&outbox).await?,
            format!("{table}_relay"),
        )
        .with_protocol_version(1)
        .with_messages(true);
        let mut stream = LogicalReplicationStream::new(&url, config).await?;
        stream.start(None).await?;
        let cancel = pg_walstream::CancellationToken::new();
        let (cpu, started) = (sys::postgres_cpu(), Instant::now());
        let mut seen = 0;
        let prefix = format!("outbox:{table}");
        while seen < n {
            let event = stream.next_event(&cancel).await?;
            match &event.event_type {
                EventType::Message { prefix: p, .. } if **p == *prefix => seen += 1,
                EventType::Commit { end_lsn, .. } => {
                    stream
                        .shared_lsn_feedback
                        .update_flushed_lsn(end_lsn.value());
                    stream
                        .shared_lsn_feedback
                        .update_applied_lsn(end_lsn.value());
                }
                _ => {}
            }
        }
        let took = started.elapsed();
        let cpu = sys::postgres_cpu().saturating_sub(cpu);
        drop(stream);
        let rate = n as f64 / took.as_secs_f64();
        writeln!(
            self.report,
            "| slot read ({} events, {}/tx, no destination) | {rate:.0} ev/s | {:.1} µs |",
            n,
            self.s.tx_events,
            cpu.as_secs_f64() * 1e6 / n as f64
        )?;
        eprintln!("raw slot: {rate:.0} ev/s");
        self.drop_outbox(&table).await;
        self.slot_rate = rate;
        Ok(())
    }
}

fn replication_url(url: &str) -> String {
    if url.contains('?') {
        format!("{url}&replication=database")
    } else {
        format!("{url}?replication=database")
    }
}

async fn raw_nats(
    js: &async_nats::jetstream::Context,
    prefix: &str,
    n: usize,
    payload: &[u8],
) -> Result<f64, BoxError> {
    let stream = format!("{}_RAW", prefix.to_uppercase());
    let s = outbox::nats::ensure_stream(js, &stream, vec![format!("{prefix}raw.>")]).await?;
    s.purge().await?;
    let started = Instant::now();
    let mut in_flight = FuturesUnordered::new();
    for i in 0..n {
        if in_flight.len() >= 1000 {
            in_flight.next().await.ok_or("no ack")??;
        }
        let ack = js
            .publish(
                format!("{prefix}raw.{}", i % 1000),
                bytes::Bytes::copy_from_slice(payload),
            )
            .await?;
        in_flight.push(ack.into_future());
    }
    while let Some(ack) = in_flight.next().await {
        ack?;
    }
    Ok(n as f64 / started.elapsed().as_secs_f64())
}

async fn raw_kafka(brokers: &str, topic: &str, n: usize, payload: &[u8]) -> Result<f64, BoxError> {
    outbox::kafka::ensure_topic(brokers, topic, 4).await?;
    let producer: FutureProducer = outbox::kafka::producer_config(brokers).create()?;
    let started = Instant::now();
    let mut in_flight: FuturesUnordered<
        futures_util::future::BoxFuture<
            '_,
            rdkafka::producer::future_producer::OwnedDeliveryResult,
        >,
    > = FuturesUnordered::new();
    for i in 0..n {
        if in_flight.len() >= 4000 {
            if let Some(sent) = in_flight.next().await {
                sent.map_err(|(e, _)| e)?;
            }
        }
        let producer = &producer;
        in_flight.push(Box::pin(async move {
            let key = format!("k{}", i % 1000);
            let record = FutureRecord::to(topic).key(&key).payload(payload);
            producer.send(record, Duration::from_secs(30)).await
        }));
    }
    while let Some(sent) = in_flight.next().await {
        sent.map_err(|(e, _)| e)?;
    }
    Ok(n as f64 / started.elapsed().as_secs_f64())
}

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let s = Settings::from_args()?;
    let pool = PgPoolOptions::new()
        .max_connections(16)
        .connect(&s.url)
        .await?;
    let level: String = sqlx::query_scalar("SHOW wal_level")
        .fetch_one(&pool)
        .await?;
    if level != "logical" {
        return Err(format!(
            "{} has wal_level = {level}; start `scripts/services.sh pg-logical`",
            s.url
        )
        .into());
    }
    let js = async_nats::jetstream::new(async_nats::connect(&s.nats_url).await?);
    let prefix = format!("wb{}", &Uuid::new_v4().simple().to_string()[..8]);
    let mut bench = Bench {
        s: s.clone(),
        pool,
        prefix: prefix.clone(),
        js,
        report: String::new(),
        slot_rate: 0.0,
    };
    let version: String = sqlx::query_scalar("SHOW server_version")
        .fetch_one(&bench.pool)
        .await?;
    writeln!(
        bench.report,
        "# Log-tailing relay benchmark\n\n{}; PostgreSQL {version} (wal_level = logical, fsync off: a private cluster), payload {} bytes, {} events per transaction, backlog {} events.\n\n## Raw limits (same run)\n\n| what | rate | PostgreSQL CPU per event |\n|---|---:|---:|",
        sys::machine(),
        s.payload_bytes,
        s.tx_events,
        s.backlog
    )?;
    bench.raw_slot().await?;
    let payload = serde_json::to_vec(&OrderPlaced::new(0, 1, s.payload_bytes))?;
    let mut raw: HashMap<&str, f64> = HashMap::new();
    raw.insert("handlers", f64::INFINITY);
    if s.targets.iter().any(|t| t == "nats") {
        let rate = raw_nats(&bench.js, &prefix, s.backlog, &payload).await?;
        writeln!(
            bench.report,
            "| NATS JetStream publish, 1,000 in flight | {rate:.0} msg/s | |"
        )?;
        raw.insert("nats", rate);
    }
    if s.targets.iter().any(|t| t == "kafka") {
        let rate = raw_kafka(
            &s.kafka_brokers,
            &format!("{prefix}.raw"),
            s.backlog,
            &payload,
        )
        .await?;
        writeln!(
            bench.report,
            "| Kafka (tansu) produce, 4,000 in flight | {rate:.0} msg/s | |"
        )?;
        raw.insert("kafka", rate);
    }
    writeln!(
        bench.report,
        "\n## Draining a backlog\n\nThe relay starts after the whole backlog is committed; the rate is events confirmed by the destination per second, from the relay's start to the last confirmation. The ratio is to the lower of the slot's raw read rate and the broker's raw publish rate.\n\n| relay | target | aggregates | events/s | ratio | PostgreSQL CPU µs/event (drain) | WAL bytes/event (write) |\n|---|---|---:|---:|---:|---:|---:|"
    )?;
    let mut run = 0;
    for target in &s.targets {
        for aggregates in [1usize, 1000] {
            for mode in [Mode::Messages, Mode::Table, Mode::Polling] {
                run += 1;
                let table = format!("{prefix}_{run}");
                let outbox = bench.outbox(&table, mode)?;
                outbox.migrate().await?;
                let wal = bench.write_backlog(&outbox, s.backlog, aggregates).await?;
                let delivered = Arc::new(AtomicU64::new(0));
                let probe = Probe {
                    inner: bench.target(target).await?,
                    delivered: delivered.clone(),
                    confirmations: None,
                };
                let stop = CancellationToken::new();
                let (cpu, started) = (sys::postgres_cpu(), Instant::now());
                let task = match mode {
                    Mode::Polling => {
                        let relay = Relay::builder(outbox.clone(), probe)
                            .workers(2)
                            .batch_size(if aggregates == 1 { 1 } else { 250 })
                            .run_length(500)
                            .max_batch_events(5000)
                            .build()?;
                        let stop = stop.clone();
                        tokio::spawn(async move { relay.run(stop).await })
                    }
                    _ => {
                        let relay = WalRelay::builder(outbox.clone(), s.url.clone(), probe)
                            .max_batch_events(5000)
                            .build()?;
                        let stop = stop.clone();
                        tokio::spawn(async move { relay.run(stop).await })
                    }
                };
                let deadline = Instant::now() + Duration::from_secs(600);
                while delivered.load(Ordering::Relaxed) < s.backlog as u64 {
                    if Instant::now() > deadline || task.is_finished() {
                        return Err(format!(
                            "{} to {target}: stuck at {} of {}",
                            mode.name(),
                            delivered.load(Ordering::Relaxed),
                            s.backlog
                        )
                        .into());
                    }
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                let took = started.elapsed();
                let cpu = sys::postgres_cpu().saturating_sub(cpu);
                stop.cancel();
                task.await??;
                let rate = s.backlog as f64 / took.as_secs_f64();
                let ceiling = raw[target.as_str()].min(bench.slot_rate);
                let ceiling = if mode == Mode::Polling {
                    raw[target.as_str()]
                } else {
                    ceiling
                };
                let ratio = if ceiling.is_finite() {
                    format!("{:.2}", rate / ceiling)
                } else {
                    "–".into()
                };
                writeln!(
                    bench.report,
                    "| {} | {target} | {aggregates} | {rate:.0} | {ratio} | {:.1} | {:.0} |",
                    mode.name(),
                    cpu.as_secs_f64() * 1e6 / s.backlog as f64,
                    wal as f64 / s.backlog as f64
                )?;
                eprintln!(
                    "{} to {target}, {aggregates} aggregates: {rate:.0} ev/s",
                    mode.name()
                );
                bench.drop_outbox(&table).await;
            }
        }
    }
    // The scale-out curve of log tailing: one slot has one reader, the other relays stand by.
    let scale_target = s
        .targets
        .iter()
        .find(|t| *t != "handlers")
        .cloned()
        .unwrap_or_else(|| "handlers".into());
    writeln!(
        bench.report,
        "\n## Several log-tailing relays on one slot\n\nN relay tasks with their own connections on one message-mode outbox, 1,000 aggregates, to {scale_target}: one streams the slot, the others stand by.\n\n| relays | events/s |\n|---:|---:|"
    )?;
    for relays in [1usize, 2, 4] {
        run += 1;
        let table = format!("{prefix}_{run}");
        let outbox = bench.outbox(&table, Mode::Messages)?;
        outbox.migrate().await?;
        bench.write_backlog(&outbox, s.backlog, 1000).await?;
        let delivered = Arc::new(AtomicU64::new(0));
        let stop = CancellationToken::new();
        let started = Instant::now();
        let mut tasks = Vec::new();
        for _ in 0..relays {
            let probe = Probe {
                inner: bench.target(&scale_target).await?,
                delivered: delivered.clone(),
                confirmations: None,
            };
            let relay = WalRelay::builder(outbox.clone(), s.url.clone(), probe)
                .max_batch_events(5000)
                .build()?;
            let stop = stop.clone();
            tasks.push(tokio::spawn(async move { relay.run(stop).await }));
        }
        let deadline = Instant::now() + Duration::from_secs(600);
        while delivered.load(Ordering::Relaxed) < s.backlog as u64 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let rate = delivered.load(Ordering::Relaxed) as f64 / started.elapsed().as_secs_f64();
        stop.cancel();
        for task in tasks {
            task.await??;
        }
        writeln!(bench.report, "| {relays} | {rate:.0} |")?;
        eprintln!("{relays} log-tailing relays: {rate:.0} ev/s");
        bench.drop_outbox(&table).await;
    }
    writeln!(
        bench.report,
        "\n## Commit → confirmation latency\n\nOne writer commits one event per transaction at an offered 1,000 events/s for {} s (message mode); latency is from the commit's return to the destination's confirmation.\n\n| target | events | p50 ms | p99 ms | max ms |\n|---|---:|---:|---:|---:|",
        s.latency_seconds
    )?;
    for target in s.targets.iter().filter(|t| *t != "handlers") {
        run += 1;
        let table = format!("{prefix}_{run}");
        let outbox = bench.outbox(&table, Mode::Messages)?;
        outbox.migrate().await?;
        let confirmations = Arc::new(Mutex::new(HashMap::new()));
        let probe = Probe {
            inner: bench.target(target).await?,
            delivered: Arc::new(AtomicU64::new(0)),
            confirmations: Some(confirmations.clone()),
        };
        let relay = WalRelay::builder(outbox.clone(), s.url.clone(), probe).build()?;
        let stop = CancellationToken::new();
        let task = {
            let stop = stop.clone();
            tokio::spawn(async move { relay.run(stop).await })
        };
        // Let the relay connect before the clock starts.
        tokio::time::sleep(Duration::from_secs(1)).await;
        let mut committed: Vec<(Uuid, Instant)> = Vec::new();
        let mut tick = tokio::time::interval(Duration::from_millis(1));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
        let end = Instant::now() + Duration::from_secs(s.latency_seconds);
        let mut n = 0u64;
        while Instant::now() < end {
            tick.tick().await;
            let event = OrderPlaced::new(n, 1000, s.payload_bytes);
            n += 1;
            let mut tx = bench.pool.begin().await?;
            let id = outbox.enqueue(&mut *tx, &event).await?;
            tx.commit().await?;
            committed.push((id, Instant::now()));
        }
        let deadline = Instant::now() + Duration::from_secs(60);
        while confirmations.lock().expect("lock").len() < committed.len()
            && Instant::now() < deadline
        {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        stop.cancel();
        task.await??;
        let mut latencies: Vec<Duration> = {
            let confirmations = confirmations.lock().expect("lock");
            committed
                .iter()
                .filter_map(|(id, at)| {
                    confirmations
                        .get(id)
                        .map(|c| c.saturating_duration_since(*at))
                })
                .collect()
        };
        latencies.sort();
        writeln!(
            bench.report,
            "| {target} | {} of {} | {:.2} | {:.2} | {:.2} |",
            latencies.len(),
            committed.len(),
            percentile_ms(&latencies, 0.5),
            percentile_ms(&latencies, 0.99),
            latencies.last().map_or(0.0, |d| d.as_secs_f64() * 1e3)
        )?;
        bench.drop_outbox(&table).await;
    }
    println!("{}", bench.report);
    if let Some(dir) = &s.out {
        std::fs::create_dir_all(dir)?;
        std::fs::write(dir.join("results.md"), &bench.report)?;
    }
    Ok(())
}
