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
use sqlx::sqlite::SqliteRow;
use sqlx::{Row, Sqlite, SqlitePool};
use std::time::Duration;
use uuid::Uuid;

// SQLite keeps times as integer milliseconds since the Unix epoch (the application's clock is
// the database's clock), ids as hyphenated text.

#[derive(Debug)]
struct SqliteStatements {
    next_seq: String,
    insert: String,
    announce: String,
    lease: String,
    run: String,
    settle_cursor: String,
    settle_event: String,
    requeue_event: String,
    requeue_cursor: String,
    discard: String,
    purge_select: String,
    purge_archive: String,
    purge_delete: String,
    purge_keys: String,
    take_key: String,
    find_key: String,
    get: String,
    republish_count: String,
    republish_restore: String,
    republish_unarchive: String,
    republish_events: String,
    republish_cursor: String,
    consumed: String,
    check: String,
}

/// The delivered events an `EventFilter` selects; see `republish_count`.
const REPUBLISHABLE: &str = "status = 'delivered'
    AND (?1 IS NULL OR id IN (SELECT value FROM json_each(?1)))
    AND (?2 IS NULL OR (aggregate_type = ?2 AND aggregate_id = ?3))
    AND (?4 IS NULL OR event_type = ?4)
    AND (?5 IS NULL OR created_at >= ?5)
    AND (?6 IS NULL OR created_at < ?6)";

const COLUMNS: &str = "id, created_at, aggregate_type, aggregate_id, seq, event_type, \
     schema_version, topic, payload, headers, attempts";

