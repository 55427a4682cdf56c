use std::borrow::Cow;

/// The one error type of the outbox framework.
///
/// Handler and delivery outcomes have their own types ([`HandlerError`](crate::HandlerError),
/// [`DeliveryError`](crate::DeliveryError)): they describe what happened to one event and decide
/// whether it is retried, while `Error` is returned to the caller of an API.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A table name that is not a plain SQL identifier.
    #[error("invalid table name {name:?}: {reason}")]
    InvalidTableName {
        /// The rejected name.
        name: String,
        /// Why it was rejected.
        reason: &'static str,
    },
    /// The event could not be serialised to JSON.
    #[error("cannot serialise event {event_type}: {source}")]
    Serialize {
        /// The event type being serialised.
        event_type: Cow<'static, str>,
        /// The serde error.
        #[source]
        source: serde_json::Error,
    },
    /// Two handlers were registered for the same event type and schema version.
    #[error(
        "two handlers for event type {event_type:?} version {version}: {first} and {second}; \
         keep one of them"
    )]
    DuplicateHandler {
        /// The event type both handlers claim.
        event_type: String,
        /// The schema version both handlers claim.
        version: u32,
        /// The handler registered first.
        first: String,
        /// The handler registered second.
        second: String,
    },
    /// Two upcasters were registered for the same step of an event type.
    #[error(
        "two upcasters from version {from} of event type {event_type:?}: {first} and {second}; \
         keep one of them"
    )]
    DuplicateUpcaster {
        /// The event type.
        event_type: String,
        /// The version both start from.
        from: u32,
        /// The upcaster registered first.
        first: String,
        /// The upcaster registered second.
        second: String,
    },
    /// Handlers the application expects are missing from the registry.
    ///
    /// With `inventory`, a handler defined in a library crate that the binary never references can
    /// be dropped by the linker (`use that_crate as _;` in the binary keeps it);
    /// [`Registry::require`](crate::Registry::require) turns that into this start-up error
    /// instead of events that silently go dead.
    #[error(
        "no handler registered for {}. If these handlers are written with \
         #[outbox::handler] in a library crate, the linker most likely dropped their \
         registrations because the binary never references that crate: add \
         `use that_crate as _;` to the binary (main.rs), naming the crate that defines them",
        missing.join(", ")
    )]
    MissingHandlers {
        /// `event_type vN` of every missing handler.
        missing: Vec<String>,
    },
    /// A relay or router was configured inconsistently.
    #[error("invalid configuration: {0}")]
    Config(String),
    /// The relay could not keep its workers alive.
    #[error("relay stopped: {0}")]
    Relay(String),
    /// A header or aggregate id that brokers cannot carry.
    #[error("invalid {field}: {reason}")]
    InvalidField {
        /// Which field, for instance `header "tenant"` or `aggregate id`.
        field: String,
        /// Why it was rejected.
        reason: &'static str,
    },
    /// An event's payload is longer than the outbox allows
    /// ([`OutboxBuilder::max_payload_bytes`](crate::OutboxBuilder::max_payload_bytes)); nothing
    /// was written.
    #[error("payload of {event_type} is {bytes} bytes, more than the outbox's maximum of {max}")]
    PayloadTooLarge {
        /// The event type.
        event_type: String,
        /// The payload's length.
        bytes: usize,
        /// The configured maximum.
        max: usize,
    },
    /// The database refused or failed.
    #[error("database error: {0}")]
    Database(#[from] sqlx::Error),
    /// A broker refused or failed (a consumer's [`Source`](crate::consumer::Source)).
    #[error("broker error: {0}")]
    Broker(#[source] Box<dyn std::error::Error + Send + Sync>),
    /// A stored row could not be read back.
    #[error("corrupt outbox row {id}: {reason}")]
    CorruptRow {
        /// The row id, as stored.
        id: String,
        /// What was wrong with it.
        reason: String,
    },
}

impl Error {
    /// A broker's error.
    pub fn broker(error: impl Into<Box<dyn std::error::Error + Send + Sync>>) -> Self {
        Self::Broker(error.into())
    }
}

/// `Result` with [`Error`] as the error type.
pub type Result<T, E = Error> = std::result::Result<T, E>;
