//! The brokers: their raw pipelined publish-with-confirmation rates through the plain clients,
//! and the destinations the relay runs publish to.

use crate::pg::Servers;
use crate::report::RawBroker;
use crate::{BoxError, Config, OrderPlaced, Target};
use futures_util::stream::{FuturesUnordered, StreamExt};
use lapin::options::{
    BasicPublishOptions, ConfirmSelectOptions, ExchangeDeleteOptions, QueueDeclareOptions,
    QueueDeleteOptions, QueuePurgeOptions,
};
use lapin::types::FieldTable;
use lapin::BasicProperties;
use lapin::Confirmation;
use outbox::amqp::{AmqpTransport, Topology};
use outbox::kafka::KafkaTransport;
use outbox::nats::NatsTransport;
use rdkafka::producer::{FutureProducer, FutureRecord};
use std::future::IntoFuture;
use std::time::{Duration, Instant};

/// Partitions of the benchmark topics.
const KAFKA_PARTITIONS: i32 = 4;

fn stream_name(config: &Config, suffix: &str) -> String {
    format!("{}_{suffix}", config.prefix.to_uppercase())
}

fn amqp_names(config: &Config) -> (String, String) {
    let p = &config.prefix;
    (format!("{p}.exchange"), format!("{p}.queue"))
}

/// Measures every broker target of `config`.
pub async fn raw_limits(servers: &Servers, config: &Config) -> Result<Vec<RawBroker>, BoxError> {
    let payload = serde_json::to_vec(&OrderPlaced::new(0, 1, config.payload_bytes))?;
    let mut figures = Vec::new();
    for &target in &config.targets {
        let (in_flight, elapsed) = match target {
            Target::Handlers => continue,
            Target::Nats => {
                let window = config.raw_in_flight;
                (window, raw_nats(servers, config, &payload, window).await?)
            }
            Target::Amqp => {
                let window = config.raw_in_flight;
                (window, raw_amqp(servers, config, &payload, window).await?)
            }
            Target::Kafka => {
                let window = config.raw_in_flight * 4;
                (window, raw_kafka(config, &payload, window).await?)
            }
        };
        let figure = RawBroker {
            target,
            messages: config.raw_events,
            in_flight,
            msgs_per_s: config.raw_events as f64 / elapsed.as_secs_f64(),
        };
        eprintln!(
            "[bench]   {}: {:.0} msgs/s ({} in flight)",
            target.name(),
            figure.msgs_per_s,
            in_flight
        );
        figures.push(figure);
    }
    Ok(figures)
}

/// JetStream publish with `window` acknowledgements outstanding; returns the publishing time.
async fn raw_nats(
    servers: &Servers,
    config: &Config,
    payload: &[u8],
    window: usize,
) -> Result<Duration, BoxError> {
    let (js, stream) = empty_stream(servers, config, "RAW", "raw").await?;
    let subject = format!("{}.raw.order_placed", config.prefix);
    let payload = bytes::Bytes::copy_from_slice(payload);
    let mut acks = FuturesUnordered::new();
    let started = Instant::now();
    for _ in 0..config.raw_events {
        if acks.len() >= window {
            acks.next().await.expect("not empty")?;
        }
        let ack = js.publish(subject.clone(), payload.clone()).await?;
        acks.push(ack.into_future());
    }
    while let Some(ack) = acks.next().await {
        ack?;
    }
    let elapsed = started.elapsed();
    stream.purge().await?;
    Ok(elapsed)
}

