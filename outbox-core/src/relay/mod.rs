//! The relay: leases aggregates, delivers each one's run of events in order, settles the
//! outcome event by event.

mod settle;

use crate::destination::{too_late_to_start, DeliveryError, DeliveryResult, Destination};
use crate::error::{Error, Result};
use crate::event::Envelope;
use crate::retention::Retention;
use crate::retry::RetryPolicy;
use crate::store::{Backend, Claim, EventStatus, Outbox, Run, Settlement, Store};
use futures_util::FutureExt;
use settle::{Failed, Outcome};
use std::collections::HashMap;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;
use uuid::Uuid;

/// Moves events from the outbox to a [`Destination`].
///
/// The aggregate is the unit of work. A claim leases up to [`batch_size`](RelayBuilder::batch_size)
/// due aggregates (`FOR UPDATE SKIP LOCKED` on their cursor rows) and reads, for each, an ordered
/// run of up to [`run_length`](RelayBuilder::run_length) pending events, in one round trip. The
/// destination gets every run of the batch at once and delivers each run in `seq` order,
/// pipelined: one aggregate with a deep backlog moves at the broker's speed.
///
/// Every event has its own fate, settled in `seq` order: an event to retry (or one that parks
/// its aggregate, see [`DeadLetters`]) stops its run, and the events after it wait; a dead event
/// is skipped by default; other aggregates are not affected. A panic in the destination, a reason with a NUL byte or an absurd
/// retry delay affect that run only.
///
/// Several relays (tasks or processes) can share one table. An aggregate is leased to one relay
/// at a time; the relay delivers within three quarters of the lease and does not start a
/// delivery once that is past (a process frozen by a pause resumes without publishing), so two
/// relays never deliver one aggregate at the same time. A relay that dies leaves its aggregates
/// to the next claim after the lease. Writers and relays never wait for each other's locks: the
/// writer's transaction announces new events in a table of its own, which relays absorb.
///
/// On PostgreSQL the relay's own writes (claims and settlements) commit with
/// `synchronous_commit = off`: they skip the disk sync, so a server crash can forget the last
/// fraction of a second of them, and those events are then delivered again (at least once,
/// never lost). The events themselves are exactly as durable as your transaction.
///
/// ```no_run
/// # #[cfg(feature = "postgres")]
/// # async fn demo(outbox: outbox_core::Outbox<sqlx::Postgres>) -> Result<(), outbox_core::Error> {
/// use outbox_core::{Dispatcher, Relay, RetryPolicy};
/// use std::time::Duration;
/// use tokio_util::sync::CancellationToken;
///
/// let relay = Relay::builder(outbox, Dispatcher::from_inventory()?)
///     .batch_size(200)
///     .retry(RetryPolicy::exponential(Duration::from_millis(500)).max_attempts(5))
///     .build()?;
/// let shutdown = CancellationToken::new();
/// relay.run(shutdown.clone()).await?; // returns once `shutdown` is cancelled and work is done
/// # Ok(()) }
/// ```
#[derive(Debug)]
pub struct Relay<DB: Backend, D: Destination> {
    shared: Arc<Shared<DB, D>>,
}

#[derive(Debug)]
struct Shared<DB: Backend, D: Destination> {
    outbox: Outbox<DB>,
    destination: D,
    config: Config,
}

#[derive(Debug, Clone)]
struct Config {
    batch_size: usize,
    run_length: usize,
    max_batch_events: usize,
    workers: usize,
    poll_interval: Duration,
    lease: Duration,
    retry: RetryPolicy,
    shutdown_timeout: Duration,
    retention: Option<(Retention, Duration)>,
    dead_letters: DeadLetters,
    dead_letters_by_type: HashMap<String, DeadLetters>,
}

impl Config {
    fn parks(&self, envelope: &Envelope) -> bool {
        self.dead_letters_by_type
            .get(&envelope.event_type)
            .copied()
            .unwrap_or(self.dead_letters)
            == DeadLetters::Park
    }
}