impl SqliteStatements {
    fn new(table: &TableName) -> Self {
        let t = table.as_str();
        Self {
            // The counter row is written first: SQLite holds the database write lock until
            // commit, so sequence order is commit order and a rollback leaves no gap.
            next_seq: format!(
                r#"INSERT INTO "{t}_aggregates" (aggregate_type, aggregate_id, last_seq)
VALUES (?1, ?2, 1)
ON CONFLICT (aggregate_type, aggregate_id) DO UPDATE SET last_seq = last_seq + 1
RETURNING last_seq"#
            ),
            insert: format!(
                r#"INSERT INTO "{t}" (id, created_at, aggregate_type, aggregate_id, seq, event_type,
    schema_version, topic, payload, headers, available_at)
VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)"#
            ),
            // SQLite has one writer at a time: the enqueue can move the relay's cursor itself,
            // where PostgreSQL writers announce through `<table>_new` to never share a row lock.
            announce: format!(
                r#"INSERT INTO "{t}_cursors" (aggregate_type, aggregate_id, known_seq, due_at)
VALUES (?1, ?2, ?3, ?4)
ON CONFLICT (aggregate_type, aggregate_id) DO UPDATE SET known_seq = max(known_seq, excluded.known_seq)"#
            ),
            // One UPDATE statement is atomic under SQLite's write lock, so relays sharing the
            // file never lease the same aggregate.
            lease: format!(
                r#"UPDATE "{t}_cursors" SET leased_by = ?3, due_at = ?1 + ?2, attempts = attempts + 1
WHERE rowid IN (
    SELECT rowid FROM "{t}_cursors" WHERE done_seq < known_seq AND due_at <= ?1
    ORDER BY due_at LIMIT ?4)
RETURNING aggregate_type, aggregate_id, done_seq, known_seq, attempts, parked_seq, version"#
            ),
            run: format!(
                r#"SELECT {COLUMNS}, available_at, available_at <= ?5 AS due, last_error FROM "{t}"
WHERE aggregate_type = ?1 AND aggregate_id = ?2 AND status = 'pending' AND seq > ?3
  AND seq <= min(?4, coalesce(?7 - 1, ?4))
ORDER BY seq LIMIT ?6"#
            ),
            // As on PostgreSQL: only a cursor still leased to this relay moves, and one that a
            // requeue moved back keeps that position and is due at once.
            settle_cursor: format!(
                r#"UPDATE "{t}_cursors" SET
    done_seq = CASE WHEN version = ?3 THEN ?4 ELSE done_seq END,
    attempts = CASE WHEN version = ?3 THEN ?5 ELSE 0 END,
    due_at = CASE WHEN version <> ?3 THEN ?6
                  WHEN ?4 >= ?10 - 1 THEN 9223372036854775807
                  ELSE max(?6 + ?7, coalesce(?8, 0)) END,
    parked_seq = CASE WHEN version = ?3 THEN ?10 ELSE coalesce(?11, parked_seq) END,
    leased_by = NULL
WHERE aggregate_type = ?1 AND aggregate_id = ?2 AND leased_by = ?9"#
            ),
            settle_event: format!(
                r#"UPDATE "{t}" SET status = ?2, attempts = ?3,
    last_error = CASE WHEN ?2 = 'delivered' THEN NULL ELSE coalesce(?4, last_error) END,
    -- The last ten failed attempts, for the operator (`dead show`).
    failures = CASE WHEN ?4 IS NULL OR ?2 = 'delivered' THEN failures ELSE (
        SELECT CASE WHEN json_array_length(a) > 10 THEN json_remove(a, '$[0]') ELSE a END
        FROM (SELECT json_insert(coalesce(failures, '[]'), '$[#]', json_object(
            'attempt', ?3, 'at', strftime('%Y-%m-%dT%H:%M:%fZ', ?5 / 1000.0, 'unixepoch'),
            'dead', json(CASE WHEN ?2 = 'dead' THEN 'true' ELSE 'false' END), 'reason', ?4)) AS a)) END,
    delivered_at = CASE WHEN ?2 = 'delivered' THEN ?5 END,
    dead_at = CASE WHEN ?2 = 'dead' THEN ?5 END
WHERE id = ?1 AND status = 'pending'"#
            ),
            requeue_event: format!(
                r#"UPDATE "{t}" SET status = 'pending', attempts = 0, available_at = ?2, dead_at = NULL
WHERE id = ?1 AND status = 'dead'
RETURNING aggregate_type, aggregate_id, seq"#
            ),
            requeue_cursor: format!(
                r#"INSERT INTO "{t}_cursors" (aggregate_type, aggregate_id, known_seq, done_seq, due_at)
VALUES (?1, ?2, ?3, ?3 - 1, ?4)
ON CONFLICT (aggregate_type, aggregate_id) DO UPDATE SET
    known_seq = max(known_seq, excluded.known_seq),
    done_seq = min(done_seq, excluded.done_seq),
    attempts = CASE WHEN excluded.done_seq <= done_seq THEN 0 ELSE attempts END,
    due_at = CASE WHEN excluded.done_seq <= done_seq AND leased_by IS NULL
                  THEN min(due_at, excluded.due_at) ELSE due_at END,
    parked_seq = CASE WHEN parked_seq = excluded.known_seq THEN NULL ELSE parked_seq END,
    version = version + 1"#
            ),
            discard: format!(
                r#"UPDATE "{t}_cursors" SET
    done_seq = CASE WHEN done_seq = e.seq - 1 THEN e.seq ELSE done_seq END,
    attempts = CASE WHEN done_seq = e.seq - 1 THEN 0 ELSE attempts END,
    due_at = CASE WHEN leased_by IS NULL THEN min(due_at, ?2) ELSE due_at END,
    parked_seq = NULL,
    version = version + 1
FROM (SELECT aggregate_type, aggregate_id, seq FROM "{t}" WHERE id = ?1 AND status = 'dead') AS e
WHERE "{t}_cursors".aggregate_type = e.aggregate_type
  AND "{t}_cursors".aggregate_id = e.aggregate_id
  AND "{t}_cursors".parked_seq = e.seq"#
            ),
            purge_select: format!(
                r#"SELECT id FROM "{t}" WHERE status = 'delivered' AND delivered_at < ?1
ORDER BY delivered_at LIMIT ?2"#
            ),
            purge_archive: format!(
                r#"INSERT INTO "{t}_archive" SELECT * FROM "{t}" WHERE id IN (SELECT value FROM json_each(?1))"#
            ),
            purge_delete: format!(
                r#"DELETE FROM "{t}" WHERE id IN (SELECT value FROM json_each(?1))"#
            ),
            // Keys live as long as delivered rows do.
            // As on PostgreSQL: never the key of an event that waits, is parked or is dead.
            purge_keys: format!(
                r#"DELETE FROM "{t}_keys" WHERE rowid IN (
    SELECT k.rowid FROM "{t}_keys" k
    WHERE k.created_at < ?1
      AND NOT EXISTS (SELECT 1 FROM "{t}" o WHERE o.id = k.event_id
                      AND (o.status <> 'delivered' OR o.delivered_at >= ?1))
    LIMIT ?2)"#
            ),
            // One writer at a time: the key is either taken now (a row returned) or there.
            take_key: format!(
                r#"INSERT INTO "{t}_keys" (key, event_id, created_at) VALUES (?1, ?2, ?3)
ON CONFLICT (key) DO NOTHING
RETURNING event_id"#
            ),
            find_key: format!(r#"SELECT event_id FROM "{t}_keys" WHERE key = ?1"#),
            // As on PostgreSQL; ?1 ids (a JSON array), ?2/?3 aggregate, ?4 event type, ?5/?6
            // creation time range (ms), ?7 now.
            republish_count: format!(
                r#"SELECT (SELECT count(*) FROM "{t}" WHERE {REPUBLISHABLE})
     + (SELECT count(*) FROM "{t}_archive" WHERE {REPUBLISHABLE})"#
            ),
            republish_restore: format!(
                r#"INSERT INTO "{t}" SELECT * FROM "{t}_archive" WHERE {REPUBLISHABLE}"#
            ),
            republish_unarchive: format!(r#"DELETE FROM "{t}_archive" WHERE {REPUBLISHABLE}"#),
            republish_events: format!(
                r#"UPDATE "{t}" SET status = 'pending', attempts = 0, available_at = ?7,
    delivered_at = NULL, consumed_at = NULL, last_error = NULL
WHERE {REPUBLISHABLE}
RETURNING aggregate_type, aggregate_id, seq"#
            ),
            republish_cursor: format!(
                r#"INSERT INTO "{t}_cursors" (aggregate_type, aggregate_id, known_seq, done_seq, due_at)
VALUES (?1, ?2, ?3, ?4, ?5)
ON CONFLICT (aggregate_type, aggregate_id) DO UPDATE SET
    known_seq = max(known_seq, excluded.known_seq),
    done_seq = min(done_seq, excluded.done_seq),
    attempts = CASE WHEN excluded.done_seq < done_seq THEN 0 ELSE attempts END,
    due_at = CASE WHEN leased_by IS NULL THEN min(due_at, excluded.due_at) ELSE due_at END,
    version = version + 1"#
            ),
            get: format!(
                r#"SELECT {COLUMNS}, status, last_error, available_at, delivered_at, dead_at, consumed_at, failures
FROM "{t}" WHERE id = ?1"#
            ),
            consumed: format!(
                r#"UPDATE "{t}" SET consumed_at = ?1
WHERE consumed_at IS NULL AND id IN (SELECT value FROM json_each(?2))"#
            ),
            check: sql::check(t, ""),
        }
    }
}

impl Backend for Sqlite {
    type Store = SqliteStore;
    type Inbox = SqliteInbox;

    /// SQLite has no notifications: `options.notify` changes nothing, relays poll.
    fn open_store(pool: SqlitePool, table: TableName, _options: StoreOptions) -> SqliteStore {
        SqliteStore {
            statements: SqliteStatements::new(&table),
            pool,
            table,
        }
    }

    fn open_inbox(pool: SqlitePool, table: TableName) -> SqliteInbox {
        SqliteInbox::new(pool, table)
    }
}

/// An outbox table in SQLite: the [`Store`] of [`Outbox<Sqlite>`](super::Outbox).
#[derive(Debug)]
pub struct SqliteStore {
    pool: SqlitePool,
    table: TableName,
    statements: SqliteStatements,
}

