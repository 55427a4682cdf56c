//! An outside review of the log-tailing relay (`outbox::wal::WalRelay`): tests that try to
//! break the promises of the README's "Relaying from the WAL" section, each against a private
//! PostgreSQL cluster with `wal_level = logical`.

use outbox::wal::{WalRelay, WalRelayBuilder};
use outbox::{
    DeliveryError, DeliveryResult, Destination, EnqueueOptions, Envelope, EventFilter, EventStatus,
    HandlerError, Outbox, OutboxEvent, RetryPolicy, TailMode,
};
use outbox_tests::faults::servers::PrivatePostgres;
use outbox_tests::wal::{gated, Recorder, Running};
use outbox_tests::{dispatcher, eventually, init_tracing, unique_table, within};
use outbox_tests::{ItemChanged, Log};
use serde::{Deserialize, Serialize};
use sqlx::postgres::PgPoolOptions;
use sqlx::{PgPool, Postgres};
use std::collections::{BTreeMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::watch;

const WAIT: Duration = Duration::from_secs(60);
const LOGICAL: &str = "wal_level = logical\nmax_replication_slots = 10\nmax_wal_senders = 10\n";

// ---------------------------------------------------------------------------------------------
// Fixtures
// ---------------------------------------------------------------------------------------------

/// A private logical cluster and a log-tailing outbox on it.
struct Wal {
    pg: PrivatePostgres,
    pool: PgPool,
    outbox: Outbox<Postgres>,
}

async fn connect(url: &str) -> PgPool {
    PgPoolOptions::new()
        .max_connections(16)
        .connect(url)
        .await
        .unwrap()
}

async fn wal(mode: TailMode) -> Wal {
    wal_on(PrivatePostgres::start_logical(), mode).await
}

async fn wal_on(pg: PrivatePostgres, mode: TailMode) -> Wal {
    init_tracing();
    let pool = connect(&pg.url()).await;
    let outbox = tailing(&pool, &unique_table(), mode).await;
    Wal { pg, pool, outbox }
}

/// A migrated log-tailing outbox in `table`.
async fn tailing(pool: &PgPool, table: &str, mode: TailMode) -> Outbox<Postgres> {
    let outbox = Outbox::builder(pool.clone())
        .table(table)
        .log_tailing(mode)
        .build()
        .unwrap();
    outbox.migrate().await.unwrap();
    outbox
}

/// The tests' relay settings: quick heartbeats, takeovers and retries.
fn relay_of<D: Destination>(
    outbox: &Outbox<Postgres>,
    url: String,
    destination: D,
) -> WalRelayBuilder<D> {
    WalRelay::builder(outbox.clone(), url, destination)
        .heartbeat(Duration::from_millis(200))
        .takeover_interval(Duration::from_millis(100))
        .retry(
            RetryPolicy::exponential(Duration::from_millis(10))
                .max_delay(Duration::from_millis(50))
                .max_attempts(3),
        )
}

impl Wal {
    fn relay<D: Destination>(&self, destination: D) -> WalRelayBuilder<D> {
        relay_of(&self.outbox, self.pg.url(), destination)
    }

    async fn enqueue(&self, events: &[(&str, u64)]) {
        enqueue_to(&self.outbox, &self.pool, events).await;
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

    /// `(aggregate id, reason)` of the dead rows.
    async fn dead_reasons(&self) -> Vec<(String, String)> {
        sqlx::query_as(&format!(
            r#"SELECT aggregate_id, coalesce(last_error, '') FROM "{}" WHERE status = 'dead'
               ORDER BY aggregate_id, seq"#,
            self.outbox.table()
        ))
        .fetch_all(&self.pool)
        .await
        .unwrap()
    }

    async fn current_lsn(&self) -> String {
        sqlx::query_scalar("SELECT pg_current_wal_lsn()::text")
            .fetch_one(&self.pool)
            .await
            .unwrap()
    }

    /// Whether a walsender has sent the WAL up to `lsn`.
    async fn sent_past(&self, lsn: &str) -> bool {
        sqlx::query_scalar::<_, Option<bool>>(
            "SELECT bool_or(sent_lsn >= $1::pg_lsn) FROM pg_stat_replication",
        )
        .bind(lsn)
        .fetch_one(&self.pool)
        .await
        .unwrap()
        .unwrap_or(false)
    }

    fn slot(&self) -> String {
        format!("{}_relay_postgres", self.outbox.table())
    }
}

/// Enqueues `ItemChanged { item, n }` for each pair, in one transaction.
async fn enqueue_to(outbox: &Outbox<Postgres>, pool: &PgPool, events: &[(&str, u64)]) {
    let mut tx = pool.begin().await.unwrap();
    let events: Vec<ItemChanged> = events
        .iter()
        .map(|(item, n)| ItemChanged {
            item: (*item).to_owned(),
            n: *n,
        })
        .collect();
    outbox.enqueue_batch(&mut *tx, &events).await.unwrap();
    tx.commit().await.unwrap();
}

fn item_of(e: &Envelope) -> ItemChanged {
    serde_json::from_str(&e.payload).unwrap()
}

/// The first occurrence of each event, in delivery order.
fn first_occurrences(seen: &[Envelope]) -> Vec<Envelope> {
    let mut ids = HashSet::new();
    seen.iter().filter(|e| ids.insert(e.id)).cloned().collect()
}

/// Each aggregate's sequences, in the order of their first delivery: must be 1, 2, 3, …
fn assert_each_aggregate_in_order(seen: &[Envelope], what: &str) -> BTreeMap<String, i64> {
    let mut last: BTreeMap<String, i64> = BTreeMap::new();
    for e in first_occurrences(seen) {
        let previous = last.insert(e.aggregate_id.clone(), e.sequence).unwrap_or(0);
        assert_eq!(
            e.sequence,
            previous + 1,
            "{what}: aggregate {} delivered seq {} after seq {previous}",
            e.aggregate_id,
            e.sequence
        );
    }
    last
}

// ---------------------------------------------------------------------------------------------
// Shutdown
// ---------------------------------------------------------------------------------------------

/// "Streams and delivers until `shutdown` is cancelled, then finishes the batch in flight
/// (within the shutdown timeout), confirms it, and returns." With a backlog in the slot the
/// reader task has filled the channel to the delivery loop; shutdown must still return, and
/// nothing may be lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_with_a_backlog_returns_within_the_shutdown_timeout() {
    let w = wal(TailMode::Messages).await;
    for n in 1..=20 {
        w.enqueue(&[("a", n)]).await;
    }
    let written = w.current_lsn().await;
    let (held, _gate) = gated(false);
    let relay = Running::start(
        w.relay(held.clone())
            .max_batch_events(1)
            .shutdown_timeout(Duration::from_millis(500)),
    );
    eventually("the first event at the destination", WAIT, || async {
        held.seen.lock().unwrap().len() == 1
    })
    .await;
    eventually("the backlog sent to the relay", WAIT, || async {
        w.sent_past(&written).await
    })
    .await;
    // The destination never answers: the batch in flight is abandoned after 500 ms.
    relay.stop_within(Duration::from_secs(20)).await;

    // Nothing lost: the next relay delivers all twenty.
    let again = Recorder::default();
    let relay = Running::start(w.relay(again.clone()));
    eventually("every event delivered by the next relay", WAIT, || async {
        first_occurrences(&again.snapshot()).len() >= 20
    })
    .await;
    relay.stop().await;
    assert_each_aggregate_in_order(&again.snapshot(), "after the shutdown");
}

// ---------------------------------------------------------------------------------------------
// Slots and publications
// ---------------------------------------------------------------------------------------------

/// Two services, each with its own database on one PostgreSQL server, both with an outbox
/// table of the same name (the default `outbox`, say) relayed from the WAL: replication slots
/// are global to the server, so each database needs a slot of its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outboxes_of_the_same_name_in_two_databases_of_one_server_are_both_relayed() {
    init_tracing();
    let pg = PrivatePostgres::start_logical();
    let url_a = pg.url();
    let url_b = format!("postgres://postgres@127.0.0.1:{}/other", pg.port);
    let pool_a = connect(&url_a).await;
    sqlx::query("CREATE DATABASE other")
        .execute(&pool_a)
        .await
        .unwrap();
    let pool_b = connect(&url_b).await;
    let table = unique_table();
    let a = tailing(&pool_a, &table, TailMode::Messages).await;
    let b = Outbox::builder(pool_b.clone())
        .table(&table)
        .log_tailing(TailMode::Messages)
        .build()
        .unwrap();
    b.migrate()
        .await
        .expect("migrate of the second database's outbox");
    let (got_a, got_b) = (Recorder::default(), Recorder::default());
    let relay_a = Running::start(relay_of(&a, url_a, got_a.clone()));
    let relay_b = Running::start(relay_of(&b, url_b, got_b.clone()));
    enqueue_to(&a, &pool_a, &[("in-a", 1)]).await;
    enqueue_to(&b, &pool_b, &[("in-b", 1)]).await;
    eventually("database postgres's event delivered", WAIT, || async {
        !got_a.is_empty()
    })
    .await;
    let b_relayed = within(Duration::from_secs(30), || async { !got_b.is_empty() }).await;
    let slots: Vec<(String, Option<String>, Option<bool>)> =
        sqlx::query_as("SELECT slot_name::text, database::text, active FROM pg_replication_slots")
            .fetch_all(&pool_a)
            .await
            .unwrap();
    assert!(
        b_relayed,
        "the outbox of database 'other' was never relayed within 30 s; the server's slots \
         (name, database, active): {slots:?}"
    );
    relay_a.stop().await;
    relay_b.stop().await;
    let items =
        |r: &Recorder| -> Vec<String> { r.snapshot().iter().map(|e| item_of(e).item).collect() };
    assert_eq!(items(&got_a), ["in-a"]);
    assert_eq!(items(&got_b), ["in-b"]);
}

