//! Debezium for real: its PostgreSQL connector and outbox event router, run in Debezium's
//! embedded engine by `tests/debezium/RouterProbe.java` (on the machine's Java, with the jars
//! `scripts/services.sh debezium` installs), printing what Kafka Connect would write to Kafka.

use crate::faults::servers::PrivatePostgres;
use crate::ItemChanged;
use outbox::{Envelope, Outbox, TableLayout};
use sqlx::postgres::PgPoolOptions;
use sqlx::{PgPool, Postgres};
use std::io::{BufRead, BufReader};
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// How long a test waits for Debezium's messages.
pub const DEBEZIUM_WAIT: Duration = Duration::from_secs(90);

/// The Debezium release `scripts/services.sh` installs.
pub const DEBEZIUM_VERSION: &str = "3.6.3";

/// One message as Kafka Connect would write it: topic, key, value and headers as strings
/// (StringConverter and SimpleHeaderConverter).
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize)]
pub struct Routed {
    pub topic: String,
    pub key: Option<String>,
    pub value: Option<String>,
    pub headers: Vec<(String, Option<String>)>,
}

impl Routed {
    /// The last header named `name`.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .rev()
            .find(|(k, _)| k == name)
            .and_then(|(_, v)| v.as_deref())
    }
}

/// Where the Debezium jars are: `$OUTBOX_DEBEZIUM_LIBS`, or under `$OUTBOX_TOOLS`
/// (`/opt/outbox-tools` by default), where `scripts/services.sh debezium` puts them.
fn libs() -> PathBuf {
    if let Some(dir) = std::env::var_os("OUTBOX_DEBEZIUM_LIBS") {
        return dir.into();
    }
    let tools = std::env::var_os("OUTBOX_TOOLS").unwrap_or_else(|| "/opt/outbox-tools".into());
    PathBuf::from(tools).join(format!("debezium-{DEBEZIUM_VERSION}/libs"))
}

/// A running connector: the embedded engine in a `java` process of its own.
#[derive(Debug)]
pub struct DebeziumProbe {
    child: Child,
    lines: mpsc::Receiver<String>,
    dir: PathBuf,
}

impl DebeziumProbe {
    /// Starts Debezium's PostgreSQL connector on `table` (schema `public`) of the cluster on
    /// `port`, with a slot and publication named after the table, streaming only what commits
    /// after its slot exists (`snapshot.mode = no_data`), through the outbox event router
    /// (`transforms.outbox`), with `settings` added. Returns once the connector's task runs.
    pub fn start(port: u16, table: &str, settings: &[(&str, &str)]) -> Self {
        let libs = libs();
        assert!(
            libs.join(format!("debezium-embedded-{DEBEZIUM_VERSION}.Final.jar"))
                .exists(),
            "Debezium's jars are not in {}: run `scripts/services.sh debezium`",
            libs.display()
        );
        let dir = crate::temp_dir("debezium");
        let mut props = format!(
            "name=probe-{table}\n\
             connector.class=io.debezium.connector.postgresql.PostgresConnector\n\
             offset.storage=org.apache.kafka.connect.storage.MemoryOffsetBackingStore\n\
             offset.flush.interval.ms=0\n\
             database.hostname=127.0.0.1\n\
             database.port={port}\n\
             database.user=postgres\n\
             database.password=\n\
             database.dbname=postgres\n\
             topic.prefix=probe\n\
             plugin.name=pgoutput\n\
             slot.name={table}\n\
             publication.name={table}\n\
             publication.autocreate.mode=filtered\n\
             table.include.list=public.{table}\n\
             snapshot.mode=no_data\n\
             transforms=outbox\n\
             transforms.outbox.type=io.debezium.transforms.outbox.EventRouter\n"
        );
        for (key, value) in settings {
            props.push_str(&format!("{key}={value}\n"));
        }
        let file = dir.join("connector.properties");
        std::fs::write(&file, props).unwrap();
        let source = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("debezium/RouterProbe.java");
        let mut child = Command::new("java")
            .arg("-cp")
            .arg(libs.join("*"))
            .arg(source)
            .arg(&file)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(dir.join("engine.log")).unwrap())
            .process_group(0)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run java (scripts/services.sh installs it): {e}"));
        let (tx, lines) = mpsc::channel();
        let stdout = child.stdout.take().unwrap();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let probe = Self { child, lines, dir };
        let first = probe.next_line(Duration::from_secs(120));
        assert_eq!(
            first.as_deref(),
            Some(r#"{"ready":true}"#),
            "Debezium did not start; its log: {}",
            probe.log_tail()
        );
        probe
    }

