//! The outbox table: schema, enqueue, and the statements the relay runs.

mod inspect;
#[cfg(feature = "mysql")]
pub(crate) mod mysql;
#[cfg(feature = "postgres")]
pub(crate) mod postgres;
#[cfg(any(feature = "postgres", feature = "sqlite", feature = "mysql"))]
mod sql;
#[cfg(feature = "sqlite")]
pub(crate) mod sqlite;

use crate::error::{Error, Result};
use crate::event::{EnqueueOptions, Envelope, Message, OutboxEvent};
use crate::retention::Retention;
use crate::table::TableName;
use chrono::{DateTime, Utc};
use sqlx::Pool;
use std::collections::BTreeMap;
use std::fmt;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;
use uuid::Uuid;

pub use inspect::{
    dead_fingerprint, group_dead, normalise_reason, ArchiveDead, DeadEvent, DeadGroup, Inspect,
    OutboxStatus, ParkedAggregate, StatusCount, StuckAggregate,
};

/// A database the outbox can live in: PostgreSQL (`postgres` feature), SQLite (`sqlite`) or
/// MySQL 8 / MariaDB 10.6+ (`mysql`).
///
/// It names the [`Store`] that holds an outbox in this database and the [`InboxStore`] that
/// holds a consumer's inbox. A new database is one module implementing those two traits and
/// this one (the stores of this crate are the models: `store/postgres.rs`, `store/sqlite.rs`).
/// Rust's coherence rules want `Backend` implemented in this crate for sqlx's database types,
/// so new stores live here, behind a cargo feature, with their tests.
pub trait Backend: sqlx::Database {
    /// Where an outbox in this database lives.
    type Store: Store<Connection = Self::Connection>;
    /// Where a consumer's inbox in this database lives.
    type Inbox: InboxStore<Connection = Self::Connection>;

    /// The store for the outbox in `table`, reached through `pool`.
    fn open_store(pool: Pool<Self>, table: TableName, options: StoreOptions) -> Self::Store;

    /// The store for the inbox in `table`.
    fn open_inbox(pool: Pool<Self>, table: TableName) -> Self::Inbox;

    /// Whether this database's store can keep an outbox in `layout` (the standard one only,
    /// unless the store says otherwise).
    fn supports_layout(layout: TableLayout) -> bool {
        layout == TableLayout::Standard
    }

    /// Whether this database's store can write for a log-tailing relay (see
    /// [`OutboxBuilder::log_tailing`]).
    fn supports_log_tailing() -> bool {
        false
    }
}

/// What an [`OutboxBuilder`] passes to [`Backend::open_store`].
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct StoreOptions {
    /// Wake relays at each enqueueing commit (PostgreSQL's `NOTIFY`); see
    /// [`OutboxBuilder::notify`].
    pub notify: bool,
    /// The table's columns; see [`OutboxBuilder::layout`].
    pub layout: TableLayout,
    /// Events are for an external relay and leave the table in the enqueueing transaction; see
    /// [`OutboxBuilder::hand_off`].
    pub hand_off: bool,
    /// Events are for this library's log-tailing relay; see [`OutboxBuilder::log_tailing`].
    pub log_tailing: Option<TailMode>,
}

impl StoreOptions {
    /// Whether events are relayed from the database's log rather than by polling relays: they
    /// are not announced to polling relays, and whatever sets a row pending for them is refused.
    pub fn relayed_from_log(&self) -> bool {
        self.hand_off || self.log_tailing.is_some()
    }

    /// Whether `enqueue` writes a row and deletes it in the same transaction, for a log reader.
    pub fn deletes_at_enqueue(&self) -> bool {
        self.hand_off || self.log_tailing == Some(TailMode::Table)
    }
}

impl Default for StoreOptions {
    fn default() -> Self {
        Self {
            notify: true,
            layout: TableLayout::Standard,
            hand_off: false,
            log_tailing: None,
        }
    }
}

/// How `enqueue` writes events for the log-tailing relay (PostgreSQL); see
/// [`OutboxBuilder::log_tailing`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum TailMode {
    /// Each event is a row of the outbox table, inserted and deleted in the caller's
    /// transaction: the relay follows the table's inserts through a publication, and the table
    /// stays empty.
    Table,
    /// Each event is a transactional logical decoding message
    /// (`pg_logical_emit_message(true, 'outbox:<table>', …)`) in the caller's transaction, and
    /// no row at all: the cheapest write, nothing to delete, nothing to vacuum.
    Messages,
}

/// The columns of an outbox table; see [`OutboxBuilder::layout`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum TableLayout {
    /// This library's columns only.
    #[default]
    Standard,
    /// PostgreSQL only: also the columns Debezium's outbox event router reads by default
    /// (`aggregatetype`, `aggregateid` and `type`, beside `id` and `payload`), so that Kafka
    /// Connect can relay the table with the router's defaults.
    Debezium,
    /// PostgreSQL only: the standard columns in a table partitioned by time into a ring of
    /// child tables, which retention truncates whole instead of deleting rows; see
    /// [`Partitions`].
    Partitioned(Partitions),
}

impl TableLayout {
    /// [`TableLayout::Partitioned`] with `count` partitions (2 to 64), each taking the events
    /// written during one `every` (at least a second) in turn; see [`Partitions`].
    pub fn partitioned(every: Duration, count: u16) -> Self {
        Self::Partitioned(Partitions { every, count })
    }
}

/// The ring of a [`TableLayout::Partitioned`] table.
///
/// The table `<table>` is partitioned by list into `<table>_p0` … `<table>_p{count-1}`. An
/// event goes to partition `⌊transaction start time / every⌋ mod count`, computed by the
/// column's default in the database, so writers of any build agree and a partition exists for
/// every moment: writes never fail for want of one, even with no relay running.
///
/// Retention ([`Outbox::purge`], [`Relay`](crate::Relay)'s schedule) truncates a partition
/// once every delivered event in it is older than the retention age, and in any case the
/// partition next to take writes, so that new events never join old ones. Events still pending
/// in it (at most the retention's batch size; a partition with more waits) move to another
/// partition first, and dead ones to `<table>_dead`, where they stay until an operator acts.
/// `TRUNCATE` frees the space at once, however old the oldest open snapshot in the database
/// is, where deleting rows leaves dead tuples that vacuum cannot remove while a long
/// transaction runs. It takes its lock with a 100 ms `lock_timeout`, and tries again at the
/// next round if an application's transaction holds the partition.
///
/// Delivered events are kept for the retention age, but never longer than the ring holds
/// them: about `count × every` at most, and as little as `(count − 2) × every` when the age is
/// longer than that (retention then warns). The ring is fixed when
/// [`migrate`](Outbox::migrate) creates the table; a table created without partitions cannot
/// become partitioned in place.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Partitions {
    every: Duration,
    count: u16,
}

impl Partitions {
    /// How long each partition takes new events.
    pub fn every(&self) -> Duration {
        self.every
    }

