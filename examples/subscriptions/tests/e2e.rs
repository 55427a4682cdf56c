//! End to end over HTTP against PostgreSQL (`OUTBOX_TEST_DATABASE_URL`): nothing is cancelled
//! before its effective date, everything is cancelled after it, and a restart of the service
//! (its relay stopped and started again) before the dates loses nothing.

use serde_json::{json, Value};
use std::time::{Duration, Instant};

fn admin_url() -> String {
    std::env::var("OUTBOX_TEST_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".to_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancellations_happen_at_their_effective_date_not_before_and_survive_a_restart() {
    let name = format!("subs_{}", &uuid::Uuid::new_v4().simple().to_string()[..10]);
    let admin = sqlx::PgPool::connect(&admin_url()).await.unwrap();
    sqlx::query(&format!("CREATE DATABASE {name}"))
        .execute(&admin)
        .await
        .unwrap();
    let url = format!("{}/{name}", admin_url().rsplit_once('/').unwrap().0);

    let shutdown = outbox::CancellationToken::new();
    let running = subscriptions::start(Some(url.clone()), "127.0.0.1:0".parse().unwrap(), shutdown)
        .await
        .unwrap();
    let base = format!("http://{}", running.addr);
    let http = reqwest::Client::new();

    let mut subscriptions = Vec::new();
    for (n, delay) in [3u64, 4, 5].into_iter().enumerate() {
        let created: Value = http
            .post(format!("{base}/api/subscriptions"))
            .json(&json!({ "customer": format!("customer-{n}") }))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let id = created["subscriptionId"].as_str().unwrap().to_owned();
        let response = http
            .post(format!("{base}/api/subscriptions/{id}/cancellation"))
            .json(&json!({ "effectiveInSeconds": delay }))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status().as_u16(), 202);
        let scheduled: Value = response.json().await.unwrap();
        let effective_at: chrono::DateTime<chrono::Utc> =
            scheduled["effectiveAt"].as_str().unwrap().parse().unwrap();
        subscriptions.push((id, effective_at));
    }
    // A second request on a subscription that is not active any more is refused.
    let again = http
        .post(format!(
            "{base}/api/subscriptions/{}/cancellation",
            subscriptions[0].0
        ))
        .json(&json!({ "effectiveInSeconds": 1 }))
        .send()
        .await
        .unwrap();
    assert_eq!(again.status().as_u16(), 409);
    let unknown = http
        .get(format!("{base}/api/subscriptions/{}", uuid::Uuid::now_v7()))
        .send()
        .await
        .unwrap();
    assert_eq!(unknown.status().as_u16(), 404);

    // Stop the service (API and relay) and start it again before anything is due: the
    // deferred events are rows in the database, not timers in the process that scheduled them.
    running.stop().await.unwrap();
    let running = subscriptions::start(
        Some(url),
        "127.0.0.1:0".parse().unwrap(),
        outbox::CancellationToken::new(),
    )
    .await
    .unwrap();
    let base = format!("http://{}", running.addr);
    let earliest = subscriptions.iter().map(|(_, at)| *at).min().unwrap();
    assert!(
        chrono::Utc::now() < earliest,
        "the restart took until a cancellation was due; the test proves nothing"
    );

    // Watch every subscription until all are cancelled: while it reads as scheduled its date
    // has not passed... and once cancelled, the recorded time is not before the date.
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut cancelled = 0;
    let mut seen_scheduled = vec![false; subscriptions.len()];
    while cancelled < subscriptions.len() {
        cancelled = 0;
        for (i, (id, effective_at)) in subscriptions.iter().enumerate() {
            let status: Value = http
                .get(format!("{base}/api/subscriptions/{id}"))
                .send()
                .await
                .unwrap()
                .json()
                .await
                .unwrap();
            match status["status"].as_str().unwrap() {
                "CancellationScheduled" => seen_scheduled[i] = true,
                "Cancelled" => {
                    let at: chrono::DateTime<chrono::Utc> =
                        status["cancelledAt"].as_str().unwrap().parse().unwrap();
                    assert!(
                        at >= *effective_at,
                        "{id} cancelled at {at}, before {effective_at}"
                    );
                    cancelled += 1;
                }
                other => panic!("{id}: unexpected status {other}"),
            }
        }
        assert!(
            Instant::now() < deadline,
            "cancellations not done after 60 s"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        seen_scheduled.iter().all(|s| *s),
        "a cancellation happened at once"
    );
    running.stop().await.unwrap();
    sqlx::query(&format!("DROP DATABASE {name} WITH (FORCE)"))
        .execute(&admin)
        .await
        .unwrap();
}
