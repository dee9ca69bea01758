# Two commands do all the set-up on a fresh machine:  `make test`  and  `make run`.
VENV ?= .venv
PY := $(VENV)/bin/python
LORAQA := $(VENV)/bin/loraqa
export LORAQA_CACHE ?= $(CURDIR)/data

.PHONY: install fetch test screenshots run bench results study collect report browser-test slurm-test gpu-check decoding-full-dev decoding-speed

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# torch first, pinned: the CPU wheel here (a bare `torch` would pull a multi-GB CUDA build)
	$(PY) -m pip install --quiet torch==2.13.0
	# the versions the results were made with (requirements.txt) as constraints: a fresh machine gets the same ones
	$(PY) -m pip install --quiet -c requirements.txt -e ".[test,bench,report,demo,slurm]"
	touch $@

install: $(VENV)/.installed

fetch: install
	$(LORAQA) fetch

test: fetch
	$(PY) -m pytest -q -rs

# The demo's browser test (issue 15): Debian's chromium + chromium-driver when apt-get can install them (root),
# gradio + selenium (the extra `demo`), then `loraqa demo` driven in headless Chromium.
browser-test: fetch
	command -v chromedriver >/dev/null || (apt-get update -qq && apt-get install -y chromium chromium-driver) || \
		echo "chromium/chromium-driver not installed: the browser test will be skipped"
	$(PY) -c "import gradio, selenium" 2>/dev/null || $(PY) -m pip install --quiet -e ".[demo]"
	$(PY) -m pytest -q -rs tests/test_demo.py

# The sweep's Slurm executor on a real scheduler (issue 26): Debian's slurm-wlm + munge as a one-node cluster on
# 127.0.0.1, a 2-run tiny sweep submitted through submitit, one job requeued mid-run (it resumes from its
# checkpoint), --collect compared with the local executor's; the daemons are stopped at the end. Needs root.
slurm-test: fetch
	PY=$(PY) scripts/slurm_test.sh

# The main job: fine-tune within a 12-minute training budget, then baseline vs fine-tuned EM/F1.
run: fetch
	$(LORAQA) run

bench: fetch
	$(LORAQA) bench --model smollm2-135m --train_examples 64 --eval_examples 64 --output results/bench.json

# Issue-4 numbers after `make run`: baseline and fine-tuned on a fixed 500-question dev subset, their paired
# comparison, failure categories, and the decoding-strategy grid (3 seeds per sampled strategy).
RUN ?= runs/main
results: fetch
	$(LORAQA) evaluate --model smollm2-135m --max_samples 500 --output results/eval_baseline_500.json
	$(LORAQA) evaluate --model smollm2-135m --adapter $(RUN) --max_samples 500 --output results/eval_finetuned_500.json
	$(LORAQA) compare results/eval_baseline_500.json results/eval_finetuned_500.json --output results/compare_500.json
	$(LORAQA) failures results/eval_finetuned_500.json --output results/failures_finetuned_500.md
	$(LORAQA) evaluate --model smollm2-135m --adapter $(RUN) --max_samples 500 --strategy_grid true \
		--grid_seeds 3 --output results/strategies_finetuned_500.json
	$(LORAQA) evaluate --model smollm2-135m --adapter $(RUN) --max_samples 500 --dtype bfloat16 \
		--output results/eval_finetuned_500_bf16.json
	$(LORAQA) compare results/eval_finetuned_500.json results/eval_finetuned_500_bf16.json \
		--output results/compare_fp32_bf16_500.json

# The demo's screenshots for the README (issue 15): both tabs in headless Chromium, on the final model once it exists
ADAPTER ?= $(firstword $(wildcard results/model_checkpoints/final results/model_checkpoints/grid_best))
screenshots: fetch
	$(PY) scripts/demo_screenshots.py --adapter $(ADAPTER) --output_dir results/plots

