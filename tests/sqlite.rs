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
    assert!(plan.contains("_heads"), "{plan}");
    assert!(
        !plan.contains(&format!("SCAN {} ", outbox.table()))
            && !plan.ends_with(&format!("SCAN {}", outbox.table())),
        "{plan}"
    );
    Sqlite::drop_tables(&outbox).await;
}
