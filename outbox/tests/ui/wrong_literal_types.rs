use serde::{Deserialize, Serialize};

#[derive(Serialize, Deserialize, outbox::OutboxEvent)]
#[outbox(event_type = 7, version = "2")]
struct PaymentCreated {
    #[outbox(aggregate_id)]
    payment_id: u64,
}

fn main() {}