    /// How many partitions the ring has.
    pub fn count(&self) -> u16 {
        self.count
    }

    fn validate(&self) -> Result<()> {
        if !(2..=64).contains(&self.count) {
            return Err(Error::Config(format!(
                "a partitioned outbox needs 2 to 64 partitions, not {}",
                self.count
            )));
        }
        if self.every < Duration::from_secs(1) {
            return Err(Error::Config(format!(
                "each partition must take events for at least a second, not {:?}",
                self.every
            )));
        }
        Ok(())
    }
}

/// The statements an outbox needs from its database: writing events in the caller's
/// transaction, and the relay's claim, settlement and retention.
///
/// The contract, which the tests in `tests/src/scenarios.rs` check for every store:
/// - [`insert`](Self::insert) gives the events of one aggregate consecutive sequence numbers
///   in commit order (a rolled-back transaction leaves no gap), inside the caller's
///   transaction, and never waits on a relay's statement;
/// - [`claim`](Self::claim) leases due aggregates under the claim's token (two relays never
///   hold one aggregate) and reads each one's [`Run`]; no claim waits on an application's
///   open transaction;
/// - [`settle`](Self::settle) applies each [`Settlement`] only where the token still holds the
///   lease, and keeps what an operator did since the claim (the cursor's version).
///
/// Only the relay calls `claim` and `settle` (their arguments have no public constructor):
/// the contract is tested through the relay, on every store.
///
/// Operator actions are extra abilities, one trait each ([`Lookup`], [`Requeue`], [`Discard`],
/// [`Republish`], [`Check`], [`MarkConsumed`], [`ExplainClaim`]): [`Outbox`] offers each method where its
/// store has the ability.
pub trait Store: Send + Sync + fmt::Debug + 'static {
    /// What the application's transaction dereferences to (`&mut *tx`).
    type Connection: Send;

    /// Creates or upgrades the tables; idempotent, safe from several processes at once.
    fn migrate(&self) -> impl Future<Output = Result<()>> + Send;

    /// The schema, as `(version, description, SQL)` steps.
    fn migration_sql(&self) -> Vec<(i64, &'static str, String)>;

    /// Writes `messages` on the caller's connection, inside its transaction; a message whose
    /// idempotency key this outbox has seen is not written. One result per message, in order.
    fn insert<'a>(
        &'a self,
        conn: &'a mut Self::Connection,
        messages: &'a [Message],
    ) -> impl Future<Output = Result<Vec<Enqueued>>> + Send + 'a;

    /// Takes in what writers announced apart from the relay's bookkeeping (PostgreSQL's
    /// `<table>_new`), before a claim; returns how many announcements it took. The relay
    /// starts its lease clock after it, and claims what it already knows even when this
    /// fails. The default has nothing to do.
    fn absorb(&self) -> impl Future<Output = Result<u64>> + Send {
        std::future::ready(Ok(0))
    }

    /// Leases up to `claim.aggregates` due aggregates under `claim.token` for `claim.lease`,
    /// and reads for each an ordered run (see [`Claim::run_limit`]).
    fn claim<'a>(&'a self, claim: &'a Claim) -> impl Future<Output = Result<Vec<Run>>> + Send + 'a;

    /// Writes the fate of runs leased under `token`. Aggregates whose lease another relay has
    /// taken since are left alone.
    fn settle<'a>(
        &'a self,
        token: Uuid,
        settlements: &'a [Settlement],
    ) -> impl Future<Output = Result<()>> + Send + 'a;

    /// Deletes (or archives) up to `retention.batch_size` delivered rows older than its age, in
    /// one short transaction; returns how many.
    fn purge_batch<'a>(
        &'a self,
        retention: &'a Retention,
    ) -> impl Future<Output = Result<u64>> + Send + 'a;

    /// Deletes up to `retention.batch_size` idempotency keys older than its age whose events
    /// are gone or were delivered before it, in one short transaction; returns how many. Keys
    /// are purged apart from rows: an outbox that hands off (or whose rows are few) can hold
    /// many more keys than rows.
    fn purge_keys<'a>(
        &'a self,
        retention: &'a Retention,
    ) -> impl Future<Output = Result<u64>> + Send + 'a;

    /// Bumps `wake` whenever an enqueueing transaction commits, until `cancel`. The default
    /// returns at once: the relay then polls. PostgreSQL listens whatever its own `notify`
    /// option says: other processes' writers may notify.
    fn listen(
        &self,
        wake: watch::Sender<u64>,
        cancel: CancellationToken,
    ) -> impl Future<Output = ()> + Send + 'static {
        let _ = (wake, cancel);
        std::future::ready(())
    }
}

/// Reads one event row ([`Outbox::get`]).
pub trait Lookup: Store {
    /// The row of event `id`, if any.
    fn get(&self, id: Uuid) -> impl Future<Output = Result<Option<EventRecord>>> + Send + '_;
}

/// Puts a dead event back to pending ([`Outbox::requeue`]).
pub trait Requeue: Store {
    /// Whether `id` was dead. Race-free under concurrent calls for events of one aggregate.
    fn requeue(&self, id: Uuid) -> impl Future<Output = Result<bool>> + Send + '_;

    /// Requeues `ids` in one transaction; returns how many were dead. Events of one aggregate
    /// must be requeued together: one at a time, a relay could deliver a later one before an
    /// earlier one is back.
    fn requeue_all<'a>(&'a self, ids: &'a [Uuid]) -> impl Future<Output = Result<u64>> + Send + 'a;
}

/// Releases an aggregate parked at a dead event ([`Outbox::discard`]).
pub trait Discard: Store {
    /// Whether the aggregate of dead event `id` was parked at it.
    fn discard(&self, id: Uuid) -> impl Future<Output = Result<bool>> + Send + '_;
}

/// Puts delivered (or archived) events back to pending ([`Outbox::republish`]).
pub trait Republish: Store {
    /// Republishes the delivered events `filter` selects, in the archive too, each aggregate
    /// from its earliest one on, in `seq` order; with `dry_run`, only counts them. Returns how
    /// many.
    fn republish<'a>(
        &'a self,
        filter: &'a EventFilter,
        dry_run: bool,
    ) -> impl Future<Output = Result<u64>> + Send + 'a;
}

/// Which events an operator action applies to: every condition set must hold.
///
/// ```
/// use outbox_core::EventFilter;
/// # let (yesterday, today) = (chrono::Utc::now(), chrono::Utc::now());
/// let lost = EventFilter::new()
///     .event_type("billing.invoice_issued")
///     .created_between(yesterday, today);
/// ```
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct EventFilter {
    /// These events.
    pub ids: Option<Vec<Uuid>>,
    /// The events of this aggregate: type and id.
    pub aggregate: Option<(String, String)>,
    /// Events of this type.
    pub event_type: Option<String>,
    /// Events created at or after this time ...
    pub created_from: Option<DateTime<Utc>>,
    /// ... and before this one.
    pub created_until: Option<DateTime<Utc>>,
    /// Events whose last failure's reason contains this text, ignoring ASCII case.
    pub reason: Option<String>,
    /// Dead events whose [`dead_fingerprint`] is this one (a [`DeadGroup`]).
    pub group: Option<String>,
}

