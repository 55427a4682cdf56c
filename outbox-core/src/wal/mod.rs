//! The log-tailing relay: reads committed outbox writes from a PostgreSQL logical replication
//! slot instead of querying the table (the `wal` feature).

mod decode;

use crate::destination::{DeliveryError, DeliveryResult, Destination, Retry};
use crate::error::{Error, Result};
use crate::event::Envelope;
use crate::retry::RetryPolicy;
use crate::store::postgres::{ensure_log_tailing, log_tailing_publication, message_prefix};
use crate::store::Outbox;
use crate::table::TableName;
use decode::{decode_message, decode_row, Decoded};
use futures_util::FutureExt;
use pg_walstream::{EventType, LogicalReplicationStream, ReplicationStreamConfig, RetryConfig};
use sqlx::Postgres;
use std::collections::HashSet;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::AbortOnDropHandle;
use tracing::Instrument;

/// Moves events from a PostgreSQL logical replication slot to a [`Destination`]: no claim
/// queries, no table bloat, events in commit order.
///
/// The outbox must be built with [`OutboxBuilder::log_tailing`](crate::OutboxBuilder::log_tailing):
/// in [`TailMode::Messages`](crate::TailMode::Messages) `enqueue` writes each event as a transactional logical decoding
/// message and no row; in [`TailMode::Table`](crate::TailMode::Table) it inserts the row and deletes it in the same
/// transaction, and the relay follows the table's inserts through a publication.
///
/// - **Order.** The slot delivers transactions in commit order, and an aggregate's writers
///   commit in sequence order, so every aggregate's events arrive in order, whatever order
///   their ids were allocated in.
/// - **At least once.** Events are published in batches that span transactions; the slot's
///   confirmed position moves past a transaction only after the destination confirmed every
///   event of it (or the relay wrote it dead), so a crash replays from the last confirmed
///   transaction.
/// - **Failures.** A failed event is retried in place with the [retry policy](WalRelayBuilder::retry),
///   and its aggregate's later events of the batch wait behind it; the batch's other events are
///   not sent again. An event the destination refuses, or that runs out of attempts, is
///   written to the outbox table as a dead row with its reason, and its aggregate goes on.
///   While a batch retries the relay reads no further: the slot is one ordered stream.
/// - **One reader per slot.** PostgreSQL lets one connection stream a slot at a time. Start
///   the same relay on several machines: one streams, the others wait as standbys and take
///   over within [`takeover_interval`](WalRelayBuilder::takeover_interval) when it dies.
/// - **Bounded WAL.** A slot keeps the WAL its reader has not confirmed. The relay writes a
///   heartbeat message every [`heartbeat`](WalRelayBuilder::heartbeat), so the slot moves
///   even when no outbox event is written, and reports the WAL the slot retains as the gauge
///   `outbox_wal_retained_bytes`, with a warning above
///   [`retained_wal_warning`](WalRelayBuilder::retained_wal_warning). Set PostgreSQL's
///   `max_slot_wal_keep_size` so that a relay stopped for days cannot fill the disk.
///
/// The server needs `wal_level = logical`, and the relay's user the `REPLICATION` attribute
/// (and, in table mode, ownership of the table to create the publication).
///
/// ```no_run
/// # async fn demo(pool: sqlx::PgPool, destination: outbox_core::Dispatcher) -> outbox_core::Result<()> {
/// use outbox_core::{wal::WalRelay, Outbox, TailMode};
/// use tokio_util::sync::CancellationToken;
///
/// let outbox = Outbox::builder(pool).log_tailing(TailMode::Messages).build()?;
/// outbox.migrate().await?;
/// let relay = WalRelay::builder(outbox, "postgres://relay@db/app", destination).build()?;
/// let shutdown = CancellationToken::new();
/// relay.run(shutdown.clone()).await?; // returns once `shutdown` is cancelled
/// # Ok(()) }
/// ```
#[derive(Debug)]
pub struct WalRelay<D: Destination> {
    outbox: Outbox<Postgres>,
    destination: D,
    config: Config,
}

#[derive(Clone)]
struct Config {
    replication_url: String,
    max_batch_events: usize,
    retry: RetryPolicy,
    delivery_timeout: Duration,
    heartbeat: Duration,
    takeover_interval: Duration,
    retained_wal_warning: u64,
    shutdown_timeout: Duration,
}

