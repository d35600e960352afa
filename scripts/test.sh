#!/usr/bin/env bash
# The whole test suite: unit tests and integration tests against the real
# Postgres and RabbitMQ (started or installed first if missing), and the
# OpenAPI fuzzer (schemathesis, from PyPI, installed first if missing), and
# the console in a real browser (Debian's chromium and chromium-driver, with
# a CJK font, installed first if missing).
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/services.sh
SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
apt_install() {
    $SUDO env DEBIAN_FRONTEND=noninteractive apt-get update -qq
    $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
}
if ! command -v chromedriver >/dev/null 2>&1 || ! command -v chromium >/dev/null 2>&1 \
    || ! fc-list 2>/dev/null | grep -qi "noto.*cjk"; then
    echo "[test] installing chromium, chromium-driver and fonts-noto-cjk from Debian's packages (tests/console_browser.rs)" >&2
    apt_install chromium chromium-driver fonts-noto-cjk
fi
if ! command -v schemathesis >/dev/null 2>&1; then
    # A machine with only Rust: Python and pip from Debian's packages first.
    if ! python3 -m pip --version >/dev/null 2>&1; then
        echo "[test] installing python3-pip from Debian's packages" >&2
        apt_install python3-pip
    fi
    echo "[test] installing schemathesis from PyPI (the API fuzzer of tests/fuzz.rs)" >&2
    python3 -m pip install --quiet --disable-pip-version-check "schemathesis==4.32.5" \
        || python3 -m pip install --quiet --disable-pip-version-check --user "schemathesis==4.32.5" \
        || python3 -m pip install --quiet --disable-pip-version-check --break-system-packages "schemathesis==4.32.5"
fi
cargo test --locked --workspace --all-targets "$@"
