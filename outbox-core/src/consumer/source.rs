//! What a broker must offer the [`Consumer`](super::Consumer): its specifics, and nothing else.

use crate::error::Result;
use crate::event::Envelope;
use std::future::Future;
use std::time::Duration;

/// One message a [`Source`] received.
#[derive(Debug)]
#[non_exhaustive]
pub struct Received<M> {
    /// The broker's handle of the message, given back to the source to acknowledge,
    /// dead-letter or release it.
    pub message: M,
    /// The outbox event the message carries, or why it is not one (such a message is
    /// dead-lettered at once).
    pub envelope: std::result::Result<Envelope, String>,
    /// How many times the broker has delivered the message, this delivery included, where the
    /// broker counts (JetStream's `num_delivered`, the `x-delivery-count` of a RabbitMQ quorum
    /// queue); `None` where it does not. Shown on the consume span; not an attempt count (see
    /// [`Consumer::attempts_in`](super::Consumer::attempts_in)).
    pub deliveries: Option<u32>,
}

impl<M> Received<M> {
    /// A received message.
    pub fn new(
        message: M,
        envelope: std::result::Result<Envelope, String>,
        deliveries: Option<u32>,
    ) -> Self {
        Self {
            message,
            envelope,
            deliveries,
        }
    }
}

/// The broker side of a [`Consumer`](super::Consumer): receive, acknowledge, dead-letter.
///
/// A transport implements only what is particular to its broker; the consumer loop in the core
/// keeps per-aggregate order, counts attempts, retries, and acknowledges a message only after
/// its handler succeeded or it was dead-lettered. The loop receives from one task and answers
/// the broker from many, so every method takes `&self`.
pub trait Source: Send + Sync + 'static {
    /// The broker's handle of one received message.
    type Message: Send + Sync + 'static;

    /// Names the source in logs and spans: a stream and consumer, a queue, topics and group.
    fn name(&self) -> &str;

    /// Waits for the next message; `Ok(None)` when the source has ended for good. Transient
    /// broker errors are the source's to retry; an error returned here stops the consumer.
    ///
    /// Must be cancel-safe: the consumer drops a pending `receive` at shutdown, and a message
    /// it has not returned must stay with the broker.
    fn receive(&self) -> impl Future<Output = Result<Option<Received<Self::Message>>>> + Send;

    /// The message was handled: the broker may forget it. A source that acknowledges by
    /// position (Kafka's offsets) must not move past a message that has not been acknowledged.
    fn ack(&self, message: &Self::Message) -> impl Future<Output = Result<()>> + Send;

    /// The message failed for good: move it where an operator finds it, with `reason`, and
    /// let the broker forget it here. An error keeps the message, and the consumer tries again.
    fn dead_letter(
        &self,
        message: &Self::Message,
        reason: &str,
    ) -> impl Future<Output = Result<()>> + Send;

    /// The consumer stops without having finished `messages`: give them back for
    /// redelivery, soon, to another consumer, in the order given (each aggregate's order).
    /// The default leaves that to the broker (a redelivery timeout, a closed channel, an
    /// uncommitted offset).
    fn release(&self, messages: &[&Self::Message]) -> impl Future<Output = Result<()>> + Send {
        let _ = messages;
        async { Ok(()) }
    }

    /// Tells the broker the message is still being worked on or waits behind an earlier one
    /// of its aggregate, so it is not redelivered meanwhile. Called every
    /// [`keep_alive_every`](Self::keep_alive_every).
    fn keep_alive(&self, message: &Self::Message) -> impl Future<Output = Result<()>> + Send {
        let _ = message;
        async { Ok(()) }
    }

    /// How often held messages need [`keep_alive`](Self::keep_alive); `None` (the default):
    /// never.
    fn keep_alive_every(&self) -> Option<Duration> {
        None
    }

    /// The consumer takes no more messages: end the subscription, so that what
    /// [`release`](Self::release) gives back next goes to another consumer, not into this one's
    /// intake. Called once, after the last `receive`, before the releases.
    fn stop(&self) -> impl Future<Output = Result<()>> + Send {
        async { Ok(()) }
    }

    /// The consumer has stopped: flush what the source buffers (Kafka's stored offsets).
    fn close(&self) -> impl Future<Output = Result<()>> + Send {
        async { Ok(()) }
    }
}
