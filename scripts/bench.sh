#!/usr/bin/env bash
# The full benchmark of BENCHMARKS.md: starts the servers, restarts tansu empty (it keeps every
# message in memory), and writes the figures and plots into benchmarks/ (benchmarks/mysql.md for
# the MySQL store). About 35 minutes on a 2-core machine. Extra arguments go to the PostgreSQL
# harness (see --help), for instance
#   scripts/bench.sh --targets nats --backlogs 100000
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"
scripts/services.sh
scripts/services.sh kafka-restart
cargo run --release -p outbox-bench --bin outbox-bench -- --out benchmarks "$@"
# The MySQL store on MariaDB against MariaDB's and NATS's raw limits (about 5 minutes).
cargo run --release -p outbox-bench --bin mysql_bench -- --out benchmarks