/// An outbox that started in message mode and moves to table mode: `migrate` and the relay
/// promise the publication `<table>_relay` with the table's inserts; the events must arrive (or
/// the switch be refused with a clear error), never vanish.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn switching_from_message_mode_to_table_mode_does_not_lose_events() {
    let w = wal(TailMode::Messages).await;
    let table_mode = Outbox::builder(w.pool.clone())
        .table(w.outbox.table().as_str())
        .log_tailing(TailMode::Table)
        .build()
        .unwrap();
    table_mode.migrate().await.unwrap();
    let got = Recorder::default();
    let relay = Running::start(relay_of(&table_mode, w.pg.url(), got.clone()));
    enqueue_to(&table_mode, &w.pool, &[("a", 1), ("a", 2)]).await;
    let delivered = within(Duration::from_secs(20), || async { got.len() >= 2 }).await;
    let published: i64 =
        sqlx::query_scalar("SELECT count(*) FROM pg_publication_tables WHERE pubname = $1")
            .bind(w.slot())
            .fetch_one(&w.pool)
            .await
            .unwrap();
    relay.stop().await;
    assert!(
        delivered,
        "table-mode events committed but never delivered (delivered {}); tables in the \
         publication {}: {published}",
        got.len(),
        w.slot()
    );
}

