//! The fault matrix's consumer in a process of its own (fault 9: killed between its effect and
//! its acknowledgement).
//!
//! `fault_consumer <postgres-url> <table> nats|amqp|kafka <address> <route>`
//!
//! It consumes the cell's `Probe` events (`<route>`: the NATS subject prefix, the RabbitMQ
//! queue, the Kafka topic prefix) and applies each one through the inbox `<table>_inbox`: the
//! effect (a row in `<table>_effects`) and the inbox record commit together. With
//! `OUTBOX_FAULT_ABORT_ONE_IN=N` it aborts, one event in `N`, right after that commit and before
//! the acknowledgement. SIGTERM stops it gracefully.

use outbox::amqp::{AmqpConsumer, AmqpSource};
use outbox::kafka::{KafkaConsumer, KafkaSource};
use outbox::nats::NatsConsumer;
use outbox::{Dispatcher, HandlerContext, HandlerError, Inbox, Registry, RetryPolicy};
use outbox_tests::faults::Probe;
use sqlx::Postgres;
use std::time::Duration;

struct State {
    inbox: Inbox<Postgres>,
    insert: String,
    abort_one_in: u32,
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    outbox_tests::init_process_tracing();
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [database, table, broker, address, route] = args.as_slice() else {
        eprintln!("usage: fault_consumer <postgres-url> <table> nats|amqp|kafka <address> <route>");
        std::process::exit(2);
    };
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(8)
        .connect(database)
        .await
        .expect("database");
    let inbox =
        Inbox::<Postgres>::new(pool.clone(), &format!("{table}_inbox"), "fault").expect("inbox");
    inbox.migrate().await.expect("inbox tables");
    let state = State {
        inbox: inbox.clone(),
        insert: format!(r#"INSERT INTO "{table}_effects" (id, account, n) VALUES ($1, $2, $3)"#),
        abort_one_in: std::env::var("OUTBOX_FAULT_ABORT_ONE_IN")
            .map(|v| v.parse().expect("OUTBOX_FAULT_ABORT_ONE_IN"))
            .unwrap_or(0),
    };
    let registry = Registry::builder()
        .handler::<Probe, _, _>("apply probe", |ev: Probe, ctx: HandlerContext| async move {
            let state = ctx.state::<State>()?;
            let Some(mut tx) = state.inbox.begin(&ctx).await.map_err(HandlerError::retry)? else {
                return Ok(()); // applied before
            };
            sqlx::query(&state.insert)
                .bind(ctx.event_id())
                .bind(&ev.account)
                .bind(ev.n)
                .execute(&mut *tx)
                .await
                .map_err(HandlerError::retry)?;
            tx.commit().await.map_err(HandlerError::retry)?;
            if state.abort_one_in > 0 && fastrand::u32(..state.abort_one_in) == 0 {
                // Dies between the effect and the acknowledgement.
                std::process::abort();
            }
            Ok(())
        })
        .expect("one handler")
        .build();
    let dispatcher = Dispatcher::new(registry).state(state);
    let retry = RetryPolicy::exponential(Duration::from_millis(50))
        .max_delay(Duration::from_millis(500))
        .max_attempts(1000);
    let shutdown = outbox_tests::cancel_on_sigterm();
    let outcome = match broker.as_str() {
        "nats" => {
            use async_nats::jetstream::consumer::{pull, AckPolicy};
            let js = async_nats::jetstream::new(
                async_nats::connect(address.as_str()).await.expect("NATS"),
            );
            let stream = js.get_stream(route.to_uppercase()).await.expect("stream");
            let pull = stream
                .get_or_create_consumer(
                    "fault",
                    pull::Config {
                        durable_name: Some("fault".into()),
                        ack_policy: AckPolicy::Explicit,
                        ack_wait: Duration::from_secs(5),
                        ..Default::default()
                    },
                )
                .await
                .expect("JetStream consumer");
            NatsConsumer::new(pull, dispatcher)
                .retry(retry)
                .attempts_in(inbox)
                .run(shutdown)
                .await
        }
        "amqp" => {
            let connection = lapin::Connection::connect(address, Default::default())
                .await
                .expect("RabbitMQ");
            let channel = connection.create_channel().await.expect("channel");
            AmqpConsumer::new(AmqpSource::new(channel, route.as_str()), dispatcher)
                .retry(retry)
                .attempts_in(inbox)
                .run(shutdown)
                .await
        }
        "kafka" => {
            let mut config = rdkafka::config::ClientConfig::new();
            config
                .set("bootstrap.servers", address)
                .set("group.id", "fault")
                .set("auto.offset.reset", "earliest")
                .set("session.timeout.ms", "6000")
                .set("heartbeat.interval.ms", "1000");
            // librdkafka's own debug contexts (`cgrp,consumer`), logged at the `rdkafka` target.
            if let Ok(contexts) = std::env::var("OUTBOX_FAULT_KAFKA_DEBUG") {
                config.set("debug", contexts);
            }
            let topic = format!("{route}.probe");
            let source = KafkaSource::from_config(config, &[&topic]).expect("Kafka consumer");
            KafkaConsumer::new(source, dispatcher)
                .retry(retry)
                .attempts_in(inbox)
                .run(shutdown)
                .await
        }
        other => panic!("unknown broker {other:?}"),
    };
    outcome.expect("consumer");
}
