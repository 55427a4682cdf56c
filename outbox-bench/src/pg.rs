//! The servers, PostgreSQL's raw claim-and-mark limit, the enqueue overhead, and the backlog
//! set-up shared by the relay runs.

use crate::report::{EnqueueFigure, RawPg};
use crate::{sys, BoxError, Config, OrderPlaced};
use outbox::{Outbox, TableLayout};
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};
use sqlx::{ConnectOptions, Postgres};
use std::str::FromStr;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::task::JoinSet;
use uuid::Uuid;

/// Connections to every server of the run.
pub struct Servers {
    pub pool: PgPool,
    pub options: PgConnectOptions,
    pub nats: async_nats::Client,
    pub amqp: lapin::Connection,
    /// The outbox table the relay runs use.
    pub table: String,
    /// Its layout.
    pub layout: TableLayout,
}

impl Servers {
    pub async fn connect(config: &Config) -> Result<Self, BoxError> {
        let options = PgConnectOptions::from_str(&config.database_url)?.disable_statement_logging();
        create_database(&options).await?;
        let pool = PgPoolOptions::new()
            .max_connections(16)
            .connect_with(options.clone())
            .await?;
        let nats = async_nats::connect(&config.nats_url).await?;
        let amqp =
            lapin::Connection::connect(&config.amqp_url, lapin::ConnectionProperties::default())
                .await?;
        // A table per layout: a plain table cannot become partitioned.
        let (table, layout) = if config.partitioned {
            (
                format!("{}_poutbox", config.prefix),
                TableLayout::partitioned(Duration::from_secs(3600), 4),
            )
        } else {
            (format!("{}_outbox", config.prefix), TableLayout::Standard)
        };
        let servers = Self {
            pool,
            options,
            nats,
            amqp,
            table,
            layout,
        };
        servers.outbox(true)?.migrate().await?;
        Ok(servers)
    }

    /// An outbox on the run's table, over the shared pool.
    pub fn outbox(&self, notify: bool) -> Result<Outbox<Postgres>, BoxError> {
        self.outbox_on(self.pool.clone(), notify)
    }

    /// An outbox on the run's table, over `pool`.
    pub fn outbox_on(&self, pool: PgPool, notify: bool) -> Result<Outbox<Postgres>, BoxError> {
        Ok(Outbox::builder(pool)
            .table(&self.table)
            .notify(notify)
            .layout(self.layout)
            .build()?)
    }

    /// A pool of `n` connections of its own (one per relay, as separate processes would have).
    pub async fn pool(&self, n: u32) -> Result<PgPool, BoxError> {
        Ok(PgPoolOptions::new()
            .max_connections(n)
            .min_connections(n)
            .connect_with(self.options.clone())
            .await?)
    }

    pub async fn versions(&self) -> Vec<(String, String)> {
        let pg: String = sqlx::query_scalar("SHOW server_version")
            .fetch_one(&self.pool)
            .await
            .unwrap_or_else(|e| e.to_string());
        let nats = self.nats.server_info().version;
        // lapin does not expose the server's properties: ask the package manager.
        let amqp = std::process::Command::new("dpkg-query")
            .args(["-W", "-f=${Version}", "rabbitmq-server"])
            .output()
            .ok()
            .filter(|o| o.status.success())
            .and_then(|o| String::from_utf8(o.stdout).ok())
            .unwrap_or_else(|| "unknown".into());
        // The Kafka protocol carries no server version; scripts/services.sh installs tansu.
        let tools = std::env::var("OUTBOX_TOOLS").unwrap_or_else(|_| "/opt/outbox-tools".into());
        let kafka = std::fs::read_dir(tools)
            .ok()
            .and_then(|entries| {
                entries
                    .flatten()
                    .filter_map(|e| e.file_name().to_str().map(str::to_owned))
                    .filter(|name| name.starts_with("tansu-"))
                    .max()
            })
            .map_or_else(|| "unknown".into(), |name| name.replacen('-', " ", 1));
        vec![
            ("PostgreSQL".into(), pg),
            ("NATS".into(), nats),
            ("RabbitMQ".into(), amqp),
            ("Kafka protocol".into(), kafka),
        ]
    }

