"""Decoding speed: the questions/s of every strategy of the decoding grid against greedy, measured side by side.

The strategy grid (`loraqa evaluate --strategy_grid`) decodes greedy and every sampled run together from one
prefill per batch, so the questions/s it records is the whole pass's and says nothing about one strategy. This
decodes each strategy alone (one seed), on the same questions with the same model in one process, after one
untimed warm-up pass, in interleaved rounds (`common.interleaved`) so that a disturbed moment does not land on
one strategy only. Each strategy's questions/s is the median of its repetitions with their spread, and its speed
relative to greedy the median of the per-round ratios (greedy timed in the same round) with their spread.
Output: `results/decoding_speed.json`, read by the report's decoding table. Its flags parse without torch
(imported when it runs), so `loraqa decoding-speed --help` answers at once.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

from ..config import GenerationSettings, ModelArguments, check_setting, to_dict


@dataclass
class DecodingSpeedArguments:
    data: str = field(default="squad", metadata={"help": "SQuAD-format JSON, or 'squad' (fetched v1.1 dev)."})
    adapter: str | None = field(default=None, metadata={"help": "Run directory of a trained adapter (or full model)."})
    questions: int = field(default=100, metadata={"help": "Questions decoded by every strategy (seeded paragraph "
                                                          "subset, as `loraqa evaluate --max_samples`)."})
    repeats: int = field(default=3, metadata={"help": "Timed passes of every strategy, in interleaved rounds."})
    subset_seed: int = field(default=0, metadata={"help": "Seed of the subset rule (see data.take_subset)."})
    merge_adapter: bool = field(default=True, metadata={"help": "Merge LoRA into the weights for inference."})
    torch_threads: int = field(default=0, metadata={"help": "torch threads (0: torch's default for this machine)."})
    note: str = field(default="", metadata={"help": "Free text recorded with the machine (e.g. what ran beside it)."})
    output: str = field(default="results/decoding_speed.json", metadata={"help": "Where to write the results."})

    def __post_init__(self):
        check_setting(self.questions >= 1, "questions", self.questions, "must be >= 1")
        check_setting(self.repeats >= 1, "repeats", self.repeats, "must be >= 1")


def run_decoding_speed(model_args: ModelArguments, args: DecodingSpeedArguments,
                       settings: GenerationSettings | None = None) -> dict:
    """Time every grid strategy alone on the same questions; write `args.output` atomically and return it."""
    import torch

    from ..files import run_metadata, write_json_atomic
    from ..data.assets import squad_file
    from ..data.squad import load_squad, take_subset
    from ..evaluation.evaluate import adapter_run, grid_strategies, load_model_for_eval, training_max_length
    from ..generation.decode import generate_answers
    from .common import interleaved, load_at_end, machine_info, repeated

    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    machine = machine_info(torch.get_num_threads(), args.note)
    started = time.perf_counter()
    data_path = squad_file(args.data, "validation", model_args.cache_dir)
    records = list(take_subset(load_squad(data_path, "validation"), args.questions, args.subset_seed))
    model, tokenizer, resolved = load_model_for_eval(model_args, args.adapter, args.merge_adapter)
    max_length = training_max_length(args.adapter)
    strategies = grid_strategies(settings or GenerationSettings())

    def decode(strategy: GenerationSettings) -> float:
        began = time.perf_counter()
        generate_answers(model, tokenizer, records, settings=strategy, max_length=max_length)
        return time.perf_counter() - began

    decode(strategies[0])  # warm-up: one-time costs (allocations, kernels) land on no strategy
    seconds = [[0.0] * args.repeats for _ in strategies]
    for repetition, unit in interleaved(len(strategies), args.repeats):
        seconds[unit][repetition] = decode(strategies[unit])
    rates = [[len(records) / s for s in row] for row in seconds]
    rows = [{"strategy": strategy.name, "generation": to_dict(strategy),
             **repeated("questions_per_s", rates[u]),
             **repeated("vs_greedy", [rate / greedy for rate, greedy in zip(rates[u], rates[0])])}
            for u, strategy in enumerate(strategies)]
    result = {**run_metadata(), "model": model_args.model, "model_resolved": resolved, "adapter": args.adapter,
              "adapter_run": adapter_run(args.adapter),
              "data": data_path, "n": len(records), "repeats": args.repeats, "max_length": max_length,
              "measure": "each strategy decoded alone (one seed), one untimed warm-up pass, interleaved rounds; "
                         "vs_greedy: the per-round ratio to greedy's questions/s",
              "machine": {**machine, **load_at_end(machine)}, "strategies": rows,
              "wall_seconds": time.perf_counter() - started}
    write_json_atomic(args.output, result)
    return result


def summary_lines(result: dict) -> list[str]:
    """A Markdown table (a row per strategy: questions/s and speed against greedy, median [min-max]), then the
    load around the timings."""
    from .common import load_line, median_and_spread

    lines = ["| strategy | questions/s | x greedy |", "|---|---|---|"]
    lines += [f"| {row['strategy']} | {median_and_spread(row, 'questions_per_s')} | "
              f"{median_and_spread(row, 'vs_greedy')} |" for row in result["strategies"]]
    return lines + [f"{result['n']} questions, " + load_line(result["machine"], result["repeats"])]
