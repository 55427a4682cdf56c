//! Scenarios that hold on every backend. Each test binary calls them with its database.

use crate::{
    always_ok, dispatcher, eventually, init_tracing, ItemChanged, Log, MalformedItemChanged,
    NobodyListens, RunningRelay, TestDb,
};
use outbox::{EnqueueOptions, EventStatus, HandlerError, Outbox, Relay, Retention, RetryPolicy};
use std::collections::{BTreeMap, HashSet};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

const WAIT: Duration = Duration::from_secs(60);

/// A relay builder that polls every 20 ms, for tests that do not wait on notifications.
fn quick_relay<DB: TestDb, D: outbox::Destination>(
    outbox: Outbox<DB>,
    destination: D,
) -> outbox::RelayBuilder<DB, D> {
    Relay::builder(outbox, destination).poll_interval(Duration::from_millis(20))
}

fn fast_retry(max_attempts: u32) -> RetryPolicy {
    RetryPolicy::exponential(Duration::from_millis(20))
        .max_delay(Duration::from_millis(100))
        .max_attempts(max_attempts)
}

fn item(aggregate: usize, n: u64) -> ItemChanged {
    ItemChanged {
        item: format!("item-{aggregate}"),
        n,
    }
}

/// Rollback leaves neither the business row nor the event; commit leaves both.
pub async fn commit_and_rollback<DB: TestDb>() {
    init_tracing();
    let outbox = DB::fresh().await;

    let mut tx = outbox.pool().begin().await.unwrap();
    DB::insert_business_row(&outbox, &mut *tx, "rolled-back").await;
    let id = outbox.enqueue(&mut *tx, &item(1, 1)).await.unwrap();
    tx.rollback().await.unwrap();
    assert_eq!(DB::count_business_rows(&outbox, "rolled-back").await, 0);
    assert!(outbox.get(id).await.unwrap().is_none());
    assert_eq!(DB::count_outbox_rows(&outbox).await, 0);

    let mut tx = outbox.pool().begin().await.unwrap();
    DB::insert_business_row(&outbox, &mut *tx, "committed").await;
    let id = outbox.enqueue(&mut *tx, &item(1, 2)).await.unwrap();
    tx.commit().await.unwrap();
    assert_eq!(DB::count_business_rows(&outbox, "committed").await, 1);
    let row = outbox.get(id).await.unwrap().expect("committed event");
    assert_eq!(row.status, EventStatus::Pending);
    assert_eq!(row.event_type, "test.item_changed");
    assert_eq!(row.aggregate_type, "item");
    assert_eq!(row.aggregate_id, "item-1");
    // The rolled-back event took no sequence number.
    assert_eq!(row.sequence, 1);
    assert_eq!(row.attempts, 0);
    let payload: serde_json::Value = serde_json::from_str(&row.payload).unwrap();
    assert_eq!(payload, serde_json::json!({"item": "item-1", "n": 2}));
    DB::drop_tables(&outbox).await;
}

/// Enqueues `per_aggregate` events for each of `aggregates` aggregates (`item-0`, `item-1`, …,
/// with `n` = 1, 2, …), one batch per round.
pub async fn enqueue_backlog<DB: TestDb>(
    outbox: &Outbox<DB>,
    aggregates: usize,
    per_aggregate: u64,
) {
    for n in 1..=per_aggregate {
        let events: Vec<ItemChanged> = (0..aggregates).map(|a| item(a, n)).collect();
        let mut tx = outbox.pool().begin().await.unwrap();
        outbox.enqueue_batch(&mut *tx, &events).await.unwrap();
        tx.commit().await.unwrap();
    }
}

/// Checks that every aggregate's events were handled exactly once, in sequence order.
fn assert_ordered_exactly_once(log: &Log, aggregates: usize, per_aggregate: u64) {
    let handled = log.snapshot();
    let ids: HashSet<_> = handled.iter().map(|h| h.event_id).collect();
    assert_eq!(ids.len(), handled.len(), "an event was handled twice");
    assert_eq!(handled.len(), aggregates * per_aggregate as usize);
    let mut by_aggregate: BTreeMap<&str, Vec<(i64, u64)>> = BTreeMap::new();
    for h in &handled {
        by_aggregate
            .entry(&h.event.item)
            .or_default()
            .push((h.sequence, h.event.n));
    }
    assert_eq!(by_aggregate.len(), aggregates);
    for (aggregate, seen) in by_aggregate {
        let expected: Vec<(i64, u64)> = (1..=per_aggregate).map(|n| (n as i64, n)).collect();
        assert_eq!(seen, expected, "order broken for {aggregate}");
    }
}

/// `relays` relays share one table: every event handled once, per-aggregate order kept.
pub async fn relays_share_work_in_order<DB: TestDb>(
    relays: usize,
    aggregates: usize,
    per_aggregate: u64,
) {
    init_tracing();
    let outbox = DB::fresh().await;
    enqueue_backlog(&outbox, aggregates, per_aggregate).await;

    let log = Log::default();
    let running: Vec<RunningRelay> = (0..relays)
        .map(|_| {
            RunningRelay::spawn(
                Relay::builder(outbox.clone(), dispatcher(&log, always_ok()))
                    .batch_size(50)
                    .workers(2)
                    .poll_interval(Duration::from_millis(50))
                    .build()
                    .unwrap(),
            )
        })
        .collect();
    let total = aggregates * per_aggregate as usize;
    eventually("every event handled", WAIT, || async { log.len() >= total }).await;
    for relay in running {
        relay.stop().await;
    }
    assert_ordered_exactly_once(&log, aggregates, per_aggregate);
    assert_eq!(DB::count_status(&outbox, "delivered").await, total as i64);
    DB::drop_tables(&outbox).await;
}

