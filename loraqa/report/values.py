"""Result files -> the value of every placeholder of the report's sections (`report_values`).

Each part reads one kind of result (the study, the preliminary adapter, bench, data statistics, padding
study, decoding strategies, failures, plots, the theory's closed-form counts) and records its numbers with
their sources through `loraqa.report.text.Values`; what does not exist yet is left missing and flagged
pending, never guessed. Tables are Typst code built here from the same recorded numbers.

Why one file of ~1,340 lines: the parts run in the report's section order, read one another's recorded values
(the abstract's and the conclusion's claims are the results' own) and share the `Values` recorder and the table
helpers at the top; split by section, each module would import most of the others.
"""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

from .text import (FORMATS, OVERFIT_FREE, Inputs, Number, Values, claim_agreement, claim_beams, claim_best_strategy,
                   claim_bf16, claim_count, claim_curve, claim_edge, claim_difference, claim_failure_top, claim_identical,
                   claim_padding, claim_same_loss, claim_sampling, claim_significant, claim_trend, claim_verbatim,
                   holm_bound, literal, plural)

# figure name in the sections -> file stem under results/plots/ (a .pdf is preferred to a .png)
# (the decoding grid is a table only: its figure repeated the table's F1 and seed agreement)
FIGURES = {"loss_curves": "loss_curves", "params_vs_f1": "params_vs_f1", "f1_heatmaps": "f1_heatmaps",
           "cost": "cost", "padding_study": "padding_study"}
STUDY, PRE_BASE, PRE_TUNED = "evaluation_results.json", "eval_baseline_500.json", "eval_finetuned_500.json"
PRE_COMPARE, PRE_SUMMARY, PRE_CONFIG = "compare_500.json", "main_run/summary.json", "main_run/run_config.json"
# the decoding grid: the final model's (`make study`) once it exists, else the latest fine-tuned adapter's
FINAL_STRATEGIES = "strategies_final_500.json"
COST = "cost_study.json"  # `loraqa cost-study`: every configuration's step cost, side by side
STRATEGIES, BENCH, LABELS, FAILURES, PADDING = ("strategies_finetuned_500.json", "bench.json", "label_example.json",
                                                "failure_examples.json", "padding_study.json")
TOKENIZERS = {"gpt2-tokenizer": "GPT-2", "smollm2-135m": "SmolLM2"}


# ---------------------------------------------------------------------------------------------- tables

def table(header: list[str], rows: list[list[str] | str], align: str, widths: str | None = None,
          size: str = "8pt") -> str:
    """A booktabs-style Typst table; a str row is a full-width group label (or a pending note)."""
    cols = len(header)
    body = []
    for row in rows:
        if isinstance(row, str):
            body.append(f"table.cell(colspan: {cols}, align: left)[{row}],")
        else:
            body.append(" ".join(f"[{cell}]," for cell in row))
    columns = widths or f"({', '.join(['auto'] * cols)})"
    aligns = ", ".join({"l": "left", "r": "right", "c": "center"}[c] + " + top" for c in align)
    return (f"{{ set text(size: {size}); set par(justify: false)\n"
            f"table(columns: {columns}, align: ({aligns},), stroke: none, inset: (x: 3pt, y: 2pt),\n"
            f"  table.hline(stroke: 0.8pt), table.header({' '.join(f'[{h}],' for h in header)}),\n"
            f"  table.hline(stroke: 0.4pt),\n  " + "\n  ".join(body) + "\n  table.hline(stroke: 0.8pt)) }")


def _scores(v: Values, base: str, split: str) -> list[str]:
    """[EM [CI], F1 [CI]] cells for /scores/<split> under `base`."""
    cells = []
    for metric in ("exact_match", "f1"):
        n, ci = v.number("score", f"{base}/{metric}"), v.ci(f"{base}/{metric}_ci")
        cells.append(f"{n.text} {ci}" if n and ci else (n.text if n else "–"))
    return cells


def _lr(value: float) -> str:
    return FORMATS["lr"](value)


# target-module presets in words (the report names no code identifiers)
TARGETS = {"attention": "attention", "attention+mlp": "attention+MLP", "all-linear": "all linear layers"}


def targets_in_words(preset: str) -> str:
    return literal(TARGETS.get(preset, preset))


def describe(point: dict) -> str:
    """Grid point -> 'attention, r = 16, lr = 2×10^−4' (Typst markup)."""
    parts = []
    for axis, value in point.items():
        if isinstance(value, dict) and "lora_r" in value:
            parts.append(f"_r_ = {value['lora_r']}")
        elif axis == "learning_rate":
            parts.append(f"lr = {_lr(value)}")
        elif axis == "target_modules":
            parts.append(targets_in_words(value))
        else:
            parts.append(f"{literal(axis)} = {literal(str(value))}")
    return ", ".join(parts)


def _render_parts(parts, rules, default) -> list[str]:
    """Each part rendered by the first (pattern, render) rule whose pattern matches it whole, else by `default`."""
    out = []
    for part in parts:
        out.append(next((render(found) for pattern, render in rules if (found := re.fullmatch(pattern, part))),
                        None) or default(part))
    return out


def _test_label(name: str) -> str:
    """A comparison's name in words: 'centre vs lr=0.0001' -> 'centre vs lr = 1×10^−4', 'alpha=2r vs alpha=32 at
    r=8' -> 'α = 2r vs α = 32 at r = 8' (Typst markup)."""
    name = re.sub(r"rank=lora_r=(\d+),lora_alpha=(\d+)", r"r=\1", name).replace("target_modules=", "")
    name = name.replace("max_length", "maximum length").replace("attention+mlp", "attention+MLP")
    parts = re.split(r"((?:learning_rate|lr)=[\d.e-]+|alpha=2r|alpha=\d+|\br=\d+)", name)
    return "".join(_render_parts([p for p in parts if p], [
        (r"(?:learning_rate|lr)=([\d.e-]+)", lambda found: f"lr = {_lr(float(found[1]))}"),
        (r"alpha=(2r|\d+)", lambda found: f"$alpha = {found[1]}$"),
        (r"r=(\d+)", lambda found: f"_r_ = {found[1]}")], literal))


def strategy_label(name: str) -> str:
    """A decoding strategy in words (Typst markup): 'top_k=10' -> 'top-k, k = 10', 'top_p=0.9' -> 'nucleus, p = 0.9',
    'temperature=0.7' -> 'temperature 0.7', 'sample' -> 'plain sampling', 'num_beams=4' -> 'beam search, 4 beams',
    'greedy,in_context' -> 'greedy, span-constrained' (every answer a span of its context)."""
    return ", ".join(_render_parts(name.split(","), [
        (r"top_k=(\S+)", lambda found: f"top-_k_, _k_ = {literal(found[1])}"),
        (r"top_p=(\S+)", lambda found: f"nucleus, _p_ = {literal(found[1])}"),
        (r"temperature=(\S+)", lambda found: f"temperature {literal(found[1])}"),
        (r"num_beams=(\d+)", lambda found: f"beam search, {found[1]} beams")],
        lambda part: literal({"sample": "plain sampling", "in_context": "span-constrained"}.get(part, part.replace("_", " ")))))


# ---------------------------------------------------------------------------------------------- values

def _runs(inputs: Inputs) -> list[dict]:
    return (inputs.json(STUDY) or {}).get("runs") or []


def _run_index(inputs: Inputs, *, run_id: str | None = None, name: str | None = None) -> int | None:
    for i, run in enumerate(_runs(inputs)):
        if (run_id and run.get("run_id") == run_id) or (name and run.get("name") == name):
            return i
    return None


def _curve_claim(v: Values, runs: list[dict], i: int, name: str, *, after: str | None = None) -> None:
    """Whether run i's validation loss still falls at its end, from its curve; `after`: the claim printed
    just before it, so that the same finding is not repeated word for word."""
    curve = runs[i].get("curves", {}).get("validation") or []
    if len(curve) >= 2:
        R = f"{STUDY}#/runs/{i}/curves/validation"
        steps = [v.number("int", f"{R}/{j}/0") for j in range(len(curve))]
        losses = [v.number("3", f"{R}/{j}/1") for j in range(len(curve))]
        v.text(name, claim_curve(steps, losses, again=bool(after) and after.endswith(OVERFIT_FREE)))


def _train_time(v: Values, name: str, run: str) -> Number | None:
    """'21.5 minutes' or '2.0 h' of training; 'about' when extrapolated from a resumed run's timed steps."""
    source = f"{run}/train_time_s"
    hours = v.number("1", source, scale=1 / 3600)
    minutes = None if hours is None or hours.value >= 1.5 else \
        v.number("1" if hours.value < 1 else "int", source, scale=1 / 60)
    try:
        about = "about " if v.inputs.resolve(f"{run}/train_time_extrapolated") is True else ""
    except KeyError:
        about = ""
    v.text(name, f"{about}{minutes.text} minutes" if minutes else f"{about}{hours.text} h" if hours else None, source)
    return hours


COUNTS = "parameter_counts.json#"  # `loraqa param-counts`: closed-form counts from loraqa.measure.lora_math


def _reduction(v: Values, name: str, run: dict, pointer: str) -> Number | None:
    """rho = P / P_LoRA for a run: from the closed-form counts when they cover its model, targets and rank (so
    that the abstract prints the very number of the theory section), else from the run's own counts, whose
    total includes the adapter (full fine-tuning trains total - trainable)."""
    settings = run.get("settings") or {}
    counts = f"{COUNTS}/{settings.get('model')}/presets/{settings.get('target_modules')}/{settings.get('lora_r')}"
    if v.inputs.has(f"{counts}/trainable_params") and \
            v.inputs.resolve(f"{counts}/trainable_params") == run.get("trainable_params"):
        return v.put(name, "1", f"{counts}/base_params", f"{counts}/trainable_params", op="ratio")
    return v.put(name, "1", f"{pointer}/total_params", f"{pointer}/trainable_params", op="frozen_per_trainable")


def settings_point(settings: dict) -> dict:
    """A run's LoRA settings as a grid point (targets, learning rate, rank), for `describe`."""
    return {"target_modules": settings.get("target_modules"), "learning_rate": settings.get("learning_rate"),
            "rank": {"lora_r": settings.get("lora_r")}}


