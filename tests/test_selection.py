"""The study's selection mechanics (issue 28): row and series extensions, divergence, ties settled by seeds,
`from: best` runs held until the selection resolves, and the committed runs' identities kept."""
import json
import math
from pathlib import Path

import pytest
import yaml

from loraqa.config import ConfigError
from loraqa.study.selection import divergence, next_value, pooled_sd, value_text
from loraqa.study.spec import load_spec
from loraqa.study.sweep import finished_runs, plan, plan_study

ROOT = Path(__file__).resolve().parents[1]
COMMITTED_FROM_BEST = {"final-24333e66", "best_seed1-ef7b9a28", "best_seed2-c63e575d"}


def _record(run, f1: float, diverged: bool = False) -> dict:
    """A done record as `sweep._run_one` writes it (with `_finished`'s divergence flag)."""
    return {"run_id": run.run_id, "name": run.name, "kind": run.kind, "train": run.train, "settings": run.settings,
            "grid_point": run.grid_point, "evaluations": {"validation": {"exact_match": 0.0, "f1": f1, "n": 500}},
            "diverged": diverged}


def _finish(finished: dict, runs, score) -> list:
    """Mark every pending run of `runs` done with F1 `score(run)`; returns the runs it finished."""
    new = [r for r in runs if r.run_id not in finished]
    for run in new:
        finished[run.run_id] = _record(run, *score(run)) if isinstance(score(run), tuple) else _record(run, score(run))
    return new


# ---------------------------------------------------------------------------------------------- committed runs

@pytest.fixture(scope="module")
def study():
    return load_spec(ROOT / "experiments/study.yaml"), finished_runs(ROOT / "results/sweep")


def _bracket_worse(committed: dict) -> dict:
    """The committed runs with the bracket's own (learning rate 1e-3 and up, LoRA or full fine-tuning at 3e-4 and
    up) scored below everything, as they land one by one: the scenarios below do not depend on how they turn out."""
    finished = dict(committed)
    for run_id, record in committed.items():
        settings = record.get("settings") or {}
        rate = settings.get("learning_rate") or 0
        if rate >= (3e-4 if settings.get("full_finetune") else 1e-3):
            finished[run_id] = {**record, "evaluations": {name: {**scores, "f1": 40.0}
                                                          for name, scores in record["evaluations"].items()}}
    return finished


def test_committed_runs_keep_their_ids_and_from_best_runs_are_held(study):
    spec, finished = study
    assert len(finished) >= 39 and COMMITTED_FROM_BEST <= set(finished)
    runs, selection = plan_study(spec, finished)
    ids = {r.run_id for r in runs}
    # every finished run that does not depend on the selection is planned under its committed directory name
    assert set(finished) - COMMITTED_FROM_BEST <= ids
    assert len(ids) == len(runs)
    if not selection.resolved:  # the lr 1e-3 row (or its seeds) not done: nothing from: best is planned at all
        assert not any(r.name.startswith(("final", "best_seed", "budget_lora")) for r in runs)
    # what is left to train is new work only: no finished run comes back under another id (evaluation-only runs,
    # such as the prompted baselines, share the base settings and differ in their evaluations)
    pending = [r for r in runs if r.run_id not in finished and r.train]
    assert not {json.dumps(r.settings, sort_keys=True) for r in pending} & \
        {json.dumps(rec["settings"], sort_keys=True) for rec in finished.values()}


def test_the_rates_the_spec_states_as_outcomes_are_the_committed_runs_outcomes(study):
    """The spec writes two outcomes as settings (full fine-tuning's selected rate for the budget pair, attention
    r 16's best rate for the second fixed-alpha series): they must be what the committed runs say."""
    spec, finished = study

    def best_rate(keep) -> float:
        scored = [r for r in finished.values() if keep(r["settings"]) and r.get("evaluations", {}).get("validation")]
        return max(scored, key=lambda r: r["evaluations"]["validation"]["f1"])["settings"]["learning_rate"]

    full_ft = best_rate(lambda s: s.get("full_finetune") and s.get("max_train_samples") == 2000)
    assert spec["runs"]["budget_full_ft"]["learning_rate"] == full_ft
    attention_r16 = best_rate(lambda s: s.get("target_modules") == "attention" and s.get("lora_r") == 16
                              and s.get("lora_alpha") == 32 and not s.get("seed"))
    assert {spec["runs"][f"fixed_alpha_lr1e-3_r{r}"]["learning_rate"] for r in (4, 8, 32)} == {attention_r16}


