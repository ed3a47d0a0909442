# tether: `make demo` runs the reference service, `make test` runs everything.
PY        ?= python3
VENV      := .venv
BIN       := $(VENV)/bin
PIP_FLAGS := --disable-pip-version-check -q
# FastAPI versions the release-point tests run on, besides the latest one in $(VENV); the
# oldest also runs the integration suite, but for the tests that run no FastAPI code
# (marked fastapi_free).
FASTAPI_MATRIX := 0.115 0.120 0.137
# Newer Pythons the whole suite runs on too, besides $(PY) (3.11), where the machine has them.
PYTHON_MATRIX := 3.13
# The short soak (marked soak) runs in the main suite only.
# The integration suite and the metrics exporters' tests also run on the extras' lower bounds
# (pyproject.toml), so they stay true. FastAPI's own floor: its latest releases need a newer
# opentelemetry-api than tether's extra does. They run one test at a time: with tests in
# parallel, asyncpg 0.30 left a ConnectionDoesNotExistError unretrieved in the
# blackholed-network test once in three runs (asyncpg's cancellation was reworked in 0.32;
# once one test at a time too, since tolerated there for asyncpg's own futures only).
# Without that test, three processes still failed 3 runs in 7
# (2026-11-27): a socket of a connect cancelled half-way left to the garbage collector, a
# backend still busy 3 s after a cancelled SQLAlchemy 2.0 unit of work, a Redis cross-talk
# sweep; one test at a time, none has failed. Parallel they would save about 2 minutes.
FLOORS := "asyncpg==0.30.*" "redis==5.0.*" "psycopg[binary,pool]==3.3.6" \
  "sqlalchemy[asyncio]==2.0.57" "aiosqlite==0.20.*" "httpx==0.27.*" "prometheus-client==0.20.*" \
  "fastapi==0.115.*" "opentelemetry-api==1.20.*" "opentelemetry-sdk==1.20.*"

# Test processes per suite (pytest-xdist; each starts its own servers). The suite waits on
# servers, timeouts and clients far more than it computes, so three share two cores well;
# PYTEST_WORKERS=0 runs one test at a time, in one process. A file's tests stay together.
PYTEST_WORKERS ?= 3
XDIST := -n $(PYTEST_WORKERS) --dist loadfile

.PHONY: all demo test lint typecheck pytest matrix pythons floors bench bench-quick soak system-deps clean

all: test

$(BIN)/.installed: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install $(PIP_FLAGS) --upgrade pip
	$(BIN)/pip install $(PIP_FLAGS) -e '.[dev]'
	touch $@

venv: $(BIN)/.installed

system-deps:
	bash scripts/system-deps.sh

# The reference service: the notes API of src/tether/demo.py on its embedded SQLite file,
# served by uvicorn on http://127.0.0.1:$(DEMO_PORT), with tether's dashboard at /tether/
# (`tether demo` is the same command, installed with the package).
DEMO_PORT ?= 8000
DEMO_DB   ?= .demo/notes.db
# It installs the `demo` extra only (FastAPI, aiosqlite, uvicorn), not the whole dev set that
# `make test` needs; a venv `make test` already set up serves it as it is.
demo: $(BIN)/.demo-installed
	$(BIN)/tether demo --port $(DEMO_PORT) --db $(DEMO_DB)

$(BIN)/.demo-installed: pyproject.toml
	@if [ ! -f $(BIN)/.installed ] || [ pyproject.toml -nt $(BIN)/.installed ]; then \
	  set -e; \
	  [ -x $(BIN)/python ] || $(PY) -m venv $(VENV); \
	  echo "$(BIN)/pip install -e '.[demo]'"; \
	  $(BIN)/pip install $(PIP_FLAGS) --upgrade pip; \
	  $(BIN)/pip install $(PIP_FLAGS) -e '.[demo]'; \
	fi
	@touch $@

LINT_DIRS := $(wildcard src tests examples docs bench typing_tests)

