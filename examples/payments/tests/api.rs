//! Input limits and the JSON error shape, on a SQLite file of the test's own (API only, no
//! worker, no server needed).

use payments::{Broker, Config, Role};
use serde_json::{json, Value};
use std::time::Duration;

struct Api {
    base: String,
    http: reqwest::Client,
    pool: sqlx::SqlitePool,
    running: payments::Running,
    dir: std::path::PathBuf,
}

impl Api {
    async fn start() -> Self {
        let dir = std::env::temp_dir().join(format!("payments-api-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).unwrap();
        let url = format!("sqlite://{}", dir.join("payments.db").display());
        let config = Config {
            database_url: Some(url.clone()),
            listen: "127.0.0.1:0".parse().unwrap(),
            failure_rate: 0.0,
            max_attempts: 3,
            gateway_latency: Duration::ZERO,
            retry_base: Duration::from_millis(20),
            broker: Broker::Log,
        };
        let running = payments::start(config, Role::Api, outbox::CancellationToken::new())
            .await
            .unwrap();
        Self {
            base: format!("http://{}", running.addr.unwrap()),
            http: reqwest::Client::new(),
            pool: sqlx::SqlitePool::connect(&url).await.unwrap(),
            running,
            dir,
        }
    }

    async fn payments(&self) -> i64 {
        sqlx::query_scalar("SELECT count(*) FROM payments")
            .fetch_one(&self.pool)
            .await
            .unwrap()
    }

    async fn stop(self) {
        self.running.stop().await.unwrap();
        self.pool.close().await;
        std::fs::remove_dir_all(&self.dir).unwrap();
    }
}

fn valid() -> Value {
    json!({
        "tokenCard": "tok_4242",
        "amount": 1000,
        "currency": "usd",
        "cardHolderName": "Ada",
        "cardHolderEmail": "ada@example.com",
    })
}

/// The status, and the `error` of the documented shape `{"error": "...", "field": ...}`.
async fn error_of(response: reqwest::Response) -> (u16, Value) {
    let status = response.status().as_u16();
    let content_type = response
        .headers()
        .get("content-type")
        .map(|v| v.to_str().unwrap().to_owned());
    assert_eq!(
        content_type.as_deref(),
        Some("application/json"),
        "status {status}"
    );
    let body: Value = response.json().await.unwrap();
    assert!(
        body["error"].as_str().is_some_and(|e| !e.is_empty()),
        "{body}"
    );
    (status, body)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_error_is_json_and_writes_nothing() {
    let api = Api::start().await;
    let post = |body: reqwest::Body, content_type: &'static str| {
        api.http
            .post(format!("{}/api/payment", api.base))
            .header("content-type", content_type)
            .body(body)
            .send()
    };

    // 400: not JSON; a mistyped field.
    let (status, _) = error_of(post("{".into(), "application/json").await.unwrap()).await;
    assert_eq!(status, 400);
    let mut mistyped = valid();
    mistyped["amount"] = json!("ten");
    let body = serde_json::to_vec(&mistyped).unwrap();
    let (status, e) = error_of(post(body.into(), "application/json").await.unwrap()).await;
    assert_eq!((status, e["field"].as_str()), (400, Some("amount")));

    // 404: an unknown route, an unknown payment.
    let response = api
        .http
        .get(format!("{}/api/nope", api.base))
        .send()
        .await
        .unwrap();
    let (status, e) = error_of(response).await;
    assert_eq!(status, 404);
    assert!(e["error"].as_str().unwrap().contains("/api/nope"), "{e}");
    let response = api
        .http
        .get(format!(
            "{}/api/payment/status/{}",
            api.base,
            uuid::Uuid::now_v7()
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(error_of(response).await.0, 404);

    // 405: a known route, the wrong method.
    let response = api
        .http
        .get(format!("{}/api/payment", api.base))
        .send()
        .await
        .unwrap();
    assert_eq!(error_of(response).await.0, 405);

    // 413: over 16 KiB, whatever it contains (the 1 MiB cardHolderName).
    let mut huge = valid();
    huge["cardHolderName"] = json!("x".repeat(1 << 20));
    let body = serde_json::to_vec(&huge).unwrap();
    let (status, e) = error_of(post(body.into(), "application/json").await.unwrap()).await;
    assert_eq!(status, 413);
    assert!(e["error"].as_str().unwrap().contains("16384"), "{e}");
    let just_over = format!("{{\"pad\":\"{}\"}}", " ".repeat(payments::MAX_BODY_BYTES));
    let (status, _) = error_of(post(just_over.into(), "application/json").await.unwrap()).await;
    assert_eq!(status, 413);

    // 415: not declared as JSON.
    let body = serde_json::to_vec(&valid()).unwrap();
    let (status, _) = error_of(post(body.into(), "text/plain").await.unwrap()).await;
    assert_eq!(status, 415);
    let response = api
        .http
        .post(format!("{}/api/payment", api.base))
        .body(serde_json::to_vec(&valid()).unwrap())
        .send()
        .await
        .unwrap();
    assert_eq!(error_of(response).await.0, 415);

    // 422: each text field one character over its limit (under the body limit).
    for (field, max) in payments::MAX_FIELD_CHARS {
        let mut long = valid();
        let value = match *field {
            "cardHolderEmail" => format!("{}@example.com", "a".repeat(max - 11)),
            _ => "é".repeat(max + 1),
        };
        assert_eq!(value.chars().count(), max + 1);
        long[*field] = json!(value);
        let body = serde_json::to_vec(&long).unwrap();
        let (status, e) = error_of(post(body.into(), "application/json").await.unwrap()).await;
        assert_eq!((status, e["field"].as_str()), (422, Some(*field)), "{e}");
        // At the limit it is accepted.
        let at_limit: String = match *field {
            "cardHolderEmail" => format!("{}@example.com", "a".repeat(max - 12)),
            _ => "é".repeat(*max),
        };
        long[*field] = json!(at_limit);
        let body = serde_json::to_vec(&long).unwrap();
        let response = post(body.into(), "application/json; charset=utf-8")
            .await
            .unwrap();
        assert_eq!(response.status().as_u16(), 200, "{field} at its limit");
    }
    // Only the three payments at the limits were written.
    assert_eq!(api.payments().await, 3);

    api.stop().await;
}
