//! What an operator reads: the outbox's health, its dead events grouped by cause, the aggregates
//! parked behind them. The CLI and the dashboard are thin layers over these.

use super::{EventFilter, EventRecord, EventStatus, Store};
use crate::error::Result;
use crate::retention::Retention;
use chrono::{DateTime, Utc};
use serde::Serialize;
use std::collections::BTreeMap;
use std::future::Future;
use std::time::Duration;
use uuid::Uuid;

/// Read-only inspection of an outbox ([`Outbox::status`](crate::Outbox::status),
/// [`Outbox::dead`](crate::Outbox::dead), [`Outbox::parked`](crate::Outbox::parked)).
pub trait Inspect: Store {
    /// Counts, lag, leases and the aggregates held back longer than `stuck_after` (at most
    /// `limit` of them, the oldest first).
    fn status(
        &self,
        stuck_after: Duration,
        limit: usize,
    ) -> impl Future<Output = Result<OutboxStatus>> + Send + '_;

    /// The dead events `filter` selects (its `group` aside), the most recent first, at most
    /// `limit`.
    fn dead<'a>(
        &'a self,
        filter: &'a EventFilter,
        limit: usize,
    ) -> impl Future<Output = Result<Vec<EventRecord>>> + Send + 'a;

    /// The same events without payloads and headers: what grouping and bulk actions need, a
    /// few hundred bytes per event however large the payloads.
    fn dead_summaries<'a>(
        &'a self,
        filter: &'a EventFilter,
        limit: usize,
    ) -> impl Future<Output = Result<Vec<DeadEvent>>> + Send + 'a;

    /// Aggregates parked at a dead event ([`DeadLetters::Park`](crate::DeadLetters::Park)),
    /// the longest parked first, at most `limit`.
    fn parked(
        &self,
        limit: usize,
    ) -> impl Future<Output = Result<Vec<ParkedAggregate>>> + Send + '_;

    /// How many delivered rows `retention` would remove now.
    fn purgeable<'a>(
        &'a self,
        retention: &'a Retention,
    ) -> impl Future<Output = Result<u64>> + Send + 'a;
}

/// Gives up on a dead event ([`Outbox::discard_dead`](crate::Outbox::discard_dead)).
pub trait ArchiveDead: Store {
    /// In one transaction: releases the aggregate if it is parked at dead event `id`, and moves
    /// the event into `<table>_archive` (where it stays dead and can be read); nothing at all
    /// if the aggregate would still deliver it. Whether it did; with `dry_run`, whether it
    /// would, rolling the transaction back.
    fn archive_dead(
        &self,
        id: Uuid,
        dry_run: bool,
    ) -> impl Future<Output = Result<bool>> + Send + '_;
}

/// The outbox at a glance ([`Outbox::status`](crate::Outbox::status)).
#[derive(Debug, Clone, Serialize)]
#[non_exhaustive]
pub struct OutboxStatus {
    /// When the figures were read (the database's clock for PostgreSQL).
    pub read_at: DateTime<Utc>,
    /// Events by status and event type.
    pub counts: Vec<StatusCount>,
    /// Pending events in all.
    pub pending: u64,
    /// Delivered events still in the table.
    pub delivered: u64,
    /// Dead events.
    pub dead: u64,
    /// The oldest pending event that is due now: since when it has been waiting (its creation,
    /// or its `enqueue_at` time). `None` when nothing is due.
    pub oldest_pending_since: Option<DateTime<Utc>>,
    /// How long that event has been waiting: the lag an alert should fire on.
    pub oldest_pending_age_ms: Option<i64>,
    /// Relays holding at least one unexpired lease.
    pub relays_leasing: u64,
    /// Leases held right now: batches that relay workers have claimed and not yet settled
    /// (a relay with several workers holds several).
    pub leases: u64,
    /// Aggregates leased right now.
    pub aggregates_leased: u64,
    /// Aggregates retrying their next event (at least one failed attempt).
    pub aggregates_retrying: u64,
    /// Aggregates parked at a dead event.
    pub aggregates_parked: u64,
    /// Aggregates whose oldest pending event has waited longer than the threshold.
    pub stuck: Vec<StuckAggregate>,
}

