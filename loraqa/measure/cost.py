"""The cost study: what one training step of each study configuration costs, measured side by side.

The sweep's runs time themselves, but they ran in different sessions, on different CPUs, at different thread
counts and sometimes beside other work, so their seconds per step cannot be compared with each other. This
measures every configuration in one command on one machine: LoRA at each rank and target set, and full
fine-tuning, each in a fresh process (so that its peak memory is its own), on the same training batches (the
study's data and batching: held-out articles removed, whole paragraphs, shared-context packing), one warm-up
step and then `steps` timed optimizer steps (forward, backward of the answer loss, gradient clipping, AdamW),
and the size of the checkpoint the run would save. This is repeated `repeats` times, in rounds over every
configuration (a fresh process each time), and each timing is reported as the median of the repetitions'
means per step with their spread. Output: `results/cost_study.json`, drawn by `loraqa plots`.
"""
from __future__ import annotations

import gc
import logging
import resource
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..config import check_setting
from .common import in_child, interleaved, load_at_end, load_average, load_line, machine_info, median_and_spread, \
    repeated

logger = logging.getLogger(__name__)


@dataclass
class CostStudyArguments:
    ranks: str = field(default="4,8,16,32", metadata={"help": "Comma-separated LoRA ranks (alpha = 2r, as the grid)."})
    targets: str = field(default="attention,attention+mlp", metadata={"help": "Comma-separated LoRA target sets."})
    full_finetune: bool = field(default=True, metadata={"help": "Also measure full fine-tuning (every weight)."})
    data: str = field(default="squad", metadata={"help": "SQuAD-format training JSON or 'squad' (v1.1 train)."})
    heldout_articles: int = field(default=20, metadata={"help": "Articles held out, as the study's selection set."})
    questions: int = field(default=2000, metadata={"help": "Training questions the batches are drawn from."})
    batch_size: int = field(default=8, metadata={"help": "Questions per batch (the study's batch)."})
    max_length: int = field(default=512, metadata={"help": "Row length limit."})
    steps: int = field(default=6, metadata={"help": "Timed optimizer steps per configuration and repetition (after "
                       "one warm-up), the same batches for every configuration: a repetition's value is their mean."})
    repeats: int = field(default=5, metadata={"help": (
        "Repetitions of each configuration's steps, each in a fresh process, in rounds over every configuration "
        "(alternately forwards and backwards) so a disturbed moment does not land on one configuration only; the "
        "median over the repetitions is compared, with its spread (min, max).")})
    seed: int = field(default=0, metadata={"help": "Seed of the questions, their batching and the LoRA weights."})
    torch_threads: int = field(default=0, metadata={"help": "torch threads (0: torch's default for this machine)."})
    note: str = field(default="", metadata={"help": "Free text recorded with the machine (e.g. what ran beside it)."})
    output: str = field(default="results/cost_study.json", metadata={"help": "Where to write the results."})

    def __post_init__(self):
        check_setting(all(r.strip().isdigit() and int(r) >= 1 for r in self.ranks.split(",") if r.strip()), "ranks",
               self.ranks, "must be comma-separated integers >= 1")
        check_setting(self.steps >= 1, "steps", self.steps, "must be >= 1")
        check_setting(self.repeats >= 1, "repeats", self.repeats, "must be >= 1")
        check_setting(self.batch_size >= 1, "batch_size", self.batch_size, "must be >= 1")

    def configurations(self) -> list[dict]:
        """Every configuration to measure: LoRA target set x rank, then full fine-tuning."""
        ranks = [int(r) for r in self.ranks.split(",") if r.strip()]
        targets = [t.strip() for t in self.targets.split(",") if t.strip()]
        configs = [{"method": "lora", "target_modules": t, "lora_r": r, "lora_alpha": 2 * r}
                   for t in targets for r in ranks]
        return configs + ([{"method": "full_finetune"}] if self.full_finetune else [])


