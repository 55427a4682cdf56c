//! The log-tailing relay (`outbox::wal::WalRelay`) against real servers: a private PostgreSQL
//! cluster with `wal_level = logical` per test, NATS JetStream and tansu (Kafka protocol).

use outbox::wal::{WalRelay, WalRelayBuilder};
use outbox::{Destination, HandlerError, Outbox, RetryPolicy, TailMode};
use outbox_tests::faults::servers::PrivatePostgres;
use outbox_tests::wal::{gated, Running};
use outbox_tests::{always_ok, dispatcher, eventually, init_tracing, unique_table};
use outbox_tests::{ItemChanged, Log};
use sqlx::postgres::PgPoolOptions;
use sqlx::{PgPool, Postgres};
use std::collections::{BTreeMap, HashSet};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

const WAIT: Duration = Duration::from_secs(60);

/// A private logical cluster and a log-tailing outbox on it.
struct Wal {
    pg: PrivatePostgres,
    pool: PgPool,
    outbox: Outbox<Postgres>,
}

async fn wal(mode: TailMode) -> Wal {
    init_tracing();
    let pg = PrivatePostgres::start_logical();
    let pool = PgPoolOptions::new()
        .max_connections(16)
        .connect(&pg.url())
        .await
        .unwrap();
    let outbox = Outbox::builder(pool.clone())
        .table(unique_table())
        .log_tailing(mode)
        .build()
        .unwrap();
    outbox.migrate().await.unwrap();
    Wal { pg, pool, outbox }
}

impl Wal {
    fn relay<D: Destination>(&self, destination: D) -> WalRelayBuilder<D> {
        WalRelay::builder(self.outbox.clone(), self.pg.url(), destination)
            .heartbeat(Duration::from_millis(200))
            .takeover_interval(Duration::from_millis(100))
            .retry(
                RetryPolicy::exponential(Duration::from_millis(10))
                    .max_delay(Duration::from_millis(50))
                    .max_attempts(3),
            )
    }

    /// Enqueues `ItemChanged { item, n }` for each pair, in one transaction.
    async fn enqueue(&self, events: &[(&str, u64)]) {
        let mut tx = self.pool.begin().await.unwrap();
        let events: Vec<ItemChanged> = events
            .iter()
            .map(|(item, n)| ItemChanged {
                item: (*item).to_owned(),
                n: *n,
            })
            .collect();
        self.outbox.enqueue_batch(&mut *tx, &events).await.unwrap();
        tx.commit().await.unwrap();
    }

    async fn rows(&self, status: &str) -> i64 {
        sqlx::query_scalar(&format!(
            r#"SELECT count(*) FROM "{}" WHERE status = $1"#,
            self.outbox.table()
        ))
        .bind(status)
        .fetch_one(&self.pool)
        .await
        .unwrap()
    }

    /// The slot's confirmed position minus `lsn`, in bytes (negative: not yet confirmed).
    async fn confirmed_past(&self, lsn: &str) -> i64 {
        let slot = format!("{}_relay_postgres", self.outbox.table());
        sqlx::query_scalar(
            "SELECT COALESCE((confirmed_flush_lsn - $2::pg_lsn)::int8, -1) \
             FROM pg_replication_slots WHERE slot_name = $1",
        )
        .bind(slot)
        .bind(lsn)
        .fetch_optional(&self.pool)
        .await
        .unwrap()
        .unwrap_or(i64::MIN)
    }

    async fn current_lsn(&self) -> String {
        sqlx::query_scalar("SELECT pg_current_wal_lsn()::text")
            .fetch_one(&self.pool)
            .await
            .unwrap()
    }

    /// `(aggregate id, attempts, reason)` of the dead rows, by aggregate and sequence.
    async fn dead(&self) -> Vec<(String, i32, String)> {
        sqlx::query_as(&format!(
            r#"SELECT aggregate_id, attempts, last_error FROM "{}" WHERE status = 'dead'
               ORDER BY aggregate_id, seq"#,
            self.outbox.table()
        ))
        .fetch_all(&self.pool)
        .await
        .unwrap()
    }
}

