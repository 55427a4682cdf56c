//! A relay in a process of its own, for tests that stop, stall or kill relays (SIGKILL,
//! SIGSTOP) the way an operating system does.
//!
//! `relay_process <postgres-url> <table> <lease-ms> nats <nats-url> <subject-prefix>`
//! `relay_process <postgres-url> <table> <lease-ms> kafka <brokers> <topic-prefix>`
//!
//! It relays until it is killed. `RUST_LOG` turns on its logs (stderr).

use outbox::{Outbox, Relay};
use std::time::Duration;

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_writer(std::io::stderr)
        .init();
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [database, table, lease_ms, broker, address, prefix] = args.as_slice() else {
        eprintln!(
            "usage: relay_process <postgres-url> <table> <lease-ms> nats|kafka <address> <prefix>"
        );
        std::process::exit(2);
    };
    let pool = sqlx::PgPool::connect(database).await.expect("database");
    let outbox = Outbox::<sqlx::Postgres>::builder(pool)
        .table(table.as_str())
        .build()
        .expect("table name");
    let lease = Duration::from_millis(lease_ms.parse().expect("lease in milliseconds"));
    let shutdown = outbox::CancellationToken::new();
    let outcome = match broker.as_str() {
        "nats" => {
            let client = async_nats::connect(address.as_str()).await.expect("NATS");
            let transport = outbox::nats::NatsTransport::new(async_nats::jetstream::new(client))
                .subject_prefix(prefix);
            tuned(Relay::builder(outbox, transport), lease)
                .run(shutdown)
                .await
        }
        "kafka" => {
            let transport = outbox::kafka::KafkaTransport::new(address)
                .expect("Kafka producer")
                .topic_prefix(prefix);
            tuned(Relay::builder(outbox, transport), lease)
                .run(shutdown)
                .await
        }
        other => panic!("unknown broker {other:?}"),
    };
    outcome.expect("relay");
}

/// Short leases and polls, small batches: many publish steps, each a chance to be stalled in.
fn tuned<D: outbox::Destination>(
    builder: outbox::RelayBuilder<sqlx::Postgres, D>,
    lease: Duration,
) -> Relay<sqlx::Postgres, D> {
    builder
        .lease(lease)
        .batch_size(8)
        .run_length(20)
        .workers(2)
        .poll_interval(Duration::from_millis(20))
        .build()
        .expect("relay configuration")
}
