//! Shared fixtures of the integration tests: real databases, test events, a recording handler,
//! and scenarios that run the same on every backend.

pub mod debezium;
pub mod faults;
pub mod lanes;
pub mod nats;
pub mod partitioned;
pub mod scenarios;
pub mod wal;

use outbox::{Backend, HandlerContext, HandlerError, Outbox, OutboxEvent};
use serde::{Deserialize, Serialize};
use sqlx::postgres::PgPoolOptions;
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions};
use sqlx::{PgPool, Postgres, Sqlite, SqlitePool};
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The PostgreSQL server the tests use: `OUTBOX_TEST_DATABASE_URL`, or the local default.
pub fn pg_url() -> String {
    std::env::var("OUTBOX_TEST_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".to_owned())
}

/// A fresh table name, so tests run side by side in one database.
pub fn unique_table() -> String {
    format!("t_{}", &uuid::Uuid::new_v4().simple().to_string()[..12])
}

/// Logs to the test output when `RUST_LOG` is set.
pub fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
}

/// Logs of a test's helper process (`src/bin`): `RUST_LOG` decides, to stderr.
pub fn init_process_tracing() {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_writer(std::io::stderr)
        .init();
}

/// A token cancelled when the process receives SIGTERM: a helper process stops gracefully.
pub fn cancel_on_sigterm() -> outbox::CancellationToken {
    let shutdown = outbox::CancellationToken::new();
    let on_term = shutdown.clone();
    tokio::spawn(async move {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("SIGTERM handler");
        term.recv().await;
        on_term.cancel();
    });
    shutdown
}

/// The event most tests write.
#[derive(Debug, Clone, Serialize, Deserialize, OutboxEvent)]
#[outbox(
    event_type = "test.item_changed",
    aggregate_type = "item",
    topic = "items"
)]
pub struct ItemChanged {
    #[outbox(aggregate_id)]
    pub item: String,
    pub n: u64,
}

/// An event padded to any size, for payloads near the servers' packet limits.
#[derive(Debug, Clone, Serialize, Deserialize, OutboxEvent)]
#[outbox(event_type = "test.bulky", aggregate_type = "item", topic = "items")]
pub struct Bulky {
    #[outbox(aggregate_id)]
    pub item: String,
    pub pad: String,
}

/// An event with no handler anywhere.
#[derive(Debug, Clone, Serialize, Deserialize, OutboxEvent)]
#[outbox(event_type = "test.nobody_listens")]
pub struct NobodyListens {
    #[outbox(aggregate_id)]
    pub item_id: String,
}

/// Writes an `ItemChanged` whose payload lacks `n`: the handler cannot deserialise it.
#[derive(Debug, Clone, Serialize, Deserialize, OutboxEvent)]
#[outbox(
    event_type = "test.item_changed",
    aggregate_type = "item",
    topic = "items"
)]
pub struct MalformedItemChanged {
    #[outbox(aggregate_id)]
    pub item: String,
    pub wrong: bool,
}

/// One handled event, as the handler saw it.
#[derive(Debug, Clone)]
pub struct Handled {
    pub event: ItemChanged,
    pub event_id: uuid::Uuid,
    pub sequence: i64,
    pub attempt: u32,
    pub at: chrono::DateTime<chrono::Utc>,
}

/// Everything a test's handler saw, in order.
#[derive(Debug, Default, Clone)]
pub struct Log(Arc<Mutex<Vec<Handled>>>);

impl Log {
    pub fn push(&self, event: ItemChanged, ctx: &HandlerContext) {
        self.0.lock().unwrap().push(Handled {
            event,
            event_id: ctx.event_id(),
            sequence: ctx.sequence(),
            attempt: ctx.attempt(),
            at: chrono::Utc::now(),
        });
    }

