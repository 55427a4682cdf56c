//! Typed handlers: the registry built from `#[outbox::handler]` registrations, and the
//! [`Dispatcher`] that runs them as a relay destination.

use crate::destination::{DeliveryError, DeliveryResult, Transport};
use crate::error::{Error, Result};
use crate::event::{header, Envelope, Headers, OutboxEvent};
use crate::upcast::{upcast_json, upcast_with_from, Upcaster, UpcasterRegistration};
use chrono::{DateTime, Utc};
use futures_util::future::BoxFuture;
use futures_util::{FutureExt, StreamExt};
use serde::de::DeserializeOwned;
use std::any::{Any, TypeId};
use std::borrow::Cow;
use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::Duration;
use tracing::Instrument;
use uuid::Uuid;

/// What a handler returns when it cannot finish: retry later, or give up.
///
/// Any `std::error::Error` converts into a retryable `HandlerError`, so `?` works on database and
/// I/O errors; use [`HandlerError::fatal`] for failures that retrying cannot fix.
#[derive(Debug)]
pub enum HandlerError {
    /// Try again: after the retry policy's backoff, or no earlier than `after`.
    Retry {
        /// Why it failed.
        reason: String,
        /// The earliest moment to retry, if the handler knows better than the policy.
        after: Option<Duration>,
    },
    /// Give up: the event goes dead at once with this reason.
    Fatal {
        /// Why it failed.
        reason: String,
    },
}

impl HandlerError {
    /// A retryable failure.
    pub fn retry(reason: impl fmt::Display) -> Self {
        Self::Retry {
            reason: reason.to_string(),
            after: None,
        }
    }

    /// A failure to retry no earlier than `delay` from now.
    pub fn retry_after(delay: Duration, reason: impl fmt::Display) -> Self {
        Self::Retry {
            reason: reason.to_string(),
            after: Some(delay),
        }
    }

    /// A failure that retrying cannot fix.
    pub fn fatal(reason: impl fmt::Display) -> Self {
        Self::Fatal {
            reason: reason.to_string(),
        }
    }
}

impl fmt::Display for HandlerError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Retry { reason, .. } | Self::Fatal { reason } => f.write_str(reason),
        }
    }
}

impl<E: std::error::Error> From<E> for HandlerError {
    fn from(error: E) -> Self {
        Self::retry(error)
    }
}

impl From<HandlerError> for DeliveryError {
    fn from(error: HandlerError) -> Self {
        match error {
            HandlerError::Retry {
                reason,
                after: None,
            } => DeliveryError::retry(reason),
            HandlerError::Retry {
                reason,
                after: Some(delay),
            } => DeliveryError::retry_after(delay, reason),
            HandlerError::Fatal { reason } => DeliveryError::permanent(reason),
        }
    }
}

/// Shared values handlers can reach through [`HandlerContext::state`] (a pool, a client,
/// configuration), keyed by type.
#[derive(Default, Clone)]
pub struct Extensions(HashMap<TypeId, Arc<dyn Any + Send + Sync>>);

impl Extensions {
    /// Adds `value`, replacing an earlier value of the same type.
    pub fn insert<T: Send + Sync + 'static>(&mut self, value: T) {
        self.0.insert(TypeId::of::<T>(), Arc::new(value));
    }

    /// The value of type `T`, if one was added.
    pub fn get<T: Send + Sync + 'static>(&self) -> Option<&T> {
        self.0.get(&TypeId::of::<T>())?.downcast_ref()
    }
}

impl fmt::Debug for Extensions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Extensions")
            .field("len", &self.0.len())
            .finish()
    }
}

/// What a handler knows about the event it handles, and the shared state.
#[derive(Debug, Clone)]
pub struct HandlerContext {
    event_id: Uuid,
    event_type: String,
    aggregate_type: String,
    aggregate_id: String,
    sequence: i64,
    schema_version: u32,
    attempt: u32,
    created_at: DateTime<Utc>,
    headers: Headers,
    state: Arc<Extensions>,
}

impl HandlerContext {
    /// Builds the context of `envelope`, with `state` reachable through [`state`](Self::state).
    pub fn new(envelope: &Envelope, state: Arc<Extensions>) -> Self {
        Self {
            event_id: envelope.id,
            event_type: envelope.event_type.clone(),
            aggregate_type: envelope.aggregate_type.clone(),
            aggregate_id: envelope.aggregate_id.clone(),
            sequence: envelope.sequence,
            schema_version: envelope.schema_version,
            attempt: envelope.attempt,
            created_at: envelope.created_at,
            headers: envelope.headers.clone(),
            state,
        }
    }

