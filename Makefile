# char-rnn-pipeline: `make run` does the main job, `make test` runs the suite (CI calls it).
SHELL := /bin/bash
export DO_NOT_TRACK := 1
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export BENTOML_DO_NOT_TRACK := True
export CHAR_RNN_HOME ?= $(CURDIR)/.char-rnn
export PREFECT_HOME ?= $(CHAR_RNN_HOME)/prefect
export BENTOML_HOME ?= $(CHAR_RNN_HOME)/bentoml
PYTHON ?= python3
UV := $(PYTHON) -m uv

.PHONY: install run test lint bench

install:
	@$(UV) --version >/dev/null 2>&1 || $(PYTHON) -m pip install --quiet uv
	$(UV) sync --frozen --extra dev

run: install
	bash scripts/run.sh

test: install
	@# tests/test_playground.py drives Debian's chromium (Playwright's own browser download is out of reach)
	@test -x /usr/bin/chromium || { echo "installing Debian's chromium for the browser test"; \
		$(if $(filter 0,$(shell id -u)),,sudo) apt-get update -q && \
		$(if $(filter 0,$(shell id -u)),,sudo) apt-get install -y -q chromium; }
	$(UV) run --frozen ruff check .
	$(UV) run --frozen ruff format --check .
	$(UV) run --frozen pytest

lint: install
	$(UV) run --frozen ruff check --fix .
	$(UV) run --frozen ruff format .

bench: install
	$(UV) run --frozen python bench/train_speed.py --quick
