//! The NATS JetStream transport and consumer against a real server (127.0.0.1:4222, or
//! `OUTBOX_TEST_NATS_URL`), plus private `nats-server`s for the outage and cluster tests.

use async_nats::jetstream::{self, consumer};
use outbox::nats::{ensure_stream, NatsConsumer, NatsTransport};
use outbox::{EventStatus, Inbox, Relay, RetryPolicy};
use outbox_tests::nats::{jetstream, names, nats_url, read_stream};
use outbox_tests::{assert_dead_at_once, wait_for_recorded_failure, PrivateServer};
use outbox_tests::{
    broker_retry, eventually, init_tracing, AfterCommit, Applier, Huge, ItemChanged,
    MalformedItemChanged, RunningRelay, TestDb, Unrouted,
};
use sqlx::Postgres;
use std::collections::{BTreeMap, HashSet};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

const WAIT: Duration = Duration::from_secs(120);

/// Every message in `stream`, in stream order: exactly `expected` of them.
async fn read_all(
    js: &jetstream::Context,
    stream: &str,
    expected: usize,
) -> Vec<jetstream::Message> {
    let stream = js.get_stream(stream).await.unwrap();
    let messages = read_stream(&stream, expected).await;
    let mut info = stream.clone();
    let stored = info.info().await.unwrap().state.messages;
    assert_eq!(
        stored, expected as u64,
        "the stream holds more messages than events"
    );
    messages
}