/// A relay that dies mid-batch leaves its events to its lease; another relay delivers them.
pub async fn crashed_relay_is_taken_over<DB: TestDb>() {
    init_tracing();
    let outbox = DB::fresh().await;
    enqueue_backlog(&outbox, 5, 2).await;

    // The first relay's handler never returns, so it holds its batch until it is killed.
    let claimed = Arc::new(AtomicU32::new(0));
    let stuck = {
        let claimed = claimed.clone();
        let registry = outbox::Registry::builder()
            .handler::<ItemChanged, _, _>("stuck", move |_: ItemChanged, _| {
                claimed.fetch_add(1, Ordering::SeqCst);
                std::future::pending::<Result<(), HandlerError>>()
            })
            .unwrap()
            .build();
        Relay::builder(outbox.clone(), outbox::Dispatcher::new(registry))
            .lease(Duration::from_secs(1))
            .poll_interval(Duration::from_millis(50))
            .build()
            .unwrap()
    };
    let doomed = RunningRelay::spawn(stuck);
    eventually("the first relay claimed the heads", WAIT, || async {
        claimed.load(Ordering::SeqCst) == 5
    })
    .await;
    // Kill it: no graceful shutdown, like a crashed process.
    doomed.task.abort();
    assert!(doomed.task.await.unwrap_err().is_cancelled());

    let log = Log::default();
    let survivor = RunningRelay::spawn(
        Relay::builder(outbox.clone(), dispatcher(&log, always_ok()))
            .poll_interval(Duration::from_millis(50))
            .build()
            .unwrap(),
    );
    eventually("the survivor delivered everything", WAIT, || async {
        log.len() == 10
    })
    .await;
    survivor.stop().await;
    assert_ordered_exactly_once(&log, 5, 2);
    let handled = log.snapshot();
    // The heads were attempted once by the dead relay.
    assert!(handled
        .iter()
        .filter(|h| h.sequence == 1)
        .all(|h| h.attempt == 2));
    assert!(handled
        .iter()
        .filter(|h| h.sequence == 2)
        .all(|h| h.attempt == 1));
    DB::drop_tables(&outbox).await;
}

/// A handler that fails twice then succeeds is handled once, with three attempts recorded. One
/// that always fails goes dead with its reason and holds back only its own aggregate.
pub async fn failures_retry_then_dead<DB: TestDb>() {
    init_tracing();
    let outbox = DB::fresh().await;
    let flaky = item(1, 1);
    let poison = item(2, 1);
    let after_poison = item(2, 2);
    let mut tx = outbox.pool().begin().await.unwrap();
    let flaky_id = outbox.enqueue(&mut *tx, &flaky).await.unwrap();
    let poison_id = outbox.enqueue(&mut *tx, &poison).await.unwrap();
    let after_poison_id = outbox.enqueue(&mut *tx, &after_poison).await.unwrap();
    let others = outbox
        .enqueue_batch(&mut *tx, &(3..13).map(|a| item(a, 1)).collect::<Vec<_>>())
        .await
        .unwrap();
    tx.commit().await.unwrap();

    let log = Log::default();
    let behaviour: crate::Behaviour = Arc::new(|event, ctx| match event.item.as_str() {
        "item-1" if ctx.attempt() <= 2 => Err(HandlerError::retry("gateway timeout")),
        "item-2" if event.n == 1 => Err(HandlerError::retry("card declined by the bank")),
        _ => Ok(()),
    });
    let relay = RunningRelay::start(
        quick_relay(outbox.clone(), dispatcher(&log, behaviour)).retry(fast_retry(4)),
    );
    eventually("the poison event is dead", WAIT, || async {
        outbox.get(poison_id).await.unwrap().unwrap().status == EventStatus::Dead
    })
    .await;
    eventually("everything else is delivered", WAIT, || async {
        log.len() == 12
    })
    .await;
    relay.stop().await;

    let flaky_row = outbox.get(flaky_id).await.unwrap().unwrap();
    assert_eq!(flaky_row.status, EventStatus::Delivered);
    assert_eq!(flaky_row.attempts, 3);
    assert_eq!(flaky_row.last_error, None);
    let handled = log.snapshot();
    assert_eq!(handled.iter().filter(|h| h.event_id == flaky_id).count(), 1);

    let poison_row = outbox.get(poison_id).await.unwrap().unwrap();
    assert_eq!(poison_row.attempts, 4);
    assert_eq!(
        poison_row.last_error.as_deref(),
        Some("card declined by the bank")
    );
    assert!(poison_row.dead_at.is_some());

    // Other aggregates were not held back by the poison event...
    for id in others {
        assert_eq!(
            outbox.get(id).await.unwrap().unwrap().status,
            EventStatus::Delivered
        );
    }
    // ...but its own aggregate's next event waited until it was dead.
    let after = handled
        .iter()
        .find(|h| h.event_id == after_poison_id)
        .unwrap();
    assert!(after.at >= poison_row.dead_at.unwrap() - chrono::Duration::milliseconds(50));
    DB::drop_tables(&outbox).await;
}

/// A fatal handler error kills the event on the first attempt.
pub async fn fatal_error_is_dead_at_once<DB: TestDb>() {
    init_tracing();
    let outbox = DB::fresh().await;
    let mut tx = outbox.pool().begin().await.unwrap();
    let id = outbox.enqueue(&mut *tx, &item(1, 1)).await.unwrap();
    tx.commit().await.unwrap();
    let log = Log::default();
    let relay = RunningRelay::start(
        quick_relay(
            outbox.clone(),
            dispatcher(
                &log,
                Arc::new(|_, _| Err(HandlerError::fatal("amount is negative"))),
            ),
        )
        .retry(fast_retry(10)),
    );
    eventually("the event is dead", WAIT, || async {
        outbox.get(id).await.unwrap().unwrap().status == EventStatus::Dead
    })
    .await;
    relay.stop().await;
    let row = outbox.get(id).await.unwrap().unwrap();
    assert_eq!(row.attempts, 1);
    assert_eq!(row.last_error.as_deref(), Some("amount is negative"));

    // An operator fixes the cause and requeues it.
    assert!(outbox.requeue(id).await.unwrap());
    assert!(
        !outbox.requeue(id).await.unwrap(),
        "only dead events are requeued"
    );
    let relay = RunningRelay::start(quick_relay(outbox.clone(), dispatcher(&log, always_ok())));
    eventually("the requeued event is delivered", WAIT, || async {
        log.len() == 1
    })
    .await;
    relay.stop().await;
    assert_eq!(
        outbox.get(id).await.unwrap().unwrap().status,
        EventStatus::Delivered
    );
    DB::drop_tables(&outbox).await;
}

