"""Side-by-side speed benchmark: loraqa against what a user would otherwise run, on the same questions.

Training: TRL `SFTTrainer` + PEFT (prompt-completion data, completion-only loss, fp32) against loraqa's
default path, all fed the same questions in the same (file) order so that their per-step losses can be
set side by side, plus loraqa ablations (padded rows with full logits, padded rows with answer-only
logits) that show what each idea contributes. Every training variant runs in a fresh child process so
that its peak RSS is its own. Evaluation: one-by-one `model.generate` against `generate_answers`, with
greedy answers compared, plus batched full-prompt rows (no shared contexts) as the ablation and, where the
device multiplies bf16 natively, both evaluation paths again with bf16 weights. The machine's fp32 matmul
peak is measured before and after the runs (`matmul_peak`: best window over several sizes) for MFU figures
and the evaluation's FLOP floor; an MFU above 100% fails the bench as the measurement error it is
(`check_mfu`). The evaluation's linear layers are timed alone (the prefill at the peak, each decoding step
at its own row count, where few rows multiply far below the peak): the speedup that would remain if all
other work were free.
"""
from __future__ import annotations

import json
import logging
import platform
import resource
import tempfile
import time
from dataclasses import dataclass, field, replace

import torch

from ..config import DataArguments, GenerationSettings, LoraArguments, ModelArguments
from ..files import run_metadata, write_json_atomic
from ..training.arguments import LoraQATrainingArguments
from .common import in_child

logger = logging.getLogger(__name__)


@dataclass
class BenchArguments:
    train_examples: int = field(default=64, metadata={"help": "Training questions (N); steps = N / batch size."})
    eval_examples: int = field(default=32, metadata={"help": "Evaluation questions (M)."})
    output: str = field(default="bench.json", metadata={"help": "Where to write the results."})
    batch_size: int = field(default=8, metadata={"help": "Questions per training step, for every variant."})
    max_length: int = field(default=512, metadata={"help": "Maximum tokens per example, for every variant."})
    ablations: bool = field(default=True, metadata={"help": (
        "Also time loraqa with padded rows (full / answer-only logits), evaluation without shared contexts and, "
        "where the device multiplies bf16 natively, evaluation with bf16 weights.")})
    reference: bool = field(default=True, metadata={"help": "Run the TRL reference (needs `pip install trl`)."})
    train_file: str = field(default="squad", metadata={"help": "SQuAD-format JSON the training variants take their "
                                                               "questions from, or 'squad' (fetched v1.1 train)."})
    eval_file: str = field(default="squad", metadata={"help": "SQuAD-format JSON the evaluation takes its questions "
                                                              "from, or 'squad' (fetched v1.1 dev)."})


class BenchMeasurementError(RuntimeError):
    """A figure the bench cannot have measured right (an MFU above 100%: the matmul peak was measured low)."""


def matmul_peak(device: str = "cpu", sizes: tuple[int, ...] | None = None, windows: int = 5,
                seconds: float = 0.4) -> dict:
    """fp32 matmul throughput of `device` (on a CPU, with torch's current threads), robust to a disturbed moment.

    Square products of each size are timed over `windows` windows of `seconds`, sizes interleaved, and the peak is
    the best window of any size: a single window can land on a busy or throttled moment (one 3 s window of
    1024x1024 products once read 48.9 GFLOP/s where a quiet loop gives 121-127). Returns {"gflops": best,
    "size": its size, "spread": [worst, best] window at that size, "gflops_by_size": {size: [each window's]}}.
    """
    cuda = torch.device(device).type == "cuda"
    sizes = sizes or ((4096, 8192) if cuda else (512, 1024, 2048))
    synchronize = torch.cuda.synchronize if cuda else (lambda: None)
    operands = {size: (torch.randn(size, size, device=device), torch.randn(size, size, device=device))
                for size in sizes}
    for a, b in operands.values():  # warm-up: first-call allocation and kernel selection
        torch.mm(a, b)
    synchronize()
    rates: dict[int, list[float]] = {size: [] for size in sizes}
    for _ in range(windows):
        for size, (a, b) in operands.items():
            count, started = 0, time.perf_counter()
            while (elapsed := time.perf_counter() - started) < seconds:
                torch.mm(a, b)
                synchronize()
                count += 1
            rates[size].append(2 * size**3 * count / elapsed / 1e9)
    best = max(sizes, key=lambda size: max(rates[size]))
    return {"gflops": max(rates[best]), "size": best, "spread": [min(rates[best]), max(rates[best])],
            "gflops_by_size": rates}


