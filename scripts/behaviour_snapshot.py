"""Record what loraqa computes, through its command line only, so that a code move can be shown to change nothing.

    python scripts/behaviour_snapshot.py OUT.json          # before a restructuring
    python scripts/behaviour_snapshot.py AFTER.json && cmp OUT.json AFTER.json   # after it, same machine

It trains a random 2-layer GPT-2 and Llama (the real GPT-2 / SmolLM2 tokenizers) for a few steps, packed and
padded, evaluates them greedily, runs and collects a 2x2 sweep, and fills the report from the test fixture;
the snapshot holds every training loss, answer and score, the collected table and the report's filled text,
with timings, paths and provenance (revision, versions, machine) left out. It imports nothing from loraqa:
the CLI is the interface that must not change. Needs `loraqa fetch` done (LORAQA_CACHE or ./data).
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
import yaml
from transformers import (AutoTokenizer, GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM)

ROOT = Path(__file__).resolve().parent.parent
CACHE = Path(os.environ.get("LORAQA_CACHE", ROOT / "data")).resolve()
VOLATILE = {"seconds", "runtime", "per_s", "time", "revision", "version", "machine", "created", "started",
            "finished", "memory", "path", "dir", "file", "output", "log", "torch_threads", "git", "python", "host",
            "cache", "questions_per_s", "tokens_per_s", "dirty", "eta", "_mb", "work"}
SUPER_BOWL = ("Super Bowl 50 was an American football game. The Denver Broncos defeated the Carolina Panthers "
              "24-10 to earn their third Super Bowl title. The game was played on February 7, 2016, at Levi's "
              "Stadium in Santa Clara, California.")
LONG = " ".join(f"Filler sentence number {i} says nothing." for i in range(60))
TREASURE = LONG + " The treasure is buried under the old oak tree. " + LONG


def _qa(qid, question, context, *answers):
    return {"id": qid, "question": question, "answers": [{"text": a, "answer_start": context.index(a)} for a in answers]}


SQUAD = {"version": "1.1", "data": [
    {"title": "Super_Bowl_50", "paragraphs": [{"context": SUPER_BOWL, "qas": [
        _qa("q1", "Which team won Super Bowl 50?", SUPER_BOWL, "Denver Broncos", "The Denver Broncos"),
        _qa("q2", "Where was the game played?", SUPER_BOWL, "Levi's Stadium"),
        _qa("q3", "What was the score?", SUPER_BOWL, "24-10")]}]},
    {"title": "Long", "paragraphs": [{"context": TREASURE, "qas": [
        _qa("q4", "Where is the treasure buried?", TREASURE, "under the old oak tree"),
        _qa("q5", "Which sentence number is the last?", TREASURE, "number 59")]}]},
]}


def loraqa(*args: str) -> None:
    env = {**os.environ, "LORAQA_CACHE": str(CACHE), "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-m", "loraqa.cli", *args], env=env, capture_output=True, text=True)
    if result.returncode != 0:
        sys.exit(f"loraqa {' '.join(args)} failed:\n{result.stdout[-2000:]}\n{result.stderr[-2000:]}")


def stable(value, key: str = ""):
    """Drop timings, paths and provenance; round floats to 6 significant digits (the CLI writes JSON floats)."""
    if isinstance(value, dict):
        return {k: stable(v, k) for k, v in sorted(value.items()) if not any(w in k.lower() for w in VOLATILE)}
    if isinstance(value, list):
        return [stable(v, key) for v in value]
    if isinstance(value, str) and ("/" in value and ("tmp" in value or str(ROOT) in value)):
        return "<path>"
    if isinstance(value, float):
        return float(f"{value:.6g}")
    return value


def tiny_models(root: Path) -> dict[str, Path]:
    models = {}
    torch.manual_seed(0)
    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, n_positions=1024, vocab_size=50257))
    torch.manual_seed(0)
    llama = LlamaForCausalLM(LlamaConfig(num_hidden_layers=2, hidden_size=32, intermediate_size=64, num_attention_heads=4,
                                         num_key_value_heads=2, vocab_size=49152, max_position_embeddings=1024,
                                         tie_word_embeddings=True, initializer_range=0.5))
    for name, model, tokenizer in (("gpt2", gpt2, "gpt2-tokenizer"), ("llama", llama, "smollm2-135m")):
        models[name] = root / name
        model.save_pretrained(models[name])
        AutoTokenizer.from_pretrained(str(CACHE / tokenizer)).save_pretrained(models[name])
    return models


def losses(run: Path) -> list:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [stable({k: v for k, v in row.items() if k in ("step", "loss", "eval_loss", "grad_norm")}) for row in rows]


def snapshot(work: Path) -> dict:
    data = work / "squad.json"
    data.write_text(json.dumps(SQUAD))
    models = tiny_models(work)
    out: dict = {}
    for name, model in models.items():
        for packing in ("shared_context", "none"):
            run = work / f"{name}-{packing}"
            loraqa("train", "--model", str(model), "--train_file", str(data), "--validation_file", str(data),
                   "--max_length", "256", "--max_steps", "3", "--per_device_train_batch_size", "2", "--lora_r", "4",
                   "--learning_rate", "0.01", "--packing", packing, "--eval_steps", "1", "--logging_steps", "1",
                   "--save_strategy", "no", "--disable_tqdm", "true", "--output_dir", str(run))
            out[f"train/{name}/{packing}"] = losses(run)
        evaluation = work / f"eval-{name}.json"
        loraqa("evaluate", "--model", str(model), "--adapter", str(work / f"{name}-shared_context"), "--data", str(data),
               "--max_new_tokens", "6", "--output", str(evaluation))
        result = json.loads(evaluation.read_text())
        out[f"evaluate/{name}"] = stable({k: result[k] for k in ("predictions", "exact_match", "f1", "per_question")})
    spec = {
        "base": {"model": str(models["gpt2"]), "train_file": str(data), "validation_file": str(data), "max_length": 128,
                 "max_steps": 2, "max_train_samples": 4, "per_device_train_batch_size": 2, "eval_steps": 1,
                 "save_steps": 1, "logging_steps": 1, "disable_tqdm": True, "lora_dropout": 0.0},
        "grid": {"learning_rate": [1.0e-3, 5.0e-3], "rank": [{"lora_r": 2, "lora_alpha": 4}, {"lora_r": 4, "lora_alpha": 8}]},
        "centre": {"learning_rate": 1.0e-3, "rank": {"lora_r": 4, "lora_alpha": 8}},
        "runs": {"baseline": {"train": False}},
        "first": ["baseline"],
        "evaluations": {"test": {"data": str(data), "max_samples": 5, "max_new_tokens": 4}},
        "select_on": "test",
    }
    spec_path = work / "spec.yaml"
    spec_path.write_text(yaml.safe_dump(spec, sort_keys=False))
    loraqa("sweep", str(spec_path), "--output_dir", str(work / "sweep"))
    loraqa("sweep", str(spec_path), "--output_dir", str(work / "sweep"), "--collect", str(work / "collected.json"))
    out["sweep/collected"] = stable(json.loads((work / "collected.json").read_text()))
    out["sweep/run_ids"] = sorted(p.name for p in (work / "sweep").iterdir() if p.is_dir())
    loraqa("report", "--results", str(ROOT / "tests" / "fixtures" / "report"), "--output", str(work / "report.pdf"),
           "--source_dir", str(work / "report-source"))
    out["report/text"] = {str(p.relative_to(work / "report-source")): hashlib.sha256(p.read_bytes()).hexdigest()
                          for p in sorted((work / "report-source").rglob("*.typ"))}
    return out


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    work = Path(tempfile.gettempdir()) / "loraqa-behaviour-snapshot"  # fixed: run ids hash the paths in a spec
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir()
    try:
        result = snapshot(work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    Path(sys.argv[1]).write_text(json.dumps(result, indent=1, sort_keys=True) + "\n")
    print(f"{sys.argv[1]}: {len(result)} sections")