fn header<'a>(message: &'a jetstream::Message, name: &str) -> &'a str {
    message
        .headers
        .as_ref()
        .and_then(|h| h.get(name))
        .map(|v| v.as_str())
        .unwrap_or_else(|| panic!("message without {name}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relay_publishes_10k_events_in_aggregate_order() {
    init_tracing();
    let (prefix, stream) = names();
    let js = jetstream(&nats_url()).await;
    ensure_stream(&js, &stream, vec![format!("{prefix}.>")])
        .await
        .unwrap();
    let outbox = Postgres::fresh().await;
    for n in 1..=100u64 {
        let events: Vec<_> = (0..100)
            .map(|a| ItemChanged {
                item: format!("item-{a}"),
                n,
            })
            .collect();
        let mut tx = outbox.pool().begin().await.unwrap();
        outbox.enqueue_batch(&mut *tx, &events).await.unwrap();
        tx.commit().await.unwrap();
    }
    let relay = RunningRelay::start(
        Relay::builder(
            outbox.clone(),
            NatsTransport::new(js.clone()).subject_prefix(&prefix),
        )
        .batch_size(100)
        .workers(2)
        .poll_interval(Duration::from_millis(50)),
    );
    eventually("all 10,000 delivered", WAIT, || async {
        Postgres::count_status(&outbox, "delivered").await == 10_000
    })
    .await;
    relay.stop().await;

    let messages = read_all(&js, &stream, 10_000).await;
    let mut last: BTreeMap<String, i64> = BTreeMap::new();
    let mut ids = HashSet::new();
    for m in &messages {
        assert_eq!(
            m.subject.as_str(),
            format!("{prefix}.items.test.item_changed")
        );
        assert_eq!(header(m, "Nats-Msg-Id"), header(m, "outbox-id"));
        assert!(
            ids.insert(header(m, "outbox-id").to_owned()),
            "duplicate message"
        );
        assert_eq!(header(m, "outbox-event-type"), "test.item_changed");
        assert_eq!(header(m, "outbox-aggregate-type"), "item");
        assert_eq!(header(m, "outbox-schema-version"), "1");
        assert_eq!(header(m, "content-type"), "application/json");
        let event: ItemChanged = serde_json::from_slice(&m.payload).unwrap();
        assert_eq!(header(m, "outbox-aggregate-id"), event.item);
        let sequence: i64 = header(m, "outbox-sequence").parse().unwrap();
        assert_eq!(sequence, event.n as i64, "payload and sequence disagree");
        let previous = last.insert(event.item.clone(), sequence).unwrap_or(0);
        assert_eq!(
            sequence,
            previous + 1,
            "{}: out of order in the stream",
            event.item
        );
    }
    assert_eq!(last.len(), 100);
    js.delete_stream(&stream).await.unwrap();
    Postgres::drop_tables(&outbox).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversize_and_unroutable_events_go_dead_with_the_broker_reason() {
    init_tracing();
    let (prefix, stream) = names();
    let js = jetstream(&nats_url()).await;
    // Only `items` is captured: `nowhere` has no stream.
    ensure_stream(&js, &stream, vec![format!("{prefix}.items.>")])
        .await
        .unwrap();
    let outbox = Postgres::fresh().await;
    let mut tx = outbox.pool().begin().await.unwrap();
    let huge = outbox
        .enqueue(
            &mut *tx,
            &Huge {
                item: "big".into(),
                blob: "x".repeat(2 * 1024 * 1024),
            },
        )
        .await
        .unwrap();
    let unrouted = outbox
        .enqueue(
            &mut *tx,
            &Unrouted {
                item: "lost".into(),
            },
        )
        .await
        .unwrap();
    let fine: Vec<_> = outbox
        .enqueue_batch(
            &mut *tx,
            &(0..10)
                .map(|a| ItemChanged {
                    item: format!("ok-{a}"),
                    n: 1,
                })
                .collect::<Vec<_>>(),
        )
        .await
        .unwrap();
    tx.commit().await.unwrap();
    let relay = RunningRelay::start(
        Relay::builder(
            outbox.clone(),
            NatsTransport::new(js.clone()).subject_prefix(&prefix),
        )
        .retry(broker_retry())
        .poll_interval(Duration::from_millis(50)),
    );
    eventually("both bad events dead, the rest delivered", WAIT, || async {
        Postgres::count_status(&outbox, "dead").await == 2
            && Postgres::count_status(&outbox, "delivered").await == 10
    })
    .await;
    relay.stop().await;
    assert_dead_at_once(&outbox, huge, "max payload").await;
    assert_dead_at_once(&outbox, unrouted, "no stream").await;
    for id in fine {
        assert_eq!(
            outbox.get(id).await.unwrap().unwrap().status,
            EventStatus::Delivered
        );
    }
    js.delete_stream(&stream).await.unwrap();
    Postgres::drop_tables(&outbox).await;
}

/// A line break in a header value or aggregate id made the NATS client panic while building
/// headers, which killed relay workers one after the other. Enqueue refuses such values now;
/// rows that carry them anyway (written by other means) fail their own event only, at once,
/// and the relay keeps delivering.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_header_nats_cannot_carry_fails_only_its_event() {
    init_tracing();
    let (prefix, stream) = names();
    let js = jetstream(&nats_url()).await;
    ensure_stream(&js, &stream, vec![format!("{prefix}.items.>")])
        .await
        .unwrap();
    let outbox = Postgres::fresh().await;
    let mut tx = outbox.pool().begin().await.unwrap();
    let ids = outbox
        .enqueue_batch(
            &mut *tx,
            &(0..10)
                .map(|a| ItemChanged {
                    item: format!("item-{a}"),
                    n: 1,
                })
                .collect::<Vec<_>>(),
        )
        .await
        .unwrap();
    tx.commit().await.unwrap();
    // As an older release or plain SQL could have written them.
    sqlx::query(&format!(
        r#"UPDATE {} SET headers = '{{"tenant": "acme\r\nNats-Msg-Id: x"}}' WHERE id = $1"#,
        outbox.table()
    ))
    .bind(ids[0])
    .execute(outbox.pool())
    .await
    .unwrap();
    let relay = RunningRelay::start(
        Relay::builder(
            outbox.clone(),
            NatsTransport::new(js.clone()).subject_prefix(&prefix),
        )
        .retry(broker_retry())
        .poll_interval(Duration::from_millis(50)),
    );
    eventually("the bad event dead, the rest delivered", WAIT, || async {
        Postgres::count_status(&outbox, "dead").await == 1
            && Postgres::count_status(&outbox, "delivered").await == 9
    })
    .await;
    relay.stop().await;
    assert_dead_at_once(
        &outbox,
        ids[0],
        "cannot carry the value of header \"tenant\"",
    )
    .await;
    js.delete_stream(&stream).await.unwrap();
    Postgres::drop_tables(&outbox).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_outage_loses_nothing_and_needs_no_restart() {
    init_tracing();
    let mut server = outbox_tests::faults::servers::private_nats().await;
    let url = server.address();
    let js = jetstream(&url).await;
    let (prefix, stream) = names();
    ensure_stream(&js, &stream, vec![format!("{prefix}.>")])
        .await
        .unwrap();
    let outbox = Postgres::fresh().await;
    let relay = RunningRelay::start(
        Relay::builder(
            outbox.clone(),
            NatsTransport::new(js.clone()).subject_prefix(&prefix),
        )
        // Few attempts: an outage must not burn them (the server is unreachable, the events
        // are fine), however long it lasts.
        .retry(
            outbox::RetryPolicy::exponential(Duration::from_millis(50))
                .max_delay(Duration::from_millis(200))
                .max_attempts(3),
        )
        .poll_interval(Duration::from_millis(50)),
    );

    server.stop();
    for n in 1..=10u64 {
        let events: Vec<_> = (0..100)
            .map(|a| ItemChanged {
                item: format!("item-{a}"),
                n,
            })
            .collect();
        let mut tx = outbox.pool().begin().await.unwrap();
        outbox.enqueue_batch(&mut *tx, &events).await.unwrap();
        tx.commit().await.unwrap();
    }
    // The relay tries, fails, and records why; the outage goes on for many more tries.
    wait_for_recorded_failure(&outbox).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(Postgres::count_status(&outbox, "dead").await, 0);

    server.restart().await;
    eventually(
        "all 1,000 delivered after the broker came back",
        WAIT,
        || async { Postgres::count_status(&outbox, "delivered").await == 1000 },
    )
    .await;
    relay.stop().await;
    // Republished attempts were deduplicated by Nats-Msg-Id: each event is in the stream once.
    let messages = read_all(&js, &stream, 1000).await;
    let ids: HashSet<_> = messages
        .iter()
        .map(|m| header(m, "outbox-id").to_owned())
        .collect();
    assert_eq!(ids.len(), 1000);
    Postgres::drop_tables(&outbox).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consumer_runs_typed_handlers_once_with_the_inbox() {
    init_tracing();
    let (prefix, stream_name) = names();
    let js = jetstream(&nats_url()).await;
    let stream = ensure_stream(&js, &stream_name, vec![format!("{prefix}.>")])
        .await
        .unwrap();

    // Producer side: the outbox and its relay.
    let outbox = Postgres::fresh().await;
    let relay = RunningRelay::start(
        Relay::builder(
            outbox.clone(),
            NatsTransport::new(js.clone()).subject_prefix(&prefix),
        )
        .poll_interval(Duration::from_millis(50)),
    );

    // Consumer side: its own state table and inbox (here in the same server, other tables).
    // The first delivery of each event commits its effect but loses the ack: redelivered.
    let applier = Applier::new(&outbox, "inventory").await;
    let pull = stream
        .create_consumer(consumer::pull::Config {
            durable_name: Some("inventory".into()),
            ack_policy: consumer::AckPolicy::Explicit,
            ..Default::default()
        })
        .await
        .unwrap();
    let consumer = NatsConsumer::new(
        pull,
        applier.dispatcher(AfterCommit::LoseFirstAck {
            first_events_only: false,
        }),
    )
    .retry(
        RetryPolicy::exponential(Duration::from_millis(20)).max_delay(Duration::from_millis(50)),
    );
    let shutdown = outbox::CancellationToken::new();
    let consuming = tokio::spawn({
        let shutdown = shutdown.clone();
        async move { consumer.run(shutdown).await.unwrap() }
    });

    let mut tx = outbox.pool().begin().await.unwrap();
    // A message no handler can read: terminated, never blocking the others.
    outbox
        .enqueue(
            &mut *tx,
            &MalformedItemChanged {
                item: "poison".into(),
                wrong: true,
            },
        )
        .await
        .unwrap();
    for n in 1..=3u64 {
        for a in 0..10 {
            outbox
                .enqueue(
                    &mut *tx,
                    &ItemChanged {
                        item: format!("item-{a}"),
                        n,
                    },
                )
                .await
                .unwrap();
        }
    }
    tx.commit().await.unwrap();

    eventually("every event applied and redelivered once", WAIT, || async {
        applier.calls() >= 60
    })
    .await;
    eventually("every message acked or terminated", WAIT, || async {
        let mut pull = js
            .get_stream(&stream_name)
            .await
            .unwrap()
            .get_consumer::<consumer::pull::Config>("inventory")
            .await
            .unwrap();
        let info = pull.info().await.unwrap();
        info.num_pending == 0 && info.num_ack_pending == 0
    })
    .await;
    assert_eq!(
        applier.calls(),
        60,
        "the poison message never reached the handler"
    );
    assert_eq!(
        applier.applied().await,
        30,
        "each event changed the state exactly once"
    );
    shutdown.cancel();
    consuming.await.unwrap();
    relay.stop().await;
    js.delete_stream(&stream_name).await.unwrap();
    applier.drop_tables().await;
    Postgres::drop_tables(&outbox).await;
}

/// Seed 000: "once a message is consumed by the external system, mark it consumed in the
/// outbox". The consuming service writes a receipt to its own outbox in the transaction that
/// applies the event; its relay publishes it; the producer consumes receipts and records
/// `consumed_at`. The consumer never touches the producer's tables.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consumption_receipts_mark_producer_rows_consumed() {
    init_tracing();
    let (prefix, stream_name) = names();
    let js = jetstream(&nats_url()).await;
    let stream = ensure_stream(&js, &stream_name, vec![format!("{prefix}.>")])
        .await
        .unwrap();
    let transport = || NatsTransport::new(js.clone()).subject_prefix(&prefix);
    let pull = |name: &str, filter: String| {
        let stream = stream.clone();
        let name = name.to_owned();
        async move {
            stream
                .create_consumer(consumer::pull::Config {
                    durable_name: Some(name),
                    filter_subject: filter,
                    ack_policy: consumer::AckPolicy::Explicit,
                    ..Default::default()
                })
                .await
                .unwrap()
        }
    };

    // The producing service: its outbox, its relay, and its receipt consumer.
    let producer = Postgres::fresh().await;
    let producer_relay = RunningRelay::start(
        Relay::builder(producer.clone(), transport()).poll_interval(Duration::from_millis(50)),
    );
    let receipts = NatsConsumer::new(
        pull("receipts", format!("{prefix}.outbox.receipts.>")).await,
        outbox::Dispatcher::new(
            outbox::Registry::builder()
                .record_receipts(producer.clone())
                .unwrap()
                .build(),
        ),
    );

    // The consuming service: its own outbox (for receipts), inbox and relay.
    let consumer_outbox = Postgres::fresh().await;
    let inbox = Inbox::<Postgres>::new(
        consumer_outbox.pool().clone(),
        &format!("{}_inbox", consumer_outbox.table()),
        "inventory",
    )
    .unwrap();
    inbox.migrate().await.unwrap();
    let consumer_relay = RunningRelay::start(
        Relay::builder(consumer_outbox.clone(), transport())
            .poll_interval(Duration::from_millis(50)),
    );
    let registry = {
        let consumer_outbox = consumer_outbox.clone();
        outbox::Registry::builder()
            .handler::<ItemChanged, _, _>(
                "apply",
                move |_event: ItemChanged, ctx: outbox::HandlerContext| {
                    let consumer_outbox = consumer_outbox.clone();
                    async move {
                        let inbox = ctx.state::<Inbox<Postgres>>()?;
                        let Some(mut tx) = inbox.begin(&ctx).await? else {
                            return Ok(());
                        };
                        // ... apply the event to the consumer's own state here ...
                        consumer_outbox
                            .enqueue(&mut *tx, &outbox::Receipt::for_event(&ctx, "inventory"))
                            .await?;
                        tx.commit().await?;
                        Ok(())
                    }
                },
            )
            .unwrap()
            .build()
    };
    let items = NatsConsumer::new(
        pull("inventory", format!("{prefix}.items.>")).await,
        outbox::Dispatcher::new(registry).state(inbox),
    );
    let shutdown = outbox::CancellationToken::new();
    let tasks = [
        tokio::spawn({
            let shutdown = shutdown.clone();
            async move { receipts.run(shutdown).await.unwrap() }
        }),
        tokio::spawn({
            let shutdown = shutdown.clone();
            async move { items.run(shutdown).await.unwrap() }
        }),
    ];

    let mut tx = producer.pool().begin().await.unwrap();
    let ids = producer
        .enqueue_batch(
            &mut *tx,
            &(0..10)
                .map(|a| ItemChanged {
                    item: format!("item-{a}"),
                    n: 1,
                })
                .collect::<Vec<_>>(),
        )
        .await
        .unwrap();
    tx.commit().await.unwrap();
    eventually("every producer row is marked consumed", WAIT, || async {
        let consumed: i64 = sqlx::query_scalar(&format!(
            "SELECT count(*) FROM {} WHERE consumed_at IS NOT NULL",
            producer.table()
        ))
        .fetch_one(producer.pool())
        .await
        .unwrap();
        consumed == 10
    })
    .await;
    for id in ids {
        let row = producer.get(id).await.unwrap().unwrap();
        // The receipt may overtake the producer relay's own bookkeeping: no order between them.
        assert!(row.consumed_at.is_some());
    }
    shutdown.cancel();
    for t in tasks {
        t.await.unwrap();
    }
    producer_relay.stop().await;
    consumer_relay.stop().await;
    js.delete_stream(&stream_name).await.unwrap();
    sqlx::raw_sql(&format!("DROP TABLE {}_inbox", consumer_outbox.table()))
        .execute(consumer_outbox.pool())
        .await
        .unwrap();
    Postgres::drop_tables(&producer).await;
    Postgres::drop_tables(&consumer_outbox).await;
}

/// A handler slower than the consumer's ack wait is not raced by a redelivery: the consumer
/// reports progress while it runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_handler_is_not_redelivered_while_it_runs() {
    init_tracing();
    let (prefix, stream_name) = names();
    let js = jetstream(&nats_url()).await;
    let stream = ensure_stream(&js, &stream_name, vec![format!("{prefix}.>")])
        .await
        .unwrap();
    let outbox = Postgres::fresh().await;
    let mut tx = outbox.pool().begin().await.unwrap();
    outbox
        .enqueue(
            &mut *tx,
            &ItemChanged {
                item: "slow".into(),
                n: 1,
            },
        )
        .await
        .unwrap();
    tx.commit().await.unwrap();
    let relay = RunningRelay::start(
        Relay::builder(
            outbox.clone(),
            NatsTransport::new(js.clone()).subject_prefix(&prefix),
        )
        .poll_interval(Duration::from_millis(50)),
    );
    let calls = Arc::new(AtomicU32::new(0));
    let registry = {
        let calls = calls.clone();
        outbox::Registry::builder()
            .handler::<ItemChanged, _, _>("slow", move |_: ItemChanged, _| {
                let calls = calls.clone();
                async move {
                    calls.fetch_add(1, Ordering::SeqCst);
                    // Simulated work, three times the ack wait.
                    tokio::time::sleep(Duration::from_secs(3)).await;
                    Ok(())
                }
            })
            .unwrap()
            .build()
    };
    let pull = stream
        .create_consumer(consumer::pull::Config {
            durable_name: Some("slow".into()),
            ack_policy: consumer::AckPolicy::Explicit,
            ack_wait: Duration::from_secs(1),
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
    eventually("the message is acked", WAIT, || async {
        let mut c = js
            .get_stream(&stream_name)
            .await
            .unwrap()
            .get_consumer::<consumer::pull::Config>("slow")
            .await
            .unwrap();
        let info = c.info().await.unwrap();
        assert_eq!(
            info.num_redelivered, 0,
            "the server redelivered the message"
        );
        info.num_pending == 0 && info.num_ack_pending == 0 && info.delivered.stream_sequence == 1
    })
    .await;
    shutdown.cancel();
    consuming.await.unwrap();
    relay.stop().await;
    assert_eq!(
        calls.load(Ordering::SeqCst),
        1,
        "redelivered while the handler ran"
    );
    js.delete_stream(&stream_name).await.unwrap();
    Postgres::drop_tables(&outbox).await;
}

/// A three-node JetStream cluster, the stream replicated on all three, one node killed and
/// started again while the relay publishes and writers keep committing. The replies a client
/// gets while a server restarts or the stream's leader moves ("no responders", time-outs) are
/// an outage: with two attempts allowed, no event may die, none is lost, and each is in the
/// stream once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_node_restart_kills_no_event() {
    init_tracing();
    let program =
        std::env::var("OUTBOX_TEST_NATS_SERVER").unwrap_or_else(|_| "nats-server".to_owned());
    let cluster_ports: Vec<u16> = (0..3).map(|_| outbox_tests::free_port()).collect();
    let routes = cluster_ports
        .iter()
        .map(|p| format!("nats://127.0.0.1:{p}"))
        .collect::<Vec<_>>()
        .join(",");
    let mut nodes = Vec::new();
    for (i, port) in cluster_ports.iter().enumerate() {
        let (name, cluster) = (format!("n{i}"), format!("nats://127.0.0.1:{port}"));
        let args = [
            "-a",
            "127.0.0.1",
            "-p",
            "{port}",
            "-js",
            "-sd",
            "{dir}",
            "-n",
            &name,
            "--cluster_name",
            "outbox",
            "--cluster",
            &cluster,
            "--routes",
            &routes,
        ];
        nodes.push(PrivateServer::start(program.clone(), &args).await);
    }
    let servers: Vec<async_nats::ServerAddr> = nodes
        .iter()
        .map(|n| format!("nats://{}", n.address()).parse().unwrap())
        .collect();
    let mut js = jetstream::new(async_nats::connect(servers).await.unwrap());
    js.set_timeout(Duration::from_secs(2));
    let (prefix, stream) = names();
    // The cluster elects its JetStream leader first: creating the stream waits for it.
    eventually(
        "the JetStream cluster takes a replicated stream",
        WAIT,
        || async {
            js.get_or_create_stream(jetstream::stream::Config {
                name: stream.clone(),
                subjects: vec![format!("{prefix}.>")],
                num_replicas: 3,
                duplicate_window: Duration::from_secs(120),
                ..Default::default()
            })
            .await
            .is_ok()
        },
    )
    .await;
    let outbox = Postgres::fresh().await;
    let relay = RunningRelay::start(
        Relay::builder(
            outbox.clone(),
            NatsTransport::new(js.clone()).subject_prefix(&prefix),
        )
        .retry(
            RetryPolicy::exponential(Duration::from_millis(50))
                .max_delay(Duration::from_millis(200))
                .max_attempts(2),
        )
        .poll_interval(Duration::from_millis(50)),
    );
    let write = |n: u64| {
        let outbox = outbox.clone();
        async move {
            let events: Vec<_> = (0..100)
                .map(|a| ItemChanged {
                    item: format!("item-{a}"),
                    n,
                })
                .collect();
            let mut tx = outbox.pool().begin().await.unwrap();
            outbox.enqueue_batch(&mut *tx, &events).await.unwrap();
            tx.commit().await.unwrap();
        }
    };
    for n in 1..=5 {
        write(n).await;
    }
    // Stop the stream's leader: its replicas elect another while the relay publishes.
    let leader = js
        .get_stream(&stream)
        .await
        .unwrap()
        .info()
        .await
        .unwrap()
        .cluster
        .as_ref()
        .and_then(|c| c.leader.clone())
        .expect("a replicated stream has a leader");
    let stopped: usize = leader[1..].parse().unwrap();
    nodes[stopped].stop();
    for n in 6..=10 {
        write(n).await;
        tokio::time::sleep(Duration::from_millis(500)).await; // the writers' pace, not a wait
    }
    nodes[stopped].restart().await;
    for n in 11..=15 {
        write(n).await;
    }
    eventually("all 1,500 settled", WAIT, || async {
        Postgres::count_status(&outbox, "delivered").await
            + Postgres::count_status(&outbox, "dead").await
            == 1500
    })
    .await;
    relay.stop().await;
    assert_eq!(
        Postgres::count_status(&outbox, "dead").await,
        0,
        "healthy events died while a cluster node restarted"
    );
    // 1,500 distinct events, each stored once (republished attempts are deduplicated by
    // `Nats-Msg-Id`). The cluster may still be settling after the restart: ask until it answers.
    let stored = Arc::new(std::sync::atomic::AtomicU64::new(0));
    eventually("the stream reports its messages", WAIT, || {
        let (js, stream, stored) = (js.clone(), stream.clone(), stored.clone());
        async move {
            let Ok(mut info) = js.get_stream(&stream).await else {
                return false;
            };
            match info.info().await {
                Ok(info) => {
                    stored.store(info.state.messages, Ordering::SeqCst);
                    true
                }
                Err(_) => false,
            }
        }
    })
    .await;
    assert_eq!(stored.load(Ordering::SeqCst), 1500);
    Postgres::drop_tables(&outbox).await;
}

/// The correlation and causation ids travel as `outbox-correlation-id` / `outbox-causation-id`;
/// a message from a producer that still writes the old names (`correlation_id`,
/// `causation_id`) gives the handler the same ids.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn correlation_headers_use_outbox_names_and_old_names_are_still_read() {
    init_tracing();
    let (prefix, stream_name) = names();
    let js = jetstream(&nats_url()).await;
    let stream = ensure_stream(&js, &stream_name, vec![format!("{prefix}.>")])
        .await
        .unwrap();
    let outbox = Postgres::fresh().await;
    let mut tx = outbox.pool().begin().await.unwrap();
    let item = ItemChanged {
        item: "corr".into(),
        n: 1,
    };
    let options = outbox::EnqueueOptions::new()
        .correlation_id("req-1")
        .causation_id("cmd-1");
    outbox.enqueue_with(&mut *tx, &item, options).await.unwrap();
    tx.commit().await.unwrap();
    let relay = RunningRelay::start(
        Relay::builder(
            outbox.clone(),
            NatsTransport::new(js.clone()).subject_prefix(&prefix),
        )
        .poll_interval(Duration::from_millis(50)),
    );
    let published = read_all(&js, &stream_name, 1).await.remove(0);
    relay.stop().await;
    let headers = published.headers.clone().unwrap();
    assert_eq!(
        headers.get("outbox-correlation-id").map(|v| v.as_str()),
        Some("req-1")
    );
    assert_eq!(
        headers.get("outbox-causation-id").map(|v| v.as_str()),
        Some("cmd-1")
    );
    assert!(headers.get("correlation_id").is_none());
    assert!(headers.get("causation_id").is_none());

    // The same message as a 0.1 producer wrote it: the old names, a new id (NATS would
    // deduplicate on the same one).
    let mut old = async_nats::HeaderMap::new();
    for (name, values) in headers.iter() {
        let name = match name.as_ref() {
            "outbox-correlation-id" => "correlation_id",
            "outbox-causation-id" => "causation_id",
            "outbox-id" | "Nats-Msg-Id" => continue,
            other => other,
        };
        for value in values {
            old.append(name, value.as_str());
        }
    }
    let old_id = uuid::Uuid::now_v7().to_string();
    old.insert("outbox-id", old_id.as_str());
    old.insert("correlation_id", "req-2");
    old.insert("causation_id", "cmd-2");
    js.publish_with_headers(published.subject.clone(), old, published.payload.clone())
        .await
        .unwrap()
        .await
        .unwrap();

    let (seen_tx, mut seen) = tokio::sync::mpsc::unbounded_channel();
    let registry = outbox::Registry::builder()
        .handler::<ItemChanged, _, _>("ids", move |_: ItemChanged, ctx: outbox::HandlerContext| {
            let seen_tx = seen_tx.clone();
            async move {
                let ids = (
                    ctx.correlation_id().map(str::to_owned),
                    ctx.causation_id().map(str::to_owned),
                );
                let _ = seen_tx.send(ids);
                Ok(())
            }
        })
        .unwrap()
        .build();
    let pull = stream
        .create_consumer(consumer::pull::Config {
            durable_name: Some("ids".into()),
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
    let mut got = Vec::new();
    for _ in 0..2 {
        let ids = tokio::time::timeout(WAIT, seen.recv())
            .await
            .expect("the consumer handled both messages")
            .unwrap();
        got.push(ids);
    }
    shutdown.cancel();
    consuming.await.unwrap();
    got.sort();
    let some = |a: &str, b: &str| (Some(a.to_owned()), Some(b.to_owned()));
    assert_eq!(got, vec![some("req-1", "cmd-1"), some("req-2", "cmd-2")]);
    js.delete_stream(&stream_name).await.unwrap();
    Postgres::drop_tables(&outbox).await;
}

/// Events written by an "old producer" at versions 1 and 2 of an event type cross a real
/// JetStream stream and reach a consumer whose only handler is for version 3: the upcasters
/// chain before it, and every event is handled once, converted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn old_versions_reach_a_current_handler_across_nats() {
    use serde::{Deserialize, Serialize};

    #[derive(Serialize, Deserialize, outbox::OutboxEvent)]
    #[outbox(event_type = "test.price_set", aggregate_type = "item", version = 1)]
    struct PriceSetV1 {
        #[outbox(aggregate_id)]
        item: String,
        price: String,
    }
    #[derive(Serialize, Deserialize, outbox::OutboxEvent)]
    #[outbox(event_type = "test.price_set", aggregate_type = "item", version = 2)]
    struct PriceSetV2 {
        #[outbox(aggregate_id)]
        item: String,
        cents: i64,
    }
    #[derive(Debug, Serialize, Deserialize, outbox::OutboxEvent)]
    #[outbox(event_type = "test.price_set", aggregate_type = "item", version = 3)]
    struct PriceSet {
        #[outbox(aggregate_id)]
        item: String,
        cents: i64,
        currency: String,
    }
    impl From<PriceSetV1> for PriceSetV2 {
        fn from(v1: PriceSetV1) -> Self {
            let cents = v1
                .price
                .parse::<f64>()
                .map_or(-1, |p| (p * 100.0).round() as i64);
            Self {
                item: v1.item,
                cents,
            }
        }
    }
    impl From<PriceSetV2> for PriceSet {
        fn from(v2: PriceSetV2) -> Self {
            Self {
                item: v2.item,
                cents: v2.cents,
                currency: "EUR".into(),
            }
        }
    }

    init_tracing();
    let (prefix, stream_name) = names();
    let js = jetstream(&nats_url()).await;
    let stream = ensure_stream(&js, &stream_name, vec![format!("{prefix}.>")])
        .await
        .unwrap();
    let outbox = Postgres::fresh().await;
    let mut tx = outbox.pool().begin().await.unwrap();
    for (item, price) in [("a", "1.25"), ("b", "3")] {
        let event = PriceSetV1 {
            item: item.into(),
            price: price.into(),
        };
        outbox.enqueue(&mut *tx, &event).await.unwrap();
    }
    let v2 = PriceSetV2 {
        item: "a".into(),
        cents: 150,
    };
    outbox.enqueue(&mut *tx, &v2).await.unwrap();
    let v3 = PriceSet {
        item: "b".into(),
        cents: 999,
        currency: "USD".into(),
    };
    outbox.enqueue(&mut *tx, &v3).await.unwrap();
    tx.commit().await.unwrap();
    let relay = RunningRelay::start(
        Relay::builder(
            outbox.clone(),
            NatsTransport::new(js.clone()).subject_prefix(&prefix),
        )
        .poll_interval(Duration::from_millis(50)),
    );

    /// Item, cents, currency, the version it was written with.
    type Handled = (String, i64, String, u32);
    let seen: Arc<std::sync::Mutex<Vec<Handled>>> = Arc::default();
    let registry = outbox::Registry::builder()
        .handler::<PriceSet, _, _>("on_price_set", {
            let seen = seen.clone();
            move |price: PriceSet, ctx: outbox::HandlerContext| {
                let seen = seen.clone();
                async move {
                    seen.lock().unwrap().push((
                        price.item,
                        price.cents,
                        price.currency,
                        ctx.schema_version(),
                    ));
                    Ok(())
                }
            }
        })
        .unwrap()
        .upcast_from::<PriceSetV1, PriceSetV2>("v1 to v2")
        .unwrap()
        .upcast_from::<PriceSetV2, PriceSet>("v2 to v3")
        .unwrap()
        .build();
    let pull = stream
        .create_consumer(consumer::pull::Config {
            durable_name: Some("prices".into()),
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
    eventually("four events handled", WAIT, || async {
        seen.lock().unwrap().len() == 4
    })
    .await;
    shutdown.cancel();
    consuming.await.unwrap();
    relay.stop().await;
    let mut seen = seen.lock().unwrap().clone();
    seen.sort();
    assert_eq!(
        seen,
        vec![
            ("a".into(), 125, "EUR".into(), 1),
            ("a".into(), 150, "EUR".into(), 2),
            ("b".into(), 300, "EUR".into(), 1),
            ("b".into(), 999, "USD".into(), 3),
        ]
    );
    Postgres::drop_tables(&outbox).await;
}
