//! Payments API and worker (seeds 001 and 004).
//!
//! - `POST /api/payment` stores a `Pending` payment and its `PaymentCreated` event in one
//!   transaction.
//! - The worker handles `PaymentCreated` with a typed handler: a simulated payment gateway that
//!   fails at random. Failures are retried with backoff; after [`Config::max_attempts`] the
//!   payment is `Rejected` and the outbox row records why. On success the payment is `Paid`
//!   and a `PaymentConfirmed` event (the confirmation e-mail) is enqueued in the same
//!   transaction; the relay publishes it to the configured broker.
//! - The handler is idempotent, because the relay delivers at least once (a worker killed
//!   after charging, before its outcome was recorded, gets the event again): it re-reads the
//!   payment first and does nothing unless it is still `Pending`, and it charges with the
//!   event id as the gateway's idempotency key, so a key the gateway already charged is
//!   answered "charged" without charging again.
//! - `GET /api/payment/status/{paymentId}` reports `Pending`, `Paid` or `Rejected`.

mod api;
mod store;

use outbox::{
    DeliveryResult, Dispatcher, Envelope, HandlerContext, HandlerError, Outbox, OutboxEvent, Relay,
    RetryPolicy, Router, Transport,
};
use serde::{Deserialize, Serialize};
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;
use uuid::Uuid;

pub use api::{MAX_BODY_BYTES, MAX_FIELD_CHARS};
pub use store::Store;

/// A payment request was accepted.
#[derive(Debug, Clone, Serialize, Deserialize, OutboxEvent)]
#[outbox(
    event_type = "payment.created",
    aggregate_type = "payment",
    topic = "payments"
)]
pub struct PaymentCreated {
    #[outbox(aggregate_id)]
    pub payment_id: Uuid,
    pub token_card: String,
    pub amount: i64,
    pub currency: String,
    pub card_holder_name: String,
    pub card_holder_email: String,
}

/// A payment went through: send the confirmation e-mail.
#[derive(Debug, Clone, Serialize, Deserialize, OutboxEvent)]
#[outbox(
    event_type = "payment.confirmed",
    aggregate_type = "payment",
    topic = "payments"
)]
pub struct PaymentConfirmed {
    #[outbox(aggregate_id)]
    pub payment_id: Uuid,
    pub card_holder_email: String,
    pub amount: i64,
    pub currency: String,
}

/// Which parts of the service run in this process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// The HTTP API only.
    Api,
    /// The relay and the payment worker only.
    Worker,
    /// Both.
    All,
}

/// Where `PaymentConfirmed` goes.
#[derive(Debug, Clone)]
pub enum Broker {
    /// Print the e-mail that would be sent (no server needed).
    Log,
    /// NATS JetStream, on subject `[prefix.]payments.payment.confirmed` of stream `PAYMENTS`
    /// (or `<prefix>_PAYMENTS`), created if missing.
    Nats { url: String, prefix: Option<String> },
}

/// The database when `DATABASE_URL` is unset: a SQLite file in the working directory.
pub const DEFAULT_DATABASE_URL: &str = "sqlite://payments.db";

/// The service's settings, from the environment in `main`.
#[derive(Debug, Clone)]
pub struct Config {
    /// `postgres://…`, or `sqlite://<path>` for a SQLite file (created if missing); `None` is
    /// [`DEFAULT_DATABASE_URL`].
    pub database_url: Option<String>,
    /// Where to listen.
    pub listen: SocketAddr,
    /// Chance that the simulated gateway declines an attempt (the seed uses 30 %).
    pub failure_rate: f64,
    /// Gateway attempts before a payment is rejected (the seed uses 3).
    pub max_attempts: u32,
    /// How long the simulated gateway takes to answer after charging: the window in which a
    /// worker that dies has charged a card without recording it.
    pub gateway_latency: Duration,
    /// First retry delay; it doubles per attempt.
    pub retry_base: Duration,
    /// Where confirmations go.
    pub broker: Broker,
}

