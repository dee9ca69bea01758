"""The padding study (Task 2's analysis questions): how much of a training batch is padding, and what it costs.

Input: SQuAD training rows (`data.squad.build_train_dataset`), one pool of questions shared by every strategy.
Output (`results/padding_study.json`): for each batching strategy and batch size, the padded share of the
tokens run through the model and the tokens computed per question over every batch of the pool, and, on a
few representative batches, the time and peak memory of one forward+backward step of a LoRA model, repeated
`repeats` times in rounds interleaved across the cells (each repetition's value, their median and spread).

Strategies (`STRATEGIES`), all batching the same questions:
- static: every row padded to `max_length` (what `padding="max_length"` in a tokenizer call gives);
- dynamic: rows padded to the longest in the batch (`collator.QADataCollator`), questions in random order;
- length_grouped: transformers' `group_by_length` order (random mega-batches of 50 batches, sorted by length),
  then dynamic padding, so neighbours in a batch have similar lengths;
- shared_context: a paragraph's questions batched together (`collator.ContextGroupedSampler`) and packed
  into one row holding each context once (`collator.SharedContextCollator`): no padding, and fewer tokens
  than the questions' own rows hold.
"""
from __future__ import annotations

import ctypes
import gc
import logging
import platform
import resource
import statistics
import time
from dataclasses import dataclass, field

import torch
from transformers.trainer_pt_utils import get_length_grouped_indices

from ..config import check_setting
from ..data.collate import ContextGroupedSampler, QADataCollator, SharedContextCollator
from .common import features, interleaved, load_at_end, load_average, load_line, machine_info, \
    median_and_spread, proc_status_mb, repeated

logger = logging.getLogger(__name__)

STRATEGIES = ("static", "dynamic", "length_grouped", "shared_context")


@dataclass
class PaddingStudyArguments:
    data: str = field(default="squad", metadata={"help": "SQuAD-format training JSON or 'squad' (v1.1 train)."})
    questions: int = field(default=4096, metadata={"help": "Training questions in the pool (whole paragraphs)."})
    batch_sizes: str = field(default="1,2,4,8,16,32", metadata={"help": "Comma-separated questions per batch."})
    max_length: int = field(default=512, metadata={"help": "Row length limit, and the static padding length."})
    timed_tokens: int = field(default=1024, metadata={"help": (
        "Time as many representative batches per strategy and batch size as fit in this many computed tokens "
        "(at least 1, at most `max_timed_batches`): a fixed token budget keeps the slowest cells affordable.")})
    max_timed_batches: int = field(default=3, metadata={"help": "Most timed batches per strategy and batch size."})
    repeats: int = field(default=5, metadata={"help": (
        "Times each cell's representative batches are timed, in rounds over every cell (alternately forwards and "
        "backwards) so a disturbed moment does not land on one cell only; the median over the repetitions is "
        "reported with its spread (min, max).")})
    max_step_tokens: int = field(default=4096, metadata={"help": (
        "Skip timing a cell whose representative batch computes more tokens than this (CPU step time and memory "
        "grow with it: 4096 tokens took ~9 GB over the model on SmolLM2-135M); its token counts are still exact.")})
    lora_r: int = field(default=16, metadata={"help": "LoRA rank of the timed model."})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA alpha of the timed model."})
    target_modules: str = field(default="attention", metadata={"help": "LoRA targets of the timed model."})
    seed: int = field(default=0, metadata={"help": "Seed of the question pool, the orders and the LoRA weights."})
    torch_threads: int = field(default=1, metadata={"help": "torch threads for the timed steps."})
    note: str = field(default="", metadata={"help": "Free text recorded with the machine (e.g. what ran beside it)."})
    output: str = field(default="results/padding_study.json", metadata={"help": "Where to write the results."})

    def __post_init__(self):
        sizes = [s for s in self.batch_sizes.split(",") if s.strip()]
        check_setting(bool(sizes) and all(s.strip().isdigit() and int(s) >= 1 for s in sizes), "batch_sizes",
               self.batch_sizes, "must be comma-separated integers >= 1")
        check_setting(self.questions >= 1, "questions", self.questions, "must be >= 1")
        check_setting(self.max_timed_batches >= 0, "max_timed_batches", self.max_timed_batches, "must be >= 0")
        check_setting(self.repeats >= 1, "repeats", self.repeats, "must be >= 1")

    @property
    def batch_size_list(self) -> list[int]:
        return [int(s) for s in self.batch_sizes.split(",") if s.strip()]


