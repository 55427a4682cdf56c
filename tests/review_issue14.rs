//! Outside review of issue 14 ("Operate it"): tests that fail on the reviewed code.

use opentelemetry::trace::{TraceContextExt, TracerProvider as _};
use opentelemetry_sdk::trace::{InMemorySpanExporter, SdkTracerProvider};
use outbox::{EnqueueOptions, EventFilter, HandlerError, Outbox, Relay};
use outbox_tests::{
    dispatcher, eventually, serve, Behaviour, ItemChanged, Log, RunningRelay, TestDb,
};
use sqlx::{Postgres, Sqlite};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tracing::Instrument;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::layer::SubscriberExt;

const WAIT: Duration = Duration::from_secs(60);

/// Sends `request` as is and returns the whole answer.
async fn raw(address: &str, request: String) -> String {
    let mut stream = tokio::net::TcpStream::connect(address).await.unwrap();
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut answer = Vec::new();
    stream.read_to_end(&mut answer).await.unwrap();
    String::from_utf8_lossy(&answer).into_owned()
}

/// A same-origin requeue from the page, in a request whose target carries the authority (as
/// an HTTP/2 request always does in `:authority`, and an HTTP/1.1 absolute-form request does),
/// without a `Host` header. The browser sends `Origin` on every POST, so behind TLS with h2 the
/// requeue button never works: `same_origin_with_token` requires a `Host` header.
#[tokio::test]
async fn dashboard_same_origin_write_without_host_header_is_accepted() {
    let outbox = Sqlite::fresh().await;
    let router = outbox::dashboard::Dashboard::new(outbox.clone())
        .allow_actions()
        .router();
    let address = serve(router).await;
    let page = reqwest::get(format!("http://{address}/"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let token = page
        .split("const CSRF = \"")
        .nth(1)
        .and_then(|rest| rest.split('"').next())
        .expect("the page carries the token")
        .to_owned();
    let body = format!("{{\"id\":\"{}\"}}", uuid::Uuid::now_v7());
    let answer = raw(
        &address,
        format!(
            "POST http://{address}/api/requeue HTTP/1.1\r\n\
             origin: http://{address}\r\n\
             x-outbox-csrf: {token}\r\n\
             content-type: application/json\r\n\
             content-length: {}\r\n\
             connection: close\r\n\r\n{body}",
            body.len()
        ),
    )
    .await;
    assert!(
        answer.starts_with("HTTP/1.1 200"),
        "a same-origin requeue with the right token must be accepted: {answer}"
    );
    Sqlite::drop_tables(&outbox).await;
}

/// An explicit but malformed `traceparent` (say, forwarded from an incoming request) is
/// stored as is and later ignored by the consumer: the valid trace of the current span is
/// not captured, so the handler's span starts a new trace. "A malformed traceparent is
/// ignored" should mean the current span's context is used.
#[tokio::test]
async fn a_malformed_explicit_traceparent_keeps_the_current_trace() {
    let exporter = InMemorySpanExporter::default();
    let provider = SdkTracerProvider::builder()
        .with_simple_exporter(exporter.clone())
        .build();
    let subscriber = tracing_subscriber::registry()
        .with(tracing_opentelemetry::layer().with_tracer(provider.tracer("review")));
    // Current-thread runtime: the subscriber is this thread's.
    let _guard = tracing::subscriber::set_default(subscriber);
    let outbox = Sqlite::fresh().await;
    let request = tracing::info_span!("http.request");
    let trace_id = request.context().span().span_context().trace_id();
    let id = async {
        let mut tx = outbox.pool().begin().await.unwrap();
        let options = EnqueueOptions::new().traceparent("garbage-from-a-client");
        let event = ItemChanged {
            item: "t".into(),
            n: 1,
        };
        let id = outbox
            .enqueue_with(&mut *tx, &event, options)
            .await
            .unwrap();
        tx.commit().await.unwrap();
        id
    }
    .instrument(request)
    .await;
    let record = outbox.get(id).await.unwrap().unwrap();
    let stored = record
        .headers
        .get("traceparent")
        .cloned()
        .unwrap_or_default();
    assert!(
        stored.contains(&trace_id.to_string()),
        "the current trace {trace_id} is lost: stored traceparent {stored:?} (ignored downstream)"
    );
    Sqlite::drop_tables(&outbox).await;
}

/// `discard --dry-run` "says how many"; here it says 1 and the discard then discards 0 (the
/// event stays dead, in the dead list): the dry run counts every selected dead event, the
/// action skips those whose aggregate has not moved past them.
async fn discard_dry_run_matches_the_discard<DB: TestDb>() {
    let outbox: Outbox<DB> = DB::fresh().await;
    let log = Log::default();
    let fail: Behaviour = Arc::new(|_, _| Err(HandlerError::fatal("boom")));
    let events: Vec<ItemChanged> = (1..=2)
        .map(|n| ItemChanged {
            item: "a".into(),
            n,
        })
        .collect();
    let mut tx = outbox.pool().begin().await.unwrap();
    outbox.enqueue_batch(&mut *tx, &events).await.unwrap();
    tx.commit().await.unwrap();
    let relay = RunningRelay::start(
        Relay::builder(outbox.clone(), dispatcher(&log, fail))
            .poll_interval(Duration::from_millis(10)),
    );
    eventually("both dead", WAIT, || async {
        let s = outbox.status(Duration::from_secs(3600)).await.unwrap();
        s.dead == 2 && s.pending == 0
    })
    .await;
    relay.stop().await;
    let dead = outbox.dead(&EventFilter::new(), 10).await.unwrap();
    let first = dead.iter().find(|e| e.sequence == 1).unwrap().id;
    let second = dead.iter().find(|e| e.sequence == 2).unwrap().id;
    // The operator requeues the first (no relay running just now), then gives up the second.
    assert!(outbox.requeue(first).await.unwrap());
    let filter = EventFilter::new().id(second);
    let would = outbox.discard_dead(&filter, true).await.unwrap();
    let did = outbox.discard_dead(&filter, false).await.unwrap();
    assert_eq!(
        would, did,
        "dry run said {would}, the discard discarded {did}"
    );
    DB::drop_tables(&outbox).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn discard_dry_run_matches_the_discard_postgres() {
    discard_dry_run_matches_the_discard::<Postgres>().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn discard_dry_run_matches_the_discard_sqlite() {
    discard_dry_run_matches_the_discard::<Sqlite>().await;
}