impl std::fmt::Debug for Config {
    // The replication URL may carry a password: never print it.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Config")
            .field("max_batch_events", &self.max_batch_events)
            .finish_non_exhaustive()
    }
}

/// Configures a [`WalRelay`].
#[derive(Debug)]
pub struct WalRelayBuilder<D: Destination> {
    outbox: Outbox<Postgres>,
    destination: D,
    config: Config,
}

impl<D: Destination> WalRelay<D> {
    /// Starts configuring a relay of `outbox` to `destination`, streaming through a replication
    /// connection to `replication_url` (`postgres://user:password@host/db`; the relay adds
    /// `replication=database`).
    pub fn builder(
        outbox: Outbox<Postgres>,
        replication_url: impl Into<String>,
        destination: D,
    ) -> WalRelayBuilder<D> {
        WalRelayBuilder {
            config: Config {
                replication_url: replication_url.into(),
                max_batch_events: 1000,
                retry: RetryPolicy::default(),
                delivery_timeout: Duration::from_secs(30),
                heartbeat: Duration::from_secs(10),
                takeover_interval: Duration::from_secs(1),
                retained_wal_warning: 1 << 30,
                shutdown_timeout: Duration::from_secs(30),
            },
            outbox,
            destination,
        }
    }
}

impl<D: Destination> WalRelayBuilder<D> {
    /// Events per call to the destination, at most (default 1,000). Batches span transactions
    /// and close as soon as the slot has nothing more ready, so a quiet outbox is published
    /// one event at a time and a busy one in full batches.
    pub fn max_batch_events(mut self, n: usize) -> Self {
        self.config.max_batch_events = n.max(1);
        self
    }

    /// The retry policy for failed events (default [`RetryPolicy::default`]).
    pub fn retry(mut self, policy: RetryPolicy) -> Self {
        self.config.retry = policy;
        self
    }

    /// How long one call to the destination may take (default 30 s); after it the batch's
    /// outcome is unknown, the attempt is counted and the batch is sent again.
    pub fn delivery_timeout(mut self, d: Duration) -> Self {
        self.config.delivery_timeout = d;
        self
    }

    /// How often the relay writes a heartbeat message and checks the WAL its slot retains
    /// (default 10 s).
    pub fn heartbeat(mut self, d: Duration) -> Self {
        self.config.heartbeat = d;
        self
    }

    /// How often a standby relay tries to take the slot over (default 1 s).
    pub fn takeover_interval(mut self, d: Duration) -> Self {
        self.config.takeover_interval = d;
        self
    }

    /// Retained WAL above which the relay logs a warning at each heartbeat (default 1 GiB).
    pub fn retained_wal_warning(mut self, bytes: u64) -> Self {
        self.config.retained_wal_warning = bytes;
        self
    }

    /// How long [`WalRelay::run`] waits for the batch in flight after shutdown is requested
    /// (default 30 s). Its events are delivered again by the next relay otherwise.
    pub fn shutdown_timeout(mut self, d: Duration) -> Self {
        self.config.shutdown_timeout = d;
        self
    }

    /// Validates the configuration.
    pub fn build(self) -> Result<WalRelay<D>> {
        if self.outbox.store().options().log_tailing.is_none() {
            return Err(Error::Config(
                "the outbox writes rows for polling relays: build it with \
                 .log_tailing(TailMode::Messages) or .log_tailing(TailMode::Table) for a WalRelay"
                    .into(),
            ));
        }
        if self.config.heartbeat.is_zero() || self.config.takeover_interval.is_zero() {
            return Err(Error::Config(
                "the heartbeat and takeover intervals must be longer than zero".into(),
            ));
        }
        self.destination.validate()?;
        Ok(WalRelay {
            outbox: self.outbox,
            destination: self.destination,
            config: self.config,
        })
    }
}

/// The name of `outbox`'s replication slot, `<table>_relay_<database>` (for monitoring, or to
/// drop it when log tailing is given up); the publication is `<table>_relay`.
pub async fn slot_name(outbox: &Outbox<Postgres>) -> Result<String> {
    let database: String = sqlx::query_scalar("SELECT current_database()::text")
        .fetch_one(outbox.pool())
        .await?;
    Ok(crate::store::postgres::log_tailing_slot(
        outbox.table(),
        &database,
    ))
}

