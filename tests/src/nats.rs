//! NATS JetStream fixtures: the server, unique names, and reading a stream back with a plain
//! async-nats consumer.

use async_nats::jetstream::{self, consumer};
use futures_util::StreamExt;
use std::time::Duration;

/// The NATS server the tests use: `OUTBOX_TEST_NATS_URL`, or the local default.
pub fn nats_url() -> String {
    std::env::var("OUTBOX_TEST_NATS_URL").unwrap_or_else(|_| "127.0.0.1:4222".to_owned())
}

/// A JetStream context on `url`, with a 2 s request timeout.
pub async fn jetstream(url: &str) -> jetstream::Context {
    let client = async_nats::connect(url)
        .await
        .unwrap_or_else(|e| panic!("cannot reach NATS at {url}: {e}"));
    let mut js = jetstream::new(client);
    js.set_timeout(Duration::from_secs(2));
    js
}

/// A unique subject prefix and stream name per test.
pub fn names() -> (String, String) {
    let id = uuid::Uuid::new_v4().simple().to_string();
    (
        format!("t{}", &id[..10]),
        format!("T{}", &id[..10]).to_uppercase(),
    )
}

/// The first `count` messages of `stream`, in stream order.
pub async fn read_stream(
    stream: &jetstream::stream::Stream,
    count: usize,
) -> Vec<jetstream::Message> {
    let reader = stream
        .create_consumer(consumer::pull::Config {
            deliver_policy: consumer::DeliverPolicy::All,
            ack_policy: consumer::AckPolicy::None,
            ..Default::default()
        })
        .await
        .unwrap();
    let mut messages = reader.messages().await.unwrap();
    let mut out = Vec::with_capacity(count);
    while out.len() < count {
        let next = tokio::time::timeout(Duration::from_secs(10), messages.next())
            .await
            .expect("the stream delivered fewer messages than expected");
        out.push(next.unwrap().unwrap());
    }
    out
}

/// Every message `stream` holds now, in stream order.
pub async fn read_stored(stream: &jetstream::stream::Stream) -> Vec<jetstream::Message> {
    let mut stream = stream.clone();
    let stored = stream.info().await.unwrap().state.messages;
    read_stream(&stream, stored as usize).await
}
