"""Fine-tune a causal LM on SQuAD with LoRA (or fully, the control): the recipe.

`setup(...)` checks every setting before anything heavy loads (including that `output_dir` holds no run of
another configuration), then builds model, tokenizer, datasets and Trainer and, with a time budget, sizes its
steps; `fit(setup)` trains and writes the run directory: the PEFT adapter (or the full model), the tokenizer,
`run_config.json` (every resolved setting and where it came from), `metrics.jsonl` and `summary.json`.
Two things differ from a plain Trainer run, neither changing the optimised objective (a token-level mean
over answer tokens): the loss needs logits at answer positions only (`loss`), and by default a batch's
questions on one paragraph share one encoding of it (`data.collate`, `model.attention`).
"""

from __future__ import annotations

import difflib
import json
import logging
import math
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import datasets
import torch
from transformers import Trainer, set_seed

from ..config import ConfigError, DataArguments, LoraArguments, ModelArguments, to_dict
from ..data.assets import hub_status, squad_file
from ..data.collate import QADataCollator, SharedContextCollator
from ..data.squad import build_train_dataset, data_fingerprint, heldout_split, load_squad, take_subset
from ..files import run_metadata, write_json_atomic, write_text_atomic
from ..model.attention import PARAGRAPH_ATTENTION, register_paragraph_attention, supports_shared_prefix
from ..model.loading import ModelSetupError, load_model_and_tokenizer
from ..model.lora import attach_lora, count_parameters
from .arguments import LoraQATrainingArguments
from .budget import Deadline, fit_to_budget
from .trainer import MetricsLogger, QATrainer, peak_memory_mb

logger = logging.getLogger(__name__)


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
        "processes": args.world_size, "examples_per_step": examples_per_step,
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