impl Config {
    /// Reads `DATABASE_URL`, `PORT`, `FAILURE_RATE`, `MAX_ATTEMPTS`, `GATEWAY_LATENCY_MS`,
    /// `BROKER` (`log` or `nats`), `NATS_URL` and `NATS_SUBJECT_PREFIX` (see the README).
    pub fn from_env() -> Result<Self, String> {
        let var = |name: &str| std::env::var(name).ok().filter(|v| !v.is_empty());
        let port: u16 =
            var("PORT").map_or(Ok(8080), |p| p.parse().map_err(|e| format!("PORT: {e}")))?;
        let failure_rate: f64 = var("FAILURE_RATE").map_or(Ok(0.3), |r| {
            r.parse().map_err(|e| format!("FAILURE_RATE: {e}"))
        })?;
        if !(0.0..=1.0).contains(&failure_rate) {
            return Err("FAILURE_RATE must be between 0 and 1".into());
        }
        let max_attempts = var("MAX_ATTEMPTS").map_or(Ok(3), |r| {
            r.parse().map_err(|e| format!("MAX_ATTEMPTS: {e}"))
        })?;
        let gateway_latency = var("GATEWAY_LATENCY_MS").map_or(Ok(0), |r| {
            r.parse().map_err(|e| format!("GATEWAY_LATENCY_MS: {e}"))
        })?;
        let broker = match var("BROKER").as_deref() {
            None | Some("log") => Broker::Log,
            Some("nats") => Broker::Nats {
                url: var("NATS_URL").unwrap_or_else(|| "127.0.0.1:4222".into()),
                prefix: var("NATS_SUBJECT_PREFIX"),
            },
            Some(other) => return Err(format!("BROKER: unknown broker {other:?} (log or nats)")),
        };
        Ok(Self {
            database_url: var("DATABASE_URL"),
            listen: SocketAddr::from(([127, 0, 0, 1], port)),
            failure_rate,
            max_attempts,
            gateway_latency: Duration::from_millis(gateway_latency),
            retry_base: Duration::from_millis(500),
            broker,
        })
    }
}

/// What the worker's handler needs from the service, whatever the database.
pub trait Payments: Send + Sync + 'static {
    /// The payment's status (`Pending`, `Paid`, `Rejected`), `None` if there is no such payment.
    fn status(
        &self,
        payment_id: Uuid,
    ) -> Pin<Box<dyn Future<Output = Result<Option<String>, HandlerError>> + Send + '_>>;

    /// Marks the payment `Paid` and enqueues its confirmation, in one transaction. Does nothing
    /// if the payment is no longer pending (a redelivered event).
    fn mark_paid<'a>(
        &'a self,
        event: &'a PaymentCreated,
    ) -> Pin<Box<dyn Future<Output = Result<(), HandlerError>> + Send + 'a>>;

    /// Marks the payment `Rejected` with `reason`, if it is still pending.
    fn mark_rejected<'a>(
        &'a self,
        payment_id: Uuid,
        reason: &'a str,
    ) -> Pin<Box<dyn Future<Output = Result<(), HandlerError>> + Send + 'a>>;
}

/// The service's shared state.
#[derive(Debug)]
pub struct App<DB: Store> {
    pub outbox: Outbox<DB>,
    pub config: Config,
}

impl<DB: Store> Payments for App<DB> {
    fn status(
        &self,
        payment_id: Uuid,
    ) -> Pin<Box<dyn Future<Output = Result<Option<String>, HandlerError>> + Send + '_>> {
        Box::pin(async move {
            let row = DB::payment(self.outbox.pool(), payment_id).await?;
            Ok(row.map(|row| row.status))
        })
    }

    fn mark_paid<'a>(
        &'a self,
        event: &'a PaymentCreated,
    ) -> Pin<Box<dyn Future<Output = Result<(), HandlerError>> + Send + 'a>> {
        Box::pin(async move {
            let mut tx = self.outbox.pool().begin().await?;
            if DB::settle(&mut *tx, event.payment_id, "Paid", None).await? {
                let confirmed = PaymentConfirmed {
                    payment_id: event.payment_id,
                    card_holder_email: event.card_holder_email.clone(),
                    amount: event.amount,
                    currency: event.currency.clone(),
                };
                self.outbox
                    .enqueue(&mut *tx, &confirmed)
                    .await
                    .map_err(HandlerError::retry)?;
            }
            tx.commit().await?;
            Ok(())
        })
    }

    fn mark_rejected<'a>(
        &'a self,
        payment_id: Uuid,
        reason: &'a str,
    ) -> Pin<Box<dyn Future<Output = Result<(), HandlerError>> + Send + 'a>> {
        Box::pin(async move {
            let mut tx = self.outbox.pool().begin().await?;
            DB::settle(&mut *tx, payment_id, "Rejected", Some(reason)).await?;
            tx.commit().await?;
            Ok(())
        })
    }
}

