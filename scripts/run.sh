#!/usr/bin/env bash
# `make run`: set up (make setup ran first), then bring the whole system up locally with
# neon_local: a broker, a pageserver and three safekeepers under .neon/ (local disk only), the
# default tenant, and the endpoint `main`; print how to connect. Idempotent: a second run starts
# what is stopped and leaves what runs. `make stop` stops it all.
set -euo pipefail
cd "$(dirname "$0")/.."
export NEON_REPO_DIR="${NEON_REPO_DIR:-$PWD/.neon}"
nl() { .venv/bin/python -m neon.control_plane "$@"; }
# Start a service unless it already runs (neon_local refuses to start a running one).
ensure() {
    local out
    if out=$(nl "$@" 2>&1); then
        echo "$out"
    elif grep -q "already running" <<<"$out"; then
        echo "$* : already running"
    else
        echo "$out" >&2
        return 1
    fi
}

if [ ! -f "$NEON_REPO_DIR/config" ]; then
    nl init --config "${NEON_LOCAL_CONFIG:-deploy/neon_local.toml}"
fi
ensure storage_broker start
ensure pageserver start
for id in $(.venv/bin/python -c 'import sys, tomllib; print(*(s["id"] for s in tomllib.load(open(sys.argv[1], "rb"))["safekeepers"]))' "$NEON_REPO_DIR/config"); do
    ensure safekeeper start "$id"
done
if ! grep -q '^default_tenant_id' "$NEON_REPO_DIR/config"; then
    nl tenant create --set-default
fi
if ! nl endpoint list | awk 'NR > 1 {print $1}' | grep -qx main; then
    nl endpoint create main
fi
if ! nl endpoint list | awk '$1 == "main"' | grep -q running; then
    nl endpoint start main
fi
port=$(nl endpoint list | awk '$1 == "main" {split($2, a, ":"); print a[2]}')
echo
echo "ready: psql -h 127.0.0.1 -p $port -U cloud_admin postgres"
echo "       (postgresql://cloud_admin@127.0.0.1:$port/postgres; NEON_REPO_DIR=$NEON_REPO_DIR)"
echo "       .venv/bin/neon_local --help for branches and endpoints; make stop to stop everything"