/// What happens to an aggregate when one of its events goes dead.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum DeadLetters {
    /// The aggregate's later events are delivered (the default): a dead event costs the
    /// aggregate that event only.
    #[default]
    Skip,
    /// The aggregate stops at its dead event, keeping its order:
    /// [`Outbox::requeue`](crate::Outbox::requeue) delivers the dead event and then the rest,
    /// [`Outbox::discard`](crate::Outbox::discard) leaves it dead and releases the rest.
    Park,
}

/// Configures a [`Relay`].
#[derive(Debug)]
pub struct RelayBuilder<DB: Backend, D: Destination> {
    outbox: Outbox<DB>,
    destination: D,
    config: Config,
}

impl<DB: Backend, D: Destination> RelayBuilder<DB, D> {
    /// Aggregates leased per claim (default 100).
    pub fn batch_size(mut self, n: usize) -> Self {
        self.config.batch_size = n;
        self
    }

    /// Events of one aggregate delivered per claim, in `seq` order (default 100): a longer run
    /// lets one busy aggregate (a cart, an account) move faster.
    pub fn run_length(mut self, n: usize) -> Self {
        self.config.run_length = n;
        self
    }

    /// Events per batch, at most (default 1,000): when many aggregates are leased at once their
    /// runs are shortened evenly to fit, which bounds the relay's memory and the time one
    /// delivery takes.
    pub fn max_batch_events(mut self, n: usize) -> Self {
        self.config.max_batch_events = n;
        self
    }

    /// Batches in flight at once in this relay (default 1): each worker claims, delivers and
    /// records its own batch, so one can claim while another delivers.
    pub fn workers(mut self, n: usize) -> Self {
        self.config.workers = n;
        self
    }

    /// How often to look for due events when nothing woke the relay (default 1 s). On
    /// PostgreSQL commits wake relays at once through `LISTEN`/`NOTIFY`; polling still finds
    /// deferred events and retries when they come due, and covers a lost listener connection.
    pub fn poll_interval(mut self, d: Duration) -> Self {
        self.config.poll_interval = d;
        self
    }

    /// How long a claimed aggregate is reserved for this relay (default 30 s). A delivery that
    /// has not finished within three quarters of it is abandoned (its outcome unknown, the
    /// attempt counted), and none starts later than that, so another relay can take the
    /// aggregate over after the lease without ever delivering it at the same time. Broker
    /// client timeouts should be shorter than three quarters of the lease. At most
    /// [`MAX_LEASE`] (a day): `build` refuses longer ones.
    pub fn lease(mut self, d: Duration) -> Self {
        self.config.lease = d;
        self
    }

    /// The retry policy (default [`RetryPolicy::default`]).
    pub fn retry(mut self, policy: RetryPolicy) -> Self {
        self.config.retry = policy;
        self
    }

    /// How long [`Relay::run`] waits for in-flight batches after shutdown is requested
    /// (default 30 s). Batches still running then are abandoned to their lease.
    pub fn shutdown_timeout(mut self, d: Duration) -> Self {
        self.config.shutdown_timeout = d;
        self
    }

    /// What happens to an aggregate when one of its events goes dead (default
    /// [`DeadLetters::Skip`]), for every event type without a policy of its own.
    pub fn dead_letters(mut self, policy: DeadLetters) -> Self {
        self.config.dead_letters = policy;
        self
    }

    /// The dead-letter policy of one event type (one route), for instance
    /// [`DeadLetters::Park`] for the events whose consumers cannot take a gap.
    pub fn dead_letters_for(mut self, event_type: impl Into<String>, policy: DeadLetters) -> Self {
        self.config
            .dead_letters_by_type
            .insert(event_type.into(), policy);
        self
    }

    /// Applies `retention` every `every` while the relay runs.
    pub fn retention(mut self, retention: Retention, every: Duration) -> Self {
        self.config.retention = Some((retention, every));
        self
    }

