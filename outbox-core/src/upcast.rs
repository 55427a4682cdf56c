//! Schema evolution: payloads written at an older version of an event type become the current
//! struct before its handler runs, one version step at a time.

use crate::event::OutboxEvent;
use serde::de::DeserializeOwned;
use serde::Serialize;
use std::fmt;
use std::sync::Arc;

/// Turns a payload (JSON text) of one version into the next one's, or says why it cannot.
pub(crate) type UpcastFn = Arc<dyn Fn(&str) -> Result<String, String> + Send + Sync>;

/// One registered step of an event type's schema: payloads of version `from` become version
/// `to`.
#[derive(Clone)]
pub(crate) struct Upcaster {
    pub(crate) to: u32,
    pub(crate) name: String,
    pub(crate) call: UpcastFn,
}

impl fmt::Debug for Upcaster {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Upcaster")
            .field("to", &self.to)
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

/// An upcaster registered at compile time by `#[outbox(upcast_from = Old)]` on the newer
/// struct. Collected with `inventory`.
#[doc(hidden)]
#[derive(Debug)]
pub struct UpcasterRegistration {
    pub(crate) event_type: &'static str,
    pub(crate) from_event_type: &'static str,
    pub(crate) from: u32,
    pub(crate) to: u32,
    pub(crate) name: &'static str,
    pub(crate) call: fn(&str) -> Result<String, String>,
}

impl UpcasterRegistration {
    #[doc(hidden)]
    pub const fn new<Old, New>(name: &'static str) -> Self
    where
        Old: OutboxEvent + DeserializeOwned,
        New: OutboxEvent + From<Old>,
    {
        Self {
            event_type: New::EVENT_TYPE,
            from_event_type: Old::EVENT_TYPE,
            from: Old::SCHEMA_VERSION,
            to: New::SCHEMA_VERSION,
            name,
            call: upcast_with_from::<Old, New>,
        }
    }
}

inventory::collect!(UpcasterRegistration);

/// Deserialises the old struct, converts it with `From`, serialises the new one.
pub(crate) fn upcast_with_from<Old, New>(payload: &str) -> Result<String, String>
where
    Old: DeserializeOwned,
    New: From<Old> + Serialize,
{
    let old: Old = serde_json::from_str(payload)
        .map_err(|e| format!("payload does not deserialise into the older struct: {e}"))?;
    serde_json::to_string(&New::from(old)).map_err(|e| e.to_string())
}

/// A step written on JSON values.
pub(crate) fn upcast_json(
    step: impl Fn(serde_json::Value) -> Result<serde_json::Value, String> + Send + Sync + 'static,
) -> UpcastFn {
    Arc::new(move |payload: &str| {
        let value: serde_json::Value =
            serde_json::from_str(payload).map_err(|e| format!("payload is not JSON: {e}"))?;
        serde_json::to_string(&step(value)?).map_err(|e| e.to_string())
    })
}

/// `a == b` at compile time: the derive checks that an upcaster keeps its event type.
#[doc(hidden)]
pub const fn same_str(a: &str, b: &str) -> bool {
    let (a, b) = (a.as_bytes(), b.as_bytes());
    if a.len() != b.len() {
        return false;
    }
    let mut i = 0;
    while i < a.len() {
        if a[i] != b[i] {
            return false;
        }
        i += 1;
    }
    true
}
