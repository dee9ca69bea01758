"""A wall-clock budget for training (`--max_train_minutes`): a few real steps and one validation batch are
timed before the Trainer builds its scheduler, `max_steps` is sized so that the whole run fits (the
learning rate still decays to 0 at the end), and a deadline stops a run the probe misjudged.
"""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path

import torch
from transformers import TrainerCallback
from transformers.trainer_utils import IntervalStrategy

from ..config import ConfigError
from .arguments import LoraQATrainingArguments
from .loss import answer_loss, answer_loss_sum
from .trainer import QATrainer

logger = logging.getLogger(__name__)


def _evaluations(args: LoraQATrainingArguments, steps: int, steps_per_epoch: int) -> int:
    """Validation passes in a run of `steps` optimizer steps: the periodic ones and `fit`'s final one."""
    if args.eval_strategy == IntervalStrategy.NO:
        return 0
    if args.eval_strategy == IntervalStrategy.EPOCH:
        return math.ceil(steps / steps_per_epoch) + 1
    every = args.eval_steps if args.eval_steps >= 1 else math.ceil(args.eval_steps * steps)
    return steps // max(int(every), 1) + 1


def steps_within(budget_s: float, step_s: float, evaluation_s: float, evaluations) -> int:
    """The most optimizer steps S with S * step_s + evaluations(S) * evaluation_s <= budget_s (0 if none fit)."""
    low, high = 0, max(int(budget_s / step_s), 0)
    while low < high:
        mid = (low + high + 1) // 2
        if mid * step_s + evaluations(mid) * evaluation_s <= budget_s:
            low = mid
        else:
            high = mid - 1
    return low


def probe_seconds(trainer: QATrainer, *, batches: int = 4) -> dict:
    """Seconds per optimizer step and per validation pass, timed on real batches before training starts.

    One warm-up and `batches` timed forward+backward passes on batches spread over the training set, and one
    validation batch, under a forked RNG with gradients dropped afterwards: the weights never change and the
    run trains exactly as it would have without the probe (tested).
    """
    args, model, collate = trainer.args, trainer.model, trainer.data_collator
    rows, size = trainer.train_dataset, args.per_device_train_batch_size
    starts = [i * max(len(rows) - size, 0) // max(batches, 1) for i in range(batches + 1)]
    sync = torch.cuda.synchronize if next(model.parameters()).is_cuda else (lambda: None)
    was_training = model.training
    seconds = []
    with torch.random.fork_rng(devices=[torch.cuda.current_device()] if torch.cuda.is_available() else []):
        model.train()
        for start in starts:
            batch = trainer._prepare_inputs(collate([rows[i] for i in range(start, min(start + size, len(rows)))]))
            began = time.perf_counter()
            answer_loss(model, batch, answer_only=trainer.answer_only_logits).backward()
            sync()
            seconds.append(time.perf_counter() - began)
        model.zero_grad(set_to_none=True)
        evaluation_s = 0.0
        if trainer.eval_dataset is not None:
            model.eval()
            eval_rows, eval_size = trainer.eval_dataset, args.per_device_eval_batch_size
            batch = trainer._prepare_inputs(collate([eval_rows[i] for i in range(min(eval_size, len(eval_rows)))]))
            began = time.perf_counter()
            with torch.no_grad():
                answer_loss_sum(model, batch, answer_only=trainer.answer_only_logits)
            sync()
            evaluation_s = (time.perf_counter() - began) * math.ceil(len(eval_rows) / eval_size)
    model.train(was_training)
    micro_s = sum(seconds[1:]) / len(seconds[1:])  # the first pass pays one-time set-up costs
    times = torch.tensor([micro_s, evaluation_s], dtype=torch.float64, device=args.device)
    slowest = trainer.accelerator.gather(times.unsqueeze(0)).max(dim=0).values  # every process picks the same steps
    return {"step_s": float(slowest[0]) * args.gradient_accumulation_steps, "evaluation_s": float(slowest[1]),
            "timed_batches": batches, "warmup_batch_s": seconds[0]}


def fit_to_budget(trainer: QATrainer, started: float) -> tuple[dict, float | None]:
    """Size `max_steps` so that the whole `train` (counted from `started`, a time.time()) fits
    `max_train_minutes`; the Trainer builds its scheduler for it, so the learning rate still decays to its end.
    Returns (the budget record, the deadline for training) and says when the run is expected to finish."""
    args = trainer.args
    if args.resume_from_checkpoint:  # the checkpoint's schedule was sized when the run started
        state = json.loads((Path(args.resume_from_checkpoint) / "trainer_state.json").read_text())
        args.max_steps = state["max_steps"]
        return {"max_train_minutes": args.max_train_minutes, "max_steps": args.max_steps,
                "resumed_from": args.resume_from_checkpoint}, None
    probe_began = time.time()
    probe = probe_seconds(trainer)
    probe["probe_s"] = time.time() - probe_began
    batches = math.ceil(len(trainer.train_dataset) / (args.per_device_train_batch_size * args.world_size))
    steps_per_epoch = max(math.ceil(batches / args.gradient_accumulation_steps), 1)
    own_steps = args.max_steps if args.max_steps > 0 else math.ceil(args.num_train_epochs * steps_per_epoch)
    budget_s = 60 * args.max_train_minutes
    spent = time.time() - started
    # 5% of what is left covers what the probe does not time: optimizer steps, logging, checkpoints
    steps = steps_within(0.95 * (budget_s - spent), probe["step_s"], probe["evaluation_s"],
                         lambda s: _evaluations(args, s, steps_per_epoch))
    if steps < 1:
        raise ConfigError(f"max_train_minutes={args.max_train_minutes}: not one step fits ({spent:.0f} s went to "
                          f"loading and the probe, a step takes {probe['step_s']:.1f} s)")
    limited = steps < own_steps
    steps = min(steps, own_steps)
    if limited:
        args.max_steps = steps
    expected = spent + steps * probe["step_s"] + _evaluations(args, steps, steps_per_epoch) * probe["evaluation_s"]
    finish = time.strftime("%H:%M:%S", time.localtime(started + expected))
    logger.info("max_train_minutes=%s: %.2f s per step, %.1f s per validation pass (probe) -> %d steps (%d without "
                "the budget); expected to finish at %s", args.max_train_minutes, probe["step_s"],
                probe["evaluation_s"], steps, own_steps, finish)
    budget = {"max_train_minutes": args.max_train_minutes, "probe": probe, "setup_s": spent, "max_steps": steps,
              "steps_without_budget": own_steps, "limited": limited, "expected_s": expected,
              "expected_finish": finish}
    return budget, started + budget_s - probe["evaluation_s"]  # the final validation pass must still fit


class Deadline(TrainerCallback):
    """Stop training at the budget's deadline: a safeguard for a probe that was too optimistic (the run then
    ends before its schedule does, and summary.json says so). One process only: processes that stopped at
    different steps would wait for each other forever."""

    def __init__(self, deadline: float):
        self.deadline = deadline
        self.stopped_at = None

    def on_step_end(self, args, state, control, **kwargs):
        if time.time() > self.deadline and state.global_step < state.max_steps:
            control.should_training_stop = True
            self.stopped_at = state.global_step

