#!/usr/bin/env bash
# The whole test suite: unit tests and integration tests against the real
# Postgres and RabbitMQ (started or installed first if missing), and the
# OpenAPI fuzzer (schemathesis, from PyPI, installed first if missing).
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/services.sh
if ! command -v schemathesis >/dev/null 2>&1; then
    echo "[test] installing schemathesis from PyPI (the API fuzzer of tests/fuzz.rs)" >&2
    python3 -m pip install --quiet --disable-pip-version-check "schemathesis==4.32.5" \
        || python3 -m pip install --quiet --disable-pip-version-check --user "schemathesis==4.32.5" \
        || python3 -m pip install --quiet --disable-pip-version-check --break-system-packages "schemathesis==4.32.5"
fi
cargo test --locked --workspace --all-targets "$@"
