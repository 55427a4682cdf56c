//! What an outside review of issue 12 (bad input and security, the NATS start-up catch-up)
//! broke, against the real servers. Each test failed on the code under review; its comment
//! says what the defect was.

use async_nats::jetstream::consumer as js_consumer;
use async_nats::jetstream::AckKind;
use futures_util::StreamExt;
use outbox::amqp::{AmqpConsumer, AmqpSource, AmqpTransport};
use outbox::nats::{ensure_stream, NatsConsumer, NatsTransport};
use outbox::{
    CancellationToken, Dispatcher, Envelope, Error, HandlerContext, HandlerError, Outbox, Registry,
    Relay,
};
use outbox_tests::lanes::{amqp_url, Broker, Lane};
use outbox_tests::nats::{jetstream, names, nats_url};
use outbox_tests::{
    always_ok, dispatcher, eventually, init_tracing, Huge, ItemChanged, Log, RunningRelay, TestDb,
};
use sqlx::Postgres;
use std::time::{Duration, Instant};

fn group() -> String {
    format!("g{}", &uuid::Uuid::new_v4().simple().to_string()[..10])
}

/// Defect: outbox-nats/src/lib.rs `NatsSource::wait_for_redeliveries` waits
/// `config.ack_wait` for a crashed predecessor's messages. With a consumer `backoff` (a
/// JetStream setting users choose for retries), the server overwrites `ack_wait` with
/// `backoff[0]` and redelivers a message on its n-th delivery only after `backoff[n-1]`. So the
/// catch-up gives up after `backoff[0]` and hands out newer messages first.
///
/// Here `a1` was delivered, given back (Nak, as a graceful stop does) twice, and delivered a
/// third time to a process that died holding it: JetStream redelivers it 20 s later. `a2` is
/// published after the crash. Expected: the restarted NatsConsumer handles `a1` before `a2`
/// (RELIABILITY.md guarantee 3, "also holds at consumers that crash and restart"). Today it
/// handles `a2` about 2 s after start and `a1` after 20 s: `[2, 1]`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_restart_after_a_crash_keeps_order_when_the_consumer_has_a_backoff() {
    init_tracing();
    let lane = Lane::new(Broker::Nats).await;
    lane.publish(&[lane.envelope("a", 1)]).await;
    let js = jetstream(&nats_url()).await;
    let stream = js.get_stream(lane.name.to_uppercase()).await.unwrap();
    let name = group();
    let config = || js_consumer::pull::Config {
        durable_name: Some(name.clone()),
        ack_policy: js_consumer::AckPolicy::Explicit,
        backoff: vec![
            Duration::from_secs(1),
            Duration::from_secs(20),
            Duration::from_secs(20),
        ],
        max_deliver: 10,
        ..Default::default()
    };
    let predecessor = stream
        .get_or_create_consumer(&name, config())
        .await
        .unwrap();
    for delivery in 1..=3 {
        let mut batch = predecessor
            .fetch()
            .max_messages(1)
            .expires(Duration::from_secs(5))
            .messages()
            .await
            .unwrap();
        let message = batch.next().await.expect("a1 is delivered").unwrap();
        assert_eq!(
            message.info().unwrap().stream_sequence,
            1,
            "delivery {delivery} is a1"
        );
        if delivery < 3 {
            message.ack_with(AckKind::Nak(None)).await.unwrap();
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        // The third delivery is dropped unacknowledged: the process died holding it.
    }
    lane.publish(&[lane.envelope("a", 2)]).await;

    let pull = stream
        .get_or_create_consumer(&name, config())
        .await
        .unwrap();
    let log = Log::default();
    let consumer = NatsConsumer::new(pull, dispatcher(&log, always_ok()));
    let shutdown = CancellationToken::new();
    let task = tokio::spawn({
        let shutdown = shutdown.clone();
        async move { consumer.run(shutdown).await }
    });
    eventually("a1 and a2 handled", Duration::from_secs(60), || async {
        log.len() >= 2
    })
    .await;
    shutdown.cancel();
    task.await.unwrap().unwrap();
    let order: Vec<u64> = log.snapshot().iter().map(|h| h.event.n).collect();
    assert_eq!(
        order,
        [1, 2],
        "the restarted consumer handled a2 before the crashed predecessor's a1"
    );
}

