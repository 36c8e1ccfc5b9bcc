#!/usr/bin/env bash
# Lays out pg_install/v<major>/{bin,lib,include} from Debian's postgresql-<major> packages, the
# directory every component takes as pg_distrib_dir. Pins the major version; any minor works.
set -euo pipefail
cd "$(dirname "$0")/../.."
major="${1:-15}"
src=/usr/lib/postgresql/$major
inc=/usr/include/postgresql/$major/server
if [ ! -x "$src/bin/postgres" ]; then
    echo "layout: $src/bin/postgres not found: install postgresql-$major" >&2
    exit 1
fi
dst=pg_install/v$major
mkdir -p "$dst/include/postgresql"
ln -sfn "$src/bin" "$dst/bin"
ln -sfn "$src/lib" "$dst/lib"
if [ -d "$inc" ]; then
    ln -sfn "$inc" "$dst/include/postgresql/server"
fi
version=$("$dst/bin/postgres" --version)
case "$version" in
    *" $major."*) ;;
    *) echo "layout: expected PostgreSQL $major, found: $version" >&2; exit 1 ;;
esac
echo "$version" > "$dst/VERSION"
