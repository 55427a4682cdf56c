//! Routing event types to transports: one relay, several brokers.

use crate::destination::{
    too_late_to_start, DeliveryError, DeliveryResult, Destination, Transport,
};
use crate::error::{Error, Result};
use crate::event::{Envelope, OutboxEvent};
use futures_util::future::{join_all, BoxFuture};
use futures_util::FutureExt;
use std::collections::HashMap;
use std::fmt;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::Duration;

/// A [`Transport`] behind a pointer: the router holds transports of different types.
trait ErasedTransport: Send + Sync {
    fn name(&self) -> &str;
    fn publish<'a>(
        &'a self,
        batch: &'a [Envelope],
        budget: Option<Duration>,
    ) -> BoxFuture<'a, Vec<DeliveryResult>>;
    fn delivery_timeout(&self) -> Option<Duration>;
    fn validate(&self) -> crate::Result<()>;
}

impl<T: Transport> ErasedTransport for T {
    fn name(&self) -> &str {
        Transport::name(self)
    }

    fn delivery_timeout(&self) -> Option<Duration> {
        Transport::delivery_timeout(self)
    }

    fn validate(&self) -> crate::Result<()> {
        Transport::validate(self)
    }

    fn publish<'a>(
        &'a self,
        batch: &'a [Envelope],
        budget: Option<Duration>,
    ) -> BoxFuture<'a, Vec<DeliveryResult>> {
        match budget {
            Some(budget) => Transport::publish_within(self, batch, budget).boxed(),
            None => Transport::publish(self, batch).boxed(),
        }
    }
}

/// Sends each event type to its transport, the rest to a default.
///
/// ```
/// # use outbox_core::{Router, Transport, Envelope, DeliveryResult};
/// # struct Fake(&'static str);
/// # impl Transport for Fake {
/// #     fn name(&self) -> &str { self.0 }
/// #     async fn publish(&self, batch: &[Envelope]) -> Vec<DeliveryResult> { vec![Ok(()); batch.len()] }
/// # }
/// # let (kafka, nats) = (Fake("kafka"), Fake("nats"));
/// let router = Router::builder()
///     .transport(kafka)
///     .transport(nats)
///     .route("payment.created", "kafka")
///     .default_transport("nats")
///     .build()
///     .unwrap();
/// assert_eq!(router.transport_for("payment.created"), Some("kafka"));
/// assert_eq!(router.transport_for("user.signed_up"), Some("nats"));
/// ```
#[derive(Clone)]
pub struct Router {
    transports: Vec<Arc<dyn ErasedTransport>>,
    routes: HashMap<String, usize>,
    default: Option<usize>,
}

impl fmt::Debug for Router {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let names: Vec<&str> = self.transports.iter().map(|t| t.name()).collect();
        f.debug_struct("Router")
            .field("transports", &names)
            .field("routes", &self.routes.len())
            .field("default", &self.default.map(|i| names[i]))
            .finish()
    }
}

/// Configures a [`Router`].
#[derive(Default)]
pub struct RouterBuilder {
    transports: Vec<Arc<dyn ErasedTransport>>,
    routes: Vec<(String, String)>,
    default: Option<String>,
}

impl fmt::Debug for RouterBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RouterBuilder")
            .field("transports", &self.transports.len())
            .field("routes", &self.routes)
            .field("default", &self.default)
            .finish()
    }
}

impl RouterBuilder {
    /// Adds a transport, known by its [`Transport::name`].
    pub fn transport<T: Transport>(mut self, transport: T) -> Self {
        self.transports.push(Arc::new(transport));
        self
    }

    /// Sends events of `event_type` to the transport named `transport`.
    pub fn route(mut self, event_type: impl Into<String>, transport: impl Into<String>) -> Self {
        self.routes.push((event_type.into(), transport.into()));
        self
    }

    /// Sends events of type `E` to the transport named `transport`.
    pub fn route_event<E: OutboxEvent>(self, transport: impl Into<String>) -> Self {
        self.route(E::EVENT_TYPE, transport)
    }

    /// Sends every event type without a route to the transport named `transport`.
    pub fn default_transport(mut self, transport: impl Into<String>) -> Self {
        self.default = Some(transport.into());
        self
    }

