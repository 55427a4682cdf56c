//! The outbox on MySQL / MariaDB against the raw limits of the same server and broker, in the
//! same run.
//!
//! `cargo run --release -p outbox-bench --bin mysql_bench -- [--smoke] [--backlog N]
//! [--hot-backlog N] [--out DIR]`
//!
//! Raw limits: plain SQL claim-and-mark on a queue table (`SELECT … FOR UPDATE SKIP LOCKED`,
//! `UPDATE` by id, commit; 1 and 4 clients), a business transaction (`INSERT` + commit), and
//! JetStream publish with acknowledgements. The outbox: a business transaction with `enqueue`,
//! relays draining a backlog over 1,000 aggregates (1 and 4 relays) and over one aggregate, to
//! typed handlers and to NATS, and commit-to-confirmation latency under an open-loop load. Every
//! relay figure is a ratio against the raw limit it can reach at most: MariaDB's best claim rate
//! (of 1 and 4 clients) for handlers, the lower of that and NATS's publish rate for NATS.

use futures_util::future::BoxFuture;
use futures_util::stream::{FuturesUnordered, StreamExt};
use outbox::nats::NatsTransport;
use outbox::{DeliveryResult, Destination, Dispatcher, Envelope, Outbox, Registry, Relay};
use outbox_bench::{account, percentile_ms, sys, BoxError, OrderPlaced};
use sqlx::mysql::{MySqlPool, MySqlPoolOptions};
use sqlx::{MySql, QueryBuilder};
use std::collections::HashMap;
use std::fmt::Write as _;
use std::future::IntoFuture;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

const PAYLOAD_BYTES: usize = 256;
const AGGREGATES: usize = 1000;
/// Rows per raw claim statement, as in the PostgreSQL harness.
const RAW_BATCH: usize = 500;

struct Settings {
    url: String,
    nats_url: String,
    prefix: String,
    raw_events: usize,
    backlog: usize,
    hot_backlog: usize,
    writers: Vec<usize>,
    enqueue_duration: Duration,
    rate: u32,
    latency_duration: Duration,
    out: Option<std::path::PathBuf>,
}

impl Settings {
    fn parse() -> Result<Self, BoxError> {
        let env = |name: &str, default: &str| std::env::var(name).unwrap_or(default.to_owned());
        let args: Vec<String> = std::env::args().skip(1).collect();
        let smoke = args.iter().any(|a| a == "--smoke");
        let mut settings = Self {
            url: env("OUTBOX_BENCH_MYSQL_URL", "mysql://root@127.0.0.1:3306/test"),
            nats_url: env("OUTBOX_BENCH_NATS_URL", "nats://127.0.0.1:4222"),
            prefix: if smoke {
                format!("myobsmoke{:04x}", std::process::id() & 0xffff)
            } else {
                "myobench".to_owned()
            },
            raw_events: if smoke { 2_000 } else { 100_000 },
            backlog: if smoke { 2_000 } else { 100_000 },
            hot_backlog: if smoke { 500 } else { 50_000 },
            writers: if smoke { vec![1, 2] } else { vec![1, 8] },
            enqueue_duration: Duration::from_millis(if smoke { 300 } else { 10_000 }),
            rate: if smoke { 200 } else { 1000 },
            latency_duration: Duration::from_millis(if smoke { 500 } else { 15_000 }),
            out: None,
        };
        let mut it = args.iter();
        while let Some(flag) = it.next() {
            let mut number = || -> Result<usize, BoxError> {
                let v = it.next().ok_or(format!("{flag} needs a value"))?;
                Ok(v.parse().map_err(|e| format!("{flag}: {e}"))?)
            };
            match flag.as_str() {
                "--smoke" => {}
                "--backlog" => settings.backlog = number()?,
                "--hot-backlog" => settings.hot_backlog = number()?,
                "--out" => {
                    let dir = it.next().ok_or("--out needs a directory")?;
                    settings.out = Some(dir.into());
                }
                other => return Err(format!("unknown option {other}").into()),
            }
        }
        Ok(settings)
    }
}

