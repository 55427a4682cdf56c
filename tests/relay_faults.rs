//! Faults an outside review of relay core v2 found by trying to break it against the real
//! servers, kept as regression tests, with the attempts that held up.

use async_nats::jetstream;
use futures_util::StreamExt;
use lapin::options::BasicConsumeOptions;
use lapin::types::FieldTable;
use outbox::amqp::{AmqpTransport, Topology};
use outbox::kafka::KafkaTransport;
use outbox::nats::{ensure_stream, NatsTransport};
use outbox::{
    DeadLetters, EnqueueOptions, EventStatus, HandlerContext, HandlerError, Outbox, OutboxEvent,
    Relay, RetryPolicy, Router,
};
use outbox_tests::{
    always_ok, dispatcher, eventually, init_tracing, Huge, ItemChanged, Log, RunningRelay, TestDb,
    Unrouted,
};
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::Headers as _;
use rdkafka::Message as _;
use serde::{Deserialize, Serialize};
use sqlx::{Postgres, Sqlite};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

const WAIT: Duration = Duration::from_secs(60);

fn amqp_url() -> String {
    std::env::var("OUTBOX_TEST_AMQP_URL")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".to_owned())
}

fn nats_url() -> String {
    std::env::var("OUTBOX_TEST_NATS_URL").unwrap_or_else(|_| "127.0.0.1:4222".to_owned())
}

fn brokers() -> String {
    std::env::var("OUTBOX_TEST_KAFKA_BROKERS").unwrap_or_else(|_| "127.0.0.1:9092".to_owned())
}

fn short_id() -> String {
    uuid::Uuid::new_v4().simple().to_string()[..10].to_owned()
}

fn quick<DB: outbox::Backend, D: outbox::Destination>(
    outbox: Outbox<DB>,
    d: D,
) -> outbox::RelayBuilder<DB, D> {
    Relay::builder(outbox, d).poll_interval(Duration::from_millis(20))
}

fn fast_retry(max_attempts: u32) -> RetryPolicy {
    RetryPolicy::exponential(Duration::from_millis(20))
        .max_delay(Duration::from_millis(100))
        .max_attempts(max_attempts)
}

/// A second event type of the `item` aggregate, for runs that mix types.
#[derive(Debug, Clone, Serialize, Deserialize, OutboxEvent)]
#[outbox(event_type = "test.shipped", aggregate_type = "item", topic = "items")]
pub struct Shipped {
    #[outbox(aggregate_id)]
    pub item: String,
    pub n: u64,
}

fn item(i: &str, n: u64) -> ItemChanged {
    ItemChanged { item: i.into(), n }
}