impl EventFilter {
    /// No condition yet (an operator action refuses a filter without one).
    pub fn new() -> Self {
        Self::default()
    }

    /// Also event `id` (conditions on ids add up; the others narrow).
    pub fn id(mut self, id: Uuid) -> Self {
        self.ids.get_or_insert_with(Vec::new).push(id);
        self
    }

    /// Only the events of this aggregate.
    pub fn aggregate(
        mut self,
        aggregate_type: impl Into<String>,
        aggregate_id: impl Into<String>,
    ) -> Self {
        self.aggregate = Some((aggregate_type.into(), aggregate_id.into()));
        self
    }

    /// Only events of this type.
    pub fn event_type(mut self, event_type: impl Into<String>) -> Self {
        self.event_type = Some(event_type.into());
        self
    }

    /// Only events created in `[from, until)`.
    pub fn created_between(mut self, from: DateTime<Utc>, until: DateTime<Utc>) -> Self {
        self.created_from = Some(from);
        self.created_until = Some(until);
        self
    }

    /// Only events created at or after `from`.
    pub fn created_from(mut self, from: DateTime<Utc>) -> Self {
        self.created_from = Some(from);
        self
    }

    /// Only events created before `until`.
    pub fn created_until(mut self, until: DateTime<Utc>) -> Self {
        self.created_until = Some(until);
        self
    }

    /// Only events whose last failure's reason contains `text` (ASCII case ignored).
    pub fn reason(mut self, text: impl Into<String>) -> Self {
        self.reason = Some(text.into());
        self
    }

    /// Only the dead events of one cause: a [`DeadGroup::fingerprint`].
    pub fn group(mut self, fingerprint: impl Into<String>) -> Self {
        self.group = Some(fingerprint.into());
        self
    }

    /// Whether it sets no condition: it would select every event.
    pub fn is_empty(&self) -> bool {
        self.ids.is_none()
            && self.aggregate.is_none()
            && self.event_type.is_none()
            && self.created_from.is_none()
            && self.created_until.is_none()
            // An empty text is no condition: it is contained in every reason.
            && self.reason.as_deref().is_none_or(str::is_empty)
            && self.group.is_none()
    }

    /// Whether `record` passes the conditions a store leaves to the caller (the group).
    fn keeps(&self, event: &DeadEvent) -> bool {
        self.group
            .as_ref()
            .is_none_or(|group| group.eq_ignore_ascii_case(&event.fingerprint()))
    }

    fn refuse_dead_conditions(&self) -> Result<()> {
        if self.reason.is_some() || self.group.is_some() {
            return Err(crate::Error::InvalidField {
                field: "event filter".into(),
                reason: "a reason or a group selects dead events; republish puts back \
                         delivered ones (requeue the dead ones instead)",
            });
        }
        Ok(())
    }

    fn refuse_empty(&self) -> Result<()> {
        if self.is_empty() {
            return Err(crate::Error::InvalidField {
                field: "event filter".into(),
                reason: "it sets no condition and would select every event; name ids, an \
                         aggregate, an event type or a time range",
            });
        }
        Ok(())
    }
}

/// Finds aggregates whose relay bookkeeping disagrees with their rows ([`Outbox::check`]).
pub trait Check: Store {
    /// Every aggregate with a pending event no relay would ever claim.
    fn check(&self) -> impl Future<Output = Result<Vec<Inconsistency>>> + Send + '_;
}

/// Records consumers' receipts ([`Outbox::mark_consumed`]).
pub trait MarkConsumed: Store {
    /// Sets `consumed_at` where it is not set yet; returns how many rows changed.
    fn mark_consumed<'a>(
        &'a self,
        ids: &'a [Uuid],
    ) -> impl Future<Output = Result<u64>> + Send + 'a;
}

/// Shows the plan of the claim statement ([`Outbox::explain_claim`]).
pub trait ExplainClaim: Store {
    /// The database's plan for a claim of `aggregates` aggregates.
    fn explain_claim(&self, aggregates: usize) -> impl Future<Output = Result<String>> + Send + '_;
}

/// A store with every ability: what code generic over the database asks for, as in
/// `fn admin<DB: Backend<Store: FullStore>>(outbox: &Outbox<DB>)`. Both stores of this crate
/// have it.
pub trait FullStore:
    Store
    + Lookup
    + Requeue
    + Discard
    + Republish
    + Check
    + MarkConsumed
    + ExplainClaim
    + Inspect
    + ArchiveDead
{
}

impl<S> FullStore for S where
    S: Store
        + Lookup
        + Requeue
        + Discard
        + Republish
        + Check
        + MarkConsumed
        + ExplainClaim
        + Inspect
        + ArchiveDead
{
}

/// Where a consumer's [`Inbox`](crate::Inbox) lives.
pub trait InboxStore: Send + Sync + fmt::Debug + 'static {
    /// What the handler's transaction dereferences to.
    type Connection: Send;

    /// Creates the table if it does not exist.
    fn migrate(&self) -> impl Future<Output = Result<()>> + Send;

    /// The longest consumer name the table keeps, in bytes (`None`: no limit). An
    /// [`Inbox`](crate::Inbox) for a longer name is refused when it is made.
    fn max_consumer_name_bytes(&self) -> Option<usize> {
        None
    }

    /// Records `message_id` for `consumer` in the transaction on `conn`; returns whether this
    /// is the first time.
    fn record<'a>(
        &'a self,
        conn: &'a mut Self::Connection,
        consumer: &'a str,
        message_id: Uuid,
    ) -> impl Future<Output = Result<bool>> + Send + 'a;

    /// Counts one more attempt by `consumer` at `message_id` and returns the attempts so far.
    /// Committed before the attempt runs and kept until
    /// [`forget_attempts`](Self::forget_attempts): a consumer that crashes while handling
    /// the message finds the attempt counted when the message comes back.
    fn count_attempt<'a>(
        &'a self,
        consumer: &'a str,
        message_id: Uuid,
    ) -> impl Future<Output = Result<u32>> + Send + 'a;

    /// Takes back the attempt just counted by [`count_attempt`](Self::count_attempt) when the
    /// consumer decided not to run it now (it runs the message alone first, see
    /// [`Consumer`](crate::Consumer)).
    fn uncount_attempt<'a>(
        &'a self,
        consumer: &'a str,
        message_id: Uuid,
    ) -> impl Future<Output = Result<()>> + Send + 'a;

    /// Drops the attempt count of a message that was handled or dead-lettered.
    fn forget_attempts<'a>(
        &'a self,
        consumer: &'a str,
        message_id: Uuid,
    ) -> impl Future<Output = Result<()>> + Send + 'a;
}