/// CPU time of the database server and of this process since `started`.
struct Clock {
    started: Instant,
    server: Duration,
    own: Duration,
}

impl Clock {
    fn start() -> Self {
        Self {
            started: Instant::now(),
            server: sys::server_cpu("mariadbd") + sys::server_cpu("mysqld"),
            own: sys::own_cpu(),
        }
    }

    /// Seconds elapsed, and µs of server and own CPU per item.
    fn stop(&self, items: usize) -> (f64, f64, f64) {
        let elapsed = self.started.elapsed().as_secs_f64();
        let server = sys::server_cpu("mariadbd") + sys::server_cpu("mysqld") - self.server;
        let own = sys::own_cpu() - self.own;
        let per = |d: Duration| d.as_secs_f64() * 1e6 / items.max(1) as f64;
        (elapsed, per(server), per(own))
    }
}

/// One line of the report.
struct Line {
    section: &'static str,
    what: String,
    rate: f64,
    unit: &'static str,
    ratio: Option<(f64, &'static str)>,
    server_us: f64,
    own_us: f64,
    note: String,
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<(), BoxError> {
    let s = Settings::parse()?;
    let pool = MySqlPoolOptions::new()
        .max_connections(16)
        .connect(&s.url)
        .await?;
    let nats = async_nats::connect(&s.nats_url).await?;
    let version: String = sqlx::query_scalar("SELECT VERSION()")
        .fetch_one(&pool)
        .await?;
    eprintln!("[mysql-bench] {version}, {}", sys::machine());
    let mut lines = Vec::new();
    let result = measure(&s, &pool, &nats, &mut lines).await;
    cleanup(&s, &pool, &nats).await;
    result?;
    let report = render(&s, &version, &lines);
    println!("{report}");
    if let Some(dir) = &s.out {
        std::fs::create_dir_all(dir)?;
        std::fs::write(dir.join("mysql.md"), &report)?;
    }
    Ok(())
}

async fn measure(
    s: &Settings,
    pool: &MySqlPool,
    nats: &async_nats::Client,
    lines: &mut Vec<Line>,
) -> Result<(), BoxError> {
    let payload = serde_json::to_string(&OrderPlaced::new(0, 1, PAYLOAD_BYTES))?;
    let mut raw_claim = Vec::new();
    let mut raw_insert = 0.0f64;
    for clients in [1, 4] {
        let (rate, server_us, own_us, inserted) =
            raw_claim_rate(s, pool, &payload, clients).await?;
        raw_claim.push(rate);
        raw_insert = raw_insert.max(inserted);
        eprintln!("[mysql-bench] raw claim-and-mark, {clients} client(s): {rate:.0} rows/s");
        lines.push(Line {
            section: "Raw limits",
            what: format!(
                "MariaDB claim-and-mark, {clients} client(s), {RAW_BATCH} rows per claim"
            ),
            rate,
            unit: "rows/s",
            ratio: None,
            server_us,
            own_us,
            note: String::new(),
        });
    }
    eprintln!("[mysql-bench] raw multi-row INSERT: {raw_insert:.0} rows/s");
    lines.push(Line {
        section: "Raw limits",
        what: "MariaDB multi-row INSERT, 1,000 rows per statement".into(),
        rate: raw_insert,
        unit: "rows/s",
        ratio: None,
        server_us: 0.0,
        own_us: 0.0,
        note: String::new(),
    });
    let raw_nats = raw_nats_rate(s, nats, &payload).await?;
    eprintln!("[mysql-bench] raw NATS publish: {raw_nats:.0} msgs/s");
    lines.push(Line {
        section: "Raw limits",
        what: "NATS JetStream publish, 256 acks in flight".into(),
        rate: raw_nats,
        unit: "msgs/s",
        ratio: None,
        server_us: 0.0,
        own_us: 0.0,
        note: String::new(),
    });

    let outbox = Outbox::builder(pool.clone())
        .table(format!("{}_outbox", s.prefix))
        .build()?;
    outbox.migrate().await?;
    enqueue_overhead(s, pool, &outbox, lines).await?;

    // The fastest the server drained the queue table, whatever the client count: the ceiling.
    let db = raw_claim.iter().copied().fold(0.0, f64::max);
    let raw_for = |target: &str| -> (f64, &'static str) {
        if target == "NATS" && raw_nats < db {
            (raw_nats, "NATS publish")
        } else {
            (db, "MariaDB claim")
        }
    };
    for (section, backlog, aggregates, relay_counts) in [
        ("Relay throughput", s.backlog, AGGREGATES, &[1usize, 4][..]),
        ("Hot aggregate", s.hot_backlog, 1, &[1usize][..]),
    ] {
        for target in ["handlers", "NATS"] {
            for &relays in relay_counts {
                let drained =
                    drain(s, pool, nats, &outbox, target, backlog, aggregates, relays).await?;
                let (raw, limit) = raw_for(target);
                eprintln!(
                    "[mysql-bench] {target}, backlog {backlog} over {aggregates} aggregate(s), \
                     {relays} relay(s): {:.0} events/s ({:.0} % of {limit})",
                    drained.rate,
                    drained.rate / raw * 100.0
                );
                lines.push(Line {
                    section,
                    what: format!(
                        "{target}, backlog {backlog} over {aggregates} aggregate(s), {relays} relay(s)"
                    ),
                    rate: drained.rate,
                    unit: "events/s",
                    ratio: Some((drained.rate / raw, limit)),
                    server_us: drained.server_us,
                    own_us: drained.own_us,
                    note: format!(
                        "peak RSS {:.0} MB, {} duplicate(s), {} order violation(s); backlog \
                         written by enqueue_batch at {:.0} events/s ({:.0} % of raw INSERT)",
                        drained.peak_rss_mb,
                        drained.duplicates,
                        drained.order_violations,
                        drained.filled,
                        drained.filled / raw_insert * 100.0
                    ),
                });
            }
        }
    }
    for target in ["handlers", "NATS"] {
        let (p50, p99) = latency(s, pool, nats, &outbox, target).await?;
        eprintln!(
            "[mysql-bench] latency to {target} at {} ev/s: p50 {p50:.1} ms, p99 {p99:.1} ms",
            s.rate
        );
        lines.push(Line {
            section: "Latency, commit → confirmation",
            what: format!(
                "{target}, {} events/s offered, one relay, polling every 10 ms",
                s.rate
            ),
            rate: p50,
            unit: "ms p50",
            ratio: None,
            server_us: 0.0,
            own_us: 0.0,
            note: format!("p99 {p99:.1} ms"),
        });
    }
    Ok(())
}

/// Plain SQL claim-and-mark of a queue table with `clients` concurrent clients: rows/s, server
/// and own CPU per row, and the rows/s of filling the table (multi-row `INSERT`s of 1,000 rows,
/// one client, autocommit).
async fn raw_claim_rate(
    s: &Settings,
    pool: &MySqlPool,
    payload: &str,
    clients: usize,
) -> Result<(f64, f64, f64, f64), BoxError> {
    let t = format!("{}_raw", s.prefix);
    sqlx::query(&format!(
        "CREATE TABLE IF NOT EXISTS `{t}` (
    id BIGINT NOT NULL AUTO_INCREMENT PRIMARY KEY,
    aggregate_id VARCHAR(64) NOT NULL,
    payload LONGTEXT NOT NULL,
    status TINYINT NOT NULL DEFAULT 0,
    delivered_at DATETIME(6),
    KEY `{t}_pending` (status, id)
) ENGINE = InnoDB"
    ))
    .execute(pool)
    .await?;
    sqlx::query(&format!("TRUNCATE `{t}`"))
        .execute(pool)
        .await?;
    let filling = Instant::now();
    for start in (0..s.raw_events).step_by(1000) {
        let mut insert =
            QueryBuilder::<MySql>::new(format!("INSERT INTO `{t}` (aggregate_id, payload) "));
        insert.push_values(start..(start + 1000).min(s.raw_events), |mut row, i| {
            row.push_bind(account(i % AGGREGATES)).push_bind(payload);
        });
        insert.build().execute(pool).await?;
    }
    let inserted = s.raw_events as f64 / filling.elapsed().as_secs_f64();
    let clock = Clock::start();
    let mut tasks = JoinSet::new();
    for _ in 0..clients {
        let (pool, t) = (pool.clone(), t.clone());
        tasks.spawn(async move {
            let mut rows = 0usize;
            loop {
                let mut conn = pool.acquire().await?;
                sqlx::query("SET TRANSACTION ISOLATION LEVEL READ COMMITTED")
                    .execute(&mut *conn)
                    .await?;
                let mut tx = sqlx::Transaction::begin(conn, None).await?;
                let batch: Vec<(i64, String, String)> = sqlx::query_as(&format!(
                    "SELECT id, aggregate_id, payload FROM `{t}` WHERE status = 0 ORDER BY id \
                     LIMIT {RAW_BATCH} FOR UPDATE SKIP LOCKED"
                ))
                .fetch_all(&mut *tx)
                .await?;
                if batch.is_empty() {
                    return Ok::<_, sqlx::Error>(rows);
                }
                let mut mark = QueryBuilder::<MySql>::new(format!(
                    "UPDATE `{t}` SET status = 1, delivered_at = UTC_TIMESTAMP(6) WHERE id IN ("
                ));
                let mut ids = mark.separated(", ");
                for (id, _, _) in &batch {
                    ids.push_bind(*id);
                }
                mark.push(")");
                mark.build().execute(&mut *tx).await?;
                tx.commit().await?;
                rows += batch.len();
            }
        });
    }
    let mut rows = 0;
    while let Some(done) = tasks.join_next().await {
        rows += done??;
    }
    let (seconds, server_us, own_us) = clock.stop(rows);
    if rows != s.raw_events {
        return Err(format!("raw claim drained {rows} of {} rows", s.raw_events).into());
    }
    Ok((rows as f64 / seconds, server_us, own_us, inserted))
}

fn stream_name(s: &Settings, suffix: &str) -> String {
    format!("{}_{suffix}", s.prefix.to_uppercase())
}

/// The stream capturing `<prefix>.<token>.>`, created or emptied.
async fn empty_stream(
    s: &Settings,
    nats: &async_nats::Client,
    suffix: &str,
    token: &str,
) -> Result<async_nats::jetstream::Context, BoxError> {
    let js = async_nats::jetstream::new(nats.clone());
    let stream = outbox::nats::ensure_stream(
        &js,
        &stream_name(s, suffix),
        vec![format!("{}.{token}.>", s.prefix)],
    )
    .await?;
    stream.purge().await?;
    Ok(js)
}

async fn raw_nats_rate(
    s: &Settings,
    nats: &async_nats::Client,
    payload: &str,
) -> Result<f64, BoxError> {
    let js = empty_stream(s, nats, "RAW", "raw").await?;
    let subject = format!("{}.raw.order_placed", s.prefix);
    let payload = bytes::Bytes::copy_from_slice(payload.as_bytes());
    let mut acks = FuturesUnordered::new();
    let started = Instant::now();
    for _ in 0..s.raw_events {
        if acks.len() >= 256 {
            acks.next().await.expect("not empty")?;
        }
        acks.push(
            js.publish(subject.clone(), payload.clone())
                .await?
                .into_future(),
        );
    }
    while let Some(ack) = acks.next().await {
        ack?;
    }
    Ok(s.raw_events as f64 / started.elapsed().as_secs_f64())
}

/// A business transaction (one `INSERT` + commit) with and without `enqueue`, per writer count,
/// the two modes alternating in two rounds.
async fn enqueue_overhead(
    s: &Settings,
    pool: &MySqlPool,
    outbox: &Outbox<MySql>,
    lines: &mut Vec<Line>,
) -> Result<(), BoxError> {
    let orders = format!("{}_orders", s.prefix);
    sqlx::query(&format!(
        "CREATE TABLE IF NOT EXISTS `{orders}` (
    id BINARY(16) NOT NULL PRIMARY KEY,
    account VARCHAR(64) NOT NULL,
    amount_cents BIGINT NOT NULL,
    created_at DATETIME(6) NOT NULL DEFAULT CURRENT_TIMESTAMP(6)
) ENGINE = InnoDB"
    ))
    .execute(pool)
    .await?;
    let insert = Arc::new(format!(
        "INSERT INTO `{orders}` (id, account, amount_cents) VALUES (?, ?, ?)"
    ));
    for &writers in &s.writers {
        let mut counts = [0usize; 2];
        let mut elapsed = [Duration::ZERO; 2];
        let mut latencies: [Vec<Duration>; 2] = [Vec::new(), Vec::new()];
        for _round in 0..2 {
            for (m, with_outbox) in [false, true].into_iter().enumerate() {
                let started = Instant::now();
                let deadline = started + s.enqueue_duration / 2;
                let mut tasks = JoinSet::new();
                for w in 0..writers {
                    let (pool, insert) = (pool.clone(), insert.clone());
                    let outbox = with_outbox.then(|| outbox.clone());
                    tasks.spawn(async move {
                        let mut samples = Vec::new();
                        let mut n = w as u64;
                        while Instant::now() < deadline {
                            let event = OrderPlaced::new(n, AGGREGATES, PAYLOAD_BYTES);
                            n += 7919;
                            let t0 = Instant::now();
                            let mut tx = pool.begin().await?;
                            sqlx::query(&insert)
                                .bind(Uuid::now_v7())
                                .bind(&event.account)
                                .bind((n % 100_000) as i64)
                                .execute(&mut *tx)
                                .await?;
                            if let Some(outbox) = &outbox {
                                outbox.enqueue(&mut *tx, &event).await?;
                            }
                            tx.commit().await?;
                            samples.push(t0.elapsed());
                        }
                        Ok::<_, BoxError>(samples)
                    });
                }
                while let Some(done) = tasks.join_next().await {
                    let samples = done??;
                    counts[m] += samples.len();
                    latencies[m].extend(samples);
                }
                elapsed[m] += started.elapsed();
            }
        }
        let plain = counts[0] as f64 / elapsed[0].as_secs_f64();
        for (m, name) in ["INSERT + commit", "INSERT + enqueue + commit"]
            .into_iter()
            .enumerate()
        {
            let rate = counts[m] as f64 / elapsed[m].as_secs_f64();
            latencies[m].sort();
            eprintln!("[mysql-bench] {writers} writer(s), {name}: {rate:.0} tx/s");
            lines.push(Line {
                section: "Enqueue overhead",
                what: format!("{writers} writer(s), {name}"),
                rate,
                unit: "tx/s",
                ratio: (m == 1).then_some((rate / plain, "INSERT + commit")),
                server_us: 0.0,
                own_us: 0.0,
                note: format!(
                    "p50 {:.2} ms, p99 {:.2} ms",
                    percentile_ms(&latencies[m], 0.5),
                    percentile_ms(&latencies[m], 0.99)
                ),
            });
        }
    }
    sqlx::query(&format!("DROP TABLE IF EXISTS `{orders}`"))
        .execute(pool)
        .await?;
    Ok(())
}

