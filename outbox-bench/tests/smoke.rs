//! The harness at tiny sizes against the real servers: every section produces figures. It
//! measures nothing worth reading and asserts no timing.

use outbox_bench::{run, Config, Target};

/// The smoke sizes, against the test suite's servers.
fn smoke_config() -> Config {
    let mut config = Config::smoke();
    if let Ok(url) = std::env::var("OUTBOX_TEST_DATABASE_URL") {
        config.database_url = url;
    }
    if let Ok(url) = std::env::var("OUTBOX_TEST_AMQP_URL") {
        config.amqp_url = url;
    }
    if let Ok(url) = std::env::var("OUTBOX_TEST_NATS_URL") {
        config.nats_url = url;
    }
    if let Ok(brokers) = std::env::var("OUTBOX_TEST_KAFKA_BROKERS") {
        config.kafka_brokers = brokers;
    }
    config
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_harness_measures_every_section() {
    let mut config = smoke_config();
    let out = std::env::temp_dir().join(format!("outbox-bench-smoke-{}", std::process::id()));
    config.out_dir = Some(out.clone());
    config.hold_open = true;
    let report = run(&config).await.expect("the smoke run completes");

    // Raw limits: both statements for each relay count, one figure per broker.
    assert_eq!(report.raw_pg.len(), 2 * config.relays.len());
    assert!(report
        .raw_pg
        .iter()
        .all(|r| r.rows == config.raw_events && r.rows_per_s > 0.0));
    assert_eq!(report.raw_brokers.len(), 3);
    assert!(report.raw_brokers.iter().all(|r| r.msgs_per_s > 0.0));

    // Enqueue: plain, enqueue with and without NOTIFY, Debezium layout, hand-off, per writer
    // count.
    assert_eq!(report.enqueue.len(), 5 * config.writers.len());
    assert!(report.enqueue.iter().all(|e| e.transactions > 0));

    // Relay: every target, backlog and relay count drained completely, in order, each rated
    // against a raw limit; with `hold_open`, twice (the second with a snapshot held open, which
    // leaves every delivered row's old version dead), each with the tables' dead tuples.
    assert_eq!(
        report.relay.len(),
        2 * Target::ALL.len() * config.backlogs.len() * config.relays.len()
    );
    for r in &report.relay {
        let bloat = r.bloat.as_ref().expect("hold_open counts dead tuples");
        let (_, outbox_dead, _, bytes) = &bloat.tables[0];
        assert!(*bytes > 0, "{r:?}");
        if r.held_open {
            assert!(*outbox_dead >= r.backlog as u64, "{r:?}");
        }
        let retention = r.retention.as_ref().expect("hold_open applies retention");
        assert_eq!(retention.removed, r.backlog as u64, "{r:?}");
        assert_eq!(r.layout, "standard");
    }
    for r in &report.relay {
        assert!(
            r.events_per_s > 0.0 && r.raw_limit > 0.0 && r.ratio > 0.0,
            "{r:?}"
        );
        assert!(r.peak_rss_mb > 0.0, "{r:?}");
        if r.target == Target::Handlers {
            assert_eq!(r.order_violations, Some(0), "{r:?}");
        }
    }

    // Hot aggregates: every target and aggregate count drained, in order, each rated.
    assert_eq!(
        report.hot.len(),
        Target::ALL.len() * config.hot_aggregates.len()
    );
    for r in &report.hot {
        assert!(r.events_per_s > 0.0 && r.ratio > 0.0, "{r:?}");
        assert_eq!(r.duplicates, 0, "{r:?}");
        if r.target == Target::Handlers {
            assert_eq!(r.order_violations, Some(0), "{r:?}");
        }
    }

    // Latency: every target and rate has samples and ordered percentiles.
    assert_eq!(
        report.latency.len(),
        Target::ALL.len() * config.latency_rates.len()
    );
    for l in &report.latency {
        assert!(l.samples > 0, "{l:?}");
        assert!(l.p50_ms <= l.p99_ms && l.p99_ms <= l.max_ms, "{l:?}");
    }

    // The files a report is made of.
    for file in [
        "results.json",
        "results.md",
        "throughput.svg",
        "latency.svg",
    ] {
        let len = std::fs::metadata(out.join(file)).map_or(0, |m| m.len());
        assert!(len > 100, "{file} was not written");
    }
    let svg = std::fs::read_to_string(out.join("throughput.svg")).unwrap();
    assert!(svg.contains("<svg") && svg.contains("handlers"));
    let _ = std::fs::remove_dir_all(out);
}

/// `--partitioned --hold-open` at tiny sizes: retention truncates the drained partition while
/// the snapshot is held, which leaves no dead tuple and frees the space, where deleting rows
/// (the standard layout, above) can free nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_partitioned_layout_frees_its_table_under_a_held_snapshot() {
    let mut config = smoke_config();
    config.prefix = format!("obpart{:04x}", std::process::id() & 0xffff);
    config.partitioned = true;
    config.hold_open = true;
    config.targets = vec![Target::Handlers];
    config.relays = vec![1];
    config.writers = vec![];
    config.hot_aggregates = vec![];
    config.latency_rates = vec![];
    let report = run(&config).await.expect("the partitioned run completes");
    assert_eq!(report.relay.len(), 2);
    for r in &report.relay {
        assert_eq!(r.layout, "partitioned");
        assert_eq!(r.order_violations, Some(0), "{r:?}");
        let (_, dead, _, bytes) = r.bloat.as_ref().expect("hold_open counts").tables[0];
        let retention = r.retention.as_ref().expect("hold_open applies retention");
        assert_eq!(retention.removed, r.backlog as u64, "{r:?}");
        let (_, dead_after, live_after, bytes_after) = retention.bloat.tables[0];
        if r.held_open {
            assert!(dead >= r.backlog as u64, "{r:?}");
        }
        assert_eq!((dead_after, live_after), (0, 0), "{r:?}");
        assert!(bytes_after * 4 < bytes, "{r:?}");
    }
}

