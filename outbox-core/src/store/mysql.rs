//! The outbox in MySQL 8.0 and MariaDB 10.6+ (`mysql` feature): the same tables and the same
//! relay protocol as PostgreSQL, in their dialect.
//!
//! - An aggregate is keyed by `aggregate_key`, the SHA-256 of its type and id (computed here):
//!   InnoDB cannot index two long text columns together, aggregate ids may be 1 KiB, and the
//!   key compares them byte for byte. Text columns that are read back use a case-insensitive
//!   collation (sqlx reads no `String` from a `_bin` column): statements never compare them
//!   except through the key or as bytes (`CAST(.. AS BINARY)`: every collation, `utf8mb4_bin`
//!   too, ignores trailing spaces). Idempotency keys and consumer names, compared by the
//!   table's own key, are `VARBINARY`.
//! - Times are `DATETIME(6)` in UTC from the database's clock (`UTC_TIMESTAMP(6)`), whatever the
//!   session's time zone.
//! - Relay statements run at READ COMMITTED: their locking reads (`FOR UPDATE SKIP LOCKED`)
//!   then lock the rows they return and no gaps, so an application's insert never waits on a
//!   relay, and no relay waits on an application.
//! - Arrays travel as one JSON parameter, unpacked with `JSON_TABLE`.
//! - No notifications: relays poll.

use super::sql::{self, duration_ms};
use super::{
    clamp_i32, clamp_u32, parse_headers, ArchiveDead, Backend, Check, Claim, DeadEvent, Discard,
    Enqueued, EventFilter, EventRecord, ExplainClaim, InboxStore, Inconsistency, Inspect, Lookup,
    MarkConsumed, OutboxStatus, ParkedAggregate, Republish, Requeue, Run, RunEvent, Settlement,
    Store, StoreOptions,
};
use crate::error::{Error, Result};
use crate::event::{Deliver, Envelope, Message};
use crate::retention::Retention;
use crate::table::TableName;
use chrono::{DateTime, Utc};
use sha2::{Digest, Sha256};
use sqlx::mysql::{MySqlConnection, MySqlRow};
use sqlx::{MySql, MySqlPool, QueryBuilder, Row};
use std::collections::{BTreeMap, HashMap};
use std::time::Duration;
use uuid::Uuid;

/// A JSON array of event ids (hex) as a table `j`: statements go from it to the rows.
const LISTED: &str = "JSON_TABLE(?, '$[*]' COLUMNS (id VARCHAR(32) PATH '$')) j";

/// Every column of an event row, in table order: what archiving and restoring copy.
const ROW: &str = "id, created_at, aggregate_type, aggregate_id, aggregate_key, seq, event_type, \
     schema_version, topic, payload, headers, content_type, status, attempts, available_at, \
     last_error, delivered_at, dead_at, consumed_at, failures";

/// Columns every read returns, in the order `envelope` and `record` expect.
const COLUMNS: &str = "o.id, o.created_at, o.aggregate_type, o.aggregate_id, o.seq, o.event_type, \
     o.schema_version, o.topic, o.payload, o.headers, o.attempts";

/// One event's values in `MyStatements::insert` (12 parameters).
const INSERT_ROW: &str = "(?, UTC_TIMESTAMP(6), ?, ?, ?, ?, ?, ?, ?, ?, ?, \
     COALESCE(?, DATE_ADD(UTC_TIMESTAMP(6), INTERVAL ? MICROSECOND)))";

/// One event's values in `MyStatements::announce` (4 parameters).
const ANNOUNCE_ROW: &str = "(?, ?, ?, ?)";

/// Events per multi-row `INSERT` at most, and payload bytes: the statement must fit the
/// server's `max_allowed_packet` (16 MiB by default on MariaDB) and its 65,535 parameters.
const INSERT_ROWS: usize = 500;
const INSERT_BYTES: usize = 4 << 20;
/// What a row carries besides its payload, aggregate id and headers (counted twice, for JSON's
/// escapes): names, numbers, quotes, generously.
const ROW_OVERHEAD_BYTES: usize = 2048;

/// A time no relay reaches: a parked aggregate's `due_at`.
const NEVER: &str = "'9999-12-31 00:00:00'";

/// The longest delay a statement is given, in microseconds (a century): `DATE_ADD` past year
/// 9999 is NULL, and an absurd delay must not fail a statement.
const MAX_DELAY_US: i64 = 100 * 365 * 86_400 * 1_000_000;

fn delay_us(d: Duration) -> i64 {
    duration_ms(d).saturating_mul(1000).min(MAX_DELAY_US)
}

/// The range of a `DATETIME`: outside it MariaDB stores a zero date, which no read can decode.
fn datetime_range() -> (DateTime<Utc>, DateTime<Utc>) {
    let at = |y, m, d, h, min, s, us| {
        chrono::NaiveDate::from_ymd_opt(y, m, d)
            .and_then(|d| d.and_hms_micro_opt(h, min, s, us))
            .expect("a valid date")
            .and_utc()
    };
    (
        at(1000, 1, 1, 0, 0, 0, 0),
        at(9999, 12, 31, 23, 59, 59, 999_999),
    )
}

/// `t` moved into the `DATETIME` range, for comparisons: a bound past year 9999 then still
/// selects nothing later than it, and one before year 1000 nothing earlier.
fn storable(t: DateTime<Utc>) -> DateTime<Utc> {
    let (earliest, latest) = datetime_range();
    t.clamp(earliest, latest)
}

/// When a message may be delivered, as stored: refused past year 9999 (a clear error rather
/// than a zero date); a time before year 1000 is as past as any, and delivered now.
fn delivery_time(m: &Message) -> Result<Option<DateTime<Utc>>> {
    let Some(Deliver::At(at)) = m.options.available_at else {
        return Ok(None);
    };
    if at > datetime_range().1 {
        return Err(Error::InvalidField {
            field: format!("delivery time {at} of event {}", m.id),
            reason: "it is after 9999-12-31, the last time MySQL stores",
        });
    }
    Ok(Some(storable(at)))
}