/// Event ids and when the destination confirmed them.
type Confirmations = Arc<Mutex<Vec<(Uuid, Instant)>>>;

/// Counts what the destination confirmed, and when (latency runs).
struct Probe<D> {
    inner: D,
    delivered: Arc<AtomicU64>,
    confirmed: Option<Confirmations>,
}

impl<D: Destination> Destination for Probe<D> {
    async fn deliver(&self, batch: &[Envelope]) -> Vec<DeliveryResult> {
        let results = self.inner.deliver(batch).await;
        let at = Instant::now();
        let ok = results.iter().filter(|r| r.is_ok()).count();
        self.delivered.fetch_add(ok as u64, Ordering::Relaxed);
        if let Some(confirmed) = &self.confirmed {
            let mut confirmed = confirmed.lock().expect("probe lock");
            for (envelope, result) in batch.iter().zip(&results) {
                if result.is_ok() {
                    confirmed.push((envelope.id, at));
                }
            }
        }
        results
    }

    fn delivery_timeout(&self) -> Option<Duration> {
        self.inner.delivery_timeout()
    }

    fn validate(&self) -> outbox::Result<()> {
        self.inner.validate()
    }
}

/// A relay over `destination`, not started yet: started by polling the future.
fn relay<D: Destination>(
    outbox: Outbox<MySql>,
    destination: D,
    batch: usize,
    workers: usize,
    shutdown: CancellationToken,
) -> Result<BoxFuture<'static, outbox::Result<()>>, BoxError> {
    let relay = Relay::builder(outbox, destination)
        .batch_size(batch)
        .run_length(500)
        .max_batch_events(5000)
        .workers(workers)
        .poll_interval(Duration::from_millis(10))
        .build()?;
    Ok(Box::pin(async move { relay.run(shutdown).await }))
}

