//! Idempotency keys at enqueue and `Outbox::republish` under attack, on real PostgreSQL and
//! SQLite: written as an outside review; the tests that failed then are regression tests now
//! (a key purged while its event waited, a retried prepared message, isolation levels).

use outbox::{
    EnqueueOptions, Enqueued, EventFilter, EventStatus, HandlerContext, HandlerError, Message,
    Outbox, Relay, Retention,
};
use outbox_tests::{
    always_ok, dispatcher, eventually, init_tracing, ItemChanged, Log, RunningRelay, TestDb,
};
use sqlx::{Postgres, Sqlite};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

const WAIT: Duration = Duration::from_secs(60);

fn item(aggregate: usize, n: u64) -> ItemChanged {
    ItemChanged {
        item: format!("item-{aggregate}"),
        n,
    }
}

fn quick_relay<DB: TestDb, D: outbox::Destination>(
    outbox: Outbox<DB>,
    destination: D,
) -> outbox::RelayBuilder<DB, D> {
    Relay::builder(outbox, destination).poll_interval(Duration::from_millis(20))
}

fn seen(log: &Log, item: &str) -> Vec<u64> {
    log.snapshot()
        .iter()
        .filter(|h| h.event.item == item)
        .map(|h| h.event.n)
        .collect()
}

/// A dispatcher whose handler waits (asynchronously) while `gate` is closed for an event with
/// `n == blocked_n`, and marks `entered` when it got there.
fn gated_dispatcher(
    log: &Log,
    blocked_n: u64,
    gate: Arc<AtomicBool>,
    entered: Arc<AtomicBool>,
) -> outbox::Dispatcher {
    let log = log.clone();
    let registry = outbox::Registry::builder()
        .handler::<ItemChanged, _, _>("test", move |event: ItemChanged, ctx: HandlerContext| {
            let (log, gate, entered) = (log.clone(), gate.clone(), entered.clone());
            async move {
                if event.n == blocked_n {
                    entered.store(true, Ordering::SeqCst);
                    while !gate.load(Ordering::SeqCst) {
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    }
                }
                log.push(event, &ctx);
                Ok::<(), HandlerError>(())
            }
        })
        .unwrap()
        .build();
    outbox::Dispatcher::new(registry)
}

// ---------------------------------------------------------------------------------------------
// Idempotency keys
// ---------------------------------------------------------------------------------------------

/// A key whose event is still pending (deferred) must survive retention: retention keeps
/// pending rows forever, and the README says keys live as long as retention keeps rows.
async fn key_survives_retention_while_its_event_is_pending<DB: TestDb>() {
    init_tracing();
    let outbox = DB::fresh().await;
    let mut tx = outbox.pool().begin().await.unwrap();
    let first = outbox
        .enqueue_with(
            &mut *tx,
            &item(1, 1),
            EnqueueOptions::new()
                .delay(Duration::from_secs(3600))
                .idempotency_key("deferred-request"),
        )
        .await
        .unwrap();
    tx.commit().await.unwrap();
    let removed = outbox
        .purge(&Retention::delete_after(Duration::ZERO))
        .await
        .unwrap();
    assert_eq!(removed, 0, "no delivered row to remove");
    assert_eq!(DB::count_status(&outbox, "pending").await, 1);

    let mut tx = outbox.pool().begin().await.unwrap();
    let retried = outbox
        .enqueue_once(&mut *tx, &item(1, 1), "deferred-request")
        .await
        .unwrap();
    tx.commit().await.unwrap();
    let rows = DB::count_outbox_rows(&outbox).await;
    DB::drop_tables(&outbox).await;
    assert_eq!(
        (retried, rows),
        (Enqueued::Duplicate(first), 1),
        "the retried request enqueued its event a second time: retention purged the key of a \
         still-pending event"
    );
}

/// A caller that prepared its `Message` once and retries it after a commit whose answer it
/// lost (the same id, the same key) must get `Duplicate`, not a database error.
async fn retry_of_the_same_prepared_message_is_a_duplicate<DB: TestDb>() {
    init_tracing();
    let outbox = DB::fresh().await;
    let message = Message::with_options(
        &item(2, 1),
        EnqueueOptions::new().idempotency_key("prepared-once"),
    )
    .unwrap();
    let mut tx = outbox.pool().begin().await.unwrap();
    let first = outbox
        .enqueue_messages(&mut *tx, std::slice::from_ref(&message))
        .await
        .unwrap();
    tx.commit().await.unwrap();
    assert_eq!(first, vec![Enqueued::New(message.id())]);

    let mut tx = outbox.pool().begin().await.unwrap();
    let retried = outbox
        .enqueue_messages(&mut *tx, std::slice::from_ref(&message))
        .await;
    drop(tx);
    let rows = DB::count_outbox_rows(&outbox).await;
    DB::drop_tables(&outbox).await;
    let retried = retried.unwrap_or_else(|e| {
        panic!("retrying the same prepared Message (same key) failed instead of Duplicate: {e}")
    });
    assert_eq!(retried.len(), 1);
    assert!(
        !retried[0].is_new(),
        "the same key was reported New a second time: {retried:?}"
    );
    assert_eq!(rows, 1);
}

