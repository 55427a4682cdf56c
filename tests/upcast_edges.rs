//! Schema evolution at the edges: derive-registered and by-hand steps, what is dead and what is
//! retried, in-process and through a real relay on PostgreSQL. Written as an outside review;
//! the tests that failed then (a panicking upcaster retried, a reason hiding the upcast,
//! `require` ignoring upcasters, by-hand registries without the derive's steps) guard the fixes.

use outbox::{
    Destination, Dispatcher, Envelope, Error, EventStatus, HandlerContext, HandlerError,
    OutboxEvent, Registry, Relay, Retry, RetryPolicy,
};
use outbox_tests::TestDb;
use serde::{Deserialize, Serialize};
use sqlx::Postgres;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

fn envelope(event_type: &str, version: u32, payload: &str) -> Envelope {
    Envelope {
        id: uuid::Uuid::now_v7(),
        created_at: chrono::Utc::now(),
        event_type: event_type.into(),
        aggregate_type: "acct".into(),
        aggregate_id: "a".into(),
        sequence: 1,
        schema_version: version,
        topic: "t".into(),
        payload: payload.into(),
        headers: Default::default(),
        attempt: 1,
    }
}

// ---- A chain registered with the derive (inventory) -----------------------------------------

#[derive(Debug, Serialize, Deserialize, OutboxEvent)]
#[outbox(event_type = "review.paid", aggregate_type = "acct", version = 1)]
struct PaidV1 {
    #[outbox(aggregate_id)]
    id: String,
    amount: String,
}

/// The current struct. `From<PaidV1>` panics on an amount that does not parse (a bug of the
/// user's, deterministic: it panics on every attempt).
#[derive(Debug, Clone, Serialize, Deserialize, OutboxEvent)]
#[outbox(
    event_type = "review.paid",
    aggregate_type = "acct",
    version = 2,
    upcast_from = PaidV1
)]
struct Paid {
    #[outbox(aggregate_id)]
    id: String,
    cents: i64,
}

impl From<PaidV1> for Paid {
    fn from(v1: PaidV1) -> Self {
        let cents = (v1.amount.parse::<f64>().expect("amount is a number") * 100.0) as i64;
        Paid { id: v1.id, cents }
    }
}

static PAID: Mutex<Vec<(i64, u32)>> = Mutex::new(Vec::new());

#[outbox::handler]
async fn on_paid(p: Paid, ctx: HandlerContext) -> Result<(), HandlerError> {
    PAID.lock().unwrap().push((p.cents, ctx.schema_version()));
    Ok(())
}