def test_when_the_selection_stays_the_committed_final_and_seeds_are_kept(study):
    spec, committed = study
    finished = _bracket_worse(committed)
    # the bracket's runs all worse, finished until only the tied configurations' seeds are left to run
    while _finish(finished, [r for r in plan(spec, finished) if r.kind != "seed"], lambda r: 40.0):
        pass
    runs, selection = plan_study(spec, finished)
    assert not selection.resolved and not any(r.name.startswith("final") for r in runs)
    top = selection.top.run_id
    assert top == "attention_mlp-lr0.0005-r16-alpha32-bb48b3b8"
    # the best configuration's seeds are the committed best_seed runs, found by their settings
    assert selection.seed_runs[top] == [top, "best_seed1-ef7b9a28", "best_seed2-c63e575d"]
    centre = [r.run_id for r in runs if r.kind == "grid" and r.grid_point == spec["centre"]][0]
    values = {run_id: finished[run_id]["evaluations"]["validation"]["f1"] for ids in selection.seed_runs.values()
              for run_id in ids}
    groups = [[values[i] for i in selection.seed_runs[g]] for g in (top, centre)]
    assert selection.pooled_sd == pytest.approx(pooled_sd(groups))
    assert selection.margin == pytest.approx(math.sqrt(2) * selection.pooled_sd)
    best = values[top]
    grid_f1 = sorted((rec["evaluations"]["validation"]["f1"] for rec in finished.values() if rec["kind"] == "grid"),
                     reverse=True)
    assert selection.n_within == sum(best - f1 <= selection.margin for f1 in grid_f1)
    assert len(selection.tied) == min(3, selection.n_within)
    seeds = [r for r in runs if r.run_id not in finished]
    assert len(seeds) == 2 * (len(selection.tied) - 1) and all(r.kind == "seed" for r in seeds)
    _finish(finished, runs, lambda r: 40.0)  # the other tied configurations' seeds: worse
    runs, selection = plan_study(spec, finished)
    assert selection.resolved and selection.picked.run_id == top
    assert "picked" in selection.reason and selection.record()["tied"][0] == top
    assert COMMITTED_FROM_BEST <= {r.run_id for r in runs}
    # nothing left to train but the new work that waits for the selection: the budget pair's LoRA run (under a new
    # name: the committed budget_lora trained the selection this hypothetical study did not keep)
    left = [r for r in runs if r.run_id not in finished]
    assert [r.name for r in left] == [f"budget_lora-{selection.picked.name}"]
    assert left[0].settings["lora_r"] == selection.picked.settings["lora_r"]


def test_a_moved_selection_trains_a_new_final_under_a_new_name(study):
    spec, committed = study
    finished = _bracket_worse(committed)
    while _finish(finished, [r for r in plan(spec, finished) if r.kind != "seed"], lambda r: 40.0):
        pass
    runs, selection = plan_study(spec, finished)
    assert not selection.resolved
    runner_up = selection.tied[1]
    _finish(finished, runs, lambda r: 70.0 if r.grid_point == runner_up.grid_point else 40.0)
    runs, selection = plan_study(spec, finished)
    assert selection.resolved and selection.picked is not None and selection.picked.run_id == runner_up.run_id
    final = next(r for r in runs if r.name.startswith("final"))
    assert final.name == f"final-{runner_up.name}" and final.run_id not in finished
    assert final.settings["learning_rate"] == runner_up.settings["learning_rate"]
    assert final.settings["max_train_samples"] == 16000
    # the new selection's seeds exist already (its tie seeds): best_seed1/2 are those runs, not new ones
    pending = [r for r in runs if r.run_id not in finished]
    budget = next(r for r in pending if r.name.startswith("budget_lora"))
    assert {r.run_id for r in pending} == {final.run_id, budget.run_id}
    assert budget.settings["learning_rate"] == runner_up.settings["learning_rate"]  # the pair follows the selection


# ---------------------------------------------------------------------------------------------- small specs

