//! What the SQL stores share: statement text where the dialects agree, and turning rows into
//! the store's types.

use super::{
    EventRecord, EventStatus, Inconsistency, ParkedAggregate, StatusCount, StuckAggregate,
};
use crate::error::{Error, Result};
use crate::event::Envelope;
use chrono::{DateTime, Utc};
use std::time::Duration;
use uuid::Uuid;

/// Pending events no relay will ever claim: beyond their cursor's known sequence, or at or
/// below the point it has settled, or without a cursor; `unannounced` adds the dialect's
/// condition that no announcement is on its way for them. (MySQL writes its own: it keys
/// aggregates by hash.)
#[cfg(any(feature = "postgres", feature = "sqlite"))]
pub(super) fn check(t: &str, unannounced: &str) -> String {
    format!(
        r#"SELECT o.aggregate_type, o.aggregate_id,
       count(*) AS stranded, min(o.seq) AS first_seq, c.done_seq, c.known_seq
FROM "{t}" o
LEFT JOIN "{t}_cursors" c ON c.aggregate_type = o.aggregate_type AND c.aggregate_id = o.aggregate_id
WHERE o.status = 'pending'
  AND (c.aggregate_id IS NULL OR o.seq <= c.done_seq OR o.seq > c.known_seq){unannounced}
GROUP BY o.aggregate_type, o.aggregate_id, c.done_seq, c.known_seq
ORDER BY o.aggregate_type, o.aggregate_id"#
    )
}

/// A row of [`check`]: aggregate type and id, stranded events, the first one's sequence, the
/// cursor's `done_seq` and `known_seq`.
pub(super) type CheckRow = (String, String, i64, i64, Option<i64>, Option<i64>);

pub(super) fn inconsistencies(rows: Vec<CheckRow>) -> Vec<Inconsistency> {
    rows.into_iter()
        .map(
            |(aggregate_type, aggregate_id, stranded, first, done, known)| Inconsistency {
                aggregate_type,
                aggregate_id,
                problem: match (done, known) {
                    (Some(done), Some(known)) => format!(
                        "{stranded} pending event(s) from seq {first} outside what its cursor \
                         will deliver (settled up to {done}, known up to {known})"
                    ),
                    _ => format!("{stranded} pending event(s) from seq {first} and no cursor"),
                },
            },
        )
        .collect()
}

/// The times of an [`EventRecord`] beyond its envelope's.
pub(super) struct RecordTimes {
    pub available_at: DateTime<Utc>,
    pub delivered_at: Option<DateTime<Utc>>,
    pub dead_at: Option<DateTime<Utc>>,
    pub consumed_at: Option<DateTime<Utc>>,
}

pub(super) fn record(
    envelope: Envelope,
    status: &str,
    last_error: Option<String>,
    times: RecordTimes,
    failures: Option<&str>,
) -> Result<EventRecord> {
    // Bookkeeping for the operator: unreadable, it is left out rather than failing the read.
    let failures = failures
        .and_then(|text| serde_json::from_str(text).ok())
        .unwrap_or_default();
    Ok(EventRecord {
        status: EventStatus::parse(status).ok_or_else(|| Error::CorruptRow {
            id: envelope.id.to_string(),
            reason: format!("unknown status {status:?}"),
        })?,
        last_error,
        available_at: times.available_at,
        delivered_at: times.delivered_at,
        dead_at: times.dead_at,
        consumed_at: times.consumed_at,
        id: envelope.id,
        event_type: envelope.event_type,
        aggregate_type: envelope.aggregate_type,
        aggregate_id: envelope.aggregate_id,
        sequence: envelope.sequence,
        attempts: envelope.attempt,
        created_at: envelope.created_at,
        payload: envelope.payload,
        schema_version: envelope.schema_version,
        topic: envelope.topic,
        headers: envelope.headers,
        failures,
    })
}

/// Milliseconds, saturating: an absurd duration must not fail a statement.
pub(super) fn duration_ms(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

/// Rows of the status counts: status, event type, count.
pub(super) fn status_counts(rows: Vec<(String, String, i64)>) -> Result<Vec<StatusCount>> {
    rows.into_iter()
        .map(|(status, event_type, count)| {
            Ok(StatusCount {
                status: EventStatus::parse(&status).ok_or_else(|| Error::CorruptRow {
                    id: format!("events of type {event_type}"),
                    reason: format!("unknown status {status:?}"),
                })?,
                event_type,
                count: count.max(0) as u64,
            })
        })
        .collect()
}

/// A stuck aggregate: type, id, pending events, oldest pending creation, attempts, parked
/// sequence, the last failure of its first pending event.
pub(super) type StuckRow = (
    String,
    String,
    i64,
    DateTime<Utc>,
    i64,
    Option<i64>,
    Option<String>,
);

pub(super) fn stuck(rows: Vec<StuckRow>) -> Vec<StuckAggregate> {
    rows.into_iter()
        .map(
            |(aggregate_type, aggregate_id, pending, oldest, attempts, parked_seq, last_error)| {
                StuckAggregate {
                    aggregate_type,
                    aggregate_id,
                    pending: pending.max(0) as u64,
                    oldest_created_at: oldest,
                    attempts: attempts.clamp(0, u32::MAX.into()) as u32,
                    parked_seq,
                    last_error,
                }
            },
        )
        .collect()
}

/// A parked aggregate: type, id, parked sequence, the dead event's id, type, reason and death,
/// events waiting behind it.
pub(super) type ParkedRow = (
    String,
    String,
    i64,
    Option<Uuid>,
    Option<String>,
    Option<String>,
    Option<DateTime<Utc>>,
    i64,
);

pub(super) fn parked(rows: Vec<ParkedRow>) -> Vec<ParkedAggregate> {
    rows.into_iter()
        .map(
            |(
                aggregate_type,
                aggregate_id,
                parked_seq,
                event_id,
                event_type,
                reason,
                dead_at,
                waiting,
            )| {
                ParkedAggregate {
                    aggregate_type,
                    aggregate_id,
                    parked_seq,
                    event_id,
                    event_type,
                    reason,
                    dead_at,
                    waiting: waiting.max(0) as u64,
                }
            },
        )
        .collect()
}

/// `at - age`, with the age capped at a century (a database refuses times before year 1).
pub(super) fn cutoff(at: DateTime<Utc>, age: Duration) -> DateTime<Utc> {
    let century = Duration::from_secs(100 * 365 * 86_400);
    let age = chrono::Duration::from_std(age.min(century)).expect("a century fits");
    at - age
}
