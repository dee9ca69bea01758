"""Finished runs -> what the study's selection still needs, and what it picks (issue 28).

Three rules the sweep's planner (`sweep.plan`) applies to the finished runs' done records:

- **Row extension** (`extend: {learning_rate: {factor: 2, max: 4.0e-3}}`): every row of the grid (one value of
  each other axis) whose best `select_on` F1 sits at its largest value of the axis gets the next value (x factor,
  up to max), until the best is interior or the largest run diverged. A named-run series
  (`extend: {full_ft: {runs: [full_ft_lr1e-4, full_ft_lr3e-4], learning_rate: [1.0e-3, 3.0e-3]}}`) does the
  same with listed next values, each a new named run `full_ft_lr1e-3`, ... .
- **Divergence**: a non-finite training or validation loss, or a final validation loss above the run's first
  one (`divergence`, from metrics.jsonl / summary.json). A diverged run is a result: it stops its row.
- **Ties** (`ties: {max_configs: 3, seeds: 3}`): the best grid run (seed 0) and the centre are seeded first;
  their seeds' pooled sd s gives the tie margin sqrt(2) x s (a difference of two runs has sqrt(2) times one run's
  sd); the configurations within it of the best, at most `max_configs`, get `seeds` seeds each, and the one with
  the best seed mean is selected. Until then the selection is unresolved and `from: best` runs are held.

The final model and the best configuration's seeds (`from: best` runs) follow the resolved selection. If it
picks the configuration they were trained on, they are the same runs (same settings, same run ids: nothing is
retrained). If it moves, the new final is a new run, `final-<selected grid run>`; until it has finished, the
committed `final` stays what collect reports as the headline (`final.selection_moved` and
`final.current_selection_final` say so), and once it has, it is the headline and the committed one is listed as
the earlier selection's (`final.earlier`). The best seeds of a moved selection are its tie seeds, already run.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

SD_MULTIPLE = math.sqrt(2)  # two runs' difference: sqrt(2) x one run's sd


def divergence(run_dir: str | Path) -> str | None:
    """Why a finished training run diverged ('non-finite loss', 'final validation loss 2.1 > first 0.9'),
    or None when it did not (or trained nothing)."""
    run_dir = Path(run_dir)
    losses, validation = [], []
    try:
        for line in (run_dir / "metrics.jsonl").read_text().splitlines():
            if line.strip():
                record = json.loads(line)
                losses += [record[k] for k in ("loss", "eval_loss") if k in record]
                validation += [record["eval_loss"]] if "eval_loss" in record else []
    except (OSError, json.JSONDecodeError):
        pass
    try:
        summary = json.loads((run_dir / "summary.json").read_text())
    except (OSError, json.JSONDecodeError):
        summary = {}
    losses += [summary[k] for k in ("final_train_loss", "final_validation_loss") if summary.get(k) is not None]
    if any(not isinstance(x, (int, float)) or not math.isfinite(x) for x in losses):
        return "non-finite loss"
    final = summary.get("final_validation_loss", validation[-1] if validation else None)
    if validation and final is not None and final > validation[0]:
        return f"final validation loss {final:.4g} > first {validation[0]:.4g}"
    return None


def next_value(value: float, factor: float) -> float:
    """The axis' next value, rounded to 6 significant digits so that 1e-3 x 2 is written 0.002."""
    return float(f"{value * factor:.6g}")


def value_text(value: float) -> str:
    """3e-4 -> '3e-4', 2.5e-3 -> '2.5e-3' (the spec's run names)."""
    mantissa, exponent = f"{value:e}".split("e")
    return f"{float(mantissa):g}e{int(exponent)}"


def pooled_sd(groups: list[list[float]]) -> float | None:
    """Pooled standard deviation of several groups (each centred on its own mean); None without two values
    in one group. [[1, 3], [10, 12, 14]] -> sqrt((2 + 8) / (1 + 2))"""
    squares = sum(sum((x - sum(g) / len(g)) ** 2 for x in g) for g in groups if len(g) > 1)
    dof = sum(len(g) - 1 for g in groups if len(g) > 1)
    return math.sqrt(squares / dof) if dof else None


