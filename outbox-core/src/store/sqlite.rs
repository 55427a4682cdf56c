use super::{clamp_u32, parse_headers, Backend, EventRecord, EventStatus, Failure};
use crate::error::{Error, Result};
use crate::event::{Deliver, Envelope, Message};
use crate::retention::Retention;
use crate::table::TableName;
use chrono::{DateTime, Utc};
use sqlx::sqlite::SqliteRow;
use sqlx::{Row, Sqlite, SqlitePool};
use std::time::Duration;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

impl super::sealed::Sealed for Sqlite {}

// SQLite keeps times as integer milliseconds since the Unix epoch (the application's clock is
// the database's clock), ids as hyphenated text.

#[doc(hidden)]
#[derive(Debug)]
pub struct SqliteStatements {
    next_seq: String,
    insert: String,
    claim: String,
    retry: String,
    finish: String,
    release_aggregate: String,
    promote: String,
    requeue_target: String,
    requeue_counter: String,
    purge_select: String,
    purge_archive: String,
    purge_delete: String,
    get: String,
    requeue: String,
    consumed: String,
}

const COLUMNS: &str = "id, created_at, aggregate_type, aggregate_id, seq, event_type, \
     schema_version, topic, payload, headers, attempts";

impl Backend for Sqlite {
    type Statements = SqliteStatements;

