use serde::{Deserialize, Serialize};

#[derive(Serialize, Deserialize, outbox::OutboxEvent)]
#[outbox(event_type = "order.placed", version = 1)]
struct OrderPlacedV1 {
    #[outbox(aggregate_id)]
    order_id: u64,
}

// No `impl From<OrderPlacedV1> for OrderPlaced`: the error points at the attribute.
#[derive(Serialize, Deserialize, outbox::OutboxEvent)]
#[outbox(event_type = "order.placed", version = 2, upcast_from = OrderPlacedV1)]
struct OrderPlaced {
    #[outbox(aggregate_id)]
    order_id: u64,
}

fn main() {}