/// The key of an aggregate: SHA-256 of its type's length, type and id (unambiguous).
fn aggregate_key(aggregate_type: &str, aggregate_id: &str) -> Vec<u8> {
    let mut hash = Sha256::new();
    hash.update(aggregate_type.len().to_string());
    hash.update(":");
    hash.update(aggregate_type);
    hash.update(aggregate_id);
    hash.finalize().to_vec()
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// `uuid` as 32 hex digits, as `UNHEX` reads it in a JSON parameter.
fn uuid_hex(id: &Uuid) -> String {
    id.simple().to_string()
}

#[derive(Debug)]
struct MyStatements {
    next_seq: String,
    insert: String,
    announce: String,
    take_key: String,
    find_key: String,
    absorb_take: String,
    absorb_cursors: String,
    claim_select: String,
    run: String,
    settle_events: String,
    settle_cursors: String,
    get: String,
    consumed: String,
    cursor_back: String,
}

impl MyStatements {
    fn new(table: &TableName) -> Self {
        let t = table.as_str();
        Self {
            // The counter row's lock serialises the writers of one aggregate until commit: the
            // sequence order is the commit order, and a rollback leaves no gap. It takes the
            // next `n` numbers at once; `LAST_INSERT_ID(expr)` hands the last back without a
            // second statement.
            next_seq: format!(
                r#"INSERT INTO `{t}_aggregates` (aggregate_key, last_seq) VALUES (?, LAST_INSERT_ID(?))
ON DUPLICATE KEY UPDATE last_seq = LAST_INSERT_ID(last_seq + ?)"#
            ),
            // Followed by one `INSERT_ROW` per event.
            insert: format!(
                r#"INSERT INTO `{t}` (id, created_at, aggregate_type, aggregate_id, aggregate_key, seq,
    event_type, schema_version, topic, payload, headers, available_at)
VALUES "#
            ),
            // Writers announce; only relays read announcements. Writers never touch a row a
            // relay writes: neither side ever waits for the other. One `ANNOUNCE_ROW` per event.
            announce: format!(
                r#"INSERT INTO `{t}_new` (aggregate_key, aggregate_type, aggregate_id, seq) VALUES "#
            ),
            take_key: format!(
                r#"INSERT INTO `{t}_keys` (`key`, event_id, created_at) VALUES (?, ?, UTC_TIMESTAMP(6))"#
            ),
            // A locking read sees the key committed by another writer after this transaction's
            // snapshot, which a plain read at REPEATABLE READ would not.
            find_key: format!(
                r#"SELECT event_id FROM `{t}_keys` WHERE `key` = ? LOCK IN SHARE MODE"#
            ),
            // Committed announcements only: a writer's own rows stay locked (and skipped) until
            // it commits, and its events commit with them.
            absorb_take: format!(
                r#"SELECT n, aggregate_key, aggregate_type, aggregate_id, seq FROM `{t}_new`
ORDER BY n LIMIT ? FOR UPDATE SKIP LOCKED"#
            ),
            // Upserted in key order, so relays absorbing side by side cannot deadlock.
            absorb_cursors: format!(
                r#"INSERT INTO `{t}_cursors` (aggregate_key, aggregate_type, aggregate_id, known_seq, due_at)
SELECT UNHEX(j.k), j.t, j.i, j.s, UTC_TIMESTAMP(6)
FROM JSON_TABLE(?, '$[*]' COLUMNS (
    k VARCHAR(64) PATH '$[0]', t VARCHAR(255) PATH '$[1]', i VARCHAR(1024) PATH '$[2]',
    s BIGINT PATH '$[3]')) j
ORDER BY j.k
ON DUPLICATE KEY UPDATE known_seq = GREATEST(known_seq, VALUES(known_seq))"#
            ),
            // `due_pending` is `due_at` for cursors with events to settle and NULL otherwise:
            // its index holds only those, as PostgreSQL's partial index does. The cursor's
            // `due_at` doubles as the lease deadline, so a dead relay's aggregates come due again.
            claim_select: format!(
                r#"SELECT aggregate_key, aggregate_type, aggregate_id, done_seq, known_seq, attempts,
       parked_seq, version
FROM `{t}_cursors` WHERE due_pending <= UTC_TIMESTAMP(6)
ORDER BY due_pending LIMIT ? FOR UPDATE SKIP LOCKED"#
            ),
            // One branch per leased aggregate, each an index range read that stops at its limit
            // however deep the aggregate's backlog.
            run: format!(
                r#"(SELECT {COLUMNS}, o.available_at, o.available_at <= UTC_TIMESTAMP(6) AS due,
        o.last_error, ? AS branch
 FROM `{t}` o WHERE o.aggregate_key = ? AND o.seq > ? AND o.seq <= ? AND o.status = 'pending'
 ORDER BY o.seq LIMIT ?)"#
            ),
            // From the list to the rows by primary key (STRAIGHT_JOIN, FORCE INDEX): on a small
            // table the optimizer prefers a scan, which would lock, and wait on, the rows of
            // applications' open transactions. Every statement that locks rows here names them
            // by key for the same reason.
            settle_events: format!(
                r#"UPDATE JSON_TABLE(?, '$[*]' COLUMNS (
    id VARCHAR(32) PATH '$[0]', status VARCHAR(9) PATH '$[1]', attempts INT PATH '$[2]',
    reason LONGTEXT PATH '$[3]')) e
STRAIGHT_JOIN `{t}` o FORCE INDEX (PRIMARY) ON o.id = UNHEX(e.id)
SET o.status = e.status, o.attempts = e.attempts,
    o.last_error = IF(e.status = 'delivered', NULL, COALESCE(e.reason, o.last_error)),
    -- The last ten failed attempts, for the operator (`dead show`).
    o.failures = IF(e.reason IS NULL OR e.status = 'delivered', o.failures,
        JSON_ARRAY_APPEND(
            IF(JSON_LENGTH(COALESCE(o.failures, '[]')) >= 10, JSON_REMOVE(o.failures, '$[0]'),
               COALESCE(o.failures, '[]')),
            '$', JSON_OBJECT(
                'attempt', e.attempts,
                'at', DATE_FORMAT(UTC_TIMESTAMP(6), '%Y-%m-%dT%H:%i:%s.%fZ'),
                'dead', JSON_EXTRACT(IF(e.status = 'dead', 'true', 'false'), '$'),
                'reason', e.reason))),
    o.delivered_at = IF(e.status = 'delivered', UTC_TIMESTAMP(6), NULL),
    o.dead_at = IF(e.status = 'dead', UTC_TIMESTAMP(6), NULL)
WHERE o.status = 'pending'"#
            ),
            // As on PostgreSQL: a requeue or discard since the claim (another version) keeps its
            // position and park state; only a park this run found is added. Each assignment
            // reads only columns no other assignment changes: MySQL does not promise an order
            // for a multi-table UPDATE.
            settle_cursors: format!(
                r#"UPDATE JSON_TABLE(?, '$[*]' COLUMNS (
    k VARCHAR(64) PATH '$[0]', version BIGINT PATH '$[1]', done_seq BIGINT PATH '$[2]',
    attempts INT PATH '$[3]', delay_us BIGINT PATH '$[4]', not_before DATETIME(6) PATH '$[5]',
    park_at BIGINT PATH '$[6]', new_park BIGINT PATH '$[7]')) f
STRAIGHT_JOIN `{t}_cursors` c FORCE INDEX (PRIMARY) ON c.aggregate_key = UNHEX(f.k)
SET c.done_seq = IF(c.version = f.version, f.done_seq, c.done_seq),
    c.attempts = IF(c.version = f.version, f.attempts, 0),
    c.due_at = CASE WHEN c.version <> f.version THEN UTC_TIMESTAMP(6)
                    WHEN f.done_seq >= f.park_at - 1 THEN {NEVER}
                    ELSE GREATEST(DATE_ADD(UTC_TIMESTAMP(6), INTERVAL f.delay_us MICROSECOND),
                                  COALESCE(f.not_before, '1000-01-01')) END,
    c.parked_seq = IF(c.version = f.version, f.park_at, COALESCE(f.new_park, c.parked_seq)),
    c.leased_by = NULL
WHERE c.leased_by = ?"#
            ),
            get: format!(
                r#"SELECT {COLUMNS}, o.status, o.last_error, o.available_at, o.delivered_at, o.dead_at,
       o.consumed_at, o.failures
FROM `{t}` o WHERE o.id = ?"#
            ),
            consumed: format!(
                r#"UPDATE JSON_TABLE(?, '$[*]' COLUMNS (id VARCHAR(32) PATH '$')) j
STRAIGHT_JOIN `{t}` o FORCE INDEX (PRIMARY) ON o.id = UNHEX(j.id)
SET o.consumed_at = UTC_TIMESTAMP(6) WHERE o.consumed_at IS NULL"#
            ),
            // A cursor moved back to just before `done` (never forward), known up to at least
            // `known`: requeue and republish. A single-table upsert assigns left to right, each
            // assignment seeing the ones before: what reads `done_seq` comes before it changes.
            cursor_back: format!(
                r#"INSERT INTO `{t}_cursors` (aggregate_key, aggregate_type, aggregate_id, known_seq, done_seq, due_at)
VALUES (?, ?, ?, ?, ?, UTC_TIMESTAMP(6))
ON DUPLICATE KEY UPDATE
    attempts = IF(VALUES(done_seq) <= done_seq, 0, attempts),
    due_at = IF(VALUES(done_seq) <= done_seq AND leased_by IS NULL, LEAST(due_at, VALUES(due_at)), due_at),
    -- Requeueing the event the aggregate is parked at unparks it; an earlier one does not.
    parked_seq = IF(parked_seq = ?, NULL, parked_seq),
    known_seq = GREATEST(known_seq, VALUES(known_seq)),
    done_seq = LEAST(done_seq, VALUES(done_seq)),
    version = version + 1"#
            ),
        }
    }
}

impl Backend for MySql {
    type Store = MySqlStore;
    type Inbox = MySqlInbox;

    /// MySQL has no notifications: `options.notify` changes nothing, relays poll.
    fn open_store(pool: MySqlPool, table: TableName, _options: StoreOptions) -> MySqlStore {
        MySqlStore {
            statements: MyStatements::new(&table),
            pool,
            table,
        }
    }

    fn open_inbox(pool: MySqlPool, table: TableName) -> MySqlInbox {
        MySqlInbox::new(pool, table)
    }
}

/// An outbox table in MySQL or MariaDB: the [`Store`] of [`Outbox<MySql>`](super::Outbox).
#[derive(Debug)]
pub struct MySqlStore {
    pool: MySqlPool,
    table: TableName,
    statements: MyStatements,
}

/// A transaction at READ COMMITTED (see the module's doc): the relay's, and operator actions'.
async fn relay_tx(pool: &MySqlPool) -> Result<sqlx::Transaction<'static, MySql>> {
    let mut conn = pool.acquire().await?;
    sqlx::query("SET TRANSACTION ISOLATION LEVEL READ COMMITTED")
        .execute(&mut *conn)
        .await?;
    Ok(sqlx::Transaction::begin(conn, None).await?)
}

impl Store for MySqlStore {
    type Connection = MySqlConnection;

