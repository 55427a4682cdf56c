//! A web dashboard for an outbox, as an axum [`Router`] to mount in your application: counts by
//! status, throughput and lag over the last minutes, dead events grouped by cause, and, when
//! you enable it, requeue per event and per group. One HTML page, no build step, no assets from
//! elsewhere.
//!
//! ```no_run
//! # async fn demo<DB>(outbox: outbox_core::Outbox<DB>)
//! # where DB: outbox_core::Backend, DB::Store: outbox_core::FullStore {
//! use outbox_dashboard::Dashboard;
//! // Read-only: safe to expose to whoever may read your metrics.
//! let app = axum::Router::new().nest("/ops/outbox", outbox_dashboard::router(outbox.clone()));
//! // With requeue buttons: only behind your own authentication layer.
//! let admin = Dashboard::new(outbox).allow_actions().router();
//! // let app = app.nest("/admin/outbox", admin.layer(your_auth_layer));
//! # let _ = (app, admin);
//! # }
//! ```
//!
//! Write actions are refused (403) unless [`Dashboard::allow_actions`] was called, and even then
//! each needs the page's anti-CSRF token in the `x-outbox-csrf` header (a form posted from
//! another site cannot set it) and, when the browser sends an `Origin`, one that matches the
//! `Host`. Authentication is yours: wrap the router in the layer your application already uses.
//! Every value from the table is put on the page as text, never as markup.

use axum::extract::{Query, State};
use axum::http::{header, HeaderMap, StatusCode, Uri};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use chrono::{DateTime, Utc};
use outbox_core::{Backend, EventFilter, FullStore, Outbox, OutboxStatus};
use serde::{Deserialize, Serialize};
use std::collections::VecDeque;
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;
use uuid::Uuid;

const PAGE: &str = include_str!("page.html");

/// The page groups the causes of this many most recent dead events at most.
pub const GROUPED_AT_MOST: usize = 10_000;

/// A read-only dashboard of `outbox`: [`Dashboard::new`]`(outbox).router()`.
pub fn router<DB>(outbox: Outbox<DB>) -> Router
where
    DB: Backend,
    DB::Store: FullStore,
{
    Dashboard::new(outbox).router()
}

/// Builds the dashboard's router.
#[derive(Debug)]
pub struct Dashboard<DB: Backend> {
    outbox: Outbox<DB>,
    actions: bool,
    sample_every: Duration,
    history: Duration,
}

impl<DB> Dashboard<DB>
where
    DB: Backend,
    DB::Store: FullStore,
{
    /// Read-only, sampling every 5 seconds, keeping 15 minutes of history.
    pub fn new(outbox: Outbox<DB>) -> Self {
        Self {
            outbox,
            actions: false,
            sample_every: Duration::from_secs(5),
            history: Duration::from_secs(15 * 60),
        }
    }

    /// Shows requeue buttons and accepts requeues. Mount the router behind your
    /// authentication layer: anyone who reaches it can requeue.
    pub fn allow_actions(mut self) -> Self {
        self.actions = true;
        self
    }

    /// How often the chart's figures are read (each reading counts the table's rows by
    /// status; default 5 s).
    pub fn sample_every(mut self, every: Duration) -> Self {
        self.sample_every = every.max(Duration::from_millis(100));
        self
    }

    /// The router: `GET /` (the page), `GET /api/status`, `GET /api/dead/groups`,
    /// `GET /api/dead`, `POST /api/requeue`. Call it inside a tokio runtime: it starts the
    /// sampler of the chart, which stops when the router is dropped.
    pub fn router(self) -> Router {
        let state = Arc::new(Shared {
            outbox: self.outbox,
            actions: self.actions,
            csrf: Uuid::new_v4().simple().to_string(),
            samples: Mutex::new(VecDeque::new()),
            keep: (self.history.as_secs_f64() / self.sample_every.as_secs_f64()).ceil() as usize,
        });
        tokio::spawn(sample(Arc::downgrade(&state), self.sample_every));
        Router::new()
            .route("/", get(page::<DB>))
            .route("/api/status", get(status::<DB>))
            .route("/api/dead/groups", get(groups::<DB>))
            .route("/api/dead", get(dead::<DB>))
            .route("/api/requeue", post(requeue::<DB>))
            .with_state(state)
    }
}

struct Shared<DB: Backend> {
    outbox: Outbox<DB>,
    actions: bool,
    csrf: String,
    samples: Mutex<VecDeque<Sample>>,
    keep: usize,
}