impl Store for SqliteStore {
    type Connection = sqlx::SqliteConnection;

    fn migration_sql(&self) -> Vec<(i64, &'static str, String)> {
        let t = self.table.as_str();
        vec![
            (
                1,
                "outbox table, aggregate sequence counters, archive",
                format!(
                    r#"CREATE TABLE IF NOT EXISTS "{t}" (
    id             TEXT PRIMARY KEY NOT NULL,
    created_at     INTEGER NOT NULL,
    aggregate_type TEXT NOT NULL,
    aggregate_id   TEXT NOT NULL,
    seq            INTEGER NOT NULL,
    head           INTEGER NOT NULL DEFAULT 0,
    event_type     TEXT NOT NULL,
    schema_version INTEGER NOT NULL,
    topic          TEXT NOT NULL,
    payload        TEXT NOT NULL,
    headers        TEXT NOT NULL DEFAULT '{{}}',
    status         TEXT NOT NULL DEFAULT 'pending' CHECK (status IN ('pending', 'delivered', 'dead')),
    attempts       INTEGER NOT NULL DEFAULT 0,
    available_at   INTEGER NOT NULL,
    locked_until   INTEGER,
    locked_by      TEXT,
    last_error     TEXT,
    delivered_at   INTEGER,
    dead_at        INTEGER,
    consumed_at    INTEGER
);
CREATE INDEX IF NOT EXISTS "{t}_heads" ON "{t}" (available_at) WHERE status = 'pending' AND head;
CREATE INDEX IF NOT EXISTS "{t}_pending_aggregate" ON "{t}" (aggregate_type, aggregate_id, seq) WHERE status = 'pending';
CREATE INDEX IF NOT EXISTS "{t}_delivered_at" ON "{t}" (delivered_at) WHERE status = 'delivered';
CREATE INDEX IF NOT EXISTS "{t}_dead_at" ON "{t}" (dead_at) WHERE status = 'dead';
CREATE TABLE IF NOT EXISTS "{t}_aggregates" (
    aggregate_type TEXT NOT NULL,
    aggregate_id   TEXT NOT NULL,
    last_seq       INTEGER NOT NULL,
    pending        INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (aggregate_type, aggregate_id)
);
CREATE TABLE IF NOT EXISTS "{t}_archive" AS SELECT * FROM "{t}" WHERE 0;"#
                ),
            ),
            (
                2,
                "relay cursors per aggregate",
                format!(
                    r#"CREATE TABLE IF NOT EXISTS "{t}_cursors" (
    aggregate_type TEXT NOT NULL,
    aggregate_id   TEXT NOT NULL,
    known_seq      INTEGER NOT NULL DEFAULT 0,
    done_seq       INTEGER NOT NULL DEFAULT 0,
    attempts       INTEGER NOT NULL DEFAULT 0,
    due_at         INTEGER NOT NULL DEFAULT 0,
    leased_by      TEXT,
    parked_seq     INTEGER,
    version        INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (aggregate_type, aggregate_id)
);
CREATE INDEX IF NOT EXISTS "{t}_cursors_due" ON "{t}_cursors" (due_at) WHERE done_seq < known_seq;
INSERT INTO "{t}_cursors" (aggregate_type, aggregate_id, known_seq, done_seq)
SELECT a.aggregate_type, a.aggregate_id, a.last_seq, p.first_seq - 1
FROM "{t}_aggregates" a
JOIN (SELECT aggregate_type, aggregate_id, min(seq) AS first_seq FROM "{t}"
      WHERE status = 'pending' GROUP BY aggregate_type, aggregate_id) p
  ON p.aggregate_type = a.aggregate_type AND p.aggregate_id = a.aggregate_id
WHERE true
ON CONFLICT DO NOTHING;
ALTER TABLE "{t}_aggregates" DROP COLUMN pending;
DROP INDEX IF EXISTS "{t}_heads";
ALTER TABLE "{t}" DROP COLUMN head;
ALTER TABLE "{t}" DROP COLUMN locked_until;
ALTER TABLE "{t}" DROP COLUMN locked_by;
ALTER TABLE "{t}" ADD COLUMN content_type TEXT NOT NULL DEFAULT 'application/json';
ALTER TABLE "{t}_archive" DROP COLUMN head;
ALTER TABLE "{t}_archive" DROP COLUMN locked_until;
ALTER TABLE "{t}_archive" DROP COLUMN locked_by;
ALTER TABLE "{t}_archive" ADD COLUMN content_type TEXT NOT NULL DEFAULT 'application/json';"#
                ),
            ),
            (
                3,
                "idempotency keys",
                format!(
                    r#"CREATE TABLE IF NOT EXISTS "{t}_keys" (
    key        TEXT PRIMARY KEY NOT NULL,
    event_id   TEXT NOT NULL,
    created_at INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS "{t}_keys_created_at" ON "{t}_keys" (created_at);"#
                ),
            ),
            (
                5,
                "the reasons of an event's last failed attempts",
                format!(
                    r#"ALTER TABLE "{t}" ADD COLUMN failures TEXT;
ALTER TABLE "{t}_archive" ADD COLUMN failures TEXT;"#
                ),
            ),
        ]
    }

    async fn migrate(&self) -> Result<()> {
        let (pool, table) = (&self.pool, &self.table);
        // Readers then never block the writer nor the writer the readers; the setting is kept
        // in the database file. An in-memory database answers "memory" and stays as it is.
        sqlx::query("PRAGMA journal_mode = WAL")
            .execute(pool)
            .await?;
        let mut tx = pool.begin_with("BEGIN IMMEDIATE").await?;
        let m = table.derived("migrations");
        // The first write takes SQLite's database lock, serialising concurrent migrators.
        sqlx::query(&format!(
            r#"CREATE TABLE IF NOT EXISTS "{m}" (
    version INTEGER PRIMARY KEY, description TEXT NOT NULL, applied_at INTEGER NOT NULL)"#
        ))
        .execute(&mut *tx)
        .await?;
        let applied: Option<i64> =
            sqlx::query_scalar(&format!(r#"SELECT max(version) FROM "{m}""#))
                .fetch_one(&mut *tx)
                .await?;
        for (version, description, sql) in self.migration_sql() {
            if applied.is_some_and(|a| a >= version) {
                continue;
            }
            sqlx::Executor::execute(&mut *tx, sql.as_str()).await?;
            sqlx::query(&format!(
                r#"INSERT INTO "{m}" (version, description, applied_at) VALUES (?1, ?2, ?3)"#
            ))
            .bind(version)
            .bind(description)
            .bind(now_ms())
            .execute(&mut *tx)
            .await?;
            tracing::info!(version, description, "applied outbox migration");
        }
        tx.commit().await?;
        Ok(())
    }

    async fn insert<'a>(
        &'a self,
        conn: &'a mut sqlx::SqliteConnection,
        messages: &'a [Message],
    ) -> Result<Vec<Enqueued>> {
        let statements = &self.statements;
        let now = now_ms();
        let mut outcomes = Vec::with_capacity(messages.len());
        for m in messages {
            if let Some(key) = m.idempotency_key() {
                let taken: Option<String> = sqlx::query_scalar(&statements.take_key)
                    .bind(key)
                    .bind(m.id.to_string())
                    .bind(now)
                    .fetch_optional(&mut *conn)
                    .await?;
                if taken.is_none() {
                    // Found: even with this message's own id, a retry of a committed message.
                    let raw: String = sqlx::query_scalar(&statements.find_key)
                        .bind(key)
                        .fetch_one(&mut *conn)
                        .await?;
                    let first = Uuid::parse_str(&raw).map_err(|e| Error::CorruptRow {
                        id: raw.clone(),
                        reason: format!("idempotency key {key:?} names no UUID: {e}"),
                    })?;
                    outcomes.push(Enqueued::Duplicate(first));
                    continue;
                }
            }
            outcomes.push(Enqueued::New(m.id));
            let seq: i64 = sqlx::query_scalar(&statements.next_seq)
                .bind(m.aggregate_type)
                .bind(&m.aggregate_id)
                .fetch_one(&mut *conn)
                .await?;
            let available_at = match m.options.available_at {
                None => now,
                Some(Deliver::At(at)) => at.timestamp_millis(),
                Some(Deliver::After(d)) => now.saturating_add(duration_ms(d)),
            };
            sqlx::query(&statements.insert)
                .bind(m.id.to_string())
                .bind(now)
                .bind(m.aggregate_type)
                .bind(&m.aggregate_id)
                .bind(seq)
                .bind(m.event_type)
                .bind(i64::from(m.schema_version))
                .bind(m.topic)
                .bind(&m.payload)
                .bind(m.headers_json())
                .bind(available_at)
                .execute(&mut *conn)
                .await?;
            sqlx::query(&statements.announce)
                .bind(m.aggregate_type)
                .bind(&m.aggregate_id)
                .bind(seq)
                .bind(now)
                .execute(&mut *conn)
                .await?;
        }
        Ok(outcomes)
    }

    async fn claim<'a>(&'a self, claim: &'a Claim) -> Result<Vec<Run>> {
        let (pool, statements) = (&self.pool, &self.statements);
        let now = now_ms();
        let leased: Vec<LeasedCursor> = sqlx::query_as(&statements.lease)
            .bind(now)
            .bind(duration_ms(claim.lease))
            .bind(claim.token.to_string())
            .bind(claim.aggregates as i64)
            .fetch_all(pool)
            .await?;
        let mut runs = Vec::with_capacity(leased.len());
        let count = leased.len();
        for (aggregate_type, aggregate_id, done_seq, known_seq, attempts, parked_seq, version) in
            leased
        {
            let attempts = clamp_u32(attempts);
            let limit = claim.run_limit(count, attempts);
            let rows = sqlx::query(&statements.run)
                .bind(&aggregate_type)
                .bind(&aggregate_id)
                .bind(done_seq)
                .bind(known_seq)
                .bind(now)
                .bind(limit as i64)
                .bind(parked_seq)
                .fetch_all(pool)
                .await?;
            let events = rows
                .iter()
                .map(|row| {
                    Ok(RunEvent {
                        envelope: envelope(row)?,
                        due: row.try_get("due")?,
                        available_at: DateTime::from_timestamp_millis(row.try_get("available_at")?)
                            .unwrap_or_default(),
                        last_error: row.try_get("last_error")?,
                    })
                })
                .collect::<Result<Vec<_>>>()?;
            runs.push(Run {
                aggregate_type,
                aggregate_id,
                done_seq,
                known_seq,
                attempts,
                parked_seq,
                version,
                complete: events.len() < limit,
                events,
            });
        }
        Ok(runs)
    }

    async fn settle<'a>(&'a self, token: Uuid, settlements: &'a [Settlement]) -> Result<()> {
        let (pool, statements) = (&self.pool, &self.statements);
        let now = now_ms();
        let token = token.to_string();
        // IMMEDIATE: take the write lock up front (waiting for it within the busy timeout) rather
        // than fail on upgrading a read transaction.
        let mut tx = pool.begin_with("BEGIN IMMEDIATE").await?;
        for s in settlements {
            let held = sqlx::query(&statements.settle_cursor)
                .bind(&s.aggregate_type)
                .bind(&s.aggregate_id)
                .bind(s.version)
                .bind(s.done_seq)
                .bind(clamp_i32(s.attempts))
                .bind(now)
                .bind(duration_ms(s.delay))
                .bind(s.not_before.map(|t| t.timestamp_millis()))
                .bind(&token)
                .bind(s.park_at)
                .bind(s.new_park)
                .execute(&mut *tx)
                .await?;
            if held.rows_affected() == 0 {
                continue;
            }
            for e in &s.events {
                sqlx::query(&statements.settle_event)
                    .bind(e.id.to_string())
                    .bind(e.status.as_str())
                    .bind(clamp_i32(e.attempts))
                    .bind(e.reason.as_deref())
                    .bind(now)
                    .execute(&mut *tx)
                    .await?;
            }
        }
        tx.commit().await?;
        Ok(())
    }

    async fn purge_batch<'a>(&'a self, retention: &'a Retention) -> Result<u64> {
        let (pool, statements) = (&self.pool, &self.statements);
        let mut tx = pool.begin_with("BEGIN IMMEDIATE").await?;
        let ids: Vec<String> = sqlx::query_scalar(&statements.purge_select)
            .bind(now_ms().saturating_sub(duration_ms(retention.keep)))
            .bind(retention.batch_size as i64)
            .fetch_all(&mut *tx)
            .await?;
        if ids.is_empty() {
            tx.commit().await?;
            return Ok(0);
        }
        let ids = serde_json::to_string(&ids).expect("strings serialise");
        if retention.archive {
            sqlx::query(&statements.purge_archive)
                .bind(&ids)
                .execute(&mut *tx)
                .await?;
        }
        let done = sqlx::query(&statements.purge_delete)
            .bind(&ids)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(done.rows_affected())
    }

    async fn purge_keys<'a>(&'a self, retention: &'a Retention) -> Result<u64> {
        let done = sqlx::query(&self.statements.purge_keys)
            .bind(now_ms().saturating_sub(duration_ms(retention.keep)))
            .bind(retention.batch_size as i64)
            .execute(&self.pool)
            .await?;
        Ok(done.rows_affected())
    }

    // No `listen`: SQLite has no notifications, so the relay polls.
}

