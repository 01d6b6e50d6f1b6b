# kmsg-worker — common tasks. `make demo` and `make test` work on a fresh machine (they install first).
PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin
QUEUES  = kmsg.priority,kmsg.send,kmsg.bulk,kmsg.poll,kmsg.maintenance,kmsg.webhooks
STAMP   = $(VENV)/.installed

.PHONY: install lock demo test test-fast lint format typecheck all worker beat flower metrics doctor report bench bench-long migrate fake-providers clean

# Dependencies come from the lock file only (exact versions, the same on every machine, in CI and in
# the image); the project itself is installed on top of them without resolving anything again.
$(STAMP): pyproject.toml requirements/dev.lock
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -r requirements/dev.lock
	$(BIN)/python -m pip install --quiet --no-deps -e .
	$(BIN)/python -m pip check
	touch $(STAMP)

install: $(STAMP)

UV_COMPILE = $(BIN)/uv pip compile pyproject.toml --python-version 3.11 --universal --custom-compile-command "make lock" --quiet

lock: install  ## re-resolve requirements/*.lock after changing pyproject.toml's dependencies (uv)
	$(UV_COMPILE) -o requirements/main.lock
	$(UV_COMPILE) --extra dev -o requirements/dev.lock

demo: install  ## worker + beat on the embedded SQLite broker and database, a demo batch, a final table
	$(BIN)/kmsg demo

test: install  ## the whole suite (needs PostgreSQL and Redis on 127.0.0.1; CI=true fails if they are down)
	$(BIN)/python -m pytest -q

test-fast: install
	$(BIN)/python -m pytest -q -m "not slow and not e2e"

lint: install  ## ruff, and import-linter's layer and no-cycle contracts (pyproject.toml [tool.importlinter])
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/lint-imports --no-cache --no-logo

format: install
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

typecheck: install
	$(BIN)/mypy

all: lint typecheck test

worker: install
	$(BIN)/celery -A config.celery worker -Q $(QUEUES) --loglevel=INFO

beat: install
	$(BIN)/celery -A config.celery beat --schedule var/celerybeat-schedule --loglevel=INFO

flower: install
	$(BIN)/celery -A config.celery flower --port=5555 --address=127.0.0.1

metrics: install  ## Prometheus /metrics of every worker on this host + queue/backlog gauges (docs/OPERATIONS.md)
	$(BIN)/kmsg metrics-server --port 9808

doctor: install  ## broker, database, migrations, beat, consumption, provider probes, clock; exit 1 on failure
	$(BIN)/kmsg doctor

report: install  ## last 24 h by provider and type: delivery rate, p50/p95, failovers, errors, cost; HTML chart
	$(BIN)/kmsg report

migrate: install
	$(BIN)/kmsg migrate

fake-providers: install
	$(BIN)/kmsg fake-providers --port 18080

bench: install  ## throughput and latency against the fake providers, ratios vs a naive baseline
	$(BIN)/python -m bench.run

bench-long: install
	$(BIN)/python -m bench.run --long

clean:
	rm -rf var .pytest_cache .mypy_cache .ruff_cache
