//! The one consumer loop: broker messages into typed handlers, for every broker.
//!
//! A transport supplies a [`Source`] (receive, acknowledge, dead-letter); [`Consumer`] does the
//! rest the same way everywhere:
//! - messages of different aggregates are handled side by side (up to
//!   [`concurrency`](Consumer::concurrency)); the messages of one aggregate one after the other,
//!   in the order received;
//! - a message that fails is retried in place after the [`RetryPolicy`]'s backoff, and holds
//!   back the later messages of its aggregate, and only those, until it succeeds or is
//!   dead-lettered;
//! - a message is acknowledged only after its handler succeeded or it was dead-lettered; if
//!   dead-lettering fails, the message stays held and dead-lettering is tried again;
//! - with an [`Inbox`] for attempt counts ([`Consumer::attempts_in`]), each attempt is counted
//!   in its table before it runs, so a message that kills the process is dead-lettered after
//!   the policy's last attempt instead of killing it for ever. Brokers' delivery counts cannot
//!   do this: a message held behind its aggregate's culprit is redelivered after each crash
//!   as often as the culprit, without ever being attempted. A message whose earlier attempts
//!   never finished runs alone (nothing else runs beside it) before it goes back to running
//!   side by side: the messages that were only running beside the culprit when it crashed the
//!   process are charged that one crash, not every crash after it. Without an inbox, attempts
//!   are counted in memory and start again after a restart;
//! - shutdown stops receiving, lets running handlers finish (up to
//!   [`shutdown_timeout`](Consumer::shutdown_timeout)) and acknowledges nothing that was not
//!   handled.

mod source;

pub use source::{Received, Source};

use crate::error::Result;
use crate::event::Envelope;
use crate::handler::Dispatcher;
use crate::inbox::Inbox;
use crate::retry::RetryPolicy;
use crate::store::Backend;
use futures_util::future::BoxFuture;
use futures_util::stream::FuturesUnordered;
use futures_util::{FutureExt, StreamExt};
use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, VecDeque};
use std::fmt;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;
use uuid::Uuid;

/// Reads a broker's messages into typed handlers; see the [module](self) for what it
/// guarantees. The transports name theirs (`NatsConsumer`, `KafkaConsumer`, `AmqpConsumer`).
///
/// ```no_run
/// # async fn demo<S: outbox_core::consumer::Source>(source: S) -> outbox_core::Result<()> {
/// use outbox_core::{consumer::Consumer, CancellationToken, Dispatcher, RetryPolicy};
/// use std::time::Duration;
///
/// let consumer = Consumer::<S>::new(source, Dispatcher::from_inventory()?)
///     .concurrency(32)
///     .retry(RetryPolicy::exponential(Duration::from_millis(200)).max_attempts(5))
///     .shutdown_timeout(Duration::from_secs(20));
/// let shutdown = CancellationToken::new();
/// consumer.run(shutdown).await
/// # }
/// ```
pub struct Consumer<S: Source> {
    source: Arc<S>,
    dispatcher: Dispatcher,
    retry: RetryPolicy,
    concurrency: usize,
    window: usize,
    shutdown_timeout: Duration,
    attempts: Option<Arc<dyn AttemptLog>>,
}

impl<S: Source + fmt::Debug> fmt::Debug for Consumer<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Consumer")
            .field("source", &self.source)
            .field("retry", &self.retry)
            .field("concurrency", &self.concurrency)
            .field("window", &self.window)
            .field("shutdown_timeout", &self.shutdown_timeout)
            .field("attempts_in_inbox", &self.attempts.is_some())
            .finish_non_exhaustive()
    }
}

impl<S: Source> Consumer<S> {
    /// Consumes `source` into `dispatcher`'s handlers.
    pub fn new(source: impl Into<S>, dispatcher: Dispatcher) -> Self {
        Self {
            source: Arc::new(source.into()),
            dispatcher,
            retry: RetryPolicy::default(),
            concurrency: 32,
            window: 256,
            shutdown_timeout: Duration::from_secs(30),
            attempts: None,
        }
    }

    /// How failures are retried (default [`RetryPolicy::default`]): the backoff between
    /// attempts, and the attempt after which a message is dead-lettered.
    pub fn retry(mut self, policy: RetryPolicy) -> Self {
        self.retry = policy;
        self
    }

    /// How many handlers run at once, never two of one aggregate (default 32).
    pub fn concurrency(mut self, n: usize) -> Self {
        self.concurrency = n.max(1);
        self
    }