/// Persistent, mandatory publishes to a durable classic queue with `window` confirms
/// outstanding; returns the publishing time.
async fn raw_amqp(
    servers: &Servers,
    config: &Config,
    payload: &[u8],
    window: usize,
) -> Result<Duration, BoxError> {
    let channel = servers.amqp.create_channel().await?;
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await?;
    let queue = format!("{}.raw", config.prefix);
    channel
        .queue_declare(
            queue.as_str().into(),
            QueueDeclareOptions {
                durable: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await?;
    channel
        .queue_purge(queue.as_str().into(), QueuePurgeOptions::default())
        .await?;
    let properties = BasicProperties::default().with_delivery_mode(2);
    let mut confirms = FuturesUnordered::new();
    let check = |c: Result<Confirmation, lapin::Error>| -> Result<(), BoxError> {
        match c? {
            Confirmation::Ack(None) => Ok(()),
            other => Err(format!("RabbitMQ did not confirm: {other:?}").into()),
        }
    };
    let started = Instant::now();
    for _ in 0..config.raw_events {
        if confirms.len() >= window {
            check(confirms.next().await.expect("not empty"))?;
        }
        let confirm = channel
            .basic_publish(
                "".into(),
                queue.as_str().into(),
                BasicPublishOptions {
                    mandatory: true,
                    ..Default::default()
                },
                payload,
                properties.clone(),
            )
            .await?;
        confirms.push(confirm.into_future());
    }
    while let Some(c) = confirms.next().await {
        check(c)?;
    }
    let elapsed = started.elapsed();
    channel
        .queue_purge(queue.as_str().into(), QueuePurgeOptions::default())
        .await?;
    let _ = channel.close(200, "done".into()).await;
    Ok(elapsed)
}

/// rdkafka with the transport's own producer settings (idempotent, `acks=all`, `linger.ms=5`),
/// keyed by aggregate, `window` deliveries outstanding; returns the publishing time.
async fn raw_kafka(config: &Config, payload: &[u8], window: usize) -> Result<Duration, BoxError> {
    let topic = format!("{}.raw", config.prefix);
    outbox::kafka::ensure_topic(&config.kafka_brokers, &topic, KAFKA_PARTITIONS).await?;
    let mut producer_config = kafka_config(config);
    producer_config
        .set("enable.idempotence", "true")
        .set("acks", "all");
    let producer: FutureProducer = producer_config.create()?;
    let keys: Vec<String> = (0..config.aggregates).map(crate::account).collect();
    let mut deliveries = FuturesUnordered::new();
    let started = Instant::now();
    for i in 0..config.raw_events {
        if deliveries.len() >= window {
            deliveries.next().await.expect("not empty")?;
        }
        let record = FutureRecord::to(&topic)
            .key(&keys[i % keys.len()])
            .payload(payload);
        let delivery = producer.send_result(record).map_err(|(error, _)| error)?;
        deliveries.push(async move {
            match delivery.await {
                Ok(Ok(_)) => Ok(()),
                Ok(Err((error, _))) => Err(error.to_string()),
                Err(_) => Err("delivery cancelled".to_owned()),
            }
        });
    }
    while let Some(d) = deliveries.next().await {
        d?;
    }
    Ok(started.elapsed())
}

/// Creates (or empties) the NATS stream of the relay runs; returns the transport.
pub async fn nats_destination(
    servers: &Servers,
    config: &Config,
) -> Result<NatsTransport, BoxError> {
    let (js, _) = empty_stream(servers, config, "OUTBOX", "bench").await?;
    Ok(NatsTransport::new(js).subject_prefix(&config.prefix))
}

/// The stream `<PREFIX>_<suffix>` capturing `<prefix>.<token>.>`, created or emptied.
async fn empty_stream(
    servers: &Servers,
    config: &Config,
    suffix: &str,
    token: &str,
) -> Result<
    (
        async_nats::jetstream::Context,
        async_nats::jetstream::stream::Stream,
    ),
    BoxError,
> {
    let js = async_nats::jetstream::new(servers.nats.clone());
    let stream = outbox::nats::ensure_stream(
        &js,
        &stream_name(config, suffix),
        vec![format!("{}.{token}.>", config.prefix)],
    )
    .await?;
    stream.purge().await?;
    Ok((js, stream))
}

/// Declares (or empties) the RabbitMQ exchange and queue of the relay runs; returns a factory of
/// transports, one connection each.
pub async fn amqp_destination(
    servers: &Servers,
    config: &Config,
) -> Result<impl Fn() -> AmqpTransport, BoxError> {
    let (exchange, queue) = amqp_names(config);
    let channel = servers.amqp.create_channel().await?;
    Topology::new(&exchange)
        .queue(&queue, ["#"])
        .declare(&channel)
        .await?;
    channel
        .queue_purge(queue.as_str().into(), QueuePurgeOptions::default())
        .await?;
    let _ = channel.close(200, "done".into()).await;
    let url = config.amqp_url.clone();
    Ok(move || AmqpTransport::new(url.clone()).exchange(exchange.clone()))
}

/// Creates the Kafka topic of the relay runs; returns a factory of transports, one producer
/// each.
pub async fn kafka_destination(
    config: &Config,
) -> Result<impl Fn() -> Result<KafkaTransport, BoxError>, BoxError> {
    let topic = format!("{}.bench", config.prefix);
    outbox::kafka::ensure_topic(&config.kafka_brokers, &topic, KAFKA_PARTITIONS).await?;
    let (producer_config, prefix) = (kafka_config(config), config.prefix.clone());
    Ok(move || Ok(KafkaTransport::from_config(producer_config.clone())?.topic_prefix(&prefix)))
}

/// The transport's producer settings, with the run's `linger.ms` if it sets one.
fn kafka_config(config: &Config) -> rdkafka::ClientConfig {
    let mut producer_config = outbox::kafka::producer_config(&config.kafka_brokers);
    if let Some(linger) = config.kafka_linger_ms {
        producer_config.set("linger.ms", linger.to_string());
    }
    producer_config
}

/// Deletes the streams, queues, exchange and topics of the run.
pub async fn cleanup(servers: &Servers, config: &Config) {
    let js = async_nats::jetstream::new(servers.nats.clone());
    for suffix in ["RAW", "OUTBOX"] {
        let _ = js.delete_stream(stream_name(config, suffix)).await;
    }
    if let Ok(channel) = servers.amqp.create_channel().await {
        let (exchange, queue) = amqp_names(config);
        for q in [queue, format!("{}.raw", config.prefix)] {
            let _ = channel
                .queue_delete(q.as_str().into(), QueueDeleteOptions::default())
                .await;
        }
        let _ = channel
            .exchange_delete(exchange.as_str().into(), ExchangeDeleteOptions::default())
            .await;
        let _ = channel.close(200, "done".into()).await;
    }
    use rdkafka::admin::{AdminClient, AdminOptions};
    let admin: Result<AdminClient<rdkafka::client::DefaultClientContext>, _> =
        rdkafka::ClientConfig::new()
            .set("bootstrap.servers", &config.kafka_brokers)
            .create();
    if let Ok(admin) = admin {
        let topics = [
            format!("{}.raw", config.prefix),
            format!("{}.raw.dlq", config.prefix),
            format!("{}.bench", config.prefix),
            format!("{}.bench.dlq", config.prefix),
        ];
        let names: Vec<&str> = topics.iter().map(String::as_str).collect();
        let _ = tokio::time::timeout(
            Duration::from_secs(5),
            admin.delete_topics(&names, &AdminOptions::new()),
        )
        .await;
    }
}
