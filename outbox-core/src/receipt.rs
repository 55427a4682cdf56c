//! Consumption receipts: the producing side learns that a consumer consumed its event, without
//! the consumer ever touching the producer's database.

use crate::event::OutboxEvent;
use crate::handler::{HandlerContext, HandlerError, RegistryBuilder};
use crate::store::{Backend, MarkConsumed, Outbox};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// "Consumer `consumer` has consumed event `event_id`."
///
/// The consuming service enqueues a receipt in **its own** outbox, in the transaction that
/// applies the event (with its [`Inbox`](crate::Inbox), so a redelivery sends no second receipt);
/// its relay publishes the receipt through the broker like any event; the producing service
/// consumes receipts with a registry built with
/// [`RegistryBuilder::record_receipts`], which sets `consumed_at` on its outbox row.
///
/// Receipts are routed on topic `outbox.receipts`, aggregate type `outbox.receipt`, with the
/// consumed event's id as aggregate id.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Receipt {
    /// The outbox id of the consumed event.
    pub event_id: Uuid,
    /// Who consumed it.
    pub consumer: String,
}

impl Receipt {
    /// The receipt for the event a handler is handling.
    pub fn for_event(ctx: &HandlerContext, consumer: impl Into<String>) -> Self {
        Self {
            event_id: ctx.event_id(),
            consumer: consumer.into(),
        }
    }
}

impl OutboxEvent for Receipt {
    const EVENT_TYPE: &'static str = "outbox.receipt";
    const AGGREGATE_TYPE: &'static str = "outbox.receipt";
    const SCHEMA_VERSION: u32 = 1;
    const TOPIC: &'static str = "outbox.receipts";

    fn aggregate_id(&self) -> String {
        self.event_id.to_string()
    }
}

impl RegistryBuilder {
    /// Registers the handler of [`Receipt`]s: each marks its event consumed in `outbox`.
    pub fn record_receipts<DB: Backend>(self, outbox: Outbox<DB>) -> crate::Result<Self>
    where
        DB::Store: MarkConsumed,
    {
        self.handler::<Receipt, _, _>(
            "outbox::record_receipts",
            move |receipt: Receipt, _ctx: HandlerContext| {
                let outbox = outbox.clone();
                async move {
                    let changed = outbox
                        .mark_consumed(&[receipt.event_id])
                        .await
                        .map_err(HandlerError::retry)?;
                    tracing::debug!(event_id = %receipt.event_id, consumer = %receipt.consumer, changed, "recorded consumption receipt");
                    Ok(())
                }
            },
        )
    }
}