def _headline(v: Values) -> None:
    study, R = v.inputs.json(STUDY) or {}, f"{STUDY}#"
    final = study.get("final") or {}
    i = _run_index(v.inputs, run_id=final.get("run"))
    has_final = v.flag("has_final", i is not None and bool(final.get("test")))
    # the untuned model's full-dev run comes after the final one: between the two, the final stands alone
    v.flag("has_final_baseline", has_final and bool(final.get("baseline_full_dev")) and bool(final.get("comparison")))
    if has_final:
        for key, src in (("final_em", "/final/test/exact_match"), ("final_f1", "/final/test/f1"),
                         ("final_base_em", "/final/baseline_full_dev/exact_match"),
                         ("final_base_f1", "/final/baseline_full_dev/f1"),
                         ("final_delta_f1", "/final/comparison/delta_f1")):
            v.put(key, "signed" if "delta" in key else "score", R + src)
        v.ci(R + "/final/test/f1_ci", "final_f1_ci")
        v.ci(R + "/final/comparison/delta_f1_ci", "final_delta_f1_ci")
        v.put("final_p", "p_is", R + "/final/comparison/p_value")
        v.put("final_n", "int", R + "/final/test/n")
        v.put("final_trainable", "int", f"{R}/runs/{i}/trainable_params")
        v.put("final_total_params", "int", f"{R}/runs/{i}/total_params")
        _reduction(v, "final_reduction", study["runs"][i], f"{R}/runs/{i}")
        v.put("final_train_questions", "int", f"{R}/runs/{i}/settings/max_train_samples")
        _train_time(v, "final_train_time", f"{R}/runs/{i}")
        point = settings_point(study["runs"][i].get("settings") or {})
        v.text("final_settings", describe(point))
        best = _run_index(v.inputs, run_id=(study.get("selection") or {}).get("best_run"))
        # the final model is trained from the selection of its day; an extended grid may have moved it since
        v.flag("has_final_matches_best", best is not None and
               settings_point(study["runs"][best].get("settings") or {}) == point)
    _grid_headline(v, study)
    has_pre = v.flag("has_preliminary", v.inputs.json(PRE_TUNED) is not None and v.inputs.json(PRE_BASE) is not None
                     and v.inputs.json(PRE_SUMMARY) is not None)
    if has_pre:
        for key, name in (("pre_em", f"{PRE_TUNED}#/exact_match"), ("pre_f1", f"{PRE_TUNED}#/f1"),
                          ("pre_base_em", f"{PRE_BASE}#/exact_match"), ("pre_base_f1", f"{PRE_BASE}#/f1")):
            v.put(key, "score", name)
        v.put("pre_n", "int", f"{PRE_TUNED}#/n")
        v.put("pre_delta_f1", "signed", f"{PRE_COMPARE}#/f1/delta")
        v.ci(f"{PRE_COMPARE}#/f1/delta_ci", "pre_delta_f1_ci")
        v.put("pre_delta_em", "signed", f"{PRE_COMPARE}#/exact_match/delta")
        v.put("pre_mcnemar_p", "p", f"{PRE_COMPARE}#/exact_match/mcnemar/p_value")
        v.put("pre_perm_p", "p_is", f"{PRE_COMPARE}#/f1/permutation_p_value")
        v.put("pre_trainable", "int", f"{PRE_SUMMARY}#/trainable_params")
        v.put("pre_total_params", "int", f"{PRE_SUMMARY}#/total_params")
        v.put("pre_reduction", "1", f"{PRE_SUMMARY}#/total_params", f"{PRE_SUMMARY}#/trainable_params",
              op="frozen_per_trainable")
        v.put("pre_train_questions", "int", f"{PRE_SUMMARY}#/train_examples")
        v.put("pre_train_minutes", "1", f"{PRE_SUMMARY}#/train_runtime_s", scale=1 / 60)
        v.put("pre_steps", "int", f"{PRE_SUMMARY}#/global_steps")
        v.put("pre_rank", "int", f"{PRE_CONFIG}#/lora/lora_r")
        targets = ((v.inputs.json(PRE_CONFIG) or {}).get("lora") or {}).get("target_modules")
        v.text("pre_targets", literal(targets) if targets else None, PRE_CONFIG)
    # the pretrained model's own size (`loraqa param-counts`), not the adapted model's
    v.put("model_params", "int", "parameter_counts.json#/smollm2-135m/base_params")
    v.flag("has_model_params", "model_params" in v.fields)


def _bench(v: Values) -> None:
    B = f"{BENCH}#"
    if not v.flag("has_bench", v.inputs.json(BENCH) is not None):
        return
    v.put("cpu_count", "int", B + "/machine/cpu_count")
    v.put("bench_train_speedup", "x", B + "/train/speedup")
    v.put("bench_mem_ratio", "pct0", B + "/train/peak_rss_ratio", scale=100)
    v.put("bench_answer_logits_speedup", "2", B + "/train/padded_answer_only_logits/examples_per_s",
          B + "/train/padded_full_logits/examples_per_s", op="ratio")
    v.put("bench_packing_speedup", "1", B + "/train/speedup_over_padded_answer_only_logits")
    v.put("bench_tokens_packed", "int", B + "/train/loraqa/processed_tokens")
    v.put("bench_tokens_padded", "int", B + "/train/padded_answer_only_logits/processed_tokens")
    v.put("bench_logits_answer", "int", B + "/train/loraqa/logit_positions")
    v.put("bench_logits_full", "int", B + "/train/padded_full_logits/logit_positions")
    v.put("bench_train_n", "int", B + "/settings/train_examples")
    v.put("bench_train_steps", "int", B + "/settings/steps")
    v.put("bench_padded_vs_trl", "1", B + "/train/padded_full_logits/examples_per_s",
          B + "/train/reference_trl/examples_per_s", op="ratio")
    losses = [v.number("3", f"{B}/train/{key}/mean_train_loss")
              for key in ("reference_trl", "padded_full_logits", "padded_answer_only_logits", "loraqa")]
    losses = [n for n in losses if n]
    v.text("claim_bench_loss", claim_same_loss(losses) if losses else None, BENCH)
    v.put("bench_eval_speedup", "x", B + "/eval/speedup")
    identical = v.put("bench_eval_identical", "int", B + "/eval/greedy_identical_count")
    n = v.put("bench_eval_n", "int", B + "/eval/questions")
    v.text("claim_eval_identical", claim_identical(identical, n) if identical and n else None, BENCH)
    v.put("bench_bf16_speedup", "x", B + "/eval/bf16/speedup_over_fp32_one_by_one")
    identical = v.number("int", B + "/eval/bf16/identical_to_fp32_count")
    n = v.number("int", B + "/eval/questions")
    v.text("claim_bf16", claim_bf16(identical, n) if identical and n else None, BENCH)
    rows = [("TRL’s supervised trainer + PEFT", "reference_trl"), ("padded rows, full logits", "padded_full_logits"),
            ("padded rows, answer-only logits", "padded_answer_only_logits"),
            ("*ours* (shared contexts)", "loraqa")]
    body: list = ["_Training_ (examples/s, same batches and loss)"]
    for label, key in rows:
        rate = v.number("2", f"{B}/train/{key}/examples_per_s")
        mem = v.number("1", f"{B}/train/{key}/peak_rss_mb", scale=1 / 1024)
        ratio = v.number("x", f"{B}/train/{key}/examples_per_s", f"{B}/train/reference_trl/examples_per_s", op="ratio")
        body.append([label, rate.text if rate else "–", mem.text if mem else "–", ratio.text if ratio else "–"])
    body.append("_Evaluation_ (questions/s, greedy)")
    for label, key, ref in (("one question at a time", "one_by_one_questions_per_s", None),
                            ("batched full-prompt rows", "full_prompt_rows_questions_per_s", None),
                            ("*ours* (shared prefixes)", "loraqa_questions_per_s", None),
                            ("*ours*, bf16 weights", "bf16/loraqa_questions_per_s", None)):
        rate = v.number("2", f"{B}/eval/{key}")
        ratio = v.number("x", f"{B}/eval/{key}", f"{B}/eval/one_by_one_questions_per_s", op="ratio")
        body.append([label, rate.text if rate else "–", "–", ratio.text if ratio else "–"])
    v.text("table_bench", table(["Variant", "Rate", "Peak GiB", "Speed-up"], body, "lrrr"))


def _data_stats(v: Values) -> None:
    names = {k: f"data_stats_{k}_train.json" for k in TOKENIZERS}
    present = [k for k, f in names.items() if v.inputs.json(f) is not None]
    if not v.flag("has_data_stats", "smollm2-135m" in present):
        return
    S = f"{names['smollm2-135m']}#"
    v.put("ds_n_train", "int", S + "/n")
    v.put("ds_n_dev", "int", "data_stats_smollm2-135m_validation.json#/n")
    max_length = v.put("ds_max_length", "int", f"{PRE_CONFIG}#/data/max_length")
    lengths = sorted((v.inputs.json(names["smollm2-135m"]) or {}).get("max_length", {}), key=int)
    default = str(round(max_length.value)) if max_length else None
    v.put("ds_trunc_default", "int", f"{S}/max_length/{default}/truncated")
    v.put("ds_trunc_default_pct", "pct", f"{S}/max_length/{default}/truncated", f"{S}/n", op="ratio", scale=100)
    v.put("ds_total_p50", "int", f"{S}/percentiles/total/p50")
    v.put("ds_total_p99", "int", f"{S}/percentiles/total/p99")
    v.put("ds_answer_p50", "int", f"{S}/percentiles/answer/p50")
    v.flag("has_ds_default", "ds_trunc_default" in v.fields)
    # the shortest length drops the most (a question that does not fit at L does not fit below L)
    shortest = v.number("int", f"{S}/max_length/{lengths[0]}/dropped") if lengths else None
    v.text("claim_dropped", claim_count(shortest, "question is dropped at the shortest length",
                                        "questions are dropped at the shortest length",
                                        f"no question is dropped at any maximum length from {lengths[0]} to "
                                        f"{int(lengths[-1]):,} tokens (every answer fits)")
           if shortest else None, S)
    header = ["Training set", *(TOKENIZERS[k] for k in present)]
    rows: list = ["_Tokens of prompt + answer_"]
    for p in ("p50", "p90", "p99", "p100"):
        cells = [v.number("int", f"data_stats_{k}_train.json#/percentiles/total/{p}") for k in present]
        rows.append([p if p != "p100" else "max", *(c.text if c else "–" for c in cells)])
    rows.append("_Questions truncated (dropped) at maximum length_")
    for length in lengths:
        cells = []
        for k in present:
            t = v.number("int", f"data_stats_{k}_train.json#/max_length/{length}/truncated")
            d = v.number("int", f"data_stats_{k}_train.json#/max_length/{length}/dropped")
            cells.append(f"{t.text} ({d.text})" if t and d else "–")
        rows.append([length, *cells])
    v.text("table_data_stats", table(header, rows, "l" + "r" * len(present)))


def _label_example(v: Values) -> None:
    example = v.inputs.json(LABELS)
    if not v.flag("has_label_example", bool(example and example.get("tokens"))):
        return
    L = f"{LABELS}#"
    v.put("lx_prompt_tokens", "int", L + "/prompt_tokens")
    v.put("lx_target_tokens", "int", L + "/target_tokens")
    v.text("lx_tokenizer", literal(TOKENIZERS.get(Path(example.get("tokenizer", "")).name,
                                                  Path(example.get("tokenizer", "")).name)))
    cells = ", ".join(f"({json.dumps(t['text'], ensure_ascii=False)}, {json.dumps(str(t['label']))}, "
                      f"{json.dumps(t['kind'])})"
                      for t in example["tokens"])
    v.text("fig_labels", f"token-example(({cells},))")