/// Every handled event: exactly `expected` per aggregate, once each, with sequences 1, 2, 3, …
/// in order.
fn assert_once_in_order(log: &Log, expected: &BTreeMap<String, u64>) {
    let handled = log.snapshot();
    let mut ids = HashSet::new();
    let mut last: BTreeMap<String, i64> = BTreeMap::new();
    for h in &handled {
        assert!(ids.insert(h.event_id), "{} handled twice", h.event_id);
        let previous = last.insert(h.event.item.clone(), h.sequence).unwrap_or(0);
        assert_eq!(h.sequence, previous + 1, "{} out of order", h.event.item);
        assert_eq!(h.sequence, h.event.n as i64, "{}: sequence", h.event.item);
    }
    let counts: BTreeMap<String, u64> = last.into_iter().map(|(k, v)| (k, v as u64)).collect();
    assert_eq!(&counts, expected);
}

/// Writers on four connections, twenty aggregates, one rolled-back transaction: every
/// committed event once, each aggregate in order, the rolled-back one never; no row is left
/// in the table and no announcement for polling relays.
async fn delivers_committed_events_once_in_order(mode: TailMode) {
    let w = wal(mode).await;
    let log = Log::default();
    let relay = Running::start(w.relay(dispatcher(&log, always_ok())));
    let w = Arc::new(w);
    let mut writers = Vec::new();
    for writer in 0..4u64 {
        let w = w.clone();
        writers.push(tokio::spawn(async move {
            for n in 1..=25u64 {
                // Each writer owns five aggregates; one transaction writes one event of each.
                let items: Vec<String> = (0..5).map(|a| format!("agg-{writer}-{a}")).collect();
                let events: Vec<(&str, u64)> = items.iter().map(|i| (i.as_str(), n)).collect();
                w.enqueue(&events).await;
            }
        }));
    }
    for writer in writers {
        writer.await.unwrap();
    }
    let mut tx = w.pool.begin().await.unwrap();
    w.outbox
        .enqueue(
            &mut *tx,
            &ItemChanged {
                item: "rolled-back".into(),
                n: 1,
            },
        )
        .await
        .unwrap();
    tx.rollback().await.unwrap();
    w.enqueue(&[("after", 1)]).await;
    eventually("every committed event handled", WAIT, || async {
        log.len() >= 501
    })
    .await;
    relay.stop().await;
    let mut expected: BTreeMap<String, u64> = (0..4)
        .flat_map(|w| (0..5).map(move |a| (format!("agg-{w}-{a}"), 25)))
        .collect();
    expected.insert("after".into(), 1);
    assert_once_in_order(&log, &expected);
    let rows: i64 = sqlx::query_scalar(&format!(r#"SELECT count(*) FROM "{}""#, w.outbox.table()))
        .fetch_one(&w.pool)
        .await
        .unwrap();
    assert_eq!(rows, 0, "log tailing leaves no row behind");
    let announced: i64 = sqlx::query_scalar(&format!(
        r#"SELECT count(*) FROM "{}_new""#,
        w.outbox.table()
    ))
    .fetch_one(&w.pool)
    .await
    .unwrap();
    assert_eq!(announced, 0, "polling relays are not announced");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn message_mode_delivers_committed_events_once_in_order_and_writes_no_row() {
    delivers_committed_events_once_in_order(TailMode::Messages).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn table_mode_delivers_committed_events_once_in_order_and_leaves_the_table_empty() {
    delivers_committed_events_once_in_order(TailMode::Table).await;
}

/// The slot's confirmed position stays before an event until the destination confirmed it;
/// a relay killed meanwhile loses nothing: the next one delivers the event again, with the
/// same id, payload and sequence, and then the slot moves past it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_slot_moves_only_after_the_destination_confirmed_and_a_crash_replays() {
    for mode in [TailMode::Messages, TailMode::Table] {
        let w = wal(mode).await;
        let (held, _gate) = gated(false);
        // The held call never times out here: its events are seen once.
        let relay = Running::start(
            w.relay(held.clone())
                .delivery_timeout(Duration::from_secs(600)),
        );
        w.enqueue(&[("a", 1), ("b", 1)]).await;
        let written = w.current_lsn().await;
        // The relay may have read one event or both into the held batch.
        eventually("the destination holds the transaction", WAIT, || async {
            !held.seen.lock().unwrap().is_empty()
        })
        .await;
        // Heartbeats keep flowing while the batch is held; the slot must not pass the events.
        tokio::time::sleep(Duration::from_millis(600)).await;
        assert!(
            w.confirmed_past(&written).await < 0,
            "{mode:?}: the slot moved past events the destination has not confirmed"
        );
        relay.kill().await;

        let (open, _gate) = gated(true);
        let relay = Running::start(w.relay(open.clone()));
        eventually(
            "the events delivered again after the crash",
            WAIT,
            || async { open.seen.lock().unwrap().len() >= 2 },
        )
        .await;
        eventually("the slot confirmed past them", WAIT, || async {
            w.confirmed_past(&written).await >= 0
        })
        .await;
        relay.stop().await;
        // The whole transaction again, once, with the held events unchanged.
        let first = held.seen.lock().unwrap().clone();
        let mut again = open.seen.lock().unwrap().clone();
        again.sort_by_key(|e| e.id);
        let ids = |events: &[outbox::Envelope]| -> Vec<(String, i64)> {
            events
                .iter()
                .map(|e| (e.aggregate_id.clone(), e.sequence))
                .collect()
        };
        assert_eq!(
            ids(&again),
            [("a".to_owned(), 1), ("b".to_owned(), 1)],
            "{mode:?}: delivered once after the crash"
        );
        for a in &first {
            let b = again.iter().find(|b| b.id == a.id).unwrap_or_else(|| {
                panic!(
                    "{mode:?}: held {:?}, replayed {:?}",
                    ids(&first),
                    ids(&again)
                )
            });
            assert_eq!(
                (&a.payload, a.sequence, &a.aggregate_id),
                (&b.payload, b.sequence, &b.aggregate_id)
            );
        }
    }
}

/// A refused event goes dead at once, one that keeps failing after its attempts, both with
/// their reasons in the table; their aggregate's later events and the other aggregates are
/// delivered, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failing_events_go_dead_with_their_reasons_and_their_aggregates_go_on() {
    let w = wal(TailMode::Messages).await;
    let log = Log::default();
    let tries = Arc::new(AtomicUsize::new(0));
    let counted = tries.clone();
    let behaviour: outbox_tests::Behaviour =
        Arc::new(
            move |event: &ItemChanged, _| match (event.item.as_str(), event.n) {
                ("refused", 2) => Err(HandlerError::fatal("refused by the test")),
                ("flaky", 2) => {
                    counted.fetch_add(1, Ordering::SeqCst);
                    Err(HandlerError::retry("still failing"))
                }
                _ => Ok(()),
            },
        );
    let relay = Running::start(w.relay(dispatcher(&log, behaviour)));
    for n in 1..=3 {
        w.enqueue(&[("refused", n), ("flaky", n), ("fine", n)])
            .await;
    }
    eventually("the healthy events handled", WAIT, || async {
        log.len() == 7
    })
    .await;
    eventually("both failures recorded dead", WAIT, || async {
        w.rows("dead").await == 2
    })
    .await;
    relay.stop().await;
    let dead = w.dead().await;
    assert_eq!(dead[0].0, "flaky");
    assert_eq!(dead[0].1, 3, "the flaky event used its three attempts");
    assert!(dead[0].2.contains("still failing"), "{}", dead[0].2);
    assert_eq!(dead[1].0, "refused");
    assert_eq!(dead[1].1, 1, "a refused event is not retried");
    assert!(dead[1].2.contains("refused by the test"), "{}", dead[1].2);
    assert_eq!(tries.load(Ordering::SeqCst), 3);
    let handled: Vec<(String, u64)> = log
        .snapshot()
        .into_iter()
        .map(|h| (h.event.item, h.event.n))
        .collect();
    for item in ["refused", "flaky"] {
        let order: Vec<u64> = handled
            .iter()
            .filter(|(i, _)| i == item)
            .map(|(_, n)| *n)
            .collect();
        assert_eq!(
            order,
            [1, 3],
            "{item}: the aggregate goes on after its dead event"
        );
    }
    let fine: Vec<u64> = handled
        .iter()
        .filter(|(i, _)| i == "fine")
        .map(|(_, n)| *n)
        .collect();
    assert_eq!(fine, [1, 2, 3]);
}

/// A destination that panics on one event: that event goes dead after its attempts, the rest
/// of its batch is delivered once, and the relay keeps running.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicking_destination_costs_its_event_only() {
    let w = wal(TailMode::Messages).await;
    let log = Log::default();
    let behaviour: outbox_tests::Behaviour = Arc::new(|event: &ItemChanged, _| {
        if event.item == "boom" {
            panic!("the test's handler panics");
        }
        Ok(())
    });
    let relay = Running::start(w.relay(dispatcher(&log, behaviour)));
    w.enqueue(&[("a", 1), ("boom", 1), ("b", 1), ("a", 2)])
        .await;
    eventually("the panicking event recorded dead", WAIT, || async {
        w.rows("dead").await == 1
    })
    .await;
    w.enqueue(&[("b", 2)]).await;
    eventually("the other events handled", WAIT, || async {
        log.len() == 4
    })
    .await;
    relay.stop().await;
    let dead = w.dead().await;
    assert_eq!(dead[0].0, "boom");
    assert!(dead[0].2.contains("panic"), "{}", dead[0].2);
    let expected = BTreeMap::from([("a".to_owned(), 2), ("b".to_owned(), 2)]);
    assert_once_in_order(&log, &expected);
}

/// A message with the outbox's prefix that is not an event (written by hand, or by a broken
/// writer): recorded dead with its text and the reason, and the stream goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_undecodable_message_is_recorded_dead_and_the_stream_goes_on() {
    let w = wal(TailMode::Messages).await;
    let log = Log::default();
    let relay = Running::start(w.relay(dispatcher(&log, always_ok())));
    w.enqueue(&[("a", 1)]).await;
    sqlx::query("SELECT pg_logical_emit_message(true, $1, 'not an event')")
        .bind(format!("outbox:{}", w.outbox.table()))
        .execute(&w.pool)
        .await
        .unwrap();
    w.enqueue(&[("a", 2)]).await;
    eventually("the events around it handled", WAIT, || async {
        log.len() == 2
    })
    .await;
    eventually("the message recorded dead", WAIT, || async {
        w.rows("dead").await == 1
    })
    .await;
    relay.stop().await;
    let (reason, payload): (String, String) = sqlx::query_as(&format!(
        r#"SELECT last_error, payload FROM "{}" WHERE status = 'dead'"#,
        w.outbox.table()
    ))
    .fetch_one(&w.pool)
    .await
    .unwrap();
    assert!(reason.starts_with("undecodable outbox message"), "{reason}");
    assert_eq!(payload, r#""not an event""#);
}

/// Two relays on one slot: one streams, the other stands by; when the active one dies the
/// standby takes over and nothing is lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_standby_takes_over_when_the_active_relay_dies() {
    let w = wal(TailMode::Messages).await;
    let log = Log::default();
    let first = Running::start(w.relay(dispatcher(&log, always_ok())));
    w.enqueue(&[("a", 1)]).await;
    eventually("the first relay streams", WAIT, || async { log.len() == 1 }).await;
    let standby = Running::start(w.relay(dispatcher(&log, always_ok())));
    w.enqueue(&[("a", 2)]).await;
    eventually("delivered with a standby waiting", WAIT, || async {
        log.len() == 2
    })
    .await;
    first.kill().await;
    w.enqueue(&[("a", 3), ("b", 1)]).await;
    eventually("the standby delivers", WAIT, || async { log.len() >= 4 }).await;
    standby.stop().await;
    let handled: Vec<u64> = log.snapshot().iter().map(|h| h.event.n).collect();
    // At least once: a kill may replay what the first relay delivered but had not confirmed.
    let mut seen = HashSet::new();
    let unique: Vec<u64> = log
        .snapshot()
        .iter()
        .filter(|h| seen.insert(h.event_id))
        .map(|h| h.event.n)
        .collect();
    assert_eq!(unique.len(), 4, "{handled:?}");
}

