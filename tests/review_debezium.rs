//! Outside review of the Debezium layout and hand-off (commit ef2df7b): attacks on ordering,
//! hand-off leftovers, idempotency, migration, values through the real router, and the
//! README's claims. Debezium runs for real (its PostgreSQL connector and outbox event router in
//! the embedded engine) on a private `wal_level = logical` cluster; the rest runs on the
//! shared PostgreSQL, MariaDB and SQLite.

use outbox::{
    EnqueueOptions, Enqueued, Envelope, EventFilter, Message, Outbox, OutboxEvent, Relay,
    Retention, TableLayout,
};
use outbox_tests::debezium::{
    assert_next_is_sentinel, count, debezium_outbox, documented_settings, envelope_of, item,
    private_pool, DebeziumProbe, DEBEZIUM_WAIT,
};
use outbox_tests::faults::servers::PrivatePostgres;
use outbox_tests::{
    always_ok, dispatcher, eventually, init_tracing, pg_pool, unique_table, Bulky, ItemChanged,
    Log, RunningRelay,
};
use serde::{Deserialize, Serialize};
use sqlx::PgPool;
use std::collections::{BTreeSet, HashMap};
use std::time::Duration;
use uuid::Uuid;

async fn assert_handed_off_tables_empty(pool: &PgPool, table: &str) {
    for t in [
        table.to_owned(),
        format!("{table}_new"),
        format!("{table}_cursors"),
    ] {
        assert_eq!(
            count(pool, &format!(r#"SELECT count(*) FROM "{t}""#)).await,
            0,
            "{t} is not empty under hand-off"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Ordering through Debezium
// ---------------------------------------------------------------------------------------------

/// Four writers at once on three aggregates, through every enqueue path (single, batch with
/// interleaved aggregates, `enqueue_messages` with idempotency keys and duplicates both within
/// the batch and from an earlier transaction, `enqueue_once`): Debezium routes every new event
/// once, no duplicate, and each aggregate's events with sequence 1, 2, 3, … in that order,
/// each transaction's events in the order they were given.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn dbz_concurrent_writers_every_enqueue_path_keeps_each_aggregates_order() {
    init_tracing();
    let cluster = PrivatePostgres::start_logical();
    let pool = private_pool(&cluster).await;
    let table = unique_table();
    let outbox = debezium_outbox(&pool, &table, true).await;
    let probe = DebeziumProbe::start(cluster.port, &table, &documented_settings());

    // id -> (writer, transaction, position in the transaction)
    let mut tasks = Vec::new();
    for w in 0..4u64 {
        let (pool, outbox) = (pool.clone(), outbox.clone());
        tasks.push(tokio::spawn(async move {
            let mut new: Vec<(Uuid, (u64, u64, usize))> = Vec::new();
            let mut duplicates = 0usize;
            for round in 0..8u64 {
                let n = |i: u64| w * 10_000 + round * 100 + i;
                let mut tx = pool.begin().await.unwrap();
                let mut ids: Vec<Uuid> = Vec::new();
                match (w + round) % 4 {
                    0 => {
                        ids.push(outbox.enqueue(&mut *tx, &item("a", n(0))).await.unwrap());
                        ids.push(outbox.enqueue(&mut *tx, &item("a", n(1))).await.unwrap());
                        ids.push(outbox.enqueue(&mut *tx, &item("b", n(2))).await.unwrap());
                    }
                    1 => {
                        let batch = [
                            item("a", n(0)),
                            item("b", n(1)),
                            item("a", n(2)),
                            item("c", n(3)),
                            item("b", n(4)),
                            item("a", n(5)),
                        ];
                        ids.extend(outbox.enqueue_batch(&mut *tx, &batch).await.unwrap());
                    }
                    2 => {
                        let key = |k: &str| format!("w{w}-r{round}-{k}");
                        let msg = |e: ItemChanged, key: Option<String>| {
                            let mut o = EnqueueOptions::new();
                            if let Some(key) = key {
                                o = o.idempotency_key(key);
                            }
                            Message::with_options(&e, o).unwrap()
                        };
                        let mut messages = vec![
                            msg(item("a", n(0)), Some(key("k1"))),
                            msg(item("b", n(1)), Some(key("k2"))),
                            // The same key again in this batch: a duplicate.
                            msg(item("a", n(2)), Some(key("k1"))),
                            msg(item("a", n(3)), None),
                            msg(item("c", n(4)), Some(key("k3"))),
                            msg(item("b", n(5)), None),
                        ];
                        if round >= 4 {
                            // A key a previous transaction of this writer committed.
                            messages.push(msg(
                                item("c", n(6)),
                                Some(format!("w{w}-r{}-k3", round - 4)),
                            ));
                        }
                        for outcome in outbox.enqueue_messages(&mut *tx, &messages).await.unwrap() {
                            match outcome {
                                Enqueued::New(id) => ids.push(id),
                                Enqueued::Duplicate(_) => duplicates += 1,
                            }
                        }
                    }
                    _ => {
                        let once = outbox
                            .enqueue_once(&mut *tx, &item("a", n(0)), format!("w{w}-r{round}-once"))
                            .await
                            .unwrap();
                        ids.push(once.id());
                        let again = outbox
                            .enqueue_once(&mut *tx, &item("a", n(1)), format!("w{w}-r{round}-once"))
                            .await
                            .unwrap();
                        assert!(matches!(again, Enqueued::Duplicate(id) if id == once.id()));
                        duplicates += 1;
                        ids.push(outbox.enqueue(&mut *tx, &item("b", n(2))).await.unwrap());
                        ids.push(outbox.enqueue(&mut *tx, &item("c", n(3))).await.unwrap());
                    }
                }
                tx.commit().await.unwrap();
                new.extend(
                    ids.into_iter()
                        .enumerate()
                        .map(|(pos, id)| (id, (w, round, pos))),
                );
            }
            (new, duplicates)
        }));
    }
    let mut written: HashMap<Uuid, (u64, u64, usize)> = HashMap::new();
    let mut duplicates = 0;
    for task in tasks {
        let (new, dups) = task.await.unwrap();
        duplicates += dups;
        written.extend(new);
    }
    assert!(duplicates > 0);

    let routed = probe.take(written.len(), DEBEZIUM_WAIT);
    let envelopes: Vec<Envelope> = routed.iter().map(envelope_of).collect();
    let routed_ids: BTreeSet<Uuid> = envelopes.iter().map(|e| e.id).collect();
    assert_eq!(routed_ids.len(), envelopes.len(), "an event routed twice");
    assert_eq!(
        routed_ids,
        written.keys().copied().collect::<BTreeSet<_>>(),
        "routed events differ from the new events"
    );
    for aggregate in ["a", "b", "c"] {
        let of: Vec<&Envelope> = envelopes
            .iter()
            .filter(|e| e.aggregate_id == aggregate)
            .collect();
        let seqs: Vec<i64> = of.iter().map(|e| e.sequence).collect();
        assert_eq!(
            seqs,
            (1..=of.len() as i64).collect::<Vec<_>>(),
            "{aggregate}: Debezium's order of sequence numbers"
        );
        // Within one transaction, the order the events were given.
        for pair in of.windows(2) {
            let (x, y) = (written[&pair[0].id], written[&pair[1].id]);
            if (x.0, x.1) == (y.0, y.1) {
                assert!(x.2 < y.2, "{aggregate}: {x:?} routed before {y:?}");
            }
        }
    }
    assert_next_is_sentinel(&pool, &outbox, &probe).await;
    assert_handed_off_tables_empty(&pool, &table).await;
}

// ---------------------------------------------------------------------------------------------
// Values through the router
// ---------------------------------------------------------------------------------------------

/// An event with a unicode, quoted event type and aggregate type.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Odd {
    id: String,
    text: String,
}

impl OutboxEvent for Odd {
    const EVENT_TYPE: &'static str = "tést.événement \"quoted\" 'single' \\ 🙂";
    const AGGREGATE_TYPE: &'static str = "agg ü \"q\"";
    const SCHEMA_VERSION: u32 = 7;
    const TOPIC: &'static str = "odd-topic";

    fn aggregate_id(&self) -> String {
        self.id.clone()
    }
}

fn odd_headers() -> EnqueueOptions {
    EnqueueOptions::new()
        .correlation_id("req \"1\" ü")
        .causation_id("cause\\back")
        .traceparent("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01")
        .header("x-json", r#"{"a":[1,"two",null],"b":"\"quoted\""}"#)
        .header("x-unicode", "日本語 🙂 \u{2028}")
        .header("x-tab", "a\tb")
        .header("x-empty", "")
        .header("x-long", "v".repeat(16 * 1024))
}

/// Odd values (unicode, quotes, backslashes, NUL escapes in the payload, the longest aggregate
/// id, a 3 MB payload, odd header values) come out of the router, read with
/// `Envelope::from_wire` under the README's settings, as the library's own store hands them
/// (`Outbox::get`): id, event type, aggregate, sequence, schema version, payload byte for byte,
/// stored headers (Debezium's own `id` header aside, see the next test).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dbz_odd_values_survive_the_documented_router_settings() {
    init_tracing();
    let cluster = PrivatePostgres::start_logical();
    let pool = private_pool(&cluster).await;
    let table = unique_table();
    // No hand-off: the rows stay, so the library's own view of each event is the reference.
    let outbox = debezium_outbox(&pool, &table, false).await;
    let probe = DebeziumProbe::start(cluster.port, &table, &documented_settings());

    let longest = format!("{}ü", "x".repeat(1022)); // 1024 bytes
    assert_eq!(longest.len(), 1024);
    let odd = [
        Odd {
            id: "quote\"s 'and' \\back\\slash".into(),
            text: "nul \u{0} here, \u{1} and \"quotes\" \\ and 🙂".into(),
        },
        Odd {
            id: "日本語🙂  spaces  ".into(),
            text: "\u{2028}\u{2029}\u{feff}".into(),
        },
        Odd {
            id: longest.clone(),
            text: String::new(),
        },
    ];
    let mut tx = pool.begin().await.unwrap();
    let mut ids = Vec::new();
    for e in &odd {
        ids.push(
            outbox
                .enqueue_with(&mut *tx, e, odd_headers())
                .await
                .unwrap(),
        );
    }
    let big = Bulky {
        item: "big \"one\"".into(),
        pad: "é\u{0}".repeat(1_000_000),
    };
    ids.push(
        outbox
            .enqueue_with(&mut *tx, &big, odd_headers())
            .await
            .unwrap(),
    );
    tx.commit().await.unwrap();

    let routed = probe.take(ids.len(), DEBEZIUM_WAIT);
    for (id, message) in ids.iter().zip(&routed) {
        let stored = outbox.get(*id).await.unwrap().expect("the row");
        let got = envelope_of(message);
        assert_eq!(got.id, *id);
        assert_eq!(
            message.key.as_deref(),
            Some(stored.aggregate_id.as_str()),
            "key"
        );
        assert_eq!(message.topic, stored.topic, "topic");
        assert_eq!(got.event_type, stored.event_type);
        assert_eq!(got.aggregate_type, stored.aggregate_type);
        assert_eq!(got.aggregate_id, stored.aggregate_id);
        assert_eq!(got.sequence, stored.sequence);
        assert_eq!(got.schema_version, stored.schema_version);
        assert!(got.payload == stored.payload, "payload of {id} differs");
        let mut headers = got.headers.clone();
        headers.remove("id");
        assert_eq!(headers, stored.headers, "headers of {id}");
    }
    assert_eq!(routed[2].key.as_deref(), Some(longest.as_str()));
    let big_back: Bulky = serde_json::from_str(routed[3].value.as_deref().unwrap()).unwrap();
    assert_eq!(big_back.pad, big.pad);
}

/// `Envelope::from_wire` on a message routed with the README's settings gives back exactly the
/// stored headers, as it does for a message this library's relay sent (so a consumer or a
/// forwarding handler sees no difference). The router always adds its own `id` header.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dbz_rebuilt_envelope_has_exactly_the_stored_headers() {
    init_tracing();
    let cluster = PrivatePostgres::start_logical();
    let pool = private_pool(&cluster).await;
    let table = unique_table();
    let outbox = debezium_outbox(&pool, &table, false).await;
    let probe = DebeziumProbe::start(cluster.port, &table, &documented_settings());

    let mut tx = pool.begin().await.unwrap();
    let options = EnqueueOptions::new()
        .correlation_id("req-1")
        .header("tenant", "acme");
    let id = outbox
        .enqueue_with(&mut *tx, &item("h-1", 1), options.clone())
        .await
        .unwrap();
    // A user header named `id`: not reserved, so enqueue takes it.
    let with_id = outbox
        .enqueue_with(&mut *tx, &item("h-1", 2), options.header("id", "order-42"))
        .await
        .unwrap();
    tx.commit().await.unwrap();

    // The library's relay path: the stored envelope through its own wire headers.
    let stored = outbox.get(id).await.unwrap().unwrap();
    let routed = probe.take(2, DEBEZIUM_WAIT);
    let from_debezium = envelope_of(&routed[0]);
    assert_eq!(from_debezium.id, id);
    let from_with_id = envelope_of(&routed[1]);
    assert_eq!(from_with_id.id, with_id);

    let mut failures = Vec::new();
    if from_debezium.headers != stored.headers {
        failures.push(format!(
            "headers via Debezium {:?} != stored {:?}",
            from_debezium.headers, stored.headers
        ));
    }
    let user_id = from_with_id.headers.get("id").map(String::as_str);
    if user_id != Some("order-42") {
        failures.push(format!(
            "the user's header `id` = \"order-42\" arrives as {user_id:?}"
        ));
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

// ---------------------------------------------------------------------------------------------
// Hand-off semantics through Debezium
// ---------------------------------------------------------------------------------------------

/// Idempotency keys, rollback and savepoints under hand-off: `enqueue_once` twice (in two
/// transactions, and by four transactions at once) gives one event to Debezium; a rolled-back
/// transaction's or savepoint's event never shows, and leaves no gap in the sequence.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn dbz_idempotency_rollback_and_savepoints_under_hand_off() {
    init_tracing();
    let cluster = PrivatePostgres::start_logical();
    let pool = private_pool(&cluster).await;
    let table = unique_table();
    let outbox = debezium_outbox(&pool, &table, true).await;
    let probe = DebeziumProbe::start(cluster.port, &table, &documented_settings());

    let mut expected: Vec<Uuid> = Vec::new();
    // Twice, one after the other.
    let mut tx = pool.begin().await.unwrap();
    let first = outbox
        .enqueue_once(&mut *tx, &item("k", 1), "key-1")
        .await
        .unwrap();
    tx.commit().await.unwrap();
    assert!(first.is_new());
    expected.push(first.id());
    let mut tx = pool.begin().await.unwrap();
    let second = outbox
        .enqueue_once(&mut *tx, &item("k", 99), "key-1")
        .await
        .unwrap();
    tx.commit().await.unwrap();
    assert!(matches!(second, Enqueued::Duplicate(id) if id == first.id()));

    // Four at once.
    let mut racers = Vec::new();
    for r in 0..4 {
        let (pool, outbox) = (pool.clone(), outbox.clone());
        racers.push(tokio::spawn(async move {
            let mut tx = pool.begin().await.unwrap();
            let got = outbox
                .enqueue_once(&mut *tx, &item("k", 100 + r), "key-2")
                .await
                .unwrap();
            tokio::time::sleep(Duration::from_millis(50)).await;
            tx.commit().await.unwrap();
            got
        }));
    }
    let mut outcomes = Vec::new();
    for r in racers {
        outcomes.push(r.await.unwrap());
    }
    let winners: Vec<Uuid> = outcomes
        .iter()
        .filter(|o| o.is_new())
        .map(|o| o.id())
        .collect();
    assert_eq!(winners.len(), 1, "{outcomes:?}");
    assert!(
        outcomes.iter().all(|o| o.id() == winners[0]),
        "{outcomes:?}"
    );
    expected.push(winners[0]);

    // Rolled back, then again: the key is free, the event shows once.
    let mut tx = pool.begin().await.unwrap();
    outbox
        .enqueue_once(&mut *tx, &item("k", 200), "key-3")
        .await
        .unwrap();
    tx.rollback().await.unwrap();
    let mut tx = pool.begin().await.unwrap();
    let third = outbox
        .enqueue_once(&mut *tx, &item("k", 201), "key-3")
        .await
        .unwrap();
    assert!(third.is_new());
    // A savepoint rolled back inside the same transaction.
    {
        use sqlx::Acquire;
        let mut sp = (&mut tx).begin().await.unwrap();
        outbox.enqueue(&mut *sp, &item("k", 202)).await.unwrap();
        sp.rollback().await.unwrap();
    }
    let after_sp = outbox.enqueue(&mut *tx, &item("k", 203)).await.unwrap();
    tx.commit().await.unwrap();
    expected.push(third.id());
    expected.push(after_sp);

    let routed = probe.take(expected.len(), DEBEZIUM_WAIT);
    let envelopes: Vec<Envelope> = routed.iter().map(envelope_of).collect();
    assert_eq!(envelopes.iter().map(|e| e.id).collect::<Vec<_>>(), expected);
    assert_eq!(
        envelopes.iter().map(|e| e.sequence).collect::<Vec<_>>(),
        vec![1, 2, 3, 4],
        "no gap from the rolled-back events"
    );
    let ns: Vec<u64> = envelopes
        .iter()
        .map(|e| serde_json::from_str::<ItemChanged>(&e.payload).unwrap().n)
        .collect();
    assert_eq!(ns[0], 1);
    assert_eq!(&ns[2..], &[201, 203]);
    assert_next_is_sentinel(&pool, &outbox, &probe).await;
    assert_handed_off_tables_empty(&pool, &table).await;
    assert_eq!(
        count(&pool, &format!(r#"SELECT count(*) FROM "{table}_keys""#)).await,
        3,
        "the keys are kept for the next retry"
    );
}

/// An event deferred with `delay` / `enqueue_at` under hand-off: this library's relay would
/// hold it (and its aggregate's later events) until it is due. Handed off, it either must be
/// refused at enqueue, or must not reach Debezium before it is due.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dbz_a_deferred_event_is_not_published_early_under_hand_off() {
    init_tracing();
    let cluster = PrivatePostgres::start_logical();
    let pool = private_pool(&cluster).await;
    let table = unique_table();
    let outbox = debezium_outbox(&pool, &table, true).await;
    let probe = DebeziumProbe::start(cluster.port, &table, &[]);

    let mut tx = pool.begin().await.unwrap();
    let delayed = outbox
        .enqueue_with(
            &mut *tx,
            &item("later", 1),
            EnqueueOptions::new().delay(Duration::from_secs(3600)),
        )
        .await;
    let at = outbox
        .enqueue_at(
            &mut *tx,
            &item("later", 2),
            chrono::Utc::now() + chrono::Duration::days(30),
        )
        .await;
    eprintln!("deferred enqueue outcomes: {delayed:?} / {at:?}");
    if delayed.is_err() && at.is_err() {
        // Refused: fine.
        return;
    }
    tx.commit().await.unwrap();
    // Nothing may be routed before the sentinel, committed now.
    assert_next_is_sentinel(&pool, &outbox, &probe).await;
}

/// After the cut-over (writers hand off, the relay is stopped), `republish` of a delivered
/// event still in the table reports it republished. Expected: it reaches Debezium again (or
/// `republish` refuses); it must not report success and do nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dbz_republish_after_the_cut_over_reaches_debezium_or_is_refused() {
    init_tracing();
    let cluster = PrivatePostgres::start_logical();
    let pool = private_pool(&cluster).await;
    let table = unique_table();
    let relayed = debezium_outbox(&pool, &table, false).await;
    let log = Log::default();
    let mut tx = pool.begin().await.unwrap();
    let id = relayed.enqueue(&mut *tx, &item("r-1", 1)).await.unwrap();
    tx.commit().await.unwrap();
    let relay = RunningRelay::start(
        Relay::builder(relayed.clone(), dispatcher(&log, always_ok()))
            .poll_interval(Duration::from_millis(20)),
    );
    eventually("the relay delivers", DEBEZIUM_WAIT, || async {
        log.len() == 1
    })
    .await;
    relay.stop().await;

    let probe = DebeziumProbe::start(cluster.port, &table, &[]);
    let handed_off = debezium_outbox(&pool, &table, true).await;
    match handed_off
        .republish(&EventFilter::new().aggregate("item", "r-1"))
        .await
    {
        Err(refused) => {
            let refused = refused.to_string();
            assert!(
                refused.contains("republish") && refused.contains("Debezium"),
                "{refused}"
            );
            return;
        }
        Ok(n) => assert_eq!(n, 1),
    }
    let mut tx = pool.begin().await.unwrap();
    let sentinel = handed_off
        .enqueue(&mut *tx, &item("sentinel", 0))
        .await
        .unwrap();
    tx.commit().await.unwrap();
    let next = probe.take(1, DEBEZIUM_WAIT).remove(0);
    let pending = count(
        &pool,
        &format!(r#"SELECT count(*) FROM "{table}" WHERE status = 'pending'"#),
    )
    .await;
    assert_eq!(
        next.header("id"),
        Some(id.to_string().as_str()),
        "republish returned 1, but the next message Debezium routed is the sentinel {sentinel} \
         ({next:?}); the republished event stays pending in the table ({pending} pending) \
         with no relay to deliver it"
    );
}

// ---------------------------------------------------------------------------------------------
// Hand-off on the shared server (no WAL reader needed)
// ---------------------------------------------------------------------------------------------

/// Hand-off leaves no event, announcement or cursor behind; `get`, `status` and `check` agree;
/// the counters and keys stay (they must).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hand_off_leaves_nothing_behind() {
    let pool = pg_pool().await;
    let table = unique_table();
    let outbox = debezium_outbox(&pool, &table, true).await;
    let mut tx = pool.begin().await.unwrap();
    let one = outbox.enqueue(&mut *tx, &item("x", 1)).await.unwrap();
    outbox
        .enqueue_batch(&mut *tx, &[item("x", 2), item("y", 1)])
        .await
        .unwrap();
    let once = outbox
        .enqueue_once(&mut *tx, &item("y", 2), "hk-1")
        .await
        .unwrap();
    tx.commit().await.unwrap();
    assert_handed_off_tables_empty(&pool, &table).await;
    assert!(outbox.get(one).await.unwrap().is_none());
    let status = outbox.status(Duration::from_secs(60)).await.unwrap();
    assert_eq!((status.pending, status.delivered, status.dead), (0, 0, 0));
    assert!(outbox.check().await.unwrap().is_empty());
    let counters: Vec<(String, i64)> = sqlx::query_as(&format!(
        r#"SELECT aggregate_id, last_seq FROM "{table}_aggregates" ORDER BY aggregate_id"#
    ))
    .fetch_all(&pool)
    .await
    .unwrap();
    assert_eq!(counters, vec![("x".into(), 2), ("y".into(), 2)]);
    let mut tx = pool.begin().await.unwrap();
    let again = outbox
        .enqueue_once(&mut *tx, &item("y", 3), "hk-1")
        .await
        .unwrap();
    tx.commit().await.unwrap();
    assert!(matches!(again, Enqueued::Duplicate(id) if id == once.id()));
}

/// The README: under hand-off "idempotency keys still work (run `outbox purge` on a schedule to
/// drop old ones)". One purge must drop every key older than the retention, as it does in the
/// standard layout, whatever the batch size.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hand_off_one_purge_drops_every_old_key() {
    let pool = pg_pool().await;
    let table = unique_table();
    let outbox = debezium_outbox(&pool, &table, true).await;
    let mut tx = pool.begin().await.unwrap();
    for n in 0..25 {
        outbox
            .enqueue_once(&mut *tx, &item("p", n), format!("purge-{n}"))
            .await
            .unwrap();
    }
    tx.commit().await.unwrap();
    let keys = format!(r#"SELECT count(*) FROM "{table}_keys""#);
    assert_eq!(count(&pool, &keys).await, 25);
    outbox
        .purge(&Retention::delete_after(Duration::ZERO).batch_size(10))
        .await
        .unwrap();
    assert_eq!(
        count(&pool, &keys).await,
        0,
        "keys older than the retention left after one purge"
    );
}

// ---------------------------------------------------------------------------------------------
// Migration
// ---------------------------------------------------------------------------------------------

async fn columns_of(pool: &PgPool, table: &str) -> Vec<(String, String, String)> {
    sqlx::query_as(
        "SELECT column_name::text, data_type::text, is_nullable::text
         FROM information_schema.columns WHERE table_schema = 'public' AND table_name = $1
         ORDER BY ordinal_position",
    )
    .bind(table)
    .fetch_all(pool)
    .await
    .unwrap()
}

/// A migration version above 6 already recorded (a later library's step): the layout's step 6
/// is still applied, by set, and `migrate` stays idempotent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn step_6_is_applied_after_a_later_version_was_recorded() {
    let pool = pg_pool().await;
    let table = unique_table();
    let standard = Outbox::builder(pool.clone()).table(&table).build().unwrap();
    standard.migrate().await.unwrap();
    sqlx::query(&format!(
        r#"INSERT INTO "{table}_migrations" (version, description) VALUES (7, 'from the future')"#
    ))
    .execute(&pool)
    .await
    .unwrap();
    let outbox = debezium_outbox(&pool, &table, false).await;
    outbox.migrate().await.unwrap();
    let names: Vec<String> = columns_of(&pool, &table)
        .await
        .into_iter()
        .map(|c| c.0)
        .collect();
    for c in ["aggregatetype", "aggregateid", "type"] {
        assert!(names.contains(&c.to_owned()), "{c} in {names:?}");
    }
    let versions: Vec<i64> = sqlx::query_scalar(&format!(
        r#"SELECT version FROM "{table}_migrations" ORDER BY version"#
    ))
    .fetch_all(&pool)
    .await
    .unwrap();
    assert_eq!(versions, vec![1, 2, 3, 4, 5, 6, 7]);
}

/// Six migrators at once on a fresh table, four with the layout and two without, while
/// layout writers wait to write: no error, every step once, and the writers' rows complete.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_migrators_of_both_layouts() {
    let pool = pg_pool().await;
    let table = unique_table();
    let mut tasks = Vec::new();
    for i in 0..6 {
        let (pool, table) = (pool.clone(), table.clone());
        tasks.push(tokio::spawn(async move {
            let layout = if i % 3 == 2 {
                TableLayout::Standard
            } else {
                TableLayout::Debezium
            };
            let outbox = Outbox::builder(pool.clone())
                .table(&table)
                .layout(layout)
                .build()
                .unwrap();
            outbox.migrate().await
        }));
    }
    for t in tasks {
        t.await.unwrap().unwrap();
    }
    let versions: Vec<i64> = sqlx::query_scalar(&format!(
        r#"SELECT version FROM "{table}_migrations" ORDER BY version"#
    ))
    .fetch_all(&pool)
    .await
    .unwrap();
    assert_eq!(versions, vec![1, 2, 3, 4, 5, 6]);
}

/// The SQL `migration_sql()` hands an external migration tool builds the same table and
/// archive as `migrate`, and the archive's columns line up with the table's one for one
/// (`INSERT … SELECT *` moves rows both ways), also for a table that took the layout late.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migration_sql_builds_what_migrate_builds_and_the_archive_lines_up() {
    let pool = pg_pool().await;
    let by_migrate = unique_table();
    let outbox = debezium_outbox(&pool, &by_migrate, false).await;

    let by_tool = unique_table();
    let tool = Outbox::builder(pool.clone())
        .table(&by_tool)
        .layout(TableLayout::Debezium)
        .build()
        .unwrap();
    let mut tx = pool.begin().await.unwrap();
    for (_, _, sql) in tool.migration_sql() {
        sqlx::raw_sql(&sql).execute(&mut *tx).await.unwrap();
    }
    tx.commit().await.unwrap();

    let late = unique_table();
    let standard = Outbox::builder(pool.clone()).table(&late).build().unwrap();
    standard.migrate().await.unwrap();
    debezium_outbox(&pool, &late, false).await;

    let reference = columns_of(&pool, &by_migrate).await;
    assert!(!reference.is_empty());
    for t in [
        format!("{by_migrate}_archive"),
        by_tool.clone(),
        format!("{by_tool}_archive"),
        late.clone(),
        format!("{late}_archive"),
    ] {
        assert_eq!(columns_of(&pool, &t).await, reference, "{t}");
    }
    assert_eq!(outbox.migration_sql().len(), 6);
}

