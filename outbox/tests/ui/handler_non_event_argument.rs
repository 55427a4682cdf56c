#[outbox::handler]
async fn on_number(_n: u64) -> Result<(), outbox::HandlerError> {
    Ok(())
}

fn main() {}
