//! A destination's own delivery timeout against the lease (`Destination::delivery_timeout`):
//! `RelayBuilder::build` refuses a lease it does not fit, Kafka's effective setting is what
//! counts (the alias, 0 for ever), and a Router does not start a transport late in the lease
//! when its timeout no longer fits. Written as an outside review; the failing tests then are
//! regression tests now. Real PostgreSQL (127.0.0.1:5432) and librdkafka.

use outbox::kafka::rdkafka::config::ClientConfig;
use outbox::kafka::{producer_config, KafkaTransport};
use outbox::{DeliveryResult, Envelope, OutboxEvent, Relay, Router, Transport};
use outbox_tests::TestDb;
use serde::{Deserialize, Serialize};
use sqlx::Postgres;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

fn brokers() -> String {
    std::env::var("OUTBOX_TEST_KAFKA_BROKERS").unwrap_or_else(|_| "127.0.0.1:9092".to_owned())
}

/// librdkafka documents `message.timeout.ms = 0` as "infinite": a message is retried for ever.
/// No lease fits that, yet the transport reports `Duration::ZERO` and the check passes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kafka_message_timeout_zero_is_infinite_and_no_lease_fits_it() {
    let outbox = Postgres::fresh().await;
    let mut config = producer_config(&brokers());
    config.set("message.timeout.ms", "0");
    // librdkafka takes it (a valid value: "0 = infinite").
    let native = config.create_native_config().unwrap();
    assert_eq!(native.get("message.timeout.ms").unwrap(), "0");
    let transport = KafkaTransport::from_config(config).unwrap();
    let reported = Transport::delivery_timeout(&transport);
    let built = Relay::builder(outbox.clone(), transport)
        .lease(Duration::from_secs(2))
        .build()
        .map(|_| ());
    Postgres::drop_tables(&outbox).await;
    assert!(
        built.is_err(),
        "a 2 s lease was accepted although message.timeout.ms=0 means librdkafka retries for \
         ever (the transport reported {reported:?})"
    );
}

/// `producer_config` documents "anything you set afterwards on the ClientConfig wins". A user
/// who sets the alias `delivery.timeout.ms` afterwards gets a ClientConfig holding both keys;
/// which one librdkafka applies last depends on HashMap order, but the transport always reports
/// `message.timeout.ms` (20 s) and the relay accepts a 30 s lease.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kafka_delivery_timeout_alias_set_after_producer_config_is_ignored() {
    let outbox = Postgres::fresh().await;
    let user_config = || {
        let mut c: ClientConfig = producer_config(&brokers());
        c.set("delivery.timeout.ms", "600000");
        c
    };
    // What librdkafka really uses, over a few fresh configs (a fresh HashMap each time).
    let mut effective = std::collections::BTreeSet::new();
    for _ in 0..32 {
        let native = user_config().create_native_config().unwrap();
        effective.insert(native.get("message.timeout.ms").unwrap());
    }
    let transport = KafkaTransport::from_config(user_config()).unwrap();
    let reported = Transport::delivery_timeout(&transport);
    let built = Relay::builder(outbox.clone(), transport)
        .lease(Duration::from_secs(30))
        .build()
        .map(|_| ());
    Postgres::drop_tables(&outbox).await;
    println!("librdkafka's effective message.timeout.ms over 32 configs: {effective:?}; transport reported {reported:?}");
    assert!(
        built.is_err(),
        "a 30 s lease was accepted; the transport reported {reported:?} but librdkafka's effective \
         message timeout was {effective:?} ms"
    );
}

#[derive(Debug, Clone, Serialize, Deserialize, OutboxEvent)]
#[outbox(event_type = "review.slow", aggregate_type = "acct", topic = "slow")]
struct ViaSlow {
    #[outbox(aggregate_id)]
    id: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, OutboxEvent)]
#[outbox(event_type = "review.kafka", aggregate_type = "acct", topic = "k")]
struct ViaKafka {
    #[outbox(aggregate_id)]
    id: String,
    n: u32,
}

/// A transport (an HTTP webhook, say) that is slow on its first call only.
struct SlowOnce {
    calls: AtomicU32,
    delay: Duration,
    first_call: Arc<Mutex<Option<Instant>>>,
}

impl Transport for SlowOnce {
    fn name(&self) -> &str {
        "slow"
    }
    async fn publish(&self, batch: &[Envelope]) -> Vec<DeliveryResult> {
        if self.calls.fetch_add(1, Ordering::SeqCst) == 0 {
            *self.first_call.lock().unwrap() = Some(Instant::now());
            tokio::time::sleep(self.delay).await;
        }
        vec![Ok(()); batch.len()]
    }
}

/// (sequence, which call of the transport (0: the first claim's), when confirmed)
type Confirmed = Arc<Mutex<Vec<(i64, u32, Instant)>>>;

