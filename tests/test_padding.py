"""Padding study: exact token accounting, the same questions under every strategy, timing on a tiny model."""
from __future__ import annotations

import json
import statistics

import pytest
import torch

from conftest import tiny_llama
from loraqa.measure import common, padding
from loraqa.cli import main
from loraqa.data.collate import QADataCollator
from loraqa.data.squad import IGNORE_INDEX, build_train_dataset, load_squad
from loraqa.measure.padding import STRATEGIES, PaddingStudyArguments

MAX_LENGTH = 8


def _row(context: list[int], block: list[int], key: str) -> dict:
    return {"input_ids": context + block, "labels": [IGNORE_INDEX] * (len(context) + len(block) - 1) + block[-1:],
            "context_length": len(context), "context_key": key}


# two questions on context A (3 tokens), one on context B (2 tokens)
HAND = [_row([1, 2, 3], [10, 11, 12], "A"), _row([1, 2, 3], [20], "A"), _row([7, 8], [30, 31], "B")]


def _columns(rows: list[dict]) -> dict[str, list]:
    return {k: [r[k] for r in rows] for k in rows[0]}


def _squad_rows(squad_file, tokenizer) -> dict[str, list]:
    dataset, _ = build_train_dataset(load_squad(str(squad_file)), tokenizer, max_length=512)
    return dataset.select_columns(["input_ids", "labels", "context_length", "context_key"]).to_dict()


def test_count_tokens_of_a_hand_checked_batch(gpt2_tokenizer):
    lengths = [len(r["input_ids"]) for r in HAND]  # 6, 4, 4: 14 real tokens
    static = padding.count_tokens(padding.collate(HAND, "static", gpt2_tokenizer, MAX_LENGTH))
    assert static == {"computed": 3 * MAX_LENGTH, "padding": 3 * MAX_LENGTH - sum(lengths)}
    dynamic = padding.count_tokens(padding.collate(HAND, "dynamic", gpt2_tokenizer, MAX_LENGTH))
    assert dynamic == {"computed": 3 * max(lengths), "padding": 3 * max(lengths) - sum(lengths)}
    # packed: context A once + both of its blocks, context B + its block; nothing is padding
    packed = padding.count_tokens(padding.collate(HAND, "shared_context", gpt2_tokenizer, MAX_LENGTH))
    assert packed == {"computed": (3 + 3 + 1) + (2 + 2), "padding": 0}


def test_count_tokens_docstring_example(gpt2_tokenizer):
    batch = QADataCollator(gpt2_tokenizer)([{"input_ids": [5, 6, 7], "labels": [-100, 7, 2]},
                                            {"input_ids": [5], "labels": [2]}])
    assert padding.count_tokens(batch) == {"computed": 6, "padding": 2}


def test_token_accounting_padded_share_is_one_minus_real_over_computed(gpt2_tokenizer):
    cells = padding.token_accounting(_columns(HAND), gpt2_tokenizer, batch_sizes=[3], max_length=MAX_LENGTH)
    real = sum(len(r["input_ids"]) for r in HAND)
    by_strategy = {c["strategy"]: c for c in cells}
    assert set(by_strategy) == set(STRATEGIES)
    for strategy in ("static", "dynamic", "length_grouped"):
        cell = by_strategy[strategy]
        assert cell["question_tokens"] == real
        assert cell["padded_share"] == pytest.approx(1 - real / cell["computed_tokens"])
    assert by_strategy["static"]["computed_tokens"] == 3 * MAX_LENGTH
    assert by_strategy["shared_context"]["padded_share"] == 0
    assert by_strategy["shared_context"]["computed_tokens"] < real  # context A encoded once, not twice


def test_every_strategy_batches_the_same_questions_once(squad_file, gpt2_tokenizer):
    rows = _squad_rows(squad_file, gpt2_tokenizer)
    n = len(rows["input_ids"])
    for batch_size in (1, 2, 4):
        orders = {s: padding.batch_orders(rows, batch_size, s) for s in STRATEGIES}
        for strategy, batches in orders.items():
            assert sorted(i for b in batches for i in b) == list(range(n)), strategy
            assert all(len(b) == batch_size for b in batches[:-1]), strategy
        assert orders["static"] == orders["dynamic"]  # the same batches, padded differently
        keys = [rows["context_key"][i] for b in orders["shared_context"] for i in b]
        assert len([k for j, k in enumerate(keys) if j == 0 or keys[j - 1] != k]) == len(set(keys)), \
            "a paragraph's questions come one after the other"