    /// Dead and live tuples and total bytes of the outbox's tables, exact through
    /// `pgstattuple` where the extension can be created, else from the statistics.
    pub async fn bloat(&self) -> Result<crate::report::Bloat, BoxError> {
        let exact = sqlx::query("CREATE EXTENSION IF NOT EXISTS pgstattuple")
            .execute(&self.pool)
            .await
            .is_ok();
        let mut tables = Vec::new();
        for suffix in ["", "_cursors", "_new", "_aggregates"] {
            let t = format!("{}{suffix}", self.table);
            // A partitioned table has no storage: its partitions, summed.
            let parts: Vec<String> = sqlx::query_scalar(
                "SELECT c.relname::text FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
                 WHERE i.inhparent = to_regclass(quote_ident($1))
                 UNION ALL SELECT $1 WHERE NOT EXISTS
                     (SELECT 1 FROM pg_inherits WHERE inhparent = to_regclass(quote_ident($1)))",
            )
            .bind(&t)
            .fetch_all(&self.pool)
            .await?;
            let (mut dead, mut live, mut bytes) = (0i64, 0i64, 0i64);
            for part in parts {
                let (d, l): (i64, i64) = if exact {
                    sqlx::query_as(
                        "SELECT dead_tuple_count, tuple_count FROM pgstattuple(quote_ident($1))",
                    )
                } else {
                    sqlx::query_as(
                        "SELECT n_dead_tup, n_live_tup FROM pg_stat_user_tables WHERE relname = $1",
                    )
                }
                .bind(&part)
                .fetch_one(&self.pool)
                .await?;
                let b: i64 = sqlx::query_scalar("SELECT pg_total_relation_size(quote_ident($1))")
                    .bind(&part)
                    .fetch_one(&self.pool)
                    .await?;
                (dead, live, bytes) = (dead + d, live + l, bytes + b);
            }
            tables.push((t, dead as u64, live as u64, bytes as u64));
        }
        Ok(crate::report::Bloat { tables })
    }

