//! Core of the `outbox` framework. Depend on the `outbox` facade crate instead: it re-exports
//! everything here and adds the derive macros and broker transports.
#![cfg_attr(docsrs, feature(doc_cfg))]
// Without a store feature there is nothing to write events to; the types still compile.
#![cfg_attr(
    not(any(feature = "postgres", feature = "sqlite", feature = "mysql")),
    allow(dead_code)
)]

pub mod consumer;
mod destination;
mod error;
mod event;
pub mod handler;
mod inbox;
pub mod metrics;
mod receipt;
mod relay;
mod retention;
mod retry;
mod router;
mod store;
mod table;
mod trace;
mod upcast;
#[cfg(feature = "wal")]
#[cfg_attr(docsrs, doc(cfg(feature = "wal")))]
pub mod wal;

pub use consumer::Consumer;
pub use destination::{DeliveryError, DeliveryResult, Destination, Retry, StoppedRuns, Transport};
pub use error::{Error, Result};
pub use event::{
    header, is_reserved_header, wire, EnqueueOptions, Envelope, Headers, Message, OutboxEvent,
};
pub use handler::{
    Dispatcher, Extensions, HandlerContext, HandlerError, Registry, RegistryBuilder,
};
pub use inbox::Inbox;
pub use receipt::Receipt;
pub use relay::{DeadLetters, Relay, RelayBuilder, MAX_LEASE, MAX_RESTARTS};
pub use retention::Retention;
pub use retry::RetryPolicy;
pub use router::{Router, RouterBuilder};
#[cfg(feature = "mysql")]
#[cfg_attr(docsrs, doc(cfg(feature = "mysql")))]
pub use store::mysql::{MySqlInbox, MySqlStore};
#[cfg(feature = "postgres")]
#[cfg_attr(docsrs, doc(cfg(feature = "postgres")))]
pub use store::postgres::{PgInbox, PgStore};
#[cfg(feature = "sqlite")]
#[cfg_attr(docsrs, doc(cfg(feature = "sqlite")))]
pub use store::sqlite::{SqliteInbox, SqliteStore};
pub use store::{
    dead_fingerprint, group_dead, normalise_reason, ArchiveDead, Backend, Check, Claim, DeadEvent,
    DeadGroup, Discard, Enqueued, EventFilter, EventRecord, EventStatus, ExplainClaim,
    FailedAttempt, Fate, FullStore, InboxStore, Inconsistency, Inspect, Lookup, MarkConsumed,
    Outbox, OutboxBuilder, OutboxStatus, ParkedAggregate, Partitions, Republish, Requeue, Run,
    RunEvent, Settlement, StatusCount, Store, StoreOptions, StuckAggregate, TableLayout, TailMode,
};
pub use table::{TableName, MAX_TABLE_NAME_LEN};

pub use tokio_util::sync::CancellationToken;

/// Not public API: what generated code names.
#[doc(hidden)]
pub mod __private {
    pub use crate::handler::{call_handler, CallError, HandlerRegistration};
    pub use crate::upcast::{same_str, UpcasterRegistration};
    pub use futures_util::future::BoxFuture;
    pub use inventory;
    pub use serde::Serialize;
    pub use std::{concat, module_path, string::String, string::ToString, stringify};
}
