"""The Hugging Face Trainer, specialised: the answer loss, the validation loss as the whole set's token mean,
paragraph-grouped sampling for shared-context rows, and a callback that writes every log to metrics.jsonl.
"""

from __future__ import annotations

import json
import resource
import time
from pathlib import Path

import torch
from transformers import Trainer, TrainerCallback

from ..data.collate import ContextGroupedSampler
from ..data.squad import IGNORE_INDEX
from .loss import answer_loss, answer_loss_sum


class QATrainer(Trainer):
    """Trainer with the answer loss and, for shared-context packing, paragraph-grouped random sampling
    (`train_sampling_strategy="sequential"` keeps file order, where a paragraph's questions are adjacent)."""

    def __init__(self, *args, answer_only_logits: bool = True, packing: str = "shared_context", **kwargs):
        super().__init__(*args, **kwargs)
        self.answer_only_logits = answer_only_logits
        self.packing = packing
        self.processed_tokens = 0  # tokens run through the model in training (padding included): for FLOP/s
        self.logit_positions = 0  # rows x positions that went through the LM head

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss = answer_loss(model, inputs, answer_only=self.answer_only_logits, num_items_in_batch=num_items_in_batch)
        if model.training:
            self.processed_tokens += inputs["input_ids"].numel()
            self.logit_positions += inputs["input_ids"].shape[0] * (
                int((inputs["labels"][:, 1:] != IGNORE_INDEX).any(0).sum()) if self.answer_only_logits
                else inputs["input_ids"].shape[1] - 1)
        # A loss normalised by the token count of the whole accumulated batch needs no further 1/GA scaling.
        self.loss_is_scaled_for_ga = num_items_in_batch is not None
        if num_items_in_batch is not None and self.args.average_tokens_across_devices:
            loss = loss * self.accelerator.num_processes  # DDP averages gradients over processes
        return (loss, None) if return_outputs else loss

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval") -> dict[str, float]:
        """Validation loss as the token mean over the whole validation set, the training objective's own
        definition (the Trainer's loop averages batch means, which depends on batch size and packing)."""
        model = self.model
        was_training = model.training
        model.eval()
        started, sums = time.perf_counter(), torch.zeros(2, dtype=torch.float64, device=self.args.device)
        with torch.no_grad():
            for batch in self._validation_batches(eval_dataset if eval_dataset is not None else self.eval_dataset):
                total, count = answer_loss_sum(model, self._prepare_inputs(batch), answer_only=self.answer_only_logits)
                sums += torch.stack([total.double(), count.double()])
        sums = self.accelerator.reduce(sums, reduction="sum")
        model.train(was_training)
        metrics = {f"{metric_key_prefix}_loss": float(sums[0] / sums[1]),
                   f"{metric_key_prefix}_tokens": int(sums[1]),
                   f"{metric_key_prefix}_runtime": time.perf_counter() - started}
        self.log(metrics)
        self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
        return metrics

    def _validation_batches(self, dataset):
        """This process's contiguous share of the validation rows, in order, in batches of
        `per_device_eval_batch_size`: every row counted once over all processes. (The Trainer's prepared loader
        evens out the processes' last batches by repeating rows, which a summed loss would count twice.)"""
        rank, world, size = self.args.process_index, self.args.world_size, self.args.per_device_eval_batch_size
        start, end = len(dataset) * rank // world, len(dataset) * (rank + 1) // world
        for first in range(start, end, size):
            yield self.data_collator([dataset[i] for i in range(first, min(first + size, end))])

    def _get_train_sampler(self, train_dataset=None):
        if self.packing == "shared_context" and self.args.train_sampling_strategy == "random":
            dataset = train_dataset if train_dataset is not None else self.train_dataset
            return ContextGroupedSampler(dataset["context_key"], seed=self.args.seed)
        return super()._get_train_sampler(train_dataset)


def peak_memory_mb() -> float:
    """Peak GPU memory when on CUDA, else the process's peak resident set size."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class MetricsLogger(TrainerCallback):
    """Append every Trainer log (loss, eval_loss, learning_rate, grad_norm) to metrics.jsonl, with speed."""

    def __init__(self, path: Path, examples_per_step: int, tokens_per_example: float):
        self.path = path
        self.examples_per_step = examples_per_step
        self.tokens_per_example = tokens_per_example
        self.last = None

    def on_train_begin(self, args, state, control, **kwargs):
        self.last = (time.perf_counter(), state.global_step)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs:
            return
        now, step = time.perf_counter(), state.global_step
        record = {"step": step, "epoch": state.epoch, **logs}
        if "loss" in logs and self.last and step > self.last[1]:
            examples_per_s = (step - self.last[1]) * self.examples_per_step / (now - self.last[0])
            record.update(examples_per_s=examples_per_s, tokens_per_s=examples_per_s * self.tokens_per_example,
                          peak_memory_mb=peak_memory_mb())
            self.last = (now, step)
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")

