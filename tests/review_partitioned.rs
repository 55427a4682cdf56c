//! An outside review of the partitioned table layout (`TableLayout::Partitioned`, commit
//! a68c26b): retention that truncates partitions while relays claim and settle, the documented
//! bound on how long delivered events stay, dead events under truncation, transactions that
//! began in an earlier period, concurrent retention, and idempotency keys across a move.
//!
//! Two of these tests failed on a68c26b (their doc comments say what they showed); the
//! defects are fixed and the tests kept as regression tests.

use outbox::{EnqueueOptions, EventStatus, HandlerContext, HandlerError, Outbox, Relay, Retention};
use outbox_tests::partitioned::{current_partition, enqueue, item, part_of, ring};
use outbox_tests::{
    always_ok, dispatcher, eventually, init_tracing, within, ItemChanged, Log, RunningRelay, TestDb,
};
use sqlx::Postgres;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

const WAIT: Duration = Duration::from_secs(60);

/// Seconds since the oldest delivered event still in the table was delivered.
async fn oldest_delivered_age(outbox: &Outbox<Postgres>) -> f64 {
    sqlx::query_scalar::<_, Option<f64>>(&format!(
        "SELECT extract(epoch FROM now() - min(delivered_at))::float8 FROM {} WHERE status = 'delivered'",
        outbox.table()
    ))
    .fetch_one(outbox.pool())
    .await
    .unwrap()
    .unwrap_or(0.0)
}

async fn status_count(outbox: &Outbox<Postgres>, status: &str) -> i64 {
    sqlx::query_scalar(&format!(
        "SELECT count(*) FROM {} WHERE status = $1",
        outbox.table()
    ))
    .bind(status)
    .fetch_one(outbox.pool())
    .await
    .unwrap()
}

/// The README's advice ("pick `every` so that `n × every` covers the retention age you want")
/// and its promise ("Delivered events are kept at least the retention age, and, while writes go
/// on, at most about `n × every` plus that age"). Here `n × every` = 3 × 1 s covers the age
/// (3 s) exactly, writes go on steadily for 12 s and the relay applies retention every 100 ms.
///
/// Failed on a68c26b, fixed since (the partition next to take writes is emptied whatever its
/// age, with a warning): a partition was truncated only when *all* its delivered events were older than
/// the age, but the ring comes back to a partition `(n - 1) × every` after it stopped taking
/// writes. Whenever the age is at least `(n - 1) × every`, no partition is ever fully old while
/// writes go on: retention never removes anything and the table grows without bound, where the
/// standard layout would delete every row older than the age. Neither `build`, `migrate` nor
/// retention checks the age against the ring, and the README's own advice leads into it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retention_keeps_its_bound_when_the_ring_covers_the_age() {
    init_tracing();
    let outbox = ring(Duration::from_secs(1), 3).await;
    let keep = Duration::from_secs(3);
    let log = Log::default();
    let relay = RunningRelay::start(
        Relay::builder(outbox.clone(), dispatcher(&log, always_ok()))
            .poll_interval(Duration::from_millis(20))
            .retention(Retention::delete_after(keep), Duration::from_millis(100)),
    );
    let until = Instant::now() + Duration::from_secs(12);
    let mut n = 0;
    while Instant::now() < until {
        n += 1;
        enqueue(&outbox, &[item(&format!("a{}", n % 7), n)]).await;
        // Pacing of a steady writer, not synchronisation.
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    eventually("every event delivered", WAIT, || async {
        log.len() as u64 == n
    })
    .await;
    let oldest = oldest_delivered_age(&outbox).await;
    let rows = status_count(&outbox, "delivered").await;
    relay.stop().await;
    Postgres::drop_tables(&outbox).await;
    // keep + n × every, and two seconds of slack for the relay's and retention's rounds.
    assert!(
        oldest <= 3.0 + 3.0 + 2.0,
        "after 12 s of writes, a delivered event {oldest:.1} s old is still in the table \
         ({rows} delivered rows of {n} written): retention truncated nothing"
    );
}

