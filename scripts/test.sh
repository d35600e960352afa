#!/usr/bin/env bash
# The whole test suite: unit tests and integration tests against the real
# Postgres and RabbitMQ (started or installed first if missing).
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/services.sh
cargo test --locked --workspace --all-targets "$@"