/// What a claim asks for.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct Claim {
    /// The lease token: settlements carry it, and only the holder's settle.
    pub token: Uuid,
    /// How many aggregates to lease at most.
    pub aggregates: usize,
    /// How many events a run holds at most.
    pub run_length: usize,
    /// Runs are shortened evenly so that the batch holds at most this many events.
    pub max_events: usize,
    /// How long the lease lasts (from the claim's start, by the database's clock).
    pub lease: Duration,
}

impl Claim {
    /// The longest run of this claim, once `leased` aggregates are leased: a run whose first
    /// event was tried before is that event alone.
    pub fn run_limit(&self, leased: usize, attempts: u32) -> usize {
        if attempts > 1 {
            1
        } else {
            self.run_length
                .min((self.max_events / leased.max(1)).max(1))
        }
    }
}

/// One leased aggregate and the pending events the relay may deliver now, in `seq` order.
#[derive(Debug, Clone)]
pub struct Run {
    /// The aggregate type.
    pub aggregate_type: String,
    /// The aggregate id.
    pub aggregate_id: String,
    /// Every event up to this sequence was settled when the aggregate was leased.
    pub done_seq: i64,
    /// The highest committed sequence the relay knew of when it leased the aggregate.
    pub known_seq: i64,
    /// The attempt this claim is for the run's first event (1 the first time).
    pub attempts: u32,
    /// The dead event the aggregate is parked at, if any: nothing at or after it is delivered
    /// until it is requeued or discarded.
    pub parked_seq: Option<i64>,
    /// Bumped by every `requeue` and `discard`: a settlement whose version no longer matches
    /// leaves the operator's change in place.
    pub version: i64,
    /// Whether the run holds every pending event up to [`limit_seq`](Self::limit_seq) (no
    /// limit cut it short).
    pub complete: bool,
    /// The pending events after `done_seq`, in `seq` order, at most the claim's run limit.
    pub events: Vec<RunEvent>,
}

impl Run {
    /// How far this run may go: what the relay knows of, and not past a parked event.
    pub fn limit_seq(&self) -> i64 {
        self.parked_seq
            .map_or(self.known_seq, |parked| self.known_seq.min(parked - 1))
    }
}

/// An event of a [`Run`].
#[derive(Debug, Clone)]
pub struct RunEvent {
    /// The event, as the destination gets it.
    pub envelope: Envelope,
    /// Due now (its `available_at` has passed, by the database's clock).
    pub due: bool,
    /// When it becomes due.
    pub available_at: DateTime<Utc>,
    /// The reason of its last failure.
    pub last_error: Option<String>,
}

/// What becomes of one leased aggregate and the events of its run.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct Settlement {
    /// The aggregate type.
    pub aggregate_type: String,
    /// The aggregate id.
    pub aggregate_id: String,
    /// The cursor's version when leased: if a `requeue` or `discard` changed the cursor since,
    /// it keeps their position and park state, and only a new park is added.
    pub version: i64,
    /// Every event up to here is settled now.
    pub done_seq: i64,
    /// Attempts already made at the event after `done_seq`.
    pub attempts: u32,
    /// The aggregate is due again after this delay ...
    pub delay: Duration,
    /// ... and no earlier than this (an event that is not due yet).
    pub not_before: Option<DateTime<Utc>>,
    /// The dead event the aggregate is parked at after this settlement (a new one, or the
    /// run's): the aggregate is not due once everything before it is settled.
    pub park_at: Option<i64>,
    /// The event this settlement parks the aggregate at, if it died in this run.
    pub new_park: Option<i64>,
    /// The new state of each event of the run that was settled.
    pub events: Vec<Fate>,
}

/// The new state of one event row.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct Fate {
    /// The event id.
    pub id: Uuid,
    /// Delivered, dead, or still pending (to be retried).
    pub status: EventStatus,
    /// Attempts made so far.
    pub attempts: u32,
    /// Already cleaned (see `relay::settle::clean_reason`).
    pub reason: Option<String>,
}

/// What an enqueue did with one event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Enqueued {
    /// Written, with this id.
    New(Uuid),
    /// Not written: its idempotency key was enqueued before, by the event with this id.
    Duplicate(Uuid),
}

impl Enqueued {
    /// The id of the event now in the outbox for this enqueue.
    pub fn id(&self) -> Uuid {
        match *self {
            Self::New(id) | Self::Duplicate(id) => id,
        }
    }

    /// Whether this enqueue wrote the event.
    pub fn is_new(&self) -> bool {
        matches!(self, Self::New(_))
    }
}

/// An aggregate whose relay bookkeeping disagrees with its event rows, found by
/// [`Outbox::check`]. Any such aggregate is a bug: please report it.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Inconsistency {
    /// The aggregate type.
    pub aggregate_type: String,
    /// The aggregate id.
    pub aggregate_id: String,
    /// What is wrong.
    pub problem: String,
}

/// Where an event is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, serde::Serialize)]
#[serde(rename_all = "lowercase")]
#[non_exhaustive]
pub enum EventStatus {
    /// Waiting for delivery (possibly leased by a relay, or waiting for a retry).
    Pending,
    /// Delivered: the destination confirmed it.
    Delivered,
    /// Given up: see [`EventRecord::last_error`].
    Dead,
}

impl EventStatus {
    /// `pending`, `delivered` or `dead`, as stored.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "pending",
            Self::Delivered => "delivered",
            Self::Dead => "dead",
        }
    }

    pub(crate) fn parse(s: &str) -> Option<Self> {
        match s {
            "pending" => Some(Self::Pending),
            "delivered" => Some(Self::Delivered),
            "dead" => Some(Self::Dead),
            _ => None,
        }
    }
}

/// One outbox row, as returned by [`Outbox::get`].
#[derive(Debug, Clone, serde::Serialize)]
#[non_exhaustive]
pub struct EventRecord {
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
    /// The status.
    pub status: EventStatus,
    /// Delivery attempts so far.
    pub attempts: u32,
    /// The last failure's reason.
    pub last_error: Option<String>,
    /// When it was enqueued.
    pub created_at: DateTime<Utc>,
    /// Deliver no earlier than this.
    pub available_at: DateTime<Utc>,
    /// When it was delivered.
    pub delivered_at: Option<DateTime<Utc>>,
    /// When it went dead.
    pub dead_at: Option<DateTime<Utc>>,
    /// When a consumer reported it consumed (see [`Receipt`](crate::Receipt)).
    pub consumed_at: Option<DateTime<Utc>>,
    /// The payload, as JSON text.
    pub payload: String,
    /// The schema version.
    pub schema_version: u32,
    /// The route (topic, exchange, subject base).
    pub topic: String,
    /// The headers stored with it.
    pub headers: crate::event::Headers,
    /// Its last ten failed attempts, oldest first (events that failed before the table had
    /// this record show none).
    pub failures: Vec<FailedAttempt>,
}