/// A deferred event is not handled before its time, and is handled after it.
pub async fn deferred_delivery<DB: TestDb>() {
    init_tracing();
    let outbox = DB::fresh().await;
    let when = chrono::Utc::now() + chrono::Duration::milliseconds(1500);
    let mut tx = outbox.pool().begin().await.unwrap();
    let deferred = outbox
        .enqueue_at(&mut *tx, &item(1, 1), when)
        .await
        .unwrap();
    let delayed = outbox
        .enqueue_with(
            &mut *tx,
            &item(2, 1),
            EnqueueOptions::new().delay(Duration::from_millis(1500)),
        )
        .await
        .unwrap();
    let now = outbox.enqueue(&mut *tx, &item(3, 1)).await.unwrap();
    tx.commit().await.unwrap();

    let log = Log::default();
    let relay = RunningRelay::start(quick_relay(outbox.clone(), dispatcher(&log, always_ok())));
    eventually("the immediate event is handled", WAIT, || async {
        !log.is_empty()
    })
    .await;
    eventually("the deferred events are handled", WAIT, || async {
        log.len() == 3
    })
    .await;
    relay.stop().await;
    let handled = log.snapshot();
    assert_eq!(handled[0].event_id, now);
    for id in [deferred, delayed] {
        let h = handled.iter().find(|h| h.event_id == id).unwrap();
        // The database clock decides; allow for a little skew between it and ours.
        assert!(
            h.at >= when - chrono::Duration::milliseconds(250),
            "handled at {} before {when}",
            h.at
        );
    }
    DB::drop_tables(&outbox).await;
}

/// An unknown event type and a payload that does not deserialise end dead with a reason.
pub async fn unknown_type_and_bad_payload_go_dead<DB: TestDb>() {
    init_tracing();
    let outbox = DB::fresh().await;
    let mut tx = outbox.pool().begin().await.unwrap();
    let unknown = outbox
        .enqueue(
            &mut *tx,
            &NobodyListens {
                item_id: "x".into(),
            },
        )
        .await
        .unwrap();
    let malformed = outbox
        .enqueue(
            &mut *tx,
            &MalformedItemChanged {
                item: "item-9".into(),
                wrong: true,
            },
        )
        .await
        .unwrap();
    let fine = outbox.enqueue(&mut *tx, &item(1, 1)).await.unwrap();
    tx.commit().await.unwrap();

    let log = Log::default();
    let relay = RunningRelay::start(
        quick_relay(outbox.clone(), dispatcher(&log, always_ok())).retry(fast_retry(3)),
    );
    eventually("both bad events are dead", WAIT, || async {
        let a = outbox.get(unknown).await.unwrap().unwrap().status;
        let b = outbox.get(malformed).await.unwrap().unwrap().status;
        a == EventStatus::Dead && b == EventStatus::Dead
    })
    .await;
    eventually("the good event is handled", WAIT, || async {
        log.len() == 1
    })
    .await;
    relay.stop().await;

    let unknown = outbox.get(unknown).await.unwrap().unwrap();
    assert_eq!(
        unknown.attempts, 3,
        "unknown types are retried: a deploy may bring the handler"
    );
    assert!(
        unknown
            .last_error
            .as_deref()
            .unwrap()
            .contains("no handler for event type \"test.nobody_listens\""),
        "{:?}",
        unknown.last_error
    );
    let malformed = outbox.get(malformed).await.unwrap().unwrap();
    assert_eq!(
        malformed.attempts, 1,
        "a payload that does not deserialise never will"
    );
    assert!(
        malformed
            .last_error
            .as_deref()
            .unwrap()
            .contains("missing field `n`"),
        "{:?}",
        malformed.last_error
    );
    assert_eq!(log.snapshot()[0].event_id, fine);
    DB::drop_tables(&outbox).await;
}

/// A handler that panics is a failure with the panic message; the relay carries on.
pub async fn panicking_handler_is_contained<DB: TestDb>() {
    init_tracing();
    let outbox = DB::fresh().await;
    let mut tx = outbox.pool().begin().await.unwrap();
    let boom = outbox.enqueue(&mut *tx, &item(1, 1)).await.unwrap();
    outbox.enqueue(&mut *tx, &item(2, 1)).await.unwrap();
    tx.commit().await.unwrap();
    let log = Log::default();
    let relay = RunningRelay::start(
        quick_relay(
            outbox.clone(),
            dispatcher(
                &log,
                Arc::new(|event, _| {
                    if event.item == "item-1" {
                        panic!("index out of bounds in the handler")
                    }
                    Ok(())
                }),
            ),
        )
        .retry(fast_retry(2)),
    );
    eventually("the panicking event is dead", WAIT, || async {
        outbox.get(boom).await.unwrap().unwrap().status == EventStatus::Dead
    })
    .await;
    eventually("the other event is handled", WAIT, || async {
        log.len() == 1
    })
    .await;
    relay.stop().await;
    let row = outbox.get(boom).await.unwrap().unwrap();
    assert!(
        row.last_error
            .as_deref()
            .unwrap()
            .contains("panicked: index out of bounds in the handler"),
        "{:?}",
        row.last_error
    );
    DB::drop_tables(&outbox).await;
}

/// Events of one aggregate in one batch get consecutive sequence numbers in slice order, after
/// those already allocated.
pub async fn batch_enqueue_allocates_consecutive_sequences<DB: TestDb>() {
    init_tracing();
    let outbox = DB::fresh().await;
    let mut tx = outbox.pool().begin().await.unwrap();
    outbox.enqueue(&mut *tx, &item(1, 0)).await.unwrap();
    tx.commit().await.unwrap();
    let events = vec![item(1, 1), item(2, 1), item(1, 2), item(1, 3), item(2, 2)];
    let mut tx = outbox.pool().begin().await.unwrap();
    let ids = outbox.enqueue_batch(&mut *tx, &events).await.unwrap();
    tx.commit().await.unwrap();
    let mut seqs = Vec::new();
    for id in ids {
        seqs.push(outbox.get(id).await.unwrap().unwrap().sequence);
    }
    assert_eq!(seqs, [2, 1, 3, 4, 2]);
    DB::drop_tables(&outbox).await;
}

