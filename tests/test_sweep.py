"""The sweep on a tiny GPT-2: every run once, resumable, printable as commands, collected into one table."""
import json
import shutil
from pathlib import Path

import pytest
import yaml

from loraqa.config import ConfigError
from loraqa.data.squad import heldout_split, load_squad
from loraqa.study.spec import load_spec
from loraqa.study.sweep import Run, commands, estimated_seconds, measured_rates, plan, plan_study, run_sweep
from loraqa.evaluation.stats import PERMUTATION_RESAMPLES


def _spec(tmp_path, model_dir, squad_file) -> str:
    spec = {
        "base": {"model": str(model_dir), "train_file": str(squad_file), "validation_file": str(squad_file),
                 "max_length": 128, "max_steps": 4, "max_train_samples": 4, "per_device_train_batch_size": 2, "eval_steps": 2,
                 "save_steps": 2, "logging_steps": 1, "disable_tqdm": True, "lora_dropout": 0.0},
        "grid": {"learning_rate": [1.0e-3, 5.0e-3],
                 "rank": [{"lora_r": 2, "lora_alpha": 4}, {"lora_r": 4, "lora_alpha": 8}]},
        "centre": {"learning_rate": 1.0e-3, "rank": {"lora_r": 4, "lora_alpha": 8}},
        "runs": {"baseline": {"train": False}, "final": {"from": "best", "seed": 1, "max_train_samples": 5}},
        "first": ["baseline"],
        "evaluations": {"test": {"data": str(squad_file), "max_samples": 5, "max_new_tokens": 4}},
        "select_on": "test",
    }
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return str(path)


def test_plan_orders_runs_and_ties_settings(tmp_path, tiny_gpt2_dir, squad_file):
    runs = plan(load_spec(_spec(tmp_path, tiny_gpt2_dir, squad_file)))
    assert [r.name for r in runs][:2] == ["baseline", "lr0.001-r4-alpha8"]  # first, then the centre
    assert len(runs) == 5  # final waits for the grid
    assert all(r.settings["lora_alpha"] == 2 * r.settings["lora_r"] for r in runs if r.kind == "grid")
    assert len({r.run_id for r in runs}) == 5
    line = commands(runs[1], tmp_path / runs[1].run_id)
    assert line[0][:2] == ["loraqa", "train"] and "--lora_alpha" in line[0] and line[1][:2] == ["loraqa", "evaluate"]


@pytest.mark.parametrize("spec, message", [
    ({"grid": {"lora_r": 4}}, "grid.lora_r: expected a non-empty list"),
    ({"grid": {"lora_rank": [4]}}, "unknown setting(s) lora_rank"),
    ({"runs": {"x": {"from": "worst"}}}, "runs.x.from: only 'best'"),
    ({"evaluations": {}}, "evaluations: at least one is needed"),
])
def test_bad_specs_are_one_clear_line(tmp_path, spec, message):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump({"evaluations": {"test": {}}, **spec}))
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_spec(path)
    path.write_text("base: {model: [unclosed\n")
    with pytest.raises(ConfigError, match="bad.yaml: line 2, column 1: not valid YAML"):
        load_spec(path)


