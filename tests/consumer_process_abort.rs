//! A poison message whose handler aborts the consumer process (`std::process::abort`), on each
//! real broker: the process is started again after each death, as a supervisor would. Attempt
//! counts in the inbox's table survive the deaths: after the retry policy's last attempt (3)
//! the next process dead-letters the message without running it, and the messages behind it
//! (its own aggregate's included) are handled. A slow message of another aggregate, running
//! beside the poison at each crash, is charged one crash at most and handled.

use outbox_tests::lanes::{Broker, Lane};
use outbox_tests::{init_tracing, pg_url, unique_table};
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// One consumer process; its stdout lines arrive on `lines`.
struct Process {
    child: Child,
    lines: mpsc::Receiver<String>,
}

impl Process {
    fn start(broker: &str, lane: &str, group: &str, table: &str) -> Self {
        let mut child = Command::new(env!("CARGO_BIN_EXE_consumer_process"))
            .args([broker, lane, group, table])
            .env("OUTBOX_TEST_DATABASE_URL", pg_url())
            .stdout(Stdio::piped())
            .spawn()
            .expect("the consumer process starts");
        let stdout = child.stdout.take().unwrap();
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Self { child, lines }
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn poison_that_aborts_the_process_dies_after_max_attempts(broker: Broker, arg: &str) {
    init_tracing();
    let lane = Lane::new(broker).await;
    // A slow handler of another aggregate is running each time the poison kills the process:
    // it must not be charged those crashes and die with the poison.
    lane.publish(&[lane.envelope("slow", 1)]).await;
    let poison = lane.envelope("abort", 1);
    lane.publish(std::slice::from_ref(&poison)).await;
    lane.publish(&[lane.envelope("abort", 2)]).await;
    lane.publish(&[lane.envelope("other", 1)]).await;
    let group = format!("g{}", &uuid::Uuid::new_v4().simple().to_string()[..10]);
    let table = unique_table();

    let deadline = Instant::now() + Duration::from_secs(150);
    let mut deaths = 0;
    let mut handled: Vec<String> = Vec::new();
    'supervise: loop {
        assert!(
            Instant::now() < deadline,
            "gave up after {deaths} deaths: {handled:?}"
        );
        let mut process = Process::start(arg, &lane.name, &group, &table);
        loop {
            while let Ok(line) = process.lines.try_recv() {
                handled.push(line);
            }
            if ["handled abort 2", "handled slow 1"]
                .iter()
                .all(|expected| handled.iter().any(|l| l == expected))
            {
                break 'supervise;
            }
            if let Some(status) = process.child.try_wait().unwrap() {
                assert!(!status.success(), "the consumer only ends by aborting");
                deaths += 1;
                assert!(
                    deaths <= 3,
                    "the poison killed the consumer a {deaths}th time"
                );
                continue 'supervise;
            }
            assert!(
                Instant::now() < deadline,
                "gave up after {deaths} deaths: {handled:?}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    assert_eq!(deaths, 3, "one death per attempt, up to the policy's last");
    let dead = lane.dead_lettered(1, Duration::from_secs(30)).await;
    assert_eq!(
        dead.iter().map(|d| d.id).collect::<Vec<_>>(),
        [poison.id],
        "only the poison is dead-lettered"
    );
    assert_eq!(dead[0].id, poison.id, "the poison is dead-lettered");
    assert!(
        handled.iter().any(|l| l == "handled other 1"),
        "the other aggregate was handled: {handled:?}"
    );
    if let Some(reason) = &dead[0].reason {
        assert!(reason.contains("attempt 4 of at most 3"), "{reason}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats() {
    poison_that_aborts_the_process_dies_after_max_attempts(Broker::Nats, "nats").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn amqp() {
    poison_that_aborts_the_process_dies_after_max_attempts(Broker::Amqp, "amqp").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kafka() {
    poison_that_aborts_the_process_dies_after_max_attempts(Broker::Kafka, "kafka").await;
}
