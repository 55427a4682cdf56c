use serde::{Deserialize, Serialize};

#[derive(Serialize, Deserialize, outbox::OutboxEvent)]
struct PaymentCreated(u64);

fn main() {}