/// The simulated gateway's memory: the idempotency key of every charge it made. It lives in
/// the table `gateway_charges` of the service's database, standing for the gateway's own
/// records (which survive a crash of the worker).
pub trait ChargeLedger: Send + Sync + 'static {
    /// Whether a charge was made under `key`.
    fn charged(&self, key: Uuid) -> Pin<Box<dyn Future<Output = sqlx::Result<bool>> + Send + '_>>;

    /// Records a charge under `key`, unless one exists; `false` if it did.
    fn record_charge<'a>(
        &'a self,
        key: Uuid,
        event: &'a PaymentCreated,
    ) -> Pin<Box<dyn Future<Output = sqlx::Result<bool>> + Send + 'a>>;
}

impl<DB: Store> ChargeLedger for App<DB> {
    fn charged(&self, key: Uuid) -> Pin<Box<dyn Future<Output = sqlx::Result<bool>> + Send + '_>> {
        DB::charged(self.outbox.pool(), key)
    }

    fn record_charge<'a>(
        &'a self,
        key: Uuid,
        event: &'a PaymentCreated,
    ) -> Pin<Box<dyn Future<Output = sqlx::Result<bool>> + Send + 'a>> {
        DB::record_charge(self.outbox.pool(), key, event)
    }
}

/// Why the gateway did not charge.
#[derive(Debug)]
pub enum ChargeError {
    /// The card was declined: counts towards rejecting the payment.
    Declined(String),
    /// The gateway could not be asked (its records were unreachable): try again later.
    Unavailable(String),
}

/// The simulated payment gateway: declines at random, and charges an idempotency key at most
/// once (a repeated key that was charged is answered with success, and nothing is charged).
/// A declined attempt charges nothing, so it is not remembered: retrying it may succeed.
#[derive(Clone)]
pub struct Gateway {
    pub failure_rate: f64,
    pub latency: Duration,
    pub ledger: Arc<dyn ChargeLedger>,
}

impl std::fmt::Debug for Gateway {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gateway")
            .field("failure_rate", &self.failure_rate)
            .field("latency", &self.latency)
            .finish_non_exhaustive()
    }
}

impl Gateway {
    /// Charges the card of `event` once per `idempotency_key`.
    pub async fn charge(
        &self,
        idempotency_key: Uuid,
        event: &PaymentCreated,
    ) -> Result<(), ChargeError> {
        let unavailable = |e: sqlx::Error| ChargeError::Unavailable(format!("gateway: {e}"));
        if self
            .ledger
            .charged(idempotency_key)
            .await
            .map_err(unavailable)?
        {
            tracing::info!(payment_id = %event.payment_id, key = %idempotency_key,
                "gateway: key already charged, not charging again");
            return Ok(());
        }
        if fastrand::f64() < self.failure_rate {
            return Err(ChargeError::Declined(format!(
                "gateway declined card {} for {} {}",
                mask(&event.token_card),
                event.amount,
                event.currency
            )));
        }
        // The primary key on the idempotency key makes the charge happen at most once, even
        // if two deliveries of the event raced here.
        self.ledger
            .record_charge(idempotency_key, event)
            .await
            .map_err(unavailable)?;
        // The answer travels back: a worker killed now has charged without knowing it.
        tokio::time::sleep(self.latency).await;
        Ok(())
    }
}

/// The attempts allowed before a payment is rejected.
#[derive(Debug, Clone, Copy)]
pub struct MaxAttempts(pub u32);

fn mask(token: &str) -> String {
    let tail: String = token
        .chars()
        .rev()
        .take(4)
        .collect::<Vec<_>>()
        .into_iter()
        .rev()
        .collect();
    format!("****{tail}")
}

