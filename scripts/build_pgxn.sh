#!/usr/bin/env bash
# Builds one of our PGXS modules, pgxn/<name>, against PostgreSQL 15: `build_pgxn.sh <name>`.
# The result stays in the source directory, pgxn/<name>/<name>.so, and is loaded by absolute path
# (the WAL-redo helper: shared_preload_libraries=<path>; test helpers: CREATE FUNCTION ... AS
# '<path>'). Idempotent: does nothing when the .so is newer than its sources. Needs
# postgresql-server-dev-15 and a C compiler.
set -euo pipefail
cd "$(dirname "$0")/.."

name=${1:?usage: build_pgxn.sh <module name under pgxn/>}
dir=pgxn/$name
so=$dir/$name.so

log() { printf 'build_pgxn(%s): %s\n' "$name" "$*"; }

[ -d "$dir" ] || { log "no such module directory: $dir" >&2; exit 1; }

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
        \( -name '*.c' -o -name '*.h' -o -name Makefile \) -newer "$so" -print -quit)" ] \
        && [ ! pgxn/pgxs15.mk -nt "$so" ]; then
    exit 0
fi

log "building $so"
make -s --no-print-directory -C "$dir" PG_CONFIG="$PG_CONFIG" WERROR="${WERROR:-0}" >/dev/null
# Backends load it as the unprivileged Postgres user: it must be able to read the library.
chmod 0755 "$so"
log "built $so"
