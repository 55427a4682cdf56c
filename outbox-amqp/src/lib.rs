//! RabbitMQ (AMQP 0-9-1) for the outbox framework (`lapin`).
//!
//! - [`AmqpTransport`] publishes outbox events with publisher confirms, persistent delivery,
//!   `mandatory` set (an unroutable message is an error, not silently dropped), `message_id` =
//!   outbox id, `type` = event type, `content_type`, `timestamp`, and the outbox metadata as
//!   headers. The exchange is the event's route (topic), the routing key its event type. A batch
//!   is published with all its confirms outstanding at once, on a channel of its own, so the
//!   batches of several relay workers publish side by side (up to [`AmqpTransport::channels`],
//!   connected as needed). After a connection failure the transport reconnects on the next
//!   batch.
//! - [`AmqpConsumer`] consumes a queue into the same typed handlers as the relay: the core's
//!   [`Consumer`] loop over an [`AmqpSource`], acking after success, retrying in place (later
//!   messages of the aggregate wait, other aggregates flow), and rejecting without requeue a
//!   message that failed for good, which sends it to the queue's dead-letter exchange.
//! - [`Topology`] declares exchanges, queues, bindings and dead-lettering.
//!
//! TLS (`amqps://`) is behind the `tls` feature.

use futures_util::future::join_all;
use futures_util::StreamExt;
use lapin::message::Delivery;
use lapin::options::{
    BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions,
    BasicRejectOptions, ConfirmSelectOptions, ExchangeDeclareOptions, QueueBindOptions,
    QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{
    BasicProperties, Channel, Confirmation, Connection, ConnectionProperties, ExchangeKind,
};
use outbox_core::consumer::{Consumer, Received, Source};
use outbox_core::{wire, DeliveryError, DeliveryResult, Envelope, Error, StoppedRuns, Transport};
use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::{AtomicUsize, Ordering};
use tokio::sync::Mutex;
use tracing::Instrument;

pub use lapin;

/// AMQP delivery mode 2: the broker writes the message to disk.
const PERSISTENT: u8 = 2;

/// Batches that publish at once by default: more than a relay's usual worker count.
const DEFAULT_CHANNELS: usize = 4;

/// Publishes outbox events to RabbitMQ with publisher confirms.
pub struct AmqpTransport {
    uri: String,
    name: String,
    exchange: Option<String>,
    /// One connection and confirm-mode channel per slot: a batch holds a slot while it
    /// publishes, so batches of several relay workers publish side by side.
    slots: Vec<Mutex<Option<(Connection, Channel)>>>,
    next_slot: AtomicUsize,
}

impl fmt::Debug for AmqpTransport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The URI may hold a password: never print it.
        f.debug_struct("AmqpTransport")
            .field("name", &self.name)
            .field("exchange", &self.exchange)
            .finish_non_exhaustive()
    }
}

impl AmqpTransport {
    /// A transport named `"amqp"` connecting to `uri` (`amqp://user:pass@host:5672/vhost`).
    /// It connects on first use and again after any connection failure.
    pub fn new(uri: impl Into<String>) -> Self {
        Self {
            uri: uri.into(),
            name: "amqp".to_owned(),
            exchange: None,
            slots: (0..DEFAULT_CHANNELS).map(|_| Mutex::new(None)).collect(),
            next_slot: AtomicUsize::new(0),
        }
    }

    /// How many batches may publish at once, each on its own connection and channel (default
    /// 4). A channel confirms in order, so one batch at a time uses a channel; give at least
    /// as many as the relay has workers.
    pub fn channels(mut self, n: usize) -> Self {
        self.slots = (0..n.max(1)).map(|_| Mutex::new(None)).collect();
        self
    }

    /// Names the transport for a [`Router`](outbox_core::Router) (default `"amqp"`).
    pub fn named(mut self, name: impl Into<String>) -> Self {
        self.name = name.into();
        self
    }

    /// Publishes every event to one exchange, with routing key `<topic>.<event_type>`, instead
    /// of to the exchange named by its topic with routing key `<event_type>`. A name AMQP does
    /// not allow makes the relay's `build` fail.
    pub fn exchange(mut self, exchange: impl Into<String>) -> Self {
        self.exchange = Some(exchange.into());
        self
    }