    /// Checks that every route names a configured transport, and that names are unique.
    pub fn build(self) -> Result<Router> {
        let mut index = HashMap::new();
        for (i, t) in self.transports.iter().enumerate() {
            t.validate()?;
            if index.insert(t.name().to_owned(), i).is_some() {
                return Err(Error::Config(format!(
                    "two transports are named {:?}",
                    t.name()
                )));
            }
        }
        let known = || {
            let mut names: Vec<&str> = index.keys().map(String::as_str).collect();
            names.sort_unstable();
            names.join(", ")
        };
        let lookup = |name: &str, what: &str| {
            index.get(name).copied().ok_or_else(|| {
                Error::Config(format!(
                    "{what} names transport {name:?}, which is not configured (configured: {})",
                    known()
                ))
            })
        };
        let mut routes = HashMap::new();
        for (event_type, transport) in &self.routes {
            let i = lookup(transport, &format!("the route of {event_type:?}"))?;
            if routes.insert(event_type.clone(), i).is_some() {
                return Err(Error::Config(format!("two routes for {event_type:?}")));
            }
        }
        let default = match &self.default {
            Some(name) => Some(lookup(name, "the default route")?),
            None => None,
        };
        if self.transports.is_empty() {
            return Err(Error::Config(
                "a router needs at least one transport".into(),
            ));
        }
        Ok(Router {
            transports: self.transports,
            routes,
            default,
        })
    }
}

impl Router {
    /// Starts configuring a router.
    pub fn builder() -> RouterBuilder {
        RouterBuilder::default()
    }

    /// The name of the transport `event_type` goes to, if any.
    pub fn transport_for(&self, event_type: &str) -> Option<&str> {
        self.index_for(event_type)
            .map(|i| self.transports[i].name())
    }

    fn index_for(&self, event_type: &str) -> Option<usize> {
        self.routes.get(event_type).copied().or(self.default)
    }
}

impl Destination for Router {
    async fn deliver(&self, batch: &[Envelope]) -> Vec<DeliveryResult> {
        self.deliver_in_rounds(batch, None).await
    }

    async fn deliver_within(&self, batch: &[Envelope], budget: Duration) -> Vec<DeliveryResult> {
        self.deliver_in_rounds(batch, Some(budget)).await
    }

    fn name_for(&self, event_type: &str) -> &str {
        self.transport_for(event_type).unwrap_or("unrouted")
    }

    /// The longest of its transports'.
    fn delivery_timeout(&self) -> Option<Duration> {
        self.transports
            .iter()
            .filter_map(|t| t.delivery_timeout())
            .max()
    }
}