# ---------------------------------------------------------------------------------------------- batches

def batch_orders(rows: dict[str, list], batch_size: int, strategy: str, seed: int = 0) -> list[list[int]]:
    """Row indices of each batch of one epoch over `rows` under `strategy`; every strategy covers every row once.

    static and dynamic share one random order (they differ only in padding); length_grouped is
    transformers' `get_length_grouped_indices`; shared_context follows `ContextGroupedSampler`.
    """
    n = len(rows["input_ids"])
    if strategy in ("static", "dynamic"):
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    elif strategy == "length_grouped":
        lengths = [len(ids) for ids in rows["input_ids"]]
        order = get_length_grouped_indices(lengths, batch_size, generator=torch.Generator().manual_seed(seed))
    elif strategy == "shared_context":
        order = list(ContextGroupedSampler(rows["context_key"], seed=seed))
    else:
        raise ValueError(f"strategy {strategy!r}: must be one of {', '.join(STRATEGIES)}")
    return [order[i:i + batch_size] for i in range(0, n, batch_size)]


def collate(features: list[dict], strategy: str, tokenizer, max_length: int) -> dict[str, torch.Tensor]:
    """The batch the model would get: the project's own collators, static padding as a multiple of max_length."""
    if strategy == "shared_context":
        return SharedContextCollator()(features)
    return QADataCollator(tokenizer, pad_to_multiple_of=max_length if strategy == "static" else None)(features)


def count_tokens(batch: dict[str, torch.Tensor]) -> dict[str, int]:
    """Positions run through the model and how many of them are padding.

    >>> count_tokens(QADataCollator(tok)([{"input_ids": [5, 6, 7], "labels": [...]}, {"input_ids": [5], ...}]))
    {'computed': 6, 'padding': 2}      # padded share = 2 / 6 = 1 - real / computed
    A packed row (4D block mask) has no padding: every position is a real token.
    """
    computed = batch["input_ids"].numel()
    mask = batch["attention_mask"]
    real = int(mask.sum()) if mask.dim() == 2 else computed
    return {"computed": computed, "padding": computed - real}





def token_accounting(rows: dict[str, list], tokenizer, *, batch_sizes: list[int], max_length: int,
                     seed: int = 0) -> list[dict]:
    """Token counts of every batch of one epoch over `rows`, per strategy and batch size.

    Each cell: questions (always all of them), question_tokens (the questions' own unpadded rows, the same
    for every strategy), computed and padding tokens, padded_share = padding / computed, tokens per question,
    and `batches`: each batch's indices and computed tokens (for picking batches to time; not written out).
    """
    question_tokens = sum(len(ids) for ids in rows["input_ids"])
    cells = []
    for strategy in STRATEGIES:
        for batch_size in batch_sizes:
            batches, computed, padding = [], 0, 0
            for indices in batch_orders(rows, batch_size, strategy, seed):
                counts = count_tokens(collate(features(rows, indices), strategy, tokenizer, max_length))
                batches.append({"indices": indices, "computed": counts["computed"]})
                computed += counts["computed"]
                padding += counts["padding"]
            questions = sum(len(b["indices"]) for b in batches)
            cells.append({"strategy": strategy, "batch_size": batch_size, "batches": batches, "questions": questions,
                          "question_tokens": question_tokens, "computed_tokens": computed, "padding_tokens": padding,
                          "padded_share": padding / computed, "tokens_per_question": computed / questions,
                          "computed_over_question_tokens": computed / question_tokens})
    return cells