/// The inventory chain works at all.
#[tokio::test]
async fn inventory_chain_reaches_the_handler() {
    let d = Dispatcher::from_inventory().unwrap();
    let r = d
        .deliver(&[envelope("review.paid", 1, r#"{"id":"x1","amount":"2.50"}"#)])
        .await;
    assert_eq!(r, vec![Ok(())]);
    assert!(PAID.lock().unwrap().contains(&(250, 1)));
}

/// "A failing step is dead at once": a step that panics on a payload panics on every attempt.
/// What is it?
#[tokio::test]
async fn a_panicking_upcaster_is_dead_at_once() {
    let d = Dispatcher::from_inventory().unwrap();
    let r = d
        .deliver(&[envelope(
            "review.paid",
            1,
            r#"{"id":"x2","amount":"twelve"}"#,
        )])
        .await;
    let err = r[0].as_ref().unwrap_err();
    println!("panicking upcaster -> {err:?}");
    assert_eq!(
        err.retry,
        Retry::Never,
        "a deterministic upcaster panic is retried: {err:?}"
    );
}

/// A step registered by hand on top of the inventory one for the same step is a duplicate.
#[test]
fn review_with_inventory_detects_a_duplicate_of_a_by_hand_step() {
    let err = Registry::builder()
        .upcast_json("review.paid", 1, 2, "by hand", Ok)
        .unwrap()
        .with_inventory()
        .unwrap_err();
    assert!(
        matches!(&err, Error::DuplicateUpcaster { from: 1, .. }),
        "{err}"
    );
    let s = err.to_string();
    assert!(s.contains("by hand") && s.contains("PaidV1"), "{s}");
}

/// A registry built by hand (handler by hand) and a struct with `upcast_from`: the compile-time
/// steps come with `with_inventory_upcasters`, without every `#[outbox::handler]` of the binary.
#[tokio::test]
async fn by_hand_registry_takes_the_derive_upcasters() {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let s = seen.clone();
    let registry = Registry::builder()
        .handler::<Paid, _, _>("by hand", move |p, _ctx| {
            let s = s.clone();
            async move {
                s.lock().unwrap().push(p.cents);
                Ok(())
            }
        })
        .unwrap()
        .with_inventory_upcasters()
        .unwrap()
        .build();
    let d = Dispatcher::new(registry);
    let r = d
        .deliver(&[envelope("review.paid", 1, r#"{"id":"x3","amount":"1.00"}"#)])
        .await;
    println!("by-hand registry, v1 payload -> {r:?}");
    assert_eq!(
        r,
        vec![Ok(())],
        "the derive's upcast_from step is not used by a registry built by hand"
    );
}

// ---- By-hand chains ---------------------------------------------------------------------------

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Order {
    id: String,
    cents: i64,
    currency: String,
}
impl OutboxEvent for Order {
    const EVENT_TYPE: &'static str = "review.order";
    const AGGREGATE_TYPE: &'static str = "acct";
    const SCHEMA_VERSION: u32 = 3;
    const TOPIC: &'static str = "t";
    fn aggregate_id(&self) -> String {
        self.id.clone()
    }
}
#[derive(Debug, Clone, Serialize, Deserialize)]
struct OrderV2 {
    id: String,
    cents: i64,
}
impl OutboxEvent for OrderV2 {
    const EVENT_TYPE: &'static str = "review.order";
    const AGGREGATE_TYPE: &'static str = "acct";
    const SCHEMA_VERSION: u32 = 2;
    const TOPIC: &'static str = "t";
    fn aggregate_id(&self) -> String {
        self.id.clone()
    }
}

type Seen = Arc<Mutex<Vec<String>>>;

fn recording(seen: &Seen) -> outbox::RegistryBuilder {
    let (a, b) = (seen.clone(), seen.clone());
    Registry::builder()
        .handler::<Order, _, _>("v3", move |o, ctx| {
            let a = a.clone();
            async move {
                a.lock().unwrap().push(format!(
                    "v3 handler {} (ctx v{})",
                    o.cents,
                    ctx.schema_version()
                ));
                Ok(())
            }
        })
        .unwrap()
        .handler::<OrderV2, _, _>("v2", move |o, ctx| {
            let b = b.clone();
            async move {
                b.lock().unwrap().push(format!(
                    "v2 handler {} (ctx v{})",
                    o.cents,
                    ctx.schema_version()
                ));
                Ok(())
            }
        })
        .unwrap()
}

/// Handlers at v2 and v3, steps v1 -> v2 and v2 -> v3, and a direct v1 -> v3 is refused as a
/// duplicate of v1 -> v2. Which handler gets a v1 payload and a v2 payload?
#[tokio::test]
async fn which_handler_wins_with_several_versions() {
    let seen: Seen = Arc::default();
    let dup = recording(&seen)
        .upcast_json("review.order", 1, 2, "1->2", |mut v| {
            v["cents"] = serde_json::json!(100);
            Ok(v)
        })
        .unwrap()
        .upcast_json("review.order", 1, 3, "1->3 direct", Ok)
        .unwrap_err();
    assert!(matches!(dup, Error::DuplicateUpcaster { .. }), "{dup}");
    let registry = recording(&seen)
        .upcast_json("review.order", 1, 2, "1->2", |mut v| {
            v["cents"] = serde_json::json!(100);
            Ok(v)
        })
        .unwrap()
        .upcast_json("review.order", 2, 3, "2->3", |mut v| {
            v["currency"] = serde_json::json!("EUR");
            Ok(v)
        })
        .unwrap()
        .build();
    let d = Dispatcher::new(registry);
    let r = d
        .deliver(&[
            envelope("review.order", 1, r#"{"id":"a"}"#),
            envelope("review.order", 2, r#"{"id":"a","cents":7}"#),
        ])
        .await;
    assert_eq!(r, vec![Ok(()), Ok(())]);
    println!("observed: {:?}", seen.lock().unwrap());
}

/// A step whose output does not fit the handler's struct: dead (permanent), and does the
/// reason tell the upcast happened (written v1, which step)?
#[tokio::test]
async fn bad_upcast_output_reason_names_the_step() {
    let seen: Seen = Arc::default();
    let registry = recording(&seen)
        .upcast_json("review.order", 1, 3, "forgets the currency", |mut v| {
            v["cents"] = serde_json::json!(1);
            Ok(v)
        })
        .unwrap()
        .build();
    let r = Dispatcher::new(registry)
        .deliver(&[envelope("review.order", 1, r#"{"id":"a"}"#)])
        .await;
    let err = r[0].as_ref().unwrap_err();
    println!("bad upcast output -> {err:?}");
    assert_eq!(err.retry, Retry::Never, "{err:?}");
    assert!(
        err.reason.contains("forgets the currency") || err.reason.contains("v1"),
        "the reason does not say the payload was upcast, nor by which step: {}",
        err.reason
    );
}

/// `Registry::require` is the documented start-up check that "a handler exists for each
/// (event_type, version)". A consumer that must accept versions 1..=3 lists them: is v1,
/// handled by upcasting, reported missing?
#[test]
fn review_require_counts_versions_reached_by_upcasting() {
    let seen: Seen = Arc::default();
    let registry = recording(&seen)
        .upcast_json("review.order", 1, 2, "1->2", Ok)
        .unwrap()
        .build();
    let r = registry.require(&[
        ("review.order", 1),
        ("review.order", 2),
        ("review.order", 3),
    ]);
    assert!(
        r.is_ok(),
        "require reports a version the dispatcher does handle (by upcasting) as missing: {}",
        r.unwrap_err()
    );
}

// ---- Through a real relay on PostgreSQL -----------------------------------------------------

/// An old binary wrote v1 events (the derive's own v1 struct, enqueued for real). Through the
/// relay: a good one is handled at v2, a gap (v1 of a type whose chain starts at v2) is dead
/// at its first attempt, and a panicking step is ... ?
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relay_on_postgres_upcast_outcomes() {
    let outbox = Postgres::fresh().await;
    let mut tx = outbox.pool().begin().await.unwrap();
    let good = outbox
        .enqueue(
            &mut *tx,
            &PaidV1 {
                id: "pg-good".into(),
                amount: "3.00".into(),
            },
        )
        .await
        .unwrap();
    let panics = outbox
        .enqueue(
            &mut *tx,
            &PaidV1 {
                id: "pg-panic".into(),
                amount: "three".into(),
            },
        )
        .await
        .unwrap();
    tx.commit().await.unwrap();
    let relay = Relay::builder(outbox.clone(), Dispatcher::from_inventory().unwrap())
        .lease(Duration::from_secs(5))
        .poll_interval(Duration::from_millis(50))
        .retry(RetryPolicy::exponential(Duration::from_millis(50)).max_attempts(5))
        .build()
        .unwrap();
    let shutdown = outbox::CancellationToken::new();
    let task = {
        let t = shutdown.clone();
        tokio::spawn(async move { relay.run(t).await })
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    let (good_row, panic_row) = loop {
        let g = outbox.get(good).await.unwrap().unwrap();
        let p = outbox.get(panics).await.unwrap().unwrap();
        if (g.status != EventStatus::Pending && p.status == EventStatus::Dead)
            || Instant::now() > deadline
        {
            break (g, p);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    shutdown.cancel();
    let _ = task.await;
    Postgres::drop_tables(&outbox).await;
    println!("good: {good_row:?}\npanic: {panic_row:?}");
    assert_eq!(good_row.status, EventStatus::Delivered, "{good_row:?}");
    assert!(PAID.lock().unwrap().contains(&(300, 1)));
    assert_eq!(panic_row.status, EventStatus::Dead, "{panic_row:?}");
    assert_eq!(
        panic_row.attempts, 1,
        "a deterministic upcaster panic burnt every attempt before going dead: {panic_row:?}"
    );
}