/// One failed delivery attempt of an event, as the relay recorded it.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[non_exhaustive]
pub struct FailedAttempt {
    /// The attempt's number.
    pub attempt: u32,
    /// When the relay recorded it.
    pub at: DateTime<Utc>,
    /// Whether the event was given up (dead) with it.
    pub dead: bool,
    /// Why it failed.
    pub reason: String,
}

/// The outbox: enqueue events in your transactions, and hand it to a [`Relay`](crate::Relay).
///
/// Cheap to clone. Build one per table with [`Outbox::builder`].
///
/// ```no_run
/// # #[cfg(feature = "postgres")]
/// # async fn demo(pool: sqlx::PgPool) -> Result<(), outbox_core::Error> {
/// use outbox_core::Outbox;
/// let outbox = Outbox::builder(pool.clone()).table("outbox").build()?;
/// outbox.migrate().await?;
/// # Ok(()) }
/// ```
pub struct Outbox<DB: Backend> {
    inner: Arc<Inner<DB>>,
}

struct Inner<DB: Backend> {
    pool: Pool<DB>,
    table: TableName,
    store: DB::Store,
    max_payload_bytes: Option<usize>,
}

impl<DB: Backend> Clone for Outbox<DB> {
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
        }
    }
}

impl<DB: Backend> fmt::Debug for Outbox<DB> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Outbox")
            .field("backend", &DB::NAME)
            .field("table", &self.inner.table)
            .finish()
    }
}

/// Configures an [`Outbox`].
#[derive(Debug)]
pub struct OutboxBuilder<DB: Backend> {
    pool: Pool<DB>,
    table: String,
    notify: bool,
    layout: TableLayout,
    hand_off: bool,
    log_tailing: Option<TailMode>,
    max_payload_bytes: Option<usize>,
}

impl<DB: Backend> OutboxBuilder<DB> {
    /// The table name (default `outbox`). Derived tables are `<table>_aggregates` (per-aggregate
    /// sequence counters), `<table>_archive` and `<table>_migrations`.
    pub fn table(mut self, name: impl Into<String>) -> Self {
        self.table = name.into();
        self
    }

    /// PostgreSQL only: send a `NOTIFY` from each enqueueing transaction so relays wake at its
    /// commit (default on). Turn it off for very high write rates, where the commit-time lock
    /// that `NOTIFY` takes would serialise your writers; relays then rely on polling.
    pub fn notify(mut self, on: bool) -> Self {
        self.notify = on;
        self
    }

    /// The table's columns (default [`TableLayout::Standard`]).
    ///
    /// [`TableLayout::Debezium`] (PostgreSQL only) makes [`migrate`](Outbox::migrate) add the
    /// columns Debezium's outbox event router reads by default, `aggregatetype`, `aggregateid`
    /// and `type`, and a trigger that fills them from the aggregate type, aggregate id and
    /// event type (`id` and `payload` are already there), on a new table or an existing one.
    /// Writers of any build fill them, and the relays of this library work on the table
    /// unchanged, so a team can move relaying to Kafka Connect (see
    /// [`hand_off`](Self::hand_off)) and keep its table and code.
    ///
    /// ```
    /// # async fn demo(pool: sqlx::PgPool) -> outbox_core::Result<()> {
    /// use outbox_core::{Outbox, TableLayout};
    /// let outbox = Outbox::builder(pool).layout(TableLayout::Debezium).build()?;
    /// outbox.migrate().await?;
    /// # Ok(()) }
    /// ```
    ///
    /// [`TableLayout::Partitioned`] (PostgreSQL only) keeps the standard columns in a ring of
    /// time partitions that retention truncates whole, so the table does not bloat while a long
    /// transaction elsewhere holds back vacuum; see [`Partitions`] and the README's "A table
    /// that does not bloat".
    ///
    /// ```
    /// # async fn demo(pool: sqlx::PgPool) -> outbox_core::Result<()> {
    /// use outbox_core::{Outbox, TableLayout};
    /// use std::time::Duration;
    /// let outbox = Outbox::builder(pool)
    ///     .layout(TableLayout::partitioned(Duration::from_secs(3600), 4))
    ///     .build()?;
    /// outbox.migrate().await?;
    /// # Ok(()) }
    /// ```
    pub fn layout(mut self, layout: TableLayout) -> Self {
        self.layout = layout;
        self
    }

    /// Hands relaying to an external relay that reads the database's log, Debezium (default
    /// off). Needs [`TableLayout::Debezium`].
    ///
    /// `enqueue` still writes the event in your transaction, with its sequence number, and
    /// then deletes it in the same transaction, as Debezium's documentation advises: the
    /// insert is in the write-ahead log for the connector, the table stays empty, and nothing
    /// has to purge it (the router ignores deletes). Relays are not announced or woken, so a
    /// relay of this library only drains what was enqueued before the hand-off; see the
    /// README's cut-over steps. Idempotency keys still work; run retention (`outbox purge`)
    /// to remove old ones. Deferred delivery (`enqueue_at`, `EnqueueOptions::delay`) is refused
    /// with [`Error::InvalidField`]: the connector publishes at commit.
    pub fn hand_off(mut self, on: bool) -> Self {
        self.hand_off = on;
        self
    }

    /// Writes events for this library's log-tailing relay, `WalRelay` (PostgreSQL, the `wal`
    /// feature), which reads them from a logical replication slot instead of querying the table
    /// (default: off, rows for polling relays).
    ///
    /// - [`TailMode::Messages`]: each event is a transactional logical decoding message in
    ///   your transaction, and no row: nothing to delete or vacuum, the cheapest write.
    /// - [`TailMode::Table`]: each event is a row, inserted and deleted in your transaction
    ///   (as [`hand_off`](Self::hand_off) does for Debezium): the relay follows the table's
    ///   inserts, and the table stays empty.
    ///
    /// Either way sequence numbers are allocated as usual (so an aggregate's events commit in
    /// order), idempotency keys work, polling relays are neither announced nor woken, and what
    /// would set a row pending for a polling relay is refused with a clear error: deferred
    /// delivery (`enqueue_at`, `EnqueueOptions::delay`), `requeue` and `republish`. Events the
    /// relay gives up on are written to the table as dead rows, with their reason, where
    /// `outbox dead` and the dashboard show them.
    ///
    /// [`migrate`](Outbox::migrate) then also creates the publication `<table>_relay` and the
    /// replication slot `<table>_relay_<database>` (the server needs `wal_level = logical`): from then on the slot keeps
    /// every event for the relay, even before it first runs, and the server keeps the WAL
    /// until a relay confirms it. See the README's "Relaying from the WAL".
    ///
    /// ```
    /// # async fn demo(pool: sqlx::PgPool) -> outbox_core::Result<()> {
    /// use outbox_core::{Outbox, TailMode};
    /// let outbox = Outbox::builder(pool).log_tailing(TailMode::Messages).build()?;
    /// outbox.migrate().await?; // the table still holds sequence counters and dead events
    /// # Ok(()) }
    /// ```
    pub fn log_tailing(mut self, mode: TailMode) -> Self {
        self.log_tailing = Some(mode);
        self
    }