def _padding(v: Values) -> None:
    """padding_study.json (`loraqa padding-study`): the claim at the training batch size (8 when measured, else
    the largest); the figure shows every batch size."""
    cells = (v.inputs.json(PADDING) or {}).get("cells") or []
    if not v.flag("has_padding", bool(cells)):
        return
    P = f"{PADDING}#"
    sizes = {c["batch_size"] for c in cells}
    batch = 8 if 8 in sizes else max(sizes)
    steps, tokens = [], []
    # CPU seconds where measured (the plot's rule): wall time of a 1-thread study counts what else ran beside it
    timed = [c["timing"] for c in cells if c.get("timing")]
    on_cpu = bool(timed) and all(t.get("step_cpu_seconds_median") for t in timed)
    timing = "step_cpu_seconds_median" if on_cpu else "step_seconds_median"
    for i, cell in enumerate(cells):
        if cell["batch_size"] != batch:
            continue
        if not steps and not tokens:
            v.put("pad_batch_size", "int", f"{P}/cells/{i}/batch_size")
        name = literal(cell["strategy"].replace("_", " "))
        per_question = v.number("int", f"{P}/cells/{i}/tokens_per_question")
        step = v.number("2", f"{P}/cells/{i}/timing/{timing}")
        steps += [(name, step)] if step else []
        tokens += [(name, per_question)] if per_question else []
    v.text("claim_padding", claim_padding(steps, tokens, "CPU s" if on_cpu else "s") if tokens else None, PADDING)


def _grid_headline(v: Values, study: dict) -> None:
    """The complete grid's selection (chosen on validation F1) on the test subset, against the baseline on the
    same questions: the headline until the final model exists, a result of the study's own protocol unlike the
    preliminary adapter trained before it."""
    R, selection = f"{STUDY}#", study.get("selection") or {}
    best = _run_index(v.inputs, run_id=selection.get("best_run"))
    base = _run_index(v.inputs, name="baseline")
    test = next((j for j, t in enumerate(study.get("tests") or []) if t.get("name") == "baseline vs LoRA (best)"),
                None)
    if not selection.get("grid_complete") or None in (best, base, test):
        v.flag("has_grid_headline", False)
        return
    run, B, T = f"{R}/runs/{best}", f"{R}/runs/{base}/scores/test", f"{R}/tests/{test}"
    values = [v.put("grid_em", "score", f"{run}/scores/test/exact_match"),
              v.put("grid_f1", "score", f"{run}/scores/test/f1"),
              v.ci(f"{run}/scores/test/f1_ci", "grid_f1_ci"),
              v.put("grid_n", "int", f"{run}/scores/test/n"),
              v.put("grid_base_em", "score", f"{B}/exact_match"), v.put("grid_base_f1", "score", f"{B}/f1"),
              v.put("grid_delta_f1", "signed", f"{T}/delta_f1"), v.ci(f"{T}/delta_f1_ci", "grid_delta_f1_ci"),
              v.put("grid_p_holm", "p", f"{T}/p_holm"),
              v.put("grid_trainable", "int", f"{run}/trainable_params"),
              v.put("grid_total_params", "int", f"{run}/total_params"),
              _reduction(v, "grid_reduction", study["runs"][best], run),
              v.put("grid_train_questions", "int", f"{run}/settings/max_train_samples"),
              _train_time(v, "grid_train_time", run)]
    v.text("grid_best_settings", describe(study["runs"][best]["grid_point"]))
    v.flag("has_grid_headline", all(x is not None for x in values))


def _study(v: Values) -> None:
    study, R = v.inputs.json(STUDY), f"{STUDY}#"
    runs = _runs(v.inputs)
    # set before any return: a missing value right before a full stop would not even parse in Typst
    selection = (study or {}).get("selection") or {}
    searched = len(selection.get("candidates") or {}), len(selection.get("full_ft_candidates") or {})
    v.text("full_ft_lr_noun", "learning rate" if searched[1] == 1 else "learning rates")
    if not v.flag("has_study", bool(study and runs)):
        return
    v.put("runs_finished", "int", R + "/runs", op="len")
    queued = v.number("int", R + "/pending", op="len")
    v.text("runs_queued", f"{queued.text} {'is' if queued.value == 1 else 'are'} queued")
    v.put("runs_total", "int", R + "/runs", R + "/pending", op="len_sum")
    grid_done = v.put("grid_finished", "int", R + "/runs", op="n_grid")
    # figures over the grid (parameters vs F1, heatmaps, cost) say something only with two grid points or more
    v.flag("has_grid_spread", bool(grid_done and grid_done.value >= 2))
    v.flag("has_complete_study", not study.get("pending"))
    base = R + "/protocol/base"
    size = v.put("grid_size", "int", R + "/protocol/grid", op="grid_size")
    extra = int(grid_done.value - size.value) if grid_done and size else 0  # runs the row extensions added
    v.flag("has_grid_extensions", extra > 0)
    v.text("grid_extensions", str(max(extra, 0)))
    for key, name in (("max_train_samples", "train_questions"), ("per_device_train_batch_size", "batch_size"),
                      ("eval_steps", "eval_steps"), ("max_eval_samples", "val_loss_questions"),
                      ("heldout_articles", "heldout_articles")):
        v.put(name, "int", f"{base}/{key}")
    v.put("lora_dropout", "2", f"{base}/lora_dropout")
    grid = (study.get("protocol") or {}).get("grid") or {}
    ranks = [p["lora_r"] for p in grid.get("rank", []) if isinstance(p, dict)]
    v.text("grid_ranks", ", ".join(str(r) for r in ranks) or None, R + "/protocol/grid/rank")
    v.text("grid_lrs", ", ".join(_lr(x) for x in grid.get("learning_rate", [])) or None,
           R + "/protocol/grid/learning_rate")
    cap = (((study.get("protocol") or {}).get("extend") or {}).get("learning_rate") or {}).get("max")
    v.flag("has_lr_cap", cap is not None)  # the learning-rate extension's largest rate
    v.text("lr_cap", _lr(cap) if cap else "")
    v.text("grid_targets", " and ".join(targets_in_words(t) for t in grid.get("target_modules", [])) or None,
           R + "/protocol/grid/target_modules")
    v.text("centre_settings", describe((study.get("protocol") or {}).get("centre") or {}) or None,
           R + "/protocol/centre")
    selection = study.get("selection") or {}
    any_val = next((k for k, r in enumerate(runs) if "validation" in r.get("scores", {})), None)
    any_test = next((k for k, r in enumerate(runs) if "test" in r.get("scores", {}) and r.get("group") != "final"
                     and not r.get("name", "").endswith("full_dev")), None)
    v.put("val_n", "int", f"{R}/runs/{any_val}/scores/validation/n")
    v.put("test_n", "int", f"{R}/runs/{any_test}/scores/test/n")
    # the permutation test's resolution: p = (b + 1) / (resamples + 1), b the resamples at least as extreme, so
    # 1 / (resamples + 1) is its smallest p-value (no resample reached the observed difference), not a rounded 0
    resamples = next((src for src in (f"{R}/final/comparison/permutation_resamples",
                                      f"{R}/tests/0/permutation_resamples", f"{PRE_COMPARE}#/f1/permutation_resamples")
                      if v.inputs.has(src)), None)
    if v.flag("has_perm_resamples", resamples is not None):
        v.put("perm_resamples", "int", resamples)
        v.put("perm_p_floor", "p", resamples, op="inverse_plus_one")
    # trainable parameters over the grid
    grid_runs = [(k, r) for k, r in enumerate(runs) if r.get("group") == "grid" and r.get("trainable_params")]
    if grid_runs:
        lo = min(grid_runs, key=lambda kr: kr[1]["trainable_params"])
        hi = max(grid_runs, key=lambda kr: kr[1]["trainable_params"])
        for tag, (k, run) in (("min", lo), ("max", hi)):
            v.put(f"trainable_{tag}", "int", f"{R}/runs/{k}/trainable_params")
            v.put(f"trainable_{tag}_pct", "2", f"{R}/runs/{k}/trainable_ratio", scale=100)
            v.text(f"trainable_{tag}_at", describe({a: run["grid_point"][a] for a in ("target_modules", "rank")
                                                    if a in run["grid_point"]}))
    v.flag("has_grid_params", bool(grid_runs))
    v.flag("has_param_range", bool(grid_runs) and lo[1]["trainable_params"] != hi[1]["trainable_params"])
    # selection
    best = _run_index(v.inputs, run_id=selection.get("best_run"))
    centre = _run_index(v.inputs, run_id=selection.get("centre_run"))
    v.flag("has_best", best is not None)
    v.flag("has_complete_grid", bool(selection.get("grid_complete")))
    if best is not None:
        v.text("best_settings", describe(runs[best]["grid_point"]))
        point = runs[best]["grid_point"]
        # the rates its own row tried: the spec's and the row's extensions (a row may end at the extension's cap)
        row_rates = [r["grid_point"].get("learning_rate") for _, r in grid_runs
                     if {a: r["grid_point"].get(a) for a in ("target_modules", "rank")}
                     == {a: point.get(a) for a in ("target_modules", "rank")}]
        edge = claim_edge({axis: (value, levels) for axis, value, levels in (
            ("learning rate", point.get("learning_rate"), row_rates or grid.get("learning_rate") or []),
            ("rank", (point.get("rank") or {}).get("lora_r"), ranks)) if value is not None})
        if edge:
            v.text("claim_best_edge", edge)
        v.put("best_val_f1", "score", f"{R}/runs/{best}/scores/validation/f1")
        v.put("best_test_f1", "score", f"{R}/runs/{best}/scores/test/f1")
    v.flag("has_claim_best_edge", "claim_best_edge" in v.fields)
    agreement, A = selection.get("agreement") or {}, f"{R}/selection/agreement"
    top = _run_index(v.inputs, run_id=agreement.get("test_best_run"))
    counts = v.number("int", f"{A}/runs"), v.number("2", f"{A}/spearman")
    if selection.get("grid_complete") and top is not None and None not in counts:
        if agreement.get("test_best_run") == agreement.get("selected_run"):
            v.text("claim_agreement", claim_agreement(*counts, None, None, None))
        else:
            v.text("claim_agreement", claim_agreement(
                *counts, describe(runs[top]["grid_point"]), v.number("score", f"{A}/test_best_f1"),
                v.number("1", f"{A}/test_best_f1", f"{A}/selected_test_f1", op="diff")))
    v.flag("has_claim_agreement", "claim_agreement" in v.fields)
    v.flag("has_centre", centre is not None)
    if centre is not None:
        v.put("centre_ci_halfwidth", "1", f"{R}/runs/{centre}/scores/test/f1_ci/1",
              f"{R}/runs/{centre}/scores/test/f1_ci/0", op="diff", scale=0.5)
        v.put("centre_s_per_step", "2", f"{R}/runs/{centre}/seconds_per_step")
        _train_time(v, "centre_train_time", f"{R}/runs/{centre}")
        v.put("centre_tokens_per_s", "int", f"{R}/runs/{centre}/train_tokens_per_s")
        v.put("centre_peak_gib", "1", f"{R}/runs/{centre}/peak_memory_mb", scale=1 / 1024)
        _curve_claim(v, runs, centre, "claim_curve")
    final = _run_index(v.inputs, run_id=(study.get("final") or {}).get("run"))
    if final is not None:
        _curve_claim(v, runs, final, "claim_final_curve", after=v.fields.get("claim_curve"))
    v.flag("has_curve", "claim_curve" in v.fields)
    v.flag("has_final_curve", "claim_final_curve" in v.fields)
    _effects(v, study)
    _tests(v, study)
    _seeds(v, study)
    _alpha_series(v, runs)  # after the seeds: its clause quotes their deviation
    _full_ft(v, study, runs, best)
    _budget_pair(v, runs)