    fn migration_sql(&self) -> Vec<(i64, &'static str, String)> {
        let t = self.table.as_str();
        // Step 5: the schema PostgreSQL reached in five. MySQL commits each DDL statement by
        // itself, so every statement is idempotent.
        vec![(
            5,
            "outbox table, sequence counters, announcements, cursors, idempotency keys, archive",
            format!(
                r#"CREATE TABLE IF NOT EXISTS `{t}` (
    id             BINARY(16) NOT NULL PRIMARY KEY,
    created_at     DATETIME(6) NOT NULL,
    aggregate_type VARCHAR(255) NOT NULL,
    aggregate_id   VARCHAR(1024) NOT NULL,
    aggregate_key  BINARY(32) NOT NULL,
    seq            BIGINT NOT NULL,
    event_type     VARCHAR(255) NOT NULL,
    schema_version INT NOT NULL,
    topic          VARCHAR(255) NOT NULL,
    payload        LONGTEXT NOT NULL,
    headers        LONGTEXT NOT NULL,
    content_type   VARCHAR(255) NOT NULL DEFAULT 'application/json',
    status         VARCHAR(9) NOT NULL DEFAULT 'pending' CHECK (status IN ('pending', 'delivered', 'dead')),
    attempts       INT NOT NULL DEFAULT 0,
    available_at   DATETIME(6) NOT NULL,
    last_error     LONGTEXT,
    delivered_at   DATETIME(6),
    dead_at        DATETIME(6),
    consumed_at    DATETIME(6),
    failures       LONGTEXT,
    -- The relay reads an aggregate's pending events from here, from its cursor on.
    UNIQUE KEY `{t}_aggregate_seq` (aggregate_key, seq),
    KEY `{t}_delivered_at` (status, delivered_at),
    KEY `{t}_dead_at` (status, dead_at)
) ENGINE = InnoDB CHARACTER SET utf8mb4 COLLATE utf8mb4_unicode_ci;
CREATE TABLE IF NOT EXISTS `{t}_archive` LIKE `{t}`;
CREATE TABLE IF NOT EXISTS `{t}_aggregates` (
    aggregate_key BINARY(32) NOT NULL PRIMARY KEY,
    last_seq      BIGINT NOT NULL
) ENGINE = InnoDB;
CREATE TABLE IF NOT EXISTS `{t}_new` (
    n              BIGINT NOT NULL AUTO_INCREMENT PRIMARY KEY,
    aggregate_key  BINARY(32) NOT NULL,
    aggregate_type VARCHAR(255) NOT NULL,
    aggregate_id   VARCHAR(1024) NOT NULL,
    seq            BIGINT NOT NULL,
    KEY `{t}_new_aggregate` (aggregate_key, seq)
) ENGINE = InnoDB CHARACTER SET utf8mb4 COLLATE utf8mb4_unicode_ci;
CREATE TABLE IF NOT EXISTS `{t}_cursors` (
    aggregate_key  BINARY(32) NOT NULL PRIMARY KEY,
    aggregate_type VARCHAR(255) NOT NULL,
    aggregate_id   VARCHAR(1024) NOT NULL,
    known_seq      BIGINT NOT NULL DEFAULT 0,
    done_seq       BIGINT NOT NULL DEFAULT 0,
    attempts       INT NOT NULL DEFAULT 0,
    due_at         DATETIME(6) NOT NULL,
    leased_by      BINARY(16),
    parked_seq     BIGINT,
    version        BIGINT NOT NULL DEFAULT 0,
    due_pending    DATETIME(6) AS (IF(done_seq < known_seq, due_at, NULL)) STORED,
    KEY `{t}_cursors_due` (due_pending)
) ENGINE = InnoDB CHARACTER SET utf8mb4 COLLATE utf8mb4_unicode_ci;
CREATE TABLE IF NOT EXISTS `{t}_keys` (
    `key`      VARCHAR(512) NOT NULL PRIMARY KEY,
    event_id   BINARY(16) NOT NULL,
    created_at DATETIME(6) NOT NULL,
    KEY `{t}_keys_created_at` (created_at)
) ENGINE = InnoDB CHARACTER SET utf8mb4 COLLATE utf8mb4_bin;"#
            ),
        ),
        (
            6,
            "idempotency keys compared as bytes",
            // Every collation, `utf8mb4_bin` too, pads with spaces: "k" and "k " were one key.
            format!(r#"ALTER TABLE `{t}_keys` MODIFY `key` VARBINARY(512) NOT NULL;"#),
        )]
    }

    async fn migrate(&self) -> Result<()> {
        let mut conn = self.pool.acquire().await?;
        let m = self.table.derived("migrations");
        // Serialise concurrent migrators of this table (DDL is not transactional here).
        let lock = format!("outbox-migrate:{}", self.table);
        let locked: Option<i64> = sqlx::query_scalar("SELECT GET_LOCK(?, 60)")
            .bind(&lock)
            .fetch_one(&mut *conn)
            .await?;
        if locked != Some(1) {
            return Err(Error::InvalidField {
                field: format!("migration lock {lock:?}"),
                reason: "another process held it for 60 s",
            });
        }
        let outcome = self.migrate_locked(&mut conn, &m).await;
        sqlx::query("SELECT RELEASE_LOCK(?)")
            .bind(&lock)
            .execute(&mut *conn)
            .await?;
        outcome
    }

