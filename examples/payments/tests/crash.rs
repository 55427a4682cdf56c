//! The worker as a separate process, killed with SIGKILL while payments arrive and while it
//! holds charges it has not recorded, then started again: every accepted payment ends `Paid`
//! or `Rejected` with a reason, and no payment is charged twice, counted from the simulated
//! gateway's own records (`gateway_charges`, in the same SQLite file).

use payments::{Broker, Config, Role};
use serde_json::{json, Value};
use std::collections::{HashMap, HashSet};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Covers the 30 s lease the killed worker's aggregates keep, and the retries after it.
const WAIT: Duration = Duration::from_secs(180);

/// `payments worker` in a process of its own, on the test's database.
struct Worker(Child);

impl Worker {
    fn start(database_url: &str) -> Self {
        let child = Command::new(env!("CARGO_BIN_EXE_payments"))
            .arg("worker")
            .env("DATABASE_URL", database_url)
            .env("FAILURE_RATE", "0.3")
            .env("MAX_ATTEMPTS", "3")
            // A wide window between the gateway's charge and the worker recording it.
            .env("GATEWAY_LATENCY_MS", "300")
            .env("BROKER", "log")
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .spawn()
            .expect("cannot start the payments binary");
        Self(child)
    }

    /// SIGKILL: no shutdown, like a crash.
    fn kill(mut self) {
        self.0.kill().unwrap();
        self.0.wait().unwrap();
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

async fn eventually<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + WAIT;
    while !check().await {
        assert!(Instant::now() < deadline, "timed out waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Payments the gateway charged that the service still has `Pending`: the worker was between
/// the charge and recording it.
async fn charged_but_pending(pool: &sqlx::SqlitePool) -> HashSet<String> {
    sqlx::query_scalar(
        "SELECT c.payment_id FROM gateway_charges c JOIN payments p ON p.id = c.payment_id
         WHERE p.status = 'Pending'",
    )
    .fetch_all(pool)
    .await
    .unwrap()
    .into_iter()
    .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn worker_killed_mid_burst_charges_no_payment_twice() {
    let dir = std::env::temp_dir().join(format!("payments-crash-{}", uuid::Uuid::new_v4()));
    std::fs::create_dir_all(&dir).unwrap();
    let url = format!("sqlite://{}", dir.join("payments.db").display());
    // The API in this process (it creates the schema), the worker in another.
    let config = Config {
        database_url: Some(url.clone()),
        listen: "127.0.0.1:0".parse().unwrap(),
        failure_rate: 0.3,
        max_attempts: 3,
        gateway_latency: Duration::ZERO,
        retry_base: Duration::from_millis(20),
        broker: Broker::Log,
    };
    let api = payments::start(config, Role::Api, outbox::CancellationToken::new())
        .await
        .unwrap();
    let base = format!("http://{}", api.addr.unwrap());
    let pool = sqlx::SqlitePool::connect(&url).await.unwrap();
    let mut worker = Worker::start(&url);

    // The burst: four clients posting payments until told to stop.
    let accepted = Arc::new(Mutex::new(Vec::<String>::new()));
    let stop = Arc::new(AtomicBool::new(false));
    let clients: Vec<_> = (0..4)
        .map(|client| {
            let (accepted, stop, base) = (accepted.clone(), stop.clone(), base.clone());
            tokio::spawn(async move {
                let http = reqwest::Client::new();
                let mut n = 0;
                // Bounded, should the stop never come.
                while !stop.load(Ordering::SeqCst) && n < 500 {
                    let response = http
                        .post(format!("{base}/api/payment"))
                        .json(&json!({
                            "tokenCard": format!("tok_{client}_{n:04}"),
                            "amount": 1000 + n,
                            "currency": "usd",
                            "cardHolderName": format!("Holder {client} {n}"),
                            "cardHolderEmail": format!("holder{client}.{n}@example.com"),
                        }))
                        .send()
                        .await
                        .unwrap();
                    assert_eq!(response.status().as_u16(), 200);
                    let body: Value = response.json().await.unwrap();
                    let id = body["paymentId"].as_str().unwrap().to_owned();
                    accepted.lock().unwrap().push(id);
                    n += 1;
                }
            })
        })
        .collect();
    let accepted_count = || accepted.lock().unwrap().len();

    // Kill the worker while it holds a charge it has not recorded. The check and the kill
    // race with the worker recording it, so try again (a new worker) until a kill caught one.
    let mut in_doubt = HashSet::new();
    for _ in 0..5 {
        eventually("a charged payment that is still pending", || async {
            !charged_but_pending(&pool).await.is_empty()
        })
        .await;
        worker.kill();
        in_doubt = charged_but_pending(&pool).await;
        worker = Worker::start(&url);
        if !in_doubt.is_empty() {
            break;
        }
    }
    assert!(!in_doubt.is_empty(), "no kill caught a charge in flight");
    // The burst goes on while the worker restarts, then ends.
    let at_restart = accepted_count();
    eventually("payments accepted after the restart", || async {
        accepted_count() >= at_restart + 40
    })
    .await;
    stop.store(true, Ordering::SeqCst);
    for client in clients {
        client.await.unwrap();
    }
    let accepted: Vec<String> = accepted.lock().unwrap().clone();
    assert_eq!(
        accepted.iter().collect::<HashSet<_>>().len(),
        accepted.len()
    );

    // Every payment settles, and every payment.created event is settled too (none stuck).
    eventually("every payment and its event settled", || async {
        let open: i64 = sqlx::query_scalar(
            "SELECT (SELECT count(*) FROM payments WHERE status = 'Pending')
                  + (SELECT count(*) FROM outbox
                     WHERE event_type = 'payment.created' AND status = 'pending')",
        )
        .fetch_one(&pool)
        .await
        .unwrap();
        open == 0
    })
    .await;
    worker.kill();

    // As the API reports them: Paid, or Rejected with the reason.
    let http = reqwest::Client::new();
    let mut paid = HashSet::new();
    let mut rejected = HashSet::new();
    for id in &accepted {
        let status: Value = http
            .get(format!("{base}/api/payment/status/{id}"))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        match status["status"].as_str() {
            Some("Paid") => paid.insert(id.clone()),
            Some("Rejected") => {
                let reason = status["failureReason"].as_str().unwrap_or_default();
                assert!(reason.contains("rejected after 3 attempts"), "{status}");
                rejected.insert(id.clone())
            }
            _ => panic!("payment {id} ended {status}"),
        };
    }
    assert!(!paid.is_empty());

    // The gateway's records: exactly one charge per paid payment, none for a rejected one.
    let charges: Vec<(String, i64)> =
        sqlx::query_as("SELECT payment_id, count(*) FROM gateway_charges GROUP BY payment_id")
            .fetch_all(&pool)
            .await
            .unwrap();
    let charges: HashMap<String, i64> = charges.into_iter().collect();
    let twice: Vec<_> = charges.iter().filter(|(_, n)| **n > 1).collect();
    assert!(twice.is_empty(), "charged more than once: {twice:?}");
    assert_eq!(charges.keys().cloned().collect::<HashSet<_>>(), paid);
    // The payments caught between charge and record were redelivered, and recorded as paid.
    assert!(in_doubt.is_subset(&paid), "{in_doubt:?}");
    // A dead payment.created is a rejected payment, never a paid one.
    let dead: HashSet<String> = sqlx::query_scalar(
        "SELECT aggregate_id FROM outbox WHERE event_type = 'payment.created' AND status = 'dead'",
    )
    .fetch_all(&pool)
    .await
    .unwrap()
    .into_iter()
    .collect();
    assert!(
        dead.is_subset(&rejected),
        "dead events of paid payments: {dead:?}"
    );

    api.stop().await.unwrap();
    pool.close().await;
    std::fs::remove_dir_all(&dir).unwrap();
}
