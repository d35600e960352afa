#!/usr/bin/env bash
# The demo: a bulk conversion of sample leads against local Postgres (and
# RabbitMQ), setting them up if missing. Extra arguments go to `leadconv-dev demo`
# (e.g. --leads 10000 --concurrency 16).
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/services.sh
export DATABASE_URL="${DATABASE_URL:-postgres://postgres@127.0.0.1:5432/leadconv}"
cargo build --locked --release --quiet --workspace --bins
./target/release/leadconv-dev demo "$@"