/// Typed handlers checking each aggregate's sequence: the proof of order, once each.
fn handlers(aggregates: usize, violations: Arc<AtomicU64>) -> Result<Dispatcher, BoxError> {
    let last: Arc<Vec<AtomicI64>> = Arc::new((0..aggregates).map(|_| AtomicI64::new(0)).collect());
    let registry = Registry::builder()
        .handler::<OrderPlaced, _, _>("bench", move |event, ctx| {
            let (last, violations) = (last.clone(), violations.clone());
            async move {
                let i: usize = event.account["acct-".len()..].parse().unwrap_or(0);
                if let Some(last) = last.get(i) {
                    if last.swap(ctx.sequence(), Ordering::SeqCst) >= ctx.sequence() {
                        violations.fetch_add(1, Ordering::SeqCst);
                    }
                }
                Ok(())
            }
        })?
        .build();
    Ok(Dispatcher::new(registry))
}

async fn reset(outbox: &Outbox<MySql>, pool: &MySqlPool) -> Result<(), BoxError> {
    let t = outbox.table().as_str();
    for suffix in ["", "_aggregates", "_cursors", "_new", "_keys", "_archive"] {
        sqlx::query(&format!("TRUNCATE `{t}{suffix}`"))
            .execute(pool)
            .await?;
    }
    Ok(())
}

