use serde::{Deserialize, Serialize};

#[derive(Serialize, Deserialize, outbox::OutboxEvent)]
#[outbox(event_type = "order.placed", version = 3)]
struct OrderPlacedV3 {
    #[outbox(aggregate_id)]
    order_id: u64,
}

// A step from version 3 to version 2 goes backwards.
#[derive(Serialize, Deserialize, outbox::OutboxEvent)]
#[outbox(event_type = "order.placed", version = 2, upcast_from = OrderPlacedV3)]
struct OrderPlaced {
    #[outbox(aggregate_id)]
    order_id: u64,
}

impl From<OrderPlacedV3> for OrderPlaced {
    fn from(v3: OrderPlacedV3) -> Self {
        Self {
            order_id: v3.order_id,
        }
    }
}

fn main() {}