/// What the reader task passes on from the slot, in commit order.
// Most items are events: boxing them would add an allocation per event for nothing.
#[allow(clippy::large_enum_variant)]
enum Item {
    Event(Decoded),
    /// The end of a transaction: everything before is in the items already passed on.
    Commit(u64),
}

/// Why streaming stopped.
enum Stopped {
    Shutdown,
    /// The slot is streamed by another relay: wait as a standby.
    Standby,
    Failed(String),
}

impl<D: Destination> WalRelay<D> {
    /// Streams and delivers until `shutdown` is cancelled, then finishes the batch in flight
    /// (within the shutdown timeout), confirms it, and returns. An unreachable server (at
    /// start-up too), connection losses and a slot held by another relay are waited out; a
    /// server without `wal_level = logical` is an [`Error::Config`], and a refusal from the
    /// server while preparing the slot (a missing privilege) an [`Error::Database`].
    pub async fn run(&self, shutdown: CancellationToken) -> Result<()> {
        let span = tracing::info_span!(
            "outbox.wal_relay",
            table = %self.outbox.table(),
            slot = tracing::field::Empty,
        );
        async {
            // A database that cannot be reached yet is waited for; one that answers no is an
            // error.
            let mut failures = 0u32;
            let slot = loop {
                match ensure_log_tailing(self.outbox.pool(), self.outbox.table()).await {
                    Ok(slot) => break slot,
                    // The server's answer (wal_level, a missing privilege) will not change.
                    Err(error @ (Error::Config(_) | Error::Database(sqlx::Error::Database(_)))) => {
                        return Err(error)
                    }
                    Err(error) => {
                        failures += 1;
                        let delay = RetryPolicy::exponential(Duration::from_millis(200))
                            .max_delay(Duration::from_secs(10))
                            .delay(failures);
                        tracing::warn!(%error, retry_in = ?delay, "log-tailing relay cannot prepare its slot yet");
                        wait(&shutdown, delay).await;
                        if shutdown.is_cancelled() {
                            return Ok(());
                        }
                    }
                }
            };
            tracing::Span::current().record("slot", slot.as_str());
            // Aborted with this future, even when it is dropped rather than shut down.
            let _heartbeat = AbortOnDropHandle::new(tokio::spawn(
                watch_slot(
                    self.outbox.clone(),
                    slot.clone(),
                    self.config.clone(),
                    shutdown.child_token(),
                )
                .in_current_span(),
            ));
            let mut confirmed: Option<u64> = None;
            let mut failures = 0u32;
            let mut standby_logged = false;
            while !shutdown.is_cancelled() {
                match self.stream(&slot, &shutdown, &mut confirmed).await {
                    Stopped::Shutdown => break,
                    Stopped::Standby => {
                        if !standby_logged {
                            tracing::info!("the slot is streamed by another relay; standing by");
                            standby_logged = true;
                        }
                        failures = 0;
                        wait(&shutdown, self.config.takeover_interval).await;
                    }
                    Stopped::Failed(reason) => {
                        standby_logged = false;
                        failures += 1;
                        let delay = RetryPolicy::exponential(Duration::from_millis(200))
                            .max_delay(Duration::from_secs(10))
                            .delay(failures);
                        tracing::warn!(%reason, retry_in = ?delay, "log-tailing relay lost its stream; reconnecting from the last confirmed position");
                        wait(&shutdown, delay).await;
                    }
                }
            }
            tracing::info!("log-tailing relay stopped");
            Ok(())
        }
        .instrument(span)
        .await
    }

