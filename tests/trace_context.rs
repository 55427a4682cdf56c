//! W3C trace context end to end (`opentelemetry` feature): the span that enqueues an event is
//! the parent of the consumer's spans on the other side of a real NATS JetStream, across the
//! outbox table and the relay. Spans go to an in-memory exporter. One test per binary: the
//! subscriber is global.

use async_nats::jetstream::consumer;
use opentelemetry::trace::{TraceContextExt, TraceId, TracerProvider as _};
use opentelemetry_sdk::trace::{InMemorySpanExporter, SdkTracerProvider};
use outbox::nats::{ensure_stream, NatsConsumer, NatsTransport};
use outbox::{header, HandlerContext, Relay};
use outbox_tests::nats::{jetstream, names, nats_url, read_stream};
use outbox_tests::{eventually, ItemChanged, RunningRelay, TestDb};
use sqlx::Postgres;
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tracing::Instrument;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::layer::SubscriberExt;

const WAIT: Duration = Duration::from_secs(60);

fn trace_id(span: &tracing::Span) -> TraceId {
    span.context().span().span_context().trace_id()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_trace_from_the_request_to_the_consumers_handler() {
    let exporter = InMemorySpanExporter::default();
    let provider = SdkTracerProvider::builder()
        .with_simple_exporter(exporter.clone())
        .build();
    let subscriber = tracing_subscriber::registry()
        .with(tracing_opentelemetry::layer().with_tracer(provider.tracer("outbox-test")));
    tracing::subscriber::set_global_default(subscriber).expect("the only subscriber here");

    let (prefix, stream_name) = names();
    let js = jetstream(&nats_url()).await;
    let stream = ensure_stream(&js, &stream_name, vec![format!("{prefix}.>")])
        .await
        .unwrap();
    let outbox = Postgres::fresh().await;

    // The request: its span is current while the event is enqueued.
    let request = tracing::info_span!("http.request", route = "/items");
    let request_trace = trace_id(&request);
    let request_span_id = request.context().span().span_context().span_id();
    assert_ne!(
        request_trace,
        TraceId::INVALID,
        "the OpenTelemetry layer records spans"
    );
    async {
        let mut tx = outbox.pool().begin().await.unwrap();
        let event = ItemChanged {
            item: "traced".into(),
            n: 1,
        };
        outbox.enqueue(&mut *tx, &event).await.unwrap();
        tx.commit().await.unwrap();
    }
    .instrument(request.clone())
    .await;
    // And one written outside any span: no trace context to carry.
    let mut tx = outbox.pool().begin().await.unwrap();
    let untraced = ItemChanged {
        item: "untraced".into(),
        n: 1,
    };
    outbox.enqueue(&mut *tx, &untraced).await.unwrap();
    tx.commit().await.unwrap();

    let relay = RunningRelay::start(
        Relay::builder(
            outbox.clone(),
            NatsTransport::new(js.clone()).subject_prefix(&prefix),
        )
        .poll_interval(Duration::from_millis(50)),
    );
    let published = read_stream(&stream, 2).await;
    relay.stop().await;
    let traceparents: BTreeMap<String, Option<String>> = published
        .iter()
        .map(|m| {
            let headers = m.headers.as_ref().unwrap();
            let get = |name: &str| headers.get(name).map(|v| v.as_str().to_owned());
            (
                get("outbox-aggregate-id").unwrap(),
                get(header::TRACEPARENT),
            )
        })
        .collect();
    let carried = traceparents["traced"]
        .clone()
        .expect("traceparent on the broker message");
    assert_eq!(
        carried,
        format!("00-{request_trace}-{request_span_id}-01"),
        "the request's span, sampled"
    );
    assert_eq!(traceparents["untraced"], None);

    // The consumer's handler runs inside the request's trace.
    let seen: Arc<Mutex<BTreeMap<String, TraceId>>> = Arc::default();
    let registry = outbox::Registry::builder()
        .handler("trace", {
            let seen = seen.clone();
            move |event: ItemChanged, _ctx: HandlerContext| {
                let trace = trace_id(&tracing::Span::current());
                seen.lock().unwrap().insert(event.item, trace);
                async { Ok(()) }
            }
        })
        .unwrap()
        .build();
    let pull = stream
        .create_consumer(consumer::pull::Config {
            durable_name: Some("traced".into()),
            ack_policy: consumer::AckPolicy::Explicit,
            ..Default::default()
        })
        .await
        .unwrap();
    let consumer = NatsConsumer::new(pull, outbox::Dispatcher::new(registry));
    let shutdown = outbox::CancellationToken::new();
    let consuming = tokio::spawn({
        let shutdown = shutdown.clone();
        async move { consumer.run(shutdown).await.unwrap() }
    });
    eventually("both handled", WAIT, || {
        std::future::ready(seen.lock().unwrap().len() == 2)
    })
    .await;
    shutdown.cancel();
    consuming.await.unwrap();
    let seen = seen.lock().unwrap().clone();
    assert_eq!(
        seen["traced"], request_trace,
        "the handler continues the request's trace"
    );
    assert_ne!(seen["untraced"], request_trace);
    assert_ne!(seen["untraced"], TraceId::INVALID);

    // What an exporter receives: the consume and handle spans as children of the request.
    provider.force_flush().unwrap();
    let spans = exporter.get_finished_spans().unwrap();
    let in_request: Vec<_> = spans
        .iter()
        .filter(|s| s.span_context.trace_id() == request_trace)
        .map(|s| (s.name.to_string(), s.parent_span_id))
        .collect();
    for name in ["outbox.consume", "outbox.handle"] {
        assert!(
            in_request
                .iter()
                .any(|(n, parent)| n == name && *parent == request_span_id),
            "no {name} span under the request's span: {in_request:?}"
        );
    }
    js.delete_stream(&stream_name).await.unwrap();
    Postgres::drop_tables(&outbox).await;
}