def measure(job: dict) -> dict:
    """One repetition of one configuration, in its own process: load, attach LoRA (or not), time the steps, and
    (where `job["checkpoint"]`) save the weights to measure the checkpoint."""
    from ..config import LoraArguments
    from ..generation.decode import supports_shared_prefix
    from ..model.lora import attach_lora, count_parameters
    from ..model.loading import load_model_and_tokenizer
    from .common import features, proc_status_mb
    from .padding import collate
    from ..model.attention import PARAGRAPH_ATTENTION, register_paragraph_attention
    from ..training.loss import answer_loss

    config, rows, batches = job["config"], job["rows"], job["batches"]
    if job["torch_threads"]:
        torch.set_num_threads(job["torch_threads"])
    torch.manual_seed(job["seed"])
    model, tokenizer, _ = load_model_and_tokenizer(job["model"], job["cache_dir"])
    if config["method"] == "lora":
        model = attach_lora(model, LoraArguments(lora_r=config["lora_r"], lora_alpha=config["lora_alpha"],
                                                 target_modules=config["target_modules"]))
    if supports_shared_prefix(model):  # per-paragraph attention on packed rows, as training runs it
        register_paragraph_attention()
        model.set_attn_implementation(PARAGRAPH_ATTENTION)
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-4)  # the Trainer's default optimizer
    gc.collect()
    rss_loaded = proc_status_mb("VmRSS")
    wall, cpu, update, tokens = [], [], [], []
    for i, indices in enumerate(batches):
        batch = collate(features(rows, indices), "shared_context", tokenizer, job["max_length"])
        started, cpu_started = time.perf_counter(), time.process_time()
        optimizer.zero_grad(set_to_none=True)
        answer_loss(model, batch).backward()
        cpu_update = time.process_time()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        optimizer.step()
        if i:  # the first step is the warm-up: one-time costs, and AdamW allocates its state there
            wall.append(time.perf_counter() - started)
            cpu.append(time.process_time() - cpu_started)
            update.append(time.process_time() - cpu_update)
            tokens.append(int(batch["input_ids"].numel()))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    checkpoint = None
    if job["checkpoint"]:
        with tempfile.TemporaryDirectory() as folder:
            model.save_pretrained(folder)  # the adapter for LoRA, the whole model for full fine-tuning
            checkpoint = sum(p.stat().st_size for p in Path(folder).glob("*.safetensors"))
    counts = count_parameters(model)
    return {"trainable_params": counts["trainable_params"], "total_params": counts["total_params"],
            "step_seconds": wall, "step_cpu_seconds": cpu, "update_cpu_seconds": update, "tokens_per_step": tokens,
            "rss_after_load_mb": rss_loaded, "peak_rss_mb": peak, "checkpoint_bytes": checkpoint}


TIMINGS = ("step_seconds", "step_cpu_seconds", "update_cpu_seconds")


def combine(config: dict, repetitions: list[dict]) -> dict:
    """A configuration's record from its repetitions (`measure`'s results, the first one with the checkpoint).

    For each timing: every step of every repetition ([repetition][step]); `_mean`, the mean over all of them
    (as before repetitions existed); `_repetitions`, each repetition's mean per step; and the `_median` and
    `_spread` ([min, max]) of those. Memory: the repetition with the highest peak (rss_after_load_mb,
    peak_rss_mb and peak_over_load_mb from that one process), with every repetition's peak beside it."""
    first, highest = repetitions[0], max(repetitions, key=lambda r: r["peak_rss_mb"])
    record = {**config, "repeats": len(repetitions), "trainable_params": first["trainable_params"],
              "total_params": first["total_params"], "tokens_per_step": first["tokens_per_step"]}
    for key in TIMINGS:
        record[key] = [r[key] for r in repetitions]
        record[f"{key}_mean"] = statistics.fmean(t for r in repetitions for t in r[key])
        record.update(repeated(key, [statistics.fmean(r[key]) for r in repetitions]))
    return {**record, "rss_after_load_mb": highest["rss_after_load_mb"], "peak_rss_mb": highest["peak_rss_mb"],
            "peak_over_load_mb": highest["peak_rss_mb"] - highest["rss_after_load_mb"],
            **repeated("peak_rss_mb", [r["peak_rss_mb"] for r in repetitions]),
            "checkpoint_bytes": first["checkpoint_bytes"]}


def study_batches(model_args, args: CostStudyArguments) -> tuple[dict[str, list], list[list[int]], dict]:
    """The study's training rows and the first `steps + 1` batches of its shared-context batching."""
    from ..data.assets import squad_file
    from ..data.squad import build_train_dataset, heldout_split, load_squad, take_subset
    from ..model.loading import load_tokenizer, resolve_model
    from .padding import batch_orders

    source = squad_file(args.data, "train", model_args.cache_dir)
    raw = load_squad(source, "train")
    if args.heldout_articles:
        raw = heldout_split(raw, args.heldout_articles, args.seed)[0]
    raw = take_subset(raw, args.questions, args.seed)
    tokenizer = load_tokenizer(resolve_model(model_args.model, model_args.cache_dir))
    dataset, skipped = build_train_dataset(raw, tokenizer, max_length=args.max_length, desc="tokenizing")
    rows = dataset.select_columns(["input_ids", "labels", "context_length", "context_key"]).to_dict()
    batches = batch_orders(rows, args.batch_size, "shared_context", args.seed)[:args.steps + 1]
    used = sorted({i for b in batches for i in b})  # only these rows travel to the measuring processes
    position = {i: k for k, i in enumerate(used)}
    rows = {k: [v[i] for i in used] for k, v in rows.items()}
    return rows, [[position[i] for i in b] for b in batches], {"data": source, "preprocessing": skipped}


