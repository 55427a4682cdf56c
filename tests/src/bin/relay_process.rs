//! A relay in a process of its own, for tests that stop, stall or kill relays (SIGKILL,
//! SIGSTOP, SIGTERM) the way an operating system does.
//!
//! `relay_process <postgres-url> <table> <lease-ms> nats <nats-url> <subject-prefix>`
//! `relay_process <postgres-url> <table> <lease-ms> kafka <brokers> <topic-prefix>`
//! `relay_process <postgres-url> <table> <lease-ms> amqp <amqp-url> <exchange>`
//! `relay_process <postgres-url> <table> <lease-ms> handler - <effects-table>`
//!
//! It relays until it is killed, or until SIGTERM, which stops it gracefully (the relay's
//! shutdown: in-flight batches settle, leases are given back) and exits with status 0. The
//! `handler` destination runs the fault matrix's typed `Probe` handler in the process, which
//! records each call in `<effects-table>` (see `outbox_tests::faults`).
//!
//! Environment:
//! - `OUTBOX_FAULT=abort-after-publish:N` aborts the process right after the destination
//!   confirmed its `N`-th batch, before the relay wrote the outcome; `abort-before-publish:N`
//!   aborts when the `N`-th batch is about to be published.
//! - `OUTBOX_RELAY_BATCH=<events>` (default 8), `OUTBOX_RELAY_WORKERS=<n>` (default 2) and
//!   `OUTBOX_RELAY_MAX_ATTEMPTS=<n>` (fast retries, at most `n` attempts).
//! - `RUST_LOG` turns on its logs (stderr).

use outbox::{DeliveryResult, Destination, Envelope, Outbox, Relay};
use outbox_tests::faults::probe_dispatcher;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    outbox_tests::init_process_tracing();
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [database, table, lease_ms, broker, address, target] = args.as_slice() else {
        eprintln!(
            "usage: relay_process <postgres-url> <table> <lease-ms> nats|kafka|amqp|handler \
             <address> <prefix|exchange|effects-table>"
        );
        std::process::exit(2);
    };
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(8)
        .connect(database)
        .await
        .expect("database");
    let outbox = Outbox::<sqlx::Postgres>::builder(pool.clone())
        .table(table.as_str())
        .build()
        .expect("table name");
    let lease = Duration::from_millis(lease_ms.parse().expect("lease in milliseconds"));
    let shutdown = outbox_tests::cancel_on_sigterm();
    let fault = Fault::from_env();
    let outcome = match broker.as_str() {
        "nats" => {
            // Started while the broker is down (a bounce), it waits for it, as a deployed relay
            // would under its supervisor.
            let client = async_nats::ConnectOptions::new()
                .retry_on_initial_connect()
                .connect(address.as_str())
                .await
                .expect("NATS");
            let transport = outbox::nats::NatsTransport::new(async_nats::jetstream::new(client))
                .subject_prefix(target);
            run(outbox, fault.wrap(transport), lease, shutdown).await
        }
        "kafka" => {
            // librdkafka must give up on a message well within the lease (the relay refuses
            // a shorter one).
            let mut config = outbox::kafka::producer_config(address);
            config.set("message.timeout.ms", (lease.as_millis() / 2).to_string());
            let transport = outbox::kafka::KafkaTransport::from_config(config)
                .expect("Kafka producer")
                .topic_prefix(target);
            run(outbox, fault.wrap(transport), lease, shutdown).await
        }
        "amqp" => {
            let transport = outbox::amqp::AmqpTransport::new(address.as_str()).exchange(target);
            run(outbox, fault.wrap(transport), lease, shutdown).await
        }
        "handler" => {
            let dispatcher = probe_dispatcher(pool, target).expect("effects table name");
            run(outbox, fault.wrap(dispatcher), lease, shutdown).await
        }
        other => panic!("unknown broker {other:?}"),
    };
    outcome.expect("relay");
}

/// Short leases and polls, small batches: many publish steps, each a chance to be stalled in.
async fn run<D: Destination>(
    outbox: Outbox<sqlx::Postgres>,
    destination: D,
    lease: Duration,
    shutdown: outbox::CancellationToken,
) -> outbox::Result<()> {
    let number = |name: &str, default: usize| {
        std::env::var(name)
            .ok()
            .map(|v| v.parse().expect(name))
            .unwrap_or(default)
    };
    let mut builder = Relay::builder(outbox, destination);
    if let Ok(attempts) = std::env::var("OUTBOX_RELAY_MAX_ATTEMPTS") {
        builder = builder.retry(
            outbox::RetryPolicy::exponential(Duration::from_millis(50))
                .max_delay(Duration::from_millis(200))
                .max_attempts(attempts.parse().expect("OUTBOX_RELAY_MAX_ATTEMPTS")),
        );
    }
    builder
        .lease(lease)
        .batch_size(number("OUTBOX_RELAY_BATCH", 8))
        .run_length(20)
        .workers(number("OUTBOX_RELAY_WORKERS", 2))
        .poll_interval(Duration::from_millis(20))
        .shutdown_timeout(Duration::from_secs(10))
        .build()
        .expect("relay configuration")
        .run(shutdown)
        .await
}

/// Where `OUTBOX_FAULT` makes the process die.
#[derive(Debug, Clone, Copy)]
enum Fault {
    None,
    AbortAfterPublish(u64),
    AbortBeforePublish(u64),
}

impl Fault {
    fn from_env() -> Self {
        let Ok(spec) = std::env::var("OUTBOX_FAULT") else {
            return Self::None;
        };
        let (when, n) = spec.split_once(':').expect("OUTBOX_FAULT=<when>:<batch>");
        let n = n.parse().expect("OUTBOX_FAULT batch number");
        match when {
            "abort-after-publish" => Self::AbortAfterPublish(n),
            "abort-before-publish" => Self::AbortBeforePublish(n),
            other => panic!("unknown OUTBOX_FAULT {other:?}"),
        }
    }

    fn wrap<D: Destination>(self, inner: D) -> Faulty<D> {
        Faulty {
            inner,
            fault: self,
            batches: AtomicU64::new(0),
        }
    }
}

/// A destination that aborts the process at the configured point, as a SIGKILL there would.
struct Faulty<D> {
    inner: D,
    fault: Fault,
    batches: AtomicU64,
}

impl<D: Destination> Faulty<D> {
    /// Runs `delivery` (the inner destination's), aborting before or after it as configured.
    async fn guarded(
        &self,
        delivery: impl std::future::Future<Output = Vec<DeliveryResult>>,
    ) -> Vec<DeliveryResult> {
        let n = self.batches.fetch_add(1, Ordering::SeqCst) + 1;
        if matches!(self.fault, Fault::AbortBeforePublish(at) if at == n) {
            std::process::abort();
        }
        let results = delivery.await;
        if matches!(self.fault, Fault::AbortAfterPublish(at) if at == n)
            && results.iter().any(Result::is_ok)
        {
            std::process::abort();
        }
        results
    }
}

impl<D: Destination> Destination for Faulty<D> {
    async fn deliver(&self, batch: &[Envelope]) -> Vec<DeliveryResult> {
        self.guarded(self.inner.deliver(batch)).await
    }

    async fn deliver_within(&self, batch: &[Envelope], budget: Duration) -> Vec<DeliveryResult> {
        self.guarded(self.inner.deliver_within(batch, budget)).await
    }

    fn delivery_timeout(&self) -> Option<Duration> {
        self.inner.delivery_timeout()
    }

    fn validate(&self) -> outbox::Result<()> {
        self.inner.validate()
    }
}
