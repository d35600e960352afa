#!/usr/bin/env bash
# Regenerates (or, with --check, verifies) `.sqlx/`: the schema data sqlx's
# query! macros check statements against at compile time (see
# .cargo/config.toml). Runs against a database migrated from migrations/,
# created when missing. Installs sqlx-cli (the version of sqlx in
# Cargo.lock) when it is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/services.sh
export DATABASE_URL="${SQLX_DATABASE_URL:-postgres://postgres@127.0.0.1:5432/leadconv_sqlx}"
if ! cargo sqlx --version >/dev/null 2>&1; then
    cargo install sqlx-cli --version 0.8.6 --no-default-features --features postgres,rustls --locked
fi
# A fresh schema: drop what an earlier run left, create it as `leadconv
# migrate --create-database` does (UTF-8, C.UTF-8), migrate from scratch.
db="${DATABASE_URL##*/}"
admin="${DATABASE_URL%/*}/postgres"
psql -q "$admin" -c "DROP DATABASE IF EXISTS \"$db\" WITH (FORCE)"
psql -q "$admin" -c "CREATE DATABASE \"$db\" TEMPLATE template0 ENCODING 'UTF8' LC_COLLATE 'C.UTF-8' LC_CTYPE 'C.UTF-8'"
cargo sqlx migrate run --source migrations >/dev/null
SQLX_OFFLINE=false cargo sqlx prepare --workspace "$@" -- --all-targets --locked
