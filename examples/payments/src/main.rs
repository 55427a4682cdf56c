//! `cargo run -p payments [all|api|worker]`: the payments API and worker (seeds 001 and 004).
//!
//! Environment (defaults and meanings in the README's Examples section): `DATABASE_URL`
//! (`sqlite://payments.db`, or `postgres://…`), `PORT` (8080), `FAILURE_RATE` (0.3),
//! `MAX_ATTEMPTS` (3), `GATEWAY_LATENCY_MS` (0), `BROKER` (`log`, or `nats` with `NATS_URL` and
//! `NATS_SUBJECT_PREFIX`).

#[tokio::main]
async fn main() -> Result<(), String> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "info,sqlx=warn".into()),
        )
        .init();
    let role = match std::env::args().nth(1).as_deref() {
        None | Some("all") => payments::Role::All,
        Some("api") => payments::Role::Api,
        Some("worker") => payments::Role::Worker,
        Some(other) => return Err(format!("unknown role {other:?}: all, api or worker")),
    };
    let config = payments::Config::from_env()?;
    let shutdown = outbox::CancellationToken::new();
    let running = payments::start(config, role, shutdown.clone()).await?;
    if let Some(addr) = running.addr {
        println!("payments API on http://{addr}");
        println!(
            "  curl -s -X POST http://{addr}/api/payment -H 'content-type: application/json' \\"
        );
        println!("    -d '{{\"tokenCard\":\"tok_4242\",\"amount\":1000,\"currency\":\"usd\",\"cardHolderName\":\"Ada\",\"cardHolderEmail\":\"ada@example.com\"}}'");
    }
    tokio::spawn(async move {
        let _ = tokio::signal::ctrl_c().await;
        shutdown.cancel();
    });
    running.wait().await
}