    /// Checks the configuration.
    pub fn build(self) -> Result<Relay<DB, D>> {
        let c = &self.config;
        if c.batch_size == 0 || c.workers == 0 || c.run_length == 0 || c.max_batch_events == 0 {
            return Err(Error::Config(
                "batch_size, run_length, max_batch_events and workers must be at least 1".into(),
            ));
        }
        if c.lease.is_zero() || c.poll_interval.is_zero() {
            return Err(Error::Config(
                "lease and poll_interval must be longer than zero".into(),
            ));
        }
        if c.lease > MAX_LEASE {
            return Err(Error::Config(format!(
                "lease {:?} is longer than the {:?} allowed: a dead relay's aggregates would wait that long",
                c.lease, MAX_LEASE
            )));
        }
        self.destination.validate()?;
        if let Some(timeout) = self.destination.delivery_timeout() {
            let budget = (c.lease * 3 / 4).mul_f64(DESTINATION_SHARE);
            if timeout > budget {
                return Err(Error::Config(format!(
                    "the destination can still confirm a delivery {timeout:?} after it started \
                     (a broker client's own timeout, such as Kafka's message.timeout.ms), longer \
                     than the {budget:?} a delivery gets of the lease {:?}: a relay that took an \
                     aggregate over could be overtaken; lengthen the lease or shorten that timeout",
                    c.lease
                )));
            }
        }
        Ok(Relay {
            shared: Arc::new(Shared {
                outbox: self.outbox,
                destination: self.destination,
                config: self.config,
            }),
        })
    }
}

impl<DB: Backend, D: Destination> Relay<DB, D> {
    /// Starts configuring a relay from `outbox` to `destination`.
    pub fn builder(outbox: Outbox<DB>, destination: D) -> RelayBuilder<DB, D> {
        RelayBuilder {
            outbox,
            destination,
            config: Config {
                batch_size: 100,
                run_length: 100,
                max_batch_events: 1000,
                workers: 1,
                poll_interval: Duration::from_secs(1),
                lease: Duration::from_secs(30),
                retry: RetryPolicy::default(),
                shutdown_timeout: Duration::from_secs(30),
                retention: None,
                dead_letters: DeadLetters::Skip,
                dead_letters_by_type: HashMap::new(),
            },
        }
    }

    /// The destination.
    pub fn destination(&self) -> &D {
        &self.shared.destination
    }