    /// The exchange and routing key of an event.
    pub fn destination(&self, envelope: &Envelope) -> (String, String) {
        match &self.exchange {
            Some(exchange) => (
                exchange.clone(),
                format!("{}.{}", envelope.topic, envelope.event_type),
            ),
            None => (envelope.topic.clone(), envelope.event_type.clone()),
        }
    }

    async fn connect(&self) -> Result<(Connection, Channel), lapin::Error> {
        let connection = Connection::connect(&self.uri, ConnectionProperties::default()).await?;
        let channel = connection.create_channel().await?;
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await?;
        tracing::info!(transport = %self.name, "connected to RabbitMQ");
        Ok((connection, channel))
    }
}

/// `text` (an error of the AMQP client) with `uri` and its password taken out: a URI the client
/// cannot parse comes back whole in its error, and the reason is stored and logged.
fn without_credentials(text: &str, uri: &str) -> String {
    let mut text = text.replace(uri, "<the AMQP URI>");
    // The password: between the last ':' and the '@' of the user info, however malformed the
    // rest is.
    if let Some(at) = uri.rfind('@') {
        let user_info = &uri[..at];
        let user_info = user_info.rsplit_once("//").map_or(user_info, |(_, u)| u);
        if let Some((_, password)) = user_info.rsplit_once(':') {
            if !password.is_empty() {
                text = text.replace(password, "***");
            }
        }
    }
    text
}

/// The AMQP properties of an event.
pub fn properties(envelope: &Envelope) -> BasicProperties {
    let mut headers = FieldTable::default();
    for (key, value) in envelope.wire_headers() {
        headers.insert(
            ShortString::from(key),
            AMQPValue::LongString(LongString::from(value)),
        );
    }
    BasicProperties::default()
        .with_message_id(envelope.id.to_string().into())
        .with_type(envelope.event_type.as_str().into())
        .with_content_type(wire::JSON.into())
        .with_delivery_mode(PERSISTENT)
        .with_timestamp(envelope.created_at.timestamp().max(0) as u64)
        .with_headers(headers)
}

/// The message a confirmation carries back (`basic.return`: mandatory and unroutable), as
/// its message id (the event id) and the reason.
fn returned(confirmation: &Confirmation) -> Option<(Option<String>, String)> {
    let (Confirmation::Ack(Some(returned)) | Confirmation::Nack(Some(returned))) = confirmation
    else {
        return None;
    };
    let reason = format!(
        "RabbitMQ returned the message: {} {} (exchange {:?}, routing key {:?})",
        returned.reply_code,
        returned.reply_text,
        returned.delivery.exchange.as_str(),
        returned.delivery.routing_key.as_str()
    );
    let id = returned
        .delivery
        .properties
        .message_id()
        .as_ref()
        .map(|id| id.as_str().to_owned());
    Some((id, reason))
}

/// What a confirmation says of `envelope`, knowing every message the batch's confirmations
/// carried back (by event id). lapin hands a returned message to the next confirmation it
/// resolves, and resolves the tags of one multiple ack in no set order, so a return can arrive
/// on another message's confirmation: it is matched to its message by id, never by position.
fn confirmation_result(
    confirmation: Confirmation,
    envelope: &Envelope,
    returns: &HashMap<String, String>,
) -> DeliveryResult {
    if let Some(reason) = returns.get(&envelope.id.to_string()) {
        return Err(DeliveryError::permanent(reason.clone()));
    }
    // A return without an id can only be told by where it arrived; one with another message's
    // id is that message's (above).
    if let Some((None, reason)) = returned(&confirmation) {
        return Err(DeliveryError::permanent(reason));
    }
    match confirmation {
        Confirmation::Ack(_) | Confirmation::NotRequested => Ok(()),
        Confirmation::Nack(_) => Err(DeliveryError::retry(
            "RabbitMQ refused to take the message (nack)",
        )),
    }
}

fn classify(error: &lapin::Error) -> DeliveryError {
    // The connection or channel failed: the message may or may not have reached the broker.
    DeliveryError::retry(format!("RabbitMQ: {error}"))
}