/// One reading of the chart.
#[derive(Debug, Clone, Serialize)]
struct Sample {
    at: DateTime<Utc>,
    pending: u64,
    delivered: u64,
    dead: u64,
    lag_seconds: f64,
    /// Delivered rows gained per second since the previous reading (rows removed by retention
    /// in between are not seen).
    delivered_per_second: f64,
}

/// Reads the status every `every` while the router lives.
async fn sample<DB>(state: Weak<Shared<DB>>, every: Duration)
where
    DB: Backend,
    DB::Store: FullStore,
{
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut failing = false;
    loop {
        tick.tick().await;
        let Some(state) = state.upgrade() else { return };
        match state.outbox.status(Duration::from_secs(300)).await {
            Ok(status) => {
                failing = false;
                let mut samples = state.samples.lock().expect("not poisoned");
                let rate = samples.back().map_or(0.0, |last: &Sample| {
                    let seconds = (status.read_at - last.at).num_milliseconds() as f64 / 1000.0;
                    let gained = status.delivered.saturating_sub(last.delivered) as f64;
                    if seconds > 0.0 {
                        gained / seconds
                    } else {
                        0.0
                    }
                });
                samples.push_back(Sample {
                    at: status.read_at,
                    pending: status.pending,
                    delivered: status.delivered,
                    dead: status.dead,
                    lag_seconds: status.oldest_pending_age_ms.unwrap_or(0) as f64 / 1000.0,
                    delivered_per_second: rate,
                });
                while samples.len() > state.keep.max(2) {
                    samples.pop_front();
                }
            }
            Err(error) if !failing => {
                failing = true;
                tracing::warn!(%error, "outbox dashboard cannot read the status; trying again");
            }
            Err(_) => {}
        }
    }
}

/// An error as JSON, with its status code.
fn error(code: StatusCode, message: impl Into<String>) -> Response {
    (code, Json(serde_json::json!({ "error": message.into() }))).into_response()
}

fn failed(e: outbox_core::Error) -> Response {
    error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string())
}

async fn page<DB: Backend>(State(state): State<Arc<Shared<DB>>>) -> Response {
    let page = PAGE
        .replace("{{CSRF}}", &state.csrf)
        .replace("{{ACTIONS}}", if state.actions { "true" } else { "false" })
        .replace("{{TABLE}}", state.outbox.table().as_str());
    (
        [
            (header::CACHE_CONTROL, "no-store"),
            (
                header::CONTENT_SECURITY_POLICY,
                "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; \
                 connect-src 'self'; img-src 'self' data:; frame-ancestors 'none'",
            ),
        ],
        Html(page),
    )
        .into_response()
}

#[derive(Serialize)]
struct StatusReply {
    table: String,
    actions: bool,
    status: OutboxStatus,
    history: Vec<Sample>,
}

async fn status<DB>(State(state): State<Arc<Shared<DB>>>) -> Response
where
    DB: Backend,
    DB::Store: FullStore,
{
    match state.outbox.status(Duration::from_secs(300)).await {
        Ok(status) => Json(StatusReply {
            table: state.outbox.table().as_str().to_owned(),
            actions: state.actions,
            status,
            history: state
                .samples
                .lock()
                .expect("not poisoned")
                .iter()
                .cloned()
                .collect(),
        })
        .into_response(),
        Err(e) => failed(e),
    }
}

async fn groups<DB>(State(state): State<Arc<Shared<DB>>>) -> Response
where
    DB: Backend,
    DB::Store: FullStore,
{
    // Bounded: the groups of the most recent dead events, read every few seconds per open tab.
    let recent = match state
        .outbox
        .dead_summaries(&EventFilter::new(), GROUPED_AT_MOST)
        .await
    {
        Ok(recent) => recent,
        Err(e) => return failed(e),
    };
    match Ok::<_, outbox_core::Error>(outbox_core::group_dead(&recent)) {
        Ok(groups) => Json(groups).into_response(),
        Err(e) => failed(e),
    }
}

#[derive(Deserialize)]
struct DeadQuery {
    group: Option<String>,
    limit: Option<usize>,
}

async fn dead<DB>(State(state): State<Arc<Shared<DB>>>, Query(q): Query<DeadQuery>) -> Response
where
    DB: Backend,
    DB::Store: FullStore,
{
    let mut filter = EventFilter::new();
    if let Some(group) = q.group.filter(|g| !g.is_empty()) {
        filter = filter.group(group);
    }
    let limit = q.limit.unwrap_or(50).min(500);
    match state.outbox.dead_summaries(&filter, limit).await {
        Ok(events) => Json(events).into_response(),
        Err(e) => failed(e),
    }
}

