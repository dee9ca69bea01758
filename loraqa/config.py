"""Typed settings for every stage, parsed from CLI flags or a YAML file, and the run-metadata writer.

Configuration flows one way: flags / YAML -> these dataclasses -> code. Field names reuse the names of
the libraries underneath (`lora_alpha`, `target_modules`, `learning_rate`, `max_new_tokens`) so that
the hand-off to PEFT, the Trainer and `generate` is field for field.
"""
from __future__ import annotations

import argparse
import dataclasses
import difflib
import json
import os
import platform
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml
from transformers import HfArgumentParser, TrainingArguments


def _help(text: str, **kwargs) -> dict:
    return {"metadata": {"help": text}, **kwargs}


def default_cache_dir() -> str:
    """Where `loraqa fetch` puts assets: $LORAQA_CACHE, else ./data."""
    return os.environ.get("LORAQA_CACHE", "data")


class ConfigError(ValueError):
    """A setting out of range, an unknown flag or an unreadable config file; the message names which."""


def _check(condition: bool, name: str, value: Any, rule: str) -> None:
    if not condition:
        raise ConfigError(f"{name}={value!r}: {rule}")


@dataclass
class ModelArguments:
    model: str = field(default="gpt2", **_help(
        "Model: an alias (gpt2, smollm2-135m), a hub id or a local directory. 'gpt2' falls back to the "
        "fetched smollm2-135m when the hub is unreachable, and says so."))
    cache_dir: str = field(default_factory=default_cache_dir, **_help(
        "Asset cache used by `loraqa fetch` and by aliases (env LORAQA_CACHE)."))


@dataclass
class LoraArguments:
    lora_r: int = field(default=16, **_help("LoRA rank r."))
    lora_alpha: int = field(default=32, **_help("LoRA alpha; the update is scaled by alpha/r (alpha/sqrt(r) with rsLoRA)."))
    lora_dropout: float = field(default=0.05, **_help("Dropout on the LoRA input."))
    target_modules: str = field(default="attention", **_help(
        "Preset (attention, attention+mlp, all-linear) or comma-separated module names/paths, e.g. "
        "'attn.c_attn,attn.c_proj'. Names are matched as full path suffixes."))
    use_rslora: bool = field(default=False, **_help("Rank-stabilised LoRA scaling alpha/sqrt(r)."))
    full_finetune: bool = field(default=False, **_help("Train every weight instead of LoRA (the control)."))

    def __post_init__(self):
        _check(self.lora_r >= 1, "lora_r", self.lora_r, "must be >= 1")
        _check(self.lora_alpha > 0, "lora_alpha", self.lora_alpha, "must be > 0")
        _check(0.0 <= self.lora_dropout < 1.0, "lora_dropout", self.lora_dropout, "must be in [0, 1)")
        _check(bool(self.target_modules.strip()), "target_modules", self.target_modules, "must not be empty")


@dataclass
class DataArguments:
    train_file: str = field(default="squad", **_help(
        "SQuAD-format JSON, the alias 'squad' (fetched v1.1 train) or a hub dataset name."))
    validation_file: str = field(default="squad", **_help(
        "SQuAD-format JSON, 'squad' (fetched v1.1 dev) or a hub dataset name; a slice gives the validation loss."))
    max_train_samples: int | None = field(default=None, **_help("Use a seeded subset of this many training questions."))
    max_eval_samples: int | None = field(default=200, **_help("Validation-loss questions (a seeded subset)."))
    max_length: int = field(default=512, **_help(
        "Maximum prompt+answer tokens; longer examples keep a context window around the answer."))
    unanswerable: Literal["skip", "eos"] = field(default="skip", **_help(
        "SQuAD 2.0 questions without an answer: skip them, or train the model to answer with EOS alone."))
    subset_seed: int = field(default=0, **_help(
        "Seed of the subset and held-out rules: paragraphs ordered by sha1(f'{seed}:{context}') and taken whole "
        "until N questions, the last one cut to N (nested across N); held-out articles by sha1(f'{seed}:{title}')."))
    heldout_articles: int = field(default=0, **_help(
        "Hold out this many whole training articles (never trained on) and take the validation loss on them "
        "instead of validation_file: the selection set of a sweep, so that the dev set stays a test set."))
    train_on_prompt: bool = field(default=False, **_help(
        "Put the training loss on every token (prompt too) instead of the answer only: the ablation of prompt "
        "masking; the validation loss stays the answer's, comparable across runs. Needs --packing none (a "
        "shared context would carry loss once per paragraph, not once per question)."))

    def __post_init__(self):
        _check(self.max_length >= 32, "max_length", self.max_length, "must be >= 32")
        _check(self.heldout_articles >= 0, "heldout_articles", self.heldout_articles, "must be >= 0")
        for name in ("max_train_samples", "max_eval_samples"):
            value = getattr(self, name)
            _check(value is None or value >= 1, name, value, "must be >= 1 when given")


