//! The relay runs: throughput and memory while draining a backlog, and commit-to-confirmation
//! latency under an open-loop load.

use crate::pg::{percentile_ms, Servers, Usage};
use crate::report::{LatencyFigure, RelayFigure, Report, RetentionFigure};
use crate::{brokers, sys, BoxError, Config, OrderPlaced, Target};
use outbox::{DeliveryResult, Destination, Dispatcher, Envelope, Registry, Relay, Retention};
use std::collections::HashMap;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

/// Wraps the real destination and counts what it confirmed, and when.
struct Probe<D> {
    inner: D,
    state: Arc<ProbeState>,
}

#[derive(Default)]
struct ProbeState {
    delivered: AtomicU64,
    failed: AtomicU64,
    /// `(event id, confirmation instant)`, recorded only in latency runs.
    confirmations: Option<Mutex<Vec<(Uuid, Instant)>>>,
}

impl<D: Destination> Destination for Probe<D> {
    async fn deliver(&self, batch: &[Envelope]) -> Vec<DeliveryResult> {
        let results = self.inner.deliver(batch).await;
        let confirmed_at = Instant::now();
        let ok = results.iter().filter(|r| r.is_ok()).count();
        self.state.delivered.fetch_add(ok as u64, Ordering::Relaxed);
        self.state
            .failed
            .fetch_add((results.len() - ok) as u64, Ordering::Relaxed);
        if let Some(confirmations) = &self.state.confirmations {
            let mut confirmations = confirmations.lock().expect("probe lock");
            for (envelope, result) in batch.iter().zip(&results) {
                if result.is_ok() {
                    confirmations.push((envelope.id, confirmed_at));
                }
            }
        }
        results
    }

    fn delivery_timeout(&self) -> Option<std::time::Duration> {
        self.inner.delivery_timeout()
    }

    fn validate(&self) -> outbox::Result<()> {
        self.inner.validate()
    }
}

/// Sequence numbers seen per aggregate by the handler: the proof that handlers saw each
/// aggregate's events in order and once.
struct OrderCheck {
    last: Vec<AtomicI64>,
    violations: AtomicU64,
}

impl OrderCheck {
    fn new(aggregates: usize) -> Arc<Self> {
        Arc::new(Self {
            last: (0..aggregates).map(|_| AtomicI64::new(0)).collect(),
            violations: AtomicU64::new(0),
        })
    }
}

/// Typed handlers that deserialise each event and check its sequence.
fn dispatcher(check: Arc<OrderCheck>) -> Result<Dispatcher, BoxError> {
    let registry = Registry::builder()
        .handler::<OrderPlaced, _, _>("bench", move |event, ctx| {
            let check = check.clone();
            async move {
                let i: usize = event.account["acct-".len()..].parse().unwrap_or(0);
                if let Some(last) = check.last.get(i) {
                    if last.swap(ctx.sequence(), Ordering::SeqCst) >= ctx.sequence() {
                        check.violations.fetch_add(1, Ordering::SeqCst);
                    }
                }
                Ok(())
            }
        })?
        .build();
    Ok(Dispatcher::new(registry))
}

/// Every backlog, target and relay count of `config`.
pub async fn throughput(
    servers: &Servers,
    config: &Config,
    report: &Report,
) -> Result<Vec<RelayFigure>, BoxError> {
    let mut figures = Vec::new();
    for &backlog in &config.backlogs {
        for &target in &config.targets {
            for &relays in &config.relays {
                // With `--hold-open`, each drain twice, without and with the snapshot held, so
                // that the machine's drift hits both alike.
                for hold in [false, true] {
                    if hold && !config.hold_open {
                        continue;
                    }
                    let run = Drain {
                        servers,
                        config,
                        backlog,
                        relays,
                        hold,
                    };
                    figures.push(run.measure_target(target, report).await?);
                }
            }
        }
    }
    servers.reset_outbox().await?;
    Ok(figures)
}

/// The hot-aggregate runs: one relay drains a backlog spread over few aggregates, so its
/// speed is that of one aggregate's ordered run.
pub async fn hot_aggregates(
    servers: &Servers,
    config: &Config,
    report: &Report,
) -> Result<Vec<RelayFigure>, BoxError> {
    let mut figures = Vec::new();
    for &aggregates in &config.hot_aggregates {
        let config = Config {
            aggregates,
            ..config.clone()
        };
        for &target in &config.targets {
            let run = Drain {
                servers,
                config: &config,
                backlog: config.hot_backlog,
                relays: 1,
                hold: false,
            };
            figures.push(run.measure_target(target, report).await?);
        }
    }
    servers.reset_outbox().await?;
    Ok(figures)
}

