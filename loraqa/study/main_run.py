"""`loraqa run` (`make run`): the main job in one call. A finished training run -> the untuned and the tuned model
evaluated on the same dev questions, their paired comparison, and a summary that says what was trained."""
from __future__ import annotations

import json
from pathlib import Path

from ..config import EvaluateArguments, GenerationSettings, ModelArguments
from ..evaluation.analysis import compare
from ..evaluation.evaluate import evaluate
from ..files import write_json_atomic

# `loraqa run`'s own defaults (flags and --config override them): a 12-minute training budget on 3,000 questions
RUN_DEFAULTS = {"output_dir": "runs/main", "max_train_samples": 3000, "max_eval_samples": 64, "eval_steps": 50,
                "save_steps": 50, "logging_steps": 10, "max_train_minutes": 12}
EVAL_QUESTIONS = 300


def evaluate_run(run_dir: str | Path, model_args: ModelArguments, *, max_samples: int = EVAL_QUESTIONS) -> dict:
    """Baseline and fine-tuned scores on the same `max_samples` dev questions of the run's `validation_file`,
    and their comparison; writes eval_baseline.json, eval_finetuned.json and comparison.json into the run
    directory. One process only (rank 0 of a torchrun launch: see `cli._run`)."""
    out = Path(run_dir)
    summary = json.loads((out / "summary.json").read_text())
    data = json.loads((out / "run_config.json").read_text())["data"]["validation_file"]
    model = ModelArguments(summary["model_resolved"], model_args.cache_dir)
    evaluations = {name: evaluate(model, EvaluateArguments(data=data, adapter=adapter, max_samples=max_samples,
                                                           output=str(out / f"eval_{name}.json")), GenerationSettings())
                   for name, adapter in (("baseline", None), ("finetuned", str(out)))}
    comparison = compare(str(out / "eval_baseline.json"), str(out / "eval_finetuned.json"))
    write_json_atomic(out / "comparison.json", comparison)
    return {"run_dir": str(out), "summary": summary, "evaluations": evaluations, "comparison": comparison,
            "trained": trained(out)}


def trained(run_dir: str | Path) -> dict:
    """What a run trained: its steps and questions against what its schedule would have done without the
    time budget, and whether the budget (or its deadline) cut it."""
    run_dir = Path(run_dir)
    summary = json.loads((run_dir / "summary.json").read_text())
    training = json.loads((run_dir / "run_config.json").read_text())["training"]
    # summaries written before `examples_per_step` was recorded come from one process
    per_step = summary.get("examples_per_step") or (training["per_device_train_batch_size"]
                                                    * training["gradient_accumulation_steps"])
    budget = summary.get("budget") or {}
    steps = summary["global_steps"]
    questions = steps * per_step
    if training.get("max_steps", -1) <= 0:  # the epochs end the schedule: the last batch of each may be short
        questions = min(questions, int(summary["train_examples"] * training["num_train_epochs"]))
    return {"steps": steps, "planned_steps": budget.get("steps_without_budget") or steps, "questions": questions,
            "questions_available": summary["train_examples"], "max_train_minutes": budget.get("max_train_minutes"),
            "cut_by_budget": bool(budget.get("limited")), "stopped_at_deadline": budget.get("stopped_at_deadline")}


def summary_lines(result: dict) -> list[str]:
    """The lines `loraqa run` prints."""
    summary, done = result["summary"], result["trained"]
    cut = ""
    if done["stopped_at_deadline"]:
        cut = f", stopped at the {done['max_train_minutes']:g}-minute budget's deadline"
    elif done["cut_by_budget"]:
        cut = f", the rest cut by the {done['max_train_minutes']:g}-minute budget"
    lines = [f"\nmodel: {summary['model_resolved']}  (trained {done['steps']} of {done['planned_steps']} steps: "
             f"{done['questions']:,} of {done['questions_available']:,} training questions{cut}; "
             f"{summary['train_runtime_s']:.0f} s)"]
    for name, r in result["evaluations"].items():
        lines.append(f"{name:10s} EM {r['exact_match']:5.1f} [{r['exact_match_ci'][0]:.1f}, {r['exact_match_ci'][1]:.1f}]"
                     f"  F1 {r['f1']:5.1f} [{r['f1_ci'][0]:.1f}, {r['f1_ci'][1]:.1f}]  on {r['n']} dev questions")
    f1 = result["comparison"]["f1"]
    lines.append(f"F1 gain {f1['delta']:+.1f} [{f1['delta_ci'][0]:+.1f}, {f1['delta_ci'][1]:+.1f}], "
                 f"permutation p = {f1['permutation_p_value']:.3g}")
    lines.append(f"results: {result['run_dir']}/")
    return lines
