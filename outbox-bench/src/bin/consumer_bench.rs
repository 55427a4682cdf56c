//! The consumer loop against the raw consume rate of the same broker, in the same run.
//!
//! `cargo run --release -p outbox-bench --bin consumer_bench -- [--events N] [--aggregates LIST]
//! [--targets nats,amqp,kafka] [--out DIR]`
//!
//! For each broker and aggregate count: N events are published once; a plain client of the
//! broker reads them without acknowledgements (JetStream `AckPolicy::None`, RabbitMQ `no_ack`,
//! Kafka's plain consumer: the broker's delivery ceiling), and `outbox::Consumer` runs them
//! through a no-op typed handler (default concurrency and window), acknowledging each; both are
//! timed from start to the last message, and the ratio is reported.

use futures_util::StreamExt;
use outbox::amqp::{AmqpConsumer, AmqpSource, AmqpTransport};
use outbox::consumer::{Consumer, Source};
use outbox::kafka::{ensure_topic, KafkaConsumer, KafkaSource, KafkaTransport};
use outbox::nats::{ensure_stream, NatsConsumer, NatsTransport};
use outbox::{
    CancellationToken, Dispatcher, Envelope, HandlerContext, HandlerError, Inbox, OutboxEvent,
    Registry, Transport,
};
use rdkafka::consumer::{Consumer as _, StreamConsumer};
use serde::{Deserialize, Serialize};
use std::fmt::Write as _;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

#[derive(Debug, Serialize, Deserialize, OutboxEvent)]
#[outbox(event_type = "bench.consumed", aggregate_type = "account")]
struct Consumed {
    #[outbox(aggregate_id)]
    account: String,
    n: u64,
    pad: String,
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Broker {
    Nats,
    Amqp,
    Kafka,
}

impl Broker {
    fn name(self) -> &'static str {
        match self {
            Broker::Nats => "NATS JetStream",
            Broker::Amqp => "RabbitMQ",
            Broker::Kafka => "Kafka protocol (tansu)",
        }
    }
}

struct Row {
    broker: Broker,
    aggregates: usize,
    events: usize,
    raw: f64,
    consumer: f64,
    /// With an inbox on PostgreSQL: the handler's transaction records the message, and the
    /// consumer counts attempts in the inbox's table.
    with_inbox: f64,
}

fn env(name: &str, default: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| default.to_owned())
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<(), BoxError> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut events = 20_000usize;
    let mut aggregates = vec![1000usize, 1];
    let mut targets = vec![Broker::Nats, Broker::Amqp, Broker::Kafka];
    let mut out = None;
    let mut i = 0;
    while i < args.len() {
        let value = args.get(i + 1).cloned().unwrap_or_default();
        match args[i].as_str() {
            "--events" => events = value.parse()?,
            "--aggregates" => {
                aggregates = value.split(',').map(str::parse).collect::<Result<_, _>>()?
            }
            "--targets" => {
                targets = value
                    .split(',')
                    .map(|t| match t {
                        "nats" => Ok(Broker::Nats),
                        "amqp" => Ok(Broker::Amqp),
                        "kafka" => Ok(Broker::Kafka),
                        other => Err(format!("unknown target {other}")),
                    })
                    .collect::<Result<_, _>>()?
            }
            "--out" => out = Some(std::path::PathBuf::from(value)),
            other => return Err(format!("unknown option {other}").into()),
        }
        i += 2;
    }

    let commits = raw_commits().await?;
    eprintln!("PostgreSQL: {commits:.0} single-row transactions/s (16 connections)");
    let mut rows = Vec::new();
    for &broker in &targets {
        for &aggs in &aggregates {
            let row = measure(broker, events, aggs).await?;
            eprintln!(
                "{:<24} {:>5} aggregates: raw {:>8.0} ev/s, consumer {:>8.0} ev/s ({:.0} %), \
                 with inbox {:>7.0} ev/s",
                broker.name(),
                aggs,
                row.raw,
                row.consumer,
                100.0 * row.consumer / row.raw,
                row.with_inbox
            );
            rows.push(row);
        }
    }
    let mut md = String::from(
        "| broker | aggregates | events | raw read, no acks (ev/s) | outbox Consumer (ev/s) | ratio | with inbox on PostgreSQL (ev/s) |\n\
         |---|---:|---:|---:|---:|---:|---:|\n",
    );
    for r in &rows {
        writeln!(
            md,
            "| {} | {} | {} | {:.0} | {:.0} | {:.0} % | {:.0} |",
            r.broker.name(),
            r.aggregates,
            r.events,
            r.raw,
            r.consumer,
            100.0 * r.consumer / r.raw,
            r.with_inbox
        )?;
    }
    writeln!(
        md,
        "\nRaw PostgreSQL limit in the same run: {commits:.0} single-row INSERT transactions/s \
         (16 connections, 32 writers)."
    )?;
    println!("{md}");
    if let Some(dir) = out {
        std::fs::create_dir_all(&dir)?;
        std::fs::write(dir.join("consumer.md"), md)?;
    }
    Ok(())
}