    pub fn len(&self) -> usize {
        self.0.lock().unwrap().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn snapshot(&self) -> Vec<Handled> {
        self.0.lock().unwrap().clone()
    }
}

/// What the test handler does with an event.
pub type Behaviour =
    Arc<dyn Fn(&ItemChanged, &HandlerContext) -> Result<(), HandlerError> + Send + Sync>;

/// A dispatcher whose `ItemChanged` handler applies `behaviour`, then logs the event if it
/// succeeded.
pub fn dispatcher(log: &Log, behaviour: Behaviour) -> outbox::Dispatcher {
    let log = log.clone();
    let registry = outbox::Registry::builder()
        .handler::<ItemChanged, _, _>("test", move |event: ItemChanged, ctx: HandlerContext| {
            let outcome = behaviour(&event, &ctx);
            if outcome.is_ok() {
                log.push(event, &ctx);
            }
            async move { outcome }
        })
        .unwrap()
        .build();
    outbox::Dispatcher::new(registry)
}

/// A handler that always succeeds.
pub fn always_ok() -> Behaviour {
    Arc::new(|_, _| Ok(()))
}

/// Polls `check` until it holds, or panics after `timeout` saying what was awaited.
pub async fn eventually<F, Fut>(what: &str, timeout: Duration, check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    assert!(
        within(timeout, check).await,
        "timed out after {timeout:?} waiting for: {what}"
    );
}

/// Polls `check` until it holds (true) or `timeout` passes (false).
pub async fn within<F, Fut>(timeout: Duration, mut check: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if check().await {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A database the scenarios can run on.
pub trait TestDb: Backend<Store: outbox::FullStore> + Sized {
    /// A fresh, migrated outbox in its own table.
    fn fresh() -> impl Future<Output = Outbox<Self>> + Send;

    /// Inserts a business row (in a table created on first use) in the caller's transaction.
    fn insert_business_row<'a>(
        outbox: &'a Outbox<Self>,
        conn: &'a mut Self::Connection,
        id: &'a str,
    ) -> impl Future<Output = ()> + Send + 'a;

    /// Counts the business rows with `id`.
    fn count_business_rows<'a>(
        outbox: &'a Outbox<Self>,
        id: &'a str,
    ) -> impl Future<Output = i64> + Send + 'a;

    /// Counts the outbox rows.
    fn count_outbox_rows(outbox: &Outbox<Self>) -> impl Future<Output = i64> + Send + '_;

    /// Counts the outbox rows with `status` (`pending`, `delivered`, `dead`).
    fn count_status<'a>(
        outbox: &'a Outbox<Self>,
        status: &'a str,
    ) -> impl Future<Output = i64> + Send + 'a;

    /// The dead events, as `(aggregate id, event id)`.
    fn dead_events(
        outbox: &Outbox<Self>,
    ) -> impl Future<Output = Vec<(String, uuid::Uuid)>> + Send + '_;

    /// Counts the rows in `<table>_archive`.
    fn count_archived(outbox: &Outbox<Self>) -> impl Future<Output = i64> + Send + '_;

    /// Drops the test's tables.
    fn drop_tables(outbox: &Outbox<Self>) -> impl Future<Output = ()> + Send + '_;
}

pub async fn pg_pool() -> PgPool {
    PgPoolOptions::new()
        .max_connections(16)
        .connect(&pg_url())
        .await
        .unwrap_or_else(|e| panic!("cannot reach PostgreSQL (set OUTBOX_TEST_DATABASE_URL): {e}"))
}

pub async fn sqlite_pool() -> SqlitePool {
    let path = std::env::temp_dir().join(format!("outbox-test-{}.db", uuid::Uuid::new_v4()));
    SqlitePoolOptions::new()
        .max_connections(4)
        .connect_with(
            SqliteConnectOptions::new()
                .filename(path)
                .create_if_missing(true)
                .journal_mode(SqliteJournalMode::Wal)
                .busy_timeout(Duration::from_secs(10)),
        )
        .await
        .unwrap()
}