    async fn insert<'a>(
        &'a self,
        conn: &'a mut MySqlConnection,
        messages: &'a [Message],
    ) -> Result<Vec<Enqueued>> {
        let statements = &self.statements;
        // Checked before any statement: a refused message leaves the transaction untouched.
        let times = messages
            .iter()
            .map(delivery_time)
            .collect::<Result<Vec<_>>>()?;
        let mut outcomes = Vec::with_capacity(messages.len());
        for m in messages {
            outcomes.push(match m.idempotency_key() {
                Some(key) => self.take_key(conn, key, m.id).await?,
                None => Enqueued::New(m.id),
            });
        }
        // The events to write, in order, with their aggregates' keys.
        let new: Vec<NewEvent<'_>> = messages
            .iter()
            .zip(times)
            .zip(&outcomes)
            .filter(|(_, outcome)| outcome.is_new())
            .map(|((m, at), _)| (m, at, aggregate_key(m.aggregate_type, &m.aggregate_id)))
            .collect();
        // Sequence numbers: one counter statement per aggregate, in key order (two batches
        // that share aggregates lock them in the same order, so they cannot deadlock); each
        // aggregate's events numbered in the order given.
        let mut counts: BTreeMap<&[u8], i64> = BTreeMap::new();
        for (_, _, key) in &new {
            *counts.entry(key.as_slice()).or_default() += 1;
        }
        let mut next: HashMap<&[u8], i64> = HashMap::with_capacity(counts.len());
        if let (1, Some((&key, &n))) = (counts.len(), counts.iter().next()) {
            // One aggregate (one event, usually): one statement.
            let last = sqlx::query(&statements.next_seq)
                .bind(key)
                .bind(n)
                .bind(n)
                .execute(&mut *conn)
                .await?
                .last_insert_id();
            next.insert(key, i64::try_from(last).unwrap_or(i64::MAX) - n + 1);
        } else {
            // Many: the counters upserted in one statement per 1,000 aggregates, then read back
            // (this transaction holds their locks, so what it reads is what it wrote).
            let counts: Vec<(&[u8], i64)> = counts.into_iter().collect();
            for chunk in counts.chunks(1000) {
                let mut upsert = QueryBuilder::<MySql>::new(format!(
                    "INSERT INTO `{}` (aggregate_key, last_seq) ",
                    self.table.derived("aggregates")
                ));
                upsert.push_values(chunk, |mut row, (key, n)| {
                    row.push_bind(*key).push_bind(*n);
                });
                upsert.push(" ON DUPLICATE KEY UPDATE last_seq = last_seq + VALUES(last_seq)");
                upsert.build().execute(&mut *conn).await?;
                let mut read = QueryBuilder::<MySql>::new(format!(
                    "SELECT aggregate_key, last_seq FROM `{}` WHERE aggregate_key IN (",
                    self.table.derived("aggregates")
                ));
                let mut keys = read.separated(", ");
                for (key, _) in chunk {
                    keys.push_bind(*key);
                }
                read.push(")");
                let lasts: HashMap<Vec<u8>, i64> = read
                    .build_query_as::<(Vec<u8>, i64)>()
                    .fetch_all(&mut *conn)
                    .await?
                    .into_iter()
                    .collect();
                for (key, n) in chunk {
                    let last = lasts
                        .get(*key)
                        .copied()
                        .ok_or_else(|| Error::InvalidField {
                            field: "aggregate counter".into(),
                            reason: "it was not found right after it was written",
                        })?;
                    next.insert(key, last - n + 1);
                }
            }
        }
        let mut seqs = Vec::with_capacity(new.len());
        for (_, _, key) in &new {
            let seq = next.get_mut(key.as_slice()).expect("counted above");
            seqs.push(*seq);
            *seq += 1;
        }
        let mut start = 0;
        while start < new.len() {
            let mut end = start;
            let mut bytes = 0;
            while end < new.len() && end - start < INSERT_ROWS {
                // Checked before the row joins: a large event goes into the next statement,
                // and one larger than the limit into its own, as it would alone.
                let m = new[end].0;
                let headers: usize = m
                    .options
                    .headers
                    .iter()
                    .map(|(k, v)| k.len() + v.len())
                    .sum();
                let size =
                    m.payload.len() + m.aggregate_id.len() + 2 * headers + ROW_OVERHEAD_BYTES;
                if end > start && bytes + size > INSERT_BYTES {
                    break;
                }
                bytes += size;
                end += 1;
            }
            let rows = &new[start..end];
            let list = |row: &str| vec![row; rows.len()].join(", ");
            let insert = format!("{}{}", statements.insert, list(INSERT_ROW));
            let mut query = sqlx::query(&insert);
            for ((m, at, key), seq) in rows.iter().zip(&seqs[start..end]) {
                let delay = match m.options.available_at {
                    Some(Deliver::After(d)) => delay_us(d),
                    _ => 0,
                };
                query = query
                    .bind(m.id)
                    .bind(m.aggregate_type)
                    .bind(&m.aggregate_id)
                    .bind(key)
                    .bind(*seq)
                    .bind(m.event_type)
                    .bind(m.schema_version as i32)
                    .bind(m.topic)
                    .bind(&m.payload)
                    .bind(m.headers_json())
                    .bind(*at)
                    .bind(delay);
            }
            query.execute(&mut *conn).await?;
            let announce = format!("{}{}", statements.announce, list(ANNOUNCE_ROW));
            let mut query = sqlx::query(&announce);
            for ((m, _, key), seq) in rows.iter().zip(&seqs[start..end]) {
                query = query
                    .bind(key)
                    .bind(m.aggregate_type)
                    .bind(&m.aggregate_id)
                    .bind(*seq);
            }
            query.execute(&mut *conn).await?;
            start = end;
        }
        Ok(outcomes)
    }

    async fn absorb(&self) -> Result<u64> {
        let mut total = 0;
        for _ in 0..ABSORB_ROUNDS {
            let mut tx = relay_tx(&self.pool).await?;
            let taken: Vec<(i64, Vec<u8>, String, String, i64)> =
                sqlx::query_as(&self.statements.absorb_take)
                    .bind(ABSORB_LIMIT as i64)
                    .fetch_all(&mut *tx)
                    .await?;
            if taken.is_empty() {
                tx.commit().await?;
                break;
            }
            let mut known: BTreeMap<String, (&str, &str, i64)> = BTreeMap::new();
            for (_, key, aggregate_type, aggregate_id, seq) in &taken {
                let entry = known
                    .entry(hex(key))
                    .or_insert((aggregate_type, aggregate_id, 0));
                entry.2 = entry.2.max(*seq);
            }
            let rows: Vec<(&String, &str, &str, i64)> =
                known.iter().map(|(k, (t, i, s))| (k, *t, *i, *s)).collect();
            sqlx::query(&self.statements.absorb_cursors)
                .bind(serde_json::to_string(&rows).expect("strings serialise"))
                .execute(&mut *tx)
                .await?;
            // By primary key, only what the statement above locked: a scan (which MariaDB
            // prefers for a short IN list on a small table) would wait on the rows of writers
            // that have not committed yet.
            let taken_ids: Vec<i64> = taken.iter().map(|r| r.0).collect();
            sqlx::query(&format!(
                r#"DELETE n FROM JSON_TABLE(?, '$[*]' COLUMNS (n BIGINT PATH '$')) j
STRAIGHT_JOIN `{}` n FORCE INDEX (PRIMARY) ON n.n = j.n"#,
                self.table.derived("new")
            ))
            .bind(serde_json::to_string(&taken_ids).expect("numbers serialise"))
            .execute(&mut *tx)
            .await?;
            tx.commit().await?;
            total += taken.len() as u64;
            if taken.len() < ABSORB_LIMIT {
                break;
            }
        }
        Ok(total)
    }

    async fn claim<'a>(&'a self, claim: &'a Claim) -> Result<Vec<Run>> {
        let (pool, statements) = (&self.pool, &self.statements);
        let mut tx = relay_tx(pool).await?;
        let leased: Vec<LeasedCursor> = sqlx::query_as(&statements.claim_select)
            .bind(claim.aggregates as i64)
            .fetch_all(&mut *tx)
            .await?;
        if leased.is_empty() {
            tx.commit().await?;
            return Ok(Vec::new());
        }
        let mut lease = QueryBuilder::<MySql>::new(format!(
            "UPDATE `{}` FORCE INDEX (PRIMARY) SET leased_by = ",
            self.table.derived("cursors")
        ));
        lease
            .push_bind(claim.token)
            .push(", due_at = DATE_ADD(UTC_TIMESTAMP(6), INTERVAL ")
            .push_bind(delay_us(claim.lease))
            .push(" MICROSECOND), attempts = attempts + 1 WHERE aggregate_key IN (");
        let mut keys = lease.separated(", ");
        for cursor in &leased {
            keys.push_bind(&cursor.0);
        }
        lease.push(")");
        lease.build().execute(&mut *tx).await?;
        tx.commit().await?;

        let count = leased.len();
        let mut runs: Vec<Run> = leased
            .into_iter()
            .map(
                |(
                    _,
                    aggregate_type,
                    aggregate_id,
                    done_seq,
                    known_seq,
                    attempts,
                    parked_seq,
                    version,
                )| {
                    Run {
                        aggregate_type,
                        aggregate_id,
                        done_seq,
                        known_seq,
                        attempts: clamp_u32(i64::from(attempts) + 1),
                        parked_seq,
                        version,
                        complete: true,
                        events: Vec::new(),
                    }
                },
            )
            .collect();
        let mut read = QueryBuilder::<MySql>::new("");
        for (i, run) in runs.iter().enumerate() {
            if i > 0 {
                read.push(" UNION ALL ");
            }
            // The statement's `?`s in order: branch, key, after, up to, limit.
            let mut parts = statements.run.split('?');
            read.push(parts.next().unwrap_or_default());
            let limit = claim.run_limit(count, run.attempts);
            read.push_bind(i as i64)
                .push(parts.next().unwrap_or_default())
                .push_bind(aggregate_key(&run.aggregate_type, &run.aggregate_id))
                .push(parts.next().unwrap_or_default())
                .push_bind(run.done_seq)
                .push(parts.next().unwrap_or_default())
                .push_bind(run.limit_seq())
                .push(parts.next().unwrap_or_default())
                .push_bind(limit as i64)
                .push(parts.next().unwrap_or_default());
        }
        let rows = read.build().fetch_all(pool).await?;
        for row in &rows {
            let branch: i64 = row.try_get("branch")?;
            let run = &mut runs[usize::try_from(branch).unwrap_or(usize::MAX).min(count - 1)];
            run.events.push(RunEvent {
                envelope: envelope(row)?,
                due: row.try_get::<i64, _>("due")? != 0,
                available_at: row.try_get("available_at")?,
                last_error: row.try_get("last_error")?,
            });
        }
        for run in &mut runs {
            run.events.sort_by_key(|e| e.envelope.sequence);
            run.complete = run.events.len() < claim.run_limit(count, run.attempts);
        }
        Ok(runs)
    }

    async fn settle<'a>(&'a self, token: Uuid, settlements: &'a [Settlement]) -> Result<()> {
        if settlements.is_empty() {
            return Ok(());
        }
        let statements = &self.statements;
        let mut keyed: Vec<(Vec<u8>, &Settlement)> = settlements
            .iter()
            .map(|s| (aggregate_key(&s.aggregate_type, &s.aggregate_id), s))
            .collect();
        // Locks in key order: no deadlock with another statement that does the same.
        keyed.sort_by(|a, b| a.0.cmp(&b.0));
        let mut tx = relay_tx(&self.pool).await?;
        let mut held = QueryBuilder::<MySql>::new(format!(
            "SELECT aggregate_key FROM `{}` FORCE INDEX (PRIMARY) WHERE leased_by = ",
            self.table.derived("cursors")
        ));
        held.push_bind(token).push(" AND aggregate_key IN (");
        let mut keys = held.separated(", ");
        for (key, _) in &keyed {
            keys.push_bind(key);
        }
        held.push(") ORDER BY aggregate_key FOR UPDATE");
        let held: Vec<Vec<u8>> = held.build_query_scalar().fetch_all(&mut *tx).await?;
        let held: std::collections::HashSet<Vec<u8>> = held.into_iter().collect();
        // Event rows only of aggregates this claim still holds.
        let mut fates = Vec::new();
        let mut cursors = Vec::new();
        for (key, s) in keyed.iter().filter(|(key, _)| held.contains(key)) {
            for e in &s.events {
                fates.push(serde_json::json!([
                    uuid_hex(&e.id),
                    e.status.as_str(),
                    clamp_i32(e.attempts),
                    e.reason
                ]));
            }
            cursors.push(serde_json::json!([
                hex(key),
                s.version,
                s.done_seq,
                clamp_i32(s.attempts),
                delay_us(s.delay),
                s.not_before.map(|t| storable(t)
                    .naive_utc()
                    .format("%Y-%m-%d %H:%M:%S%.6f")
                    .to_string()),
                s.park_at,
                s.new_park
            ]));
        }
        if !fates.is_empty() {
            sqlx::query(&statements.settle_events)
                .bind(serde_json::Value::Array(fates).to_string())
                .execute(&mut *tx)
                .await?;
        }
        if !cursors.is_empty() {
            sqlx::query(&statements.settle_cursors)
                .bind(serde_json::Value::Array(cursors).to_string())
                .bind(token)
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;
        Ok(())
    }

    async fn purge_batch<'a>(&'a self, retention: &'a Retention) -> Result<u64> {
        let t = self.table.as_str();
        let keep = delay_us(retention.keep);
        let mut tx = relay_tx(&self.pool).await?;
        let ids: Vec<Uuid> = sqlx::query_scalar(&format!(
            r#"SELECT id FROM `{t}` WHERE status = 'delivered'
  AND delivered_at < DATE_SUB(UTC_TIMESTAMP(6), INTERVAL ? MICROSECOND)
ORDER BY delivered_at LIMIT ? FOR UPDATE SKIP LOCKED"#
        ))
        .bind(keep)
        .bind(retention.batch_size as i64)
        .fetch_all(&mut *tx)
        .await?;
        let mut done = 0;
        if !ids.is_empty() {
            let list = ids_json(&ids);
            if retention.archive {
                sqlx::query(&format!(
                    r#"INSERT INTO `{t}_archive` ({ROW}) SELECT o.* FROM {LISTED} STRAIGHT_JOIN `{t}` o FORCE INDEX (PRIMARY) ON o.id = UNHEX(j.id)"#
                ))
                .bind(&list)
                .execute(&mut *tx)
                .await?;
            }
            done = sqlx::query(&format!(
                r#"DELETE o FROM {LISTED} STRAIGHT_JOIN `{t}` o FORCE INDEX (PRIMARY) ON o.id = UNHEX(j.id)"#
            ))
            .bind(&list)
            .execute(&mut *tx)
            .await?
            .rows_affected();
        }
        tx.commit().await?;
        Ok(done)
    }

    async fn purge_keys<'a>(&'a self, retention: &'a Retention) -> Result<u64> {
        let t = self.table.as_str();
        let keep = delay_us(retention.keep);
        // Keys live as long as delivered rows do: never the key of an event that waits, is
        // parked or is dead. Locked with SKIP LOCKED and removed by primary key: a key that an
        // application is inserting, or has just found again (a retried request holds a shared
        // lock on it until it commits), is left for the next round, never waited for.
        let mut tx = relay_tx(&self.pool).await?;
        let keys: Vec<Vec<u8>> = sqlx::query_scalar(&format!(
            r#"SELECT k.`key` FROM `{t}_keys` k
WHERE k.created_at < DATE_SUB(UTC_TIMESTAMP(6), INTERVAL ? MICROSECOND)
  AND NOT EXISTS (SELECT 1 FROM `{t}` o WHERE o.id = k.event_id
                  AND (o.status <> 'delivered'
                       OR o.delivered_at >= DATE_SUB(UTC_TIMESTAMP(6), INTERVAL ? MICROSECOND)))
LIMIT ? FOR UPDATE SKIP LOCKED"#
        ))
        .bind(keep)
        .bind(keep)
        .bind(retention.batch_size as i64)
        .fetch_all(&mut *tx)
        .await?;
        let mut done = 0;
        if !keys.is_empty() {
            let keys: Vec<String> = keys.iter().map(|k| hex(k)).collect();
            done = sqlx::query(&format!(
                r#"DELETE k FROM JSON_TABLE(?, '$[*]' COLUMNS (k VARCHAR(1024) PATH '$')) j
STRAIGHT_JOIN `{t}_keys` k FORCE INDEX (PRIMARY) ON k.`key` = UNHEX(j.k)"#
            ))
            .bind(serde_json::to_string(&keys).expect("strings serialise"))
            .execute(&mut *tx)
            .await?
            .rows_affected();
        }
        tx.commit().await?;
        Ok(done)
    }

    // No `listen`: MySQL has no notifications, so the relay polls.
}

