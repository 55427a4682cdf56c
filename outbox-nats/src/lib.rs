//! NATS JetStream for the outbox framework (`async-nats`).
//!
//! - [`NatsTransport`] publishes outbox events to JetStream: subject
//!   `[<prefix>.]<topic>.<event_type>`, header `Nats-Msg-Id` = the outbox id (the server drops a
//!   republished duplicate within the stream's duplicate window), the outbox metadata as headers,
//!   and every publish acknowledged by the stream before the event counts as delivered. A batch
//!   is published with all its acknowledgements outstanding at once.
//! - [`NatsConsumer`] reads a JetStream pull consumer into the same typed handlers as the relay
//!   (`#[outbox::handler]`): the core's [`Consumer`] loop over a [`NatsSource`], acking after
//!   success, retrying in place (later messages of the aggregate wait), and terminating
//!   (`+TERM`) a message that failed for good.
//! - [`ensure_stream`] creates the stream the transport publishes into.
//!
//! ```no_run
//! # async fn demo<DB: outbox_core::Backend>(outbox: outbox_core::Outbox<DB>) -> Result<(), async_nats::Error> {
//! use outbox_core::{Relay, CancellationToken};
//! use outbox_nats::{ensure_stream, NatsTransport};
//!
//! let client = async_nats::connect("127.0.0.1:4222").await?;
//! let js = async_nats::jetstream::new(client);
//! ensure_stream(&js, "PAYMENTS", vec!["payments.>".into()]).await?;
//! let relay = Relay::builder(outbox, NatsTransport::new(js)).build()?;
//! relay.run(CancellationToken::new()).await?;
//! # Ok(()) }
//! ```

use async_nats::header::{HeaderName, HeaderValue};
use async_nats::jetstream::context::{GetStreamByNameErrorKind, PublishError, PublishErrorKind};
use async_nats::jetstream::{self, consumer::PullConsumer, AckKind};
use async_nats::HeaderMap;
use futures_util::StreamExt;
use outbox_core::consumer::{Consumer, Received, Source};
use outbox_core::{DeliveryError, DeliveryResult, Envelope, Error, StoppedRuns, Transport};
use std::str::FromStr;
use std::time::Duration;
use tracing::Instrument;

pub use async_nats;

/// The JetStream header that makes the server drop duplicates.
pub const MSG_ID: &str = "Nats-Msg-Id";

/// Publishes outbox events to NATS JetStream.
#[derive(Debug, Clone)]
pub struct NatsTransport {
    js: jetstream::Context,
    name: String,
    prefix: Option<String>,
}

impl NatsTransport {
    /// A transport named `"nats"` publishing through `js`.
    pub fn new(js: jetstream::Context) -> Self {
        Self {
            js,
            name: "nats".to_owned(),
            prefix: None,
        }
    }

    /// Names the transport for a [`Router`](outbox_core::Router) (default `"nats"`).
    pub fn named(mut self, name: impl Into<String>) -> Self {
        self.name = name.into();
        self
    }

    /// Puts `prefix.` before every subject (an environment or tenant namespace). A prefix that
    /// is not a literal subject (`"a b"`, `"a.*"`, `"a..b"`) makes the relay's `build` fail.
    pub fn subject_prefix(mut self, prefix: impl Into<String>) -> Self {
        self.prefix = Some(prefix.into());
        self
    }

    /// The subject an event is published on: `[<prefix>.]<topic>.<event_type>`.
    pub fn subject(&self, envelope: &Envelope) -> String {
        match &self.prefix {
            Some(prefix) => format!("{prefix}.{}.{}", envelope.topic, envelope.event_type),
            None => format!("{}.{}", envelope.topic, envelope.event_type),
        }
    }
}

/// The NATS headers of an event: `Nats-Msg-Id` and the outbox metadata.
///
/// A name or value NATS cannot carry (a `\r` or `\n`, a `:` or a control character in a name)
/// is an error naming the header: it fails that event only, never the relay.
pub fn headers(envelope: &Envelope) -> Result<HeaderMap, DeliveryError> {
    let mut headers = HeaderMap::new();
    headers.insert(MSG_ID, envelope.id.to_string().as_str());
    for (key, value) in envelope.wire_headers() {
        let name = HeaderName::from_str(&key).map_err(|e| {
            DeliveryError::permanent(format!("NATS cannot carry header name {key:?}: {e}"))
        })?;
        let value = HeaderValue::from_str(&value).map_err(|e| {
            DeliveryError::permanent(format!(
                "NATS cannot carry the value of header {key:?}: {e}"
            ))
        })?;
        headers.insert(name, value);
    }
    Ok(headers)
}