/// The layout refused where it cannot work, with messages that name the problem.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn layout_and_hand_off_errors_on_mysql_and_sqlite_name_the_problem() {
    let mysql = outbox_tests::mysql_pool().await;
    let err = Outbox::builder(mysql.clone())
        .layout(TableLayout::Debezium)
        .hand_off(true)
        .build()
        .unwrap_err()
        .to_string();
    assert!(err.contains("Debezium") && err.contains("MySQL"), "{err}");
    let sqlite = outbox_tests::sqlite_pool().await;
    let err = Outbox::builder(sqlite)
        .layout(TableLayout::Debezium)
        .hand_off(true)
        .build()
        .unwrap_err()
        .to_string();
    assert!(err.contains("Debezium") && err.contains("SQLite"), "{err}");
    // Standard layout with hand-off on MySQL: refused (wording checked loosely).
    let err = Outbox::builder(mysql)
        .hand_off(true)
        .build()
        .unwrap_err()
        .to_string();
    assert!(err.contains("hand_off"), "{err}");
}

/// A writer built without the layout (an older build, during a rolling deploy), on a table
/// that has it, writes rows Debezium can route on every path (batch, keys): the trigger fills
/// the columns. (The review found that such a writer failed; the layout now takes a trigger.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_standard_writer_fills_the_columns_on_every_path() {
    let pool = pg_pool().await;
    let table = unique_table();
    let _outbox = debezium_outbox(&pool, &table, false).await;
    let standard = Outbox::builder(pool.clone()).table(&table).build().unwrap();
    let mut tx = pool.begin().await.unwrap();
    standard
        .enqueue_batch(&mut *tx, &[item("s", 1), item("t", 1)])
        .await
        .unwrap();
    standard
        .enqueue_once(&mut *tx, &item("s", 2), "std-key")
        .await
        .unwrap();
    standard.enqueue(&mut *tx, &item("u", 1)).await.unwrap();
    tx.commit().await.unwrap();
    let filled = format!(
        r#"SELECT count(*) FROM "{table}" WHERE aggregatetype = aggregate_type
           AND aggregateid = aggregate_id AND "type" = event_type"#
    );
    assert_eq!(count(&pool, &filled).await, 4);
}