/// Shutdown lets the batch in flight finish and record its outcome.
pub async fn graceful_shutdown_finishes_in_flight_work<DB: TestDb>() {
    init_tracing();
    let outbox = DB::fresh().await;
    let mut tx = outbox.pool().begin().await.unwrap();
    let id = outbox.enqueue(&mut *tx, &item(1, 1)).await.unwrap();
    tx.commit().await.unwrap();
    let started = Arc::new(tokio::sync::Notify::new());
    let release = Arc::new(tokio::sync::Notify::new());
    let registry = {
        let (started, release) = (started.clone(), release.clone());
        outbox::Registry::builder()
            .handler::<ItemChanged, _, _>("slow", move |_: ItemChanged, _| {
                let (started, release) = (started.clone(), release.clone());
                async move {
                    started.notify_one();
                    release.notified().await;
                    Ok(())
                }
            })
            .unwrap()
            .build()
    };
    let relay = RunningRelay::start(quick_relay(
        outbox.clone(),
        outbox::Dispatcher::new(registry),
    ));
    started.notified().await;
    relay.shutdown.cancel();
    assert!(!relay.task.is_finished());
    release.notify_one();
    relay.task.await.unwrap().unwrap();
    assert_eq!(
        outbox.get(id).await.unwrap().unwrap().status,
        EventStatus::Delivered
    );
    DB::drop_tables(&outbox).await;
}

/// Retention deletes, or archives, delivered rows and leaves pending and dead ones alone.
pub async fn retention_removes_only_delivered_rows<DB: TestDb>() {
    init_tracing();
    let outbox = DB::fresh().await;
    enqueue_backlog(&outbox, 10, 3).await;
    let log = Log::default();
    let relay = RunningRelay::start(quick_relay(outbox.clone(), dispatcher(&log, always_ok())));
    eventually("all handled", WAIT, || async { log.len() == 30 }).await;
    relay.stop().await;
    let mut tx = outbox.pool().begin().await.unwrap();
    outbox.enqueue(&mut *tx, &item(99, 1)).await.unwrap();
    tx.commit().await.unwrap();

    // Young rows are kept.
    let kept = outbox
        .purge(&Retention::delete_after(Duration::from_secs(3600)))
        .await
        .unwrap();
    assert_eq!(kept, 0);
    // Small batches: the loop must go round several times.
    let archived = outbox
        .purge(&Retention::archive_after(Duration::ZERO).batch_size(7))
        .await
        .unwrap();
    assert_eq!(archived, 30);
    assert_eq!(DB::count_archived(&outbox).await, 30);
    assert_eq!(DB::count_outbox_rows(&outbox).await, 1);
    assert_eq!(DB::count_status(&outbox, "pending").await, 1);
    DB::drop_tables(&outbox).await;
}

/// The relay applies retention on its schedule.
pub async fn relay_runs_retention<DB: TestDb>() {
    init_tracing();
    let outbox = DB::fresh().await;
    enqueue_backlog(&outbox, 5, 2).await;
    let log = Log::default();
    let relay = RunningRelay::spawn(
        Relay::builder(outbox.clone(), dispatcher(&log, always_ok()))
            .poll_interval(Duration::from_millis(20))
            .retention(
                Retention::delete_after(Duration::ZERO),
                Duration::from_millis(50),
            )
            .build()
            .unwrap(),
    );
    eventually("all handled and purged", WAIT, || async {
        log.len() == 10 && DB::count_outbox_rows(&outbox).await == 0
    })
    .await;
    relay.stop().await;
    assert_eq!(DB::count_archived(&outbox).await, 0);
    DB::drop_tables(&outbox).await;
}

/// The inbox records a message once per consumer, inside the handler's transaction: a second
/// delivery is skipped, a rolled-back first attempt is not remembered, and consumers are apart.
pub async fn inbox_processes_each_message_once<DB: TestDb>() {
    init_tracing();
    let outbox = DB::fresh().await;
    let table = format!("{}_inbox", outbox.table());
    let inbox = outbox::Inbox::new(outbox.pool().clone(), &table, "billing").unwrap();
    inbox.migrate().await.unwrap();
    inbox.migrate().await.unwrap();
    let message = uuid::Uuid::now_v7();

    // A failed attempt rolls back its record with its changes.
    let tx = inbox
        .begin_for(message)
        .await
        .unwrap()
        .expect("first delivery");
    tx.rollback().await.unwrap();

    let mut tx = inbox
        .begin_for(message)
        .await
        .unwrap()
        .expect("retry after rollback");
    DB::insert_business_row(&outbox, &mut *tx, "applied-once").await;
    tx.commit().await.unwrap();

    assert!(
        inbox.begin_for(message).await.unwrap().is_none(),
        "redelivery is skipped"
    );
    assert_eq!(DB::count_business_rows(&outbox, "applied-once").await, 1);

    let other = outbox::Inbox::new(outbox.pool().clone(), &table, "shipping").unwrap();
    assert!(
        other.begin_for(message).await.unwrap().is_some(),
        "another consumer is independent"
    );
    assert!(outbox::Inbox::<DB>::new(outbox.pool().clone(), "bad name", "x").is_err());
    DB::drop_tables(&outbox).await;
}

/// One aggregate with a deep backlog is delivered in runs, in order, each event once.
pub async fn hot_aggregate_is_delivered_in_order<DB: TestDb>() {
    init_tracing();
    let outbox = DB::fresh().await;
    enqueue_backlog(&outbox, 1, 2000).await;
    let log = Log::default();
    let relay = RunningRelay::start(
        quick_relay(outbox.clone(), dispatcher(&log, always_ok())).run_length(300),
    );
    eventually("the hot aggregate is drained", WAIT, || async {
        log.len() == 2000
    })
    .await;
    relay.stop().await;
    assert_ordered_exactly_once(&log, 1, 2000);
    assert!(outbox.check().await.unwrap().is_empty());
    DB::drop_tables(&outbox).await;
}