def _spec(tmp_path, **extra) -> dict:
    spec = {"base": {"model": "tiny", "max_train_samples": 4},
            "grid": {"target_modules": ["attention", "attention+mlp"], "learning_rate": [1.0e-4, 1.0e-3]},
            "centre": {"target_modules": "attention", "learning_rate": 1.0e-4},
            "runs": {"centre_seed1": {"target_modules": "attention", "learning_rate": 1.0e-4, "seed": 1},
                     "full_ft_lr1e-4": {"full_finetune": True, "learning_rate": 1.0e-4},
                     "final": {"from": "best", "max_train_samples": 8}},
            "evaluations": {"validation": {"max_samples": 5}}, "select_on": "validation",
            "extend": {"learning_rate": {"factor": 2, "max": 4.0e-3},
                       "full_ft": {"runs": ["full_ft_lr1e-4"], "learning_rate": [1.0e-3, 3.0e-3]}},
            **extra}
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return load_spec(path)


def test_a_row_is_extended_while_its_best_is_at_its_largest_rate(tmp_path):
    spec = _spec(tmp_path)
    finished = {}
    score = {("attention", 1e-4): 50, ("attention", 1e-3): 60, ("attention", 2e-3): 70, ("attention", 4e-3): 80,
             ("attention+mlp", 1e-4): 60, ("attention+mlp", 1e-3): 55}
    key = lambda r: (r.settings.get("target_modules"), r.settings["learning_rate"])  # noqa: E731
    runs = plan(spec, finished)
    assert not any(r.kind == "grid" and r.settings["learning_rate"] > 1e-3 for r in runs)  # rows not done yet
    _finish(finished, runs, lambda r: score.get(key(r), 10.0))
    runs = plan(spec, finished)
    new = [r for r in runs if r.run_id not in finished]
    # only the attention row (best at its largest rate) gets 2e-3; attention+mlp's best is interior
    assert [(r.name, r.grid_point) for r in new if r.kind == "grid"] == \
        [("attention-lr0.002", {"target_modules": "attention", "learning_rate": 0.002})]
    _finish(finished, runs, lambda r: score.get(key(r), 10.0))
    _finish(finished, plan(spec, finished), lambda r: score.get(key(r), 10.0))
    rates = sorted(r.settings["learning_rate"] for r in plan(spec, finished)
                   if r.kind == "grid" and r.settings["target_modules"] == "attention")
    assert rates == [1e-4, 1e-3, 2e-3, 4e-3]  # 8e-3 would pass max: the row ends there


def test_a_diverged_run_ends_its_row_and_holds_no_run_back(tmp_path):
    spec = _spec(tmp_path)
    finished = {}
    _finish(finished, plan(spec, finished), lambda r: 60.0 if r.settings["learning_rate"] == 1e-3 else 50.0)
    runs = plan(spec, finished)
    extension = [r for r in runs if r.run_id not in finished and r.kind == "grid"]
    assert sorted(r.settings["target_modules"] for r in extension) == ["attention", "attention+mlp"]
    # attention diverges at 2e-3 with the best F1 of its row; attention+mlp improves and goes on
    _finish(finished, runs, lambda r: (90.0, True) if r.settings.get("target_modules") == "attention" else 70.0)
    runs = plan(spec, finished)
    rates = {t: sorted(r.settings["learning_rate"] for r in runs if r.kind == "grid" and r.settings["target_modules"] == t)
             for t in ("attention", "attention+mlp")}
    assert rates == {"attention": [1e-4, 1e-3, 2e-3], "attention+mlp": [1e-4, 1e-3, 2e-3, 4e-3]}


def test_a_series_of_named_runs_is_extended_through_its_listed_values(tmp_path):
    spec = _spec(tmp_path)
    finished = {}
    _finish(finished, plan(spec, finished), lambda r: 50.0)
    runs = plan(spec, finished)
    (new,) = [r for r in runs if r.name.startswith("full_ft") and r.run_id not in finished]
    assert new.name == "full_ft_lr1e-3" and new.settings["learning_rate"] == 1.0e-3 and new.settings["full_finetune"]
    assert new.kind == "series"
    _finish(finished, runs, lambda r: 40.0 if r.name == "full_ft_lr1e-3" else 50.0)  # worse: the series ends
    assert not [r for r in plan(spec, finished) if r.run_id not in finished and r.name.startswith("full_ft")]


