use crate::error::{Error, Result};
use chrono::{DateTime, Utc};
use serde::Serialize;
use std::collections::BTreeMap;
use uuid::Uuid;

/// A domain event that can be written to the outbox.
///
/// Implement it with `#[derive(OutboxEvent)]` from the `outbox` crate rather than by hand: the
/// derive checks the attributes at compile time.
///
/// The constants are what the relay, the transports and the handler registry route on; they are
/// constants so that handler registrations can be built at compile time.
#[diagnostic::on_unimplemented(
    message = "`{Self}` is not an outbox event",
    label = "not an outbox event",
    note = "add `#[derive(outbox::OutboxEvent)]` (with serde's Serialize and Deserialize) to the type"
)]
pub trait OutboxEvent: Serialize {
    /// The event type name, for instance `"payment.created"`.
    const EVENT_TYPE: &'static str;
    /// The kind of aggregate the event belongs to, for instance `"payment"`.
    const AGGREGATE_TYPE: &'static str;
    /// The version of the payload's schema; a handler is registered for one version.
    const SCHEMA_VERSION: u32;
    /// The route: Kafka topic, RabbitMQ exchange / routing-key base, NATS subject base.
    const TOPIC: &'static str;

    /// The id of the aggregate instance. Events of one aggregate are delivered in commit order.
    fn aggregate_id(&self) -> String;
}

/// Well-known keys of an event's stored headers ([`Envelope::headers`], the `headers` column).
///
/// On broker messages the transports carry the correlation and causation ids under the
/// library's `outbox-` names ([`wire::CORRELATION_ID`], [`wire::CAUSATION_ID`]); the trace
/// context keeps its W3C names, which tracing tools look for.
pub mod header {
    /// Correlates every event caused by one request (on the wire: `outbox-correlation-id`).
    pub const CORRELATION_ID: &str = "correlation_id";
    /// The id of the event or command that caused this one (on the wire: `outbox-causation-id`).
    pub const CAUSATION_ID: &str = "causation_id";
    /// W3C trace context.
    pub const TRACEPARENT: &str = "traceparent";
    /// W3C trace state.
    pub const TRACESTATE: &str = "tracestate";
}

/// String headers stored with an event (correlation id, trace context, your own keys).
pub type Headers = BTreeMap<String, String>;

/// Options for one enqueued event: deferred delivery and metadata.
///
/// ```
/// use outbox_core::EnqueueOptions;
/// use std::time::Duration;
/// let opts = EnqueueOptions::new()
///     .delay(Duration::from_secs(30))
///     .correlation_id("req-42")
///     .header("tenant", "acme");
/// ```
#[derive(Debug, Clone, Default)]
pub struct EnqueueOptions {
    pub(crate) available_at: Option<Deliver>,
    pub(crate) headers: Headers,
    pub(crate) idempotency_key: Option<String>,
}

#[derive(Debug, Clone, Copy)]
pub(crate) enum Deliver {
    At(DateTime<Utc>),
    After(std::time::Duration),
}

impl EnqueueOptions {
    /// No delay, no headers.
    pub fn new() -> Self {
        Self::default()
    }

    /// Deliver no earlier than `when` (an effective date).
    pub fn available_at(mut self, when: DateTime<Utc>) -> Self {
        self.available_at = Some(Deliver::At(when));
        self
    }

    /// Deliver no earlier than `delay` after the database's clock at insert.
    pub fn delay(mut self, delay: std::time::Duration) -> Self {
        self.available_at = Some(Deliver::After(delay));
        self
    }

    /// Sets the correlation id header.
    pub fn correlation_id(self, id: impl Into<String>) -> Self {
        self.header(header::CORRELATION_ID, id)
    }

    /// Sets the causation id header.
    pub fn causation_id(self, id: impl Into<String>) -> Self {
        self.header(header::CAUSATION_ID, id)
    }

    /// Sets the W3C `traceparent` header, so consumers can continue the trace.
    pub fn traceparent(self, value: impl Into<String>) -> Self {
        self.header(header::TRACEPARENT, value)
    }

    /// Sets any header.
    pub fn header(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.headers.insert(key.into(), value.into());
        self
    }

