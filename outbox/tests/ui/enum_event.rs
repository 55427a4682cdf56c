use serde::{Deserialize, Serialize};

#[derive(Serialize, Deserialize, outbox::OutboxEvent)]
enum PaymentEvent {
    Created { payment_id: u64 },
}

fn main() {}
