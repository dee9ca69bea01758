"""A sweep spec -> one `loraqa train` + `loraqa evaluate` pair per run, resumable; run directories -> a table.

A spec (YAML, checked by `spec.load_spec`) names a base configuration, axes to cross and extra runs:

    base:        {model: smollm2-135m, max_train_samples: 2000, ...}   # any `loraqa train` setting
    grid:        {learning_rate: [1.0e-4, 2.0e-4], rank: [{lora_r: 8, lora_alpha: 16}, {lora_r: 16, lora_alpha: 32}]}
    centre:      {learning_rate: 2.0e-4, rank: {lora_r: 16, lora_alpha: 32}}   # runs nearest to it go first
    runs:                                               # controls and ablations, on top of base
      baseline:  {train: false}                         # the untuned model, evaluated only
      full_ft:   {full_finetune: true, learning_rate: 3.0e-5}
      final:     {from: best, max_train_samples: 16000, evaluate: {test: {max_samples: 20000}}}
    first:       [baseline]                             # named runs that go before the grid
    evaluations: {validation: {heldout_articles: 20, max_samples: 500}, test: {max_samples: 500}}
    select_on:   validation                             # the evaluation whose F1 picks `best` (grid runs only)
    extend:      {learning_rate: {factor: 2, max: 4.0e-3},          # per grid row, while its best is its largest
                  full_ft: {runs: [full_ft], learning_rate: [1.0e-4]}}  # a series of named runs, likewise
    ties:        {max_configs: 3, seeds: 3}             # the selection that survives the seeds (loraqa.study.selection)

Every run is identified by a hash of its resolved settings and lives in `DIR/<name>-<hash>/`: the run
directory of `loraqa train`, `train.log`, one `eval_<evaluation>.json` per evaluation and `done.json`
(written last, atomically). A finished run is skipped; an interrupted one resumes from its last checkpoint
(so a sweep can be killed at any moment and restarted with the same command); a failed one is recorded in
`error.json` and retried by the next invocation. Runs `from: best` are held until the selection has resolved:
every grid run and row extension done, and with `ties` the seeds it needs.
`print_commands` gives each pending run as a stand-alone shell line for a scheduler.

A run being trained is claimed: `claim.json` in its directory names the holder (pid and host for the local
executor, the job id for Slurm; `claims`). Every sweep respects a claim whose holder is alive (it skips
the run with one line naming the holder) and takes over one whose holder is gone, so two sweeps on one
directory never train the same run. `done.json` records the git revision the run was made at and whether the
package's code differed from it. A spec's optional `slurm:` mapping (partition, gpus_per_run, ...) is read by
`--executor slurm` only and is no part of any run's identity.

Why one file of ~430 lines: planning, running one run and resuming share the run's identity and directory rules;
the spec's checks (`spec`), the selection (`selection`), claims (`claims`) and collecting (`collect`) live apart.
"""
from __future__ import annotations

import ctypes
import dataclasses
import hashlib
import itertools
import json
import os
import shlex
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from ..files import write_json_atomic
from .claims import acquire_claim, describe_holder, release_claim, this_holder
from .selection import Selection, divergence, extend_rows, extend_series, resolve, value_text
from .spec import RUN_KEYS, load_spec

@dataclass
class Run:
    """One planned run: its name, resolved `loraqa train` settings and evaluations."""
    name: str
    settings: dict
    evaluations: dict[str, dict]
    train: bool = True
    kind: str = "grid"  # grid | named | series (a named series' extension) | seed (the selection's)
    grid_point: dict = field(default_factory=dict)

    @property
    def run_id(self) -> str:
        payload = json.dumps({"settings": self.settings, "train": self.train, "evaluations": self.evaluations},
                             sort_keys=True, default=str)
        return f"{self.name}-{hashlib.sha1(payload.encode()).hexdigest()[:8]}"


def _flatten(point: dict) -> dict:
    """Grid point -> settings: an axis whose value is a mapping contributes all of its settings."""
    settings = {}
    for axis, value in point.items():
        settings.update(value if isinstance(value, dict) else {axis: value})
    return settings


SHORT_NAMES = {"lora_r": "r", "learning_rate": "lr", "target_modules": "", "seed": "seed", "lora_alpha": "alpha"}


def _label(point: dict) -> str:
    parts = []
    for key, value in _flatten(point).items():
        text = f"{value:g}" if isinstance(value, float) else str(value)
        parts.append(f"{SHORT_NAMES.get(key, key)}{text}".replace("+", "_").replace("/", "_"))
    return "-".join(parts)