/// A dispatcher whose `ItemChanged` handler takes 10 ms and logs what it handled.
fn slow_dispatcher(log: &Log) -> Dispatcher {
    let log = log.clone();
    let registry = Registry::builder()
        .handler::<ItemChanged, _, _>("slow", move |event: ItemChanged, ctx: HandlerContext| {
            let log = log.clone();
            async move {
                tokio::time::sleep(Duration::from_millis(10)).await;
                log.push(event, &ctx);
                Ok::<(), HandlerError>(())
            }
        })
        .unwrap()
        .build();
    Dispatcher::new(registry)
}

/// Defect (latency; the doc comment said "a restart after a graceful stop about a second"): a
/// graceful stop gave back only what the consumer held. What async-nats had already pulled
/// into its buffer, and what the server delivered into the dropped pull request, stayed pending
/// at the server until the ack wait, so the next consumer saw more pending than came back at
/// once and waited the whole ack wait (30 s here) before handling anything.
///
/// Expected: after a graceful stop under a backlog, the next consumer handles its first event
/// within a few seconds, and every aggregate's events arrive in order across the two.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_restart_after_a_graceful_stop_under_a_backlog_starts_at_once() {
    init_tracing();
    let lane = Lane::new(Broker::Nats).await;
    let backlog: Vec<Envelope> = (1..=40)
        .flat_map(|n| (0..10).map(move |a| (a, n)))
        .map(|(a, n)| lane.envelope(&format!("a{a}"), n))
        .collect();
    lane.publish(&backlog).await;
    let js = jetstream(&nats_url()).await;
    let stream = js.get_stream(lane.name.to_uppercase()).await.unwrap();
    let name = group();
    let config = || js_consumer::pull::Config {
        durable_name: Some(name.clone()),
        ack_policy: js_consumer::AckPolicy::Explicit,
        ack_wait: Duration::from_secs(30),
        ..Default::default()
    };
    let log = Log::default();
    // A consumer on the durable, running until its token is cancelled.
    let start = || async {
        let pull = stream
            .get_or_create_consumer(&name, config())
            .await
            .unwrap();
        let consumer = NatsConsumer::new(pull, slow_dispatcher(&log)).concurrency(2);
        let shutdown = CancellationToken::new();
        let task = tokio::spawn({
            let shutdown = shutdown.clone();
            async move { consumer.run(shutdown).await }
        });
        (shutdown, task)
    };

    let (shutdown, task) = start().await;
    eventually(
        "the first consumer handles some",
        Duration::from_secs(30),
        || async { log.len() >= 20 },
    )
    .await;
    shutdown.cancel();
    task.await.unwrap().unwrap();
    let before = log.len();
    assert!(
        before < backlog.len(),
        "the backlog outlives the first consumer"
    );

    let started = Instant::now();
    let (shutdown, task) = start().await;
    eventually(
        "the next consumer handles an event within 10 s",
        Duration::from_secs(10),
        || async { log.len() > before },
    )
    .await;
    let waited = started.elapsed();
    eventually(
        "the backlog is handled",
        Duration::from_secs(60),
        || async {
            let handled: std::collections::HashSet<_> =
                log.snapshot().iter().map(|h| h.event_id).collect();
            handled.len() >= backlog.len()
        },
    )
    .await;
    shutdown.cancel();
    task.await.unwrap().unwrap();

    let mut last = std::collections::HashMap::new();
    let mut seen = std::collections::HashSet::new();
    for handled in log.snapshot() {
        if !seen.insert(handled.event_id) {
            continue;
        }
        let previous = last
            .insert(handled.event.item.clone(), handled.event.n)
            .unwrap_or(0);
        assert_eq!(
            handled.event.n,
            previous + 1,
            "{} out of order across the restart",
            handled.event.item
        );
    }
    assert!(waited < Duration::from_secs(10), "waited {waited:?}");
}

