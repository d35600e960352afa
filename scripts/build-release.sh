#!/usr/bin/env bash
# The release build of the `leadconv` binary: the one cargo command that both
# CI (.ci/run) and the container image (Dockerfile) run, so a change that
# breaks the image build breaks CI too. Needs no database: queries are
# checked at run time and migrations are embedded by `sqlx::migrate!`.
# Extra arguments go to cargo (e.g. --quiet).
set -euo pipefail
cd "$(dirname "$0")/.."
exec cargo build --locked --release --bin leadconv "$@"