def without_seed(settings: dict) -> dict:
    return {k: v for k, v in settings.items() if k != "seed"}


@dataclass
class Selection:
    """The selection's state: `resolved` once every run it depends on is done; `picked` is then the selected
    configuration's seed-0 grid run (before that: the best grid run so far, provisional)."""
    resolved: bool = False
    picked: object = None  # sweep.Run
    top: object = None     # the best single run (seed 0)
    tied: list = field(default_factory=list)  # grid runs within the margin of `top`, at most max_configs
    n_within: int = 0      # how many configurations were within the margin before the cap
    pooled_sd: float | None = None
    margin: float | None = None
    seed_means: dict = field(default_factory=dict)  # grid run id -> mean select_on F1 over its seeds
    seed_runs: dict = field(default_factory=dict)   # grid run id -> [run ids of its seeds, seed 0 first]
    waiting_for: str = ""
    reason: str = ""

    def record(self) -> dict:
        """JSON for evaluation_results.json."""
        return {"resolved": self.resolved, "picked": getattr(self.picked, "run_id", None),
                "top_single_run": getattr(self.top, "run_id", None), "n_within_margin": self.n_within,
                "tied": [r.run_id for r in self.tied], "pooled_seed_sd": self.pooled_sd,
                "margin": self.margin, "margin_rule": "sqrt(2) x pooled seed sd (centre and best configuration)",
                "seed_means": self.seed_means, "seed_runs": self.seed_runs, "waiting_for": self.waiting_for,
                "reason": self.reason}


def _f1(finished: dict, run, select_on: str) -> float:
    return finished[run.run_id]["evaluations"][select_on]["f1"]


def extend_rows(axis: str, rule: dict, grid_runs: list, finished: dict, select_on: str, make) -> list:
    """The next grid runs of every row whose best run (by `select_on` F1) is at its largest `axis` value: one
    more value per call and row (x `factor`, up to `max`), only once the row's runs are all done, and never past
    a diverged run. `make(point)` builds the run of a grid point. The rows' runs are `grid_runs` plus the
    extensions already finished, so one call walks a row as far as the finished runs allow."""
    rows: dict[str, list] = {}
    for run in grid_runs:
        key = json.dumps({k: v for k, v in run.grid_point.items() if k != axis}, sort_keys=True, default=str)
        rows.setdefault(key, []).append(run)
    added = []
    for row in rows.values():
        row = sorted(row, key=lambda r: r.grid_point[axis])
        while all(r.run_id in finished for r in row):
            largest = row[-1]
            best = max(row, key=lambda r: _f1(finished, r, select_on))
            value = next_value(largest.grid_point[axis], rule["factor"])
            if finished[largest.run_id].get("diverged") or best is not largest or value > rule["max"] * (1 + 1e-9):
                break
            run = make({k: (value if k == axis else v) for k, v in largest.grid_point.items()})
            added.append(run)
            row.append(run)
    return added


def extend_series(axis: str, values: list, members: list, finished: dict, select_on: str, make) -> list:
    """Like `extend_rows` for one series of named runs that differ in `axis` (full fine-tuning's learning
    rates): the next of `values` while the series' best run is its largest and has not diverged.
    `make(value)` builds the next run."""
    row = sorted(members, key=lambda r: r.settings[axis])
    added = []
    for value in sorted(v for v in values if v > row[-1].settings[axis]):
        if not all(r.run_id in finished for r in row):
            break
        largest = row[-1]
        best = max(row, key=lambda r: _f1(finished, r, select_on))
        if finished[largest.run_id].get("diverged") or best is not largest:
            break
        run = make(value)
        added.append(run)
        row.append(run)
    return added