def _has_accelerator() -> bool:
    import torch

    return torch.cuda.is_available() or (hasattr(torch, "xpu") and torch.xpu.is_available())


@dataclass
class LoraQATrainingArguments(TrainingArguments):
    """transformers' TrainingArguments with loraqa's defaults and speed options."""

    output_dir: str | None = field(default="runs/latest", **_help("Run directory (adapter, config, metrics, summary)."))
    learning_rate: float = field(default=2e-4, **_help("Peak learning rate (AdamW)."))
    per_device_train_batch_size: int = field(default=8, **_help("Questions per step and process."))
    per_device_eval_batch_size: int = field(default=16, **_help("Questions per validation batch."))
    num_train_epochs: float = field(default=1.0, **_help("Epochs (ignored when max_steps > 0)."))
    warmup_ratio: float = field(default=0.03, **_help(
        "Linear warm-up share of the steps (transformers 5 spells it as a fractional warmup_steps)."))
    weight_decay: float = field(default=0.0, **_help("AdamW weight decay."))
    lr_scheduler_type: str = field(default="linear", **_help("Learning-rate schedule."))
    logging_steps: float = field(default=10, **_help("Log train loss, lr, grad norm, tokens/s every N steps."))
    eval_strategy: str = field(default="steps", **_help("When to compute the validation loss: no, steps, epoch."))
    eval_steps: float | None = field(default=100, **_help("Validation loss every N steps."))
    save_steps: float = field(default=100, **_help("Adapter checkpoint every N steps."))
    save_total_limit: int | None = field(default=2, **_help("Keep this many checkpoints."))
    report_to: str | None = field(default="none", **_help("Trainer integrations (loraqa writes metrics.jsonl itself)."))
    # not flags: the collators need every column, and validation computes the loss only (QATrainer.evaluate)
    remove_unused_columns: bool = field(default=False, init=False)
    prediction_loss_only: bool = field(default=True, init=False)
    overwrite_output_dir: bool = field(default=False, **_help(
        "Train into an output_dir that holds a run of another configuration (its checkpoints are deleted first); "
        "without it such a directory is refused. Resuming (--resume_from_checkpoint) needs no flag."))
    max_train_minutes: float | None = field(default=None, **_help(
        "Wall-clock budget of the whole `train` (loading, training, validation): a few steps timed before "
        "training size max_steps (never above the epochs' or max_steps' own) so that the learning-rate "
        "schedule still runs to its end. Printed with the expected finish time; summary.json records it."))
    packing: Literal["shared_context", "none"] = field(default="shared_context", **_help(
        "shared_context: each paragraph once per step, its questions attending to it through a block mask; "
        "none: one padded row per question (the usual notebook)."))
    answer_only_logits: bool = field(default=True, **_help(
        "Compute LM-head logits only where an answer token is predicted (same loss, less compute)."))
    torch_threads: int | None = field(default=None, **_help("torch.set_num_threads; default: all cores."))

    def __post_init__(self):
        _check(0.0 <= self.warmup_ratio < 1.0, "warmup_ratio", self.warmup_ratio, "must be in [0, 1)")
        _check(self.max_train_minutes is None or self.max_train_minutes > 0, "max_train_minutes",
               self.max_train_minutes, "must be > 0")
        if self.warmup_ratio and not self.warmup_steps:
            self.warmup_steps = self.warmup_ratio
        if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not self.use_cpu and not _has_accelerator():
            self.use_cpu = True  # accelerate only runs several CPU processes (gloo) when told they are CPU ones
        if self.bf16 and not self.use_cpu and not _has_accelerator():
            self.use_cpu = True  # bf16 autocast on the CPU: transformers insists on being told
        try:
            super().__post_init__()
        except ValueError as err:  # transformers' own checks: one line, not a traceback
            raise ConfigError(f"training arguments: {' '.join(str(err).split())}") from None