/// A server restart cuts the stream: the relay reconnects from the last confirmed position and
/// delivers what was written meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_relay_reconnects_after_a_server_restart() {
    let w = wal(TailMode::Table).await;
    let log = Log::default();
    let relay = Running::start(w.relay(dispatcher(&log, always_ok())));
    w.enqueue(&[("a", 1)]).await;
    eventually("streaming", WAIT, || async { log.len() == 1 }).await;
    w.pg.restart_fast();
    // The pool reconnects on its own; retry the write until the server is back.
    eventually("written after the restart", WAIT, || async {
        let mut tx = match w.pool.begin().await {
            Ok(tx) => tx,
            Err(_) => return false,
        };
        let event = ItemChanged {
            item: "a".into(),
            n: 2,
        };
        w.outbox.enqueue(&mut *tx, &event).await.is_ok() && tx.commit().await.is_ok()
    })
    .await;
    eventually("delivered after the restart", WAIT, || async {
        log.len() == 2
    })
    .await;
    relay.stop().await;
    assert_once_in_order(&log, &BTreeMap::from([("a".to_owned(), 2)]));
}

/// With no outbox event written, heartbeats move the slot past other tables' writes: the WAL
/// it retains stays bounded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heartbeats_move_the_slot_past_other_writes() {
    let w = wal(TailMode::Table).await;
    let (destination, _gate) = gated(true);
    let relay = Running::start(w.relay(destination.clone()));
    sqlx::query(
        "CREATE TABLE busy AS SELECT g, repeat('x', 200) AS pad FROM generate_series(1, 20000) g",
    )
    .execute(&w.pool)
    .await
    .unwrap();
    let after = w.current_lsn().await;
    eventually(
        "the slot confirmed past the other table's writes",
        WAIT,
        || async { w.confirmed_past(&after).await >= 0 },
    )
    .await;
    relay.stop().await;
    assert!(destination.seen.lock().unwrap().is_empty());
}