fn publish_failure(error: PublishError) -> DeliveryError {
    let reason = format!("NATS JetStream refused the event: {error}");
    match error.kind() {
        // Retrying cannot make a message smaller.
        PublishErrorKind::MaxPayloadExceeded => DeliveryError::permanent(reason),
        // No ack in time, or the connection broke: the server is restarting or unreachable.
        PublishErrorKind::TimedOut | PublishErrorKind::BrokenPipe => {
            DeliveryError::unavailable(reason)
        }
        // Decided in `confirm_stream_missing`: async-nats reports "no responders" this way,
        // which a restarting server or a moving stream leader answers too.
        PublishErrorKind::StreamNotFound => DeliveryError::unavailable(reason),
        _ => DeliveryError::retry(reason),
    }
}

/// Acknowledgements one batch awaits at once: far below the context's in-flight limit, so
/// that batches side by side never exhaust it.
const ACKS_IN_FLIGHT: usize = 256;

/// The server's answer to a sent event.
async fn acknowledged(sent: Sent) -> Result<(), (Option<PublishErrorKind>, DeliveryError)> {
    sent?
        .await
        .map(|_| ())
        .map_err(|e| (Some(e.kind()), publish_failure(e)))
}

type Sent = Result<
    async_nats::jetstream::context::PublishAckFuture,
    (Option<PublishErrorKind>, DeliveryError),
>;

impl NatsTransport {
    /// Sends one event; the returned future resolves to the server's acknowledgement.
    async fn send(&self, envelope: &Envelope) -> Sent {
        let span = tracing::debug_span!(
            "outbox.publish",
            transport = %self.name,
            event_id = %envelope.id,
            event_type = %envelope.event_type,
            aggregate_type = %envelope.aggregate_type,
            aggregate_id = %envelope.aggregate_id,
            attempt = envelope.attempt,
        );
        let headers = headers(envelope).map_err(|refused| (None, refused))?;
        self.js
            .publish_with_headers(
                self.subject(envelope),
                headers,
                envelope.payload.clone().into(),
            )
            .instrument(span)
            .await
            .map_err(|e| (Some(e.kind()), publish_failure(e)))
    }

    /// "No stream" is permanent only when the server's state says so: asked which stream
    /// captures the subject, it answers none. A reply during an outage (no responders while a
    /// server restarts or a leader is elected) is an outage.
    async fn confirm_stream_missing(&self, subject: String, failure: &mut DeliveryError) {
        match self.js.stream_by_subject(subject.clone()).await {
            Err(e) if e.kind() == GetStreamByNameErrorKind::NotFound => {
                *failure = DeliveryError::permanent(format!(
                    "NATS JetStream has no stream for subject {subject:?}"
                ));
            }
            Ok(stream) => {
                failure.reason =
                    format!("{} (stream {stream} captures it: retrying)", failure.reason);
            }
            Err(_) => {}
        }
    }