@dataclass
class GenerationSettings:
    max_new_tokens: int = field(default=32, **_help(
        "Answer token budget (SQuAD v1.1 dev answers + EOS: 99th percentile 21 GPT-2 / 22 SmolLM2 tokens)."))
    do_sample: bool = field(default=False, **_help("Sample instead of greedy decoding."))
    top_k: int | None = field(default=None, **_help("Keep the k most likely tokens when sampling."))
    top_p: float | None = field(default=None, **_help("Nucleus sampling: keep the smallest set with mass >= top_p."))
    temperature: float = field(default=1.0, **_help("Softmax temperature when sampling."))
    seed: int = field(default=0, **_help("Sampling seed; a run with the same seed gives the same answers."))
    batch_size: int = field(default=128, **_help(
        "Questions decoded together (whole paragraphs). Fastest on 2 CPU cores (`loraqa evaluate --model "
        "smollm2-135m --adapter runs/main --max_samples 500 --batch_size B`: 64 -> 11.6, 128 -> 12.4, "
        "256 -> 11.7 questions/s)."))
    prefix_cache: bool = field(default=True, **_help(
        "Encode each paragraph once and let its questions attend to its shared keys/values (models using "
        "transformers' attention interface with global attention); false: every row its full prompt."))
    constrain_to_context: bool = field(default=False, **_help(
        "Answer only with a span of the context: every token keeps the answer a prefix of the tokens of "
        "' ' + a span starting at a word, EOS/newline only where the span may end (constraints.SpanTrie)."))
    num_beams: int = field(default=1, **_help(
        "Beam search with this many beams (1: off), as transformers' generate(num_beams=N, length_penalty=1.0, "
        "early_stopping=False); a beam ends at EOS or a newline token."))

    def __post_init__(self):
        _check(self.max_new_tokens >= 1, "max_new_tokens", self.max_new_tokens, "must be >= 1")
        _check(self.top_k is None or self.top_k >= 1, "top_k", self.top_k, "must be >= 1")
        _check(self.top_p is None or 0.0 < self.top_p <= 1.0, "top_p", self.top_p, "must be in (0, 1]")
        _check(self.temperature > 0.0, "temperature", self.temperature, "must be > 0")
        _check(self.batch_size >= 1, "batch_size", self.batch_size, "must be >= 1")
        _check(self.num_beams >= 1, "num_beams", self.num_beams, "must be >= 1")
        _check(self.num_beams == 1 or not self.do_sample, "num_beams", self.num_beams,
               "beam search is deterministic: use it with do_sample false")

    @property
    def name(self) -> str:
        """Short label for tables: greedy, top_k=50, top_p=0.9, temperature=0.7, num_beams=4; ",in_context"
        appended when constrained to the context's spans."""
        return self._decoding_name + (",in_context" if self.constrain_to_context else "")

    @property
    def _decoding_name(self) -> str:
        if self.num_beams > 1:
            return f"num_beams={self.num_beams}"
        if not self.do_sample:
            return "greedy"
        parts = [f"top_k={self.top_k}" if self.top_k else "", f"top_p={self.top_p}" if self.top_p else "",
                 f"temperature={self.temperature}" if self.temperature != 1.0 else ""]
        return ",".join(p for p in parts if p) or "sample"


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


class _SettingsParser(_OneLineErrors, HfArgumentParser):
    """HfArgumentParser, whose own unknown-flag error is a ValueError traceback."""


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


def read_yaml(path: str | Path) -> Any:
    """A YAML file's content; one-line errors name the file (and the line)."""
    try:
        return yaml.safe_load(Path(path).read_text())
    except OSError as err:
        raise ConfigError(f"{path}: cannot be read ({err.strerror or err})") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" line {mark.line + 1}, column {mark.column + 1}:" if mark else ""
        raise ConfigError(f"{path}:{where} not valid YAML ({getattr(err, 'problem', None) or err})") from None


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
    parser = _SettingsParser(dataclass_types)
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


def _git_revision() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).resolve().parent)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def run_metadata() -> dict:
    """Package and library versions, git revision and machine: what makes a result reproducible."""
    import peft
    import torch
    import transformers

    from . import __version__

    return {
        "loraqa_version": __version__,
        "git_revision": _git_revision(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count(),
                    "torch_threads": torch.get_num_threads(),
                    "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None},
    }


def to_dict(settings) -> dict:
    if isinstance(settings, TrainingArguments):
        return settings.to_dict()
    return dataclasses.asdict(settings)


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> None:
    """Write to a temporary sibling, then rename: readers never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    write_bytes_atomic(path, text.encode("utf-8"))


def write_json_atomic(path: str | os.PathLike, payload: Any) -> None:
    write_text_atomic(path, json.dumps(payload, indent=2, ensure_ascii=False, default=str) + "\n")