// The same SQL serves every database but for its parameter marker (`$1`, which SQLite reads
// too, or MySQL's `?`), the business id's column type and how an id reads as text.
macro_rules! test_db {
    ($db:ty, $pool:expr, layout = $layout:expr, param = $p:literal, id_column = $id_column:literal,
     id_text = $id_text:literal, |$outbox:ident| $drop:block) => {
        impl TestDb for $db {
            async fn fresh() -> Outbox<Self> {
                let outbox = Outbox::builder($pool.await)
                    .table(unique_table())
                    .layout($layout)
                    .build()
                    .unwrap();
                outbox.migrate().await.unwrap();
                sqlx::query(&format!(
                    "CREATE TABLE {}_business (id {} PRIMARY KEY)",
                    outbox.table(),
                    $id_column
                ))
                .execute(outbox.pool())
                .await
                .unwrap();
                outbox
            }

            async fn insert_business_row<'a>(
                outbox: &'a Outbox<Self>,
                conn: &'a mut Self::Connection,
                id: &'a str,
            ) {
                sqlx::query(&format!(
                    "INSERT INTO {}_business (id) VALUES ({})",
                    outbox.table(),
                    $p
                ))
                    .bind(id)
                    .execute(conn)
                    .await
                    .unwrap();
            }

            async fn count_business_rows<'a>(outbox: &'a Outbox<Self>, id: &'a str) -> i64 {
                sqlx::query_scalar(&format!(
                    "SELECT count(*) FROM {}_business WHERE id = {}",
                    outbox.table(),
                    $p
                ))
                .bind(id)
                .fetch_one(outbox.pool())
                .await
                .unwrap()
            }

            async fn count_outbox_rows(outbox: &Outbox<Self>) -> i64 {
                sqlx::query_scalar(&format!("SELECT count(*) FROM {}", outbox.table()))
                    .fetch_one(outbox.pool())
                    .await
                    .unwrap()
            }

            async fn count_status<'a>(outbox: &'a Outbox<Self>, status: &'a str) -> i64 {
                sqlx::query_scalar(&format!(
                    "SELECT count(*) FROM {} WHERE status = {}",
                    outbox.table(),
                    $p
                ))
                .bind(status)
                .fetch_one(outbox.pool())
                .await
                .unwrap()
            }

            async fn dead_events(outbox: &Outbox<Self>) -> Vec<(String, uuid::Uuid)> {
                let rows: Vec<(String, String)> = sqlx::query_as(&format!(
                    "SELECT aggregate_id, {} FROM {} WHERE status = 'dead'",
                    $id_text,
                    outbox.table()
                ))
                .fetch_all(outbox.pool())
                .await
                .unwrap();
                rows.into_iter()
                    .map(|(aggregate, id)| (aggregate, id.parse().unwrap()))
                    .collect()
            }

            async fn count_archived(outbox: &Outbox<Self>) -> i64 {
                sqlx::query_scalar(&format!("SELECT count(*) FROM {}_archive", outbox.table()))
                    .fetch_one(outbox.pool())
                    .await
                    .unwrap()
            }

            async fn drop_tables($outbox: &Outbox<Self>) $drop
        }
    };
}

/// The layout of the PostgreSQL scenarios' outboxes: standard, unless a test binary (one
/// process) chose another with [`use_pg_layout`] before its first scenario.
static PG_LAYOUT: std::sync::OnceLock<outbox::TableLayout> = std::sync::OnceLock::new();

/// Runs this process's PostgreSQL scenarios on `layout`. Every test of the binary calls it
/// first, with the same layout (whichever test runs first sets it).
pub fn use_pg_layout(layout: outbox::TableLayout) {
    let chosen = *PG_LAYOUT.get_or_init(|| layout);
    assert_eq!(chosen, layout, "one layout per test binary");
}

test_db!(
    Postgres,
    pg_pool(),
    layout = PG_LAYOUT.get().copied().unwrap_or_default(),
    param = "$1",
    id_column = "TEXT",
    id_text = "CAST(id AS TEXT)",
    |outbox| {
        let t = outbox.table();
        sqlx::raw_sql(&format!(
        "DROP TABLE IF EXISTS {t}, {t}_aggregates, {t}_cursors, {t}_new, {t}_keys, {t}_archive, {t}_migrations, {t}_business, {t}_inbox, {t}_inbox_attempts"
    ))
    .execute(outbox.pool())
    .await
    .unwrap();
    }
);

test_db!(
    Sqlite,
    sqlite_pool(),
    layout = outbox::TableLayout::Standard,
    param = "$1",
    id_column = "TEXT",
    id_text = "CAST(id AS TEXT)",
    |outbox| {
        // The database is a temporary file of its own: remove it.
        let file: String =
            sqlx::query_scalar("SELECT file FROM pragma_database_list WHERE name = 'main'")
                .fetch_one(outbox.pool())
                .await
                .unwrap();
        outbox.pool().close().await;
        for suffix in ["", "-wal", "-shm"] {
            let _ = std::fs::remove_file(format!("{file}{suffix}"));
        }
    }
);