/// The limit in RabbitMQ's "message size N is larger than configured max size M" channel error.
fn max_message_size(reason: &str) -> Option<usize> {
    let (_, rest) = reason.split_once("max size ")?;
    rest.split(|c: char| !c.is_ascii_digit())
        .next()?
        .parse()
        .ok()
}

/// The exchange named in RabbitMQ's "NOT_FOUND - no exchange 'X' in vhost 'V'" channel error.
fn missing_exchange(reason: &str) -> Option<&str> {
    let (_, rest) = reason.split_once("no exchange '")?;
    Some(rest.split_once('\'')?.0)
}

/// What a channel-level error says about one message: RabbitMQ closes the channel when one
/// message is over `max_message_size` or names an exchange that does not exist, and every
/// confirm outstanding on that channel then fails with the same error. Only the culprits are
/// refused for good (retrying cannot shrink a message or create an exchange).
fn is_culprit(envelope: &Envelope, exchange: &str, reason: &str) -> bool {
    if let Some(limit) = max_message_size(reason) {
        return envelope.payload.len() > limit;
    }
    missing_exchange(reason).is_some_and(|missing| missing == exchange)
}

/// How a publish ended, before the culprits of a closed channel are told from the others.
enum Sent {
    Confirmed(DeliveryResult),
    /// The channel failed under the message: the error is the channel's, not necessarily its.
    ChannelFailed(lapin::Error),
}

impl AmqpTransport {
    /// Opens a slot's connection and channel if it has none or they are closed.
    async fn ready<'s>(
        &self,
        slot: &'s mut Option<(Connection, Channel)>,
    ) -> Result<&'s Channel, DeliveryError> {
        if let Some((connection, channel)) = slot.as_ref() {
            if connection.status().connected() && !channel.status().connected() {
                // Only the channel was closed (by a message the broker refused): a new one on
                // the same connection is enough.
                if let Ok(channel) = self.open_channel(connection).await {
                    let connection = slot.take().expect("checked above").0;
                    *slot = Some((connection, channel));
                }
            }
        }
        if slot
            .as_ref()
            .is_none_or(|(c, ch)| !c.status().connected() || !ch.status().connected())
        {
            let connected = self.connect().await.map_err(|error| {
                DeliveryError::retry(format!(
                    "cannot connect to RabbitMQ: {}",
                    without_credentials(&error.to_string(), &self.uri)
                ))
            })?;
            *slot = Some(connected);
        }
        Ok(&slot.as_ref().expect("connected above").1)
    }

    async fn open_channel(&self, connection: &Connection) -> Result<Channel, lapin::Error> {
        let channel = connection.create_channel().await?;
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await?;
        Ok(channel)
    }

    /// Publishes `batch` on `channel`, all first, then awaits the confirms.
    async fn publish_on(&self, channel: &Channel, batch: &[&Envelope]) -> Vec<Sent> {
        let mut pending = Vec::with_capacity(batch.len());
        for envelope in batch {
            let (exchange, routing_key) = self.destination(envelope);
            let span = tracing::debug_span!(
                "outbox.publish",
                transport = %self.name,
                event_id = %envelope.id,
                event_type = %envelope.event_type,
                aggregate_type = %envelope.aggregate_type,
                aggregate_id = %envelope.aggregate_id,
                attempt = envelope.attempt,
            );
            let sent = channel
                .basic_publish(
                    exchange.into(),
                    routing_key.into(),
                    BasicPublishOptions {
                        mandatory: true,
                        ..Default::default()
                    },
                    envelope.payload.as_bytes(),
                    properties(envelope),
                )
                .instrument(span)
                .await;
            pending.push(sent);
        }
        let confirmations = join_all(pending.into_iter().map(|sent| async move {
            match sent {
                Ok(confirm) => confirm.await,
                Err(error) => Err(error),
            }
        }))
        .await;
        let returns: HashMap<String, String> = confirmations
            .iter()
            .filter_map(|c| returned(c.as_ref().ok()?))
            .filter_map(|(id, reason)| Some((id?, reason)))
            .collect();
        confirmations
            .into_iter()
            .zip(batch)
            .map(|(confirmation, envelope)| match confirmation {
                Ok(confirmation) => {
                    Sent::Confirmed(confirmation_result(confirmation, envelope, &returns))
                }
                Err(error) => Sent::ChannelFailed(error),
            })
            .collect()
    }
}

