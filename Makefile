VENV := .venv
PY := $(VENV)/bin/python
PYTEST_ARGS ?=

.PHONY: setup run stop test lint bench clean

setup:
	bash scripts/setup.sh

run: setup
	bash scripts/run.sh

stop:
	NEON_REPO_DIR=$${NEON_REPO_DIR:-$(CURDIR)/.neon} $(PY) -m neon.control_plane stop

# Three workers: most tests wait on processes, fsyncs and sockets rather than on the two cores.
PYTEST_WORKERS ?= 3

test: setup
	$(PY) -m pytest -n $(PYTEST_WORKERS) --dist worksteal $(PYTEST_ARGS)

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
