# char-rnn-pipeline: `make run` does the main job, `make test` runs the suite (CI calls it).
SHELL := /bin/bash
export DO_NOT_TRACK := 1
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export BENTOML_DO_NOT_TRACK := True
export CHAR_RNN_HOME ?= $(CURDIR)/.char-rnn
export PREFECT_HOME ?= $(CHAR_RNN_HOME)/prefect
export BENTOML_HOME ?= $(CHAR_RNN_HOME)/bentoml
UV := $(shell command -v uv 2>/dev/null || echo "$(HOME)/.local/bin/uv")

.PHONY: install test lint bench

$(UV):
	python3 -m pip install --quiet --user uv || python3 -m pip install --quiet uv

install: $(UV)
	$(UV) sync --frozen --extra dev

test: install
	$(UV) run ruff check .
	$(UV) run ruff format --check .
	$(UV) run pytest

lint: install
	$(UV) run ruff check --fix .
	$(UV) run ruff format .

bench: install
	$(UV) run python bench/train_speed.py --quick