def representative_batches(cell: dict, token_budget: int, max_batches: int) -> list[dict]:
    """Full batches whose computed tokens are nearest the cell's median: as many as fit in `token_budget`
    (at least one, at most `max_batches`). The median batch, not the first: length grouping puts the
    longest batch first on purpose, and a paragraph-grouped order starts wherever the shuffle put it."""
    full = [b for b in cell["batches"] if len(b["indices"]) == cell["batch_size"]] or cell["batches"]
    median = statistics.median(b["computed"] for b in full)
    ranked = sorted(full, key=lambda b: (abs(b["computed"] - median), b["indices"]))
    chosen, spent = [], 0
    for b in ranked[:max_batches]:
        if chosen and spent + b["computed"] > token_budget:
            break
        chosen.append(b)
        spent += b["computed"]
    return chosen


# ---------------------------------------------------------------------------------------------- timing

_libc = ctypes.CDLL("libc.so.6") if platform.system() == "Linux" else None





def _reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark (VmHWM) to the current RSS; False where Linux does not allow it."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


MEMORY_METHOD = ("peak resident set size during the step minus the resident set size just before it: the heap is "
                 "trimmed (glibc malloc_trim) so freed memory is not reused unseen, then the kernel's peak mark is "
                 "reset (/proc/self/clear_refs = 5) and read back as VmHWM after the step")


def step_cost(model, batch: dict[str, torch.Tensor]) -> dict[str, float | None]:
    """Wall seconds, CPU seconds and peak memory increase (MiB) of one forward+backward of the answer loss, no
    optimizer step.

    CPU seconds (the process's user+system time; None on CUDA) measure the work even when other jobs share the
    core: wall time then also counts the time the step waited for it. On CUDA the memory is torch's peak
    allocated memory over the step; on the CPU see `MEMORY_METHOD` (None when /proc/self/clear_refs cannot be
    written).
    """
    from ..training.loss import answer_loss

    cuda = next(model.parameters()).is_cuda
    model.zero_grad(set_to_none=True)
    gc.collect()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    else:
        if _libc is not None:
            _libc.malloc_trim(0)
        resettable = _reset_peak_rss()
        before = proc_status_mb("VmRSS")
    started, cpu_started = time.perf_counter(), time.process_time()
    answer_loss(model, batch).backward()
    if cuda:
        torch.cuda.synchronize()
    seconds, cpu_seconds = time.perf_counter() - started, time.process_time() - cpu_started
    if cuda:
        peak = (torch.cuda.max_memory_allocated() - before) / 2**20
    else:
        after = proc_status_mb("VmHWM")
        peak = after - before if resettable and after is not None and before is not None else None
    model.zero_grad(set_to_none=True)
    return {"seconds": seconds, "cpu_seconds": None if cuda else cpu_seconds, "peak_memory_mb": peak}


def time_cells(model, tokenizer, rows: dict[str, list], cells: list[dict], *, max_length: int, timed_tokens: int,
               max_timed_batches: int, max_step_tokens: int, repeats: int = 1) -> list[list[float] | None]:
    """Add `timing` (or `timing_skipped`, with the reason) to each cell, in place: step time and peak memory of
    its representative batches, timed `repeats` times in rounds over every timed cell (`common.interleaved`, the
    smallest cells first in the first round). Returns the load averages at the start of each round."""
    device = next(model.parameters()).device
    warm = collate(features(rows, cells[0]["batches"][0]["indices"]), cells[0]["strategy"], tokenizer, max_length)
    step_cost(model, {k: v.to(device) for k, v in warm.items()})  # one-time costs (kernels, allocator) go here
    timed = []  # (cell, its representative batches, those batches collated), collated once for every round
    for cell in sorted(cells, key=lambda c: c["computed_tokens"] / len(c["batches"])):
        chosen = representative_batches(cell, timed_tokens, max_timed_batches)
        if not chosen:
            cell["timing_skipped"] = "max_timed_batches is 0"
        elif chosen[0]["computed"] > max_step_tokens:
            cell["timing_skipped"] = (f"a representative batch computes {chosen[0]['computed']} tokens, over "
                                      f"max_step_tokens={max_step_tokens}")
        else:
            collated = [collate(features(rows, b["indices"]), cell["strategy"], tokenizer, max_length) for b in chosen]
            timed.append((cell, chosen, [{k: v.to(device) for k, v in batch.items()} for batch in collated]))
    costs = [[None] * repeats for _ in timed]  # [cell][repetition] -> one step_cost per representative batch
    loads = []
    for repetition, unit in interleaved(len(timed), repeats):
        if len(loads) == repetition:  # a round starts
            loads.append(load_average())
        costs[unit][repetition] = [step_cost(model, batch) for batch in timed[unit][2]]
    for (cell, chosen, _), cell_costs in zip(timed, costs):
        cell["timing"] = timing_record(cell_costs, [b["computed"] for b in chosen])
        timing = cell["timing"]
        logger.info("%s batch %d: %s CPU s/step, %s wall s/step over %d repetitions, %s MiB, %d tokens",
                    cell["strategy"], cell["batch_size"], median_and_spread(timing, "step_cpu_seconds"),
                    median_and_spread(timing, "step_seconds"), repeats,
                    f"{timing['peak_memory_mb_max']:.0f}" if timing["peak_memory_mb_max"] is not None else "?",
                    timing["computed_tokens"][0])
    return loads