    fn backend_statements(table: &TableName, _notify: bool) -> SqliteStatements {
        let t = table.as_str();
        SqliteStatements {
            // The counter row is written first: SQLite holds the database write lock until
            // commit, so sequence order is commit order and a rollback leaves no gap.
            next_seq: format!(
                r#"INSERT INTO "{t}_aggregates" (aggregate_type, aggregate_id, last_seq, pending)
VALUES (?1, ?2, 1, 1)
ON CONFLICT (aggregate_type, aggregate_id) DO UPDATE SET last_seq = last_seq + 1, pending = pending + 1
RETURNING last_seq, pending"#
            ),
            insert: format!(
                r#"INSERT INTO "{t}" (id, created_at, aggregate_type, aggregate_id, seq, event_type,
    schema_version, topic, payload, headers, available_at, head)
VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12)"#
            ),
            // Heads only, as on PostgreSQL; one UPDATE statement is atomic under SQLite's
            // database lock, so relays sharing the file never claim the same row.
            claim: format!(
                r#"UPDATE "{t}" SET locked_until = ?1 + ?2, locked_by = ?3, attempts = attempts + 1
WHERE id IN (
    SELECT o.id FROM "{t}" o
    WHERE o.status = 'pending' AND o.head AND o.available_at <= ?1
      AND (o.locked_until IS NULL OR o.locked_until <= ?1)
    ORDER BY o.available_at
    LIMIT ?4)
RETURNING {COLUMNS}"#
            ),
            retry: format!(
                r#"UPDATE "{t}" AS o SET
    available_at = ?1 + f.delay_ms, last_error = f.reason, locked_until = NULL, locked_by = NULL
FROM (SELECT json_extract(value, '$[0]') AS id, json_extract(value, '$[1]') AS delay_ms,
             json_extract(value, '$[2]') AS reason
      FROM json_each(?2)) AS f
WHERE o.id = f.id AND o.locked_by = ?3"#
            ),
            finish: format!(
                r#"UPDATE "{t}" AS o SET
    status = f.status, head = 0, last_error = f.reason,
    delivered_at = CASE WHEN f.status = 'delivered' THEN ?1 END,
    dead_at = CASE WHEN f.status = 'dead' THEN ?1 END,
    locked_until = NULL, locked_by = NULL
FROM (SELECT json_extract(value, '$[0]') AS id, json_extract(value, '$[1]') AS status,
             json_extract(value, '$[2]') AS reason
      FROM json_each(?2)) AS f
WHERE o.id = f.id AND o.locked_by = ?3
RETURNING aggregate_type, aggregate_id"#
            ),
            release_aggregate: format!(
                r#"UPDATE "{t}_aggregates" SET pending = pending - ?3
WHERE aggregate_type = ?1 AND aggregate_id = ?2
RETURNING pending"#
            ),
            promote: format!(
                r#"UPDATE "{t}" SET head = 1
WHERE id = (SELECT id FROM "{t}"
            WHERE status = 'pending' AND aggregate_type = ?1 AND aggregate_id = ?2
            ORDER BY seq LIMIT 1)"#
            ),
            requeue_target: format!(
                r#"SELECT aggregate_type, aggregate_id FROM "{t}" WHERE id = ?1 AND status = 'dead'"#
            ),
            requeue_counter: format!(
                r#"UPDATE "{t}_aggregates" SET pending = pending + 1
WHERE aggregate_type = ?1 AND aggregate_id = ?2
RETURNING pending"#
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
            get: format!(
                r#"SELECT {COLUMNS}, status, last_error, available_at, delivered_at, dead_at, consumed_at
FROM "{t}" WHERE id = ?1"#
            ),
            requeue: format!(
                r#"UPDATE "{t}" SET status = 'pending', attempts = 0, available_at = ?2, dead_at = NULL,
    head = ?3
WHERE id = ?1 AND status = 'dead'"#
            ),
            consumed: format!(
                r#"UPDATE "{t}" SET consumed_at = ?1
WHERE consumed_at IS NULL AND id IN (SELECT value FROM json_each(?2))"#
            ),
        }
    }

    fn backend_migration_sql(table: &TableName) -> Vec<(i64, &'static str, String)> {
        let t = table.as_str();
        vec![(
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
        )]
    }

    async fn backend_migrate(pool: &SqlitePool, table: &TableName) -> Result<()> {
        let mut tx = pool.begin().await?;
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
        for (version, description, sql) in Self::backend_migration_sql(table) {
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

    async fn backend_insert<'a>(
        conn: &'a mut sqlx::SqliteConnection,
        statements: &'a SqliteStatements,
        messages: &'a [Message],
    ) -> Result<()> {
        let now = now_ms();
        for m in messages {
            let (seq, pending): (i64, i64) = sqlx::query_as(&statements.next_seq)
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
                .bind(pending == 1)
                .execute(&mut *conn)
                .await?;
        }
        Ok(())
    }

    async fn backend_claim<'a>(
        pool: &'a SqlitePool,
        statements: &'a SqliteStatements,
        limit: usize,
        lease: Duration,
        token: Uuid,
    ) -> Result<Vec<Envelope>> {
        let rows = sqlx::query(&statements.claim)
            .bind(now_ms())
            .bind(duration_ms(lease))
            .bind(token.to_string())
            .bind(limit as i64)
            .fetch_all(pool)
            .await?;
        rows.iter().map(envelope).collect()
    }

    async fn backend_record<'a>(
        pool: &'a SqlitePool,
        statements: &'a SqliteStatements,
        token: Uuid,
        delivered: &'a [Uuid],
        failures: &'a [Failure],
    ) -> Result<()> {
        let now = now_ms();
        let token = token.to_string();
        let mut tx = pool.begin().await?;
        let retry: Vec<_> = failures
            .iter()
            .filter(|f| !f.dead)
            .map(|f| serde_json::json!([f.id.to_string(), duration_ms(f.retry_in), f.reason]))
            .collect();
        if !retry.is_empty() {
            sqlx::query(&statements.retry)
                .bind(now)
                .bind(serde_json::Value::Array(retry).to_string())
                .bind(&token)
                .execute(&mut *tx)
                .await?;
        }
        let finished: Vec<_> = delivered
            .iter()
            .map(|id| serde_json::json!([id.to_string(), "delivered", null]))
            .chain(
                failures
                    .iter()
                    .filter(|f| f.dead)
                    .map(|f| serde_json::json!([f.id.to_string(), "dead", f.reason])),
            )
            .collect();
        if !finished.is_empty() {
            let rows: Vec<(String, String)> = sqlx::query_as(&statements.finish)
                .bind(now)
                .bind(serde_json::Value::Array(finished).to_string())
                .bind(&token)
                .fetch_all(&mut *tx)
                .await?;
            let mut released: std::collections::BTreeMap<(String, String), i64> =
                Default::default();
            for key in rows {
                *released.entry(key).or_default() += 1;
            }
            for ((aggregate_type, aggregate_id), n) in released {
                let pending: i64 = sqlx::query_scalar(&statements.release_aggregate)
                    .bind(&aggregate_type)
                    .bind(&aggregate_id)
                    .bind(n)
                    .fetch_one(&mut *tx)
                    .await?;
                if pending > 0 {
                    sqlx::query(&statements.promote)
                        .bind(&aggregate_type)
                        .bind(&aggregate_id)
                        .execute(&mut *tx)
                        .await?;
                }
            }
        }
        tx.commit().await?;
        Ok(())
    }

    async fn backend_purge_batch<'a>(
        pool: &'a SqlitePool,
        statements: &'a SqliteStatements,
        retention: &'a Retention,
    ) -> Result<u64> {
        let mut tx = pool.begin().await?;
        let ids: Vec<String> = sqlx::query_scalar(&statements.purge_select)
            .bind(now_ms().saturating_sub(duration_ms(retention.keep)))
            .bind(retention.batch_size as i64)
            .fetch_all(&mut *tx)
            .await?;
        if ids.is_empty() {
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

    async fn backend_get<'a>(
        pool: &'a SqlitePool,
        statements: &'a SqliteStatements,
        id: Uuid,
    ) -> Result<Option<EventRecord>> {
        let Some(row) = sqlx::query(&statements.get)
            .bind(id.to_string())
            .fetch_optional(pool)
            .await?
        else {
            return Ok(None);
        };
        let envelope = envelope(&row)?;
        let status: String = row.try_get("status")?;
        let time = |column: &str| -> Result<Option<DateTime<Utc>>> {
            Ok(row
                .try_get::<Option<i64>, _>(column)?
                .and_then(DateTime::from_timestamp_millis))
        };
        Ok(Some(EventRecord {
            status: EventStatus::parse(&status).ok_or_else(|| Error::CorruptRow {
                id: id.to_string(),
                reason: format!("unknown status {status:?}"),
            })?,
            last_error: row.try_get("last_error")?,
            available_at: time("available_at")?.unwrap_or_default(),
            delivered_at: time("delivered_at")?,
            dead_at: time("dead_at")?,
            consumed_at: time("consumed_at")?,
            id: envelope.id,
            event_type: envelope.event_type,
            aggregate_type: envelope.aggregate_type,
            aggregate_id: envelope.aggregate_id,
            sequence: envelope.sequence,
            attempts: envelope.attempt,
            created_at: envelope.created_at,
            payload: envelope.payload,
        }))
    }

    async fn backend_mark_consumed<'a>(
        pool: &'a SqlitePool,
        statements: &'a SqliteStatements,
        ids: &'a [Uuid],
    ) -> Result<u64> {
        let done = sqlx::query(&statements.consumed)
            .bind(now_ms())
            .bind(json_ids(ids))
            .execute(pool)
            .await?;
        Ok(done.rows_affected())
    }

    async fn backend_explain_claim<'a>(
        pool: &'a SqlitePool,
        statements: &'a SqliteStatements,
        limit: usize,
    ) -> Result<String> {
        let rows = sqlx::query(&format!("EXPLAIN QUERY PLAN {}", statements.claim))
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

    async fn backend_requeue<'a>(
        pool: &'a SqlitePool,
        statements: &'a SqliteStatements,
        id: Uuid,
    ) -> Result<bool> {
        let mut tx = pool.begin().await?;
        let Some((aggregate_type, aggregate_id)): Option<(String, String)> =
            sqlx::query_as(&statements.requeue_target)
                .bind(id.to_string())
                .fetch_optional(&mut *tx)
                .await?
        else {
            return Ok(false);
        };
        let pending: i64 = sqlx::query_scalar(&statements.requeue_counter)
            .bind(&aggregate_type)
            .bind(&aggregate_id)
            .fetch_one(&mut *tx)
            .await?;
        let done = sqlx::query(&statements.requeue)
            .bind(id.to_string())
            .bind(now_ms())
            .bind(pending == 1)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(done.rows_affected() == 1)
    }

    async fn backend_execute<'a>(pool: &'a SqlitePool, sql: &'a str) -> Result<()> {
        sqlx::Executor::execute(pool, sql).await?;
        Ok(())
    }

    fn backend_inbox_sql(table: &TableName) -> (String, String) {
        let t = table.as_str();
        (
            format!(
                r#"CREATE TABLE IF NOT EXISTS "{t}" (
    consumer     TEXT NOT NULL,
    message_id   TEXT NOT NULL,
    processed_at INTEGER NOT NULL,
    PRIMARY KEY (consumer, message_id)
)"#
            ),
            format!(
                r#"INSERT INTO "{t}" (consumer, message_id, processed_at) VALUES (?1, ?2, ?3)
ON CONFLICT DO NOTHING"#
            ),
        )
    }

    async fn backend_inbox_insert<'a>(
        conn: &'a mut sqlx::SqliteConnection,
        insert: &'a str,
        consumer: &'a str,
        message_id: Uuid,
    ) -> Result<bool> {
        let done = sqlx::query(insert)
            .bind(consumer)
            .bind(message_id.to_string())
            .bind(now_ms())
            .execute(conn)
            .await?;
        Ok(done.rows_affected() == 1)
    }

    async fn backend_listen(
        _pool: SqlitePool,
        _table: TableName,
        _wake: watch::Sender<u64>,
        _cancel: CancellationToken,
    ) {
        // SQLite has no notifications: the relay polls.
    }
}

fn now_ms() -> i64 {
    Utc::now().timestamp_millis()
}

fn duration_ms(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
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