    /// Refuses, at enqueue, an event whose serialised payload is longer than `bytes`
    /// ([`Error::PayloadTooLarge`](crate::Error::PayloadTooLarge)), before anything is written
    /// and before the caller's transaction commits. No limit by default; set it below what
    /// your brokers accept (NATS and Kafka: 1 MiB by default), so that an event no broker would
    /// take fails the request that wrote it instead of going dead later. It counts the payload
    /// only; brokers count the headers too (the outbox's, about 400 bytes, and yours), so leave
    /// room for them.
    pub fn max_payload_bytes(mut self, bytes: usize) -> Self {
        self.max_payload_bytes = Some(bytes);
        self
    }

    /// Validates the configuration.
    pub fn build(self) -> Result<Outbox<DB>> {
        let table = TableName::new(self.table)?;
        if !DB::supports_layout(self.layout) {
            return Err(Error::Config(format!(
                "the {:?} table layout is not available on {}",
                self.layout,
                DB::NAME
            )));
        }
        if let TableLayout::Partitioned(partitions) = self.layout {
            partitions.validate()?;
            if self.log_tailing.is_some() {
                return Err(Error::Config(
                    "log tailing writes no rows to relay, so it has nothing to partition: \
                     use the standard layout with log_tailing"
                        .into(),
                ));
            }
        }
        if self.hand_off && self.layout != TableLayout::Debezium {
            return Err(Error::Config(
                "hand_off needs the Debezium table layout (TableLayout::Debezium)".into(),
            ));
        }
        if self.log_tailing.is_some() && !DB::supports_log_tailing() {
            return Err(Error::Config(format!(
                "log tailing (a logical replication slot) is not available on {}",
                DB::NAME
            )));
        }
        if self.log_tailing.is_some() && self.hand_off {
            return Err(Error::Config(
                "log_tailing and hand_off are two different relays of the same log: choose one"
                    .into(),
            ));
        }
        let store = DB::open_store(
            self.pool.clone(),
            table.clone(),
            StoreOptions {
                notify: self.notify,
                layout: self.layout,
                hand_off: self.hand_off,
                log_tailing: self.log_tailing,
            },
        );
        Ok(Outbox {
            inner: Arc::new(Inner {
                pool: self.pool,
                table,
                store,
                max_payload_bytes: self.max_payload_bytes,
            }),
        })
    }
}

impl<DB: Backend> Outbox<DB> {
    /// Starts configuring an outbox on `pool`.
    pub fn builder(pool: Pool<DB>) -> OutboxBuilder<DB> {
        OutboxBuilder {
            pool,
            table: TableName::default().as_str().to_owned(),
            notify: true,
            layout: TableLayout::Standard,
            hand_off: false,
            log_tailing: None,
            max_payload_bytes: None,
        }
    }

    /// An outbox in the table `outbox`.
    pub fn new(pool: Pool<DB>) -> Self {
        Self::builder(pool)
            .build()
            .expect("the default table name is valid")
    }

    /// The pool.
    pub fn pool(&self) -> &Pool<DB> {
        &self.inner.pool
    }

    /// The table name.
    pub fn table(&self) -> &TableName {
        &self.inner.table
    }

    /// Creates or upgrades the outbox tables and indexes. Idempotent, safe to call from several
    /// processes at once; versions applied are recorded in `<table>_migrations`.
    ///
    /// The outbox keeps its own migration table instead of sqlx's `_sqlx_migrations` so that it
    /// never collides with your application's migrations. To run the SQL from your own migration
    /// tool instead, take it from [`migration_sql`](Self::migration_sql).
    pub async fn migrate(&self) -> Result<()> {
        self.store()
            .migrate()
            .instrument(tracing::info_span!("outbox.migrate", table = %self.inner.table))
            .await
    }

    /// The schema, as `(version, description, SQL)` steps.
    pub fn migration_sql(&self) -> Vec<(i64, &'static str, String)> {
        self.store().migration_sql()
    }

    /// Writes `event` to the outbox inside the caller's transaction (`&mut *tx`).
    ///
    /// The row exists if and only if the transaction commits. Returns the event id.
    pub async fn enqueue<E: OutboxEvent>(
        &self,
        conn: &mut DB::Connection,
        event: &E,
    ) -> Result<Uuid> {
        self.enqueue_with(conn, event, EnqueueOptions::default())
            .await
    }

    /// Like [`enqueue`](Self::enqueue), delivered no earlier than `when` (an effective date).
    pub async fn enqueue_at<E: OutboxEvent>(
        &self,
        conn: &mut DB::Connection,
        event: &E,
        when: DateTime<Utc>,
    ) -> Result<Uuid> {
        self.enqueue_with(conn, event, EnqueueOptions::new().available_at(when))
            .await
    }

    /// Like [`enqueue`](Self::enqueue), with a delay, headers or an idempotency key. With a key
    /// seen before, nothing is written and the id is the first event's.
    pub async fn enqueue_with<E: OutboxEvent>(
        &self,
        conn: &mut DB::Connection,
        event: &E,
        options: EnqueueOptions,
    ) -> Result<Uuid> {
        let message = Message::with_options(event, options)?;
        Ok(self.enqueue_message(conn, message).await?.id())
    }

    /// Enqueues `event` once for `key` (see [`EnqueueOptions::idempotency_key`]) and says
    /// whether this call wrote it: an HTTP handler answers a retried request with the first
    /// one's result.
    ///
    /// ```no_run
    /// # #[cfg(feature = "postgres")]
    /// # async fn demo(outbox: outbox_core::Outbox<sqlx::Postgres>, pool: sqlx::PgPool,
    /// #     event: outbox_core::Receipt) -> Result<(), outbox_core::Error> {
    /// let mut tx = pool.begin().await?;
    /// let enqueued = outbox.enqueue_once(&mut *tx, &event, "request-7f3a").await?;
    /// if enqueued.is_new() {
    ///     // first time: the business change goes into the same transaction
    /// }
    /// tx.commit().await?;
    /// # Ok(()) }
    /// ```
    pub async fn enqueue_once<E: OutboxEvent>(
        &self,
        conn: &mut DB::Connection,
        event: &E,
        key: impl Into<String>,
    ) -> Result<Enqueued> {
        let message = Message::with_options(event, EnqueueOptions::new().idempotency_key(key))?;
        self.enqueue_message(conn, message).await
    }

