use serde::{Deserialize, Serialize};

#[derive(Serialize, Deserialize, outbox::OutboxEvent)]
#[outbox(event_name = "payment.created")]
struct PaymentCreated {
    #[outbox(aggregate_id)]
    payment_id: u64,
}

fn main() {}
