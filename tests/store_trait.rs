//! The `Store` trait as users and the relay meet it: generic code over the database, absorbing
//! announcements, wake-ups through `Store::listen`, the NATS lease check before each message
//! (`publish_within`), and lease durations at the edge. Written as an outside review of the
//! store refactor; the tests that failed then are regression tests now.

use async_nats::jetstream;
use outbox::nats::{ensure_stream, NatsTransport};
use outbox::{Backend, Envelope, FullStore, Outbox, Relay, Retry, Transport};
use outbox_tests::nats::{nats_url, read_stored};
use outbox_tests::{
    always_ok, dispatcher, eventually, init_tracing, pg_pool, unique_table, ItemChanged, Log,
    RunningRelay, TestDb,
};
use sqlx::{Postgres, Sqlite};
use std::collections::HashMap;
use std::time::{Duration, Instant};

const WAIT: Duration = Duration::from_secs(60);

async fn pg_outbox(notify: bool) -> Outbox<Postgres> {
    let outbox = Outbox::builder(pg_pool().await)
        .table(unique_table())
        .notify(notify)
        .build()
        .unwrap();
    outbox.migrate().await.unwrap();
    outbox
}

async fn count(outbox: &Outbox<Postgres>, sql: &str) -> i64 {
    sqlx::query_scalar(&sql.replace("{t}", outbox.table().as_str()))
        .fetch_one(outbox.pool())
        .await
        .unwrap()
}

async fn enqueue(outbox: &Outbox<Postgres>, item: &str, n: u64) {
    let mut tx = outbox.pool().begin().await.unwrap();
    outbox
        .enqueue(
            &mut *tx,
            &ItemChanged {
                item: item.into(),
                n,
            },
        )
        .await
        .unwrap();
    tx.commit().await.unwrap();
}

// ---------------------------------------------------------------------------------------------
// API: generic code over the database.

/// Operator code generic over the database, as the README shows it.
async fn operator<DB: Backend<Store: FullStore>>(
    outbox: &Outbox<DB>,
    id: uuid::Uuid,
) -> outbox::Result<(bool, bool, usize)> {
    let found = outbox.get(id).await?.is_some();
    let requeued = outbox.requeue(id).await?;
    let _ = outbox.discard(id).await?;
    let _ = outbox.mark_consumed(&[id]).await?;
    let _ = outbox.explain_claim(10).await?;
    Ok((found, requeued, outbox.check().await?.len()))
}

/// Writer code generic over any `Backend` (no ability asked for).
async fn writer<DB: Backend>(outbox: &Outbox<DB>, conn: &mut DB::Connection) -> uuid::Uuid {
    outbox
        .enqueue(
            conn,
            &ItemChanged {
                item: "g".into(),
                n: 1,
            },
        )
        .await
        .unwrap()
}

async fn generic_roundtrip<DB: TestDb>() {
    let outbox = DB::fresh().await;
    let mut tx = outbox.pool().begin().await.unwrap();
    let id = writer(&outbox, &mut tx).await;
    tx.commit().await.unwrap();
    let (found, requeued, inconsistencies) = operator(&outbox, id).await.unwrap();
    assert!(found);
    assert!(!requeued, "a pending event is not dead");
    assert_eq!(inconsistencies, 0);
    DB::drop_tables(&outbox).await;
}

#[tokio::test]
async fn generic_code_over_backend_compiles_and_runs_on_both_stores() {
    generic_roundtrip::<Postgres>().await;
    generic_roundtrip::<Sqlite>().await;
}

// ---------------------------------------------------------------------------------------------
// Absorbing now inside `PgStore::claim`.