/// A failure in the middle of a run: the events before it are delivered, it is retried, the
/// events after it follow it; nothing arrives before an earlier event of its aggregate.
pub async fn a_run_cut_by_a_failure_is_retried_in_order<DB: TestDb>() {
    init_tracing();
    let outbox = DB::fresh().await;
    enqueue_backlog(&outbox, 3, 6).await;
    let log = Log::default();
    let behaviour: crate::Behaviour = Arc::new(|event, ctx| {
        if event.item == "item-1" && event.n == 3 && ctx.attempt() < 3 {
            Err(HandlerError::retry("flaky"))
        } else {
            Ok(())
        }
    });
    let relay = RunningRelay::start(
        quick_relay(outbox.clone(), dispatcher(&log, behaviour)).retry(fast_retry(5)),
    );
    eventually("everything is delivered", WAIT, || async {
        log.len() == 18
    })
    .await;
    relay.stop().await;
    assert_ordered_exactly_once(&log, 3, 6);
    let third = log
        .snapshot()
        .into_iter()
        .find(|h| h.event.item == "item-1" && h.event.n == 3)
        .unwrap();
    assert_eq!(third.attempt, 3);
    DB::drop_tables(&outbox).await;
}

/// A failure reason with a NUL byte (which PostgreSQL text cannot hold), a huge reason and an
/// absurd retry delay fail their own event only: every other event of the batch is delivered
/// once, and the bad events die after their attempts with a cleaned reason.
pub async fn bad_failures_affect_only_their_own_event<DB: TestDb>() {
    init_tracing();
    let outbox = DB::fresh().await;
    let mut tx = outbox.pool().begin().await.unwrap();
    let nul = outbox.enqueue(&mut *tx, &item(1000, 1)).await.unwrap();
    let forever = outbox.enqueue(&mut *tx, &item(1001, 1)).await.unwrap();
    let chatty = outbox.enqueue(&mut *tx, &item(1002, 1)).await.unwrap();
    tx.commit().await.unwrap();
    enqueue_backlog(&outbox, 20, 3).await;
    let log = Log::default();
    let behaviour: crate::Behaviour = Arc::new(|event, _| match event.item.as_str() {
        "item-1000" => Err(HandlerError::retry("bad\0byte")),
        "item-1001" => Err(HandlerError::retry_after(Duration::MAX, "come back never")),
        "item-1002" => Err(HandlerError::retry("x".repeat(1 << 20))),
        _ => Ok(()),
    });
    let relay = RunningRelay::start(
        quick_relay(outbox.clone(), dispatcher(&log, behaviour)).retry(fast_retry(3)),
    );
    eventually("the good events are delivered", WAIT, || async {
        log.len() == 60
    })
    .await;
    for id in [nul, forever, chatty] {
        eventually("the bad event is dead", WAIT, || async {
            outbox.get(id).await.unwrap().unwrap().status == EventStatus::Dead
        })
        .await;
    }
    relay.stop().await;
    assert_ordered_exactly_once(&log, 20, 3);
    let nul = outbox.get(nul).await.unwrap().unwrap();
    assert_eq!(nul.last_error.as_deref(), Some("badbyte"));
    assert_eq!(nul.attempts, 3);
    assert_eq!(outbox.get(forever).await.unwrap().unwrap().attempts, 3);
    let chatty = outbox.get(chatty).await.unwrap().unwrap();
    assert!(chatty.last_error.unwrap().len() <= 4096);
    DB::drop_tables(&outbox).await;
}

/// A destination that panics on one aggregate's event fails that run only; the relay keeps
/// running and the event dies after its attempts.
pub async fn a_panicking_destination_affects_only_its_run<DB: TestDb>() {
    init_tracing();
    let outbox = DB::fresh().await;
    enqueue_backlog(&outbox, 10, 2).await;
    let log = Log::default();
    let relay = RunningRelay::start(
        quick_relay(
            outbox.clone(),
            PanicsOn {
                aggregate: "item-3",
                inner: dispatcher(&log, always_ok()),
            },
        )
        .retry(fast_retry(3)),
    );
    eventually("the other aggregates are delivered", WAIT, || async {
        log.len() == 18
    })
    .await;
    eventually("the panicking event is dead", WAIT, || async {
        DB::count_status(&outbox, "dead").await == 1
    })
    .await;
    // Its aggregate's next event follows (dead letters do not block by default).
    eventually("the event after it is delivered", WAIT, || async {
        log.len() == 19
    })
    .await;
    relay.stop().await;
    DB::drop_tables(&outbox).await;
}

/// A destination that panics whenever a batch holds the first event of `aggregate`.
struct PanicsOn {
    aggregate: &'static str,
    inner: outbox::Dispatcher,
}

impl outbox::Destination for PanicsOn {
    async fn deliver(&self, batch: &[outbox::Envelope]) -> Vec<outbox::DeliveryResult> {
        if batch
            .iter()
            .any(|e| e.aggregate_id == self.aggregate && e.sequence == 1)
        {
            panic!("the destination cannot take {}", self.aggregate);
        }
        outbox::Destination::deliver(&self.inner, batch).await
    }
}

