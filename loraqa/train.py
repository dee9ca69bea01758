"""Fine-tune a causal LM on SQuAD with LoRA (or fully, the control) on the Hugging Face Trainer.

`setup(...)` builds model, tokenizer, datasets and trainer; `fit(setup)` runs the Trainer and writes the
run directory: the PEFT adapter (or the full model), the tokenizer, `run_config.json` (every resolved
setting and where it came from), `metrics.jsonl` and `summary.json`. Every setting is checked before anything
heavy loads, including that `output_dir` holds no run of another configuration. With `max_train_minutes`,
a few steps timed before training size `max_steps` to the budget. Two things differ from a plain Trainer run:
- the loss is computed from logits at answer positions only (`answer_loss`): the LM head over a
  50k vocabulary is a quarter of the compute and the largest activation, yet only answers carry loss;
- by default a batch's questions on the same paragraph share one encoding of it (see `collator`).
Both leave the optimised objective unchanged: a token-level mean over answer tokens.
"""
from __future__ import annotations

import difflib
import json
import logging
import math
import os
import resource
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import datasets
import torch
import torch.nn.functional as F
from transformers import AttentionInterface, Trainer, TrainerCallback, set_seed
from transformers.trainer_utils import IntervalStrategy
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from .assets import hub_status, squad_file
from .attention import supports_shared_prefix
from .collator import ContextGroupedSampler, QADataCollator, SharedContextCollator
from .config import (ConfigError, DataArguments, LoraArguments, LoraQATrainingArguments, ModelArguments, run_metadata,
                     to_dict, write_json_atomic, write_text_atomic)
from .data import IGNORE_INDEX, build_train_dataset, data_fingerprint, heldout_split, load_squad, take_subset
from .modeling import ModelSetupError, attach_lora, count_parameters, load_model_and_tokenizer

logger = logging.getLogger(__name__)

PARAGRAPH_ATTENTION = "loraqa_paragraphs"


def _paragraph_attention(module, query, key, value, attention_mask, paragraph_spans: list | None = None,
                         **kwargs):
    """transformers' sdpa attention, one paragraph of a shared-context row at a time: the paragraphs never
    attend to each other, so the mask's cross-paragraph blocks are skipped instead of computed and masked
    (training steps ~10% faster at batch 8). Without spans it is plain sdpa."""
    if paragraph_spans is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    outputs = [sdpa_attention_forward(module, query[:, :, s:e], key[:, :, s:e], value[:, :, s:e],
                                      attention_mask[:, :, s:e, s:e], **kwargs)[0] for s, e in paragraph_spans]
    return torch.cat(outputs, dim=1), None  # (1, T, heads, head_dim)


def register_paragraph_attention() -> None:
    """Make PARAGRAPH_ATTENTION a name that attention layers resolve. transformers' registry is global, so the
    code that sets the implementation registers it first (as `setup` does), never an import."""
    AttentionInterface.register(PARAGRAPH_ATTENTION, _paragraph_attention)


def answer_loss(model, batch: dict[str, torch.Tensor], *, answer_only: bool = True,
                num_items_in_batch: torch.Tensor | int | None = None) -> torch.Tensor:
    """Causal-LM cross-entropy over answer tokens, with logits computed only where they are needed.

    Returns sum(CE) / num_items_in_batch when given (token mean over an accumulated batch), else the mean.
    """
    total, count = answer_loss_sum(model, batch, answer_only=answer_only)
    return total / (num_items_in_batch if num_items_in_batch is not None else count)