impl MySqlStore {
    /// Takes idempotency key `key` for event `id` in the caller's transaction, or finds the
    /// event that took it first.
    async fn take_key(&self, conn: &mut MySqlConnection, key: &str, id: Uuid) -> Result<Enqueued> {
        // A failed statement leaves MySQL's transaction open: a duplicate key is an answer, not
        // an error.
        let taken = sqlx::query(&self.statements.take_key)
            .bind(key)
            .bind(id)
            .execute(&mut *conn)
            .await;
        match taken {
            Ok(_) => Ok(Enqueued::New(id)),
            Err(sqlx::Error::Database(e))
                if e.kind() == sqlx::error::ErrorKind::UniqueViolation =>
            {
                let first: Option<Uuid> = sqlx::query_scalar(&self.statements.find_key)
                    .bind(key)
                    .fetch_optional(&mut *conn)
                    .await?;
                match first {
                    // Even with this message's own id: a retry of a committed message.
                    Some(first) => Ok(Enqueued::Duplicate(first)),
                    None => Err(Error::InvalidField {
                        field: format!("idempotency key {key:?}"),
                        reason: "it was removed (by retention) while being enqueued; try again",
                    }),
                }
            }
            Err(e) => Err(e.into()),
        }
    }

    /// The migration steps not applied yet, under the migration lock; `m` the version table.
    async fn migrate_locked(&self, conn: &mut MySqlConnection, m: &str) -> Result<()> {
        sqlx::query(&format!(
            r#"CREATE TABLE IF NOT EXISTS `{m}` (
    version BIGINT PRIMARY KEY, description TEXT NOT NULL, applied_at DATETIME(6) NOT NULL)"#
        ))
        .execute(&mut *conn)
        .await?;
        let applied: Option<i64> =
            sqlx::query_scalar(&format!(r#"SELECT max(version) FROM `{m}`"#))
                .fetch_one(&mut *conn)
                .await?;
        for (version, description, sql) in self.migration_sql() {
            if applied.is_some_and(|a| a >= version) {
                continue;
            }
            sqlx::Executor::execute(&mut *conn, sql.as_str()).await?;
            sqlx::query(&format!(
                r#"INSERT INTO `{m}` (version, description, applied_at) VALUES (?, ?, UTC_TIMESTAMP(6))"#
            ))
            .bind(version)
            .bind(description)
            .execute(&mut *conn)
            .await?;
            tracing::info!(version, description, "applied outbox migration");
        }
        Ok(())
    }
}

/// An event to write: the message, its delivery time as stored, its aggregate's key.
type NewEvent<'a> = (&'a Message, Option<DateTime<Utc>>, Vec<u8>);

/// A leased cursor: key, type, id, done, known, attempts before this claim, parked, version.
type LeasedCursor = (Vec<u8>, String, String, i64, i64, i32, Option<i64>, i64);

/// `ids` as a JSON array of hex strings, for `JSON_TABLE`.
fn ids_json(ids: &[Uuid]) -> String {
    serde_json::to_string(&ids.iter().map(uuid_hex).collect::<Vec<_>>()).expect("strings serialise")
}

impl Lookup for MySqlStore {
    async fn get(&self, id: Uuid) -> Result<Option<EventRecord>> {
        let Some(row) = sqlx::query(&self.statements.get)
            .bind(id)
            .fetch_optional(&self.pool)
            .await?
        else {
            return Ok(None);
        };
        record(&row).map(Some)
    }
}

/// An [`EventRecord`] from a row with `COLUMNS` and the record's own columns.
fn record(row: &MySqlRow) -> Result<EventRecord> {
    let status: String = row.try_get("status")?;
    let times = sql::RecordTimes {
        available_at: row.try_get("available_at")?,
        delivered_at: row.try_get("delivered_at")?,
        dead_at: row.try_get("dead_at")?,
        consumed_at: row.try_get("consumed_at")?,
    };
    let failures: Option<String> = row.try_get("failures")?;
    sql::record(
        envelope(row)?,
        &status,
        row.try_get("last_error")?,
        times,
        failures.as_deref(),
    )
}

fn envelope(row: &MySqlRow) -> Result<Envelope> {
    let id: Uuid = row.try_get("id")?;
    let headers: String = row.try_get("headers")?;
    Ok(Envelope {
        id,
        created_at: row.try_get("created_at")?,
        event_type: row.try_get("event_type")?,
        aggregate_type: row.try_get("aggregate_type")?,
        aggregate_id: row.try_get("aggregate_id")?,
        sequence: row.try_get("seq")?,
        schema_version: clamp_u32(row.try_get::<i32, _>("schema_version")?.into()),
        topic: row.try_get("topic")?,
        payload: row.try_get("payload")?,
        headers: parse_headers(&id, &headers),
        attempt: clamp_u32(row.try_get::<i32, _>("attempts")?.into()),
    })
}

