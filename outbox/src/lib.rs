//! # outbox
//!
//! The transactional outbox pattern for Rust services built on sqlx and tokio.
//!
//! Write your business rows and the events that describe them in **one database transaction**;
//! a [`Relay`] later delivers the events to typed handlers or to a broker, and marks each one
//! delivered only after the destination confirmed it.
//!
//! ```no_run
//! # #[cfg(feature = "sqlite")]
//! # mod demo {
//! use outbox::{Dispatcher, HandlerContext, HandlerError, Outbox, OutboxEvent, Relay};
//! use serde::{Deserialize, Serialize};
//!
//! #[derive(Serialize, Deserialize, OutboxEvent)]
//! #[outbox(event_type = "payment.created", aggregate_type = "payment", topic = "payments")]
//! pub struct PaymentCreated {
//!     #[outbox(aggregate_id)]
//!     pub payment_id: uuid::Uuid,
//!     pub amount: i64,
//! }
//!
//! #[outbox::handler]
//! async fn on_payment_created(event: PaymentCreated, ctx: HandlerContext) -> Result<(), HandlerError> {
//!     println!("payment {} created (attempt {})", event.payment_id, ctx.attempt());
//!     Ok(())
//! }
//!
//! async fn run(pool: sqlx::SqlitePool) -> Result<(), outbox::Error> {
//!     let outbox = Outbox::new(pool.clone());
//!     outbox.migrate().await?;
//!
//!     let mut tx = pool.begin().await?;
//!     // ... your own INSERT/UPDATE on &mut *tx ...
//!     outbox.enqueue(&mut *tx, &PaymentCreated { payment_id: uuid::Uuid::now_v7(), amount: 1000 }).await?;
//!     tx.commit().await?;
//!
//!     let relay = Relay::builder(outbox, Dispatcher::from_inventory()?).build()?;
//!     relay.run(outbox::CancellationToken::new()).await
//! }
//! # }
//! ```
//!
//! ## Features
//!
//! | feature    | what it turns on                              |
//! |------------|-----------------------------------------------|
//! | `postgres` | the PostgreSQL store (`LISTEN`/`NOTIFY` wake-ups) |
//! | `sqlite`   | the SQLite store (embedded, polling)          |
//! | `mysql`    | the MySQL 8 / MariaDB 10.6+ store (polling)   |
//! | `kafka`    | the Kafka transport (`outbox-kafka`)          |
//! | `amqp`     | the RabbitMQ transport (`outbox-amqp`)        |
//! | `nats`     | the NATS JetStream transport (`outbox-nats`)  |
//! | `opentelemetry` | W3C trace context from the enqueuing span to the consumer's handler |
//! | `dashboard` | `outbox::dashboard`: a web page to mount in your axum app |
//!
//! Features are additive: all of them together build and work.
//!
//! ## Handlers and the linker
//!
//! `#[outbox::handler]` registers a handler at compile time through `inventory`. A handler
//! defined in a library crate that your binary never otherwise references can be dropped by the
//! linker: name the crate in the binary (`use my_handlers as _;` in `main.rs`), and check at
//! start-up with [`Registry::require`] (or [`Registry::require_event`]) so a missing handler is
//! an error at boot rather than events going dead later.
#![cfg_attr(docsrs, feature(doc_cfg))]

pub use outbox_core::*;

/// The `chrono` version in the API (`enqueue_at` takes a `chrono::DateTime<Utc>`).
pub use chrono;
/// The `uuid` version in the API (event ids are `uuid::Uuid` v7).
pub use uuid;

/// `#[derive(OutboxEvent)]`: implements [`OutboxEvent`] for a struct with named fields.
///
/// Attributes on the struct, all optional, in `#[outbox(...)]`:
///
/// | key              | meaning | default |
/// |------------------|---------|---------|
/// | `event_type = "…"`     | the event type name | the struct's name |
/// | `aggregate_type = "…"` | the aggregate type  | the aggregate id field's name without a trailing `_id` (`payment_id` → `payment`); for a field named `id`, the struct's name in snake case |
/// | `version = N`          | the schema version  | `1` |
/// | `topic = "…"`          | the route (topic, exchange, subject base) | the aggregate type |
/// | `crate = "…"`          | path of the `outbox` crate in generated code | `::outbox` |
///
/// Exactly one field carries `#[outbox(aggregate_id)]`; its type must implement `Display`.
///
/// ```
/// use outbox::OutboxEvent;
/// use serde::{Deserialize, Serialize};
///
/// #[derive(Serialize, Deserialize, OutboxEvent)]
/// #[outbox(event_type = "stock.changed", version = 2)]
/// struct StockChanged {
///     #[outbox(aggregate_id)]
///     sku_id: String,
///     quantity: i64,
/// }
///
/// assert_eq!(StockChanged::EVENT_TYPE, "stock.changed");
/// assert_eq!(StockChanged::AGGREGATE_TYPE, "sku");
/// assert_eq!(StockChanged::TOPIC, "sku");
/// assert_eq!(StockChanged::SCHEMA_VERSION, 2);
/// let event = StockChanged { sku_id: "A-1".into(), quantity: 3 };
/// assert_eq!(event.aggregate_id(), "A-1");
/// ```
pub use outbox_derive::OutboxEvent;

/// `#[outbox::handler]`: registers an `async fn` as the handler of its first argument's event
/// type, at compile time.
///
/// The function takes the event (a type implementing [`OutboxEvent`] and `Deserialize`) and,
/// optionally, a [`HandlerContext`], and returns `Result<(), HandlerError>`. One handler per
/// event type and schema version: [`Registry::from_inventory`] rejects duplicates.
///
/// ```
/// # use serde::{Deserialize, Serialize};
/// # #[derive(Serialize, Deserialize, outbox::OutboxEvent)]
/// # struct UserSignedUp { #[outbox(aggregate_id)] user_id: u64 }
/// use outbox::{HandlerContext, HandlerError};
///
/// #[outbox::handler]
/// async fn send_welcome_mail(event: UserSignedUp, ctx: HandlerContext) -> Result<(), HandlerError> {
///     println!("welcome, user {} (event {})", event.user_id, ctx.event_id());
///     Ok(())
/// }
///
/// let registry = outbox::Registry::from_inventory().unwrap();
/// registry.require_event::<UserSignedUp>().unwrap();
/// ```
pub use outbox_derive::handler;

#[cfg(feature = "kafka")]
#[cfg_attr(docsrs, doc(cfg(feature = "kafka")))]
pub use outbox_kafka as kafka;

#[cfg(feature = "amqp")]
#[cfg_attr(docsrs, doc(cfg(feature = "amqp")))]
pub use outbox_amqp as amqp;

#[cfg(feature = "nats")]
#[cfg_attr(docsrs, doc(cfg(feature = "nats")))]
pub use outbox_nats as nats;

#[cfg(feature = "dashboard")]
#[cfg_attr(docsrs, doc(cfg(feature = "dashboard")))]
pub use outbox_dashboard as dashboard;

/// Not public API: what generated code names.
#[doc(hidden)]
pub mod __private {
    pub use outbox_core::__private::*;
    pub use outbox_core::{HandlerContext, HandlerError, OutboxEvent};
}