    /// Runs until `shutdown` is cancelled, then lets in-flight batches finish (up to the
    /// shutdown timeout) and returns.
    ///
    /// Workers are supervised: one that dies (a bug, never an event's failure: those are
    /// settled) is logged and restarted. `run` returns [`Error::Relay`] if workers keep dying
    /// (more than [`MAX_RESTARTS`] within a minute).
    ///
    /// Dropping the returned future stops everything at once, like a crash: leased aggregates
    /// are delivered again after their lease. Nothing is lost either way.
    pub async fn run(&self, shutdown: CancellationToken) -> Result<()> {
        let relay_id = Uuid::now_v7();
        let span =
            tracing::info_span!("outbox.relay", %relay_id, table = %self.shared.outbox.table());
        async {
            tracing::info!(workers = self.shared.config.workers, "relay started");
            // `abandon` stops batches that outlive the shutdown timeout; `stop` also ends the
            // workers when the relay gives up on them.
            let abandon = CancellationToken::new();
            let stop = shutdown.child_token();
            let (wake_tx, wake_rx) = watch::channel(0u64);
            // A JoinSet aborts its tasks when dropped: dropping `run` stops the workers too.
            let mut tasks = JoinSet::new();
            let spawn = |tasks: &mut JoinSet<()>, worker: usize| {
                let shared = self.shared.clone();
                let (stop, abandon, wake) = (stop.clone(), abandon.clone(), wake_rx.clone());
                let id = tasks
                    .spawn(
                        async move { shared.work(relay_id, stop, abandon, wake).await }
                            .instrument(tracing::info_span!("outbox.worker", worker)),
                    )
                    .id();
                (id, worker)
            };
            let mut workers: Vec<(tokio::task::Id, usize)> = (0..self.shared.config.workers)
                .map(|w| spawn(&mut tasks, w))
                .collect();
            let mut background_tasks = JoinSet::new();
            background_tasks.spawn(
                self.shared
                    .outbox
                    .store()
                    .listen(wake_tx, stop.clone())
                    .in_current_span(),
            );
            if let Some((retention, every)) = self.shared.config.retention.clone() {
                let outbox = self.shared.outbox.clone();
                let cancel = stop.clone();
                background_tasks.spawn(
                    async move { run_retention(outbox, retention, every, cancel).await }
                        .in_current_span(),
                );
            }

            let mut restarts: Vec<Instant> = Vec::new();
            let mut outcome = Ok(());
            loop {
                tokio::select! {
                    _ = stop.cancelled() => break,
                    Some(joined) = tasks.join_next_with_id() => {
                        let (id, error) = match joined {
                            Ok((id, ())) => (id, None),
                            Err(error) => (error.id(), Some(error)),
                        };
                        if stop.is_cancelled() {
                            break;
                        }
                        let Some(slot) = workers.iter().position(|(w, _)| *w == id) else {
                            continue;
                        };
                        let worker = workers[slot].1;
                        let now = Instant::now();
                        restarts.retain(|t| now.duration_since(*t) < Duration::from_secs(60));
                        restarts.push(now);
                        let reason = error.map_or_else(
                            || "returned".to_owned(),
                            |e| format!("died: {e}"),
                        );
                        if restarts.len() > MAX_RESTARTS {
                            tracing::error!(worker, %reason, "relay worker died again; stopping the relay");
                            outcome = Err(Error::Relay(format!(
                                "relay workers died {} times within a minute; last: worker {worker} {reason}",
                                restarts.len()
                            )));
                            stop.cancel();
                            break;
                        }
                        tracing::error!(worker, %reason, "relay worker died; restarting it (its aggregates are delivered again after their lease)");
                        workers[slot] = spawn(&mut tasks, worker);
                    }
                }
            }
            if outcome.is_ok() {
                tracing::info!("relay stopping; finishing in-flight batches");
            }
            let drained = tokio::time::timeout(self.shared.config.shutdown_timeout, async {
                while tasks.join_next().await.is_some() {}
            })
            .await;
            if drained.is_err() {
                tracing::warn!(
                    "shutdown timeout reached; abandoning in-flight batches to their lease"
                );
                abandon.cancel();
                while tasks.join_next().await.is_some() {}
            }
            stop.cancel();
            while background_tasks.join_next().await.is_some() {}
            tracing::info!("relay stopped");
            outcome
        }
        .instrument(span)
        .await
    }
}

/// The share of the delivery budget (three quarters of the lease, less what has passed) that
/// the destination gets: it answers before the relay gives up on the batch.
const DESTINATION_SHARE: f64 = 0.9;

/// The longest lease [`RelayBuilder::lease`] accepts: a day.
pub const MAX_LEASE: Duration = Duration::from_secs(24 * 60 * 60);

/// Worker deaths within a minute after which [`Relay::run`] gives up and returns an error.
pub const MAX_RESTARTS: usize = 5;

/// The first wait after a claim found nothing; it doubles up to the poll interval.
const FIRST_IDLE_WAIT: Duration = Duration::from_millis(10);

