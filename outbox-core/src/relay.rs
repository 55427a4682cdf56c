//! The relay: claims due events, delivers them, records the outcome.

use crate::destination::{DeliveryError, DeliveryResult, Destination};
use crate::error::{Error, Result};
use crate::event::Envelope;
use crate::retention::Retention;
use crate::retry::RetryPolicy;
use crate::store::{Backend, Failure, Outbox};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;
use uuid::Uuid;

/// Moves events from the outbox to a [`Destination`].
///
/// Several relays (tasks or processes) can share one table: claims use
/// `FOR UPDATE SKIP LOCKED` and a lease, so no event is delivered twice while relays are healthy,
/// and the events of a relay that died are taken over once its lease expires. Events of one
/// aggregate are delivered one at a time, in sequence order; a failing event holds back only the
/// later events of its own aggregate.
///
/// On PostgreSQL the relay's own writes (claims and outcomes) commit with
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
    workers: usize,
    poll_interval: Duration,
    lease: Duration,
    retry: RetryPolicy,
    shutdown_timeout: Duration,
    retention: Option<(Retention, Duration)>,
}

/// Configures a [`Relay`].
#[derive(Debug)]
pub struct RelayBuilder<DB: Backend, D: Destination> {
    outbox: Outbox<DB>,
    destination: D,
    config: Config,
}