    /// Enqueues the event once for `key` in this outbox: a later enqueue with the same key (a
    /// client retrying its HTTP request with the same `Idempotency-Key`) writes nothing and
    /// gives the first event's id ([`Outbox::enqueue_once`](crate::Outbox::enqueue_once) says
    /// which happened). Two transactions enqueueing one key at once: the second waits for the
    /// first, and finds its event if it committed (at `REPEATABLE READ` or `SERIALIZABLE`,
    /// PostgreSQL fails the second with a serialization error, SQLSTATE 40001, instead: retry
    /// that transaction and it finds the event). A key is kept while its event is in the table
    /// and not delivered, and as long as [`Retention`](crate::Retention) keeps it once
    /// delivered. An empty key is refused.
    pub fn idempotency_key(mut self, key: impl Into<String>) -> Self {
        self.idempotency_key = Some(key.into());
        self
    }
}

/// One serialised event, ready to be written; build it with [`Message::new`] to enqueue events
/// of different types in one batch.
#[derive(Debug, Clone)]
pub struct Message {
    pub(crate) id: Uuid,
    pub(crate) event_type: &'static str,
    pub(crate) aggregate_type: &'static str,
    pub(crate) aggregate_id: String,
    pub(crate) schema_version: u32,
    pub(crate) topic: &'static str,
    pub(crate) payload: String,
    pub(crate) options: EnqueueOptions,
}

impl Message {
    /// Serialises `event` with default options.
    pub fn new<E: OutboxEvent>(event: &E) -> Result<Self> {
        Self::with_options(event, EnqueueOptions::default())
    }

    /// Serialises `event` with `options`.
    pub fn with_options<E: OutboxEvent>(event: &E, mut options: EnqueueOptions) -> Result<Self> {
        let payload = serde_json::to_string(event).map_err(|source| Error::Serialize {
            event_type: E::EVENT_TYPE.into(),
            source,
        })?;
        let aggregate_id = event.aggregate_id();
        check_field("aggregate id", &aggregate_id, MAX_AGGREGATE_ID_BYTES)?;
        if let Some(key) = &options.idempotency_key {
            // An absent request header mapped to "" would merge every such request into one.
            if key.is_empty() {
                return Err(Error::InvalidField {
                    field: "idempotency key".into(),
                    reason: "it is empty",
                });
            }
            check_field("idempotency key", key, MAX_IDEMPOTENCY_KEY_BYTES)?;
        }
        for (key, value) in &options.headers {
            check_header_name(key)?;
            check_field(
                &format!("value of header {key:?}"),
                value,
                MAX_HEADER_VALUE_BYTES,
            )?;
        }
        crate::trace::capture(&mut options.headers);
        Ok(Self {
            id: Uuid::now_v7(),
            event_type: E::EVENT_TYPE,
            aggregate_type: E::AGGREGATE_TYPE,
            aggregate_id,
            schema_version: E::SCHEMA_VERSION,
            topic: E::TOPIC,
            payload,
            options,
        })
    }

    /// The id the event will have in the outbox (a UUID v7).
    pub fn id(&self) -> Uuid {
        self.id
    }

    /// The idempotency key it was enqueued with, if any.
    pub fn idempotency_key(&self) -> Option<&str> {
        self.options.idempotency_key.as_deref()
    }

    pub(crate) fn headers_json(&self) -> String {
        // A map of strings always serialises.
        serde_json::to_string(&self.options.headers).unwrap_or_else(|_| "{}".to_owned())
    }
}

/// The longest aggregate id accepted at enqueue.
pub const MAX_AGGREGATE_ID_BYTES: usize = 1024;
/// The longest header value accepted at enqueue.
pub const MAX_HEADER_VALUE_BYTES: usize = 16 * 1024;
/// The longest idempotency key accepted at enqueue.
pub const MAX_IDEMPOTENCY_KEY_BYTES: usize = 512;

/// Every broker must be able to carry what the outbox sends: NATS header values cannot hold a
/// line break, and no broker takes a NUL byte in a header. Checked at enqueue so that a bad value
/// is the caller's error, not a poison event.
fn check_field(field: &str, value: &str, max: usize) -> Result<()> {
    let reject = |reason| {
        Err(Error::InvalidField {
            field: field.to_owned(),
            reason,
        })
    };
    if value.len() > max {
        return reject("it is too long");
    }
    if value.chars().any(|c| c.is_control() && c != '\t') {
        return reject("it contains a control character (a line break, NUL, ...), which brokers cannot carry in a header");
    }
    Ok(())
}

