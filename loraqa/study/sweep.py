"""A sweep spec -> one `loraqa train` + `loraqa evaluate` pair per run, resumable; run directories -> a table.

A spec (YAML) names a base configuration, axes to cross and extra runs:

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
executor, the job id for Slurm, see loraqa.slurm). Every sweep respects a claim whose holder is alive (it skips
the run with one line naming the holder) and takes over one whose holder is gone, so two sweeps on one
directory never train the same run. `done.json` records the git revision the run was made at and whether the
package's code differed from it. A spec's optional `slurm:` mapping (partition, gpus_per_run, ...) is read by
`--executor slurm` only and is no part of any run's identity.
"""
from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import fcntl
import hashlib
import itertools
import json
import os
import shlex
import signal
import socket
import statistics
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from argparse import ArgumentTypeError
from pathlib import Path

from ..config import ConfigError, DataArguments, GenerationSettings, LoraArguments, ModelArguments
from ..files import read_yaml, write_json_atomic
from ..training.arguments import LoraQATrainingArguments
from .selection import Selection, divergence, extend_rows, extend_series, resolve, value_text

SPEC_KEYS = {"base", "grid", "centre", "runs", "first", "evaluations", "select_on", "extend", "ties", "slurm"}
RUN_KEYS = {"train", "from", "evaluate"}  # run-level keys that are not `loraqa train` settings


def _fields(*types) -> set[str]:
    return {f.name for t in types for f in dataclasses.fields(t)}


TRAIN_SETTINGS = _fields(ModelArguments, LoraArguments, DataArguments, LoraQATrainingArguments)


def _evaluate_settings() -> set[str]:
    from ..evaluation.evaluate import EvaluateArguments

    return _fields(ModelArguments, EvaluateArguments, GenerationSettings) - {"output", "adapter"}


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


def load_spec(path: str | Path) -> dict:
    """Read and check a spec; errors name the file and the key."""
    spec = read_yaml(path)
    if not isinstance(spec, dict):
        raise ConfigError(f"{path}: expected a mapping with keys {', '.join(sorted(SPEC_KEYS))}")
    unknown = set(spec) - SPEC_KEYS
    if unknown:
        raise ConfigError(f"{path}: unknown key(s) {', '.join(sorted(unknown))}")
    evaluate_settings = _evaluate_settings()

    def check_settings(where: str, settings, allowed: set[str]):
        if not isinstance(settings, dict):
            raise ConfigError(f"{path}: {where}: expected a mapping of settings")
        bad = set(settings) - allowed
        if bad:
            raise ConfigError(f"{path}: {where}: unknown setting(s) {', '.join(sorted(bad))}")

    check_settings("base", spec.get("base", {}), TRAIN_SETTINGS)
    for axis, values in (spec.get("grid") or {}).items():
        if not isinstance(values, list) or not values:
            raise ConfigError(f"{path}: grid.{axis}: expected a non-empty list of values")
        for value in values:  # a value is a setting's value, or a mapping of tied settings ({lora_r, lora_alpha})
            check_settings(f"grid.{axis}", value if isinstance(value, dict) else {axis: value}, TRAIN_SETTINGS)
    check_settings("centre", spec.get("centre", {}), set(spec.get("grid") or {}))
    for axis, value in (spec.get("centre") or {}).items():
        if value not in spec["grid"][axis]:
            raise ConfigError(f"{path}: centre.{axis}: {value!r} is not one of the grid's values")
    for name, run in (spec.get("runs") or {}).items():
        check_settings(f"runs.{name}", run, TRAIN_SETTINGS | RUN_KEYS)
        if run.get("from") not in (None, "best"):
            raise ConfigError(f"{path}: runs.{name}.from: only 'best' is supported")
        for evaluation, overrides in (run.get("evaluate") or {}).items():
            if evaluation not in (spec.get("evaluations") or {}):
                raise ConfigError(f"{path}: runs.{name}.evaluate.{evaluation}: no such evaluation")
            check_settings(f"runs.{name}.evaluate.{evaluation}", overrides, evaluate_settings)
    for name in spec.get("first") or []:
        if name not in (spec.get("runs") or {}):
            raise ConfigError(f"{path}: first: {name!r} is not a named run")
    if not spec.get("evaluations"):
        raise ConfigError(f"{path}: evaluations: at least one is needed")
    for name, settings in spec["evaluations"].items():
        check_settings(f"evaluations.{name}", settings, evaluate_settings)
    if spec.get("select_on", "validation") not in spec["evaluations"]:
        raise ConfigError(f"{path}: select_on: {spec.get('select_on', 'validation')!r} is not an evaluation")
    check_values(path, spec)
    _check_selection_keys(path, spec)
    if "slurm" in spec:
        from .slurm import check_slurm_spec

        check_slurm_spec(path, spec["slurm"])
    return spec