def run_cost_study(model_args, args: CostStudyArguments) -> dict:
    """Measure every configuration `repeats` times (each time in a fresh process, in interleaved rounds) and write
    `args.output` atomically."""
    from ..files import run_metadata, write_json_atomic
    from ..config import to_dict
    from ..model.loading import resolve_model

    started = time.perf_counter()
    machine = machine_info(args.torch_threads or torch.get_num_threads(), args.note)  # the load before our own work
    resolved = resolve_model(model_args.model, model_args.cache_dir)
    rows, batches, data = study_batches(model_args, args)
    job = {"model": model_args.model, "cache_dir": model_args.cache_dir, "rows": rows, "batches": batches,
           "max_length": args.max_length, "seed": args.seed, "torch_threads": args.torch_threads}
    configs = args.configurations()
    runs, loads = [[None] * args.repeats for _ in configs], []
    for repetition, unit in interleaved(len(configs), args.repeats):
        if len(loads) == repetition:  # a round starts
            loads.append(load_average())
        runs[unit][repetition] = in_child(measure, {**job, "config": configs[unit], "checkpoint": repetition == 0})
        logger.info("%s, repetition %d: %.2f CPU s/step", label(configs[unit]), repetition + 1,
                    statistics.fmean(runs[unit][repetition]["step_cpu_seconds"]))
    measured = [combine(config, repetitions) for config, repetitions in zip(configs, runs)]
    machine.update(load_at_end(machine))
    metadata = run_metadata()
    result = {"configs": measured, "model": model_args.model, "model_resolved": resolved, **data,
              "settings": to_dict(args), "batches": [len(b) for b in batches],
              "step": "zero_grad, forward and backward of the answer-only loss (train.answer_loss, shared-context "
                      "packing with per-paragraph attention), gradient clipping at 1.0, AdamW step (update_cpu_seconds: "
                      "the clipping and the AdamW step alone); the first of the batches is a warm-up, not timed",
              "memory": "peak_rss_mb: the measuring process's peak resident set size (ru_maxrss), loading "
                        "included; peak_over_load_mb: that peak minus the resident set size after loading the "
                        "model and attaching LoRA; of the repetition with the highest peak",
              "repetitions": f"each configuration's steps are timed {args.repeats} times, each in a fresh process, in "
                             "rounds over every configuration (alternately forwards and backwards); a repetition's "
                             "value is its mean per step; _median and _spread ([min, max]) are over the repetitions, "
                             "_mean over every step of every repetition",
              "load_average_by_round": loads,
              "wall_seconds": time.perf_counter() - started,
              **{k: v for k, v in metadata.items() if k != "machine"}, "machine": {**metadata["machine"], **machine}}
    write_json_atomic(args.output, result)
    return result


def label(config: dict) -> str:
    if config["method"] == "full_finetune":
        return "full fine-tuning"
    return f"LoRA {config['target_modules']} r={config['lora_r']}"


def summary_lines(result: dict) -> list[str]:
    """A row per configuration: CPU seconds per step as median [min-max] over the repetitions, peak memory,
    checkpoint; full fine-tuning against LoRA r = 16 (ratio of the medians, and of the extremes); the load."""
    lines = [f"{'configuration':<28} {'trainable':>12} {'CPU s/step [min-max]':>20} {'peak MiB':>9} "
             f"{'checkpoint MiB':>14}"]
    for c in result["configs"]:
        lines.append(f"{label(c):<28} {c['trainable_params']:>12,} {median_and_spread(c, 'step_cpu_seconds'):>20} "
                     f"{c['peak_rss_mb']:>9.0f} {c['checkpoint_bytes'] / 2**20:>14.1f}")
    full = next((c for c in result["configs"] if c["method"] == "full_finetune"), None)
    lora = next((c for c in result["configs"] if c["method"] == "lora" and c["lora_r"] == 16), None)
    if full and lora:
        (full_low, full_high), (lora_low, lora_high) = full["step_cpu_seconds_spread"], lora["step_cpu_seconds_spread"]
        lines.append(f"full fine-tuning / {label(lora)}: "
                     f"{full['step_cpu_seconds_median'] / lora['step_cpu_seconds_median']:.2f}x CPU time per step "
                     f"[{full_low / lora_high:.2f}-{full_high / lora_low:.2f}], "
                     f"{full['peak_rss_mb'] / lora['peak_rss_mb']:.2f}x peak memory, "
                     f"{full['checkpoint_bytes'] / lora['checkpoint_bytes']:.0f}x checkpoint")
    return lines + [load_line(result.get("machine") or {}, result.get("settings", {}).get("repeats"))]