def test_sweep_runs_each_run_once_resumes_and_collects(tmp_path, tiny_gpt2_dir, squad_file, capsys):
    spec = _spec(tmp_path, tiny_gpt2_dir, squad_file)
    out = tmp_path / "sweep"
    # a time-boxed first session: three runs, then stop
    first = run_sweep(spec, str(out), limit=3)
    assert sorted(first.values()) == ["done"] * 3
    capsys.readouterr()
    pending = run_sweep(spec, str(out), print_commands=True)
    printed = capsys.readouterr().out.strip().splitlines()
    assert len(printed) == len(pending) == 2 and all(line.startswith("loraqa train ") for line in printed)
    # an interrupted run: its results are gone, its last checkpoint is not
    resumed = next(p for p in out.iterdir() if p.name.startswith("lr0.001-r4"))
    for name in ("done.json", "summary.json", "eval_test.json", "adapter_model.safetensors"):
        (resumed / name).unlink()
    shutil.rmtree(resumed / "checkpoint-4", ignore_errors=True)
    # a run killed before its first checkpoint: its directory holds a config and metrics, nothing to resume
    restarted = next(p for p in out.iterdir() if not p.name.startswith(("baseline", "lr0.001-r4")))
    for name in ("done.json", "summary.json", "eval_test.json", "adapter_model.safetensors"):
        (restarted / name).unlink()
    for checkpoint in restarted.glob("checkpoint-*"):
        shutil.rmtree(checkpoint)
    second = run_sweep(spec, str(out))
    assert sorted(second.values()) == ["done"] * 6  # 4 grid + baseline + final, each done
    log = (resumed / "train.log").read_text()
    assert "--resume_from_checkpoint" in log and "checkpoint-2" in log
    assert log.count("$ loraqa train") == 2  # the first attempt and the resumed one
    assert "--overwrite_output_dir true" in (restarted / "train.log").read_text()
    for run_dir in out.iterdir():
        if run_dir.name not in (resumed.name, restarted.name) and not run_dir.name.startswith("baseline"):
            assert (run_dir / "train.log").read_text().count("$ loraqa train") == 1, run_dir.name  # never twice
    assert run_sweep(spec, str(out)) == {r: "done" for r in second}  # a third call finds nothing to do

    from loraqa.study.collect import collect

    results = collect(spec, str(out), str(tmp_path / "evaluation_results.json"), checkpoints=str(tmp_path / "ckpt"))
    on_disk = json.loads((tmp_path / "evaluation_results.json").read_text())
    assert on_disk["selection"] == results["selection"] and not results["pending"]
    grid = [r for r in results["runs"] if r["group"] == "grid"]
    best = max(grid, key=lambda r: r["scores"]["test"]["f1"])
    assert results["selection"]["best_run"] == best["run_id"]
    final = next(r for r in results["runs"] if r["name"] == "final")
    assert {k: v for k, v in final["settings"].items() if k not in ("seed", "max_train_samples")} == \
        {k: v for k, v in best["settings"].items() if k not in ("seed", "max_train_samples")}
    for run in grid:
        assert run["trainable_params"] < run["total_params"] and run["weights_bytes"] > 0
        assert [step for step, _ in run["curves"]["validation"]][:2] == [2, 4]
        lo, hi = run["scores"]["test"]["f1_ci"]
        assert lo <= run["scores"]["test"]["f1"] <= hi
    assert {level["level"] for level in results["main_effects"]["learning_rate"]} == {0.001, 0.005}
    assert all(level["runs"] == 2 for level in results["main_effects"]["learning_rate"])
    names = {t["name"].removesuffix(" (best)") if t["name"].startswith("centre vs") else t["name"]
             for t in results["tests"]}
    assert len({(t["a"], t["b"]) for t in results["tests"]}) == len(results["tests"])  # no pair twice in Holm's family
    centre_vs_best = [t for t in results["tests"] if t["name"] == "centre vs best" or t["name"].endswith(" (best)")
                      and t["name"].startswith("centre vs")]
    assert [t["b"] for t in centre_vs_best] == ([best["run_id"]] if best["grid_point"] != load_spec(spec)["centre"] else [])
    assert {"centre vs learning_rate=0.005", "centre vs rank=lora_r=2,lora_alpha=4", "baseline vs LoRA (best)"} <= names
    # what the final model's larger budget buys: the grid's selection against it, on the questions both answered
    budget = next(t for t in results["tests"] if t["name"] == "LoRA (best) on 4 vs 5 questions")
    assert (budget["a"], budget["b"], budget["n"]) == (best["run_id"], final["run_id"], 5)
    assert all(t["p_value"] <= t["p_holm"] <= 1 for t in results["tests"])
    assert all(t["permutation_resamples"] == PERMUTATION_RESAMPLES and t["p_value"] >= 1 / (PERMUTATION_RESAMPLES + 1)
               for t in results["tests"])  # (b + 1) / (resamples + 1): never 0

    # the final model's adapter is exported, loadable by plain PEFT, with its config and tokenizer
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    exported = tmp_path / "ckpt" / "final"
    assert {"adapter_config.json", "adapter_model.safetensors", "run_config.json", "tokenizer.json"} <= \
        {p.name for p in exported.iterdir()}
    PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_gpt2_dir), exported)
    assert results["final"]["checkpoint"] == str(exported)
    # so is the selected grid run's; once its weights are gone an export of another run is not left behind
    grid_best = tmp_path / "ckpt" / "grid_best"
    assert results["selection"]["checkpoint"] == str(grid_best)
    assert json.loads((grid_best / "run_config.json").read_text())["training"]["output_dir"] == str(out / best["run_id"])
    PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_gpt2_dir), grid_best)
    again = collect(spec, str(out), str(tmp_path / "again.json"), checkpoints=str(tmp_path / "ckpt"))
    assert again["selection"]["checkpoint"] == str(grid_best)  # weights present: exported again
    (out / best["run_id"] / "adapter_model.safetensors").rename(tmp_path / "weights")
    assert collect(spec, str(out), str(tmp_path / "again.json"),
                   checkpoints=str(tmp_path / "ckpt"))["selection"]["checkpoint"] == str(grid_best)  # still its own
    stale = json.loads((grid_best / "run_config.json").read_text())
    stale["training"]["output_dir"] = str(out / "another-run")
    (grid_best / "run_config.json").write_text(json.dumps(stale))
    assert collect(spec, str(out), str(tmp_path / "again.json"),
                   checkpoints=str(tmp_path / "ckpt"))["selection"]["checkpoint"] is None
    assert not grid_best.exists()
    (tmp_path / "weights").rename(out / best["run_id"] / "adapter_model.safetensors")
    final_eval = json.loads(Path(results["final"]["evaluation"]).read_text())
    assert final_eval["adapter"] == str(out / final["run_id"])
    assert final_eval["f1"] == pytest.approx(results["final"]["test"]["f1"])

    from loraqa.study.collect import main_table, settings_text, update_readme

    table = main_table(results)
    assert all(settings_text(run) in table for run in grid)
    assert f"{best['scores']['test']['f1']:.1f} [" in table
    readme = tmp_path / "README.md"
    readme.write_text("before\n<!-- study-table:begin -->\nold\n<!-- study-table:end -->\nafter\n")
    assert update_readme(readme, table)
    assert readme.read_text() == f"before\n<!-- study-table:begin -->\n{table}\n<!-- study-table:end -->\nafter\n"


