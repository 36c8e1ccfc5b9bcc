VENV := .venv
PY := $(VENV)/bin/python
PYTEST_ARGS ?=

.PHONY: setup test lint bench clean

setup:
	bash scripts/setup.sh

test: setup
	$(PY) -m pytest $(PYTEST_ARGS)

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

bench: setup
	$(PY) benchmarks/wal_decode.py
	$(PY) benchmarks/walredo.py
	$(PY) benchmarks/ingest.py
	$(PY) benchmarks/getpage_local.py
	$(PY) benchmarks/pagestream.py

clean:
	rm -rf $(VENV) pg_install build native/_build