/// A delivery that outlives the lease is abandoned before the lease ends: the relay that
/// takes the aggregate over is never overtaken by the stale delivery (no E1 after E2).
pub async fn a_delivery_that_outlives_its_lease_is_abandoned<DB: TestDb>() {
    init_tracing();
    let outbox = DB::fresh().await;
    enqueue_backlog(&outbox, 1, 3).await;
    let log = Log::default();
    let stalls = Arc::new(AtomicU32::new(0));
    // The first attempt at the first event stalls for longer than the lease, then "publishes".
    let slow = {
        let log = log.clone();
        let stalls = stalls.clone();
        let registry = outbox::Registry::builder()
            .handler::<ItemChanged, _, _>("slow", move |event: ItemChanged, ctx| {
                let (log, stalls) = (log.clone(), stalls.clone());
                async move {
                    if event.n == 1 && stalls.fetch_add(1, Ordering::SeqCst) == 0 {
                        tokio::time::sleep(Duration::from_secs(3)).await;
                    }
                    log.push(event, &ctx);
                    Ok::<_, HandlerError>(())
                }
            })
            .unwrap()
            .build();
        outbox::Dispatcher::new(registry)
    };
    let first = RunningRelay::start(
        quick_relay(outbox.clone(), slow.clone()).lease(Duration::from_secs(1)),
    );
    let second =
        RunningRelay::start(quick_relay(outbox.clone(), slow).lease(Duration::from_secs(1)));
    eventually("all three events are delivered", WAIT, || async {
        log.len() >= 3
    })
    .await;
    // Longer than the stall: a stale delivery would have arrived by now.
    tokio::time::sleep(Duration::from_secs(4)).await;
    first.stop().await;
    second.stop().await;
    let seen: Vec<u64> = log.snapshot().iter().map(|h| h.event.n).collect();
    assert_eq!(
        seen,
        [1, 2, 3],
        "a stale delivery overtook the new lease holder"
    );
    DB::drop_tables(&outbox).await;
}

/// The payload reaches the destination byte for byte as serde wrote it.
pub async fn payload_is_delivered_byte_for_byte<DB: TestDb>() {
    init_tracing();
    let outbox = DB::fresh().await;
    let event = item(7, 42);
    let written = serde_json::to_string(&event).unwrap();
    let mut tx = outbox.pool().begin().await.unwrap();
    outbox.enqueue(&mut *tx, &event).await.unwrap();
    tx.commit().await.unwrap();
    let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
    let relay = RunningRelay::start(quick_relay(outbox.clone(), Recording(seen.clone())));
    eventually("the event is delivered", WAIT, || async {
        !seen.lock().unwrap().is_empty()
    })
    .await;
    relay.stop().await;
    assert_eq!(seen.lock().unwrap()[0], written);
    DB::drop_tables(&outbox).await;
}

struct Recording(Arc<std::sync::Mutex<Vec<String>>>);

impl outbox::Destination for Recording {
    async fn deliver(&self, batch: &[outbox::Envelope]) -> Vec<outbox::DeliveryResult> {
        let mut seen = self.0.lock().unwrap();
        batch
            .iter()
            .map(|e| {
                seen.push(e.payload.clone());
                Ok(())
            })
            .collect()
    }
}

/// Concurrent requeues of dead events of one aggregate never strand it: its later events are
/// still delivered, and the consistency check finds nothing.
pub async fn concurrent_requeues_never_strand_an_aggregate<DB: TestDb>() {
    init_tracing();
    let outbox = DB::fresh().await;
    const AGGREGATES: usize = 40;
    enqueue_backlog(&outbox, AGGREGATES, 2).await;
    let fail = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let log = Log::default();
    let behaviour: crate::Behaviour = {
        let fail = fail.clone();
        Arc::new(move |_, _| {
            if fail.load(Ordering::SeqCst) {
                Err(HandlerError::fatal("down"))
            } else {
                Ok(())
            }
        })
    };
    let relay = RunningRelay::start(quick_relay(outbox.clone(), dispatcher(&log, behaviour)));
    eventually("every event is dead", WAIT, || async {
        DB::count_status(&outbox, "dead").await == 2 * AGGREGATES as i64
    })
    .await;
    relay.stop().await;
    fail.store(false, Ordering::SeqCst);
    let ids: Vec<(String, uuid::Uuid)> = dead_ids(&outbox).await;
    // Both dead events of every aggregate requeued at the same time.
    let requeues = ids.iter().map(|(_, id)| {
        let outbox = outbox.clone();
        let id = *id;
        tokio::spawn(async move { outbox.requeue(id).await.unwrap() })
    });
    for requeued in futures_util::future::join_all(requeues).await {
        assert!(requeued.unwrap());
    }
    enqueue_backlog_from(&outbox, AGGREGATES, 3).await;
    assert!(outbox.check().await.unwrap().is_empty());
    let relay = RunningRelay::start(quick_relay(outbox.clone(), dispatcher(&log, always_ok())));
    eventually(
        "every aggregate delivered all three events",
        WAIT,
        || async { log.len() == 3 * AGGREGATES },
    )
    .await;
    relay.stop().await;
    assert_ordered_exactly_once(&log, AGGREGATES, 3);
    assert!(outbox.check().await.unwrap().is_empty());
    DB::drop_tables(&outbox).await;
}

/// `ItemChanged { n }` for every aggregate, with `n` its third event.
async fn enqueue_backlog_from<DB: TestDb>(outbox: &Outbox<DB>, aggregates: usize, n: u64) {
    let events: Vec<ItemChanged> = (0..aggregates).map(|a| item(a, n)).collect();
    let mut tx = outbox.pool().begin().await.unwrap();
    outbox.enqueue_batch(&mut *tx, &events).await.unwrap();
    tx.commit().await.unwrap();
}

async fn dead_ids<DB: TestDb>(outbox: &Outbox<DB>) -> Vec<(String, uuid::Uuid)> {
    DB::dead_events(outbox).await
}

