//! `cargo run --release -p outbox-bench -- [options]`: see `--help` and BENCHMARKS.md.

use outbox_bench::{run, Config, Report, Target};
use std::path::PathBuf;
use std::time::Duration;

const HELP: &str = "\
outbox-bench: the outbox against the raw limits of the same servers, in one run

USAGE: cargo run --release -p outbox-bench -- [OPTIONS]

OPTIONS:
  --smoke                  tiny sizes, a few seconds: proves the harness works
  --out DIR                write results.json, results.md, throughput.svg, latency.svg
  --targets LIST           handlers,nats,amqp,kafka (default: all)
  --backlogs LIST          backlog sizes (default: 100000,1000000)
  --relays LIST            relay counts (default: 1,4)
  --workers N              workers per relay (default: 2 batches in flight in all)
  --batch N                aggregates leased per claim (default: aggregates / (relays x workers))
  --run-length N           events of one aggregate per claim (default: 500)
  --max-batch-events N     events per batch at most (default: 5000)
  --hot LIST               aggregate counts of the hot-aggregate runs (default: 1,10,1000)
  --hot-backlog N          backlog of each hot-aggregate run (default: 100000)
  --kafka-linger-ms N      linger.ms of the Kafka producers (default: the transport's, 0)
  --aggregates N           distinct aggregates (default: 1000)
  --raw-events N           rows/messages per raw limit (default: 100000)
  --rates LIST             latency runs' offered events/s (default: 1000,5000)
  --latency-seconds S      length of each latency run (default: 15)
  --enqueue-seconds S      length of each enqueue-overhead run (default: 10)
  --replot DIR             redraw DIR's results.md and plots from its results.json; no run
  --cleanup                drop the run's tables, streams, queues and topics at the end
  --hold-open              drain each backlog again with a snapshot held open on another
                           connection, and report the dead tuples and table sizes it leaves,
                           before and after retention (delete_after(0)) with it still held
  --partitioned            relay runs on the partitioned layout (4 partitions of an hour)

SERVERS (environment):
  OUTBOX_BENCH_DATABASE_URL   default postgres://postgres@127.0.0.1:5432/outbox_bench
  OUTBOX_BENCH_AMQP_URL       default amqp://guest:guest@127.0.0.1:5672/%2f
  OUTBOX_BENCH_NATS_URL       default nats://127.0.0.1:4222
  OUTBOX_BENCH_KAFKA_BROKERS  default 127.0.0.1:9092
";

fn list<T>(value: &str, parse: impl Fn(&str) -> Option<T>) -> Result<Vec<T>, String> {
    value
        .split(',')
        .map(|v| parse(v.trim()).ok_or_else(|| format!("cannot read {v:?}")))
        .collect()
}

fn parse_args() -> Result<Config, String> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut config = if args.iter().any(|a| a == "--smoke") {
        Config::smoke()
    } else {
        Config::full()
    };
    let mut it = args.iter();
    while let Some(flag) = it.next() {
        let mut value = || it.next().cloned().ok_or(format!("{flag} needs a value"));
        let number = |v: String| v.parse::<usize>().map_err(|e| format!("{flag}: {e}"));
        match flag.as_str() {
            "--smoke" => {}
            "--help" | "-h" => {
                print!("{HELP}");
                std::process::exit(0);
            }
            "--cleanup" => config.cleanup = true,
            "--hold-open" => config.hold_open = true,
            "--partitioned" => config.partitioned = true,
            "--out" => config.out_dir = Some(PathBuf::from(value()?)),
            "--targets" => config.targets = list(&value()?, Target::parse)?,
            "--backlogs" => config.backlogs = list(&value()?, |v| v.parse().ok())?,
            "--relays" => config.relays = list(&value()?, |v| v.parse().ok())?,
            "--rates" => config.latency_rates = list(&value()?, |v| v.parse().ok())?,
            "--workers" => config.workers = Some(number(value()?)?.max(1)),
            "--batch" => config.batch_size = Some(number(value()?)?),
            "--run-length" => config.run_length = number(value()?)?.max(1),
            "--max-batch-events" => config.max_batch_events = number(value()?)?.max(1),
            "--hot" => config.hot_aggregates = list(&value()?, |v| v.parse().ok())?,
            "--hot-backlog" => config.hot_backlog = number(value()?)?,
            "--kafka-linger-ms" => config.kafka_linger_ms = Some(number(value()?)? as u32),
            "--aggregates" => config.aggregates = number(value()?)?.max(1),
            "--raw-events" => config.raw_events = number(value()?)?,
            "--latency-seconds" => {
                config.latency_duration = Duration::from_secs_f64(number(value()?)? as f64)
            }
            "--enqueue-seconds" => {
                config.enqueue_duration = Duration::from_secs_f64(number(value()?)? as f64)
            }
            other => return Err(format!("unknown option {other} (see --help)")),
        }
    }
    Ok(config)
}

#[tokio::main]
async fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let args: Vec<String> = std::env::args().collect();
    if let Some(i) = args.iter().position(|a| a == "--replot") {
        let dir = PathBuf::from(args.get(i + 1).map_or(".", String::as_str));
        match Report::read(&dir).and_then(|report| report.render(&dir)) {
            Ok(()) => eprintln!("outbox-bench: redrew {}", dir.display()),
            Err(error) => {
                eprintln!("outbox-bench: {error}");
                std::process::exit(1);
            }
        }
        return;
    }
    let config = match parse_args() {
        Ok(config) => config,
        Err(error) => {
            eprintln!("outbox-bench: {error}");
            std::process::exit(2);
        }
    };
    match run(&config).await {
        Ok(report) => println!("{}", report.to_markdown()),
        Err(error) => {
            eprintln!("outbox-bench: {error}");
            std::process::exit(1);
        }
    }
}