def plan(spec: dict, finished: dict[str, dict] | None = None) -> list[Run]:
    """Every run in execution order: `first` named runs, grid runs nearest the centre first, the grid's row
    extensions and series extensions, the selection's seed runs, the other named runs. `from: best` runs are
    resolved from `finished` ({run_id: done record}) once the selection has resolved (`plan_study`), and left
    out (held) until then."""
    return plan_study(spec, finished)[0]


def plan_study(spec: dict, finished: dict[str, dict] | None = None) -> tuple[list[Run], Selection]:
    """`plan`'s runs and the selection's state (`loraqa.study.selection`). A generated run (row extension, seed)
    whose settings a finished run already has is that run (same identity, whatever its name); a `from: best`
    run whose name a finished run of other settings holds (the selection moved) is named
    `<name>-<selected grid run's name>`, so a new final never collides with a committed one."""
    finished = finished or {}
    select_on = spec.get("select_on", "validation")
    base = dict(spec.get("base") or {})
    evaluations = spec["evaluations"]
    grid = spec.get("grid") or {}
    centre = spec.get("centre") or {}
    extend = spec.get("extend") or {}
    points = [dict(zip(grid, values)) for values in itertools.product(*grid.values())] if grid else []
    points.sort(key=lambda p: sum(p[k] != v for k, v in centre.items()))  # stable: spec order within a distance
    grid_runs = [Run(_label(p), {**base, **_flatten(p)}, evaluations, grid_point=p) for p in points]

    def make_grid(point: dict) -> Run:
        return Run(_label(point), {**base, **_flatten(point)}, evaluations, grid_point=point)

    extended = [run for axis, rule in extend.items() if axis in grid
                for run in extend_rows(axis, rule, grid_runs, finished, select_on, make_grid)]

    def named(name: str, run: dict, start: dict | None = None) -> Run:
        settings = {k: v for k, v in run.items() if k not in RUN_KEYS}
        own = {e: {**settings_, **(run.get("evaluate") or {}).get(e, {})} for e, settings_ in evaluations.items()}
        return Run(name, {**(start or base), **settings}, own, train=run.get("train", True), kind="named")

    runs = spec.get("runs") or {}
    series = []
    for key, rule in extend.items():
        if key not in grid:
            (axis, values), = ((k, v) for k, v in rule.items() if k != "runs")
            members = [named(n, runs[n]) for n in rule["runs"]]
            template = runs[max(rule["runs"], key=lambda n: runs[n][axis])]  # the listed run of the largest value
            series += extend_series(axis, values, members, finished, select_on, lambda value, key=key, axis=axis,
                                    template=template: dataclasses.replace(named(
                                        f"{key}_{SHORT_NAMES.get(axis, axis)}{value_text(value)}", {**template, axis: value}),
                                        kind="series"))
    grid_all = grid_runs + extended
    centre_run = next((r for r in grid_runs if r.grid_point == centre), None) if centre else None
    fixed = [named(n, r) for n, r in runs.items() if r.get("from") != "best"] + series

    def make_seed(run: Run, seed: int) -> Run:
        return _same_as_finished(Run(f"{run.name}-seed{seed}", {**run.settings, "seed": seed}, run.evaluations,
                                     kind="seed", grid_point=run.grid_point), finished)

    selection, seed_runs = resolve(spec.get("ties"), grid_all, centre_run, fixed, finished, select_on, make_seed)

    def resolved(name: str, run: dict) -> Run | None:
        if run.get("from") != "best":
            return named(name, run)
        if not selection.resolved:
            return None
        planned = _same_as_finished(named(name, run, start=selection.picked.settings), finished)
        if planned.run_id not in finished and any(r.get("name") == name for r in finished.values()):
            planned = dataclasses.replace(planned, name=f"{name}-{selection.picked.name}")
        return planned

    first = spec.get("first") or []
    ordered = [resolved(n, runs[n]) for n in first] + grid_all + series + seed_runs + \
        [resolved(n, r) for n, r in runs.items() if n not in first]
    unique = {}
    for run in ordered:  # a seed run that is a named run is planned once, as the named run, at the seed's place
        if run is not None and (run.run_id not in unique or unique[run.run_id].kind == "seed"):
            unique[run.run_id] = run
    return list(unique.values()), selection