fn envelopes(topic: &str, events: usize, aggregates: usize) -> Vec<Envelope> {
    let mut sequence = vec![0i64; aggregates];
    (0..events)
        .map(|n| {
            let a = n % aggregates;
            sequence[a] += 1;
            let account = format!("acct-{a}");
            let payload = serde_json::to_string(&Consumed {
                account: account.clone(),
                n: n as u64,
                pad: "x".repeat(150),
            })
            .unwrap();
            Envelope {
                id: uuid::Uuid::now_v7(),
                created_at: outbox::chrono::Utc::now(),
                event_type: Consumed::EVENT_TYPE.into(),
                aggregate_type: Consumed::AGGREGATE_TYPE.into(),
                aggregate_id: account,
                sequence: sequence[a],
                schema_version: 1,
                topic: topic.into(),
                payload,
                headers: Default::default(),
                attempt: 1,
            }
        })
        .collect()
}

async fn publish<T: Transport>(transport: &T, batch: &[Envelope]) -> Result<(), BoxError> {
    for chunk in batch.chunks(1000) {
        for result in transport.publish(chunk).await {
            result.map_err(|e| e.reason)?;
        }
    }
    Ok(())
}

/// A no-op handler that counts.
fn dispatcher(handled: Arc<AtomicUsize>) -> Dispatcher {
    let registry = Registry::builder()
        .handler::<Consumed, _, _>("count", move |_: Consumed, _: HandlerContext| {
            handled.fetch_add(1, Ordering::Relaxed);
            async { Ok::<(), HandlerError>(()) }
        })
        .expect("one handler")
        .build();
    Dispatcher::new(registry)
}

/// A handler that changes state through an inbox: one transaction per message.
fn inbox_dispatcher(handled: Arc<AtomicUsize>, inbox: Inbox<sqlx::Postgres>) -> Dispatcher {
    let registry = Registry::builder()
        .handler::<Consumed, _, _>("apply", move |_: Consumed, ctx: HandlerContext| {
            let handled = handled.clone();
            async move {
                let inbox = ctx.state::<Inbox<sqlx::Postgres>>()?;
                if let Some(tx) = inbox.begin(&ctx).await? {
                    tx.commit().await?;
                }
                handled.fetch_add(1, Ordering::Relaxed);
                Ok::<(), HandlerError>(())
            }
        })
        .expect("one handler")
        .build();
    Dispatcher::new(registry).state(inbox)
}

async fn inbox(name: &str) -> Result<Inbox<sqlx::Postgres>, BoxError> {
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(16)
        .connect(&env(
            "OUTBOX_BENCH_DATABASE_URL",
            "postgres://postgres@127.0.0.1:5432/postgres",
        ))
        .await?;
    let inbox = Inbox::new(pool, &format!("{name}_inbox"), "bench")?;
    inbox.migrate().await?;
    Ok(inbox)
}

