#!/usr/bin/env bash
# Checks leadconv's Postgres TLS support (deploy/README.md, "TLS") against a
# throw-away local server that accepts TLS connections only (hostssl), with
# a server certificate signed by a throw-away CA:
#   sslmode=require                         connects (certificate not verified)
#   sslmode=verify-full&sslrootcert=CA      connects (verified, host name too)
#   sslmode=verify-full without sslrootcert refused (unknown issuer)
#   sslmode=disable                         refused by the server (no TLS)
# Needs the Debian postgresql package (initdb, pg_ctl), openssl, and root
# (runs the server as the postgres user). CI runs it (.ci/run).
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v openssl >/dev/null; then
    DEBIAN_FRONTEND=noninteractive apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq openssl >/dev/null
fi
PGBIN=/usr/lib/postgresql/$(ls /usr/lib/postgresql | sort -V | tail -1)/bin
PORT=${PORT:-55432}
D=$(mktemp -d)
chown postgres "$D"
as_pg() { su postgres -s /bin/bash -c "$*"; }
cleanup() { as_pg "$PGBIN/pg_ctl -D $D/data -w stop -m immediate" >/dev/null 2>&1 || true; rm -rf "$D"; }
trap cleanup EXIT

as_pg "$PGBIN/initdb -D $D/data -U postgres --auth=trust --encoding=UTF8 --locale=C.UTF-8" >/dev/null
openssl req -new -x509 -days 1 -nodes -subj "/CN=leadconv test CA" -keyout "$D/ca.key" -out "$D/ca.crt" 2>/dev/null
openssl req -new -nodes -subj "/CN=localhost" -keyout "$D/data/server.key" -out "$D/server.csr" 2>/dev/null
printf 'subjectAltName=DNS:localhost,IP:127.0.0.1\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n' > "$D/ext.cnf"
openssl x509 -req -in "$D/server.csr" -CA "$D/ca.crt" -CAkey "$D/ca.key" -CAcreateserial -days 1 \
    -extfile "$D/ext.cnf" -out "$D/data/server.crt" 2>/dev/null
chown postgres "$D/data/server.key" "$D/data/server.crt"
chmod 600 "$D/data/server.key"
cat >> "$D/data/postgresql.conf" <<EOF
ssl = on
port = $PORT
listen_addresses = '127.0.0.1'
unix_socket_directories = '$D'
EOF
printf 'local all all trust\nhostssl all all 127.0.0.1/32 trust\n' > "$D/data/pg_hba.conf"
as_pg "$PGBIN/pg_ctl -D $D/data -l $D/log -w start" >/dev/null

cargo build --locked --quiet --bin leadconv
BIN=./target/debug/leadconv
DB=leadconv_tls
fail=0
expect() { # ok|refused url
    local want=$1 url=$2 got
    if DATABASE_URL="$url" $BIN migrate --create-database >"$D/out" 2>&1; then got=ok; else got=refused; fi
    if [ "$got" = "$want" ]; then echo "ok    $want: $url"; else echo "FAIL  expected $want, got $got: $url"; cat "$D/out"; fail=1; fi
}
expect ok      "postgres://postgres@127.0.0.1:$PORT/$DB?sslmode=require"
expect ok      "postgres://postgres@localhost:$PORT/$DB?sslmode=verify-full&sslrootcert=$D/ca.crt"
expect refused "postgres://postgres@localhost:$PORT/$DB?sslmode=verify-full"
expect refused "postgres://postgres@127.0.0.1:$PORT/$DB?sslmode=disable"
exit $fail