#[outbox::handler]
async fn on_payment_created(
    event: PaymentCreated,
    ctx: HandlerContext,
) -> Result<(), HandlerError> {
    let payments = ctx.state::<Arc<dyn Payments>>()?;
    let gateway = ctx.state::<Gateway>()?;
    let MaxAttempts(max_attempts) = *ctx.state::<MaxAttempts>()?;
    // At-least-once delivery: this event may have been handled already (the worker died before
    // the relay recorded it). A payment that is no longer pending is done; charging it again
    // would charge a paid payment twice, or a rejected one at all.
    match payments.status(event.payment_id).await?.as_deref() {
        Some("Pending") => {}
        Some(status) => {
            tracing::info!(payment_id = %event.payment_id, status, "already settled; nothing to do");
            return Ok(());
        }
        None => return Err(HandlerError::fatal("no such payment")),
    }
    // The event id is the idempotency key: every delivery of this event asks for the same
    // charge, and the gateway makes it once.
    match gateway.charge(ctx.event_id(), &event).await {
        Ok(()) => {
            payments.mark_paid(&event).await?;
            tracing::info!(payment_id = %event.payment_id, attempt = ctx.attempt(), "payment paid");
            Ok(())
        }
        Err(ChargeError::Unavailable(reason)) => Err(HandlerError::retry(reason)),
        Err(ChargeError::Declined(reason)) if ctx.attempt() < max_attempts => {
            Err(HandlerError::retry(reason))
        }
        Err(ChargeError::Declined(reason)) => {
            let reason = format!("rejected after {} attempts: {reason}", ctx.attempt());
            payments.mark_rejected(event.payment_id, &reason).await?;
            tracing::info!(payment_id = %event.payment_id, %reason, "payment rejected");
            Err(HandlerError::fatal(reason))
        }
    }
}

/// Prints the confirmation e-mail instead of publishing it: the default when no broker is set.
#[derive(Debug)]
pub struct LogTransport;

impl Transport for LogTransport {
    fn name(&self) -> &str {
        "broker"
    }

    async fn publish(&self, batch: &[Envelope]) -> Vec<DeliveryResult> {
        batch
            .iter()
            .map(|e| {
                let confirmed: PaymentConfirmed = serde_json::from_str(&e.payload)
                    .map_err(|err| outbox::DeliveryError::permanent(err.to_string()))?;
                println!(
                    "confirmation e-mail to {}: payment {} of {} {} went through",
                    confirmed.card_holder_email,
                    confirmed.payment_id,
                    confirmed.amount,
                    confirmed.currency
                );
                Ok(())
            })
            .collect()
    }
}

/// A running service: stop it with [`Running::stop`].
#[derive(Debug)]
pub struct Running {
    /// Where the API listens (if it runs here).
    pub addr: Option<SocketAddr>,
    shutdown: outbox::CancellationToken,
    tasks: Vec<tokio::task::JoinHandle<Result<(), String>>>,
}

impl Running {
    /// Waits until `shutdown` is cancelled elsewhere or a part fails.
    pub async fn wait(self) -> Result<(), String> {
        for task in self.tasks {
            task.await.map_err(|e| e.to_string())??;
        }
        Ok(())
    }

    /// Graceful stop: the API stops accepting, the relay finishes its batch.
    pub async fn stop(self) -> Result<(), String> {
        self.shutdown.cancel();
        self.wait().await
    }
}

/// Starts the service on the database of `config`.
pub async fn start(
    config: Config,
    role: Role,
    shutdown: outbox::CancellationToken,
) -> Result<Running, String> {
    let url = config
        .database_url
        .clone()
        .unwrap_or_else(|| DEFAULT_DATABASE_URL.to_owned());
    if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        let pool = sqlx::postgres::PgPoolOptions::new()
            .max_connections(16)
            .connect(&url)
            .await
            .map_err(|e| format!("cannot connect to PostgreSQL: {e}"))?;
        return start_with(pool, config, role, shutdown).await;
    }
    match url
        .strip_prefix("sqlite://")
        .or_else(|| url.strip_prefix("sqlite:"))
    {
        Some(path) if !path.is_empty() => {
            let path = std::path::Path::new(path);
            let pool = sqlx::sqlite::SqlitePoolOptions::new()
                .max_connections(4)
                .connect_with(
                    sqlx::sqlite::SqliteConnectOptions::new()
                        .filename(path)
                        .create_if_missing(true)
                        .journal_mode(sqlx::sqlite::SqliteJournalMode::Wal)
                        .busy_timeout(Duration::from_secs(10)),
                )
                .await
                .map_err(|e| format!("cannot open {}: {e}", path.display()))?;
            tracing::info!(database = %path.display(), "using SQLite");
            start_with(pool, config, role, shutdown).await
        }
        _ => Err(format!(
            "DATABASE_URL must be postgres://… or sqlite://<path> (or unset, for {DEFAULT_DATABASE_URL})"
        )),
    }
}