def _apply_peak(result: dict, measurements: dict[str, dict]) -> None:
    """Record the matmul peak's measurements (`matmul_peak` before and after the runs, {"before": ...,
    "after": ...}) with the best of them as the peak, and fill in every figure that depends on it."""
    peak = max(m["gflops"] for m in measurements.values())
    result["machine"].update(matmul_peak_gflops=peak, matmul_peak=measurements)
    train, evaluation = result.get("train", {}), result.get("eval", {})
    for figures in (train, evaluation):
        if "loraqa_achieved_gflops" in figures:
            figures["loraqa_mfu"] = figures["loraqa_achieved_gflops"] / peak
    if "loraqa_flops" in evaluation:
        floor_s = evaluation["loraqa_flops"] / (peak * 1e9)
        reference_s = evaluation["questions"] / evaluation["one_by_one_questions_per_s"]
        prefill_linear_s = evaluation["prefill_linear_flops"] / (peak * 1e9)
        linear_s = prefill_linear_s + evaluation["decode_linear_s"]
        evaluation.update(loraqa_questions_per_s_at_peak=evaluation["questions"] / floor_s,
                          speedup_at_peak=reference_s / floor_s, prefill_linear_at_peak_s=prefill_linear_s,
                          linear_layers_s=linear_s, speedup_if_only_linear_layers=reference_s / linear_s)


def check_mfu(result: dict) -> None:
    """Refuse an MFU above 100%: no run beats the machine's matmul peak, so such an MFU means the peak was
    measured low (a busy or throttled moment) and every figure at the peak is wrong with it."""
    for stage in ("train", "eval"):
        figures = result.get(stage, {})
        if figures.get("loraqa_mfu", 0.0) > 1.0:
            raise BenchMeasurementError(
                f"{stage} achieved {figures['loraqa_achieved_gflops']:.1f} GFLOP/s, above the fp32 matmul peak "
                f"measured ({_peak_text(result['machine'])}): MFU {100 * figures['loraqa_mfu']:.0f}% is a measurement "
                f"error (all figures in {result['settings']['output']}); rerun the bench on an idle machine")


def _peak_text(machine: dict) -> str:
    """'121.3 GFLOP/s; before the runs 120.1 (windows 98.2-120.1 at 1024), after 121.3 (...)'."""
    parts = [f"{when} the runs {m['gflops']:.1f} (windows {m['spread'][0]:.1f}-{m['spread'][1]:.1f} at {m['size']})"
             for when, m in machine["matmul_peak"].items()]
    return f"{machine['matmul_peak_gflops']:.1f} GFLOP/s; " + ", ".join(parts)


