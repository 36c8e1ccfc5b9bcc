"""Neon's regression scenarios (`test_runner/regress/`), ported onto `tests/fixtures/neon_fixtures.py`."""
