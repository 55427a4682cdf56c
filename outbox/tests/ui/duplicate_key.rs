use serde::{Deserialize, Serialize};

#[derive(Serialize, Deserialize, outbox::OutboxEvent)]
#[outbox(topic = "a", topic = "b")]
struct PaymentCreated {
    #[outbox(aggregate_id)]
    payment_id: u64,
}

fn main() {}
