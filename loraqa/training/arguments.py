"""The Trainer's settings: transformers' `TrainingArguments` with loraqa's defaults, its time budget and its
speed options (shared-context packing, answer-only logits)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Literal

from transformers import TrainingArguments

from ..config import ConfigError, check_setting, field_help


def _has_accelerator() -> bool:
    import torch

    return torch.cuda.is_available() or (hasattr(torch, "xpu") and torch.xpu.is_available())


@dataclass
class LoraQATrainingArguments(TrainingArguments):
    """transformers' TrainingArguments with loraqa's defaults and speed options."""

    output_dir: str | None = field(default="runs/latest", **field_help("Run directory (adapter, config, metrics, summary)."))
    learning_rate: float = field(default=2e-4, **field_help("Peak learning rate (AdamW)."))
    per_device_train_batch_size: int = field(default=8, **field_help("Questions per step and process."))
    per_device_eval_batch_size: int = field(default=16, **field_help("Questions per validation batch."))
    num_train_epochs: float = field(default=1.0, **field_help("Epochs (ignored when max_steps > 0)."))
    warmup_ratio: float = field(default=0.03, **field_help(
        "Linear warm-up share of the steps (transformers 5 spells it as a fractional warmup_steps)."))
    weight_decay: float = field(default=0.0, **field_help("AdamW weight decay."))
    lr_scheduler_type: str = field(default="linear", **field_help("Learning-rate schedule."))
    logging_steps: float = field(default=10, **field_help("Log train loss, lr, grad norm, tokens/s every N steps."))
    eval_strategy: str = field(default="steps", **field_help("When to compute the validation loss: no, steps, epoch."))
    eval_steps: float | None = field(default=100, **field_help("Validation loss every N steps."))
    save_steps: float = field(default=100, **field_help("Adapter checkpoint every N steps."))
    save_total_limit: int | None = field(default=2, **field_help("Keep this many checkpoints."))
    report_to: str | None = field(default="none", **field_help("Trainer integrations (loraqa writes metrics.jsonl itself)."))
    # not flags: the collators need every column, and validation computes the loss only (QATrainer.evaluate)
    remove_unused_columns: bool = field(default=False, init=False)
    prediction_loss_only: bool = field(default=True, init=False)
    overwrite_output_dir: bool = field(default=False, **field_help(
        "Train into an output_dir that holds a run of another configuration (its checkpoints are deleted first); "
        "without it such a directory is refused. Resuming (--resume_from_checkpoint) needs no flag."))
    max_train_minutes: float | None = field(default=None, **field_help(
        "Wall-clock budget of the whole `train` (loading, training, validation): a few steps timed before "
        "training size max_steps (never above the epochs' or max_steps' own) so that the learning-rate "
        "schedule still runs to its end. Printed with the expected finish time; summary.json records it."))
    packing: Literal["shared_context", "none"] = field(default="shared_context", **field_help(
        "shared_context: each paragraph once per step, its questions attending to it through a block mask; "
        "none: one padded row per question (the usual notebook)."))
    answer_only_logits: bool = field(default=True, **field_help(
        "Compute LM-head logits only where an answer token is predicted (same loss, less compute)."))
    torch_threads: int | None = field(default=None, **field_help("torch.set_num_threads; default: all cores."))

    def __post_init__(self):
        check_setting(0.0 <= self.warmup_ratio < 1.0, "warmup_ratio", self.warmup_ratio, "must be in [0, 1)")
        check_setting(self.max_train_minutes is None or self.max_train_minutes > 0, "max_train_minutes",
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