impl Transport for AmqpTransport {
    fn name(&self) -> &str {
        &self.name
    }

    /// The exchange must be a legal AMQP 0-9-1 exchange name.
    fn validate(&self) -> Result<(), Error> {
        let Some(exchange) = &self.exchange else {
            return Ok(());
        };
        let reject = |reason| {
            Err(Error::InvalidField {
                field: format!("AMQP exchange {exchange:?}"),
                reason,
            })
        };
        if exchange.len() > 255 {
            return reject("it is longer than 255 bytes");
        }
        if !exchange
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | ':'))
        {
            return reject("exchange names take only ASCII letters, digits, '-', '_', '.' and ':'");
        }
        Ok(())
    }

    /// Runs are published in order on one channel, whose confirms arrive in publish order. If
    /// the broker closes the channel because of one message (too large, or to an exchange that
    /// does not exist), that message fails for good and the others caught in the close are
    /// published again once on a new channel, up to the first failure of their aggregate: one
    /// bad message costs the rest of the batch neither an attempt nor a duplicate.
    async fn publish(&self, batch: &[Envelope]) -> Vec<DeliveryResult> {
        // One batch at a time per channel: confirms are matched to their messages in order.
        // Take a free slot if there is one, else wait for the next in turn.
        let mut slot = match self.slots.iter().find_map(|slot| slot.try_lock().ok()) {
            Some(free) => free,
            None => {
                let i = self.next_slot.fetch_add(1, Ordering::Relaxed) % self.slots.len();
                self.slots[i].lock().await
            }
        };
        let mut results: Vec<Option<DeliveryResult>> = vec![None; batch.len()];
        let mut todo: Vec<usize> = (0..batch.len()).collect();
        for round in 0..2 {
            let channel = match self.ready(&mut slot).await {
                Ok(channel) => channel,
                Err(failure) => {
                    for i in todo {
                        results[i] = Some(Err(failure.clone()));
                    }
                    break;
                }
            };
            let envelopes: Vec<&Envelope> = todo.iter().map(|&i| &batch[i]).collect();
            let sent = self.publish_on(channel, &envelopes).await;
            let mut again = Vec::new();
            // Aggregates with a failure so far in this batch: their later messages wait.
            let mut stopped = StoppedRuns::new();
            for (&i, sent) in todo.iter().zip(sent) {
                let envelope = &batch[i];
                let result = match sent {
                    Sent::Confirmed(result) => result,
                    Sent::ChannelFailed(error) => {
                        let reason = format!("RabbitMQ: {error}");
                        let (exchange, _) = self.destination(envelope);
                        if is_culprit(envelope, &exchange, &reason) {
                            Err(DeliveryError::permanent(reason))
                        } else if round == 0 && !stopped.contains(envelope) {
                            again.push(i);
                            continue;
                        } else {
                            Err(classify(&error))
                        }
                    }
                };
                if result.is_err() {
                    stopped.stop(envelope);
                }
                results[i] = Some(result);
            }
            if again.is_empty() {
                break;
            }
            tracing::debug!(
                transport = %self.name,
                again = again.len(),
                "channel closed by another message; publishing the rest again on a new channel"
            );
            todo = again;
        }
        results
            .into_iter()
            .map(|r| r.unwrap_or_else(|| Err(DeliveryError::held_back())))
            .collect()
    }
}

/// Exchanges, queues and bindings, declared idempotently.
///
/// ```no_run
/// # async fn demo(channel: lapin::Channel) -> Result<(), lapin::Error> {
/// use outbox_amqp::Topology;
/// Topology::new("payments")                 // a durable topic exchange
///     .queue("billing", ["payment.*"])       // a durable queue bound to it
///     .with_dead_letters()                   // rejected messages go to billing.dead
///     .declare(&channel)
///     .await?;
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct Topology {
    exchange: String,
    queues: Vec<(String, Vec<String>)>,
    dead_letters: bool,
    quorum: bool,
}