/// Whether `name` belongs to the library's own metadata (`outbox-*`, `content-type`) or to a
/// broker's own headers (`Nats-*`, such as the `Nats-Msg-Id` the NATS transport deduplicates
/// on), compared without case: a user header of that name would override them.
pub fn is_reserved_header(name: &str) -> bool {
    let lower = name.to_ascii_lowercase();
    lower.starts_with("outbox-") || lower.starts_with("nats-") || lower == wire::CONTENT_TYPE
}

/// Header names: printable ASCII without `:` or spaces (NATS), at most 255 bytes (AMQP), and
/// none of the reserved names.
fn check_header_name(name: &str) -> Result<()> {
    let field = || format!("header name {name:?}");
    if is_reserved_header(name) {
        return Err(Error::InvalidField {
            field: field(),
            reason: "it is reserved for the outbox's and the brokers' own metadata \
                     (outbox-*, nats-*, content-type)",
        });
    }
    if name.is_empty() || name.len() > 255 {
        return Err(Error::InvalidField {
            field: field(),
            reason: "it must be 1 to 255 bytes long",
        });
    }
    if !name.bytes().all(|b| b.is_ascii_graphic() && b != b':') {
        return Err(Error::InvalidField {
            field: field(),
            reason: "only printable ASCII without ':' or spaces is allowed",
        });
    }
    Ok(())
}

/// An event read back from the outbox, as handed to a destination (handlers or a broker).
#[derive(Debug, Clone)]
pub struct Envelope {
    /// The outbox row id (UUID v7); use it to deduplicate.
    pub id: Uuid,
    /// When the event was enqueued (database clock).
    pub created_at: DateTime<Utc>,
    /// The event type name.
    pub event_type: String,
    /// The aggregate type.
    pub aggregate_type: String,
    /// The aggregate id.
    pub aggregate_id: String,
    /// Position of the event in its aggregate: 1, 2, 3, … in commit order, without gaps.
    pub sequence: i64,
    /// The payload's schema version.
    pub schema_version: u32,
    /// The route (topic, exchange, subject base).
    pub topic: String,
    /// The payload, as JSON text.
    pub payload: String,
    /// Stored headers (correlation id, trace context, …).
    pub headers: Headers,
    /// Which delivery attempt this is, starting at 1.
    pub attempt: u32,
}

impl Envelope {
    /// The correlation id header, if any.
    pub fn correlation_id(&self) -> Option<&str> {
        self.headers.get(header::CORRELATION_ID).map(String::as_str)
    }

    /// The causation id header, if any.
    pub fn causation_id(&self) -> Option<&str> {
        self.headers.get(header::CAUSATION_ID).map(String::as_str)
    }

    /// Every header a transport should put on the broker message: the stored headers plus the
    /// outbox metadata (`outbox-id`, `outbox-event-type`, `outbox-aggregate-type`,
    /// `outbox-aggregate-id`, `outbox-sequence`, `outbox-schema-version`, `content-type`).
    ///
    /// The stored correlation and causation ids go out as `outbox-correlation-id` and
    /// `outbox-causation-id` (see [`wire`]). Other stored headers with a reserved name (see
    /// [`is_reserved_header`]; enqueue refuses them, but rows may come from elsewhere) are left
    /// out, and the metadata comes last, so nothing can override it.
    pub fn wire_headers(&self) -> Vec<(String, String)> {
        let mut out = Vec::with_capacity(self.headers.len() + 7);
        out.extend(self.headers.iter().filter_map(|(k, v)| {
            let name = match wire::renamed(k) {
                Some(name) => name.to_owned(),
                None if is_reserved_header(k) => return None,
                None => k.clone(),
            };
            Some((name, v.clone()))
        }));
        out.push((wire::ID.to_owned(), self.id.to_string()));
        out.push((wire::EVENT_TYPE.to_owned(), self.event_type.clone()));
        out.push((wire::AGGREGATE_TYPE.to_owned(), self.aggregate_type.clone()));
        out.push((wire::AGGREGATE_ID.to_owned(), self.aggregate_id.clone()));
        out.push((wire::SEQUENCE.to_owned(), self.sequence.to_string()));
        out.push((
            wire::SCHEMA_VERSION.to_owned(),
            self.schema_version.to_string(),
        ));
        out.push((wire::CONTENT_TYPE.to_owned(), wire::JSON.to_owned()));
        out
    }
}