impl OutboxStatus {
    /// Builds the totals and the age from the counts and the oldest due event.
    pub(crate) fn new(
        read_at: DateTime<Utc>,
        counts: Vec<StatusCount>,
        oldest_pending_since: Option<DateTime<Utc>>,
    ) -> Self {
        let total = |status| {
            counts
                .iter()
                .filter(|c| c.status == status)
                .map(|c| c.count)
                .sum()
        };
        Self {
            read_at,
            pending: total(EventStatus::Pending),
            delivered: total(EventStatus::Delivered),
            dead: total(EventStatus::Dead),
            oldest_pending_age_ms: oldest_pending_since
                .map(|since| (read_at - since).num_milliseconds().max(0)),
            oldest_pending_since,
            counts,
            relays_leasing: 0,
            leases: 0,
            aggregates_leased: 0,
            aggregates_retrying: 0,
            aggregates_parked: 0,
            stuck: Vec::new(),
        }
    }
}

/// How many events of one type have one status.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct StatusCount {
    /// The status.
    pub status: EventStatus,
    /// The event type.
    pub event_type: String,
    /// How many.
    pub count: u64,
}

/// An aggregate whose oldest pending event has waited longer than the threshold.
#[derive(Debug, Clone, Serialize)]
#[non_exhaustive]
pub struct StuckAggregate {
    /// The aggregate type.
    pub aggregate_type: String,
    /// The aggregate id.
    pub aggregate_id: String,
    /// Its pending events.
    pub pending: u64,
    /// When its oldest pending event was created.
    pub oldest_created_at: DateTime<Utc>,
    /// Failed attempts at its next event.
    pub attempts: u32,
    /// The sequence it is parked at, if it is parked.
    pub parked_seq: Option<i64>,
    /// The last failure of its next event, if any.
    pub last_error: Option<String>,
}

/// An aggregate parked at a dead event: its later events wait until the dead one is requeued
/// or discarded.
#[derive(Debug, Clone, Serialize)]
#[non_exhaustive]
pub struct ParkedAggregate {
    /// The aggregate type.
    pub aggregate_type: String,
    /// The aggregate id.
    pub aggregate_id: String,
    /// The sequence of the dead event it is parked at.
    pub parked_seq: i64,
    /// That event, if it is still in the table.
    pub event_id: Option<Uuid>,
    /// Its type.
    pub event_type: Option<String>,
    /// Why it died.
    pub reason: Option<String>,
    /// When it died.
    pub dead_at: Option<DateTime<Utc>>,
    /// Events of the aggregate known to wait behind it.
    pub waiting: u64,
}

/// A dead event without its payload and headers.
#[derive(Debug, Clone, Serialize)]
#[non_exhaustive]
pub struct DeadEvent {
    /// The event id.
    pub id: Uuid,
    /// The event type.
    pub event_type: String,
    /// The aggregate type.
    pub aggregate_type: String,
    /// The aggregate id.
    pub aggregate_id: String,
    /// The per-aggregate sequence number.
    pub sequence: i64,
    /// Delivery attempts.
    pub attempts: u32,
    /// Why it died.
    pub reason: Option<String>,
    /// When it died.
    pub dead_at: Option<DateTime<Utc>>,
}

impl DeadEvent {
    /// Its cause's fingerprint ([`dead_fingerprint`]).
    pub fn fingerprint(&self) -> String {
        dead_fingerprint(&self.event_type, self.reason.as_deref())
    }
}

/// Dead events with one cause: one event type and one normalised reason.
#[derive(Debug, Clone, Serialize)]
#[non_exhaustive]
pub struct DeadGroup {
    /// A short stable id of the cause: select the group with
    /// [`EventFilter::group`](crate::EventFilter::group).
    pub fingerprint: String,
    /// The event type.
    pub event_type: String,
    /// The reason with its variable parts (numbers, ids, quoted values) replaced by
    /// placeholders.
    pub reason: String,
    /// Dead events in the group.
    pub count: u64,
    /// When the first of them died.
    pub first_dead_at: Option<DateTime<Utc>>,
    /// When the last of them died.
    pub last_dead_at: Option<DateTime<Utc>>,
    /// One of them, to look at with `dead show`.
    pub example: Uuid,
}

