#!/usr/bin/env python
"""LoRA fine-tuning of a causal language model (GPT-2 first, any Hugging Face causal LM) for SQuAD v1.1
question answering: the assignment's file.

Each task of the assignment is one name below, importable from the repository root
(`from lora_qa_finetuning import preprocess_function, QADataCollator, ...`); its docstring says how the task
is done and where the full implementation lives in the `loraqa` package, one subpackage per pipeline stage:

    data -> model (LoRA) -> training -> generation -> evaluation -> study -> report

    python lora_qa_finetuning.py               # prints the task map: task -> name -> command
    python lora_qa_finetuning.py train ...     # any `loraqa` subcommand (`--help` lists them)
"""
from __future__ import annotations

import sys

from loraqa.config import DataArguments, GenerationSettings, LoraArguments, ModelArguments
from loraqa.data.collate import QADataCollator
from loraqa.data.squad import preprocess_function

__all__ = ["preprocess_function", "QADataCollator", "setup_lora", "training_arguments", "train_model",
           "answer_questions", "squad_metrics", "compare_with_baseline", "decoding_strategy_experiment", "TASKS"]

# Task 1, preprocess_function: SQuAD columns -> prompt + answer token ids, labels -100 on every prompt token.
# The prompt `Context: {c}\nQuestion: {q}\nAnswer:` and the target " " + answer + EOS are tokenized apart, so
# the answer boundary is exact under BPE; a too-long example keeps a window of the context around its answer.
# (re-exported unchanged from loraqa.data.squad, where its docstring and tests live)

# Task 2, QADataCollator: right padding to the batch maximum, labels padded with -100 by position (so a pad
# token equal to EOS never masks the answer's EOS label). (loraqa.data.collate; the faster default for
# training is SharedContextCollator: each paragraph encoded once for all of its questions)


def setup_lora(model, *, lora_r: int = 16, lora_alpha: int = 32, lora_dropout: float = 0.05,
               target_modules: str = "attention", use_rslora: bool = False):
    """Task 3, LoRA configuration and freezing: wrap `model` with PEFT LoRA adapters; afterwards only the
    LoRA matrices A (Gaussian) and B (zeros, so the adapted model starts equal to the base model) require
    gradients, every base weight is frozen. `target_modules` is a preset (attention, attention+mlp,
    all-linear) resolved per architecture to full-path suffixes (GPT-2: attn.c_attn, attn.c_proj, Conv1D
    with fan_in_fan_out; Llama: q/k/v/o_proj), or comma-separated module names. The update is scaled by
    lora_alpha / lora_r. Implementation: `loraqa.model.lora.attach_lora`."""
    from loraqa.model.lora import attach_lora

    return attach_lora(model, LoraArguments(lora_r=lora_r, lora_alpha=lora_alpha, lora_dropout=lora_dropout,
                                            target_modules=target_modules, use_rslora=use_rslora))


def training_arguments(output_dir: str, **settings):
    """Task 4a, the training arguments: transformers' TrainingArguments with loraqa's defaults (AdamW at lr
    2e-4, linear schedule with 3% warm-up, batch 8, one epoch, validation loss every 100 steps) and its speed
    options; any TrainingArguments field can be given. Implementation: `loraqa.training.arguments`."""
    from loraqa.training.arguments import LoraQATrainingArguments

    return LoraQATrainingArguments(output_dir=output_dir, **settings)


def train_model(model: str, output_dir: str, *, lora: LoraArguments | None = None,
                data: DataArguments | None = None, **settings):
    """Task 4b, training: load `model` (an alias such as gpt2 or smollm2-135m, a hub id or a folder), attach
    LoRA, tokenize SQuAD, train with the Hugging Face Trainer on the answer tokens' loss, and write the run
    directory (PEFT adapter, tokenizer, run_config.json, metrics.jsonl, summary.json). Returns the
    `TrainResult` (output_dir, summary). Implementation: `loraqa.training.run` (`setup` then `fit`)."""
    from loraqa.training.run import train

    return train(ModelArguments(model=model), lora or LoraArguments(), data or DataArguments(),
                 training_arguments(output_dir, **settings))