impl<DB: Backend, D: Destination> Shared<DB, D> {
    async fn work(
        &self,
        relay_id: Uuid,
        shutdown: CancellationToken,
        abandon: CancellationToken,
        mut wake: watch::Receiver<u64>,
    ) {
        let mut failures = 0u32;
        let mut idle = FIRST_IDLE_WAIT;
        while !shutdown.is_cancelled() {
            wake.mark_unchanged();
            let token = claim_token(relay_id);
            // Announcements first, outside the lease clock: a big backlog of them must not eat
            // the lease of the batch claimed after. If they cannot be taken in now, the
            // aggregates the relay already knows are claimed all the same.
            if let Err(error) = self
                .outbox
                .store()
                .absorb()
                .instrument(tracing::debug_span!("outbox.absorb"))
                .await
            {
                tracing::warn!(%error, "taking in new outbox announcements failed; claiming the aggregates already known");
            }
            // The lease runs from before the claim is sent: the local deadline can only be
            // earlier than the database's.
            let leased_at = Instant::now();
            let claimed = self
                .outbox
                .store()
                .claim(&Claim {
                    token,
                    aggregates: self.config.batch_size,
                    run_length: self.config.run_length,
                    max_events: self.config.max_batch_events,
                    lease: self.config.lease,
                })
                .instrument(tracing::debug_span!(
                    "outbox.claim",
                    %token,
                    limit = self.config.batch_size
                ))
                .await;
            let runs = match claimed {
                Ok(runs) => {
                    failures = 0;
                    runs
                }
                Err(error) => {
                    failures += 1;
                    let delay = RetryPolicy::exponential(Duration::from_millis(100))
                        .max_delay(self.config.poll_interval.max(Duration::from_secs(5)))
                        .delay(failures);
                    tracing::error!(%error, retry_in = ?delay, "claiming outbox events failed");
                    tokio::select! {
                        _ = shutdown.cancelled() => return,
                        _ = tokio::time::sleep(delay) => continue,
                    }
                }
            };
            if runs.is_empty() {
                // Right after activity, look again soon: a wake-up can be lost with a listener
                // connection, and deferred events and retries come due without one.
                let wait = idle.min(self.config.poll_interval);
                idle = (idle * 2).min(self.config.poll_interval);
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = wake.changed() => {}
                    _ = tokio::time::sleep(wait) => {}
                }
                continue;
            }
            idle = FIRST_IDLE_WAIT;
            let deadline = leased_at + self.config.lease * 3 / 4;
            let events: usize = runs.iter().map(|r| r.events.len()).sum();
            let span = tracing::info_span!(
                "outbox.deliver",
                %token,
                aggregates = runs.len(),
                events
            );
            let started = Instant::now();
            let outcomes = tokio::select! {
                outcomes = self.deliver(&runs, deadline).instrument(span.clone()) => outcomes,
                _ = abandon.cancelled() => return,
            };
            if events > 0 {
                crate::metrics::published(self.outbox.table().as_str(), started.elapsed());
            }
            self.settle(token, &runs, outcomes).instrument(span).await;
        }
    }

    /// Delivers the due prefix of every run in one call to the destination, bounded by the
    /// lease; returns one outcome per run.
    async fn deliver(&self, runs: &[Run], deadline: Instant) -> Vec<Outcome> {
        let policy = &self.config.retry;
        let sendable: Vec<usize> = runs
            .iter()
            .map(|r| settle::sendable(r, policy, |e| self.config.parks(e)))
            .collect();
        let batch: Vec<Envelope> = runs
            .iter()
            .zip(&sendable)
            .flat_map(|(run, &n)| settle::envelopes(run, n))
            .collect();
        let unknown = || -> Vec<Outcome> {
            runs.iter()
                .map(|r| {
                    if settle::gave_up(r, policy) {
                        Outcome::GaveUp
                    } else {
                        Outcome::Unknown
                    }
                })
                .collect()
        };
        // A process that was frozen (a GC pause, a stopped VM) between the claim and now may
        // have lost its lease: it must not publish.
        let Some(budget) = deadline.checked_duration_since(Instant::now()) else {
            tracing::warn!("lease ran out before delivery started (was the process paused?); leaving the batch to the next claim");
            return unknown();
        };
        let results = if batch.is_empty() {
            Vec::new()
        } else {
            match tokio::time::timeout(budget, self.deliver_contained(&batch, budget)).await {
                Ok(Some(results)) if results.len() == batch.len() => results,
                Ok(Some(results)) => {
                    tracing::error!(
                        expected = batch.len(),
                        got = results.len(),
                        "destination returned a result count that does not match the batch"
                    );
                    return unknown();
                }
                // The destination panicked somewhere in the batch: find the run, so that the
                // panic affects that run only.
                Ok(None) => return self.deliver_run_by_run(runs, &sendable, deadline).await,
                Err(_) => {
                    tracing::warn!(
                        timeout = ?budget,
                        "delivery did not finish within three quarters of the lease; its outcome is unknown"
                    );
                    return unknown();
                }
            }
        };
        let mut results = results.into_iter();
        runs.iter()
            .zip(&sendable)
            .map(|(run, &n)| {
                if settle::gave_up(run, policy) {
                    Outcome::GaveUp
                } else {
                    Outcome::Delivered(results.by_ref().take(n).collect())
                }
            })
            .collect()
    }

    /// The destination's results, or `None` if it panicked. The destination gets most of the
    /// budget, so that one that bounds its runs (handlers) answers before the relay gives up on
    /// the whole batch.
    async fn deliver_contained(
        &self,
        batch: &[Envelope],
        budget: Duration,
    ) -> Option<Vec<DeliveryResult>> {
        let inner = budget.mul_f64(DESTINATION_SHARE);
        // A broker client that keeps retrying on its own for longer than what is left could
        // confirm after the lease, behind a relay that took the aggregates over: not started.
        if let Some(not_started) = too_late_to_start(self.destination.delivery_timeout(), inner) {
            return Some(vec![Err(not_started); batch.len()]);
        }
        let delivery = std::panic::catch_unwind(AssertUnwindSafe(|| {
            self.destination.deliver_within(batch, inner)
        }))
        .ok()?;
        AssertUnwindSafe(delivery).catch_unwind().await.ok()
    }

    /// After a panic: each run again on its own; a run that panics again fails at its first
    /// event, with the panic as the reason.
    async fn deliver_run_by_run(
        &self,
        runs: &[Run],
        sendable: &[usize],
        deadline: Instant,
    ) -> Vec<Outcome> {
        let mut outcomes = Vec::with_capacity(runs.len());
        for (run, &n) in runs.iter().zip(sendable) {
            if settle::gave_up(run, &self.config.retry) {
                outcomes.push(Outcome::GaveUp);
                continue;
            }
            let Some(budget) = deadline.checked_duration_since(Instant::now()) else {
                outcomes.push(Outcome::Unknown);
                continue;
            };
            if n == 0 {
                outcomes.push(Outcome::Delivered(Vec::new()));
                continue;
            }
            let batch: Vec<Envelope> = settle::envelopes(run, n).collect();
            outcomes.push(
                match tokio::time::timeout(budget, self.deliver_contained(&batch, budget)).await {
                    Ok(Some(results)) if results.len() == n => Outcome::Delivered(results),
                    Ok(Some(_)) | Err(_) => Outcome::Unknown,
                    Ok(None) => Outcome::Delivered(vec![Err(DeliveryError::retry(
                        "the destination panicked while delivering this event's run",
                    ))]),
                },
            );
        }
        outcomes
    }

    /// Writes the fate of every run in one statement; if that fails, run by run, so that one
    /// run's bad data cannot hold back the others. If the database is unreachable the
    /// aggregates stay leased and are delivered again after the lease (at least once).
    async fn settle(&self, token: Uuid, runs: &[Run], outcomes: Vec<Outcome>) {
        let settlements: Vec<Settlement> = runs
            .iter()
            .zip(outcomes)
            .map(|(run, outcome)| {
                let (settlement, failures) =
                    settle::settle(run, outcome, &self.config.retry, |e| self.config.parks(e));
                for failed in &failures {
                    log_failure(run, failed);
                }
                settlement
            })
            .collect();
        for attempt in 1..=3u32 {
            match self.outbox.store().settle(token, &settlements).await {
                Ok(()) => {
                    for (run, settlement) in runs.iter().zip(&settlements) {
                        self.count(run, settlement);
                    }
                    return;
                }
                Err(error) if attempt < 3 => {
                    tracing::debug!(%error, attempt, "settling the batch failed; retrying");
                    tokio::time::sleep(Duration::from_millis(100 * u64::from(attempt))).await;
                }
                Err(error) if settlements.len() > 1 => {
                    tracing::warn!(%error, "settling the batch failed; settling run by run");
                    for (run, one) in runs.iter().zip(&settlements) {
                        let settled = self
                            .outbox
                            .store()
                            .settle(token, std::slice::from_ref(one))
                            .await;
                        if settled.is_ok() {
                            self.count(run, one);
                        }
                        if let Err(error) = settled {
                            tracing::error!(
                                %error,
                                aggregate_type = %one.aggregate_type,
                                aggregate_id = %one.aggregate_id,
                                "cannot settle this run; it will be delivered again after its lease"
                            );
                        }
                    }
                }
                Err(error) => tracing::error!(
                    %error,
                    "cannot settle the batch; it will be delivered again after its lease"
                ),
            }
        }
    }
}

