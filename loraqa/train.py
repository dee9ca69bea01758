"""Fine-tune a causal LM on SQuAD with LoRA (or fully, the control) on the Hugging Face Trainer.

`setup(...)` builds model, tokenizer, datasets and trainer; `fit(setup)` runs the Trainer and writes the
run directory: the PEFT adapter (or the full model), the tokenizer, `run_config.json` (every resolved
setting), `metrics.jsonl` and `summary.json`. Two things differ from a plain Trainer run:
- the loss is computed from logits at answer positions only (`answer_loss`): the LM head over a
  50k vocabulary is a quarter of the compute and the largest activation, yet only answers carry loss;
- by default a batch's questions on the same paragraph share one encoding of it (see `collator`).
Both leave the optimised objective unchanged: a token-level mean over answer tokens.
"""
from __future__ import annotations

import json
import logging
import math
import os
import resource
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import datasets
import torch
import torch.nn.functional as F
from transformers import AttentionInterface, Trainer, TrainerCallback, set_seed
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from .assets import squad_file
from .attention import supports_shared_prefix
from .collator import ContextGroupedSampler, QADataCollator, SharedContextCollator
from .config import (ConfigError, DataArguments, LoraArguments, LoraQATrainingArguments, ModelArguments, run_metadata,
                     to_dict, write_json_atomic)
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


@dataclass
class TrainResult:
    output_dir: str
    summary: dict


def _tokenized(source: str, raw, split: str, n: int | None, tokenizer, data_args: DataArguments):
    raw = take_subset(raw, n, data_args.subset_seed)
    rows, counts = build_train_dataset(raw, tokenizer, max_length=data_args.max_length,
                                       unanswerable=data_args.unanswerable, train_on_prompt=data_args.train_on_prompt,
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


def setup(model_args: ModelArguments, lora_args: LoraArguments, data_args: DataArguments,
          training_args: LoraQATrainingArguments) -> TrainingSetup:
    """Load model and data, attach LoRA (unless full fine-tuning), build the Trainer."""
    if data_args.train_on_prompt and training_args.packing != "none":
        raise ConfigError("train_on_prompt=True: needs --packing none (a shared context would carry loss once per "
                          "paragraph instead of once per question)")
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
    training_args.prediction_loss_only = True
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
    return TrainingSetup(model_args, lora_args, data_args, training_args, trainer, tokenizer, resolved, parameters,
                         preprocessing,
                         data_fingerprint(datasets.concatenate_datasets([train_raw, eval_raw])))


def _save_final(trainer: Trainer, tokenizer, output_dir: Path) -> None:
    """Save weights and tokenizer to a staging folder, then move each file in: never half an adapter."""
    staging = output_dir / ".final.tmp"
    shutil.rmtree(staging, ignore_errors=True)
    trainer.model.save_pretrained(str(staging))
    tokenizer.save_pretrained(str(staging))
    for item in staging.iterdir():
        os.replace(item, output_dir / item.name)
    staging.rmdir()


def fit(run: TrainingSetup) -> TrainResult:
    """Train (resuming if asked), then write weights, config and summary into the run directory."""
    args, trainer = run.training_args, run.trainer
    output_dir = Path(args.output_dir)
    metrics_path = output_dir / "metrics.jsonl"
    if not args.resume_from_checkpoint and trainer.is_world_process_zero():
        metrics_path.unlink(missing_ok=True)
    config = {"model": to_dict(run.model_args), "lora": to_dict(run.lora_args), "data": to_dict(run.data_args),
              "training": to_dict(args), "resolved_model": run.resolved_model, **run_metadata()}
    if trainer.is_world_process_zero():
        write_json_atomic(output_dir / "run_config.json", config)
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
    examples = output.metrics.get("train_samples_per_second", 0.0)
    tokens_per_example = sum(trainer.train_dataset["length"]) / len(trainer.train_dataset)
    summary = {
        "model": run.model_args.model, "model_resolved": run.resolved_model,
        "method": "full_finetune" if run.lora_args.full_finetune else "lora",
        **run.parameters,
        "train_examples": len(trainer.train_dataset), "global_steps": output.global_step,
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
    write_json_atomic(output_dir / "summary.json", summary)
    return TrainResult(str(output_dir), summary)


def train(model_args: ModelArguments, lora_args: LoraArguments, data_args: DataArguments,
          training_args: LoraQATrainingArguments) -> TrainResult:
    """setup + fit: the whole recipe in one call, for notebooks."""
    return fit(setup(model_args, lora_args, data_args, training_args))
