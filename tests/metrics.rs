//! The metrics of `outbox::metrics`, recorded while a relay publishes to a real NATS JetStream
//! and a consumer reads the stream back, with a recorder installed the way an exporter is.
//! One test per binary: the recorder is global.

use async_nats::jetstream::consumer;
use metrics_util::debugging::{DebugValue, DebuggingRecorder, Snapshotter};
use outbox::consumer::Source;
use outbox::nats::{ensure_stream, NatsConsumer, NatsTransport};
use outbox::{metrics as m, HandlerContext, HandlerError, Relay};
use outbox_tests::nats::{jetstream, names, nats_url};
use outbox_tests::{eventually, Huge, ItemChanged, RunningRelay, TestDb};
use sqlx::Postgres;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

const WAIT: Duration = Duration::from_secs(60);

type Labels = Vec<(String, String)>;

/// What the recorder saw so far. A snapshot of the debugging recorder drains it (counters and
/// gauges back to 0, histograms emptied), so every snapshot is folded in here: counters and
/// histogram sample counts add up, a gauge keeps the last value it was set to.
struct Seen {
    snapshotter: Snapshotter,
    values: Mutex<HashMap<(String, Labels), f64>>,
}

impl Seen {
    /// The value of metric `name` summed over the label sets that include every pair of
    /// `labels`; for a histogram, its number of samples.
    fn value(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        let mut values = self.values.lock().unwrap();
        for (key, _, _, value) in self.snapshotter.snapshot().into_vec() {
            let key = key.key();
            let id = (
                key.name().to_owned(),
                key.labels()
                    .map(|l| (l.key().to_owned(), l.value().to_owned()))
                    .collect(),
            );
            let slot = values.entry(id).or_insert(0.0);
            match value {
                DebugValue::Counter(n) => *slot += n as f64,
                DebugValue::Histogram(samples) => *slot += samples.len() as f64,
                // 0 is also what the snapshot leaves behind: keep the value set before it.
                DebugValue::Gauge(g) if g.into_inner() != 0.0 => *slot = g.into_inner(),
                DebugValue::Gauge(_) => {}
            }
        }
        values
            .iter()
            .filter(|((n, l), _)| {
                n == name
                    && labels
                        .iter()
                        .all(|(k, v)| l.iter().any(|(lk, lv)| lk == k && lv == v))
            })
            .map(|(_, v)| v)
            .sum()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relay_and_consumer_record_their_metrics() {
    let recorder = DebuggingRecorder::new();
    let seen = Seen {
        snapshotter: recorder.snapshotter(),
        values: Mutex::default(),
    };
    recorder
        .install()
        .expect("the only recorder of this test binary");

    let (prefix, stream_name) = names();
    let js = jetstream(&nats_url()).await;
    let stream = ensure_stream(&js, &stream_name, vec![format!("{prefix}.>")])
        .await
        .unwrap();
    let outbox = Postgres::fresh().await;
    let table = outbox.table().as_str().to_owned();
    let mut tx = outbox.pool().begin().await.unwrap();
    for n in 1..=10 {
        for item in ["a", "b"] {
            let event = ItemChanged {
                item: item.into(),
                n,
            };
            outbox.enqueue(&mut *tx, &event).await.unwrap();
        }
    }
    // Over NATS's maximum payload: refused for good, dead at once.
    let huge = Huge {
        item: "c".into(),
        blob: "x".repeat(2 << 20),
    };
    outbox.enqueue(&mut *tx, &huge).await.unwrap();
    tx.commit().await.unwrap();

    let relay = RunningRelay::start(
        Relay::builder(
            outbox.clone(),
            NatsTransport::new(js.clone()).subject_prefix(&prefix),
        )
        .poll_interval(Duration::from_millis(50)),
    );
    let delivered = [
        ("table", table.as_str()),
        ("event_type", "test.item_changed"),
        ("destination", "nats"),
    ];
    eventually("20 delivered and 1 dead, counted", WAIT, || {
        let (d, x) = (
            seen.value(m::DELIVERED, &delivered),
            seen.value(m::DEAD, &[("table", &table), ("event_type", "test.huge")]),
        );
        std::future::ready(d == 20.0 && x == 1.0)
    })
    .await;
    relay.stop().await;
    let latency = seen.value(
        m::DELIVERY_LATENCY,
        &[("table", &table), ("destination", "nats")],
    );
    assert_eq!(latency, 20.0, "one latency sample per delivered event");
    assert!(seen.value(m::PUBLISH_DURATION, &[("table", &table)]) >= 1.0);
    assert_eq!(seen.value(m::FAILED, &[("table", &table)]), 0.0);

    // The gauges, from the table.
    let shutdown = outbox::CancellationToken::new();
    let gauges = tokio::spawn({
        let (outbox, shutdown) = (outbox.clone(), shutdown.clone());
        async move {
            outbox
                .record_gauges(Duration::from_millis(100), shutdown)
                .await
        }
    });
    let status = |s: &'static str| [("table", table.clone()), ("status", s.to_owned())];
    eventually("the gauges read the table", WAIT, || {
        let read = |s| {
            let labels = status(s);
            let labels: Vec<(&str, &str)> = labels.iter().map(|(k, v)| (*k, v.as_str())).collect();
            seen.value(m::EVENTS, &labels)
        };
        std::future::ready(read("delivered") == 20.0 && read("dead") == 1.0)
    })
    .await;
    assert_eq!(
        seen.value(m::EVENTS, &[("table", &table), ("status", "pending")]),
        0.0
    );
    assert_eq!(seen.value(m::OLDEST_PENDING_AGE, &[("table", &table)]), 0.0);
    shutdown.cancel();
    gauges.await.unwrap();

    // The consumer: event 1 of item a fails once, the rest are handled at once.
    let failed_once = Arc::new(AtomicU32::new(0));
    let registry = outbox::Registry::builder()
        .handler("count", {
            let failed_once = failed_once.clone();
            move |event: ItemChanged, _ctx: HandlerContext| {
                let fail = event.item == "a"
                    && event.n == 1
                    && failed_once.fetch_add(1, Ordering::SeqCst) == 0;
                async move {
                    if fail {
                        Err(HandlerError::retry("not yet"))
                    } else {
                        Ok(())
                    }
                }
            }
        })
        .unwrap()
        .build();
    let pull = stream
        .create_consumer(consumer::pull::Config {
            durable_name: Some("metrics".into()),
            ack_policy: consumer::AckPolicy::Explicit,
            ..Default::default()
        })
        .await
        .unwrap();
    let consumer = NatsConsumer::new(pull, outbox::Dispatcher::new(registry))
        .retry(outbox::RetryPolicy::exponential(Duration::from_millis(10)).max_attempts(5));
    let source = consumer.source().name().to_owned();
    let shutdown = outbox::CancellationToken::new();
    let consuming = tokio::spawn({
        let shutdown = shutdown.clone();
        async move { consumer.run(shutdown).await.unwrap() }
    });
    let handled = [
        ("source", source.as_str()),
        ("event_type", "test.item_changed"),
    ];
    eventually("20 messages handled, counted", WAIT, || {
        std::future::ready(seen.value(m::CONSUMER_HANDLED, &handled) == 20.0)
    })
    .await;
    shutdown.cancel();
    consuming.await.unwrap();
    assert_eq!(seen.value(m::CONSUMER_RETRIED, &handled), 1.0);
    assert_eq!(seen.value(m::CONSUMER_DEAD, &[("source", &source)]), 0.0);
    assert_eq!(
        seen.value(m::PROCESS_DURATION, &handled),
        21.0,
        "one handler-time sample per attempt"
    );
    js.delete_stream(&stream_name).await.unwrap();
    Postgres::drop_tables(&outbox).await;
}