    /// Publishes `batch`, sending nothing more once `deadline` (the relay's lease, less a
    /// margin) has passed: a relay frozen mid-batch (a GC pause, a stopped VM) stops sending when
    /// it resumes, and the relay that took its aggregates over publishes them. What the client
    /// had already buffered may still go out; JetStream drops it as a duplicate of the
    /// takeover's publish (`Nats-Msg-Id`, within the stream's duplicate window).
    async fn publish_until(
        &self,
        batch: &[Envelope],
        deadline: Option<tokio::time::Instant>,
    ) -> Vec<DeliveryResult> {
        // Publish in order while the acknowledgements of up to `ACKS_IN_FLIGHT` earlier ones
        // are awaited: pipelined, and never holding more of the context's in-flight permits
        // (5,000 by default, shared by every batch) than a batch can release by itself.
        let mut in_flight = futures_util::stream::FuturesOrdered::new();
        let mut outcomes = Vec::with_capacity(batch.len());
        // Aggregates whose run failed at send time (a header NATS cannot carry, a message over
        // the server's max payload): nothing more of them is sent, so nothing overtakes it.
        let mut stopped = StoppedRuns::new();
        for envelope in batch {
            if in_flight.len() >= ACKS_IN_FLIGHT {
                outcomes.extend(in_flight.next().await);
            }
            let sent = if stopped.contains(envelope) {
                Err((None, DeliveryError::held_back()))
            } else if deadline.is_some_and(|d| tokio::time::Instant::now() >= d) {
                Err((None, DeliveryError::out_of_time()))
            } else {
                self.send(envelope).await
            };
            if sent.is_err() {
                stopped.stop(envelope);
            }
            in_flight.push_back(acknowledged(sent));
        }
        while let Some(outcome) = in_flight.next().await {
            outcomes.push(outcome);
        }
        // One question to the server per subject that "has no stream".
        let mut asked: std::collections::HashMap<String, DeliveryError> = Default::default();
        let mut results = Vec::with_capacity(batch.len());
        for (envelope, outcome) in batch.iter().zip(outcomes) {
            let result = match outcome {
                Ok(()) => Ok(()),
                Err((Some(PublishErrorKind::StreamNotFound), mut failure)) => {
                    let subject = self.subject(envelope);
                    match asked.get(&subject) {
                        Some(known) => failure = known.clone(),
                        None => {
                            self.confirm_stream_missing(subject.clone(), &mut failure)
                                .await;
                            asked.insert(subject, failure.clone());
                        }
                    }
                    Err(failure)
                }
                Err((_, failure)) => Err(failure),
            };
            results.push(result);
        }
        results
    }
}

impl Transport for NatsTransport {
    fn name(&self) -> &str {
        &self.name
    }

    /// The subject prefix must be literal subject tokens: no wildcard, no space, no empty token.
    fn validate(&self) -> Result<(), Error> {
        match &self.prefix {
            Some(prefix) => check_subject_prefix(prefix),
            None => Ok(()),
        }
    }

    async fn publish(&self, batch: &[Envelope]) -> Vec<DeliveryResult> {
        self.publish_until(batch, None).await
    }

    async fn publish_within(&self, batch: &[Envelope], budget: Duration) -> Vec<DeliveryResult> {
        self.publish_until(batch, tokio::time::Instant::now().checked_add(budget))
            .await
    }
}

/// Checks a subject prefix from configuration: dot-separated literal tokens of printable
/// characters, without the wildcards `*` and `>` and at most 255 bytes.
fn check_subject_prefix(prefix: &str) -> Result<(), Error> {
    let reject = |reason| {
        Err(Error::InvalidField {
            field: format!("NATS subject prefix {prefix:?}"),
            reason,
        })
    };
    if prefix.len() > 255 {
        return reject("it is longer than 255 bytes");
    }
    if prefix.split('.').any(str::is_empty) {
        return reject("it has an empty token (a leading, trailing or doubled '.')");
    }
    if prefix
        .chars()
        .any(|c| c.is_whitespace() || c.is_control() || c == '*' || c == '>')
    {
        return reject("subjects take no whitespace, control characters or wildcards (* >)");
    }
    Ok(())
}

/// Creates the stream `name` capturing `subjects` if it does not exist, with a two-minute
/// duplicate window; returns it either way.
pub async fn ensure_stream(
    js: &jetstream::Context,
    name: &str,
    subjects: Vec<String>,
) -> Result<jetstream::stream::Stream, async_nats::Error> {
    Ok(js
        .get_or_create_stream(jetstream::stream::Config {
            name: name.to_owned(),
            subjects,
            duplicate_window: Duration::from_secs(120),
            ..Default::default()
        })
        .await?)
}

