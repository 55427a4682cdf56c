//! `#[outbox::handler]`: registration through `inventory`, dispatch by event type and version.

use outbox::{
    Destination, Dispatcher, Envelope, HandlerContext, HandlerError, OutboxEvent, Registry,
};
use serde::{Deserialize, Serialize};
use std::sync::atomic::{AtomicU64, Ordering};

#[derive(Serialize, Deserialize, OutboxEvent)]
#[outbox(event_type = "invoice.paid", aggregate_type = "invoice")]
struct InvoicePaid {
    #[outbox(aggregate_id)]
    invoice_id: u64,
    cents: u64,
}

#[derive(Serialize, Deserialize, OutboxEvent)]
#[outbox(event_type = "invoice.paid", aggregate_type = "invoice", version = 2)]
struct InvoicePaidV2 {
    #[outbox(aggregate_id)]
    invoice_id: u64,
    amount: String,
}

static V1_CENTS: AtomicU64 = AtomicU64::new(0);
static V2_CALLS: AtomicU64 = AtomicU64::new(0);

struct Multiplier(u64);

#[outbox::handler]
async fn on_invoice_paid(event: InvoicePaid, ctx: HandlerContext) -> Result<(), HandlerError> {
    let multiplier = ctx.state::<Multiplier>()?;
    V1_CENTS.fetch_add(event.cents * multiplier.0, Ordering::SeqCst);
    Ok(())
}

/// The context is optional.
#[outbox::handler]
async fn on_invoice_paid_v2(_event: InvoicePaidV2) -> Result<(), HandlerError> {
    V2_CALLS.fetch_add(1, Ordering::SeqCst);
    Err(HandlerError::fatal("v2 is not accepted yet"))
}

fn envelope<E: OutboxEvent>(event: &E) -> Envelope {
    let message = outbox::Message::new(event).unwrap();
    Envelope {
        id: message.id(),
        created_at: outbox::chrono::Utc::now(),
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

#[test]
fn registry_holds_every_annotated_handler() {
    let registry = Registry::from_inventory().unwrap();
    assert_eq!(registry.len(), 2);
    registry.require_event::<InvoicePaid>().unwrap();
    registry.require_event::<InvoicePaidV2>().unwrap();
    let err = registry.require(&[("invoice.refunded", 1)]).unwrap_err();
    assert!(matches!(err, outbox::Error::MissingHandlers { .. }));
}

#[tokio::test]
async fn dispatch_by_type_and_version() {
    let dispatcher = Dispatcher::from_inventory().unwrap().state(Multiplier(10));
    let results = dispatcher
        .deliver(&[
            envelope(&InvoicePaid {
                invoice_id: 1,
                cents: 7,
            }),
            envelope(&InvoicePaidV2 {
                invoice_id: 1,
                amount: "7.00".into(),
            }),
        ])
        .await;
    assert_eq!(results[0], Ok(()));
    assert_eq!(
        results[1],
        Err(outbox::DeliveryError::permanent("v2 is not accepted yet"))
    );
    assert_eq!(V1_CENTS.load(Ordering::SeqCst), 70);
    assert_eq!(V2_CALLS.load(Ordering::SeqCst), 1);
}
