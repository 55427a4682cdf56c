//! The outbox table: schema, enqueue, and the statements the relay runs.

#[cfg(feature = "postgres")]
mod postgres;
#[cfg(feature = "sqlite")]
mod sqlite;

use crate::error::Result;
use crate::event::{EnqueueOptions, Envelope, Message, OutboxEvent};
use crate::retention::Retention;
use crate::table::TableName;
use chrono::{DateTime, Utc};
use sqlx::Pool;
use std::fmt;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;
use uuid::Uuid;

mod sealed {
    pub trait Sealed {}
}

/// A database the outbox can live in: PostgreSQL (`postgres` feature) or SQLite (`sqlite`).
///
/// Sealed: the methods are the outbox's own statements, not an extension point. They are
/// hidden and prefixed `backend_` so that your own traits on these database types (a `Store`
/// with `insert` and `get`, say) never collide with them.
pub trait Backend: sqlx::Database + sealed::Sealed {
    #[doc(hidden)]
    type Statements: Send + Sync + fmt::Debug + 'static;

    #[doc(hidden)]
    fn backend_statements(table: &TableName, notify: bool) -> Self::Statements;

    #[doc(hidden)]
    fn backend_migration_sql(table: &TableName) -> Vec<(i64, &'static str, String)>;

    #[doc(hidden)]
    fn backend_migrate(
        pool: &Pool<Self>,
        table: &TableName,
    ) -> impl Future<Output = Result<()>> + Send;

    #[doc(hidden)]
    fn backend_insert<'a>(
        conn: &'a mut Self::Connection,
        statements: &'a Self::Statements,
        messages: &'a [Message],
    ) -> impl Future<Output = Result<()>> + Send + 'a;

    /// Moves what writers announced (PostgreSQL: the `<table>_new` rows their transactions
    /// committed) into the relay's cursors; returns how many announcements were taken.
    #[doc(hidden)]
    fn backend_absorb<'a>(
        pool: &'a Pool<Self>,
        statements: &'a Self::Statements,
        limit: usize,
    ) -> impl Future<Output = Result<u64>> + Send + 'a;

    /// Leases up to `aggregates` due aggregates for `lease` under `token`, and reads for each an
    /// ordered run of up to `run_length` pending events.
    #[doc(hidden)]
    fn backend_claim<'a>(
        pool: &'a Pool<Self>,
        statements: &'a Self::Statements,
        claim: &'a Claim,
    ) -> impl Future<Output = Result<Vec<Run>>> + Send + 'a;

    /// Writes the fate of the runs leased under `token`, in one transaction. Aggregates whose
    /// lease another relay has taken since are left alone.
    #[doc(hidden)]
    fn backend_settle<'a>(
        pool: &'a Pool<Self>,
        statements: &'a Self::Statements,
        token: Uuid,
        settlements: &'a [Settlement],
    ) -> impl Future<Output = Result<()>> + Send + 'a;

    /// Aggregates whose bookkeeping disagrees with their rows (see [`Outbox::check`]).
    #[doc(hidden)]
    fn backend_check<'a>(
        pool: &'a Pool<Self>,
        statements: &'a Self::Statements,
    ) -> impl Future<Output = Result<Vec<Inconsistency>>> + Send + 'a;

    /// Releases the aggregate parked at dead event `id`: returns whether it was parked there.
    #[doc(hidden)]
    fn backend_discard<'a>(
        pool: &'a Pool<Self>,
        statements: &'a Self::Statements,
        id: Uuid,
    ) -> impl Future<Output = Result<bool>> + Send + 'a;

    #[doc(hidden)]
    fn backend_purge_batch<'a>(
        pool: &'a Pool<Self>,
        statements: &'a Self::Statements,
        retention: &'a Retention,
    ) -> impl Future<Output = Result<u64>> + Send + 'a;

    #[doc(hidden)]
    fn backend_get<'a>(
        pool: &'a Pool<Self>,
        statements: &'a Self::Statements,
        id: Uuid,
    ) -> impl Future<Output = Result<Option<EventRecord>>> + Send + 'a;

    #[doc(hidden)]
    fn backend_mark_consumed<'a>(
        pool: &'a Pool<Self>,
        statements: &'a Self::Statements,
        ids: &'a [Uuid],
    ) -> impl Future<Output = Result<u64>> + Send + 'a;

    #[doc(hidden)]
    fn backend_explain_claim<'a>(
        pool: &'a Pool<Self>,
        statements: &'a Self::Statements,
        limit: usize,
    ) -> impl Future<Output = Result<String>> + Send + 'a;

    #[doc(hidden)]
    fn backend_requeue<'a>(
        pool: &'a Pool<Self>,
        statements: &'a Self::Statements,
        id: Uuid,
    ) -> impl Future<Output = Result<bool>> + Send + 'a;

    /// Runs SQL without parameters (DDL).
    #[doc(hidden)]
    fn backend_execute<'a>(
        pool: &'a Pool<Self>,
        sql: &'a str,
    ) -> impl Future<Output = Result<()>> + Send + 'a;

    #[doc(hidden)]
    fn backend_inbox_sql(table: &TableName) -> (String, String);

    #[doc(hidden)]
    fn backend_inbox_insert<'a>(
        conn: &'a mut Self::Connection,
        insert: &'a str,
        consumer: &'a str,
        message_id: Uuid,
    ) -> impl Future<Output = Result<bool>> + Send + 'a;

    /// Bumps `wake` whenever an enqueueing transaction commits, until `cancel`. Backends without
    /// notifications return at once and the relay polls.
    #[doc(hidden)]
    fn backend_listen(
        pool: Pool<Self>,
        table: TableName,
        wake: watch::Sender<u64>,
        cancel: CancellationToken,
    ) -> impl Future<Output = ()> + Send + 'static;
}

