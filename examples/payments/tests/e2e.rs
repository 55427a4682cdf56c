//! End to end, as a user drives it: the API over HTTP, the worker, PostgreSQL and NATS
//! (`OUTBOX_TEST_DATABASE_URL`, `OUTBOX_TEST_NATS_URL`).

use futures_util::StreamExt;
use outbox::nats::async_nats;
use payments::{Broker, Config, Role};
use serde_json::{json, Value};
use std::collections::HashSet;
use std::time::{Duration, Instant};

fn admin_url() -> String {
    std::env::var("OUTBOX_TEST_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".to_owned())
}

fn nats_url() -> String {
    std::env::var("OUTBOX_TEST_NATS_URL").unwrap_or_else(|_| "127.0.0.1:4222".to_owned())
}

/// A database of the test's own on the same server, dropped at the end.
async fn fresh_database() -> (String, String) {
    let name = format!(
        "payments_{}",
        &uuid::Uuid::new_v4().simple().to_string()[..10]
    );
    let admin = sqlx::PgPool::connect(&admin_url()).await.unwrap();
    sqlx::query(&format!("CREATE DATABASE {name}"))
        .execute(&admin)
        .await
        .unwrap();
    let url = match admin_url().rsplit_once('/') {
        Some((server, _)) => format!("{server}/{name}"),
        None => panic!("OUTBOX_TEST_DATABASE_URL has no database part"),
    };
    (name, url)
}

async fn drop_database(name: &str) {
    let admin = sqlx::PgPool::connect(&admin_url()).await.unwrap();
    sqlx::query(&format!("DROP DATABASE {name} WITH (FORCE)"))
        .execute(&admin)
        .await
        .unwrap();
}

