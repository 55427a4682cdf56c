use serde::{Deserialize, Serialize};

#[derive(Serialize, Deserialize, outbox::OutboxEvent)]
struct PaymentCreated {
    #[outbox(aggregate_id)]
    payment_id: u64,
}

#[outbox::handler]
fn on_payment(_event: PaymentCreated) -> Result<(), outbox::HandlerError> {
    Ok(())
}

fn main() {}