/// Announcements of events that are not due yet are still absorbed: the cursor knows them and
/// `<table>_new` empties, though nothing is leased.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pg_announcements_are_absorbed_when_nothing_is_due() {
    init_tracing();
    let outbox = pg_outbox(true).await;
    let mut tx = outbox.pool().begin().await.unwrap();
    let later = chrono::Utc::now() + chrono::Duration::hours(1);
    for n in 1..=3 {
        outbox
            .enqueue_at(
                &mut *tx,
                &ItemChanged {
                    item: "later".into(),
                    n,
                },
                later,
            )
            .await
            .unwrap();
    }
    tx.commit().await.unwrap();
    assert_eq!(count(&outbox, r#"SELECT count(*) FROM "{t}_new""#).await, 3);
    let log = Log::default();
    let relay = RunningRelay::start(
        Relay::builder(outbox.clone(), dispatcher(&log, always_ok()))
            .poll_interval(Duration::from_millis(50)),
    );
    eventually("announcement absorbed", WAIT, || async {
        count(&outbox, r#"SELECT count(*) FROM "{t}_new""#).await == 0
    })
    .await;
    assert_eq!(
        count(
            &outbox,
            r#"SELECT known_seq FROM "{t}_cursors" WHERE aggregate_id = 'later'"#
        )
        .await,
        3
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(log.is_empty(), "nothing is due yet");
    assert_eq!(Postgres::count_status(&outbox, "pending").await, 3);
    assert!(outbox.check().await.unwrap().is_empty());
    relay.stop().await;
    Postgres::drop_tables(&outbox).await;
}

/// A big `<table>_new` backlog (many single-event commits while relays were down) is absorbed
/// by the first claim before it leases anything, and the relay's lease clock starts before the
/// claim: if absorbing takes longer than three quarters of the lease, the first batch is
/// abandoned as "outcome unknown" and its attempt is counted, though nothing was ever sent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pg_absorbing_a_backlog_does_not_cost_the_first_batch_an_attempt() {
    init_tracing();
    let outbox = pg_outbox(false).await;
    enqueue(&outbox, "hot", 1).await;
    // 1,200,000 announcements more of that same event: what as many one-event commits leave,
    // without their rows.
    sqlx::query(
        &r#"INSERT INTO "{t}_new" (aggregate_type, aggregate_id, seq)
            SELECT 'item', 'hot', 1 FROM generate_series(1, 1200000)"#
            .replace("{t}", outbox.table().as_str()),
    )
    .execute(outbox.pool())
    .await
    .unwrap();
    let log = Log::default();
    let started = Instant::now();
    let relay = RunningRelay::start(
        Relay::builder(outbox.clone(), dispatcher(&log, always_ok()))
            .lease(Duration::from_millis(1000))
            .workers(1)
            .poll_interval(Duration::from_millis(50)),
    );
    eventually("the event is handled", WAIT, || async { !log.is_empty() }).await;
    let handled = log.snapshot();
    relay.stop().await;
    let record = outbox.get(handled[0].event_id).await.unwrap().unwrap();
    eprintln!(
        "handled after {:?} at attempt {}; last_error {:?}",
        started.elapsed(),
        handled[0].attempt,
        record.last_error
    );
    Postgres::drop_tables(&outbox).await;
    assert_eq!(
        handled[0].attempt, 1,
        "the event was handled at attempt {} (last error {:?}): absorbing the backlog ate the \
         lease and the first claim's batch was counted as an attempt without being sent",
        handled[0].attempt, record.last_error
    );
}

/// A claim whose absorb fails (here: `<table>_new` unusable) should not stop the relay from
/// delivering aggregates it already knows about.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pg_known_aggregates_are_delivered_while_absorbing_fails() {
    init_tracing();
    let outbox = pg_outbox(false).await;
    // Known to the cursors, due in a moment.
    let mut tx = outbox.pool().begin().await.unwrap();
    outbox
        .enqueue_at(
            &mut *tx,
            &ItemChanged {
                item: "known".into(),
                n: 1,
            },
            chrono::Utc::now() + chrono::Duration::milliseconds(1500),
        )
        .await
        .unwrap();
    tx.commit().await.unwrap();
    let log = Log::default();
    let relay = RunningRelay::start(
        Relay::builder(outbox.clone(), dispatcher(&log, always_ok()))
            .poll_interval(Duration::from_millis(50)),
    );
    eventually("announcement absorbed", WAIT, || async {
        count(&outbox, r#"SELECT count(*) FROM "{t}_new""#).await == 0
    })
    .await;
    // Absorbing now fails at every claim (a statement error on `<table>_new`).
    sqlx::query(
        &r#"ALTER TABLE "{t}_new" ALTER COLUMN seq TYPE text"#
            .replace("{t}", outbox.table().as_str()),
    )
    .execute(outbox.pool())
    .await
    .unwrap();
    let outcome = tokio::time::timeout(Duration::from_secs(8), async {
        while log.is_empty() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    relay.shutdown.cancel();
    let _ = relay.task.await;
    Postgres::drop_tables(&outbox).await;
    assert!(
        outcome.is_ok(),
        "an event already absorbed into its cursor was not delivered within 8 s: every claim \
         fails at absorbing"
    );
}

// ---------------------------------------------------------------------------------------------
// Wake-ups through `Store::listen`.

/// Starts a relay with a 60 s poll interval, waits until its idle wait has grown to seconds,
/// enqueues one event and returns how long delivery took (or `None` within `limit`).
async fn wake_latency(notify: bool, limit: Duration) -> Option<Duration> {
    let outbox = pg_outbox(notify).await;
    let log = Log::default();
    let relay = RunningRelay::start(
        Relay::builder(outbox.clone(), dispatcher(&log, always_ok()))
            .poll_interval(Duration::from_secs(60)),
    );
    // Idle waits double from 10 ms: after 6 s the relay sleeps until about 10 s.
    tokio::time::sleep(Duration::from_secs(6)).await;
    let start = Instant::now();
    enqueue(&outbox, "wake", 1).await;
    let mut latency = None;
    while start.elapsed() < limit {
        if !log.is_empty() {
            latency = Some(start.elapsed());
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    relay.stop().await;
    Postgres::drop_tables(&outbox).await;
    latency
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pg_notify_wakes_an_idle_relay_at_once() {
    init_tracing();
    let latency = wake_latency(true, Duration::from_millis(1500)).await;
    eprintln!("notify on: {latency:?}");
    assert!(latency.is_some(), "NOTIFY did not wake the idle relay");
}

/// The control: without NOTIFY the same relay waits for its poll, so the test above can fail.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pg_without_notify_an_idle_relay_waits_for_its_poll() {
    init_tracing();
    let latency = wake_latency(false, Duration::from_millis(1500)).await;
    eprintln!("notify off: {latency:?}");
    assert!(latency.is_none(), "woken without NOTIFY after {latency:?}");
}

// ---------------------------------------------------------------------------------------------
// NATS: the lease check before each message.

fn envelopes(aggregates: usize, per_aggregate: usize, topic: &str) -> Vec<Envelope> {
    let mut batch = Vec::new();
    for a in 0..aggregates {
        for seq in 1..=per_aggregate {
            batch.push(Envelope {
                id: uuid::Uuid::now_v7(),
                created_at: chrono::Utc::now(),
                event_type: "test.item_changed".into(),
                aggregate_type: "item".into(),
                aggregate_id: format!("a{a}"),
                sequence: seq as i64,
                schema_version: 1,
                topic: topic.into(),
                payload: serde_json::json!({ "item": format!("a{a}"), "n": seq }).to_string(),
                headers: Default::default(),
                attempt: 1,
            });
        }
    }
    batch
}

async fn stream_for(js: &jetstream::Context) -> (String, jetstream::stream::Stream) {
    let id = uuid::Uuid::new_v4().simple().to_string();
    let (prefix, name) = (format!("r{}", &id[..10]), format!("R{}", &id[..10]));
    let stream = ensure_stream(js, &name, vec![format!("{prefix}.>")])
        .await
        .unwrap();
    (prefix, stream)
}

async fn read_all(stream: &jetstream::stream::Stream) -> Vec<(String, i64)> {
    read_stored(stream)
        .await
        .iter()
        .map(|m| {
            let v: serde_json::Value = serde_json::from_slice(&m.payload).unwrap();
            (
                v["item"].as_str().unwrap().to_owned(),
                v["n"].as_i64().unwrap(),
            )
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_budget_zero_sends_nothing_and_huge_budgets_send_everything() {
    let js = jetstream::new(async_nats::connect(nats_url()).await.unwrap());
    let (prefix, stream) = stream_for(&js).await;
    let transport = NatsTransport::new(js.clone()).subject_prefix(&prefix);
    let batch = envelopes(2, 5, "items");
    let results = transport.publish_within(&batch, Duration::ZERO).await;
    assert!(
        results
            .iter()
            .all(|r| matches!(r, Err(e) if e.retry == Retry::NotAttempted)),
        "{results:?}"
    );
    assert_eq!(read_all(&stream).await.len(), 0);
    for budget in [
        Duration::MAX,
        Duration::from_secs(u64::MAX / 4),
        Duration::from_secs(1 << 40),
    ] {
        let batch = envelopes(2, 5, "items");
        let results = transport.publish_within(&batch, budget).await;
        assert!(results.iter().all(Result::is_ok), "{budget:?}: {results:?}");
    }
    assert_eq!(read_all(&stream).await.len(), 30);
}

/// A batch longer than its budget: per aggregate, the results are a delivered prefix and then
/// only "not attempted"; the stream holds exactly the delivered events, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_a_batch_longer_than_its_budget_stops_cleanly_per_aggregate() {
    let js = jetstream::new(async_nats::connect(nats_url()).await.unwrap());
    let (prefix, stream) = stream_for(&js).await;
    let transport = NatsTransport::new(js.clone()).subject_prefix(&prefix);
    // Aggregates interleaved, as a relay's batch never is, to stress the per-aggregate logic.
    let mut batch = envelopes(4, 3000, "items");
    batch.sort_by_key(|e| (e.sequence, e.aggregate_id.clone()));
    let results = transport
        .publish_within(&batch, Duration::from_millis(40))
        .await;
    assert_eq!(results.len(), batch.len());
    let mut state: HashMap<&str, (i64, bool)> = HashMap::new();
    let mut sent = 0;
    for (e, r) in batch.iter().zip(&results) {
        let (last_ok, stopped) = state.entry(e.aggregate_id.as_str()).or_default();
        match r {
            Ok(()) => {
                assert!(
                    !*stopped,
                    "{} seq {} delivered after a stop",
                    e.aggregate_id, e.sequence
                );
                assert_eq!(*last_ok + 1, e.sequence);
                *last_ok = e.sequence;
                sent += 1;
            }
            Err(err) => {
                assert_eq!(err.retry, Retry::NotAttempted, "{err:?}");
                *stopped = true;
            }
        }
    }
    eprintln!("sent {sent} of {} within 40 ms", batch.len());
    assert!(
        sent < batch.len(),
        "the budget never ran out: test proves nothing"
    );
    let stored = read_all(&stream).await;
    assert_eq!(
        stored.len(),
        sent,
        "the stream holds events reported not attempted"
    );
    let mut last: HashMap<String, i64> = HashMap::new();
    for (item, n) in stored {
        let prev = last.entry(item).or_insert(0);
        assert_eq!(*prev + 1, n);
        *prev = n;
    }
}

// ---------------------------------------------------------------------------------------------
// Relay configuration: lease durations at the edge.

/// A huge lease (`Duration::MAX`, "never take my aggregates over") is refused at `build`, with
/// the limit in the message; the longest allowed one works (it once overflowed computing the
/// relay's deadline, and every worker panicked).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lease_past_the_maximum_is_refused_and_the_maximum_works() {
    init_tracing();
    let outbox = Sqlite::fresh().await;
    let log = Log::default();
    let refused = Relay::builder(outbox.clone(), dispatcher(&log, always_ok()))
        .lease(Duration::MAX)
        .build()
        .map(|_| ())
        .unwrap_err();
    assert!(
        matches!(&refused, outbox::Error::Config(m) if m.contains("longer than")),
        "{refused}"
    );
    let mut tx = outbox.pool().begin().await.unwrap();
    outbox
        .enqueue(
            &mut *tx,
            &ItemChanged {
                item: "x".into(),
                n: 1,
            },
        )
        .await
        .unwrap();
    tx.commit().await.unwrap();
    let relay = RunningRelay::start(
        Relay::builder(outbox.clone(), dispatcher(&log, always_ok()))
            .lease(outbox::MAX_LEASE)
            .poll_interval(Duration::from_millis(20)),
    );
    eventually("delivered with the longest lease", WAIT, || async {
        !log.is_empty()
    })
    .await;
    relay.stop().await;
    Sqlite::drop_tables(&outbox).await;
}