    /// Streams from the slot, after `confirmed` if set, until shutdown or a failure.
    async fn stream(
        &self,
        slot: &str,
        shutdown: &CancellationToken,
        confirmed: &mut Option<u64>,
    ) -> Stopped {
        // A standby asks the server before it opens a replication connection: waiting is
        // then one cheap query per interval.
        let active: std::result::Result<Option<bool>, sqlx::Error> =
            sqlx::query_scalar("SELECT active FROM pg_replication_slots WHERE slot_name = $1")
                .bind(slot)
                .fetch_optional(self.outbox.pool())
                .await;
        match active {
            Ok(Some(true)) => return Stopped::Standby,
            Ok(Some(false)) => {}
            Ok(None) => {
                tracing::error!("the replication slot is missing (dropped by hand?): recreating it; events committed while it was missing are not in it and were not relayed");
                if let Err(error) =
                    ensure_log_tailing(self.outbox.pool(), self.outbox.table()).await
                {
                    return Stopped::Failed(error.to_string());
                }
            }
            Err(error) => return Stopped::Failed(error.to_string()),
        }
        let stream = match self.connect(slot, *confirmed).await {
            Ok(stream) => stream,
            Err(reason) if reason.contains("is active for PID") => return Stopped::Standby,
            Err(reason) => return Stopped::Failed(reason),
        };
        tracing::info!("log-tailing relay streaming");
        let feedback = stream.shared_lsn_feedback.clone();
        let stop_reading = CancellationToken::new();
        let (items, mut received) = mpsc::channel(self.config.max_batch_events * 2);
        // Dropped with this future (a crash, a caller's `select!`): the connection closes and
        // the slot is free for a standby at once.
        let mut reader = AbortOnDropHandle::new(tokio::spawn(
            read(
                stream,
                Arc::new(Prefixes::new(self.outbox.table())),
                items,
                stop_reading.clone(),
            )
            .in_current_span(),
        ));
        let confirm = |lsn: u64, confirmed: &mut Option<u64>| {
            feedback.update_applied_lsn(lsn);
            feedback.update_flushed_lsn(lsn);
            *confirmed = Some(lsn);
        };
        loop {
            // Wait for the first item, then take whatever else is ready, up to a batch.
            let first = tokio::select! {
                _ = shutdown.cancelled() => break,
                item = received.recv() => item,
            };
            let Some(first) = first else {
                return match (&mut reader).await {
                    Ok(Err(reason)) => Stopped::Failed(reason),
                    _ => Stopped::Failed("the replication stream ended".into()),
                };
            };
            let mut batch = Vec::new();
            let mut commit = None;
            let mut next = Some(first);
            while let Some(item) = next.take() {
                match item {
                    Item::Event(decoded) => batch.push(decoded),
                    Item::Commit(lsn) => commit = Some(lsn),
                }
                if batch.len() < self.config.max_batch_events {
                    next = received.try_recv().ok();
                }
            }
            if !batch.is_empty() {
                tokio::select! {
                    () = self.deliver(batch) => {}
                    _ = cancelled_after(shutdown, self.config.shutdown_timeout) => {
                        tracing::warn!("shutdown timeout reached; the batch in flight is delivered again by the next relay");
                        break;
                    }
                }
            }
            if let Some(lsn) = commit {
                confirm(lsn, confirmed);
            }
        }
        // The reader sends the confirmed position as it stops; closing the channel frees it if
        // it waits for room there.
        stop_reading.cancel();
        drop(received);
        let _ = reader.await;
        Stopped::Shutdown
    }

    async fn connect(
        &self,
        slot: &str,
        start: Option<u64>,
    ) -> std::result::Result<LogicalReplicationStream, String> {
        let config =
            ReplicationStreamConfig::builder(slot, log_tailing_publication(self.outbox.table()))
                .with_protocol_version(1)
                .with_messages(true)
                .with_feedback_interval(Duration::from_millis(100))
                // Reconnection is the relay's, with its own backoff and standby logic.
                .with_retry_config(RetryConfig {
                    max_attempts: 1,
                    ..RetryConfig::default()
                });
        let url = replication_url(&self.config.replication_url);
        let mut stream = LogicalReplicationStream::new(&url, config)
            .await
            .map_err(|e| e.to_string())?;
        stream.start(start).await.map_err(|e| e.to_string())?;
        Ok(stream)
    }