    /// The outbox id of the event: the key to deduplicate on.
    pub fn event_id(&self) -> Uuid {
        self.event_id
    }
    /// The event type.
    pub fn event_type(&self) -> &str {
        &self.event_type
    }
    /// The aggregate type.
    pub fn aggregate_type(&self) -> &str {
        &self.aggregate_type
    }
    /// The aggregate id.
    pub fn aggregate_id(&self) -> &str {
        &self.aggregate_id
    }
    /// The event's position in its aggregate (1, 2, 3, … in commit order).
    pub fn sequence(&self) -> i64 {
        self.sequence
    }
    /// The schema version the event was written with (before any upcasting).
    pub fn schema_version(&self) -> u32 {
        self.schema_version
    }
    /// Which attempt this is, starting at 1.
    pub fn attempt(&self) -> u32 {
        self.attempt
    }
    /// When the event was enqueued.
    pub fn created_at(&self) -> DateTime<Utc> {
        self.created_at
    }
    /// The stored headers.
    pub fn headers(&self) -> &Headers {
        &self.headers
    }
    /// The correlation id header, if any.
    pub fn correlation_id(&self) -> Option<&str> {
        self.headers.get(header::CORRELATION_ID).map(String::as_str)
    }
    /// The causation id header, if any.
    pub fn causation_id(&self) -> Option<&str> {
        self.headers.get(header::CAUSATION_ID).map(String::as_str)
    }

    /// The shared value of type `T` given to [`Dispatcher::state`].
    ///
    /// A missing value is a fatal handler error (a wiring mistake, not a transient failure).
    pub fn state<T: Send + Sync + 'static>(&self) -> Result<&T, HandlerError> {
        self.state.get::<T>().ok_or_else(|| {
            HandlerError::fatal(format!(
                "no state of type {} was given to the dispatcher",
                std::any::type_name::<T>()
            ))
        })
    }
}

/// Why a registered handler did not complete.
#[doc(hidden)]
#[derive(Debug)]
pub enum CallError {
    /// The payload did not deserialise into the handler's event type.
    Decode(serde_json::Error),
    /// The handler returned an error.
    Handler(HandlerError),
}

type ErasedHandler =
    Arc<dyn Fn(&str, HandlerContext) -> BoxFuture<'static, Result<(), CallError>> + Send + Sync>;

/// Deserialises `payload` into `E` and runs `handler`: the body of every registered handler.
#[doc(hidden)]
pub fn call_handler<E, F, Fut>(
    payload: &str,
    ctx: HandlerContext,
    handler: F,
) -> BoxFuture<'static, Result<(), CallError>>
where
    E: DeserializeOwned,
    F: FnOnce(E, HandlerContext) -> Fut,
    Fut: Future<Output = Result<(), HandlerError>> + Send + 'static,
{
    match serde_json::from_str::<E>(payload) {
        Ok(event) => handler(event, ctx)
            .map(|r| r.map_err(CallError::Handler))
            .boxed(),
        Err(error) => std::future::ready(Err(CallError::Decode(error))).boxed(),
    }
}

/// A handler registered at compile time by `#[outbox::handler]`. Collected with `inventory`.
#[doc(hidden)]
#[derive(Debug)]
pub struct HandlerRegistration {
    event_type: &'static str,
    version: u32,
    name: &'static str,
    call: fn(&str, HandlerContext) -> BoxFuture<'static, Result<(), CallError>>,
}

impl HandlerRegistration {
    #[doc(hidden)]
    pub const fn new<E: OutboxEvent>(
        name: &'static str,
        call: fn(&str, HandlerContext) -> BoxFuture<'static, Result<(), CallError>>,
    ) -> Self {
        Self {
            event_type: E::EVENT_TYPE,
            version: E::SCHEMA_VERSION,
            name,
            call,
        }
    }
}

inventory::collect!(HandlerRegistration);

#[derive(Clone)]
struct Entry {
    name: String,
    call: ErasedHandler,
}

/// The handlers of an application, by event type and schema version. Built once, at start-up.
///
/// ```no_run
/// # fn main() -> Result<(), outbox_core::Error> {
/// use outbox_core::Registry;
/// let registry = Registry::from_inventory()?;
/// // Fail fast if a handler was dropped by the linker or never written:
/// registry.require(&[("payment.created", 1), ("payment.confirmed", 1)])?;
/// # Ok(()) }
/// ```
#[derive(Clone, Default)]
pub struct Registry {
    handlers: HashMap<String, Vec<(u32, Entry)>>,
    /// Schema steps, by event type and the version they start from.
    upcasters: HashMap<(String, u32), Upcaster>,
}

impl fmt::Debug for Registry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut list = f.debug_list();
        for (event_type, versions) in &self.handlers {
            for (version, entry) in versions {
                list.entry(&format_args!("{event_type} v{version} -> {}", entry.name));
            }
        }
        for ((event_type, from), step) in &self.upcasters {
            list.entry(&format_args!(
                "{event_type} v{from} => v{} ({})",
                step.to, step.name
            ));
        }
        list.finish()
    }
}