impl Topology {
    /// A durable topic exchange named `exchange` (the events' route).
    pub fn new(exchange: impl Into<String>) -> Self {
        Self {
            exchange: exchange.into(),
            queues: Vec::new(),
            dead_letters: false,
            quorum: false,
        }
    }

    /// A durable queue bound to the exchange with each routing-key pattern.
    pub fn queue<S: Into<String>>(
        mut self,
        name: impl Into<String>,
        patterns: impl IntoIterator<Item = S>,
    ) -> Self {
        self.queues
            .push((name.into(), patterns.into_iter().map(Into::into).collect()));
        self
    }

    /// Gives each queue a dead-letter exchange `<exchange>.dlx` and a queue `<queue>.dead`
    /// that receives the messages consumers reject.
    pub fn with_dead_letters(mut self) -> Self {
        self.dead_letters = true;
        self
    }

    /// Declares the queues as quorum queues (`x-queue-type: quorum`): replicated, and they
    /// count deliveries (`x-delivery-count`), which the consumer uses as attempt counts that
    /// survive a crash.
    pub fn quorum(mut self) -> Self {
        self.quorum = true;
        self
    }

    /// The name of the dead-letter queue of `queue`.
    pub fn dead_letter_queue(queue: &str) -> String {
        format!("{queue}.dead")
    }

    /// Declares everything on `channel`.
    pub async fn declare(&self, channel: &Channel) -> Result<(), lapin::Error> {
        let durable = ExchangeDeclareOptions {
            durable: true,
            ..Default::default()
        };
        channel
            .exchange_declare(
                self.exchange.as_str().into(),
                ExchangeKind::Topic,
                durable,
                FieldTable::default(),
            )
            .await?;
        let dlx = format!("{}.dlx", self.exchange);
        if self.dead_letters {
            channel
                .exchange_declare(
                    dlx.as_str().into(),
                    ExchangeKind::Fanout,
                    durable,
                    FieldTable::default(),
                )
                .await?;
        }
        for (queue, patterns) in &self.queues {
            let mut arguments = FieldTable::default();
            if self.dead_letters {
                let dead = Self::dead_letter_queue(queue);
                declare_queue(channel, &dead, FieldTable::default()).await?;
                channel
                    .queue_bind(
                        dead.as_str().into(),
                        dlx.as_str().into(),
                        "".into(),
                        QueueBindOptions::default(),
                        FieldTable::default(),
                    )
                    .await?;
                arguments.insert(
                    "x-dead-letter-exchange".into(),
                    AMQPValue::LongString(dlx.as_str().into()),
                );
            }
            if self.quorum {
                arguments.insert(
                    "x-queue-type".into(),
                    AMQPValue::LongString("quorum".into()),
                );
            }
            declare_queue(channel, queue, arguments).await?;
            for pattern in patterns {
                channel
                    .queue_bind(
                        queue.as_str().into(),
                        self.exchange.as_str().into(),
                        pattern.as_str().into(),
                        QueueBindOptions::default(),
                        FieldTable::default(),
                    )
                    .await?;
            }
        }
        Ok(())
    }
}

async fn declare_queue(
    channel: &Channel,
    name: &str,
    arguments: FieldTable,
) -> Result<(), lapin::Error> {
    channel
        .queue_declare(
            name.into(),
            QueueDeclareOptions {
                durable: true,
                ..Default::default()
            },
            arguments,
        )
        .await?;
    Ok(())
}

/// A RabbitMQ queue as the [`Source`] of a [`Consumer`].
///
/// Deliveries are acknowledged one by one after their handler succeeded. A message that failed
/// for good is rejected without requeue, which moves it to the queue's dead-letter exchange
/// (declare one: [`Topology::with_dead_letters`]; without it RabbitMQ drops the message). A
/// quorum queue ([`Topology::quorum`]) counts deliveries (`x-delivery-count`), so a message whose
/// handling kills the process is dead-lettered after the retry policy's last attempt; on a
/// classic queue give the consumer an inbox for that
/// ([`Consumer::attempts_in`](outbox_core::Consumer::attempts_in)). Messages held past
/// RabbitMQ's `consumer_timeout` (30 minutes by default) make it close the channel; they are
/// then redelivered.
pub struct AmqpSource {
    channel: Channel,
    queue: String,
    tag: String,
    name: String,
    prefetch: u16,
    deliveries: Mutex<Option<lapin::Consumer>>,
}

