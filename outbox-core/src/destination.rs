use crate::event::Envelope;
use std::collections::HashSet;
use std::future::Future;
use std::time::Duration;

/// Why one event could not be delivered, and whether to try again.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeliveryError {
    /// Retry (after the policy's backoff, or after the given delay) or give up.
    pub retry: Retry,
    /// A human-readable reason, stored in the row's `last_error`.
    pub reason: String,
}

/// What to do after a failed delivery.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Retry {
    /// Try again after the retry policy's backoff, until the maximum attempts.
    Backoff,
    /// Try again no earlier than this delay (still bounded by the maximum attempts).
    After(Duration),
    /// Do not try again: the event goes dead at once.
    Never,
    /// The destination could not be reached (a broker restarting, a leader election, a
    /// connection lost): try again after the first backoff step, without counting the attempt,
    /// however long the outage lasts.
    Unavailable,
    /// Not tried: an earlier event of its aggregate failed in this batch (or the destination
    /// could not get to it). Delivered again later, in order; no attempt is counted.
    NotAttempted,
}

impl DeliveryError {
    /// A failure worth retrying.
    pub fn retry(reason: impl Into<String>) -> Self {
        Self {
            retry: Retry::Backoff,
            reason: reason.into(),
        }
    }

    /// A failure retried no earlier than `delay`.
    pub fn retry_after(delay: Duration, reason: impl Into<String>) -> Self {
        Self {
            retry: Retry::After(delay),
            reason: reason.into(),
        }
    }

    /// The destination could not be reached: retried without counting the attempt (see
    /// [`Retry::Unavailable`]). Use it only where the broker's state shows an outage, never for
    /// an answer about the message itself.
    pub fn unavailable(reason: impl Into<String>) -> Self {
        Self {
            retry: Retry::Unavailable,
            reason: reason.into(),
        }
    }

    /// The event was not tried (see [`Retry::NotAttempted`]): what a destination returns for
    /// the events of a run after the run's first failure.
    pub fn not_attempted(reason: impl Into<String>) -> Self {
        Self {
            retry: Retry::NotAttempted,
            reason: reason.into(),
        }
    }

    /// Not sent because an earlier event of its aggregate failed in this batch: what a
    /// destination returns for the rest of a run after the run's first failure.
    pub fn held_back() -> Self {
        Self::not_attempted("not sent: an earlier event of its aggregate failed")
    }

    /// Not sent because the relay's delivery time ran out before its turn.
    pub fn out_of_time() -> Self {
        Self::not_attempted("not sent: the relay's delivery time ran out before its turn")
    }

    /// A failure that retrying cannot fix: the event goes dead with this reason.
    pub fn permanent(reason: impl Into<String>) -> Self {
        Self {
            retry: Retry::Never,
            reason: reason.into(),
        }
    }
}

impl std::fmt::Display for DeliveryError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.reason)
    }
}

impl std::error::Error for DeliveryError {}

/// The outcome of one event in a delivered batch, in the batch's order.
pub type DeliveryResult = Result<(), DeliveryError>;

/// Where a relay sends the events it claims: the typed-handler [`Dispatcher`](crate::Dispatcher),
/// a broker [`Transport`], or your own.
///
/// The relay hands over a whole batch so that a destination can pipeline it; the returned vector
/// has one result per event, in the same order. An event is marked delivered only when its result
/// is `Ok`.
///
/// A batch holds runs: the events of one aggregate are consecutive and in `seq` order. Deliver
/// them in that order (a broker's ordered pipeline, or one after the other), and stop a run at
/// its first failure that you know of before sending the next event: return
/// [`DeliveryError::not_attempted`] for the events you did not send. The relay settles each run
/// in order: a delivered event is recorded, a dead event (with the default
/// [`DeadLetters::Skip`](crate::DeadLetters)) is recorded and the run goes on, the first event
/// to retry (or to park) stops it and the events after it are delivered again after it.
pub trait Destination: Send + Sync + 'static {
    /// Delivers `batch`; returns one result per event, in order.
    fn deliver(&self, batch: &[Envelope]) -> impl Future<Output = Vec<DeliveryResult>> + Send;

    /// Delivers `batch` within `budget`: what the relay calls. A destination whose runs can
    /// take long (handlers: user code) overrides it to bound each run on its own, so that one
    /// slow run costs the others nothing; the relay abandons the whole batch a little after
    /// `budget` otherwise. The default calls [`deliver`](Self::deliver).
    fn deliver_within(
        &self,
        batch: &[Envelope],
        budget: Duration,
    ) -> impl Future<Output = Vec<DeliveryResult>> + Send {
        let _ = budget;
        self.deliver(batch)
    }

    /// How long a delivery can still complete after it started, whatever the budget: a broker
    /// client that keeps retrying on its own (Kafka's `message.timeout.ms`). A delivery the
    /// relay gave up on must not be confirmed after another relay took the aggregate over, so
    /// the relay refuses a lease whose delivery budget is shorter, and starts no delivery with
    /// less time left than this. Wrappers of a destination must pass it on. `None` (the
    /// default): deliveries end with their budget.
    fn delivery_timeout(&self) -> Option<Duration> {
        None
    }

    /// Checks the destination's own configuration; [`RelayBuilder::build`](crate::RelayBuilder::build)
    /// calls it, so that a bad name from configuration (`"outbox; DROP TABLE x"` as a subject
    /// prefix) is a clear error at start-up and nothing is published. Wrappers of a destination
    /// must pass it on. The default accepts everything.
    fn validate(&self) -> crate::Result<()> {
        Ok(())
    }

    /// Where events of `event_type` go, as the `destination` label of the relay's
    /// [metrics](crate::metrics): a transport's name, `handlers`, or a router's route. Keep it
    /// to a few fixed names. The default is `custom`.
    fn name_for(&self, event_type: &str) -> &str {
        let _ = event_type;
        "custom"
    }
}