/// The reason of a failure without its variable parts: UUIDs, numbers and hexadecimal tokens
/// become placeholders, runs of whitespace one space, so failures with one cause group
/// together. Words and quoted text are kept: two causes that differ only there (`couldn't
/// connect to 'db'`, `couldn't authenticate to 'db'`; two JSON error bodies) stay apart, since
/// an operator acts on a whole group at once. At most about 300 bytes are kept.
///
/// ```
/// use outbox_core::normalise_reason;
/// assert_eq!(
///     normalise_reason("account 42 not found (request 0b5c6f4e-8b0f-4a4f-9a53-6a8f3f4e2b10)"),
///     normalise_reason("account 7 not found (request 6d0c3b5e-1f2a-4c3b-8d4e-5f6a7b8c9d0e)"),
/// );
/// assert_eq!(normalise_reason("timeout after 3000 ms on \"orders\""), "timeout after <n> ms on \"orders\"");
/// ```
pub fn normalise_reason(reason: &str) -> String {
    const MAX: usize = 300;
    let mut out = String::with_capacity(reason.len().min(MAX));
    // What could still shape the first MAX bytes of the result.
    let chars: Vec<char> = reason.chars().take(MAX * 4).collect();
    let mut i = 0;
    let mut last_space = false;
    while i < chars.len() && out.len() < MAX {
        let c = chars[i];
        if let Some(len) = uuid_at(&chars[i..]) {
            out.push_str("<uuid>");
            i += len;
        } else if c.is_ascii_alphanumeric() && !word_start(&chars, i) {
            // Inside a word (`user_42`, `v2`): kept, digits included.
            out.push(c);
            i += 1;
        } else if c.is_ascii_hexdigit() && word_start(&chars, i) {
            // A number, or a hexadecimal token of 8 or more with a digit in it: a value.
            let len = chars[i..]
                .iter()
                .take_while(|d| d.is_ascii_alphanumeric() || **d == '_')
                .count();
            let word = &chars[i..i + len];
            let digits = word.iter().all(|d| d.is_ascii_digit());
            let hex = len >= 8
                && word.iter().all(char::is_ascii_hexdigit)
                && word.iter().any(char::is_ascii_digit);
            if digits {
                out.push_str("<n>");
            } else if hex {
                out.push_str("<hex>");
            } else {
                out.extend(word.iter().take(MAX));
            }
            i += len;
        } else if c.is_whitespace() {
            if !last_space && !out.is_empty() {
                out.push(' ');
            }
            last_space = true;
            i += 1;
            continue;
        } else {
            out.push(c);
            i += 1;
        }
        last_space = false;
    }
    out.trim_end().to_owned()
}

fn word_start(chars: &[char], i: usize) -> bool {
    i == 0 || !(chars[i - 1].is_ascii_alphanumeric() || chars[i - 1] == '_')
}

fn uuid_at(chars: &[char]) -> Option<usize> {
    const GROUPS: [usize; 5] = [8, 4, 4, 4, 12];
    let mut i = 0;
    for (n, len) in GROUPS.iter().enumerate() {
        if n > 0 {
            (chars.get(i) == Some(&'-')).then_some(())?;
            i += 1;
        }
        let group = chars.get(i..i + len)?;
        group.iter().all(char::is_ascii_hexdigit).then_some(())?;
        i += len;
    }
    Some(i)
}