def test_accounting_at_batch_size_one_has_no_dynamic_padding(squad_file, gpt2_tokenizer):
    rows = _squad_rows(squad_file, gpt2_tokenizer)
    real = sum(len(ids) for ids in rows["input_ids"])
    cells = {(c["strategy"], c["batch_size"]): c
             for c in padding.token_accounting(rows, gpt2_tokenizer, batch_sizes=[1, 2, 4], max_length=512)}
    for (strategy, batch_size), cell in cells.items():
        assert cell["questions"] == len(rows["input_ids"]) and cell["question_tokens"] == real
        if strategy == "shared_context":
            assert cell["padding_tokens"] == 0
        else:
            assert cell["padding_tokens"] == cell["computed_tokens"] - real
    for strategy in ("dynamic", "length_grouped", "shared_context"):
        assert cells[strategy, 1]["computed_tokens"] == real and cells[strategy, 1]["padding_tokens"] == 0
    assert cells["static", 1]["computed_tokens"] == 512 * len(rows["input_ids"])
    assert cells["shared_context", 4]["computed_tokens"] < real  # paragraphs of 3 and 2 questions share contexts
    assert cells["dynamic", 4]["padding_tokens"] >= cells["dynamic", 2]["padding_tokens"] >= 0


def test_representative_batches_are_nearest_the_median_within_the_budget():
    cell = {"batch_size": 2, "batches": [{"indices": [i, i + 1], "computed": c}
                                         for i, c in zip(range(0, 10, 2), (100, 40, 60, 50, 300))] +
            [{"indices": [10], "computed": 5}]}  # a last, partial batch is never picked
    def computed(budget, most):
        return [b["computed"] for b in padding.representative_batches(cell, token_budget=budget, max_batches=most)]

    # median of the full batches is 60; then 50, 40 are the nearest
    assert computed(10**6, 3) == [60, 50, 40]
    assert computed(120, 3) == [60, 50]  # 60 + 50 + 40 would pass the budget
    assert computed(1, 3) == [60]  # at least one, even over the budget


def test_study_times_a_lora_step_per_cell_and_skips_over_the_token_cap(squad_file, smollm2_tokenizer):
    rows = _squad_rows(squad_file, smollm2_tokenizer)
    args = PaddingStudyArguments(batch_sizes="1,2", max_timed_batches=2, max_step_tokens=600, lora_r=4, lora_alpha=8,
                                 repeats=3)
    model = padding.lora_model(tiny_llama(), args)
    result = padding.padding_study(model, smollm2_tokenizer, rows, args)
    cells = {(c["strategy"], c["batch_size"]): c for c in result["cells"]}
    assert set(cells) == {(s, b) for s in STRATEGIES for b in (1, 2)}
    assert "600" in cells["static", 2]["timing_skipped"]  # 2 x 512 computed tokens
    assert "timing" in cells["static", 1] and "timing" in cells["shared_context", 2]
    assert len(result["load_average_by_round"]) == 3  # one reading as each round starts
    for cell in cells.values():
        if "timing_skipped" in cell:  # its representative batch computes more than the cap
            assert int(cell["timing_skipped"].split(" computes ")[1].split()[0]) > args.max_step_tokens
            continue
        timing = cell["timing"]
        assert timing["repeats"] == 3 and len(timing["step_cpu_seconds"]) == 3
        assert all(len(rep) == timing["batches"] for rep in timing["step_cpu_seconds"])
        assert timing["step_seconds_median"] > 0 and timing["step_cpu_seconds_median"] > 0
        assert timing["step_cpu_seconds_repetitions"] == [statistics.median(r) for r in timing["step_cpu_seconds"]]
        assert timing["step_cpu_seconds_spread"] == [min(timing["step_cpu_seconds_repetitions"]),
                                                     max(timing["step_cpu_seconds_repetitions"])]
        if padding._reset_peak_rss():  # Linux lets the process reset its peak RSS mark
            assert timing["peak_memory_mb_max"] >= 0
        else:
            assert timing["peak_memory_mb_max"] is None
        assert timing["computed_tokens"][0] <= args.max_step_tokens
    assert not any(p.grad is not None for p in model.parameters()), "a step leaves no gradients behind"
    timing = cells["shared_context", 1]["timing"]
    low, high = timing["step_cpu_seconds_spread"]
    row = next(line for line in padding.summary_lines(result) if line.split()[:2] == ["shared_context", "1"])
    assert f"{timing['step_cpu_seconds_median']:.2f} [{low:.2f}-{high:.2f}]" in row


def test_rounds_alternate_direction_and_time_every_unit_once_each():
    assert common.interleaved(3, 3) == [(0, 0), (0, 1), (0, 2), (1, 2), (1, 1), (1, 0), (2, 0), (2, 1), (2, 2)]
    assert common.interleaved(2, 1) == [(0, 0), (0, 1)] and common.interleaved(0, 5) == []