def test_eta_scales_with_each_runs_questions_and_method(tmp_path):
    """The ETA comes from the finished runs' measured rates: a run with 8x the questions is expected to take
    8x the training time, full fine-tuning its own rate, a resumed run its timed steps only; a pending run
    counts only what is left of it."""
    def finished(name, settings, summary=None, questions_per_s=10.0):
        run_dir = tmp_path / name
        run_dir.mkdir()
        if summary:
            (run_dir / "summary.json").write_text(json.dumps({"train_examples": 2000, "global_steps": 250, **summary}))
        (run_dir / "eval_test.json").write_text(json.dumps({"questions_per_s": questions_per_s}))
        return name, {"train": summary is not None, "settings": settings}

    done = dict([finished("a", {}, {"seconds_per_step": 4.0, "train_runtime_s": 1000.0}),
                 finished("b", {}, {"seconds_per_step": 4.4, "train_runtime_s": 220.0, "resumed_from_step": 200}),
                 finished("c", {"full_finetune": True}, {"seconds_per_step": 5.0, "train_runtime_s": 1250.0}),
                 finished("base", {}, questions_per_s=5.0)])
    rates = measured_rates(tmp_path, done)
    assert rates == pytest.approx({"lora": 0.525, "full_finetune": 0.625, "evaluate": 0.1})
    test = {"test": {"max_samples": 500}}
    assert estimated_seconds(Run("final", {"max_train_samples": 16000}, test), rates) == pytest.approx(8400 + 50)
    assert estimated_seconds(Run("ft", {"max_train_samples": 2000, "full_finetune": True}, test), rates) == \
        pytest.approx(1250 + 50)
    assert estimated_seconds(Run("baseline", {}, test, train=False), rates) == pytest.approx(50)
    assert estimated_seconds(Run("steps", {"max_steps": 4}, test), rates) is None  # no question count to scale
    assert estimated_seconds(Run("x", {"max_train_samples": 10}, test), {}) is None  # nothing measured yet
    # a run resumed at step 1,500 of 2,000 has a quarter of its training left; a written evaluation is done
    final = Run("final", {"max_train_samples": 16000}, {**test, "validation": {"max_samples": 500}})
    (tmp_path / "final" / "checkpoint-1500").mkdir(parents=True)
    (tmp_path / "final" / "checkpoint-1500" / "trainer_state.json").write_text(
        json.dumps({"global_step": 1500, "max_steps": 2000}))
    assert estimated_seconds(final, rates, tmp_path / "final") == pytest.approx(8400 / 4 + 100)
    (tmp_path / "final" / "checkpoint-1500" / "trainer_state.json").write_text('{"global_step": 15')  # cut short
    assert estimated_seconds(final, rates, tmp_path / "final") == pytest.approx(8400 + 100)  # an ETA, never a crash
    (tmp_path / "final" / "summary.json").write_text("{}")
    (tmp_path / "final" / "eval_validation.json").write_text("{}")
    assert estimated_seconds(final, rates, tmp_path / "final") == pytest.approx(50)