def _main_table(v: Values) -> None:
    R, study, runs = f"{STUDY}#", v.inputs.json(STUDY) or {}, _runs(v.inputs)
    selection, final = study.get("selection") or {}, study.get("final") or {}
    best_label = "Grid best" + ("" if selection.get("grid_complete") else " so far")
    best, centre = (_run_index(v.inputs, run_id=selection.get(key)) for key in ("best_run", "centre_run"))
    prompted = _prompt_rows(v)
    plan = [*(prompted or [("Untuned (baseline)", _run_index(v.inputs, name="baseline"), "test")]),
            (f"Grid centre = {best_label.lower()}" if best is not None and best == centre else best_label, best,
             "test"),
            ("Grid centre", None if best == centre else centre, "test"),
            ("Full fine-tuning", _run_index(v.inputs, run_id=selection.get("best_full_ft_run")), "test"),
            ("Final model, full dev", _run_index(v.inputs, run_id=final.get("run")), "test"),
            ("Untuned, zero-shot (full dev)" if prompted else "Untuned (full dev)",
             _run_index(v.inputs, name="baseline_full_dev"), "test"),
            ("Untuned, best prompt (full dev)", _run_index(v.inputs, run_id=final.get("prompted_baseline_run")), "test")]
    rows: list = []
    for label, k, split in plan:  # rows not measured yet are left out (the Results section lists them)
        if k is None or split not in runs[k].get("scores", {}):
            continue
        run, base = runs[k], f"{R}/runs/{k}"
        what = describe(run.get("grid_point") or (settings_point(run["settings"]) if run.get("group") == "final"
                                                   else {}))
        name = f"{label}" + (f" ({what})" if what else "")
        params = v.number("int", f"{base}/trainable_params") if run.get("trainable_params") else None
        questions = v.number("int", f"{base}/settings/max_train_samples") if run.get("group") != "baseline" else None
        val = v.number("score", f"{base}/scores/validation/f1")
        n = v.number("int", f"{base}/scores/{split}/n")
        rows.append([name, questions.text if questions else "–", params.text if params else "–",
                     val.text if val else "–", n.text if n else "–", *_scores(v, f"{base}/scores/{split}", split)])
    if v.inputs.json(PRE_TUNED) is not None and _run_index(v.inputs, run_id=final.get("run")) is None:
        questions = v.number("int", f"{PRE_SUMMARY}#/train_examples")
        params = v.number("int", f"{PRE_SUMMARY}#/trainable_params")
        n = v.number("int", f"{PRE_TUNED}#/n")
        rows.append(["Preliminary adapter", questions.text if questions else "–",
                     params.text if params else "–", "–", n.text if n else "–",
                     *_scores(v, f"{PRE_TUNED}#", "test")])
        if v.inputs.json(PRE_BASE) is not None and _run_index(v.inputs, name="baseline") is None:
            n = v.number("int", f"{PRE_BASE}#/n")
            rows.append(["Untuned (preliminary evaluation)", "–", "–", "–", n.text if n else "–",
                         *_scores(v, f"{PRE_BASE}#", "test")])
    v.text("table_main", table(["Model", "Train q.", "Trainable", "Val. F1", "Test q.", "Test EM [95% CI]",
                                "Test F1 [95% CI]"], rows, "lrrrrrr", widths="(1fr," + " auto," * 6 + ")"))


def prompt_in_words(few_shot: int, chat_template: bool) -> str:
    """(3, False) -> '3 examples', (0, True) -> 'zero-shot, chat template'."""
    shots = "zero-shot" if not few_shot else f"{few_shot} example{'s' if few_shot > 1 else ''}"
    return shots + (", chat template" if chat_template else "")


def _prompt_rows(v: Values) -> list[tuple[str, int | None, str]]:
    """Main-table rows of the untuned model's prompts (zero-shot first, then by examples and template); the best
    by the study's rule is marked. Empty before the prompted baselines exist."""
    prompted = (v.inputs.json(STUDY) or {}).get("prompted_baselines") or {}
    ordered = sorted(prompted.get("runs") or [], key=lambda r: (r["few_shot"], r["chat_template"]))
    return [(f"Untuned, {prompt_in_words(r['few_shot'], r['chat_template'])}"
             + (" (best prompt)" if r["run_id"] == prompted.get("best_run") and len(ordered) > 1 else ""),
             _run_index(v.inputs, run_id=r["run_id"]), "test") for r in ordered]


def _prompted(v: Values) -> None:
    """The untuned model's best prompt (chosen on validation F1) and the final model's gain over it: on all of dev
    once that run and its paired comparison exist, else the best prompt's score on the test subset."""
    study, R = v.inputs.json(STUDY) or {}, f"{STUDY}#"
    prompted = study.get("prompted_baselines") or {}
    runs = prompted.get("runs") or []
    best = next((j for j, r in enumerate(runs) if r["run_id"] == prompted.get("best_run")), None)
    zero = next((j for j, r in enumerate(runs) if not r["few_shot"] and not r["chat_template"]), None)
    if not v.flag("has_prompted", best is not None and zero is not None and len(runs) > 1):
        v.flag("has_prompted_full_dev", False)
        return
    P = f"{R}/prompted_baselines"
    v.text("prompt_best_words", literal(prompt_in_words(runs[best]["few_shot"], runs[best]["chat_template"])))
    v.put("prompts_n", "int", f"{P}/runs", op="len")
    v.put("prompt_best_val_f1", "score", f"{P}/runs/{best}/validation/f1")
    v.put("prompt_best_test_f1", "score", f"{P}/runs/{best}/test/f1")
    v.put("prompt_test_n", "int", f"{P}/runs/{best}/test/n")
    v.put("prompt_zero_test_f1", "score", f"{P}/runs/{zero}/test/f1")
    final, F = study.get("final") or {}, f"{R}/final"
    found = [v.put("prompted_full_f1", "score", f"{F}/prompted_baseline_full_dev/f1"),
             v.put("prompted_full_em", "score", f"{F}/prompted_baseline_full_dev/exact_match"),
             v.put("prompted_delta_f1", "signed", f"{F}/prompted_comparison/delta_f1"),
             v.ci(f"{F}/prompted_comparison/delta_f1_ci", "prompted_delta_f1_ci"),
             v.put("prompted_p", "p_is", f"{F}/prompted_comparison/p_value")] \
        if final.get("prompted_comparison") and final.get("prompted_baseline_full_dev") else [None]
    # the text quotes both gains, over the best prompt and over zero-shot, so both full-dev runs must be in
    v.flag("has_prompted_full_dev", v.fields.get("has_final_baseline") == "true" and None not in found)


def _effects(v: Values, study: dict) -> None:
    R, effects = f"{STUDY}#", study.get("main_effects") or {}
    rows: list = []
    for axis, levels in effects.items():
        if not levels:
            continue
        rows.append(f"_{literal(AXES.get(axis, axis))}_")
        trend = []
        for j, level in enumerate(levels):
            base = f"{R}/main_effects/{axis}/{j}"
            f1, ci = v.number("score", f"{base}/f1"), v.ci(f"{base}/f1_ci")
            val = v.number("score", f"{base}/validation_f1")
            label = _level_label(axis, level["level"])
            runs_n = v.number("int", f"{base}/runs")
            rows.append([label, runs_n.text, f"{f1.text} {ci}", val.text if val else "–"])
            trend.append((label, f1))
        balanced = len({level.get("runs") for level in levels}) == 1  # unequal mixes make level means incomparable
        if axis in ("rank", "learning_rate") and len(trend) > 1 and balanced:
            v.text(f"claim_{axis}", claim_trend(trend, "rank" if axis == "rank" else "learning rate"))
    for axis in ("rank", "learning_rate"):
        if not v.flag(f"has_claim_{axis}", f"claim_{axis}" in v.fields):
            v.text(f"claim_{axis}", "")  # no trend over unequal mixes (row extensions): the paired contrasts say it
    v.flag("has_effects", any(len(levels or []) >= 2 for levels in effects.values()))
    if rows:
        v.text("table_effects", table(["Level", "Runs", "Test F1 [95% CI]", "Val. F1"], rows, "lrrr"))


AXES = {"target_modules": "target modules", "learning_rate": "learning rate"}  # the grid's axes in words


def _level_label(axis: str, level) -> str:
    if isinstance(level, str) and level.startswith("lora_r="):
        return "_r_ = " + level.split(",")[0].split("=")[1]
    if axis == "learning_rate" and isinstance(level, (int, float)):
        return _lr(level)
    if axis == "target_modules":
        return targets_in_words(str(level))
    return literal(str(level))


BUDGET_TEST = r"^full fine-tuning vs LoRA \(best\) on"  # collect's paired test at the shared budget
# test name pattern -> (placeholder, A label, B label)
CLAIMS = {r"^centre vs target_modules=": ("claim_targets", "attention only", "attention+MLP"),
          r"^centre vs (best|.* \(best\))$": ("claim_best_vs_centre", "the centre", "the selected configuration"),
          r"^answer-only loss": ("claim_masking", "answer-only loss", "loss on the whole sequence"),
          r"^max_length 512 vs 256": ("claim_max_length", "maximum length 512", "maximum length 256"),
          r"^LoRA \(best\) vs full": ("claim_full_ft", "LoRA", "full fine-tuning"),
          BUDGET_TEST: ("claim_budget_full_ft", "full fine-tuning", "LoRA"),
          r"^baseline vs LoRA": ("claim_baseline", "the untuned model prompted zero-shot", "LoRA"),
          r"^LoRA \(best\) on \S+ vs \S+ questions": ("claim_budget", "its configuration on the grid’s budget",
                                           "the final model")}