def test_time_cells_interleaves_rounds_and_records_every_repetition(monkeypatch, gpt2_tokenizer):
    """A fake step whose timings are its call number: where each number lands shows the order of the steps."""
    calls = []

    def fake_step(model, batch):
        calls.append(len(calls))
        n = float(len(calls) - 1)  # 0 is the warm-up step
        return {"seconds": 2 * n, "cpu_seconds": n, "peak_memory_mb": 100 + n}

    monkeypatch.setattr(padding, "step_cost", fake_step)
    cells = padding.token_accounting(_columns(HAND), gpt2_tokenizer, batch_sizes=[1, 3], max_length=MAX_LENGTH)
    loads = padding.time_cells(torch.nn.Linear(1, 1), gpt2_tokenizer, _columns(HAND), cells, max_length=MAX_LENGTH,
                               timed_tokens=10**6, max_timed_batches=3, max_step_tokens=10**6, repeats=4)
    assert len(loads) == 4
    timed = [c for c in cells if "timing" in c]
    assert len(timed) == len(cells) == 2 * len(STRATEGIES)
    assert len(calls) == 1 + 4 * sum(c["timing"]["batches"] for c in timed)
    order = {}  # call number -> (repetition, cell)
    for i, cell in enumerate(timed):
        timing = cell["timing"]
        assert timing["batches"] == (3 if cell["batch_size"] == 1 else 1)
        for repetition, steps in enumerate(timing["step_cpu_seconds"]):
            assert steps == list(range(int(steps[0]), int(steps[0]) + len(steps))), "a cell's batches run together"
            order.update({int(n): (repetition, i) for n in steps})
            assert timing["step_seconds"][repetition] == [2 * n for n in steps]
            assert timing["tokens_per_s_repetitions"][repetition] == sum(timing["computed_tokens"]) / sum(steps)
        medians = [statistics.median(steps) for steps in timing["step_cpu_seconds"]]
        assert timing["step_cpu_seconds_repetitions"] == medians
        assert timing["step_cpu_seconds_median"] == statistics.median(medians)
        assert timing["step_cpu_seconds_spread"] == [min(medians), max(medians)]
        assert timing["step_seconds_median"] == 2 * timing["step_cpu_seconds_median"]
        assert timing["peak_memory_mb_max"] == 100 + max(max(steps) for steps in timing["step_cpu_seconds"])
    sequence = [order[n] for n in sorted(order)]
    rounds = [list(dict.fromkeys(cell for rep, cell in sequence if rep == r)) for r in range(4)]
    assert [rep for rep, _ in sequence] == sorted(rep for rep, _ in sequence), "round r ends before round r + 1"
    assert all(sorted(cells_) == list(range(len(timed))) for cells_ in rounds), "every cell once per round"
    assert rounds[1] == rounds[0][::-1] and rounds[2] == rounds[0] and rounds[3] == rounds[1]
    per_batch = [timed[i]["computed_tokens"] / len(timed[i]["batches"]) for i in rounds[0]]
    assert per_batch == sorted(per_batch), "the first round starts with the cheapest cells"


def test_cpu_idle_is_the_load_per_core_less_our_own_threads(monkeypatch):
    monkeypatch.setattr(common.os, "cpu_count", lambda: 2)
    assert common.cpu_idle(0.9) is True and common.cpu_idle(1.0) is False  # under 0.5 per core
    assert common.cpu_idle(1.9, own_threads=1) is True and common.cpu_idle(2.1, own_threads=1) is False
    assert common.cpu_idle(None) is None


def test_cli_padding_study_writes_the_json(tmp_path, tiny_gpt2_dir, squad_file, capsys):
    out = tmp_path / "padding_study.json"
    assert main(["padding-study", "--model", str(tiny_gpt2_dir), "--data", str(squad_file), "--batch_sizes", "1,2",
                 "--max_timed_batches", "1", "--lora_r", "4", "--lora_alpha", "8", "--note", "test", "--repeats", "2",
                 "--output", str(out)]) == 0
    result = json.loads(out.read_text())
    assert len(result["cells"]) == 2 * len(STRATEGIES)
    assert result["machine"]["note"] == "test" and result["machine"]["torch_threads"] == 1
    assert result["settings"]["repeats"] == 2 and len(result["load_average_by_round"]) == 2
    machine = result["machine"]
    assert len(machine["load_average_at_start"]) == len(machine["load_average_at_end"]) == 3
    assert machine["cpu_idle_at_start"] == common.cpu_idle(machine["load_average_at_start"][0])
    assert isinstance(machine["cpu_idle_at_end"], bool)
    assert result["lora"]["lora_r"] == 4 and result["memory_method"]
    assert "written:" in capsys.readouterr().out