impl<DB: Backend, D: Destination> Shared<DB, D> {
    /// Metrics of a settlement the store recorded: what happened to each event it names.
    fn count(&self, run: &Run, settlement: &Settlement) {
        let table = self.outbox.table().as_str();
        let now = chrono::Utc::now();
        // Fates come in the run's event order: one pass over the run finds them all.
        let mut events = run.events.iter();
        for fate in &settlement.events {
            let Some(event) = events.find(|e| e.envelope.id == fate.id) else {
                continue;
            };
            let envelope = &event.envelope;
            let outcome = match fate.status {
                EventStatus::Delivered => crate::metrics::Settled::Delivered,
                EventStatus::Dead => crate::metrics::Settled::Dead,
                EventStatus::Pending => crate::metrics::Settled::Failed,
            };
            // From when it could first be delivered: its commit, or its `enqueue_at` time.
            let waited = (now - envelope.created_at.max(event.available_at))
                .to_std()
                .ok();
            let destination = self.destination.name_for(&envelope.event_type);
            crate::metrics::settled(table, &envelope.event_type, destination, outcome, waited);
        }
    }
}

/// A claim's lease token: the relay's id in its first half, so that the operator's status can
/// count the relays holding leases (`Inspect::status`), fresh randomness in the second.
fn claim_token(relay_id: Uuid) -> Uuid {
    let fresh = Uuid::new_v4();
    let mut bytes = [0u8; 16];
    bytes[..8].copy_from_slice(&relay_id.as_bytes()[8..]);
    bytes[8..].copy_from_slice(&fresh.as_bytes()[8..]);
    Uuid::from_bytes(bytes)
}