/// Where log tailing cannot work, the errors say why.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn misconfigurations_are_clear_errors() {
    init_tracing();
    // A server without logical WAL: migrate (which creates the slot) says so, as does the relay.
    let plain = PrivatePostgres::start();
    let pool = PgPoolOptions::new().connect(&plain.url()).await.unwrap();
    let outbox = Outbox::builder(pool.clone())
        .table(unique_table())
        .log_tailing(TailMode::Messages)
        .build()
        .unwrap();
    let err = outbox.migrate().await.unwrap_err().to_string();
    assert!(err.contains("wal_level = logical"), "{err}");
    let relay = WalRelay::builder(
        outbox.clone(),
        plain.url(),
        dispatcher(&Log::default(), always_ok()),
    )
    .build()
    .unwrap();
    let err = relay
        .run(CancellationToken::new())
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("wal_level = logical"), "{err}");
    // An outbox for polling relays.
    let polling = Outbox::builder(pool.clone()).build().unwrap();
    let err = WalRelay::builder(
        polling,
        plain.url(),
        dispatcher(&Log::default(), always_ok()),
    )
    .build()
    .unwrap_err()
    .to_string();
    assert!(err.contains("log_tailing"), "{err}");
    // Log tailing is PostgreSQL's; and it is not Debezium's hand-off.
    let err = Outbox::builder(outbox_tests::sqlite_pool().await)
        .log_tailing(TailMode::Messages)
        .build()
        .unwrap_err()
        .to_string();
    assert!(err.contains("not available on SQLite"), "{err}");
    let err = Outbox::builder(pool.clone())
        .layout(outbox::TableLayout::Debezium)
        .hand_off(true)
        .log_tailing(TailMode::Table)
        .build()
        .unwrap_err()
        .to_string();
    assert!(err.contains("choose one"), "{err}");
    // What would set a row pending for a polling relay is refused, before anything is written.
    let mut tx = pool.begin().await.unwrap();
    let later = chrono::Utc::now() + chrono::Duration::hours(1);
    let err = outbox
        .enqueue_at(
            &mut *tx,
            &ItemChanged {
                item: "a".into(),
                n: 1,
            },
            later,
        )
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("cannot defer"), "{err}");
    drop(tx);
    let err = outbox
        .requeue(uuid::Uuid::now_v7())
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("relayed from the database's log"), "{err}");
}