impl Registry {
    /// Every handler registered with `#[outbox::handler]` in the binary.
    ///
    /// Fails with [`Error::DuplicateHandler`] when two handlers claim the same event type and
    /// version.
    ///
    /// Registrations in a library crate that the binary never otherwise references can be
    /// dropped by the linker (a known limit of `inventory`): reference the crate from the binary
    /// (`use my_handlers as _;` in `main.rs` is enough), and check with
    /// [`require`](Self::require) at start-up.
    ///
    /// Upcasters registered with `#[outbox(upcast_from = Old)]` come along; two for one step
    /// are an [`Error::DuplicateUpcaster`].
    pub fn from_inventory() -> Result<Self> {
        let mut builder = Self::builder();
        for registration in inventory::iter::<HandlerRegistration> {
            let call = registration.call;
            builder = builder.insert(
                registration.event_type,
                registration.version,
                registration.name.to_owned(),
                Arc::new(call),
            )?;
        }
        for registration in inventory::iter::<UpcasterRegistration> {
            if registration.from_event_type != registration.event_type {
                return Err(Error::Config(format!(
                    "upcaster {} turns {:?} into {:?}: an upcaster changes the version of one event type",
                    registration.name, registration.from_event_type, registration.event_type
                )));
            }
            let call = registration.call;
            builder = builder.insert_upcaster(
                registration.event_type,
                registration.from,
                Upcaster {
                    to: registration.to,
                    name: registration.name.to_owned(),
                    call: Arc::new(call),
                },
            )?;
        }
        Ok(builder.build())
    }

    /// An empty builder: for tests, or to register closures.
    pub fn builder() -> RegistryBuilder {
        RegistryBuilder {
            registry: Self::default(),
        }
    }

    /// Checks that events of each `(event_type, version)` reach a handler: one for that
    /// version, or one that upcasters lead to.
    pub fn require(&self, expected: &[(&str, u32)]) -> Result<()> {
        let missing: Vec<String> = expected
            .iter()
            .filter(|(event_type, version)| !self.handles(event_type, *version))
            .map(|(event_type, version)| format!("{event_type} v{version}"))
            .collect();
        if missing.is_empty() {
            Ok(())
        } else {
            Err(Error::MissingHandlers { missing })
        }
    }

    /// Checks that a handler exists for the event type `E` at its current schema version.
    pub fn require_event<E: OutboxEvent>(&self) -> Result<()> {
        self.require(&[(E::EVENT_TYPE, E::SCHEMA_VERSION)])
    }

    /// The number of registered handlers.
    pub fn len(&self) -> usize {
        self.handlers.values().map(Vec::len).sum()
    }

    /// Whether no handler is registered.
    pub fn is_empty(&self) -> bool {
        self.handlers.is_empty()
    }

    /// Whether some version of `event_type` has a handler.
    pub fn handles_type(&self, event_type: &str) -> bool {
        self.handlers.contains_key(event_type)
    }

    fn get(&self, event_type: &str, version: u32) -> Option<&Entry> {
        self.handlers
            .get(event_type)?
            .iter()
            .find(|(v, _)| *v == version)
            .map(|(_, entry)| entry)
    }

    /// Brings `payload` of `version` to a version with a handler, step by step (the first
    /// version with a handler wins). `Ok(None)`: the event type has no handler at all. A step
    /// that fails or panics is a reason: it would fail the same way on every attempt.
    fn upcast<'p>(
        &self,
        event_type: &str,
        version: u32,
        payload: &'p str,
    ) -> std::result::Result<Option<Upcast<'_, 'p>>, String> {
        let known = self.versions_of(event_type);
        if known.is_empty() {
            return Ok(None);
        }
        let (mut version, mut payload, mut steps) = (version, Cow::Borrowed(payload), Vec::new());
        loop {
            if let Some(entry) = self.get(event_type, version) {
                return Ok(Some(Upcast {
                    entry,
                    version,
                    payload,
                    steps,
                }));
            }
            let Some(step) = self.upcasters.get(&(event_type.to_owned(), version)) else {
                return Err(if known.iter().all(|k| *k < version) {
                    format!(
                        "event type {event_type:?} version {version} is newer than any this \
                         binary handles (handlers for versions {known:?}): deploy the consumer first"
                    )
                } else {
                    format!(
                        "no handler for event type {event_type:?} version {version} and no \
                         upcaster from it (handlers for versions {known:?}): a gap in the chain"
                    )
                });
            };
            let stepped = std::panic::catch_unwind(AssertUnwindSafe(|| (step.call)(&payload)))
                .unwrap_or_else(|panic| Err(format!("panicked: {}", panic_message(&*panic))));
            payload = Cow::Owned(stepped.map_err(|reason| {
                format!(
                    "upcaster {} (v{version} to v{}) failed: {reason}",
                    step.name, step.to
                )
            })?);
            steps.push(step.name.as_str());
            // Registration checks that each step raises the version: the loop ends.
            version = step.to;
        }
    }

    /// Whether events of `event_type` at `version` reach a handler, through upcasters if need
    /// be.
    fn handles(&self, event_type: &str, version: u32) -> bool {
        let mut version = version;
        loop {
            if self.get(event_type, version).is_some() {
                return true;
            }
            match self.upcasters.get(&(event_type.to_owned(), version)) {
                Some(step) => version = step.to,
                None => return false,
            }
        }
    }

    fn versions_of(&self, event_type: &str) -> Vec<u32> {
        self.handlers
            .get(event_type)
            .map(|v| v.iter().map(|(version, _)| *version).collect())
            .unwrap_or_default()
    }
}

