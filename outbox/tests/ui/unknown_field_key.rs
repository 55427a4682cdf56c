use serde::{Deserialize, Serialize};

#[derive(Serialize, Deserialize, outbox::OutboxEvent)]
struct PaymentCreated {
    #[outbox(aggregate_id)]
    payment_id: u64,
    #[outbox(skip)]
    amount: u64,
}

fn main() {}
