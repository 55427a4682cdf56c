//! Third outside review of the MySQL / MariaDB store: the batched `insert` of 7668755. Each test
//! here failed on the reviewed code (it showed a defect) and is now its regression test; checks
//! that held up were removed. Run: `cargo test -p outbox-tests --all-features --test review3_mysql`.

use outbox_tests::{init_tracing, Bulky, TestDb};
use sqlx::MySql;

/// A small event then a large one (each far below `max_allowed_packet` alone, and each
/// enqueued fine on its own): the chunker lets a row in while fewer than 4 MiB are taken, so
/// the statement is ~4 MiB + the large payload and exceeds the 16 MiB packet.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_small_then_a_large_payload_in_one_batch() {
    init_tracing();
    let outbox = MySql::fresh().await;
    let small = Bulky {
        item: "big".into(),
        pad: "x".repeat((4 << 20) - 4096),
    };
    let large = Bulky {
        item: "big".into(),
        pad: "y".repeat(13_000_000),
    };
    // Each alone is fine.
    for e in [&small, &large] {
        let mut tx = outbox.pool().begin().await.unwrap();
        outbox.enqueue(&mut *tx, e).await.expect("alone");
        tx.rollback().await.unwrap();
    }
    let mut tx = outbox.pool().begin().await.unwrap();
    let ids = outbox
        .enqueue_batch(&mut *tx, &[small, large])
        .await
        .expect("the same two events in one batch");
    tx.commit().await.unwrap();
    assert_eq!(ids.len(), 2);
    assert_eq!(MySql::count_outbox_rows(&outbox).await, 2);
    MySql::drop_tables(&outbox).await;
}