/// A JetStream pull consumer as the [`Source`] of a [`Consumer`].
///
/// Deliveries are counted by the server (`num_delivered`), so a message whose handling kills the
/// process is dead-lettered after the retry policy's last attempt. Held messages (running,
/// retrying, or waiting behind an earlier one of their aggregate) are kept from redelivery with
/// in-progress acknowledgements every third of the consumer's ack wait. A dead-lettered message
/// is terminated (`+TERM`): the server stops redelivering it and emits an advisory.
///
/// Messages are pulled in one-shot batches (a pull request of at most 128 messages that lives
/// 2 s). At shutdown the source reads its last batch to the end, so that nothing the server
/// delivered is left pending at the server until its ack wait, and gives back (`Nak`, for
/// immediate redelivery, in order) what the consumer held and then what that batch still held:
/// shutdown takes up to 2 s longer.
pub struct NatsSource {
    consumer: PullConsumer,
    name: String,
    batch: tokio::sync::Mutex<Option<jetstream::consumer::pull::Batch>>,
    /// The last batch, once the consumer stopped taking messages: read to its end, and what it
    /// still delivers given back after what the consumer held.
    stopping: tokio::sync::Mutex<Option<jetstream::consumer::pull::Batch>>,
    /// Whether the first pull waited for what a crashed predecessor left unacknowledged.
    caught_up: std::sync::atomic::AtomicBool,
    /// The predecessor's redeliveries, in stream order, handed out before anything else.
    redelivered: std::sync::Mutex<std::collections::VecDeque<jetstream::Message>>,
}

/// How long a pull request lives at the server: a stopping consumer reads its last one to the
/// end, at most this long.
const PULL_EXPIRES: Duration = Duration::from_secs(2);

/// Messages asked for by one pull request.
const PULL_BATCH: usize = 128;

impl std::fmt::Debug for NatsSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NatsSource")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

impl From<PullConsumer> for NatsSource {
    fn from(consumer: PullConsumer) -> Self {
        let info = consumer.cached_info();
        Self {
            name: format!("nats:{}/{}", info.stream_name, info.name),
            consumer,
            batch: tokio::sync::Mutex::new(None),
            stopping: tokio::sync::Mutex::new(None),
            caught_up: std::sync::atomic::AtomicBool::new(false),
            redelivered: std::sync::Mutex::default(),
        }
    }
}

/// Reads a JetStream pull consumer into typed handlers: the core's [`Consumer`] over a
/// [`NatsSource`].
///
/// ```no_run
/// # async fn demo(js: async_nats::jetstream::Context) -> Result<(), Box<dyn std::error::Error>> {
/// use outbox_core::{CancellationToken, Dispatcher};
/// use outbox_nats::NatsConsumer;
///
/// let stream = js.get_stream("PAYMENTS").await?;
/// let pull = stream
///     .get_or_create_consumer("billing", async_nats::jetstream::consumer::pull::Config {
///         durable_name: Some("billing".into()),
///         ..Default::default()
///     })
///     .await?;
/// NatsConsumer::new(pull, Dispatcher::from_inventory()?)
///     .run(CancellationToken::new())
///     .await?;
/// # Ok(()) }
/// ```
pub type NatsConsumer = Consumer<NatsSource>;

impl NatsSource {
    /// A consumer that crashed leaves messages delivered and unacknowledged; JetStream
    /// redelivers them only after the ack wait, and meanwhile hands out newer messages at once,
    /// so a new consumer would handle an aggregate's later events before the earlier ones. At
    /// start, with messages pending acknowledgement, the source first fetches what comes at
    /// once (what a graceful predecessor gave back); if more is pending, it waits out the ack
    /// wait, or the longest step of the consumer's `backoff` (keeping the fetched alive), and
    /// fetches the rest. It hands all of it out in stream order, before anything newer. A
    /// restart after a crash costs that wait; a restart after a graceful stop about a second
    /// (the stopping source gave back everything it had been delivered).
    async fn wait_for_redeliveries(&self) -> std::collections::VecDeque<jetstream::Message> {
        // Right after a server restart the first requests can fail: a few tries before the
        // consumer starts without the catch-up (and says so).
        let read_info = || async {
            let mut tries = 0;
            loop {
                match self.consumer.get_info().await {
                    Ok(info) => return Some(info),
                    Err(error) if tries < 4 => {
                        tries += 1;
                        tracing::debug!(source = %self.name, %error, "reading the JetStream consumer's state; trying again");
                        tokio::time::sleep(Duration::from_millis(250 << tries)).await;
                    }
                    Err(error) => {
                        tracing::warn!(
                            source = %self.name,
                            %error,
                            "cannot read the JetStream consumer's state; starting without waiting \
                             for a crashed predecessor's messages, which may come back out of order"
                        );
                        return None;
                    }
                }
            }
        };
        let Some(info) = read_info().await else {
            return Default::default();
        };
        if info.num_ack_pending == 0 {
            return Default::default();
        }
        // What a predecessor gave back when it stopped gracefully comes back at once.
        let mut fetched = self.fetch(info.num_ack_pending).await;
        let Some(after) = read_info().await else {
            return sorted(fetched);
        };
        if after.num_ack_pending > fetched.len() {
            // The rest was left by a predecessor that died: it comes back only once its ack
            // wait expired. Wait for it, keeping what was fetched alive.
            let wait = longest_redelivery_wait(&after.config) + Duration::from_millis(100);
            tracing::info!(
                source = %self.name,
                pending = after.num_ack_pending - fetched.len(),
                wait_ms = wait.as_millis() as u64,
                "messages of a previous consumer await redelivery; waiting for them so that \
                 every aggregate stays in order"
            );
            let deadline = tokio::time::Instant::now() + wait;
            let period = self.keep_alive_every().unwrap_or(PULL_EXPIRES);
            while tokio::time::Instant::now() < deadline {
                tokio::time::sleep_until(deadline.min(tokio::time::Instant::now() + period)).await;
                for message in &fetched {
                    let _ = message.ack_with(AckKind::Progress).await;
                }
            }
            fetched.extend(self.fetch(after.num_ack_pending - fetched.len()).await);
        }
        sorted(fetched)
    }

