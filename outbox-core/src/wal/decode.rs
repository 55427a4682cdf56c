//! Outbox events out of the replication stream: a table row (pgoutput's text format) or a
//! logical decoding message (the JSON object the message-mode `enqueue` writes).

use crate::event::{Envelope, Headers};
use chrono::{DateTime, Utc};
use pg_walstream::RowData;
use serde::Deserialize;
use serde_json::value::RawValue;
use uuid::Uuid;

/// An event to deliver, or one that cannot be read: it is recorded dead with the reason.
pub(super) enum Decoded {
    Event(Envelope),
    Poison(Envelope, String),
}

/// The message the message-mode `enqueue` writes (`json_build_object` in the store).
#[derive(Deserialize)]
struct WireEvent<'a> {
    id: Uuid,
    created_at: DateTime<Utc>,
    aggregate_type: String,
    aggregate_id: String,
    seq: i64,
    event_type: String,
    schema_version: u32,
    topic: String,
    #[serde(borrow)]
    payload: &'a RawValue,
    headers: Headers,
}

pub(super) fn decode_message(content: &[u8], lsn: u64) -> Decoded {
    let parsed = std::str::from_utf8(content)
        .map_err(|e| e.to_string())
        .and_then(|text| serde_json::from_str::<WireEvent<'_>>(text).map_err(|e| e.to_string()));
    match parsed {
        Ok(w) => Decoded::Event(Envelope {
            id: w.id,
            created_at: w.created_at,
            event_type: w.event_type,
            aggregate_type: w.aggregate_type,
            aggregate_id: w.aggregate_id,
            sequence: w.seq,
            schema_version: w.schema_version,
            topic: w.topic,
            payload: w.payload.get().to_owned(),
            headers: w.headers,
            attempt: 1,
        }),
        Err(error) => poison(
            String::from_utf8_lossy(content).into_owned(),
            lsn,
            format!("undecodable outbox message: {error}"),
        ),
    }
}

/// A row inserted into the outbox table; `None` for a row that is not pending (a dead event
/// the relay wrote back itself). `committed_at` (the transaction's commit time) stands in for
/// `created_at` when the server prints timestamps in a `DateStyle` other than ISO: the
/// replication connection cannot choose its own.
pub(super) fn decode_row(row: &RowData, committed_at: DateTime<Utc>) -> Option<Decoded> {
    let text = |name: &str| row.get(name).and_then(|v| v.as_str());
    if text("status").is_some_and(|s| s != "pending") {
        return None;
    }
    let parsed = (|| -> Result<Envelope, String> {
        let field = |name: &str| text(name).ok_or_else(|| format!("column {name} is missing"));
        let id = field("id")?;
        let headers = field("headers")?;
        Ok(Envelope {
            id: id.parse().map_err(|e| format!("id {id:?}: {e}"))?,
            created_at: parse_timestamp(field("created_at")?).unwrap_or_else(|error| {
                static WARNED: std::sync::Once = std::sync::Once::new();
                WARNED.call_once(|| {
                    tracing::warn!(%error, "the server's DateStyle is not ISO: log-tailed rows take their commit time as created_at");
                });
                committed_at
            }),
            event_type: field("event_type")?.to_owned(),
            aggregate_type: field("aggregate_type")?.to_owned(),
            aggregate_id: field("aggregate_id")?.to_owned(),
            sequence: field("seq")?.parse().map_err(|e| format!("seq: {e}"))?,
            schema_version: field("schema_version")?
                .parse()
                .map_err(|e| format!("schema_version: {e}"))?,
            topic: field("topic")?.to_owned(),
            payload: field("payload")?.to_owned(),
            headers: serde_json::from_str(headers).map_err(|e| format!("headers: {e}"))?,
            attempt: 1,
        })
    })();
    Some(match parsed {
        Ok(envelope) => Decoded::Event(envelope),
        Err(reason) => {
            let raw: serde_json::Map<String, serde_json::Value> = row
                .iter()
                .map(|(k, v)| {
                    (
                        k.to_string(),
                        v.as_str().map(Into::into).unwrap_or_default(),
                    )
                })
                .collect();
            let mut dead = poison(
                serde_json::Value::Object(raw).to_string(),
                0,
                format!("undecodable outbox row: {reason}"),
            );
            // Keep what could be read: the row's id and aggregate.
            if let Decoded::Poison(envelope, _) = &mut dead {
                if let Some(id) = text("id").and_then(|id| id.parse().ok()) {
                    envelope.id = id;
                }
                for (column, slot) in [
                    ("aggregate_type", &mut envelope.aggregate_type),
                    ("aggregate_id", &mut envelope.aggregate_id),
                    ("event_type", &mut envelope.event_type),
                ] {
                    if let Some(value) = text(column) {
                        *slot = value.to_owned();
                    }
                }
            }
            dead
        }
    })
}

/// A dead record for what could not be read, keeping the raw text as a JSON string payload.
fn poison(raw: String, lsn: u64, reason: String) -> Decoded {
    let envelope = Envelope {
        id: Uuid::now_v7(),
        created_at: Utc::now(),
        event_type: "(undecodable)".into(),
        aggregate_type: "(undecodable)".into(),
        aggregate_id: format!("lsn {lsn:X}"),
        sequence: 0,
        schema_version: 0,
        topic: String::new(),
        // PostgreSQL text cannot hold NUL.
        payload: serde_json::Value::String(raw.replace('\0', "")).to_string(),
        headers: Headers::default(),
        attempt: 1,
    };
    Decoded::Poison(envelope, reason)
}

/// pgoutput's text form of a `timestamptz`: `2026-11-28 08:38:10.123456+00` (ISO date style).
fn parse_timestamp(text: &str) -> Result<DateTime<Utc>, String> {
    DateTime::parse_from_str(text, "%Y-%m-%d %H:%M:%S%.f%#z")
        .map(|t| t.with_timezone(&Utc))
        .map_err(|e| format!("created_at {text:?}: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_in_pgoutputs_text_form_parse() {
        for (text, micros) in [
            ("2026-11-28 08:38:10.123456+00", 123_456),
            ("2026-11-28 09:38:10.123456+01", 123_456),
            ("2026-11-28 08:38:10+00", 0),
            ("2026-11-28 14:08:10.5+05:30", 500_000),
        ] {
            let t = parse_timestamp(text).unwrap();
            assert_eq!(t.timestamp(), 1_795_855_090, "{text}");
            assert_eq!(t.timestamp_subsec_micros(), micros, "{text}");
        }
        assert!(parse_timestamp("yesterday").is_err());
    }

    #[test]
    fn a_message_keeps_its_payload_byte_for_byte() {
        let content = br#"{"id":"0190c6a4-0000-7000-8000-000000000001","created_at":"2026-11-28T08:38:10.123456+00:00","aggregate_type":"cart","aggregate_id":"c-1","seq":7,"event_type":"CartChanged","schema_version":2,"topic":"carts","payload":{"b": 1,  "a":"\u0000x"},"headers":{"correlation-id":"r-9"}}"#;
        let Decoded::Event(e) = decode_message(content, 1) else {
            panic!("not decoded")
        };
        assert_eq!(e.payload, r#"{"b": 1,  "a":"\u0000x"}"#);
        assert_eq!((e.sequence, e.schema_version), (7, 2));
        assert_eq!(
            e.headers.get("correlation-id").map(String::as_str),
            Some("r-9")
        );
        assert_eq!(e.created_at.timestamp_subsec_micros(), 123_456);
    }

    #[test]
    fn an_undecodable_message_is_poison_with_its_reason_and_text() {
        let Decoded::Poison(e, reason) = decode_message(b"{\"id\": 42, \0}", 0xAB) else {
            panic!("decoded garbage")
        };
        assert!(reason.starts_with("undecodable outbox message"), "{reason}");
        assert_eq!(e.aggregate_id, "lsn AB");
        let raw: String = serde_json::from_str(&e.payload).unwrap();
        assert_eq!(raw, "{\"id\": 42, }");
    }
}
