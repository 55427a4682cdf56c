//! Private server instances for the fault matrix: a PostgreSQL cluster from `initdb`, a
//! `nats-server` with its own store, a RabbitMQ node with its own name, ports and data
//! directory, and a Kafka-protocol broker (tansu), each on free ports, so that stopping or
//! restarting one never touches the servers the rest of the suite shares. They are stopped by
//! process id (the whole process group) and their directories removed on drop.

use crate::{free_port, temp_dir, PrivateServer};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Runs `command` to completion, panicking with its output when it fails.
fn run(command: &mut Command, what: &str) {
    let output = command
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {what}: {e}"));
    assert!(
        output.status.success(),
        "{what} failed: {}\n{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

/// Whether this process runs as root (`/proc/self` belongs to the effective user).
fn is_root() -> bool {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0)
}

fn port_open(port: u16) -> bool {
    std::net::TcpStream::connect_timeout(
        &std::net::SocketAddr::from(([127, 0, 0, 1], port)),
        Duration::from_millis(200),
    )
    .is_ok()
}

/// Polls until `port` accepts connections, or panics naming `what`.
pub fn wait_for_port(what: &str, port: u16, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    while !port_open(port) {
        assert!(
            Instant::now() < deadline,
            "{what} did not accept connections on port {port} within {timeout:?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Sends `signal` to the process group `pgid` (a negative pid for kill(1)).
fn kill_group(pgid: u32, signal: &str) {
    let _ = Command::new("kill")
        .args([format!("-{signal}"), "--".into(), format!("-{pgid}")])
        .stderr(Stdio::null())
        .status();
}

/// The directory with `initdb` and `pg_ctl`: Debian's newest `/usr/lib/postgresql/*/bin`,
/// or wherever `PATH` finds them.
fn pg_bindir() -> PathBuf {
    let mut debian: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path().join("bin"))
        .filter(|bin| bin.join("initdb").exists())
        .collect();
    debian.sort_by_key(|p| {
        p.parent()
            .and_then(|v| v.file_name()?.to_str()?.parse::<u32>().ok())
            .unwrap_or(0)
    });
    if let Some(newest) = debian.pop() {
        return newest;
    }
    std::env::var_os("PATH")
        .into_iter()
        .flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .find(|dir| dir.join("initdb").exists())
        .expect("initdb not found: install PostgreSQL's server package (scripts/services.sh)")
}

/// A PostgreSQL cluster of the runner's own, in a fresh directory, on a free port.
#[derive(Debug)]
pub struct PrivatePostgres {
    pub port: u16,
    dir: PathBuf,
    bin: PathBuf,
}

impl PrivatePostgres {
    pub fn start() -> Self {
        Self::start_with("")
    }

    /// A cluster whose write-ahead log carries logical changes (`wal_level = logical`), for
    /// logical replication slots and the connectors that read them (Debezium).
    pub fn start_logical() -> Self {
        Self::start_with("wal_level = logical\nmax_replication_slots = 10\nmax_wal_senders = 10\n")
    }

    /// A cluster with `extra` appended to its `postgresql.conf`.
    pub fn start_with(extra: &str) -> Self {
        let bin = pg_bindir();
        let dir = temp_dir("pg");
        let port = free_port();
        // initdb refuses to run as root: the cluster belongs to the postgres user then.
        if is_root() {
            run(
                Command::new("chown")
                    .args(["-R", "postgres:postgres"])
                    .arg(&dir),
                "chown",
            );
        }
        let data = dir.join("data");
        run(
            as_postgres(&bin.join("initdb")).arg("-D").arg(&data).args([
                "-A",
                "trust",
                "-U",
                "postgres",
                "-E",
                "UTF8",
                "--no-sync",
            ]),
            "initdb",
        );
        let conf = format!(
            "port = {port}\nlisten_addresses = '127.0.0.1'\nunix_socket_directories = '{}'\n\
             max_connections = 200\nfsync = off\nfull_page_writes = off\n{extra}",
            dir.display()
        );
        let conf_file = data.join("postgresql.conf");
        let mut existing = std::fs::read_to_string(&conf_file).unwrap();
        existing.push_str(&conf);
        std::fs::write(&conf_file, existing).unwrap();
        let cluster = Self { port, dir, bin };
        cluster.pg_ctl(&["start", "-w", "-t", "60"]);
        cluster
    }

    pub fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }

    /// `pg_ctl restart -m fast`: every connection is cut, the server comes back on the same port.
    pub fn restart_fast(&self) {
        self.pg_ctl(&["restart", "-m", "fast", "-w", "-t", "60"]);
    }

    fn pg_ctl(&self, args: &[&str]) {
        let log = self.dir.join("server.log");
        run(
            as_postgres(&self.bin.join("pg_ctl"))
                .arg("-D")
                .arg(self.dir.join("data"))
                .arg("-l")
                .arg(&log)
                .args(args),
            "pg_ctl",
        );
    }

    /// The postmaster's process id (first line of `postmaster.pid`).
    fn pid(&self) -> Option<u32> {
        std::fs::read_to_string(self.dir.join("data/postmaster.pid"))
            .ok()?
            .lines()
            .next()?
            .trim()
            .parse()
            .ok()
    }
}

fn as_postgres(program: &Path) -> Command {
    if is_root() {
        let mut command = Command::new("runuser");
        command.args(["-u", "postgres", "--"]).arg(program);
        command
    } else {
        Command::new(program)
    }
}

impl Drop for PrivatePostgres {
    fn drop(&mut self) {
        if let Some(pid) = self.pid() {
            // SIGQUIT: immediate shutdown of the postmaster and its children.
            let _ = Command::new("kill")
                .args(["-QUIT", &pid.to_string()])
                .status();
            let deadline = Instant::now() + Duration::from_secs(10);
            while port_open(self.port) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A RabbitMQ node of the runner's own: its own node name, AMQP and distribution ports, data
/// and log directories, no plugins, and a 1 MiB message size limit (so that an oversize event is
/// refused by the broker, as a production limit would).
#[derive(Debug)]
pub struct PrivateRabbit {
    pub port: u16,
    dist_port: u16,
    dir: PathBuf,
    child: Option<Child>,
}

impl PrivateRabbit {
    pub fn start() -> Self {
        let dir = temp_dir("rabbit");
        std::fs::write(dir.join("enabled_plugins"), "[].\n").unwrap();
        std::fs::write(
            dir.join("rabbitmq.conf"),
            "max_message_size = 1048576\nlog.console = false\n",
        )
        .unwrap();
        let mut node = Self {
            port: free_port(),
            dist_port: free_port(),
            dir,
            child: None,
        };
        node.restart();
        node
    }

    pub fn url(&self) -> String {
        format!("amqp://guest:guest@127.0.0.1:{}/%2f", self.port)
    }

    /// Starts the node (again), on the same ports and data.
    pub fn restart(&mut self) {
        // The Debian wrapper in /usr/sbin switches to the rabbitmq user and its home; the
        // script under /usr/lib runs the node as whoever we are.
        let program = ["/usr/lib/rabbitmq/bin/rabbitmq-server"]
            .into_iter()
            .find(|p| Path::new(p).exists())
            .unwrap_or("rabbitmq-server");
        let d = &self.dir;
        let child = Command::new(program)
            .env(
                "RABBITMQ_NODENAME",
                format!("outbox{}@localhost", self.port),
            )
            .env("RABBITMQ_NODE_IP_ADDRESS", "127.0.0.1")
            .env("RABBITMQ_NODE_PORT", self.port.to_string())
            .env("RABBITMQ_DIST_PORT", self.dist_port.to_string())
            .env("RABBITMQ_MNESIA_BASE", d.join("mnesia"))
            .env("RABBITMQ_LOG_BASE", d.join("log"))
            .env("RABBITMQ_ENABLED_PLUGINS_FILE", d.join("enabled_plugins"))
            .env("RABBITMQ_CONFIG_FILE", d.join("rabbitmq.conf"))
            .env("RABBITMQ_ADVANCED_CONFIG_FILE", d.join("advanced.config"))
            .env("RABBITMQ_CONF_ENV_FILE", d.join("rabbitmq-env.conf"))
            .env("RABBITMQ_PID_FILE", d.join("rabbit.pid"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .process_group(0)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {program}: {e}"));
        self.child = Some(child);
        wait_for_port(
            "RabbitMQ (private node)",
            self.port,
            Duration::from_secs(120),
        );
    }

    /// Kills the node (SIGKILL to its process group), as a crash would.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            kill_group(child.id(), "KILL");
            let _ = child.wait();
            let deadline = Instant::now() + Duration::from_secs(10);
            while port_open(self.port) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }
}

impl Drop for PrivateRabbit {
    fn drop(&mut self) {
        self.stop();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A `nats-server` (`OUTBOX_TEST_NATS_SERVER`, default from `PATH`) with JetStream and its
/// own store directory.
pub async fn private_nats() -> PrivateServer {
    PrivateServer::start(
        std::env::var("OUTBOX_TEST_NATS_SERVER").unwrap_or_else(|_| "nats-server".to_owned()),
        &["-a", "127.0.0.1", "-p", "{port}", "-js", "-sd", "{dir}"],
    )
    .await
}

/// The tansu binary that `scripts/services.sh` builds.
pub fn tansu_program() -> String {
    std::env::var("OUTBOX_TEST_TANSU")
        .unwrap_or_else(|_| "/opt/outbox-tools/tansu-0.6.0/bin/tansu".to_owned())
}

/// A Kafka-protocol broker (tansu) with memory storage: a restart forgets every topic, so the
/// matrix reads what it holds before stopping it.
pub async fn private_kafka() -> PrivateServer {
    PrivateServer::start(
        tansu_program(),
        &[
            "broker",
            "--listener-url",
            "tcp://127.0.0.1:{port}",
            "--advertised-listener-url",
            "tcp://127.0.0.1:{port}",
            "--storage-engine",
            "memory://tansu/",
        ],
    )
    .await
}