    /// How many received messages the consumer holds at most, running, waiting for a retry or
    /// waiting behind an earlier message of their aggregate (default 256). It bounds memory;
    /// when one failing aggregate holds the whole window, the others wait too, so keep it well
    /// above the number of aggregates you expect to fail at once.
    pub fn window(mut self, n: usize) -> Self {
        self.window = n.max(1);
        self
    }

    /// How long shutdown waits for running handlers (default 30 s). A handler still running
    /// then is dropped; its message is not acknowledged and comes back.
    pub fn shutdown_timeout(mut self, timeout: Duration) -> Self {
        self.shutdown_timeout = timeout;
        self
    }

    /// Counts attempts in `inbox`'s table (`<table>_attempts`), one statement before each
    /// attempt and one after the message is finished, so a restart does not reset them and a
    /// message that crashes the consumer process is dead-lettered after the retry policy's last
    /// attempt. Without it, attempts are counted in memory: such a message is retried for ever.
    ///
    /// The broker's own delivery count (JetStream's `num_delivered`, RabbitMQ's
    /// `x-delivery-count`) is not used for this: the messages held behind a failing one of
    /// their aggregate are redelivered after each crash exactly as often as the culprit, and
    /// would die with it. For the same reason, after a crash every message whose earlier
    /// attempts never finished runs alone once, one after the other: a crash while it runs
    /// alone is its own, and a message that was only running beside the culprit is charged
    /// one crash at most.
    pub fn attempts_in<DB: Backend>(mut self, inbox: Inbox<DB>) -> Self {
        self.attempts = Some(Arc::new(inbox));
        self
    }

    /// The source.
    pub fn source(&self) -> &S {
        &self.source
    }

    /// Consumes until `shutdown` is cancelled or the source ends, then stops gracefully (see
    /// [`shutdown_timeout`](Self::shutdown_timeout)). An error of the source stops it the same
    /// way and is returned.
    pub async fn run(&self, shutdown: CancellationToken) -> Result<()> {
        let stop = CancellationToken::new();
        // Dropped (its task aborted), the loop still stops its receiver.
        let _stop_on_drop = stop.clone().drop_guard();
        let room = Arc::new(Semaphore::new(self.window));
        let (tx, mut rx) = mpsc::channel(self.window.min(64));
        let receiver = tokio::spawn(
            receive(self.source.clone(), room, tx, stop.clone())
                .instrument(tracing::Span::current()),
        );
        let mut held = Held::new(self.window);
        let mut running = FuturesUnordered::new();
        let mut keep_alive = self.source.keep_alive_every().map(|period| {
            let mut interval = tokio::time::interval(period);
            interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            interval
        });
        loop {
            while let Some((key, message)) = held.next_to_run(running.len(), self.concurrency) {
                running.push(self.attempt(key, message));
            }
            tokio::select! {
                _ = shutdown.cancelled() => break,
                next = rx.recv() => match next {
                    Some((received, room)) => {
                        if let Some(copy) = held.push(received, room) {
                            self.ack_copy(copy).await;
                        }
                    }
                    // The receiver ended: the source ended or failed.
                    None => break,
                },
                Some((key, message, step)) = running.next(), if !running.is_empty() => {
                    held.finish(key, message, step);
                }
                _ = sleep_until(held.next_wake()) => held.wake_due(),
                _ = tick(&mut keep_alive) => self.keep_alive(&held).await,
            }
        }

        // Stop: receive nothing more, let running handlers finish, acknowledge nothing else.
        stop.cancel();
        let deadline = Instant::now() + self.shutdown_timeout;
        while !running.is_empty() {
            tokio::select! {
                Some((key, message, step)) = running.next() => held.finish(key, message, step),
                _ = tokio::time::sleep_until(deadline) => {
                    tracing::warn!(
                        source = self.source.name(),
                        handlers = running.len(),
                        timeout = ?self.shutdown_timeout,
                        "handlers still running at the shutdown timeout; dropped, their messages \
                         are not acknowledged and come back"
                    );
                    break;
                }
            }
        }
        drop(running);
        let received = match receiver.await {
            Ok((outcome, unsent)) => {
                if let Some((message, room)) = unsent {
                    if let Some(copy) = held.push(message, room) {
                        self.ack_copy(copy).await;
                    }
                }
                outcome
            }
            Err(panic) => Err(crate::Error::broker(format!(
                "the receiving task failed: {panic}"
            ))),
        };
        while let Ok((message, room)) = rx.try_recv() {
            if let Some(copy) = held.push(message, room) {
                self.ack_copy(copy).await;
            }
        }
        // Released messages must go to the next consumer, not back into this one's intake.
        if let Err(error) = self.source.stop().await {
            tracing::warn!(source = self.source.name(), %error, "stopping the source failed");
        }
        self.release(held).await;
        if let Err(error) = self.source.close().await {
            tracing::warn!(source = self.source.name(), %error, "closing the source failed");
        }
        received
    }