/// A message broker the relay publishes to. Broker crates (`outbox-kafka`, `outbox-amqp`,
/// `outbox-nats`) implement it; every `Transport` is a [`Destination`].
///
/// `publish` must return `Ok` for an event only once the broker has confirmed it (acks, publisher
/// confirms, JetStream ack), and should keep many confirmations outstanding rather than waiting
/// for each in turn.
pub trait Transport: Send + Sync + 'static {
    /// A short name for logs and routing, for instance `"kafka"`.
    fn name(&self) -> &str;

    /// Publishes `batch`; returns one result per event, in order.
    fn publish(&self, batch: &[Envelope]) -> impl Future<Output = Vec<DeliveryResult>> + Send;

    /// Publishes `batch` within `budget` (see [`Destination::deliver_within`]). The default
    /// calls [`publish`](Self::publish); broker clients bound their own waits.
    fn publish_within(
        &self,
        batch: &[Envelope],
        budget: Duration,
    ) -> impl Future<Output = Vec<DeliveryResult>> + Send {
        let _ = budget;
        self.publish(batch)
    }

    /// See [`Destination::delivery_timeout`].
    fn delivery_timeout(&self) -> Option<Duration> {
        None
    }

    /// See [`Destination::validate`]: broker crates check the names they were configured with
    /// (a subject prefix, a topic prefix, an exchange).
    fn validate(&self) -> crate::Result<()> {
        Ok(())
    }
}

impl<T: Transport> Destination for T {
    fn deliver(&self, batch: &[Envelope]) -> impl Future<Output = Vec<DeliveryResult>> + Send {
        self.publish(batch)
    }

    fn deliver_within(
        &self,
        batch: &[Envelope],
        budget: Duration,
    ) -> impl Future<Output = Vec<DeliveryResult>> + Send {
        self.publish_within(batch, budget)
    }

    fn delivery_timeout(&self) -> Option<Duration> {
        Transport::delivery_timeout(self)
    }

    fn validate(&self) -> crate::Result<()> {
        Transport::validate(self)
    }

    fn name_for(&self, _event_type: &str) -> &str {
        self.name()
    }
}

/// The aggregates of a batch whose run has stopped at a failure: a destination sends nothing
/// more of them in this batch, so that nothing overtakes the failed event.
#[derive(Debug, Default)]
pub struct StoppedRuns<'a>(HashSet<(&'a str, &'a str)>);

impl<'a> StoppedRuns<'a> {
    /// No run stopped yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// Whether the run of `envelope`'s aggregate has stopped.
    pub fn contains(&self, envelope: &Envelope) -> bool {
        self.0.contains(&(
            envelope.aggregate_type.as_str(),
            envelope.aggregate_id.as_str(),
        ))
    }

    /// Stops the run of `envelope`'s aggregate.
    pub fn stop(&mut self, envelope: &'a Envelope) {
        self.0.insert((
            envelope.aggregate_type.as_str(),
            envelope.aggregate_id.as_str(),
        ));
    }
}

/// Why a delivery step with `left` of its budget is not started on a destination whose client
/// keeps retrying on its own for `timeout` (see [`Destination::delivery_timeout`]): it could be
/// confirmed after the lease, behind a relay that took the aggregates over.
pub(crate) fn too_late_to_start(
    timeout: Option<Duration>,
    left: Duration,
) -> Option<DeliveryError> {
    let timeout = timeout.filter(|t| *t > left)?;
    Some(DeliveryError::not_attempted(format!(
        "not sent: {left:?} left of the lease, less than the destination's own delivery timeout {timeout:?}"
    )))
}