impl Envelope {
    /// Rebuilds the envelope of a broker message from its headers (see
    /// [`wire_headers`](Self::wire_headers)) and payload: what consumers hand to the
    /// [`Dispatcher`](crate::Dispatcher). `attempt` is the broker's delivery count.
    ///
    /// Headers that are not outbox metadata become the envelope's headers again, the
    /// correlation and causation ids under their stored names ([`header`]). The names used
    /// in 0.1 (`correlation_id`, `causation_id` on the wire) are still read, for messages
    /// from producers not yet upgraded; the `outbox-` names win when both are present.
    pub fn from_wire<'a>(
        headers: impl IntoIterator<Item = (&'a str, &'a str)>,
        payload: String,
        attempt: u32,
    ) -> Result<Self, String> {
        let mut id = None;
        let mut event_type = None;
        let mut aggregate_type = None;
        let mut aggregate_id = None;
        let mut sequence = None;
        let mut schema_version = None;
        let mut rest = Headers::new();
        let mut ids = Headers::new();
        let mut stored: Option<Headers> = None;
        for (key, value) in headers {
            match key {
                wire::ID => {
                    id = Some(Uuid::parse_str(value).map_err(|e| format!("bad {key}: {e}"))?)
                }
                wire::EVENT_TYPE => event_type = Some(value.to_owned()),
                wire::AGGREGATE_TYPE => aggregate_type = Some(value.to_owned()),
                wire::AGGREGATE_ID => aggregate_id = Some(value.to_owned()),
                wire::SEQUENCE => {
                    sequence = Some(value.parse().map_err(|e| format!("bad {key}: {e}"))?)
                }
                wire::SCHEMA_VERSION => {
                    schema_version = Some(value.parse().map_err(|e| format!("bad {key}: {e}"))?)
                }
                wire::CONTENT_TYPE => {}
                wire::CORRELATION_ID => {
                    ids.insert(header::CORRELATION_ID.to_owned(), value.to_owned());
                }
                wire::CAUSATION_ID => {
                    ids.insert(header::CAUSATION_ID.to_owned(), value.to_owned());
                }
                wire::HEADERS => {
                    let all: Headers =
                        serde_json::from_str(value).map_err(|e| format!("bad {key}: {e}"))?;
                    stored = Some(
                        all.into_iter()
                            .filter(|(k, _)| !is_reserved_header(k))
                            .collect(),
                    );
                }
                // The old names (`correlation_id`, `causation_id`) land here, under the
                // stored names they already are.
                _ => {
                    rest.insert(key.to_owned(), value.to_owned());
                }
            }
        }
        rest.extend(ids);
        // The stored object, where a relay sent one, is the whole of the stored headers: the
        // other headers are the relay's own (Debezium's router always adds `id`).
        let rest = stored.unwrap_or(rest);
        let missing = |name: &str| format!("message has no {name} header");
        let id = id.ok_or_else(|| missing(wire::ID))?;
        Ok(Self {
            created_at: id
                .get_timestamp()
                .and_then(|t| {
                    let (secs, nanos) = t.to_unix();
                    DateTime::from_timestamp(secs as i64, nanos)
                })
                .unwrap_or_default(),
            id,
            event_type: event_type.ok_or_else(|| missing(wire::EVENT_TYPE))?,
            aggregate_type: aggregate_type.ok_or_else(|| missing(wire::AGGREGATE_TYPE))?,
            aggregate_id: aggregate_id.ok_or_else(|| missing(wire::AGGREGATE_ID))?,
            sequence: sequence.ok_or_else(|| missing(wire::SEQUENCE))?,
            schema_version: schema_version.ok_or_else(|| missing(wire::SCHEMA_VERSION))?,
            topic: String::new(),
            payload,
            headers: rest,
            attempt,
        })
    }
}

/// Header names the transports put on broker messages: everything the library sets is named
/// `outbox-…` (kebab case), except `content-type` and the W3C trace context (`traceparent`,
/// `tracestate`), whose names are standard.
pub mod wire {
    use super::header;