def test_from_best_waits_for_the_tie_seeds_and_picks_the_best_seed_mean(tmp_path):
    spec = _spec(tmp_path, ties={"max_configs": 2, "seeds": 3}, extend={})
    finished = {}
    single = {("attention", 1e-4): 50.0, ("attention", 1e-3): 61.0, ("attention+mlp", 1e-4): 60.5,
              ("attention+mlp", 1e-3): 60.0}
    key = lambda r: (r.settings.get("target_modules"), r.settings["learning_rate"])  # noqa: E731
    # seed 0 as in `single`; seeds 1 and 2 of attention+mlp 1e-4 are better, those of the top worse
    seeded = lambda r: single.get(key(r), 0.0) + {0: 0.0, 1: 2.0, 2: 2.0}[r.settings.get("seed", 0)] * (  # noqa: E731
        1 if key(r) == ("attention+mlp", 1e-4) else -1)
    runs, selection = plan_study(spec, finished)
    assert not selection.resolved and "final" not in {r.name for r in runs}
    _finish(finished, runs, lambda r: 50.0 + r.settings.get("seed", 0) if key(r) == ("attention", 1e-4) else seeded(r))
    runs, selection = plan_study(spec, finished)
    # the top's seeds are planned with the grid complete; the centre's sd comes from centre_seed1
    assert not selection.resolved and selection.top.name == "attention-lr0.001"
    assert sorted(r.name for r in runs if r.run_id not in finished) == ["attention-lr0.001-seed1", "attention-lr0.001-seed2"]
    _finish(finished, runs, seeded)
    runs, selection = plan_study(spec, finished)
    # pooled sd: centre [50, 51], top [61, 59, 59] -> margin sqrt(2) * sd; 60.5 within it, 60.0 too, but max 2
    sd = pooled_sd([[50.0, 51.0], [61.0, 59.0, 59.0]])
    assert selection.pooled_sd == pytest.approx(sd) and selection.n_within == 3
    assert [r.name for r in selection.tied] == ["attention-lr0.001", "attention_mlp-lr0.0001"]
    assert not selection.resolved and "final" not in {r.name for r in runs}
    _finish(finished, runs, seeded)
    runs, selection = plan_study(spec, finished)
    assert selection.resolved and selection.picked.name == "attention_mlp-lr0.0001"
    assert selection.seed_means[selection.picked.run_id] == pytest.approx((60.5 + 62.5 + 62.5) / 3)
    final = next(r for r in runs if r.name == "final")
    assert final.settings["target_modules"] == "attention+mlp" and final.settings["learning_rate"] == 1e-4


# ---------------------------------------------------------------------------------------------- pieces