def timing_record(costs: list[list[dict]], tokens: list[int]) -> dict:
    """A cell's timing from its repetitions (`costs[repetition][batch]`, each a `step_cost`) of the same batches.

    A repetition's value is the median over the cell's batches (its step time); `step_seconds_median` and
    `step_cpu_seconds_median` are the median of those over the repetitions, with `_spread` [min, max] and
    `_repetitions` beside them; `step_seconds` and `step_cpu_seconds` hold every step, [repetition][batch].
    tokens_per_s: the median over repetitions of the batches' tokens over their CPU seconds (wall on CUDA)."""
    seconds, cpu, memory = ([[c[k] for c in rep] for rep in costs]
                            for k in ("seconds", "cpu_seconds", "peak_memory_mb"))
    on_cpu = all(None not in rep for rep in cpu)
    memory_known = all(None not in rep for rep in memory)
    return {"batches": len(tokens), "computed_tokens": tokens, "repeats": len(costs),
            "step_seconds": seconds, **repeated("step_seconds", [statistics.median(rep) for rep in seconds]),
            "step_cpu_seconds": cpu if on_cpu else None,
            **repeated("step_cpu_seconds", [statistics.median(rep) if on_cpu else None for rep in cpu]),
            **repeated("tokens_per_s", [sum(tokens) / sum(c if on_cpu else s)
                                         for c, s in zip(cpu, seconds)]),
            "peak_memory_mb": memory,
            "peak_memory_mb_max": max(max(rep) for rep in memory) if memory_known else None}


# ---------------------------------------------------------------------------------------------- the study




def padding_study(model, tokenizer, rows: dict[str, list], args: PaddingStudyArguments) -> dict:
    """Token accounting over the whole pool, then timing on representative batches; the results document."""
    started = time.perf_counter()
    cells = token_accounting(rows, tokenizer, batch_sizes=args.batch_size_list, max_length=args.max_length,
                             seed=args.seed)
    counted = time.perf_counter()
    loads = []
    if args.max_timed_batches:
        loads = time_cells(model, tokenizer, rows, cells, max_length=args.max_length, timed_tokens=args.timed_tokens,
                           max_timed_batches=args.max_timed_batches, max_step_tokens=args.max_step_tokens,
                           repeats=args.repeats)
    for cell in cells:
        del cell["batches"]
    return {"strategies": list(STRATEGIES), "batch_sizes": args.batch_size_list, "cells": cells,
            "pool": {"questions": len(rows["input_ids"]), "paragraphs": len(set(rows["context_key"])),
                     "question_tokens": sum(len(ids) for ids in rows["input_ids"])},
            "step": "forward + backward of the answer-only loss (train.answer_loss), model in training mode, no "
                    "optimizer step; shared_context runs attention per paragraph as training does",
            "step_time": "step_cpu_seconds: the process's CPU time over the step (the work, whatever else shares the "
                         "core; None on CUDA); step_seconds: wall time; tokens_per_s_* use CPU time where there is one",
            "repetitions": f"each timed cell's representative batches are timed {args.repeats} times, in rounds over "
                           "every timed cell (alternately forwards and backwards); a repetition's value is the median "
                           "over its batches; _median and _spread ([min, max]) are over the repetitions",
            "load_average_by_round": loads,
            "memory_method": MEMORY_METHOD if not torch.cuda.is_available() else "torch.cuda.max_memory_allocated "
                             "over the step minus memory allocated before it",
            "counting_seconds": counted - started, "timing_seconds": time.perf_counter() - counted}