    async fn enqueue_message(
        &self,
        conn: &mut DB::Connection,
        message: Message,
    ) -> Result<Enqueued> {
        let enqueued = self
            .enqueue_messages(conn, std::slice::from_ref(&message))
            .await?;
        Ok(enqueued
            .first()
            .copied()
            .unwrap_or(Enqueued::New(message.id)))
    }

    /// Writes several events of one type in one round trip (PostgreSQL; on MySQL two per 1,000
    /// aggregates and two per 500 events) and returns their ids in order. Events of one
    /// aggregate get consecutive sequence numbers in slice order.
    pub async fn enqueue_batch<'e, E: OutboxEvent + 'e>(
        &self,
        conn: &mut DB::Connection,
        events: impl IntoIterator<Item = &'e E>,
    ) -> Result<Vec<Uuid>> {
        let messages = events
            .into_iter()
            .map(Message::new)
            .collect::<Result<Vec<_>>>()?;
        self.enqueue_messages(conn, &messages).await?;
        Ok(messages.iter().map(Message::id).collect())
    }

    /// Writes prepared [`Message`]s, of any event types, in one round trip (PostgreSQL; on MySQL
    /// as [`enqueue_batch`](Self::enqueue_batch); one more per message with an idempotency key).
    /// One result per message, in order.
    pub async fn enqueue_messages(
        &self,
        conn: &mut DB::Connection,
        messages: &[Message],
    ) -> Result<Vec<Enqueued>> {
        if messages.is_empty() {
            return Ok(Vec::new());
        }
        if let Some(max) = self.inner.max_payload_bytes {
            if let Some(big) = messages.iter().find(|m| m.payload.len() > max) {
                return Err(crate::Error::PayloadTooLarge {
                    event_type: big.event_type.to_owned(),
                    bytes: big.payload.len(),
                    max,
                });
            }
        }
        let span = match messages {
            [one] => tracing::debug_span!(
                "outbox.enqueue",
                event_id = %one.id,
                event_type = one.event_type,
                aggregate_type = one.aggregate_type,
                aggregate_id = %one.aggregate_id,
            ),
            many => tracing::debug_span!("outbox.enqueue", count = many.len()),
        };
        self.store().insert(conn, messages).instrument(span).await
    }

    /// The store: the statements behind this outbox.
    pub fn store(&self) -> &DB::Store {
        &self.inner.store
    }

    /// Applies `retention` now: deletes (or archives) delivered rows older than its age, then
    /// the idempotency keys it no longer needs, in batches of its batch size, each its own
    /// short statement. Returns the rows removed.
    pub async fn purge(&self, retention: &Retention) -> Result<u64> {
        let span = tracing::info_span!("outbox.purge", table = %self.inner.table);
        async {
            let mut total = 0;
            loop {
                let n = self.store().purge_batch(retention).await?;
                total += n;
                if n < retention.batch_size as u64 {
                    break;
                }
            }
            while self.store().purge_keys(retention).await? >= retention.batch_size as u64 {}
            Ok(total)
        }
        .instrument(span)
        .await
    }
}

impl<DB: Backend> Outbox<DB>
where
    DB::Store: Lookup,
{
    /// One row, by id.
    pub async fn get(&self, id: Uuid) -> Result<Option<EventRecord>> {
        self.store().get(id).await
    }
}

impl<DB: Backend> Outbox<DB>
where
    DB::Store: ExplainClaim,
{
    /// The query plan of the relay's claim statement (`EXPLAIN`), to check that it stays an
    /// index scan on your data. See the "Indexes" section of the README.
    pub async fn explain_claim(&self, batch_size: usize) -> Result<String> {
        self.store().explain_claim(batch_size).await
    }
}

impl<DB: Backend> Outbox<DB>
where
    DB::Store: MarkConsumed,
{
    /// Records that consumers have consumed these events (`consumed_at`, first report wins);
    /// returns how many rows changed. [`RegistryBuilder::record_receipts`](crate::RegistryBuilder::record_receipts)
    /// calls it for every [`Receipt`](crate::Receipt) it receives.
    pub async fn mark_consumed(&self, ids: &[Uuid]) -> Result<u64> {
        self.store().mark_consumed(ids).await
    }
}

impl<DB: Backend> Outbox<DB>
where
    DB::Store: Requeue,
{
    /// Puts a dead event back to pending with its attempts reset; returns whether it was dead.
    ///
    /// The relay delivers it next among its aggregate's pending events (in `seq` order); later
    /// events that were delivered meanwhile are not delivered again. Safe to call concurrently,
    /// from several processes, for events of one aggregate.
    pub async fn requeue(&self, id: Uuid) -> Result<bool> {
        self.store().requeue(id).await
    }
}

impl<DB: Backend> Outbox<DB>
where
    DB::Store: Discard,
{
    /// Leaves a dead event dead and releases its aggregate, if the relay parked the aggregate at
    /// it ([`DeadLetters::Park`](crate::DeadLetters::Park)): the aggregate's later events are
    /// delivered next. Returns whether the aggregate was parked at this event.
    pub async fn discard(&self, id: Uuid) -> Result<bool> {
        self.store().discard(id).await
    }
}

impl<DB: Backend> Outbox<DB>
where
    DB::Store: Republish,
{
    /// Puts the delivered events `filter` selects back to pending, archived ones included,
    /// for consumers that lost what they had; returns how many. Each aggregate is delivered
    /// again from its earliest republished event on, in its original `seq` order (events in
    /// between that `filter` leaves out are not sent again). The events keep their ids: a
    /// consumer's inbox skips the ones it still has, and JetStream drops those republished
    /// within the stream's duplicate window. A filter without conditions is refused.
    pub async fn republish(&self, filter: &EventFilter) -> Result<u64> {
        filter.refuse_empty()?;
        filter.refuse_dead_conditions()?;
        self.store()
            .republish(filter, false)
            .instrument(tracing::info_span!("outbox.republish", table = %self.inner.table))
            .await
    }

    /// How many events [`republish`](Self::republish) would put back, changing nothing.
    pub async fn republish_dry_run(&self, filter: &EventFilter) -> Result<u64> {
        filter.refuse_empty()?;
        filter.refuse_dead_conditions()?;
        self.store().republish(filter, true).await
    }
}

impl<DB: Backend> Outbox<DB>
where
    DB::Store: Check,
{
    /// Checks the relay's bookkeeping against the event rows: returns every aggregate with a
    /// pending event that no relay would ever claim. Empty on a healthy outbox; cheap enough to
    /// run from a periodic health check on tables of a few million rows.
    pub async fn check(&self) -> Result<Vec<Inconsistency>> {
        self.store().check().await
    }
}

