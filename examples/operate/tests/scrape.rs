//! A Prometheus scrape of the outbox metrics while a relay delivers and the gauges are read.

use outbox::{CancellationToken, Dispatcher, Outbox, Relay};
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions};
use std::time::{Duration, Instant};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_scrape_shows_the_outbox() {
    let metrics = operate::prometheus();
    let path = std::env::temp_dir().join(format!("outbox-scrape-{}.db", std::process::id()));
    let pool = SqlitePoolOptions::new()
        .connect_with(
            SqliteConnectOptions::new()
                .filename(&path)
                .create_if_missing(true)
                .journal_mode(SqliteJournalMode::Wal),
        )
        .await
        .unwrap();
    let outbox = Outbox::new(pool);
    outbox.migrate().await.unwrap();
    operate::demo_traffic(outbox.clone(), 20, Duration::ZERO)
        .await
        .unwrap();

    let shutdown = CancellationToken::new();
    let relay = Relay::builder(outbox.clone(), Dispatcher::new(operate::registry()))
        .poll_interval(Duration::from_millis(20))
        .build()
        .unwrap();
    let relaying = tokio::spawn({
        let shutdown = shutdown.clone();
        async move { relay.run(shutdown).await }
    });
    let gauges = tokio::spawn({
        let (outbox, shutdown) = (outbox.clone(), shutdown.clone());
        async move {
            outbox
                .record_gauges(Duration::from_millis(100), shutdown)
                .await
        }
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, operate::app(outbox, metrics)).await });

    // 18 handled, 2 over the limit: dead.
    let table = "table=\"outbox\"";
    let deadline = Instant::now() + Duration::from_secs(30);
    let scrape = loop {
        let body = reqwest::get(format!("http://{address}/metrics"))
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        let has = |line: &str| {
            body.lines()
                .any(|l| l.starts_with(line) && l.contains(table))
        };
        if has("outbox_events_delivered_total{")
            && has("outbox_events_dead_total{")
            && body.lines().any(|l| {
                l.starts_with("outbox_events{")
                    && l.contains("status=\"dead\"")
                    && l.ends_with(" 2")
            })
        {
            break body;
        }
        assert!(
            Instant::now() < deadline,
            "the scrape never showed the outbox:\n{body}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let delivered = scrape
        .lines()
        .find(|l| {
            l.starts_with("outbox_events_delivered_total{")
                && l.contains("event_type=\"shop.order_placed\"")
        })
        .unwrap();
    assert!(delivered.ends_with(" 18"), "{delivered}");
    assert!(
        scrape.contains("outbox_oldest_pending_age_seconds{"),
        "{scrape}"
    );
    assert!(
        scrape.contains("outbox_delivery_latency_seconds"),
        "{scrape}"
    );
    let page = reqwest::get(format!("http://{address}/outbox"))
        .await
        .unwrap();
    assert!(page.status().is_success());
    shutdown.cancel();
    relaying.await.unwrap().unwrap();
    gauges.await.unwrap();
    for suffix in ["", "-wal", "-shm"] {
        let _ = std::fs::remove_file(format!("{}{suffix}", path.display()));
    }
}