/// What a claim asks for.
#[doc(hidden)]
#[derive(Debug, Clone)]
pub struct Claim {
    pub token: Uuid,
    pub aggregates: usize,
    pub run_length: usize,
    /// Runs are shortened evenly so that the batch holds at most this many events.
    pub max_events: usize,
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
#[doc(hidden)]
#[derive(Debug, Clone)]
pub struct Run {
    pub aggregate_type: String,
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
#[doc(hidden)]
#[derive(Debug, Clone)]
pub struct RunEvent {
    pub envelope: Envelope,
    /// Due now (its `available_at` has passed, by the database's clock).
    pub due: bool,
    /// When it becomes due.
    pub available_at: DateTime<Utc>,
    /// The reason of its last failure.
    pub last_error: Option<String>,
}

/// What becomes of one leased aggregate and the events of its run.
#[doc(hidden)]
#[derive(Debug, Clone)]
pub struct Settlement {
    pub aggregate_type: String,
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
    pub events: Vec<Fate>,
}

/// The new state of one event row.
#[doc(hidden)]
#[derive(Debug, Clone)]
pub struct Fate {
    pub id: Uuid,
    pub status: EventStatus,
    pub attempts: u32,
    /// Already cleaned (see `relay::settle::clean_reason`).
    pub reason: Option<String>,
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
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
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
    pub(crate) fn as_str(self) -> &'static str {
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
#[derive(Debug, Clone)]
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
    statements: DB::Statements,
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