impl Router {
    /// Transports publish side by side, but one aggregate's run must stay in order even when
    /// its events go to different transports: each run is cut into segments of consecutive
    /// events for one transport, round `r` publishes every run's `r`-th segment, and a run whose
    /// segment failed sends nothing more. Runs on one transport (the usual case) take one round.
    async fn deliver_in_rounds(
        &self,
        batch: &[Envelope],
        budget: Option<Duration>,
    ) -> Vec<DeliveryResult> {
        let started = tokio::time::Instant::now();
        let mut results: Vec<Option<DeliveryResult>> = vec![None; batch.len()];
        // Each run's segments: (transport, positions).
        let mut runs: Vec<Vec<(usize, Vec<usize>)>> = Vec::new();
        let mut run_of: HashMap<(&str, &str), usize> = HashMap::new();
        for (position, envelope) in batch.iter().enumerate() {
            let key = (
                envelope.aggregate_type.as_str(),
                envelope.aggregate_id.as_str(),
            );
            let run = *run_of.entry(key).or_insert_with(|| {
                runs.push(Vec::new());
                runs.len() - 1
            });
            let Some(transport) = self.index_for(&envelope.event_type) else {
                results[position] = Some(Err(DeliveryError::retry(format!(
                    "no route for event type {:?} and no default transport",
                    envelope.event_type
                ))));
                // Nothing after it in its run: a marker segment that never publishes.
                runs[run].push((usize::MAX, vec![position]));
                continue;
            };
            match runs[run].last_mut() {
                Some((t, positions)) if *t == transport => positions.push(position),
                _ => runs[run].push((transport, vec![position])),
            }
        }
        let mut stopped = vec![false; runs.len()];
        for round in 0.. {
            // This round's segments, per transport.
            let mut parts: Vec<Vec<usize>> = vec![Vec::new(); self.transports.len()];
            let mut any = false;
            for (run, segments) in runs.iter().enumerate() {
                if stopped[run] {
                    continue;
                }
                if let Some((transport, positions)) = segments.get(round) {
                    if *transport == usize::MAX {
                        stopped[run] = true;
                        continue;
                    }
                    parts[*transport].extend(positions);
                    any = true;
                }
            }
            if !any {
                break;
            }
            let left = budget.map(|b| b.saturating_sub(started.elapsed()));
            // A later round starts late in the lease: a transport whose client keeps retrying
            // on its own for longer than what is left is not started (see
            // `Destination::delivery_timeout`); its runs stop here, to be delivered again.
            if let Some(left) = left {
                for (i, positions) in parts.iter_mut().enumerate() {
                    let timeout = self.transports[i].delivery_timeout();
                    if let Some(not_started) = too_late_to_start(timeout, left) {
                        for p in positions.drain(..) {
                            results[p] = Some(Err(not_started.clone()));
                        }
                    }
                }
            }
            let published = join_all(
                parts
                    .iter()
                    .enumerate()
                    .filter(|(_, positions)| !positions.is_empty())
                    .map(|(i, positions)| {
                        let envelopes: Vec<Envelope> =
                            positions.iter().map(|&p| batch[p].clone()).collect();
                        let transport = self.transports[i].clone();
                        async move {
                            // A transport that panics fails its own part only: the other
                            // transports' results stand.
                            let published = AssertUnwindSafe(transport.publish(&envelopes, left))
                                .catch_unwind()
                                .await;
                            let results = published.unwrap_or_else(|_| {
                                vec![
                                    Err(DeliveryError::retry(format!(
                                        "transport {:?} panicked",
                                        transport.name()
                                    )));
                                    envelopes.len()
                                ]
                            });
                            (positions, results)
                        }
                    }),
            )
            .await;
            for (positions, part_results) in published {
                for (position, result) in positions.iter().zip(part_results) {
                    results[*position] = Some(result);
                }
            }
            for (run, segments) in runs.iter().enumerate() {
                if let Some((_, positions)) = segments.get(round) {
                    if positions
                        .iter()
                        .any(|&p| !matches!(results[p], Some(Ok(()))))
                    {
                        stopped[run] = true;
                    }
                }
            }
        }
        results
            .into_iter()
            .map(|r| r.unwrap_or_else(|| Err(DeliveryError::held_back())))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    struct Recording {
        name: &'static str,
        seen: Arc<Mutex<Vec<String>>>,
    }

    impl Transport for Recording {
        fn name(&self) -> &str {
            self.name
        }
        async fn publish(&self, batch: &[Envelope]) -> Vec<DeliveryResult> {
            let mut seen = self.seen.lock().unwrap();
            batch
                .iter()
                .map(|e| {
                    seen.push(format!("{}:{}", self.name, e.event_type));
                    if e.event_type == "bad" {
                        Err(DeliveryError::permanent("rejected"))
                    } else {
                        Ok(())
                    }
                })
                .collect()
        }
    }

    fn envelope(event_type: &str) -> Envelope {
        Envelope {
            id: uuid::Uuid::now_v7(),
            created_at: chrono::Utc::now(),
            event_type: event_type.into(),
            aggregate_type: "a".into(),
            aggregate_id: event_type.into(),
            sequence: 1,
            schema_version: 1,
            topic: "t".into(),
            payload: "{}".into(),
            headers: Default::default(),
            attempt: 1,
        }
    }

    #[tokio::test]
    async fn routes_and_keeps_batch_order() {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let router = Router::builder()
            .transport(Recording {
                name: "a",
                seen: seen.clone(),
            })
            .transport(Recording {
                name: "b",
                seen: seen.clone(),
            })
            .route("x", "a")
            .route("bad", "a")
            .default_transport("b")
            .build()
            .unwrap();
        let results = router
            .deliver(&[envelope("y"), envelope("x"), envelope("bad"), envelope("z")])
            .await;
        assert_eq!(
            results,
            vec![
                Ok(()),
                Ok(()),
                Err(DeliveryError::permanent("rejected")),
                Ok(())
            ]
        );
        let mut seen = seen.lock().unwrap().clone();
        seen.sort();
        assert_eq!(seen, ["a:bad", "a:x", "b:y", "b:z"]);
    }

    #[tokio::test]
    async fn unrouted_events_are_retried() {
        let router = Router::builder()
            .transport(Recording {
                name: "a",
                seen: Arc::default(),
            })
            .route("x", "a")
            .build()
            .unwrap();
        let results = router.deliver(&[envelope("y")]).await;
        assert!(results[0]
            .as_ref()
            .unwrap_err()
            .reason
            .contains("no route for event type \"y\""));
    }

    #[test]
    fn configuration_mistakes_are_start_up_errors() {
        let t = || Recording {
            name: "kafka",
            seen: Arc::default(),
        };
        let unknown = Router::builder()
            .transport(t())
            .route("x", "nats")
            .build()
            .unwrap_err();
        assert_eq!(
            unknown.to_string(),
            "invalid configuration: the route of \"x\" names transport \"nats\", which is not configured (configured: kafka)"
        );
        let default = Router::builder()
            .transport(t())
            .default_transport("amqp")
            .build()
            .unwrap_err();
        assert!(default
            .to_string()
            .contains("the default route names transport \"amqp\""));
        let twice = Router::builder()
            .transport(t())
            .transport(t())
            .build()
            .unwrap_err();
        assert!(twice
            .to_string()
            .contains("two transports are named \"kafka\""));
        assert!(Router::builder().build().is_err());
    }
}
