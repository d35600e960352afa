#!/usr/bin/env bash
# Checks leadconv's RabbitMQ TLS support (deploy/README.md, "TLS") against a
# throw-away local RabbitMQ node that listens on TLS only, with a server
# certificate signed by a throw-away CA:
#   amqps:// with the CA as SSL_CERT_FILE   a whole demo job runs through it
#   amqps:// without the CA                 refused (unknown issuer)
#   amqp:// (no TLS) to the TLS port        refused
# Needs the Debian rabbitmq-server package, openssl, root (the node runs as
# the rabbitmq user) and the local Postgres. CI runs it (.ci/run).
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v openssl >/dev/null; then
    DEBIAN_FRONTEND=noninteractive apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq openssl >/dev/null
fi
PORT=${PORT:-55671}
NODE=leadconv_tls_$$@localhost
D=$(mktemp -d)
chmod 755 "$D"
cleanup() {
    # As the node's own user, whose Erlang cookie the node has.
    # Given the pid file, stop waits until the node process has exited.
    su rabbitmq -s /bin/bash -c "rabbitmqctl -q -n $NODE stop $D/pid" >/dev/null 2>&1 \
        || { [ -f "$D/pid" ] && kill "$(cat "$D/pid")"; } || true
    rm -rf "$D"
}
trap cleanup EXIT

openssl req -new -x509 -days 1 -nodes -subj "/CN=leadconv test CA" -keyout "$D/ca.key" -out "$D/ca.crt" 2>/dev/null
openssl req -new -nodes -subj "/CN=localhost" -keyout "$D/server.key" -out "$D/server.csr" 2>/dev/null
printf 'subjectAltName=DNS:localhost,IP:127.0.0.1\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n' > "$D/ext.cnf"
openssl x509 -req -in "$D/server.csr" -CA "$D/ca.crt" -CAkey "$D/ca.key" -CAcreateserial -days 1 \
    -extfile "$D/ext.cnf" -out "$D/server.crt" 2>/dev/null
cat > "$D/rabbitmq.conf" <<EOF
listeners.tcp = none
listeners.ssl.default = 127.0.0.1:$PORT
ssl_options.cacertfile = $D/ca.crt
ssl_options.certfile = $D/server.crt
ssl_options.keyfile = $D/server.key
ssl_options.verify = verify_none
ssl_options.fail_if_no_peer_cert = false
EOF
echo '[].' > "$D/enabled_plugins"   # no management listener to clash with the main node's
mkdir -p "$D/mnesia" "$D/log"
chown -R rabbitmq "$D"

# Environment variables take precedence over /etc/rabbitmq/rabbitmq-env.conf.
su rabbitmq -s /bin/bash -c "RABBITMQ_NODENAME=$NODE RABBITMQ_NODE_PORT=$PORT RABBITMQ_DIST_PORT=$((PORT + 2)) \
    RABBITMQ_CONFIG_FILE=$D/rabbitmq.conf RABBITMQ_ENABLED_PLUGINS_FILE=$D/enabled_plugins \
    RABBITMQ_MNESIA_BASE=$D/mnesia RABBITMQ_LOG_BASE=$D/log RABBITMQ_PID_FILE=$D/pid \
    rabbitmq-server -detached"
for _ in $(seq 1 120); do
    if timeout 1 bash -c "</dev/tcp/127.0.0.1/$PORT" 2>/dev/null; then break; fi
    sleep 0.5
done
timeout 1 bash -c "</dev/tcp/127.0.0.1/$PORT" || { echo "the TLS node did not start"; cat "$D"/log/*.log; exit 1; }

cargo build --locked --quiet -p leadconv-dev --bin leadconv-dev
BIN=./target/debug/leadconv-dev
export DATABASE_URL="${DATABASE_URL:-postgres://postgres@127.0.0.1:5432/leadconv_tls_check}"
fail=0
expect() { # ok|refused url [env...]
    local want=$1 url=$2 got
    shift 2
    if timeout 120 env "$@" AMQP_URL="$url" LEADCONV_QUEUE_PREFIX=leadconv_tls "$BIN" demo --leads 20 --concurrency 2 \
        >"$D/out" 2>&1; then got=ok; else got=refused; fi
    if [ "$got" = "$want" ]; then echo "ok    $want: $url $* ($(tail -1 "$D/out" | cut -c1-160))"; else
        echo "FAIL  expected $want, got $got: $url $*"; cat "$D/out"; fail=1; fi
}
expect ok      "amqps://guest:guest@localhost:$PORT/%2f" SSL_CERT_FILE="$D/ca.crt"
expect refused "amqps://guest:guest@localhost:$PORT/%2f"
expect refused "amqp://guest:guest@localhost:$PORT/%2f"
exit $fail