lint: $(BIN)/.installed
	$(BIN)/ruff check $(LINT_DIRS)
	$(BIN)/ruff format --check $(LINT_DIRS)

typecheck: $(BIN)/.installed
	$(BIN)/mypy
	$(BIN)/mypy --strict typing_tests

pytest: $(BIN)/.installed system-deps
	$(BIN)/pytest $(XDIST)

matrix: $(BIN)/.installed
	@for v in $(FASTAPI_MATRIX); do \
	  env="$(CURDIR)/.venv-fa$$v"; \
	  if [ ! -f "$$env/.installed" ] || [ pyproject.toml -nt "$$env/.installed" ]; then \
	    $(PY) -m venv "$$env" && \
	    "$$env/bin/pip" install $(PIP_FLAGS) -e '.[dev]' "fastapi==$$v.*" || exit 1; \
	    touch "$$env/.installed"; \
	  fi; \
	  echo "== FastAPI $$v"; \
	  dirs="tests/asgi tests/e2e"; \
	  [ "$$v" = "$(firstword $(FASTAPI_MATRIX))" ] && dirs="$$dirs tests/integration"; \
	  "$$env/bin/pytest" $(XDIST) $$dirs -q -m "not fastapi_free and not soak" || exit 1; \
	done

pythons: $(BIN)/.installed system-deps
	@for v in $(PYTHON_MATRIX); do \
	  py=$$(python$$v -c 'import sys; print(sys.executable)' 2>/dev/null); \
	  [ -n "$$py" ] || py=$$(ls -d $${PYENV_ROOT:-$$HOME/.pyenv}/versions/$$v*/bin/python$$v 2>/dev/null | tail -n 1); \
	  if [ -z "$$py" ]; then echo "== Python $$v: not on this machine, skipped"; continue; fi; \
	  env="$(CURDIR)/.venv-py$$v"; \
	  if [ ! -f "$$env/.installed" ] || [ pyproject.toml -nt "$$env/.installed" ]; then \
	    "$$py" -m venv "$$env" && \
	    "$$env/bin/pip" install $(PIP_FLAGS) -e '.[dev]' || exit 1; \
	    touch "$$env/.installed"; \
	  fi; \
	  echo "== Python $$v"; \
	  "$$env/bin/pytest" $(XDIST) -q -m "not soak" || exit 1; \
	done

floors: $(BIN)/.installed system-deps
	@env="$(CURDIR)/.venv-floors"; \
	if [ ! -f "$$env/.installed" ] || [ pyproject.toml -nt "$$env/.installed" ] \
	    || [ Makefile -nt "$$env/.installed" ]; then \
	  $(PY) -m venv "$$env" && \
	  "$$env/bin/pip" install $(PIP_FLAGS) -e '.[dev]' && \
	  "$$env/bin/pip" install $(PIP_FLAGS) $(FLOORS) || exit 1; \
	  touch "$$env/.installed"; \
	fi; \
	echo "== the extras' lower bounds: $(FLOORS)"; \
	"$$env/bin/pytest" tests/integration tests/asgi/test_prometheus.py \
	  tests/asgi/test_opentelemetry.py -q -m "not soak" || exit 1

test: lint typecheck pytest matrix pythons floors

bench: $(BIN)/.installed system-deps
	$(BIN)/python -m bench.run

bench-quick: $(BIN)/.installed system-deps
	$(BIN)/python -m bench.run --quick

# The soak of reliability.md's test 18: random faults for SOAK_MINUTES (the test suite runs a
# short one, tests/integration/test_soak.py).
SOAK_MINUTES ?= 30
soak: $(BIN)/.installed system-deps
	$(BIN)/python -m tests.soak --minutes $(SOAK_MINUTES) --json .soak.json --log .soak.log

clean:
	rm -rf $(VENV) .venv-fa* .venv-py* .venv-floors .mypy_cache .ruff_cache build dist .demo