impl Lookup for SqliteStore {
    async fn get(&self, id: Uuid) -> Result<Option<EventRecord>> {
        let (pool, statements) = (&self.pool, &self.statements);
        let Some(row) = sqlx::query(&statements.get)
            .bind(id.to_string())
            .fetch_optional(pool)
            .await?
        else {
            return Ok(None);
        };
        record(&row).map(Some)
    }
}

/// An [`EventRecord`] from a row with `COLUMNS` and the record's own columns.
fn record(row: &SqliteRow) -> Result<EventRecord> {
    let status: String = row.try_get("status")?;
    let time = |column: &str| -> Result<Option<DateTime<Utc>>> {
        Ok(row
            .try_get::<Option<i64>, _>(column)?
            .and_then(DateTime::from_timestamp_millis))
    };
    let times = sql::RecordTimes {
        available_at: time("available_at")?.unwrap_or_default(),
        delivered_at: time("delivered_at")?,
        dead_at: time("dead_at")?,
        consumed_at: time("consumed_at")?,
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

/// The dead events an `EventFilter` selects (its group aside); see `Inspect::dead`.
const DEAD: &str = "status = 'dead'
    AND (?1 IS NULL OR id IN (SELECT value FROM json_each(?1)))
    AND (?2 IS NULL OR (aggregate_type = ?2 AND aggregate_id = ?3))
    AND (?4 IS NULL OR event_type = ?4)
    AND (?5 IS NULL OR created_at >= ?5)
    AND (?6 IS NULL OR created_at < ?6)
    AND (?7 IS NULL OR instr(lower(coalesce(last_error, '')), lower(?7)) > 0)";

fn time_ms(ms: i64) -> DateTime<Utc> {
    DateTime::from_timestamp_millis(ms).unwrap_or_default()
}

impl Inspect for SqliteStore {
    async fn status(&self, stuck_after: Duration, limit: usize) -> Result<OutboxStatus> {
        let t = self.table.as_str();
        let now = now_ms();
        // One read transaction, so the figures agree with each other.
        let mut tx = self.pool.begin().await?;
        let counts: Vec<(String, String, i64)> = sqlx::query_as(&format!(
            r#"SELECT status, event_type, count(*) FROM "{t}" GROUP BY status, event_type ORDER BY status, event_type"#
        ))
        .fetch_all(&mut *tx)
        .await?;
        // Due now: a deferred event (`enqueue_at`) is not late before its time.
        let oldest: Option<i64> = sqlx::query_scalar(&format!(
            r#"SELECT min(max(created_at, available_at)) FROM "{t}"
WHERE status = 'pending' AND available_at <= ?1"#
        ))
        .bind(now)
        .fetch_one(&mut *tx)
        .await?;
        let mut status = OutboxStatus::new(
            time_ms(now),
            sql::status_counts(counts)?,
            oldest.map(time_ms),
        );
        // As on PostgreSQL: a leased aggregate is retrying from its second attempt on;
        // `leased_by` is one batch in flight.
        let (relays, leases, leased, retrying, parked): (i64, i64, i64, i64, i64) =
            sqlx::query_as(&format!(
                r#"SELECT count(DISTINCT CASE WHEN due_at > ?1 THEN substr(leased_by, 1, 18) END),
       count(DISTINCT CASE WHEN due_at > ?1 THEN leased_by END),
       coalesce(sum(leased_by IS NOT NULL AND due_at > ?1), 0),
       coalesce(sum(done_seq < known_seq AND attempts >
           CASE WHEN leased_by IS NOT NULL AND due_at > ?1 THEN 1 ELSE 0 END), 0),
       coalesce(sum(parked_seq IS NOT NULL), 0)
FROM "{t}_cursors""#
            ))
            .bind(now)
            .fetch_one(&mut *tx)
            .await?;
        status.relays_leasing = relays.max(0) as u64;
        status.leases = leases.max(0) as u64;
        status.aggregates_leased = leased.max(0) as u64;
        status.aggregates_retrying = retrying.max(0) as u64;
        status.aggregates_parked = parked.max(0) as u64;
        type Row = (String, String, i64, i64, i64, Option<i64>, Option<String>);
        let stuck: Vec<Row> = sqlx::query_as(&format!(
            r#"SELECT p.aggregate_type, p.aggregate_id, p.pending, p.oldest,
       coalesce(c.attempts, 0), c.parked_seq, n.last_error
FROM (SELECT aggregate_type, aggregate_id, count(*) AS pending,
             min(max(created_at, available_at)) AS oldest, min(seq) AS first_seq
      FROM "{t}" WHERE status = 'pending' AND available_at <= ?3
      GROUP BY aggregate_type, aggregate_id
      HAVING min(max(created_at, available_at)) < ?1) p
LEFT JOIN "{t}_cursors" c ON c.aggregate_type = p.aggregate_type AND c.aggregate_id = p.aggregate_id
LEFT JOIN "{t}" n ON n.aggregate_type = p.aggregate_type AND n.aggregate_id = p.aggregate_id
                 AND n.seq = p.first_seq AND n.status = 'pending'
ORDER BY p.oldest LIMIT ?2"#
        ))
        .bind(sql::cutoff(time_ms(now), stuck_after).timestamp_millis())
        .bind(limit_i64(limit))
        .bind(now)
        .fetch_all(&mut *tx)
        .await?;
        status.stuck = sql::stuck(
            stuck
                .into_iter()
                .map(|(ty, id, pending, oldest, attempts, parked, error)| {
                    (ty, id, pending, time_ms(oldest), attempts, parked, error)
                })
                .collect(),
        );
        tx.commit().await?;
        Ok(status)
    }

    async fn dead<'a>(&'a self, filter: &'a EventFilter, limit: usize) -> Result<Vec<EventRecord>> {
        let t = self.table.as_str();
        let sql = format!(
            r#"SELECT {COLUMNS}, status, last_error, available_at, delivered_at, dead_at, consumed_at, failures
FROM "{t}" WHERE {DEAD}
ORDER BY dead_at DESC NULLS LAST, id LIMIT ?8"#
        );
        let rows = bind_dead(&sql, filter, limit).fetch_all(&self.pool).await?;
        rows.iter().map(record).collect()
    }

    async fn dead_summaries<'a>(
        &'a self,
        filter: &'a EventFilter,
        limit: usize,
    ) -> Result<Vec<DeadEvent>> {
        let t = self.table.as_str();
        let sql = format!(
            r#"SELECT id, event_type, aggregate_type, aggregate_id, seq, attempts, last_error, dead_at
FROM "{t}" WHERE {DEAD}
ORDER BY dead_at DESC NULLS LAST, id LIMIT ?8"#
        );
        let rows = bind_dead(&sql, filter, limit).fetch_all(&self.pool).await?;
        rows.iter()
            .map(|row| {
                let raw_id: String = row.try_get("id")?;
                Ok(DeadEvent {
                    id: Uuid::parse_str(&raw_id).map_err(|e| Error::CorruptRow {
                        id: raw_id.clone(),
                        reason: format!("id is not a UUID: {e}"),
                    })?,
                    event_type: row.try_get("event_type")?,
                    aggregate_type: row.try_get("aggregate_type")?,
                    aggregate_id: row.try_get("aggregate_id")?,
                    sequence: row.try_get("seq")?,
                    attempts: clamp_u32(row.try_get("attempts")?),
                    reason: row.try_get("last_error")?,
                    dead_at: row.try_get::<Option<i64>, _>("dead_at")?.map(time_ms),
                })
            })
            .collect()
    }

    async fn parked(&self, limit: usize) -> Result<Vec<ParkedAggregate>> {
        let t = self.table.as_str();
        type Row = (
            String,
            String,
            i64,
            Option<String>,
            Option<String>,
            Option<String>,
            Option<i64>,
            i64,
        );
        let rows: Vec<Row> = sqlx::query_as(&format!(
            r#"SELECT c.aggregate_type, c.aggregate_id, c.parked_seq, o.id, o.event_type, o.last_error,
       o.dead_at, max(c.known_seq - c.parked_seq, 0)
FROM "{t}_cursors" c
LEFT JOIN "{t}" o ON o.aggregate_type = c.aggregate_type AND o.aggregate_id = c.aggregate_id
                 AND o.seq = c.parked_seq AND o.status = 'dead'
WHERE c.parked_seq IS NOT NULL
ORDER BY o.dead_at NULLS FIRST, c.aggregate_type, c.aggregate_id LIMIT ?1"#
        ))
        .bind(limit_i64(limit))
        .fetch_all(&self.pool)
        .await?;
        Ok(sql::parked(
            rows.into_iter()
                .map(
                    |(ty, id, seq, event, event_type, reason, dead_at, waiting)| {
                        let event = event.and_then(|e| Uuid::parse_str(&e).ok());
                        (
                            ty,
                            id,
                            seq,
                            event,
                            event_type,
                            reason,
                            dead_at.map(time_ms),
                            waiting,
                        )
                    },
                )
                .collect(),
        ))
    }

    async fn purgeable<'a>(&'a self, retention: &'a Retention) -> Result<u64> {
        let t = self.table.as_str();
        let n: i64 = sqlx::query_scalar(&format!(
            r#"SELECT count(*) FROM "{t}" WHERE status = 'delivered' AND delivered_at < ?1"#
        ))
        .bind(now_ms().saturating_sub(duration_ms(retention.keep)))
        .fetch_one(&self.pool)
        .await?;
        Ok(n.max(0) as u64)
    }
}

