"""loraqa: LoRA fine-tuning of causal language models for SQuAD question answering, evaluated honestly.

The package follows the pipeline, one subpackage per stage, each importing only the stages before it:

    data -> model -> training -> generation -> evaluation -> study -> report      (measure, app on top)

The names a notebook needs are importable from here; they load on first use, so that `import loraqa` (and
the CLI's `--help`) stays light:

    from loraqa import ModelArguments, LoraArguments, DataArguments, LoraQATrainingArguments, train
"""
from __future__ import annotations

import importlib

__version__ = "0.1.0"

_API = {
    # data
    "load_squad": "data.squad", "take_subset": "data.squad", "preprocess_function": "data.squad",
    "encode_prompt": "data.squad", "IGNORE_INDEX": "data.squad",
    "QADataCollator": "data.collate", "SharedContextCollator": "data.collate", "fetch": "data.assets",
    # model
    "load_model_and_tokenizer": "model.loading", "load_adapter": "model.loading", "attach_lora": "model.lora",
    "count_parameters": "model.lora",
    # training
    "LoraQATrainingArguments": "training.arguments", "setup": "training.run", "fit": "training.run",
    "train": "training.run",
    # generation
    "generate_answers": "generation.decode",
    # evaluation
    "squad_scores": "evaluation.metrics", "EvaluateArguments": "config", "evaluate": "evaluation.evaluate",
    "paired_comparison": "evaluation.stats",
    # settings
    "ModelArguments": "config", "LoraArguments": "config", "DataArguments": "config", "GenerationSettings": "config",
    "ConfigError": "config",
}
__all__ = sorted(_API)


def __getattr__(name: str):
    if name not in _API:
        raise AttributeError(f"module 'loraqa' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{_API[name]}"), name)
    globals()[name] = value  # once loaded, a plain attribute
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_API))