def test_selection_agreement_ranks_the_grid_on_both_sets():
    from loraqa.study.collect import selection_agreement

    def run(name, validation, test):
        return {"run_id": name, "scores": {"validation": {"f1": validation}, "test": {"f1": test}}}

    grid = [run("a", 50, 52), run("b", 61.6, 62.0), run("c", 61.5, 63.6), run("d", 40, 41)]
    agreement = selection_agreement(grid, "validation", "test")
    assert agreement == {"runs": 4, "spearman": pytest.approx(0.8), "selected_run": "b", "selected_test_f1": 62.0,
                         "test_best_run": "c", "test_best_f1": 63.6}
    assert selection_agreement(grid[:2], "validation", "test") is None  # too few runs to rank
    flat = [run(name, 0.0, 0.0) for name in "abc"]  # a tiny model answers nothing: no ranking to correlate
    assert selection_agreement(flat, "validation", "test")["spearman"] is None


def test_heldout_articles_are_whole_and_never_trained_on(squad_file):
    dataset = load_squad(str(squad_file))
    rest, heldout = heldout_split(dataset, 1, seed=0)
    assert set(rest["title"]).isdisjoint(heldout["title"]) and len(rest) + len(heldout) == len(dataset)
    assert len(set(heldout["title"])) == 1
    again_rest, again_heldout = heldout_split(dataset, 1, seed=0)
    assert again_heldout["id"] == heldout["id"]  # seeded, not random
    titles = {heldout_split(dataset, 1, seed=s)[1]["title"][0] for s in range(8)}
    assert len(titles) == 2  # the seed chooses which article


