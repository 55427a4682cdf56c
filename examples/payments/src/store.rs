//! The payments table, on PostgreSQL or SQLite: the same SQL, stamped out for each.

use outbox::Backend;
use uuid::Uuid;

type BoxFuture<'a, T> = std::pin::Pin<Box<dyn std::future::Future<Output = T> + Send + 'a>>;

/// One payment, as `GET /api/payment/status` reports it.
#[derive(Debug, Clone)]
pub struct PaymentRow {
    pub status: String,
    pub failure_reason: Option<String>,
}

/// The business queries of the service.
pub trait Store: Backend {
    /// Creates the `payments` table and the gateway's `gateway_charges` if missing.
    fn create_schema(pool: &sqlx::Pool<Self>) -> BoxFuture<'_, sqlx::Result<()>>;

    /// Inserts a `Pending` payment in the caller's transaction.
    fn insert_payment<'c>(
        conn: &'c mut Self::Connection,
        payment: &'c crate::PaymentCreated,
    ) -> BoxFuture<'c, sqlx::Result<()>>;

    /// Moves a pending payment to `status`; `false` if it was not pending any more.
    fn settle<'c>(
        conn: &'c mut Self::Connection,
        payment_id: Uuid,
        status: &'static str,
        reason: Option<&'c str>,
    ) -> BoxFuture<'c, sqlx::Result<bool>>;

    /// The payment, if it exists.
    fn payment(
        pool: &sqlx::Pool<Self>,
        payment_id: Uuid,
    ) -> BoxFuture<'_, sqlx::Result<Option<PaymentRow>>>;

    /// Whether the gateway made a charge under `key`.
    fn charged(pool: &sqlx::Pool<Self>, key: Uuid) -> BoxFuture<'_, sqlx::Result<bool>>;

    /// Records the gateway's charge under `key`, unless one exists; `false` if it did.
    fn record_charge<'a>(
        pool: &'a sqlx::Pool<Self>,
        key: Uuid,
        payment: &'a crate::PaymentCreated,
    ) -> BoxFuture<'a, sqlx::Result<bool>>;
}

// PostgreSQL and SQLite both read `$1`-style parameters, so one body serves both.
macro_rules! store {
    ($db:ty) => {
        impl Store for $db {
            fn create_schema(pool: &sqlx::Pool<Self>) -> BoxFuture<'_, sqlx::Result<()>> {
                Box::pin(async move {
                    sqlx::query(
                        "CREATE TABLE IF NOT EXISTS payments (
                            id TEXT PRIMARY KEY,
                            token_card TEXT NOT NULL,
                            amount BIGINT NOT NULL,
                            currency TEXT NOT NULL,
                            card_holder_name TEXT NOT NULL,
                            card_holder_email TEXT NOT NULL,
                            status TEXT NOT NULL,
                            failure_reason TEXT
                        )",
                    )
                    .execute(pool)
                    .await?;
                    // The simulated gateway's own records: one row per charge it made, keyed
                    // by the idempotency key the worker sent.
                    sqlx::query(
                        "CREATE TABLE IF NOT EXISTS gateway_charges (
                            idempotency_key TEXT PRIMARY KEY,
                            payment_id TEXT NOT NULL,
                            amount BIGINT NOT NULL,
                            currency TEXT NOT NULL
                        )",
                    )
                    .execute(pool)
                    .await?;
                    Ok(())
                })
            }

            fn charged(pool: &sqlx::Pool<Self>, key: Uuid) -> BoxFuture<'_, sqlx::Result<bool>> {
                Box::pin(async move {
                    let found: Option<i32> = sqlx::query_scalar(
                        "SELECT 1 FROM gateway_charges WHERE idempotency_key = $1",
                    )
                    .bind(key.to_string())
                    .fetch_optional(pool)
                    .await?;
                    Ok(found.is_some())
                })
            }

            fn record_charge<'a>(
                pool: &'a sqlx::Pool<Self>,
                key: Uuid,
                p: &'a crate::PaymentCreated,
            ) -> BoxFuture<'a, sqlx::Result<bool>> {
                Box::pin(async move {
                    let done = sqlx::query(
                        "INSERT INTO gateway_charges (idempotency_key, payment_id, amount, currency)
                         VALUES ($1, $2, $3, $4)
                         ON CONFLICT (idempotency_key) DO NOTHING",
                    )
                    .bind(key.to_string())
                    .bind(p.payment_id.to_string())
                    .bind(p.amount)
                    .bind(&p.currency)
                    .execute(pool)
                    .await?;
                    Ok(done.rows_affected() == 1)
                })
            }

            fn insert_payment<'c>(
                conn: &'c mut Self::Connection,
                p: &'c crate::PaymentCreated,
            ) -> BoxFuture<'c, sqlx::Result<()>> {
                Box::pin(async move {
                    sqlx::query(
                        "INSERT INTO payments (id, token_card, amount, currency, card_holder_name,
                                               card_holder_email, status)
                         VALUES ($1, $2, $3, $4, $5, $6, 'Pending')",
                    )
                    .bind(p.payment_id.to_string())
                    .bind(&p.token_card)
                    .bind(p.amount)
                    .bind(&p.currency)
                    .bind(&p.card_holder_name)
                    .bind(&p.card_holder_email)
                    .execute(&mut *conn)
                    .await?;
                    Ok(())
                })
            }

            fn settle<'c>(
                conn: &'c mut Self::Connection,
                payment_id: Uuid,
                status: &'static str,
                reason: Option<&'c str>,
            ) -> BoxFuture<'c, sqlx::Result<bool>> {
                Box::pin(async move {
                    let done = sqlx::query(
                        "UPDATE payments SET status = $1, failure_reason = $2
                         WHERE id = $3 AND status = 'Pending'",
                    )
                    .bind(status)
                    .bind(reason)
                    .bind(payment_id.to_string())
                    .execute(&mut *conn)
                    .await?;
                    Ok(done.rows_affected() == 1)
                })
            }

            fn payment(
                pool: &sqlx::Pool<Self>,
                payment_id: Uuid,
            ) -> BoxFuture<'_, sqlx::Result<Option<PaymentRow>>> {
                Box::pin(async move {
                    let row: Option<(String, Option<String>)> =
                        sqlx::query_as("SELECT status, failure_reason FROM payments WHERE id = $1")
                            .bind(payment_id.to_string())
                            .fetch_optional(pool)
                            .await?;
                    Ok(row.map(|(status, failure_reason)| PaymentRow {
                        status,
                        failure_reason,
                    }))
                })
            }
        }
    };
}

store!(sqlx::Postgres);
store!(sqlx::Sqlite);