impl<DB: Backend> Outbox<DB>
where
    DB::Store: Inspect,
{
    /// The outbox at a glance: counts by status and event type, the age of the oldest due
    /// event (the lag), leases, parked aggregates, and up to 20 aggregates whose oldest pending
    /// event has waited longer than `stuck_after`.
    pub async fn status(&self, stuck_after: Duration) -> Result<OutboxStatus> {
        self.store().status(stuck_after, 20).await
    }

    /// The dead events `filter` selects (an empty filter selects all), the most recent first,
    /// at most `limit`; each carries its payload, headers and last reason.
    pub async fn dead(&self, filter: &EventFilter, limit: usize) -> Result<Vec<EventRecord>> {
        if filter.group.is_none() {
            return self.store().dead(filter, limit).await;
        }
        // The fingerprint is computed here, not in SQL: find the group's ids among the
        // summaries, then read the rows of those only.
        let ids: Vec<Uuid> = self
            .dead_summaries(filter, limit)
            .await?
            .into_iter()
            .map(|e| e.id)
            .collect();
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let by_id = EventFilter {
            ids: Some(ids),
            group: None,
            ..filter.clone()
        };
        self.store().dead(&by_id, limit).await
    }

    /// The dead events `filter` selects, group included, without payloads: the most recent
    /// first, at most `limit`.
    pub async fn dead_summaries(
        &self,
        filter: &EventFilter,
        limit: usize,
    ) -> Result<Vec<DeadEvent>> {
        if filter.group.is_none() {
            return self.store().dead_summaries(filter, limit).await;
        }
        // The fingerprint is computed here, not in SQL.
        let mut events = self.store().dead_summaries(filter, usize::MAX).await?;
        events.retain(|e| filter.keeps(e));
        events.truncate(limit);
        Ok(events)
    }

    /// The dead events `filter` selects, grouped by cause ([`group_dead`]), the largest group
    /// first.
    pub async fn dead_groups(&self, filter: &EventFilter) -> Result<Vec<DeadGroup>> {
        Ok(group_dead(&self.dead_summaries(filter, usize::MAX).await?))
    }

    /// Aggregates parked at a dead event, the longest parked first, at most `limit`.
    pub async fn parked(&self, limit: usize) -> Result<Vec<ParkedAggregate>> {
        self.store().parked(limit).await
    }

    /// How many delivered rows [`purge`](Self::purge) with `retention` would remove now.
    pub async fn purgeable(&self, retention: &Retention) -> Result<u64> {
        self.store().purgeable(retention).await
    }

    /// Reads [`status`](Self::status) every `every` into the gauges of [`metrics`](crate::metrics)
    /// (`outbox_events{status}`, `outbox_oldest_pending_age_seconds`, `outbox_aggregates_parked`)
    /// until `shutdown`. Run one per table, beside the relay; each reading counts the table's
    /// rows by status, so every 15 to 60 seconds is plenty.
    ///
    /// ```no_run
    /// # #[cfg(feature = "postgres")]
    /// # async fn demo(outbox: outbox_core::Outbox<sqlx::Postgres>) {
    /// let shutdown = outbox_core::CancellationToken::new();
    /// tokio::spawn({
    ///     let outbox = outbox.clone();
    ///     let shutdown = shutdown.clone();
    ///     async move { outbox.record_gauges(std::time::Duration::from_secs(15), shutdown).await }
    /// });
    /// # }
    /// ```
    pub async fn record_gauges(&self, every: Duration, shutdown: CancellationToken) {
        let mut tick = tokio::time::interval(every.max(Duration::from_millis(100)));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut failing = false;
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tick.tick() => {}
            }
            match self
                .store()
                .status(Duration::from_secs(10 * 365 * 86_400), 0)
                .await
            {
                Ok(status) => {
                    failing = false;
                    crate::metrics::gauges(self.inner.table.as_str(), &status);
                }
                // Once per outage, not once per tick.
                Err(error) if !failing => {
                    failing = true;
                    tracing::warn!(%error, table = %self.inner.table, "cannot read the outbox gauges; trying again");
                }
                Err(_) => {}
            }
        }
    }
}

impl<DB: Backend> Outbox<DB>
where
    DB::Store: Inspect + Requeue,
{
    /// Requeues every dead event `filter` selects, each aggregate's events in one transaction
    /// ([`Requeue::requeue_all`]); with `dry_run`, changes nothing. Returns how many were (or would be) requeued. Each aggregate
    /// is delivered again from its earliest requeued event, in `seq` order. A filter without
    /// conditions is refused.
    pub async fn requeue_dead(&self, filter: &EventFilter, dry_run: bool) -> Result<u64> {
        filter.refuse_empty()?;
        let span = tracing::info_span!("outbox.requeue", table = %self.inner.table, dry_run);
        async {
            let dead = self.dead_summaries(filter, usize::MAX).await?;
            if dry_run {
                return Ok(dead.len() as u64);
            }
            // Each aggregate's events in one transaction (see `Requeue::requeue_all`).
            let mut by_aggregate: BTreeMap<(&str, &str), Vec<Uuid>> = BTreeMap::new();
            for event in &dead {
                by_aggregate
                    .entry((&event.aggregate_type, &event.aggregate_id))
                    .or_default()
                    .push(event.id);
            }
            let mut requeued = 0;
            for ids in by_aggregate.values() {
                requeued += self.store().requeue_all(ids).await?;
            }
            tracing::info!(requeued, "requeued dead events");
            Ok(requeued)
        }
        .instrument(span)
        .await
    }
}

impl<DB: Backend> Outbox<DB>
where
    DB::Store: Inspect + ArchiveDead,
{
    /// Gives up on every dead event `filter` selects: releases the aggregate parked at it
    /// ([`discard`](Self::discard)) and moves it into `<table>_archive`, where it stays dead
    /// and readable but leaves the dead list, both in one transaction per event. An event its
    /// aggregate will still deliver (an earlier event of the aggregate was requeued) is left
    /// as it is, and not counted. With `dry_run`, each transaction is rolled back: the count is
    /// what the real run would do now. A filter without conditions is refused.
    pub async fn discard_dead(&self, filter: &EventFilter, dry_run: bool) -> Result<u64> {
        filter.refuse_empty()?;
        let span = tracing::info_span!("outbox.discard", table = %self.inner.table, dry_run);
        async {
            let dead = self.dead_summaries(filter, usize::MAX).await?;
            let mut discarded = 0;
            for event in &dead {
                discarded += u64::from(self.store().archive_dead(event.id, dry_run).await?);
            }
            tracing::info!(discarded, "discarded dead events");
            Ok(discarded)
        }
        .instrument(span)
        .await
    }
}

/// Parses the stored headers; a corrupt value must not make the event undeliverable.
pub(crate) fn parse_headers(id: &Uuid, text: &str) -> crate::event::Headers {
    serde_json::from_str(text).unwrap_or_else(|error| {
        tracing::warn!(event_id = %id, %error, "ignoring unreadable outbox headers");
        Default::default()
    })
}

fn clamp_u32(n: i64) -> u32 {
    n.clamp(0, u32::MAX as i64) as u32
}

fn clamp_i32(n: u32) -> i32 {
    i32::try_from(n).unwrap_or(i32::MAX)
}
