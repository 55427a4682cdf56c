//! The idempotent inbox: a message changes the consumer's state once, however often it arrives.

use crate::error::{Error, Result};
use crate::handler::HandlerContext;
use crate::store::{Backend, InboxStore};
use crate::table::TableName;
use sqlx::{Pool, Transaction};
use std::fmt;
use std::sync::Arc;
use uuid::Uuid;

/// Remembers which messages a consumer has processed, in the consumer's own database.
///
/// Start the handler's transaction with [`begin`](Self::begin): it records the message id for
/// this consumer in the same transaction as the handler's changes. A message seen before gives
/// `None`, and the handler returns `Ok(())` without changing anything; a handler that fails
/// rolls its transaction back, record included, so the retry runs again.
///
/// ```no_run
/// # #[cfg(feature = "postgres")]
/// # mod demo {
/// use outbox_core::{HandlerContext, HandlerError, Inbox};
/// # #[derive(serde::Serialize, serde::Deserialize)] struct StockChanged { sku: String, quantity: i64 }
///
/// async fn on_stock_changed(event: StockChanged, ctx: HandlerContext) -> Result<(), HandlerError> {
///     let inbox = ctx.state::<Inbox<sqlx::Postgres>>()?;
///     let Some(mut tx) = inbox.begin(&ctx).await? else {
///         return Ok(()); // already processed
///     };
///     sqlx::query("UPDATE stock SET quantity = $1 WHERE sku = $2")
///         .bind(event.quantity)
///         .bind(&event.sku)
///         .execute(&mut *tx)
///         .await?;
///     tx.commit().await?;
///     Ok(())
/// }
/// # }
/// ```
pub struct Inbox<DB: Backend> {
    inner: Arc<InboxInner<DB>>,
}

struct InboxInner<DB: Backend> {
    pool: Pool<DB>,
    table: TableName,
    consumer: String,
    store: DB::Inbox,
}

impl<DB: Backend> Clone for Inbox<DB> {
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
        }
    }
}

impl<DB: Backend> fmt::Debug for Inbox<DB> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Inbox")
            .field("table", &self.inner.table)
            .field("consumer", &self.inner.consumer)
            .finish()
    }
}

impl<DB: Backend> Inbox<DB> {
    /// An inbox for the consumer named `consumer` in the table `table` (validated like an outbox
    /// table name). Several consumers can share one table. On MySQL a consumer's name is at
    /// most 255 bytes long.
    pub fn new(pool: Pool<DB>, table: &str, consumer: impl Into<String>) -> Result<Self> {
        let table = TableName::new(table)?;
        let consumer = consumer.into();
        let store = DB::open_inbox(pool.clone(), table.clone());
        if store
            .max_consumer_name_bytes()
            .is_some_and(|max| consumer.len() > max)
        {
            return Err(Error::InvalidField {
                field: format!("consumer name {consumer:?}"),
                reason: "it is longer than this database's inbox keeps (MySQL: 255 bytes)",
            });
        }
        Ok(Self {
            inner: Arc::new(InboxInner {
                store,
                pool,
                table,
                consumer,
            }),
        })
    }

    /// Creates the tables if they do not exist: `<table>`, the processed messages, and
    /// `<table>_attempts`, the attempt counts of a [`Consumer`](crate::consumer::Consumer) given
    /// this inbox with [`attempts_in`](crate::consumer::Consumer::attempts_in).
    pub async fn migrate(&self) -> Result<()> {
        self.inner.store.migrate().await
    }

    /// The pool.
    pub fn pool(&self) -> &Pool<DB> {
        &self.inner.pool
    }

    /// Begins the handler's transaction and records the event of `ctx` in it; `None` if this
    /// consumer has processed it before.
    pub async fn begin(&self, ctx: &HandlerContext) -> Result<Option<Transaction<'static, DB>>> {
        self.begin_for(ctx.event_id()).await
    }

    /// Like [`begin`](Self::begin), for a message id of your own.
    pub async fn begin_for(&self, message_id: Uuid) -> Result<Option<Transaction<'static, DB>>> {
        let mut tx = self.inner.pool.begin().await?;
        let first_time = self
            .inner
            .store
            .record(&mut tx, &self.inner.consumer, message_id)
            .await?;
        if first_time {
            Ok(Some(tx))
        } else {
            tracing::debug!(%message_id, consumer = %self.inner.consumer, "message already processed; skipping");
            tx.rollback().await?;
            Ok(None)
        }
    }

    pub(crate) async fn count_attempt(&self, message_id: Uuid) -> Result<u32> {
        self.inner
            .store
            .count_attempt(&self.inner.consumer, message_id)
            .await
    }

    pub(crate) async fn uncount_attempt(&self, message_id: Uuid) -> Result<()> {
        self.inner
            .store
            .uncount_attempt(&self.inner.consumer, message_id)
            .await
    }

    pub(crate) async fn forget_attempts(&self, message_id: Uuid) -> Result<()> {
        self.inner
            .store
            .forget_attempts(&self.inner.consumer, message_id)
            .await
    }
}
