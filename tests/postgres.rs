//! The shared scenarios on PostgreSQL, and what only PostgreSQL has: concurrent writers,
//! `LISTEN`/`NOTIFY`, query plans over a large table.

use outbox::{Outbox, Relay};
use outbox_tests::{
    always_ok, dispatcher, eventually, init_tracing, pg_pool, scenarios, unique_table, ItemChanged,
    Log, RunningRelay, TestDb,
};
use sqlx::{Postgres, Row};
use std::collections::BTreeMap;
use std::time::Duration;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commit_and_rollback() {
    scenarios::commit_and_rollback::<Postgres>().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn four_relays_10k_events_100_aggregates() {
    scenarios::relays_share_work_in_order::<Postgres>(4, 100, 100).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crashed_relay_is_taken_over() {
    scenarios::crashed_relay_is_taken_over::<Postgres>().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failures_retry_then_dead() {
    scenarios::failures_retry_then_dead::<Postgres>().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fatal_error_is_dead_at_once() {
    scenarios::fatal_error_is_dead_at_once::<Postgres>().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deferred_delivery() {
    scenarios::deferred_delivery::<Postgres>().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_type_and_bad_payload_go_dead() {
    scenarios::unknown_type_and_bad_payload_go_dead::<Postgres>().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn panicking_handler_is_contained() {
    scenarios::panicking_handler_is_contained::<Postgres>().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batch_enqueue_allocates_consecutive_sequences() {
    scenarios::batch_enqueue_allocates_consecutive_sequences::<Postgres>().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_shutdown_finishes_in_flight_work() {
    scenarios::graceful_shutdown_finishes_in_flight_work::<Postgres>().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retention_removes_only_delivered_rows() {
    scenarios::retention_removes_only_delivered_rows::<Postgres>().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inbox_processes_each_message_once() {
    scenarios::inbox_processes_each_message_once::<Postgres>().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relay_runs_retention() {
    scenarios::relay_runs_retention::<Postgres>().await;
}

#[tokio::test]
async fn invalid_table_names_are_rejected() {
    let pool = pg_pool().await;
    for bad in [
        "outbox; DROP TABLE users",
        "Outbox",
        "public.outbox",
        "",
        "x\"y",
    ] {
        let err = Outbox::builder(pool.clone())
            .table(bad)
            .build()
            .unwrap_err();
        assert!(
            matches!(err, outbox::Error::InvalidTableName { .. }),
            "{bad:?} gave {err}"
        );
        assert!(err.to_string().contains("invalid table name"), "{err}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_migrations_are_safe_and_idempotent() {
    let pool = pg_pool().await;
    let outbox = Outbox::builder(pool).table(unique_table()).build().unwrap();
    let runs: Vec<_> = (0..4)
        .map(|_| {
            let outbox = outbox.clone();
            tokio::spawn(async move { outbox.migrate().await })
        })
        .collect();
    for run in runs {
        run.await.unwrap().unwrap();
    }
    outbox.migrate().await.unwrap();
    let versions: i64 = sqlx::query_scalar(&format!(
        "SELECT count(*) FROM {}_migrations",
        outbox.table()
    ))
    .fetch_one(outbox.pool())
    .await
    .unwrap();
    assert_eq!(versions, outbox.migration_sql().len() as i64);
    Postgres::drop_tables(&outbox).await;
}

/// 8 writers enqueue for the same 10 aggregates with random delays before commit and some
/// rollbacks. Each transaction also takes a number from a database sequence after its enqueue,
/// as its last act before commit: the order in which transactions of one aggregate commit.
/// The handler must see, per aggregate, sequences 1, 2, 3, … without gaps, and in that order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_writers_get_gapless_sequences_in_commit_order() {
    init_tracing();
    let outbox = Postgres::fresh().await;
    let t = outbox.table().to_string();
    sqlx::raw_sql(&format!(
        "CREATE SEQUENCE {t}_commit_order; CREATE TABLE {t}_commits (event_id uuid PRIMARY KEY, commit_order bigint NOT NULL)"
    ))
    .execute(outbox.pool())
    .await
    .unwrap();

    let writers: Vec<_> = (0..8u64)
        .map(|writer| {
            let outbox = outbox.clone();
            let t = t.clone();
            tokio::spawn(async move {
                let mut committed = 0;
                for n in 0..40u64 {
                    let event = ItemChanged {
                        item: format!("item-{}", fastrand::usize(0..10)),
                        n: writer * 1000 + n,
                    };
                    let mut tx = outbox.pool().begin().await.unwrap();
                    let id = outbox.enqueue(&mut *tx, &event).await.unwrap();
                    // Simulated business work between enqueue and commit.
                    tokio::time::sleep(Duration::from_micros(fastrand::u64(0..3000))).await;
                    sqlx::query(&format!(
                        "INSERT INTO {t}_commits SELECT $1, nextval('{t}_commit_order')"
                    ))
                    .bind(id)
                    .execute(&mut *tx)
                    .await
                    .unwrap();
                    if fastrand::u8(0..10) == 0 {
                        tx.rollback().await.unwrap();
                    } else {
                        tx.commit().await.unwrap();
                        committed += 1;
                    }
                }
                committed
            })
        })
        .collect();
    let mut committed = 0;
    for w in writers {
        committed += w.await.unwrap();
    }

    let log = Log::default();
    let relays: Vec<_> = (0..2)
        .map(|_| {
            RunningRelay::spawn(
                Relay::builder(outbox.clone(), dispatcher(&log, always_ok()))
                    .poll_interval(Duration::from_millis(20))
                    .build()
                    .unwrap(),
            )
        })
        .collect();
    eventually(
        "every committed event handled",
        Duration::from_secs(60),
        || async { log.len() >= committed },
    )
    .await;
    for r in relays {
        r.stop().await;
    }
    assert_eq!(log.len(), committed);

    let orders: BTreeMap<uuid::Uuid, i64> =
        sqlx::query(&format!("SELECT event_id, commit_order FROM {t}_commits"))
            .fetch_all(outbox.pool())
            .await
            .unwrap()
            .into_iter()
            .map(|row| (row.get(0), row.get(1)))
            .collect();
    let mut per_aggregate: BTreeMap<String, Vec<(i64, i64)>> = BTreeMap::new();
    for h in log.snapshot() {
        per_aggregate
            .entry(h.event.item.clone())
            .or_default()
            .push((h.sequence, orders[&h.event_id]));
    }
    for (aggregate, seen) in per_aggregate {
        let sequences: Vec<i64> = seen.iter().map(|(s, _)| *s).collect();
        let expected: Vec<i64> = (1..=seen.len() as i64).collect();
        assert_eq!(
            sequences, expected,
            "{aggregate}: not gapless in handling order"
        );
        assert!(
            seen.windows(2).all(|w| w[0].1 < w[1].1),
            "{aggregate}: handled out of commit order: {seen:?}"
        );
    }
    sqlx::raw_sql(&format!(
        "DROP TABLE {t}_commits; DROP SEQUENCE {t}_commit_order"
    ))
    .execute(outbox.pool())
    .await
    .unwrap();
    Postgres::drop_tables(&outbox).await;
}

/// With polling at one minute, only the commit's NOTIFY can make the relay this quick.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commit_wakes_the_relay_through_notify() {
    init_tracing();
    let outbox = Postgres::fresh().await;
    let log = Log::default();
    let relay = RunningRelay::spawn(
        Relay::builder(outbox.clone(), dispatcher(&log, always_ok()))
            .poll_interval(Duration::from_secs(60))
            .build()
            .unwrap(),
    );
    // Let the relay find the table empty and go to sleep on its poll interval.
    eventually("the relay listens", Duration::from_secs(10), || async {
        let listening: i64 =
            sqlx::query_scalar("SELECT count(*) FROM pg_stat_activity WHERE query LIKE 'LISTEN%'")
                .fetch_one(outbox.pool())
                .await
                .unwrap();
        listening > 0
    })
    .await;
    for n in 1..=3 {
        let mut tx = outbox.pool().begin().await.unwrap();
        outbox
            .enqueue(
                &mut *tx,
                &ItemChanged {
                    item: "woken".into(),
                    n,
                },
            )
            .await
            .unwrap();
        tx.commit().await.unwrap();
        eventually(
            "the relay handled the event",
            Duration::from_secs(10),
            || async { log.len() == n as usize },
        )
        .await;
    }
    relay.stop().await;
    Postgres::drop_tables(&outbox).await;
}

/// With a million delivered rows, and a deep backlog behind aggregates other relays hold, the
/// claim reads the due cursors' partial index and each leased aggregate's pending events only.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn claim_reads_only_due_cursors_with_a_million_rows_behind_them() {
    let outbox = Postgres::fresh().await;
    let t = outbox.table();
    sqlx::raw_sql(&format!(
        r#"-- A million delivered rows.
           INSERT INTO {t} (id, aggregate_type, aggregate_id, seq, event_type, schema_version, topic,
                            payload, status, delivered_at)
           SELECT gen_random_uuid(), 'item', 'item-' || (g % 1000), g / 1000 + 1, 'test.item_changed', 1,
                  'items', '{{}}', 'delivered', now()
           FROM generate_series(0, 999999) g;
           -- 1,000 aggregates another relay holds, with 200 events queued in each.
           INSERT INTO {t} (id, aggregate_type, aggregate_id, seq, event_type, schema_version, topic, payload)
           SELECT gen_random_uuid(), 'item', 'item-' || (g % 1000), 2000 + g / 1000,
                  'test.item_changed', 1, 'items', '{{}}'
           FROM generate_series(0, 199999) g;
           INSERT INTO {t}_cursors (aggregate_type, aggregate_id, known_seq, done_seq, due_at, leased_by)
           SELECT 'item', 'item-' || g, 2199, 1999, now() + interval '1 hour', gen_random_uuid()
           FROM generate_series(0, 999) g;
           -- 100 free aggregates with one due event each.
           INSERT INTO {t} (id, aggregate_type, aggregate_id, seq, event_type, schema_version, topic, payload)
           SELECT gen_random_uuid(), 'free', 'free-' || g, 1, 'test.item_changed', 1, 'items', '{{}}'
           FROM generate_series(1, 100) g;
           INSERT INTO {t}_cursors (aggregate_type, aggregate_id, known_seq)
           SELECT 'free', 'free-' || g, 1 FROM generate_series(1, 100) g;
           -- 200,000 aggregates with nothing left to deliver.
           INSERT INTO {t}_cursors (aggregate_type, aggregate_id, known_seq, done_seq)
           SELECT 'idle', 'idle-' || g, 5, 5 FROM generate_series(1, 200000) g;
           ANALYZE {t}; ANALYZE {t}_cursors;"#
    ))
    .execute(outbox.pool())
    .await
    .unwrap();
    let plan = outbox.explain_claim(100).await.unwrap();
    println!("{plan}");
    assert!(plan.contains(&format!("{t}_cursors_due")), "{plan}");
    assert!(!plan.contains("Seq Scan"), "{plan}");
    assert!(outbox.check().await.unwrap().is_empty());
    // And a relay leases the free aggregates only (their `{}` payloads do not decode, so each
    // is settled dead at its first attempt).
    let log = Log::default();
    let relay = RunningRelay::start(
        Relay::builder(outbox.clone(), dispatcher(&log, always_ok()))
            .poll_interval(Duration::from_millis(20)),
    );
    eventually(
        "the free aggregates are settled",
        Duration::from_secs(30),
        || async { Postgres::count_status(&outbox, "dead").await == 100 },
    )
    .await;
    relay.stop().await;
    assert_eq!(Postgres::count_status(&outbox, "pending").await, 200_000);
    Postgres::drop_tables(&outbox).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hot_aggregate_is_delivered_in_order() {
    scenarios::hot_aggregate_is_delivered_in_order::<Postgres>().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_cut_by_a_failure_is_retried_in_order() {
    scenarios::a_run_cut_by_a_failure_is_retried_in_order::<Postgres>().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_failures_affect_only_their_own_event() {
    scenarios::bad_failures_affect_only_their_own_event::<Postgres>().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicking_destination_affects_only_its_run() {
    scenarios::a_panicking_destination_affects_only_its_run::<Postgres>().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delivery_that_outlives_its_lease_is_abandoned() {
    scenarios::a_delivery_that_outlives_its_lease_is_abandoned::<Postgres>().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn payload_is_delivered_byte_for_byte() {
    scenarios::payload_is_delivered_byte_for_byte::<Postgres>().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_requeues_never_strand_an_aggregate() {
    scenarios::concurrent_requeues_never_strand_an_aggregate::<Postgres>().await;
}

/// No relay statement waits on an application's open transaction: while a business transaction
/// that enqueued to an aggregate stays open, the events of every other aggregate (and the
/// committed ones of that aggregate) are delivered; its own event follows its commit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_open_application_transaction_holds_back_nothing_else() {
    init_tracing();
    let outbox = Postgres::fresh().await;
    let log = Log::default();
    let relay = RunningRelay::start(
        Relay::builder(outbox.clone(), dispatcher(&log, always_ok()))
            .poll_interval(Duration::from_millis(20)),
    );
    let event = |item: &str, n| ItemChanged {
        item: item.into(),
        n,
    };
    // One committed event of "held" first, so the relay knows the aggregate.
    let mut tx = outbox.pool().begin().await.unwrap();
    outbox.enqueue(&mut *tx, &event("held", 1)).await.unwrap();
    tx.commit().await.unwrap();
    eventually(
        "the first event is delivered",
        Duration::from_secs(10),
        || async { log.len() == 1 },
    )
    .await;
    // An application transaction enqueues to "held" and "other-0" (in that order) and stays open.
    let mut open = outbox.pool().begin().await.unwrap();
    outbox.enqueue(&mut *open, &event("held", 2)).await.unwrap();
    outbox
        .enqueue(&mut *open, &event("other-0", 1))
        .await
        .unwrap();
    // Meanwhile others commit, including one that enqueues to the same aggregates in the other
    // order from another connection (the old design deadlocked with the relay here)...
    for a in 1..50 {
        let mut tx = outbox.pool().begin().await.unwrap();
        outbox
            .enqueue(&mut *tx, &event(&format!("other-{a}"), 1))
            .await
            .unwrap();
        tx.commit().await.unwrap();
    }
    // ...and they are delivered while it is open.
    eventually(
        "the other aggregates are delivered while a transaction is open",
        Duration::from_secs(10),
        || async { log.len() == 50 },
    )
    .await;
    open.commit().await.unwrap();
    eventually(
        "the held events follow the commit",
        Duration::from_secs(10),
        || async { log.len() == 52 },
    )
    .await;
    relay.stop().await;
    assert!(outbox.check().await.unwrap().is_empty());
    Postgres::drop_tables(&outbox).await;
}

/// A table written by the previous schema (heads, leases in event rows, jsonb payloads) is
/// migrated with its pending events in order, and they are delivered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migration_keeps_pending_events_of_the_previous_schema_in_order() {
    init_tracing();
    let pool = pg_pool().await;
    let outbox = Outbox::builder(pool.clone())
        .table(unique_table())
        .build()
        .unwrap();
    let t = outbox.table().clone();
    // The schema as the previous release left it: migrations 1 and 2.
    sqlx::raw_sql(&format!(
        r#"CREATE TABLE "{t}_migrations" (version bigint PRIMARY KEY, description text NOT NULL,
                                          applied_at timestamptz NOT NULL DEFAULT now());
           INSERT INTO "{t}_migrations" (version, description) VALUES (1, 'v1'), (2, 'v2');"#
    ))
    .execute(&pool)
    .await
    .unwrap();
    for (version, _, sql) in outbox.migration_sql() {
        if version <= 2 {
            sqlx::raw_sql(&sql).execute(&pool).await.unwrap();
        }
    }
    // Aggregate a: 1 delivered, 2 (head, leased by a relay that died) and 3 pending.
    // Aggregate b: 1 dead, 2 pending (head). Aggregate c: everything delivered.
    sqlx::raw_sql(&format!(
        r#"INSERT INTO "{t}" (id, aggregate_type, aggregate_id, seq, head, event_type, schema_version,
                             topic, payload, status, locked_until, locked_by, attempts)
           VALUES (gen_random_uuid(), 'item', 'a', 1, false, 'test.item_changed', 1, 'items', '{{"item":"a","n":1}}', 'delivered', NULL, NULL, 1),
                  (gen_random_uuid(), 'item', 'a', 2, true,  'test.item_changed', 1, 'items', '{{"item":"a","n":2}}', 'pending', now() - interval '1 s', gen_random_uuid(), 1),
                  (gen_random_uuid(), 'item', 'a', 3, false, 'test.item_changed', 1, 'items', '{{"item":"a","n":3}}', 'pending', NULL, NULL, 0),
                  (gen_random_uuid(), 'item', 'b', 1, false, 'test.item_changed', 1, 'items', '{{"item":"b","n":1}}', 'dead', NULL, NULL, 3),
                  (gen_random_uuid(), 'item', 'b', 2, true,  'test.item_changed', 1, 'items', '{{"item":"b","n":2}}', 'pending', NULL, NULL, 0),
                  (gen_random_uuid(), 'item', 'c', 1, false, 'test.item_changed', 1, 'items', '{{"item":"c","n":1}}', 'delivered', NULL, NULL, 1);
           INSERT INTO "{t}_aggregates" (aggregate_type, aggregate_id, last_seq, pending)
           VALUES ('item', 'a', 3, 2), ('item', 'b', 2, 1), ('item', 'c', 1, 0);"#
    ))
    .execute(&pool)
    .await
    .unwrap();
    outbox.migrate().await.unwrap();
    assert!(outbox.check().await.unwrap().is_empty());
    // New events after the migration follow the old ones.
    let mut tx = pool.begin().await.unwrap();
    for item in ["a", "c"] {
        let n = if item == "a" { 4 } else { 2 };
        outbox
            .enqueue(
                &mut *tx,
                &ItemChanged {
                    item: item.into(),
                    n,
                },
            )
            .await
            .unwrap();
    }
    tx.commit().await.unwrap();
    let log = Log::default();
    let relay = RunningRelay::start(
        Relay::builder(outbox.clone(), dispatcher(&log, always_ok()))
            .poll_interval(Duration::from_millis(20)),
    );
    eventually(
        "the migrated backlog is delivered",
        Duration::from_secs(20),
        || async { log.len() == 5 },
    )
    .await;
    relay.stop().await;
    let seen: Vec<(String, u64, i64)> = log
        .snapshot()
        .into_iter()
        .map(|h| (h.event.item, h.event.n, h.sequence))
        .collect();
    let of = |item: &str| -> Vec<(u64, i64)> {
        seen.iter()
            .filter(|(i, _, _)| i == item)
            .map(|(_, n, s)| (*n, *s))
            .collect()
    };
    assert_eq!(of("a"), [(2, 2), (3, 3), (4, 4)]);
    assert_eq!(of("b"), [(2, 2)]);
    assert_eq!(of("c"), [(2, 2)]);
    Postgres::drop_tables(&outbox).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parked_aggregates_keep_their_order() {
    scenarios::parked_aggregates_keep_their_order::<Postgres>().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idempotency_key_enqueues_once() {
    scenarios::idempotency_key_enqueues_once::<Postgres>().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_enqueues_of_one_idempotency_key_write_one_event() {
    scenarios::concurrent_idempotency_keys::<Postgres>().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn republish_delivers_delivered_and_archived_events_again_in_order() {
    scenarios::republish_delivers_again_in_order::<Postgres>().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batches_sharing_aggregates_in_opposite_orders_do_not_deadlock() {
    scenarios::batches_sharing_aggregates_in_opposite_orders_do_not_deadlock::<Postgres>().await;
}