impl ArchiveDead for SqliteStore {
    async fn archive_dead(&self, id: Uuid, dry_run: bool) -> Result<bool> {
        let t = self.table.as_str();
        let mut tx = self.pool.begin_with("BEGIN IMMEDIATE").await?;
        sqlx::query(&self.statements.discard)
            .bind(id.to_string())
            .bind(now_ms())
            .execute(&mut *tx)
            .await?;
        // Only behind its aggregate's cursor: an event the relay would still come to must stay.
        let moved = sqlx::query(&format!(
            r#"INSERT INTO "{t}_archive" SELECT * FROM "{t}" o WHERE o.id = ?1 AND o.status = 'dead'
  AND NOT EXISTS (SELECT 1 FROM "{t}_cursors" c
                  WHERE c.aggregate_type = o.aggregate_type AND c.aggregate_id = o.aggregate_id
                    AND (c.done_seq < o.seq OR c.parked_seq = o.seq))"#
        ))
        .bind(id.to_string())
        .execute(&mut *tx)
        .await?;
        // Not movable: the release is undone too (the transaction is dropped, rolled back).
        if moved.rows_affected() == 0 {
            return Ok(false);
        }
        sqlx::query(&format!(r#"DELETE FROM "{t}" WHERE id = ?1"#))
            .bind(id.to_string())
            .execute(&mut *tx)
            .await?;
        if dry_run {
            tx.rollback().await?;
        } else {
            tx.commit().await?;
        }
        Ok(true)
    }
}

/// The statement of [`DEAD`] with `filter` and `limit` bound.
fn bind_dead<'q>(
    sql: &'q str,
    filter: &'q EventFilter,
    limit: usize,
) -> sqlx::query::Query<'q, Sqlite, sqlx::sqlite::SqliteArguments<'q>> {
    let (aggregate_type, aggregate_id) = filter
        .aggregate
        .as_ref()
        .map(|(t, id)| (Some(t.as_str()), Some(id.as_str())))
        .unwrap_or_default();
    sqlx::query(sql)
        .bind(filter.ids.as_deref().map(json_ids))
        .bind(aggregate_type)
        .bind(aggregate_id)
        .bind(filter.event_type.as_deref())
        .bind(filter.created_from.map(|t| t.timestamp_millis()))
        .bind(filter.created_until.map(|t| t.timestamp_millis()))
        .bind(filter.reason.as_deref().filter(|r| !r.is_empty()))
        .bind(limit_i64(limit))
}

/// `LIMIT` for a count that may be `usize::MAX`.
fn limit_i64(limit: usize) -> i64 {
    i64::try_from(limit).unwrap_or(i64::MAX)
}

impl SqliteStore {
    async fn requeue_in(
        &self,
        conn: &mut sqlx::SqliteConnection,
        id: Uuid,
        now: i64,
    ) -> Result<bool> {
        let statements = &self.statements;
        let Some((aggregate_type, aggregate_id, seq)): Option<(String, String, i64)> =
            sqlx::query_as(&statements.requeue_event)
                .bind(id.to_string())
                .bind(now)
                .fetch_optional(&mut *conn)
                .await?
        else {
            return Ok(false);
        };
        sqlx::query(&statements.requeue_cursor)
            .bind(&aggregate_type)
            .bind(&aggregate_id)
            .bind(seq)
            .bind(now)
            .execute(&mut *conn)
            .await?;
        Ok(true)
    }
}

impl Requeue for SqliteStore {
    async fn requeue(&self, id: Uuid) -> Result<bool> {
        self.requeue_all(&[id]).await.map(|n| n == 1)
    }