def _alpha_series(v: Values, runs: list[dict]) -> None:
    """The rank series at one fixed alpha against the grid's alpha = 2r series at the same learning rate and
    targets: how much of the rise with rank comes with alpha = 2r's growing update rather than with capacity.
    One clause per learning rate the fixed series was run at (the centre's, then attention's best)."""
    fixed_runs = [r for r in runs if r.get("group") == "alpha" and "test" in r.get("scores", {})]
    keys = sorted({(r["settings"].get("lora_alpha"), r["settings"].get("learning_rate"),
                    r["settings"].get("target_modules")) for r in fixed_runs}, key=lambda key: key[1])
    R, clauses, concluded = f"{STUDY}#/runs", [], []
    for alpha, lr, targets in keys:
        series: dict[str, dict[int, int]] = {"fixed": {}, "2r": {}}
        for k, run in enumerate(runs):
            s = run.get("settings") or {}
            if run.get("group") not in ("grid", "alpha") or "test" not in run.get("scores", {}) \
                    or (s.get("learning_rate"), s.get("target_modules")) != (lr, targets):
                continue
            if s.get("lora_alpha") == alpha:
                series["fixed"][s["lora_r"]] = k
            if run.get("group") == "grid" and s.get("lora_alpha") == 2 * s.get("lora_r", 0):
                series["2r"][s["lora_r"]] = k
        ranks = sorted(set(series["fixed"]) & set(series["2r"]))
        if len(ranks) < 2:
            continue
        spans = {}
        for name, found in series.items():
            ordered = sorted((runs[found[r]]["scores"]["test"]["f1"], found[r]) for r in ranks)
            low, high = (f"{R}/{ordered[end][1]}/scores/test/f1" for end in (0, -1))
            spans[name] = (v.number("score", low), v.number("score", high), v.number("1", high, low, op="diff"))
        (flo, fhi, fspread), (tlo, thi, tspread) = spans["fixed"], spans["2r"]
        fixed_alpha = v.number("int", f"{R}/{series['fixed'][ranks[0]]}/settings/lora_alpha")
        text = (f"at lr = {_lr(lr)}, with $alpha$ fixed at {fixed_alpha.text} test F1 stays between {flo.text} and "
                f"{fhi.text} over _r_ = {', '.join(map(str, ranks))} (a spread of {fspread.text} points), against "
                f"{tlo.text} to {thi.text} ({tspread.text} points) with $alpha = 2r$")
        concluded.append(fspread.value < tspread.value / 2)
        clauses.append(text)
    conclusion = ("most of the rise with rank at $alpha = 2r$ is consistent with its growing update rather than "
                  "with capacity")
    if len(clauses) > 1 and all(concluded):  # said once for every rate
        clauses[-1] += f": at {'both rates' if len(clauses) == 2 else 'every rate'} {conclusion}"
    else:
        clauses = [c + (f": at this rate {conclusion}" if c_ else "") for c, c_ in zip(clauses, concluded)]
    if clauses and "seeds_centre_sd" in v.fields:  # every point is one seed: the spreads carry seed noise
        clauses[-1] += f" (one seed per run, whose deviation over seeds is {v.fields['seeds_centre_sd']} points)"
    if v.flag("has_claim_alpha_series", bool(clauses)):
        v.text("claim_alpha_series", "; ".join(clauses))


def _tests(v: Values, study: dict) -> None:
    R, tests = f"{STUDY}#", study.get("tests") or []
    v.put("n_tests", "int", R + "/tests", op="len")
    rows, alpha_claims = [], []
    for j, t in enumerate(tests):
        base = f"{R}/tests/{j}"
        delta, ci = v.number("signed", f"{base}/delta_f1"), v.ci(f"{base}/delta_f1_ci")
        p, p_holm = v.number("p_cell", f"{base}/p_value"), v.number("p", f"{base}/p_holm")
        p_holm = p_holm and holm_bound(p_holm, t)
        em = v.number("signed", f"{base}/delta_exact_match")
        # McNemar's exact p (sign flips for a main-effect contrast, whose EM is averaged over runs)
        em_p = v.number("p_exact" if t.get("exact_match_test", "McNemar") == "McNemar" else "p_cell",
                        f"{base}/exact_match_p_value")
        n = v.number("int", f"{base}/n")
        if not (delta and ci and p and p_holm):
            continue
        survives = {True: "yes", False: "no", None: "–"}[t.get("survives_seed_sd")]
        rows.append([_test_label(t["name"]), n.text if n else "–", f"{delta.text} {ci}", em.text if em else "–",
                     em_p.text if em_p else "–", p.text, p_holm.text, "yes" if p_holm.value < 0.05 else "no", survives])
        lo, hi = (v.number("1", f"{base}/delta_f1_ci/{end}", scale=-1) for end in (1, 0))
        flipped = f"[{lo.text}, {hi.text}]" if lo and hi else None  # the CI of A - B
        for pattern, (name, a, b) in CLAIMS.items():
            if re.search(pattern, t["name"]):
                v.text(name, claim_difference(a, b, delta, ci, p_holm, flipped_ci=flipped))
        found = re.match(r"alpha=2r vs alpha=(\d+) at r=(\d+)", t["name"])
        if found:
            alpha_claims.append((int(found.group(2)), claim_difference(
                "$alpha = 2r$", f"$alpha = {found.group(1)}$", delta, ci, p_holm, flipped_ci=flipped)
                + f" at $r = {found.group(2)}$"))
    significant = v.put("n_significant", "int", R + "/tests", op="n_significant")
    n_tests = v.number("int", R + "/tests", op="len")
    v.text("n_tests_phrase", plural(n_tests, "test") if n_tests else None, R + "/tests")
    v.text("claim_significant", claim_significant(significant, n_tests) if significant and n_tests else None,
           R + "/tests")
    v.text("claim_alpha", "; ".join(text for _, text in sorted(alpha_claims)) if alpha_claims else None,
           "tests: alpha=2r vs alpha=...")
    for name, *_ in CLAIMS.values():
        v.flag(f"has_{name}", name in v.fields)
    v.flag("has_claim_alpha", bool(alpha_claims))
    v.flag("has_tests", bool(rows))
    v.flag("has_test_table", len(rows) >= 2)  # a single comparison is stated in the text, without a table
    v.text("only_test", _test_label(tests[0]["name"]) if tests else None, R + "/tests/0/name")
    if rows:
        v.text("table_tests", table(["Comparison (A vs B)", "Q.", "ΔF1 (B − A) [95% CI]", "ΔEM", "_p_ EM", "_p_",
                                     "_p_ Holm", "Sig.", "> √2 seed sd"], rows, "lrrrrrrcc", size="7pt"))


def _seeds(v: Values, study: dict) -> None:
    R, seeds = f"{STUDY}#", study.get("seeds") or {}
    for label in ("centre", "best"):
        has = v.flag(f"has_seeds_{label}", bool(seeds.get(label)))
        if has:
            v.put(f"seeds_{label}_n", "int", f"{R}/seeds/{label}/runs", op="len")
            v.put(f"seeds_{label}_sd", "2", f"{R}/seeds/{label}/test_f1_sd")
            v.put(f"seeds_{label}_mean", "score", f"{R}/seeds/{label}/test_f1_mean")
    both = v.number("int", f"{R}/tests", op="n_survive_both")
    v.text("claim_survive_both", (f"{plural(both, 'difference is', 'differences are')} both significant and larger "
                                  "than $sqrt(2)$ times the seed deviation") if both.value else
           "no difference is both significant and larger than $sqrt(2)$ times the seed deviation")


def _cost_index(v: Values, settings: dict | None) -> int | None:
    """The cost study's configuration with a run's method, targets and rank (None when it was not measured)."""
    configs = (v.inputs.json(COST) or {}).get("configs") or []
    for i, c in enumerate(configs):
        if settings is None and c["method"] == "full_finetune":
            return i
        if settings is not None and c["method"] == "lora" and c["target_modules"] == settings.get("target_modules") \
                and c["lora_r"] == settings.get("lora_r"):
            return i
    return None


def _cost_step_statistic(configs: list[dict]) -> str:
    """'median' over the repetitions where the cost study repeated its steps (--repeats), else 'mean' (the
    one repetition's); the text, Table VIII and the cost figure all show this one."""
    return "median" if configs and all(c.get("step_cpu_seconds_median") is not None for c in configs) else "mean"


def _cost(v: Values) -> None:
    """cost_study.json: full fine-tuning against LoRA at the centre (attention, r = 16), and what rank and
    the MLP targets add, all measured in one command on the same batches."""
    study = v.inputs.json(COST) or {}
    configs, C = study.get("configs") or [], f"{COST}#"
    lora, full = _cost_index(v, {"target_modules": "attention", "lora_r": 16}), _cost_index(v, None)
    if not v.flag("has_cost_study", lora is not None and full is not None):
        return
    v.put("cost_cpu", "int", C + "/machine/torch_threads")
    v.text("cost_cpu_model", literal((study.get("machine") or {}).get("cpu_model", "?")))
    v.put("cost_batch", "int", C + "/batches/0")
    v.put("cost_steps", "int", C + "/settings/steps")
    L, F = f"{C}/configs/{lora}", f"{C}/configs/{full}"
    v.put("cost_centre_rank", "int", L + "/lora_r")
    stat = _cost_step_statistic(configs)
    step, update = f"/step_cpu_seconds_{stat}", f"/update_cpu_seconds_{stat}"
    v.put("cost_lora_s", "2", L + step)
    v.put("cost_full_s", "2", F + step)
    v.put("cost_full_step_ratio", "1", F + step, L + step, op="ratio")
    v.put("cost_lora_update_s", "2", L + update)
    v.put("cost_full_update_s", "2", F + update)
    v.text("cost_spread", _cost_spread(v, F, L) if v.flag("has_cost_spread", stat == "median") else "", C)
    forward_backward = v.put("cost_fb_ratio", "2", F + step, F + update, L + step, L + update, op="ratio_of_diffs")
    flops = v.number("2", "parameter_counts.json#/smollm2-135m/step_costs_r16/attention/ratio/step_flops")
    if forward_backward and flops:  # the measurement against the closed form of Section V
        gap = forward_backward.value / flops.value - 1
        v.text("claim_fb_vs_flops", "close to" if abs(gap) < 0.1 else "more than" if gap > 0 else "less than")
    v.flag("has_claim_fb_vs_flops", "claim_fb_vs_flops" in v.fields)
    v.put("cost_lora_gib", "1", L + "/peak_rss_mb", scale=1 / 1024)
    v.put("cost_full_gib", "1", F + "/peak_rss_mb", scale=1 / 1024)
    v.put("cost_full_mem_ratio", "1", F + "/peak_rss_mb", L + "/peak_rss_mb", op="ratio")
    v.put("cost_lora_mib", "1", L + "/checkpoint_bytes", scale=1 / 2**20)
    v.put("cost_full_mib", "int", F + "/checkpoint_bytes", scale=1 / 2**20)
    v.put("cost_full_ckpt_ratio", "int", F + "/checkpoint_bytes", L + "/checkpoint_bytes", op="ratio")
    ranks = sorted(c["lora_r"] for c in configs if c["method"] == "lora" and c["target_modules"] == "attention")
    low, high = (_cost_index(v, {"target_modules": "attention", "lora_r": r}) for r in (ranks[0], ranks[-1]))
    mlp = _cost_index(v, {"target_modules": "attention+mlp", "lora_r": 16})
    v.flag("has_cost_ranks", len(ranks) >= 2)
    if len(ranks) >= 2:
        v.put("cost_rank_low", "int", f"{C}/configs/{low}/lora_r")
        v.put("cost_rank_high", "int", f"{C}/configs/{high}/lora_r")
        ratio = v.put("cost_rank_step_ratio", "2", f"{C}/configs/{high}{step}", f"{C}/configs/{low}{step}",
                      op="ratio")
        v.text("cost_rank_spread", _ranges_side_by_side(v, f"{C}/configs/{high}", f"{C}/configs/{low}"), C)
        v.text("claim_rank_cost", None if ratio is None else
               "the frozen model's forward and backward dominate the step" if ratio.value < 1.25 else
               "the adapters' own products are a visible share of the step")
    v.flag("has_cost_mlp", mlp is not None)
    if mlp is not None:
        v.put("cost_mlp_step_ratio", "2", f"{C}/configs/{mlp}{step}", L + step, op="ratio")
        v.text("cost_mlp_spread", _ranges_side_by_side(v, f"{C}/configs/{mlp}", L), C)
        v.put("cost_mlp_mem_ratio", "2", f"{C}/configs/{mlp}/peak_rss_mb", L + "/peak_rss_mb", op="ratio")
        # on a CPU the adapters' products on every MLP matrix can cost as much as full fine-tuning's AdamW update
        v.put("cost_mlp_vs_full", "2", f"{C}/configs/{mlp}{step}", F + step, op="ratio")


