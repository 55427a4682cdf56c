//! The Debezium layout (`TableLayout::Debezium`) and hand-off (`OutboxBuilder::hand_off`):
//! the table's columns as Debezium's outbox event router reads them, checked against the real
//! router (Debezium's PostgreSQL connector in its embedded engine, on a private cluster with
//! `wal_level = logical`), this library's relay on the same table, and the cut-over from one
//! to the other.

use outbox::{EnqueueOptions, EventFilter, Outbox, Relay, Retention, TableLayout};
use outbox_tests::debezium::{
    assert_next_is_sentinel, count, debezium_outbox, documented_settings, envelope_of, item,
    private_pool, DebeziumProbe, DEBEZIUM_WAIT,
};
use outbox_tests::faults::servers::PrivatePostgres;
use outbox_tests::{
    always_ok, dispatcher, eventually, init_tracing, pg_pool, unique_table, ItemChanged, Log,
    RunningRelay,
};
use sqlx::{PgPool, Postgres};
use std::collections::BTreeMap;
use std::time::Duration;
use uuid::Uuid;

/// The router's columns of event `id`, enqueued as `item("i-1", 1)`.
async fn assert_routed_columns(pool: &PgPool, table: &str, id: Uuid) {
    let columns: (String, String, String) = sqlx::query_as(&format!(
        r#"SELECT aggregatetype, aggregateid, "type" FROM "{table}" WHERE id = $1"#
    ))
    .bind(id)
    .fetch_one(pool)
    .await
    .unwrap();
    assert_eq!(
        (columns.0.as_str(), columns.1.as_str(), columns.2.as_str()),
        ("item", "i-1", "test.item_changed")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_layout_has_the_columns_the_router_reads_by_default() {
    let pool = pg_pool().await;
    let table = unique_table();
    let outbox = debezium_outbox(&pool, &table, false).await;
    let columns: BTreeMap<String, (String, String)> =
        sqlx::query_as::<_, (String, String, String)>(
            "SELECT column_name::text, data_type::text, is_nullable::text
         FROM information_schema.columns WHERE table_name = $1",
        )
        .bind(&table)
        .fetch_all(&pool)
        .await
        .unwrap()
        .into_iter()
        .map(|(name, ty, nullable)| (name, (ty, nullable)))
        .collect();
    // Debezium's expected table: id uuid, aggregatetype, aggregateid and type as strings, and
    // payload (jsonb there; text here keeps serde's bytes, and the router reads both as a
    // string).
    for (name, ty) in [
        ("id", "uuid"),
        ("aggregatetype", "text"),
        ("aggregateid", "text"),
        ("type", "text"),
        ("payload", "text"),
    ] {
        assert_eq!(
            columns.get(name),
            Some(&(ty.to_owned(), "NO".to_owned())),
            "{name} in {columns:?}"
        );
    }

    let mut tx = pool.begin().await.unwrap();
    let id = outbox.enqueue(&mut *tx, &item("i-1", 1)).await.unwrap();
    tx.commit().await.unwrap();
    assert_routed_columns(&pool, &table, id).await;

    // The step exists only in this layout.
    let standard = Outbox::builder(pool.clone()).table(&table).build().unwrap();
    assert!(standard.migration_sql().iter().all(|(v, _, _)| *v != 6));
    assert!(outbox.migration_sql().iter().any(|(v, _, _)| *v == 6));
}

/// A writer built without the layout (an older build during a rolling deploy) still writes
/// rows Debezium can route: a trigger fills the columns.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_writer_without_the_layout_still_fills_the_columns() {
    let pool = pg_pool().await;
    let table = unique_table();
    let _outbox = debezium_outbox(&pool, &table, false).await;
    let standard = Outbox::builder(pool.clone()).table(&table).build().unwrap();
    let mut tx = pool.begin().await.unwrap();
    let id = standard.enqueue(&mut *tx, &item("i-1", 1)).await.unwrap();
    tx.commit().await.unwrap();
    assert_routed_columns(&pool, &table, id).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_layout_and_hand_off_are_refused_where_they_cannot_work() {
    let sqlite = outbox_tests::sqlite_pool().await;
    let err = Outbox::builder(sqlite)
        .layout(TableLayout::Debezium)
        .build()
        .unwrap_err()
        .to_string();
    assert!(err.contains("Debezium") && err.contains("SQLite"), "{err}");
    let err = Outbox::builder(pg_pool().await)
        .hand_off(true)
        .build()
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("hand_off needs the Debezium table layout"),
        "{err}"
    );
}

/// Debezium publishes at commit: a hand-off outbox refuses a deferred event, naming it, before
/// it writes anything.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hand_off_refuses_deferred_delivery() {
    let pool = pg_pool().await;
    let table = unique_table();
    let outbox = debezium_outbox(&pool, &table, true).await;
    let mut tx = pool.begin().await.unwrap();
    let later = chrono::Utc::now() + chrono::Duration::hours(1);
    for err in [
        outbox
            .enqueue_at(&mut *tx, &item("i-1", 1), later)
            .await
            .unwrap_err(),
        outbox
            .enqueue_with(
                &mut *tx,
                &item("i-1", 1),
                EnqueueOptions::new().delay(Duration::from_secs(5)),
            )
            .await
            .unwrap_err(),
    ] {
        let err = err.to_string();
        assert!(
            err.contains("test.item_changed") && err.contains("cannot defer"),
            "{err}"
        );
    }
    let mut messages = vec![outbox::Message::new(&item("i-2", 1)).unwrap()];
    messages.push(
        outbox::Message::with_options(&item("i-2", 2), EnqueueOptions::new().available_at(later))
            .unwrap(),
    );
    assert!(outbox.enqueue_messages(&mut *tx, &messages).await.is_err());
    // Nothing was written: the transaction is still good, and an undeferred event goes through.
    outbox.enqueue(&mut *tx, &item("i-3", 1)).await.unwrap();
    tx.commit().await.unwrap();
    let counted = count(
        &pool,
        &format!(r#"SELECT last_seq FROM "{table}_aggregates" WHERE aggregate_id = 'i-3'"#),
    )
    .await;
    assert_eq!(counted, 1);
    assert_eq!(
        count(
            &pool,
            &format!(r#"SELECT count(*) FROM "{table}_aggregates""#)
        )
        .await,
        1
    );
}

/// An existing table with pending, delivered and archived rows takes the layout at `migrate`:
/// every row gets the columns, the relay delivers what was pending, and archived rows come
/// back with `republish`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_existing_table_takes_the_layout_and_the_relay_keeps_working() {
    init_tracing();
    let pool = pg_pool().await;
    let table = unique_table();
    let standard = Outbox::builder(pool.clone()).table(&table).build().unwrap();
    standard.migrate().await.unwrap();
    let log = Log::default();
    let mut tx = pool.begin().await.unwrap();
    standard
        .enqueue_batch(&mut *tx, &[item("a", 1), item("b", 1)])
        .await
        .unwrap();
    tx.commit().await.unwrap();
    let relay = RunningRelay::start(
        Relay::builder(standard.clone(), dispatcher(&log, always_ok()))
            .poll_interval(Duration::from_millis(20)),
    );
    eventually(
        "the first events handled",
        Duration::from_secs(30),
        || async { log.len() == 2 },
    )
    .await;
    relay.stop().await;
    // One archived (delivered), one pending from before the layout.
    standard
        .purge(&Retention::archive_after(Duration::ZERO))
        .await
        .unwrap();
    let mut tx = pool.begin().await.unwrap();
    standard.enqueue(&mut *tx, &item("a", 2)).await.unwrap();
    tx.commit().await.unwrap();

    let outbox = debezium_outbox(&pool, &table, false).await;
    for t in [table.clone(), format!("{table}_archive")] {
        let unfilled = count(
            &pool,
            &format!(
                r#"SELECT count(*) FROM "{t}" WHERE aggregatetype IS DISTINCT FROM aggregate_type
                   OR aggregateid IS DISTINCT FROM aggregate_id OR "type" IS DISTINCT FROM event_type"#
            ),
        )
        .await;
        assert_eq!(unfilled, 0, "{t}");
    }
    assert_eq!(
        count(&pool, &format!(r#"SELECT count(*) FROM "{table}_archive""#)).await,
        2
    );

    let mut tx = pool.begin().await.unwrap();
    outbox
        .enqueue_batch(&mut *tx, &[item("a", 3), item("b", 2)])
        .await
        .unwrap();
    outbox.enqueue(&mut *tx, &item("a", 4)).await.unwrap();
    tx.commit().await.unwrap();
    // Back from the archive: the archive's columns line up with the table's.
    assert_eq!(
        outbox
            .republish(&EventFilter::new().aggregate("item", "b"))
            .await
            .unwrap(),
        1
    );
    let relay = RunningRelay::start(
        Relay::builder(outbox.clone(), dispatcher(&log, always_ok()))
            .poll_interval(Duration::from_millis(20)),
    );
    eventually("every event handled", Duration::from_secs(30), || async {
        log.len() == 7
    })
    .await;
    relay.stop().await;
    let seen: Vec<(String, u64)> = log
        .snapshot()
        .into_iter()
        .map(|h| (h.event.item, h.event.n))
        .collect();
    let of = |agg: &str| -> Vec<u64> {
        seen.iter()
            .filter(|(a, _)| a == agg)
            .map(|(_, n)| *n)
            .collect()
    };
    assert_eq!(of("a"), vec![1, 2, 3, 4]);
    assert_eq!(
        of("b"),
        vec![1, 1, 2],
        "b's first event again, then its new one"
    );
}

/// Hand-off with the router's defaults: topic `outbox.event.<aggregate type>`, key the
/// aggregate id, value the payload as written, header `id` the event id; per-aggregate order
/// is commit order, a rolled-back event never appears, and the table stays empty.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn debezium_routes_handed_off_events_with_its_defaults() {
    init_tracing();
    let cluster = PrivatePostgres::start_logical();
    let pool = private_pool(&cluster).await;
    let table = unique_table();
    let outbox = debezium_outbox(&pool, &table, true).await;
    let probe = DebeziumProbe::start(cluster.port, &table, &[]);

    let mut expected: Vec<(Uuid, ItemChanged)> = Vec::new();
    let mut tx = pool.begin().await.unwrap();
    let one = item("i-1", 1);
    expected.push((outbox.enqueue(&mut *tx, &one).await.unwrap(), one));
    tx.commit().await.unwrap();
    let mut tx = pool.begin().await.unwrap();
    outbox.enqueue(&mut *tx, &item("i-1", 99)).await.unwrap();
    tx.rollback().await.unwrap();
    let batch: Vec<ItemChanged> = (2..=4)
        .flat_map(|n| [item("i-2", n), item("i-1", n), item("i \"3\" ü", n)])
        .collect();
    let mut tx = pool.begin().await.unwrap();
    let ids = outbox.enqueue_batch(&mut *tx, &batch).await.unwrap();
    tx.commit().await.unwrap();
    expected.extend(ids.into_iter().zip(batch));

    let routed = probe.take(expected.len(), DEBEZIUM_WAIT);
    for ((id, event), message) in expected.iter().zip(&routed) {
        assert_eq!(message.topic, "outbox.event.item");
        assert_eq!(message.key.as_deref(), Some(event.item.as_str()));
        assert_eq!(
            message.value.as_deref(),
            Some(serde_json::to_string(event).unwrap().as_str()),
            "the payload byte for byte"
        );
        assert_eq!(message.header("id"), Some(id.to_string().as_str()));
    }
    assert_eq!(
        count(&pool, &format!(r#"SELECT count(*) FROM "{table}""#)).await,
        0
    );
    assert_eq!(
        count(&pool, &format!(r#"SELECT count(*) FROM "{table}_new""#)).await,
        0
    );
    assert_next_is_sentinel(&pool, &outbox, &probe).await;
}

/// With the README's connector settings a consumer of this library reads Debezium's messages
/// as its own: the envelope rebuilt from the headers is the event that was enqueued, with its
/// sequence, schema version and stored headers, on the event's own topic.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn debezium_with_the_documented_settings_carries_everything_consumers_read() {
    init_tracing();
    let cluster = PrivatePostgres::start_logical();
    let pool = private_pool(&cluster).await;
    let table = unique_table();
    let outbox = debezium_outbox(&pool, &table, true).await;
    let probe = DebeziumProbe::start(cluster.port, &table, &documented_settings());

    let mut tx = pool.begin().await.unwrap();
    let mut ids = Vec::new();
    for n in 1..=3 {
        let options = EnqueueOptions::new()
            .correlation_id(format!("req-{n}"))
            .header("tenant", "acme");
        ids.push(
            outbox
                .enqueue_with(&mut *tx, &item("cart-7", n), options)
                .await
                .unwrap(),
        );
    }
    tx.commit().await.unwrap();

    let routed = probe.take(3, DEBEZIUM_WAIT);
    for (n, (id, message)) in ids.iter().zip(&routed).enumerate() {
        let n = n as u64 + 1;
        assert_eq!(message.topic, "items", "the event's route");
        assert_eq!(message.key.as_deref(), Some("cart-7"));
        let envelope = envelope_of(message);
        assert_eq!(envelope.id, *id);
        assert_eq!(envelope.event_type, "test.item_changed");
        assert_eq!(envelope.aggregate_type, "item");
        assert_eq!(envelope.aggregate_id, "cart-7");
        assert_eq!(envelope.sequence, n as i64);
        assert_eq!(envelope.schema_version, 1);
        assert_eq!(envelope.correlation_id(), Some(format!("req-{n}").as_str()));
        assert_eq!(
            envelope.headers.get("tenant").map(String::as_str),
            Some("acme")
        );
        let event: ItemChanged = serde_json::from_str(&envelope.payload).unwrap();
        assert_eq!((event.item.as_str(), event.n), ("cart-7", n));
        assert!(
            message
                .headers
                .iter()
                .all(|(k, _)| !k.starts_with("__debezium")),
            "{:?}",
            message.headers
        );
    }
}

/// The README's cut-over: start the connector while this library's relay still runs, switch
/// the writers to hand-off, stop the relay once nothing is pending. Every event reaches
/// Debezium or the relay (those in between reach both), in order, and the relay never sees a
/// handed-off event.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cutting_over_from_the_relay_to_debezium_loses_nothing() {
    init_tracing();
    let cluster = PrivatePostgres::start_logical();
    let pool = private_pool(&cluster).await;
    let table = unique_table();
    let relayed = debezium_outbox(&pool, &table, false).await;
    let log = Log::default();
    let relay = RunningRelay::start(
        Relay::builder(relayed.clone(), dispatcher(&log, always_ok()))
            .poll_interval(Duration::from_millis(20)),
    );
    let enqueue = |outbox: Outbox<Postgres>, from: u64| {
        let pool = pool.clone();
        async move {
            let mut tx = pool.begin().await.unwrap();
            for n in from..from + 10 {
                outbox
                    .enqueue(&mut *tx, &item(&format!("c-{}", n % 3), n))
                    .await
                    .unwrap();
            }
            tx.commit().await.unwrap();
        }
    };
    // 1. Before the connector: the relay only.
    enqueue(relayed.clone(), 0).await;
    eventually(
        "the relay handles the first events",
        DEBEZIUM_WAIT,
        || async { log.len() == 10 },
    )
    .await;
    // 2. The connector starts; writers still announce to the relay: both deliver.
    let probe = DebeziumProbe::start(cluster.port, &table, &documented_settings());
    enqueue(relayed.clone(), 10).await;
    // 3. Writers hand off: Debezium only.
    let handed_off = debezium_outbox(&pool, &table, true).await;
    enqueue(handed_off, 20).await;
    eventually(
        "the relay handles what was announced",
        DEBEZIUM_WAIT,
        || async { log.len() == 20 },
    )
    .await;
    // 4. Nothing pending: the relay can go.
    let pending = format!(r#"SELECT count(*) FROM "{table}" WHERE status = 'pending'"#);
    eventually("nothing pending", DEBEZIUM_WAIT, || async {
        count(&pool, &pending).await == 0
    })
    .await;
    relay.stop().await;

    let routed = probe.take(20, DEBEZIUM_WAIT);
    let from_debezium: Vec<u64> = routed
        .iter()
        .map(|m| {
            serde_json::from_str::<ItemChanged>(&envelope_of(m).payload)
                .unwrap()
                .n
        })
        .collect();
    assert_eq!(from_debezium, (10..30).collect::<Vec<_>>());
    let handled = log.snapshot();
    let mut from_relay: Vec<u64> = handled.iter().map(|h| h.event.n).collect();
    for aggregate in ["c-0", "c-1", "c-2"] {
        let ns: Vec<u64> = handled
            .iter()
            .filter(|h| h.event.item == aggregate)
            .map(|h| h.event.n)
            .collect();
        assert!(ns.windows(2).all(|w| w[0] < w[1]), "{aggregate}: {ns:?}");
    }
    from_relay.sort();
    assert_eq!(from_relay, (0..20).collect::<Vec<_>>());
    // Per aggregate, Debezium's sequence numbers continue the relay's.
    for aggregate in ["c-0", "c-1", "c-2"] {
        let seqs: Vec<i64> = routed
            .iter()
            .map(envelope_of)
            .filter(|e| e.aggregate_id == aggregate)
            .map(|e| e.sequence)
            .collect();
        assert!(
            seqs.windows(2).all(|w| w[1] == w[0] + 1),
            "{aggregate}: {seqs:?}"
        );
    }
    assert_next_is_sentinel(&pool, &relayed, &probe).await;
}
