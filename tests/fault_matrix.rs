//! The fault matrix (issue 12): relays and consumers as separate OS processes, private
//! PostgreSQL, NATS, RabbitMQ and Kafka-protocol servers that the runner stops and restarts,
//! writers committing under load; nothing may be lost, invented or reordered.
//!
//! - `short_matrix` (the test suite, `.ci/run`): one cell per fault, rotating over the
//!   destinations, 3,000 events each, and a 20,000-event soak.
//! - `full_matrix` (`cargo test -p outbox-tests --test fault_matrix -- --ignored --nocapture`):
//!   every fault on every destination, 10,000 events each, and the 1,000,000-event soak on each
//!   destination; `OUTBOX_FAULTS_SOAK_EVENTS` and `OUTBOX_FAULTS_EVENTS` change the sizes,
//!   `OUTBOX_FAULTS_CELLS=kafka/1,nats/soak` picks cells (destination/fault number),
//!   `OUTBOX_FAULTS_ACCOUNTS`, `OUTBOX_FAULTS_RATE` and `OUTBOX_FAULTS_LEASE_MS` the load;
//!   `OUTBOX_FAULTS_RELAY_LOG` and `OUTBOX_FAULTS_CONSUMER_LOG` the processes' `RUST_LOG`, and
//!   `OUTBOX_FAULT_KAFKA_DEBUG=cgrp` librdkafka's debug contexts in the consumer. The
//!   table is printed and written to `$CARGO_TARGET_TMPDIR/fault-matrix.md` (RELIABILITY.md).

use outbox_tests::faults::{markdown, run_cell, Dest, Fault, Figures, Programs, Servers, Size};
use outbox_tests::init_tracing;

/// The helper processes: this build's, or copies named by `OUTBOX_FAULTS_RELAY` and
/// `OUTBOX_FAULTS_CONSUMER` (to loop a cell while the workspace is rebuilt).
fn programs() -> Programs {
    let program = |var: &str, built: &str| std::env::var_os(var).unwrap_or(built.into()).into();
    Programs {
        relay: program("OUTBOX_FAULTS_RELAY", env!("CARGO_BIN_EXE_relay_process")),
        consumer: program(
            "OUTBOX_FAULTS_CONSUMER",
            env!("CARGO_BIN_EXE_fault_consumer"),
        ),
    }
}

async fn run(cells: &[(Dest, Fault)], size: Size) -> Vec<Figures> {
    let mut servers = Servers::start().await;
    let mut all = Vec::new();
    for &(dest, fault) in cells {
        let figures = run_cell(&mut servers, &programs(), &size, dest, fault).await;
        eprintln!("{figures}");
        all.push(figures);
    }
    let table = markdown(&all);
    eprintln!("\n{table}");
    let report = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("fault-matrix.md");
    std::fs::write(&report, &table).unwrap();
    eprintln!("written to {}", report.display());
    all
}

fn assert_guarantees(all: &[Figures]) {
    let violations: Vec<String> = all.iter().flat_map(Figures::violations).collect();
    assert!(
        violations.is_empty(),
        "the fault matrix found violations:\n{}\n\n{}",
        violations.join("\n"),
        markdown(all)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn short_matrix() {
    init_tracing();
    let cells = [
        (Dest::Kafka, Fault::Kill),
        (Dest::Handler, Fault::Term),
        (Dest::Nats, Fault::Stall),
        (Dest::Amqp, Fault::BrokerBounce),
        (Dest::Handler, Fault::PgRestart),
        (Dest::Handler, Fault::Poison),
        (Dest::Nats, Fault::Poison),
        (Dest::Kafka, Fault::LongTransaction),
        (Dest::Amqp, Fault::Rollbacks),
        (Dest::Amqp, Fault::ConsumerKill),
        (Dest::Nats, Fault::ConsumerKill),
        (Dest::Nats, Fault::Soak),
    ];
    let all = run(&cells, Size::short()).await;
    assert_guarantees(&all);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "the long form: minutes per destination; run with --ignored"]
async fn full_matrix() {
    init_tracing();
    let mut size = Size::full();
    if let Ok(n) = std::env::var("OUTBOX_FAULTS_EVENTS") {
        size.events = n.parse().unwrap();
    }
    if let Ok(n) = std::env::var("OUTBOX_FAULTS_ACCOUNTS") {
        size.accounts = n.parse().unwrap();
    }
    if let Ok(n) = std::env::var("OUTBOX_FAULTS_RATE") {
        size.rate = n.parse().unwrap();
    }
    if let Ok(ms) = std::env::var("OUTBOX_FAULTS_LEASE_MS") {
        size.lease = std::time::Duration::from_millis(ms.parse().unwrap());
    }
    if let Ok(n) = std::env::var("OUTBOX_FAULTS_SOAK_EVENTS") {
        size.soak_events = n.parse().unwrap();
    }
    // OUTBOX_FAULTS_CELLS=kafka/1,nats/soak runs only those cells.
    let only: Option<Vec<String>> = std::env::var("OUTBOX_FAULTS_CELLS")
        .ok()
        .map(|v| v.split(',').map(str::to_owned).collect());
    let mut cells = Vec::new();
    for fault in Fault::MATRIX.into_iter().chain([Fault::Soak]) {
        for dest in Dest::ALL {
            let key = format!("{}/{}", dest.name(), fault.key());
            if fault.applies_to(dest) && only.as_ref().is_none_or(|o| o.contains(&key)) {
                cells.push((dest, fault));
            }
        }
    }
    let all = run(&cells, size).await;
    assert_guarantees(&all);
}