/// A payload brought to a version with a handler.
struct Upcast<'r, 'p> {
    entry: &'r Entry,
    version: u32,
    payload: Cow<'p, str>,
    /// The upcasters it went through, in order.
    steps: Vec<&'r str>,
}

/// Builds a [`Registry`] by hand.
#[derive(Debug)]
pub struct RegistryBuilder {
    registry: Registry,
}

impl RegistryBuilder {
    /// Registers `handler` for events of type `E` at `E::SCHEMA_VERSION`.
    ///
    /// Fails with [`Error::DuplicateHandler`] if that type and version already has one.
    pub fn handler<E, F, Fut>(self, name: impl Into<String>, handler: F) -> Result<Self>
    where
        E: OutboxEvent + DeserializeOwned + 'static,
        F: Fn(E, HandlerContext) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<(), HandlerError>> + Send + 'static,
    {
        let call: ErasedHandler =
            Arc::new(move |payload, ctx| call_handler::<E, _, _>(payload, ctx, &handler));
        self.insert(E::EVENT_TYPE, E::SCHEMA_VERSION, name.into(), call)
    }

    /// Adds every `#[outbox::handler]` and `#[outbox(upcast_from = ...)]` registration (see
    /// [`Registry::from_inventory`]).
    pub fn with_inventory(mut self) -> Result<Self> {
        let found = Registry::from_inventory()?;
        for (event_type, versions) in found.handlers {
            for (version, entry) in versions {
                self = self.insert(&event_type, version, entry.name, entry.call)?;
            }
        }
        for ((event_type, from), step) in found.upcasters {
            self = self.insert_upcaster(&event_type, from, step)?;
        }
        Ok(self)
    }

    /// Adds only the upcasters registered with `#[outbox(upcast_from = ...)]`: for a registry
    /// whose handlers are registered by hand.
    pub fn with_inventory_upcasters(mut self) -> Result<Self> {
        for ((event_type, from), step) in Registry::from_inventory()?.upcasters {
            self = self.insert_upcaster(&event_type, from, step)?;
        }
        Ok(self)
    }

    /// Registers `From<Old> for New` as the step from `Old::SCHEMA_VERSION` to
    /// `New::SCHEMA_VERSION` of their event type (what `#[outbox(upcast_from = Old)]` on `New`
    /// does at compile time).
    pub fn upcast_from<Old, New>(self, name: impl Into<String>) -> Result<Self>
    where
        Old: OutboxEvent + DeserializeOwned + 'static,
        New: OutboxEvent + From<Old> + 'static,
    {
        if Old::EVENT_TYPE != New::EVENT_TYPE {
            return Err(Error::Config(format!(
                "upcaster {} turns {:?} into {:?}: an upcaster changes the version of one event type",
                name.into(),
                Old::EVENT_TYPE,
                New::EVENT_TYPE
            )));
        }
        self.insert_upcaster(
            New::EVENT_TYPE,
            Old::SCHEMA_VERSION,
            Upcaster {
                to: New::SCHEMA_VERSION,
                name: name.into(),
                call: Arc::new(upcast_with_from::<Old, New>),
            },
        )
    }

    /// Registers a step written on JSON values: payloads of `event_type` at version `from`
    /// become version `to` (for old versions that have no struct any more).
    pub fn upcast_json<F>(
        self,
        event_type: &str,
        from: u32,
        to: u32,
        name: impl Into<String>,
        step: F,
    ) -> Result<Self>
    where
        F: Fn(serde_json::Value) -> std::result::Result<serde_json::Value, String>
            + Send
            + Sync
            + 'static,
    {
        self.insert_upcaster(
            event_type,
            from,
            Upcaster {
                to,
                name: name.into(),
                call: upcast_json(step),
            },
        )
    }

    fn insert_upcaster(mut self, event_type: &str, from: u32, step: Upcaster) -> Result<Self> {
        if step.to <= from {
            return Err(Error::Config(format!(
                "upcaster {} goes from version {from} to {} of {event_type:?}: a step must raise the version",
                step.name, step.to
            )));
        }
        let key = (event_type.to_owned(), from);
        if let Some(existing) = self.registry.upcasters.get(&key) {
            return Err(Error::DuplicateUpcaster {
                event_type: event_type.to_owned(),
                from,
                first: existing.name.clone(),
                second: step.name,
            });
        }
        self.registry.upcasters.insert(key, step);
        Ok(self)
    }