/// The one place delivery failures are logged.
fn log_failure(run: &Run, failed: &Failed) {
    let envelope = &run.events[failed.index].envelope;
    if failed.dead {
        tracing::error!(
            event_id = %envelope.id,
            event_type = %envelope.event_type,
            aggregate_type = %envelope.aggregate_type,
            aggregate_id = %envelope.aggregate_id,
            sequence = envelope.sequence,
            attempt = failed.attempt,
            reason = %failed.reason,
            "outbox event is dead"
        );
    } else {
        tracing::warn!(
            event_id = %envelope.id,
            event_type = %envelope.event_type,
            aggregate_type = %envelope.aggregate_type,
            aggregate_id = %envelope.aggregate_id,
            sequence = envelope.sequence,
            attempt = failed.attempt,
            reason = %failed.reason,
            retry_in = ?failed.retry_in,
            "outbox delivery failed; will retry"
        );
    }
}

async fn run_retention<DB: Backend>(
    outbox: Outbox<DB>,
    retention: Retention,
    every: Duration,
    cancel: CancellationToken,
) {
    loop {
        match outbox.purge(&retention).await {
            Ok(0) => {}
            Ok(removed) => tracing::info!(removed, "outbox retention removed delivered rows"),
            Err(error) => tracing::warn!(%error, "outbox retention failed; trying again later"),
        }
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(every) => {}
        }
    }
}