/// Duplicate keys inside one batch, mixed with unkeyed messages: one result per message, in
/// order; duplicates take no sequence number; the relay delivers exactly the new ones in order.
async fn keys_inside_one_batch<DB: TestDb>() {
    init_tracing();
    let outbox = DB::fresh().await;
    let keyed = |n: u64, key: &str| {
        Message::with_options(&item(5, n), EnqueueOptions::new().idempotency_key(key)).unwrap()
    };
    let batch = vec![
        keyed(1, "k1"),
        Message::new(&item(5, 2)).unwrap(),
        keyed(3, "k1"),
        keyed(4, "k2"),
        keyed(5, "k2"),
        Message::new(&item(5, 6)).unwrap(),
    ];
    let mut tx = outbox.pool().begin().await.unwrap();
    let got = outbox.enqueue_messages(&mut *tx, &batch).await.unwrap();
    tx.commit().await.unwrap();
    assert_eq!(
        got,
        vec![
            Enqueued::New(batch[0].id()),
            Enqueued::New(batch[1].id()),
            Enqueued::Duplicate(batch[0].id()),
            Enqueued::New(batch[3].id()),
            Enqueued::Duplicate(batch[3].id()),
            Enqueued::New(batch[5].id()),
        ]
    );
    assert_eq!(DB::count_outbox_rows(&outbox).await, 4);
    let seqs: Vec<i64> = futures_util::future::join_all([0, 1, 3, 5].map(|i| {
        let outbox = outbox.clone();
        let id = batch[i].id();
        async move { outbox.get(id).await.unwrap().unwrap().sequence }
    }))
    .await;
    assert_eq!(seqs, vec![1, 2, 3, 4], "consecutive, duplicates take none");

    // A second batch: a key of the first batch and a new one.
    let second = vec![keyed(7, "k2"), keyed(8, "k3")];
    let mut tx = outbox.pool().begin().await.unwrap();
    let got = outbox.enqueue_messages(&mut *tx, &second).await.unwrap();
    tx.commit().await.unwrap();
    assert_eq!(
        got,
        vec![
            Enqueued::Duplicate(batch[3].id()),
            Enqueued::New(second[1].id())
        ]
    );
    assert_eq!(
        outbox.get(second[1].id()).await.unwrap().unwrap().sequence,
        5
    );

    let log = Log::default();
    let relay = RunningRelay::start(quick_relay(outbox.clone(), dispatcher(&log, always_ok())));
    eventually("5 handled", WAIT, || async { log.len() == 5 }).await;
    relay.stop().await;
    assert_eq!(seen(&log, "item-5"), vec![1, 2, 4, 6, 8]);
    assert!(outbox.check().await.unwrap().is_empty());
    DB::drop_tables(&outbox).await;
}