def _loraqa_worker(job: dict) -> dict:
    from ..training.run import train

    with tempfile.TemporaryDirectory() as out:
        result = train(ModelArguments(model=job["model"], cache_dir=job["cache_dir"]),
                       LoraArguments(lora_r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear"),
                       DataArguments(train_file=job["train_file"], validation_file=job["eval_file"],
                                     max_train_samples=job["n"], max_eval_samples=8, max_length=job["max_length"]),
                       LoraQATrainingArguments(
                           output_dir=out, max_steps=job["steps"], per_device_train_batch_size=job["batch_size"],
                           learning_rate=2e-4, warmup_ratio=0.0, logging_steps=1, eval_strategy="no",
                           save_strategy="no", disable_tqdm=True, seed=0, packing=job["packing"],
                           answer_only_logits=job["answer_only_logits"], train_sampling_strategy="sequential"))
        losses = [json.loads(line)["loss"] for line in open(f"{out}/metrics.jsonl") if '"loss"' in line]
    s = result.summary
    examples_per_s = job["steps"] * job["batch_size"] / s["train_runtime_s"]  # wall time of train(), as for TRL
    tokens_per_example = s["train_tokens_per_s"] / s["train_examples_per_s"]
    return {"examples_per_s": examples_per_s, "tokens_per_s": examples_per_s * tokens_per_example,
            "runtime_s": s["train_runtime_s"], "mean_train_loss": s["mean_train_loss"], "step_losses": losses,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "processed_tokens": s["processed_tokens"], "logit_positions": s["logit_positions"],
            "trainable_params": s["trainable_params"]}


def _trl_worker(job: dict) -> dict:
    """The reference a user would write: TRL SFTTrainer + PEFT, fairly configured (fp32 on CPU)."""
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import set_seed
    from trl import SFTConfig, SFTTrainer

    from ..data.assets import squad_file
    from ..data.squad import format_prompt, load_squad, take_subset
    from ..model.loading import load_model_and_tokenizer

    model, tokenizer, _ = load_model_and_tokenizer(job["model"], job["cache_dir"])
    raw = take_subset(load_squad(squad_file(job["train_file"], "train", job["cache_dir"])), job["n"], 0)
    data = Dataset.from_list([{"prompt": format_prompt(r["context"], r["question"]),
                               "completion": " " + r["answers"]["text"][0]} for r in raw])
    with tempfile.TemporaryDirectory() as out:
        config = SFTConfig(output_dir=out, max_steps=job["steps"], per_device_train_batch_size=job["batch_size"],
                           learning_rate=2e-4, warmup_steps=0, lr_scheduler_type="linear", logging_steps=1,
                           save_strategy="no", report_to="none", bf16=False, fp16=False, seed=0,
                           max_length=job["max_length"], packing=False, completion_only_loss=True,
                           disable_tqdm=True, train_sampling_strategy="sequential")
        set_seed(0)  # the same LoRA initialisation as loraqa's
        trainer = SFTTrainer(model=model, args=config, train_dataset=data, processing_class=tokenizer,
                             peft_config=LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0,
                                                    target_modules="all-linear", task_type="CAUSAL_LM"))
        started = time.perf_counter()
        output = trainer.train()
        runtime = time.perf_counter() - started
    examples = job["steps"] * job["batch_size"]
    mean_length = sum(len(ids) for ids in trainer.train_dataset["input_ids"]) / len(trainer.train_dataset)
    return {"examples_per_s": examples / runtime, "tokens_per_s": examples * mean_length / runtime,
            "runtime_s": runtime, "mean_train_loss": output.training_loss,
            "step_losses": [h["loss"] for h in trainer.state.log_history if "loss" in h],
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}





def _side_by_side(model, tokenizer, records: list[dict], settings: GenerationSettings, work: dict | None = None):
    """(loraqa's answers, seconds, one-by-one answers, seconds) on the same questions, after a warm-up."""
    from ..evaluation.evaluate import one_by_one_answers
    from ..generation.decode import generate_answers

    generate_answers(model, tokenizer, records[:1], settings=settings, progress=False)  # warm-up, stop-token table
    started = time.perf_counter()
    ours = generate_answers(model, tokenizer, records, settings=settings, progress=False, stats=work)
    ours_s = time.perf_counter() - started
    started = time.perf_counter()
    reference = one_by_one_answers(model, tokenizer, records, settings)
    return ours, ours_s, reference, time.perf_counter() - started