def _same_as_finished(run: Run, finished: dict[str, dict]) -> Run:
    """`run` under the name of the finished run with its settings (run ids end with the same hash), if any."""
    digest = run.run_id.rsplit("-", 1)[1]
    twin = next((record for run_id, record in finished.items() if run_id.rsplit("-", 1)[-1] == digest
                 and record.get("settings") == run.settings), None)
    return dataclasses.replace(run, name=twin["name"]) if twin else run


def best_run(grid_runs: list[Run], finished: dict[str, dict], select_on: str) -> Run | None:
    """The grid run with the highest F1 on `select_on`, once every grid run is done; None before."""
    if not grid_runs or any(r.run_id not in finished for r in grid_runs):
        return None
    return max(grid_runs, key=lambda r: finished[r.run_id]["evaluations"][select_on]["f1"])


def _flags(settings: dict) -> list[str]:
    flags = []
    for key, value in settings.items():
        if value is None:
            continue
        text = str(value).lower() if isinstance(value, bool) else str(value)
        flags += [f"--{key}", text]
    return flags


def commands(run: Run, run_dir: Path) -> list[list[str]]:
    """The `loraqa` command lines of a run: train (unless `train: false`), then one evaluate per evaluation."""
    loraqa = ["loraqa"]
    lines = []
    if run.train:
        lines.append(loraqa + ["train"] + _flags({**run.settings, "output_dir": str(run_dir)}))
    model = {k: v for k, v in run.settings.items() if k in ("model", "cache_dir")}
    for name, settings in run.evaluations.items():
        adapter = {"adapter": str(run_dir)} if run.train else {}
        lines.append(loraqa + ["evaluate"] + _flags({**model, **adapter, **settings,
                                                     "output": str(run_dir / f"eval_{name}.json")}))
    return lines


def _die_with_parent():  # a killed sweep must not leave its training process running on
    if sys.platform.startswith("linux"):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def _latest_checkpoint(run_dir: Path) -> Path | None:
    checkpoints = [p for p in run_dir.glob("checkpoint-*") if p.name.split("-")[-1].isdigit()
                   and (p / "trainer_state.json").exists()]
    return max(checkpoints, key=lambda p: int(p.name.split("-")[-1]), default=None)


def finished_runs(output_dir: Path) -> dict[str, dict]:
    records = {}
    for done in output_dir.glob("*/done.json"):
        try:
            records[done.parent.name] = {**json.loads(done.read_text()), "diverged": divergence(done.parent) is not None}
        except (OSError, json.JSONDecodeError):
            continue
    return records


def duration(seconds: float) -> str:
    return f"{seconds / 60:.0f} min" if seconds < 5400 else f"{seconds / 3600:.1f} h"


def measured_rates(output_dir: Path, finished: dict[str, dict]) -> dict[str, float]:
    """Median seconds per training question (for each method: LoRA, full fine-tuning, whole-sequence loss)
    and per evaluated question, over the finished runs on disk: the basis of the sweep's ETA, so a run eight
    times the grid's size is expected to take about eight times as long."""
    per_question: dict[str, list[float]] = {}
    for run_id, record in finished.items():
        run_dir = output_dir / run_id
        try:
            summary = json.loads((run_dir / "summary.json").read_text()) if record.get("train") else {}
            results = [json.loads(p.read_text()) for p in run_dir.glob("eval_*.json")]
        except (OSError, json.JSONDecodeError):
            continue
        if summary.get("seconds_per_step") and summary.get("train_examples"):  # a resumed run timed its steps only
            per_question.setdefault(_method(record.get("settings") or {}), []).append(
                summary["seconds_per_step"] * summary["global_steps"] / summary["train_examples"])
        per_question.setdefault("evaluate", []).extend(1 / r["questions_per_s"] for r in results
                                                       if r.get("questions_per_s"))
    return {key: statistics.median(values) for key, values in per_question.items() if values}


def _method(settings: dict) -> str:
    return ("full_finetune" if settings.get("full_finetune") else "lora") + \
        ("+train_on_prompt" if settings.get("train_on_prompt") else "")


def _done_fraction(run_dir: Path | None) -> float:
    """The share of training steps its latest checkpoint holds (0 when none, or unreadable: only an ETA)."""
    checkpoint = _latest_checkpoint(run_dir) if run_dir is not None else None
    try:
        state = json.loads((checkpoint / "trainer_state.json").read_text()) if checkpoint else {}
    except (OSError, json.JSONDecodeError):
        return 0.0
    return state["global_step"] / state["max_steps"] if state.get("max_steps") else 0.0