    /// One attempt at the head of an aggregate's queue: handle it, or dead-letter it.
    fn attempt(
        &self,
        key: Key,
        mut message: Message<S::Message>,
    ) -> BoxFuture<'_, (Key, Message<S::Message>, Step)> {
        async move {
            let step = self.attempt_at(&mut message).await;
            (key, message, step)
        }
        .boxed()
    }

    async fn attempt_at(&self, message: &mut Message<S::Message>) -> Step {
        if message.dead.is_none() {
            let span = message.span(self.source.name());
            match self.handle(message).instrument(span).await {
                Handled::Ok => return self.ack(message).await,
                Handled::Retry(delay) => return Step::RetryAt(Instant::now() + delay),
                Handled::Alone => return Step::Alone,
                Handled::Dead(reason) => message.dead = Some(reason),
            }
        }
        self.dead_letter(message).await
    }

    async fn handle(&self, message: &mut Message<S::Message>) -> Handled {
        let envelope = match &message.envelope {
            Ok(envelope) => envelope,
            Err(reason) => return Handled::Dead(format!("not an outbox message: {reason}")),
        };
        message.tries += 1;
        let attempt = match &self.attempts {
            Some(log) => match log.count(envelope.id).await {
                Ok(attempt) => attempt,
                Err(error) => {
                    message.tries -= 1;
                    tracing::warn!(%error, "cannot count the attempt in the inbox; trying later");
                    return Handled::Retry(Duration::from_secs(1));
                }
            },
            // A broker's delivery count cannot stand in: a message waiting behind its
            // aggregate's failing one is redelivered after each crash as often as the culprit,
            // without ever having been attempted.
            None => message.tries,
        };
        tracing::Span::current().record("attempt", attempt);
        let max = self.retry.attempts();
        if attempt > max {
            return Handled::Dead(format!(
                "attempt {attempt} of at most {max}: the earlier attempts never finished (the \
                 consumer stopped or crashed while handling this message)"
            ));
        }
        if let (Some(log), false) = (&self.attempts, message.cleared) {
            if attempt > message.tries && !message.alone {
                // Earlier attempts never finished: this message may be what crashed the process,
                // or it was only running beside the culprit. Run alone, a crash is charged to
                // the culprit only; the attempt just counted is taken back until then.
                tracing::info!(
                    attempt,
                    "earlier attempts at this message never finished; it runs alone first"
                );
                message.tries -= 1;
                if let Err(error) = log.uncount(envelope.id).await {
                    tracing::warn!(%error, "cannot take back the attempt count; it stays counted");
                }
                return Handled::Alone;
            }
            message.cleared = true;
        }
        let mut envelope = envelope.clone();
        envelope.attempt = attempt;
        let started = Instant::now();
        let handling = self.dispatcher.dispatch(&envelope);
        let outcome = match self.source.keep_alive_every() {
            None => handling.await,
            Some(period) => {
                keep_alive_while(&*self.source, &message.message, period, handling).await
            }
        };
        let (source, event_type) = (
            self.source.name(),
            self.metric_event_type(&message.envelope),
        );
        crate::metrics::handler_time(source, event_type, started.elapsed());
        match outcome {
            Ok(()) => {
                crate::metrics::handled(source, event_type, crate::metrics::Handled::Acked);
                Handled::Ok
            }
            Err(error) => match self.retry.next_delay(attempt, error.retry) {
                Some(delay) => {
                    crate::metrics::handled(source, event_type, crate::metrics::Handled::Retried);
                    tracing::warn!(
                        reason = %error.reason,
                        retry_in = ?delay,
                        "handler failed; retrying later, the aggregate's later messages wait"
                    );
                    Handled::Retry(delay)
                }
                None => Handled::Dead(error.reason),
            },
        }
    }

    async fn ack(&self, message: &Message<S::Message>) -> Step {
        if let Err(error) = self.source.ack(&message.message).await {
            // Handled, not acknowledged: the broker redelivers it and an inbox skips it.
            tracing::warn!(
                source = self.source.name(),
                event_id = %message.event_id(),
                %error,
                "acknowledging failed; the message will come again"
            );
        }
        self.forget(message).await;
        Step::Done
    }

    async fn dead_letter(&self, message: &mut Message<S::Message>) -> Step {
        let reason = message.dead.clone().unwrap_or_default();
        let span = message.span(self.source.name());
        let outcome = self
            .source
            .dead_letter(&message.message, &reason)
            .instrument(span.clone())
            .await;
        match outcome {
            Ok(()) => {
                span.in_scope(|| tracing::error!(reason, "message dead-lettered"));
                let event_type = self.metric_event_type(&message.envelope);
                crate::metrics::handled(
                    self.source.name(),
                    event_type,
                    crate::metrics::Handled::Dead,
                );
                self.forget(message).await;
                Step::Done
            }
            Err(error) => {
                message.dead_letter_failures += 1;
                let delay = Duration::from_millis(500 << (message.dead_letter_failures - 1).min(7));
                span.in_scope(|| {
                    tracing::error!(
                        reason,
                        %error,
                        retry_in = ?delay,
                        "cannot dead-letter the message; it stays, and its aggregate waits"
                    )
                });
                Step::RetryAt(Instant::now() + delay)
            }
        }
    }

    /// The `event_type` label: only types this consumer has handlers for, so that messages
    /// from elsewhere cannot grow the metrics without bound.
    fn metric_event_type<'m>(
        &self,
        envelope: &'m std::result::Result<Envelope, String>,
    ) -> &'m str {
        match envelope {
            Ok(e) if self.dispatcher.registry().handles_type(&e.event_type) => &e.event_type,
            Ok(_) => "unknown",
            Err(_) => "malformed",
        }
    }

    async fn forget(&self, message: &Message<S::Message>) {
        if let (Some(log), Ok(envelope)) = (&self.attempts, &message.envelope) {
            if let Err(error) = log.forget(envelope.id).await {
                tracing::debug!(%error, "cannot forget the attempt count of a finished message");
            }
        }
    }

    /// A redelivered copy of a message this consumer already finished: acknowledged again,
    /// not handled again.
    async fn ack_copy(&self, copy: Received<S::Message>) {
        tracing::debug!(
            source = self.source.name(),
            "a copy of a finished message; acknowledged"
        );
        if let Err(error) = self.source.ack(&copy.message).await {
            tracing::debug!(source = self.source.name(), %error, "acknowledging a copy failed");
        }
    }

    /// Keeps every waiting message from being redelivered meanwhile.
    async fn keep_alive(&self, held: &Held<S::Message>) {
        let calls = held
            .waiting()
            .map(|message| self.source.keep_alive(&message.message));
        for outcome in futures_util::future::join_all(calls).await {
            if let Err(error) = outcome {
                tracing::debug!(source = self.source.name(), %error, "keep-alive failed");
            }
        }
    }

    /// Gives back, in each aggregate's order, what was received and not finished.
    async fn release(&self, held: Held<S::Message>) {
        let mut messages: Vec<Arc<S::Message>> = Vec::new();
        for queue in held.queues.into_values() {
            // A handler dropped at the timeout: its message goes back first, so the ones behind
            // it cannot overtake it.
            messages.extend(queue.running);
            messages.extend(queue.messages.into_iter().map(|m| m.message));
        }
        if messages.is_empty() {
            return;
        }
        let refs: Vec<&S::Message> = messages.iter().map(|m| &**m).collect();
        match self.source.release(&refs).await {
            Ok(()) => {
                tracing::debug!(
                    source = self.source.name(),
                    released = refs.len(),
                    "released"
                );
            }
            Err(error) => {
                tracing::warn!(source = self.source.name(), %error, "releasing failed; the broker redelivers later");
            }
        }
    }
}