/// The database's own limit for what an inbox does per message: one-row transactions, from
/// 32 writers over 16 connections, for 5 s.
async fn raw_commits() -> Result<f64, BoxError> {
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(16)
        .connect(&env(
            "OUTBOX_BENCH_DATABASE_URL",
            "postgres://postgres@127.0.0.1:5432/postgres",
        ))
        .await?;
    let table = format!(
        "cbench_raw_{}",
        &uuid::Uuid::new_v4().simple().to_string()[..8]
    );
    sqlx::raw_sql(&format!("CREATE TABLE {table} (id uuid PRIMARY KEY)"))
        .execute(&pool)
        .await?;
    let done = Arc::new(AtomicUsize::new(0));
    let until = Instant::now() + Duration::from_secs(5);
    let writers: Vec<_> = (0..32)
        .map(|_| {
            let (pool, done, insert) = (
                pool.clone(),
                done.clone(),
                format!("INSERT INTO {table} (id) VALUES ($1)"),
            );
            tokio::spawn(async move {
                while Instant::now() < until {
                    let mut tx = pool.begin().await?;
                    sqlx::query(&insert)
                        .bind(uuid::Uuid::now_v7())
                        .execute(&mut *tx)
                        .await?;
                    tx.commit().await?;
                    done.fetch_add(1, Ordering::Relaxed);
                }
                Ok::<(), sqlx::Error>(())
            })
        })
        .collect();
    let start = Instant::now();
    for writer in writers {
        writer.await??;
    }
    let rate = done.load(Ordering::Relaxed) as f64 / start.elapsed().as_secs_f64();
    sqlx::raw_sql(&format!("DROP TABLE {table}"))
        .execute(&pool)
        .await?;
    Ok(rate)
}

/// Runs `consumer` until `events` were handled; events per second.
async fn timed<S: Source>(
    consumer: Consumer<S>,
    handled: &Arc<AtomicUsize>,
    events: usize,
) -> Result<f64, BoxError> {
    let shutdown = CancellationToken::new();
    let start = Instant::now();
    let task = tokio::spawn({
        let shutdown = shutdown.clone();
        async move { consumer.run(shutdown).await }
    });
    until_handled(handled, events).await?;
    let took = start.elapsed();
    shutdown.cancel();
    task.await??;
    Ok(rate(events, took))
}