def estimated_seconds(run: Run, rates: dict[str, float], run_dir: Path | None = None) -> float | None:
    """A pending run's time left at the measured rates (None before anything comparable has finished): the
    steps past its latest checkpoint and the evaluations not yet written in `run_dir`. An evaluation counts
    its `max_samples` cap, so 'all of dev' (a cap above its size) is over-estimated."""
    seconds = 0.0
    if run.train and not (run_dir is not None and (run_dir / "summary.json").exists()):
        rate = rates.get(_method(run.settings), rates.get("lora"))
        if rate is None or not run.settings.get("max_train_samples"):
            return None
        seconds += rate * run.settings["max_train_samples"] * (1 - _done_fraction(run_dir))
    questions = sum(e.get("max_samples") or 0 for name, e in run.evaluations.items()
                    if run_dir is None or not (run_dir / f"eval_{name}.json").exists())
    return seconds + rates["evaluate"] * questions if "evaluate" in rates else None


def run_one(run: Run, run_dir: Path, log, torch_threads: int | None = None, processes: int = 1) -> dict:
    """Train (resuming from the last checkpoint; under torchrun with `processes` > 1) and evaluate; returns the
    done record."""
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "error.json").unlink(missing_ok=True)
    started = time.time()
    revision = code_revision()  # what this run is made with
    lines = commands(run, run_dir)
    if run.train:
        train_line = lines.pop(0)
        if not (run_dir / "summary.json").exists():
            checkpoint = _latest_checkpoint(run_dir)
            # the sweep owns its run directories: an attempt that left no checkpoint starts over
            train_line += (["--resume_from_checkpoint", str(checkpoint)] if checkpoint
                           else ["--overwrite_output_dir", "true"])
            _call(train_line, log, torch_threads, processes)
    for line in lines:
        if not Path(line[line.index("--output") + 1]).exists():
            _call(line, log, torch_threads)
    weights = [p for p in ("adapter_model.safetensors", "model.safetensors") if (run_dir / p).exists()]
    record = {"run_id": run.run_id, "name": run.name, "kind": run.kind, "train": run.train,
              "settings": run.settings, "grid_point": run.grid_point, "evaluations": {}, "seconds": time.time() - started,
              # weights are not kept in git: their size is recorded here, where the study table reads it
              "weights_file": weights[0] if weights else None,
              "weights_bytes": (run_dir / weights[0]).stat().st_size if weights else None, **revision}
    for name in run.evaluations:
        result = json.loads((run_dir / f"eval_{name}.json").read_text())
        record["evaluations"][name] = {k: result[k] for k in ("exact_match", "f1", "n")}
    write_json_atomic(run_dir / "done.json", record)
    return record


class RunFailed(RuntimeError):
    def __init__(self, message: str, returncode: int | None = None):
        super().__init__(message)
        self.returncode = returncode  # negative: the command was killed by that signal


def _call(line: list[str], log, torch_threads: int | None = None, processes: int = 1) -> None:
    parallel = processes > 1 and line[1] == "train"  # data parallel: one process per GPU, under torchrun
    log.write(f"\n$ {shlex.join(line)}  # {time.strftime('%Y-%m-%d %H:%M:%S')}"
              + (f", torchrun with {processes} processes" if parallel else "") + "\n")
    log.flush()
    command = [sys.executable, "-m", "loraqa.cli"] + line[1:]  # `loraqa` of this very installation
    if parallel:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                   str(processes), "-m", "loraqa.cli"] + line[1:]
    env = {**os.environ, "OMP_NUM_THREADS": str(torch_threads)} if torch_threads else None
    code = subprocess.call(command + (["--torch_threads", str(torch_threads)] if torch_threads else []),
                           stdout=log, stderr=subprocess.STDOUT, preexec_fn=_die_with_parent, env=env)
    if code != 0:
        raise RunFailed(f"loraqa {line[1]} exited with {code}", code)


