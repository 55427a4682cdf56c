use serde::{Deserialize, Serialize};

#[derive(Serialize, Deserialize, outbox::OutboxEvent)]
struct PaymentCreated {
    payment_id: u64,
}

fn main() {}