    /// What the last pull request still delivers until it ends (the server's timeout at its
    /// expiry, at most [`PULL_EXPIRES`] after it was made), with `held` kept alive meanwhile.
    async fn drain_last_batch(&self, held: &[&jetstream::Message]) -> Vec<jetstream::Message> {
        let Some(mut batch) = self.stopping.lock().await.take() else {
            return Vec::new();
        };
        let deadline = tokio::time::Instant::now() + PULL_EXPIRES + Duration::from_millis(500);
        let period = self.keep_alive_every().unwrap_or(PULL_EXPIRES);
        let mut keep_alive_at = tokio::time::Instant::now() + period;
        let mut drained = Vec::new();
        loop {
            tokio::select! {
                next = batch.next() => match next {
                    Some(Ok(message)) => drained.push(message),
                    Some(Err(error)) => {
                        tracing::debug!(source = %self.name, %error, "the last pull ended with an error");
                        break;
                    }
                    None => break,
                },
                _ = tokio::time::sleep_until(deadline.min(keep_alive_at)) => {
                    if tokio::time::Instant::now() >= deadline {
                        break;
                    }
                    for message in held {
                        let _ = message.ack_with(AckKind::Progress).await;
                    }
                    keep_alive_at = tokio::time::Instant::now() + period;
                }
            }
        }
        drained
    }

    /// Up to `count` messages available within a second.
    async fn fetch(&self, count: usize) -> Vec<jetstream::Message> {
        let batch = self
            .consumer
            .fetch()
            .max_messages(count)
            .expires(Duration::from_secs(1))
            .messages()
            .await;
        let mut fetched = Vec::with_capacity(count);
        match batch {
            Ok(mut batch) => {
                while let Some(message) = batch.next().await {
                    match message {
                        Ok(message) => fetched.push(message),
                        Err(error) => {
                            tracing::warn!(source = %self.name, %error, "fetching redeliveries");
                            break;
                        }
                    }
                }
            }
            Err(error) => {
                tracing::warn!(source = %self.name, %error, "fetching redeliveries");
            }
        }
        fetched
    }
}

/// The longest a delivered, unacknowledged message waits before JetStream redelivers it: the
/// ack wait, or with a `backoff` the longest of its steps (it replaces the ack wait).
fn longest_redelivery_wait(config: &jetstream::consumer::Config) -> Duration {
    config
        .backoff
        .iter()
        .copied()
        .max()
        .map_or(config.ack_wait, |longest| longest.max(config.ack_wait))
}

/// The shortest such wait: keep-alives must come more often than this.
fn shortest_redelivery_wait(config: &jetstream::consumer::Config) -> Duration {
    config
        .backoff
        .iter()
        .copied()
        .min()
        .map_or(config.ack_wait, |shortest| shortest.min(config.ack_wait))
}

/// Messages in stream order: JetStream redelivers in the order the ack timers fired.
fn sorted(mut messages: Vec<jetstream::Message>) -> std::collections::VecDeque<jetstream::Message> {
    messages.sort_by_key(|m| m.info().map(|i| i.stream_sequence).unwrap_or(u64::MAX));
    messages.into()
}
impl Source for NatsSource {
    type Message = jetstream::Message;

    fn name(&self) -> &str {
        &self.name
    }