    /// Delivers `batch` until every event is delivered or recorded dead.
    async fn deliver(&self, batch: Vec<Decoded>) {
        let table = self.outbox.table().as_str();
        let span = tracing::info_span!("outbox.deliver", events = batch.len());
        async {
            let mut dead: Vec<(Envelope, u32, String)> = Vec::new();
            // The events still to deliver, in stream order, and their failed attempts so far.
            let mut pending: Vec<Envelope> = Vec::with_capacity(batch.len());
            let mut attempts: Vec<u32> = Vec::with_capacity(batch.len());
            for decoded in batch {
                match decoded {
                    Decoded::Event(envelope) => {
                        pending.push(envelope);
                        attempts.push(0);
                    }
                    Decoded::Poison(envelope, reason) => {
                        tracing::error!(event_id = %envelope.id, %reason, "undecodable outbox event in the replication stream; recording it dead");
                        dead.push((envelope, 0, reason));
                    }
                }
            }
            // After a panic, one event per call: the panic then costs its own event only.
            let mut one_by_one = false;
            while !pending.is_empty() {
                for (envelope, tried) in pending.iter_mut().zip(&attempts) {
                    envelope.attempt = tried + 1;
                }
                let results = if one_by_one {
                    // An aggregate whose event failed sends nothing more this round: its later
                    // events must not overtake the failed one.
                    let mut failed: HashSet<(&str, &str)> = HashSet::new();
                    let mut results = Vec::with_capacity(pending.len());
                    for envelope in &pending {
                        let key = (
                            envelope.aggregate_type.as_str(),
                            envelope.aggregate_id.as_str(),
                        );
                        if failed.contains(&key) {
                            results.push(Err(DeliveryError::held_back()));
                            continue;
                        }
                        let result = self.call_one(envelope).await;
                        if matches!(&result, Err(e) if e.retry != Retry::Never) {
                            failed.insert(key);
                        }
                        results.push(result);
                    }
                    results
                } else {
                    match self.call_batch(&pending).await {
                        Some(results) => results,
                        None => {
                            one_by_one = true;
                            continue;
                        }
                    }
                };
                // Aggregates whose run stopped at a failure in this round: their later events
                // wait for the next round, behind it.
                let mut stopped: HashSet<(String, String)> = HashSet::new();
                let (mut retry, mut retry_attempts) = (Vec::new(), Vec::new());
                let mut delay = Duration::ZERO;
                for ((envelope, mut tried), result) in
                    pending.drain(..).zip(attempts.drain(..)).zip(results)
                {
                    let destination = self.destination.name_for(&envelope.event_type);
                    let waited = (chrono::Utc::now() - envelope.created_at).to_std().ok();
                    let key = || (envelope.aggregate_type.clone(), envelope.aggregate_id.clone());
                    if !stopped.is_empty() && stopped.contains(&key()) {
                        retry.push(envelope);
                        retry_attempts.push(tried);
                        continue;
                    }
                    let error = match result {
                        Ok(()) => {
                            crate::metrics::settled(
                                table,
                                &envelope.event_type,
                                destination,
                                crate::metrics::Settled::Delivered,
                                waited,
                            );
                            continue;
                        }
                        Err(error) => error,
                    };
                    let counts = matches!(error.retry, Retry::Never | Retry::Backoff | Retry::After(_));
                    if counts {
                        tried += 1;
                    }
                    let gives_up = error.retry == Retry::Never
                        || (counts && tried >= self.config.retry.max_attempts);
                    if gives_up {
                        tracing::error!(
                            event_id = %envelope.id,
                            event_type = %envelope.event_type,
                            aggregate_type = %envelope.aggregate_type,
                            aggregate_id = %envelope.aggregate_id,
                            attempt = tried,
                            reason = %error.reason,
                            "outbox event dead"
                        );
                        crate::metrics::settled(
                            table,
                            &envelope.event_type,
                            destination,
                            crate::metrics::Settled::Dead,
                            waited,
                        );
                        dead.push((envelope, tried, error.reason));
                        continue;
                    }
                    if counts {
                        tracing::warn!(
                            event_id = %envelope.id,
                            event_type = %envelope.event_type,
                            aggregate_id = %envelope.aggregate_id,
                            attempt = tried,
                            reason = %error.reason,
                            "outbox event failed; retrying"
                        );
                        crate::metrics::settled(
                            table,
                            &envelope.event_type,
                            destination,
                            crate::metrics::Settled::Failed,
                            None,
                        );
                    }
                    delay = delay.max(match error.retry {
                        Retry::Backoff => self.config.retry.delay(tried),
                        Retry::After(d) => d,
                        Retry::Unavailable => self.config.retry.delay(1),
                        Retry::Never | Retry::NotAttempted => Duration::ZERO,
                    });
                    stopped.insert(key());
                    retry.push(envelope);
                    retry_attempts.push(tried);
                }
                (pending, attempts) = (retry, retry_attempts);
                if !pending.is_empty() && !delay.is_zero() {
                    tokio::time::sleep(delay).await;
                }
            }
            self.record_dead(&dead).await;
        }
        .instrument(span)
        .await
    }

