use super::{clamp_u32, parse_headers, Backend, EventRecord, EventStatus, Failure};
use crate::error::{Error, Result};
use crate::event::{Deliver, Envelope, Message};
use crate::retention::Retention;
use crate::table::TableName;
use sqlx::postgres::{PgListener, PgRow};
use sqlx::{PgPool, Postgres, Row};
use std::time::Duration;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

impl super::sealed::Sealed for Postgres {}

#[doc(hidden)]
#[derive(Debug)]
pub struct PgStatements {
    insert: String,
    claim: String,
    delivered: String,
    failed: String,
    purge_delete: String,
    purge_archive: String,
    get: String,
    requeue: String,
    consumed: String,
}

/// Columns every read returns, in the order `envelope` and `record` expect.
const COLUMNS: &str = "o.id, o.created_at, o.aggregate_type, o.aggregate_id, o.seq, o.event_type, \
     o.schema_version, o.topic, o.payload::text AS payload, o.headers::text AS headers, o.attempts";

/// The NOTIFY channel: the table name, so relays of different tables do not wake each other.
fn channel(table: &TableName) -> String {
    table.derived("wake")
}

impl Backend for Postgres {
    type Statements = PgStatements;

    fn statements(table: &TableName, notify: bool) -> PgStatements {
        let t = table.as_str();
        let notify = if notify {
            format!(
                ", wake AS (SELECT pg_notify('{}', '')) SELECT count(*) FROM ins, wake",
                channel(table)
            )
        } else {
            " SELECT count(*) FROM ins".to_owned()
        };
        PgStatements {
            // One statement for any batch: allocate consecutive sequence numbers per aggregate
            // from the counter rows (whose row locks serialise writers of one aggregate until
            // commit, so sequence order is commit order and a rollback leaves no gap), then
            // insert the events. Counters are upserted in key order so two batches touching the
            // same aggregates cannot deadlock.
            insert: format!(
                r#"WITH input AS (
    SELECT * FROM unnest($1::uuid[], $2::text[], $3::text[], $4::text[], $5::int4[], $6::text[],
                         $7::text[], $8::text[], $9::timestamptz[], $10::int8[])
        WITH ORDINALITY AS i(id, aggregate_type, aggregate_id, event_type, schema_version, topic,
                             payload, headers, available_at, delay_ms, ord)
), counts AS (
    SELECT aggregate_type, aggregate_id, count(*) AS n FROM input GROUP BY aggregate_type, aggregate_id
), seqs AS (
    INSERT INTO "{t}_aggregates" AS a (aggregate_type, aggregate_id, last_seq)
    SELECT aggregate_type, aggregate_id, n FROM counts ORDER BY aggregate_type, aggregate_id
    ON CONFLICT (aggregate_type, aggregate_id) DO UPDATE SET last_seq = a.last_seq + EXCLUDED.last_seq
    RETURNING a.aggregate_type, a.aggregate_id, a.last_seq
), ins AS (
    INSERT INTO "{t}" (id, aggregate_type, aggregate_id, seq, event_type, schema_version, topic,
                       payload, headers, available_at)
    SELECT i.id, i.aggregate_type, i.aggregate_id,
           s.last_seq - c.n + row_number() OVER (PARTITION BY i.aggregate_type, i.aggregate_id ORDER BY i.ord),
           i.event_type, i.schema_version, i.topic, i.payload::jsonb, i.headers::jsonb,
           COALESCE(i.available_at, now() + i.delay_ms * interval '1 millisecond')
    FROM input i
    JOIN seqs s USING (aggregate_type, aggregate_id)
    JOIN counts c USING (aggregate_type, aggregate_id)
    RETURNING 1
){notify}"#
            ),
            // Heads only: a row is due when no earlier row of its aggregate is still pending
            // (waiting, retrying or leased), so one aggregate never has two events in flight.
            // SKIP LOCKED lets relays claim side by side; the lease lets another relay take
            // over the rows of one that died.
            claim: format!(
                r#"WITH due AS (
    SELECT o.id FROM "{t}" o
    WHERE o.status = 'pending' AND o.available_at <= now()
      AND (o.locked_until IS NULL OR o.locked_until <= now())
      AND NOT EXISTS (
          SELECT 1 FROM "{t}" p
          WHERE p.status = 'pending' AND p.aggregate_type = o.aggregate_type
            AND p.aggregate_id = o.aggregate_id AND p.seq < o.seq)
    ORDER BY o.available_at
    LIMIT $1
    FOR UPDATE SKIP LOCKED
)
UPDATE "{t}" o SET locked_until = now() + $2 * interval '1 millisecond', locked_by = $3,
                   attempts = o.attempts + 1
FROM due WHERE o.id = due.id
RETURNING {COLUMNS}"#
            ),
            delivered: format!(
                r#"UPDATE "{t}" SET status = 'delivered', delivered_at = now(), locked_until = NULL,
                   locked_by = NULL, last_error = NULL
WHERE id = ANY($1) AND locked_by = $2"#
            ),
            failed: format!(
                r#"UPDATE "{t}" o SET
    status = CASE WHEN f.dead THEN 'dead' ELSE 'pending' END,
    available_at = CASE WHEN f.dead THEN o.available_at ELSE now() + f.delay_ms * interval '1 millisecond' END,
    dead_at = CASE WHEN f.dead THEN now() END,
    last_error = f.reason, locked_until = NULL, locked_by = NULL
FROM unnest($1::uuid[], $2::bool[], $3::int8[], $4::text[]) AS f(id, dead, delay_ms, reason)
WHERE o.id = f.id AND o.locked_by = $5"#
            ),
            purge_delete: format!(
                r#"WITH doomed AS (
    SELECT id FROM "{t}" WHERE status = 'delivered' AND delivered_at < now() - $1 * interval '1 millisecond'
    ORDER BY delivered_at LIMIT $2 FOR UPDATE SKIP LOCKED
)
DELETE FROM "{t}" o USING doomed WHERE o.id = doomed.id"#
            ),
            purge_archive: format!(
                r#"WITH doomed AS (
    SELECT id FROM "{t}" WHERE status = 'delivered' AND delivered_at < now() - $1 * interval '1 millisecond'
    ORDER BY delivered_at LIMIT $2 FOR UPDATE SKIP LOCKED
), moved AS (
    DELETE FROM "{t}" o USING doomed WHERE o.id = doomed.id RETURNING o.*
)
INSERT INTO "{t}_archive" SELECT * FROM moved"#
            ),
            get: format!(
                r#"SELECT {COLUMNS}, o.status, o.last_error, o.available_at, o.delivered_at, o.dead_at, o.consumed_at
FROM "{t}" o WHERE o.id = $1"#
            ),
            requeue: format!(
                r#"UPDATE "{t}" SET status = 'pending', attempts = 0, available_at = now(), dead_at = NULL
WHERE id = $1 AND status = 'dead'"#
            ),
            consumed: format!(
                r#"UPDATE "{t}" SET consumed_at = now() WHERE id = ANY($1) AND consumed_at IS NULL"#
            ),
        }
    }

    fn migration_sql(table: &TableName) -> Vec<(i64, &'static str, String)> {
        let t = table.as_str();
        vec![(
            1,
            "outbox table, aggregate sequence counters, archive",
            format!(
                r#"CREATE TABLE IF NOT EXISTS "{t}" (
    id             uuid PRIMARY KEY,
    created_at     timestamptz NOT NULL DEFAULT now(),
    aggregate_type text NOT NULL,
    aggregate_id   text NOT NULL,
    seq            bigint NOT NULL,
    event_type     text NOT NULL,
    schema_version integer NOT NULL,
    topic          text NOT NULL,
    payload        jsonb NOT NULL,
    headers        jsonb NOT NULL DEFAULT '{{}}',
    status         text NOT NULL DEFAULT 'pending' CHECK (status IN ('pending', 'delivered', 'dead')),
    attempts       integer NOT NULL DEFAULT 0,
    available_at   timestamptz NOT NULL DEFAULT now(),
    locked_until   timestamptz,
    locked_by      uuid,
    last_error     text,
    delivered_at   timestamptz,
    dead_at        timestamptz,
    consumed_at    timestamptz
);
-- The relay's claim scans only pending rows: these stay small however many delivered rows the
-- table holds (a partial index on pending rows is what keeps the claim an index scan).
CREATE INDEX IF NOT EXISTS "{t}_pending_due" ON "{t}" (available_at) WHERE status = 'pending';
CREATE INDEX IF NOT EXISTS "{t}_pending_aggregate" ON "{t}" (aggregate_type, aggregate_id, seq) WHERE status = 'pending';
-- Retention and dead-letter inspection.
CREATE INDEX IF NOT EXISTS "{t}_delivered_at" ON "{t}" (delivered_at) WHERE status = 'delivered';
CREATE INDEX IF NOT EXISTS "{t}_dead_at" ON "{t}" (dead_at) WHERE status = 'dead';
CREATE TABLE IF NOT EXISTS "{t}_aggregates" (
    aggregate_type text NOT NULL,
    aggregate_id   text NOT NULL,
    last_seq       bigint NOT NULL,
    PRIMARY KEY (aggregate_type, aggregate_id)
);
CREATE TABLE IF NOT EXISTS "{t}_archive" (LIKE "{t}");"#
            ),
        )]
    }

    async fn migrate(pool: &PgPool, table: &TableName) -> Result<()> {
        let mut tx = pool.begin().await?;
        // Serialise concurrent migrators of this table; DDL is transactional in PostgreSQL.
        sqlx::query("SELECT pg_advisory_xact_lock(hashtext($1))")
            .bind(format!("outbox-migrate:{table}"))
            .execute(&mut *tx)
            .await?;
        let m = table.derived("migrations");
        sqlx::query(&format!(
            r#"CREATE TABLE IF NOT EXISTS "{m}" (
    version bigint PRIMARY KEY, description text NOT NULL, applied_at timestamptz NOT NULL DEFAULT now())"#
        ))
        .execute(&mut *tx)
        .await?;
        let applied: Option<i64> =
            sqlx::query_scalar(&format!(r#"SELECT max(version) FROM "{m}""#))
                .fetch_one(&mut *tx)
                .await?;
        for (version, description, sql) in Self::migration_sql(table) {
            if applied.is_some_and(|a| a >= version) {
                continue;
            }
            sqlx::Executor::execute(&mut *tx, sql.as_str()).await?;
            sqlx::query(&format!(
                r#"INSERT INTO "{m}" (version, description) VALUES ($1, $2)"#
            ))
            .bind(version)
            .bind(description)
            .execute(&mut *tx)
            .await?;
            tracing::info!(version, description, "applied outbox migration");
        }
        tx.commit().await?;
        Ok(())
    }

    async fn insert<'a>(
        conn: &'a mut sqlx::PgConnection,
        statements: &'a PgStatements,
        messages: &'a [Message],
    ) -> Result<()> {
        let n = messages.len();
        let mut ids = Vec::with_capacity(n);
        let mut aggregate_types = Vec::with_capacity(n);
        let mut aggregate_ids = Vec::with_capacity(n);
        let mut event_types = Vec::with_capacity(n);
        let mut versions = Vec::with_capacity(n);
        let mut topics = Vec::with_capacity(n);
        let mut payloads = Vec::with_capacity(n);
        let mut headers = Vec::with_capacity(n);
        let mut available_at = Vec::with_capacity(n);
        let mut delays = Vec::with_capacity(n);
        for m in messages {
            ids.push(m.id);
            aggregate_types.push(m.aggregate_type);
            aggregate_ids.push(m.aggregate_id.as_str());
            event_types.push(m.event_type);
            versions.push(m.schema_version as i32);
            topics.push(m.topic);
            payloads.push(m.payload.as_str());
            headers.push(m.headers_json());
            let (at, delay) = match m.options.available_at {
                None => (None, 0),
                Some(Deliver::At(at)) => (Some(at), 0),
                Some(Deliver::After(d)) => (None, duration_ms(d)),
            };
            available_at.push(at);
            delays.push(delay);
        }
        let inserted: i64 = sqlx::query_scalar(&statements.insert)
            .bind(ids)
            .bind(aggregate_types)
            .bind(aggregate_ids)
            .bind(event_types)
            .bind(versions)
            .bind(topics)
            .bind(payloads)
            .bind(headers)
            .bind(available_at)
            .bind(delays)
            .fetch_one(conn)
            .await?;
        debug_assert_eq!(inserted as usize, n);
        Ok(())
    }

    async fn claim<'a>(
        pool: &'a PgPool,
        statements: &'a PgStatements,
        limit: usize,
        lease: Duration,
        token: Uuid,
    ) -> Result<Vec<Envelope>> {
        let rows = sqlx::query(&statements.claim)
            .bind(limit as i64)
            .bind(duration_ms(lease))
            .bind(token)
            .fetch_all(pool)
            .await?;
        rows.iter().map(envelope).collect()
    }

    async fn mark_delivered<'a>(
        pool: &'a PgPool,
        statements: &'a PgStatements,
        token: Uuid,
        ids: &'a [Uuid],
    ) -> Result<u64> {
        let done = sqlx::query(&statements.delivered)
            .bind(ids)
            .bind(token)
            .execute(pool)
            .await?;
        Ok(done.rows_affected())
    }

    async fn mark_failed<'a>(
        pool: &'a PgPool,
        statements: &'a PgStatements,
        token: Uuid,
        failures: &'a [Failure],
    ) -> Result<u64> {
        let ids: Vec<Uuid> = failures.iter().map(|f| f.id).collect();
        let dead: Vec<bool> = failures.iter().map(|f| f.dead).collect();
        let delays: Vec<i64> = failures.iter().map(|f| duration_ms(f.retry_in)).collect();
        let reasons: Vec<&str> = failures.iter().map(|f| f.reason.as_str()).collect();
        let done = sqlx::query(&statements.failed)
            .bind(ids)
            .bind(dead)
            .bind(delays)
            .bind(reasons)
            .bind(token)
            .execute(pool)
            .await?;
        Ok(done.rows_affected())
    }

    async fn purge_batch<'a>(
        pool: &'a PgPool,
        statements: &'a PgStatements,
        retention: &'a Retention,
    ) -> Result<u64> {
        let sql = if retention.archive {
            &statements.purge_archive
        } else {
            &statements.purge_delete
        };
        let done = sqlx::query(sql)
            .bind(duration_ms(retention.keep))
            .bind(retention.batch_size as i64)
            .execute(pool)
            .await?;
        Ok(done.rows_affected())
    }

    async fn get<'a>(
        pool: &'a PgPool,
        statements: &'a PgStatements,
        id: Uuid,
    ) -> Result<Option<EventRecord>> {
        let Some(row) = sqlx::query(&statements.get)
            .bind(id)
            .fetch_optional(pool)
            .await?
        else {
            return Ok(None);
        };
        let envelope = envelope(&row)?;
        let status: String = row.try_get("status")?;
        Ok(Some(EventRecord {
            status: EventStatus::parse(&status).ok_or_else(|| Error::CorruptRow {
                id: id.to_string(),
                reason: format!("unknown status {status:?}"),
            })?,
            last_error: row.try_get("last_error")?,
            available_at: row.try_get("available_at")?,
            delivered_at: row.try_get("delivered_at")?,
            dead_at: row.try_get("dead_at")?,
            consumed_at: row.try_get("consumed_at")?,
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

    async fn mark_consumed<'a>(
        pool: &'a PgPool,
        statements: &'a PgStatements,
        ids: &'a [Uuid],
    ) -> Result<u64> {
        let done = sqlx::query(&statements.consumed)
            .bind(ids)
            .execute(pool)
            .await?;
        Ok(done.rows_affected())
    }

    async fn explain_claim<'a>(
        pool: &'a PgPool,
        statements: &'a PgStatements,
        limit: usize,
    ) -> Result<String> {
        let lines: Vec<String> = sqlx::query_scalar(&format!("EXPLAIN {}", statements.claim))
            .bind(limit as i64)
            .bind(30_000i64)
            .bind(Uuid::nil())
            .fetch_all(pool)
            .await?;
        Ok(lines.join("\n"))
    }

    async fn requeue<'a>(pool: &'a PgPool, statements: &'a PgStatements, id: Uuid) -> Result<bool> {
        let done = sqlx::query(&statements.requeue)
            .bind(id)
            .execute(pool)
            .await?;
        Ok(done.rows_affected() == 1)
    }

    async fn execute<'a>(pool: &'a PgPool, sql: &'a str) -> Result<()> {
        sqlx::Executor::execute(pool, sql).await?;
        Ok(())
    }

    fn inbox_sql(table: &TableName) -> (String, String) {
        let t = table.as_str();
        (
            format!(
                r#"CREATE TABLE IF NOT EXISTS "{t}" (
    consumer     text NOT NULL,
    message_id   uuid NOT NULL,
    processed_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (consumer, message_id)
)"#
            ),
            format!(
                r#"INSERT INTO "{t}" (consumer, message_id) VALUES ($1, $2) ON CONFLICT DO NOTHING"#
            ),
        )
    }

    async fn inbox_insert<'a>(
        conn: &'a mut sqlx::PgConnection,
        insert: &'a str,
        consumer: &'a str,
        message_id: Uuid,
    ) -> Result<bool> {
        let done = sqlx::query(insert)
            .bind(consumer)
            .bind(message_id)
            .execute(conn)
            .await?;
        Ok(done.rows_affected() == 1)
    }

    async fn listen(
        pool: PgPool,
        table: TableName,
        wake: watch::Sender<u64>,
        cancel: CancellationToken,
    ) {
        let channel = channel(&table);
        let mut failures = 0u32;
        while !cancel.is_cancelled() {
            let mut listener = match PgListener::connect_with(&pool).await {
                Ok(mut l) => match l.listen(&channel).await {
                    Ok(()) => l,
                    Err(error) => {
                        failures += 1;
                        tracing::warn!(%error, "outbox LISTEN failed; polling until it is back");
                        backoff(failures, &cancel).await;
                        continue;
                    }
                },
                Err(error) => {
                    failures += 1;
                    tracing::warn!(%error, "outbox listener cannot connect; polling until it is back");
                    backoff(failures, &cancel).await;
                    continue;
                }
            };
            // Notifications sent while we were not listening are lost: wake once to catch up.
            wake.send_modify(|n| *n += 1);
            loop {
                tokio::select! {
                    _ = cancel.cancelled() => return,
                    received = listener.try_recv() => match received {
                        Ok(Some(_)) => {
                            failures = 0;
                            wake.send_modify(|n| *n += 1);
                        }
                        // The connection dropped; `try_recv` reconnects on the next call.
                        Ok(None) => wake.send_modify(|n| *n += 1),
                        Err(error) => {
                            failures += 1;
                            tracing::warn!(%error, "outbox listener lost; polling until it is back");
                            backoff(failures, &cancel).await;
                            break;
                        }
                    }
                }
            }
        }
    }
}

async fn backoff(failures: u32, cancel: &CancellationToken) {
    let delay = Duration::from_millis(100 * 2u64.pow(failures.min(6)));
    tokio::select! {
        _ = cancel.cancelled() => {}
        _ = tokio::time::sleep(delay) => {}
    }
}

fn duration_ms(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

fn envelope(row: &PgRow) -> Result<Envelope> {
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