async fn start_with<DB: Store>(
    pool: sqlx::Pool<DB>,
    config: Config,
    role: Role,
    shutdown: outbox::CancellationToken,
) -> Result<Running, String> {
    let outbox = Outbox::new(pool.clone());
    outbox.migrate().await.map_err(|e| e.to_string())?;
    DB::create_schema(&pool).await.map_err(|e| e.to_string())?;
    let app = Arc::new(App {
        outbox: outbox.clone(),
        config: config.clone(),
    });
    let mut tasks = Vec::new();
    let mut addr = None;

    if role != Role::Worker {
        let listener = tokio::net::TcpListener::bind(config.listen)
            .await
            .map_err(|e| format!("cannot listen on {}: {e}", config.listen))?;
        addr = Some(listener.local_addr().map_err(|e| e.to_string())?);
        let router = api::router(app.clone());
        let shutdown = shutdown.clone();
        tasks.push(tokio::spawn(async move {
            axum::serve(listener, router)
                .with_graceful_shutdown(async move { shutdown.cancelled().await })
                .await
                .map_err(|e| e.to_string())
        }));
    }

    if role != Role::Api {
        let registry = outbox::Registry::from_inventory().map_err(|e| e.to_string())?;
        registry
            .require_event::<PaymentCreated>()
            .map_err(|e| e.to_string())?;
        let payments: Arc<dyn Payments> = app.clone();
        let handlers = Dispatcher::new(registry)
            .state(payments)
            .state(Gateway {
                failure_rate: config.failure_rate,
                latency: config.gateway_latency,
                ledger: app.clone(),
            })
            .state(MaxAttempts(config.max_attempts));
        let router = match &config.broker {
            Broker::Log => Router::builder()
                .transport(handlers)
                .transport(LogTransport),
            Broker::Nats { url, prefix } => {
                let client = outbox::nats::async_nats::connect(url)
                    .await
                    .map_err(|e| format!("cannot reach NATS at {url}: {e}"))?;
                let js = outbox::nats::async_nats::jetstream::new(client);
                let (stream, subjects, transport) = match prefix {
                    Some(p) => (
                        format!("{}_PAYMENTS", p.to_uppercase()),
                        format!("{p}.payments.>"),
                        outbox::nats::NatsTransport::new(js.clone()).subject_prefix(p),
                    ),
                    None => (
                        "PAYMENTS".into(),
                        "payments.>".into(),
                        outbox::nats::NatsTransport::new(js.clone()),
                    ),
                };
                outbox::nats::ensure_stream(&js, &stream, vec![subjects])
                    .await
                    .map_err(|e| format!("cannot create stream {stream}: {e}"))?;
                Router::builder()
                    .transport(handlers)
                    .transport(transport.named("broker"))
            }
        }
        .route_event::<PaymentCreated>("handlers")
        .route_event::<PaymentConfirmed>("broker")
        .build()
        .map_err(|e| e.to_string())?;
        // The handler decides when a payment is rejected; the relay keeps retrying past that
        // only when recording the decision itself failed (a database hiccup).
        let relay = Relay::builder(outbox, router)
            .retry(
                RetryPolicy::exponential(config.retry_base)
                    .max_delay(config.retry_base * 8)
                    .max_attempts(config.max_attempts + 5),
            )
            .poll_interval(Duration::from_millis(200))
            .build()
            .map_err(|e| e.to_string())?;
        let shutdown = shutdown.clone();
        tasks.push(tokio::spawn(async move {
            relay.run(shutdown).await.map_err(|e| e.to_string())
        }));
    }
    Ok(Running {
        addr,
        shutdown,
        tasks,
    })
}