    /// The correlation id (stored as [`header::CORRELATION_ID`], `correlation_id` on the wire
    /// in 0.1).
    pub const CORRELATION_ID: &str = "outbox-correlation-id";
    /// The causation id (stored as [`header::CAUSATION_ID`], `causation_id` on the wire in
    /// 0.1).
    pub const CAUSATION_ID: &str = "outbox-causation-id";
    /// The outbox row id.
    pub const ID: &str = "outbox-id";
    /// The event type.
    pub const EVENT_TYPE: &str = "outbox-event-type";
    /// The aggregate type.
    pub const AGGREGATE_TYPE: &str = "outbox-aggregate-type";
    /// The aggregate id.
    pub const AGGREGATE_ID: &str = "outbox-aggregate-id";
    /// The per-aggregate sequence number.
    pub const SEQUENCE: &str = "outbox-sequence";
    /// The payload schema version.
    pub const SCHEMA_VERSION: &str = "outbox-schema-version";
    /// The payload content type.
    pub const CONTENT_TYPE: &str = "content-type";
    /// The stored headers as one JSON object of strings: how an external relay that copies
    /// columns into headers carries the `headers` column (Debezium's outbox event router with
    /// `headers:header:outbox-headers`). This library's transports send each header on its
    /// own; [`Envelope::from_wire`](super::Envelope::from_wire) reads both, and where this
    /// header is present it is the whole of the stored headers.
    pub const HEADERS: &str = "outbox-headers";
    /// The only content type written today.
    pub const JSON: &str = "application/json";

    /// The wire name of a stored header that the library renames on the wire.
    pub(crate) fn renamed(stored: &str) -> Option<&'static str> {
        match stored {
            header::CORRELATION_ID => Some(CORRELATION_ID),
            header::CAUSATION_ID => Some(CAUSATION_ID),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(serde::Serialize)]
    struct Odd(String);

    impl OutboxEvent for Odd {
        const EVENT_TYPE: &'static str = "odd";
        const AGGREGATE_TYPE: &'static str = "odd";
        const SCHEMA_VERSION: u32 = 1;
        const TOPIC: &'static str = "odd";
        fn aggregate_id(&self) -> String {
            self.0.clone()
        }
    }

    #[test]
    fn fields_brokers_cannot_carry_are_rejected_naming_the_field() {
        let err = Message::new(&Odd("a\r\nb".into())).unwrap_err().to_string();
        assert!(err.contains("aggregate id"), "{err}");
        let opts = EnqueueOptions::new().header("tenant", "x\ny");
        let err = Message::with_options(&Odd("a".into()), opts)
            .unwrap_err()
            .to_string();
        assert!(err.contains("\"tenant\""), "{err}");
        let opts = EnqueueOptions::new().header("bad:name", "v");
        let err = Message::with_options(&Odd("a".into()), opts)
            .unwrap_err()
            .to_string();
        assert!(err.contains("bad:name"), "{err}");
        let opts = EnqueueOptions::new().header("nul", "a\0");
        assert!(Message::with_options(&Odd("a".into()), opts).is_err());
        for reserved in [
            "outbox-id",
            "Outbox-Sequence",
            "Nats-Msg-Id",
            "content-type",
        ] {
            let opts = EnqueueOptions::new().header(reserved, "x");
            let err = Message::with_options(&Odd("a".into()), opts)
                .unwrap_err()
                .to_string();
            assert!(err.contains("reserved"), "{reserved}: {err}");
        }
        let opts = EnqueueOptions::new().header("ok", "tab\tis fine, é too");
        assert!(Message::with_options(&Odd("a-1".into()), opts).is_ok());
    }