/// The longest key accepted is accepted by the database too; one byte more is refused at
/// enqueue; odd but valid characters round-trip as distinct keys.
async fn long_and_odd_keys<DB: TestDb>() {
    init_tracing();
    let outbox = DB::fresh().await;
    let longest: String = (0..512)
        .map(|i| char::from(b'!' + (i * 7 % 90) as u8))
        .collect();
    assert_eq!(longest.len(), 512);
    let keys = [
        longest.clone(),
        "é".repeat(256),
        "key with spaces".into(),
        "KEY WITH SPACES".into(),
        "'; DROP TABLE x; --".into(),
        "\u{1F600}".into(),
    ];
    for (n, key) in keys.iter().enumerate() {
        let mut tx = outbox.pool().begin().await.unwrap();
        let a = outbox
            .enqueue_once(&mut *tx, &item(6, n as u64), key.clone())
            .await;
        let a = a.unwrap_or_else(|e| panic!("key {key:?} ({} bytes): {e}", key.len()));
        assert!(a.is_new(), "key {key:?}");
        tx.commit().await.unwrap();
        let mut tx = outbox.pool().begin().await.unwrap();
        let b = outbox
            .enqueue_once(&mut *tx, &item(6, 100 + n as u64), key.clone())
            .await
            .unwrap();
        tx.commit().await.unwrap();
        assert_eq!(b, Enqueued::Duplicate(a.id()), "key {key:?}");
    }
    let empty = outbox
        .enqueue_once(
            &mut *outbox.pool().acquire().await.unwrap(),
            &item(6, 98),
            "",
        )
        .await
        .unwrap_err();
    assert!(
        matches!(&empty, outbox::Error::InvalidField { field, reason } if field == "idempotency key" && reason.contains("empty")),
        "{empty}"
    );
    let too_long = format!("{longest}x");
    let err = outbox
        .enqueue_once(
            &mut *outbox.pool().acquire().await.unwrap(),
            &item(6, 99),
            too_long,
        )
        .await
        .unwrap_err();
    assert!(
        matches!(&err, outbox::Error::InvalidField { field, .. } if field == "idempotency key"),
        "{err}"
    );
    assert_eq!(DB::count_outbox_rows(&outbox).await, keys.len() as i64);
    DB::drop_tables(&outbox).await;
}

