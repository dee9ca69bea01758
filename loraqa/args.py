"""Command-line flags and `--config` YAML files -> the settings dataclasses, with one-line errors.

Precedence, lowest first: a dataclass default, a command's own defaults, the YAML file, the flags. A
mistyped flag names its closest valid spelling; flag prefixes are never taken for flags.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import sys
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
    from transformers import HfArgumentParser  # heavy: only when settings are parsed

    class _SettingsParser(_OneLineErrors, HfArgumentParser):
        """HfArgumentParser, whose own unknown-flag error is a ValueError traceback."""

    return _SettingsParser(dataclass_types)


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