    /// One call to the destination with the whole batch; `None` if it panicked.
    async fn call_batch(&self, batch: &[Envelope]) -> Option<Vec<DeliveryResult>> {
        let started = Instant::now();
        let call = AssertUnwindSafe(tokio::time::timeout(
            self.config.delivery_timeout,
            self.destination
                .deliver_within(batch, self.config.delivery_timeout),
        ))
        .catch_unwind()
        .await;
        crate::metrics::published(self.outbox.table().as_str(), started.elapsed());
        match call {
            Err(_) => {
                tracing::error!(
                    events = batch.len(),
                    "destination panicked; delivering the batch one event at a time"
                );
                None
            }
            Ok(Ok(results)) if results.len() == batch.len() => Some(results),
            Ok(Ok(results)) => {
                tracing::error!(
                    expected = batch.len(),
                    got = results.len(),
                    "destination returned a result count that does not match the batch"
                );
                Some(unknown(
                    batch.len(),
                    "the destination's results did not match the batch",
                ))
            }
            Ok(Err(_)) => Some(unknown(
                batch.len(),
                &format!(
                    "delivery did not finish within {:?}; outcome unknown",
                    self.config.delivery_timeout
                ),
            )),
        }
    }

    /// One event alone (after a panic): a panic is that event's failed attempt.
    async fn call_one(&self, envelope: &Envelope) -> DeliveryResult {
        let call = AssertUnwindSafe(tokio::time::timeout(
            self.config.delivery_timeout,
            self.destination
                .deliver_within(std::slice::from_ref(envelope), self.config.delivery_timeout),
        ))
        .catch_unwind()
        .await;
        match call {
            Err(panic) => Err(DeliveryError::retry(format!(
                "destination panicked: {}",
                panic_message(&panic)
            ))),
            Ok(Ok(mut results)) if results.len() == 1 => results.remove(0),
            Ok(_) => Err(DeliveryError::retry(
                "delivery timed out or returned no result; outcome unknown",
            )),
        }
    }

    /// Writes dead events to the table; retried until it succeeds, since the slot must not
    /// move past an event that is neither delivered nor recorded.
    async fn record_dead(&self, dead: &[(Envelope, u32, String)]) {
        if dead.is_empty() {
            return;
        }
        let rows: Vec<(&Envelope, u32, &str)> =
            dead.iter().map(|(e, a, r)| (e, *a, r.as_str())).collect();
        let mut failures = 0;
        while let Err(error) = self.outbox.store().record_dead(&rows).await {
            failures += 1;
            let delay = RetryPolicy::exponential(Duration::from_millis(100))
                .max_delay(Duration::from_secs(5))
                .delay(failures);
            tracing::error!(%error, retry_in = ?delay, "recording dead outbox events failed");
            tokio::time::sleep(delay).await;
        }
    }
}

fn unknown(n: usize, reason: &str) -> Vec<DeliveryResult> {
    (0..n).map(|_| Err(DeliveryError::retry(reason))).collect()
}

fn panic_message(panic: &Box<dyn std::any::Any + Send>) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic without a message".into())
}

/// What the reader passes on: the outbox table's inserts and the messages with the outbox's
/// prefix, whatever this outbox's mode, so that writers can change modes in a rolling deploy.
/// The relay's heartbeats have a prefix of their own: only their commits pass.
struct Prefixes {
    table: String,
    events: String,
}

impl Prefixes {
    fn new(table: &TableName) -> Self {
        Self {
            table: table.as_str().to_owned(),
            events: message_prefix(table),
        }
    }
}

