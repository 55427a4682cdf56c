use serde::{Deserialize, Serialize};

#[derive(Serialize, Deserialize, outbox::OutboxEvent)]
#[outbox(version = 0)]
struct PaymentCreated {
    #[outbox(aggregate_id)]
    payment_id: u64,
}

fn main() {}
