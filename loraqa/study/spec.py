"""A sweep spec (YAML) -> a checked mapping: keys, settings, values (converted as the commands will convert
the flags the sweep gives them), extension and tie rules, the Slurm mapping; one-line errors naming the file
and the key, before anything runs."""

from __future__ import annotations

import dataclasses
from argparse import ArgumentTypeError
from pathlib import Path

from ..config import ConfigError, DataArguments, EvaluateArguments, GenerationSettings, LoraArguments, ModelArguments
from ..files import read_yaml


SPEC_KEYS = {"base", "grid", "centre", "runs", "first", "evaluations", "select_on", "extend", "ties", "slurm"}
RUN_KEYS = {"train", "from", "evaluate"}  # run-level keys that are not `loraqa train` settings


def _fields(*types) -> set[str]:
    return {f.name for t in types for f in dataclasses.fields(t)}


def _train_settings() -> set[str]:
    from ..training.arguments import LoraQATrainingArguments  # transformers: once a spec has been read

    return _fields(ModelArguments, LoraArguments, DataArguments, LoraQATrainingArguments)


def _evaluate_settings() -> set[str]:
    return _fields(ModelArguments, EvaluateArguments, GenerationSettings) - {"output", "adapter"}


def load_spec(path: str | Path) -> dict:
    """Read and check a spec; errors name the file and the key."""
    spec = read_yaml(path)
    if not isinstance(spec, dict):
        raise ConfigError(f"{path}: expected a mapping with keys {', '.join(sorted(SPEC_KEYS))}")
    unknown = set(spec) - SPEC_KEYS
    if unknown:
        raise ConfigError(f"{path}: unknown key(s) {', '.join(sorted(unknown))}")
    evaluate_settings, train_settings = _evaluate_settings(), _train_settings()

    def check_settings(where: str, settings, allowed: set[str]):
        if not isinstance(settings, dict):
            raise ConfigError(f"{path}: {where}: expected a mapping of settings")
        bad = set(settings) - allowed
        if bad:
            raise ConfigError(f"{path}: {where}: unknown setting(s) {', '.join(sorted(bad))}")

    check_settings("base", spec.get("base", {}), train_settings)
    for axis, values in (spec.get("grid") or {}).items():
        if not isinstance(values, list) or not values:
            raise ConfigError(f"{path}: grid.{axis}: expected a non-empty list of values")
        for value in values:  # a value is a setting's value, or a mapping of tied settings ({lora_r, lora_alpha})
            check_settings(f"grid.{axis}", value if isinstance(value, dict) else {axis: value}, train_settings)
    check_settings("centre", spec.get("centre", {}), set(spec.get("grid") or {}))
    for axis, value in (spec.get("centre") or {}).items():
        if value not in spec["grid"][axis]:
            raise ConfigError(f"{path}: centre.{axis}: {value!r} is not one of the grid's values")
    for name, run in (spec.get("runs") or {}).items():
        check_settings(f"runs.{name}", run, train_settings | RUN_KEYS)
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
    from ..training.arguments import LoraQATrainingArguments

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
        if axis not in _train_settings() or not isinstance(rule[axis], list) or not rule[axis]:
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