/// PostgreSQL at REPEATABLE READ / SERIALIZABLE: the second writer of a key waits for the first,
/// then fails with a serialization error (SQLSTATE 40001, as documented), and the retried
/// transaction finds the first's event.
async fn concurrent_keys_at_isolation(level: &'static str) {
    init_tracing();
    let outbox = Postgres::fresh().await;
    let begin = move |outbox: Outbox<Postgres>| async move {
        let mut tx = outbox.pool().begin().await.unwrap();
        sqlx::query(&format!("SET TRANSACTION ISOLATION LEVEL {level}"))
            .execute(&mut *tx)
            .await
            .unwrap();
        tx
    };
    let mut first_tx = begin(outbox.clone()).await;
    let first = outbox
        .enqueue_once(&mut *first_tx, &item(7, 1), "iso-key")
        .await
        .unwrap();
    let second = tokio::spawn({
        let outbox = outbox.clone();
        async move {
            let mut tx = begin(outbox.clone()).await;
            let r = outbox.enqueue_once(&mut *tx, &item(7, 2), "iso-key").await;
            if r.is_ok() {
                tx.commit().await.unwrap();
            }
            r
        }
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!second.is_finished(), "the second enqueue did not wait");
    first_tx.commit().await.unwrap();
    let second = tokio::time::timeout(WAIT, second).await.unwrap().unwrap();
    let code = match &second {
        Err(outbox::Error::Database(e)) => e
            .as_database_error()
            .and_then(|d| d.code())
            .map(|c| c.into_owned()),
        _ => None,
    };
    let mut retry_tx = begin(outbox.clone()).await;
    let retried = outbox
        .enqueue_once(&mut *retry_tx, &item(7, 2), "iso-key")
        .await;
    retry_tx.commit().await.unwrap();
    let rows = Postgres::count_outbox_rows(&outbox).await;
    Postgres::drop_tables(&outbox).await;
    assert_eq!(
        code.as_deref(),
        Some("40001"),
        "at {level}, the second writer of a key: {second:?}"
    );
    assert_eq!(retried.unwrap(), Enqueued::Duplicate(first.id()));
    assert_eq!(rows, 1);
}

// ---------------------------------------------------------------------------------------------
// Republish
// ---------------------------------------------------------------------------------------------

/// Republish while a relay holds the aggregate's lease (its handler is busy with a newer event):
/// nothing is lost, the republished events come again in order, and `check()` is clean.
async fn republish_while_a_relay_holds_the_lease<DB: TestDb>() {
    init_tracing();
    let outbox = DB::fresh().await;
    let (gate, entered) = (
        Arc::new(AtomicBool::new(false)),
        Arc::new(AtomicBool::new(false)),
    );
    let log = Log::default();
    let relay = RunningRelay::start(quick_relay(
        outbox.clone(),
        gated_dispatcher(&log, 4, gate.clone(), entered.clone()),
    ));
    let mut tx = outbox.pool().begin().await.unwrap();
    outbox
        .enqueue_batch(&mut *tx, &[item(1, 1), item(1, 2), item(1, 3)])
        .await
        .unwrap();
    tx.commit().await.unwrap();
    eventually("3 handled", WAIT, || async { log.len() == 3 }).await;
    let mut tx = outbox.pool().begin().await.unwrap();
    outbox.enqueue(&mut *tx, &item(1, 4)).await.unwrap();
    tx.commit().await.unwrap();
    eventually("the handler holds event 4", WAIT, || async {
        entered.load(Ordering::SeqCst)
    })
    .await;

    let n = outbox
        .republish(&EventFilter::new().aggregate("item", "item-1"))
        .await
        .unwrap();
    assert_eq!(n, 3, "events 1..3 are delivered, 4 is in flight");
    gate.store(true, Ordering::SeqCst);
    eventually("7 handled", WAIT, || async { log.len() >= 7 }).await;
    eventually("nothing pending", WAIT, || async {
        DB::count_status(&outbox, "pending").await == 0
    })
    .await;
    relay.stop().await;
    let after: Vec<u64> = seen(&log, "item-1")[3..].to_vec();
    let check = outbox.check().await.unwrap();
    DB::drop_tables(&outbox).await;
    assert!(check.is_empty(), "{check:?}");
    assert_eq!(
        after,
        vec![4, 1, 2, 3],
        "in-flight 4, then 1..3 again in order"
    );
}

/// Republish an earlier event of an aggregate parked at a dead event (DeadLetters::Park): the
/// republished event is delivered again, the aggregate stays parked (nothing after the dead
/// event is sent), and a requeue later delivers the rest in order.
async fn republish_on_a_parked_aggregate<DB: TestDb>() {
    init_tracing();
    let outbox = DB::fresh().await;
    let broken = Arc::new(AtomicBool::new(true));
    let log = Log::default();
    let behaviour: outbox_tests::Behaviour = {
        let broken = broken.clone();
        Arc::new(move |event, _| {
            if event.n == 2 && broken.load(Ordering::SeqCst) {
                Err(HandlerError::fatal("cannot apply"))
            } else {
                Ok(())
            }
        })
    };
    let mut tx = outbox.pool().begin().await.unwrap();
    let ids = outbox
        .enqueue_batch(&mut *tx, &[item(1, 1), item(1, 2), item(1, 3)])
        .await
        .unwrap();
    tx.commit().await.unwrap();
    let relay = RunningRelay::start(
        quick_relay(outbox.clone(), dispatcher(&log, behaviour))
            .dead_letters(outbox::DeadLetters::Park),
    );
    eventually("1 handled, 2 dead", WAIT, || async {
        log.len() == 1 && DB::count_status(&outbox, "dead").await == 1
    })
    .await;

    assert_eq!(
        outbox
            .republish(&EventFilter::new().id(ids[0]))
            .await
            .unwrap(),
        1
    );
    eventually("1 handled again", WAIT, || async { log.len() == 2 }).await;
    // Still parked: 3 must not be sent (a negative condition: give it time to go wrong).
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        seen(&log, "item-1"),
        vec![1, 1],
        "parked aggregate moved past its dead event"
    );
    assert_eq!(
        outbox.get(ids[1]).await.unwrap().unwrap().status,
        EventStatus::Dead
    );
    assert_eq!(DB::count_status(&outbox, "pending").await, 1);
    let check = outbox.check().await.unwrap();
    assert!(check.is_empty(), "{check:?}");

    broken.store(false, Ordering::SeqCst);
    assert!(outbox.requeue(ids[1]).await.unwrap());
    eventually("2 and 3 handled", WAIT, || async { log.len() == 4 }).await;
    relay.stop().await;
    assert_eq!(seen(&log, "item-1"), vec![1, 1, 2, 3]);
    assert!(outbox.check().await.unwrap().is_empty());
    DB::drop_tables(&outbox).await;
}

/// Republish one event of an aggregate that has newer pending events (the relay was down):
/// the republished one comes first, then the pending ones, in seq order; the events in between
/// that the filter left out are not sent.
async fn republish_before_newer_pending_events<DB: TestDb>() {
    init_tracing();
    let outbox = DB::fresh().await;
    let log = Log::default();
    let mut tx = outbox.pool().begin().await.unwrap();
    let ids = outbox
        .enqueue_batch(&mut *tx, &[item(1, 1), item(1, 2), item(1, 3)])
        .await
        .unwrap();
    tx.commit().await.unwrap();
    let relay = RunningRelay::start(quick_relay(outbox.clone(), dispatcher(&log, always_ok())));
    eventually("3 handled", WAIT, || async { log.len() == 3 }).await;
    relay.stop().await;
    let mut tx = outbox.pool().begin().await.unwrap();
    outbox
        .enqueue_batch(&mut *tx, &[item(1, 4), item(1, 5)])
        .await
        .unwrap();
    tx.commit().await.unwrap();
    assert_eq!(
        outbox
            .republish(&EventFilter::new().id(ids[1]))
            .await
            .unwrap(),
        1
    );
    let relay = RunningRelay::start(quick_relay(outbox.clone(), dispatcher(&log, always_ok())));
    eventually("6 handled", WAIT, || async { log.len() == 6 }).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    relay.stop().await;
    assert_eq!(seen(&log, "item-1"), vec![1, 2, 3, 2, 4, 5]);
    assert!(outbox.check().await.unwrap().is_empty());
    DB::drop_tables(&outbox).await;
}

