//! `cargo run -p subscriptions`: schedules a cancellation a few seconds ahead and shows it
//! happen, then keeps serving the API (`DATABASE_URL` for PostgreSQL, SQLite otherwise;
//! `PORT`, default 8081). `--demo-only` exits after the demo.

use std::time::Duration;

#[tokio::main]
async fn main() -> Result<(), String> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .init();
    let port: u16 = std::env::var("PORT")
        .ok()
        .and_then(|p| p.parse().ok())
        .unwrap_or(8081);
    let shutdown = outbox::CancellationToken::new();
    let running = subscriptions::start(
        std::env::var("DATABASE_URL").ok().filter(|u| !u.is_empty()),
        ([127, 0, 0, 1], port).into(),
        shutdown.clone(),
    )
    .await?;
    let base = format!("http://{}", running.addr);
    println!("subscriptions API on {base}");

    // The demo, through the API as a client would use it.
    let client = Demo(base.clone());
    let id = client
        .post("/api/subscriptions", r#"{"customer":"ada@example.com"}"#)
        .await?["subscriptionId"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    let scheduled = client
        .post(
            &format!("/api/subscriptions/{id}/cancellation"),
            r#"{"effectiveInSeconds":3}"#,
        )
        .await?;
    println!(
        "cancellation of {id} scheduled for {}",
        scheduled["effectiveAt"]
    );
    loop {
        let status = client.get(&format!("/api/subscriptions/{id}")).await?;
        println!("  status: {}", status["status"]);
        if status["status"] == "Cancelled" {
            break;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    if std::env::args().any(|a| a == "--demo-only") {
        return running.stop().await;
    }
    tokio::spawn(async move {
        let _ = tokio::signal::ctrl_c().await;
        shutdown.cancel();
    });
    running.wait().await
}

/// A tiny HTTP/1.1 client over a TCP stream, so the demo needs no extra dependency.
struct Demo(String);

impl Demo {
    async fn post(&self, path: &str, body: &str) -> Result<serde_json::Value, String> {
        self.call("POST", path, body).await
    }

    async fn get(&self, path: &str) -> Result<serde_json::Value, String> {
        self.call("GET", path, "").await
    }

    async fn call(
        &self,
        method: &str,
        path: &str,
        body: &str,
    ) -> Result<serde_json::Value, String> {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let host = self.0.trim_start_matches("http://");
        let mut stream = tokio::net::TcpStream::connect(host)
            .await
            .map_err(|e| e.to_string())?;
        let request = format!(
            "{method} {path} HTTP/1.1\r\nhost: {host}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
            body.len()
        );
        stream
            .write_all(request.as_bytes())
            .await
            .map_err(|e| e.to_string())?;
        let mut response = String::new();
        stream
            .read_to_string(&mut response)
            .await
            .map_err(|e| e.to_string())?;
        let json = response.split("\r\n\r\n").nth(1).unwrap_or_default();
        serde_json::from_str(json).map_err(|e| format!("{e}: {response}"))
    }
}