def _ranges_side_by_side(v: Values, a: str, b: str) -> str:
    """' (ranges 2.70–3.67 and 2.65–3.69 s, which overlap)' for two repeated configurations' step times; '' for
    single repetitions: a ratio of two medians says little when their repetitions overlap."""
    ranges = [[v.number("2", f"{path}/step_cpu_seconds_spread/{i}") for i in (0, 1)] for path in (a, b)]
    if None in ranges[0] + ranges[1]:
        return ""
    (a_lo, a_hi), (b_lo, b_hi) = ranges
    overlap = a_lo.value <= b_hi.value and b_lo.value <= a_hi.value
    return f" (ranges {a_lo.text}–{a_hi.text} and {b_lo.text}–{b_hi.text} s{', which overlap' if overlap else ''})"


def _cost_spread(v: Values, full: str, lora: str) -> str | None:
    """The medians' repetitions and ranges: a ratio of two timings means little without their spread."""
    count = v.number("int", full + "/step_cpu_seconds_repetitions", op="len")
    ranges = [[v.number("2", f"{path}/step_cpu_seconds_spread/{i}") for i in (0, 1)] for path in (full, lora)]
    if count is None or None in ranges[0] + ranges[1]:
        return None
    (f_lo, f_hi), (l_lo, l_hi) = ranges
    return f"medians of {count.text} repetitions, ranges {f_lo.text}–{f_hi.text} and {l_lo.text}–{l_hi.text} s"


def _full_ft(v: Values, study: dict, runs: list[dict], best: int | None) -> None:
    """Quality from the study's runs; time, memory and checkpoint size from the cost study, where the two
    configurations were measured side by side."""
    R = f"{STUDY}#"
    full = _run_index(v.inputs, run_id=(study.get("selection") or {}).get("best_full_ft_run"))
    lora = best if best is not None else _run_index(v.inputs, run_id=(study.get("selection") or {}).get("centre_run"))
    if not v.flag("has_full_ft", full is not None and lora is not None):
        return
    rows = []
    stat = _cost_step_statistic((v.inputs.json(COST) or {}).get("configs") or [])  # the one the text quotes
    for label, k, settings in (("LoRA, best" if best is not None else "LoRA, centre", lora, runs[lora]["settings"]),
                               (f"Full FT, {_lr(runs[full]['settings'].get('learning_rate', 0))}", full, None)):
        cost = _cost_index(v, settings)
        C = f"{COST}#/configs/{cost}"
        cells = [v.number("int", f"{R}/runs/{k}/trainable_params"), v.number("score", f"{R}/runs/{k}/scores/test/f1")]
        if cost is not None:
            cells += [v.number("2", f"{C}/step_cpu_seconds_{stat}"), v.number("1", f"{C}/peak_rss_mb", scale=1 / 1024),
                      v.number("1", f"{C}/checkpoint_bytes", scale=1 / 2 ** 20)]
        rows.append([label, *(c.text if c else "–" for c in cells), *(["–"] * (5 - len(cells)))])
    v.put("lora_candidates", "int", f"{R}/selection/candidates", op="len")
    v.put("full_ft_candidates", "int", f"{R}/selection/full_ft_candidates", op="len")
    v.text("table_lora_full", table(["Method", "Trainable", "Test F1", "CPU s/step", "Peak GiB", "Weights MiB"],
                                    rows, "lrrrrr", size="7pt"))


def _budget_pair(v: Values, runs: list[dict]) -> None:
    """LoRA and full fine-tuning trained on the same larger budget, each scored on all of dev: their sizes, scores
    beside the paired test's claim (`_tests`), and whether the difference exceeds sqrt(2) x the seed sd. Training
    times are left out: the two runs may have shared the CPU with other work (the cost study compares cost)."""
    lora, full = (_run_index(v.inputs, name=name) for name in ("budget_lora", "budget_full_ft"))
    if not v.flag("has_budget_pair", None not in (lora, full) and "claim_budget_full_ft" in v.fields
                  and "seeds_centre_sd" in v.fields):
        return
    R = f"{STUDY}#/runs"
    v.put("budget_questions", "int", f"{R}/{lora}/settings/max_train_samples")
    v.put("budget_steps", "int", f"{R}/{lora}/settings/max_train_samples",
          f"{R}/{lora}/settings/per_device_train_batch_size", op="ratio")
    v.put("budget_n", "int", f"{R}/{lora}/scores/test/n")
    for label, k in (("lora", lora), ("full", full)):
        v.put(f"budget_{label}_f1", "score", f"{R}/{k}/scores/test/f1")
        v.ci(f"{R}/{k}/scores/test/f1_ci", f"budget_{label}_f1_ci")
    # one seed per method: a difference below sqrt(2) x one run's seed sd could be the seeds' alone
    test = next(t for t in (v.inputs.json(STUDY) or {}).get("tests") or []
                if re.search(BUDGET_TEST, t["name"]))
    v.text("budget_seed_clause", "more than" if test.get("survives_seed_sd") else "less than")


def _adapter_name(v: Values, adapter: str | None, trained_as: str | None = None) -> str:
    """Which adapter an evaluation used, in words: 'the final', 'the earlier selection’s final', 'the grid’s
    selected', 'the preliminary', a grid run's settings or 'a separately trained' (never a folder name).
    `trained_as`: the run the evaluation recorded its adapter was (`adapter_run`); an evaluation of the final
    export that records none predates it, so once a moved selection's final is the headline it is the earlier one's."""
    adapter = str(adapter or "")
    study = v.inputs.json(STUDY) or {}
    final = (study.get("final") or {}).get("run")
    if final and "model_checkpoints/final" in adapter and trained_as != final \
            and (trained_as or (study.get("final") or {}).get("earlier")):
        return "the earlier selection’s final"
    selected = (study.get("selection") or {}).get("best_run")
    # the preliminary adapter is `make run`'s output (runs/main, copied to results/main_run/)
    preliminary = ((v.inputs.json(PRE_CONFIG) or {}).get("training") or {}).get("output_dir") or \
        ("runs/main" if v.inputs.json(PRE_SUMMARY) is not None else None)
    if "model_checkpoints/final" in adapter or (final and final in adapter):
        return "the final"
    if "model_checkpoints/grid_best" in adapter or (selected and selected in adapter):
        return "the grid’s selected"
    if adapter and preliminary and Path(adapter) == Path(preliminary):
        return "the preliminary"
    run = next((r for r in (study.get("runs") or []) if r.get("run_id") and r["run_id"] in adapter), None)
    if run and run.get("grid_point"):
        return f"the grid’s {describe(run['grid_point'])}"
    return "a separately trained" if adapter else "no"


SPAN_FULL_DEV = "compare_final_span_full_dev.json"  # `make decoding-full-dev`: greedy (a) vs the best span-aware (b)
DECODING_SPEED = "decoding_speed.json"  # `loraqa decoding-speed`: each strategy alone, against greedy in each round


def _strategies(v: Values) -> None:
    """The decoding grid's table and claims. Speed comes from `loraqa decoding-speed` (each strategy decoded
    alone), never from the grid, which decodes greedy and the sampled strategies in one pass (their questions/s
    is the whole pass's); its column appears once that measurement covers every row of the grid."""
    name = FINAL_STRATEGIES if v.inputs.json(FINAL_STRATEGIES) is not None else STRATEGIES
    data, S = v.inputs.json(name), f"{name}#"
    rows = (data or {}).get("strategies") or []
    if not v.flag("has_strategies", bool(rows) and rows[0].get("strategy") == "greedy"):
        return
    v.put("strat_n", "int", S + "/n")
    sampled = [j for j, r in enumerate(rows) if (r.get("generation") or {}).get("do_sample", j > 0)]
    v.put("strat_seeds", "int", f"{S}/strategies/{sampled[0] if sampled else 0}/seeds", op="len")
    v.text("strat_adapter", _adapter_name(v, data.get("adapter"), data.get("adapter_run")))
    v.flag("has_strategies_on_final", v.fields["strat_adapter"] == "the final")
    speed = {r.get("strategy"): k for k, r in enumerate((v.inputs.json(DECODING_SPEED) or {}).get("strategies") or [])}
    timed = v.flag("has_decoding_speed", all(r["strategy"] in speed for r in rows))
    if timed:
        v.put("speed_n", "int", f"{DECODING_SPEED}#/n")
        v.put("speed_repeats", "int", f"{DECODING_SPEED}#/repeats")
        # the widest range of one strategy's per-round ratios: how far apart two cells must be to differ
        ranges = [r.get("vs_greedy_spread") for r in v.inputs.json(DECODING_SPEED)["strategies"]]
        widest = max((hi - lo for lo, hi in ranges), default=None) if None not in ranges else None
        v.text("speed_spread", f", whose ratios span at most {widest:.2f}" if widest is not None else "")
    else:  # the caption's clause is left out: nothing to fill
        v.text("speed_n", "")
        v.text("speed_repeats", "")
        v.text("speed_spread", "")
    body, f1s = [], []
    for j, row in enumerate(rows):
        base = f"{S}/strategies/{j}"
        em, f1 = v.number("score", f"{base}/exact_match"), v.number("score", f"{base}/f1")
        sd = v.number("1", f"{base}/f1_sd") if j in sampled else None
        cells = [v.number(fmt, f"{base}/{k}") for k, fmt in (("verbatim_in_context", "2"), ("mean_answer_words", "1"),
                                                              ("seed_disagreement", "2"))]
        if j not in sampled:  # one answer per question: agreement between seeds measures nothing
            cells[-1] = None
        if timed:
            cells.append(v.number("x2", f"{DECODING_SPEED}#/strategies/{speed[row['strategy']]}/vs_greedy_median"))
        body.append([strategy_label(row["strategy"]), em.text, f"{f1.text} ± {sd.text}" if sd else f1.text,
                     *(c.text if c else "–" for c in cells)])
        f1s.append((strategy_label(row["strategy"]), f1, j))
    header = ["Strategy", "EM", "F1 (± sd)", "Verb.", "Words", "Seeds ≠"] + \
        (["Speed"] if timed else [])
    v.text("table_strategies", table(header, body, "l" + "r" * (len(header) - 1)))
    v.text("claim_decoding", claim_best_strategy([(label, f1) for label, f1, _ in f1s]))
    if sampled:
        worst = min((f1s[j] for j in sampled), key=lambda s: s[1].value)
        closest = max((f1s[j] for j in sampled), key=lambda s: s[1].value)
        costs = {tag: v.number("1", f"{S}/strategies/0/f1", f"{S}/strategies/{j}/f1", op="diff")
                 for tag, (_, _, j) in (("closest", closest), ("worst", worst))}
        v.text("claim_sampling", claim_sampling("greedy", (closest[0], costs["closest"]), (worst[0], costs["worst"])))
    v.flag("has_sampled", bool(sampled))
    generation = [r.get("generation") or {} for r in rows]
    constrained = [j for j, g in enumerate(generation) if g.get("constrain_to_context")]
    if v.flag("has_constrained", bool(constrained)):
        shares = [v.number("2", f"{S}/strategies/{j}/verbatim_in_context") for j in constrained]
        greedy = v.number("2", f"{S}/strategies/0/verbatim_in_context")
        v.text("claim_constrained", claim_verbatim(shares, greedy))
    beams = [j for j, g in enumerate(generation) if g.get("num_beams", 1) > 1 and not g.get("constrain_to_context")]
    if v.flag("has_beams", bool(beams)):
        v.text("claim_beams", claim_beams(
            v.number("1", f"{S}/strategies/0/mean_answer_words"), v.number("score", f"{S}/strategies/0/f1"),
            [(int(generation[j]["num_beams"]), v.number("1", f"{S}/strategies/{j}/mean_answer_words"),
              v.number("score", f"{S}/strategies/{j}/f1")) for j in beams]))
    # the best span-aware row (the rule `make decoding-full-dev` applies) and its paired test on all of dev
    aware = [j for j, g in enumerate(generation) if g.get("constrain_to_context") or g.get("num_beams", 1) > 1]
    if v.flag("has_span_aware", bool(aware)):
        v.text("span_best", f1s[max(aware, key=lambda j: rows[j]["f1"])][0])
    C = f"{SPAN_FULL_DEV}#"
    # two decimals: the difference over 10,570 questions is small, and a bound must not print as "−0.0"
    lo, hi = (v.number("signed2", f"{C}/f1/delta_ci/{end}") for end in (0, 1))
    v.text("span_full_ci", f"[{lo.text}, {hi.text}]" if lo and hi else None, C + "/f1/delta_ci")
    found = [v.put("span_full_n", "int", C + "/n_common"), v.put("span_full_delta", "signed2", C + "/f1/delta"),
             lo, hi, v.put("span_full_p", "p_is", C + "/f1/permutation_p_value"),
             v.put("span_full_em_delta", "signed2", C + "/exact_match/delta"),
             v.put("span_full_em_p", "p_exact_is", C + "/exact_match/mcnemar/p_value")]
    if v.flag("has_span_full_dev", bool(aware) and None not in found):
        v.text("span_full_verdict", ": on all of dev it is worse than greedy" if hi.value < 0 else
               ", a gain that holds on all of dev" if lo.value > 0 else ", no difference all of dev can show")
    else:
        v.text("span_full_verdict", "")