/// Many aggregates, some archived, republished by event type while a relay runs and new events
/// keep arriving: every aggregate sees its republished events again, in seq order, and each
/// event's redelivery never precedes an older event's redelivery in its aggregate.
async fn republish_many_aggregates_under_load<DB: TestDb>() {
    init_tracing();
    let outbox = DB::fresh().await;
    let log = Log::default();
    let aggregates = 20usize;
    let mut tx = outbox.pool().begin().await.unwrap();
    let batch: Vec<ItemChanged> = (0..aggregates)
        .flat_map(|a| (1..=5).map(move |n| item(a, n)))
        .collect();
    outbox.enqueue_batch(&mut *tx, &batch).await.unwrap();
    tx.commit().await.unwrap();
    let relay = RunningRelay::start(quick_relay(outbox.clone(), dispatcher(&log, always_ok())));
    eventually("first pass", WAIT, || async { log.len() == aggregates * 5 }).await;
    // Half of them archived.
    relay.stop().await;
    outbox
        .purge(&Retention::archive_after(Duration::ZERO))
        .await
        .unwrap();
    let mut tx = outbox.pool().begin().await.unwrap();
    let more: Vec<ItemChanged> = (0..aggregates).map(|a| item(a, 6)).collect();
    outbox.enqueue_batch(&mut *tx, &more).await.unwrap();
    tx.commit().await.unwrap();
    let relay = RunningRelay::start(quick_relay(outbox.clone(), dispatcher(&log, always_ok())));
    // Republish while event 6 of each aggregate is being delivered.
    let n = outbox
        .republish(&EventFilter::new().event_type("test.item_changed"))
        .await
        .unwrap();
    // Events 1..5 are archived (delivered); event 6 may or may not be delivered yet.
    assert!(
        (aggregates as u64 * 5..=aggregates as u64 * 6).contains(&n),
        "republished {n}"
    );
    let expected = aggregates * 6 + n as usize;
    eventually("all handled", WAIT, || async { log.len() >= expected }).await;
    eventually("nothing pending", WAIT, || async {
        DB::count_status(&outbox, "pending").await == 0
    })
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    relay.stop().await;
    let total = log.len();
    let check = outbox.check().await.unwrap();
    DB::drop_tables(&outbox).await;
    assert!(check.is_empty(), "{check:?}");
    assert_eq!(
        total, expected,
        "every republished event once more, nothing else"
    );
    for a in 0..aggregates {
        let s = seen(&log, &format!("item-{a}"));
        // First pass 1..5, then 6 and the republished 1..5(6) in some interleaving that keeps
        // the republished ones in seq order.
        assert_eq!(&s[..5], &[1, 2, 3, 4, 5], "item-{a}: {s:?}");
        let tail: Vec<u64> = s[5..].to_vec();
        let again: Vec<u64> = tail.iter().copied().skip_while(|&x| x == 6).collect();
        let mut sorted = again.clone();
        sorted.sort();
        assert_eq!(again, sorted, "item-{a} redelivered out of order: {s:?}");
        assert!(again.starts_with(&[1, 2, 3, 4, 5]), "item-{a}: {s:?}");
    }
}

// ---------------------------------------------------------------------------------------------

macro_rules! on_both {
    ($($name:ident),* $(,)?) => {
        mod postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name::<super::Postgres>().await;
                }
            )*
        }
        mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name::<super::Sqlite>().await;
                }
            )*
        }
    };
}

on_both!(
    key_survives_retention_while_its_event_is_pending,
    retry_of_the_same_prepared_message_is_a_duplicate,
    keys_inside_one_batch,
    long_and_odd_keys,
    republish_while_a_relay_holds_the_lease,
    republish_on_a_parked_aggregate,
    republish_before_newer_pending_events,
    republish_many_aggregates_under_load,
);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_concurrent_keys_repeatable_read() {
    concurrent_keys_at_isolation("REPEATABLE READ").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_concurrent_keys_serializable() {
    concurrent_keys_at_isolation("SERIALIZABLE").await;
}