/// A received message and its place in the window.
type Intake<M> = (Received<M>, OwnedSemaphorePermit);

/// Receives into the loop, holding a place in the window for each message. A message received
/// when the loop stopped is handed back with the outcome, to be released with the rest.
async fn receive<S: Source>(
    source: Arc<S>,
    room: Arc<Semaphore>,
    tx: mpsc::Sender<Intake<S::Message>>,
    stop: CancellationToken,
) -> (Result<()>, Option<Intake<S::Message>>) {
    loop {
        let place = tokio::select! {
            _ = stop.cancelled() => return (Ok(()), None),
            place = room.clone().acquire_owned() => place.expect("the semaphore is never closed"),
        };
        let received = tokio::select! {
            _ = stop.cancelled() => return (Ok(()), None),
            received = source.receive() => received,
        };
        match received {
            Ok(Some(received)) => {
                let intake = (received, place);
                // `reserve` first: a send given up at the stop would drop the message, unacknowledged
                // and unreleased.
                tokio::select! {
                    _ = stop.cancelled() => return (Ok(()), Some(intake)),
                    slot = tx.reserve() => match slot {
                        Ok(slot) => slot.send(intake),
                        Err(_) => return (Ok(()), Some(intake)),
                    },
                }
            }
            Ok(None) => {
                tracing::info!(source = source.name(), "the source ended");
                return (Ok(()), None);
            }
            Err(error) => {
                tracing::error!(source = source.name(), %error, "receiving failed; the consumer stops");
                return (Err(error), None);
            }
        }
    }
}

