//! The operator's view and actions of `Outbox` (what the `outbox` command and the dashboard
//! call), on PostgreSQL and SQLite, with a relay running: the defects an outside review found
//! in the first version.

use outbox::{Backend, EventFilter, HandlerContext, HandlerError, Outbox, Relay};
use outbox_tests::{dispatcher, eventually, Behaviour, ItemChanged, Log, RunningRelay, TestDb};
use sqlx::{Postgres, Sqlite};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

const WAIT: Duration = Duration::from_secs(60);

async fn status<DB: TestDb>(outbox: &Outbox<DB>) -> outbox::OutboxStatus {
    outbox.status(Duration::from_secs(3600)).await.unwrap()
}

/// Review finding 1: `requeue_dead` requeued an aggregate's dead events one at a time, the
/// most recent death first, so a running relay delivered a later event before an earlier one
/// was back. Requeued together, they are delivered in `seq` order.
async fn a_bulk_requeue_keeps_the_aggregate_in_order<DB: TestDb>() {
    let outbox = DB::fresh().await;
    let broken = Arc::new(AtomicBool::new(true));
    let log = Log::default();
    let behaviour: Behaviour = {
        let broken = broken.clone();
        Arc::new(move |event: &ItemChanged, _ctx: &HandlerContext| {
            if event.n % 2 == 1 && broken.load(Ordering::SeqCst) {
                Err(HandlerError::fatal("broken for odd events"))
            } else {
                Ok(())
            }
        })
    };
    let events: Vec<ItemChanged> = (1..=200)
        .map(|n| ItemChanged {
            item: "hot".into(),
            n,
        })
        .collect();
    let mut tx = outbox.pool().begin().await.unwrap();
    outbox.enqueue_batch(&mut *tx, &events).await.unwrap();
    tx.commit().await.unwrap();
    let relay = RunningRelay::start(
        Relay::builder(outbox.clone(), dispatcher(&log, behaviour))
            .poll_interval(Duration::from_millis(5)),
    );
    eventually(
        "the odd events dead, the even ones delivered",
        WAIT,
        || async {
            let s = status(&outbox).await;
            s.dead == 100 && s.pending == 0
        },
    )
    .await;
    broken.store(false, Ordering::SeqCst);
    let before = log.len();
    let filter = EventFilter::new().aggregate("item", "hot");
    assert_eq!(outbox.requeue_dead(&filter, false).await.unwrap(), 100);
    eventually("the requeued events delivered", WAIT, || async {
        let s = status(&outbox).await;
        s.dead == 0 && s.pending == 0
    })
    .await;
    relay.stop().await;
    let again: Vec<u64> = log.snapshot()[before..].iter().map(|h| h.event.n).collect();
    let odd: Vec<u64> = (1..=200).filter(|n| n % 2 == 1).collect();
    assert_eq!(again, odd, "delivered again once each, in seq order");
    DB::drop_tables(&outbox).await;
}

/// Review finding 5: an event deferred with `enqueue_at` was reported stuck before its time.
/// Finding 6: every aggregate a relay was delivering counted as retrying.
async fn deferred_and_in_flight_events_are_not_trouble<DB: TestDb>() {
    let outbox = DB::fresh().await;
    let mut tx = outbox.pool().begin().await.unwrap();
    let later = chrono::Utc::now() + chrono::Duration::hours(1);
    let deferred = ItemChanged {
        item: "later".into(),
        n: 1,
    };
    outbox.enqueue_at(&mut *tx, &deferred, later).await.unwrap();
    tx.commit().await.unwrap();
    let s = outbox.status(Duration::ZERO).await.unwrap();
    assert_eq!(s.pending, 1);
    assert_eq!(s.oldest_pending_since, None, "not due: no lag");
    assert!(s.stuck.is_empty(), "not due, not stuck: {:?}", s.stuck);

    // Four aggregates held by a handler that waits: leased, not retrying.
    let release = Arc::new(AtomicBool::new(false));
    let registry = outbox::Registry::builder()
        .handler("wait", {
            let release = release.clone();
            move |_event: ItemChanged, _ctx: HandlerContext| {
                let release = release.clone();
                async move {
                    while !release.load(Ordering::SeqCst) {
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    }
                    Ok(())
                }
            }
        })
        .unwrap()
        .build();
    let mut tx = outbox.pool().begin().await.unwrap();
    let busy: Vec<ItemChanged> = (0..4)
        .map(|i| ItemChanged {
            item: format!("busy-{i}"),
            n: 1,
        })
        .collect();
    outbox.enqueue_batch(&mut *tx, &busy).await.unwrap();
    tx.commit().await.unwrap();
    let relay = RunningRelay::start(
        Relay::builder(outbox.clone(), outbox::Dispatcher::new(registry))
            .batch_size(1)
            .workers(2)
            .poll_interval(Duration::from_millis(10)),
    );
    eventually("two batches in flight", WAIT, || async {
        let s = status(&outbox).await;
        s.leases == 2 && s.aggregates_leased == 2
    })
    .await;
    let s = status(&outbox).await;
    assert_eq!(
        s.aggregates_retrying, 0,
        "first attempts in flight are not retries"
    );
    assert_eq!(s.relays_leasing, 1, "two workers of one relay");
    release.store(true, Ordering::SeqCst);
    eventually("the four delivered", WAIT, || async {
        status(&outbox).await.delivered == 4
    })
    .await;
    relay.stop().await;
    DB::drop_tables(&outbox).await;
}