def run_sweep(spec_path: str, output_dir: str, *, print_commands: bool = False, limit: int | None = None,
              torch_threads: int | None = None) -> dict:
    """Run (or print) every pending run of the spec; returns {run_id: status}. `limit` stops after that many
    runs (for a time-boxed session); `torch_threads` caps each run's threads without changing its identity
    (on a shared machine: oversubscribed cores slowed a run several times over here)."""
    spec = load_spec(spec_path)
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    statuses, executed = {}, 0
    while True:  # re-plan after every run: `from: best` runs appear once the grid is done
        finished = finished_runs(out)
        runs = plan(spec, finished)
        pending = [r for r in runs if r.run_id not in finished and statuses.get(r.run_id) not in ("failed", "held")]
        statuses.update({r.run_id: "done" for r in runs if r.run_id in finished})
        if print_commands:
            for run in pending:
                print(" && ".join(shlex.join(line) for line in commands(run, out / run.run_id)))
            return {r.run_id: "pending" for r in pending}
        if not pending or (limit is not None and executed >= limit):
            waiting = len((spec.get("runs") or {})) - sum(r.kind == "named" for r in runs)
            held = sum(s == "held" and r not in finished for r, s in statuses.items())
            print(f"sweep: {len(finished)} runs done, {len(pending)} pending"
                  + (f", {held} held by another sweep" if held else "")
                  + (f", {waiting} waiting for the grid" if waiting else ""), flush=True)
            return statuses
        run = pending[0]
        holder = this_holder()
        other = acquire_claim(out / run.run_id, holder)
        if other is not None:  # another sweep trains it: never twice, never its checkpoints overwritten
            statuses[run.run_id] = "held"
            print(f"[{len(finished) + 1}/{len(runs)}] {run.run_id}: skipped, held by {describe_holder(other)}",
                  flush=True)
            continue
        rates = measured_rates(out, finished)
        estimates = [estimated_seconds(r, rates, out / r.run_id) for r in pending]
        eta = (f", ~{duration(estimates[0])}" if estimates[0] else "") + \
            (f", sweep ETA {time.strftime('%H:%M', time.localtime(time.time() + sum(estimates)))}"
             if None not in estimates else "")
        print(f"[{len(finished) + 1}/{len(runs)}] {run.run_id}: started {time.strftime('%H:%M')}{eta}", flush=True)
        started = time.time()
        (out / run.run_id).mkdir(parents=True, exist_ok=True)
        with open(out / run.run_id / "train.log", "a") as log:
            try:
                run_one(run, out / run.run_id, log, torch_threads)
                statuses[run.run_id] = "done"
                print(f"    done in {(time.time() - started) / 60:.1f} min", flush=True)
            except (RunFailed, OSError, KeyError, json.JSONDecodeError) as err:
                statuses[run.run_id] = "failed"
                write_json_atomic(out / run.run_id / "error.json", {"error": str(err), "log": str(log.name)})
                print(f"    FAILED: {err} (log: {log.name})", flush=True)
            finally:
                release_claim(out / run.run_id, holder)
        executed += 1



# ---- claims: which process or job is training a run ----------------------------------------------------------

def code_revision() -> dict:
    """{"git_revision": the checkout's HEAD, "git_dirty": whether the package's tracked files or pyproject.toml
    differ from it}; both None outside a git checkout."""
    package = Path(__file__).resolve().parent
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=30, cwd=package)
        if head.returncode != 0:
            return {"git_revision": None, "git_dirty": None}
        top = subprocess.run(["git", "rev-parse", "--show-toplevel"], capture_output=True, text=True, timeout=30,
                             cwd=package).stdout.strip()
        diff = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", str(package),
                               "pyproject.toml"], capture_output=True, text=True, timeout=30, cwd=top)
    except (OSError, subprocess.SubprocessError):
        return {"git_revision": None, "git_dirty": None}
    return {"git_revision": head.stdout.strip(), "git_dirty": bool(diff.stdout.strip())}


def other_revisions(output_dir: str | Path, run_ids, current: dict | None = None) -> dict[str, list[str]]:
    """{revision: [run ids]} of the finished runs made at a revision other than `current` (default: this
    checkout's), a dirty tree counting as its own revision ('<sha>+dirty'); runs from before revisions were
    recorded fall back to their run_config.json, else 'unknown'."""
    current = current or code_revision()
    here = f"{current['git_revision']}{'+dirty' if current['git_dirty'] else ''}"
    others: dict[str, list[str]] = {}
    for run_id in run_ids:
        try:
            record = json.loads((Path(output_dir) / run_id / "done.json").read_text())
        except (OSError, json.JSONDecodeError):
            continue
        revision, dirty = record.get("git_revision"), record.get("git_dirty")
        if revision is None:
            try:
                revision = json.loads((Path(output_dir) / run_id / "run_config.json").read_text()).get("git_revision")
            except (OSError, json.JSONDecodeError, AttributeError):
                revision = None
        label = f"{revision}{'+dirty' if dirty else ''}" if revision else "unknown"
        if label != here:
            others.setdefault(label, []).append(run_id)
    return others