def _failures(v: Values) -> None:
    data, F = v.inputs.json(FAILURES), f"{FAILURES}#"
    if not v.flag("has_failures", bool(data and data.get("counts"))):
        return
    v.put("fail_n", "int", F + "/n")
    v.text("fail_adapter", _adapter_name(v, data.get("adapter"), data.get("adapter_run")))
    counts = data["counts"]
    wrong = [(c, n) for c, n in counts.items() if c != "correct"]
    ranked = sorted(wrong, key=lambda cn: -cn[1])
    parts = []
    for category, _ in ranked:
        share = v.number("pct", f"{F}/counts/{category.replace('/', '~1')}", f"{F}/n", op="ratio", scale=100)
        parts.append(f"_{literal(category)}_ ({share.text})")
    v.text("fail_categories", ", ".join(parts) or None, F)
    if ranked:
        v.text("claim_failure_top", claim_failure_top(ranked[0][0]))
    # the hardest and easiest question word, among those asked often enough (1% of the questions) to compare
    types = {t: s for t, s in (data.get("by_question_type") or {}).items()
             if t != "other" and s.get("n", 0) >= 0.01 * data["n"]}
    if v.flag("has_claim_question_types", len(types) >= 2):
        def f1(t):
            return v.number("score", f"{F}/by_question_type/{t}/f1")

        hard, easy = min(types, key=lambda t: types[t]["f1"]), max(types, key=lambda t: types[t]["f1"])
        v.text("claim_question_types", f"_{literal(hard)}_ questions are the hardest (F1 {f1(hard).text}) and "
                                       f"_{literal(easy)}_ questions the easiest (F1 {f1(easy).text}) of the "
                                       f"{len(types)} question words that each make up at least 1% of the set")
    rows = []
    for j, example in enumerate(data.get("examples") or []):
        em = v.number("score", f"{F}/examples/{j}/f1", scale=100)
        rows.append([literal(example["category"]), literal(example["question"]), _excerpt(example),
                     _golds(example["gold"]),
                     f"{literal(example['prediction'])} ({em.text if em else '–'})"])
    v.flag("has_fail_examples", bool(rows))
    if rows:
        v.text("table_failures", table(["Category", "Question", "Context excerpt", "Gold", "Prediction (F1)"], rows,
                                       "lllll", widths="(auto, 1.1fr, 2.5fr, 0.95fr, 1.05fr)", size="7pt"))


def _golds(golds: list[str], shown: int = 2) -> str:
    """The first distinct gold answers and how many more the annotators gave (the table's rows stay short)."""
    distinct = list(dict.fromkeys(golds))
    more = len(distinct) - shown
    return " / ".join(literal(g) for g in distinct[:shown]) + (f" (+{more})" if more > 0 else "")


def _excerpt(example: dict) -> str:
    """The excerpt with the gold span in bold and the predicted span underlined (they may overlap)."""
    text = example["excerpt"]
    flags = [[False, False] for _ in text]
    for start, end, kind in example.get("spans") or []:
        for i in range(max(start, 0), min(end, len(text))):
            flags[i][kind != "gold"] = True
    out, i = [], 0
    while i < len(text):
        j = i
        while j < len(text) and flags[j] == flags[i]:
            j += 1
        piece = literal(text[i:j])
        gold, predicted = flags[i]
        piece = f"#strong[{piece}]" if gold else piece
        out.append(f"#underline[{piece}]" if predicted else piece)
        i = j
    return "".join(out)


def _figures(v: Values, plots: Path, figures_dir: Path | None) -> None:
    for name, stem in FIGURES.items():
        found = next((plots / f"{stem}{ext}" for ext in (".pdf", ".png") if (plots / f"{stem}{ext}").exists()), None)
        v.flag(f"has_fig_{name}", found is not None)
        if found is None:
            v.text(f"fig_{name}", f'pending-figure("results/plots/{stem}.pdf")')
            continue
        if figures_dir is not None:
            figures_dir.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(found, figures_dir / found.name)
        v.text(f"fig_{name}", f'image("/figures/{found.name}", width: 100%)')


def _theory(v: Values) -> None:
    """Placeholders of sections/theory.typ: closed-form counts and costs (`loraqa param-counts`, which runs
    `loraqa.measure.lora_math` on GPT-2's and SmolLM2's configs) and the study's masking ablation."""
    counts = COUNTS
    for model, key in (("gpt2", "gpt2"), ("smollm2", "smollm2-135m")):
        v.put(f"{model}_base_params", "int", f"{counts}/{key}/base_params")
        for preset, label in (("attention", "attention"), ("attention+mlp", "attention_mlp")):
            v.put(f"{model}_{label}_r16_trainable", "int", f"{counts}/{key}/presets/{preset}/16/trainable_params")
            # rho = P / P_LoRA, as lora_math defines it (the file's reduction_factor may predate that definition)
            v.put(f"{model}_{label}_r16_reduction", "1", f"{counts}/{key}/presets/{preset}/16/base_params",
                  f"{counts}/{key}/presets/{preset}/16/trainable_params", op="ratio")
    costs = f"{counts}/smollm2-135m/step_costs_r16/attention"
    v.put("smollm2_attention_r16_flops_ratio", "2", f"{costs}/ratio/step_flops")
    for method, name in (("full", "smollm2_full_train_state_mb"), ("lora", "smollm2_attention_r16_train_state_mb")):
        v.put(name, "int", f"{costs}/{method}/grad_bytes", f"{costs}/{method}/optimizer_state_bytes", op="sum",
              scale=1e-6)
    share = v.put("prompt_token_share", "pct", f"{counts}/prompt_tokens/prompt_share", scale=100)
    v.text("prompt_weight_word", "mostly" if share is None or share.value > 50 else "partly")
    tests = (v.inputs.json("evaluation_results.json") or {}).get("tests") or []
    index = next((i for i, t in enumerate(tests) if t["name"].startswith("answer-only loss")), None)
    if v.flag("has_masking_ablation", index is not None):
        source = f"evaluation_results.json#/tests/{index}"
        # the test's delta is (whole-sequence loss) - (answer-only loss); the text states masked minus unmasked
        v.put("masking_ablation_f1_delta", "signed", f"{source}/delta_f1", scale=-1)
        lo = v.number("signed", f"{source}/delta_f1_ci/1", scale=-1)
        hi = v.number("signed", f"{source}/delta_f1_ci/0", scale=-1)
        v.text("masking_ablation_f1_ci", f"[{lo.text}, {hi.text}]" if lo and hi else None, source)


# ---------------------------------------------------------------------------------------------- run folders

OPTIMIZERS = {"adamw_torch_fused": "AdamW", "adamw_torch": "AdamW", "adamw_hf": "AdamW", "sgd": "SGD"}


def _optimizer(name: str) -> str:
    return OPTIMIZERS.get(name, name.replace("_", " "))


def _schedule(name: str) -> str:
    return "linear to 0" if name == "linear" else name.replace("_", " ")


def _decoding(sample: bool) -> str:
    return "sampling" if sample else "greedy"


def _run_file(v: Values, run_id: str, name: str) -> str:
    """A file of a study run's folder, relative to the results folder (the sweep writes results/sweep/<run>/)."""
    folder = Path((v.inputs.json(STUDY) or {}).get("sweep_dir") or "sweep").name
    return f"{folder}/{run_id}/{name}"


def _cell(v: Values, ids: list[str], fmt: str, *pointers: str, op: str = "value") -> str:
    """The distinct values, in increasing order, that runs `ids` have at `pointers` ('file#/pointer' with the
    file inside the run folder); '–' where none has them."""
    numbers = []
    for run_id in ids:
        sources = [_run_file(v, run_id, p.split("#")[0]) + "#" + p.split("#")[1] for p in pointers]
        numbers += [n] if (n := v.number(fmt, *sources, op=op)) else []
    texts = [n.text for n in sorted(numbers, key=lambda n: n.value)]
    return ", ".join(dict.fromkeys(texts)) or "–"


def _words(v: Values, ids: list[str], name: str, pointer: str, words) -> str:
    """The distinct settings (strings, booleans) that runs `ids` have at `pointer`, each put in words."""
    found = []
    for run_id in ids:
        try:
            found.append(words(v.inputs.resolve(_run_file(v, run_id, name) + "#" + pointer)))
        except KeyError:
            continue
    return ", ".join(dict.fromkeys(found)) or "–"


