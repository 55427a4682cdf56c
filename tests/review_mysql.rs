//! Outside review of the MySQL / MariaDB store: each test showed a defect found in
//! `outbox-core/src/store/mysql.rs` (it failed on the code as reviewed, b209993) and is now its
//! regression test. Run: `cargo test -p outbox-tests --all-features --test review_mysql`.

use outbox::{EventStatus, Relay, Retention};
use outbox_tests::{
    always_ok, dispatcher, eventually, init_tracing, ItemChanged, Log, RunningRelay, TestDb,
};
use sqlx::MySql;
use std::time::Duration;

const WAIT: Duration = Duration::from_secs(60);

fn item(aggregate: &str, n: u64) -> ItemChanged {
    ItemChanged {
        item: aggregate.to_owned(),
        n,
    }
}

/// Idempotency keys are compared with `utf8mb4_bin`, a PAD SPACE collation in MariaDB: a key
/// and the same key with trailing spaces are one key there, so the second request's event is
/// silently not written (reported a duplicate of the first). PostgreSQL compares keys exactly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idempotency_keys_differing_in_trailing_spaces_are_distinct() {
    init_tracing();
    let outbox = MySql::fresh().await;
    let mut tx = outbox.pool().begin().await.unwrap();
    let first = outbox
        .enqueue_once(&mut *tx, &item("a", 1), "order-17")
        .await
        .unwrap();
    tx.commit().await.unwrap();
    let mut tx = outbox.pool().begin().await.unwrap();
    let second = outbox
        .enqueue_once(&mut *tx, &item("a", 2), "order-17 ")
        .await
        .unwrap();
    tx.commit().await.unwrap();
    assert!(first.is_new());
    assert!(
        second.is_new(),
        "key \"order-17 \" is not key \"order-17\", yet the event was dropped: {second:?}"
    );
    assert_eq!(MySql::count_outbox_rows(&outbox).await, 2);
    MySql::drop_tables(&outbox).await;
}

/// An application transaction that hits an existing idempotency key (a retried request) keeps
/// a shared lock on the key row until it ends. Retention then deletes that key with a plain
/// locking DELETE (no SKIP LOCKED, unlike PostgreSQL): the relay's purge waits on the
/// application's open transaction (up to innodb_lock_wait_timeout, then fails).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn purge_does_not_wait_on_an_application_retrying_a_key() {
    init_tracing();
    let outbox = MySql::fresh().await;
    let mut tx = outbox.pool().begin().await.unwrap();
    let first = outbox
        .enqueue_once(&mut *tx, &item("a", 1), "request-1")
        .await
        .unwrap();
    tx.commit().await.unwrap();
    let log = Log::default();
    let relay = RunningRelay::start(
        Relay::builder(outbox.clone(), dispatcher(&log, always_ok()))
            .poll_interval(Duration::from_millis(20)),
    );
    eventually("the event is delivered", WAIT, || async {
        outbox.get(first.id()).await.unwrap().unwrap().status == EventStatus::Delivered
    })
    .await;
    relay.stop().await;

    // A retried request, its transaction still open.
    let mut held = outbox.pool().begin().await.unwrap();
    let again = outbox
        .enqueue_once(&mut *held, &item("a", 1), "request-1")
        .await
        .unwrap();
    assert_eq!(again, outbox::Enqueued::Duplicate(first.id()));

    let purge = tokio::time::timeout(
        Duration::from_secs(10),
        outbox.purge(&Retention::delete_after(Duration::ZERO)),
    )
    .await;
    held.rollback().await.unwrap();
    let purged = purge.expect("purge waited >10 s on the application's open transaction");
    assert_eq!(purged.unwrap(), 1);
    MySql::drop_tables(&outbox).await;
}

/// The dead-event reason filter (behind `dead`, `requeue_dead`, `discard_dead`) is a substring
/// match without case on PostgreSQL (`strpos(lower(..), lower(..))`). MySQL's `LOCATE` compares
/// in the column's `utf8mb4_unicode_ci` collation, where "ss" matches "ß": the filter selects,
/// and an operator's bulk action then requeues or discards, events it should not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_reason_filter_is_a_plain_substring_match() {
    init_tracing();
    let outbox = MySql::fresh().await;
    let mut tx = outbox.pool().begin().await.unwrap();
    let street = outbox.enqueue(&mut *tx, &item("street", 1)).await.unwrap();
    let other = outbox.enqueue(&mut *tx, &item("other", 1)).await.unwrap();
    tx.commit().await.unwrap();
    let log = Log::default();
    let behaviour: outbox_tests::Behaviour =
        std::sync::Arc::new(|event, _| match event.item.as_str() {
            "street" => Err(outbox::HandlerError::fatal("Straße gesperrt")),
            _ => Err(outbox::HandlerError::fatal("strasse unknown")),
        });
    let relay = RunningRelay::start(
        Relay::builder(outbox.clone(), dispatcher(&log, behaviour))
            .poll_interval(Duration::from_millis(20)),
    );
    eventually("both events are dead", WAIT, || async {
        MySql::count_status(&outbox, "dead").await == 2
    })
    .await;
    relay.stop().await;
    let found: Vec<uuid::Uuid> = outbox
        .dead(&outbox::EventFilter::new().reason("STRASSE"), 10)
        .await
        .unwrap()
        .iter()
        .map(|r| r.id)
        .collect();
    assert_eq!(
        found,
        [other],
        "reason \"STRASSE\" selected {found:?}; {street} (\"Straße gesperrt\") does not contain it"
    );
    MySql::drop_tables(&outbox).await;
}