    async fn requeue_all<'a>(&'a self, ids: &'a [Uuid]) -> Result<u64> {
        let now = now_ms();
        let mut tx = self.pool.begin_with("BEGIN IMMEDIATE").await?;
        let mut requeued = 0;
        for id in ids {
            requeued += u64::from(self.requeue_in(&mut tx, *id, now).await?);
        }
        tx.commit().await?;
        Ok(requeued)
    }
}

impl Discard for SqliteStore {
    async fn discard(&self, id: Uuid) -> Result<bool> {
        let (pool, statements) = (&self.pool, &self.statements);
        let done = sqlx::query(&statements.discard)
            .bind(id.to_string())
            .bind(now_ms())
            .execute(pool)
            .await?;
        Ok(done.rows_affected() == 1)
    }
}

impl Republish for SqliteStore {
    async fn republish<'a>(&'a self, filter: &'a EventFilter, dry_run: bool) -> Result<u64> {
        let now = now_ms();
        let ids = filter.ids.as_deref().map(json_ids);
        let (aggregate_type, aggregate_id) = filter
            .aggregate
            .as_ref()
            .map(|(t, id)| (Some(t.as_str()), Some(id.as_str())))
            .unwrap_or_default();
        let from = filter.created_from.map(|t| t.timestamp_millis());
        let until = filter.created_until.map(|t| t.timestamp_millis());
        let bind = |sql: &'a str| {
            sqlx::query(sql)
                .bind(ids.clone())
                .bind(aggregate_type)
                .bind(aggregate_id)
                .bind(filter.event_type.as_deref())
                .bind(from)
                .bind(until)
                .bind(now)
        };
        if dry_run {
            let n: i64 = bind(&self.statements.republish_count)
                .fetch_one(&self.pool)
                .await?
                .try_get(0)?;
            return Ok(n.max(0) as u64);
        }
        let mut tx = self.pool.begin_with("BEGIN IMMEDIATE").await?;
        bind(&self.statements.republish_restore)
            .execute(&mut *tx)
            .await?;
        bind(&self.statements.republish_unarchive)
            .execute(&mut *tx)
            .await?;
        let rows = bind(&self.statements.republish_events)
            .fetch_all(&mut *tx)
            .await?;
        // Each aggregate's earliest and latest republished sequence.
        let mut bounds: std::collections::BTreeMap<(String, String), (i64, i64)> =
            Default::default();
        for row in &rows {
            let seq: i64 = row.try_get("seq")?;
            let bound = bounds
                .entry((row.try_get("aggregate_type")?, row.try_get("aggregate_id")?))
                .or_insert((seq, seq));
            bound.0 = bound.0.min(seq);
            bound.1 = bound.1.max(seq);
        }
        for ((aggregate_type, aggregate_id), (first, last)) in &bounds {
            sqlx::query(&self.statements.republish_cursor)
                .bind(aggregate_type)
                .bind(aggregate_id)
                .bind(last)
                .bind(first - 1)
                .bind(now)
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;
        Ok(rows.len() as u64)
    }
}