def test_demo_opens_the_final_models_full_dev_errors_once_the_study_has_them(tmp_path):
    from loraqa.study.collect import PRELIMINARY_EVALUATIONS, final_evaluations

    results = tmp_path / "evaluation_results.json"
    assert final_evaluations(results) == PRELIMINARY_EVALUATIONS  # no study yet
    # the grid is complete, the final model not trained yet: its selection and the baseline on the test subset
    grid = (tmp_path / "sweep" / "best-1" / "eval_test.json", tmp_path / "sweep" / "baseline-2" / "eval_test.json")
    study = {"sweep_dir": str(tmp_path / "sweep"), "runs": [{"run_id": "baseline-2", "name": "baseline"}],
             "selection": {"best_run": "best-1", "grid_complete": False}}
    for path in grid:
        path.parent.mkdir(parents=True)
        path.write_text("{}")
    results.write_text(json.dumps(study))
    assert final_evaluations(results) == PRELIMINARY_EVALUATIONS  # a selection from part of the grid may change
    study["selection"]["grid_complete"] = True
    results.write_text(json.dumps(study))
    assert final_evaluations(results) == tuple(map(str, grid))
    pair = (tmp_path / "final" / "eval_test.json", tmp_path / "baseline_full_dev" / "eval_test.json")
    study["final"] = {"run": "final", "evaluation": str(pair[0]), "baseline_evaluation": str(pair[1])}
    results.write_text(json.dumps(study))
    assert final_evaluations(results) == tuple(map(str, grid))  # named but not on this machine
    pair[0].parent.mkdir()
    pair[0].write_text("{}")
    assert final_evaluations(results) == (str(pair[0]),)  # the final model before the untuned one's full-dev run
    pair[1].parent.mkdir()
    pair[1].write_text("{}")
    assert final_evaluations(results) == tuple(map(str, pair))


def test_the_study_spec_still_names_every_committed_run():
    """Editing experiments/study.yaml (its order, a comment, a new run) must not change the identity of a run
    already done: an orphaned run directory would be trained again and left out of the tables."""
    root = Path(__file__).parents[1]
    spec = load_spec(root / "experiments" / "study.yaml")
    done = {p.parent.name: json.loads(p.read_text()) for p in (root / "results" / "sweep").glob("*/done.json")}
    runs, selection = plan_study(spec, done)
    planned = {r.run_id for r in runs}
    # runs `from: best` are held (not planned at all) while the selection is unresolved (tests/test_selection.py);
    # once resolved they are planned for today's selection: one from an earlier selection keeps its directory, not
    # its plan (a new final gets a new name)
    settings = {r.name: r.settings for r in runs}
    held = {i for i, r in done.items() if spec["runs"].get(r["name"], {}).get("from")
            and not (selection.resolved and settings.get(r["name"]) == r["settings"])}
    assert set(done) - held <= planned, sorted(set(done) - held - planned)
    assert len(held) <= 3  # the earlier selection's final model and its two seeds
    grid = [r for r in runs if r.kind == "grid"]
    assert len(grid) >= 32 and all(r.settings["lora_alpha"] == 2 * r.settings["lora_r"] for r in grid)


