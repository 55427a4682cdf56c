#!/usr/bin/env bash
# Runs the whole test suite against real servers, starting (or installing) them first.
# Point the tests at another PostgreSQL with OUTBOX_TEST_DATABASE_URL.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"
if [ -z "${OUTBOX_TEST_DATABASE_URL:-}" ]; then
  scripts/services.sh postgres
fi
cargo test --workspace --all-features "$@"
