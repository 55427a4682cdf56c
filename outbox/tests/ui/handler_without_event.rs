#[outbox::handler]
async fn on_nothing() -> Result<(), outbox::HandlerError> {
    Ok(())
}

fn main() {}