    /// Empties the outbox table and its counters, then checkpoints so every run starts with the
    /// same WAL state.
    pub async fn reset_outbox(&self) -> Result<(), BoxError> {
        let t = &self.table;
        sqlx::query(&format!(
            r#"TRUNCATE "{t}", "{t}_aggregates", "{t}_cursors", "{t}_new", "{t}_archive""#
        ))
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Enqueues `n` events over `aggregates` aggregates, in transactions of 5,000 through
    /// `enqueue_batch`, then vacuums, analyses and checkpoints.
    pub async fn fill_backlog(&self, config: &Config, n: usize) -> Result<(), BoxError> {
        let outbox = self.outbox(false)?;
        let started = Instant::now();
        for start in (0..n).step_by(5000) {
            let events: Vec<OrderPlaced> = (start..(start + 5000).min(n))
                .map(|i| OrderPlaced::new(i as u64, config.aggregates, config.payload_bytes))
                .collect();
            let mut tx = self.pool.begin().await?;
            outbox.enqueue_batch(&mut *tx, &events).await?;
            tx.commit().await?;
        }
        let filled = started.elapsed();
        self.settle().await?;
        eprintln!(
            "[bench]   backlog of {n} enqueued in {:.1} s ({:.0} events/s through enqueue_batch)",
            filled.as_secs_f64(),
            n as f64 / filled.as_secs_f64()
        );
        Ok(())
    }

    /// VACUUM ANALYZE and CHECKPOINT: every measurement starts from the same state.
    pub async fn settle(&self) -> Result<(), BoxError> {
        let t = &self.table;
        for sql in [
            format!(r#"VACUUM ANALYZE "{t}""#),
            format!(r#"VACUUM ANALYZE "{t}_aggregates""#),
            format!(r#"VACUUM ANALYZE "{t}_cursors""#),
            format!(r#"VACUUM ANALYZE "{t}_new""#),
            "CHECKPOINT".to_owned(),
        ] {
            sqlx::query(&sql).execute(&self.pool).await?;
        }
        Ok(())
    }

    /// Events still pending (the pending partial index only: cheap once drained).
    pub async fn pending(&self) -> Result<i64, BoxError> {
        let t = &self.table;
        Ok(sqlx::query_scalar(&format!(
            r#"SELECT count(*) FROM "{t}" WHERE status = 'pending'"#
        ))
        .fetch_one(&self.pool)
        .await?)
    }

    pub async fn readings(&self) -> Result<Readings, BoxError> {
        let wal: String = sqlx::query_scalar("SELECT pg_current_wal_lsn()::text")
            .fetch_one(&self.pool)
            .await?;
        Ok(Readings {
            at: Instant::now(),
            pg_cpu: sys::postgres_cpu(),
            own_cpu: sys::own_cpu(),
            wal,
        })
    }

    /// What happened since `before`.
    pub async fn since(&self, before: &Readings) -> Result<Usage, BoxError> {
        let elapsed = before.at.elapsed();
        let wal_bytes: f64 =
            sqlx::query_scalar("SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), $1::pg_lsn)::float8")
                .bind(&before.wal)
                .fetch_one(&self.pool)
                .await?;
        Ok(Usage {
            elapsed,
            pg_cpu: sys::postgres_cpu().saturating_sub(before.pg_cpu),
            own_cpu: sys::own_cpu().saturating_sub(before.own_cpu),
            wal_bytes,
        })
    }

    /// Drops what the run created (the smoke run's clean-up).
    pub async fn cleanup(&self, config: &Config) {
        let p = &config.prefix;
        for t in [self.table.clone(), self.debezium_table()] {
            let drop = format!(
                r#"DROP TABLE IF EXISTS "{t}", "{t}_aggregates", "{t}_cursors", "{t}_new", "{t}_archive", "{t}_migrations", "{t}_keys", "{p}_raw", "{p}_orders";
DROP FUNCTION IF EXISTS "{t}_debezium"()"#
            );
            if let Err(error) = sqlx::raw_sql(&drop).execute(&self.pool).await {
                eprintln!("[bench] clean-up: {error}");
            }
        }
        crate::brokers::cleanup(self, config).await;
    }
}

/// Creates the benchmark database if it does not exist yet.
async fn create_database(options: &PgConnectOptions) -> Result<(), BoxError> {
    let Some(name) = options.get_database().map(str::to_owned) else {
        return Ok(());
    };
    if options.clone().connect().await.is_ok() {
        return Ok(());
    }
    let mut admin = options.clone().database("postgres").connect().await?;
    let exists: bool =
        sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_database WHERE datname = $1)")
            .bind(&name)
            .fetch_one(&mut admin)
            .await?;
    if !exists {
        let quoted = name.replace('"', "\"\"");
        sqlx::query(&format!(r#"CREATE DATABASE "{quoted}""#))
            .execute(&mut admin)
            .await?;
    }
    Ok(())
}

/// Server and process counters at one instant.
pub struct Readings {
    at: Instant,
    pg_cpu: Duration,
    own_cpu: Duration,
    wal: String,
}

/// Counters between two instants.
#[derive(Debug, Clone, Copy)]
pub struct Usage {
    pub elapsed: Duration,
    pub pg_cpu: Duration,
    pub own_cpu: Duration,
    pub wal_bytes: f64,
}

impl Usage {
    pub fn per_event_us(d: Duration, events: usize) -> f64 {
        d.as_secs_f64() * 1e6 / events.max(1) as f64
    }
}

/// The claim-and-mark statements of the raw limit: the best plain SQL for draining a queue
/// table, one statement per batch, with a partial index on the pending rows.
const RAW_STATEMENTS: [(&str, &str); 2] = [
    (
        "UPDATE … SKIP LOCKED",
        r#"WITH c AS (SELECT id FROM "{t}" WHERE status = 0 ORDER BY id LIMIT $1 FOR UPDATE SKIP LOCKED)
UPDATE "{t}" r SET status = 1, delivered_at = now() FROM c WHERE r.id = c.id
RETURNING r.id, r.aggregate_id, r.payload::text"#,
    ),
    (
        "DELETE … RETURNING",
        r#"WITH c AS (SELECT id FROM "{t}" WHERE status = 0 ORDER BY id LIMIT $1 FOR UPDATE SKIP LOCKED)
DELETE FROM "{t}" r USING c WHERE r.id = c.id
RETURNING r.id, r.aggregate_id, r.payload::text"#,
    ),
];

/// Rows per raw claim statement.
const RAW_BATCH: i64 = 500;

/// PostgreSQL's raw claim-and-mark rate, for each statement and each relay count (as
/// concurrent clients).
pub async fn raw_claim(servers: &Servers, config: &Config) -> Result<Vec<RawPg>, BoxError> {
    let t = format!("{}_raw", config.prefix);
    let pool = &servers.pool;
    sqlx::query(&format!(
        r#"CREATE TABLE IF NOT EXISTS "{t}" (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    aggregate_id text NOT NULL,
    payload jsonb NOT NULL,
    status smallint NOT NULL DEFAULT 0,
    delivered_at timestamptz
)"#
    ))
    .execute(pool)
    .await?;
    sqlx::query(&format!(
        r#"CREATE INDEX IF NOT EXISTS "{t}_pending" ON "{t}" (id) WHERE status = 0"#
    ))
    .execute(pool)
    .await?;
    let payload = serde_json::to_string(&OrderPlaced::new(0, 1, config.payload_bytes))?;
    let mut figures = Vec::new();
    for (name, statement) in RAW_STATEMENTS {
        let statement = Arc::new(statement.replace("{t}", &t));
        for &clients in &config.relays {
            sqlx::query(&format!(r#"TRUNCATE "{t}""#))
                .execute(pool)
                .await?;
            sqlx::query(&format!(
                r#"INSERT INTO "{t}" (aggregate_id, payload)
SELECT 'acct-' || lpad((g % $3)::text, 5, '0'), $1::jsonb FROM generate_series(1, $2) g"#
            ))
            .bind(&payload)
            .bind(config.raw_events as i64)
            .bind(config.aggregates as i64)
            .execute(pool)
            .await?;
            for sql in [format!(r#"VACUUM ANALYZE "{t}""#), "CHECKPOINT".into()] {
                sqlx::query(&sql).execute(pool).await?;
            }
            let client_pool = servers.pool(clients as u32).await?;
            let before = servers.readings().await?;
            let mut tasks = JoinSet::new();
            for _ in 0..clients {
                let (pool, statement) = (client_pool.clone(), statement.clone());
                tasks.spawn(async move {
                    let mut rows = 0usize;
                    loop {
                        let batch = sqlx::query(&statement)
                            .bind(RAW_BATCH)
                            .fetch_all(&pool)
                            .await?;
                        if batch.is_empty() {
                            return Ok::<_, sqlx::Error>(rows);
                        }
                        rows += batch.len();
                    }
                });
            }
            let mut rows = 0;
            while let Some(done) = tasks.join_next().await {
                rows += done??;
            }
            let usage = servers.since(&before).await?;
            client_pool.close().await;
            if rows != config.raw_events {
                return Err(
                    format!("raw claim drained {rows} of {} rows", config.raw_events).into(),
                );
            }
            let figure = RawPg {
                statement: name.to_owned(),
                clients,
                rows,
                rows_per_s: rows as f64 / usage.elapsed.as_secs_f64(),
                pg_cpu_us_per_row: Usage::per_event_us(usage.pg_cpu, rows),
                wal_bytes_per_row: usage.wal_bytes / rows as f64,
            };
            eprintln!(
                "[bench]   {name}, {clients} client(s): {:.0} rows/s",
                figure.rows_per_s
            );
            figures.push(figure);
        }
    }
    sqlx::query(&format!(r#"TRUNCATE "{t}""#))
        .execute(pool)
        .await?;
    Ok(figures)
}

/// How a business transaction is written in the enqueue-overhead runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    Plain,
    Enqueue {
        notify: bool,
    },
    /// The Debezium layout (`TableLayout::Debezium`), relayed by this library or handed off.
    Debezium {
        hand_off: bool,
    },
}

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Mode::Plain => "INSERT + commit",
            Mode::Enqueue { notify: true } => "INSERT + enqueue + commit",
            Mode::Enqueue { notify: false } => "INSERT + enqueue + commit, notify off",
            Mode::Debezium { hand_off: false } => "INSERT + enqueue + commit, Debezium layout",
            Mode::Debezium { hand_off: true } => "INSERT + enqueue + commit, Debezium hand-off",
        }
    }
}

impl Servers {
    /// The table of the Debezium-layout runs (beside the relay runs' table).
    fn debezium_table(&self) -> String {
        format!("{}_dbz", self.table)
    }

    /// An outbox in the Debezium layout over `pool`, migrated and empty.
    async fn debezium_outbox(
        &self,
        pool: PgPool,
        hand_off: bool,
    ) -> Result<Outbox<Postgres>, BoxError> {
        let outbox = Outbox::builder(pool)
            .table(self.debezium_table())
            .layout(TableLayout::Debezium)
            .hand_off(hand_off)
            .build()?;
        outbox.migrate().await?;
        let t = self.debezium_table();
        sqlx::query(&format!(
            r#"TRUNCATE "{t}", "{t}_aggregates", "{t}_cursors", "{t}_new", "{t}_archive""#
        ))
        .execute(&self.pool)
        .await?;
        Ok(outbox)
    }
}

/// A business transaction (one INSERT + commit) with and without `enqueue`, for each writer
/// count. Modes alternate in two rounds so that drift on the machine hits them alike.
pub async fn enqueue_overhead(
    servers: &Servers,
    config: &Config,
) -> Result<Vec<EnqueueFigure>, BoxError> {
    let orders = format!("{}_orders", config.prefix);
    sqlx::query(&format!(
        r#"CREATE TABLE IF NOT EXISTS "{orders}" (
    id uuid PRIMARY KEY,
    account text NOT NULL,
    amount_cents bigint NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now()
)"#
    ))
    .execute(&servers.pool)
    .await?;
    let insert = Arc::new(format!(
        r#"INSERT INTO "{orders}" (id, account, amount_cents) VALUES ($1, $2, $3)"#
    ));
    let modes = [
        Mode::Plain,
        Mode::Enqueue { notify: true },
        Mode::Enqueue { notify: false },
        Mode::Debezium { hand_off: false },
        Mode::Debezium { hand_off: true },
    ];
    let mut figures = Vec::new();
    for &writers in &config.writers {
        servers.reset_outbox().await?;
        let pool = servers.pool(writers as u32).await?;
        let mut samples: Vec<Vec<Duration>> = vec![Vec::new(); modes.len()];
        let mut elapsed = vec![Duration::ZERO; modes.len()];
        for _round in 0..2 {
            for (m, &mode) in modes.iter().enumerate() {
                let outbox = match mode {
                    Mode::Plain => None,
                    Mode::Enqueue { notify } => Some(servers.outbox_on(pool.clone(), notify)?),
                    Mode::Debezium { hand_off } => {
                        Some(servers.debezium_outbox(pool.clone(), hand_off).await?)
                    }
                };
                let started = Instant::now();
                let deadline = started + config.enqueue_duration / 2;
                let mut tasks = JoinSet::new();
                for _ in 0..writers {
                    let (pool, insert, outbox) = (pool.clone(), insert.clone(), outbox.clone());
                    let aggregates = config.aggregates;
                    let bytes = config.payload_bytes;
                    tasks.spawn(async move {
                        let mut latencies = Vec::new();
                        while Instant::now() < deadline {
                            let n = random_u64();
                            let event = OrderPlaced::new(n, aggregates, bytes);
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
                            latencies.push(t0.elapsed());
                        }
                        Ok::<_, BoxError>(latencies)
                    });
                }
                while let Some(done) = tasks.join_next().await {
                    samples[m].extend(done??);
                }
                elapsed[m] += started.elapsed();
            }
        }
        pool.close().await;
        let plain_mean = mean_ms(&samples[0]);
        for (m, mode) in modes.iter().enumerate() {
            let mut s = std::mem::take(&mut samples[m]);
            s.sort();
            let mean = mean_ms(&s);
            let figure = EnqueueFigure {
                writers,
                mode: mode.name().to_owned(),
                transactions: s.len(),
                tx_per_s: s.len() as f64 / elapsed[m].as_secs_f64(),
                mean_ms: mean,
                p50_ms: percentile_ms(&s, 0.50),
                p99_ms: percentile_ms(&s, 0.99),
                overhead_ms: mean - plain_mean,
            };
            eprintln!(
                "[bench]   {writers} writer(s), {}: {:.3} ms mean, {:.0} tx/s",
                figure.mode, figure.mean_ms, figure.tx_per_s
            );
            figures.push(figure);
        }
    }
    sqlx::query(&format!(r#"TRUNCATE "{orders}""#))
        .execute(&servers.pool)
        .await?;
    servers.reset_outbox().await?;
    Ok(figures)
}

fn random_u64() -> u64 {
    // Random enough to spread writers over the aggregates; no dependency needed.
    Uuid::new_v4().as_u64_pair().0 >> 1
}

pub fn mean_ms(samples: &[Duration]) -> f64 {
    if samples.is_empty() {
        return 0.0;
    }
    samples.iter().map(Duration::as_secs_f64).sum::<f64>() * 1e3 / samples.len() as f64
}

/// The `q` quantile of sorted samples, in milliseconds.
pub fn percentile_ms(sorted: &[Duration], q: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() as f64 * q).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[i].as_secs_f64() * 1e3
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_pick_the_nearest_rank() {
        let s: Vec<Duration> = (1..=100).map(Duration::from_millis).collect();
        assert_eq!(percentile_ms(&s, 0.5), 50.0);
        assert_eq!(percentile_ms(&s, 0.99), 99.0);
        assert_eq!(percentile_ms(&s, 1.0), 100.0);
        assert_eq!(percentile_ms(&s[..1], 0.99), 1.0);
        assert_eq!(percentile_ms(&[], 0.5), 0.0);
    }

    #[test]
    fn events_have_the_configured_payload_size() {
        for n in [0, 7, 123_456_789] {
            let e = OrderPlaced::new(n, 1000, 256);
            assert_eq!(serde_json::to_string(&e).unwrap().len(), 256);
        }
    }
}