def _eval_bench(model, tokenizer, data: str, cache_dir: str, m: int, ablations: bool, bf16: bool) -> dict:
    """Evaluation speed and matmul work; the figures at the matmul peak are added by `_apply_peak`."""
    from ..data.assets import squad_file
    from ..data.squad import load_squad, take_subset
    from ..generation.decode import generate_answers

    model.eval()
    records = list(take_subset(load_squad(squad_file(data, "validation", cache_dir), "validation"), m, 0))
    settings = GenerationSettings()
    work: dict = {}
    ours, ours_s, reference, reference_s = _side_by_side(model, tokenizer, records, settings, work)
    same = sum(ours[q] == reference[q] for q in reference)
    ablation = {}
    if ablations:  # batching alone: full-prompt rows on the model's own KV cache, no shared contexts
        started = time.perf_counter()
        rows = generate_answers(model, tokenizer, records, settings=replace(settings, prefix_cache=False),
                                progress=False)
        rows_s = time.perf_counter() - started
        ablation = {"full_prompt_rows_questions_per_s": len(records) / rows_s,
                    "full_prompt_rows_identical_count": sum(rows[q] == reference[q] for q in reference)}
    # matmul work of loraqa's path: every encoded or fed token through the body, every generated token's logits
    body, head = _matmul_params(model)
    flops = 2 * body * (work["prompt_tokens"] + work["generated_tokens"]) + 2 * head * work["generated_tokens"]
    # what the linear layers alone cost: the prefill at the matmul peak, each decoding step at its own row count
    # as this machine's matmul library actually runs it (few rows multiply far below the peak)
    decode_linear_s = _decode_linear_seconds(model, work["steps_by_rows"])
    if bf16:
        ablation["bf16"] = _bf16_eval(model, tokenizer, records, settings, ours, reference_s)
    return {"questions": len(records), "paragraphs": len({r["context"] for r in records}),
            "one_by_one_questions_per_s": len(records) / reference_s, "loraqa_questions_per_s": len(records) / ours_s,
            "speedup": reference_s / ours_s, "greedy_identical": same == len(records), "greedy_identical_count": same,
            "max_new_tokens": settings.max_new_tokens, "batch_size": settings.batch_size, **work,
            "loraqa_flops": flops, "loraqa_achieved_gflops": flops / ours_s / 1e9,
            "prefill_linear_flops": 2 * body * work["prompt_tokens"], "decode_linear_s": decode_linear_s, **ablation}


@torch.no_grad()
def _decode_linear_seconds(model, steps_by_rows: dict[int, int]) -> float:
    """Seconds the model's linear layers (LM head included) take over decoding steps of these row counts,
    {rows: steps}: one pass over every layer with its own weights per row count, best of three."""
    layers = _linear_layers(model)
    synchronize = torch.cuda.synchronize if model.device.type == "cuda" else (lambda: None)
    total = 0.0
    for rows, steps in steps_by_rows.items():
        inputs = [torch.randn(rows, _in_features(m), device=model.device, dtype=model.dtype) for m in layers]
        best = float("inf")
        for _ in range(3):
            synchronize()
            started = time.perf_counter()
            for layer, x in zip(layers, inputs):
                layer(x)
            synchronize()
            best = min(best, time.perf_counter() - started)
        total += steps * best
    return total


def _bf16_eval(model, tokenizer, records: list[dict], settings: GenerationSettings, fp32_answers: dict,
               fp32_one_by_one_s: float) -> dict:
    """Both evaluation paths with bf16 weights (`model` is converted in place): speed, and how many greedy
    answers agree with each other and with float32's."""
    model.to(torch.bfloat16)
    ours, ours_s, reference, reference_s = _side_by_side(model, tokenizer, records, settings)
    return {"loraqa_questions_per_s": len(records) / ours_s, "one_by_one_questions_per_s": len(records) / reference_s,
            "speedup": reference_s / ours_s, "speedup_over_fp32_one_by_one": fp32_one_by_one_s / ours_s,
            "greedy_identical_count": sum(ours[q] == reference[q] for q in reference),
            "identical_to_fp32_count": sum(ours[q] == fp32_answers[q] for q in reference)}