def _flag_types(*types) -> dict:
    """{setting: its argparse action} as `loraqa train` / `loraqa evaluate` parse the flags a sweep gives them."""
    from ..args import settings_parser

    parser = settings_parser(types)
    return {action.dest: action for action in parser._actions if action.option_strings}


def check_values(path, spec: dict) -> None:
    """Every setting's value, converted as its command will convert the flag the sweep gives it: a value of the
    wrong type, outside a setting's choices, a list or mapping where one value goes, or `null` (a flag cannot
    say 'none', so the command would run with its default while the run's identity said null) is one line
    naming the file and the key, before anything runs."""
    from ..evaluation.evaluate import EvaluateArguments

    train = _flag_types(ModelArguments, LoraArguments, DataArguments, LoraQATrainingArguments)
    evaluate = _flag_types(ModelArguments, EvaluateArguments, GenerationSettings)

    def check(where: str, settings: dict, actions: dict):
        for key, value in (settings or {}).items():
            if key in RUN_KEYS or key not in actions:
                continue
            if value is None:
                raise ConfigError(f"{path}: {where}.{key}: null is not a value (leave the key out for the default)")
            if isinstance(value, (list, dict)):
                raise ConfigError(f"{path}: {where}.{key}: expected a single value, got {value!r}")
            action = actions[key]
            text = str(value).lower() if isinstance(value, bool) else str(value)
            try:
                converted = action.type(text) if action.type else text
            except (TypeError, ValueError, ArgumentTypeError):
                raise ConfigError(f"{path}: {where}.{key}: {value!r} is not a valid value") from None
            if action.choices and converted not in action.choices:
                raise ConfigError(f"{path}: {where}.{key}: {value!r} is not one of "
                                  f"{', '.join(map(str, action.choices))}")

    check("base", spec.get("base"), train)
    for axis, values in (spec.get("grid") or {}).items():
        for value in values:
            check(f"grid.{axis}", value, train) if isinstance(value, dict) else check("grid", {axis: value}, train)
    for name, run in (spec.get("runs") or {}).items():
        check(f"runs.{name}", run, train)
        for evaluation, overrides in (run.get("evaluate") or {}).items():
            check(f"runs.{name}.evaluate.{evaluation}", overrides, evaluate)
    for name, settings in spec["evaluations"].items():
        check(f"evaluations.{name}", settings, evaluate)


def _check_selection_keys(path, spec: dict) -> None:
    """`extend` (a grid axis: {factor, max}; a series: {runs: [named runs], <setting>: [next values]}) and
    `ties` ({max_configs, seeds}); see `loraqa.study.selection`."""
    def number(where: str, value, low: float) -> None:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= low:
            raise ConfigError(f"{path}: {where}: expected a number above {low:g}, got {value!r}")

    grid, runs = spec.get("grid") or {}, spec.get("runs") or {}
    for key, rule in (spec.get("extend") or {}).items():
        if not isinstance(rule, dict):
            raise ConfigError(f"{path}: extend.{key}: expected a mapping")
        if key in grid:
            if set(rule) != {"factor", "max"}:
                raise ConfigError(f"{path}: extend.{key}: a grid axis takes exactly factor and max")
            if any(isinstance(v, dict) or not isinstance(v, (int, float)) for v in grid[key]):
                raise ConfigError(f"{path}: extend.{key}: only a numeric grid axis can be extended")
            number(f"extend.{key}.factor", rule["factor"], 1)
            number(f"extend.{key}.max", rule["max"], 0)
            continue
        settings = [k for k in rule if k != "runs"]
        if not isinstance(rule.get("runs"), list) or not rule["runs"] or len(settings) != 1:
            raise ConfigError(f"{path}: extend.{key}: not a grid axis, so a series: expected runs (a list of "
                              "named runs) and one setting with its next values")
        axis = settings[0]
        if axis not in TRAIN_SETTINGS or not isinstance(rule[axis], list) or not rule[axis]:
            raise ConfigError(f"{path}: extend.{key}.{axis}: expected a `loraqa train` setting with a list of values")
        for name in rule["runs"]:
            if name not in runs or runs[name].get("from") == "best" or axis not in runs[name]:
                raise ConfigError(f"{path}: extend.{key}.runs: {name!r} is not a named run that sets {axis}")
    ties = spec.get("ties")
    if ties is not None:
        if not isinstance(ties, dict) or set(ties) != {"max_configs", "seeds"}:
            raise ConfigError(f"{path}: ties: expected {{max_configs, seeds}}")
        for key in ("max_configs", "seeds"):
            if not isinstance(ties[key], int) or isinstance(ties[key], bool) or ties[key] < 1:
                raise ConfigError(f"{path}: ties.{key}: expected a positive integer, got {ties[key]!r}")


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

