//! A consumer in a process of its own, for tests whose poison message kills the process.
//!
//! `consumer_process nats|amqp|kafka <lane> <group> <inbox-table>`
//!
//! It consumes `ItemChanged` events of the lane (see `outbox_tests::lanes`) with attempt counts
//! in a PostgreSQL inbox (`OUTBOX_TEST_DATABASE_URL`), at most 3 attempts. The event `abort 1`
//! aborts the process; every other one is printed as `handled <item> <n>` on stdout, the ones
//! of item `slow` after two seconds.

use outbox::{HandlerContext, Inbox, Registry, RetryPolicy};
use outbox_tests::lanes::{Broker, Lane, Setup};
use outbox_tests::{pg_pool, ItemChanged};
use std::io::Write;
use std::time::Duration;

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    outbox_tests::init_process_tracing();
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [broker, lane, group, table] = args.as_slice() else {
        eprintln!("usage: consumer_process nats|amqp|kafka <lane> <group> <inbox-table>");
        std::process::exit(2);
    };
    let broker = match broker.as_str() {
        "nats" => Broker::Nats,
        "amqp" => Broker::Amqp,
        "kafka" => Broker::Kafka,
        other => panic!("unknown broker {other}"),
    };
    let inbox = Inbox::<sqlx::Postgres>::new(pg_pool().await, table, group).expect("inbox");
    inbox.migrate().await.expect("inbox tables");
    let registry = Registry::builder()
        .handler::<ItemChanged, _, _>("abort or print", |ev: ItemChanged, _: HandlerContext| {
            if ev.item == "abort" && ev.n == 1 {
                std::process::abort();
            }
            async move {
                if ev.item == "slow" {
                    // Still running when `abort 1` kills the process.
                    tokio::time::sleep(Duration::from_secs(2)).await;
                }
                let mut out = std::io::stdout().lock();
                writeln!(out, "handled {} {}", ev.item, ev.n).unwrap();
                out.flush().unwrap();
                Ok(())
            }
        })
        .expect("one handler")
        .build();
    let setup = Setup {
        retry: RetryPolicy::exponential(Duration::from_millis(20))
            .max_attempts(3)
            .jitter(false),
        attempts_in: Some(inbox),
        ack_wait: Duration::from_secs(1),
        ..Setup::default()
    };
    let lane = Lane::open(broker, lane).await;
    let running = lane
        .consume(group, outbox::Dispatcher::new(registry), &setup)
        .await;
    running.wait().await.expect("the consumer failed");
}
