#!/usr/bin/env bash
# Makes sure Postgres (127.0.0.1:5432, trust auth for local TCP) and RabbitMQ
# (127.0.0.1:5672, guest/guest) are running: starts them when installed,
# installs them from Debian's packages when not. Idempotent.
set -euo pipefail

log() { printf '[services] %s\n' "$*" >&2; }

SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

wait_port() { # port seconds name
    local deadline=$((SECONDS + $2))
    until port_open "$1"; do
        if [ $SECONDS -ge $deadline ]; then log "$3 did not open port $1 within $2 s"; return 1; fi
        sleep 0.5
    done
}

apt_install() {
    log "installing $* from Debian's packages"
    $SUDO env DEBIAN_FRONTEND=noninteractive apt-get update -qq
    $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
}

ensure_postgres() {
    if port_open 5432; then return; fi
    local fresh=0
    if ! ls /etc/postgresql/*/main/postgresql.conf >/dev/null 2>&1; then
        apt_install postgresql
        fresh=1
    fi
    local version
    version=$(ls /etc/postgresql | sort -V | tail -1)
    if [ $fresh -eq 1 ]; then
        # A fresh Debian cluster asks for passwords on TCP; this development
        # setup trusts local TCP connections, like the machines we test on.
        local hba="/etc/postgresql/$version/main/pg_hba.conf"
        $SUDO sed -i '1i host all all 127.0.0.1/32 trust\nhost all all ::1/128 trust' "$hba"
    fi
    log "starting PostgreSQL $version"
    $SUDO pg_ctlcluster --skip-systemctl-redirect "$version" main start || true
    wait_port 5432 60 PostgreSQL
}

ensure_rabbitmq() {
    if port_open 5672; then return; fi
    if ! command -v rabbitmq-server >/dev/null 2>&1 && [ ! -x /usr/sbin/rabbitmq-server ]; then
        apt_install rabbitmq-server
    fi
    log "starting RabbitMQ"
    $SUDO env PATH="$PATH:/usr/sbin" rabbitmq-server -detached || true
    wait_port 5672 120 RabbitMQ
}

ensure_postgres
ensure_rabbitmq
log "PostgreSQL and RabbitMQ are up"
