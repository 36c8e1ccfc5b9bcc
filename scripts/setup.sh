#!/usr/bin/env bash
# One-shot, idempotent machine set-up for a fresh Debian 12: system packages, the unprivileged
# Postgres user, the Python virtualenv and the pg_install/ layout. Safe to re-run.
set -euo pipefail
cd "$(dirname "$0")/.."

PG_MAJOR=15
PG_USER="${NEON_PG_USER:-neon}"
PACKAGES=(postgresql-$PG_MAJOR postgresql-client-$PG_MAJOR postgresql-server-dev-$PG_MAJOR
          build-essential python3-venv python3-dev libffi-dev)

log() { printf 'setup: %s\n' "$*"; }

missing=()
for p in "${PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done

if [ "$(id -u)" = 0 ]; then
    if [ ${#missing[@]} -gt 0 ]; then
        log "installing ${missing[*]}"
        # Debian would otherwise create and start a 'main' cluster we never use.
        mkdir -p /etc/postgresql-common
        if [ ! -f /etc/postgresql-common/createcluster.conf ] || \
           ! grep -q '^create_main_cluster' /etc/postgresql-common/createcluster.conf; then
            echo 'create_main_cluster = false' >> /etc/postgresql-common/createcluster.conf
        fi
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -qq
        apt-get install -y -qq --no-install-recommends "${missing[@]}"
    fi
    if ! id -u "$PG_USER" >/dev/null 2>&1; then
        log "creating unprivileged user $PG_USER for running Postgres"
        useradd --system --user-group --home-dir /nonexistent --no-create-home \
                --shell /usr/sbin/nologin "$PG_USER"
    fi
elif [ ${#missing[@]} -gt 0 ]; then
    log "missing packages: ${missing[*]} (run 'make setup' as root, or install them)" >&2
    exit 1
fi

bash vendor/postgres/layout.sh "$PG_MAJOR"
bash scripts/build_walredo.sh
bash scripts/build_test_utils.sh  # SQL helpers the regression tests load by path

# The virtualenv is rebuilt only when pyproject.toml changes.
stamp=.venv/.installed-$(sha256sum pyproject.toml | cut -c1-16)
if [ ! -f "$stamp" ]; then
    log "creating .venv"
    python3 -m venv .venv
    .venv/bin/pip install -q --upgrade pip
    .venv/bin/pip install -q -e '.[dev]'
    rm -f .venv/.installed-*
    touch "$stamp"
fi

# Native hot paths (cffi); rebuilt when their sources change.
if [ -f native/build.py ]; then
    .venv/bin/python native/build.py
fi
.venv/bin/python -m neon.broker.build_proto  # broker gRPC modules; regenerated when proto/broker.proto changes
log "ready"
