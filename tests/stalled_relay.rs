//! A relay stalled past its lease (SIGSTOP, as a long GC pause or a stopped VM does), running in
//! a process of its own while another relay takes its aggregates over, must not publish anything
//! late that reorders an aggregate when it resumes (fault 9 of the relay core v2 issue).
//!
//! NATS: the relay checks its lease before each publish step, and JetStream drops a stale
//! publisher's late resend of an event that the relay which took over has already published
//! (`Nats-Msg-Id` is the event id, within the stream's duplicate window). Each event is stored
//! once, every aggregate in order.

use async_nats::jetstream;
use outbox::nats::ensure_stream;
use outbox::Outbox;
use outbox_tests::nats::{nats_url, read_stored};
use outbox_tests::{eventually, init_tracing, pg_url, ItemChanged, TestDb};
use sqlx::Postgres;
use std::collections::HashMap;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

const WAIT: Duration = Duration::from_secs(120);
const LEASE: Duration = Duration::from_millis(1000);
const ITEMS: usize = 8;
const BACKLOG: u64 = 4000;

/// A relay in its own process (`src/bin/relay_process.rs`), killed on drop.
struct RelayProcess(Child);

impl RelayProcess {
    fn start(outbox: &Outbox<Postgres>, broker: &str, address: &str, prefix: &str) -> Self {
        let child = Command::new(env!("CARGO_BIN_EXE_relay_process"))
            .args([
                pg_url().as_str(),
                outbox.table().as_str(),
                &LEASE.as_millis().to_string(),
                broker,
                address,
                prefix,
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .spawn()
            .expect("cannot start relay_process");
        Self(child)
    }

    fn signal(&self, signal: &str) {
        let status = Command::new("kill")
            .args([format!("-{signal}"), self.0.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success(), "kill -{signal} failed");
    }
}

impl Drop for RelayProcess {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Commits `BACKLOG` events per aggregate at once (so relays are busy publishing long runs
/// when they are stopped), then events of `ITEMS` aggregates one per transaction, `n` counting
/// up per aggregate, until `stop`; returns how many it wrote per aggregate.
fn start_writers(
    outbox: Outbox<Postgres>,
    stop: Arc<AtomicBool>,
) -> tokio::task::JoinHandle<Vec<u64>> {
    tokio::spawn(async move {
        let mut written = vec![BACKLOG; ITEMS];
        let backlog: Vec<ItemChanged> = (1..=BACKLOG)
            .flat_map(|n| {
                (0..ITEMS).map(move |item| ItemChanged {
                    item: format!("item-{item}"),
                    n,
                })
            })
            .collect();
        let mut tx = outbox.pool().begin().await.unwrap();
        outbox.enqueue_batch(&mut *tx, &backlog).await.unwrap();
        tx.commit().await.unwrap();
        let mut k = 0usize;
        while !stop.load(Ordering::Relaxed) {
            let item = k % ITEMS;
            let mut tx = outbox.pool().begin().await.unwrap();
            let event = ItemChanged {
                item: format!("item-{item}"),
                n: written[item] + 1,
            };
            outbox.enqueue(&mut *tx, &event).await.unwrap();
            tx.commit().await.unwrap();
            written[item] += 1;
            k += 1;
            // A steady load, not a burst: relays keep claiming while the faults happen.
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        written
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_a_relay_stalled_past_its_lease_publishes_nothing_late() {
    init_tracing();
    let id = uuid::Uuid::new_v4().simple().to_string();
    let (prefix, stream_name) = (format!("t{}", &id[..10]), format!("S{}", &id[..10]));
    let client = async_nats::connect(nats_url()).await.unwrap();
    let js = jetstream::new(client);
    ensure_stream(&js, &stream_name, vec![format!("{prefix}.>")])
        .await
        .unwrap();
    let outbox = Postgres::fresh().await;

    let stop = Arc::new(AtomicBool::new(false));
    let writers = start_writers(outbox.clone(), stop.clone());
    let stalled = RelayProcess::start(&outbox, "nats", &nats_url(), &prefix);
    let _healthy = RelayProcess::start(&outbox, "nats", &nats_url(), &prefix);

    for _ in 0..4 {
        let before = Postgres::count_status(&outbox, "delivered").await;
        eventually("relays deliver", WAIT, || async {
            Postgres::count_status(&outbox, "delivered").await > before + 500
        })
        .await;
        stalled.signal("STOP");
        // The fault itself: frozen for three leases, while the other relay takes over.
        tokio::time::sleep(LEASE * 3).await;
        stalled.signal("CONT");
    }
    stop.store(true, Ordering::Relaxed);
    let written = writers.await.unwrap();
    let total: u64 = written.iter().sum();
    eventually("every event delivered", WAIT, || async {
        Postgres::count_status(&outbox, "delivered").await == total as i64
    })
    .await;

    // Read the stream back with a plain consumer: every event once, each aggregate in order.
    let stream = js.get_stream(&stream_name).await.unwrap();
    let messages = read_stored(&stream).await;
    let stored = messages.len() as u64;
    let mut last: HashMap<String, u64> = HashMap::new();
    let mut late = Vec::new();
    for message in &messages {
        let event: ItemChanged = serde_json::from_slice(&message.payload).unwrap();
        let previous = last.entry(event.item.clone()).or_insert(0);
        if event.n != *previous + 1 {
            late.push((event.item.clone(), *previous, event.n));
        }
        *previous = (*previous).max(event.n);
    }
    assert!(
        late.is_empty(),
        "{} message(s) out of order (aggregate, last seen, got): {:?}",
        late.len(),
        &late[..late.len().min(20)]
    );
    assert_eq!(stored, total, "each event stored exactly once");
    for (item, n) in written.iter().enumerate() {
        assert_eq!(last.get(&format!("item-{item}")).copied().unwrap_or(0), *n);
    }
}