/// Every message (outbox-id, sequence) a RabbitMQ queue holds, read until it has been quiet for
/// `quiet`.
async fn drain_queue(queue: &str, quiet: Duration) -> Vec<(String, String)> {
    let connection = lapin::Connection::connect(&amqp_url(), Default::default())
        .await
        .unwrap();
    let channel = connection.create_channel().await.unwrap();
    let mut consumer = channel
        .basic_consume(
            queue.into(),
            "review-reader".into(),
            BasicConsumeOptions {
                no_ack: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap();
    let mut out = Vec::new();
    while let Ok(Some(Ok(d))) = tokio::time::timeout(quiet, consumer.next()).await {
        let h = d.properties.headers().as_ref().unwrap().inner();
        let get = |k: &str| match h.get(k) {
            Some(lapin::types::AMQPValue::LongString(s)) => {
                String::from_utf8_lossy(s.as_bytes()).into_owned()
            }
            other => format!("{other:?}"),
        };
        out.push((get("outbox-id"), get("outbox-sequence")));
    }
    out
}

// ---------------------------------------------------------------------------------------------
// Broker transports: a run whose first event fails.
// ---------------------------------------------------------------------------------------------

/// One aggregate: seq 1 is unroutable (RabbitMQ returns it: dead at once), seqs 2 and 3 are fine.
/// In steady state each of seqs 2 and 3 must reach the queue exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn amqp_failed_first_event_does_not_duplicate_the_rest_of_its_run() {
    init_tracing();
    let id = short_id();
    let (exchange, queue) = (format!("x-{id}"), format!("q-{id}"));
    let connection = lapin::Connection::connect(&amqp_url(), Default::default())
        .await
        .unwrap();
    let channel = connection.create_channel().await.unwrap();
    Topology::new(&exchange)
        .queue(&queue, ["items.#"])
        .declare(&channel)
        .await
        .unwrap();
    let outbox = Postgres::fresh().await;
    let mut tx = outbox.pool().begin().await.unwrap();
    outbox
        .enqueue(&mut *tx, &Unrouted { item: "agg".into() })
        .await
        .unwrap();
    outbox.enqueue(&mut *tx, &item("agg", 2)).await.unwrap();
    outbox.enqueue(&mut *tx, &item("agg", 3)).await.unwrap();
    tx.commit().await.unwrap();
    let relay = RunningRelay::start(quick(
        outbox.clone(),
        AmqpTransport::new(amqp_url()).exchange(&exchange),
    ));
    eventually("seq 1 dead, seqs 2 and 3 delivered", WAIT, || async {
        Postgres::count_status(&outbox, "dead").await == 1
            && Postgres::count_status(&outbox, "delivered").await == 2
    })
    .await;
    relay.stop().await;
    let seen = drain_queue(&queue, Duration::from_secs(2)).await;
    let seqs: Vec<&str> = seen.iter().map(|(_, s)| s.as_str()).collect();
    assert_eq!(
        seqs,
        ["2", "3"],
        "each healthy event of the run once, in order (got {seen:?})"
    );
    Postgres::drop_tables(&outbox).await;
}

/// With `DeadLetters::Park`, an aggregate stops at its dead event: nothing after it may reach
/// the broker. Seq 1 is over NATS' max payload (dead at once), seq 2 is fine.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_parked_aggregate_publishes_nothing_after_its_dead_event() {
    init_tracing();
    let id = short_id();
    let (prefix, stream) = (format!("t{id}"), format!("T{id}").to_uppercase());
    let client = async_nats::connect(nats_url()).await.unwrap();
    let js = jetstream::new(client);
    ensure_stream(&js, &stream, vec![format!("{prefix}.items.>")])
        .await
        .unwrap();
    let outbox = Postgres::fresh().await;
    let mut tx = outbox.pool().begin().await.unwrap();
    let huge = outbox
        .enqueue(
            &mut *tx,
            &Huge {
                item: "agg".into(),
                blob: "x".repeat(2 * 1024 * 1024),
            },
        )
        .await
        .unwrap();
    let second = outbox.enqueue(&mut *tx, &item("agg", 2)).await.unwrap();
    tx.commit().await.unwrap();
    let relay = RunningRelay::start(
        quick(
            outbox.clone(),
            NatsTransport::new(js.clone()).subject_prefix(&prefix),
        )
        .dead_letters(DeadLetters::Park),
    );
    eventually("seq 1 is dead", WAIT, || async {
        outbox.get(huge).await.unwrap().unwrap().status == EventStatus::Dead
    })
    .await;
    relay.stop().await;
    let messages = js
        .get_stream(&stream)
        .await
        .unwrap()
        .info()
        .await
        .unwrap()
        .state
        .messages;
    let second = outbox.get(second).await.unwrap().unwrap();
    js.delete_stream(&stream).await.unwrap();
    Postgres::drop_tables(&outbox).await;
    assert_eq!(second.status, EventStatus::Pending, "parked behind seq 1");
    assert_eq!(
        messages, 0,
        "the aggregate is parked at seq 1, yet the stream already holds seq 2"
    );
}

