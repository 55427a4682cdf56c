//! The partitioned layout (`TableLayout::Partitioned`) on PostgreSQL: every shared scenario on
//! a partitioned table, and what partitions add. Events go to the partition of their period;
//! retention truncates a delivered partition, moves its stragglers out first and frees its
//! space while a snapshot is held open; it never waits on an application's open transaction;
//! and relays deliver every event once and in order while partitions are truncated under them.

use outbox::{EventStatus, HandlerError, Outbox, Relay, Retention, TableLayout, TailMode};
use outbox_tests::partitioned::{current_partition, item, ring};
use outbox_tests::{
    always_ok, dispatcher, eventually, init_tracing, pg_pool, scenarios, sqlite_pool, unique_table,
    use_pg_layout, ItemChanged, Log, RunningRelay, TestDb,
};
use sqlx::{Postgres, Row};
use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

const WAIT: Duration = Duration::from_secs(60);

/// The scenarios' ring: hour-long partitions, so a scenario's rows share one.
fn scenario_ring() -> TableLayout {
    TableLayout::partitioned(Duration::from_secs(3600), 4)
}

macro_rules! scenario {
    ($name:ident $(, $arg:expr)*) => {
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn $name() {
            use_pg_layout(scenario_ring());
            scenarios::$name::<Postgres>($($arg),*).await;
        }
    };
}

scenario!(commit_and_rollback);
scenario!(relays_share_work_in_order, 4, 50, 50);
scenario!(crashed_relay_is_taken_over);
scenario!(failures_retry_then_dead);
scenario!(fatal_error_is_dead_at_once);
scenario!(deferred_delivery);
scenario!(unknown_type_and_bad_payload_go_dead);
scenario!(panicking_handler_is_contained);
scenario!(batch_enqueue_allocates_consecutive_sequences);
scenario!(graceful_shutdown_finishes_in_flight_work);
scenario!(retention_removes_only_delivered_rows);
scenario!(relay_runs_retention);
scenario!(hot_aggregate_is_delivered_in_order);
scenario!(a_run_cut_by_a_failure_is_retried_in_order);
scenario!(bad_failures_affect_only_their_own_event);
scenario!(a_panicking_destination_affects_only_its_run);
scenario!(a_delivery_that_outlives_its_lease_is_abandoned);
scenario!(payload_is_delivered_byte_for_byte);
scenario!(concurrent_requeues_never_strand_an_aggregate);
scenario!(parked_aggregates_keep_their_order);
scenario!(idempotency_key_enqueues_once);
scenario!(concurrent_idempotency_keys);
scenario!(republish_delivers_again_in_order);
scenario!(batches_sharing_aggregates_in_opposite_orders_do_not_deadlock);

/// Where an event's row is: its `part` and the partition that holds it.
async fn placement(outbox: &Outbox<Postgres>, id: uuid::Uuid) -> (i16, String) {
    let row = sqlx::query(&format!(
        "SELECT part, tableoid::regclass::text AS partition FROM {} WHERE id = $1",
        outbox.table()
    ))
    .bind(id)
    .fetch_one(outbox.pool())
    .await
    .unwrap();
    (row.get("part"), row.get("partition"))
}

/// `migrate` creates the ring, and each event goes to the partition of its transaction's
/// period: over a few seconds of writes, every partition takes its turn.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_go_to_the_partition_of_their_period() {
    init_tracing();
    let outbox = ring(Duration::from_secs(1), 3).await;
    outbox.migrate().await.unwrap();
    let t = outbox.table().to_string();
    let partitions: Vec<String> = sqlx::query_scalar(&format!(
        "SELECT c.relname::text FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
         WHERE i.inhparent = '{t}'::regclass ORDER BY 1"
    ))
    .fetch_all(outbox.pool())
    .await
    .unwrap();
    assert_eq!(
        partitions,
        [
            format!("{t}_dead"),
            format!("{t}_p0"),
            format!("{t}_p1"),
            format!("{t}_p2")
        ]
    );

    let mut seen = HashSet::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut n = 0;
    while seen.len() < 3 {
        assert!(Instant::now() < deadline, "partitions seen: {seen:?}");
        n += 1;
        let mut tx = outbox.pool().begin().await.unwrap();
        let id = outbox.enqueue(&mut *tx, &item("a", n)).await.unwrap();
        // The period of this transaction's start, as the client computes it.
        let started: f64 = sqlx::query_scalar("SELECT extract(epoch FROM now())::float8")
            .fetch_one(&mut *tx)
            .await
            .unwrap();
        tx.commit().await.unwrap();
        let (part, partition) = placement(&outbox, id).await;
        assert_eq!(i64::from(part), started.floor() as i64 % 3);
        assert_eq!(partition, format!("{t}_p{part}"));
        seen.insert(part);
        // Pacing, not synchronisation: the ring turns with the clock.
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Postgres::drop_tables(&outbox).await;
}

