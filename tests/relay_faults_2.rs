//! Faults a second outside review of relay core v2 found by trying to break the fixes of the
//! first (park / requeue / discard under a lease, routers, deliver_within, wake-ups), against
//! the real servers, kept as regression tests, with the attempts that held up.

use outbox::{
    DeadLetters, DeliveryResult, Envelope, EventStatus, HandlerContext, HandlerError, Outbox,
    OutboxEvent, Relay, RetryPolicy, Router, Transport,
};
use outbox_tests::{always_ok, dispatcher, init_tracing, ItemChanged, Log, RunningRelay, TestDb};
use serde::{Deserialize, Serialize};
use sqlx::{Postgres, Sqlite};
use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

const WAIT: Duration = Duration::from_secs(60);

fn quick<DB: outbox::Backend, D: outbox::Destination>(
    outbox: Outbox<DB>,
    d: D,
) -> outbox::RelayBuilder<DB, D> {
    Relay::builder(outbox, d).poll_interval(Duration::from_millis(20))
}

fn fast_retry(max_attempts: u32) -> RetryPolicy {
    RetryPolicy::exponential(Duration::from_millis(20))
        .max_delay(Duration::from_millis(100))
        .max_attempts(max_attempts)
}

fn item(i: &str, n: u64) -> ItemChanged {
    ItemChanged { item: i.into(), n }
}

/// A second event type of the `item` aggregate, for routers.
#[derive(Debug, Clone, Serialize, Deserialize, OutboxEvent)]
#[outbox(event_type = "test.shipped", aggregate_type = "item", topic = "items")]
pub struct Shipped {
    #[outbox(aggregate_id)]
    pub item: String,
    pub n: u64,
}

/// Waits until `check` holds, panicking with `what` after `WAIT`.
async fn must<F, Fut>(what: &str, check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    assert!(
        outbox_tests::within(WAIT, check).await,
        "timed out waiting for: {what}"
    );
}

async fn status<DB: TestDb>(outbox: &Outbox<DB>, id: uuid::Uuid) -> EventStatus {
    outbox.get(id).await.unwrap().unwrap().status
}

/// A handler whose behaviour per `n` is an async closure of the test.
type AsyncBehaviour = Arc<
    dyn Fn(ItemChanged) -> futures_util::future::BoxFuture<'static, Result<(), HandlerError>>
        + Send
        + Sync,
>;

fn async_dispatcher(log: &Log, behaviour: AsyncBehaviour) -> outbox::Dispatcher {
    let log = log.clone();
    let registry = outbox::Registry::builder()
        .handler::<ItemChanged, _, _>("review", move |event: ItemChanged, ctx: HandlerContext| {
            let (log, behaviour) = (log.clone(), behaviour.clone());
            async move {
                behaviour(event.clone()).await?;
                log.push(event, &ctx);
                Ok(())
            }
        })
        .unwrap()
        .build();
    outbox::Dispatcher::new(registry)
}

/// A gate a handler waits at (polling, inside the handler) until the test opens it; `entered`
/// tells the test the handler is there.
#[derive(Default, Clone)]
struct Gate {
    entered: Arc<AtomicBool>,
    open: Arc<AtomicBool>,
}

