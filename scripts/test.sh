#!/usr/bin/env bash
# Runs the whole test suite against real servers, starting (or installing) them first.
# Point the tests at other servers with OUTBOX_TEST_DATABASE_URL, OUTBOX_TEST_AMQP_URL,
# OUTBOX_TEST_NATS_URL and OUTBOX_TEST_KAFKA_BROKERS; with OUTBOX_SKIP_SERVICES=1 nothing is
# started here.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"
if [ -z "${OUTBOX_SKIP_SERVICES:-}" ]; then
  scripts/services.sh
fi
# The servers script installs Chromium: the dashboard's browser test must run, not skip.
if [ -z "${OUTBOX_SKIP_SERVICES:-}" ]; then
  export OUTBOX_REQUIRE_CHROMIUM=1
fi
cargo test --workspace --all-features "$@"