/// Reads the slot and passes the outbox's events and the commits on, until stopped; then
/// sends the confirmed position one last time.
async fn read(
    mut stream: LogicalReplicationStream,
    prefixes: Arc<Prefixes>,
    items: mpsc::Sender<Item>,
    stop: CancellationToken,
) -> std::result::Result<(), String> {
    // The commit time of the transaction being read: a row's `created_at` when the server's
    // `DateStyle` prints it in a form other than ISO.
    let mut committed_at = chrono::Utc::now();
    let outcome = loop {
        let event = match stream.next_event(&stop).await {
            Ok(event) => event,
            Err(_) if stop.is_cancelled() => break Ok(()),
            Err(error) => break Err(error.to_string()),
        };
        let (item, commit) = match event.event_type {
            EventType::Begin {
                commit_timestamp, ..
            } => {
                committed_at = commit_timestamp;
                continue;
            }
            EventType::Insert { table, data, .. } if *table == *prefixes.table => {
                match decode_row(&data, committed_at) {
                    Some(decoded) => (Item::Event(decoded), false),
                    // A row the relay wrote itself (a dead event), not one to deliver.
                    None => continue,
                }
            }
            EventType::Message {
                prefix, content, ..
            } if *prefix == *prefixes.events => (
                Item::Event(decode_message(&content, event.lsn.value())),
                false,
            ),
            EventType::Commit { end_lsn, .. } => (Item::Commit(end_lsn.value()), true),
            _ => continue,
        };
        tokio::select! {
            sent = items.send(item) => if sent.is_err() { break Ok(()) },
            _ = stop.cancelled() => break Ok(()),
        }
        if commit {
            stream.maybe_send_feedback().await;
        }
    };
    let _ = stream.stop().await;
    outcome
}

/// Heartbeats (so the slot moves when no event is written) and the retained-WAL gauge.
async fn watch_slot(
    outbox: Outbox<Postgres>,
    slot: String,
    config: Config,
    stop: CancellationToken,
) {
    let prefix = format!("{}:heartbeat", message_prefix(outbox.table()));
    let mut ticks = tokio::time::interval(config.heartbeat);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = ticks.tick() => {}
        }
        if let Err(error) = sqlx::query("SELECT pg_logical_emit_message(true, $1, '')")
            .bind(&prefix)
            .execute(outbox.pool())
            .await
        {
            tracing::warn!(%error, "writing the relay's heartbeat failed");
        }
        let retained: std::result::Result<Option<(Option<i64>, Option<String>)>, _> =
            sqlx::query_as(
                "SELECT (pg_current_wal_lsn() - restart_lsn)::int8, wal_status::text \
             FROM pg_replication_slots WHERE slot_name = $1",
            )
            .bind(&slot)
            .fetch_optional(outbox.pool())
            .await;
        match retained {
            Ok(Some((bytes, status))) => {
                let bytes = bytes.unwrap_or(0).max(0) as u64;
                crate::metrics::wal_retained(&slot, bytes);
                if status.as_deref() == Some("lost") {
                    tracing::error!(%slot, "the replication slot was invalidated (max_slot_wal_keep_size): events written while the relay was behind are no longer in the WAL; drop the slot and recover them from the application");
                } else if bytes > config.retained_wal_warning {
                    tracing::warn!(%slot, retained_bytes = bytes, "the replication slot retains much WAL: is the relay keeping up, or stopped?");
                }
            }
            Ok(None) => {}
            Err(error) => {
                tracing::warn!(%error, "reading the replication slot's retained WAL failed")
            }
        }
    }
}

fn replication_url(url: &str) -> String {
    if url.contains("replication=") {
        url.to_owned()
    } else if url.contains('?') {
        format!("{url}&replication=database")
    } else {
        format!("{url}?replication=database")
    }
}

async fn wait(shutdown: &CancellationToken, d: Duration) {
    tokio::select! {
        _ = shutdown.cancelled() => {}
        _ = tokio::time::sleep(d) => {}
    }
}

/// Completes `timeout` after `shutdown` is cancelled.
async fn cancelled_after(shutdown: &CancellationToken, timeout: Duration) {
    shutdown.cancelled().await;
    tokio::time::sleep(timeout).await;
}