CLAIM = "claim.json"
ALIVE_SLURM_STATES = {"PENDING", "RUNNING", "CONFIGURING", "COMPLETING", "SUSPENDED", "REQUEUED", "REQUEUE_FED",
                      "REQUEUE_HOLD", "RESIZING", "SIGNALING", "STAGE_OUT", "STOPPED"}


def _process_start(pid: int) -> str | None:
    """The process's start time (clock ticks since boot): with the pid, it names one process (pids are reused)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def this_holder(token: str | None = None, slurm_job_id: str | None = None) -> dict:
    """A claim naming this process on this host (or the Slurm job `slurm_job_id`). Claims with the same token
    belong to the same holder: a submitted job takes over its submitter's claim by sharing its token."""
    holder = {"host": socket.gethostname(), "pid": os.getpid(), "pid_start": _process_start(os.getpid()),
              "token": token or uuid.uuid4().hex, "since": time.strftime("%Y-%m-%d %H:%M:%S")}
    return {**holder, "slurm_job_id": slurm_job_id} if slurm_job_id else holder


def slurm_job_state(job_id: str) -> str | None:
    """The job's state from `squeue` (PENDING, RUNNING, COMPLETED, ...), None once Slurm no longer knows it;
    'UNKNOWN' when squeue cannot be asked."""
    try:
        out = subprocess.run(["squeue", "-h", "-r", "-t", "all", "-j", str(job_id), "-o", "%T"],
                             capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return "UNKNOWN"
    if out.returncode != 0:
        return None if "Invalid job id" in out.stderr else "UNKNOWN"
    states = out.stdout.split()
    return states[0] if states else None


def holder_alive(claim: dict) -> bool:
    """Whether a claim's holder may still be working: its Slurm job is queued or running, or its process is
    alive on this host. A process on another host cannot be checked from here and counts as alive."""
    if claim.get("slurm_job_id"):
        state = slurm_job_state(claim["slurm_job_id"])
        return state == "UNKNOWN" or state in ALIVE_SLURM_STATES
    if claim.get("host") != socket.gethostname():
        return True
    try:
        os.kill(int(claim["pid"]), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, KeyError, TypeError, ValueError):
        return True
    return claim.get("pid_start") in (None, _process_start(int(claim["pid"])))


def describe_holder(claim: dict) -> str:
    who = f"Slurm job {claim['slurm_job_id']}" if claim.get("slurm_job_id") else \
        f"pid {claim.get('pid')} on {claim.get('host')}"
    return f"{who} since {claim.get('since')}"


@contextlib.contextmanager
def _claim_lock(run_dir: Path):
    run_dir.mkdir(parents=True, exist_ok=True)
    with open(run_dir / ".claim.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def read_claim(run_dir: Path) -> dict | None:
    try:
        claim = json.loads((run_dir / CLAIM).read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return claim if isinstance(claim, dict) else None


def acquire_claim(run_dir: Path, holder: dict) -> dict | None:
    """Claim the run for `holder`: None when it now holds it (it was free, its own, or its holder is gone),
    else the live claim of another holder, left as it is."""
    with _claim_lock(run_dir):
        claim = read_claim(run_dir)
        if claim and claim.get("token") != holder["token"] and holder_alive(claim):
            return claim
        write_json_atomic(run_dir / CLAIM, holder)
        return None


def release_claim(run_dir: Path, holder: dict) -> None:
    """Drop the claim if `holder` (its token) still has it."""
    with _claim_lock(run_dir):
        claim = read_claim(run_dir)
        if claim and claim.get("token") == holder["token"]:
            (run_dir / CLAIM).unlink(missing_ok=True)


# ---- the code a run was made with ----------------------------------------------------------------------------

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