/// Retention truncates a partition whose delivered events are all older than the retention
/// age, after moving the events still pending or dead in it to another partition, where they
/// keep their state and are still delivered. Truncation frees the partition's space at once
/// while another session holds a snapshot open (deleting rows could free nothing then).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retention_truncates_a_delivered_partition_and_keeps_its_stragglers() {
    init_tracing();
    let outbox = ring(Duration::from_secs(1), 3).await;
    let t = outbox.table().to_string();

    // One transaction, so one partition: 20 events to deliver, one poison, one deferred.
    let mut tx = outbox.pool().begin().await.unwrap();
    let events: Vec<ItemChanged> = (0..20).map(|i| item(&format!("a{}", i % 10), i)).collect();
    outbox.enqueue_batch(&mut *tx, &events).await.unwrap();
    let poison = outbox.enqueue(&mut *tx, &item("poison", 1)).await.unwrap();
    let deferred = outbox
        .enqueue_at(
            &mut *tx,
            &item("later", 1),
            chrono::Utc::now() + chrono::Duration::seconds(4),
        )
        .await
        .unwrap();
    tx.commit().await.unwrap();
    let (old, old_partition) = placement(&outbox, poison).await;

    let log = Log::default();
    let behaviour: outbox_tests::Behaviour = Arc::new(|event: &ItemChanged, _| {
        if event.item == "poison" {
            Err(HandlerError::fatal("poison"))
        } else {
            Ok(())
        }
    });
    let relay = RunningRelay::start(
        Relay::builder(outbox.clone(), dispatcher(&log, behaviour))
            .poll_interval(Duration::from_millis(20)),
    );
    eventually("20 delivered, the poison dead", WAIT, || async {
        log.len() == 20 && outbox.get(poison).await.unwrap().unwrap().status == EventStatus::Dead
    })
    .await;

    // A report's snapshot, held open for the rest of the test.
    let mut report = outbox.pool().acquire().await.unwrap().detach();
    sqlx::raw_sql("BEGIN ISOLATION LEVEL REPEATABLE READ; SELECT count(*) FROM pg_class")
        .execute(&mut report)
        .await
        .unwrap();
    let size = |partition: String| {
        let pool = outbox.pool().clone();
        async move {
            sqlx::query_scalar::<_, i64>("SELECT pg_relation_size($1::regclass)")
                .bind(partition)
                .fetch_one(&pool)
                .await
                .unwrap()
        }
    };
    assert!(size(old_partition.clone()).await > 0);

    let removed = outbox
        .purge(&Retention::delete_after(Duration::ZERO))
        .await
        .unwrap();
    assert_eq!(removed, 20);
    assert_eq!(
        size(old_partition.clone()).await,
        0,
        "truncated, its space freed"
    );
    let rows: i64 = sqlx::query_scalar(&format!("SELECT count(*) FROM {t}"))
        .fetch_one(outbox.pool())
        .await
        .unwrap();
    assert_eq!(rows, 2, "the dead and the deferred event stay");

    // The stragglers moved, and kept their state.
    let dead = outbox.get(poison).await.unwrap().unwrap();
    assert_eq!(dead.status, EventStatus::Dead);
    assert_eq!(dead.last_error.as_deref(), Some("poison"));
    assert_ne!(placement(&outbox, poison).await.0, old);
    assert_ne!(placement(&outbox, deferred).await.0, old);
    assert_eq!(
        outbox.get(deferred).await.unwrap().unwrap().status,
        EventStatus::Pending
    );
    eventually("the moved deferred event is delivered", WAIT, || async {
        log.snapshot().iter().any(|h| h.event_id == deferred)
    })
    .await;
    relay.stop().await;
    // And the moved dead event is requeued and delivered like any other.
    assert!(outbox.requeue(poison).await.unwrap());
    let relay = RunningRelay::start(
        Relay::builder(outbox.clone(), dispatcher(&log, always_ok()))
            .poll_interval(Duration::from_millis(20)),
    );
    eventually("the requeued event is delivered", WAIT, || async {
        log.snapshot().iter().any(|h| h.event_id == poison)
    })
    .await;
    relay.stop().await;
    sqlx::Connection::close(report).await.unwrap();
    Postgres::drop_tables(&outbox).await;
}