# The study (issue 13), resumable: every run of experiments/study.yaml (the final model right after the grid), its tables and this
# README's table, the final adapter exported, the decoding-strategy grid on it, the plots and the report.
study: fetch
	$(LORAQA) sweep experiments/study.yaml --output_dir results/sweep
	$(MAKE) collect

# What `study` builds from the run directories that exist, without running any: for a sweep stopped part-way.
collect: fetch
	$(LORAQA) sweep experiments/study.yaml --output_dir results/sweep --collect results/evaluation_results.json \
		--readme README.md --checkpoints results/model_checkpoints
	test ! -f results/model_checkpoints/final/adapter_model.safetensors || $(MAKE) results/strategies_final_500.json
	# failure categories and the report's examples of each: the final model's over all of dev once it exists,
	# before that the complete grid's selection on the test subset (the demo's Errors tab opens the same file)
	eval=$$($(PY) -c "from loraqa.study.collect import final_evaluations; print(final_evaluations()[0])"); \
		test "$$eval" = results/eval_finetuned_500.json || \
		$(LORAQA) failures $$eval --output results/failures_study.md --report_json results/failure_examples.json
	$(LORAQA) plots --results results/evaluation_results.json --output_dir results/plots \
		--strategies $$(ls results/strategies_final_500.json 2>/dev/null || echo results/strategies_finetuned_500.json) \
		--padding results/padding_study.json --cost results/cost_study.json
	$(MAKE) report

results/strategies_final_500.json: results/model_checkpoints/final/adapter_model.safetensors
	$(LORAQA) evaluate --model smollm2-135m --adapter results/model_checkpoints/final --max_samples 500 \
		--strategy_grid true --grid_seeds 3 --output $@

# The best span-aware decoding of the final model's grid (within the context's spans, or beams) on all of dev,
# paired against the same model's greedy answers there (issue 28 section 5)
decoding-full-dev: results/strategies_final_500.json
	flags=$$($(PY) -c "import json; from loraqa.evaluation.evaluate import best_span_strategy, strategy_flags; \
		print(' '.join(strategy_flags(best_span_strategy(json.load(open('$<')))['generation'])))"); \
	$(LORAQA) evaluate --model smollm2-135m --adapter results/model_checkpoints/final --max_samples 20000 $$flags \
		--output results/eval_final_span_full_dev.json
	greedy=$$($(PY) -c "from loraqa.study.collect import final_evaluations; print(final_evaluations()[0])"); \
	$(LORAQA) compare $$greedy results/eval_final_span_full_dev.json --output results/compare_final_span_full_dev.json

# Questions/s of every strategy of the final model's grid against greedy, each decoded alone in interleaved rounds
# (the grid's own timings are the whole pass's): needs an otherwise idle CPU, so not part of `collect`
decoding-speed: fetch
	$(LORAQA) decoding-speed --adapter results/model_checkpoints/final --questions 100 --repeats 3 \
		--output results/decoding_speed.json

# The report (issue 14): report.pdf at the root, built from the files in results/ alone (Typst from PyPI, no TeX,
# no network once installed); the filled Typst source goes to report/build/, PNG pages to report/build/pages/.
report: install
	$(PY) -c "import typst" 2>/dev/null || $(PY) -m pip install --quiet -e ".[report]"
	test -f results/parameter_counts.json || $(LORAQA) param-counts --output results/parameter_counts.json
	$(LORAQA) report --results results --output report.pdf --png_dir report/build/pages

# GPU readiness (issue 25): the CUDA-marked tests, 50 training steps in bf16 and fp16 (loss scaling), 500 questions
# in bf16 against fp32, batched decoding against one-by-one generate -> results/gpu_check.json. No install, no fetch:
# an accelerator machine has no registry (its python3 has torch, transformers, peft, accelerate; carry datasets, dill
# and multiprocess as wheels). DEVICE=cpu is a dry run. See scripts/gpu_check.py.
DEVICE ?= cuda
GPU_PY ?= $(if $(wildcard $(PY)),$(PY),python3)
gpu-check:
	$(GPU_PY) scripts/gpu_check.py --device $(DEVICE)
