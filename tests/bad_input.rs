//! Bad input and security (issue 12): names from configuration are validated before anything
//! runs, an oversize payload is refused at enqueue with nothing written, and passwords in
//! connection strings never reach logs, errors or stored failure reasons.

use outbox::amqp::AmqpTransport;
use outbox::kafka::KafkaTransport;
use outbox::nats::NatsTransport;
use outbox::{Error, Inbox, Outbox, Relay};
use outbox_tests::nats::{jetstream, names, nats_url};
use outbox_tests::{eventually, pg_pool, pg_url, Huge, ItemChanged, RunningRelay, TestDb};
use sqlx::Postgres;
use std::io::Write;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

const INJECTION: &str = "outbox; DROP TABLE victim";

/// Everything every test of this binary logs, at TRACE level.
fn captured_logs() -> &'static Arc<Mutex<Vec<u8>>> {
    static LOGS: OnceLock<Arc<Mutex<Vec<u8>>>> = OnceLock::new();
    LOGS.get_or_init(|| {
        let logs = Arc::new(Mutex::new(Vec::new()));
        let sink = logs.clone();
        use tracing_subscriber::util::SubscriberInitExt as _;
        tracing_subscriber::fmt()
            .with_max_level(tracing_subscriber::filter::LevelFilter::TRACE)
            .with_ansi(false)
            .with_writer(move || Sink(sink.clone()))
            .finish()
            .try_init()
            .expect("the only subscriber of this test binary");
        logs
    })
}

struct Sink(Arc<Mutex<Vec<u8>>>);