def _seed_values(run, n: int) -> list[int]:
    own = run.settings.get("seed", 0)
    return [s for s in range(own + 1, own + n)]


def resolve(ties: dict | None, grid_runs: list, centre, known: list, finished: dict, select_on: str,
            make_seed) -> tuple[Selection, list]:
    """The selection (see the module docstring) and the seed runs it needs now. `known`: the other runs the
    plan has (a centre seed among them counts as pending until done); `make_seed(grid_run, seed)` builds a seed
    run (reusing a finished run of the same settings). Without `ties`: the best single grid run."""
    selection, planned = Selection(), []
    done = [r for r in grid_runs if r.run_id in finished]
    if done:
        selection.top = selection.picked = max(done, key=lambda r: _f1(finished, r, select_on))
    if len(done) < len(grid_runs) or not done:
        selection.waiting_for = f"{len(grid_runs) - len(done)} grid run(s)"
        return selection, planned
    top = selection.top
    if not ties:
        selection.resolved, selection.reason = True, "the best grid run by validation F1"
        return selection, planned

    def seeds(run) -> tuple[list[str], bool]:
        """Finished runs of `run`'s configuration (any seed, any name), and whether one is still pending."""
        same = without_seed(run.settings)
        ids = [i for i, rec in finished.items() if rec.get("train", True) and select_on in rec.get("evaluations", {})
               and without_seed(rec.get("settings") or {}) == same]
        pending = any(r.run_id not in finished and without_seed(r.settings) == same for r in known + planned)
        ids.sort(key=lambda i: (finished[i]["settings"].get("seed", 0), i))
        return ids, pending

    def values(ids: list[str]) -> list[float]:
        return [finished[i]["evaluations"][select_on]["f1"] for i in ids]

    planned += [make_seed(top, s) for s in _seed_values(top, ties["seeds"])]
    groups = [top] + ([centre] if centre is not None and centre is not top else [])
    found = {g.run_id: seeds(g) for g in groups}
    selection.seed_runs = {g: ids for g, (ids, _) in found.items()}
    if any(pending for _, pending in found.values()):
        selection.waiting_for = "the seeds of the best configuration and of the centre"
        return selection, planned
    selection.pooled_sd = pooled_sd([values(ids) for ids, _ in found.values()])
    selection.margin = SD_MULTIPLE * selection.pooled_sd if selection.pooled_sd is not None else 0.0
    best_f1 = _f1(finished, top, select_on)
    within = sorted((r for r in done if best_f1 - _f1(finished, r, select_on) <= selection.margin + 1e-9),
                    key=lambda r: -_f1(finished, r, select_on))
    selection.n_within = len(within)
    selection.tied = within[:ties["max_configs"]]
    for run in selection.tied[1:]:
        planned += [make_seed(run, s) for s in _seed_values(run, ties["seeds"])]
    found = {r.run_id: seeds(r) for r in selection.tied}
    selection.seed_runs.update({g: ids for g, (ids, _) in found.items()})
    if any(pending for _, pending in found.values()):
        selection.waiting_for = f"the seeds of the {len(selection.tied)} tied configurations"
        return selection, planned
    selection.seed_means = {g: sum(values(ids)) / len(ids) for g, (ids, _) in found.items()}
    selection.picked = max(selection.tied, key=lambda r: selection.seed_means[r.run_id])  # first on a tie: top
    selection.resolved = True
    margin = f"{selection.margin:.2f} F1 (sqrt(2) x pooled seed sd {selection.pooled_sd:.2f})" \
        if selection.pooled_sd is not None else "0 (no seed sd)"
    if len(selection.tied) == 1:
        selection.reason = f"no other configuration within {margin} of the best single run"
    else:
        selection.reason = (f"{selection.n_within} configuration(s) within {margin} of the best single run; the "
                            f"{len(selection.tied)} best seeded, the best mean over seeds "
                            f"({selection.seed_means[selection.picked.run_id]:.2f}) picked")
    return selection, planned
