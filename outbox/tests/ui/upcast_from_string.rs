use serde::{Deserialize, Serialize};

#[derive(Serialize, Deserialize, outbox::OutboxEvent)]
#[outbox(event_type = "order.placed", version = 2, upcast_from = "OrderPlacedV1")]
struct OrderPlaced {
    #[outbox(aggregate_id)]
    order_id: u64,
}

fn main() {}