/// A slot dropped by hand while the relay streams (the README's recovery advice): the relay
/// recreates it and delivers what is written afterwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slot_dropped_by_hand_is_recreated_and_later_events_are_delivered() {
    let w = wal(TailMode::Messages).await;
    let got = Recorder::default();
    let relay = Running::start(w.relay(got.clone()));
    w.enqueue(&[("a", 1)]).await;
    eventually("streaming", WAIT, || async { got.len() == 1 }).await;
    let slot = w.slot();
    eventually("the slot dropped", WAIT, || async {
        let _ = sqlx::query(
            "SELECT pg_terminate_backend(active_pid) FROM pg_replication_slots \
             WHERE slot_name = $1 AND active_pid IS NOT NULL",
        )
        .bind(&slot)
        .execute(&w.pool)
        .await;
        sqlx::query("SELECT pg_drop_replication_slot($1)")
            .bind(&slot)
            .execute(&w.pool)
            .await
            .is_ok()
    })
    .await;
    eventually("the slot recreated and streamed again", WAIT, || async {
        sqlx::query_scalar::<_, bool>(
            "SELECT EXISTS (SELECT 1 FROM pg_replication_slots WHERE slot_name = $1 AND active)",
        )
        .bind(&slot)
        .fetch_one(&w.pool)
        .await
        .unwrap()
    })
    .await;
    w.enqueue(&[("b", 1)]).await;
    eventually(
        "the event written after the recreation delivered",
        WAIT,
        || async { got.snapshot().iter().any(|e| e.aggregate_id == "b") },
    )
    .await;
    assert!(!relay.is_finished(), "the relay stopped");
    relay.stop().await;
}

// ---------------------------------------------------------------------------------------------
// Decoding and fidelity
// ---------------------------------------------------------------------------------------------