/// A partition that an application's open transaction has written to cannot be truncated
/// until it commits: retention gives up on it within its short lock timeout (instead of
/// waiting, with every writer of the table queued behind it) and truncates it at a later
/// round. Nothing of the open transaction is lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retention_never_waits_on_an_open_application_transaction() {
    init_tracing();
    // Hour-long partitions: the committed event and the open transaction's share one.
    let outbox = ring(Duration::from_secs(3600), 2).await;
    let log = Log::default();
    let relay = RunningRelay::start(
        Relay::builder(outbox.clone(), dispatcher(&log, always_ok()))
            .poll_interval(Duration::from_millis(20)),
    );
    let (open, open_id, delivered_id) = loop {
        let mut tx = outbox.pool().begin().await.unwrap();
        let delivered_id = outbox.enqueue(&mut *tx, &item("done", 1)).await.unwrap();
        tx.commit().await.unwrap();
        let mut open = outbox.pool().begin().await.unwrap();
        let open_id = outbox.enqueue(&mut *open, &item("open", 1)).await.unwrap();
        let open_part: i16 = sqlx::query_scalar(&format!(
            "SELECT part FROM {} WHERE id = $1",
            outbox.table()
        ))
        .bind(open_id)
        .fetch_one(&mut *open)
        .await
        .unwrap();
        if placement(&outbox, delivered_id).await.0 == open_part {
            break (open, open_id, delivered_id);
        }
        // The hour turned between the two: again.
        open.rollback().await.unwrap();
    };
    eventually("the committed event is delivered", WAIT, || async {
        outbox.get(delivered_id).await.unwrap().unwrap().status == EventStatus::Delivered
    })
    .await;

    let started = Instant::now();
    let removed = tokio::time::timeout(
        Duration::from_secs(20),
        outbox.purge(&Retention::delete_after(Duration::ZERO)),
    )
    .await
    .expect("retention waited on the open transaction")
    .unwrap();
    assert_eq!(removed, 0);
    assert!(started.elapsed() < Duration::from_secs(5));
    // Writers of the table go on meanwhile.
    let mut tx = outbox.pool().begin().await.unwrap();
    let other = outbox.enqueue(&mut *tx, &item("other", 1)).await.unwrap();
    tx.commit().await.unwrap();

    open.commit().await.unwrap();
    eventually("both later events are delivered", WAIT, || async {
        let seen: HashSet<uuid::Uuid> = log.snapshot().iter().map(|h| h.event_id).collect();
        seen.contains(&open_id) && seen.contains(&other)
    })
    .await;
    relay.stop().await;
    let removed = outbox
        .purge(&Retention::delete_after(Duration::ZERO))
        .await
        .unwrap();
    assert_eq!(removed, 3);
    let rows: i64 = sqlx::query_scalar(&format!("SELECT count(*) FROM {}", outbox.table()))
        .fetch_one(outbox.pool())
        .await
        .unwrap();
    assert_eq!(rows, 0);
    Postgres::drop_tables(&outbox).await;
}

