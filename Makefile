# One venv, pinned packages, local infrastructure started by the project itself.
# `make test` and `make demo` work from a fresh clone; see README.md.

PY_BOOT  ?= python3.11
VENV     := .venv
PY       := $(VENV)/bin/python
STAMP    := $(VENV)/.installed
export PYTHONPATH := $(CURDIR)

.PHONY: setup native up down status demo test test-unit test-integration check fmt docs bench schemas clean

$(STAMP): requirements.lock pyproject.toml
	@test -x $(PY) || $(PY_BOOT) -m venv $(VENV)
	@$(PY) -m pip install -q --disable-pip-version-check uv==0.13.9
	@# Bytecode compiled once here: with PYTHONDONTWRITEBYTECODE set (as on our CI machines)
	@# nothing is cached on import, and every process start compiled its libraries again.
	@$(VENV)/bin/uv pip install -q --python $(PY) --compile-bytecode -r requirements.lock
	@$(VENV)/bin/uv pip install -q --python $(PY) --no-deps -e .
	@touch $(STAMP)

setup: $(STAMP) native ## venv + pinned packages + the compiled cores

native: $(STAMP) ## compile the pure cores with mypyc (skipped, with a message, without a C compiler)
	@$(PY) -m deploy.native

up: setup ## start broker, Postgres and the three services in the background
	@$(PY) -m deploy.stack up

down: setup ## stop everything (Postgres data is kept in .run/pgdata)
	@$(PY) -m deploy.stack down

status: setup
	@$(PY) -m deploy.stack status

demo: setup ## a scripted week of a two-store clinic, end to end
	@$(PY) -m deploy.demo

# The tests that run the modules `make native` compiles, run again on the plain Python ones.
NATIVE_TESTS := tests/unit/test_rules_*.py tests/unit/test_native.py
# The integration tests mostly wait on processes they started, so pytest-xdist workers
# cut the suite's time even on two cores: three took 8 min 59 s where two took 10 min 51 s
# (216 tests); the Apache Kafka tests stay on one worker (one JVM). TEST_WORKERS=0: one
# process.
TEST_WORKERS ?= 3
INTEGRATION := $(PY) -m pytest -q -m integration -n $(TEST_WORKERS) tests/integration

test: setup ## the whole suite: unit (compiled cores, their tests again in pure Python), integration on both brokers
	@$(PY) -m pytest -q tests/unit
	@LOYALTY_NATIVE=0 $(PY) -m pytest -q $(NATIVE_TESTS)
	@$(INTEGRATION)

test-unit: setup
	@$(PY) -m pytest -q tests/unit
	@LOYALTY_NATIVE=0 $(PY) -m pytest -q $(NATIVE_TESTS)

test-integration: setup
	@$(INTEGRATION)

check: setup ## ruff (lint + format) and mypy (strict on the pure cores)
	@$(VENV)/bin/ruff check .
	@$(VENV)/bin/ruff format --check .
	@$(VENV)/bin/mypy

fmt: setup
	@$(VENV)/bin/ruff check --fix .
	@$(VENV)/bin/ruff format .

schemas: setup ## regenerate schemas/json from the pydantic models
	@$(PY) -m schemas.generate

docs: setup ## AsyncAPI documents of each service into docs/asyncapi/
	@$(PY) -m deploy.asyncapi

bench: setup ## benchmarks (never part of make test); BENCH_QUICK=1 for a short run
	@command -v wrk >/dev/null || (apt-get update -qq && apt-get install -y -qq wrk >/dev/null) \
		|| echo "bench: wrk could not be installed; the read benchmark will be skipped"
	@$(PY) -m bench.run

clean:
	rm -rf .run .pytest_cache .mypy_cache .ruff_cache