/// Defect: outbox-amqp/src/lib.rs `AmqpTransport::ready` stores
/// `format!("cannot connect to RabbitMQ: {error}")`. For a URI that is not a base URL (a
/// missing `//`, or a missing scheme) amq-protocol-uri answers `Invalid URL: '<the whole
/// URI>'`, password included, and lapin passes that text on. It becomes the event's stored
/// `last_error` and the relay's warn log. README: "the errors it returns and the failure
/// reasons it stores name no password".
///
/// Expected: the stored reason does not contain the password. Today it does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_malformed_amqp_uri_keeps_its_password_out_of_the_stored_failure_reason() {
    init_tracing();
    let secret = "AmqpTypoS3cret-41";
    let outbox = Postgres::fresh().await;
    let mut tx = outbox.pool().begin().await.unwrap();
    let id = outbox
        .enqueue(
            &mut *tx,
            &ItemChanged {
                item: "typo".into(),
                n: 1,
            },
        )
        .await
        .unwrap();
    tx.commit().await.unwrap();
    // "amqp:" without "//", a typo a configuration file can hold.
    let transport = AmqpTransport::new(format!("amqp:guest:{secret}@127.0.0.1:5672/%2f"));
    assert!(!format!("{transport:?}").contains(secret));
    let relay = RunningRelay::start(
        Relay::builder(outbox.clone(), transport).poll_interval(Duration::from_millis(20)),
    );
    let last_error = || async { outbox.get(id).await.unwrap().and_then(|r| r.last_error) };
    eventually(
        "the connection failure is recorded",
        Duration::from_secs(30),
        || async { last_error().await.is_some() },
    )
    .await;
    relay.stop().await;
    let reason = last_error().await.unwrap();
    Postgres::drop_tables(&outbox).await;
    assert!(
        !reason.contains(secret),
        "the stored failure reason holds the password: {reason}"
    );
}

/// Defect (README's advice for `max_payload_bytes`): "set it to what your brokers accept
/// (NATS and Kafka: 1 MiB by default) ... so the request that wrote it fails instead of the
/// event going dead later". The check counts the JSON payload only; NATS's `max_payload` counts
/// headers too (the outbox sends ~10 of them), so a payload of exactly the limit passes enqueue
/// and NATS refuses it for good: it goes dead.
///
/// Expected: with the README's `max_payload_bytes(1_000_000)` an event either is refused at
/// enqueue (`PayloadTooLarge`) or reaches the NATS server of the suite (max_payload 1 MiB).
/// With the old advice (`1 << 20`) it was accepted and went dead.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_payload_bytes_at_the_readme_value_leaves_room_for_the_headers_on_nats() {
    init_tracing();
    const ONE_MIB: usize = 1 << 20;
    // README: "max_payload_bytes(1_000_000)", below NATS's 1 MiB, for the headers.
    const LIMIT: usize = 1_000_000;
    let fresh = Postgres::fresh().await;
    let outbox = Outbox::<Postgres>::builder(fresh.pool().clone())
        .table(fresh.table().as_str())
        .max_payload_bytes(LIMIT)
        .build()
        .unwrap();
    let empty = serde_json::to_string(&Huge {
        item: "h".into(),
        blob: String::new(),
    })
    .unwrap()
    .len();
    let huge = Huge {
        item: "h".into(),
        blob: "x".repeat(LIMIT - empty),
    };
    assert_eq!(serde_json::to_string(&huge).unwrap().len(), LIMIT);
    const { assert!(LIMIT < ONE_MIB) };
    let mut tx = outbox.pool().begin().await.unwrap();
    let id = match outbox.enqueue(&mut *tx, &huge).await {
        // The limit leaves room for what the transport adds: the advice holds.
        Err(Error::PayloadTooLarge { .. }) => {
            tx.rollback().await.unwrap();
            Postgres::drop_tables(&outbox).await;
            return;
        }
        Err(other) => panic!("enqueue failed: {other}"),
        Ok(id) => {
            tx.commit().await.unwrap();
            id
        }
    };
    let (prefix, stream) = names();
    let js = jetstream(&nats_url()).await;
    ensure_stream(&js, &stream, vec![format!("{prefix}.>")])
        .await
        .unwrap();
    let relay = RunningRelay::start(
        Relay::builder(
            outbox.clone(),
            NatsTransport::new(js).subject_prefix(prefix.as_str()),
        )
        .poll_interval(Duration::from_millis(20)),
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    while Postgres::count_status(&outbox, "pending").await > 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    relay.stop().await;
    let delivered = Postgres::count_status(&outbox, "delivered").await;
    let reason = outbox.get(id).await.unwrap().and_then(|r| r.last_error);
    Postgres::drop_tables(&outbox).await;
    assert_eq!(
        delivered, 1,
        "accepted at enqueue under max_payload_bytes({LIMIT}), then not delivered: {reason:?}"
    );
}