    fn insert(
        mut self,
        event_type: &str,
        version: u32,
        name: String,
        call: ErasedHandler,
    ) -> Result<Self> {
        if let Some(existing) = self.registry.get(event_type, version) {
            return Err(Error::DuplicateHandler {
                event_type: event_type.to_owned(),
                version,
                first: existing.name.clone(),
                second: name,
            });
        }
        self.registry
            .handlers
            .entry(event_type.to_owned())
            .or_default()
            .push((version, Entry { name, call }));
        Ok(self)
    }

    /// The finished registry.
    pub fn build(self) -> Registry {
        self.registry
    }
}

/// Runs typed handlers: the relay destination for in-process handling, and the core of every
/// broker consumer.
///
/// An unknown event type is retried (the handler may arrive with the next deploy) and goes dead
/// after the maximum attempts; a payload that does not deserialise goes dead at once; a handler
/// that panics is a retryable failure whose reason is the panic message.
#[derive(Debug, Clone)]
pub struct Dispatcher {
    registry: Arc<Registry>,
    state: Arc<Extensions>,
    concurrency: usize,
}

impl Dispatcher {
    /// A dispatcher over `registry`, running up to 64 handlers at once.
    pub fn new(registry: Registry) -> Self {
        Self {
            registry: Arc::new(registry),
            state: Arc::default(),
            concurrency: 64,
        }
    }

    /// A dispatcher over every `#[outbox::handler]` in the binary.
    pub fn from_inventory() -> Result<Self> {
        Ok(Self::new(Registry::from_inventory()?))
    }

    /// Makes `value` reachable from handlers through [`HandlerContext::state`].
    pub fn state<T: Send + Sync + 'static>(mut self, value: T) -> Self {
        Arc::make_mut(&mut self.state).insert(value);
        self
    }

    /// How many handlers of one batch run at once (never two of one aggregate). Default 64.
    pub fn concurrency(mut self, n: usize) -> Self {
        self.concurrency = n.max(1);
        self
    }

    /// The registry.
    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// Runs the handler of one event.
    pub async fn dispatch(&self, envelope: &Envelope) -> DeliveryResult {
        let span = tracing::info_span!(
            "outbox.handle",
            event_id = %envelope.id,
            event_type = %envelope.event_type,
            aggregate_type = %envelope.aggregate_type,
            aggregate_id = %envelope.aggregate_id,
            sequence = envelope.sequence,
            attempt = envelope.attempt,
        );
        crate::trace::restore(&span, &envelope.headers);
        self.dispatch_inner(envelope).instrument(span).await
    }

    async fn dispatch_inner(&self, envelope: &Envelope) -> DeliveryResult {
        let upcast = self.registry.upcast(
            &envelope.event_type,
            envelope.schema_version,
            &envelope.payload,
        );
        let Upcast {
            entry,
            version,
            payload,
            steps,
        } = match upcast {
            Ok(Some(found)) => found,
            // The handler may arrive with the next deploy.
            Ok(None) => {
                return Err(DeliveryError::retry(format!(
                "no handler for event type {:?} (is it registered, and linked into this binary?)",
                envelope.event_type
            )))
            }
            Err(reason) => return Err(DeliveryError::permanent(reason)),
        };
        let ctx = HandlerContext::new(envelope, self.state.clone());
        // The handler is user code: a panic must become this event's failure, not the relay's.
        let outcome =
            match std::panic::catch_unwind(AssertUnwindSafe(|| (entry.call)(&payload, ctx))) {
                Ok(future) => AssertUnwindSafe(future).catch_unwind().await,
                Err(panic) => Err(panic),
            };
        match outcome {
            Ok(Ok(())) => Ok(()),
            Ok(Err(CallError::Decode(error))) => {
                let upcast = if steps.is_empty() {
                    String::new()
                } else {
                    format!(
                        ", upcast from v{} by {}",
                        envelope.schema_version,
                        steps.join(", ")
                    )
                };
                Err(DeliveryError::permanent(format!(
                    "payload does not deserialise into {} v{version} (handler {}{upcast}): {error}",
                    envelope.event_type, entry.name
                )))
            }
            Ok(Err(CallError::Handler(error))) => Err(error.into()),
            Err(panic) => Err(DeliveryError::retry(format!(
                "handler {} panicked: {}",
                entry.name,
                panic_message(&*panic)
            ))),
        }
    }
}

fn panic_message(panic: &(dyn Any + Send)) -> &str {
    if let Some(s) = panic.downcast_ref::<&'static str>() {
        s
    } else if let Some(s) = panic.downcast_ref::<String>() {
        s
    } else {
        "non-string panic payload"
    }
}

/// A dispatcher is a transport named `"handlers"`: a [`Router`](crate::Router) can send some
/// event types to in-process handlers and others to brokers.
impl Transport for Dispatcher {
    fn name(&self) -> &str {
        "handlers"
    }