/// Retention keeps dead events (they wait for an operator), moving them out of a partition it
/// truncates, as long as a partition holds at most the batch size of pending and dead events.
/// Here batch size 2, a ring of 2 × 1 s, age 0: each of two partitions gets 2 dead events and
/// 1 delivered one, so each may be truncated. Then writes go on for 6 s with retention after
/// each write.
///
/// Failed on a68c26b, fixed since (dead events move to `<table>_dead`, outside the ring, and do
/// not count against the batch size): truncating the first partition moved its 2 dead events into the other, which
/// then holds 4 (more than the batch size) and is never truncated again: dead events never leave
/// by themselves, so this half of the ring keeps every delivered event written to it for as
/// long as the dead events stay. Each truncation gathers the dead events of the partition it
/// empties into one partition, so with the default batch size of 1,000 a table with a little
/// over 1,000 dead events in all ends with one partition that is never truncated. In the
/// standard layout dead events never keep delivered rows from being deleted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_events_moved_by_truncation_do_not_pin_a_partition() {
    init_tracing();
    let outbox = ring(Duration::from_secs(1), 2).await;
    let retention = Retention::delete_after(Duration::ZERO).batch_size(2);
    let log = Log::default();
    let behaviour: outbox_tests::Behaviour = Arc::new(|event: &ItemChanged, _| {
        if event.item.starts_with("poison") {
            Err(HandlerError::fatal("poison"))
        } else {
            Ok(())
        }
    });
    let relay = RunningRelay::start(
        Relay::builder(outbox.clone(), dispatcher(&log, behaviour))
            .poll_interval(Duration::from_millis(20)),
    );
    // Two dead and one delivered event in each of the two partitions.
    let first = enqueue(
        &outbox,
        &[item("poison-1", 1), item("poison-2", 1), item("ok-1", 1)],
    )
    .await;
    let a = part_of(&outbox, first[0]).await;
    let b = loop {
        eventually("the ring turns", WAIT, || async {
            current_partition(&outbox).await != a
        })
        .await;
        let second = enqueue(
            &outbox,
            &[item("poison-3", 1), item("poison-4", 1), item("ok-2", 1)],
        )
        .await;
        let b = part_of(&outbox, second[0]).await;
        if b != a {
            break b;
        }
        // The ring turned twice in between: those events are in a, try again.
    };
    eventually("the poison dead, the rest delivered", WAIT, || async {
        status_count(&outbox, "dead").await >= 4 && status_count(&outbox, "pending").await == 0
    })
    .await;
    let dead_before = status_count(&outbox, "dead").await;
    let removed = outbox.purge(&retention).await.unwrap();
    assert!(removed >= 1, "a partition with 2 dead events is truncated");
    let per_partition: Vec<(i16, i64)> = sqlx::query_as(&format!(
        "SELECT part, count(*) FROM {} WHERE status = 'dead' GROUP BY part ORDER BY part",
        outbox.table()
    ))
    .fetch_all(outbox.pool())
    .await
    .unwrap();
    assert_eq!(
        status_count(&outbox, "dead").await,
        dead_before,
        "dead events are kept"
    );

    // Writes and retention go on.
    let until = Instant::now() + Duration::from_secs(6);
    let mut n = 0;
    while Instant::now() < until {
        n += 1;
        enqueue(&outbox, &[item("steady", n)]).await;
        outbox.purge(&retention).await.unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    eventually("the steady events delivered", WAIT, || async {
        status_count(&outbox, "pending").await == 0
    })
    .await;
    outbox.purge(&retention).await.unwrap();
    let oldest = oldest_delivered_age(&outbox).await;
    let delivered = status_count(&outbox, "delivered").await;
    relay.stop().await;
    Postgres::drop_tables(&outbox).await;
    assert!(
        oldest <= 0.0 + 2.0 + 2.0,
        "partitions {a} and {b}; dead per partition after the first truncation \
         {per_partition:?}; after 6 s of writes and retention rounds, a delivered event \
         {oldest:.1} s old is still there ({delivered} delivered rows): the partition holding \
         the gathered dead events is never truncated"
    );
}