impl Write for Sink {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn logs_contain(needle: &str) -> bool {
    String::from_utf8_lossy(&captured_logs().lock().unwrap()).contains(needle)
}

/// A table that the injection attempts would drop if any of them ran.
async fn victim(pool: &sqlx::PgPool) -> String {
    let name = format!("victim_{}", &uuid::Uuid::new_v4().simple().to_string()[..8]);
    sqlx::query(&format!("CREATE TABLE {name} (id int)"))
        .execute(pool)
        .await
        .unwrap();
    name
}

async fn exists(pool: &sqlx::PgPool, table: &str) -> bool {
    sqlx::query_scalar::<_, bool>("SELECT to_regclass($1) IS NOT NULL")
        .bind(table)
        .fetch_one(pool)
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn injected_names_from_configuration_are_clear_errors_and_run_nothing() {
    captured_logs();
    let pool = pg_pool().await;
    let victim = victim(&pool).await;
    let injection = INJECTION.replace("victim", &victim);

    let table = Outbox::<Postgres>::builder(pool.clone())
        .table(injection.as_str())
        .build();
    assert!(
        matches!(&table, Err(Error::InvalidTableName { name, .. }) if *name == injection),
        "{table:?}"
    );
    let inbox = Inbox::<Postgres>::new(pool.clone(), &injection, "consumer");
    assert!(
        matches!(inbox, Err(Error::InvalidTableName { .. })),
        "{inbox:?}"
    );

    let outbox = Postgres::fresh().await;
    let js = jetstream(&nats_url()).await;
    let nats = Relay::builder(
        outbox.clone(),
        NatsTransport::new(js).subject_prefix(injection.as_str()),
    )
    .build();
    let kafka = Relay::builder(
        outbox.clone(),
        KafkaTransport::new("127.0.0.1:9092")
            .unwrap()
            .topic_prefix(injection.as_str()),
    )
    .build();
    let amqp = Relay::builder(
        outbox.clone(),
        AmqpTransport::new("amqp://guest:guest@127.0.0.1:5672/%2f").exchange(injection.as_str()),
    )
    .build();
    for (what, built) in [
        ("NATS subject prefix", nats.err()),
        ("Kafka topic prefix", kafka.err()),
        ("AMQP exchange", amqp.err()),
    ] {
        let error = built.unwrap_or_else(|| panic!("the relay accepted an injected {what}"));
        let message = error.to_string();
        assert!(
            matches!(error, Error::InvalidField { .. })
                && message.contains(what)
                && message.contains(&injection),
            "{what}: {message}"
        );
    }
    // Subject prefixes that are not literal subjects: wildcards, empty tokens.
    for bad in ["orders.*", "orders.>", "orders..eu", ".orders", "orders."] {
        let js = jetstream(&nats_url()).await;
        let built =
            Relay::builder(outbox.clone(), NatsTransport::new(js).subject_prefix(bad)).build();
        assert!(
            matches!(built, Err(Error::InvalidField { .. })),
            "{bad:?} accepted"
        );
    }
    // Valid names still work.
    let js = jetstream(&nats_url()).await;
    Relay::builder(
        outbox.clone(),
        NatsTransport::new(js).subject_prefix("prod.eu-1"),
    )
    .build()
    .unwrap();
    Relay::builder(
        outbox.clone(),
        KafkaTransport::new("127.0.0.1:9092")
            .unwrap()
            .topic_prefix("prod.eu-1_x"),
    )
    .build()
    .unwrap();

    assert!(exists(&pool, &victim).await, "an injection ran");
    Postgres::drop_tables(&outbox).await;
    sqlx::query(&format!("DROP TABLE {victim}"))
        .execute(&pool)
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversize_payload_is_refused_at_enqueue_and_writes_nothing() {
    captured_logs();
    let fresh = Postgres::fresh().await;
    let outbox = Outbox::<Postgres>::builder(fresh.pool().clone())
        .table(fresh.table().as_str())
        .max_payload_bytes(64 * 1024)
        .build()
        .unwrap();
    let mut tx = outbox.pool().begin().await.unwrap();
    Postgres::insert_business_row(&outbox, &mut *tx, "order-1").await;
    let huge = Huge {
        item: "order-1".into(),
        blob: "x".repeat(100 * 1024),
    };
    let refused = outbox.enqueue(&mut *tx, &huge).await;
    match &refused {
        Err(Error::PayloadTooLarge {
            event_type,
            bytes,
            max,
        }) => {
            assert_eq!(event_type, "test.huge");
            assert!(*bytes > 100 * 1024);
            assert_eq!(*max, 64 * 1024);
            let message = refused.as_ref().unwrap_err().to_string();
            assert!(
                message.contains("test.huge") && message.contains("65536"),
                "{message}"
            );
        }
        other => panic!("expected PayloadTooLarge, got {other:?}"),
    }
    // The refusal wrote nothing and broke nothing: the transaction goes on and commits.
    let small = ItemChanged {
        item: "order-1".into(),
        n: 1,
    };
    outbox.enqueue(&mut *tx, &small).await.unwrap();
    tx.commit().await.unwrap();
    assert_eq!(Postgres::count_outbox_rows(&outbox).await, 1);
    assert_eq!(Postgres::count_business_rows(&outbox, "order-1").await, 1);
    // A batch with one oversize event writes none of it.
    let mut tx = outbox.pool().begin().await.unwrap();
    let batch = outbox
        .enqueue_messages(
            &mut tx,
            &[
                outbox::Message::new(&small).unwrap(),
                outbox::Message::new(&huge).unwrap(),
            ],
        )
        .await;
    assert!(matches!(batch, Err(Error::PayloadTooLarge { .. })));
    tx.commit().await.unwrap();
    assert_eq!(Postgres::count_outbox_rows(&outbox).await, 1);
    Postgres::drop_tables(&outbox).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn passwords_in_connection_strings_never_reach_logs_errors_or_reasons() {
    captured_logs();
    // PostgreSQL with trust authentication takes any password: a pool whose URL holds one.
    let pg_secret = "PgS3cret-7d1";
    let url = pg_url().replacen("postgres@", &format!("postgres:{pg_secret}@"), 1);
    assert!(
        url.contains(pg_secret),
        "OUTBOX_TEST_DATABASE_URL has no user@ to add one to"
    );
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(4)
        .connect(&url)
        .await
        .unwrap();
    let fresh = Postgres::fresh().await;
    let outbox = Outbox::<Postgres>::builder(pool.clone())
        .table(fresh.table().as_str())
        .build()
        .unwrap();

    // NATS credentials (the test server has no auth and ignores them), given as connect
    // options: async-nats itself logs a URL's password at DEBUG (README, "Credentials").
    let nats_secret = "NatsS3cret-5b2";
    let nats =
        async_nats::ConnectOptions::with_user_and_password("relay".into(), nats_secret.into())
            .connect(nats_url())
            .await
            .unwrap();
    let (prefix, stream) = names();
    let js = async_nats::jetstream::new(nats);
    outbox::nats::ensure_stream(&js, &stream, vec![format!("{prefix}.>")])
        .await
        .unwrap();
    let mut tx = outbox.pool().begin().await.unwrap();
    for n in 1..=3 {
        let event = ItemChanged {
            item: "a".into(),
            n,
        };
        outbox.enqueue(&mut *tx, &event).await.unwrap();
    }
    tx.commit().await.unwrap();
    let relay = RunningRelay::start(
        Relay::builder(
            outbox.clone(),
            NatsTransport::new(js).subject_prefix(prefix.as_str()),
        )
        .poll_interval(Duration::from_millis(20)),
    );
    eventually("delivered", Duration::from_secs(30), || async {
        Postgres::count_status(&outbox, "delivered").await == 3
    })
    .await;
    relay.stop().await;

    // RabbitMQ refuses the wrong password: the failure is stored and logged, the password not.
    let amqp_secret = "AmqpS3cret-9c4";
    let transport = AmqpTransport::new(format!("amqp://guest:{amqp_secret}@127.0.0.1:5672/%2f"));
    assert!(!format!("{transport:?}").contains(amqp_secret));
    let mut tx = outbox.pool().begin().await.unwrap();
    let id = outbox
        .enqueue(
            &mut *tx,
            &ItemChanged {
                item: "b".into(),
                n: 1,
            },
        )
        .await
        .unwrap();
    tx.commit().await.unwrap();
    let relay = RunningRelay::start(
        Relay::builder(outbox.clone(), transport).poll_interval(Duration::from_millis(20)),
    );
    let last_error = || async { outbox.get(id).await.unwrap().and_then(|r| r.last_error) };
    eventually(
        "the refused login is recorded",
        Duration::from_secs(30),
        || async { last_error().await.is_some() },
    )
    .await;
    relay.stop().await;
    let reason = last_error().await.unwrap();
    assert!(!reason.contains(amqp_secret), "stored reason: {reason}");

    // A connection error names no password either.
    let error: Error = sqlx::PgPool::connect(&format!(
        "postgres://postgres:{pg_secret}@127.0.0.1:1/postgres"
    ))
    .await
    .unwrap_err()
    .into();
    assert!(!error.to_string().contains(pg_secret), "{error}");
    assert!(!format!("{error:?}").contains(pg_secret), "{error:?}");

    assert!(
        logs_contain("outbox."),
        "the capture saw no outbox log at all"
    );
    for secret in [pg_secret, nats_secret, amqp_secret] {
        let logs = String::from_utf8_lossy(&captured_logs().lock().unwrap()).into_owned();
        let leaks: Vec<&str> = logs
            .lines()
            .filter(|l| l.contains(secret))
            .take(3)
            .collect();
        assert!(
            leaks.is_empty(),
            "log lines hold the password {secret}:\n{}",
            leaks.join("\n")
        );
    }
    Postgres::drop_tables(&outbox).await;
}