/// Defect (bad input, outside the reviewed range but inside issue 12's "names from
/// configuration"): outbox-amqp/src/lib.rs `AmqpSource::new` builds the consumer tag
/// `outbox-<queue>-<32 hex>`; for a legal queue name of more than 215 bytes the tag exceeds
/// AMQP's 255-byte short string and `ShortString::from` panics in `receive`, in the consumer's
/// receiving task: the consumer stops with "the receiving task failed" and consumes nothing.
///
/// Expected: a consumer on a legally named queue (230 bytes) handles its message. Today it
/// stops at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn amqp_consumer_on_a_legal_230_byte_queue_name_consumes() {
    init_tracing();
    let queue = format!("q{}", "x".repeat(229));
    assert_eq!(queue.len(), 230);
    let connection = lapin::Connection::connect(&amqp_url(), Default::default())
        .await
        .unwrap();
    let channel = connection.create_channel().await.unwrap();
    channel
        .queue_declare(
            queue.as_str().into(),
            lapin::options::QueueDeclareOptions {
                exclusive: true,
                ..Default::default()
            },
            lapin::types::FieldTable::default(),
        )
        .await
        .unwrap();
    let envelope = Envelope {
        id: uuid::Uuid::now_v7(),
        created_at: chrono::Utc::now(),
        event_type: "test.item_changed".into(),
        aggregate_type: "item".into(),
        aggregate_id: "long".into(),
        sequence: 1,
        schema_version: 1,
        topic: "items".into(),
        payload: serde_json::json!({ "item": "long", "n": 1 }).to_string(),
        headers: Default::default(),
        attempt: 1,
    };
    channel
        .basic_publish(
            "".into(),
            queue.as_str().into(),
            lapin::options::BasicPublishOptions::default(),
            envelope.payload.as_bytes(),
            outbox::amqp::properties(&envelope),
        )
        .await
        .unwrap()
        .await
        .unwrap();

    let consuming = connection.create_channel().await.unwrap();
    let log = Log::default();
    let consumer = AmqpConsumer::new(
        AmqpSource::new(consuming, queue.as_str()),
        dispatcher(&log, always_ok()),
    );
    let shutdown = CancellationToken::new();
    let task = tokio::spawn({
        let shutdown = shutdown.clone();
        async move { consumer.run(shutdown).await }
    });
    let deadline = Instant::now() + Duration::from_secs(15);
    while log.is_empty() {
        if task.is_finished() {
            let outcome = task.await;
            panic!("the consumer stopped before handling anything: {outcome:?}");
        }
        assert!(Instant::now() < deadline, "nothing handled within 15 s");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    shutdown.cancel();
    task.await.unwrap().unwrap();
    connection.close(0, "done".into()).await.ok();
}