/// The broker path for real: message mode to NATS JetStream, each aggregate in order, headers
/// and payload as the polling relay sends them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn message_mode_publishes_to_nats_jetstream_in_order() {
    use outbox::nats::NatsTransport;
    use outbox_tests::nats::{jetstream, names, nats_url, read_stream};
    let w = wal(TailMode::Messages).await;
    let js = jetstream(&nats_url()).await;
    let (prefix, stream_name) = names();
    let stream = js
        .create_stream(async_nats::jetstream::stream::Config {
            name: stream_name,
            subjects: vec![format!("{prefix}.>")],
            ..Default::default()
        })
        .await
        .unwrap();
    let relay = Running::start(w.relay(NatsTransport::new(js.clone()).subject_prefix(&prefix)));
    for n in 1..=50 {
        let items: Vec<String> = (0..10).map(|a| format!("agg-{a}")).collect();
        let events: Vec<(&str, u64)> = items.iter().map(|i| (i.as_str(), n)).collect();
        w.enqueue(&events).await;
    }
    let messages = read_stream(&stream, 500).await;
    relay.stop().await;
    let mut last: BTreeMap<String, i64> = BTreeMap::new();
    let mut ids = HashSet::new();
    for m in &messages {
        let headers = m.headers.as_ref().unwrap();
        let header = |name: &str| headers.get(name).unwrap().as_str().to_owned();
        let event: ItemChanged = serde_json::from_slice(&m.payload).unwrap();
        assert!(ids.insert(header("outbox-id")), "duplicate message");
        assert_eq!(header("outbox-aggregate-id"), event.item);
        assert_eq!(header("outbox-event-type"), "test.item_changed");
        let sequence: i64 = header("outbox-sequence").parse().unwrap();
        assert_eq!(sequence, event.n as i64);
        let previous = last.insert(event.item.clone(), sequence).unwrap_or(0);
        assert_eq!(sequence, previous + 1, "{} out of order", event.item);
    }
    assert_eq!(last.len(), 10);
}