    #[test]
    fn wire_headers_round_trip() {
        let mut headers = Headers::new();
        headers.insert(header::CORRELATION_ID.into(), "req-1".into());
        headers.insert(header::CAUSATION_ID.into(), "cmd-9".into());
        headers.insert("tenant".into(), "acme".into());
        let envelope = Envelope {
            id: Uuid::now_v7(),
            created_at: Utc::now(),
            event_type: "a.b".into(),
            aggregate_type: "agg".into(),
            aggregate_id: "42".into(),
            sequence: 7,
            schema_version: 2,
            topic: "t".into(),
            payload: "{}".into(),
            headers,
            attempt: 1,
        };
        let wire = envelope.wire_headers();
        let names: Vec<&str> = wire.iter().map(|(k, _)| k.as_str()).collect();
        // Everything the library sets is `outbox-…`, the user's own header as it was.
        assert!(
            names.contains(&"outbox-correlation-id") && names.contains(&"outbox-causation-id"),
            "{names:?}"
        );
        assert!(!names.contains(&"correlation_id") && !names.contains(&"causation_id"));
        assert!(names.contains(&"tenant"), "{names:?}");
        let back = Envelope::from_wire(
            wire.iter().map(|(k, v)| (k.as_str(), v.as_str())),
            "{}".into(),
            3,
        )
        .unwrap();
        assert_eq!(back.id, envelope.id);
        assert_eq!(back.event_type, "a.b");
        assert_eq!(back.aggregate_id, "42");
        assert_eq!(back.sequence, 7);
        assert_eq!(back.schema_version, 2);
        assert_eq!(back.attempt, 3);
        assert_eq!(back.correlation_id(), Some("req-1"));
        assert_eq!(back.causation_id(), Some("cmd-9"));
        assert_eq!(back.headers, envelope.headers);
        assert_eq!(
            back.created_at.timestamp_millis() / 1000,
            envelope.created_at.timestamp_millis() / 1000
        );

        // A message from a producer that still writes the old names.
        let mut old = wire.clone();
        for (name, _) in &mut old {
            match name.as_str() {
                "outbox-correlation-id" => *name = "correlation_id".into(),
                "outbox-causation-id" => *name = "causation_id".into(),
                _ => {}
            }
        }
        let from_old = Envelope::from_wire(
            old.iter().map(|(k, v)| (k.as_str(), v.as_str())),
            "{}".into(),
            1,
        )
        .unwrap();
        assert_eq!(from_old.correlation_id(), Some("req-1"));
        assert_eq!(from_old.causation_id(), Some("cmd-9"));
        assert_eq!(from_old.headers, envelope.headers);

        // Both names present (whatever their order): the new one wins.
        for pairs in [
            [("correlation_id", "old"), ("outbox-correlation-id", "new")],
            [("outbox-correlation-id", "new"), ("correlation_id", "old")],
        ] {
            let both = Envelope::from_wire(
                wire.iter()
                    .map(|(k, v)| (k.as_str(), v.as_str()))
                    .filter(|(k, _)| *k != "outbox-correlation-id")
                    .chain(pairs),
                "{}".into(),
                1,
            )
            .unwrap();
            assert_eq!(both.correlation_id(), Some("new"));
        }

        let err = Envelope::from_wire([("outbox-id", "nope")], String::new(), 1).unwrap_err();
        assert!(err.contains("bad outbox-id"), "{err}");
        let err = Envelope::from_wire(std::iter::empty(), String::new(), 1).unwrap_err();
        assert_eq!(err, "message has no outbox-id header");

        // The stored headers as one JSON object (Debezium's router copying the `headers`
        // column): they are the envelope's headers, under their stored names; reserved names
        // in it are ignored, and the relay's own headers (the router's `id`) are not taken.
        let json = r#"{"correlation_id":"req-1","tenant":"a","id":"order-42","outbox-id":"x"}"#;
        let from_object = Envelope::from_wire(
            wire.iter()
                .map(|(k, v)| (k.as_str(), v.as_str()))
                .filter(|(k, _)| !k.starts_with("outbox-c") && *k != "tenant")
                .chain([("id", "ffff"), ("outbox-headers", json), ("x-relay", "b")]),
            "{}".into(),
            1,
        )
        .unwrap();
        assert_eq!(from_object.id, envelope.id);
        let expected: Headers = [
            ("correlation_id", "req-1"),
            ("tenant", "a"),
            ("id", "order-42"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
        assert_eq!(from_object.headers, expected);
        let err = Envelope::from_wire(
            wire.iter()
                .map(|(k, v)| (k.as_str(), v.as_str()))
                .chain([("outbox-headers", "[1]")]),
            String::new(),
            1,
        )
        .unwrap_err();
        assert!(err.contains("bad outbox-headers"), "{err}");
    }
}