struct Drain<'a> {
    servers: &'a Servers,
    config: &'a Config,
    backlog: usize,
    relays: usize,
    /// Hold a snapshot open elsewhere during the drain (`--hold-open`).
    hold: bool,
}

impl Drain<'_> {
    /// Drains into `target` and rates the figure against the raw limits of the same run.
    async fn measure_target(
        &self,
        target: Target,
        report: &Report,
    ) -> Result<RelayFigure, BoxError> {
        let (servers, config) = (self.servers, self.config);
        let mut figure = match target {
            Target::Handlers => {
                let check = OrderCheck::new(config.aggregates);
                let dispatcher = dispatcher(check.clone())?;
                let mut figure = self.measure(|| Ok(dispatcher.clone())).await?;
                figure.order_violations = Some(check.violations.load(Ordering::SeqCst));
                figure
            }
            Target::Nats => {
                let transport = brokers::nats_destination(servers, config).await?;
                self.measure(|| Ok(transport.clone())).await?
            }
            Target::Amqp => {
                let make = brokers::amqp_destination(servers, config).await?;
                self.measure(|| Ok(make())).await?
            }
            Target::Kafka => {
                let make = brokers::kafka_destination(config).await?;
                self.measure(make).await?
            }
        };
        figure.target = target;
        report.rate_relay(&mut figure);
        eprintln!(
            "[bench]   {} backlog {} over {} aggregates, {} relay(s): {:.0} events/s \
             ({:.0} % of the raw limit), PostgreSQL {:.0} µs CPU and {:.0} B WAL per \
             event, peak RSS {:.1} MB",
            target.name(),
            self.backlog,
            config.aggregates,
            self.relays,
            figure.events_per_s,
            figure.ratio * 100.0,
            figure.pg_cpu_us_per_event,
            figure.wal_bytes_per_event,
            figure.peak_rss_mb
        );
        if let Some(bloat) = &figure.bloat {
            let held = if figure.held_open {
                "held open"
            } else {
                "nothing held"
            };
            eprintln!("[bench]     {held}:");
            for (table, dead, live, bytes) in &bloat.tables {
                eprintln!(
                    "[bench]     {table}: {dead} dead, {live} live tuples, {:.1} MB",
                    *bytes as f64 / 1e6
                );
            }
        }
        Ok(figure)
    }

    /// Fills the backlog, then drains it with `relays` relays, each with its own pool and
    /// destination (as separate processes would), until the outbox has nothing pending.
    async fn measure<D: Destination>(
        &self,
        make: impl Fn() -> Result<D, BoxError>,
    ) -> Result<RelayFigure, BoxError> {
        let (servers, config, backlog) = (self.servers, self.config, self.backlog);
        servers.reset_outbox().await?;
        servers.fill_backlog(config, backlog).await?;
        let state = Arc::new(ProbeState::default());
        let workers = config.workers_for(self.relays);
        let batch = config.batch_for(self.relays);
        let mut built = Vec::new();
        for _ in 0..self.relays {
            let pool = servers.pool(workers as u32 + 2).await?;
            let probe = Probe {
                inner: make()?,
                state: state.clone(),
            };
            let relay = Relay::builder(servers.outbox_on(pool, true)?, probe)
                .batch_size(batch)
                .run_length(config.run_length)
                .max_batch_events(config.max_batch_events)
                .workers(workers)
                .build()?;
            built.push(relay);
        }

        // A transaction with a snapshot on a table of its own, as a report would hold: it takes
        // no lock on the outbox, but vacuum can remove nothing that dies after it began.
        let held = if self.hold {
            let mut conn = servers.pool.acquire().await?.detach();
            sqlx::raw_sql("BEGIN ISOLATION LEVEL REPEATABLE READ; SELECT count(*) FROM pg_class")
                .execute(&mut conn)
                .await?;
            Some(conn)
        } else {
            None
        };
        sys::reset_peak_rss();
        let before = servers.readings().await?;
        let shutdown = CancellationToken::new();
        let mut tasks = JoinSet::new();
        for relay in built {
            let shutdown = shutdown.clone();
            tasks.spawn(async move { relay.run(shutdown).await });
        }
        let deadline = Instant::now() + Duration::from_secs(60 + backlog as u64 / 500);
        let drained = async {
            loop {
                let delivered = state.delivered.load(Ordering::Relaxed);
                // The probe counts before the relay records; the outbox counter says done.
                if delivered >= backlog as u64 && servers.pending().await? == 0 {
                    return Ok::<_, BoxError>(());
                }
                if Instant::now() > deadline {
                    return Err(format!(
                        "the relays did not drain the backlog in time: {delivered} of {backlog} \
                         delivered, {} failed deliveries",
                        state.failed.load(Ordering::Relaxed)
                    )
                    .into());
                }
                if let Some(ended) = tasks.try_join_next() {
                    return Err(format!("a relay stopped early: {:?}", ended?).into());
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
        .await;
        let usage = servers.since(&before).await;
        let peak_rss = sys::peak_rss();
        // Both halves of a `--hold-open` pair, for the comparison.
        let held_open = if config.hold_open {
            Some(servers.bloat().await?)
        } else {
            None
        };
        // Retention right after, the snapshot still held: what deleting rows, or truncating
        // partitions, gives back.
        let retention = if config.hold_open {
            let started = Instant::now();
            let removed = servers
                .outbox(false)?
                .purge(&Retention::delete_after(Duration::ZERO).batch_size(10_000))
                .await?;
            let seconds = started.elapsed().as_secs_f64();
            let bloat = servers.bloat().await?;
            eprintln!("[bench]     retention removed {removed} events in {seconds:.2} s");
            Some(RetentionFigure {
                seconds,
                removed,
                bloat,
            })
        } else {
            None
        };
        if let Some(conn) = held {
            sqlx::Connection::close(conn).await?;
        }
        shutdown.cancel();
        while let Some(ended) = tasks.join_next().await {
            ended??;
        }
        drained?;
        let usage: Usage = usage?;
        let delivered = state.delivered.load(Ordering::Relaxed) as usize;
        Ok(RelayFigure {
            target: Target::Handlers,
            backlog,
            aggregates: config.aggregates,
            run_length: config.run_length,
            relays: self.relays,
            workers,
            batch,
            seconds: usage.elapsed.as_secs_f64(),
            events_per_s: backlog as f64 / usage.elapsed.as_secs_f64(),
            raw_limit: 0.0,
            limited_by: String::new(),
            ratio: 0.0,
            pg_cpu_us_per_event: Usage::per_event_us(usage.pg_cpu, backlog),
            pg_cores: usage.pg_cpu.as_secs_f64() / usage.elapsed.as_secs_f64(),
            wal_bytes_per_event: usage.wal_bytes / backlog as f64,
            relay_cpu_us_per_event: Usage::per_event_us(usage.own_cpu, backlog),
            peak_rss_mb: peak_rss as f64 / 1e6,
            duplicates: delivered.saturating_sub(backlog),
            order_violations: None,
            bloat: held_open,
            held_open: self.hold,
            layout: layout_name(servers.layout).to_owned(),
            retention,
        })
    }
}

/// Commit-to-confirmation latency for every target and offered rate.
pub async fn latency(servers: &Servers, config: &Config) -> Result<Vec<LatencyFigure>, BoxError> {
    let mut figures = Vec::new();
    for &target in &config.targets {
        for &rate in &config.latency_rates {
            let mut figure = match target {
                Target::Handlers => {
                    let dispatcher = dispatcher(OrderCheck::new(config.aggregates))?;
                    open_loop(servers, config, rate, dispatcher).await?
                }
                Target::Nats => {
                    let transport = brokers::nats_destination(servers, config).await?;
                    open_loop(servers, config, rate, transport).await?
                }
                Target::Amqp => {
                    let make = brokers::amqp_destination(servers, config).await?;
                    open_loop(servers, config, rate, make()).await?
                }
                Target::Kafka => {
                    let make = brokers::kafka_destination(config).await?;
                    open_loop(servers, config, rate, make()?).await?
                }
            };
            figure.target = target;
            eprintln!(
                "[bench]   {} at {rate}/s: p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms ({} samples)",
                target.name(),
                figure.p50_ms,
                figure.p99_ms,
                figure.max_ms,
                figure.samples
            );
            figures.push(figure);
        }
    }
    servers.reset_outbox().await?;
    Ok(figures)
}

/// Commits one event per transaction at `rate` per second on a fixed schedule (open loop: a
/// slow commit does not delay the next), with one relay delivering to `destination`.
async fn open_loop<D: Destination>(
    servers: &Servers,
    config: &Config,
    rate: u32,
    destination: D,
) -> Result<LatencyFigure, BoxError> {
    servers.reset_outbox().await?;
    servers.settle().await?;
    let state = Arc::new(ProbeState {
        confirmations: Some(Mutex::new(Vec::new())),
        ..Default::default()
    });
    let relay_pool = servers.pool(config.workers_for(1) as u32 + 2).await?;
    let relay = Relay::builder(
        servers.outbox_on(relay_pool, true)?,
        Probe {
            inner: destination,
            state: state.clone(),
        },
    )
    .batch_size(config.batch_for(1))
    .workers(config.workers_for(1))
    .build()?;
    let shutdown = CancellationToken::new();
    let relay_task = tokio::spawn({
        let shutdown = shutdown.clone();
        async move { relay.run(shutdown).await }
    });

    // A fixed set of writers takes the scheduled slots in turn and commits each at its time
    // (at once when behind): the offered rate does not depend on how fast commits return, and
    // an overloaded server lowers the achieved rate instead of queueing writers without bound.
    const WRITERS: usize = 32;
    let outbox = servers.outbox_on(servers.pool(WRITERS as u32).await?, true)?;
    let commits = Arc::new(Mutex::new(Vec::new()));
    let total = (f64::from(rate) * config.latency_duration.as_secs_f64()) as u64;
    let next_slot = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let stop_at = started + config.latency_duration;
    let mut writers = JoinSet::new();
    for _ in 0..WRITERS {
        let (outbox, commits, next_slot) = (outbox.clone(), commits.clone(), next_slot.clone());
        let (aggregates, bytes) = (config.aggregates, config.payload_bytes);
        writers.spawn(async move {
            loop {
                let slot = next_slot.fetch_add(1, Ordering::Relaxed);
                let due = started + Duration::from_secs_f64(slot as f64 / f64::from(rate));
                if slot >= total || Instant::now() >= stop_at {
                    return Ok::<_, BoxError>(());
                }
                tokio::time::sleep_until(due.into()).await;
                let event = OrderPlaced::new(slot, aggregates, bytes);
                let mut tx = outbox.pool().begin().await?;
                let id = outbox.enqueue(&mut *tx, &event).await?;
                tx.commit().await?;
                commits.lock().expect("commits").push((id, Instant::now()));
            }
        });
    }
    while let Some(done) = writers.join_next().await {
        done??;
    }
    let offered_for = started.elapsed();
    let committed = commits.lock().expect("commits").len() as u64;
    let deadline = Instant::now() + Duration::from_secs(60);
    while state.delivered.load(Ordering::Relaxed) < committed {
        if Instant::now() > deadline || relay_task.is_finished() {
            shutdown.cancel();
            return Err(format!(
                "latency run: {} of {committed} events confirmed",
                state.delivered.load(Ordering::Relaxed)
            )
            .into());
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    shutdown.cancel();
    relay_task.await??;

    // The first second (or fifth of the run) warms connections and caches: left out.
    let warm = started + (config.latency_duration / 5).min(Duration::from_secs(1));
    let commits: HashMap<Uuid, Instant> = std::mem::take(&mut *commits.lock().expect("commits"))
        .into_iter()
        .collect();
    let confirmations = state
        .confirmations
        .as_ref()
        .map(|c| std::mem::take(&mut *c.lock().expect("probe lock")))
        .unwrap_or_default();
    let mut latencies: Vec<Duration> = confirmations
        .iter()
        .filter_map(|(id, confirmed)| {
            let committed = commits.get(id)?;
            // The relay can be woken by the commit's NOTIFY and confirm before the committing
            // task runs again: that latency is (at most) zero.
            (*committed >= warm).then(|| confirmed.saturating_duration_since(*committed))
        })
        .collect();
    latencies.sort();
    let distribution = (0..=200)
        .map(|i| percentile_ms(&latencies, f64::from(i) / 200.0))
        .collect();
    Ok(LatencyFigure {
        target: Target::Handlers,
        offered_per_s: rate,
        achieved_per_s: committed as f64 / offered_for.as_secs_f64(),
        samples: latencies.len(),
        p50_ms: percentile_ms(&latencies, 0.50),
        p90_ms: percentile_ms(&latencies, 0.90),
        p99_ms: percentile_ms(&latencies, 0.99),
        max_ms: percentile_ms(&latencies, 1.0),
        duplicates: confirmations.len().saturating_sub(committed as usize),
        distribution_ms: distribution,
    })
}

/// The layout's name in the report.
pub fn layout_name(layout: outbox::TableLayout) -> &'static str {
    match layout {
        outbox::TableLayout::Partitioned(_) => "partitioned",
        outbox::TableLayout::Debezium => "debezium",
        _ => "standard",
    }
}