def _synthetic_study(tmp_path) -> tuple[str, Path, dict]:
    """A sweep directory of written records only (no model): the untuned model zero-shot, with its chat template and
    with 1 or 3 examples on 20 test / 10 validation questions, the zero-shot and 3-shot prompts on all 40 'dev'
    questions, and the final model (all of dev; trained on another machine: no weights here). Each run answers
    every question of a split with one F1 (a pattern for the final), so every mean is known by hand."""
    prompts = {"baseline": ({}, 10.0), "baseline_chat": ({"chat_template": True}, 12.0),
               "baseline_1shot": ({"few_shot": 1}, 20.0), "baseline_3shot": ({"few_shot": 3}, 25.0)}
    runs = {name: {"train": False, "evaluate": {"validation": prompt, "test": prompt}} for name, (prompt, _) in prompts.items()}
    runs["baseline_full_dev"] = {"train": False, "evaluate": {"test": {"max_samples": 40}}}
    runs["baseline_prompted_full_dev"] = {"train": False, "evaluate": {"validation": {"few_shot": 3},
                                                                        "test": {"few_shot": 3, "max_samples": 40}}}
    runs["final"] = {"max_train_samples": 8, "evaluate": {"test": {"max_samples": 40}}}
    for name, extra in (("budget_lora", {"learning_rate": 1e-3}),  # the shared-budget pair
                        ("budget_full_ft", {"full_finetune": True, "learning_rate": 1e-4})):
        runs[name] = {"max_train_samples": 6, **extra, "evaluate": {"test": {"max_samples": 40}}}
    spec = {"base": {"model": "smollm2-135m", "max_train_samples": 4},
            "evaluations": {"validation": {"max_samples": 10}, "test": {"max_samples": 20}}, "runs": runs}
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    validation_f1 = {name: f1 for name, (_, f1) in prompts.items()} | {"baseline_full_dev": 10.0,
                                                                      "baseline_prompted_full_dev": 25.0,
                                                                      "budget_lora": 55.0, "budget_full_ft": 50.0}
    test_f1 = {"baseline": 9.0, "baseline_chat": 11.0, "baseline_1shot": 19.0, "baseline_3shot": 24.0,
               "baseline_full_dev": 10.0, "baseline_prompted_full_dev": 25.0, "budget_lora": 56.0, "budget_full_ft": 52.0}
    extra_tokens = {"chat_template": 41, "few_shot": 173}  # per example
    out = tmp_path / "sweep"
    ids = {}
    for run in plan(load_spec(path)):
        run_dir = out / run.run_id
        run_dir.mkdir(parents=True)
        ids[run.name] = run.run_id
        scores = {}
        for split, settings in run.evaluations.items():
            prefix = "v" if split == "validation" else "q"
            questions = [f"{prefix}{i}" for i in range(settings["max_samples"])]
            if run.name == "final":
                f1 = {q: 0.7 if (i // 4) % 2 else 0.5 for i, q in enumerate(questions)}  # paragraphs of 0.5 and 0.7
            else:
                f1 = dict.fromkeys(questions, (validation_f1 if split == "validation" else test_f1)[run.name] / 100)
            args = {k: settings[k] for k in ("few_shot", "chat_template") if k in settings}
            max_length = 512 + sum(extra_tokens[k] * int(v) for k, v in args.items())
            evaluation = {"per_question": {q: {"f1": f1[q], "exact_match": float(f1[q] > 0.6)} for q in questions},
                          "questions": {q: {"paragraph": f"p{int(q[1:]) // 4}"} for q in questions},
                          "evaluate_args": {"max_samples": settings["max_samples"], **args}, "max_length": max_length}
            (run_dir / f"eval_{split}.json").write_text(json.dumps(evaluation))
            scores[split] = {"f1": 100 * sum(f1.values()) / len(f1), "exact_match": 0.0, "n": len(questions)}
        if run.train:  # what git holds of a trained run: no weights
            (run_dir / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": "data/smollm2-135m"}))
        (run_dir / "done.json").write_text(json.dumps({
            "run_id": run.run_id, "name": run.name, "kind": run.kind, "train": run.train, "settings": run.settings,
            "grid_point": {}, "evaluations": scores}))
    return str(path), out, ids


def test_collect_keeps_the_committed_export_on_a_fresh_clone(tmp_path):
    """A fresh clone's run directories hold no weights: collect keeps the final model's committed export (naming its
    base portably) instead of dropping `checkpoint`, and removes an export of another run."""
    from loraqa.study.collect import collect

    spec, out, ids = _synthetic_study(tmp_path)
    exported = tmp_path / "ckpt" / "final"
    exported.mkdir(parents=True)
    (exported / "adapter_model.safetensors").write_bytes(b"the committed weights")
    (exported / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": "data/smollm2-135m", "r": 16}))
    (exported / "run_config.json").write_text(json.dumps({"training": {"output_dir": f"results/sweep/{ids['final']}"}}))
    results = collect(spec, str(out), str(tmp_path / "evaluation_results.json"), checkpoints=str(tmp_path / "ckpt"))
    assert results["final"]["checkpoint"] == str(exported)
    assert (exported / "adapter_model.safetensors").read_bytes() == b"the committed weights"  # not exported again
    assert json.loads((exported / "adapter_config.json").read_text()) == {
        "base_model_name_or_path": "HuggingFaceTB/SmolLM2-135M-Instruct", "r": 16}
    (exported / "run_config.json").write_text(json.dumps({"training": {"output_dir": "results/sweep/final-other"}}))
    results = collect(spec, str(out), str(tmp_path / "evaluation_results.json"), checkpoints=str(tmp_path / "ckpt"))
    assert "checkpoint" not in results["final"] and not exported.exists()


def test_collect_records_the_prompted_baselines_and_compares_the_final_model_with_the_best(tmp_path):
    from loraqa.study.collect import collect

    spec, out, ids = _synthetic_study(tmp_path)
    results = collect(spec, str(out), str(tmp_path / "evaluation_results.json"))
    assert json.loads((tmp_path / "evaluation_results.json").read_text())["prompted_baselines"] == \
        results["prompted_baselines"]
    prompted = results["prompted_baselines"]
    # the full-dev runs answer other test questions: they are not candidates
    assert [r["name"] for r in prompted["runs"]] == ["baseline_3shot", "baseline_1shot", "baseline_chat", "baseline"]
    best = prompted["runs"][0]
    assert (best["few_shot"], best["chat_template"], best["max_length"]) == (3, False, 512 + 3 * 173)
    assert best["validation"]["f1"] == pytest.approx(25.0) and best["test"]["f1"] == pytest.approx(24.0)
    assert best["test"]["n"] == 20 and best["test"]["f1_ci"] == pytest.approx([24.0, 24.0])
    assert prompted["runs"][2]["chat_template"] is True and prompted["runs"][3]["few_shot"] == 0
    assert (prompted["best_run"], prompted["best_prompt"]) == (ids["baseline_3shot"], {"few_shot": 3, "chat_template": False})
    assert prompted["full_dev_run"] == ids["baseline_prompted_full_dev"]
    final = results["final"]
    # the final model (F1 60 on all of dev) against the best prompt (25) and, still, against zero-shot (10)
    assert final["prompted_baseline_run"] == ids["baseline_prompted_full_dev"]
    assert final["prompted_baseline_full_dev"]["f1"] == pytest.approx(25.0)
    assert final["prompted_baseline_evaluation"] == str(out / ids["baseline_prompted_full_dev"] / "eval_test.json")
    assert final["prompted_comparison"]["n"] == final["comparison"]["n"] == 40
    assert final["prompted_comparison"]["delta_f1"] == pytest.approx(35.0)
    assert final["comparison"]["delta_f1"] == pytest.approx(50.0)
    lo, hi = final["prompted_comparison"]["delta_f1_ci"]
    assert 25.0 <= lo < 35.0 < hi <= 45.0  # paragraphs resampled: half of them answered 0.5, half 0.7
    assert final["prompted_comparison"]["delta_exact_match"] == pytest.approx(50.0)

    # a tie on validation F1 goes to the shorter prompt: 1 example beats 3; its all-of-dev run is not there yet
    one_shot = out / ids["baseline_1shot"] / "eval_validation.json"
    evaluation = json.loads(one_shot.read_text())
    evaluation["per_question"] = {q: {**s, "f1": 0.25} for q, s in evaluation["per_question"].items()}
    one_shot.write_text(json.dumps(evaluation))
    results = collect(spec, str(out), str(tmp_path / "evaluation_results.json"))
    assert results["prompted_baselines"]["best_run"] == ids["baseline_1shot"]
    assert results["prompted_baselines"]["full_dev_run"] is None
    assert "prompted_comparison" not in results["final"] and results["final"]["comparison"]["delta_f1"] == pytest.approx(50.0)
    # zero-shot is the best: its all-of-dev run is baseline_full_dev
    for name in ("baseline_chat", "baseline_1shot", "baseline_3shot"):
        shutil.rmtree(out / ids[name])
    results = collect(spec, str(out), str(tmp_path / "evaluation_results.json"))
    assert results["prompted_baselines"]["full_dev_run"] == results["final"]["prompted_baseline_run"] == \
        ids["baseline_full_dev"]
    assert results["final"]["prompted_comparison"] == results["final"]["comparison"]


def test_collect_compares_lora_with_full_fine_tuning_at_the_shared_budget_on_all_of_dev(tmp_path):
    from loraqa.study.collect import collect, main_table

    spec, out, ids = _synthetic_study(tmp_path)
    results = collect(spec, str(out), str(tmp_path / "evaluation_results.json"))
    pair = [t for t in results["tests"] if t["name"] == "full fine-tuning vs LoRA (best) on 6 questions"]
    assert len(pair) == 1 and (pair[0]["a"], pair[0]["b"]) == (ids["budget_full_ft"], ids["budget_lora"])
    assert pair[0]["n"] == 40 and pair[0]["delta_f1"] == pytest.approx(4.0)
    assert {r["name"]: r["group"] for r in results["runs"]}["budget_full_ft"] == "budget"
    table = main_table(results)
    assert "| LoRA (best) at the shared budget (all of dev) |" in table
    assert "| full fine-tuning at the shared budget (all of dev) | full FT, lr" in table
    shutil.rmtree(out / ids["budget_lora"])  # one of the pair missing: no test, the table says pending
    results = collect(spec, str(out), str(tmp_path / "evaluation_results.json"))
    assert not [t for t in results["tests"] if "shared" in t["name"] or "full fine-tuning vs" in t["name"]]
    assert "| LoRA (best) at the shared budget (all of dev) | pending |" in main_table(results)


def test_the_budget_comparison_pairs_the_final_model_with_its_own_grid_configuration():
    """Once the selection moves (a better grid run lands after the final model was trained), the budget's paired test
    must still compare the final with the grid run of its own configuration, not with the new best (that confounds
    budget and configuration)."""
    from loraqa.study.collect import _same_configuration

    grid_run = {"model": "m", "learning_rate": 5e-4, "lora_r": 16, "max_train_samples": 2000, "eval_steps": 25,
                "save_steps": 25}
    final = {**grid_run, "max_train_samples": 16000, "eval_steps": 200, "save_steps": 100}
    assert _same_configuration(grid_run, final)
    assert not _same_configuration({**grid_run, "learning_rate": 1e-3, "lora_r": 32}, final)
    assert _same_configuration({**grid_run, "seed": 1}, final)  # a seed is no configuration
    assert not _same_configuration({**grid_run, "target_modules": "attention+mlp"}, final)
    study = json.loads((Path(__file__).parents[1] / "results/evaluation_results.json").read_text())
    runs = {r["run_id"]: r for r in study["runs"]}
    budget = [t for t in study["tests"] if t["name"].startswith("LoRA (best) on ")]
    assert len(budget) == 1 and _same_configuration(runs[budget[0]["a"]]["settings"], runs[budget[0]["b"]]["settings"])


def test_a_moved_selections_final_is_the_headline_once_it_has_finished():
    """Until the new final (`final-<grid run>`) has finished, the committed `final` stays the headline; then the
    new one is, and the committed one is the earlier selection's."""
    from loraqa.study.collect import _finals

    entries = {"final-aaaa": {"run_id": "final-aaaa", "name": "final", "group": "final"},
               "attention-r8-bbbb": {"run_id": "attention-r8-bbbb", "name": "attention-r8", "group": "grid"}}
    planned = [Run("attention-r8", {"lora_r": 8}, {}), Run("final-attention-r8", {"lora_r": 8, "seed": 0}, {})]
    headline, earlier = _finals(planned, entries)
    assert headline is entries["final-aaaa"] and earlier == []  # the new final is still pending
    new = planned[1].run_id
    entries[new] = {"run_id": new, "name": "final-attention-r8", "group": "final"}
    headline, earlier = _finals(planned, entries)
    assert headline is entries[new] and earlier == [entries["final-aaaa"]]