/// Runs `handling`, telling the broker every `period` that the message is still in progress.
async fn keep_alive_while<S: Source, F: std::future::Future>(
    source: &S,
    message: &S::Message,
    period: Duration,
    handling: F,
) -> F::Output {
    let mut handling = std::pin::pin!(handling);
    loop {
        tokio::select! {
            output = &mut handling => return output,
            _ = tokio::time::sleep(period) => {
                if let Err(error) = source.keep_alive(message).await {
                    tracing::debug!(%error, "keep-alive failed");
                }
            }
        }
    }
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

async fn tick(interval: &mut Option<tokio::time::Interval>) {
    match interval {
        Some(interval) => {
            interval.tick().await;
        }
        None => std::future::pending().await,
    }
}

/// What orders messages: their aggregate, or (not an outbox message) nothing but themselves.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
enum Key {
    Aggregate(String, String),
    Alone(u64),
}

/// A received message while the consumer holds it.
struct Message<M> {
    /// Shared with the aggregate's queue while attempted, to release it if its handler is
    /// dropped at shutdown.
    message: Arc<M>,
    envelope: std::result::Result<Envelope, String>,
    deliveries: Option<u32>,
    /// Attempts started in this process.
    tries: u32,
    /// Its attempt count was checked for earlier attempts that never finished.
    cleared: bool,
    /// Running with nothing else running.
    alone: bool,
    /// Why it is dead, once it is: dead-lettering is what remains to do.
    dead: Option<String>,
    dead_letter_failures: u32,
    _room: OwnedSemaphorePermit,
}

impl<M> Message<M> {
    fn event_id(&self) -> String {
        self.envelope
            .as_ref()
            .map(|e| e.id.to_string())
            .unwrap_or_default()
    }

    fn span(&self, source: &str) -> tracing::Span {
        let span = tracing::info_span!(
            "outbox.consume",
            source,
            event_id = tracing::field::Empty,
            event_type = tracing::field::Empty,
            aggregate_type = tracing::field::Empty,
            aggregate_id = tracing::field::Empty,
            attempt = tracing::field::Empty,
            deliveries = self.deliveries,
        );
        if let Ok(e) = &self.envelope {
            span.record("event_id", tracing::field::display(e.id));
            span.record("event_type", e.event_type.as_str());
            span.record("aggregate_type", e.aggregate_type.as_str());
            span.record("aggregate_id", e.aggregate_id.as_str());
            crate::trace::restore(&span, &e.headers);
        }
        span
    }
}

enum Handled {
    Ok,
    Retry(Duration),
    Dead(String),
    /// Not attempted: it must run with nothing else running.
    Alone,
}

/// How an attempt ended for the loop.
#[derive(Debug)]
enum Step {
    /// Acknowledged or dead-lettered: the aggregate's next message may go.
    Done,
    /// Held: try again then.
    RetryAt(Instant),
    /// Held: run it again once nothing else runs, and nothing beside it.
    Alone,
}

/// One aggregate's messages, in order of arrival.
struct Queue<M> {
    messages: VecDeque<Message<M>>,
    /// The head is out, being attempted: its broker handle.
    running: Option<Arc<M>>,
}

/// Every message the loop holds, by aggregate, and which aggregate may go next.
struct Held<M> {
    queues: HashMap<Key, Queue<M>>,
    ready: VecDeque<Key>,
    wake: BinaryHeap<Reverse<(Instant, Key)>>,
    /// Aggregates whose head must run alone, in turn.
    run_alone: VecDeque<Key>,
    /// A head is running alone: nothing else starts.
    running_alone: bool,
    alone: u64,
    /// Event ids held now: a broker's redelivered copy of one of them is dropped.
    ids: std::collections::HashSet<Uuid>,
    /// Event ids finished lately (a bounded memory): a copy of one of them is acknowledged,
    /// not handled again.
    finished: std::collections::HashSet<Uuid>,
    finished_order: VecDeque<Uuid>,
    remember: usize,
}

impl<M> Held<M> {
    fn new(window: usize) -> Self {
        Self {
            queues: HashMap::new(),
            ready: VecDeque::new(),
            wake: BinaryHeap::new(),
            run_alone: VecDeque::new(),
            running_alone: false,
            alone: 0,
            ids: Default::default(),
            finished: Default::default(),
            finished_order: VecDeque::new(),
            remember: window.saturating_mul(4).max(1024),
        }
    }

    /// Queues a received message behind its aggregate; gives back a copy of a finished one
    /// (a broker redelivered what it had sent ahead, or before it saw the acknowledgement).
    fn push(&mut self, received: Received<M>, room: OwnedSemaphorePermit) -> Option<Received<M>> {
        let key = match &received.envelope {
            Ok(e) => {
                if self.finished.contains(&e.id) {
                    return Some(received);
                }
                if !self.ids.insert(e.id) {
                    // The copy held already answers for it (JetStream keys acks by sequence).
                    return None;
                }
                Key::Aggregate(e.aggregate_type.clone(), e.aggregate_id.clone())
            }
            Err(_) => {
                self.alone += 1;
                Key::Alone(self.alone)
            }
        };
        let queue = self.queues.entry(key.clone()).or_insert_with(|| Queue {
            messages: VecDeque::new(),
            running: None,
        });
        queue.messages.push_back(Message {
            message: Arc::new(received.message),
            envelope: received.envelope,
            deliveries: received.deliveries,
            tries: 0,
            cleared: false,
            alone: false,
            dead: None,
            dead_letter_failures: 0,
            _room: room,
        });
        // The first of its aggregate: nothing ahead of it runs or waits for a retry.
        if queue.running.is_none() && queue.messages.len() == 1 {
            self.ready.push_back(key);
        }
        None
    }

    /// The next head to attempt, with `running` attempts out of at most `concurrency`: a head
    /// that must run alone waits until nothing runs, and nothing starts beside it.
    fn next_to_run(&mut self, running: usize, concurrency: usize) -> Option<(Key, Message<M>)> {
        if self.running_alone {
            return None;
        }
        if !self.run_alone.is_empty() {
            if running > 0 {
                return None;
            }
            let key = self.run_alone.pop_front().expect("not empty");
            let (key, mut message) = self.take_head(key);
            message.alone = true;
            self.running_alone = true;
            return Some((key, message));
        }
        if running >= concurrency {
            return None;
        }
        let key = self.ready.pop_front()?;
        Some(self.take_head(key))
    }

    fn take_head(&mut self, key: Key) -> (Key, Message<M>) {
        let queue = self
            .queues
            .get_mut(&key)
            .expect("a ready aggregate is held");
        let message = queue
            .messages
            .pop_front()
            .expect("a ready aggregate has a head");
        queue.running = Some(message.message.clone());
        (key, message)
    }

    fn finish(&mut self, key: Key, mut message: Message<M>, step: Step) {
        if std::mem::take(&mut message.alone) {
            self.running_alone = false;
        }
        let queue = self
            .queues
            .get_mut(&key)
            .expect("a running aggregate is held");
        queue.running = None;
        match step {
            Step::Done => {
                if let Ok(e) = &message.envelope {
                    self.ids.remove(&e.id);
                    if self.finished.insert(e.id) {
                        self.finished_order.push_back(e.id);
                        if self.finished_order.len() > self.remember {
                            let oldest = self.finished_order.pop_front().expect("not empty");
                            self.finished.remove(&oldest);
                        }
                    }
                }
                drop(message);
                if queue.messages.is_empty() {
                    self.queues.remove(&key);
                } else {
                    self.ready.push_back(key);
                }
            }
            Step::RetryAt(at) => {
                queue.messages.push_front(message);
                self.wake.push(Reverse((at, key)));
            }
            Step::Alone => {
                queue.messages.push_front(message);
                self.run_alone.push_back(key);
            }
        }
    }

    fn next_wake(&self) -> Option<Instant> {
        self.wake.peek().map(|Reverse((at, _))| *at)
    }

    fn wake_due(&mut self) {
        let now = Instant::now();
        while let Some(Reverse((at, _))) = self.wake.peek() {
            if *at > now {
                break;
            }
            let Reverse((_, key)) = self.wake.pop().expect("peeked");
            self.ready.push_back(key);
        }
    }

    /// Messages held and not being attempted.
    fn waiting(&self) -> impl Iterator<Item = &Message<M>> {
        self.queues.values().flat_map(|q| q.messages.iter())
    }
}

/// Attempt counts that survive a restart: an [`Inbox`]'s table.
trait AttemptLog: Send + Sync {
    fn count(&self, message_id: Uuid) -> BoxFuture<'_, Result<u32>>;
    fn uncount(&self, message_id: Uuid) -> BoxFuture<'_, Result<()>>;
    fn forget(&self, message_id: Uuid) -> BoxFuture<'_, Result<()>>;
}

impl<DB: Backend> AttemptLog for Inbox<DB> {
    fn count(&self, message_id: Uuid) -> BoxFuture<'_, Result<u32>> {
        self.count_attempt(message_id).boxed()
    }

    fn uncount(&self, message_id: Uuid) -> BoxFuture<'_, Result<()>> {
        self.uncount_attempt(message_id).boxed()
    }

    fn forget(&self, message_id: Uuid) -> BoxFuture<'_, Result<()>> {
        self.forget_attempts(message_id).boxed()
    }
}