def answer_questions(model, tokenizer, examples: list[dict], *, max_new_tokens: int = 32, do_sample: bool = False,
                     top_k: int | None = None, top_p: float | None = None, temperature: float = 1.0, seed: int = 0,
                     num_beams: int = 1, constrain_to_context: bool = False, max_length: int | None = None
                     ) -> dict[str, str]:
    """Task 5, inference with controllable generation: {id: answer} for records with id, context and question,
    decoded greedily (default), by sampling (top-k, top-p, temperature, a seed per question), by beam search,
    or restricted to spans of the context; an answer ends at EOS or a newline. Batched: each paragraph is
    encoded once and its questions share its keys and values, with answers identical to one-by-one
    `model.generate`. Implementation: `loraqa.generation.decode.generate_answers`."""
    from loraqa.generation.decode import generate_answers

    settings = GenerationSettings(max_new_tokens=max_new_tokens, do_sample=do_sample, top_k=top_k, top_p=top_p,
                                  temperature=temperature, seed=seed, num_beams=num_beams,
                                  constrain_to_context=constrain_to_context)
    return generate_answers(model, tokenizer, examples, settings=settings, progress=False, max_length=max_length)


def squad_metrics(predictions: dict[str, str], references: dict[str, list[str]]) -> dict[str, float]:
    """Task 6, the SQuAD metrics: exact match and F1 in percent, each question scored against its best gold
    answer after the official v1.1 normalisation (lower case, no punctuation, no articles, single spaces).
    Implementation: `loraqa.evaluation.metrics` (pure Python, the official script's arithmetic)."""
    from loraqa.evaluation.metrics import squad_scores

    return squad_scores(predictions, references)


def compare_with_baseline(baseline_evaluation: str, finetuned_evaluation: str) -> dict:
    """Task 7, the baseline comparison: two evaluation files of the same questions (`loraqa evaluate`
    without and with the adapter) -> per-metric deltas with paragraph-bootstrap 95% CIs, a sign-flip
    permutation p-value and McNemar's test on EM. Implementation: `loraqa.evaluation.analysis.compare`."""
    from loraqa.evaluation.analysis import compare

    return compare(baseline_evaluation, finetuned_evaluation)


def decoding_strategy_experiment(model: str, output: str, *, adapter: str | None = None, max_samples: int = 500,
                                 grid_seeds: int = 3, data: str = "squad") -> dict:
    """Task 8, the decoding-strategy experiment: greedy, top-k (10/25/50), top-p (0.8/0.9/0.95), temperature
    (0.7/1.0/1.3), greedy within the context's spans and beams (2, 4) on the same questions from one
    prefill per batch, each sampled strategy over `grid_seeds` seeds; writes and returns the evaluation with
    a row per strategy (EM/F1 with CIs, answer length, distinct-n, share verbatim in the context; each
    strategy's own questions/s is `loraqa decoding-speed`'s, since the grid decodes them in one pass).
    Implementation: `loraqa.evaluation.evaluate.evaluate` with `strategy_grid`."""
    from loraqa.config import EvaluateArguments
    from loraqa.evaluation.evaluate import evaluate

    return evaluate(ModelArguments(model=model), EvaluateArguments(
        data=data, adapter=adapter, max_samples=max_samples, output=output, strategy_grid=True,
        grid_seeds=grid_seeds), GenerationSettings())


TASKS = [  # (task, name here, the command that runs it at full scale)
    ("1. preprocessing: prompt/answer ids, prompt labels -100", "preprocess_function",
     "loraqa data-stats --model gpt2-tokenizer"),
    ("2. collation: padding, label masks", "QADataCollator", "(inside loraqa train)"),
    ("3. LoRA configuration and freezing", "setup_lora", "loraqa train --lora_r 16 --target_modules attention"),
    ("4. training arguments and training", "training_arguments, train_model",
     "loraqa train --model smollm2-135m --output_dir runs/r16"),
    ("5. inference with controllable generation", "answer_questions",
     "loraqa ask --adapter runs/r16 --context ... --question ..."),
    ("6. SQuAD EM/F1", "squad_metrics", "loraqa score dev-v1.1.json predictions.json"),
    ("7. baseline comparison", "compare_with_baseline", "loraqa compare base.json tuned.json"),
    ("8. decoding-strategy experiment", "decoding_strategy_experiment",
     "loraqa evaluate --adapter runs/r16 --strategy_grid true --output grid.json"),
    ("study, plots, report", "(loraqa.study, loraqa.report)", "make study; make report"),
]


def print_map() -> None:
    width = max(len(task) for task, _, _ in TASKS)
    names = max(len(name) for _, name, _ in TASKS)
    print(__doc__.split("\n\n")[0] + "\n")
    for task, name, command in TASKS:
        print(f"{task:{width}s}  {name:{names}s}  {command}")
    print("\nRun `python lora_qa_finetuning.py --help` for the subcommands; README.md maps each task to its tests, "
          "report section and result files.")


if __name__ == "__main__":
    if len(sys.argv) == 1:
        print_map()
        sys.exit(0)
    from loraqa.cli import main

    sys.exit(main())
