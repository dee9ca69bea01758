"""`make gpu-check` (issue 25, GPU readiness): does loraqa run right on an accelerator? -> results/gpu_check.json.

On `--device` (default $DEVICE, else cuda; `cpu` is a dry run, as the tests run it):
1. the CUDA-marked tests (`pytest -m cuda`), on CUDA only;
2. `--steps` training steps (LoRA, loraqa's default shared-context packing, one learnable batch repeated) in
   bf16 autocast, and in fp16 autocast with loss scaling (the path for GPUs without bf16); fp32 on a CPU, where
   neither makes sense (the output names each precision it skipped and why);
3. `--eval_questions` questions answered greedily in bf16 and in fp32 by the model trained in step 2 (the same
   questions): the share of identical answers;
4. the speed line: loraqa's batched decoder (`generate_answers`) against `model.generate` one question at a
   time (`one_by_one_answers`) on the same `--speed_questions`, in the same run.

The model is randomly initialised from SmolLM2-135M's configuration ($LORAQA_CACHE/smollm2-135m/config.json,
with its tokenizer when present; `--model_config tiny`, or nothing fetched: a 2-layer Llama with a byte-level
BPE trained here): speed, memory and greedy agreement do not depend on the weights, quality cannot be measured.
Questions are SQuAD v1.1 dev when fetched, else made-up SQuAD-format records (`loraqa.data.synthetic`; the
output says which). Nothing is downloaded: an accelerator machine has torch, transformers, peft and
accelerate but no package registry; `datasets` (with `dill`, `multiprocess`) must travel there as wheels.
Exit status 1 when a check failed (`checks` in the output), 2 when the check cannot start.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # a copy of the tree on a bare machine: loraqa is not installed there

NEEDED = ("torch", "transformers", "peft", "accelerate", "datasets")
SYNTHETIC_NOTE = "SQuAD dev not fetched here: synthetic SQuAD-format records (loraqa.data.synthetic)"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="gpu_check.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default=os.environ.get("DEVICE") or "cuda", help="cuda, cuda:1, cpu (dry run)")
    parser.add_argument("--output", default=str(ROOT / "results" / "gpu_check.json"))
    parser.add_argument("--model_config", choices=["auto", "smollm2", "tiny"], default="auto",
                        help="auto: SmolLM2-135M's configuration when its config.json is fetched, else tiny")
    parser.add_argument("--steps", type=int, default=50, help="training steps per precision")
    parser.add_argument("--batch_size", type=int, default=8, help="questions per training step")
    parser.add_argument("--learning_rate", type=float, default=1e-3)
    parser.add_argument("--max_length", type=int, default=512, help="prompt + answer tokens (training, evaluation)")
    parser.add_argument("--eval_questions", type=int, default=500, help="questions answered in bf16 and fp32")
    parser.add_argument("--speed_questions", type=int, default=100, help="questions of the speed line")
    parser.add_argument("--max_new_tokens", type=int, default=32)
    parser.add_argument("--cuda_tests", choices=["true", "false"], default="true", help="run `pytest -m cuda` on CUDA")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    for name in ("steps", "batch_size", "eval_questions", "speed_questions", "max_new_tokens"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} {getattr(args, name)}: must be >= 1")
    return args


class CheckError(RuntimeError):
    """The check cannot run here (a missing package, no CUDA); the message says what to do."""


def check_environment(device_name: str):
    missing = [name for name in NEEDED if importlib.util.find_spec(name) is None]
    if missing:
        raise CheckError(f"missing Python packages: {', '.join(missing)} (no registry on an accelerator machine: "
                         "carry them as wheels, see /work/.library/device/README.md; datasets needs dill and "
                         "multiprocess too)")
    import torch

    try:
        device = torch.device(device_name)
    except RuntimeError as err:
        raise CheckError(f"--device {device_name!r}: {err}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise CheckError(f"--device {device_name!r}: CUDA is not available here (DEVICE=cpu for a dry run)")
    if device.type not in ("cuda", "cpu"):
        raise CheckError(f"--device {device_name!r}: cuda or cpu")
    return device


# ------------------------------------------------------------------------------------------- model and data

def _train_tokenizer(texts: list[str], path: Path):
    """A byte-level BPE (1,024 tokens, EOS `<|endoftext|>`) trained on `texts`, for a machine with no tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    eos = "<|endoftext|>"
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=1024, special_tokens=[eos], show_progress=False,
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token=eos, pad_token=eos)
    tokenizer.save_pretrained(str(path))
    return tokenizer