def test_divergence_reads_the_loss_curve(tmp_path):
    def run(lines, summary=None):
        d = tmp_path / str(len(list(tmp_path.iterdir())))
        d.mkdir()
        (d / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
        if summary is not None:
            (d / "summary.json").write_text(json.dumps(summary))
        return divergence(d)

    falling = [{"step": 5, "loss": 2.0}, {"step": 25, "eval_loss": 1.0}, {"step": 50, "eval_loss": 0.8}]
    assert run(falling, {"final_validation_loss": 0.8}) is None
    assert run(falling[:2] + [{"step": 50, "eval_loss": 1.3}]) == "final validation loss 1.3 > first 1"
    assert run(falling, {"final_validation_loss": 1.5}) == "final validation loss 1.5 > first 1"
    assert run([{"step": 5, "loss": float("nan")}] + falling[1:]) == "non-finite loss"
    assert run(falling, {"final_train_loss": float("inf")}) == "non-finite loss"
    assert divergence(tmp_path / "missing") is None  # the untrained baseline


def test_small_helpers():
    assert next_value(1e-3, 2) == 0.002 and next_value(2e-3, 2) == 0.004 and next_value(1e-4, 3) == 0.0003
    assert [value_text(v) for v in (3e-4, 1e-3, 2.5e-3, 1e-5)] == ["3e-4", "1e-3", "2.5e-3", "1e-5"]
    assert pooled_sd([[1.0, 3.0], [10.0, 12.0, 14.0]]) == pytest.approx(math.sqrt((2 + 8) / 3))
    assert pooled_sd([[1.0], [2.0]]) is None


@pytest.mark.parametrize("extra, message", [
    ({"extend": {"learning_rate": {"factor": 2}}}, "extend.learning_rate: a grid axis takes exactly factor and max"),
    ({"extend": {"learning_rate": {"factor": 1, "max": 1}}}, "extend.learning_rate.factor: expected a number above 1"),
    ({"extend": {"full_ft": {"runs": ["nope"], "learning_rate": [1.0]}}}, "extend.full_ft.runs: 'nope' is not a named"),
    ({"extend": {"full_ft": {"learning_rate": [1.0]}}}, "extend.full_ft: not a grid axis, so a series"),
    ({"ties": {"max_configs": 3}}, r"ties: expected \{max_configs, seeds\}"),
    ({"ties": {"max_configs": 0, "seeds": 3}}, "ties.max_configs: expected a positive integer"),
])
def test_bad_selection_keys_are_one_clear_line(tmp_path, extra, message):
    with pytest.raises(ConfigError, match=f"spec.yaml: {message}"):
        _spec(tmp_path, **extra)


# ---------------------------------------------------------------------------------------------- plots

def test_heatmap_and_params_plot_show_the_extended_rates_and_diverged_runs():
    from loraqa.study import plots

    results = json.loads((ROOT / "tests/fixtures/evaluation_results.json").read_text())
    grid = [r for r in results["runs"] if r["group"] == "grid" and (r["scores"].get("test") and r.get("trainable_params"))]
    spec_rates = results["protocol"]["grid"]["learning_rate"]
    extended = json.loads(json.dumps(grid[0]))  # a row extension past the spec's rates, diverged
    extended.update(run_id="extension", diverged=True, divergence="non-finite loss")
    extended["settings"]["learning_rate"] = 2 * max(spec_rates)
    extended["grid_point"]["learning_rate"] = extended["settings"]["learning_rate"]
    extended["scores"]["test"].update(f1=3.0, f1_ci=[1.0, 5.0])
    results["runs"].append(extended)
    target, rank = extended["settings"]["target_modules"], extended["settings"]["lora_r"]

    fig = plots.plot_f1_heatmaps(results)
    ax = next(a for a in fig.axes if a.get_title() == target)
    bottom = [a for a in fig.axes if a.get_title()][-1]  # panels share x; only the lowest shows its labels
    ticks = [t.get_text() for t in bottom.get_xticklabels()]
    assert ticks[-1] == f"{extended['settings']['learning_rate']:g}+" and not any(t.endswith("+") for t in ticks[:-1])
    ranks, rates, matrix = plots.f1_matrix(results, target)
    cell = (ranks.index(rank), rates.index(extended["settings"]["learning_rate"]))
    assert matrix[cell] == 3.0 and plots.diverged_cells(results, target) == {cell}
    assert [t.get_text() for t in ax.texts if "div." in t.get_text()] == ["3.0\ndiv."]
    hatched = [p for p in ax.patches if p.get_hatch() == "///"]
    assert len(hatched) == 1 and hatched[0].get_xy() == (cell[1] - 0.5, cell[0] - 0.5)

    fig = plots.plot_params_vs_f1(results)
    containers = {c.get_label(): c for c in fig.axes[0].containers}
    line = containers[f"{target}, lr {extended['settings']['learning_rate']:g} (diverged)"].lines[0]
    assert list(line.get_ydata()) == [3.0] and line.get_markerfacecolor() == "none"


def test_a_seed_the_spec_names_is_planned_once_as_that_named_run(study):
    spec, committed = study
    finished = _bracket_worse(committed)
    _finish(finished, plan(spec, finished), lambda r: 40.0)
    runs, selection = plan_study(spec, finished)
    by_id = {r.run_id: r for r in runs}
    top = selection.top.run_id
    # the best configuration's seeds 1 and 2 are the committed best_seed runs (from: best in the spec)
    assert [by_id[i].name for i in selection.seed_runs[top][1:]] == ["best_seed1", "best_seed2"]
    centre = [r for r in runs if r.name.startswith("centre_seed")]
    assert [r.kind for r in centre] == ["named", "named"]
