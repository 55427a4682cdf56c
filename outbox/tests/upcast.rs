//! `#[outbox(upcast_from = Old)]`: payloads written by last month's binary (versions 1 and 2)
//! reach a handler written for version 3 only, through upcasters registered at compile time.

use outbox::{Envelope, HandlerContext, HandlerError, OutboxEvent, Registry};
use serde::{Deserialize, Serialize};
use std::sync::Mutex;

/// Version 1 kept the amount as text.
#[derive(Serialize, Deserialize, OutboxEvent)]
#[outbox(
    event_type = "shop.order_placed",
    aggregate_type = "order",
    version = 1
)]
struct OrderPlacedV1 {
    #[outbox(aggregate_id)]
    order_id: String,
    amount: String,
}

/// Version 2: cents, as an integer.
#[derive(Serialize, Deserialize, OutboxEvent)]
#[outbox(
    event_type = "shop.order_placed",
    aggregate_type = "order",
    version = 2,
    upcast_from = OrderPlacedV1
)]
struct OrderPlacedV2 {
    #[outbox(aggregate_id)]
    order_id: String,
    amount_cents: i64,
}

impl From<OrderPlacedV1> for OrderPlacedV2 {
    fn from(v1: OrderPlacedV1) -> Self {
        let cents = v1
            .amount
            .parse::<f64>()
            .map_or(0, |a| (a * 100.0).round() as i64);
        Self {
            order_id: v1.order_id,
            amount_cents: cents,
        }
    }
}

/// Version 3, the current one: a currency.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, OutboxEvent)]
#[outbox(
    event_type = "shop.order_placed",
    aggregate_type = "order",
    version = 3,
    upcast_from = OrderPlacedV2
)]
struct OrderPlaced {
    #[outbox(aggregate_id)]
    order_id: String,
    amount_cents: i64,
    currency: String,
}

impl From<OrderPlacedV2> for OrderPlaced {
    fn from(v2: OrderPlacedV2) -> Self {
        Self {
            order_id: v2.order_id,
            amount_cents: v2.amount_cents,
            currency: "EUR".into(),
        }
    }
}

static SEEN: Mutex<Vec<OrderPlaced>> = Mutex::new(Vec::new());

#[outbox::handler]
async fn on_order_placed(order: OrderPlaced, _ctx: HandlerContext) -> Result<(), HandlerError> {
    SEEN.lock().unwrap().push(order);
    Ok(())
}

/// The envelope of `event` as an old producer wrote it: its own type's schema version.
fn envelope<E: OutboxEvent>(event: &E) -> Envelope {
    Envelope {
        id: uuid::Uuid::now_v7(),
        created_at: chrono::Utc::now(),
        event_type: E::EVENT_TYPE.into(),
        aggregate_type: E::AGGREGATE_TYPE.into(),
        aggregate_id: event.aggregate_id(),
        sequence: 1,
        schema_version: E::SCHEMA_VERSION,
        topic: E::TOPIC.into(),
        payload: serde_json::to_string(event).unwrap(),
        headers: Default::default(),
        attempt: 1,
    }
}

#[tokio::test]
async fn old_payloads_reach_the_current_handler() {
    let registry = Registry::from_inventory().unwrap();
    let dispatcher = outbox::Dispatcher::new(registry);
    let results = outbox::Destination::deliver(
        &dispatcher,
        &[
            envelope(&OrderPlacedV1 {
                order_id: "o-1".into(),
                amount: "12.50".into(),
            }),
            envelope(&OrderPlacedV2 {
                order_id: "o-2".into(),
                amount_cents: 700,
            }),
            envelope(&OrderPlaced {
                order_id: "o-3".into(),
                amount_cents: 1,
                currency: "USD".into(),
            }),
        ],
    )
    .await;
    assert_eq!(results, vec![Ok(()), Ok(()), Ok(())]);
    let seen = SEEN.lock().unwrap().clone();
    assert_eq!(
        seen.iter()
            .map(|o| (o.order_id.as_str(), o.amount_cents, o.currency.as_str()))
            .collect::<Vec<_>>(),
        vec![("o-1", 1250, "EUR"), ("o-2", 700, "EUR"), ("o-3", 1, "USD")]
    );
}