/// One event, or a whole group.
#[derive(Deserialize)]
struct RequeueRequest {
    id: Option<Uuid>,
    group: Option<String>,
}

async fn requeue<DB>(
    State(state): State<Arc<Shared<DB>>>,
    uri: Uri,
    headers: HeaderMap,
    Json(request): Json<RequeueRequest>,
) -> Response
where
    DB: Backend,
    DB::Store: FullStore,
{
    if !state.actions {
        return error(
            StatusCode::FORBIDDEN,
            "this dashboard is read-only (Dashboard::allow_actions enables requeue)",
        );
    }
    if let Err(why) =
        same_origin_with_token(&headers, uri.authority().map(|a| a.as_str()), &state.csrf)
    {
        return error(StatusCode::FORBIDDEN, why);
    }
    let filter = match (request.id, request.group) {
        (Some(id), None) => EventFilter::new().id(id),
        (None, Some(group)) if !group.is_empty() => EventFilter::new().group(group),
        _ => return error(StatusCode::BAD_REQUEST, "name one event id or one group"),
    };
    match state.outbox.requeue_dead(&filter, false).await {
        Ok(requeued) => {
            tracing::info!(requeued, "requeued from the outbox dashboard");
            Json(serde_json::json!({ "requeued": requeued })).into_response()
        }
        Err(e) => failed(e),
    }
}

/// The anti-CSRF checks of a write: the page's token in `x-outbox-csrf`, and an `Origin`, if
/// the browser sent one, naming the host the request came to: the `Host` header, the request
/// target's authority (HTTP/2 has no `Host`), or `X-Forwarded-Host` from a proxy in front.
fn same_origin_with_token(
    headers: &HeaderMap,
    authority: Option<&str>,
    token: &str,
) -> Result<(), &'static str> {
    let sent = headers
        .get("x-outbox-csrf")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    if sent.is_empty() || !constant_time_eq(sent.as_bytes(), token.as_bytes()) {
        return Err("missing or wrong x-outbox-csrf token: reload the page");
    }
    if let Some(origin) = headers.get(header::ORIGIN) {
        let origin_host = origin
            .to_str()
            .ok()
            .and_then(|o| o.split_once("://").map(|(_, rest)| rest))
            .ok_or("cross-origin request refused")?;
        let header = |name: &str| headers.get(name).and_then(|h| h.to_str().ok());
        let hosts = [header("host"), authority, header("x-forwarded-host")];
        if !hosts
            .iter()
            .flatten()
            .any(|host| host.eq_ignore_ascii_case(origin_host))
        {
            return Err("cross-origin request refused");
        }
    }
    Ok(())
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (k, v) in pairs {
            map.insert(*k, v.parse().unwrap());
        }
        map
    }

    #[test]
    fn writes_need_the_token_and_the_same_origin() {
        let t = "abc123";
        assert!(same_origin_with_token(&headers(&[("x-outbox-csrf", t)]), None, t).is_ok());
        assert!(same_origin_with_token(&headers(&[]), None, t).is_err());
        assert!(same_origin_with_token(&headers(&[("x-outbox-csrf", "abc124")]), None, t).is_err());
        assert!(same_origin_with_token(&headers(&[("x-outbox-csrf", "")]), None, "").is_err());
        let same = [
            ("x-outbox-csrf", t),
            ("origin", "http://ops:8080"),
            ("host", "ops:8080"),
        ];
        assert!(same_origin_with_token(&headers(&same), None, t).is_ok());
        let other = [
            ("x-outbox-csrf", t),
            ("origin", "https://evil.example"),
            ("host", "ops:8080"),
        ];
        assert!(same_origin_with_token(&headers(&other), None, t).is_err());
        let null = [
            ("x-outbox-csrf", t),
            ("origin", "null"),
            ("host", "ops:8080"),
        ];
        assert!(same_origin_with_token(&headers(&null), None, t).is_err());
        // HTTP/2: no Host header, the authority is in the request target.
        let h2 = [("x-outbox-csrf", t), ("origin", "https://ops.example")];
        assert!(same_origin_with_token(&headers(&h2), Some("ops.example"), t).is_ok());
        assert!(same_origin_with_token(&headers(&h2), Some("evil.example"), t).is_err());
        assert!(same_origin_with_token(&headers(&h2), None, t).is_err());
    }
}
