# char-rnn-pipeline: `make run` does the main job, `make test` runs the suite (CI calls it).
SHELL := /bin/bash
export DO_NOT_TRACK := 1
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export BENTOML_DO_NOT_TRACK := True
export CHAR_RNN_HOME ?= $(CURDIR)/.char-rnn
export PREFECT_HOME ?= $(CHAR_RNN_HOME)/prefect
export BENTOML_HOME ?= $(CHAR_RNN_HOME)/bentoml
PYTHON ?= python3
# uv: the one on PATH, else PYTHON's `-m uv`, else one in a venv of its own under CHAR_RNN_HOME (made with
# PYTHON's venv module): pip refuses to install into a system Python ("externally managed", PEP 668), and the
# project's .venv is uv's to prune.
UV_VENV := $(CHAR_RNN_HOME)/uv
UV := $(or $(shell command -v uv),$(shell $(PYTHON) -m uv --version >/dev/null 2>&1 && echo $(PYTHON) -m uv),$(UV_VENV)/bin/uv)

.PHONY: install run test lint bench

install: $(filter $(UV_VENV)/bin/uv,$(UV))
	$(UV) sync --frozen --extra dev --python $(PYTHON)

$(UV_VENV)/bin/uv:
	@echo "uv is not installed: installing it into $(UV_VENV), a venv of its own ($(PYTHON) is left as it is)"
	@$(PYTHON) -m venv --clear $(UV_VENV) || { echo "$(PYTHON) cannot make a venv: install python3-venv \
	(apt-get install python3-venv), or install uv (https://docs.astral.sh/uv/)" >&2; exit 1; }
	$(UV_VENV)/bin/python -m pip install --quiet --disable-pip-version-check --no-cache-dir uv

run: install
	@bash scripts/run.sh

test: install
	@# tests/test_playground.py drives Debian's chromium (Playwright's own browser download is out of reach)
	@test -x /usr/bin/chromium || { echo "installing Debian's chromium for the browser test"; \
		$(if $(filter 0,$(shell id -u)),,sudo) apt-get update -q && \
		$(if $(filter 0,$(shell id -u)),,sudo) apt-get install -y -q chromium; }
	$(UV) run --frozen ruff check .
	$(UV) run --frozen ruff format --check .
	$(UV) run --frozen lint-imports
	$(UV) run --frozen pytest -n 2 --dist loadfile

lint: install
	$(UV) run --frozen ruff check --fix .
	$(UV) run --frozen ruff format .

bench: install
	$(UV) run --frozen python bench/train_speed.py --quick