impl fmt::Debug for AmqpSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AmqpSource")
            .field("queue", &self.queue)
            .field("prefetch", &self.prefetch)
            .finish_non_exhaustive()
    }
}

/// The longest prefix of `text` of at most `max` bytes that ends on a character boundary.
fn truncated(text: &str, max: usize) -> &str {
    let mut end = text.len().min(max);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}

impl AmqpSource {
    /// Consumes `queue` on `channel`, with up to 256 unacknowledged deliveries (the
    /// consumer's default window).
    pub fn new(channel: Channel, queue: impl Into<String>) -> Self {
        let queue = queue.into();
        Self {
            // A consumer tag is a short string (at most 255 bytes) and a queue name may be as
            // long: the tag keeps only the queue name's first 200 bytes.
            tag: format!(
                "outbox-{}-{}",
                truncated(&queue, 200),
                uuid::Uuid::now_v7().simple()
            ),
            name: format!("amqp:{queue}"),
            channel,
            queue,
            prefetch: 256,
            deliveries: Mutex::new(None),
        }
    }

    /// How many unacknowledged deliveries RabbitMQ sends ahead (`basic.qos`); keep it at the
    /// consumer's [`window`](outbox_core::Consumer::window).
    pub fn prefetch(mut self, n: u16) -> Self {
        self.prefetch = n.max(1);
        self
    }
}

/// Consumes a RabbitMQ queue into typed handlers: the core's [`Consumer`] over an
/// [`AmqpSource`].
///
/// ```no_run
/// # async fn demo(channel: lapin::Channel) -> Result<(), Box<dyn std::error::Error>> {
/// use outbox_amqp::{AmqpConsumer, AmqpSource, Topology};
/// use outbox_core::{CancellationToken, Dispatcher};
///
/// Topology::new("payments").queue("billing", ["payment.*"]).quorum().with_dead_letters()
///     .declare(&channel)
///     .await?;
/// AmqpConsumer::new(AmqpSource::new(channel, "billing"), Dispatcher::from_inventory()?)
///     .run(CancellationToken::new())
///     .await?;
/// # Ok(()) }
/// ```
pub type AmqpConsumer = Consumer<AmqpSource>;

impl Source for AmqpSource {
    type Message = Delivery;

    fn name(&self) -> &str {
        &self.name
    }

    async fn receive(&self) -> outbox_core::Result<Option<Received<Delivery>>> {
        let mut deliveries = self.deliveries.lock().await;
        if deliveries.is_none() {
            self.channel
                .basic_qos(self.prefetch, BasicQosOptions::default())
                .await
                .map_err(Error::broker)?;
            let consumer = self
                .channel
                .basic_consume(
                    self.queue.as_str().into(),
                    self.tag.as_str().into(),
                    BasicConsumeOptions::default(),
                    FieldTable::default(),
                )
                .await
                .map_err(Error::broker)?;
            *deliveries = Some(consumer);
        }
        match deliveries.as_mut().expect("just set").next().await {
            Some(Ok(delivery)) => {
                let envelope = envelope(&delivery);
                let deliveries = delivery_count(&delivery);
                Ok(Some(Received::new(delivery, envelope, deliveries)))
            }
            // A closed channel or connection: the unacknowledged deliveries go back to the queue.
            Some(Err(error)) => Err(Error::broker(error)),
            None => Ok(None),
        }
    }

    async fn ack(&self, delivery: &Delivery) -> outbox_core::Result<()> {
        delivery
            .acker
            .ack(BasicAckOptions::default())
            .await
            .map(drop)
            .map_err(Error::broker)
    }

    async fn dead_letter(&self, delivery: &Delivery, _reason: &str) -> outbox_core::Result<()> {
        delivery
            .acker
            .reject(BasicRejectOptions { requeue: false })
            .await
            .map(drop)
            .map_err(Error::broker)
    }