/// The broker path for real: table mode to a Kafka-protocol broker (tansu), keyed by aggregate,
/// in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn table_mode_publishes_to_kafka_in_order() {
    use outbox::kafka::KafkaTransport;
    use rdkafka::consumer::{Consumer, StreamConsumer};
    use rdkafka::message::Headers;
    use rdkafka::Message;
    let brokers =
        std::env::var("OUTBOX_TEST_KAFKA_BROKERS").unwrap_or_else(|_| "127.0.0.1:9092".into());
    let w = wal(TailMode::Table).await;
    let prefix = format!("w{}", &uuid::Uuid::new_v4().simple().to_string()[..10]);
    let topic = format!("{prefix}.items");
    let admin: rdkafka::admin::AdminClient<rdkafka::client::DefaultClientContext> =
        rdkafka::config::ClientConfig::new()
            .set("bootstrap.servers", &brokers)
            .create()
            .unwrap();
    for created in admin
        .create_topics(
            &[rdkafka::admin::NewTopic::new(
                &topic,
                3,
                rdkafka::admin::TopicReplication::Fixed(1),
            )],
            &rdkafka::admin::AdminOptions::new(),
        )
        .await
        .unwrap()
    {
        created.unwrap();
    }
    let relay =
        Running::start(w.relay(KafkaTransport::new(&brokers).unwrap().topic_prefix(&prefix)));
    for n in 1..=20 {
        let items: Vec<String> = (0..10).map(|a| format!("agg-{a}")).collect();
        let events: Vec<(&str, u64)> = items.iter().map(|i| (i.as_str(), n)).collect();
        w.enqueue(&events).await;
    }
    let consumer: StreamConsumer = rdkafka::config::ClientConfig::new()
        .set("bootstrap.servers", &brokers)
        .set("group.id", format!("{prefix}-reader"))
        .set("auto.offset.reset", "earliest")
        .create()
        .unwrap();
    consumer.subscribe(&[&topic]).unwrap();
    let mut last: BTreeMap<String, i64> = BTreeMap::new();
    for _ in 0..200 {
        let m = tokio::time::timeout(Duration::from_secs(30), consumer.recv())
            .await
            .expect("the topic delivered fewer messages than expected")
            .unwrap();
        let key = String::from_utf8(m.key().unwrap().to_vec()).unwrap();
        let sequence: i64 = m
            .headers()
            .unwrap()
            .iter()
            .find(|h| h.key == "outbox-sequence")
            .and_then(|h| std::str::from_utf8(h.value.unwrap()).ok())
            .unwrap()
            .parse()
            .unwrap();
        let previous = last.insert(key.clone(), sequence).unwrap_or(0);
        assert_eq!(sequence, previous + 1, "{key} out of order");
    }
    relay.stop().await;
    assert_eq!(last.len(), 10);
    assert!(last.values().all(|s| *s == 20));
}