/// Appends `filter`'s conditions (its group aside) on the event rows `o` to `query`.
fn push_filter(query: &mut QueryBuilder<'_, MySql>, filter: &EventFilter) {
    if let Some(ids) = &filter.ids {
        query.push(" AND o.id IN (");
        let mut list = query.separated(", ");
        for id in ids {
            list.push_bind(*id);
        }
        if ids.is_empty() {
            list.push("NULL");
        }
        query.push(")");
    }
    if let Some((aggregate_type, aggregate_id)) = &filter.aggregate {
        query
            .push(" AND o.aggregate_key = ")
            .push_bind(aggregate_key(aggregate_type, aggregate_id));
    }
    if let Some(event_type) = &filter.event_type {
        query
            .push(" AND CAST(o.event_type AS BINARY) = CAST(")
            .push_bind(event_type.clone())
            .push(" AS BINARY)");
    }
    if let Some(from) = filter.created_from {
        query
            .push(" AND o.created_at >= ")
            .push_bind(storable(from));
    }
    if let Some(until) = filter.created_until {
        query
            .push(" AND o.created_at < ")
            .push_bind(storable(until));
    }
}

/// Appends the dead-event conditions of `filter`, reason included.
fn push_dead_filter(query: &mut QueryBuilder<'_, MySql>, filter: &EventFilter) {
    query.push(" o.status = 'dead'");
    push_filter(query, filter);
    if let Some(reason) = filter.reason.as_deref().filter(|r| !r.is_empty()) {
        query
            // As bytes: in a collation "ss" would find "ß".
            .push(" AND LOCATE(CAST(LOWER(")
            .push_bind(reason.to_owned())
            .push(") AS BINARY), CAST(LOWER(COALESCE(o.last_error, '')) AS BINARY)) > 0");
    }
}

/// `LIMIT` for a count that may be `usize::MAX`.
fn limit_i64(limit: usize) -> i64 {
    i64::try_from(limit).unwrap_or(i64::MAX)
}

impl Inspect for MySqlStore {
    async fn status(&self, stuck_after: Duration, limit: usize) -> Result<OutboxStatus> {
        let t = self.table.as_str();
        // One snapshot, so the figures agree with each other.
        let mut conn = self.pool.acquire().await?;
        sqlx::query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
            .execute(&mut *conn)
            .await?;
        let mut tx = sqlx::Transaction::begin(conn, None).await?;
        let read_at: DateTime<Utc> = sqlx::query_scalar("SELECT UTC_TIMESTAMP(6)")
            .fetch_one(&mut *tx)
            .await?;
        let counts: Vec<(String, String, i64)> = sqlx::query_as(&format!(
            r#"SELECT status, min(event_type), count(*) FROM `{t}`
GROUP BY status, CAST(event_type AS BINARY) ORDER BY status, CAST(event_type AS BINARY)"#
        ))
        .fetch_all(&mut *tx)
        .await?;
        // Due now: a deferred event (`enqueue_at`) is not late before its time.
        let oldest: Option<DateTime<Utc>> = sqlx::query_scalar(&format!(
            r#"SELECT min(GREATEST(created_at, available_at)) FROM `{t}`
WHERE status = 'pending' AND available_at <= ?"#
        ))
        .bind(read_at)
        .fetch_one(&mut *tx)
        .await?;
        let mut status = OutboxStatus::new(read_at, sql::status_counts(counts)?, oldest);
        // As on PostgreSQL: `leased_by` is the claim's token, its first half the relay's.
        let (relays, leases, leased, retrying, parked): (i64, i64, i64, i64, i64) = sqlx::query_as(&format!(
            r#"SELECT count(DISTINCT CASE WHEN leased_by IS NOT NULL AND due_at > ? THEN LEFT(leased_by, 8) END),
       count(DISTINCT CASE WHEN leased_by IS NOT NULL AND due_at > ? THEN leased_by END),
       CAST(coalesce(sum(leased_by IS NOT NULL AND due_at > ?), 0) AS SIGNED),
       CAST(coalesce(sum(done_seq < known_seq AND attempts >
           IF(leased_by IS NOT NULL AND due_at > ?, 1, 0)), 0) AS SIGNED),
       CAST(coalesce(sum(parked_seq IS NOT NULL), 0) AS SIGNED)
FROM `{t}_cursors`"#
        ))
        .bind(read_at)
        .bind(read_at)
        .bind(read_at)
        .bind(read_at)
        .fetch_one(&mut *tx)
        .await?;
        status.relays_leasing = relays.max(0) as u64;
        status.leases = leases.max(0) as u64;
        status.aggregates_leased = leased.max(0) as u64;
        status.aggregates_retrying = retrying.max(0) as u64;
        status.aggregates_parked = parked.max(0) as u64;
        let stuck: Vec<sql::StuckRow> = sqlx::query_as(&format!(
            r#"SELECT p.aggregate_type, p.aggregate_id, p.pending, p.oldest,
       CAST(coalesce(c.attempts, 0) AS SIGNED), c.parked_seq, n.last_error
FROM (SELECT aggregate_key, min(aggregate_type) AS aggregate_type, min(aggregate_id) AS aggregate_id,
             count(*) AS pending, min(GREATEST(created_at, available_at)) AS oldest,
             min(seq) AS first_seq
      FROM `{t}` WHERE status = 'pending' AND available_at <= ?
      GROUP BY aggregate_key
      HAVING min(GREATEST(created_at, available_at)) < ?) p
LEFT JOIN `{t}_cursors` c ON c.aggregate_key = p.aggregate_key
LEFT JOIN `{t}` n ON n.aggregate_key = p.aggregate_key AND n.seq = p.first_seq AND n.status = 'pending'
ORDER BY p.oldest LIMIT ?"#
        ))
        .bind(read_at)
        .bind(sql::cutoff(read_at, stuck_after))
        .bind(limit_i64(limit))
        .fetch_all(&mut *tx)
        .await?;
        status.stuck = sql::stuck(stuck);
        tx.commit().await?;
        Ok(status)
    }

    async fn dead<'a>(&'a self, filter: &'a EventFilter, limit: usize) -> Result<Vec<EventRecord>> {
        let t = self.table.as_str();
        let mut query = QueryBuilder::<MySql>::new(format!(
            r#"SELECT {COLUMNS}, o.status, o.last_error, o.available_at, o.delivered_at, o.dead_at,
       o.consumed_at, o.failures
FROM `{t}` o WHERE"#
        ));
        push_dead_filter(&mut query, filter);
        query
            .push(" ORDER BY o.dead_at IS NULL, o.dead_at DESC, o.id LIMIT ")
            .push_bind(limit_i64(limit));
        let rows = query.build().fetch_all(&self.pool).await?;
        rows.iter().map(record).collect()
    }

    async fn dead_summaries<'a>(
        &'a self,
        filter: &'a EventFilter,
        limit: usize,
    ) -> Result<Vec<DeadEvent>> {
        let t = self.table.as_str();
        let mut query = QueryBuilder::<MySql>::new(format!(
            r#"SELECT o.id, o.event_type, o.aggregate_type, o.aggregate_id, o.seq, o.attempts,
       o.last_error, o.dead_at
FROM `{t}` o WHERE"#
        ));
        push_dead_filter(&mut query, filter);
        query
            .push(" ORDER BY o.dead_at IS NULL, o.dead_at DESC, o.id LIMIT ")
            .push_bind(limit_i64(limit));
        let rows = query.build().fetch_all(&self.pool).await?;
        rows.iter()
            .map(|row| {
                Ok(DeadEvent {
                    id: row.try_get("id")?,
                    event_type: row.try_get("event_type")?,
                    aggregate_type: row.try_get("aggregate_type")?,
                    aggregate_id: row.try_get("aggregate_id")?,
                    sequence: row.try_get("seq")?,
                    attempts: clamp_u32(row.try_get::<i32, _>("attempts")?.into()),
                    reason: row.try_get("last_error")?,
                    dead_at: row.try_get("dead_at")?,
                })
            })
            .collect()
    }

    async fn parked(&self, limit: usize) -> Result<Vec<ParkedAggregate>> {
        let t = self.table.as_str();
        let rows: Vec<sql::ParkedRow> = sqlx::query_as(&format!(
            r#"SELECT c.aggregate_type, c.aggregate_id, c.parked_seq, o.id, o.event_type, o.last_error,
       o.dead_at, GREATEST(c.known_seq - c.parked_seq, 0)
FROM `{t}_cursors` c
LEFT JOIN `{t}` o ON o.aggregate_key = c.aggregate_key AND o.seq = c.parked_seq AND o.status = 'dead'
WHERE c.parked_seq IS NOT NULL
ORDER BY o.dead_at IS NOT NULL, o.dead_at, c.aggregate_type, c.aggregate_id LIMIT ?"#
        ))
        .bind(limit_i64(limit))
        .fetch_all(&self.pool)
        .await?;
        Ok(sql::parked(rows))
    }

    async fn purgeable<'a>(&'a self, retention: &'a Retention) -> Result<u64> {
        let t = self.table.as_str();
        let n: i64 = sqlx::query_scalar(&format!(
            r#"SELECT count(*) FROM `{t}`
WHERE status = 'delivered' AND delivered_at < DATE_SUB(UTC_TIMESTAMP(6), INTERVAL ? MICROSECOND)"#
        ))
        .bind(delay_us(retention.keep))
        .fetch_one(&self.pool)
        .await?;
        Ok(n.max(0) as u64)
    }
}

