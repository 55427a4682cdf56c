//! Two `#[outbox::handler]`s for one event type and version: a start-up error naming both.

use outbox::{HandlerError, Registry};
use serde::{Deserialize, Serialize};

#[derive(Serialize, Deserialize, outbox::OutboxEvent)]
#[outbox(event_type = "user.created")]
struct UserCreated {
    #[outbox(aggregate_id)]
    user_id: u64,
}

#[outbox::handler]
async fn send_welcome_mail(_event: UserCreated) -> Result<(), HandlerError> {
    Ok(())
}

mod billing {
    #[outbox::handler]
    async fn open_account(_event: super::UserCreated) -> Result<(), outbox::HandlerError> {
        Ok(())
    }
}

#[test]
fn duplicate_registrations_are_reported() {
    let err = Registry::from_inventory().unwrap_err();
    let message = err.to_string();
    assert!(
        message.contains("two handlers for event type \"user.created\" version 1"),
        "{message}"
    );
    assert!(
        message.contains("duplicate_handlers::send_welcome_mail"),
        "{message}"
    );
    assert!(
        message.contains("duplicate_handlers::billing::open_account"),
        "{message}"
    );
}
