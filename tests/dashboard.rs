//! The dashboard in a real browser: Debian's headless Chromium, driven through chromedriver
//! (WebDriver), against the router mounted in an axum server, over a PostgreSQL outbox with a
//! relay running. Load the page, see the counts, requeue a dead event, see it delivered.
//!
//! Without `/usr/bin/chromium` and `/usr/bin/chromedriver` (`apt-get install chromium
//! chromium-driver`) the browser test says so and passes, unless `OUTBOX_REQUIRE_CHROMIUM=1`
//! (set by `.ci/run`, which installs them). `OUTBOX_DASHBOARD_SCREENSHOT=path.png` saves what
//! the browser shows.

use outbox::dashboard::{self, Dashboard};
use outbox::{HandlerContext, HandlerError, Relay};
use outbox_tests::{
    dispatcher, eventually, free_port, serve, Behaviour, ItemChanged, Log, RunningRelay, TestDb,
};
use serde_json::{json, Value};
use sqlx::Postgres;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

const WAIT: Duration = Duration::from_secs(60);

/// A WebDriver session, the few commands this test needs.
struct Browser {
    http: reqwest::Client,
    session: String,
    driver: std::process::Child,
}

impl Browser {
    async fn start(chromium: &str, chromedriver: &str) -> Self {
        let port = free_port();
        let driver = std::process::Command::new(chromedriver)
            .arg(format!("--port={port}"))
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("chromedriver starts");
        let http = reqwest::Client::new();
        let url = format!("http://127.0.0.1:{port}");
        eventually("chromedriver answers", WAIT, || {
            let request = http.get(format!("{url}/status")).send();
            async move { request.await.is_ok() }
        })
        .await;
        let created: Value = http
            .post(format!("{url}/session"))
            .json(&json!({ "capabilities": { "alwaysMatch": {
                "browserName": "chrome",
                "goog:chromeOptions": {
                    "binary": chromium,
                    "args": ["--headless=new", "--no-sandbox", "--disable-gpu",
                             "--disable-dev-shm-usage", "--window-size=1280,1000"]
                }
            }}}))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let session = created["value"]["sessionId"]
            .as_str()
            .unwrap_or_else(|| panic!("no WebDriver session: {created}"))
            .to_owned();
        Self {
            http,
            session: format!("{url}/session/{session}"),
            driver,
        }
    }

    async fn command(&self, method: reqwest::Method, path: &str, body: Value) -> Value {
        let request = self.http.request(method, format!("{}{path}", self.session));
        let request = if body.is_null() {
            request
        } else {
            request.json(&body)
        };
        let reply: Value = request.send().await.unwrap().json().await.unwrap();
        reply["value"].clone()
    }

    async fn open(&self, url: &str) {
        self.command(reqwest::Method::POST, "/url", json!({ "url": url }))
            .await;
    }

    /// The text of the first element `css` selects, if there is one.
    async fn text(&self, css: &str) -> Option<String> {
        let found = self
            .command(
                reqwest::Method::POST,
                "/element",
                json!({ "using": "css selector", "value": css }),
            )
            .await;
        if found.get("error").is_some() {
            return None;
        }
        let id = found.as_object()?.values().next()?.as_str()?.to_owned();
        let text = self
            .command(
                reqwest::Method::GET,
                &format!("/element/{id}/text"),
                Value::Null,
            )
            .await;
        text.as_str().map(str::to_owned)
    }

    async fn click(&self, css: &str) {
        let found = self
            .command(
                reqwest::Method::POST,
                "/element",
                json!({ "using": "css selector", "value": css }),
            )
            .await;
        let id = found
            .as_object()
            .and_then(|o| o.values().next())
            .and_then(Value::as_str)
            .unwrap_or_else(|| panic!("nothing matches {css}: {found}"))
            .to_owned();
        self.command(
            reqwest::Method::POST,
            &format!("/element/{id}/click"),
            json!({}),
        )
        .await;
    }

    async fn screenshot(&self, path: &str) {
        let png = self
            .command(reqwest::Method::GET, "/screenshot", Value::Null)
            .await;
        std::fs::write(path, base64_decode(png.as_str().unwrap())).unwrap();
    }

    async fn quit(mut self) {
        self.command(reqwest::Method::DELETE, "", Value::Null).await;
        let _ = self.driver.kill();
        let _ = self.driver.wait();
    }
}

/// Standard base64, as WebDriver sends screenshots.
fn base64_decode(text: &str) -> Vec<u8> {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = Vec::with_capacity(text.len() * 3 / 4);
    let (mut buffer, mut bits) = (0u32, 0u32);
    for byte in text
        .bytes()
        .filter(|b| *b != b'=' && !b.is_ascii_whitespace())
    {
        let value = ALPHABET.iter().position(|a| *a == byte).expect("base64") as u32;
        buffer = (buffer << 6) | value;
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((buffer >> bits) as u8);
        }
    }
    out
}