impl MySqlStore {
    /// The aggregate key and sequence of dead event `id`, its row locked.
    async fn dead_event(
        &self,
        conn: &mut MySqlConnection,
        id: Uuid,
    ) -> Result<Option<(Vec<u8>, String, String, i64)>> {
        Ok(sqlx::query_as(&format!(
            r#"SELECT aggregate_key, aggregate_type, aggregate_id, seq FROM `{}`
WHERE id = ? AND status = 'dead' FOR UPDATE"#,
            self.table
        ))
        .bind(id)
        .fetch_optional(conn)
        .await?)
    }

    /// Releases the cursor parked at dead event `(key, seq)`; whether it was parked there. If a
    /// requeue moved the cursor back before it, it stays there (the earlier events first).
    async fn release(&self, conn: &mut MySqlConnection, key: &[u8], seq: i64) -> Result<bool> {
        // Left to right: `attempts` reads `done_seq` before it moves.
        let done = sqlx::query(&format!(
            r#"UPDATE `{}` SET
    attempts = IF(done_seq = ? - 1, 0, attempts),
    done_seq = IF(done_seq = ? - 1, ?, done_seq),
    due_at = IF(leased_by IS NULL, LEAST(due_at, UTC_TIMESTAMP(6)), due_at),
    parked_seq = NULL,
    version = version + 1
WHERE aggregate_key = ? AND parked_seq = ?"#,
            self.table.derived("cursors")
        ))
        .bind(seq)
        .bind(seq)
        .bind(seq)
        .bind(key)
        .bind(seq)
        .execute(conn)
        .await?;
        Ok(done.rows_affected() == 1)
    }

    async fn requeue_in(&self, conn: &mut MySqlConnection, id: Uuid) -> Result<bool> {
        let Some((key, aggregate_type, aggregate_id, seq)) = self.dead_event(conn, id).await?
        else {
            return Ok(false);
        };
        sqlx::query(&format!(
            r#"UPDATE `{}` SET status = 'pending', attempts = 0, available_at = UTC_TIMESTAMP(6),
    dead_at = NULL WHERE id = ?"#,
            self.table
        ))
        .bind(id)
        .execute(&mut *conn)
        .await?;
        // Back to just before the requeued event (never forward); a cursor leased right now
        // keeps its lease, and the relay that holds it sees the move when it settles.
        sqlx::query(&self.statements.cursor_back)
            .bind(&key)
            .bind(&aggregate_type)
            .bind(&aggregate_id)
            .bind(seq)
            .bind(seq - 1)
            .bind(seq)
            .execute(&mut *conn)
            .await?;
        Ok(true)
    }
}

impl ArchiveDead for MySqlStore {
    async fn archive_dead(&self, id: Uuid, dry_run: bool) -> Result<bool> {
        let t = self.table.as_str();
        let mut tx = relay_tx(&self.pool).await?;
        let Some((key, _, _, seq)) = self.dead_event(&mut tx, id).await? else {
            return Ok(false);
        };
        self.release(&mut tx, &key, seq).await?;
        // Only behind its aggregate's cursor: an event the relay would still come to must stay.
        let behind: Option<i64> = sqlx::query_scalar(&format!(
            r#"SELECT 1 FROM DUAL WHERE NOT EXISTS (
    SELECT 1 FROM `{t}_cursors` c WHERE c.aggregate_key = ?
      AND (c.done_seq < ? OR c.parked_seq = ?))"#
        ))
        .bind(&key)
        .bind(seq)
        .bind(seq)
        .fetch_optional(&mut *tx)
        .await?;
        let moved = behind.is_some();
        if moved {
            sqlx::query(&format!(
                r#"INSERT INTO `{t}_archive` ({ROW}) SELECT {ROW} FROM `{t}` WHERE id = ?"#
            ))
            .bind(id)
            .execute(&mut *tx)
            .await?;
            sqlx::query(&format!(r#"DELETE FROM `{t}` WHERE id = ?"#))
                .bind(id)
                .execute(&mut *tx)
                .await?;
        }
        // Not movable: the release is undone too, so a discard that did not happen changed
        // nothing.
        if moved && !dry_run {
            tx.commit().await?;
        } else {
            tx.rollback().await?;
        }
        Ok(moved)
    }
}

impl Requeue for MySqlStore {
    async fn requeue(&self, id: Uuid) -> Result<bool> {
        let mut tx = relay_tx(&self.pool).await?;
        let requeued = self.requeue_in(&mut tx, id).await?;
        tx.commit().await?;
        Ok(requeued)
    }

    async fn requeue_all<'a>(&'a self, ids: &'a [Uuid]) -> Result<u64> {
        // The cursor rows stay locked until the commit: a relay claims the aggregate after
        // every event is back, from the earliest.
        let mut tx = relay_tx(&self.pool).await?;
        let mut requeued = 0;
        for id in ids {
            requeued += u64::from(self.requeue_in(&mut tx, *id).await?);
        }
        tx.commit().await?;
        Ok(requeued)
    }
}

impl Discard for MySqlStore {
    async fn discard(&self, id: Uuid) -> Result<bool> {
        let mut tx = relay_tx(&self.pool).await?;
        let released = match self.dead_event(&mut tx, id).await? {
            Some((key, _, _, seq)) => self.release(&mut tx, &key, seq).await?,
            None => false,
        };
        tx.commit().await?;
        Ok(released)
    }
}

impl Republish for MySqlStore {
    async fn republish<'a>(&'a self, filter: &'a EventFilter, dry_run: bool) -> Result<u64> {
        let t = self.table.as_str();
        let republishable = |sql: String| {
            let mut query = QueryBuilder::<MySql>::new(sql);
            query.push(" WHERE o.status = 'delivered'");
            push_filter(&mut query, filter);
            query
        };
        if dry_run {
            let mut n = 0;
            for table in [t.to_owned(), format!("{t}_archive")] {
                let count: i64 = republishable(format!("SELECT count(*) FROM `{table}` o"))
                    .build_query_scalar()
                    .fetch_one(&self.pool)
                    .await?;
                n += count.max(0) as u64;
            }
            return Ok(n);
        }
        let mut tx = relay_tx(&self.pool).await?;
        let again = || {
            republishable(format!(
                "UPDATE `{t}` o SET o.status = 'pending', o.attempts = 0, \
                 o.available_at = UTC_TIMESTAMP(6), o.delivered_at = NULL, \
                 o.consumed_at = NULL, o.last_error = NULL"
            ))
        };
        // The table's rows first, all at once, before any cursor moves: locked from here on, so
        // a purge running meanwhile (SKIP LOCKED) cannot archive one of them half-way through.
        let mut n = again().build().execute(&mut *tx).await?.rows_affected();
        // Then the archived ones, back in the table and set pending in turn. Only what is back
        // leaves the archive: a row a purge archived after the copy stays there.
        let mut restore = republishable(format!(
            "INSERT INTO `{t}` ({ROW}) SELECT {ROW} FROM `{t}_archive` o"
        ));
        if restore.build().execute(&mut *tx).await?.rows_affected() > 0 {
            n += again().build().execute(&mut *tx).await?.rows_affected();
            let mut unarchive = republishable(format!("DELETE o FROM `{t}_archive` o"));
            unarchive.push(format!(" AND o.id IN (SELECT id FROM `{t}`)"));
            unarchive.build().execute(&mut *tx).await?;
        }
        // The bounds from what is now pending behind its cursor, this transaction's own
        // changes included: every row just set pending is there, whatever a relay delivered
        // since the statement above.
        let mut bounds = QueryBuilder::<MySql>::new(format!(
            "SELECT o.aggregate_key, min(o.aggregate_type), min(o.aggregate_id), min(o.seq), \
             max(o.seq) FROM `{t}` o LEFT JOIN `{t}_cursors` c ON c.aggregate_key = o.aggregate_key \
             WHERE o.status = 'pending' AND (c.aggregate_key IS NULL OR o.seq <= c.done_seq)"
        ));
        push_filter(&mut bounds, filter);
        bounds.push(" GROUP BY o.aggregate_key ORDER BY o.aggregate_key");
        let bounds: Vec<(Vec<u8>, String, String, i64, i64)> =
            bounds.build_query_as().fetch_all(&mut *tx).await?;
        // Each aggregate's cursor back to just before its earliest one: the relay delivers them
        // in `seq` order, skipping what is still delivered between them.
        for (key, aggregate_type, aggregate_id, first, last) in bounds {
            sqlx::query(&self.statements.cursor_back)
                .bind(&key)
                .bind(&aggregate_type)
                .bind(&aggregate_id)
                .bind(last)
                .bind(first - 1)
                // No park is released by a republish.
                .bind(Option::<i64>::None)
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;
        Ok(n)
    }
}