/// The fingerprint of a failure: 12 hex digits of a stable hash (FNV-1a) of the event type and
/// the normalised reason. Stable across processes and versions of this crate.
pub fn dead_fingerprint(event_type: &str, reason: Option<&str>) -> String {
    let normalised = normalise_reason(reason.unwrap_or(""));
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in event_type
        .bytes()
        .chain(std::iter::once(0))
        .chain(normalised.bytes())
    {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    format!("{:012x}", hash >> 16)
}

/// Groups dead events by [`dead_fingerprint`], the largest group first.
pub fn group_dead(events: &[DeadEvent]) -> Vec<DeadGroup> {
    let mut groups: BTreeMap<String, DeadGroup> = BTreeMap::new();
    for event in events {
        let fingerprint = event.fingerprint();
        let group = groups
            .entry(fingerprint.clone())
            .or_insert_with(|| DeadGroup {
                fingerprint,
                event_type: event.event_type.clone(),
                reason: normalise_reason(event.reason.as_deref().unwrap_or("")),
                count: 0,
                first_dead_at: None,
                last_dead_at: None,
                example: event.id,
            });
        group.count += 1;
        if let Some(at) = event.dead_at {
            group.first_dead_at = Some(group.first_dead_at.map_or(at, |first| first.min(at)));
            group.last_dead_at = Some(group.last_dead_at.map_or(at, |last| last.max(at)));
        }
    }
    let mut groups: Vec<DeadGroup> = groups.into_values().collect();
    groups.sort_by(|a, b| {
        b.count
            .cmp(&a.count)
            .then(a.fingerprint.cmp(&b.fingerprint))
    });
    groups
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn variable_parts_become_placeholders() {
        assert_eq!(
            normalise_reason("handler failed: account 42 has balance -17.5"),
            "handler failed: account <n> has balance -<n>.<n>"
        );
        assert_eq!(
            normalise_reason("no row 'abc' in   table \"t\"\n"),
            "no row 'abc' in table \"t\""
        );
        assert_eq!(
            normalise_reason("commit deadbeef01 failed, v2 api"),
            "commit <hex> failed, v2 api"
        );
        assert_eq!(
            normalise_reason("x1 abc 12ab user_42"),
            "x1 abc 12ab user_42"
        );
        assert_eq!(normalise_reason("it's 5"), "it's <n>");
        assert_eq!(normalise_reason(""), "");
    }

    #[test]
    fn long_and_odd_reasons_are_bounded_and_never_panic() {
        let long = "é🎉\u{0} 7 ".repeat(10_000);
        assert!(normalise_reason(&long).len() <= 310);
        let one_word = format!("a{}", "z".repeat(5_000));
        assert!(normalise_reason(&one_word).len() <= 310);
        for reason in [
            "\"",
            "'",
            "-",
            "0-",
            "01234567-",
            "aaaaaaaa-aaaa-aaaa-aaaa-aaaaaaaaaaa",
        ] {
            normalise_reason(reason);
        }
    }

    #[test]
    fn fingerprints_separate_types_and_causes() {
        let a = dead_fingerprint("payment.created", Some("account 1 closed"));
        assert_eq!(
            a,
            dead_fingerprint("payment.created", Some("account 2 closed"))
        );
        assert_ne!(
            a,
            dead_fingerprint("payment.refunded", Some("account 1 closed"))
        );
        assert_ne!(
            a,
            dead_fingerprint("payment.created", Some("account 1 frozen"))
        );
        assert_eq!(a.len(), 12);
        // Causes that differ in words or quoted text are not merged.
        assert_ne!(
            dead_fingerprint("t", Some("couldn't connect to 'db'")),
            dead_fingerprint("t", Some("couldn't authenticate to 'db'"))
        );
        assert_ne!(
            dead_fingerprint("t", Some(r#"HTTP 400: {"error":"invalid currency"}"#)),
            dead_fingerprint("t", Some(r#"HTTP 400: {"error":"card expired"}"#))
        );
    }

    #[test]
    fn groups_keep_their_death_times_when_some_are_unknown() {
        let at = |s| DateTime::from_timestamp(s, 0);
        let event = |dead_at| DeadEvent {
            id: Uuid::now_v7(),
            event_type: "t".into(),
            aggregate_type: "a".into(),
            aggregate_id: "1".into(),
            sequence: 1,
            attempts: 1,
            reason: Some("boom".into()),
            dead_at,
        };
        let groups = group_dead(&[event(at(20)), event(None), event(at(10))]);
        assert_eq!(groups.len(), 1);
        assert_eq!(
            (groups[0].first_dead_at, groups[0].last_dead_at),
            (at(10), at(20))
        );
        assert_eq!(groups[0].count, 3);
    }
}
