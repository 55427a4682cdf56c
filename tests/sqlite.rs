//! The shared scenarios on SQLite (a temporary file per test).

use outbox_tests::scenarios;
use outbox_tests::TestDb;
use sqlx::Sqlite;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commit_and_rollback() {
    scenarios::commit_and_rollback::<Sqlite>().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_relays_share_work_in_order() {
    scenarios::relays_share_work_in_order::<Sqlite>(2, 20, 50).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crashed_relay_is_taken_over() {
    scenarios::crashed_relay_is_taken_over::<Sqlite>().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failures_retry_then_dead() {
    scenarios::failures_retry_then_dead::<Sqlite>().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fatal_error_is_dead_at_once() {
    scenarios::fatal_error_is_dead_at_once::<Sqlite>().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deferred_delivery() {
    scenarios::deferred_delivery::<Sqlite>().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_type_and_bad_payload_go_dead() {
    scenarios::unknown_type_and_bad_payload_go_dead::<Sqlite>().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn panicking_handler_is_contained() {
    scenarios::panicking_handler_is_contained::<Sqlite>().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batch_enqueue_allocates_consecutive_sequences() {
    scenarios::batch_enqueue_allocates_consecutive_sequences::<Sqlite>().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_shutdown_finishes_in_flight_work() {
    scenarios::graceful_shutdown_finishes_in_flight_work::<Sqlite>().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retention_removes_only_delivered_rows() {
    scenarios::retention_removes_only_delivered_rows::<Sqlite>().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inbox_processes_each_message_once() {
    scenarios::inbox_processes_each_message_once::<Sqlite>().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relay_runs_retention() {
    scenarios::relay_runs_retention::<Sqlite>().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn claim_uses_the_pending_indexes() {
    let outbox = Sqlite::fresh().await;
    let plan = outbox.explain_claim(100).await.unwrap();
    assert!(plan.contains("_cursors_due"), "{plan}");
    assert!(
        !plan.contains(&format!("SCAN {}_cursors", outbox.table())),
        "{plan}"
    );
    Sqlite::drop_tables(&outbox).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hot_aggregate_is_delivered_in_order() {
    scenarios::hot_aggregate_is_delivered_in_order::<Sqlite>().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_cut_by_a_failure_is_retried_in_order() {
    scenarios::a_run_cut_by_a_failure_is_retried_in_order::<Sqlite>().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_failures_affect_only_their_own_event() {
    scenarios::bad_failures_affect_only_their_own_event::<Sqlite>().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicking_destination_affects_only_its_run() {
    scenarios::a_panicking_destination_affects_only_its_run::<Sqlite>().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delivery_that_outlives_its_lease_is_abandoned() {
    scenarios::a_delivery_that_outlives_its_lease_is_abandoned::<Sqlite>().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn payload_is_delivered_byte_for_byte() {
    scenarios::payload_is_delivered_byte_for_byte::<Sqlite>().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_requeues_never_strand_an_aggregate() {
    scenarios::concurrent_requeues_never_strand_an_aggregate::<Sqlite>().await;
}

/// Eight writer tasks and two relays on one SQLite file: WAL, the busy timeout and immediate
/// transactions mean no "database is locked" reaches the application.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eight_writers_and_two_relays_share_one_file() {
    use outbox_tests::{always_ok, dispatcher, eventually, ItemChanged, Log, RunningRelay};
    use std::time::Duration;
    // A pool as a user opens it, with sqlx's defaults: the outbox must make it safe itself.
    let path = std::env::temp_dir().join(format!("outbox-test-{}.db", uuid::Uuid::new_v4()));
    let pool = sqlx::sqlite::SqlitePoolOptions::new()
        .max_connections(10)
        .connect(&format!("sqlite://{}?mode=rwc", path.display()))
        .await
        .unwrap();
    let outbox = outbox::Outbox::builder(pool)
        .table(outbox_tests::unique_table())
        .build()
        .unwrap();
    outbox.migrate().await.unwrap();
    sqlx::query(&format!(
        "CREATE TABLE {}_business (id TEXT PRIMARY KEY)",
        outbox.table()
    ))
    .execute(outbox.pool())
    .await
    .unwrap();
    let log = Log::default();
    let relays: Vec<RunningRelay> = (0..2)
        .map(|_| {
            RunningRelay::start(
                outbox::Relay::builder(outbox.clone(), dispatcher(&log, always_ok()))
                    .poll_interval(Duration::from_millis(10)),
            )
        })
        .collect();
    let writers = (0..8).map(|w| {
        let outbox = outbox.clone();
        tokio::spawn(async move {
            for n in 1..=75u64 {
                let mut tx = outbox.pool().begin().await?;
                Sqlite::insert_business_row(&outbox, &mut *tx, &format!("w{w}-{n}")).await;
                outbox
                    .enqueue(
                        &mut *tx,
                        &ItemChanged {
                            item: format!("item-{}", n % 10),
                            n,
                        },
                    )
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
    eventually(
        "every event is delivered",
        Duration::from_secs(60),
        || async { log.len() == 600 },
    )
    .await;
    for relay in relays {
        relay.stop().await;
    }
    assert!(outbox.check().await.unwrap().is_empty());
    Sqlite::drop_tables(&outbox).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parked_aggregates_keep_their_order() {
    scenarios::parked_aggregates_keep_their_order::<Sqlite>().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idempotency_key_enqueues_once() {
    scenarios::idempotency_key_enqueues_once::<Sqlite>().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_enqueues_of_one_idempotency_key_write_one_event() {
    scenarios::concurrent_idempotency_keys::<Sqlite>().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn republish_delivers_delivered_and_archived_events_again_in_order() {
    scenarios::republish_delivers_again_in_order::<Sqlite>().await;
}