impl Check for MySqlStore {
    async fn check(&self) -> Result<Vec<Inconsistency>> {
        let t = self.table.as_str();
        // A pending event no relay will ever claim: beyond its cursor's known sequence, at or
        // below the point it has settled, or without a cursor, and no announcement on its way.
        let rows = sqlx::query_as(&format!(
            r#"SELECT min(o.aggregate_type), min(o.aggregate_id), count(*), min(o.seq),
       min(c.done_seq), min(c.known_seq)
FROM `{t}` o
LEFT JOIN `{t}_cursors` c ON c.aggregate_key = o.aggregate_key
WHERE o.status = 'pending'
  AND (c.aggregate_key IS NULL OR o.seq <= c.done_seq OR o.seq > c.known_seq)
  AND NOT EXISTS (SELECT 1 FROM `{t}_new` n WHERE n.aggregate_key = o.aggregate_key AND n.seq >= o.seq)
GROUP BY o.aggregate_key
ORDER BY 1, 2"#
        ))
        .fetch_all(&self.pool)
        .await?;
        Ok(sql::inconsistencies(rows))
    }
}

impl MarkConsumed for MySqlStore {
    async fn mark_consumed<'a>(&'a self, ids: &'a [Uuid]) -> Result<u64> {
        let done = sqlx::query(&self.statements.consumed)
            .bind(ids_json(ids))
            .execute(&self.pool)
            .await?;
        Ok(done.rows_affected())
    }
}

impl ExplainClaim for MySqlStore {
    async fn explain_claim(&self, limit: usize) -> Result<String> {
        let rows = sqlx::query(&format!("EXPLAIN {}", self.statements.claim_select))
            .bind(limit as i64)
            .fetch_all(&self.pool)
            .await?;
        let text = |row: &MySqlRow, column: &str| -> String {
            row.try_get::<Option<String>, _>(column)
                .ok()
                .flatten()
                .unwrap_or_default()
        };
        Ok(rows
            .iter()
            .map(|row| {
                format!(
                    "table={} type={} key={} rows={} extra={}",
                    text(row, "table"),
                    text(row, "type"),
                    text(row, "key"),
                    row.try_get::<Option<i64>, _>("rows")
                        .ok()
                        .flatten()
                        .map_or_else(|| text(row, "rows"), |n| n.to_string()),
                    text(row, "Extra"),
                )
            })
            .collect::<Vec<_>>()
            .join("\n"))
    }
}

/// Announcements absorbed per statement ...
const ABSORB_LIMIT: usize = 5000;
/// ... and statements per claim at most: writers that outpace the relay cannot keep it from
/// claiming.
const ABSORB_ROUNDS: usize = 20;

/// A consumer's inbox in MySQL or MariaDB.
#[derive(Debug)]
pub struct MySqlInbox {
    pool: MySqlPool,
    table: String,
    attempts_table: String,
    create: String,
    create_attempts: String,
    insert: String,
    count_attempt: String,
    uncount_attempt: String,
    forget_attempts: String,
}

impl MySqlInbox {
    fn new(pool: MySqlPool, table: TableName) -> Self {
        let t = table.as_str();
        let a = table.derived("attempts");
        Self {
            pool,
            table: t.to_owned(),
            attempts_table: a.clone(),
            create: format!(
                r#"CREATE TABLE IF NOT EXISTS `{t}` (
    consumer     VARBINARY(255) NOT NULL,
    message_id   BINARY(16) NOT NULL,
    processed_at DATETIME(6) NOT NULL,
    PRIMARY KEY (consumer, message_id)
) ENGINE = InnoDB"#
            ),
            create_attempts: format!(
                r#"CREATE TABLE IF NOT EXISTS `{a}` (
    consumer   VARBINARY(255) NOT NULL,
    message_id BINARY(16) NOT NULL,
    attempts   INT NOT NULL,
    updated_at DATETIME(6) NOT NULL,
    PRIMARY KEY (consumer, message_id)
) ENGINE = InnoDB"#
            ),
            insert: format!(
                r#"INSERT INTO `{t}` (consumer, message_id, processed_at) VALUES (?, ?, UTC_TIMESTAMP(6))"#
            ),
            count_attempt: format!(
                r#"INSERT INTO `{a}` (consumer, message_id, attempts, updated_at)
VALUES (?, ?, LAST_INSERT_ID(1), UTC_TIMESTAMP(6))
ON DUPLICATE KEY UPDATE attempts = LAST_INSERT_ID(attempts + 1), updated_at = UTC_TIMESTAMP(6)"#
            ),
            uncount_attempt: format!(
                r#"UPDATE `{a}` SET attempts = attempts - 1
WHERE consumer = ? AND message_id = ? AND attempts > 0"#
            ),
            forget_attempts: format!(r#"DELETE FROM `{a}` WHERE consumer = ? AND message_id = ?"#),
        }
    }
}

impl InboxStore for MySqlInbox {
    type Connection = MySqlConnection;

    async fn migrate(&self) -> Result<()> {
        sqlx::raw_sql(&self.create).execute(&self.pool).await?;
        sqlx::raw_sql(&self.create_attempts)
            .execute(&self.pool)
            .await?;
        // Tables made before consumer names were bytes (`VARCHAR .. utf8mb4_bin`, where
        // "billing" and "billing " were one consumer) are converted.
        for table in [&self.table, &self.attempts_table] {
            let kind: Option<String> = sqlx::query_scalar(
                "SELECT CAST(DATA_TYPE AS CHAR) FROM information_schema.columns
                 WHERE table_schema = DATABASE() AND table_name = ? AND column_name = 'consumer'",
            )
            .bind(table)
            .fetch_optional(&self.pool)
            .await?;
            if kind.is_some_and(|k| !k.eq_ignore_ascii_case("varbinary")) {
                sqlx::query(&format!(
                    "ALTER TABLE `{table}` MODIFY consumer VARBINARY(255) NOT NULL"
                ))
                .execute(&self.pool)
                .await?;
            }
        }
        Ok(())
    }

    fn max_consumer_name_bytes(&self) -> Option<usize> {
        Some(255)
    }

    async fn count_attempt<'a>(&'a self, consumer: &'a str, message_id: Uuid) -> Result<u32> {
        let attempts = sqlx::query(&self.count_attempt)
            .bind(consumer)
            .bind(message_id)
            .execute(&self.pool)
            .await?
            .last_insert_id();
        Ok(u32::try_from(attempts).unwrap_or(u32::MAX))
    }

    async fn uncount_attempt<'a>(&'a self, consumer: &'a str, message_id: Uuid) -> Result<()> {
        sqlx::query(&self.uncount_attempt)
            .bind(consumer)
            .bind(message_id)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    async fn forget_attempts<'a>(&'a self, consumer: &'a str, message_id: Uuid) -> Result<()> {
        sqlx::query(&self.forget_attempts)
            .bind(consumer)
            .bind(message_id)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    async fn record<'a>(
        &'a self,
        conn: &'a mut MySqlConnection,
        consumer: &'a str,
        message_id: Uuid,
    ) -> Result<bool> {
        // A failed statement leaves MySQL's transaction open: seen before is an answer.
        match sqlx::query(&self.insert)
            .bind(consumer)
            .bind(message_id)
            .execute(conn)
            .await
        {
            Ok(_) => Ok(true),
            Err(sqlx::Error::Database(e))
                if e.kind() == sqlx::error::ErrorKind::UniqueViolation =>
            {
                Ok(false)
            }
            Err(e) => Err(e.into()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aggregate_keys_do_not_collide_across_the_type_boundary() {
        assert_ne!(aggregate_key("ab", "c"), aggregate_key("a", "bc"));
        assert_eq!(aggregate_key("a", "b"), aggregate_key("a", "b"));
        assert_eq!(aggregate_key("a", "b").len(), 32);
    }

    #[test]
    fn the_run_statement_has_five_parameters() {
        let statements = MyStatements::new(&TableName::default());
        assert_eq!(statements.run.matches('?').count(), 5);
    }
}