    async fn receive(&self) -> outbox_core::Result<Option<Received<jetstream::Message>>> {
        let mut batch = self.batch.lock().await;
        let mut failures = 0u32;
        if !self.caught_up.load(std::sync::atomic::Ordering::SeqCst) {
            let redelivered = self.wait_for_redeliveries().await;
            *self.redelivered.lock().expect("not poisoned") = redelivered;
            self.caught_up
                .store(true, std::sync::atomic::Ordering::SeqCst);
        }
        if let Some(message) = self.redelivered.lock().expect("not poisoned").pop_front() {
            return Ok(Some(received(message)));
        }
        loop {
            if batch.is_none() {
                match self
                    .consumer
                    .batch()
                    .max_messages(PULL_BATCH)
                    .expires(PULL_EXPIRES)
                    .messages()
                    .await
                {
                    Ok(next) => *batch = Some(next),
                    Err(error) => {
                        // The server restarts, or the connection is down: pull again soon.
                        failures += 1;
                        tracing::warn!(source = %self.name, %error, "cannot pull from the NATS consumer; trying again");
                        tokio::time::sleep(Duration::from_millis(50 << failures.min(5))).await;
                        continue;
                    }
                }
            }
            match batch.as_mut().expect("just set").next().await {
                Some(Ok(message)) => return Ok(Some(received(message))),
                Some(Err(error)) => {
                    failures += 1;
                    tracing::warn!(source = %self.name, %error, "NATS pull failed; pulling again");
                    *batch = None;
                    tokio::time::sleep(Duration::from_millis(50 << failures.min(5))).await;
                }
                // The pull request expired or was filled: the next one.
                None => *batch = None,
            }
        }
    }

    async fn ack(&self, message: &jetstream::Message) -> outbox_core::Result<()> {
        message.ack().await.map_err(Error::broker)
    }

    async fn dead_letter(
        &self,
        message: &jetstream::Message,
        _reason: &str,
    ) -> outbox_core::Result<()> {
        message.ack_with(AckKind::Term).await.map_err(Error::broker)
    }

    async fn stop(&self) -> outbox_core::Result<()> {
        *self.stopping.lock().await = self.batch.lock().await.take();
        Ok(())
    }

    /// Reads the last pull request to its end (what the server still delivers into it would
    /// otherwise come back only after the ack wait, behind the ones released now), keeping
    /// `messages` alive meanwhile; then `Nak`s for immediate redelivery, in order, `messages`
    /// and after them what the last request delivered.
    async fn release(&self, messages: &[&jetstream::Message]) -> outbox_core::Result<()> {
        let leftovers = self.drain_last_batch(messages).await;
        for message in messages.iter().copied().chain(&leftovers) {
            message
                .ack_with(AckKind::Nak(None))
                .await
                .map_err(Error::broker)?;
        }
        Ok(())
    }

    /// Gives back what the last pull request delivered, when the consumer held nothing to
    /// release.
    async fn close(&self) -> outbox_core::Result<()> {
        for message in self.drain_last_batch(&[]).await {
            message
                .ack_with(AckKind::Nak(None))
                .await
                .map_err(Error::broker)?;
        }
        Ok(())
    }

    async fn keep_alive(&self, message: &jetstream::Message) -> outbox_core::Result<()> {
        message
            .ack_with(AckKind::Progress)
            .await
            .map_err(Error::broker)
    }

    fn keep_alive_every(&self) -> Option<Duration> {
        let shortest = shortest_redelivery_wait(&self.consumer.cached_info().config);
        Some((shortest / 3).max(Duration::from_millis(100)))
    }
}

fn received(message: jetstream::Message) -> Received<jetstream::Message> {
    let deliveries = message
        .info()
        .ok()
        .map(|info| u32::try_from(info.delivered).unwrap_or(u32::MAX));
    let envelope = std::str::from_utf8(&message.payload)
        .map_err(|e| format!("payload is not UTF-8: {e}"))
        .and_then(|payload| {
            let headers = message.headers.as_ref();
            Envelope::from_wire(
                headers.into_iter().flat_map(|h| {
                    h.iter()
                        .filter_map(|(k, v)| Some((k.as_ref(), v.first()?.as_str())))
                }),
                payload.to_owned(),
                1,
            )
        });
    Received::new(message, envelope, deliveries)
}