/// The MySQL / MariaDB server of the tests: `OUTBOX_TEST_MYSQL_URL`, else the development
/// machine's MariaDB (root, no password, database `test`).
pub fn mysql_url() -> String {
    std::env::var("OUTBOX_TEST_MYSQL_URL")
        .unwrap_or_else(|_| "mysql://root@127.0.0.1:3306/test".to_owned())
}

pub async fn mysql_pool() -> sqlx::MySqlPool {
    sqlx::mysql::MySqlPoolOptions::new()
        .max_connections(16)
        .connect(&mysql_url())
        .await
        .unwrap_or_else(|e| panic!("cannot reach MySQL (set OUTBOX_TEST_MYSQL_URL): {e}"))
}

// The ids are BINARY(16): `HEX` reads them as 32 hex digits, which `Uuid` parses.
test_db!(
    sqlx::MySql,
    mysql_pool(),
    layout = outbox::TableLayout::Standard,
    param = "?",
    id_column = "VARCHAR(255)",
    id_text = "HEX(id)",
    |outbox| {
        let t = outbox.table();
        sqlx::raw_sql(&format!(
        "DROP TABLE IF EXISTS {t}, {t}_aggregates, {t}_cursors, {t}_new, {t}_keys, {t}_archive, \
         {t}_migrations, {t}_business, {t}_inbox, {t}_inbox_attempts"
    ))
        .execute(outbox.pool())
        .await
        .unwrap();
    }
);

/// Runs a relay in the background until [`RunningRelay::stop`].
#[derive(Debug)]
pub struct RunningRelay {
    pub shutdown: outbox::CancellationToken,
    pub task: tokio::task::JoinHandle<outbox::Result<()>>,
}

impl RunningRelay {
    pub fn spawn<DB: Backend, D: outbox::Destination>(relay: outbox::Relay<DB, D>) -> Self {
        let shutdown = outbox::CancellationToken::new();
        let token = shutdown.clone();
        let task = tokio::spawn(async move { relay.run(token).await });
        Self { shutdown, task }
    }

    /// Builds `relay` and spawns it.
    pub fn start<DB: Backend, D: outbox::Destination>(relay: outbox::RelayBuilder<DB, D>) -> Self {
        Self::spawn(relay.build().expect("valid relay configuration"))
    }

    /// Graceful stop; panics if the relay failed.
    pub async fn stop(self) {
        self.shutdown.cancel();
        self.task.await.unwrap().unwrap();
    }
}

/// An event too large for any broker's default message size limit.
#[derive(Debug, Clone, Serialize, Deserialize, OutboxEvent)]
#[outbox(event_type = "test.huge", aggregate_type = "item", topic = "items")]
pub struct Huge {
    #[outbox(aggregate_id)]
    pub item: String,
    pub blob: String,
}

/// An event whose route no broker topology captures.
#[derive(Debug, Clone, Serialize, Deserialize, OutboxEvent)]
#[outbox(
    event_type = "test.unrouted",
    aggregate_type = "item",
    topic = "nowhere"
)]
pub struct Unrouted {
    #[outbox(aggregate_id)]
    pub item: String,
}