/// Kafka: seq 1 is over the producer's message.max.bytes (dead at once), seqs 2 and 3 are fine:
/// each must be in the topic once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kafka_failed_first_event_does_not_duplicate_the_rest_of_its_run() {
    init_tracing();
    let prefix = format!("t-{}", short_id());
    let topic = format!("{prefix}.items");
    let admin: rdkafka::admin::AdminClient<rdkafka::client::DefaultClientContext> =
        rdkafka::ClientConfig::new()
            .set("bootstrap.servers", brokers())
            .create()
            .unwrap();
    for r in admin
        .create_topics(
            &[rdkafka::admin::NewTopic::new(
                &topic,
                1,
                rdkafka::admin::TopicReplication::Fixed(1),
            )],
            &rdkafka::admin::AdminOptions::new(),
        )
        .await
        .unwrap()
    {
        r.unwrap();
    }
    let outbox = Postgres::fresh().await;
    let mut tx = outbox.pool().begin().await.unwrap();
    outbox
        .enqueue(
            &mut *tx,
            &Huge {
                item: "agg".into(),
                blob: "x".repeat(2 * 1024 * 1024),
            },
        )
        .await
        .unwrap();
    outbox.enqueue(&mut *tx, &item("agg", 2)).await.unwrap();
    outbox.enqueue(&mut *tx, &item("agg", 3)).await.unwrap();
    tx.commit().await.unwrap();
    let relay = RunningRelay::start(quick(
        outbox.clone(),
        KafkaTransport::new(&brokers())
            .unwrap()
            .topic_prefix(&prefix),
    ));
    eventually("seq 1 dead, seqs 2 and 3 delivered", WAIT, || async {
        Postgres::count_status(&outbox, "dead").await == 1
            && Postgres::count_status(&outbox, "delivered").await == 2
    })
    .await;
    relay.stop().await;
    let consumer: StreamConsumer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", brokers())
        .set("group.id", format!("raw-{}", short_id()))
        .set("auto.offset.reset", "earliest")
        .set("enable.auto.commit", "false")
        .create()
        .unwrap();
    consumer.subscribe(&[&topic]).unwrap();
    let mut seqs = Vec::new();
    // The first message may take a while (group join); then read until quiet.
    let mut wait = Duration::from_secs(30);
    while let Ok(Ok(m)) = tokio::time::timeout(wait, consumer.recv()).await {
        let h = m.headers().unwrap();
        let seq = h
            .iter()
            .find(|h| h.key == "outbox-sequence")
            .map(|h| String::from_utf8(h.value.unwrap().to_vec()).unwrap())
            .unwrap();
        seqs.push(seq);
        wait = Duration::from_secs(3);
    }
    Postgres::drop_tables(&outbox).await;
    assert_eq!(seqs, ["2", "3"], "each healthy event of the run once");
}

/// A Router sends the two event types of one aggregate to two transports. Seq 1 (handlers)
/// fails once; seq 2 (RabbitMQ) must not be published before seq 1 succeeded, nor twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn router_keeps_a_run_in_order_across_transports() {
    init_tracing();
    let id = short_id();
    let (exchange, queue) = (format!("x-{id}"), format!("q-{id}"));
    let connection = lapin::Connection::connect(&amqp_url(), Default::default())
        .await
        .unwrap();
    let channel = connection.create_channel().await.unwrap();
    Topology::new(&exchange)
        .queue(&queue, ["items.#"])
        .declare(&channel)
        .await
        .unwrap();
    let outbox = Postgres::fresh().await;
    let mut tx = outbox.pool().begin().await.unwrap();
    outbox.enqueue(&mut *tx, &item("agg", 1)).await.unwrap();
    let shipped = outbox
        .enqueue(
            &mut *tx,
            &Shipped {
                item: "agg".into(),
                n: 2,
            },
        )
        .await
        .unwrap();
    tx.commit().await.unwrap();
    let log = Log::default();
    let failed_once = Arc::new(AtomicBool::new(false));
    let handlers = {
        let failed_once = failed_once.clone();
        dispatcher(
            &log,
            Arc::new(move |_, _| {
                if failed_once.swap(true, Ordering::SeqCst) {
                    Ok(())
                } else {
                    Err(HandlerError::retry("first attempt fails"))
                }
            }),
        )
    };
    let router = Router::builder()
        .transport(handlers)
        .transport(AmqpTransport::new(amqp_url()).exchange(&exchange))
        .route("test.shipped", "amqp")
        .default_transport("handlers")
        .build()
        .unwrap();
    let relay = RunningRelay::start(quick(outbox.clone(), router).retry(fast_retry(5)));
    eventually("both delivered", WAIT, || async {
        Postgres::count_status(&outbox, "delivered").await == 2
    })
    .await;
    relay.stop().await;
    let seen = drain_queue(&queue, Duration::from_secs(2)).await;
    let row = outbox.get(shipped).await.unwrap().unwrap();
    Postgres::drop_tables(&outbox).await;
    assert_eq!(
        seen.len(),
        1,
        "seq 2 was published {} times (attempts recorded: {})",
        seen.len(),
        row.attempts
    );
}

// ---------------------------------------------------------------------------------------------
// Park / requeue / discard.
// ---------------------------------------------------------------------------------------------