impl Gate {
    async fn pass(&self) {
        self.entered.store(true, Ordering::SeqCst);
        while !self.open.load(Ordering::SeqCst) {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
}

/// Status of every row of the test's aggregate, plus `check()`, for failure messages.
async fn describe<DB: TestDb>(outbox: &Outbox<DB>, ids: &[uuid::Uuid]) -> String {
    let mut out = String::new();
    for id in ids {
        let r = outbox.get(*id).await.unwrap().unwrap();
        out.push_str(&format!(
            "seq {} {:?} attempts {}; ",
            r.sequence, r.status, r.attempts
        ));
    }
    out.push_str(&format!("check(): {:?}", outbox.check().await.unwrap()));
    out
}

async fn enqueue_four<DB: TestDb>(outbox: &Outbox<DB>) -> Vec<uuid::Uuid> {
    let mut tx = outbox.pool().begin().await.unwrap();
    let ids = outbox
        .enqueue_batch(
            &mut *tx,
            &[
                item("agg", 1),
                item("agg", 2),
                item("agg", 3),
                item("agg", 4),
            ],
        )
        .await
        .unwrap();
    tx.commit().await.unwrap();
    ids
}

// ---------------------------------------------------------------------------------------------
// Park / requeue / discard racing a relay that holds the lease.
// ---------------------------------------------------------------------------------------------

/// Park. seq 1 dies and is discarded; seq 2 dies and parks the aggregate. The operator fixes
/// both: requeues seq 1 (the relay leases the aggregate and is handling it) and, while that
/// delivery is in flight, requeues seq 2, the parked event. Both requeues return true; then
/// seqs 2, 3, 4 must follow.
async fn requeue_of_the_parked_event_during_an_earlier_requeue_is_not_lost<DB: TestDb>() {
    init_tracing();
    let outbox = DB::fresh().await;
    let ids = enqueue_four(&outbox).await;
    let (fixed1, fixed2) = (
        Arc::new(AtomicBool::new(false)),
        Arc::new(AtomicBool::new(false)),
    );
    let gate = Gate::default();
    let log = Log::default();
    let behaviour: AsyncBehaviour = {
        let (fixed1, fixed2, gate) = (fixed1.clone(), fixed2.clone(), gate.clone());
        Arc::new(move |e| {
            let (fixed1, fixed2, gate) = (fixed1.clone(), fixed2.clone(), gate.clone());
            Box::pin(async move {
                match e.n {
                    1 if !fixed1.load(Ordering::SeqCst) => Err(HandlerError::fatal("bad 1")),
                    1 => {
                        gate.pass().await;
                        Ok(())
                    }
                    2 if !fixed2.load(Ordering::SeqCst) => Err(HandlerError::fatal("bad 2")),
                    _ => Ok(()),
                }
            })
        })
    };
    let relay = RunningRelay::start(
        quick(outbox.clone(), async_dispatcher(&log, behaviour)).dead_letters(DeadLetters::Park),
    );
    must("seq 1 dead and discarded", || async {
        outbox.discard(ids[0]).await.unwrap()
    })
    .await;
    must("seq 2 dead (parked)", || async {
        status(&outbox, ids[1]).await == EventStatus::Dead
    })
    .await;
    fixed1.store(true, Ordering::SeqCst);
    assert!(outbox.requeue(ids[0]).await.unwrap());
    must("the relay is handling the requeued seq 1", || async {
        gate.entered.load(Ordering::SeqCst)
    })
    .await;
    fixed2.store(true, Ordering::SeqCst);
    assert!(
        outbox.requeue(ids[1]).await.unwrap(),
        "requeue of the parked seq 2"
    );
    gate.open.store(true, Ordering::SeqCst);
    let all = outbox_tests::within(Duration::from_secs(15), || async {
        DB::count_status(&outbox, "delivered").await == 4
    })
    .await;
    relay.stop().await;
    let state = describe(&outbox, &ids).await;
    DB::drop_tables(&outbox).await;
    assert!(
        all,
        "the requeued parked seq 2 (and seqs 3, 4 behind it) never delivered within 15 s: {state}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pg_requeue_of_the_parked_event_during_an_earlier_requeue_is_not_lost() {
    requeue_of_the_parked_event_during_an_earlier_requeue_is_not_lost::<Postgres>().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_requeue_of_the_parked_event_during_an_earlier_requeue_is_not_lost() {
    requeue_of_the_parked_event_during_an_earlier_requeue_is_not_lost::<Sqlite>().await;
}

/// Park. seq 1 dies and is discarded; seq 2 dies and parks. seq 1 is requeued (the relay
/// leases and handles it); meanwhile the operator discards seq 2 (returns true). seqs 3 and 4
/// must follow.
async fn discard_while_the_aggregate_is_leased_releases_it<DB: TestDb>() {
    init_tracing();
    let outbox = DB::fresh().await;
    let ids = enqueue_four(&outbox).await;
    let fixed1 = Arc::new(AtomicBool::new(false));
    let gate = Gate::default();
    let log = Log::default();
    let behaviour: AsyncBehaviour = {
        let (fixed1, gate) = (fixed1.clone(), gate.clone());
        Arc::new(move |e| {
            let (fixed1, gate) = (fixed1.clone(), gate.clone());
            Box::pin(async move {
                match e.n {
                    1 if !fixed1.load(Ordering::SeqCst) => Err(HandlerError::fatal("bad 1")),
                    1 => {
                        gate.pass().await;
                        Ok(())
                    }
                    2 => Err(HandlerError::fatal("bad 2")),
                    _ => Ok(()),
                }
            })
        })
    };
    let relay = RunningRelay::start(
        quick(outbox.clone(), async_dispatcher(&log, behaviour)).dead_letters(DeadLetters::Park),
    );
    must("seq 1 dead and discarded", || async {
        outbox.discard(ids[0]).await.unwrap()
    })
    .await;
    must("seq 2 dead (parked)", || async {
        status(&outbox, ids[1]).await == EventStatus::Dead
    })
    .await;
    fixed1.store(true, Ordering::SeqCst);
    assert!(outbox.requeue(ids[0]).await.unwrap());
    must("the relay is handling the requeued seq 1", || async {
        gate.entered.load(Ordering::SeqCst)
    })
    .await;
    assert!(
        outbox.discard(ids[1]).await.unwrap(),
        "discard of the parked seq 2"
    );
    gate.open.store(true, Ordering::SeqCst);
    let released = outbox_tests::within(Duration::from_secs(15), || async {
        status(&outbox, ids[3]).await == EventStatus::Delivered
    })
    .await;
    relay.stop().await;
    let state = describe(&outbox, &ids).await;
    DB::drop_tables(&outbox).await;
    assert!(
        released,
        "discard(seq 2) returned true, yet seqs 3 and 4 were not delivered within 15 s: {state}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pg_discard_while_the_aggregate_is_leased_releases_it() {
    discard_while_the_aggregate_is_leased_releases_it::<Postgres>().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_discard_while_the_aggregate_is_leased_releases_it() {
    discard_while_the_aggregate_is_leased_releases_it::<Sqlite>().await;
}

/// Park. seq 1 dies and is discarded; the relay leases seq 2 and is handling it. Meanwhile the
/// operator requeues seq 1. seq 2 then fails fatally: it is dead and must park the aggregate,
/// so seq 3 may not be delivered (seq 2 is neither requeued nor discarded).
async fn a_park_settled_after_a_concurrent_requeue_still_parks<DB: TestDb>() {
    init_tracing();
    let outbox = DB::fresh().await;
    let ids = enqueue_four(&outbox).await;
    let fixed1 = Arc::new(AtomicBool::new(false));
    let gate = Gate::default();
    let log = Log::default();
    let behaviour: AsyncBehaviour = {
        let (fixed1, gate) = (fixed1.clone(), gate.clone());
        Arc::new(move |e| {
            let (fixed1, gate) = (fixed1.clone(), gate.clone());
            Box::pin(async move {
                match e.n {
                    1 if !fixed1.load(Ordering::SeqCst) => Err(HandlerError::fatal("bad 1")),
                    2 => {
                        gate.pass().await;
                        Err(HandlerError::fatal("bad 2"))
                    }
                    _ => Ok(()),
                }
            })
        })
    };
    let relay = RunningRelay::start(
        quick(outbox.clone(), async_dispatcher(&log, behaviour)).dead_letters(DeadLetters::Park),
    );
    must("seq 1 dead and discarded", || async {
        outbox.discard(ids[0]).await.unwrap()
    })
    .await;
    must("the relay is handling seq 2", || async {
        gate.entered.load(Ordering::SeqCst)
    })
    .await;
    fixed1.store(true, Ordering::SeqCst);
    assert!(outbox.requeue(ids[0]).await.unwrap());
    gate.open.store(true, Ordering::SeqCst);
    must("seq 2 dead", || async {
        status(&outbox, ids[1]).await == EventStatus::Dead
    })
    .await;
    must("the requeued seq 1 delivered", || async {
        status(&outbox, ids[0]).await == EventStatus::Delivered
    })
    .await;
    // Bounded: in a correct relay seq 3 stays pending behind the parked seq 2.
    let overtaken = outbox_tests::within(Duration::from_secs(3), || async {
        status(&outbox, ids[2]).await != EventStatus::Pending
    })
    .await;
    relay.stop().await;
    let state = describe(&outbox, &ids).await;
    let seen: Vec<u64> = log.snapshot().iter().map(|h| h.event.n).collect();
    DB::drop_tables(&outbox).await;
    assert!(
        !overtaken,
        "seq 3 went past the dead seq 2 (Park): handled {seen:?}; {state}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pg_a_park_settled_after_a_concurrent_requeue_still_parks() {
    a_park_settled_after_a_concurrent_requeue_still_parks::<Postgres>().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_a_park_settled_after_a_concurrent_requeue_still_parks() {
    a_park_settled_after_a_concurrent_requeue_still_parks::<Sqlite>().await;
}

// ---------------------------------------------------------------------------------------------
// deliver_within: hanging handlers.
// ---------------------------------------------------------------------------------------------

/// As many aggregates hang as the dispatcher runs at once (2 here; 64 by default). The healthy
/// aggregates of the same batch (whose handler awaits 1 ms, like any I/O) must each be handled
/// once, at their first attempt: a hanging handler fails "its own event and its run, and no
/// other".
async fn hanging_handlers_cost_healthy_aggregates_nothing(max_attempts: u32) {
    init_tracing();
    let outbox = Postgres::fresh().await;
    let mut tx = outbox.pool().begin().await.unwrap();
    let hanging = outbox
        .enqueue_batch(&mut *tx, &[item("hang-0", 1), item("hang-1", 1)])
        .await
        .unwrap();
    let healthy: Vec<ItemChanged> = (0..6).map(|a| item(&format!("ok-{a}"), 1)).collect();
    let healthy_ids = outbox.enqueue_batch(&mut *tx, &healthy).await.unwrap();
    tx.commit().await.unwrap();
    let log = Log::default();
    let behaviour: AsyncBehaviour = Arc::new(|e| {
        Box::pin(async move {
            if e.item.starts_with("hang") {
                tokio::time::sleep(Duration::from_secs(30)).await;
            } else {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            Ok(())
        })
    });
    let relay = RunningRelay::start(
        quick(
            outbox.clone(),
            async_dispatcher(&log, behaviour).concurrency(2),
        )
        .lease(Duration::from_millis(800))
        .retry(fast_retry(max_attempts)),
    );
    must("the hanging events die", || async {
        status(&outbox, hanging[0]).await == EventStatus::Dead
            && status(&outbox, hanging[1]).await == EventStatus::Dead
    })
    .await;
    must("nothing pending", || async {
        Postgres::count_status(&outbox, "pending").await == 0
    })
    .await;
    relay.stop().await;
    let mut report = Vec::new();
    for id in &healthy_ids {
        let row = outbox.get(*id).await.unwrap().unwrap();
        if row.status != EventStatus::Delivered || row.attempts != 1 {
            report.push(format!(
                "{}: {:?} after {} attempts ({:?})",
                row.aggregate_id, row.status, row.attempts, row.last_error
            ));
        }
    }
    Postgres::drop_tables(&outbox).await;
    assert!(
        report.is_empty(),
        "healthy aggregates batched with hanging ones (max_attempts {max_attempts}): {report:#?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pg_hanging_handlers_do_not_burn_the_attempts_of_healthy_aggregates() {
    hanging_handlers_cost_healthy_aggregates_nothing(3).await;
}

/// The same with one attempt: the healthy events must not go dead.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pg_hanging_handlers_do_not_kill_healthy_events() {
    hanging_handlers_cost_healthy_aggregates_nothing(1).await;
}

// ---------------------------------------------------------------------------------------------
// Router.
// ---------------------------------------------------------------------------------------------

/// A transport that panics on every batch.
struct Explodes;

impl Transport for Explodes {
    fn name(&self) -> &str {
        "explodes"
    }

    async fn publish(&self, batch: &[Envelope]) -> Vec<DeliveryResult> {
        panic!("the transport cannot take {} events", batch.len());
    }
}

/// A Router sends `test.shipped` to a transport that panics, the rest to handlers. Aggregate
/// "a" (handlers) shares a batch with aggregate "b" (the panicking transport): "a" must be
/// handled once; the panic may cost "b"'s run only.
async fn a_panicking_transport_in_a_router_affects_only_its_run<DB: TestDb>() {
    init_tracing();
    let outbox = DB::fresh().await;
    let mut tx = outbox.pool().begin().await.unwrap();
    let a = outbox.enqueue(&mut *tx, &item("a", 1)).await.unwrap();
    let b = outbox
        .enqueue(
            &mut *tx,
            &Shipped {
                item: "b".into(),
                n: 1,
            },
        )
        .await
        .unwrap();
    tx.commit().await.unwrap();
    let log = Log::default();
    let router = Router::builder()
        .transport(dispatcher(&log, always_ok()))
        .transport(Explodes)
        .route("test.shipped", "explodes")
        .default_transport("handlers")
        .build()
        .unwrap();
    let relay = RunningRelay::start(quick(outbox.clone(), router).retry(fast_retry(2)));
    must("a delivered, b dead", || async {
        status(&outbox, a).await == EventStatus::Delivered
            && status(&outbox, b).await == EventStatus::Dead
    })
    .await;
    relay.stop().await;
    let handled = log.snapshot().len();
    DB::drop_tables(&outbox).await;
    assert_eq!(
        handled, 1,
        "aggregate a was handled {handled} times because another transport of the router panicked"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pg_a_panicking_transport_in_a_router_affects_only_its_run() {
    a_panicking_transport_in_a_router_affects_only_its_run::<Postgres>().await;
}

// ---------------------------------------------------------------------------------------------
// Wake-ups (enqueue once skipped NOTIFY when an announcement was waiting; it notifies always).
// ---------------------------------------------------------------------------------------------

/// A writer enqueues while an earlier announcement still waits in `<table>_new`, and commits a
/// few seconds later (a business transaction doing more work). The relay absorbed the earlier
/// one and went idle meanwhile. The commit must wake it: the README promises a wake "within
/// milliseconds of a commit"; poll_interval is 5 s.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pg_a_commit_after_a_long_transaction_wakes_an_idle_relay() {
    init_tracing();
    let outbox = Postgres::fresh().await;
    let mut first = outbox.pool().begin().await.unwrap();
    outbox
        .enqueue(&mut *first, &item("first", 1))
        .await
        .unwrap();
    first.commit().await.unwrap();
    // The second writer's statement sees the first announcement waiting.
    let mut second = outbox.pool().begin().await.unwrap();
    outbox
        .enqueue(&mut *second, &item("lone", 1))
        .await
        .unwrap();
    let log = Log::default();
    let relay = RunningRelay::start(
        Relay::builder(outbox.clone(), dispatcher(&log, always_ok()))
            .poll_interval(Duration::from_secs(5)),
    );
    must("the first event handled", || async { log.len() == 1 }).await;
    // The business transaction goes on for a while (the scenario, not a synchronisation).
    tokio::time::sleep(Duration::from_secs(3)).await;
    second.commit().await.unwrap();
    let committed = Instant::now();
    must("the lone event handled", || async { log.len() == 2 }).await;
    let latency = committed.elapsed();
    relay.stop().await;
    Postgres::drop_tables(&outbox).await;
    assert!(
        latency < Duration::from_millis(500),
        "a committed event waited {latency:?} for an idle relay (poll_interval 5 s)"
    );
}

/// 8 writers, some transactions doing more work (up to 1.5 s) between their enqueue and their
/// commit: every event must be handled within 500 ms of its commit. (Holds: steady activity
/// keeps the idle relay's polls short.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pg_every_commit_of_a_burst_is_delivered_promptly() {
    init_tracing();
    let outbox = Postgres::fresh().await;
    let log = Log::default();
    let relay = RunningRelay::start(
        Relay::builder(outbox.clone(), dispatcher(&log, always_ok()))
            .poll_interval(Duration::from_secs(5)),
    );
    let committed: Arc<std::sync::Mutex<HashMap<String, chrono::DateTime<chrono::Utc>>>> =
        Arc::default();
    let writers = (0..8).map(|w| {
        let (outbox, committed) = (outbox.clone(), committed.clone());
        tokio::spawn(async move {
            for n in 0..10u64 {
                let key = format!("w{w}");
                let mut tx = outbox.pool().begin().await.unwrap();
                outbox.enqueue(&mut *tx, &item(&key, n)).await.unwrap();
                // Some transactions do more work after the enqueue.
                tokio::time::sleep(Duration::from_millis(fastrand::u64(0..1500))).await;
                tx.commit().await.unwrap();
                committed
                    .lock()
                    .unwrap()
                    .insert(format!("{key}/{n}"), chrono::Utc::now());
                tokio::time::sleep(Duration::from_millis(fastrand::u64(0..300))).await;
            }
        })
    });
    for w in futures_util::future::join_all(writers).await {
        w.unwrap();
    }
    must("all 80 handled", || async { log.len() == 80 }).await;
    relay.stop().await;
    Postgres::drop_tables(&outbox).await;
    let committed = committed.lock().unwrap().clone();
    let mut late: Vec<(String, i64)> = log
        .snapshot()
        .iter()
        .filter_map(|h| {
            let key = format!("{}/{}", h.event.item, h.event.n);
            let c = committed[&key];
            let ms = (h.at - c).num_milliseconds();
            (ms > 500).then_some((key, ms))
        })
        .collect();
    late.sort_by_key(|l| -l.1);
    assert!(
        late.is_empty(),
        "{} of 80 events handled more than 500 ms after their commit (worst first, ms): {:?}",
        late.len(),
        &late[..late.len().min(10)]
    );
}

// ---------------------------------------------------------------------------------------------
// Router: a run alternating transports, a failure in the middle, an unrouted type.
// ---------------------------------------------------------------------------------------------

/// A transport that records what it published (by sequence), in order, and fails seq
/// `fail_once` the first time it sees it.
#[derive(Clone)]
struct Recording {
    name: &'static str,
    fail_once: i64,
    failed: Arc<AtomicBool>,
    published: Arc<std::sync::Mutex<Vec<i64>>>,
}

impl Transport for Recording {
    fn name(&self) -> &str {
        self.name
    }

    async fn publish(&self, batch: &[Envelope]) -> Vec<DeliveryResult> {
        let mut out = Vec::new();
        let mut stopped = false;
        for e in batch {
            if stopped {
                out.push(Err(outbox::DeliveryError::not_attempted("earlier failed")));
            } else if e.sequence == self.fail_once && !self.failed.swap(true, Ordering::SeqCst) {
                stopped = true;
                out.push(Err(outbox::DeliveryError::retry("first attempt fails")));
            } else {
                self.published.lock().unwrap().push(e.sequence);
                out.push(Ok(()));
            }
        }
        out
    }
}

/// seq 1 A, 2 B, 3 A (fails once), 4 B, 5 unrouted, 6 A, 7 B; Skip. Each routed event must be
/// published once, in seq order across both transports; seq 5 dies after its attempts, and
/// seqs 6 and 7 follow it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pg_router_alternating_transports_keeps_order_once() {
    init_tracing();
    let outbox = Postgres::fresh().await;
    let mut tx = outbox.pool().begin().await.unwrap();
    let mut messages = Vec::new();
    for n in 1..=7u64 {
        let m = match n {
            5 => outbox::Message::new(&outbox_tests::Unrouted { item: "agg".into() }),
            n if n % 2 == 1 => outbox::Message::new(&item("agg", n)),
            n => outbox::Message::new(&Shipped {
                item: "agg".into(),
                n,
            }),
        }
        .unwrap();
        messages.push(m);
    }
    outbox.enqueue_messages(&mut *tx, &messages).await.unwrap();
    tx.commit().await.unwrap();
    let published: Arc<std::sync::Mutex<Vec<i64>>> = Arc::default();
    let transport = |name, fail_once| Recording {
        name,
        fail_once,
        failed: Arc::default(),
        published: published.clone(),
    };
    let router = Router::builder()
        .transport(transport("ta", 3))
        .transport(transport("tb", -1))
        .route("test.item_changed", "ta")
        .route("test.shipped", "tb")
        .build()
        .unwrap();
    let relay = RunningRelay::start(quick(outbox.clone(), router).retry(fast_retry(2)));
    must("6 delivered, 1 dead", || async {
        Postgres::count_status(&outbox, "delivered").await == 6
            && Postgres::count_status(&outbox, "dead").await == 1
    })
    .await;
    relay.stop().await;
    let problems = outbox.check().await.unwrap();
    Postgres::drop_tables(&outbox).await;
    let published = published.lock().unwrap().clone();
    assert_eq!(
        published,
        [1, 2, 3, 4, 6, 7],
        "publication order across transports"
    );
    assert!(problems.is_empty(), "{problems:?}");
}

// ---------------------------------------------------------------------------------------------
// Short leases in steady state.
// ---------------------------------------------------------------------------------------------

/// Lease 300 ms, two relays with two workers each, healthy handlers that await 1 ms: in steady
/// state nothing may be handled twice, and every event is delivered at its first attempt.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pg_short_lease_healthy_handlers_handle_each_event_once() {
    init_tracing();
    let outbox = Postgres::fresh().await;
    for a in 0..30 {
        let events: Vec<ItemChanged> = (1..=20).map(|n| item(&format!("agg-{a}"), n)).collect();
        let mut tx = outbox.pool().begin().await.unwrap();
        outbox.enqueue_batch(&mut *tx, &events).await.unwrap();
        tx.commit().await.unwrap();
    }
    let log = Log::default();
    let behaviour: AsyncBehaviour = Arc::new(|_| {
        Box::pin(async move {
            tokio::time::sleep(Duration::from_millis(1)).await;
            Ok(())
        })
    });
    let relays: Vec<_> = (0..2)
        .map(|_| {
            RunningRelay::start(
                quick(outbox.clone(), async_dispatcher(&log, behaviour.clone()))
                    .workers(2)
                    .lease(Duration::from_millis(300))
                    .retry(fast_retry(10)),
            )
        })
        .collect();
    must("all 600 delivered", || async {
        Postgres::count_status(&outbox, "delivered").await == 600
    })
    .await;
    for r in relays {
        r.stop().await;
    }
    let retried: i64 = sqlx::query_scalar(&format!(
        "SELECT count(*) FROM {} WHERE attempts > 1",
        outbox.table()
    ))
    .fetch_one(outbox.pool())
    .await
    .unwrap();
    Postgres::drop_tables(&outbox).await;
    let mut seen = std::collections::HashSet::new();
    let twice: Vec<_> = log
        .snapshot()
        .into_iter()
        .filter(|h| !seen.insert(h.event_id))
        .map(|h| (h.event.item, h.sequence))
        .collect();
    assert!(twice.is_empty(), "handled twice: {twice:?}");
    assert_eq!(retried, 0, "healthy events needed more than one attempt");
}