def _hyperparameters(v: Values) -> None:
    """The training and decoding settings of the grid runs and of the final model, read from each run's resolved
    configuration (run_config.json), step count (summary.json) and test evaluation (eval_test.json)."""
    study, runs = v.inputs.json(STUDY) or {}, _runs(v.inputs)
    has_config = lambda r: v.inputs.json(_run_file(v, r["run_id"], "run_config.json")) is not None  # noqa: E731
    final = _run_index(v.inputs, run_id=(study.get("final") or {}).get("run"))
    columns = [("Grid runs", [r["run_id"] for r in runs if r.get("group") == "grid" and has_config(r)])]
    if final is not None and has_config(runs[final]):
        columns.append(("Final model", [runs[final]["run_id"]]))
    columns = [(header, ids) for header, ids in columns if ids]
    if not v.flag("has_hyperparameters", bool(columns)):
        return
    C, S, E = "run_config.json#/training", "summary.json#", "eval_test.json#/generation"
    words = lambda ids, name, pointer, say: literal(_words(v, ids, name, pointer, say))  # noqa: E731
    rows = []
    for label, cell in (
            ("Optimizer", lambda ids: words(ids, "run_config.json", "/training/optim", _optimizer)),
            ("$beta_1$, $beta_2$; $epsilon$", lambda ids: f"{_cell(v, ids, 'g', f'{C}/adam_beta1')}, "
                                                          f"{_cell(v, ids, 'g', f'{C}/adam_beta2')}; "
                                                          f"{_cell(v, ids, 'lr', f'{C}/adam_epsilon')}"),
            ("Weight decay", lambda ids: _cell(v, ids, "g", f"{C}/weight_decay")),
            ("Peak learning rate", lambda ids: _cell(v, ids, "lr", f"{C}/learning_rate")),
            ("Warm-up from 0 (steps)", lambda ids: _cell(v, ids, "int", f"{C}/warmup_steps", f"{S}/global_steps",
                                                         op="warmup_steps")),
            ("Then", lambda ids: words(ids, "run_config.json", "/training/lr_scheduler_type", _schedule)),
            ("Gradient clipping (norm)", lambda ids: _cell(v, ids, "g", f"{C}/max_grad_norm")),
            ("Questions per step", lambda ids: _cell(v, ids, "int", f"{C}/per_device_train_batch_size",
                                                     f"{C}/gradient_accumulation_steps", op="product")),
            ("Training questions", lambda ids: _cell(v, ids, "int", "run_config.json#/data/max_train_samples")),
            ("Epochs (steps)", lambda ids: f"{_cell(v, ids, 'g', f'{C}/num_train_epochs')} "
                                           f"({_cell(v, ids, 'int', f'{S}/global_steps')})"),
            ("Target modules", lambda ids: words(ids, "run_config.json", "/lora/target_modules",
                                                 lambda t: TARGETS.get(t, t))),
            ("Rank _r_ ($alpha$)", lambda ids: f"{_cell(v, ids, 'int', 'run_config.json#/lora/lora_r')} "
                                               f"({_cell(v, ids, 'int', 'run_config.json#/lora/lora_alpha')})"),
            ("LoRA dropout", lambda ids: _cell(v, ids, "g", "run_config.json#/lora/lora_dropout")),
            ("Maximum length (tokens)", lambda ids: _cell(v, ids, "int", "run_config.json#/data/max_length")),
            ("Precision", lambda ids: words(ids, "run_config.json", "/training/bf16",
                                            lambda bf16: "bf16 autocast" if bf16 else "float32")),
            ("Decoding (new tokens)", lambda ids: f"{words(ids, 'eval_test.json', '/generation/do_sample', _decoding)} "
                                                  f"({_cell(v, ids, 'int', f'{E}/max_new_tokens')})")):
        rows.append([label, *(cell(ids) for _, ids in columns)])
    v.text("table_hyperparameters", table(["Setting", *(header for header, _ in columns)], rows, "l" + "r" * len(columns),
                                          widths="(auto, 1fr" + ", auto" * (len(columns) - 1) + ")"))
    v.flag("has_hyperparameters_final", len(columns) == 2)
    # the first optimizer step: transformers' linear warm-up gives it learning rate 0 (Section V)
    if final is not None:
        v.put("warmup_final", "int", _run_file(v, runs[final]["run_id"], f"{C}/warmup_steps"),
              _run_file(v, runs[final]["run_id"], f"{S}/global_steps"), op="warmup_steps")


def _eval_cut(v: Values) -> None:
    """How evaluation cuts a prompt that does not fit: the context loses its end, so that prompt plus the
    longest answer fit the length the adapter was trained at; how many of the final model's test prompts
    (and of the grid's test subset) that cut."""
    study, runs = v.inputs.json(STUDY) or {}, _runs(v.inputs)
    final = _run_index(v.inputs, run_id=(study.get("final") or {}).get("run"))
    if final is None:
        v.flag("has_eval_cut", False)
        return
    run_id = runs[final]["run_id"]
    config, evaluation = _run_file(v, run_id, "run_config.json#"), _run_file(v, run_id, "eval_test.json#")
    found = [v.put("eval_prompt_limit", "int", f"{config}/data/max_length",
                   f"{evaluation}/generation/max_new_tokens", op="diff"),
             v.put("eval_max_new_tokens", "int", f"{evaluation}/generation/max_new_tokens"),
             v.put("eval_cut_n", "int", f"{evaluation}/prompts_cut"),
             v.put("eval_cut_of", "int", f"{evaluation}/n"),
             v.put("eval_cut_pct", "pct", f"{evaluation}/prompts_cut", f"{evaluation}/n", op="ratio", scale=100)]
    v.flag("has_eval_cut", None not in found)


def _value_range(values: list[tuple[Number, str]]) -> str:
    """'125 (lr = 1e-4) to 200 (lr = 4e-3)': the smallest and largest of one number over the learning rates
    (the first rate that has each), or the one value when all are equal."""
    low, high = min(values, key=lambda e: e[0].value), max(values, key=lambda e: e[0].value)
    if low[0].text == high[0].text:
        return f"{low[0].text} at every rate"
    return f"{low[0].text} ({low[1]}) to {high[0].text} ({high[1]})"


def _dynamics(v: Values) -> None:
    """The training-dynamics paragraph from the loss curves of the grid runs and the final model: how many runs
    of each learning rate reach the centre's final validation loss and when, where the curves flatten (90% of
    the fall done), and the gap between the final validation loss and the training loss of the last steps."""
    study, runs, R = v.inputs.json(STUDY) or {}, _runs(v.inputs), f"{STUDY}#/runs"
    centre = _run_index(v.inputs, run_id=(study.get("selection") or {}).get("centre_run"))
    grid = [(k, r) for k, r in enumerate(runs) if r.get("group") == "grid"
            and len((r.get("curves") or {}).get("validation") or []) >= 2 and (r.get("curves") or {}).get("train")]
    rates = sorted({r["settings"].get("learning_rate") for _, r in grid}, reverse=True)
    if not v.flag("has_dynamics", centre is not None and len(rates) >= 2
                  and len((runs[centre].get("curves") or {}).get("validation") or []) >= 2):
        return
    last = len(runs[centre]["curves"]["validation"]) - 1
    threshold = f"{R}/{centre}/curves/validation/{last}/1"
    v.put("dyn_threshold", "3", threshold)
    reach, flat, gaps = [], [], []
    for rate in rates:
        ks = [k for k, r in grid if r["settings"].get("learning_rate") == rate]
        curves = [f"{R}/{k}/curves/validation" for k in ks]
        lr = f"lr = {_lr(rate)}"
        count = v.number("int", threshold, *curves, op="runs_reaching")
        step = v.number("int", threshold, *curves, op="median_first_step")
        of = len(ks)
        if count.value == 0:
            reach.append(f"none of the {of} runs at {lr}")
        else:
            who = (("both runs" if of == 2 else f"all {of} runs") if count.value == of else f"{count.text} of {of} runs")
            reach.append(f"{who} at {lr} (median step {step.text})")
        flat.append((v.number("int", *curves, op="median_step_90"), lr))
        pairs = [p for k in ks for p in (f"{R}/{k}/curves/train", f"{R}/{k}/curves/validation")]
        gaps.append((v.number("2", *pairs, op="mean_gap"), lr))
    v.put("dyn_total_steps", "int", f"{R}/{centre}/curves/validation/{last}/0")
    v.text("dyn_reach", "; ".join(reach))
    v.text("dyn_flat", _value_range(flat))
    v.text("dyn_gap", _value_range(gaps))
    final = _run_index(v.inputs, run_id=((v.inputs.json(STUDY) or {}).get("final") or {}).get("run"))
    curve = ((runs[final].get("curves") or {}) if final is not None else {}).get("validation") or []
    if v.flag("has_dynamics_final", len(curve) >= 2 and bool(runs[final]["curves"].get("train"))):
        F = f"{R}/{final}/curves"
        v.put("dyn_final_first", "3", f"{F}/validation/0/1")
        v.put("dyn_final_first_step", "int", f"{F}/validation/0/0")
        v.put("dyn_final_last_step", "int", f"{F}/validation/{len(curve) - 1}/0")
        v.put("dyn_final_flat", "int", f"{F}/validation", op="median_step_90")
        v.put("dyn_final_gap", "2", f"{F}/train", f"{F}/validation", op="mean_gap")


def _pending(v: Values) -> None:
    """One list of the study's parts that have no result yet, for the single 'still running' note."""
    on = lambda name: v.fields.get(name) == "true"  # noqa: E731
    pending = (v.inputs.json("evaluation_results.json") or {}).get("pending") or []
    full_ft_pending = any(run_id.startswith("full_ft") for run_id in pending)
    parts = [("the remaining grid runs", on("has_complete_grid")),
             ("the extra seeds", on("has_seeds_centre") and on("has_seeds_best")),
             ("the fixed-$alpha$ series", on("has_claim_alpha")),
             ("full fine-tuning" if not on("has_full_ft") else "full fine-tuning's other learning rates",
              on("has_full_ft") and not full_ft_pending),
             ("the prompt-masking ablation", on("has_claim_masking")),
             ("the `max_length` ablation", on("has_claim_max_length")),
             ("the final model", on("has_final")),
             ("the untuned model on all of dev", on("has_final_baseline") or not on("has_final")),
             ("the best prompt on all of dev", on("has_prompted_full_dev") or not on("has_prompted"))]
    missing = [name for name, done in parts if not done]
    text = ", ".join(missing[:-1]) + (" and " if len(missing) > 1 else "") + missing[-1] if missing else \
        "the runs still queued"
    v.text("pending_parts", text)


def report_values(results_dir: str | Path, figures_dir: Path | None = None) -> Values:
    """Every placeholder's value from the result files (figures are copied to `figures_dir` when given)."""
    v = Values(Inputs(results_dir))
    for part in (_headline, _prompted, _bench, _cost, _data_stats, _label_example, _padding, _study, _main_table, _strategies,
                 _failures):
        part(v)
    _figures(v, Path(results_dir) / "plots", figures_dir)
    _theory(v)
    _hyperparameters(v)
    _eval_cut(v)
    _dynamics(v)
    _pending(v)
    return v