def model_config(choice: str, cache_dir: Path):
    """(config, where it came from): SmolLM2-135M's when asked or fetched, else a 2-layer Llama."""
    from transformers import AutoConfig, LlamaConfig

    smollm2 = cache_dir / "smollm2-135m" / "config.json"
    if choice == "smollm2" and not smollm2.exists():
        raise CheckError(f"--model_config smollm2: {smollm2} not found (carry it, or --model_config tiny)")
    if choice != "tiny" and smollm2.exists():
        return AutoConfig.from_pretrained(str(smollm2.parent)), str(smollm2)
    # vocab_size 1: `build_model` widens it to the tokenizer's
    return LlamaConfig(num_hidden_layers=2, hidden_size=64, intermediate_size=128, num_attention_heads=4,
                       num_key_value_heads=2, max_position_embeddings=2048, tie_word_embeddings=True,
                       vocab_size=1), "tiny Llama"


def build_model(choice: str, cache_dir: Path, texts: list[str], folder: Path, seed: int) -> dict:
    """Save a randomly initialised model and its tokenizer in `folder` (loadable by path like any model)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    config, config_source = model_config(choice, cache_dir)
    fetched = cache_dir / "smollm2-135m"
    if (fetched / "tokenizer.json").exists():
        tokenizer, tokenizer_source = AutoTokenizer.from_pretrained(str(fetched)), str(fetched)
        tokenizer.save_pretrained(str(folder))
    else:
        tokenizer, tokenizer_source = _train_tokenizer(texts, folder), "byte-level BPE trained on the questions"
    config.vocab_size = max(config.vocab_size, len(tokenizer))
    config.eos_token_id = tokenizer.eos_token_id
    config.bos_token_id = tokenizer.bos_token_id
    config.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.save_pretrained(str(folder))
    return {"config": config_source, "tokenizer": tokenizer_source, "architecture": config.architectures or
            [type(model).__name__], "layers": config.num_hidden_layers, "hidden_size": config.hidden_size,
            "vocab_size": config.vocab_size, "parameters": sum(p.numel() for p in model.parameters()),
            "weights": "random (seeded): speed, memory and agreement do not depend on them; quality is not measured"}


def questions_file(cache_dir: Path, n: int, folder: Path, seed: int) -> tuple[str, str | None]:
    """(SQuAD-format file to evaluate on, a note when it is synthetic)."""
    dev = cache_dir / "squad" / "dev-v1.1.json"
    if dev.exists():
        return str(dev), None
    from loraqa.data.synthetic import synthetic_squad
    from loraqa.files import write_json_atomic

    path = folder / "synthetic_dev.json"
    write_json_atomic(path, synthetic_squad(n, seed=seed + 1))
    return str(path), SYNTHETIC_NOTE


# ------------------------------------------------------------------------------------------------- the checks

def run_cuda_tests() -> dict:
    """`pytest -m cuda` in a child process: its exit code and summary line."""
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-m", "cuda", "-p", "no:cacheprovider", "tests"],
                          cwd=ROOT, capture_output=True, text=True)
    lines = [line for line in done.stdout.splitlines() if line.strip()]
    return {"exit_code": done.returncode, "passed": done.returncode == 0, "summary": lines[-1] if lines else "",
            "failures": [line for line in lines if line.startswith(("FAILED", "ERROR"))],
            "seconds": time.perf_counter() - started}


def training_plan(device) -> tuple[list[str], dict[str, str]]:
    """(precisions to train in, {skipped precision: why})."""
    import torch

    if device.type != "cuda":
        return ["fp32"], {"bf16": "CPU dry run: bf16 autocast training is what the check measures on a GPU",
                          "fp16": "CPU dry run: fp16 loss scaling (torch.amp.GradScaler) is for CUDA"}
    if torch.cuda.is_bf16_supported():
        return ["bf16", "fp16"], {}
    return ["fp16"], {"bf16": f"{torch.cuda.get_device_name(device)} does not support bf16"}


def train_steps(model_dir: Path, train_file: str, out: Path, precision: str, device, args) -> dict:
    """`args.steps` LoRA steps on one batch of `train_file` repeated (a learnable toy batch) via
    `training.run.setup`/`fit`, in `precision` ("bf16"/"fp16" autocast, or "fp32"): losses, speed, memory."""
    import torch

    from loraqa.config import DataArguments, LoraArguments, ModelArguments
    from loraqa.training.arguments import LoraQATrainingArguments
    from loraqa.training.run import fit, setup

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    run = setup(ModelArguments(model=str(model_dir), cache_dir=str(out)),
                LoraArguments(lora_r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear"),
                DataArguments(train_file=train_file, validation_file=train_file, max_train_samples=args.batch_size,
                              max_eval_samples=1, max_length=args.max_length),
                LoraQATrainingArguments(output_dir=str(out / f"train_{precision}"), max_steps=args.steps,
                                        per_device_train_batch_size=args.batch_size, learning_rate=args.learning_rate,
                                        warmup_ratio=0.0, lr_scheduler_type="constant", logging_steps=1,
                                        eval_strategy="no", save_strategy="no", disable_tqdm=True, seed=args.seed,
                                        train_sampling_strategy="sequential", bf16=precision == "bf16",
                                        fp16=precision == "fp16", use_cpu=device.type == "cpu"))
    result = fit(run)
    summary = result.summary
    metrics = Path(result.output_dir) / "metrics.jsonl"
    losses = [record["loss"] for record in map(json.loads, metrics.read_text().splitlines()) if "loss" in record]
    k = max(1, len(losses) // 5)  # first and last fifth of the steps
    first, last = sum(losses[:k]) / k, sum(losses[-k:]) / k
    scaler = run.trainer.accelerator.scaler
    return {"steps": summary["global_steps"], "losses": losses, "loss_first_fifth": first, "loss_last_fifth": last,
            "finite": all(math.isfinite(x) for x in losses), "decreasing": last < first,
            "loss_scaling": scaler is not None, "final_loss_scale": scaler.get_scale() if scaler is not None else None,
            "seconds_per_step": summary["seconds_per_step"], "train_tokens_per_s": summary["train_tokens_per_s"],
            "peak_memory_mb": summary["peak_memory_mb"],
            "peak_memory": "torch.cuda.max_memory_allocated" if device.type == "cuda" else "process peak RSS",
            "trainable_params": summary["trainable_params"], "output_dir": result.output_dir}


def _synchronize(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def compare_precisions(model_dir: Path, adapter: str, records: list[dict], device, args) -> dict:
    """Greedy answers of the same model (+ trained adapter, merged) in bf16 and in fp32 on the same questions."""
    import torch

    from loraqa.config import GenerationSettings, ModelArguments
    from loraqa.evaluation.evaluate import load_model_for_eval
    from loraqa.generation.decode import generate_answers

    settings = GenerationSettings(max_new_tokens=args.max_new_tokens)
    answers, speed = {}, {}
    for dtype in ("float32", "bfloat16"):
        model, tokenizer, _ = load_model_for_eval(ModelArguments(model=str(model_dir)), adapter,
                                                  device=str(device), dtype=dtype)
        generate_answers(model, tokenizer, records[:1], settings=settings, progress=False,
                         max_length=args.max_length)  # warm-up
        _synchronize(device)
        started = time.perf_counter()
        answers[dtype] = generate_answers(model, tokenizer, records, settings=settings, progress=False,
                                          max_length=args.max_length)
        _synchronize(device)
        speed[dtype] = len(records) / (time.perf_counter() - started)
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
    same = sum(answers["bfloat16"][q] == answers["float32"][q] for q in answers["float32"])
    return {"questions": len(records), "identical": same, "agreement_percent": 100 * same / len(records),
            "questions_per_s": speed, "max_new_tokens": args.max_new_tokens,
            "examples": [{"id": q, "float32": answers["float32"][q], "bfloat16": answers["bfloat16"][q]}
                         for q in list(answers["float32"])[:3]]}


def speed_line(model_dir: Path, adapter: str, records: list[dict], device, args) -> dict:
    """loraqa's batched decoder against `model.generate` one question at a time, on the same questions."""
    import torch

    from loraqa.config import GenerationSettings, ModelArguments
    from loraqa.evaluation.evaluate import load_model_for_eval, one_by_one_answers
    from loraqa.generation.decode import generate_answers

    dtype = "float32" if device.type != "cuda" else "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
    model, tokenizer, _ = load_model_for_eval(ModelArguments(model=str(model_dir)), adapter, device=str(device),
                                              dtype=dtype)
    settings = GenerationSettings(max_new_tokens=args.max_new_tokens)
    generate_answers(model, tokenizer, records[:1], settings=settings, progress=False)  # warm-up, stop-token table
    one_by_one_answers(model, tokenizer, records[:1], settings)
    _synchronize(device)
    started = time.perf_counter()
    ours = generate_answers(model, tokenizer, records, settings=settings, progress=False)
    _synchronize(device)
    ours_s = time.perf_counter() - started
    started = time.perf_counter()
    reference = one_by_one_answers(model, tokenizer, records, settings)
    _synchronize(device)
    reference_s = time.perf_counter() - started
    batched, one_by_one = len(records) / ours_s, len(records) / reference_s
    same = sum(ours[q] == reference[q] for q in reference)
    return {"questions": len(records), "dtype": dtype, "batch_size": settings.batch_size,
            "loraqa_questions_per_s": batched, "one_by_one_questions_per_s": one_by_one,
            "ratio": batched / one_by_one, "greedy_identical": same,
            "line": f"{len(records)} questions in {dtype}: loraqa {batched:.2f} q/s, one-by-one generate "
                    f"{one_by_one:.2f} q/s, {batched / one_by_one:.1f}x; identical greedy answers {same}/{len(records)}"}