    /// Validates the configuration.
    pub fn build(self) -> Result<Outbox<DB>> {
        let table = TableName::new(self.table)?;
        let statements = DB::backend_statements(&table, self.notify);
        Ok(Outbox {
            inner: Arc::new(Inner {
                pool: self.pool,
                table,
                statements,
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
        DB::backend_migrate(&self.inner.pool, &self.inner.table)
            .instrument(tracing::info_span!("outbox.migrate", table = %self.inner.table))
            .await
    }

    /// The schema, as `(version, description, SQL)` steps.
    pub fn migration_sql(&self) -> Vec<(i64, &'static str, String)> {
        DB::backend_migration_sql(&self.inner.table)
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

    /// Like [`enqueue`](Self::enqueue), with a delay and headers.
    pub async fn enqueue_with<E: OutboxEvent>(
        &self,
        conn: &mut DB::Connection,
        event: &E,
        options: EnqueueOptions,
    ) -> Result<Uuid> {
        let message = Message::with_options(event, options)?;
        let id = message.id;
        self.enqueue_messages(conn, std::slice::from_ref(&message))
            .await?;
        Ok(id)
    }

    /// Writes several events of one type in one round trip (PostgreSQL) and returns their ids
    /// in order. Events of one aggregate get consecutive sequence numbers in slice order.
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

    /// Writes prepared [`Message`]s, of any event types, in one round trip (PostgreSQL).
    pub async fn enqueue_messages(
        &self,
        conn: &mut DB::Connection,
        messages: &[Message],
    ) -> Result<()> {
        if messages.is_empty() {
            return Ok(());
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
        DB::backend_insert(conn, &self.inner.statements, messages)
            .instrument(span)
            .await
    }

    /// One row, by id.
    pub async fn get(&self, id: Uuid) -> Result<Option<EventRecord>> {
        DB::backend_get(&self.inner.pool, &self.inner.statements, id).await
    }

    /// The query plan of the relay's claim statement (`EXPLAIN`), to check that it stays an
    /// index scan on your data. See the "Indexes" section of the README.
    pub async fn explain_claim(&self, batch_size: usize) -> Result<String> {
        DB::backend_explain_claim(&self.inner.pool, &self.inner.statements, batch_size).await
    }

    /// Records that consumers have consumed these events (`consumed_at`, first report wins);
    /// returns how many rows changed. [`RegistryBuilder::record_receipts`](crate::RegistryBuilder::record_receipts)
    /// calls it for every [`Receipt`](crate::Receipt) it receives.
    pub async fn mark_consumed(&self, ids: &[Uuid]) -> Result<u64> {
        DB::backend_mark_consumed(&self.inner.pool, &self.inner.statements, ids).await
    }

    /// Puts a dead event back to pending with its attempts reset; returns whether it was dead.
    ///
    /// The relay delivers it next among its aggregate's pending events (in `seq` order); later
    /// events that were delivered meanwhile are not delivered again. Safe to call concurrently,
    /// from several processes, for events of one aggregate.
    pub async fn requeue(&self, id: Uuid) -> Result<bool> {
        DB::backend_requeue(&self.inner.pool, &self.inner.statements, id).await
    }

    /// Leaves a dead event dead and releases its aggregate, if the relay parked the aggregate at
    /// it ([`DeadLetters::Park`](crate::DeadLetters::Park)): the aggregate's later events are
    /// delivered next. Returns whether the aggregate was parked at this event.
    pub async fn discard(&self, id: Uuid) -> Result<bool> {
        DB::backend_discard(&self.inner.pool, &self.inner.statements, id).await
    }

    /// Applies `retention` now: deletes (or archives) delivered rows older than its age, in
    /// batches of its batch size, each its own short statement. Returns the rows removed.
    pub async fn purge(&self, retention: &Retention) -> Result<u64> {
        let span = tracing::info_span!("outbox.purge", table = %self.inner.table);
        async {
            let mut total = 0;
            loop {
                let n =
                    DB::backend_purge_batch(&self.inner.pool, &self.inner.statements, retention)
                        .await?;
                total += n;
                if n < retention.batch_size as u64 {
                    return Ok(total);
                }
            }
        }
        .instrument(span)
        .await
    }

    /// Checks the relay's bookkeeping against the event rows: returns every aggregate with a
    /// pending event that no relay would ever claim. Empty on a healthy outbox; cheap enough to
    /// run from a periodic health check on tables of a few million rows.
    pub async fn check(&self) -> Result<Vec<Inconsistency>> {
        DB::backend_check(&self.inner.pool, &self.inner.statements).await
    }

    pub(crate) fn statements(&self) -> &DB::Statements {
        &self.inner.statements
    }
}

impl<DB: Backend> Outbox<DB> {
    pub(crate) async fn absorb(&self, limit: usize) -> Result<u64> {
        DB::backend_absorb(&self.inner.pool, self.statements(), limit).await
    }

    pub(crate) async fn claim(&self, claim: &Claim) -> Result<Vec<Run>> {
        DB::backend_claim(&self.inner.pool, self.statements(), claim).await
    }

    pub(crate) async fn settle(&self, token: Uuid, settlements: &[Settlement]) -> Result<()> {
        DB::backend_settle(&self.inner.pool, self.statements(), token, settlements).await
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

fn stranded_problem(stranded: i64, first: i64, done: Option<i64>, known: Option<i64>) -> String {
    match (done, known) {
        (Some(done), Some(known)) => format!(
            "{stranded} pending event(s) from seq {first} outside what its cursor will deliver \
             (settled up to {done}, known up to {known})"
        ),
        _ => format!("{stranded} pending event(s) from seq {first} and no cursor"),
    }
}