impl Check for SqliteStore {
    async fn check(&self) -> Result<Vec<Inconsistency>> {
        let rows = sqlx::query_as(&self.statements.check)
            .fetch_all(&self.pool)
            .await?;
        Ok(sql::inconsistencies(rows))
    }
}

impl MarkConsumed for SqliteStore {
    async fn mark_consumed<'a>(&'a self, ids: &'a [Uuid]) -> Result<u64> {
        let (pool, statements) = (&self.pool, &self.statements);
        let done = sqlx::query(&statements.consumed)
            .bind(now_ms())
            .bind(json_ids(ids))
            .execute(pool)
            .await?;
        Ok(done.rows_affected())
    }
}

impl ExplainClaim for SqliteStore {
    async fn explain_claim(&self, limit: usize) -> Result<String> {
        let (pool, statements) = (&self.pool, &self.statements);
        let rows = sqlx::query(&format!("EXPLAIN QUERY PLAN {}", statements.lease))
            .bind(now_ms())
            .bind(30_000i64)
            .bind(Uuid::nil().to_string())
            .bind(limit as i64)
            .fetch_all(pool)
            .await?;
        rows.iter()
            .map(|row| Ok(row.try_get::<String, _>("detail")?))
            .collect::<Result<Vec<_>>>()
            .map(|lines| lines.join("\n"))
    }
}

