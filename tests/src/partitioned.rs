//! Fixtures of the partitioned layout's tests (`TableLayout::Partitioned`).

use crate::{pg_pool, unique_table, ItemChanged};
use outbox::{Outbox, TableLayout};
use sqlx::Postgres;
use std::time::Duration;

/// A migrated outbox in a table of its own, `count` partitions each taking `every` in turn.
pub async fn ring(every: Duration, count: u16) -> Outbox<Postgres> {
    let outbox = Outbox::builder(pg_pool().await)
        .table(unique_table())
        .layout(TableLayout::partitioned(every, count))
        .build()
        .unwrap();
    outbox.migrate().await.unwrap();
    outbox
}

/// The partition taking writes now, by the table's own column default.
pub async fn current_partition(outbox: &Outbox<Postgres>) -> i16 {
    let t = outbox.table();
    let default: String = sqlx::query_scalar(&format!(
        "SELECT pg_get_expr(d.adbin, d.adrelid) FROM pg_attrdef d JOIN pg_attribute a
         ON a.attrelid = d.adrelid AND a.attnum = d.adnum
         WHERE d.adrelid = '{t}'::regclass AND a.attname = 'part'"
    ))
    .fetch_one(outbox.pool())
    .await
    .unwrap();
    sqlx::query_scalar(&format!("SELECT {default}"))
        .fetch_one(outbox.pool())
        .await
        .unwrap()
}

/// The `part` of an event's row.
pub async fn part_of(outbox: &Outbox<Postgres>, id: uuid::Uuid) -> i16 {
    sqlx::query_scalar(&format!(
        "SELECT part FROM {} WHERE id = $1",
        outbox.table()
    ))
    .bind(id)
    .fetch_one(outbox.pool())
    .await
    .unwrap()
}

/// An `ItemChanged` of `aggregate`.
pub fn item(aggregate: &str, n: u64) -> ItemChanged {
    ItemChanged {
        item: aggregate.to_owned(),
        n,
    }
}

/// Enqueues `events` in one committed transaction.
pub async fn enqueue(outbox: &Outbox<Postgres>, events: &[ItemChanged]) -> Vec<uuid::Uuid> {
    let mut tx = outbox.pool().begin().await.unwrap();
    let ids = outbox.enqueue_batch(&mut *tx, events).await.unwrap();
    tx.commit().await.unwrap();
    ids
}
