#!/usr/bin/env bash
# Builds the WAL-redo helper extension (pgxn/neon_walredo) with PGXS. The result stays in the
# source directory, pgxn/neon_walredo/neon_walredo.so, and is loaded by absolute path
# (postgres --single -c shared_preload_libraries=<abs path>). Idempotent: does nothing when the
# .so is newer than its sources. Needs postgresql-server-dev-15 and a C compiler.
set -euo pipefail
cd "$(dirname "$0")/.."

dir=pgxn/neon_walredo
so=$dir/neon_walredo.so

log() { printf 'build_walredo: %s\n' "$*"; }

if [ -z "${PG_CONFIG:-}" ]; then
    for candidate in pg_install/v15/bin/pg_config /usr/lib/postgresql/15/bin/pg_config; do
        if [ -x "$candidate" ]; then PG_CONFIG=$candidate; break; fi
    done
    PG_CONFIG=${PG_CONFIG:-pg_config}
fi
case "$PG_CONFIG" in
    /*) ;;
    */*) PG_CONFIG=$PWD/$PG_CONFIG ;;  # make runs in $dir: make relative paths absolute
esac
if ! "$PG_CONFIG" --pgxs >/dev/null 2>&1; then
    log "$PG_CONFIG does not work: install postgresql-server-dev-15 (make setup)" >&2
    exit 1
fi

if [ -f "$so" ] && [ -z "$(find "$dir" -maxdepth 1 -type f \
        \( -name '*.c' -o -name '*.h' -o -name Makefile \) -newer "$so" -print -quit)" ]; then
    exit 0
fi

log "building $so"
make -s --no-print-directory -C "$dir" PG_CONFIG="$PG_CONFIG" WERROR="${WERROR:-0}" >/dev/null
# The helper runs as the unprivileged Postgres user: it must be able to read the library.
chmod 0755 "$so"
log "built $so"