/// A server whose `DateStyle` is not ISO (set in postgresql.conf, or per database or role):
/// the polling relay does not care (binary protocol); the table-mode relay decodes pgoutput's
/// text form and must still read `created_at`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn table_mode_reads_rows_whatever_the_servers_datestyle() {
    let pg = PrivatePostgres::start_with(&format!(
        "{LOGICAL}datestyle = 'SQL, DMY'\ntimezone = 'Asia/Kathmandu'\n"
    ));
    let w = wal_on(pg, TailMode::Table).await;
    let got = Recorder::default();
    let relay = Running::start(w.relay(got.clone()));
    w.enqueue(&[("a", 1), ("a", 2), ("b", 1)]).await;
    let settled = within(Duration::from_secs(30), || async {
        got.len() >= 3 || w.rows("dead").await >= 3
    })
    .await;
    relay.stop().await;
    let dead = w.dead_reasons().await;
    assert!(
        dead.is_empty(),
        "events went dead instead of being delivered: {dead:?}"
    );
    assert!(settled, "nothing delivered ({} events)", got.len());
    assert_each_aggregate_in_order(&got.snapshot(), "datestyle");
}

/// An event with what serde writes that a database might rewrite: non-ASCII text, a NUL and
/// other control characters (escaped), quotes and backslashes, a float and `u64::MAX`, and one
/// of 2 MB.
#[derive(Debug, Clone, Serialize, Deserialize, OutboxEvent)]
#[outbox(event_type = "review.odd", aggregate_type = "odd", topic = "odds")]
struct Odd {
    #[outbox(aggregate_id)]
    id: String,
    text: String,
    x: f64,
    big: u64,
    pad: String,
}

/// Two outboxes on one database, one per mode: each relay gets its own events only, with
/// payloads byte for byte as serde wrote them (README: "stored and published byte for byte")
/// and headers as given.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn payloads_and_headers_arrive_byte_for_byte_and_each_outbox_gets_only_its_own() {
    let w = wal(TailMode::Messages).await;
    let tables = tailing(&w.pool, &unique_table(), TailMode::Table).await;
    let (got_messages, got_tables) = (Recorder::default(), Recorder::default());
    let relay_m = Running::start(w.relay(got_messages.clone()));
    let relay_t = Running::start(relay_of(&tables, w.pg.url(), got_tables.clone()));
    let events = [
        Odd {
            id: "ü-1".into(),
            text: "naïve ☃ 𝄞 NUL:\u{0}: \"quoted\" back\\slash \u{1f} \u{2028} tab\t end".into(),
            x: 1e-7,
            big: u64::MAX,
            pad: String::new(),
        },
        Odd {
            id: "ü-1".into(),
            text: "{\"not\": \"json\"}   spaces  ".into(),
            x: -0.0,
            big: 0,
            pad: "é".repeat(1_000_000),
        },
    ];
    let header = "she said \"hi\" \\ ü ☃ {}";
    let mut ids = BTreeMap::new();
    for (name, outbox) in [("messages", &w.outbox), ("table", &tables)] {
        let mut tx = w.pool.begin().await.unwrap();
        for event in &events {
            let id = outbox
                .enqueue_with(
                    &mut *tx,
                    event,
                    EnqueueOptions::new()
                        .header("x-quote", header)
                        .correlation_id("r-ü"),
                )
                .await
                .unwrap();
            ids.entry(name).or_insert_with(Vec::new).push(id);
        }
        tx.commit().await.unwrap();
    }
    eventually("both outboxes' events delivered", WAIT, || async {
        got_messages.len() >= 2 && got_tables.len() >= 2
    })
    .await;
    relay_m.stop().await;
    relay_t.stop().await;
    for (name, got) in [("messages", &got_messages), ("table", &got_tables)] {
        let seen = first_occurrences(&got.snapshot());
        let seen_ids: Vec<uuid::Uuid> = seen.iter().map(|e| e.id).collect();
        assert_eq!(
            seen_ids, ids[name],
            "{name}: the relay delivered other events than its outbox's"
        );
        for (e, event) in seen.iter().zip(&events) {
            let expected = serde_json::to_string(event).unwrap();
            assert!(
                e.payload == expected,
                "{name}: payload changed ({} bytes, expected {}): {:?} vs {:?}",
                e.payload.len(),
                expected.len(),
                e.payload.chars().take(200).collect::<String>(),
                expected.chars().take(200).collect::<String>()
            );
            assert_eq!(
                e.headers.get("x-quote").map(String::as_str),
                Some(header),
                "{name}"
            );
            assert_eq!(e.correlation_id(), Some("r-ü"), "{name}");
            assert_eq!(
                (
                    e.event_type.as_str(),
                    e.aggregate_type.as_str(),
                    e.aggregate_id.as_str()
                ),
                ("review.odd", "odd", "ü-1"),
                "{name}"
            );
            assert_eq!(e.topic, "odds", "{name}");
            assert_eq!(e.schema_version, 1, "{name}");
        }
        let seqs: Vec<i64> = seen.iter().map(|e| e.sequence).collect();
        assert_eq!(seqs, [1, 2], "{name}");
    }
}