/// The loop's own logic against a scripted in-memory source; the broker paths are tested
/// against real servers in `tests/consumer_core.rs`.
#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::{Headers, OutboxEvent};
    use crate::handler::{HandlerError, Registry};
    use serde::{Deserialize, Serialize};
    use std::sync::Mutex;

    #[derive(Serialize, Deserialize)]
    struct Step {
        agg: String,
        n: u32,
        /// 0 ok, 1 fatal, 2 hang
        what: u8,
    }

    impl OutboxEvent for Step {
        const EVENT_TYPE: &'static str = "step";
        const AGGREGATE_TYPE: &'static str = "agg";
        const SCHEMA_VERSION: u32 = 1;
        const TOPIC: &'static str = "steps";
        fn aggregate_id(&self) -> String {
            self.agg.clone()
        }
    }

    /// Hands out a fixed list of messages (id = position), then waits; records what the loop
    /// answered. Dead-lettering fails the first `dead_letter_failures` times.
    #[derive(Default)]
    struct Scripted {
        pending: Mutex<VecDeque<Received<usize>>>,
        dead_letter_failures: Mutex<u32>,
        log: Mutex<Vec<String>>,
        received: std::sync::atomic::AtomicUsize,
    }

    impl Scripted {
        fn new(steps: &[(&str, u32, u8)]) -> Self {
            let pending = steps
                .iter()
                .enumerate()
                .map(|(i, (agg, n, what))| {
                    let payload = serde_json::to_string(&Step {
                        agg: (*agg).into(),
                        n: *n,
                        what: *what,
                    })
                    .unwrap();
                    let envelope = Envelope {
                        id: Uuid::now_v7(),
                        created_at: chrono::Utc::now(),
                        event_type: "step".into(),
                        aggregate_type: "agg".into(),
                        aggregate_id: (*agg).into(),
                        sequence: i64::from(*n),
                        schema_version: 1,
                        topic: "steps".into(),
                        payload,
                        headers: Headers::new(),
                        attempt: 1,
                    };
                    Received::new(i, Ok(envelope), None)
                })
                .collect();
            Self {
                pending: Mutex::new(pending),
                ..Self::default()
            }
        }

        fn log(&self) -> Vec<String> {
            self.log.lock().unwrap().clone()
        }

        fn note(&self, what: String) {
            self.log.lock().unwrap().push(what);
        }
    }

    impl Source for Arc<Scripted> {
        type Message = usize;

        fn name(&self) -> &str {
            "scripted"
        }

        async fn receive(&self) -> Result<Option<Received<usize>>> {
            let next = self.pending.lock().unwrap().pop_front();
            match next {
                Some(received) => {
                    self.received
                        .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    Ok(Some(received))
                }
                None => std::future::pending().await,
            }
        }

        async fn ack(&self, message: &usize) -> Result<()> {
            self.note(format!("ack {message}"));
            Ok(())
        }

        async fn dead_letter(&self, message: &usize, _reason: &str) -> Result<()> {
            let mut failures = self.dead_letter_failures.lock().unwrap();
            if *failures > 0 {
                *failures -= 1;
                self.note(format!("dead-letter failed {message}"));
                return Err(crate::Error::broker("the dead-letter queue refused"));
            }
            self.note(format!("dead {message}"));
            Ok(())
        }

        async fn release(&self, messages: &[&usize]) -> Result<()> {
            for message in messages {
                self.note(format!("release {message}"));
            }
            Ok(())
        }
    }

    fn consumer(source: &Arc<Scripted>) -> Consumer<Arc<Scripted>> {
        let registry = Registry::builder()
            .handler::<Step, _, _>("step", |step: Step, _ctx| async move {
                match step.what {
                    0 => Ok(()),
                    1 => Err(HandlerError::fatal("scripted")),
                    _ => std::future::pending().await,
                }
            })
            .unwrap()
            .build();
        Consumer::new(source.clone(), Dispatcher::new(registry)).retry(
            RetryPolicy::exponential(Duration::from_millis(1))
                .max_attempts(2)
                .jitter(false),
        )
    }

    async fn until(what: &str, check: impl Fn() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !check() {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_message_whose_dead_lettering_fails_is_kept_and_holds_its_aggregate() {
        let source = Arc::new(Scripted::new(&[("a", 1, 1), ("a", 2, 0), ("b", 1, 0)]));
        *source.dead_letter_failures.lock().unwrap() = 2;
        let consumer = consumer(&source);
        let shutdown = CancellationToken::new();
        let run = tokio::spawn({
            let shutdown = shutdown.clone();
            async move { consumer.run(shutdown).await }
        });
        until("a2 acknowledged", || source.log().contains(&"ack 1".into())).await;
        shutdown.cancel();
        run.await.unwrap().unwrap();
        let log = source.log();
        let at = |what: &str| log.iter().position(|l| l == what).expect(what);
        assert_eq!(
            log.iter()
                .filter(|l| l.starts_with("dead-letter failed 0"))
                .count(),
            2,
            "{log:?}"
        );
        assert!(
            !log.contains(&"ack 0".into()),
            "never acknowledged: {log:?}"
        );
        assert!(
            at("dead 0") < at("ack 1"),
            "a2 waited for a1's dead-lettering: {log:?}"
        );
        assert!(at("ack 2") < at("dead 0"), "b flowed meanwhile: {log:?}");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_window_bounds_what_is_received() {
        let steps: Vec<_> = (0..50).map(|n| ("hot", n, 2u8)).collect();
        let source = Arc::new(Scripted::new(&steps));
        let consumer = consumer(&source).window(8);
        let shutdown = CancellationToken::new();
        let run = tokio::spawn({
            let shutdown = shutdown.clone();
            async move {
                consumer
                    .shutdown_timeout(Duration::from_millis(50))
                    .run(shutdown)
                    .await
            }
        });
        until("the window is full", || {
            source.received.load(std::sync::atomic::Ordering::SeqCst) == 8
        })
        .await;
        // The head hangs: nothing more may be taken from the broker while 8 are held.
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(source.received.load(std::sync::atomic::Ordering::SeqCst), 8);
        shutdown.cancel();
        run.await.unwrap().unwrap();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn shutdown_releases_a_dropped_handlers_message_before_the_ones_behind_it() {
        // a1 hangs past the shutdown timeout, a2 waits behind it; b1 is handled.
        let source = Arc::new(Scripted::new(&[("a", 1, 2), ("a", 2, 0), ("b", 1, 0)]));
        let consumer = consumer(&source).shutdown_timeout(Duration::from_millis(100));
        let shutdown = CancellationToken::new();
        let run = tokio::spawn({
            let shutdown = shutdown.clone();
            async move { consumer.run(shutdown).await }
        });
        until("b1 acknowledged", || source.log().contains(&"ack 2".into())).await;
        shutdown.cancel();
        run.await.unwrap().unwrap();
        let log = source.log();
        assert_eq!(
            log.iter()
                .filter(|l| l.starts_with("release"))
                .collect::<Vec<_>>(),
            ["release 0", "release 1"],
            "a1 given back first, then a2; nothing acknowledged: {log:?}"
        );
        assert!(!log.contains(&"ack 0".into()) && !log.contains(&"ack 1".into()));
    }
}