    /// Aggregates run side by side (up to the concurrency); the events of one aggregate run
    /// one after the other, in batch order, and stop at the first failure: a later event is
    /// never handled before an earlier one that failed.
    async fn publish(&self, batch: &[Envelope]) -> Vec<DeliveryResult> {
        self.run_batch(batch, None).await
    }

    /// As [`publish`](Transport::publish), with each aggregate's run bounded by `budget`: a
    /// handler that does not return in time fails its own event (the attempt counts) and its
    /// run, and no other; runs that could not start in time (all handler slots busy) are not
    /// tried, and no attempt counts.
    async fn publish_within(&self, batch: &[Envelope], budget: Duration) -> Vec<DeliveryResult> {
        self.run_batch(batch, Some(tokio::time::Instant::now() + budget))
            .await
    }
}

impl Dispatcher {
    async fn run_batch(
        &self,
        batch: &[Envelope],
        deadline: Option<tokio::time::Instant>,
    ) -> Vec<DeliveryResult> {
        let mut runs: Vec<Vec<usize>> = Vec::new();
        let mut index: HashMap<(&str, &str), usize> = HashMap::new();
        for (i, envelope) in batch.iter().enumerate() {
            let key = (
                envelope.aggregate_type.as_str(),
                envelope.aggregate_id.as_str(),
            );
            let run = *index.entry(key).or_insert_with(|| {
                runs.push(Vec::new());
                runs.len() - 1
            });
            runs[run].push(i);
        }
        // Collected first: a closure inside the stream trips the `Send` check of the future.
        let calls: Vec<_> = runs
            .into_iter()
            .map(|positions| self.run_one(batch, positions, deadline))
            .collect();
        let mut out: Vec<Option<DeliveryResult>> = vec![None; batch.len()];
        let mut done = futures_util::stream::iter(calls).buffer_unordered(self.concurrency);
        while let Some(results) = done.next().await {
            for (i, result) in results {
                out[i] = Some(result);
            }
        }
        out.into_iter()
            .map(|r| r.expect("every position is handled once"))
            .collect()
    }