/// Idempotency keys under log tailing ("idempotency keys work"): a repeated key writes nothing
/// the second time, a key whose transaction rolled back is free again, in both modes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_repeated_idempotency_key_writes_nothing_the_second_time() {
    let w = wal(TailMode::Messages).await;
    let tables = tailing(&w.pool, &unique_table(), TailMode::Table).await;
    for (name, outbox) in [("messages", w.outbox.clone()), ("table", tables)] {
        let got = Recorder::default();
        let relay = Running::start(relay_of(&outbox, w.pg.url(), got.clone()));
        let event = |n| ItemChanged {
            item: "keyed".into(),
            n,
        };
        // A first try that rolls back leaves the key free.
        let mut tx = w.pool.begin().await.unwrap();
        let rolled = outbox
            .enqueue_once(&mut *tx, &event(0), "key-1")
            .await
            .unwrap();
        assert!(rolled.is_new(), "{name}");
        tx.rollback().await.unwrap();
        let mut first_id = None;
        for n in 1..=3 {
            let mut tx = w.pool.begin().await.unwrap();
            let enqueued = outbox
                .enqueue_once(&mut *tx, &event(n), "key-1")
                .await
                .unwrap();
            tx.commit().await.unwrap();
            assert_eq!(
                enqueued.is_new(),
                n == 1,
                "{name}: enqueue {n}: {enqueued:?}"
            );
            let id = *first_id.get_or_insert(enqueued.id());
            assert_eq!(
                enqueued.id(),
                id,
                "{name}: the duplicate names the first event"
            );
        }
        enqueue_to(&outbox, &w.pool, &[("marker", 1)]).await;
        eventually("the marker delivered", WAIT, || async {
            got.snapshot().iter().any(|e| e.aggregate_id == "marker")
        })
        .await;
        relay.stop().await;
        let keyed: Vec<u64> = first_occurrences(&got.snapshot())
            .iter()
            .filter(|e| e.aggregate_id == "keyed")
            .map(|e| item_of(e).n)
            .collect();
        assert_eq!(
            keyed,
            [1],
            "{name}: the keyed event delivered once, the first write"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Failures
// ---------------------------------------------------------------------------------------------

/// A broker client that panics on aggregate `x`'s first event twice, and records everything it
/// publishes. Its first call (the `warm` event) waits for a gate, so that the next batch holds
/// `x` 1, `x` 2 and `y` 1 together.
#[derive(Clone)]
struct PanickyBroker {
    published: Arc<Mutex<Vec<(String, i64)>>>,
    panics_left: Arc<AtomicUsize>,
    warm: watch::Receiver<bool>,
    holding: Arc<AtomicBool>,
}

impl Destination for PanickyBroker {
    async fn deliver(&self, batch: &[Envelope]) -> Vec<DeliveryResult> {
        if batch.iter().any(|e| e.aggregate_id == "warm") {
            self.holding.store(true, Ordering::SeqCst);
            let mut open = self.warm.clone();
            let _ = open.wait_for(|o| *o).await;
        }
        let mut results = Vec::with_capacity(batch.len());
        for e in batch {
            let panics = e.aggregate_id == "x"
                && e.sequence == 1
                && self
                    .panics_left
                    .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                    .is_ok();
            if panics {
                panic!("the test's broker client panics on x#1");
            }
            self.published
                .lock()
                .unwrap()
                .push((e.aggregate_id.clone(), e.sequence));
            results.push(Ok(()));
        }
        results
    }
}

/// After a panic the batch is sent one event at a time; an aggregate whose event failed must
/// not have its later events published before it ("its aggregate's later events in the batch
/// wait behind it"; "every aggregate's events arrive in sequence order").
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_panic_an_aggregates_later_event_is_not_published_before_the_failed_one() {
    let w = wal(TailMode::Messages).await;
    let (warm_gate, warm) = watch::channel(false);
    let broker = PanickyBroker {
        published: Arc::default(),
        panics_left: Arc::new(AtomicUsize::new(2)),
        warm,
        holding: Arc::default(),
    };
    let relay = Running::start(w.relay(broker.clone()));
    w.enqueue(&[("warm", 1)]).await;
    eventually("the warm-up held at the destination", WAIT, || async {
        broker.holding.load(Ordering::SeqCst)
    })
    .await;
    w.enqueue(&[("x", 1), ("x", 2), ("y", 1)]).await;
    let written = w.current_lsn().await;
    eventually(
        "the batch behind the warm-up sent to the relay",
        WAIT,
        || async { w.sent_past(&written).await },
    )
    .await;
    warm_gate.send(true).unwrap();
    eventually("x and y published", WAIT, || async {
        let p = broker.published.lock().unwrap();
        p.iter().any(|(a, s)| a == "x" && *s == 2) && p.iter().any(|(a, s)| a == "x" && *s == 1)
    })
    .await;
    relay.stop().await;
    let published = broker.published.lock().unwrap().clone();
    let x: Vec<i64> = published
        .iter()
        .filter(|(a, _)| a == "x")
        .map(|(_, s)| *s)
        .collect();
    assert_eq!(
        x.first(),
        Some(&1),
        "x#2 was published before x#1, which was still being retried; x's publications: {x:?}, \
         all: {published:?}"
    );
    assert_eq!(w.rows("dead").await, 0);
}

/// A destination that is down (`Retry::Unavailable`) for longer than the server's
/// `wal_sender_timeout`: no attempt is counted, nothing goes dead, and once it is back every
/// event is delivered, in order.
#[derive(Clone, Default)]
struct Outage {
    down: Arc<AtomicBool>,
    calls: Arc<AtomicUsize>,
    attempts_seen: Arc<Mutex<HashSet<u32>>>,
    delivered: Arc<Mutex<Vec<Envelope>>>,
}

impl Destination for Outage {
    async fn deliver(&self, batch: &[Envelope]) -> Vec<DeliveryResult> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        self.attempts_seen
            .lock()
            .unwrap()
            .extend(batch.iter().map(|e| e.attempt));
        if self.down.load(Ordering::SeqCst) {
            return batch
                .iter()
                .map(|_| Err(DeliveryError::unavailable("the broker is down")))
                .collect();
        }
        self.delivered.lock().unwrap().extend_from_slice(batch);
        batch.iter().map(|_| Ok(())).collect()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unavailable_destination_neither_counts_attempts_nor_kills_events() {
    let pg = PrivatePostgres::start_with(&format!("{LOGICAL}wal_sender_timeout = '2s'\n"));
    let w = wal_on(pg, TailMode::Messages).await;
    let outage = Outage::default();
    outage.down.store(true, Ordering::SeqCst);
    let relay = Running::start(
        w.relay(outage.clone()).max_batch_events(2).retry(
            RetryPolicy::exponential(Duration::from_millis(10))
                .max_delay(Duration::from_millis(20))
                .max_attempts(2),
        ),
    );
    for n in 1..=10 {
        w.enqueue(&[("a", n), ("b", n)]).await;
    }
    // Longer than wal_sender_timeout at 10 ms per try.
    eventually("many tries during the outage", WAIT, || async {
        outage.calls.load(Ordering::SeqCst) >= 300
    })
    .await;
    assert_eq!(w.rows("dead").await, 0, "an outage killed events");
    outage.down.store(false, Ordering::SeqCst);
    eventually("every event delivered after the outage", WAIT, || async {
        first_occurrences(&outage.delivered.lock().unwrap()).len() >= 20
    })
    .await;
    relay.stop().await;
    assert_eq!(w.rows("dead").await, 0, "an outage killed events");
    let attempts = outage.attempts_seen.lock().unwrap().clone();
    assert_eq!(
        attempts,
        HashSet::from([1]),
        "tries during an outage were counted as attempts"
    );
    let delivered = outage.delivered.lock().unwrap().clone();
    let last = assert_each_aggregate_in_order(&delivered, "after the outage");
    assert_eq!(last.values().copied().collect::<Vec<_>>(), [10, 10]);
}

/// Dead rows are what `outbox dead` shows: an undecodable row inserted by hand in table mode and
/// a refused event, each with its reason, through `Outbox::dead` and `dead_groups`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_rows_are_listed_with_their_reasons() {
    let w = wal(TailMode::Table).await;
    let log = Log::default();
    let behaviour: outbox_tests::Behaviour = Arc::new(|event: &ItemChanged, _| {
        if event.item == "refused" {
            Err(HandlerError::fatal("refused by the review"))
        } else {
            Ok(())
        }
    });
    let relay = Running::start(w.relay(dispatcher(&log, behaviour)));
    w.enqueue(&[("ok", 1), ("refused", 1)]).await;
    let bad_id = uuid::Uuid::now_v7();
    sqlx::query(&format!(
        r#"INSERT INTO "{}" (id, aggregate_type, aggregate_id, seq, event_type, schema_version,
                             topic, payload, headers)
           VALUES ($1, 'item', 'by-hand', 1, 'test.item_changed', 1, 'items',
                   '{{"item":"by-hand","n":1}}', '[1, 2]')"#,
        w.outbox.table()
    ))
    .bind(bad_id)
    .execute(&w.pool)
    .await
    .unwrap();
    w.enqueue(&[("ok", 2)]).await;
    eventually("the healthy events handled", WAIT, || async {
        log.len() == 2
    })
    .await;
    eventually("two dead rows", WAIT, || async {
        w.rows("dead").await == 2
    })
    .await;
    assert_eq!(w.rows("pending").await, 0, "a pending row is left behind");
    relay.stop().await;
    let dead = w.outbox.dead(&EventFilter::new(), 10).await.unwrap();
    assert_eq!(dead.len(), 2, "{dead:?}");
    let by_hand = dead
        .iter()
        .find(|r| r.id == bad_id)
        .expect("the row by hand");
    assert_eq!(by_hand.status, EventStatus::Dead);
    let reason = by_hand.last_error.clone().unwrap_or_default();
    assert!(reason.contains("undecodable outbox row"), "{reason}");
    let refused = dead
        .iter()
        .find(|r| r.aggregate_id == "refused")
        .expect("the refused event");
    assert_eq!(refused.attempts, 1);
    assert!(
        refused
            .last_error
            .as_deref()
            .unwrap_or_default()
            .contains("refused by the review"),
        "{refused:?}"
    );
    let groups = w.outbox.dead_groups(&EventFilter::new()).await.unwrap();
    assert_eq!(groups.iter().map(|g| g.count).sum::<u64>(), 2, "{groups:?}");
}

// ---------------------------------------------------------------------------------------------
// Large transactions, crashes, contention
// ---------------------------------------------------------------------------------------------

/// A destination that records and confirms until it has seen `limit` events, then holds.
#[derive(Clone)]
struct HoldAfter {
    limit: usize,
    seen: Arc<Mutex<Vec<Envelope>>>,
    never: watch::Receiver<bool>,
}

impl Destination for HoldAfter {
    async fn deliver(&self, batch: &[Envelope]) -> Vec<DeliveryResult> {
        let full = {
            let mut seen = self.seen.lock().unwrap();
            seen.extend_from_slice(batch);
            seen.len() >= self.limit
        };
        if full {
            let mut never = self.never.clone();
            let _ = never.wait_for(|o| *o).await;
        }
        batch.iter().map(|_| Ok(())).collect()
    }
}

/// One transaction of 20,000 events, split into batches of 500; the relay is killed a few
/// batches in. The transaction's commit was never confirmed, so the next relay delivers all of
/// it again, in order, and nothing goes missing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_huge_transaction_split_across_batches_survives_a_crash_midway() {
    const N: usize = 20_000;
    let w = wal(TailMode::Messages).await;
    let events: Vec<ItemChanged> = (0..N)
        .map(|i| ItemChanged {
            item: format!("agg-{}", i % 7),
            n: i as u64,
        })
        .collect();
    let mut tx = w.pool.begin().await.unwrap();
    w.outbox.enqueue_batch(&mut *tx, &events).await.unwrap();
    tx.commit().await.unwrap();
    let (_never_tx, never) = watch::channel(false);
    let first = HoldAfter {
        limit: 2_000,
        seen: Arc::default(),
        never,
    };
    let relay = Running::start(w.relay(first.clone()).max_batch_events(500));
    eventually(
        "the first relay got part of the transaction",
        WAIT,
        || async { first.seen.lock().unwrap().len() >= 2_000 },
    )
    .await;
    relay.kill().await;
    let partial: Vec<u64> = first
        .seen
        .lock()
        .unwrap()
        .iter()
        .map(|e| item_of(e).n)
        .collect();
    assert!(partial.len() < N, "the first relay was not stopped midway");
    assert_eq!(
        partial,
        (0..partial.len() as u64).collect::<Vec<_>>(),
        "the first relay's part is not the transaction's beginning in order"
    );

    let second = Recorder::default();
    let relay = Running::start(w.relay(second.clone()).max_batch_events(500));
    eventually("the whole transaction delivered again", WAIT, || async {
        second.len() >= N
    })
    .await;
    relay.stop().await;
    let again: Vec<u64> = second.snapshot().iter().map(item_of).map(|e| e.n).collect();
    assert_eq!(again.len(), N, "delivered more than once after the crash");
    assert!(
        again == (0..N as u64).collect::<Vec<_>>(),
        "the replayed transaction is not complete and in order (first difference at {:?})",
        again.iter().enumerate().find(|(i, n)| **n != *i as u64)
    );
    assert_each_aggregate_in_order(&second.snapshot(), "replay");
}