fn year_10000() -> chrono::DateTime<chrono::Utc> {
    "+10000-01-01T00:00:00Z".parse().unwrap()
}

/// An effective date past year 9999 (which PostgreSQL stores as given) is neither refused nor
/// stored: MariaDB keeps a zero date, and the row can no longer be read (`get` fails on
/// `available_at`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn far_future_effective_date_is_stored_or_refused() {
    init_tracing();
    let outbox = MySql::fresh().await;
    let mut tx = outbox.pool().begin().await.unwrap();
    let enqueued = outbox
        .enqueue_at(&mut *tx, &item("far", 1), year_10000())
        .await;
    if let Ok(id) = enqueued {
        tx.commit().await.unwrap();
        let row = outbox.get(id).await;
        let stored: Option<String> = sqlx::query_scalar(&format!(
            "SELECT CAST(available_at AS CHAR) FROM {} WHERE id = ?",
            outbox.table()
        ))
        .bind(id)
        .fetch_one(outbox.pool())
        .await
        .unwrap();
        assert!(
            matches!(&row, Ok(Some(r)) if r.available_at == year_10000()),
            "accepted, stored available_at = {stored:?}, read back: {row:?}"
        );
    }
    MySql::drop_tables(&outbox).await;
}

/// The same event, claimed with another aggregate's: the claim's read of the runs fails on the
/// zero date every time, and the other aggregate's event is never delivered either.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn far_future_effective_date_does_not_stall_the_relay() {
    init_tracing();
    let outbox = MySql::fresh().await;
    let mut tx = outbox.pool().begin().await.unwrap();
    let far = outbox
        .enqueue_at(&mut *tx, &item("far", 1), year_10000())
        .await;
    tx.commit().await.unwrap();
    let mut tx = outbox.pool().begin().await.unwrap();
    let fine = outbox.enqueue(&mut *tx, &item("fine", 1)).await.unwrap();
    tx.commit().await.unwrap();
    let log = Log::default();
    let relay = RunningRelay::start(
        Relay::builder(outbox.clone(), dispatcher(&log, always_ok()))
            .poll_interval(Duration::from_millis(20)),
    );
    eventually(
        &format!("the other aggregate's event is delivered (far: {far:?})"),
        Duration::from_secs(20),
        || async { log.snapshot().iter().any(|h| h.event_id == fine) },
    )
    .await;
    let early: Vec<_> = log
        .snapshot()
        .iter()
        .filter(|h| far.as_ref().is_ok_and(|id| *id == h.event_id))
        .map(|h| h.event_id)
        .collect();
    relay.shutdown.cancel();
    let _ = relay.task.await;
    assert!(early.is_empty(), "the year-10000 event was delivered now");
    MySql::drop_tables(&outbox).await;
}

/// Consumer names are `utf8mb4_bin`, PAD SPACE in MariaDB: consumers "billing" and "billing "
/// share their records, so the second one skips a message it never processed. PostgreSQL keeps
/// them apart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inbox_consumers_differing_in_trailing_spaces_are_apart() {
    init_tracing();
    let outbox = MySql::fresh().await;
    let table = format!("{}_inbox", outbox.table());
    let billing = outbox::Inbox::new(outbox.pool().clone(), &table, "billing").unwrap();
    billing.migrate().await.unwrap();
    let message = uuid::Uuid::now_v7();
    let tx = billing
        .begin_for(message)
        .await
        .unwrap()
        .expect("first delivery");
    tx.commit().await.unwrap();
    let other = outbox::Inbox::new(outbox.pool().clone(), &table, "billing ").unwrap();
    assert!(
        other.begin_for(message).await.unwrap().is_some(),
        "consumer \"billing \" skipped a message only \"billing\" processed"
    );
    MySql::drop_tables(&outbox).await;
}

#[derive(Debug, Clone, serde::Serialize, serde::Deserialize, outbox::OutboxEvent)]
#[outbox(
    event_type = "test.ITEM_CHANGED",
    aggregate_type = "item",
    topic = "items"
)]
struct UpperCaseType {
    #[outbox(aggregate_id)]
    item: String,
}