async fn pending(outbox: &Outbox<MySql>, pool: &MySqlPool) -> Result<i64, BoxError> {
    Ok(sqlx::query_scalar(&format!(
        "SELECT count(*) FROM `{}` WHERE status = 'pending'",
        outbox.table()
    ))
    .fetch_one(pool)
    .await?)
}

struct Drained {
    /// Events/s written by `enqueue_batch`, 5,000 per transaction, before the drain.
    filled: f64,
    rate: f64,
    server_us: f64,
    own_us: f64,
    peak_rss_mb: f64,
    duplicates: u64,
    order_violations: u64,
}

/// Enqueues `backlog` events over `aggregates` aggregates, then drains them with `relays`
/// relays (each its own pool and destination, as separate processes would).
#[allow(clippy::too_many_arguments)]
async fn drain(
    s: &Settings,
    pool: &MySqlPool,
    nats: &async_nats::Client,
    outbox: &Outbox<MySql>,
    target: &str,
    backlog: usize,
    aggregates: usize,
    relays: usize,
) -> Result<Drained, BoxError> {
    reset(outbox, pool).await?;
    let filling = Instant::now();
    for start in (0..backlog).step_by(5000) {
        let events: Vec<OrderPlaced> = (start..(start + 5000).min(backlog))
            .map(|i| OrderPlaced::new(i as u64, aggregates, PAYLOAD_BYTES))
            .collect();
        let mut tx = pool.begin().await?;
        outbox.enqueue_batch(&mut *tx, &events).await?;
        tx.commit().await?;
    }
    let filled = backlog as f64 / filling.elapsed().as_secs_f64();
    let delivered = Arc::new(AtomicU64::new(0));
    let violations = Arc::new(AtomicU64::new(0));
    let workers = (2 / relays).max(1);
    let batch = (aggregates / (relays * workers)).clamp(1, 1000);
    let shutdown = CancellationToken::new();
    let mut tasks = JoinSet::new();
    let js = empty_stream(s, nats, "OUTBOX", "bench").await?;
    let mut built = Vec::new();
    for _ in 0..relays {
        let relay_pool = MySqlPoolOptions::new()
            .max_connections(workers as u32 + 2)
            .connect(&s.url)
            .await?;
        let outbox = Outbox::builder(relay_pool)
            .table(outbox.table().as_str())
            .build()?;
        let shutdown = shutdown.clone();
        built.push(if target == "NATS" {
            let probe = Probe {
                inner: NatsTransport::new(js.clone()).subject_prefix(&s.prefix),
                delivered: delivered.clone(),
                confirmed: None,
            };
            relay(outbox, probe, batch, workers, shutdown)?
        } else {
            let probe = Probe {
                inner: handlers(aggregates, violations.clone())?,
                delivered: delivered.clone(),
                confirmed: None,
            };
            relay(outbox, probe, batch, workers, shutdown)?
        });
    }
    sys::reset_peak_rss();
    let clock = Clock::start();
    for relay in built {
        tasks.spawn(relay);
    }
    let deadline = Instant::now() + Duration::from_secs(60 + backlog as u64 / 500);
    let result = async {
        loop {
            if delivered.load(Ordering::Relaxed) >= backlog as u64
                && pending(outbox, pool).await? == 0
            {
                return Ok::<_, BoxError>(());
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "the relays did not drain the backlog in time: {} of {backlog}",
                    delivered.load(Ordering::Relaxed)
                )
                .into());
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
    .await;
    let (seconds, server_us, own_us) = clock.stop(backlog);
    let peak_rss_mb = sys::peak_rss() as f64 / 1e6;
    shutdown.cancel();
    while let Some(ended) = tasks.join_next().await {
        ended??;
    }
    result?;
    Ok(Drained {
        filled,
        rate: backlog as f64 / seconds,
        server_us,
        own_us,
        peak_rss_mb,
        duplicates: delivered
            .load(Ordering::Relaxed)
            .saturating_sub(backlog as u64),
        order_violations: violations.load(Ordering::SeqCst),
    })
}

/// Commit-to-confirmation latency at `s.rate` events/s offered (open loop, one event per
/// transaction) with one relay: p50 and p99 in ms.
async fn latency(
    s: &Settings,
    pool: &MySqlPool,
    nats: &async_nats::Client,
    outbox: &Outbox<MySql>,
    target: &str,
) -> Result<(f64, f64), BoxError> {
    reset(outbox, pool).await?;
    let confirmed = Arc::new(Mutex::new(Vec::new()));
    let delivered = Arc::new(AtomicU64::new(0));
    let js = empty_stream(s, nats, "OUTBOX", "bench").await?;
    let shutdown = CancellationToken::new();
    let running = if target == "NATS" {
        let probe = Probe {
            inner: NatsTransport::new(js).subject_prefix(&s.prefix),
            delivered: delivered.clone(),
            confirmed: Some(confirmed.clone()),
        };
        relay(outbox.clone(), probe, AGGREGATES, 2, shutdown.clone())?
    } else {
        let probe = Probe {
            inner: handlers(AGGREGATES, Arc::new(AtomicU64::new(0)))?,
            delivered: delivered.clone(),
            confirmed: Some(confirmed.clone()),
        };
        relay(outbox.clone(), probe, AGGREGATES, 2, shutdown.clone())?
    };
    let task = tokio::spawn(running);
    let committed = Arc::new(Mutex::new(HashMap::new()));
    let interval = Duration::from_secs_f64(1.0 / f64::from(s.rate));
    let total = (s.latency_duration.as_secs_f64() * f64::from(s.rate)) as usize;
    let started = Instant::now();
    let mut writers = JoinSet::new();
    for n in 0..total {
        let due = started + interval * n as u32;
        tokio::time::sleep_until(due.into()).await;
        let (pool, outbox, committed) = (pool.clone(), outbox.clone(), committed.clone());
        writers.spawn(async move {
            let event = OrderPlaced::new(n as u64, AGGREGATES, PAYLOAD_BYTES);
            let mut tx = pool.begin().await?;
            let id = outbox.enqueue(&mut *tx, &event).await?;
            tx.commit().await?;
            committed.lock().expect("lock").insert(id, Instant::now());
            Ok::<_, BoxError>(())
        });
        while let Some(done) = writers.try_join_next() {
            done??;
        }
    }
    while let Some(done) = writers.join_next().await {
        done??;
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    while delivered.load(Ordering::Relaxed) < total as u64 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    shutdown.cancel();
    task.await??;
    let committed = committed.lock().expect("lock");
    let mut samples: Vec<Duration> = confirmed
        .lock()
        .expect("lock")
        .iter()
        .filter_map(|(id, at)| Some(at.saturating_duration_since(*committed.get(id)?)))
        .collect();
    if samples.len() < total {
        return Err(format!("{} of {total} events confirmed", samples.len()).into());
    }
    samples.sort();
    Ok((percentile_ms(&samples, 0.5), percentile_ms(&samples, 0.99)))
}

async fn cleanup(s: &Settings, pool: &MySqlPool, nats: &async_nats::Client) {
    let t = format!("{}_outbox", s.prefix);
    for table in [
        format!("{}_raw", s.prefix),
        format!("{}_orders", s.prefix),
        t.clone(),
        format!("{t}_aggregates"),
        format!("{t}_cursors"),
        format!("{t}_new"),
        format!("{t}_keys"),
        format!("{t}_archive"),
        format!("{t}_migrations"),
    ] {
        let _ = sqlx::query(&format!("DROP TABLE IF EXISTS `{table}`"))
            .execute(pool)
            .await;
    }
    let js = async_nats::jetstream::new(nats.clone());
    for suffix in ["RAW", "OUTBOX"] {
        let _ = js.delete_stream(stream_name(s, suffix)).await;
    }
}

fn render(s: &Settings, version: &str, lines: &[Line]) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "MariaDB/MySQL run: {version}; {}; payload {PAYLOAD_BYTES} B; raw {} rows, backlog {}, \
         hot backlog {}.\n",
        sys::machine(),
        s.raw_events,
        s.backlog,
        s.hot_backlog
    );
    let mut section = "";
    for line in lines {
        if line.section != section {
            section = line.section;
            let _ = writeln!(
                out,
                "\n**{section}**\n\n| run | rate | ratio | server CPU µs/item | own CPU µs/item | notes |\n|---|---:|---:|---:|---:|---|"
            );
        }
        let ratio = line
            .ratio
            .map_or_else(String::new, |(r, of)| format!("{:.0} % of {of}", r * 100.0));
        let cpu = |us: f64| {
            if us > 0.0 {
                format!("{us:.0}")
            } else {
                String::new()
            }
        };
        let _ = writeln!(
            out,
            "| {} | {:.0} {} | {ratio} | {} | {} | {} |",
            line.what,
            line.rate,
            line.unit,
            cpu(line.server_us),
            cpu(line.own_us),
            line.note
        );
    }
    out
}
