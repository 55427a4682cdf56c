use serde::{Deserialize, Serialize};

#[derive(Serialize, Deserialize, outbox::OutboxEvent)]
struct Transfer {
    #[outbox(aggregate_id)]
    from_account: u64,
    #[outbox(aggregate_id)]
    to_account: u64,
}

fn main() {}
