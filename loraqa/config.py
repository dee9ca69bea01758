"""Typed settings of the model, LoRA, data and decoding: light dataclasses (no torch, no transformers).

Configuration flows one way: flags / YAML (`args`) -> these dataclasses -> code. Field names reuse the
names of the libraries underneath (`lora_alpha`, `target_modules`, `max_new_tokens`) so that the hand-off to
PEFT and `generate` is field for field. The Trainer's settings, which subclass transformers'
`TrainingArguments`, are `training.arguments.LoraQATrainingArguments`.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any, Literal


def field_help(text: str, **kwargs) -> dict:
    return {"metadata": {"help": text}, **kwargs}


def default_cache_dir() -> str:
    """Where `loraqa fetch` puts assets: $LORAQA_CACHE, else ./data."""
    return os.environ.get("LORAQA_CACHE", "data")


class ConfigError(ValueError):
    """A setting out of range, an unknown flag or an unreadable config file; the message names which."""


def check_setting(condition: bool, name: str, value: Any, rule: str) -> None:
    """Raise `ConfigError("name=value: rule")` unless `condition` holds."""
    if not condition:
        raise ConfigError(f"{name}={value!r}: {rule}")


@dataclass
class ModelArguments:
    model: str = field(default="gpt2", **field_help(
        "Model: an alias (gpt2, smollm2-135m), a hub id or a local directory. 'gpt2' falls back to the "
        "fetched smollm2-135m when the hub is unreachable, and says so."))
    cache_dir: str = field(default_factory=default_cache_dir, **field_help(
        "Asset cache used by `loraqa fetch` and by aliases (env LORAQA_CACHE)."))


@dataclass
class LoraArguments:
    lora_r: int = field(default=16, **field_help("LoRA rank r."))
    lora_alpha: int = field(default=32, **field_help(
        "LoRA alpha; the update is scaled by alpha/r (alpha/sqrt(r) with rsLoRA)."))
    lora_dropout: float = field(default=0.05, **field_help("Dropout on the LoRA input."))
    target_modules: str = field(default="attention", **field_help(
        "Preset (attention, attention+mlp, all-linear) or comma-separated module names/paths, e.g. "
        "'attn.c_attn,attn.c_proj'. Names are matched as full path suffixes."))
    use_rslora: bool = field(default=False, **field_help("Rank-stabilised LoRA scaling alpha/sqrt(r)."))
    full_finetune: bool = field(default=False, **field_help("Train every weight instead of LoRA (the control)."))

    def __post_init__(self):
        check_setting(self.lora_r >= 1, "lora_r", self.lora_r, "must be >= 1")
        check_setting(self.lora_alpha > 0, "lora_alpha", self.lora_alpha, "must be > 0")
        check_setting(0.0 <= self.lora_dropout < 1.0, "lora_dropout", self.lora_dropout, "must be in [0, 1)")
        check_setting(bool(self.target_modules.strip()), "target_modules", self.target_modules, "must not be empty")


@dataclass
class DataArguments:
    train_file: str = field(default="squad", **field_help(
        "SQuAD-format JSON, the alias 'squad' (fetched v1.1 train) or a hub dataset name."))
    validation_file: str = field(default="squad", **field_help(
        "SQuAD-format JSON, 'squad' (fetched v1.1 dev) or a hub dataset name; a slice gives the validation loss."))
    max_train_samples: int | None = field(default=None, **field_help(
        "Use a seeded subset of this many training questions."))
    max_eval_samples: int | None = field(default=200, **field_help("Validation-loss questions (a seeded subset)."))
    max_length: int = field(default=512, **field_help(
        "Maximum prompt+answer tokens; longer examples keep a context window around the answer."))
    unanswerable: Literal["skip", "eos"] = field(default="skip", **field_help(
        "SQuAD 2.0 questions without an answer: skip them, or train the model to answer with EOS alone."))
    subset_seed: int = field(default=0, **field_help(
        "Seed of the subset and held-out rules: paragraphs ordered by sha1(f'{seed}:{context}') and taken whole "
        "until N questions, the last one cut to N (nested across N); held-out articles by sha1(f'{seed}:{title}')."))
    heldout_articles: int = field(default=0, **field_help(
        "Hold out this many whole training articles (never trained on) and take the validation loss on them "
        "instead of validation_file: the selection set of a sweep, so that the dev set stays a test set."))
    train_on_prompt: bool = field(default=False, **field_help(
        "Put the training loss on every token (prompt too) instead of the answer only: the ablation of prompt "
        "masking; the validation loss stays the answer's, comparable across runs. Needs --packing none (a "
        "shared context would carry loss once per paragraph, not once per question)."))

    def __post_init__(self):
        check_setting(self.max_length >= 32, "max_length", self.max_length, "must be >= 32")
        check_setting(self.heldout_articles >= 0, "heldout_articles", self.heldout_articles, "must be >= 0")
        for name in ("max_train_samples", "max_eval_samples"):
            value = getattr(self, name)
            check_setting(value is None or value >= 1, name, value, "must be >= 1 when given")


@dataclass
class GenerationSettings:
    max_new_tokens: int = field(default=32, **field_help(
        "Answer token budget (SQuAD v1.1 dev answers + EOS: 99th percentile 21 GPT-2 / 22 SmolLM2 tokens)."))
    do_sample: bool = field(default=False, **field_help("Sample instead of greedy decoding."))
    top_k: int | None = field(default=None, **field_help("Keep the k most likely tokens when sampling."))
    top_p: float | None = field(default=None, **field_help(
        "Nucleus sampling: keep the smallest set with mass >= top_p."))
    temperature: float = field(default=1.0, **field_help("Softmax temperature when sampling."))
    seed: int = field(default=0, **field_help("Sampling seed; a run with the same seed gives the same answers."))
    batch_size: int = field(default=128, **field_help(
        "Questions decoded together (whole paragraphs). Fastest on 2 CPU cores (`loraqa evaluate --model "
        "smollm2-135m --adapter runs/main --max_samples 500 --batch_size B`: 64 -> 11.6, 128 -> 12.4, "
        "256 -> 11.7 questions/s)."))
    prefix_cache: bool = field(default=True, **field_help(
        "Encode each paragraph once and let its questions attend to its shared keys/values (models using "
        "transformers' attention interface with global attention); false: every row its full prompt."))
    constrain_to_context: bool = field(default=False, **field_help(
        "Answer only with a span of the context: every token keeps the answer a prefix of the tokens of "
        "' ' + a span starting at a word, EOS/newline only where the span may end (generation.constraints.SpanTrie)."))
    num_beams: int = field(default=1, **field_help(
        "Beam search with this many beams (1: off), as transformers' generate(num_beams=N, length_penalty=1.0, "
        "early_stopping=False); a beam ends at EOS or a newline token."))

    def __post_init__(self):
        check_setting(self.max_new_tokens >= 1, "max_new_tokens", self.max_new_tokens, "must be >= 1")
        check_setting(self.top_k is None or self.top_k >= 1, "top_k", self.top_k, "must be >= 1")
        check_setting(self.top_p is None or 0.0 < self.top_p <= 1.0, "top_p", self.top_p, "must be in (0, 1]")
        check_setting(self.temperature > 0.0, "temperature", self.temperature, "must be > 0")
        check_setting(self.batch_size >= 1, "batch_size", self.batch_size, "must be >= 1")
        check_setting(self.num_beams >= 1, "num_beams", self.num_beams, "must be >= 1")
        check_setting(self.num_beams == 1 or not self.do_sample, "num_beams", self.num_beams,
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


@dataclass
class EvaluateArguments:
    data: str = field(default="squad", metadata={"help": "SQuAD-format JSON, or 'squad' (fetched v1.1 dev)."})
    adapter: str | None = field(default=None, metadata={"help": "Run directory of a trained adapter (or full model)."})
    max_samples: int | None = field(default=500, metadata={"help": "Questions to evaluate (seeded paragraph subset)."})
    subset_seed: int = field(default=0, metadata={"help": "Seed of the subset rule (see data.take_subset)."})
    output: str = field(default="eval.json", metadata={"help": "Where to write the evaluation JSON."})
    merge_adapter: bool = field(default=True, metadata={"help": "Merge LoRA into the weights for inference."})
    strategy_grid: bool = field(default=False, metadata={"help": "Run the decoding-strategy grid instead of one setting."})
    max_length: int | None = field(default=None, metadata={
        "help": "Prompt + answer token budget; contexts are cut at the end to fit. Default: the adapter's training "
                "max_length (its run_config.json), else 512 (loraqa's training default), never past the model's window; "
                "plus what few_shot and chat_template add to the prompt."})
    grid_seeds: int = field(default=3, metadata={"help": "Seeds per sampled strategy in the grid."})
    heldout_articles: int = field(default=0, metadata={
        "help": "Score the training file's held-out articles instead (train's heldout_articles rule, same "
                "subset_seed): the selection set of a sweep; 0: the dev split of `data`."})
    few_shot: int = field(default=0, metadata={
        "help": "Worked examples before each question: one fixed set from few_shot_file's held-out articles "
                "(prompting.choose_examples, seeded by subset_seed), never from the evaluated file. The default "
                "max_length grows by their tokens, so each question's own context is cut as without them."})
    chat_template: bool = field(default=False, metadata={
        "help": "Wrap the prompt in the model's chat template, with an instruction to answer with a short span "
                "of the context (an error when the tokenizer has none)."})
    few_shot_file: str = field(default="squad", metadata={
        "help": "SQuAD-format JSON whose held-out articles give the examples, or 'squad' (fetched v1.1 train)."})
    few_shot_articles: int = field(default=20, metadata={
        "help": "Held-out articles the examples come from (train's heldout_articles rule, same subset_seed; the "
                "study holds out 20, so adapters never trained on them)."})
    torch_threads: int | None = field(default=None, metadata={"help": "torch.set_num_threads; default: all cores."})
    device: str = field(default="auto", metadata={"help": "auto (CUDA when available, else cpu), cpu, cuda, cuda:1, ..."})
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = field(default="auto", metadata={
        "help": "Weights for inference: auto = bfloat16 on a CUDA device that supports it, float32 elsewhere. "
                "On a CPU with AMX/AVX512-BF16, bfloat16 answered twice as fast here and changed 5%% of the answers "
                "(no significant EM/F1 change); without them it is far slower. The output records it."})

    def __post_init__(self):
        if self.few_shot < 0:
            raise ConfigError(f"few_shot={self.few_shot!r}: must be >= 0")
        if self.few_shot_articles < 1:
            raise ConfigError(f"few_shot_articles={self.few_shot_articles!r}: must be >= 1")


def to_dict(settings) -> dict:
    """A settings object as run_config.json stores it (TrainingArguments has its own `to_dict`)."""
    return settings.to_dict() if hasattr(settings, "to_dict") else dataclasses.asdict(settings)