def main(argv: list[str] | None = None) -> dict:
    """Run every check, write `--output` (atomically) and return what it holds."""
    args = parse_args(argv)
    device = check_environment(args.device)
    import torch
    import transformers

    from loraqa.config import default_cache_dir
    from loraqa.data.squad import load_squad, take_subset
    from loraqa.data.synthetic import synthetic_squad
    from loraqa.files import run_metadata, write_json_atomic

    started = time.perf_counter()
    cache_dir = Path(default_cache_dir())
    result = {"device": str(device), "dry_run": device.type != "cuda", "settings": vars(args),
              "torch": torch.__version__, "transformers": transformers.__version__, **run_metadata()}
    if device.type == "cuda":
        result["gpu"] = {"name": torch.cuda.get_device_name(device), "capability": list(torch.cuda.get_device_capability(device)),
                         "memory_gb": torch.cuda.get_device_properties(device).total_memory / 2**30,
                         "cuda": torch.version.cuda}
    notes, skipped = [], {}
    if device.type == "cuda" and args.cuda_tests == "true":
        print("CUDA-marked tests ...", flush=True)
        result["cuda_tests"] = run_cuda_tests()
    else:
        skipped["cuda_tests"] = "not on CUDA" if device.type != "cuda" else "--cuda_tests false"
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as tmp:
        work = Path(tmp)
        # training data: a made-up SQuAD file, so that the toy batch is the same on every machine
        train_file = work / "synthetic_train.json"
        write_json_atomic(train_file, synthetic_squad(max(args.batch_size, 8), seed=args.seed))
        eval_file, note = questions_file(cache_dir, max(args.eval_questions, args.speed_questions), work, args.seed)
        if note:
            notes.append(note)
        records = list(take_subset(load_squad(eval_file, "validation"), args.eval_questions, args.seed))
        texts = [r["context"] + "\n" + r["question"] for r in records] + [
            r["context"] for r in load_squad(str(train_file), "train")]
        model_dir = work / "model"
        result["model"] = build_model(args.model_config, cache_dir, texts, model_dir, args.seed)
        result["questions"] = {"file": eval_file if not note else "synthetic", "synthetic": bool(note),
                               "evaluated": len(records)}
        precisions, skipped_precisions = training_plan(device)
        skipped.update({f"train_{p}": why for p, why in skipped_precisions.items()})
        result["train"] = {}
        for precision in precisions:
            print(f"training {args.steps} steps in {precision} ...", flush=True)
            result["train"][precision] = train_steps(model_dir, str(train_file), work, precision, device, args)
        adapter = result["train"][precisions[0]].pop("output_dir")
        for run in result["train"].values():
            run.pop("output_dir", None)
        print(f"answering {len(records)} questions in float32 and bfloat16 ...", flush=True)
        result["precision_agreement"] = compare_precisions(model_dir, adapter, records, device, args)
        print(f"speed line on {min(args.speed_questions, len(records))} questions ...", flush=True)
        result["speed"] = speed_line(model_dir, adapter, records[:args.speed_questions], device, args)
    checks = {f"train_{p}_{what}": run[what] for p, run in result["train"].items() for what in ("finite", "decreasing")}
    checks.update({f"train_{p}_loss_scaling": run["loss_scaling"] for p, run in result["train"].items() if p == "fp16"})
    if "cuda_tests" in result:
        checks["cuda_tests"] = result["cuda_tests"]["passed"]
    result.update(skipped=skipped, notes=notes, checks=checks, ok=all(checks.values()),
                  seconds=time.perf_counter() - started)
    write_json_atomic(args.output, result)
    return result


