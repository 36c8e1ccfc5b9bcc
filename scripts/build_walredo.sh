#!/usr/bin/env bash
# Builds the WAL-redo helper extension, pgxn/neon_walredo/neon_walredo.so (see build_pgxn.sh).
exec bash "$(dirname "$0")/build_pgxn.sh" neon_walredo