/// With `DeadLetters::Park` an aggregate stops at its dead event, keeping its order:
/// `requeue` delivers the dead event and then the rest, `discard` releases the rest.
pub async fn parked_aggregates_keep_their_order<DB: TestDb>() {
    init_tracing();
    let outbox = DB::fresh().await;
    enqueue_backlog(&outbox, 3, 3).await;
    let broken = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let log = Log::default();
    let behaviour: crate::Behaviour = {
        let broken = broken.clone();
        Arc::new(move |event, _| {
            let poison = event.n == 1 && event.item != "item-0";
            if poison && broken.load(Ordering::SeqCst) {
                Err(HandlerError::fatal("cannot apply"))
            } else {
                Ok(())
            }
        })
    };
    let relay = RunningRelay::start(
        quick_relay(outbox.clone(), dispatcher(&log, behaviour))
            .dead_letters(outbox::DeadLetters::Park),
    );
    eventually("the healthy aggregate is delivered", WAIT, || async {
        log.len() == 3
    })
    .await;
    eventually("both poison events are dead", WAIT, || async {
        DB::count_status(&outbox, "dead").await == 2
    })
    .await;
    // Parked: their later events stay pending however long the relay runs.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(DB::count_status(&outbox, "pending").await, 4);
    assert!(outbox.check().await.unwrap().is_empty());
    let dead = DB::dead_events(&outbox).await;
    let id_of = |item: &str| dead.iter().find(|(a, _)| a == item).unwrap().1;

    // item-1: fixed and requeued, delivered in order. item-2: discarded, the rest follows.
    broken.store(false, Ordering::SeqCst);
    assert!(outbox.requeue(id_of("item-1")).await.unwrap());
    assert!(outbox.discard(id_of("item-2")).await.unwrap());
    assert!(
        !outbox.discard(id_of("item-2")).await.unwrap(),
        "released once"
    );
    eventually("the parked aggregates move on", WAIT, || async {
        log.len() == 8
    })
    .await;
    relay.stop().await;
    let seen = |item: &str| -> Vec<u64> {
        log.snapshot()
            .iter()
            .filter(|h| h.event.item == item)
            .map(|h| h.event.n)
            .collect()
    };
    assert_eq!(seen("item-1"), [1, 2, 3]);
    assert_eq!(seen("item-2"), [2, 3]);
    assert_eq!(
        outbox.get(id_of("item-2")).await.unwrap().unwrap().status,
        EventStatus::Dead
    );
    assert!(outbox.check().await.unwrap().is_empty());
    DB::drop_tables(&outbox).await;
}

/// An idempotency key enqueues its event once: a retried request (another transaction, or the
/// same one) gets the first event's id and writes nothing; a rolled-back enqueue frees the key;
/// the duplicate takes no sequence number. The relay delivers the one event.
pub async fn idempotency_key_enqueues_once<DB: TestDb>() {
    init_tracing();
    let outbox = DB::fresh().await;

    let mut tx = outbox.pool().begin().await.unwrap();
    let rolled_back = outbox
        .enqueue_once(&mut *tx, &item(1, 1), "request-1")
        .await
        .unwrap();
    assert!(rolled_back.is_new());
    tx.rollback().await.unwrap();

    let mut tx = outbox.pool().begin().await.unwrap();
    let first = outbox
        .enqueue_once(&mut *tx, &item(1, 1), "request-1")
        .await
        .unwrap();
    assert!(first.is_new(), "a rolled-back enqueue must free its key");
    assert_ne!(first.id(), rolled_back.id());
    let again = outbox
        .enqueue_once(&mut *tx, &item(1, 1), "request-1")
        .await
        .unwrap();
    assert_eq!(again, outbox::Enqueued::Duplicate(first.id()));
    tx.commit().await.unwrap();

    let mut tx = outbox.pool().begin().await.unwrap();
    let retried = outbox
        .enqueue_with(
            &mut *tx,
            &item(1, 1),
            EnqueueOptions::new().idempotency_key("request-1"),
        )
        .await
        .unwrap();
    assert_eq!(
        retried,
        first.id(),
        "enqueue_with gives the first event's id"
    );
    let other = outbox
        .enqueue_once(&mut *tx, &item(1, 2), "request-2")
        .await
        .unwrap();
    assert!(other.is_new());
    tx.commit().await.unwrap();

    assert_eq!(DB::count_outbox_rows(&outbox).await, 2);
    let second = outbox.get(other.id()).await.unwrap().unwrap();
    assert_eq!(second.sequence, 2, "duplicates take no sequence number");

    let bad = outbox
        .enqueue_once(
            &mut *outbox.pool().acquire().await.unwrap(),
            &item(1, 3),
            "line\nbreak",
        )
        .await
        .unwrap_err();
    assert!(
        matches!(&bad, outbox::Error::InvalidField { field, .. } if field == "idempotency key"),
        "{bad}"
    );

    let log = Log::default();
    let relay = RunningRelay::start(quick_relay(outbox.clone(), dispatcher(&log, always_ok())));
    eventually("both events handled", WAIT, || async { log.len() == 2 }).await;
    relay.stop().await;
    let ids: Vec<_> = log.snapshot().iter().map(|h| h.event_id).collect();
    assert_eq!(ids, vec![first.id(), other.id()]);

    // Retention forgets keys with the delivered rows.
    let removed = outbox
        .purge(&Retention::delete_after(Duration::ZERO))
        .await
        .unwrap();
    assert_eq!(removed, 2);
    let mut tx = outbox.pool().begin().await.unwrap();
    let after_retention = outbox
        .enqueue_once(&mut *tx, &item(1, 1), "request-1")
        .await
        .unwrap();
    tx.commit().await.unwrap();
    assert!(after_retention.is_new());
    DB::drop_tables(&outbox).await;
}

/// Two transactions enqueue one key at once: the second waits for the first; it finds the
/// first's event if that committed, and writes its own if that rolled back.
pub async fn concurrent_idempotency_keys<DB: TestDb>() {
    init_tracing();
    let outbox = DB::fresh().await;
    for commit_first in [true, false] {
        let key = format!("concurrent-{commit_first}");
        let mut first_tx = outbox.pool().begin().await.unwrap();
        let first = outbox
            .enqueue_once(&mut *first_tx, &item(7, 1), key.clone())
            .await
            .unwrap();
        assert!(first.is_new());
        let second = tokio::spawn({
            let outbox = outbox.clone();
            let key = key.clone();
            async move {
                let mut tx = outbox.pool().begin().await.unwrap();
                let second = outbox
                    .enqueue_once(&mut *tx, &item(7, 2), key)
                    .await
                    .unwrap();
                tx.commit().await.unwrap();
                second
            }
        });
        // The second is held by the first's uncommitted key (a negative condition: give it
        // time to go wrong).
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(!second.is_finished(), "the second enqueue did not wait");
        if commit_first {
            first_tx.commit().await.unwrap();
        } else {
            first_tx.rollback().await.unwrap();
        }
        let second = tokio::time::timeout(WAIT, second).await.unwrap().unwrap();
        if commit_first {
            assert_eq!(second, outbox::Enqueued::Duplicate(first.id()));
        } else {
            assert!(second.is_new(), "{second:?}");
            assert!(outbox.get(second.id()).await.unwrap().is_some());
        }
    }
    assert_eq!(DB::count_outbox_rows(&outbox).await, 2);
    DB::drop_tables(&outbox).await;
}