fn tool(path: &str) -> Option<String> {
    std::path::Path::new(path).exists().then(|| path.to_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requeue_a_dead_event_from_the_page_in_chromium() {
    let (Some(chromium), Some(chromedriver)) =
        (tool("/usr/bin/chromium"), tool("/usr/bin/chromedriver"))
    else {
        assert!(
            std::env::var_os("OUTBOX_REQUIRE_CHROMIUM").is_none(),
            "OUTBOX_REQUIRE_CHROMIUM is set but /usr/bin/chromium or /usr/bin/chromedriver is missing"
        );
        eprintln!("skipped: no /usr/bin/chromium and /usr/bin/chromedriver (apt-get install chromium chromium-driver)");
        return;
    };
    let outbox = Postgres::fresh().await;
    let broken = Arc::new(AtomicBool::new(true));
    let log = Log::default();
    let behaviour: Behaviour = {
        let broken = broken.clone();
        Arc::new(move |event: &ItemChanged, _ctx: &HandlerContext| {
            if event.item == "bad" && broken.load(Ordering::SeqCst) {
                Err(HandlerError::fatal("ledger 7 rejected the <b>entry</b>"))
            } else {
                Ok(())
            }
        })
    };
    let mut tx = outbox.pool().begin().await.unwrap();
    let events: Vec<ItemChanged> = ["a", "b", "c", "bad"]
        .iter()
        .map(|item| ItemChanged {
            item: (*item).into(),
            n: 1,
        })
        .collect();
    outbox.enqueue_batch(&mut *tx, &events).await.unwrap();
    tx.commit().await.unwrap();
    let relay = RunningRelay::start(
        Relay::builder(outbox.clone(), dispatcher(&log, behaviour))
            .poll_interval(Duration::from_millis(20)),
    );
    eventually("three delivered, one dead", WAIT, || async {
        Postgres::count_status(&outbox, "delivered").await == 3
            && Postgres::count_status(&outbox, "dead").await == 1
    })
    .await;

    let app = axum::Router::new().nest(
        "/ops/outbox",
        Dashboard::new(outbox.clone())
            .allow_actions()
            .sample_every(Duration::from_millis(500))
            .router(),
    );
    let address = serve(app).await;
    let browser = Browser::start(&chromium, &chromedriver).await;
    browser.open(&format!("http://{address}/ops/outbox")).await;
    eventually("the page shows the counts", WAIT, || async {
        browser.text("#count-dead").await.as_deref() == Some("1")
            && browser.text("#count-delivered").await.as_deref() == Some("3")
    })
    .await;
    // The reason is shown as text: the markup in it stays markup-free.
    let reason = browser.text("#dead td.reason").await.unwrap();
    assert_eq!(reason, "ledger 7 rejected the <b>entry</b>");
    let group = browser.text("#groups td").await.unwrap();
    assert_eq!(group.len(), 12, "a group fingerprint: {group:?}");
    if let Ok(path) = std::env::var("OUTBOX_DASHBOARD_SCREENSHOT") {
        browser.screenshot(&path).await;
    }

    broken.store(false, Ordering::SeqCst);
    browser.click("button[data-requeue-id]").await;
    eventually("the requeued event delivered", WAIT, || async {
        Postgres::count_status(&outbox, "delivered").await == 4
    })
    .await;
    eventually("the page shows it", WAIT, || async {
        browser.text("#count-dead").await.as_deref() == Some("0")
            && browser.text("#count-delivered").await.as_deref() == Some("4")
    })
    .await;
    assert!(browser
        .text("#message")
        .await
        .unwrap()
        .contains("requeued 1"));
    browser.quit().await;
    relay.stop().await;
    Postgres::drop_tables(&outbox).await;
}

/// Without `allow_actions`, and without the page's token, a requeue is refused and changes
/// nothing; reads work either way.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_are_refused_without_actions_or_token() {
    let outbox = Postgres::fresh().await;
    let http = reqwest::Client::new();
    let read_only = serve(dashboard::router(outbox.clone())).await;
    let page = http
        .get(format!("http://{read_only}/"))
        .send()
        .await
        .unwrap();
    assert!(page.status().is_success());
    let page = page.text().await.unwrap();
    let token = page
        .split("const CSRF = \"")
        .nth(1)
        .and_then(|rest| rest.split('"').next())
        .unwrap()
        .to_owned();
    assert_eq!(token.len(), 32);
    assert!(page.contains("const ACTIONS = false;"));
    let requeue = |address: &str, token: Option<&str>, origin: Option<&str>| {
        let mut request = http
            .post(format!("http://{address}/api/requeue"))
            .json(&json!({ "id": uuid::Uuid::nil() }));
        if let Some(token) = token {
            request = request.header("x-outbox-csrf", token);
        }
        if let Some(origin) = origin {
            request = request.header("origin", origin);
        }
        request.send()
    };
    let refused = requeue(&read_only, Some(&token), None).await.unwrap();
    assert_eq!(refused.status(), 403, "read-only");

    let writable = serve(Dashboard::new(outbox.clone()).allow_actions().router()).await;
    let page = http
        .get(format!("http://{writable}/"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let token = page
        .split("const CSRF = \"")
        .nth(1)
        .unwrap()
        .split('"')
        .next()
        .unwrap()
        .to_owned();
    assert_eq!(
        requeue(&writable, None, None).await.unwrap().status(),
        403,
        "no token"
    );
    assert_eq!(
        requeue(&writable, Some("0".repeat(32).as_str()), None)
            .await
            .unwrap()
            .status(),
        403
    );
    let evil = requeue(&writable, Some(&token), Some("https://evil.example"))
        .await
        .unwrap();
    assert_eq!(evil.status(), 403, "another origin");
    let same = format!("http://{writable}");
    let ok = requeue(&writable, Some(&token), Some(&same)).await.unwrap();
    assert_eq!(ok.status(), 200);
    assert_eq!(
        ok.json::<Value>().await.unwrap()["requeued"],
        0,
        "nothing was dead"
    );
    let status: Value = http
        .get(format!("http://{writable}/api/status"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(status["status"]["dead"], 0);
    Postgres::drop_tables(&outbox).await;
}