/// An event whose delivery is in flight (claimed, its handler running) when retention
/// truncates its partition: the row moves to another partition under the relay, and the
/// relay's settlement, by id through the parent, still finds it. It is delivered once, recorded
/// as delivered, and the bookkeeping stays consistent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_in_flight_when_its_partition_is_truncated_settles_once() {
    init_tracing();
    // Hour-long partitions: both events in the partition taking writes now.
    let outbox = ring(Duration::from_secs(3600), 2).await;
    let log = Log::default();
    let entered = Arc::new(AtomicBool::new(false));
    let release = Arc::new(tokio::sync::Notify::new());
    let registry = {
        let (log, entered, release) = (log.clone(), entered.clone(), release.clone());
        outbox::Registry::builder()
            .handler::<ItemChanged, _, _>("test", move |event: ItemChanged, ctx: HandlerContext| {
                let (log, entered, release) = (log.clone(), entered.clone(), release.clone());
                async move {
                    if event.item == "held" {
                        let released = release.notified();
                        entered.store(true, Ordering::SeqCst);
                        released.await;
                    }
                    log.push(event, &ctx);
                    Ok::<(), HandlerError>(())
                }
            })
            .unwrap()
            .build()
    };
    let relay = RunningRelay::start(
        Relay::builder(outbox.clone(), outbox::Dispatcher::new(registry))
            .poll_interval(Duration::from_millis(20))
            .lease(Duration::from_secs(120)),
    );
    // One delivered event, then one in flight, in one partition.
    let (_done, held, before) = loop {
        let done = enqueue(&outbox, &[item("done", 1)]).await[0];
        eventually("done delivered", WAIT, || async {
            outbox.get(done).await.unwrap().unwrap().status == EventStatus::Delivered
        })
        .await;
        let held = enqueue(&outbox, &[item("held", 1)]).await[0];
        let before = part_of(&outbox, held).await;
        if part_of(&outbox, done).await == before {
            break (done, held, before);
        }
        // The hour turned in between: the handler holds this one; release it and try again.
        eventually("held in flight", WAIT, || async {
            entered.load(Ordering::SeqCst)
        })
        .await;
        entered.store(false, Ordering::SeqCst);
        release.notify_waiters();
    };
    eventually("held in flight", WAIT, || async {
        entered.load(Ordering::SeqCst)
    })
    .await;

    let removed = outbox
        .purge(&Retention::delete_after(Duration::ZERO))
        .await
        .unwrap();
    assert_eq!(
        removed, 1,
        "the partition is truncated under the held event"
    );
    assert_ne!(part_of(&outbox, held).await, before, "the held event moved");
    assert_eq!(
        outbox.get(held).await.unwrap().unwrap().status,
        EventStatus::Pending
    );

    release.notify_waiters();
    eventually("the held event settles as delivered", WAIT, || async {
        outbox.get(held).await.unwrap().unwrap().status == EventStatus::Delivered
    })
    .await;
    relay.stop().await;
    let handled: Vec<uuid::Uuid> = log.snapshot().iter().map(|h| h.event_id).collect();
    assert_eq!(
        handled.iter().filter(|id| **id == held).count(),
        1,
        "{handled:?}"
    );
    assert!(outbox.check().await.unwrap().is_empty());
    Postgres::drop_tables(&outbox).await;
}

/// An application's transaction that began in an earlier period (its `now()`, so its event's
/// partition, is old) and writes after that partition was truncated: its event lands in the
/// truncated partition and is delivered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transaction_of_an_earlier_period_writes_after_its_partition_is_truncated() {
    init_tracing();
    let outbox = ring(Duration::from_secs(1), 3).await;
    let log = Log::default();
    let relay = RunningRelay::start(
        Relay::builder(outbox.clone(), dispatcher(&log, always_ok()))
            .poll_interval(Duration::from_millis(20)),
    );
    let (mut open, p, earlier) = loop {
        let earlier = enqueue(&outbox, &[item("earlier", 1)]).await[0];
        let mut open = outbox.pool().begin().await.unwrap();
        let p: i16 = sqlx::query_scalar(
            "SELECT ((floor(extract(epoch FROM now()) * 1000 / 1000))::bigint % 3)::smallint",
        )
        .fetch_one(&mut *open)
        .await
        .unwrap();
        if part_of(&outbox, earlier).await == p {
            break (open, p, earlier);
        }
        open.rollback().await.unwrap();
    };
    eventually("the earlier event delivered", WAIT, || async {
        outbox.get(earlier).await.unwrap().unwrap().status == EventStatus::Delivered
    })
    .await;
    eventually("the ring turns", WAIT, || async {
        current_partition(&outbox).await != p
    })
    .await;
    let removed = outbox
        .purge(&Retention::delete_after(Duration::ZERO))
        .await
        .unwrap();
    assert!(removed >= 1);
    assert!(outbox.get(earlier).await.unwrap().is_none(), "truncated");

    let late = outbox.enqueue(&mut *open, &item("late", 1)).await.unwrap();
    open.commit().await.unwrap();
    assert_eq!(part_of(&outbox, late).await, p, "into the old partition");
    eventually("the late event delivered", WAIT, || async {
        log.snapshot().iter().any(|h| h.event_id == late)
    })
    .await;
    relay.stop().await;
    assert_eq!(
        log.snapshot().iter().filter(|h| h.event_id == late).count(),
        1
    );
    assert_eq!(
        outbox.get(late).await.unwrap().unwrap().status,
        EventStatus::Delivered
    );
    Postgres::drop_tables(&outbox).await;
}

