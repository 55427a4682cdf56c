//! `#[derive(OutboxEvent)]`: what it generates, and the compile errors it gives.

use outbox::OutboxEvent;
use serde::{Deserialize, Serialize};
use std::fmt;

#[derive(Serialize, Deserialize, OutboxEvent)]
#[outbox(
    event_type = "payment.created",
    aggregate_type = "payment",
    version = 3,
    topic = "payments"
)]
struct PaymentCreated {
    #[outbox(aggregate_id)]
    payment_id: uuid::Uuid,
    amount: i64,
}

#[test]
fn explicit_attributes() {
    assert_eq!(PaymentCreated::EVENT_TYPE, "payment.created");
    assert_eq!(PaymentCreated::AGGREGATE_TYPE, "payment");
    assert_eq!(PaymentCreated::SCHEMA_VERSION, 3);
    assert_eq!(PaymentCreated::TOPIC, "payments");
    let id = uuid::Uuid::now_v7();
    let event = PaymentCreated {
        payment_id: id,
        amount: 5,
    };
    assert_eq!(event.aggregate_id(), id.to_string());
}

#[derive(Serialize, Deserialize, OutboxEvent)]
struct OrderShipped {
    #[outbox(aggregate_id)]
    order_id: u64,
}

#[derive(Serialize, Deserialize, OutboxEvent)]
struct CustomerRenamed {
    #[outbox(aggregate_id)]
    id: String,
}

#[test]
fn defaults() {
    assert_eq!(OrderShipped::EVENT_TYPE, "OrderShipped");
    assert_eq!(OrderShipped::AGGREGATE_TYPE, "order");
    assert_eq!(OrderShipped::TOPIC, "order");
    assert_eq!(OrderShipped::SCHEMA_VERSION, 1);
    assert_eq!(OrderShipped { order_id: 42 }.aggregate_id(), "42");
    assert_eq!(CustomerRenamed::AGGREGATE_TYPE, "customer_renamed");
}

/// A newtype id with its own `Display`.
#[derive(Serialize, Deserialize)]
struct Sku(String);

impl fmt::Display for Sku {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SKU-{}", self.0)
    }
}

#[derive(Serialize, Deserialize, OutboxEvent)]
#[outbox(aggregate_type = "product")]
struct Generic<T> {
    #[outbox(aggregate_id)]
    sku: Sku,
    detail: T,
}

#[test]
fn generic_structs_and_newtype_ids() {
    assert_eq!(<Generic<u8>>::AGGREGATE_TYPE, "product");
    let event = Generic {
        sku: Sku("9".into()),
        detail: vec![1, 2],
    };
    assert_eq!(event.aggregate_id(), "SKU-9");
}

mod renamed {
    // The facade under another name, as a re-exporting crate would have it.
    pub use outbox as my_outbox;
}

#[derive(Serialize, Deserialize, OutboxEvent)]
#[outbox(crate = "renamed::my_outbox")]
struct ThroughAnotherPath {
    #[outbox(aggregate_id)]
    thing_id: i32,
}

#[test]
fn crate_path_can_be_overridden() {
    assert_eq!(ThroughAnotherPath::AGGREGATE_TYPE, "thing");
}

#[test]
fn compile_errors() {
    let t = trybuild::TestCases::new();
    t.compile_fail("tests/ui/*.rs");
}