def summary_lines(result: dict) -> list[str]:
    lines = [f"{note}" for note in result["notes"]]
    lines += [f"skipped {what}: {why}" for what, why in result["skipped"].items()]
    if "cuda_tests" in result:
        lines.append(f"CUDA tests: {result['cuda_tests']['summary']}")
    for precision, run in result["train"].items():
        lines.append(f"train {precision}: {run['steps']} steps, loss {run['loss_first_fifth']:.3f} -> "
                     f"{run['loss_last_fifth']:.3f} (first -> last fifth), {run['seconds_per_step']:.3f} s/step, "
                     f"peak memory {run['peak_memory_mb']:.0f} MB"
                     + (f", final loss scale {run['final_loss_scale']:g}" if run["loss_scaling"] else ""))
    agreement = result["precision_agreement"]
    lines.append(f"bf16 vs fp32: {agreement['identical']}/{agreement['questions']} greedy answers identical "
                 f"({agreement['agreement_percent']:.1f}%)")
    lines.append(f"speed: {result['speed']['line']}")
    failed = [name for name, ok in result["checks"].items() if not ok]
    lines.append("all checks passed" if not failed else f"FAILED: {', '.join(failed)}")
    return lines


if __name__ == "__main__":
    try:
        outcome = main()
    except CheckError as err:
        print(f"gpu_check: error: {err}", file=sys.stderr)
        sys.exit(2)
    print("\n".join(summary_lines(outcome)))
    print(f"written: {outcome['settings']['output']}")
    sys.exit(0 if outcome["ok"] else 1)
