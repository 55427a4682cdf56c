use serde::{Deserialize, Serialize};

#[derive(Serialize, Deserialize)]
struct PaymentId(u64);

#[derive(Serialize, Deserialize, outbox::OutboxEvent)]
struct PaymentCreated {
    #[outbox(aggregate_id)]
    payment_id: PaymentId,
}

fn main() {}