/// Park everywhere. seq 1 dies and is discarded; seq 2 dies and parks the aggregate; then the
/// operator requeues the discarded seq 1 (fixed by now). The aggregate must stay parked at
/// seq 2: seq 3 may not be delivered while seq 2 is dead and neither requeued nor discarded.
async fn requeue_of_an_earlier_event_keeps_the_aggregate_parked<DB: TestDb>() {
    init_tracing();
    let outbox = DB::fresh().await;
    let mut tx = outbox.pool().begin().await.unwrap();
    let ids = outbox
        .enqueue_batch(&mut *tx, &[item("agg", 1), item("agg", 2), item("agg", 3)])
        .await
        .unwrap();
    tx.commit().await.unwrap();
    let first_fixed = Arc::new(AtomicBool::new(false));
    let log = Log::default();
    let behaviour: outbox_tests::Behaviour = {
        let first_fixed = first_fixed.clone();
        Arc::new(move |e, _| match e.n {
            1 if !first_fixed.load(Ordering::SeqCst) => Err(HandlerError::fatal("bad 1")),
            2 => Err(HandlerError::fatal("bad 2")),
            _ => Ok(()),
        })
    };
    let relay = RunningRelay::start(
        quick(outbox.clone(), dispatcher(&log, behaviour)).dead_letters(DeadLetters::Park),
    );
    eventually("seq 1 dead", WAIT, || async {
        outbox.get(ids[0]).await.unwrap().unwrap().status == EventStatus::Dead
    })
    .await;
    // The relay may not have settled the park yet when the row is dead: same statement, so yes.
    eventually("seq 1 discarded", WAIT, || async {
        outbox.discard(ids[0]).await.unwrap()
    })
    .await;
    eventually("seq 2 dead (parked)", WAIT, || async {
        outbox.get(ids[1]).await.unwrap().unwrap().status == EventStatus::Dead
    })
    .await;
    first_fixed.store(true, Ordering::SeqCst);
    assert!(outbox.requeue(ids[0]).await.unwrap());
    eventually("the requeued seq 1 is delivered", WAIT, || async {
        outbox.get(ids[0]).await.unwrap().unwrap().status == EventStatus::Delivered
    })
    .await;
    relay.stop().await;
    let third = outbox.get(ids[2]).await.unwrap().unwrap();
    let seen: Vec<u64> = log.snapshot().iter().map(|h| h.event.n).collect();
    DB::drop_tables(&outbox).await;
    assert_eq!(
        (third.status, seen.as_slice()),
        (EventStatus::Pending, &[1u64][..]),
        "seq 3 went past the dead seq 2 of a parked aggregate"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pg_requeue_of_an_earlier_event_keeps_the_aggregate_parked() {
    requeue_of_an_earlier_event_keeps_the_aggregate_parked::<Postgres>().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_requeue_of_an_earlier_event_keeps_the_aggregate_parked() {
    requeue_of_an_earlier_event_keeps_the_aggregate_parked::<Sqlite>().await;
}

/// requeue of a pending or delivered event, discard of a non-parked dead event: all refused,
/// and nothing changes.
async fn requeue_and_discard_refuse_what_they_cannot_do<DB: TestDb>() {
    init_tracing();
    let outbox = DB::fresh().await;
    let mut tx = outbox.pool().begin().await.unwrap();
    let ids = outbox
        .enqueue_batch(&mut *tx, &[item("a", 1), item("a", 2), item("b", 1)])
        .await
        .unwrap();
    tx.commit().await.unwrap();
    assert!(!outbox.requeue(ids[0]).await.unwrap(), "pending");
    assert!(!outbox.discard(ids[0]).await.unwrap(), "pending");
    assert!(
        !outbox.requeue(uuid::Uuid::now_v7()).await.unwrap(),
        "unknown"
    );
    let log = Log::default();
    let behaviour: outbox_tests::Behaviour = Arc::new(|e, _| {
        if e.item == "b" {
            Err(HandlerError::fatal("no"))
        } else {
            Ok(())
        }
    });
    let relay = RunningRelay::start(quick(outbox.clone(), dispatcher(&log, behaviour)));
    eventually("a delivered, b dead", WAIT, || async {
        DB::count_status(&outbox, "delivered").await == 2
            && DB::count_status(&outbox, "dead").await == 1
    })
    .await;
    relay.stop().await;
    assert!(!outbox.requeue(ids[0]).await.unwrap(), "delivered");
    assert!(
        !outbox.discard(ids[2]).await.unwrap(),
        "dead but not parked (Skip)"
    );
    assert!(outbox.check().await.unwrap().is_empty());
    DB::drop_tables(&outbox).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pg_requeue_and_discard_refuse_what_they_cannot_do() {
    requeue_and_discard_refuse_what_they_cannot_do::<Postgres>().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_requeue_and_discard_refuse_what_they_cannot_do() {
    requeue_and_discard_refuse_what_they_cannot_do::<Sqlite>().await;
}

// ---------------------------------------------------------------------------------------------
// Headers a user may set.
// ---------------------------------------------------------------------------------------------

/// A user header that happens to be named like the broker's dedup header or the outbox's own
/// metadata must not make another event disappear: two distinct events with the header
/// `Nats-Msg-Id: order-1` must both reach the stream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_user_header_cannot_swallow_another_event() {
    init_tracing();
    let id = short_id();
    let (prefix, stream) = (format!("t{id}"), format!("T{id}").to_uppercase());
    let client = async_nats::connect(nats_url()).await.unwrap();
    let js = jetstream::new(client);
    ensure_stream(&js, &stream, vec![format!("{prefix}.items.>")])
        .await
        .unwrap();
    let outbox = Postgres::fresh().await;
    // Enqueue refuses the header...
    let mut tx = outbox.pool().begin().await.unwrap();
    let refused = outbox
        .enqueue_with(
            &mut *tx,
            &item("agg-0", 0),
            EnqueueOptions::new().header("Nats-Msg-Id", "order-1"),
        )
        .await;
    assert!(refused.is_err(), "a Nats-Msg-Id user header was accepted");
    tx.rollback().await.unwrap();
    // ...and rows written with it by other means (an older release, plain SQL) do not carry it.
    let mut tx = outbox.pool().begin().await.unwrap();
    for n in 1..=2 {
        outbox
            .enqueue(&mut *tx, &item(&format!("agg-{n}"), n))
            .await
            .unwrap();
    }
    tx.commit().await.unwrap();
    sqlx::query(&format!(
        r#"UPDATE {} SET headers = '{{"Nats-Msg-Id": "order-1"}}'"#,
        outbox.table()
    ))
    .execute(outbox.pool())
    .await
    .unwrap();
    let relay = RunningRelay::start(quick(
        outbox.clone(),
        NatsTransport::new(js.clone()).subject_prefix(&prefix),
    ));
    eventually("both delivered", WAIT, || async {
        Postgres::count_status(&outbox, "delivered").await == 2
    })
    .await;
    relay.stop().await;
    let messages = js
        .get_stream(&stream)
        .await
        .unwrap()
        .info()
        .await
        .unwrap()
        .state
        .messages;
    js.delete_stream(&stream).await.unwrap();
    Postgres::drop_tables(&outbox).await;
    assert_eq!(
        messages, 2,
        "both events are marked delivered but the stream holds {messages}"
    );
}

/// Same with the outbox's own metadata header: a user header `outbox-sequence` (or
/// `outbox-id`) overrides the real one on the wire.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn enqueue_rejects_headers_that_override_outbox_metadata() {
    init_tracing();
    let outbox = Postgres::fresh().await;
    let mut tx = outbox.pool().begin().await.unwrap();
    let r = outbox
        .enqueue_with(
            &mut *tx,
            &item("a", 1),
            EnqueueOptions::new().header("outbox-id", uuid::Uuid::nil().to_string()),
        )
        .await;
    tx.rollback().await.unwrap();
    Postgres::drop_tables(&outbox).await;
    assert!(
        r.is_err(),
        "a user header named outbox-id was accepted: every transport would send it in place of the event id"
    );
}

// ---------------------------------------------------------------------------------------------
// Order and exactly-once under concurrency.
// ---------------------------------------------------------------------------------------------

/// Checks each aggregate saw sequences 1..=last exactly once, in order.
fn assert_in_order_once(log: &Log, last: &HashMap<String, i64>) {
    let handled = log.snapshot();
    let mut ids = HashSet::new();
    let mut dups = Vec::new();
    for h in &handled {
        if !ids.insert(h.event_id) {
            dups.push((h.event.item.clone(), h.sequence));
        }
    }
    assert!(
        dups.is_empty(),
        "{} events handled twice: {dups:?}",
        dups.len()
    );
    let mut by: BTreeMap<&str, Vec<i64>> = BTreeMap::new();
    for h in &handled {
        by.entry(&h.event.item).or_default().push(h.sequence);
    }
    for (agg, &n) in last {
        let seen = by.get(agg.as_str()).cloned().unwrap_or_default();
        let expected: Vec<i64> = (1..=n).collect();
        assert_eq!(seen, expected, "aggregate {agg}");
    }
}

async fn pg_outbox_on_own_pool(table: &str) -> Outbox<Postgres> {
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(6)
        .connect(&outbox_tests::pg_url())
        .await
        .unwrap();
    Outbox::builder(pool).table(table).build().unwrap()
}

/// 8 writers commit out of order (transactions held open a random while, some rolled back,
/// batches over several aggregates in random order), 4 relays in their own pools with 2
/// workers each, the handler taking up to 0.8 ms of its thread. Every committed event must be
/// handled once, in sequence order per aggregate, and `check` must stay clean.
///
/// The lease is 10 s: long enough that no lease runs out, even on two cores shared with the
/// binary's other tests. With a 2 s lease a batch could take longer than its delivery budget
/// (1.5 s) under that load; the relay then rightly delivers it again (at least once), which
/// this exactly-once assertion cannot tell from a defect (seen once in CI). Lease expiry has
/// tests of its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pg_eight_writers_four_relays_exactly_once_in_order() {
    init_tracing();
    let base = Postgres::fresh().await;
    let table = base.table().to_string();
    let log = Log::default();
    let slow: outbox_tests::Behaviour = Arc::new(|_, _| {
        std::thread::sleep(Duration::from_micros(fastrand::u64(0..800)));
        Ok(())
    });
    let mut relays = Vec::new();
    for _ in 0..4 {
        let o = pg_outbox_on_own_pool(&table).await;
        relays.push(RunningRelay::start(
            Relay::builder(o, dispatcher(&log, slow.clone()))
                .batch_size(7)
                .run_length(5)
                .max_batch_events(20)
                .workers(2)
                .lease(Duration::from_secs(10))
                .poll_interval(Duration::from_millis(30)),
        ));
    }
    let last: Arc<Mutex<HashMap<String, i64>>> = Arc::default();
    let writers = (0..8).map(|_| {
        let outbox = base.clone();
        tokio::spawn(async move {
            for round in 0..60u64 {
                let mut tx = outbox.pool().begin().await.unwrap();
                let k = fastrand::usize(1..4);
                let mut events = Vec::new();
                for _ in 0..k {
                    events.push(item(&format!("agg-{}", fastrand::usize(0..12)), round));
                }
                // One statement per transaction (several statements in random aggregate order
                // would deadlock writers against each other, as any row locks would).
                if events.len() > 1 {
                    outbox.enqueue_batch(&mut *tx, &events).await.unwrap();
                } else {
                    outbox.enqueue(&mut *tx, &events[0]).await.unwrap();
                }
                tokio::time::sleep(Duration::from_millis(fastrand::u64(0..15))).await;
                if fastrand::u8(0..10) == 0 {
                    tx.rollback().await.unwrap();
                } else {
                    tx.commit().await.unwrap();
                }
            }
        })
    });
    for w in futures_util::future::join_all(writers).await {
        w.unwrap();
    }
    let rows: Vec<(String, i64)> = sqlx::query_as(&format!(
        "SELECT aggregate_id, last_seq FROM {table}_aggregates"
    ))
    .fetch_all(base.pool())
    .await
    .unwrap();
    let total: i64 = rows.iter().map(|r| r.1).sum();
    *last.lock().unwrap() = rows.into_iter().collect();
    eventually("every committed event handled", WAIT, || async {
        log.len() as i64 >= total
    })
    .await;
    // Give stray duplicates a chance to show up.
    eventually("all delivered in the table", WAIT, || async {
        Postgres::count_status(&base, "delivered").await == total
    })
    .await;
    for r in relays {
        r.stop().await;
    }
    let problems = base.check().await.unwrap();
    let last = last.lock().unwrap().clone();
    Postgres::drop_tables(&base).await;
    assert!(problems.is_empty(), "{problems:?}");
    assert_in_order_once(&log, &last);
}

/// SQLite with pools as a user opens them: 3 relays each on its own pool, 6 writers on another,
/// one file. No error reaches a writer; everything once, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_writers_and_relays_on_separate_pools_exactly_once_in_order() {
    init_tracing();
    let path = std::env::temp_dir().join(format!("outbox-review-{}.db", uuid::Uuid::new_v4()));
    let url = format!("sqlite://{}?mode=rwc", path.display());
    let table = outbox_tests::unique_table();
    let open = || async {
        let pool = sqlx::sqlite::SqlitePoolOptions::new()
            .max_connections(4)
            .connect(&url)
            .await
            .unwrap();
        Outbox::builder(pool).table(table.clone()).build().unwrap()
    };
    let base: Outbox<Sqlite> = open().await;
    base.migrate().await.unwrap();
    let log = Log::default();
    let mut relays = Vec::new();
    for _ in 0..3 {
        let o = open().await;
        relays.push(RunningRelay::start(
            Relay::builder(o, dispatcher(&log, always_ok()))
                .batch_size(5)
                .run_length(4)
                .workers(2)
                .lease(Duration::from_secs(3))
                .poll_interval(Duration::from_millis(10)),
        ));
    }
    let writers = (0..6).map(|_| {
        let outbox = base.clone();
        tokio::spawn(async move {
            for round in 0..50u64 {
                let mut tx = outbox.pool().begin().await?;
                for _ in 0..fastrand::usize(1..3) {
                    outbox
                        .enqueue(
                            &mut *tx,
                            &item(&format!("agg-{}", fastrand::usize(0..8)), round),
                        )
                        .await
                        .map_err(|e| sqlx::Error::Protocol(e.to_string()))?;
                }
                if fastrand::u8(0..10) == 0 {
                    tx.rollback().await?;
                } else {
                    tx.commit().await?;
                }
            }
            Ok::<_, sqlx::Error>(())
        })
    });
    let mut errors = Vec::new();
    for w in futures_util::future::join_all(writers).await {
        if let Err(e) = w.unwrap() {
            errors.push(e.to_string());
        }
    }
    let rows: Vec<(String, i64)> = sqlx::query_as(&format!(
        "SELECT aggregate_id, last_seq FROM {table}_aggregates"
    ))
    .fetch_all(base.pool())
    .await
    .unwrap();
    let total: i64 = rows.iter().map(|r| r.1).sum();
    let last: HashMap<String, i64> = rows.into_iter().collect();
    eventually("every committed event delivered", WAIT, || async {
        Sqlite::count_status(&base, "delivered").await == total
    })
    .await;
    let mut stop_errors = Vec::new();
    for r in relays {
        r.shutdown.cancel();
        if let Err(e) = r.task.await.unwrap() {
            stop_errors.push(e.to_string());
        }
    }
    let problems = base.check().await.unwrap();
    base.pool().close().await;
    for suffix in ["", "-wal", "-shm"] {
        let _ = std::fs::remove_file(format!("{}{suffix}", path.display()));
    }
    assert!(errors.is_empty(), "writers failed: {errors:?}");
    assert!(stop_errors.is_empty(), "relays failed: {stop_errors:?}");
    assert!(problems.is_empty(), "{problems:?}");
    assert_in_order_once(&log, &last);
}

// ---------------------------------------------------------------------------------------------
// Leases and timeouts.
// ---------------------------------------------------------------------------------------------

/// One handler hangs on one event (longer than the lease). The other aggregates of the same
/// batch were handled in time: each must be handled once and delivered at its first attempt;
/// only the hanging event may burn attempts and die.
async fn a_hanging_event_costs_only_its_own_run<DB: TestDb>() {
    init_tracing();
    let outbox = DB::fresh().await;
    let mut tx = outbox.pool().begin().await.unwrap();
    let hang = outbox.enqueue(&mut *tx, &item("slow", 1)).await.unwrap();
    let healthy: Vec<ItemChanged> = (0..10).map(|a| item(&format!("ok-{a}"), 1)).collect();
    let healthy_ids = outbox.enqueue_batch(&mut *tx, &healthy).await.unwrap();
    tx.commit().await.unwrap();
    let log = Log::default();
    let handler = {
        let log = log.clone();
        let registry = outbox::Registry::builder()
            .handler::<ItemChanged, _, _>(
                "maybe-slow",
                move |e: ItemChanged, ctx: HandlerContext| {
                    let log = log.clone();
                    async move {
                        if e.item == "slow" {
                            tokio::time::sleep(Duration::from_secs(30)).await;
                        }
                        log.push(e, &ctx);
                        Ok::<_, HandlerError>(())
                    }
                },
            )
            .unwrap()
            .build();
        outbox::Dispatcher::new(registry)
    };
    let relay = RunningRelay::start(
        quick(outbox.clone(), handler)
            .lease(Duration::from_millis(800))
            .retry(fast_retry(3)),
    );
    eventually(
        "the hanging event dies after its attempts",
        WAIT,
        || async { outbox.get(hang).await.unwrap().unwrap().status == EventStatus::Dead },
    )
    .await;
    eventually("every event settled (nothing pending)", WAIT, || async {
        DB::count_status(&outbox, "pending").await == 0
    })
    .await;
    relay.stop().await;
    let mut per_event: HashMap<uuid::Uuid, usize> = HashMap::new();
    for h in log.snapshot() {
        *per_event.entry(h.event_id).or_default() += 1;
    }
    let mut report = Vec::new();
    for id in &healthy_ids {
        let row = outbox.get(*id).await.unwrap().unwrap();
        let handled = per_event.get(id).copied().unwrap_or(0);
        if handled != 1 || row.attempts != 1 || row.status != EventStatus::Delivered {
            report.push(format!(
                "{}: handled {handled}x, status {:?}, attempts {}",
                row.aggregate_id, row.status, row.attempts
            ));
        }
    }
    DB::drop_tables(&outbox).await;
    assert!(
        report.is_empty(),
        "healthy aggregates of the hanging event's batch: {report:#?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pg_a_hanging_event_costs_only_its_own_run() {
    a_hanging_event_costs_only_its_own_run::<Postgres>().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_a_hanging_event_costs_only_its_own_run() {
    a_hanging_event_costs_only_its_own_run::<Sqlite>().await;
}

// ---------------------------------------------------------------------------------------------
// Odds and ends.
// ---------------------------------------------------------------------------------------------

/// A relay started before `migrate` keeps trying and delivers once the tables exist.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pg_relay_started_before_migrate_delivers_afterwards() {
    init_tracing();
    let outbox = Outbox::builder(outbox_tests::pg_pool().await)
        .table(outbox_tests::unique_table())
        .build()
        .unwrap();
    let log = Log::default();
    let relay = RunningRelay::start(quick(outbox.clone(), dispatcher(&log, always_ok())));
    tokio::task::yield_now().await;
    outbox.migrate().await.unwrap();
    let mut tx = outbox.pool().begin().await.unwrap();
    outbox.enqueue(&mut *tx, &item("a", 1)).await.unwrap();
    tx.commit().await.unwrap();
    let delivered = tokio::time::timeout(Duration::from_secs(15), async {
        while log.is_empty() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    relay.stop().await;
    Postgres::drop_tables(&outbox).await;
    assert!(
        delivered.is_ok(),
        "not delivered within 15 s of the migration"
    );
}

/// Deferred events in the middle of runs, two relays, two workers each: the aggregate waits for
/// its deferred event and keeps its order; each event once.
async fn deferred_events_in_the_middle_keep_order<DB: TestDb>() {
    init_tracing();
    let outbox = DB::fresh().await;
    let mut last = HashMap::new();
    for a in 0..6 {
        let agg = format!("agg-{a}");
        let mut tx = outbox.pool().begin().await.unwrap();
        for n in 1..=6u64 {
            let e = item(&agg, n);
            if n == 3 {
                outbox
                    .enqueue_at(
                        &mut *tx,
                        &e,
                        chrono::Utc::now() + chrono::Duration::milliseconds(300 + 100 * a as i64),
                    )
                    .await
                    .unwrap();
            } else {
                outbox.enqueue(&mut *tx, &e).await.unwrap();
            }
        }
        tx.commit().await.unwrap();
        last.insert(agg, 6i64);
    }
    let log = Log::default();
    let relays: Vec<_> = (0..2)
        .map(|_| {
            RunningRelay::start(
                quick(outbox.clone(), dispatcher(&log, always_ok()))
                    .workers(2)
                    .run_length(4),
            )
        })
        .collect();
    eventually("all delivered", WAIT, || async {
        DB::count_status(&outbox, "delivered").await == 36
    })
    .await;
    for r in relays {
        r.stop().await;
    }
    DB::drop_tables(&outbox).await;
    assert_in_order_once(&log, &last);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pg_deferred_events_in_the_middle_keep_order() {
    deferred_events_in_the_middle_keep_order::<Postgres>().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_deferred_events_in_the_middle_keep_order() {
    deferred_events_in_the_middle_keep_order::<Sqlite>().await;
}