def _lora_arguments(args: PaddingStudyArguments):
    from ..config import LoraArguments

    return LoraArguments(lora_r=args.lora_r, lora_alpha=args.lora_alpha, target_modules=args.target_modules)


def lora_model(model, args: PaddingStudyArguments):
    """The timed model as training builds it: LoRA attached (seeded), training mode (dropout on), and attention
    run per paragraph on shared-context rows, as `training.run.setup` does for shared-context packing."""
    from ..generation.decode import supports_shared_prefix
    from ..model.lora import attach_lora
    from ..model.attention import PARAGRAPH_ATTENTION, register_paragraph_attention

    torch.manual_seed(args.seed)
    model = attach_lora(model, _lora_arguments(args)).train()
    if supports_shared_prefix(model):
        register_paragraph_attention()
        model.set_attn_implementation(PARAGRAPH_ATTENTION)
    return model


def run_padding_study(model_args, args: PaddingStudyArguments) -> dict:
    """Load SQuAD train and the model with LoRA, run `padding_study`, write `args.output`."""
    from ..data.assets import squad_file
    from ..files import run_metadata, write_json_atomic
    from ..config import to_dict
    from ..data.squad import build_train_dataset, load_squad, take_subset
    from ..model.loading import load_model_and_tokenizer

    started = time.perf_counter()
    torch.set_num_threads(args.torch_threads)
    machine = machine_info(torch.get_num_threads(), args.note)
    model, tokenizer, resolved = load_model_and_tokenizer(model_args.model, model_args.cache_dir)
    model = lora_model(model, args)
    if torch.cuda.is_available():
        model.cuda()
    source = squad_file(args.data, "train", model_args.cache_dir)
    raw = take_subset(load_squad(source, "train"), args.questions, args.seed)
    dataset, skipped = build_train_dataset(raw, tokenizer, max_length=args.max_length, desc="tokenizing pool")
    # plain lists: indexing a Dataset column row by row costs ~10x what the collators do
    rows = dataset.select_columns(["input_ids", "labels", "context_length", "context_key"]).to_dict()
    result = padding_study(model, tokenizer, rows, args)
    machine.update(load_at_end(machine))
    metadata = run_metadata()
    result.update(model=model_args.model, model_resolved=resolved, data=source, preprocessing=skipped,
                  settings=to_dict(args), lora=to_dict(_lora_arguments(args)),
                  wall_seconds=time.perf_counter() - started,
                  peak_rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  **{k: v for k, v in metadata.items() if k != "machine"},
                  machine={**metadata["machine"], **machine})
    write_json_atomic(args.output, result)
    return result


def summary_lines(result: dict) -> list[str]:
    """A table per batch size: padded share, tokens per question, step time (median [min-max] over the
    repetitions), peak memory of each strategy; then the load, and whether the CPU was idle."""
    lines = [f"{'strategy':15s} {'batch':>5s} {'padded':>7s} {'tok/q':>6s} {'s/step [min-max]':>19s} {'MiB':>7s}"
             f"   (s/step: CPU seconds on a CPU, wall seconds on CUDA)"]
    for cell in sorted(result["cells"], key=lambda c: (c["batch_size"], STRATEGIES.index(c["strategy"]))):
        timing = cell.get("timing") or {}
        seconds = median_and_spread(timing, "step_cpu_seconds" if timing.get("step_cpu_seconds_median") is not None
                                    else "step_seconds")
        memory = timing.get("peak_memory_mb_max")
        memory = f"{memory:7.0f}" if memory is not None else f"{'-':>7s}"
        lines.append(f"{cell['strategy']:15s} {cell['batch_size']:5d} {cell['padded_share']:7.1%} "
                     f"{cell['tokens_per_question']:6.0f} {seconds:>19s} {memory}")
    return lines + [load_line(result.get("machine") or {}, result.get("settings", {}).get("repeats"))]

