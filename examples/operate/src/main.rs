//! `cargo run -p operate`, then open http://127.0.0.1:3000/outbox and
//! http://127.0.0.1:3000/metrics. SQLite in a temporary file: no server needed.

use outbox::{CancellationToken, Dispatcher, Outbox, Relay};
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions};
use std::time::Duration;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    tracing_subscriber::fmt().with_env_filter("warn").init();
    let metrics = operate::prometheus();
    let path = std::env::temp_dir().join("outbox-operate-demo.db");
    let pool = SqlitePoolOptions::new()
        .connect_with(
            SqliteConnectOptions::new()
                .filename(&path)
                .create_if_missing(true)
                .journal_mode(SqliteJournalMode::Wal),
        )
        .await?;
    let outbox = Outbox::new(pool);
    outbox.migrate().await?;

    let shutdown = CancellationToken::new();
    let relay = Relay::builder(outbox.clone(), Dispatcher::new(operate::registry()))
        .poll_interval(Duration::from_millis(100))
        .build()?;
    let relaying = tokio::spawn({
        let shutdown = shutdown.clone();
        async move { relay.run(shutdown).await }
    });
    tokio::spawn({
        let (outbox, shutdown) = (outbox.clone(), shutdown.clone());
        async move { outbox.record_gauges(Duration::from_secs(5), shutdown).await }
    });
    tokio::spawn(operate::demo_traffic(
        outbox.clone(),
        100_000,
        Duration::from_millis(50),
    ));

    let address = std::env::var("OPERATE_ADDRESS").unwrap_or_else(|_| "127.0.0.1:3000".into());
    let listener = tokio::net::TcpListener::bind(&address).await?;
    println!(
        "dashboard: http://{address}/outbox   metrics: http://{address}/metrics   (Ctrl-C stops)"
    );
    axum::serve(listener, operate::app(outbox, metrics))
        .with_graceful_shutdown(async {
            tokio::signal::ctrl_c().await.ok();
        })
        .await?;
    shutdown.cancel();
    relaying.await??;
    Ok(())
}