/// A consumer's inbox in SQLite.
#[derive(Debug)]
pub struct SqliteInbox {
    pool: SqlitePool,
    create: String,
    create_attempts: String,
    insert: String,
    count_attempt: String,
    uncount_attempt: String,
    forget_attempts: String,
}

impl SqliteInbox {
    fn new(pool: SqlitePool, table: TableName) -> Self {
        let t = table.as_str();
        let a = table.derived("attempts");
        Self {
            pool,
            create: format!(
                r#"CREATE TABLE IF NOT EXISTS "{t}" (
    consumer     TEXT NOT NULL,
    message_id   TEXT NOT NULL,
    processed_at INTEGER NOT NULL,
    PRIMARY KEY (consumer, message_id)
)"#
            ),
            create_attempts: format!(
                r#"CREATE TABLE IF NOT EXISTS "{a}" (
    consumer   TEXT NOT NULL,
    message_id TEXT NOT NULL,
    attempts   INTEGER NOT NULL,
    updated_at INTEGER NOT NULL,
    PRIMARY KEY (consumer, message_id)
)"#
            ),
            insert: format!(
                r#"INSERT INTO "{t}" (consumer, message_id, processed_at) VALUES (?1, ?2, ?3)
ON CONFLICT DO NOTHING"#
            ),
            count_attempt: format!(
                r#"INSERT INTO "{a}" (consumer, message_id, attempts, updated_at) VALUES (?1, ?2, 1, ?3)
ON CONFLICT (consumer, message_id)
DO UPDATE SET attempts = attempts + 1, updated_at = excluded.updated_at
RETURNING attempts"#
            ),
            uncount_attempt: format!(
                r#"UPDATE "{a}" SET attempts = attempts - 1
WHERE consumer = ?1 AND message_id = ?2 AND attempts > 0"#
            ),
            forget_attempts: format!(
                r#"DELETE FROM "{a}" WHERE consumer = ?1 AND message_id = ?2"#
            ),
        }
    }
}

impl InboxStore for SqliteInbox {
    type Connection = sqlx::SqliteConnection;

    async fn migrate(&self) -> Result<()> {
        sqlx::Executor::execute(&self.pool, self.create.as_str()).await?;
        sqlx::Executor::execute(&self.pool, self.create_attempts.as_str()).await?;
        Ok(())
    }

    async fn count_attempt<'a>(&'a self, consumer: &'a str, message_id: Uuid) -> Result<u32> {
        let attempts: i64 = sqlx::query_scalar(&self.count_attempt)
            .bind(consumer)
            .bind(message_id.to_string())
            .bind(now_ms())
            .fetch_one(&self.pool)
            .await?;
        Ok(u32::try_from(attempts).unwrap_or(u32::MAX))
    }

    async fn uncount_attempt<'a>(&'a self, consumer: &'a str, message_id: Uuid) -> Result<()> {
        sqlx::query(&self.uncount_attempt)
            .bind(consumer)
            .bind(message_id.to_string())
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    async fn forget_attempts<'a>(&'a self, consumer: &'a str, message_id: Uuid) -> Result<()> {
        sqlx::query(&self.forget_attempts)
            .bind(consumer)
            .bind(message_id.to_string())
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    async fn record<'a>(
        &'a self,
        conn: &'a mut sqlx::SqliteConnection,
        consumer: &'a str,
        message_id: Uuid,
    ) -> Result<bool> {
        let done = sqlx::query(&self.insert)
            .bind(consumer)
            .bind(message_id.to_string())
            .bind(now_ms())
            .execute(conn)
            .await?;
        Ok(done.rows_affected() == 1)
    }
}

/// What the lease statement returns: aggregate type and id, `done_seq`, `known_seq`, attempts,
/// `parked_seq`, version.
type LeasedCursor = (String, String, i64, i64, i64, Option<i64>, i64);

fn now_ms() -> i64 {
    Utc::now().timestamp_millis()
}

fn json_ids(ids: &[Uuid]) -> String {
    serde_json::to_string(&ids.iter().map(Uuid::to_string).collect::<Vec<_>>())
        .expect("strings serialise")
}

fn envelope(row: &SqliteRow) -> Result<Envelope> {
    let raw_id: String = row.try_get("id")?;
    let id = Uuid::parse_str(&raw_id).map_err(|e| Error::CorruptRow {
        id: raw_id.clone(),
        reason: format!("id is not a UUID: {e}"),
    })?;
    let headers: String = row.try_get("headers")?;
    let created_at: i64 = row.try_get("created_at")?;
    Ok(Envelope {
        id,
        created_at: DateTime::from_timestamp_millis(created_at).unwrap_or_default(),
        event_type: row.try_get("event_type")?,
        aggregate_type: row.try_get("aggregate_type")?,
        aggregate_id: row.try_get("aggregate_id")?,
        sequence: row.try_get("seq")?,
        schema_version: clamp_u32(row.try_get("schema_version")?),
        topic: row.try_get("topic")?,
        payload: row.try_get("payload")?,
        headers: parse_headers(&id, &headers),
        attempt: clamp_u32(row.try_get("attempts")?),
    })
}