/// Four retentions with archiving at once (four relays' schedules, or `outbox purge` beside a
/// relay) over partitions of several periods: each delivered event is archived exactly once,
/// and the removed counts add up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_archiving_retentions_archive_each_event_once() {
    init_tracing();
    let outbox = ring(Duration::from_secs(1), 3).await;
    let mut written = 0u64;
    let until = Instant::now() + Duration::from_millis(2500);
    while Instant::now() < until {
        let events: Vec<ItemChanged> = (0..10)
            .map(|i| item(&format!("agg-{i}"), written + i))
            .collect();
        enqueue(&outbox, &events).await;
        written += 10;
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let log = Log::default();
    let relay = RunningRelay::start(
        Relay::builder(outbox.clone(), dispatcher(&log, always_ok()))
            .poll_interval(Duration::from_millis(20)),
    );
    eventually("all delivered", WAIT, || async {
        status_count(&outbox, "delivered").await as u64 == written
    })
    .await;
    relay.stop().await;
    let runs: Vec<_> = (0..4)
        .map(|_| {
            let outbox = outbox.clone();
            tokio::spawn(async move {
                outbox
                    .purge(&Retention::archive_after(Duration::ZERO))
                    .await
            })
        })
        .collect();
    let mut removed = 0;
    for run in runs {
        removed += run.await.unwrap().unwrap();
    }
    // One more, in case a concurrent round gave up on a partition another held.
    removed += outbox
        .purge(&Retention::archive_after(Duration::ZERO))
        .await
        .unwrap();
    let t = outbox.table().to_string();
    let (archived, distinct): (i64, i64) = sqlx::query_as(&format!(
        "SELECT count(*), count(DISTINCT id) FROM {t}_archive"
    ))
    .fetch_one(outbox.pool())
    .await
    .unwrap();
    let rows: i64 = sqlx::query_scalar(&format!("SELECT count(*) FROM {t}"))
        .fetch_one(outbox.pool())
        .await
        .unwrap();
    Postgres::drop_tables(&outbox).await;
    assert_eq!(rows, 0);
    assert_eq!(distinct as u64, written);
    assert_eq!(archived, distinct, "an event archived twice");
    assert_eq!(removed, written);
}

/// An idempotency key whose event is still pending when retention moves it to another
/// partition: the key still finds the event, so a retried enqueue writes nothing, and the event
/// is delivered once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idempotency_key_finds_its_event_after_a_move() {
    init_tracing();
    let outbox = ring(Duration::from_secs(3600), 2).await;
    let log = Log::default();
    let mut tx = outbox.pool().begin().await.unwrap();
    let done = outbox.enqueue(&mut *tx, &item("done", 1)).await.unwrap();
    let keyed = outbox
        .enqueue_with(
            &mut *tx,
            &item("keyed", 1),
            EnqueueOptions::new()
                .idempotency_key("request-1")
                .available_at(chrono::Utc::now() + chrono::Duration::seconds(3)),
        )
        .await
        .unwrap();
    tx.commit().await.unwrap();
    let before = part_of(&outbox, keyed).await;
    let relay = RunningRelay::start(
        Relay::builder(outbox.clone(), dispatcher(&log, always_ok()))
            .poll_interval(Duration::from_millis(20)),
    );
    eventually("done delivered", WAIT, || async {
        outbox.get(done).await.unwrap().unwrap().status == EventStatus::Delivered
    })
    .await;
    let removed = outbox
        .purge(&Retention::delete_after(Duration::ZERO))
        .await
        .unwrap();
    assert_eq!(removed, 1);
    assert_ne!(part_of(&outbox, keyed).await, before);

    let mut tx = outbox.pool().begin().await.unwrap();
    let again = outbox
        .enqueue_once(&mut *tx, &item("keyed", 2), "request-1")
        .await
        .unwrap();
    tx.commit().await.unwrap();
    assert!(!again.is_new(), "the key was forgotten");
    assert_eq!(again.id(), keyed);
    eventually("the keyed event delivered", WAIT, || async {
        log.snapshot().iter().any(|h| h.event_id == keyed)
    })
    .await;
    // Nothing else comes for the key.
    let more = within(Duration::from_secs(1), || async {
        log.snapshot()
            .iter()
            .filter(|h| h.event.item == "keyed")
            .count()
            > 1
    })
    .await;
    relay.stop().await;
    Postgres::drop_tables(&outbox).await;
    assert!(!more, "the keyed event was delivered twice");
}