impl<DB: Backend, D: Destination> RelayBuilder<DB, D> {
    /// Events claimed per batch (default 100). A batch holds at most one event per aggregate.
    pub fn batch_size(mut self, n: usize) -> Self {
        self.config.batch_size = n;
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

    /// How long a claimed event is reserved for this relay (default 30 s). If the relay dies,
    /// another takes the event over after this; it should exceed the slowest delivery.
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

    /// Applies `retention` every `every` while the relay runs.
    pub fn retention(mut self, retention: Retention, every: Duration) -> Self {
        self.config.retention = Some((retention, every));
        self
    }

    /// Checks the configuration.
    pub fn build(self) -> Result<Relay<DB, D>> {
        let c = &self.config;
        if c.batch_size == 0 || c.workers == 0 {
            return Err(Error::Config(
                "batch_size and workers must be at least 1".into(),
            ));
        }
        if c.lease.is_zero() || c.poll_interval.is_zero() {
            return Err(Error::Config(
                "lease and poll_interval must be longer than zero".into(),
            ));
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
                workers: 1,
                poll_interval: Duration::from_secs(1),
                lease: Duration::from_secs(30),
                retry: RetryPolicy::default(),
                shutdown_timeout: Duration::from_secs(30),
                retention: None,
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
    /// Dropping the returned future stops everything at once, like a crash: claimed events are
    /// redelivered after their lease. Nothing is lost either way.
    pub async fn run(&self, shutdown: CancellationToken) -> Result<()> {
        let relay_id = Uuid::now_v7();
        let span =
            tracing::info_span!("outbox.relay", %relay_id, table = %self.shared.outbox.table());
        async {
            tracing::info!(workers = self.shared.config.workers, "relay started");
            // `abandon` stops batches that outlive the shutdown timeout.
            let abandon = CancellationToken::new();
            let background = shutdown.child_token();
            let (wake_tx, wake_rx) = watch::channel(0u64);
            // A JoinSet aborts its tasks when dropped: dropping `run` stops the workers too.
            let mut tasks = JoinSet::new();
            for worker in 0..self.shared.config.workers {
                let shared = self.shared.clone();
                let (shutdown, abandon, wake) =
                    (shutdown.clone(), abandon.clone(), wake_rx.clone());
                tasks.spawn(
                    async move { shared.work(shutdown, abandon, wake).await }
                        .instrument(tracing::info_span!("outbox.worker", worker)),
                );
            }
            let mut background_tasks = JoinSet::new();
            background_tasks.spawn(
                DB::backend_listen(
                    self.shared.outbox.pool().clone(),
                    self.shared.outbox.table().clone(),
                    wake_tx,
                    background.clone(),
                )
                .in_current_span(),
            );
            if let Some((retention, every)) = self.shared.config.retention.clone() {
                let outbox = self.shared.outbox.clone();
                let cancel = background.clone();
                background_tasks.spawn(
                    async move { run_retention(outbox, retention, every, cancel).await }
                        .in_current_span(),
                );
            }

            shutdown.cancelled().await;
            tracing::info!("relay stopping; finishing in-flight batches");
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
            while background_tasks.join_next().await.is_some() {}
            tracing::info!("relay stopped");
            Ok(())
        }
        .instrument(span)
        .await
    }
}

impl<DB: Backend, D: Destination> Shared<DB, D> {
    async fn work(
        &self,
        shutdown: CancellationToken,
        abandon: CancellationToken,
        mut wake: watch::Receiver<u64>,
    ) {
        let mut claim_failures = 0u32;
        while !shutdown.is_cancelled() {
            wake.mark_unchanged();
            let token = Uuid::now_v7();
            let claimed = self
                .outbox
                .claim(self.config.batch_size, self.config.lease, token)
                .instrument(tracing::debug_span!(
                    "outbox.claim",
                    limit = self.config.batch_size
                ))
                .await;
            let batch = match claimed {
                Ok(batch) => {
                    claim_failures = 0;
                    batch
                }
                Err(error) => {
                    claim_failures += 1;
                    let delay = RetryPolicy::exponential(Duration::from_millis(100))
                        .max_delay(self.config.poll_interval.max(Duration::from_secs(5)))
                        .delay(claim_failures);
                    tracing::error!(%error, retry_in = ?delay, "claiming outbox events failed");
                    tokio::select! {
                        _ = shutdown.cancelled() => return,
                        _ = tokio::time::sleep(delay) => continue,
                    }
                }
            };
            if batch.is_empty() {
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = wake.changed() => {}
                    _ = tokio::time::sleep(self.config.poll_interval) => {}
                }
                continue;
            }
            let span = tracing::info_span!("outbox.deliver", batch = batch.len(), %token);
            let results = tokio::select! {
                results = self.destination.deliver(&batch).instrument(span.clone()) => results,
                _ = abandon.cancelled() => return,
            };
            self.record(token, &batch, results).instrument(span).await;
        }
    }

    /// Writes the outcome of a batch in one transaction of set-based statements. If the
    /// database is unreachable the rows stay leased and are delivered again after the lease (at
    /// least once).
    async fn record(&self, token: Uuid, batch: &[Envelope], results: Vec<DeliveryResult>) {
        if results.len() != batch.len() {
            tracing::error!(
                expected = batch.len(),
                got = results.len(),
                "destination returned a result count that does not match the batch; \
                 leaving the batch to its lease"
            );
            return;
        }
        let mut delivered = Vec::with_capacity(batch.len());
        let mut failed = Vec::new();
        for (envelope, result) in batch.iter().zip(results) {
            match result {
                Ok(()) => delivered.push(envelope.id),
                Err(error) => failed.push(self.failure(envelope, error)),
            }
        }
        for attempt in 1..=3u32 {
            let outcome = self.outbox.record(token, &delivered, &failed).await;
            match outcome {
                Ok(()) => return,
                Err(error) if attempt < 3 => {
                    tracing::debug!(%error, attempt, "recording delivery outcome failed; retrying");
                    tokio::time::sleep(Duration::from_millis(100 * u64::from(attempt))).await;
                }
                Err(error) => tracing::error!(
                    %error,
                    "cannot record delivery outcome; the batch will be redelivered after its lease"
                ),
            }
        }
    }

    /// Decides what happens to a failed event, and logs it: the one place delivery failures
    /// are logged.
    fn failure(&self, envelope: &Envelope, error: DeliveryError) -> Failure {
        let next = self.config.retry.next_delay(envelope.attempt, error.retry);
        let (dead, retry_in) = (next.is_none(), next.unwrap_or_default());
        if dead {
            tracing::error!(
                event_id = %envelope.id,
                event_type = %envelope.event_type,
                aggregate_type = %envelope.aggregate_type,
                aggregate_id = %envelope.aggregate_id,
                attempt = envelope.attempt,
                reason = %error.reason,
                "outbox event is dead"
            );
        } else {
            tracing::warn!(
                event_id = %envelope.id,
                event_type = %envelope.event_type,
                aggregate_type = %envelope.aggregate_type,
                aggregate_id = %envelope.aggregate_id,
                attempt = envelope.attempt,
                reason = %error.reason,
                retry_in = ?retry_in,
                "outbox delivery failed; will retry"
            );
        }
        Failure {
            id: envelope.id,
            dead,
            retry_in,
            reason: error.reason,
        }
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