    /// One aggregate's events, in order, up to the first failure or the deadline.
    async fn run_one(
        &self,
        batch: &[Envelope],
        positions: Vec<usize>,
        deadline: Option<tokio::time::Instant>,
    ) -> Vec<(usize, DeliveryResult)> {
        let mut results = Vec::with_capacity(positions.len());
        let mut failed = false;
        for i in positions {
            let late = deadline.is_some_and(|d| tokio::time::Instant::now() >= d);
            let result = if failed {
                Err(DeliveryError::held_back())
            } else if late {
                // Waited for a slot behind slow handlers until the time was up: not tried, so
                // no attempt counts.
                Err(DeliveryError::out_of_time())
            } else {
                let handled = self.dispatch(&batch[i]);
                match deadline {
                    None => handled.await,
                    Some(deadline) => tokio::time::timeout_at(deadline, handled)
                        .await
                        .unwrap_or_else(|_| {
                            Err(DeliveryError::retry(
                                "the handler did not finish within the relay's delivery time \
                                 (three quarters of the lease)",
                            ))
                        }),
                }
            };
            failed |= result.is_err();
            results.push((i, result));
        }
        results
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Retry;
    use serde::{Deserialize, Serialize};

    #[derive(Serialize, Deserialize)]
    struct Ping {
        n: u32,
    }

    impl OutboxEvent for Ping {
        const EVENT_TYPE: &'static str = "ping";
        const AGGREGATE_TYPE: &'static str = "pinger";
        const SCHEMA_VERSION: u32 = 1;
        const TOPIC: &'static str = "pings";
        fn aggregate_id(&self) -> String {
            "p".into()
        }
    }

    fn envelope(event_type: &str, version: u32, payload: &str) -> Envelope {
        Envelope {
            id: Uuid::now_v7(),
            created_at: Utc::now(),
            event_type: event_type.into(),
            aggregate_type: "pinger".into(),
            // Each its own aggregate: these tests are about one event's outcome.
            aggregate_id: Uuid::now_v7().to_string(),
            sequence: 1,
            schema_version: version,
            topic: "pings".into(),
            payload: payload.into(),
            headers: Headers::new(),
            attempt: 1,
        }
    }

    fn dispatcher() -> Dispatcher {
        let registry = Registry::builder()
            .handler::<Ping, _, _>("ping", |ping: Ping, _ctx| async move {
                match ping.n {
                    0 => Ok(()),
                    1 => Err(HandlerError::fatal("one is fatal")),
                    2 => panic!("two panics"),
                    _ => Err(HandlerError::retry("later")),
                }
            })
            .unwrap()
            .build();
        Dispatcher::new(registry)
    }

    #[tokio::test]
    async fn a_run_stops_at_its_first_failure_and_other_aggregates_flow() {
        let d = dispatcher();
        let mut batch = vec![
            envelope("ping", 1, r#"{"n":0}"#),
            envelope("ping", 1, r#"{"n":3}"#),
            envelope("ping", 1, r#"{"n":0}"#),
            envelope("ping", 1, r#"{"n":0}"#),
        ];
        for e in &mut batch[..3] {
            e.aggregate_id = "cart-1".into();
        }
        let results = crate::Destination::deliver(&d, &batch).await;
        assert_eq!(results[0], Ok(()));
        assert_eq!(results[1], Err(DeliveryError::retry("later")));
        let skipped = results[2].as_ref().unwrap_err();
        assert!(skipped.reason.contains("earlier event"), "{skipped:?}");
        assert_eq!(results[3], Ok(()), "another aggregate is not held back");
    }

    #[tokio::test]
    async fn outcomes_map_to_retry_decisions() {
        let d = dispatcher();
        let results = crate::Destination::deliver(
            &d,
            &[
                envelope("ping", 1, r#"{"n":0}"#),
                envelope("ping", 1, r#"{"n":1}"#),
                envelope("ping", 1, r#"{"n":2}"#),
                envelope("ping", 1, r#"{"n":3}"#),
                envelope("ping", 1, r#"{"m":3}"#),
                envelope("pong", 1, "{}"),
                envelope("ping", 2, r#"{"n":0}"#),
            ],
        )
        .await;
        assert_eq!(results[0], Ok(()));
        assert_eq!(results[1], Err(DeliveryError::permanent("one is fatal")));
        let panicked = results[2].as_ref().unwrap_err();
        assert_eq!(panicked.retry, crate::Retry::Backoff);
        assert!(panicked.reason.contains("two panics"), "{panicked}");
        assert_eq!(results[3], Err(DeliveryError::retry("later")));
        let bad = results[4].as_ref().unwrap_err();
        assert_eq!(bad.retry, crate::Retry::Never);
        assert!(bad.reason.contains("missing field `n`"), "{bad}");
        let unknown = results[5].as_ref().unwrap_err();
        assert_eq!(unknown.retry, crate::Retry::Backoff);
        assert!(unknown
            .reason
            .contains("no handler for event type \"pong\""));
        let version = results[6].as_ref().unwrap_err();
        assert!(version.reason.contains("versions [1]"), "{version}");
    }

    #[test]
    fn duplicates_are_rejected() {
        let err = Registry::builder()
            .handler::<Ping, _, _>("a", |_: Ping, _| async { Ok(()) })
            .unwrap()
            .handler::<Ping, _, _>("b", |_: Ping, _| async { Ok(()) })
            .unwrap_err();
        assert!(
            matches!(&err, Error::DuplicateHandler { first, second, version: 1, .. } if first == "a" && second == "b"),
            "{err}"
        );
    }

    #[test]
    fn require_lists_missing_handlers() {
        let registry = Registry::builder()
            .handler::<Ping, _, _>("a", |_: Ping, _| async { Ok(()) })
            .unwrap()
            .build();
        registry.require_event::<Ping>().unwrap();
        let err = registry
            .require(&[("ping", 1), ("ping", 2), ("pong", 1)])
            .unwrap_err();
        let message = err.to_string();
        assert!(
            message.starts_with("no handler registered for ping v2, pong v1. "),
            "{message}"
        );
        // The message names the usual cause and the remedy as code.
        assert!(message.contains("library crate"), "{message}");
        assert!(message.contains("linker"), "{message}");
        assert!(message.contains("`use that_crate as _;`"), "{message}");
    }

    #[tokio::test]
    async fn state_reaches_handlers() {
        struct Greeting(&'static str);
        let registry = Registry::builder()
            .handler::<Ping, _, _>("s", |_: Ping, ctx: HandlerContext| async move {
                let greeting = ctx.state::<Greeting>()?;
                assert_eq!(greeting.0, "hi");
                ctx.state::<u8>().map(|_| ())
            })
            .unwrap()
            .build();
        let d = Dispatcher::new(registry).state(Greeting("hi"));
        let result = d.dispatch(&envelope("ping", 1, r#"{"n":0}"#)).await;
        let err = result.unwrap_err();
        assert_eq!(err.retry, crate::Retry::Never);
        assert!(err.reason.contains("no state of type u8"), "{err}");
    }
    /// Versions of one event type: v1 kept the amount as text (no struct left: a JSON step),
    /// v2 as cents, v3 (the current struct) adds a currency.
    mod versions {
        use super::*;

        #[derive(Serialize, Deserialize)]
        pub struct V2 {
            pub amount_cents: i64,
        }
        #[derive(Debug, Serialize, Deserialize, PartialEq)]
        pub struct V3 {
            pub amount_cents: i64,
            pub currency: String,
        }
        macro_rules! event {
            ($t:ty, $v:expr) => {
                impl OutboxEvent for $t {
                    const EVENT_TYPE: &'static str = "order.placed";
                    const AGGREGATE_TYPE: &'static str = "order";
                    const SCHEMA_VERSION: u32 = $v;
                    const TOPIC: &'static str = "orders";
                    fn aggregate_id(&self) -> String {
                        "o".into()
                    }
                }
            };
        }
        event!(V2, 2);
        event!(V3, 3);
        impl From<super::Ping> for V3 {
            fn from(_: super::Ping) -> Self {
                V3 {
                    amount_cents: 0,
                    currency: String::new(),
                }
            }
        }
        impl From<V2> for V3 {
            fn from(v2: V2) -> Self {
                V3 {
                    amount_cents: v2.amount_cents,
                    currency: "EUR".into(),
                }
            }
        }
    }

    fn versioned(seen: Arc<std::sync::Mutex<Vec<versions::V3>>>) -> RegistryBuilder {
        Registry::builder()
            .handler::<versions::V3, _, _>("on_order", move |order, _ctx| {
                let seen = seen.clone();
                async move {
                    seen.lock().unwrap().push(order);
                    Ok(())
                }
            })
            .unwrap()
    }

    /// v1 → v2 (JSON: text to cents) → v3 (`From`): the handler is written for v3 only.
    #[tokio::test]
    async fn old_versions_are_upcast_step_by_step_before_the_handler() {
        let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
        let registry = versioned(seen.clone())
            .upcast_from::<versions::V2, versions::V3>("v2 to v3")
            .unwrap()
            .upcast_json("order.placed", 1, 2, "v1 to v2", |mut v| {
                let amount = v["amount"].as_str().ok_or("no amount")?.to_owned();
                let cents = (amount.parse::<f64>().map_err(|e| e.to_string())? * 100.0).round();
                v["amount_cents"] = serde_json::json!(cents as i64);
                Ok(v)
            })
            .unwrap()
            .build();
        let d = Dispatcher::new(registry);
        let results = crate::Destination::deliver(
            &d,
            &[
                envelope("order.placed", 1, r#"{"amount":"12.50"}"#),
                envelope("order.placed", 2, r#"{"amount_cents":700}"#),
                envelope("order.placed", 3, r#"{"amount_cents":1,"currency":"USD"}"#),
            ],
        )
        .await;
        assert_eq!(results, vec![Ok(()), Ok(()), Ok(())]);
        let seen = seen.lock().unwrap();
        let cents: Vec<i64> = seen.iter().map(|o| o.amount_cents).collect();
        assert_eq!(cents, vec![1250, 700, 1]);
        assert_eq!(seen[0].currency, "EUR");
    }

    /// A gap in the chain, a version newer than any handled, and a failing step are dead at
    /// once with their reason; an unknown event type is retried (its handler may come later).
    #[tokio::test]
    async fn gaps_newer_versions_and_failing_steps_are_permanent() {
        let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
        let registry = versioned(seen)
            .upcast_from::<versions::V2, versions::V3>("v2 to v3")
            .unwrap()
            .build();
        let d = Dispatcher::new(registry);
        let results = crate::Destination::deliver(
            &d,
            &[
                envelope("order.placed", 1, r#"{"amount":"1"}"#),
                envelope("order.placed", 4, r#"{}"#),
                envelope("order.placed", 2, r#"{"amount_cents":"not a number"}"#),
                envelope("order.unknown", 1, r#"{}"#),
            ],
        )
        .await;
        let reason = |i: usize| results[i].as_ref().unwrap_err().clone();
        assert_eq!(reason(0).retry, Retry::Never, "{:?}", reason(0));
        assert!(reason(0).reason.contains("gap"), "{:?}", reason(0));
        assert_eq!(reason(1).retry, Retry::Never);
        assert!(reason(1).reason.contains("newer"), "{:?}", reason(1));
        assert_eq!(reason(2).retry, Retry::Never);
        assert!(reason(2).reason.contains("v2 to v3"), "{:?}", reason(2));
        assert_ne!(reason(3).retry, Retry::Never, "{:?}", reason(3));
    }

    #[test]
    fn duplicate_and_backward_upcasters_are_refused() {
        let err = Registry::builder()
            .upcast_from::<versions::V2, versions::V3>("first")
            .unwrap()
            .upcast_json("order.placed", 2, 3, "second", Ok)
            .unwrap_err();
        assert!(
            matches!(&err, Error::DuplicateUpcaster { from: 2, first, second, .. } if first == "first" && second == "second"),
            "{err}"
        );
        let err = Registry::builder()
            .upcast_json("order.placed", 3, 2, "backwards", Ok)
            .unwrap_err();
        assert!(err.to_string().contains("must raise the version"), "{err}");
        let err = Registry::builder()
            .upcast_from::<Ping, versions::V3>("other type")
            .unwrap_err();
        assert!(err.to_string().contains("one event type"), "{err}");
    }
}