async fn until_handled(handled: &AtomicUsize, events: usize) -> Result<(), BoxError> {
    let deadline = Instant::now() + Duration::from_secs(600);
    while handled.load(Ordering::Relaxed) < events {
        if Instant::now() > deadline {
            return Err("the consumer did not finish in 10 minutes".into());
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    Ok(())
}

fn rate(events: usize, took: Duration) -> f64 {
    events as f64 / took.as_secs_f64()
}

async fn measure(broker: Broker, events: usize, aggregates: usize) -> Result<Row, BoxError> {
    let name = format!("cbench{}", &uuid::Uuid::new_v4().simple().to_string()[..8]);
    let batch = envelopes(&name, events, aggregates);
    let plain = Arc::new(AtomicUsize::new(0));
    let applied = Arc::new(AtomicUsize::new(0));
    let inbox = inbox(&name).await?;
    let (raw, consumer, with_inbox) = match broker {
        Broker::Nats => {
            use async_nats::jetstream::consumer::AckPolicy;
            let client =
                async_nats::connect(env("OUTBOX_BENCH_NATS_URL", "127.0.0.1:4222")).await?;
            let js = async_nats::jetstream::new(client);
            let stream_name = name.to_uppercase();
            let stream = ensure_stream(&js, &stream_name, vec![format!("{name}.>")]).await?;
            publish(&NatsTransport::new(js.clone()), &batch).await?;
            let pull = |durable: &str, ack_policy: AckPolicy| {
                let stream = stream.clone();
                let durable = durable.to_owned();
                async move {
                    stream
                        .create_consumer(async_nats::jetstream::consumer::pull::Config {
                            durable_name: Some(durable),
                            ack_policy,
                            ..Default::default()
                        })
                        .await
                }
            };
            let raw_consumer = pull("raw", AckPolicy::None).await?;
            let start = Instant::now();
            let mut messages = raw_consumer.messages().await?;
            for _ in 0..events {
                messages.next().await.ok_or("stream ended")??;
            }
            let raw = rate(events, start.elapsed());
            drop(messages);
            let consumer = NatsConsumer::new(
                pull("outbox", AckPolicy::Explicit).await?,
                dispatcher(plain.clone()),
            );
            let consumer = timed(consumer, &plain, events).await?;
            let with_inbox = NatsConsumer::new(
                pull("inbox", AckPolicy::Explicit).await?,
                inbox_dispatcher(applied.clone(), inbox.clone()),
            )
            .attempts_in(inbox.clone());
            let with_inbox = timed(with_inbox, &applied, events).await?;
            js.delete_stream(&stream_name).await?;
            (raw, consumer, with_inbox)
        }
        Broker::Amqp => {
            let url = env(
                "OUTBOX_BENCH_AMQP_URL",
                "amqp://guest:guest@127.0.0.1:5672/%2f",
            );
            let connection =
                lapin::Connection::connect(&url, lapin::ConnectionProperties::default()).await?;
            let channel = connection.create_channel().await?;
            let queues = [
                format!("{name}.raw"),
                format!("{name}.outbox"),
                format!("{name}.inbox"),
            ];
            let mut topology = outbox::amqp::Topology::new(&name);
            for queue in &queues {
                topology = topology.queue(queue, ["#"]);
            }
            topology.declare(&channel).await?;
            publish(&AmqpTransport::new(&url), &batch).await?;
            let start = Instant::now();
            let mut deliveries = channel
                .basic_consume(
                    queues[0].as_str().into(),
                    "raw".into(),
                    lapin::options::BasicConsumeOptions {
                        no_ack: true,
                        ..Default::default()
                    },
                    lapin::types::FieldTable::default(),
                )
                .await?;
            for _ in 0..events {
                deliveries.next().await.ok_or("consumer ended")??;
            }
            let raw = rate(events, start.elapsed());
            let consumer = AmqpConsumer::new(
                AmqpSource::new(connection.create_channel().await?, &queues[1]),
                dispatcher(plain.clone()),
            );
            let consumer = timed(consumer, &plain, events).await?;
            let with_inbox = AmqpConsumer::new(
                AmqpSource::new(connection.create_channel().await?, &queues[2]),
                inbox_dispatcher(applied.clone(), inbox.clone()),
            )
            .attempts_in(inbox.clone());
            let with_inbox = timed(with_inbox, &applied, events).await?;
            for queue in &queues {
                channel
                    .queue_delete(queue.as_str().into(), Default::default())
                    .await?;
            }
            connection.close(0, "done".into()).await.ok();
            (raw, consumer, with_inbox)
        }
        Broker::Kafka => {
            let brokers = env("OUTBOX_BENCH_KAFKA_BROKERS", "127.0.0.1:9092");
            ensure_topic(&brokers, &name, 3).await?;
            publish(&KafkaTransport::new(&brokers)?, &batch).await?;
            let raw_consumer: StreamConsumer = rdkafka::ClientConfig::new()
                .set("bootstrap.servers", &brokers)
                .set("group.id", format!("{name}-raw"))
                .set("auto.offset.reset", "earliest")
                .create()?;
            raw_consumer.subscribe(&[&name])?;
            let start = Instant::now();
            for _ in 0..events {
                raw_consumer.recv().await?;
            }
            let raw = rate(events, start.elapsed());
            drop(raw_consumer);
            let source = KafkaSource::new(&brokers, &format!("{name}-outbox"), &[&name])?;
            let consumer = timed(
                KafkaConsumer::new(source, dispatcher(plain.clone())),
                &plain,
                events,
            )
            .await?;
            let source = KafkaSource::new(&brokers, &format!("{name}-inbox"), &[&name])?;
            let with_inbox =
                KafkaConsumer::new(source, inbox_dispatcher(applied.clone(), inbox.clone()))
                    .attempts_in(inbox.clone());
            let with_inbox = timed(with_inbox, &applied, events).await?;
            (raw, consumer, with_inbox)
        }
    };
    sqlx::raw_sql(&format!("DROP TABLE {name}_inbox, {name}_inbox_attempts"))
        .execute(inbox.pool())
        .await?;
    Ok(Row {
        broker,
        aggregates,
        events,
        raw,
        consumer,
        with_inbox,
    })
}
