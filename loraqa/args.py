"""Command-line flags and `--config` YAML files -> the settings dataclasses, with one-line errors.

Precedence, lowest first: a dataclass default, a command's own defaults, the YAML file, the flags. A
mistyped flag names its closest valid spelling; flag prefixes are never taken for flags.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import sys
import types
import typing
from typing import Any

from .config import ConfigError
from .files import read_yaml


class _OneLineErrors:
    """argparse errors as one ConfigError line; a mistyped flag gets its closest valid spelling. Prefixes of
    flags are not taken for them (argparse's allow_abbrev): `--learning` stays a mistake, not a learning rate."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, allow_abbrev=False, **kwargs)

    def error(self, message: str):
        raise ConfigError(message)

    def parse_args(self, args=None, namespace=None):
        namespace, extras = self.parse_known_args(args, namespace)
        if extras:
            raise ConfigError(unknown_arguments(extras, list(self._option_string_actions)))
        return namespace


class ArgumentParser(_OneLineErrors, argparse.ArgumentParser):
    """The CLI's plain argparse parser."""


def settings_parser(dataclass_types: tuple):
    """A parser of the dataclasses' fields as flags. transformers' HfArgumentParser where a dataclass is a
    `TrainingArguments` (its fields need it); otherwise `SettingsParser`, which makes the same flags without
    importing transformers, so that `loraqa evaluate --help` or a mistyped flag answers at once."""
    if not any(_is_training_arguments(t) for t in dataclass_types):
        return SettingsParser(dataclass_types)
    from transformers import HfArgumentParser  # heavy: only for the training settings

    class _SettingsParser(_OneLineErrors, HfArgumentParser):
        """HfArgumentParser, whose own unknown-flag error is a ValueError traceback."""

    return _SettingsParser(dataclass_types)


def _is_training_arguments(dataclass_type) -> bool:
    return any(c.__name__ == "TrainingArguments" and c.__module__.startswith("transformers")
               for c in dataclass_type.__mro__)


def string_to_bool(value):
    """`--flag true/false/yes/no/1/0` (and a bare `--flag`), as HfArgumentParser reads a bool."""
    if isinstance(value, bool):
        return value
    if value.lower() in ("yes", "true", "t", "y", "1"):
        return True
    if value.lower() in ("no", "false", "f", "n", "0"):
        return False
    raise argparse.ArgumentTypeError(f"Truthy value expected: got {value} but expected one of yes/no, true/false, "
                                     "t/f, y/n, 1/0 (case insensitive).")


class SettingsParser(ArgumentParser):
    """The flags HfArgumentParser makes from settings dataclasses (`--name` and `--name-with-dashes`, `--no_name`
    for a bool that defaults to true, Literal choices, Optional values), for the field types loraqa's own settings
    use: int, float, str, bool, Optional of those and Literal. tests/test_config.py checks it flag for flag against
    HfArgumentParser."""

    def __init__(self, dataclass_types: tuple):
        super().__init__()
        self.dataclass_types = tuple(dataclass_types)
        for dataclass_type in self.dataclass_types:
            hints = typing.get_type_hints(dataclass_type)
            for f in dataclasses.fields(dataclass_type):
                if f.init:
                    self._add_field(f, hints[f.name], dataclass_type)

    def _add_field(self, f: dataclasses.Field, hint, owner) -> None:
        options = [f"--{f.name}"] + ([f"--{f.name.replace('_', '-')}"] if "_" in f.name else [])
        kwargs = dict(f.metadata)
        args = typing.get_args(hint)
        if typing.get_origin(hint) in (typing.Union, types.UnionType) and type(None) in args and len(args) == 2:
            hint = next(a for a in args if a is not type(None))  # Optional[X] -> X (None stays the default)
        if f.default is not dataclasses.MISSING:
            kwargs["default"] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            kwargs["default"] = f.default_factory()
        else:
            kwargs["required"] = True
        if typing.get_origin(hint) is typing.Literal:
            choices = typing.get_args(hint)
            kwargs.update(choices=choices, type=lambda value, choices=choices: {str(c): c for c in choices}.get(value, value))
        elif hint is bool:
            kwargs.update(type=string_to_bool, nargs="?", const=True, default=kwargs.get("default", False))
            kwargs.pop("required", None)
        elif hint in (int, float, str):
            kwargs["type"] = hint
        else:
            raise TypeError(f"{owner.__name__}.{f.name}: a {hint} setting needs HfArgumentParser")
        self.add_argument(*options, **kwargs)
        if hint is bool and f.default is True:
            self.add_argument(f"--no_{f.name}", f"--no-{f.name.replace('_', '-')}", action="store_false",
                              dest=f.name, **dict(f.metadata), default=False)

    def parse_args_into_dataclasses(self, args=None, look_for_args_file=False) -> tuple:
        namespace = vars(self.parse_args(args))
        return tuple(t(**{f.name: namespace[f.name] for f in dataclasses.fields(t) if f.init})
                     for t in self.dataclass_types)


def unknown_arguments(extras: list[str], options: list[str]) -> str:
    """['--modle', 'x'] -> "unknown flag --modle (did you mean --model?)"."""
    flags = [a.split("=", 1)[0] for a in extras if a.startswith("--")]
    if not flags:
        return f"unexpected argument(s) {' '.join(extras)}"
    named = []
    for flag in flags:
        close = difflib.get_close_matches(flag, options, n=1)
        named.append(flag + (f" (did you mean {close[0]}?)" if close else ""))
    return f"unknown flag{'s' if len(named) > 1 else ''} {', '.join(named)}"


def read_settings_file(path: str, known: set[str]) -> dict[str, Any]:
    """A `--config` YAML mapping of setting names to values; one-line errors name the file (and the line)."""
    values = read_yaml(path) or {}
    if not isinstance(values, dict):
        raise ConfigError(f"{path}: expected a mapping of setting names to values")
    unknown = sorted(set(values) - known)
    if unknown:
        hints = [f"{name} (did you mean {close[0]}?)" if (close := difflib.get_close_matches(name, known, n=1))
                 else name for name in unknown]
        raise ConfigError(f"{path}: unknown setting(s) {', '.join(hints)}")
    return values


def parse_config(dataclass_types: tuple, args: list[str] | None = None, *, defaults: dict[str, Any] | None = None,
                 defaults_source: str = "command") -> tuple:
    """Parse flags over `--config run.yaml` over `defaults` (a command's own) into the given dataclasses."""
    return parse_config_with_sources(dataclass_types, args, defaults=defaults, defaults_source=defaults_source)[0]


def parse_config_with_sources(dataclass_types: tuple, args: list[str] | None = None, *,
                              defaults: dict[str, Any] | None = None, defaults_source: str = "command"
                              ) -> tuple[tuple, dict[str, str]]:
    """(dataclasses, where each setting came from: 'default', `defaults_source`, 'config file' or 'flag').

    Precedence, lowest first: the dataclass default, `defaults` (e.g. `loraqa run`'s budget), the YAML file,
    the flags: a user's file and flags always win over a command's own choices.
    """
    parser = settings_parser(dataclass_types)
    parser.add_argument("--config", default=None, help="YAML file of settings; flags override it.")
    args = list(sys.argv[1:] if args is None else args)
    unset = object()  # a namespace pre-filled with it keeps argparse from filling in defaults: what stays is a flag
    given = parser.parse_args(args, argparse.Namespace(**{a.dest: unset for a in parser._actions}))
    names = [f.name for t in dataclass_types for f in dataclasses.fields(t) if f.init]
    sources = dict.fromkeys(names, "default")
    if defaults:
        parser.set_defaults(**defaults)
        sources.update(dict.fromkeys(defaults, defaults_source))
    if given.config not in (unset, None):
        values = read_settings_file(given.config, set(names))
        parser.set_defaults(**values)
        sources.update(dict.fromkeys(values, "config file"))
    sources.update({name: "flag" for name in names if getattr(given, name, unset) is not unset})
    parsed = parser.parse_args_into_dataclasses(args=args, look_for_args_file=False)
    return tuple(p for p in parsed if dataclasses.is_dataclass(p)), sources