def run_bench(model_args: ModelArguments, bench: BenchArguments) -> dict:
    """Run every variant on the same questions and write `bench.output` (partial results as they come)."""
    from ..data.assets import fetch
    from ..model.loading import inference_placement, native_bf16, resolve_model

    if "squad" in (bench.train_file, bench.eval_file):
        fetch("squad", model_args.cache_dir)
    resolved = resolve_model(model_args.model, model_args.cache_dir)
    steps = max(1, bench.train_examples // bench.batch_size)
    job = {"model": resolved, "cache_dir": model_args.cache_dir, "n": steps * bench.batch_size, "steps": steps,
           "batch_size": bench.batch_size, "max_length": bench.max_length,
           "train_file": bench.train_file, "eval_file": bench.eval_file}
    # the Trainer trains where transformers puts the model (CUDA when present); evaluation runs there too
    device = str(inference_placement("auto", "float32")[0])
    result = {"model": model_args.model, "model_resolved": resolved, "settings": vars(bench) | {"steps": steps},
              **run_metadata()}
    result["machine"].update(processor=platform.processor() or platform.machine(), device=device,
                             cpu_capability=torch.backends.cpu.get_cpu_capability(),
                             native_bf16=native_bf16(torch.device(device)))
    peaks = {"before": matmul_peak(device)}
    _apply_peak(result, peaks)
    variants = {"loraqa": {"packing": "shared_context", "answer_only_logits": True}}
    if bench.ablations:
        variants["padded_answer_only_logits"] = {"packing": "none", "answer_only_logits": True}
        variants["padded_full_logits"] = {"packing": "none", "answer_only_logits": False}
    train = {}
    for name, options in variants.items():
        logger.info("training variant %s", name)
        train[name] = in_child(_loraqa_worker, {**job, **options})
        result["train"] = train
        write_json_atomic(bench.output, result)
    if bench.reference:
        logger.info("training reference: TRL SFTTrainer + PEFT")
        train["reference_trl"] = in_child(_trl_worker, job)
    ours = train["loraqa"]
    from ..model.loading import load_model_and_tokenizer

    model, tokenizer, _ = load_model_and_tokenizer(resolved, model_args.cache_dir)
    model.to(device)
    body, head = _matmul_params(model)
    flops = 4 * body * ours["processed_tokens"] + 4 * head * ours["logit_positions"]  # fwd + input-grad bwd
    train["loraqa_achieved_gflops"] = flops / ours["runtime_s"] / 1e9
    if "reference_trl" in train:
        reference = train["reference_trl"]
        train.update(reference_examples_per_s=reference["examples_per_s"], loraqa_examples_per_s=ours["examples_per_s"],
                     speedup=ours["examples_per_s"] / reference["examples_per_s"],
                     loss_reference=reference["mean_train_loss"], loss_loraqa=ours["mean_train_loss"],
                     peak_rss_ratio=ours["peak_rss_mb"] / reference["peak_rss_mb"])
    for name in ("padded_answer_only_logits", "padded_full_logits"):
        if name in train:
            train[f"speedup_over_{name}"] = ours["examples_per_s"] / train[name]["examples_per_s"]
    result["train"] = train
    _apply_peak(result, peaks)
    write_json_atomic(bench.output, result)
    logger.info("evaluation: one-by-one generate vs loraqa")
    result["eval"] = _eval_bench(model, tokenizer, bench.eval_file, model_args.cache_dir, bench.eval_examples,
                                 bench.ablations, bench.ablations and result["machine"]["native_bf16"])
    peaks["after"] = matmul_peak(device)
    _apply_peak(result, peaks)
    write_json_atomic(bench.output, result)
    check_mfu(result)
    return result


def _linear_layers(model) -> list[torch.nn.Module]:
    """Every linear layer (GPT-2's Conv1D included), the LM head among them."""
    from transformers.pytorch_utils import Conv1D

    return [m for m in model.modules() if isinstance(m, (torch.nn.Linear, Conv1D))]


def _in_features(layer) -> int:
    return layer.in_features if isinstance(layer, torch.nn.Linear) else layer.weight.shape[0]  # Conv1D: (in, out)


def _matmul_params(model) -> tuple[int, int]:
    """(body, head): weights of the linear layers outside the LM head (the per-token matmul work of the
    transformer body; embeddings are lookups) and of the LM head."""
    head = model.get_output_embeddings()
    body = sum(m.weight.numel() for m in _linear_layers(model) if m is not head)
    return body, head.weight.numel()


def summary_lines(result: dict) -> list[str]:
    train, evaluation = result.get("train", {}), result.get("eval", {})
    lines = [f"fp32 matmul peak {_peak_text(result['machine'])}"] if "matmul_peak" in result.get("machine", {}) else []
    for name, r in train.items():
        if isinstance(r, dict):
            lines.append(f"train {name:28s} {r['examples_per_s']:6.2f} ex/s {r['tokens_per_s']:8.0f} tok/s "
                         f"loss {r['mean_train_loss']:.4f} peak RSS {r['peak_rss_mb']:.0f} MB")
    if "speedup" in train:
        lines.append(f"train speedup over TRL reference: {train['speedup']:.2f}x")
    if "loraqa_mfu" in train:
        lines.append(f"train achieved {train['loraqa_achieved_gflops']:.1f} GFLOP/s of "
                     f"{result['machine']['matmul_peak_gflops']:.1f} peak (MFU {100 * train['loraqa_mfu']:.0f}%)")
    if evaluation:
        lines.append(f"eval one-by-one {evaluation['one_by_one_questions_per_s']:.2f} q/s, loraqa "
                     f"{evaluation['loraqa_questions_per_s']:.2f} q/s, speedup {evaluation['speedup']:.1f}x, "
                     f"greedy identical {evaluation['greedy_identical_count']}/{evaluation['questions']}")
        if "full_prompt_rows_questions_per_s" in evaluation:
            lines.append(f"eval batched full-prompt rows (no shared contexts) "
                         f"{evaluation['full_prompt_rows_questions_per_s']:.2f} q/s")
        if "bf16" in evaluation:
            b = evaluation["bf16"]
            lines.append(f"eval with bf16 weights: one-by-one {b['one_by_one_questions_per_s']:.2f} q/s, loraqa "
                         f"{b['loraqa_questions_per_s']:.2f} q/s, speedup {b['speedup']:.1f}x "
                         f"({b['speedup_over_fp32_one_by_one']:.1f}x over fp32 one-by-one); greedy identical "
                         f"{b['greedy_identical_count']}/{evaluation['questions']}, same as fp32 "
                         f"{b['identical_to_fp32_count']}/{evaluation['questions']}")
        lines.append(f"eval achieved {evaluation['loraqa_achieved_gflops']:.1f} GFLOP/s (MFU "
                     f"{100 * evaluation['loraqa_mfu']:.0f}%); at the matmul peak loraqa's path would answer "
                     f"{evaluation['loraqa_questions_per_s_at_peak']:.1f} q/s = {evaluation['speedup_at_peak']:.1f}x")
        if "linear_layers_s" in evaluation:
            lines.append(f"eval linear layers alone: {evaluation['linear_layers_s']:.2f} s (prefill at the peak "
                         f"{evaluation['prefill_linear_at_peak_s']:.2f} s, decoding steps timed at their row counts "
                         f"{evaluation['decode_linear_s']:.2f} s) of loraqa's "
                         f"{evaluation['questions'] / evaluation['loraqa_questions_per_s']:.2f} s; with all other work "
                         f"free: {evaluation['speedup_if_only_linear_layers']:.1f}x")
    return lines