    fn next_line(&self, timeout: Duration) -> Option<String> {
        self.lines.recv_timeout(timeout).ok()
    }

    fn log_tail(&self) -> String {
        let log = std::fs::read_to_string(self.dir.join("engine.log")).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    }

    /// The next `n` messages, in the order the connector emitted them; panics if they do not
    /// all come within `timeout`.
    pub fn take(&self, n: usize, timeout: Duration) -> Vec<Routed> {
        let deadline = Instant::now() + timeout;
        let mut out = Vec::with_capacity(n);
        while out.len() < n {
            let left = deadline.saturating_duration_since(Instant::now());
            let Some(line) = self.next_line(left) else {
                panic!(
                    "{} of {n} messages from Debezium within {timeout:?}; its log: {}",
                    out.len(),
                    self.log_tail()
                );
            };
            assert!(
                !line.starts_with(r#"{"error""#),
                "Debezium failed: {line}\n{}",
                self.log_tail()
            );
            out.push(serde_json::from_str(&line).unwrap_or_else(|e| panic!("{e}: {line}")));
        }
        out
    }
}

impl Drop for DebeziumProbe {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-KILL", "--", &format!("-{}", self.child.id())])
            .status();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The connector settings the README documents for a table with the Debezium layout: topics
/// are the events' routes, every column a consumer of this library reads goes into the header
/// it reads it from, and Debezium's own context headers are left out.
pub fn documented_settings() -> Vec<(&'static str, &'static str)> {
    vec![
        ("extended.headers.enabled", "false"),
        ("transforms.outbox.route.by.field", "topic"),
        (
            "transforms.outbox.route.topic.replacement",
            "${routedByValue}",
        ),
        (
            "transforms.outbox.table.fields.additional.placement",
            "id:header:outbox-id,type:header:outbox-event-type,\
             aggregatetype:header:outbox-aggregate-type,aggregateid:header:outbox-aggregate-id,\
             seq:header:outbox-sequence,schema_version:header:outbox-schema-version,\
             headers:header:outbox-headers",
        ),
    ]
}

/// A pool on a private cluster.
pub async fn private_pool(cluster: &PrivatePostgres) -> PgPool {
    PgPoolOptions::new()
        .max_connections(12)
        .connect(&cluster.url())
        .await
        .unwrap()
}

/// An outbox in the Debezium layout on `table`, migrated, handing off or not.
pub async fn debezium_outbox(pool: &PgPool, table: &str, hand_off: bool) -> Outbox<Postgres> {
    let outbox = Outbox::builder(pool.clone())
        .table(table)
        .layout(TableLayout::Debezium)
        .hand_off(hand_off)
        .build()
        .unwrap();
    outbox.migrate().await.unwrap();
    outbox
}

/// The test event for aggregate `item`.
pub fn item(item: &str, n: u64) -> ItemChanged {
    ItemChanged {
        item: item.into(),
        n,
    }
}

/// The one number `sql` selects.
pub async fn count(pool: &PgPool, sql: &str) -> i64 {
    sqlx::query_scalar(sql).fetch_one(pool).await.unwrap()
}

/// The envelope a consumer of this library rebuilds from a routed message.
pub fn envelope_of(message: &Routed) -> Envelope {
    Envelope::from_wire(
        message
            .headers
            .iter()
            .filter_map(|(k, v)| Some((k.as_str(), v.as_deref()?))),
        message.value.clone().unwrap_or_default(),
        1,
    )
    .unwrap_or_else(|e| panic!("{e}: {message:?}"))
}

/// Nothing else was routed: Debezium emits in commit order, so the next message is an event
/// committed now (not a delete, which the router filters, nor a rolled-back event, nor a
/// relay's update).
pub async fn assert_next_is_sentinel(
    pool: &PgPool,
    outbox: &Outbox<Postgres>,
    probe: &DebeziumProbe,
) {
    let mut tx = pool.begin().await.unwrap();
    let sentinel = outbox
        .enqueue(&mut *tx, &item("sentinel", 0))
        .await
        .unwrap();
    tx.commit().await.unwrap();
    let next = probe.take(1, DEBEZIUM_WAIT).remove(0);
    let id = next.header("outbox-id").or_else(|| next.header("id"));
    assert_eq!(
        id,
        Some(sentinel.to_string().as_str()),
        "something was routed before the sentinel: {next:?}"
    );
}