/// Behaves as `delivery_timeout` allows ("how long a delivery can still complete after it
/// started, whatever the budget"), like librdkafka's queue: on the first call the broker is
/// slow and the messages are confirmed just inside the timeout, whether or not the relay still
/// waits for them; later calls are confirmed at once.
struct KafkaLike {
    timeout: Duration,
    calls: AtomicU32,
    confirmed: Confirmed,
}

impl Transport for KafkaLike {
    fn name(&self) -> &str {
        "kafka-like"
    }
    fn delivery_timeout(&self) -> Option<Duration> {
        Some(self.timeout)
    }
    async fn publish(&self, batch: &[Envelope]) -> Vec<DeliveryResult> {
        let call = self.calls.fetch_add(1, Ordering::SeqCst);
        let items: Vec<(i64, u32)> = batch.iter().map(|e| (e.sequence, call)).collect();
        let confirmed = self.confirmed.clone();
        if call == 0 {
            let wait = self.timeout.mul_f64(0.95);
            // The client's own queue: it does not stop when the caller drops the future.
            let done = tokio::spawn(async move {
                tokio::time::sleep(wait).await;
                let now = Instant::now();
                confirmed
                    .lock()
                    .unwrap()
                    .extend(items.iter().map(|&(s, a)| (s, a, now)));
            });
            let _ = done.await;
        } else {
            let now = Instant::now();
            confirmed
                .lock()
                .unwrap()
                .extend(items.iter().map(|&(s, a)| (s, a, now)));
        }
        vec![Ok(()); batch.len()]
    }
}

/// A Router sends one aggregate's run in rounds: a first event routed to a slow transport, then
/// the rest to a Kafka-like transport whose delivery timeout (1.3 s) fits the 2 s lease by
/// the build check (1.3 <= 1.35). But its round starts ~1 s into the lease, so a confirmation could
/// land up to 2.4 s after the claim: after the lease, behind the next claim's deliveries.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transport_started_late_in_the_lease_confirms_after_the_lease() {
    let outbox = Postgres::fresh().await;
    let lease = Duration::from_secs(2);
    let first_call = Arc::new(Mutex::new(None));
    let confirmed: Confirmed = Arc::default();
    let router = Router::builder()
        .transport(SlowOnce {
            calls: AtomicU32::new(0),
            delay: Duration::from_millis(1000),
            first_call: first_call.clone(),
        })
        .transport(KafkaLike {
            timeout: Duration::from_millis(1300),
            calls: AtomicU32::new(0),
            confirmed: confirmed.clone(),
        })
        .route_event::<ViaSlow>("slow")
        .route_event::<ViaKafka>("kafka-like")
        .build()
        .unwrap();
    let mut tx = outbox.pool().begin().await.unwrap();
    outbox
        .enqueue(&mut *tx, &ViaSlow { id: "a".into() })
        .await
        .unwrap();
    for n in 2..=3 {
        outbox
            .enqueue(&mut *tx, &ViaKafka { id: "a".into(), n })
            .await
            .unwrap();
    }
    tx.commit().await.unwrap();
    let relay = Relay::builder(outbox.clone(), router)
        .lease(lease)
        .poll_interval(Duration::from_millis(50))
        .build()
        .expect("the build check accepts 1.3 s against a 2 s lease (1.35 s of delivery budget)");
    let shutdown = outbox::CancellationToken::new();
    let task = {
        let token = shutdown.clone();
        tokio::spawn(async move { relay.run(token).await })
    };
    // Until the first claim's late confirmations have landed (or 10 s).
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let n = confirmed
            .lock()
            .unwrap()
            .iter()
            .filter(|c| c.1 == 0)
            .count();
        if n >= 2 || Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Then give a second copy time to arrive (a negative condition: two leases' time).
    let deadline = Instant::now() + lease * 2;
    while Instant::now() < deadline {
        if confirmed.lock().unwrap().len() > 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    shutdown.cancel();
    let _ = task.await;
    Postgres::drop_tables(&outbox).await;
    let first_call = first_call
        .lock()
        .unwrap()
        .expect("the slow transport was called");
    // The first claim was sent before the slow transport's first call: its lease ends no later
    // than this.
    let lease_end = first_call + lease;
    let log = confirmed.lock().unwrap().clone();
    let shown: Vec<String> = log
        .iter()
        .map(|(s, a, t)| {
            format!(
                "seq {s} from call {a} at {:?} after the first claim",
                t.duration_since(first_call)
            )
        })
        .collect();
    println!("confirmations:\n  {}", shown.join("\n  "));
    // Each event confirmed once, in order: the Kafka-like round was not started late in the
    // first claim's lease (it would have been confirmed after the lease, and again by the next
    // claim); the next claim delivered it with a fresh lease.
    let seqs: Vec<i64> = log.iter().map(|(s, _, _)| *s).collect();
    assert_eq!(seqs, vec![2, 3], "{shown:?}");
    let _ = lease_end;
}