/// Eight writers hammering the same two aggregates, each transaction writing to both outboxes
/// (one per mode) and two events of `hot-a`: every aggregate's events arrive once, 1, 2, 3, …
/// without gaps, in both.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_writers_of_the_same_aggregates_deliver_in_sequence_order() {
    const WRITERS: usize = 8;
    const TXS: usize = 25;
    let w = Arc::new(wal(TailMode::Messages).await);
    let tables = tailing(&w.pool, &unique_table(), TailMode::Table).await;
    let (got_m, got_t) = (Recorder::default(), Recorder::default());
    let relay_m = Running::start(w.relay(got_m.clone()));
    let relay_t = Running::start(relay_of(&tables, w.pg.url(), got_t.clone()));
    let mut writers = Vec::new();
    for writer in 0..WRITERS {
        let w = w.clone();
        let tables = tables.clone();
        writers.push(tokio::spawn(async move {
            for n in 0..TXS {
                let events: Vec<ItemChanged> = ["hot-a", "hot-b", "hot-a"]
                    .iter()
                    .map(|item| ItemChanged {
                        item: (*item).into(),
                        n: (writer * 1000 + n) as u64,
                    })
                    .collect();
                let mut tx = w.pool.begin().await.unwrap();
                w.outbox.enqueue_batch(&mut *tx, &events).await.unwrap();
                tables.enqueue_batch(&mut *tx, &events).await.unwrap();
                if n % 5 == 4 {
                    // Let the others queue up on the counter rows.
                    sqlx::query("SELECT pg_sleep(0.005)")
                        .execute(&mut *tx)
                        .await
                        .unwrap();
                }
                tx.commit().await.unwrap();
            }
        }));
    }
    for writer in writers {
        writer.await.unwrap();
    }
    let total = WRITERS * TXS * 3;
    eventually("every event delivered in both outboxes", WAIT, || async {
        got_m.len() >= total && got_t.len() >= total
    })
    .await;
    relay_m.stop().await;
    relay_t.stop().await;
    for (name, got) in [("messages", &got_m), ("table", &got_t)] {
        let seen = got.snapshot();
        assert_eq!(seen.len(), total, "{name}: delivered more than once");
        let last = assert_each_aggregate_in_order(&seen, name);
        assert_eq!(
            last,
            BTreeMap::from([
                ("hot-a".to_owned(), (WRITERS * TXS * 2) as i64),
                ("hot-b".to_owned(), (WRITERS * TXS) as i64)
            ]),
            "{name}"
        );
        // Within a transaction, hot-a's two events are consecutive: same writer, same n.
        let a: Vec<u64> = seen
            .iter()
            .filter(|e| e.aggregate_id == "hot-a")
            .map(|e| item_of(e).n)
            .collect();
        for pair in a.chunks(2) {
            assert_eq!(
                pair[0], pair[1],
                "{name}: a transaction's events interleaved with another's"
            );
        }
    }
}
