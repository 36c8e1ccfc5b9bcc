#!/usr/bin/env bash
# Builds the regression tests' SQL helpers, pgxn/neon_test_utils/neon_test_utils.so (see
# build_pgxn.sh); tests/fixtures/neon_test_utils.py creates the functions from it by path.
exec bash "$(dirname "$0")/build_pgxn.sh" neon_test_utils