/// Four writers for several seconds over a ring turning every second, two relays that apply
/// retention every 50 ms: every event is delivered once, each aggregate's in sequence order,
/// and the partitions were truncated under the relays (the table ends empty).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relays_deliver_once_and_in_order_while_partitions_are_truncated() {
    init_tracing();
    let outbox = ring(Duration::from_secs(1), 3).await;
    let log = Log::default();
    let relays: Vec<RunningRelay> = (0..2)
        .map(|_| {
            RunningRelay::start(
                Relay::builder(outbox.clone(), dispatcher(&log, always_ok()))
                    .poll_interval(Duration::from_millis(20))
                    .retention(
                        Retention::delete_after(Duration::ZERO),
                        Duration::from_millis(50),
                    ),
            )
        })
        .collect();
    let writing_until = Instant::now() + Duration::from_secs(5);
    let writers: Vec<_> = (0..4)
        .map(|w| {
            let outbox = outbox.clone();
            tokio::spawn(async move {
                let mut written = 0u64;
                while Instant::now() < writing_until {
                    let events: Vec<ItemChanged> = (0..5)
                        .map(|i| item(&format!("agg-{}", (w * 5 + i) % 12), written + i))
                        .collect();
                    let mut tx = outbox.pool().begin().await.unwrap();
                    outbox.enqueue_batch(&mut *tx, &events).await.unwrap();
                    tx.commit().await.unwrap();
                    written += 5;
                }
                written
            })
        })
        .collect();
    let mut written = 0;
    for writer in writers {
        written += writer.await.unwrap();
    }
    let t = outbox.table().to_string();
    eventually("every event delivered and truncated", WAIT, || async {
        let rows: i64 = sqlx::query_scalar(&format!("SELECT count(*) FROM {t}"))
            .fetch_one(outbox.pool())
            .await
            .unwrap();
        log.len() as u64 >= written && rows == 0
    })
    .await;
    for relay in relays {
        relay.stop().await;
    }
    let handled = log.snapshot();
    let ids: HashSet<uuid::Uuid> = handled.iter().map(|h| h.event_id).collect();
    assert_eq!(ids.len(), handled.len(), "an event was delivered twice");
    assert_eq!(handled.len() as u64, written);
    let mut last: BTreeMap<String, i64> = BTreeMap::new();
    for h in &handled {
        let previous = last.insert(h.event.item.clone(), h.sequence).unwrap_or(0);
        assert_eq!(h.sequence, previous + 1, "{}: out of order", h.event.item);
    }
    Postgres::drop_tables(&outbox).await;
}

/// A table created without partitions is not silently kept as it is, nor rebuilt: `migrate`
/// says what to do. A ring out of bounds, log tailing with partitions, and partitions on
/// SQLite are refused when the outbox is built.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plain_table_and_bad_rings_are_refused_clearly() {
    init_tracing();
    let plain = Outbox::builder(pg_pool().await)
        .table(unique_table())
        .build()
        .unwrap();
    plain.migrate().await.unwrap();
    let err = Outbox::builder(plain.pool().clone())
        .table(plain.table().as_str())
        .layout(scenario_ring())
        .build()
        .unwrap()
        .migrate()
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("cannot partition a table in place"), "{err}");
    Postgres::drop_tables(&plain).await;

    // A log-tailing outbox (its dead events need a unique id) on a table another process
    // created partitioned.
    let partitioned = ring(Duration::from_secs(1), 3).await;
    let err = Outbox::builder(partitioned.pool().clone())
        .table(partitioned.table().as_str())
        .log_tailing(TailMode::Messages)
        .build()
        .unwrap()
        .migrate()
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("is partitioned"), "{err}");
    Postgres::drop_tables(&partitioned).await;

    let pool = pg_pool().await;
    for (layout, expected) in [
        (
            TableLayout::partitioned(Duration::from_secs(60), 1),
            "2 to 64 partitions",
        ),
        (
            TableLayout::partitioned(Duration::from_millis(10), 4),
            "at least a second",
        ),
    ] {
        let err = Outbox::builder(pool.clone())
            .layout(layout)
            .build()
            .unwrap_err()
            .to_string();
        assert!(err.contains(expected), "{err}");
    }
    let err = Outbox::builder(pool)
        .layout(scenario_ring())
        .log_tailing(TailMode::Messages)
        .build()
        .unwrap_err()
        .to_string();
    assert!(err.contains("nothing to partition"), "{err}");
    let err = Outbox::builder(sqlite_pool().await)
        .layout(scenario_ring())
        .build()
        .unwrap_err()
        .to_string();
    assert!(err.contains("not available on SQLite"), "{err}");
}

/// Migrating twice, or from several processes at once, leaves one ring.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_migrations_leave_one_ring() {
    let outbox = Outbox::builder(pg_pool().await)
        .table(unique_table())
        .layout(scenario_ring())
        .build()
        .unwrap();
    let runs: Vec<_> = (0..3)
        .map(|_| {
            let outbox = outbox.clone();
            tokio::spawn(async move { outbox.migrate().await })
        })
        .collect();
    for run in runs {
        run.await.unwrap().unwrap();
    }
    outbox.migrate().await.unwrap();
    let partitions: i64 = sqlx::query_scalar(&format!(
        "SELECT count(*) FROM pg_inherits WHERE inhparent = '{}'::regclass",
        outbox.table()
    ))
    .fetch_one(outbox.pool())
    .await
    .unwrap();
    assert_eq!(
        partitions, 5,
        "the ring of 4 and the dead events' partition"
    );
    assert!((0..4).contains(&current_partition(&outbox).await));
    Postgres::drop_tables(&outbox).await;
}