/// `mysql_bench --smoke` against the real MariaDB and NATS: every section reports, every
/// drained backlog was delivered once each and in order.
#[test]
fn the_mysql_harness_measures_every_section() {
    let out = std::env::temp_dir().join(format!("outbox-mysql-bench-smoke-{}", std::process::id()));
    let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_mysql_bench"));
    command.args(["--smoke", "--out"]).arg(&out);
    if let Ok(url) = std::env::var("OUTBOX_TEST_MYSQL_URL") {
        command.env("OUTBOX_BENCH_MYSQL_URL", url);
    }
    if let Ok(url) = std::env::var("OUTBOX_TEST_NATS_URL") {
        command.env("OUTBOX_BENCH_NATS_URL", url);
    }
    let ran = command.output().expect("mysql_bench runs");
    assert!(
        ran.status.success(),
        "mysql_bench --smoke failed: {}",
        String::from_utf8_lossy(&ran.stderr)
    );
    let report = std::fs::read_to_string(out.join("mysql.md")).expect("mysql.md written");
    for section in [
        "Raw limits",
        "Enqueue overhead",
        "Relay throughput",
        "Hot aggregate",
        "Latency",
    ] {
        assert!(report.contains(section), "no {section} in:\n{report}");
    }
    let drains: Vec<&str> = report
        .lines()
        .filter(|l| l.starts_with("| ") && l.contains("backlog"))
        .collect();
    // Handlers and NATS, 1 and 4 relays over 1,000 aggregates, 1 relay over one.
    assert_eq!(drains.len(), 6, "{report}");
    for line in drains {
        assert!(
            line.contains(" 0 duplicate(s), 0 order violation(s)"),
            "{line}"
        );
    }
    std::fs::remove_dir_all(out).unwrap();
}

/// `wal_bench --smoke` against the logical cluster `scripts/services.sh pg-logical` starts, NATS
/// and tansu: every section reports, every drain finished, every latency sample confirmed.
#[test]
fn the_wal_harness_measures_every_section() {
    let out = std::env::temp_dir().join(format!("outbox-wal-bench-smoke-{}", std::process::id()));
    let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_wal_bench"));
    command
        .args(["--smoke", "--latency-seconds", "1", "--out"])
        .arg(&out);
    if let Ok(url) = std::env::var("OUTBOX_TEST_NATS_URL") {
        command.env("OUTBOX_BENCH_NATS_URL", url);
    }
    let ran = command.output().expect("wal_bench runs");
    assert!(
        ran.status.success(),
        "wal_bench --smoke failed: {}",
        String::from_utf8_lossy(&ran.stderr)
    );
    let report = std::fs::read_to_string(out.join("results.md")).expect("results.md written");
    for section in [
        "Raw limits",
        "Draining a backlog",
        "Several log-tailing relays",
        "Commit → confirmation latency",
    ] {
        assert!(report.contains(section), "no {section} in:\n{report}");
    }
    let drains = report
        .lines()
        .filter(|l| l.starts_with("| log tailing") || l.starts_with("| polling relay"))
        .count();
    // Three relay kinds, three targets, 1 and 1,000 aggregates.
    assert_eq!(drains, 18, "{report}");
    for line in report
        .lines()
        .filter(|l| l.starts_with("| ") && l.contains(" of "))
    {
        let cells: Vec<&str> = line.split('|').map(str::trim).collect();
        let (got, of) = cells[2].split_once(" of ").expect("n of m");
        assert_eq!(got, of, "a latency sample was never confirmed: {line}");
    }
    std::fs::remove_dir_all(out).unwrap();
}
