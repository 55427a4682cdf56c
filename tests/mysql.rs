//! The shared scenarios on MySQL / MariaDB (`OUTBOX_TEST_MYSQL_URL`, by default the
//! development machine's MariaDB: root, no password, database `test`), and what only this store
//! has to prove: InnoDB's locks never make a writer wait on a relay or a relay on a writer, long
//! aggregate ids, the due index.

use outbox::{EventStatus, HandlerError, Relay};
use outbox_tests::{
    always_ok, dispatcher, eventually, init_tracing, scenarios, Bulky, ItemChanged, Log,
    RunningRelay, TestDb,
};
use sqlx::MySql;
use std::sync::Arc;
use std::time::Duration;

const WAIT: Duration = Duration::from_secs(60);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commit_and_rollback() {
    scenarios::commit_and_rollback::<MySql>().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relays_share_work_in_order() {
    scenarios::relays_share_work_in_order::<MySql>(2, 20, 50).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crashed_relay_is_taken_over() {
    scenarios::crashed_relay_is_taken_over::<MySql>().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failures_retry_then_dead() {
    scenarios::failures_retry_then_dead::<MySql>().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fatal_error_is_dead_at_once() {
    scenarios::fatal_error_is_dead_at_once::<MySql>().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deferred_delivery() {
    scenarios::deferred_delivery::<MySql>().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_type_and_bad_payload_go_dead() {
    scenarios::unknown_type_and_bad_payload_go_dead::<MySql>().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn panicking_handler_is_contained() {
    scenarios::panicking_handler_is_contained::<MySql>().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batch_enqueue_allocates_consecutive_sequences() {
    scenarios::batch_enqueue_allocates_consecutive_sequences::<MySql>().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_shutdown_finishes_in_flight_work() {
    scenarios::graceful_shutdown_finishes_in_flight_work::<MySql>().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retention_removes_only_delivered_rows() {
    scenarios::retention_removes_only_delivered_rows::<MySql>().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inbox_processes_each_message_once() {
    scenarios::inbox_processes_each_message_once::<MySql>().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relay_runs_retention() {
    scenarios::relay_runs_retention::<MySql>().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hot_aggregate_is_delivered_in_order() {
    scenarios::hot_aggregate_is_delivered_in_order::<MySql>().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_cut_by_a_failure_is_retried_in_order() {
    scenarios::a_run_cut_by_a_failure_is_retried_in_order::<MySql>().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_failures_affect_only_their_own_event() {
    scenarios::bad_failures_affect_only_their_own_event::<MySql>().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicking_destination_affects_only_its_run() {
    scenarios::a_panicking_destination_affects_only_its_run::<MySql>().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delivery_that_outlives_its_lease_is_abandoned() {
    scenarios::a_delivery_that_outlives_its_lease_is_abandoned::<MySql>().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn payload_is_delivered_byte_for_byte() {
    scenarios::payload_is_delivered_byte_for_byte::<MySql>().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_requeues_never_strand_an_aggregate() {
    scenarios::concurrent_requeues_never_strand_an_aggregate::<MySql>().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parked_aggregates_keep_their_order() {
    scenarios::parked_aggregates_keep_their_order::<MySql>().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idempotency_key_enqueues_once() {
    scenarios::idempotency_key_enqueues_once::<MySql>().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_idempotency_keys() {
    scenarios::concurrent_idempotency_keys::<MySql>().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn republish_delivers_again_in_order() {
    scenarios::republish_delivers_again_in_order::<MySql>().await;
}

fn item(aggregate: &str, n: u64) -> ItemChanged {
    ItemChanged {
        item: aggregate.to_owned(),
        n,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn claim_uses_the_due_index() {
    let outbox = MySql::fresh().await;
    let plan = outbox.explain_claim(100).await.unwrap();
    assert!(plan.contains("_cursors_due"), "{plan}");
    MySql::drop_tables(&outbox).await;
}

/// An application transaction that stays open with an enqueued event (its rows locked) holds
/// back neither the relay nor the other aggregates; its event follows once it commits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_open_application_transaction_holds_back_nothing_else() {
    init_tracing();
    let outbox = MySql::fresh().await;
    let mut held = outbox.pool().begin().await.unwrap();
    MySql::insert_business_row(&outbox, &mut *held, "held").await;
    let held_id = outbox.enqueue(&mut *held, &item("busy", 1)).await.unwrap();

    let log = Log::default();
    let relay = RunningRelay::start(
        Relay::builder(outbox.clone(), dispatcher(&log, always_ok()))
            .poll_interval(Duration::from_millis(20)),
    );
    for n in 1..=20 {
        let mut tx = outbox.pool().begin().await.unwrap();
        outbox
            .enqueue(&mut *tx, &item(&format!("free-{}", n % 5), n))
            .await
            .unwrap();
        tx.commit().await.unwrap();
    }
    // The busy aggregate gets a second event from another writer, which must wait for the
    // first (the counter row's lock) and so commits after it.
    let second = {
        let outbox = outbox.clone();
        tokio::spawn(async move {
            let mut tx = outbox.pool().begin().await.unwrap();
            let id = outbox.enqueue(&mut *tx, &item("busy", 2)).await.unwrap();
            tx.commit().await.unwrap();
            id
        })
    };
    eventually("the other aggregates are delivered", WAIT, || async {
        log.len() == 20
    })
    .await;
    assert!(!second.is_finished(), "the second writer did not wait");
    held.commit().await.unwrap();
    let second_id = second.await.unwrap();
    eventually("the held events follow, in order", WAIT, || async {
        log.len() == 22
    })
    .await;
    relay.stop().await;
    let order: Vec<_> = log
        .snapshot()
        .iter()
        .filter(|h| h.event_id == held_id || h.event_id == second_id)
        .map(|h| h.event_id)
        .collect();
    assert_eq!(order, [held_id, second_id]);
    let first = outbox.get(held_id).await.unwrap().unwrap();
    let next = outbox.get(second_id).await.unwrap().unwrap();
    assert_eq!((first.sequence, next.sequence), (1, 2));
    MySql::drop_tables(&outbox).await;
}

/// Operator actions (republish, purge, status, check) while an application transaction is open
/// with an uncommitted event of the same aggregate: none waits on it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operator_actions_do_not_wait_on_an_open_application_transaction() {
    init_tracing();
    let outbox = MySql::fresh().await;
    let mut tx = outbox.pool().begin().await.unwrap();
    for n in 1..=3 {
        outbox.enqueue(&mut *tx, &item("a", n)).await.unwrap();
    }
    tx.commit().await.unwrap();
    let log = Log::default();
    let relay = RunningRelay::start(
        Relay::builder(outbox.clone(), dispatcher(&log, always_ok()))
            .poll_interval(Duration::from_millis(20)),
    );
    eventually("three events delivered", WAIT, || async {
        MySql::count_status(&outbox, "delivered").await == 3
    })
    .await;
    relay.stop().await;

    let mut held = outbox.pool().begin().await.unwrap();
    outbox.enqueue(&mut *held, &item("a", 4)).await.unwrap();
    let since_2000 =
        outbox::EventFilter::new().created_from("2000-01-01T00:00:00Z".parse().unwrap());
    let actions = async {
        let republished = outbox.republish(&since_2000).await.unwrap();
        outbox.status(Duration::from_secs(60)).await.unwrap();
        outbox.check().await.unwrap();
        let purged = outbox
            .purge(&outbox::Retention::delete_after(Duration::ZERO))
            .await
            .unwrap();
        (republished, purged)
    };
    let done = tokio::time::timeout(Duration::from_secs(10), actions).await;
    held.rollback().await.unwrap();
    let (republished, purged) = done.expect("an operator action waited on the application");
    // Republished events are pending again, so retention leaves them.
    assert_eq!((republished, purged), (3, 0));
    MySql::drop_tables(&outbox).await;
}

/// Eight writers committing while two relays drain: InnoDB's locks give no writer a deadlock
/// or a lock wait timeout, and every event arrives once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eight_writers_and_two_relays() {
    init_tracing();
    let outbox = MySql::fresh().await;
    let log = Log::default();
    let relays: Vec<RunningRelay> = (0..2)
        .map(|_| {
            RunningRelay::start(
                Relay::builder(outbox.clone(), dispatcher(&log, always_ok()))
                    .poll_interval(Duration::from_millis(10)),
            )
        })
        .collect();
    let writers = (0..8).map(|w| {
        let outbox = outbox.clone();
        tokio::spawn(async move {
            for n in 1..=75u64 {
                let mut tx = outbox.pool().begin().await?;
                MySql::insert_business_row(&outbox, &mut *tx, &format!("w{w}-{n}")).await;
                outbox
                    .enqueue(&mut *tx, &item(&format!("item-{}", n % 10), n))
                    .await
                    .map_err(|e| sqlx::Error::Protocol(e.to_string()))?;
                tx.commit().await?;
            }
            Ok::<_, sqlx::Error>(())
        })
    });
    for writer in futures_util::future::join_all(writers).await {
        writer.unwrap().expect("no writer transaction fails");
    }
    eventually("every event is delivered", WAIT, || async {
        log.len() == 600
    })
    .await;
    for relay in relays {
        relay.stop().await;
    }
    let handled = log.snapshot();
    let distinct: std::collections::HashSet<_> = handled.iter().map(|h| h.event_id).collect();
    assert_eq!(distinct.len(), 600, "no event twice in steady state");
    // Per aggregate, sequences arrive in order.
    let mut last: std::collections::HashMap<String, i64> = Default::default();
    for h in &handled {
        let row = outbox.get(h.event_id).await.unwrap().unwrap();
        let previous = last.insert(row.aggregate_id.clone(), row.sequence);
        assert!(previous.is_none_or(|p| p < row.sequence), "{row:?}");
    }
    assert!(outbox.check().await.unwrap().is_empty());
    MySql::drop_tables(&outbox).await;
}

/// Aggregate ids up to the 1 KiB the outbox accepts, compared byte for byte (case matters), and
/// text that is not ASCII.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn long_and_case_sensitive_aggregate_ids() {
    init_tracing();
    let outbox = MySql::fresh().await;
    let long = "é".repeat(512);
    assert_eq!(long.len(), 1024);
    let mut tx = outbox.pool().begin().await.unwrap();
    let ids = outbox
        .enqueue_batch(
            &mut *tx,
            &[
                item(&long, 1),
                item("Cart", 1),
                item("cart", 1),
                item(&long, 2),
            ],
        )
        .await
        .unwrap();
    tx.commit().await.unwrap();
    let rows = futures_util::future::join_all(ids.iter().map(|id| outbox.get(*id))).await;
    let sequences: Vec<i64> = rows
        .into_iter()
        .map(|r| r.unwrap().unwrap().sequence)
        .collect();
    assert_eq!(sequences, [1, 1, 1, 2]);
    let log = Log::default();
    let relay = RunningRelay::start(
        Relay::builder(outbox.clone(), dispatcher(&log, always_ok()))
            .poll_interval(Duration::from_millis(20)),
    );
    eventually("all four are delivered", WAIT, || async { log.len() == 4 }).await;
    relay.stop().await;
    let row = outbox.get(ids[3]).await.unwrap().unwrap();
    assert_eq!(row.aggregate_id, long);
    assert_eq!(row.status, EventStatus::Delivered);
    MySql::drop_tables(&outbox).await;
}

/// What an operator reads works here too: status, the dead events with the history of their
/// failed attempts, their group.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inspection_and_failure_history() {
    init_tracing();
    let outbox = MySql::fresh().await;
    let mut tx = outbox.pool().begin().await.unwrap();
    let doomed = outbox.enqueue(&mut *tx, &item("doomed", 1)).await.unwrap();
    outbox.enqueue(&mut *tx, &item("fine", 1)).await.unwrap();
    tx.commit().await.unwrap();
    let log = Log::default();
    let behaviour: outbox_tests::Behaviour = Arc::new(|event, ctx| match event.item.as_str() {
        "doomed" => Err(HandlerError::retry(format!(
            "gateway said 503 on try {}",
            ctx.attempt()
        ))),
        _ => Ok(()),
    });
    let relay = RunningRelay::start(
        Relay::builder(outbox.clone(), dispatcher(&log, behaviour))
            .poll_interval(Duration::from_millis(20))
            .retry(
                outbox::RetryPolicy::exponential(Duration::from_millis(20))
                    .max_delay(Duration::from_millis(50))
                    .max_attempts(3),
            ),
    );
    eventually("the doomed event is dead", WAIT, || async {
        outbox.get(doomed).await.unwrap().unwrap().status == EventStatus::Dead
    })
    .await;
    relay.stop().await;
    let record = outbox.get(doomed).await.unwrap().unwrap();
    let attempts: Vec<(u32, bool)> = record
        .failures
        .iter()
        .map(|f| (f.attempt, f.dead))
        .collect();
    assert_eq!(attempts, [(1, false), (2, false), (3, true)]);
    assert_eq!(record.failures[2].reason, "gateway said 503 on try 3");
    let status = outbox.status(Duration::from_secs(3600)).await.unwrap();
    assert_eq!((status.pending, status.delivered, status.dead), (0, 1, 1));
    let dead = outbox
        .dead(&outbox::EventFilter::new().reason("GATEWAY"), 10)
        .await
        .unwrap();
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].id, doomed);
    let groups = outbox
        .dead_groups(&outbox::EventFilter::new().event_type("test.item_changed"))
        .await
        .unwrap();
    assert_eq!(groups.len(), 1);
    assert_eq!(groups[0].count, 1);
    MySql::drop_tables(&outbox).await;
}

/// A batch of 1,234 events over three interleaved aggregates, two of them with idempotency
/// keys (one key repeated inside the batch): written in several multi-row statements, numbered
/// per aggregate in the order given, the repeated key's second event not written, and
/// delivered in that order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_batch_is_numbered_in_order_per_aggregate() {
    init_tracing();
    let outbox = MySql::fresh().await;
    let mut messages = Vec::new();
    for n in 0..1234u64 {
        let event = item(["a", "b", "c"][(n % 3) as usize], n);
        let options = match n {
            7 | 700 => outbox::EnqueueOptions::default().idempotency_key("same-request"),
            _ => outbox::EnqueueOptions::default(),
        };
        messages.push(outbox::Message::with_options(&event, options).unwrap());
    }
    let mut tx = outbox.pool().begin().await.unwrap();
    let outcomes = outbox.enqueue_messages(&mut *tx, &messages).await.unwrap();
    tx.commit().await.unwrap();
    assert_eq!(outcomes[700], outbox::Enqueued::Duplicate(messages[7].id()));
    assert_eq!(outcomes.iter().filter(|o| o.is_new()).count(), 1233);
    assert_eq!(MySql::count_outbox_rows(&outbox).await, 1233);
    // Sequence numbers 1, 2, 3, ... per aggregate, in the order of the batch.
    let mut expected = std::collections::HashMap::new();
    for (n, m) in messages.iter().enumerate().filter(|(n, _)| *n != 700) {
        let next = expected.entry(n % 3).or_insert(0i64);
        *next += 1;
        if n % 97 == 0 || n > 1200 {
            let row = outbox.get(m.id()).await.unwrap().expect("written");
            assert_eq!(row.sequence, *next, "event {n}");
        }
    }
    let log = Log::default();
    let relay = RunningRelay::start(
        Relay::builder(outbox.clone(), dispatcher(&log, always_ok()))
            .poll_interval(Duration::from_millis(20)),
    );
    eventually("every event is delivered", WAIT, || async {
        log.len() == 1233
    })
    .await;
    relay.stop().await;
    let mut seen: std::collections::HashMap<String, Vec<u64>> = Default::default();
    for handled in log.snapshot() {
        seen.entry(handled.event.item.clone())
            .or_default()
            .push(handled.event.n);
    }
    for (aggregate, ns) in seen {
        assert!(
            ns.windows(2).all(|w| w[0] < w[1]),
            "{aggregate} out of order"
        );
    }
    MySql::drop_tables(&outbox).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batches_sharing_aggregates_in_opposite_orders_do_not_deadlock() {
    scenarios::batches_sharing_aggregates_in_opposite_orders_do_not_deadlock::<MySql>().await;
}

/// A batch larger than the server takes in one packet (MariaDB's `max_allowed_packet` is
/// 16 MiB by default): 60 events of 300 KB go in several statements, and all are written.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_larger_than_one_packet_is_written() {
    init_tracing();
    let outbox = MySql::fresh().await;
    let packet: u64 = sqlx::query_scalar("SELECT @@max_allowed_packet")
        .fetch_one(outbox.pool())
        .await
        .unwrap();
    let events: Vec<Bulky> = (0..60)
        .map(|i| Bulky {
            item: format!("bulky-{}", i % 4),
            pad: "x".repeat(300_000),
        })
        .collect();
    assert!(
        60 * 300_000 > packet,
        "the batch must exceed one packet ({packet} B)"
    );
    let mut tx = outbox.pool().begin().await.unwrap();
    let ids = outbox.enqueue_batch(&mut *tx, &events).await.unwrap();
    tx.commit().await.unwrap();
    assert_eq!(ids.len(), 60);
    assert_eq!(MySql::count_outbox_rows(&outbox).await, 60);
    MySql::drop_tables(&outbox).await;
}