/// Review finding 7: an empty reason is contained in every reason; it is no condition, so an
/// action with it alone is refused instead of acting on every dead event.
async fn an_empty_reason_selects_nothing_to_act_on<
    DB: Backend<Store: outbox::FullStore> + TestDb,
>() {
    let outbox = DB::fresh().await;
    let filter = EventFilter::new().reason("");
    assert!(filter.is_empty());
    let refused = outbox.discard_dead(&filter, false).await.unwrap_err();
    assert!(refused.to_string().contains("no condition"), "{refused}");
    assert!(outbox.requeue_dead(&filter, true).await.is_err());
    DB::drop_tables(&outbox).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_bulk_requeue_keeps_order() {
    a_bulk_requeue_keeps_the_aggregate_in_order::<Postgres>().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_bulk_requeue_keeps_order() {
    a_bulk_requeue_keeps_the_aggregate_in_order::<Sqlite>().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_status_of_deferred_and_in_flight_events() {
    deferred_and_in_flight_events_are_not_trouble::<Postgres>().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_status_of_deferred_and_in_flight_events() {
    deferred_and_in_flight_events_are_not_trouble::<Sqlite>().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn empty_reasons_are_no_condition() {
    an_empty_reason_selects_nothing_to_act_on::<Postgres>().await;
    an_empty_reason_selects_nothing_to_act_on::<Sqlite>().await;
}

/// Every reason of an event's failed attempts is kept (the last ten), not only the last one.
async fn the_reasons_of_every_failed_attempt_are_kept<DB: TestDb>() {
    let outbox = DB::fresh().await;
    let log = Log::default();
    let behaviour: Behaviour = Arc::new(|event: &ItemChanged, ctx: &HandlerContext| {
        if event.item == "flaky" {
            Err(HandlerError::retry(format!(
                "attempt {} timed out",
                ctx.attempt()
            )))
        } else {
            Ok(())
        }
    });
    let mut tx = outbox.pool().begin().await.unwrap();
    let flaky = ItemChanged {
        item: "flaky".into(),
        n: 1,
    };
    let id = outbox.enqueue(&mut *tx, &flaky).await.unwrap();
    tx.commit().await.unwrap();
    let relay = RunningRelay::start(
        Relay::builder(outbox.clone(), dispatcher(&log, behaviour))
            .retry(
                outbox::RetryPolicy::exponential(Duration::from_millis(1))
                    .max_delay(Duration::from_millis(5))
                    .max_attempts(12),
            )
            .poll_interval(Duration::from_millis(5)),
    );
    eventually("dead after 12 attempts", WAIT, || async {
        status(&outbox).await.dead == 1
    })
    .await;
    relay.stop().await;
    let record = outbox.get(id).await.unwrap().unwrap();
    let attempts: Vec<u32> = record.failures.iter().map(|f| f.attempt).collect();
    assert_eq!(
        attempts,
        (3..=12).collect::<Vec<_>>(),
        "the last ten, oldest first"
    );
    assert!(record.failures[..9].iter().all(|f| !f.dead));
    assert!(record.failures[9].dead, "the last one gave up");
    for f in &record.failures {
        assert_eq!(f.reason, format!("attempt {} timed out", f.attempt));
    }
    assert!(record.failures.windows(2).all(|w| w[0].at <= w[1].at));
    DB::drop_tables(&outbox).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_keeps_every_failed_attempt() {
    the_reasons_of_every_failed_attempt_are_kept::<Postgres>().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_keeps_every_failed_attempt() {
    the_reasons_of_every_failed_attempt_are_kept::<Sqlite>().await;
}