/// `republish` puts delivered events back, archived ones included, and the relay delivers each
/// aggregate again from its earliest republished event, in order; a dry run counts and changes
/// nothing; filters narrow; a filter without conditions is refused.
pub async fn republish_delivers_again_in_order<DB: TestDb>() {
    init_tracing();
    let outbox = DB::fresh().await;
    let log = Log::default();
    let enqueue = |events: Vec<ItemChanged>| {
        let outbox = outbox.clone();
        async move {
            let mut tx = outbox.pool().begin().await.unwrap();
            let ids = outbox.enqueue_batch(&mut *tx, &events).await.unwrap();
            tx.commit().await.unwrap();
            ids
        }
    };
    let deliver_until = |n: usize| {
        let (outbox, log) = (outbox.clone(), log.clone());
        async move {
            let relay = RunningRelay::start(quick_relay(outbox, dispatcher(&log, always_ok())));
            eventually(&format!("{n} handled"), WAIT, || async { log.len() == n }).await;
            relay.stop().await;
        }
    };

    // a: 1..3 and b: 1, delivered and archived; then a: 4 and c: 1, delivered.
    let first = enqueue(vec![item(1, 1), item(1, 2), item(1, 3), item(2, 1)]).await;
    deliver_until(4).await;
    let archived = outbox
        .purge(&Retention::archive_after(Duration::ZERO))
        .await
        .unwrap();
    assert_eq!(archived, 4);
    assert_eq!(DB::count_archived(&outbox).await, 4);
    tokio::time::sleep(Duration::from_millis(5)).await; // a creation-time boundary
    let boundary = chrono::Utc::now();
    let later = enqueue(vec![item(1, 4), item(3, 1)]).await;
    deliver_until(6).await;

    let a = outbox::EventFilter::new().aggregate("item", "item-1");
    assert_eq!(outbox.republish_dry_run(&a).await.unwrap(), 4);
    assert_eq!(
        DB::count_archived(&outbox).await,
        4,
        "a dry run changes nothing"
    );
    assert_eq!(DB::count_status(&outbox, "pending").await, 0);

    assert_eq!(outbox.republish(&a).await.unwrap(), 4);
    assert_eq!(DB::count_archived(&outbox).await, 1, "b stays archived");
    deliver_until(10).await;
    let again: Vec<u64> = log.snapshot()[6..].iter().map(|h| h.event.n).collect();
    assert_eq!(again, vec![1, 2, 3, 4], "aggregate a again, in order");
    assert!(log.snapshot()[6..].iter().all(|h| h.event.item == "item-1"));

    // By id (an archived one), and by event type and creation time.
    let by_id = outbox::EventFilter::new().id(first[3]);
    assert_eq!(outbox.republish(&by_id).await.unwrap(), 1);
    deliver_until(11).await;
    assert_eq!(log.snapshot()[10].event_id, first[3]);
    let recent = outbox::EventFilter::new()
        .event_type("test.item_changed")
        .created_between(boundary, chrono::Utc::now() + chrono::Duration::seconds(1));
    assert_eq!(outbox.republish_dry_run(&recent).await.unwrap(), 2);
    assert_eq!(outbox.republish(&recent).await.unwrap(), 2);
    deliver_until(13).await;
    let recent_ids: HashSet<_> = log.snapshot()[11..].iter().map(|h| h.event_id).collect();
    assert_eq!(recent_ids, later.iter().copied().collect::<HashSet<_>>());

    // Pending events are not "delivered": nothing to republish while they wait.
    let pending = enqueue(vec![item(4, 1)]).await;
    assert_eq!(
        outbox
            .republish(&outbox::EventFilter::new().id(pending[0]))
            .await
            .unwrap(),
        0
    );
    let refused = outbox
        .republish(&outbox::EventFilter::new())
        .await
        .unwrap_err();
    assert!(
        matches!(&refused, outbox::Error::InvalidField { field, .. } if field == "event filter"),
        "{refused}"
    );
    assert!(outbox.check().await.unwrap().is_empty());
    DB::drop_tables(&outbox).await;
}

/// Two writers enqueueing batches for the same aggregates in opposite orders at once: both
/// commit every batch, with no deadlock (each batch takes its aggregates' counters in one
/// order, whatever the order of its events).
/// (Not on SQLite: one writer at a time there.)
pub async fn batches_sharing_aggregates_in_opposite_orders_do_not_deadlock<DB: TestDb>() {
    init_tracing();
    let outbox = DB::fresh().await;
    let names: Vec<String> = (0..10).map(|i| format!("shared-{i}")).collect();
    let writers = [false, true].map(|reversed| {
        let (outbox, mut names) = (outbox.clone(), names.clone());
        if reversed {
            names.reverse();
        }
        tokio::spawn(async move {
            for round in 0..30u64 {
                let events: Vec<ItemChanged> = names
                    .iter()
                    .map(|a| ItemChanged {
                        item: a.clone(),
                        n: round,
                    })
                    .collect();
                let mut tx = outbox.pool().begin().await?;
                outbox.enqueue_batch(&mut *tx, &events).await?;
                // Holds the counters a little, as a business transaction would.
                tokio::task::yield_now().await;
                tx.commit().await?;
            }
            Ok::<_, outbox::Error>(())
        })
    });
    for writer in writers {
        writer.await.unwrap().expect("a batch failed (deadlock?)");
    }
    assert_eq!(DB::count_outbox_rows(&outbox).await, 600);
    DB::drop_tables(&outbox).await;
}