/// `status` counts events per status and event type. MySQL groups `event_type` in its
/// case-insensitive column collation: two distinct event types that differ in case are counted
/// as one, under one of the two names. PostgreSQL (and the event filter, `COLLATE
/// utf8mb4_bin`) keep them apart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_counts_event_types_that_differ_in_case_apart() {
    init_tracing();
    let outbox = MySql::fresh().await;
    let mut tx = outbox.pool().begin().await.unwrap();
    outbox.enqueue(&mut *tx, &item("a", 1)).await.unwrap();
    outbox
        .enqueue(&mut *tx, &UpperCaseType { item: "b".into() })
        .await
        .unwrap();
    tx.commit().await.unwrap();
    let status = outbox.status(Duration::from_secs(3600)).await.unwrap();
    let mut counts: Vec<(String, u64)> = status
        .counts
        .iter()
        .map(|c| (c.event_type.clone(), c.count))
        .collect();
    counts.sort();
    assert_eq!(
        counts,
        [
            ("test.ITEM_CHANGED".to_owned(), 1),
            ("test.item_changed".to_owned(), 1)
        ]
    );
    MySql::drop_tables(&outbox).await;
}

/// An operator's time filter past year 9999 (`--since`/`--until`, which PostgreSQL compares as
/// given) becomes MariaDB's zero date: "created after year 10000" selects every delivered
/// event, and a republish would deliver them all again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn republish_filter_past_year_9999_selects_nothing() {
    init_tracing();
    let outbox = MySql::fresh().await;
    let mut tx = outbox.pool().begin().await.unwrap();
    let id = outbox.enqueue(&mut *tx, &item("a", 1)).await.unwrap();
    tx.commit().await.unwrap();
    let log = Log::default();
    let relay = RunningRelay::start(
        Relay::builder(outbox.clone(), dispatcher(&log, always_ok()))
            .poll_interval(Duration::from_millis(20)),
    );
    eventually("the event is delivered", WAIT, || async {
        outbox.get(id).await.unwrap().unwrap().status == EventStatus::Delivered
    })
    .await;
    relay.stop().await;
    let n = outbox
        .republish_dry_run(&outbox::EventFilter::new().created_from(year_10000()))
        .await;
    assert!(
        matches!(n, Ok(0) | Err(_)),
        "events created after year 10000: {n:?}"
    );
    MySql::drop_tables(&outbox).await;
}

/// The event type filter compares as PostgreSQL does: a trailing space is part of the name.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn event_type_filter_does_not_ignore_trailing_spaces() {
    init_tracing();
    let outbox = MySql::fresh().await;
    let mut tx = outbox.pool().begin().await.unwrap();
    let id = outbox.enqueue(&mut *tx, &item("a", 1)).await.unwrap();
    tx.commit().await.unwrap();
    let log = Log::default();
    let relay = RunningRelay::start(
        Relay::builder(outbox.clone(), dispatcher(&log, always_ok()))
            .poll_interval(Duration::from_millis(20)),
    );
    eventually("the event is delivered", WAIT, || async {
        outbox.get(id).await.unwrap().unwrap().status == EventStatus::Delivered
    })
    .await;
    relay.stop().await;
    let event_type = outbox.get(id).await.unwrap().unwrap().event_type;
    let exact = outbox::EventFilter::new().event_type(event_type.clone());
    let padded = outbox::EventFilter::new().event_type(format!("{event_type} "));
    assert_eq!(outbox.republish_dry_run(&exact).await.unwrap(), 1);
    assert_eq!(outbox.republish_dry_run(&padded).await.unwrap(), 0);
    MySql::drop_tables(&outbox).await;
}

/// A consumer name longer than the inbox keeps is refused when the inbox is made, not when the
/// first message arrives; the longest one accepted works.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consumer_names_longer_than_255_bytes_are_refused_up_front() {
    init_tracing();
    let outbox = MySql::fresh().await;
    let table = format!("{}_inbox", outbox.table());
    let long = "é".repeat(128);
    let refused = outbox::Inbox::new(outbox.pool().clone(), &table, long.as_str());
    assert!(
        matches!(&refused, Err(outbox::Error::InvalidField { field, .. }) if field.contains("consumer")),
        "{refused:?}"
    );
    let longest = outbox::Inbox::new(outbox.pool().clone(), &table, &long[..254]).unwrap();
    longest.migrate().await.unwrap();
    let message = uuid::Uuid::now_v7();
    let tx = longest
        .begin_for(message)
        .await
        .unwrap()
        .expect("first delivery");
    tx.commit().await.unwrap();
    assert!(longest.begin_for(message).await.unwrap().is_none());
    MySql::drop_tables(&outbox).await;
}