fn valid_request(n: usize) -> Value {
    json!({
        "tokenCard": format!("tok_{n:04}"),
        "amount": 1000 + n,
        "currency": "usd",
        "cardHolderName": format!("Holder {n}"),
        "cardHolderEmail": format!("holder{n}@example.com"),
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn burst_of_200_payments_ends_paid_or_rejected_with_one_confirmation_per_paid() {
    let (database, url) = fresh_database().await;
    let prefix = format!("pay{}", &uuid::Uuid::new_v4().simple().to_string()[..8]);
    let config = Config {
        database_url: Some(url.clone()),
        listen: "127.0.0.1:0".parse().unwrap(),
        failure_rate: 0.3,
        max_attempts: 3,
        gateway_latency: Duration::ZERO,
        retry_base: Duration::from_millis(20),
        broker: Broker::Nats {
            url: nats_url(),
            prefix: Some(prefix.clone()),
        },
    };
    let shutdown = outbox::CancellationToken::new();
    let running = payments::start(config, Role::All, shutdown.clone())
        .await
        .unwrap();
    let base = format!("http://{}", running.addr.unwrap());
    let http = reqwest::Client::new();
    let pool = sqlx::PgPool::connect(&url).await.unwrap();
    let count_payments = || async {
        sqlx::query_scalar::<_, i64>("SELECT count(*) FROM payments")
            .fetch_one(&pool)
            .await
            .unwrap()
    };

    // Invalid input: a clear error naming the field, and nothing written.
    let mut missing = valid_request(0);
    missing.as_object_mut().unwrap().remove("amount");
    let cases = [
        (missing, 400, "amount"),
        (
            json!({"tokenCard": "t", "amount": -5, "currency": "usd", "cardHolderName": "A", "cardHolderEmail": "a@b.co"}),
            422,
            "amount",
        ),
        (
            json!({"tokenCard": "t", "amount": 5, "currency": "xyz", "cardHolderName": "A", "cardHolderEmail": "a@b.co"}),
            422,
            "currency",
        ),
        (
            json!({"tokenCard": "t", "amount": 5, "currency": "usd", "cardHolderName": "A", "cardHolderEmail": "not-an-email"}),
            422,
            "cardHolderEmail",
        ),
    ];
    for (body, status, field) in cases {
        let response = http
            .post(format!("{base}/api/payment"))
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status().as_u16(), status, "{body}");
        let error: Value = response.json().await.unwrap();
        assert_eq!(error["field"], field, "{error}");
    }
    assert_eq!(count_payments().await, 0);
    let not_json = http
        .post(format!("{base}/api/payment"))
        .header("content-type", "application/json")
        .body("{")
        .send()
        .await
        .unwrap();
    assert_eq!(not_json.status().as_u16(), 400);

    // Unknown and malformed ids.
    let unknown = http
        .get(format!(
            "{base}/api/payment/status/{}",
            uuid::Uuid::now_v7()
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(unknown.status().as_u16(), 404);
    let malformed = http
        .get(format!("{base}/api/payment/status/12345"))
        .send()
        .await
        .unwrap();
    assert_eq!(malformed.status().as_u16(), 400);

    // The burst.
    let ids: Vec<String> = futures_util::stream::iter(0..200)
        .map(|n| {
            let (http, base) = (http.clone(), base.clone());
            async move {
                let response = http
                    .post(format!("{base}/api/payment"))
                    .json(&valid_request(n))
                    .send()
                    .await
                    .unwrap();
                assert_eq!(response.status().as_u16(), 200);
                let body: Value = response.json().await.unwrap();
                assert_eq!(body["message"], "Payment request created successfully");
                body["paymentId"].as_str().unwrap().to_owned()
            }
        })
        .buffer_unordered(32)
        .collect()
        .await;
    assert_eq!(ids.iter().collect::<HashSet<_>>().len(), 200);

    // Every payment settles: never stuck Pending.
    let deadline = Instant::now() + Duration::from_secs(120);
    let statuses: Vec<Value> = loop {
        let statuses: Vec<Value> = futures_util::stream::iter(&ids)
            .map(|id| {
                let (http, base) = (http.clone(), base.clone());
                async move {
                    let response = http
                        .get(format!("{base}/api/payment/status/{id}"))
                        .send()
                        .await
                        .unwrap();
                    assert_eq!(response.status().as_u16(), 200);
                    response.json::<Value>().await.unwrap()
                }
            })
            .buffer_unordered(32)
            .collect()
            .await;
        if statuses.iter().all(|s| s["status"] != "Pending") {
            break statuses;
        }
        assert!(
            Instant::now() < deadline,
            "payments still pending after 120 s"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let paid: HashSet<String> = statuses
        .iter()
        .filter(|s| s["status"] == "Paid")
        .map(|s| s["paymentId"].as_str().unwrap().to_owned())
        .collect();
    let rejected: Vec<&Value> = statuses
        .iter()
        .filter(|s| s["status"] == "Rejected")
        .collect();
    assert_eq!(paid.len() + rejected.len(), 200, "only Paid or Rejected");
    // With a 30 % decline rate and 3 attempts, about 2.7 % are rejected: some of each.
    assert!(!paid.is_empty());
    for r in &rejected {
        assert!(
            r["failureReason"]
                .as_str()
                .unwrap()
                .contains("rejected after 3 attempts"),
            "{r}"
        );
    }
    // The gateway charged each paid payment once, and no rejected one.
    let charged: Vec<(String, i64)> =
        sqlx::query_as("SELECT payment_id, count(*) FROM gateway_charges GROUP BY payment_id")
            .fetch_all(&pool)
            .await
            .unwrap();
    assert!(charged.iter().all(|(_, n)| *n == 1), "{charged:?}");
    assert_eq!(
        charged
            .into_iter()
            .map(|(id, _)| id)
            .collect::<HashSet<_>>(),
        paid
    );
    // The outbox rows of rejected payments are dead with the reason.
    let dead: Vec<(String, String)> = sqlx::query_as(
        "SELECT aggregate_id, last_error FROM outbox WHERE event_type = 'payment.created' AND status = 'dead'",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    assert_eq!(dead.len(), rejected.len());
    assert!(dead.iter().all(|(_, e)| e.contains("gateway declined")));

    // One PaymentConfirmed on the broker per paid payment, no more.
    let js = async_nats::jetstream::new(async_nats::connect(nats_url()).await.unwrap());
    let stream_name = format!("{}_PAYMENTS", prefix.to_uppercase());
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let mut stream = js.get_stream(&stream_name).await.unwrap();
        if stream.info().await.unwrap().state.messages as usize >= paid.len() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "confirmations missing on the broker"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let stream = js.get_stream(&stream_name).await.unwrap();
    let reader = stream
        .create_consumer(async_nats::jetstream::consumer::pull::Config {
            ack_policy: async_nats::jetstream::consumer::AckPolicy::None,
            ..Default::default()
        })
        .await
        .unwrap();
    let mut messages = reader.messages().await.unwrap();
    let mut confirmed = HashSet::new();
    for _ in 0..paid.len() {
        let m = tokio::time::timeout(Duration::from_secs(10), messages.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        assert_eq!(
            m.subject.as_str(),
            format!("{prefix}.payments.payment.confirmed")
        );
        let event: Value = serde_json::from_slice(&m.payload).unwrap();
        assert!(
            confirmed.insert(event["payment_id"].as_str().unwrap().to_owned()),
            "two confirmations"
        );
    }
    assert_eq!(confirmed, paid);
    assert!(
        tokio::time::timeout(Duration::from_millis(500), messages.next())
            .await
            .is_err(),
        "more confirmations than paid payments"
    );

    running.stop().await.unwrap();
    pool.close().await;
    js.delete_stream(&stream_name).await.unwrap();
    drop_database(&database).await;
}