/// A free TCP port on loopback, for a private server.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A fresh directory under the system temporary directory.
pub fn temp_dir(what: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("outbox-{what}-{}", uuid::Uuid::new_v4().simple()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// A TCP proxy on loopback that a test can cut and restore, to take a broker away from a client
/// without stopping the broker other tests use.
#[derive(Debug)]
pub struct TcpProxy {
    pub port: u16,
    upstream: std::net::SocketAddr,
    running: Option<(
        tokio_util::sync::CancellationToken,
        tokio::task::JoinHandle<()>,
    )>,
}

impl TcpProxy {
    /// Starts forwarding a free local port to `upstream`.
    pub async fn start(upstream: std::net::SocketAddr) -> Self {
        let mut proxy = Self {
            port: free_port(),
            upstream,
            running: None,
        };
        proxy.restore().await;
        proxy
    }

    /// Listens and forwards again, on the same port.
    pub async fn restore(&mut self) {
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", self.port))
            .await
            .expect("proxy port");
        let cancel = tokio_util::sync::CancellationToken::new();
        let upstream = self.upstream;
        let token = cancel.clone();
        let accept = tokio::spawn(async move {
            loop {
                let (mut client, _) = tokio::select! {
                    _ = token.cancelled() => return,
                    accepted = listener.accept() => match accepted {
                        Ok(a) => a,
                        Err(_) => continue,
                    },
                };
                let token = token.clone();
                tokio::spawn(async move {
                    let Ok(mut server) = tokio::net::TcpStream::connect(upstream).await else {
                        return;
                    };
                    tokio::select! {
                        _ = token.cancelled() => {}
                        _ = tokio::io::copy_bidirectional(&mut client, &mut server) => {}
                    }
                });
            }
        });
        self.running = Some((cancel, accept));
    }

    /// Closes the listener and every forwarded connection.
    pub async fn cut(&mut self) {
        if let Some((cancel, accept)) = self.running.take() {
            cancel.cancel();
            let _ = accept.await;
        }
    }
}

/// Retries quickly and for long: for tests where a broker is away for a while.
pub fn broker_retry() -> outbox::RetryPolicy {
    outbox::RetryPolicy::exponential(Duration::from_millis(50))
        .max_delay(Duration::from_millis(500))
        .max_attempts(1000)
}

/// What the consuming service's handler does once it committed an event's effect.
#[derive(Debug, Clone, Copy)]
pub enum AfterCommit {
    /// Succeed: the message is acknowledged.
    Ack,
    /// Fail with a retryable error on the first attempt of an event with `n == 1` (any `n`
    /// when `first_events_only` is false): as if the acknowledgement were lost.
    LoseFirstAck { first_events_only: bool },
    /// Never return: a consumer that crashes before acknowledging.
    Hang,
}

/// The consuming service of the broker tests: its own table `<table>_applied`, primary-keyed on
/// `(item, n)` so that applying an event twice would fail, and an inbox.
#[derive(Debug, Clone)]
pub struct Applier {
    pub table: String,
    pub inbox: outbox::Inbox<Postgres>,
    pub calls: Arc<std::sync::atomic::AtomicU32>,
}

impl Applier {
    pub async fn new(outbox: &Outbox<Postgres>, consumer: &str) -> Self {
        let table = outbox.table().to_string();
        sqlx::query(&format!(
            "CREATE TABLE {table}_applied (item text, n bigint, PRIMARY KEY (item, n))"
        ))
        .execute(outbox.pool())
        .await
        .unwrap();
        let inbox =
            outbox::Inbox::new(outbox.pool().clone(), &format!("{table}_inbox"), consumer).unwrap();
        inbox.migrate().await.unwrap();
        Self {
            table,
            inbox,
            calls: Arc::default(),
        }
    }

    /// A dispatcher whose `ItemChanged` handler applies each event through the inbox.
    pub fn dispatcher(&self, after_commit: AfterCommit) -> outbox::Dispatcher {
        let (calls, table) = (self.calls.clone(), self.table.clone());
        let registry = outbox::Registry::builder()
            .handler::<ItemChanged, _, _>(
                "apply",
                move |event: ItemChanged, ctx: HandlerContext| {
                    let (calls, table) = (calls.clone(), table.clone());
                    async move {
                        calls.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                        let inbox = ctx.state::<outbox::Inbox<Postgres>>()?;
                        let Some(mut tx) = inbox.begin(&ctx).await? else {
                            return Ok(());
                        };
                        sqlx::query(&format!(
                            "INSERT INTO {table}_applied (item, n) VALUES ($1, $2)"
                        ))
                        .bind(&event.item)
                        .bind(event.n as i64)
                        .execute(&mut *tx)
                        .await?;
                        tx.commit().await?;
                        match after_commit {
                            AfterCommit::Ack => Ok(()),
                            AfterCommit::LoseFirstAck { first_events_only }
                                if ctx.attempt() == 1 && (event.n == 1 || !first_events_only) =>
                            {
                                Err(HandlerError::retry("the acknowledgement was lost"))
                            }
                            AfterCommit::LoseFirstAck { .. } => Ok(()),
                            AfterCommit::Hang => std::future::pending().await,
                        }
                    }
                },
            )
            .unwrap()
            .build();
        outbox::Dispatcher::new(registry).state(self.inbox.clone())
    }

    /// Rows applied so far.
    pub async fn applied(&self) -> i64 {
        sqlx::query_scalar(&format!("SELECT count(*) FROM {}_applied", self.table))
            .fetch_one(self.inbox.pool())
            .await
            .unwrap()
    }

    /// Handler invocations so far.
    pub fn calls(&self) -> u32 {
        self.calls.load(std::sync::atomic::Ordering::SeqCst)
    }

    pub async fn drop_tables(&self) {
        sqlx::raw_sql(&format!("DROP TABLE {0}_applied, {0}_inbox", self.table))
            .execute(self.inbox.pool())
            .await
            .unwrap();
    }
}

/// A broker process of the test's own on a free port, which it can stop and start again to
/// simulate an outage without touching the servers other tests share.
#[derive(Debug)]
pub struct PrivateServer {
    pub port: u16,
    program: String,
    args: Vec<String>,
    data_dir: Option<std::path::PathBuf>,
    child: Option<std::process::Child>,
}

impl PrivateServer {
    /// Starts `program` with `args`, where `{port}` and `{dir}` are replaced by the port and a
    /// fresh data directory (removed on drop).
    pub async fn start(program: String, args: &[&str]) -> Self {
        let port = free_port();
        let data_dir = args
            .iter()
            .any(|a| a.contains("{dir}"))
            .then(|| temp_dir("server"));
        let args = args
            .iter()
            .map(|a| {
                let a = a.replace("{port}", &port.to_string());
                match &data_dir {
                    Some(dir) => a.replace("{dir}", &dir.display().to_string()),
                    None => a,
                }
            })
            .collect();
        let mut server = Self {
            port,
            program,
            args,
            data_dir,
            child: None,
        };
        server.restart().await;
        server
    }

    /// `127.0.0.1:<port>`.
    pub fn address(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// Starts the process again (after [`stop`](Self::stop)), on the same port and data.
    pub async fn restart(&mut self) {
        let child = std::process::Command::new(&self.program)
            .args(&self.args)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", self.program));
        self.child = Some(child);
        let port = self.port;
        eventually(
            &format!("{} accepts connections", self.program),
            Duration::from_secs(30),
            || async move {
                tokio::net::TcpStream::connect(("127.0.0.1", port))
                    .await
                    .is_ok()
            },
        )
        .await;
    }

    /// Kills the process.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            child.kill().unwrap();
            child.wait().unwrap();
        }
    }
}

impl Drop for PrivateServer {
    fn drop(&mut self) {
        self.stop();
        if let Some(dir) = &self.data_dir {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

/// Waits until the relay has recorded a delivery failure (while a broker is away).
pub async fn wait_for_recorded_failure(outbox: &Outbox<Postgres>) {
    eventually(
        "a delivery failure is recorded",
        Duration::from_secs(120),
        || async {
            let failed: i64 = sqlx::query_scalar(&format!(
                "SELECT count(*) FROM {} WHERE last_error IS NOT NULL",
                outbox.table()
            ))
            .fetch_one(outbox.pool())
            .await
            .unwrap();
            failed > 0
        },
    )
    .await;
}

/// Asserts that event `id` went dead at its first attempt, with a reason containing `reason`.
pub async fn assert_dead_at_once(outbox: &Outbox<Postgres>, id: uuid::Uuid, reason: &str) {
    let row = outbox.get(id).await.unwrap().unwrap();
    assert_eq!(row.status, outbox::EventStatus::Dead, "{row:?}");
    assert_eq!(row.attempts, 1, "{row:?}");
    assert!(
        row.last_error
            .as_deref()
            .unwrap_or_default()
            .contains(reason),
        "expected a reason containing {reason:?}: {:?}",
        row.last_error
    );
}

/// Enqueues an `ItemChanged` whose payload no handler can read.
pub async fn enqueue_poison(outbox: &Outbox<Postgres>) {
    let mut tx = outbox.pool().begin().await.unwrap();
    outbox
        .enqueue(
            &mut *tx,
            &MalformedItemChanged {
                item: "poison".into(),
                wrong: true,
            },
        )
        .await
        .unwrap();
    tx.commit().await.unwrap();
}

/// Serves `router` on a free port of loopback; returns its address.
pub async fn serve(router: axum::Router) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap().to_string();
    tokio::spawn(async move { axum::serve(listener, router).await.unwrap() });
    address
}