    /// Cancels the subscription, so requeued messages go to other consumers, not to this one.
    async fn stop(&self) -> outbox_core::Result<()> {
        if self.deliveries.lock().await.take().is_some() {
            self.channel
                .basic_cancel(self.tag.as_str().into(), BasicCancelOptions::default())
                .await
                .map_err(Error::broker)?;
        }
        Ok(())
    }

    async fn release(&self, deliveries: &[&Delivery]) -> outbox_core::Result<()> {
        for delivery in deliveries {
            delivery
                .acker
                .reject(BasicRejectOptions { requeue: true })
                .await
                .map_err(Error::broker)?;
        }
        Ok(())
    }
}

/// Deliveries so far, this one included: a quorum queue counts earlier ones in
/// `x-delivery-count`; elsewhere only "redelivered" is known, which means at least two.
fn delivery_count(delivery: &Delivery) -> Option<u32> {
    let counted = delivery
        .properties
        .headers()
        .as_ref()
        .and_then(|h| h.inner().get("x-delivery-count").cloned())
        .and_then(|v| match v {
            AMQPValue::LongLongInt(n) => u32::try_from(n).ok(),
            AMQPValue::LongInt(n) => u32::try_from(n).ok(),
            AMQPValue::ShortInt(n) => u32::try_from(n).ok(),
            AMQPValue::LongUInt(n) => Some(n),
            _ => None,
        });
    match counted {
        Some(n) => Some(n.saturating_add(1)),
        None if delivery.redelivered => Some(2),
        None => None,
    }
}

fn envelope(delivery: &Delivery) -> Result<Envelope, String> {
    let payload = String::from_utf8(delivery.data.clone())
        .map_err(|e| format!("payload is not UTF-8: {e}"))?;
    let headers = delivery
        .properties
        .headers()
        .as_ref()
        .map(|h| {
            h.inner()
                .iter()
                .filter_map(|(k, v)| match v {
                    AMQPValue::LongString(s) => Some((
                        k.as_str().to_owned(),
                        String::from_utf8_lossy(s.as_bytes()).into_owned(),
                    )),
                    _ => None,
                })
                .collect::<Vec<_>>()
        })
        .unwrap_or_default();
    Envelope::from_wire(
        headers.iter().map(|(k, v)| (k.as_str(), v.as_str())),
        payload,
        1,
    )
}

#[cfg(test)]
mod tests {
    #[test]
    fn reads_the_limit_from_the_channel_error() {
        let reason = "RabbitMQ: protocol error: AMQP soft error: PRECONDITION-FAILED: \
            PRECONDITION_FAILED - message size 2097182 is larger than configured max size 1048576";
        assert_eq!(super::max_message_size(reason), Some(1_048_576));
        assert_eq!(super::max_message_size("RabbitMQ: connection reset"), None);
    }

    #[test]
    fn reads_the_missing_exchange_from_the_channel_error() {
        let reason = "RabbitMQ: protocol error: AMQP soft error: NOT-FOUND: \
            NOT_FOUND - no exchange 'nowhere' in vhost '/'";
        assert_eq!(super::missing_exchange(reason), Some("nowhere"));
        assert_eq!(super::missing_exchange("RabbitMQ: connection reset"), None);
    }

    #[test]
    fn connection_errors_lose_the_uri_and_its_password() {
        for uri in [
            "amqp:user:s3cret@localhost:5672",
            "amqp://user:s3cret@localhost:5672/%2f",
            "amqps://user:s3cret@[::1]:5671",
        ] {
            let text = super::without_credentials(&format!("Invalid URL: '{uri}'"), uri);
            assert!(!text.contains("s3cret"), "{text}");
        }
        let text = super::without_credentials("refused by s3cret-host", "amqp://localhost");
        assert_eq!(
            text, "refused by s3cret-host",
            "no password, nothing taken out"
        );
    }

    #[test]
    fn consumer_tags_stay_short_strings() {
        let queue = "é".repeat(150); // 300 bytes: longer than a short string
        let tag = super::truncated(&queue, 200);
        assert!(tag.len() <= 200 && queue.starts_with(tag));
    }
}