def answer_loss_sum(model, batch: dict[str, torch.Tensor], *, answer_only: bool = True
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed cross-entropy over the batch's labelled tokens, their count).

    Position t predicts token t+1, so the LM head runs on the positions `keep` where some row has a label
    at t+1 (`logits_to_keep`, supported by every transformers causal LM); with `answer_only=False` it runs
    on all positions (the usual computation), giving the same loss.
    """
    labels = batch["labels"]
    targets = labels[:, 1:]  # (B, T-1)
    if answer_only:
        keep = (targets != IGNORE_INDEX).any(dim=0).nonzero().squeeze(-1)  # (K,)
    else:
        keep = torch.arange(targets.shape[1], device=labels.device)
    inputs = {k: v for k, v in batch.items() if k not in ("labels", "paragraph_spans")}
    if inputs["attention_mask"].dim() == 4:  # the shared-context block mask is additive, in the model's dtype
        inputs["attention_mask"] = inputs["attention_mask"].to(next(model.parameters()).dtype)
    core = getattr(model, "module", model)  # inside DistributedDataParallel
    if "paragraph_spans" in batch and core.config._attn_implementation == PARAGRAPH_ATTENTION:
        inputs["paragraph_spans"] = batch["paragraph_spans"].tolist()
    logits = model(**inputs, logits_to_keep=keep, use_cache=False).logits  # (B, K, V)
    picked = targets[:, keep]  # (B, K)
    total = F.cross_entropy(logits.flatten(0, 1).float(), picked.flatten(), ignore_index=IGNORE_INDEX, reduction="sum")
    return total, (picked != IGNORE_INDEX).sum()


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
        dataloader = self.get_eval_dataloader(eval_dataset)
        model = self.model
        was_training = model.training
        model.eval()
        started, sums = time.perf_counter(), torch.zeros(2, dtype=torch.float64, device=self.args.device)
        with torch.no_grad():
            for batch in dataloader:
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


@dataclass
class TrainingSetup:
    model_args: ModelArguments
    lora_args: LoraArguments
    data_args: DataArguments
    training_args: LoraQATrainingArguments
    trainer: QATrainer
    tokenizer: object
    resolved_model: str
    parameters: dict
    preprocessing: dict
    data_hash: str
    sources: dict[str, str] | None = None
    budget: dict | None = None
    deadline: float | None = field(default=None, repr=False)  # time.time() by which training must stop


@dataclass
class TrainResult:
    output_dir: str
    summary: dict


def _tokenized(source: str, raw, split: str, n: int | None, tokenizer, data_args: DataArguments):
    raw = take_subset(raw, n, data_args.subset_seed)
    # the validation loss is the answer's loss for every run, `train_on_prompt` too, so that it stays comparable
    rows, counts = build_train_dataset(raw, tokenizer, max_length=data_args.max_length,
                                       unanswerable=data_args.unanswerable,
                                       train_on_prompt=data_args.train_on_prompt and split == "train",
                                       desc=f"tokenizing {split}")
    if len(rows) == 0:
        raise ModelSetupError(f"{source}: no usable {split} examples ({counts})")
    return raw, rows.add_column("length", [len(ids) for ids in rows["input_ids"]]), counts


def _train_and_validation_sources(data_args: DataArguments, cache_dir: str):
    """(train source, train records, validation source, validation records): the validation records are the
    held-out training articles when `heldout_articles` is set, else `validation_file`'s."""
    train_source = squad_file(data_args.train_file, "train", cache_dir)
    train_raw = load_squad(train_source, "train")
    if data_args.heldout_articles:
        train_raw, heldout = heldout_split(train_raw, data_args.heldout_articles, data_args.subset_seed)
        return train_source, train_raw, f"{train_source} (held-out articles)", heldout
    validation_source = squad_file(data_args.validation_file, "validation", cache_dir)
    return train_source, train_raw, validation_source, load_squad(validation_source, "validation")


def _check_resume(checkpoint: str, resolved_model: str, full_finetune: bool) -> None:
    adapter_config = Path(checkpoint) / "adapter_config.json"
    if not Path(checkpoint).is_dir():
        raise ModelSetupError(f"resume_from_checkpoint={checkpoint!r}: no such checkpoint directory")
    if full_finetune == adapter_config.exists():
        raise ModelSetupError(f"resume_from_checkpoint={checkpoint!r}: checkpoint is "
                              f"{'a LoRA adapter' if adapter_config.exists() else 'a full model'}, this run is not")
    if adapter_config.exists():
        base = json.loads(adapter_config.read_text()).get("base_model_name_or_path")
        if base != resolved_model:
            raise ModelSetupError(f"resume_from_checkpoint={checkpoint!r}: checkpoint was trained on {base}, "
                                  f"this run uses {resolved_model}")


def run_settings(model_args: ModelArguments, lora_args: LoraArguments, data_args: DataArguments,
                 training_args: LoraQATrainingArguments) -> dict:
    """The settings part of run_config.json."""
    return {"model": to_dict(model_args), "lora": to_dict(lora_args), "data": to_dict(data_args),
            "training": to_dict(training_args)}


# Settings that say where a run reads and writes, how it reports or how it resumes, not what it trains.
_NOT_IDENTITY = {"output_dir", "overwrite_output_dir", "resume_from_checkpoint", "cache_dir", "torch_threads",
                 "disable_tqdm", "local_rank"}


def _differences(previous: dict, current: dict) -> list[str]:
    """'name old -> new' for each setting both configs have (older run_config.json files lack newer settings)."""
    ignored = _NOT_IDENTITY | ({"max_steps"} if previous.get("training", {}).get("max_train_minutes") else set())
    differences = []
    for section, values in current.items():
        for name, value in values.items():
            value = json.loads(json.dumps(value, default=str))  # as run_config.json stores it
            old = previous.get(section, {}).get(name, value)
            if name not in ignored and old != value:
                differences.append(f"{name} {old!r} -> {value!r}")
    return differences


def check_output_dir(output_dir: str, settings: dict, training_args: LoraQATrainingArguments) -> None:
    """Refuse a directory that holds another configuration's run (its checkpoints would mix with this run's
    and the Trainer's rotation would delete the new ones first), or an unfinished run of this one that
    should be resumed, unless --overwrite_output_dir or --resume_from_checkpoint says what to do with it."""
    out = Path(output_dir)
    if training_args.overwrite_output_dir or training_args.resume_from_checkpoint or not out.is_dir():
        return
    checkpoints = sorted(out.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[-1])
                         if p.name.split("-")[-1].isdigit() else -1)
    config_path = out / "run_config.json"
    what = "--overwrite_output_dir true replaces it, or choose another --output_dir"
    if not config_path.exists():
        if checkpoints:
            raise ConfigError(f"output_dir={output_dir!r} holds checkpoints of an unknown run (no run_config.json); "
                              f"{what}")
        return
    try:
        previous = json.loads(config_path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ConfigError(f"{config_path}: not readable ({err}); {what}") from None
    differences = _differences(previous, settings)
    if differences:
        shown = ", ".join(differences[:4]) + (f" and {len(differences) - 4} more" if len(differences) > 4 else "")
        raise ConfigError(f"output_dir={output_dir!r} holds a run of another configuration ({shown}); {what}")
    if checkpoints and not (out / "summary.json").exists():
        raise ConfigError(f"output_dir={output_dir!r} holds an unfinished run of this configuration: "
                          f"--resume_from_checkpoint {checkpoints[-1]} continues it, --overwrite_output_dir true "
                          f"starts it over")


def _check_data_file(name: str, setting: str) -> None:
    """A data setting is a file, the alias 'squad' or a hub dataset: say so now, not after the model loads."""
    if name == "squad" or Path(name).exists():
        return
    if name.endswith(".json"):
        raise ConfigError(f"{setting}={name!r}: no such file")
    found = hub_status(name, "dataset")
    if not found:
        raise ConfigError(f"{setting}={name!r}: no such file or hub dataset"
                          + (" (the hub is unreachable)" if found is None else "")
                          + ("; did you mean squad, the fetched SQuAD v1.1?" if difflib.get_close_matches(
                              name, ["squad"]) else "; 'squad' is the fetched SQuAD v1.1"))


def check_settings(model_args: ModelArguments, lora_args: LoraArguments, data_args: DataArguments,
                   training_args: LoraQATrainingArguments) -> None:
    """Everything that can be checked before the model and data load (each dataclass checked its own ranges)."""
    if data_args.train_on_prompt and training_args.packing != "none":
        raise ConfigError("train_on_prompt=True: needs --packing none (a shared context would carry loss once per "
                          "paragraph instead of once per question)")
    check_output_dir(training_args.output_dir, run_settings(model_args, lora_args, data_args, training_args),
                     training_args)
    _check_data_file(data_args.train_file, "train_file")
    if not data_args.heldout_articles:
        _check_data_file(data_args.validation_file, "validation_file")


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


def setup(model_args: ModelArguments, lora_args: LoraArguments, data_args: DataArguments,
          training_args: LoraQATrainingArguments, *, sources: dict[str, str] | None = None) -> TrainingSetup:
    """Check every setting, load model and data, attach LoRA (unless full fine-tuning), build the Trainer and,
    with a time budget, size its steps. `sources` (from `config.parse_config_with_sources`) go into
    run_config.json."""
    started = time.time()
    check_settings(model_args, lora_args, data_args, training_args)
    if training_args.torch_threads:
        torch.set_num_threads(training_args.torch_threads)
    set_seed(training_args.seed)
    model, tokenizer, resolved = load_model_and_tokenizer(model_args.model, model_args.cache_dir)
    if training_args.resume_from_checkpoint:
        _check_resume(training_args.resume_from_checkpoint, resolved, lora_args.full_finetune)
    set_seed(training_args.seed)  # LoRA's initial A depends only on the seed, not on what loading consumed
    model = model if lora_args.full_finetune else attach_lora(model, lora_args)
    # per-paragraph attention loops over each batch's spans: a compiled graph would recompile for every batch
    if training_args.packing == "shared_context" and supports_shared_prefix(model) and not training_args.torch_compile:
        register_paragraph_attention()
        model.set_attn_implementation(PARAGRAPH_ATTENTION)
    parameters = count_parameters(model)
    logger.info("trainable params %d of %d (reduction x%s)", parameters["trainable_params"],
                parameters["total_params"], parameters["reduction_factor"])

    with training_args.main_process_first(desc="tokenizing"):
        train_source, train_all, validation_source, validation_all = _train_and_validation_sources(
            data_args, model_args.cache_dir)
        train_raw, train_rows, train_counts = _tokenized(train_source, train_all, "train",
                                                         data_args.max_train_samples, tokenizer, data_args)
        eval_raw, eval_rows, eval_counts = _tokenized(validation_source, validation_all, "validation",
                                                      data_args.max_eval_samples, tokenizer, data_args)
    collator = SharedContextCollator() if training_args.packing == "shared_context" else QADataCollator(tokenizer)
    if training_args.eval_strategy == "no":
        eval_rows = None
    trainer = QATrainer(model=model, args=training_args, train_dataset=train_rows, eval_dataset=eval_rows,
                        data_collator=collator, processing_class=tokenizer,
                        answer_only_logits=training_args.answer_only_logits, packing=training_args.packing)
    output_dir = Path(training_args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    examples_per_step = (training_args.per_device_train_batch_size * training_args.gradient_accumulation_steps
                         * training_args.world_size)
    trainer.add_callback(MetricsLogger(output_dir / "metrics.jsonl", examples_per_step,
                                       sum(train_rows["length"]) / len(train_rows)))
    preprocessing = {"train": train_counts, "validation": eval_counts, "validation_source": validation_source}
    if data_args.heldout_articles:
        preprocessing["heldout_titles"] = sorted(set(validation_all["title"]))
    budget, deadline = fit_to_budget(trainer, started) if training_args.max_train_minutes else (None, None)
    if budget and sources is not None and (budget.get("limited") or budget.get("resumed_from")):
        sources = {**sources, "max_steps": "checkpoint" if budget.get("resumed_from") else "max_train_minutes"}
    return TrainingSetup(model_args, lora_args, data_args, training_args, trainer, tokenizer, resolved, parameters,
                         preprocessing, data_fingerprint(datasets.concatenate_datasets([train_raw, eval_raw])),
                         sources, budget, deadline)


def _save_final(trainer: Trainer, tokenizer, output_dir: Path) -> None:
    """Save weights and tokenizer to a staging folder, then move each file in: never half an adapter."""
    staging = output_dir / ".final.tmp"
    shutil.rmtree(staging, ignore_errors=True)
    trainer.model.save_pretrained(str(staging))
    tokenizer.save_pretrained(str(staging))
    for item in staging.iterdir():
        os.replace(item, output_dir / item.name)
    staging.rmdir()


def _checkpoint_step(checkpoint: str | None) -> int:
    """The global step a checkpoint was saved at (0 for a fresh run)."""
    if not checkpoint:
        return 0
    state = Path(checkpoint) / "trainer_state.json"
    return int(json.loads(state.read_text())["global_step"]) if state.exists() else 0


def fit(run: TrainingSetup) -> TrainResult:
    """Train (resuming if asked), then write weights, config and summary into the run directory."""
    args, trainer = run.training_args, run.trainer
    output_dir = Path(args.output_dir)
    metrics_path = output_dir / "metrics.jsonl"
    if not args.resume_from_checkpoint and trainer.is_world_process_zero():
        for stale in [metrics_path, output_dir / "summary.json", *output_dir.glob("checkpoint-*")]:  # a previous run's
            if stale.is_dir():
                shutil.rmtree(stale)
            else:
                stale.unlink(missing_ok=True)
    first_step = _checkpoint_step(args.resume_from_checkpoint)
    if first_step and trainer.is_world_process_zero() and metrics_path.exists():
        # records past the checkpoint are logged again by the resumed run: keep each step once
        kept = [line for line in metrics_path.read_text().splitlines() if json.loads(line)["step"] <= first_step]
        write_text_atomic(metrics_path, "".join(f"{line}\n" for line in kept))
    config = {**run_settings(run.model_args, run.lora_args, run.data_args, args), "sources": run.sources,
              "resolved_model": run.resolved_model, **run_metadata()}
    if trainer.is_world_process_zero():
        write_json_atomic(output_dir / "run_config.json", config)
    deadline = Deadline(run.deadline) if run.deadline and args.world_size == 1 else None
    if deadline:
        trainer.add_callback(deadline)
    started = time.perf_counter()
    output = trainer.train(resume_from_checkpoint=args.resume_from_checkpoint)
    runtime = time.perf_counter() - started
    eval_loss = trainer.evaluate()["eval_loss"] if trainer.eval_dataset is not None else None
    if not trainer.is_world_process_zero():
        return TrainResult(str(output_dir), {})
    _save_final(trainer, run.tokenizer, output_dir)
    train_losses = [json.loads(line).get("loss") for line in metrics_path.read_text().splitlines()] \
        if metrics_path.exists() else []
    train_losses = [x for x in train_losses if x is not None]
    # speed from the steps this process trained (a resumed run's Trainer divides all samples by its own time)
    steps_timed = output.global_step - first_step
    examples_per_step = args.per_device_train_batch_size * args.gradient_accumulation_steps * args.world_size
    examples = steps_timed * examples_per_step / runtime if steps_timed else 0.0
    tokens_per_example = sum(trainer.train_dataset["length"]) / len(trainer.train_dataset)
    summary = {
        "model": run.model_args.model, "model_resolved": run.resolved_model,
        "method": "full_finetune" if run.lora_args.full_finetune else "lora",
        **run.parameters,
        "train_examples": len(trainer.train_dataset), "global_steps": output.global_step,
        "resumed_from_step": first_step, "steps_timed": steps_timed,
        "seconds_per_step": runtime / steps_timed if steps_timed else None,
        "train_runtime_s": runtime, "train_examples_per_s": examples,
        "train_tokens_per_s": examples * tokens_per_example,
        "peak_memory_mb": peak_memory_mb(),
        "final_train_loss": train_losses[-1] if train_losses else output.training_loss,
        "mean_train_loss": output.training_loss,
        "final_validation_loss": eval_loss,
        "final_validation_perplexity": math.exp(eval_loss) if eval_loss is not None else None,
        "packing": args.packing, "answer_only_logits": args.answer_only_logits,
        "processed_tokens": trainer.processed_tokens, "logit_positions": trainer.logit_positions,
        "preprocessing": run.preprocessing, "data_hash": run.data_hash,
    }
    if run.budget:
        summary["budget"] = {**run.budget, "stopped_at_deadline": deadline.stopped_at if deadline else None}
    write_json_atomic(output_dir / "summary.json", summary)
    return TrainResult(str(output_dir), summary)


def train(model_args: ModelArguments, lora_args: LoraArguments, data_args: DataArguments,
          training_args: LoraQATrainingArguments, *, sources: dict[str, str] | None = None) -> TrainResult:
    """setup + fit: the whole recipe in one call, for notebooks."""
    return fit(setup(model_args, lora_args, data_args, training_args, sources=sources))
