# Two commands do all the set-up on a fresh machine:  `make test`  and  `make run`.
VENV ?= .venv
PY := $(VENV)/bin/python
LORAQA := $(VENV)/bin/loraqa
export LORAQA_CACHE ?= $(CURDIR)/data

.PHONY: install fetch test test-all run bench grid

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# torch first, pinned: the CPU wheel here (a bare `torch` would pull a multi-GB CUDA build)
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e ".[test,bench]"
	touch $@

install: $(VENV)/.installed

fetch: install
	$(LORAQA) fetch

test: fetch
	$(PY) -m pytest -q

test-all: fetch
	$(PY) -m pytest -q -m ""

# The main job: fine-tune on a small budget (~20 min on 2 CPU cores), then baseline vs fine-tuned EM/F1.
run: fetch
	$(LORAQA) run

bench: fetch
	$(LORAQA) bench --model smollm2-135m --train_examples 64 --eval_examples 64 --output results/bench.json

grid: fetch
	$(LORAQA) evaluate --model smollm2-135m --max_samples 500 --strategy_grid true --output results/strategies_baseline.json
