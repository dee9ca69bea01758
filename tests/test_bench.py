import importlib.util
import json
from types import SimpleNamespace

import pytest
import torch

from conftest import CACHE, tiny_gpt2, tiny_llama
from loraqa.config import ModelArguments
from loraqa.measure import bench
from loraqa.measure.bench import (BenchArguments, _decode_linear_seconds, _linear_layers, _matmul_params, run_bench,
                                  summary_lines)


def test_matmul_params_count_the_transformer_matrices_and_the_head():
    llama = tiny_llama(vocab_size=100)  # hidden 32, intermediate 64, 4 heads of 8, 2 kv heads, 2 layers
    per_layer = 32 * 32 + 2 * (32 * 16) + 32 * 32 + 3 * (32 * 64)  # q, k, v, o, gate, up, down
    assert _matmul_params(llama) == (2 * per_layer, 100 * 32)
    gpt2 = tiny_gpt2(vocab_size=100)  # n_embd 32, 2 layers; embeddings (tokens, positions) are lookups
    per_block = 32 * 96 + 32 * 32 + 32 * 128 + 128 * 32  # c_attn, attn.c_proj, c_fc, mlp.c_proj
    assert _matmul_params(gpt2) == (2 * per_block, 100 * 32)


def test_decode_linear_seconds_runs_every_linear_layer_at_each_row_count():
    for model in (tiny_gpt2(vocab_size=100), tiny_llama(vocab_size=100)):
        seen = []
        for layer in _linear_layers(model):
            layer.register_forward_hook(lambda module, args, output: seen.append((module, args[0].shape,
                                                                                    torch.is_grad_enabled())))
        seconds = _decode_linear_seconds(model, {3: 5, 1: 2})
        assert seconds > 0
        layers = _linear_layers(model)
        assert len(layers) == (4 if "GPT2" in type(model).__name__ else 7) * 2 + 1  # 2 layers + the LM head
        expected = {(layer, rows) for layer in layers for rows in (3, 1)}
        assert {(module, shape[0]) for module, shape, _ in seen} == expected and len(seen) == 3 * len(expected)
        assert not any(grad for _, _, grad in seen)  # timed without autograd, as decoding runs


def test_summary_lines_state_the_side_by_side_ratios():
    run = {"examples_per_s": 3.0, "tokens_per_s": 600.0, "mean_train_loss": 2.5, "peak_rss_mb": 3000.0}
    result = {
        "machine": {"matmul_peak_gflops": 400.0,
                    "matmul_peak": {"before": {"gflops": 390.0, "size": 1024, "spread": [350.0, 390.0]},
                                    "after": {"gflops": 400.0, "size": 2048, "spread": [398.0, 400.0]}}},
        "train": {"loraqa": run, "reference_trl": {**run, "examples_per_s": 0.5}, "speedup": 6.0,
                  "loraqa_achieved_gflops": 120.0, "loraqa_mfu": 0.3},
        "eval": {"one_by_one_questions_per_s": 1.5, "loraqa_questions_per_s": 9.0, "speedup": 6.0,
                 "greedy_identical_count": 64, "questions": 64, "full_prompt_rows_questions_per_s": 2.0,
                 "loraqa_achieved_gflops": 130.0, "loraqa_mfu": 0.325, "loraqa_questions_per_s_at_peak": 27.0,
                 "speedup_at_peak": 18.0, "prefill_linear_at_peak_s": 2.5, "decode_linear_s": 1.5,
                 "linear_layers_s": 4.0, "speedup_if_only_linear_layers": 11.0},
    }
    text = "\n".join(summary_lines(result))
    assert ("fp32 matmul peak 400.0 GFLOP/s; before the runs 390.0 (windows 350.0-390.0 at 1024), after the runs "
            "400.0 (windows 398.0-400.0 at 2048)") in text
    assert "train speedup over TRL reference: 6.00x" in text
    assert "MFU 30%" in text and "MFU 32%" in text
    assert "speedup 6.0x, greedy identical 64/64" in text
    assert "full-prompt rows (no shared contexts) 2.00 q/s" in text
    assert "27.0 q/s = 18.0x" in text
    assert ("4.00 s (prefill at the peak 2.50 s, decoding steps timed at their row counts 1.50 s) of loraqa's 7.11 s; "
            "with all other work free: 11.0x") in text


def test_summary_lines_report_the_bf16_evaluation_beside_float32():
    result = {"machine": {"matmul_peak_gflops": 400.0}, "train": {},
              "eval": {"one_by_one_questions_per_s": 1.5, "loraqa_questions_per_s": 9.0, "speedup": 6.0,
                       "greedy_identical_count": 64, "questions": 64, "loraqa_achieved_gflops": 130.0,
                       "loraqa_mfu": 0.325, "loraqa_questions_per_s_at_peak": 27.0, "speedup_at_peak": 18.0,
                       "bf16": {"one_by_one_questions_per_s": 1.6, "loraqa_questions_per_s": 15.0, "speedup": 9.4,
                                "speedup_over_fp32_one_by_one": 10.0, "greedy_identical_count": 52,
                                "identical_to_fp32_count": 54}}}
    text = "\n".join(summary_lines(result))
    assert "bf16 weights: one-by-one 1.60 q/s, loraqa 15.00 q/s, speedup 9.4x (10.0x over fp32" in text
    assert "greedy identical 52/64, same as fp32 54/64" in text


class _FakeMachine:
    """A clock whose time passes only in matrix products: an n x n product takes `seconds[n]`, three times
    longer while the machine is busy (products started before `busy_until`)."""

    def __init__(self, seconds: dict[int, float], busy_until: float = 0.0):
        self.seconds, self.busy_until, self.now = seconds, busy_until, 0.0

    def perf_counter(self) -> float:
        return self.now

    def mm(self, a, b):
        self.now += self.seconds[a.shape[0]] * (3 if self.now < self.busy_until else 1)


def _fake_machine(monkeypatch, seconds: dict[int, float], busy_until: float = 0.0) -> _FakeMachine:
    machine = _FakeMachine(seconds, busy_until)
    monkeypatch.setattr(bench, "time", SimpleNamespace(perf_counter=machine.perf_counter))
    monkeypatch.setattr(bench.torch, "mm", machine.mm)
    return machine


def _gflops(size: int, seconds: float) -> float:
    return 2 * size**3 / seconds / 1e9


def test_matmul_peak_is_the_best_window_of_any_size_with_its_spread(monkeypatch):
    """Busy for the first window of each size (a product 3x slower): the peak is a later window of the size
    that multiplies fastest, and the disturbed window shows in the spread."""
    _fake_machine(monkeypatch, {32: 0.05, 64: 0.2}, busy_until=2.5)
    peak = bench.matmul_peak(sizes=(32, 64), windows=3, seconds=1.0)
    assert peak["size"] == 64 and peak["gflops"] == pytest.approx(_gflops(64, 0.2))
    assert peak["spread"] == pytest.approx([_gflops(64, 0.6), _gflops(64, 0.2)])
    assert peak["gflops_by_size"][32] == pytest.approx([_gflops(32, 0.15), _gflops(32, 0.05), _gflops(32, 0.05)])


def _measured_result(monkeypatch, product_seconds: float, busy_before: bool = False) -> dict:
    """A bench result whose training and evaluation achieved 0.5 GFLOP/s, with the peak measured before and
    after the runs on a machine whose 64 x 64 products take `product_seconds` (3x longer when busy)."""
    machine = _fake_machine(monkeypatch, {64: product_seconds}, busy_until=float("inf") if busy_before else 0.0)
    result = {"settings": {"output": "bench.json"}, "machine": {},
              "train": {"loraqa_achieved_gflops": 0.5},
              "eval": {"questions": 10, "one_by_one_questions_per_s": 1.0, "loraqa_questions_per_s": 5.0,
                       "loraqa_flops": 1e9, "loraqa_achieved_gflops": 0.5, "prefill_linear_flops": 4e8,
                       "decode_linear_s": 0.5}}
    peaks = {"before": bench.matmul_peak(sizes=(64,), windows=2, seconds=1.0)}
    machine.busy_until = 0.0
    peaks["after"] = bench.matmul_peak(sizes=(64,), windows=2, seconds=1.0)
    bench._apply_peak(result, peaks)
    return result


def test_figures_at_the_peak_use_the_best_measurement(monkeypatch):
    result = _measured_result(monkeypatch, product_seconds=2 * 64**3 / 1e9, busy_before=True)  # 1 GFLOP/s idle
    bench.check_mfu(result)
    assert result["machine"]["matmul_peak"]["before"]["gflops"] == pytest.approx(1 / 3)
    assert result["machine"]["matmul_peak_gflops"] == pytest.approx(1.0)
    assert result["train"]["loraqa_mfu"] == pytest.approx(0.5)
    evaluation = result["eval"]
    assert evaluation["loraqa_mfu"] == pytest.approx(0.5)
    assert evaluation["loraqa_questions_per_s_at_peak"] == pytest.approx(10.0)  # 1e9 FLOP at 1 GFLOP/s: 1 s
    assert evaluation["speedup_at_peak"] == pytest.approx(10.0)  # one by one: 10 s
    assert evaluation["prefill_linear_at_peak_s"] == pytest.approx(0.4)
    assert evaluation["speedup_if_only_linear_layers"] == pytest.approx(10.0 / 0.9)
    assert bench._peak_text(result["machine"]) == ("1.0 GFLOP/s; before the runs 0.3 (windows 0.3-0.3 at 64), "
                                                   "after the runs 1.0 (windows 1.0-1.0 at 64)")


def test_an_mfu_above_100_percent_fails_the_bench_as_a_measurement_error(monkeypatch):
    result = _measured_result(monkeypatch, product_seconds=2 * 64**3 / 0.4e9)  # 0.4 GFLOP/s, below the 0.5 achieved
    with pytest.raises(bench.BenchMeasurementError) as error:
        bench.check_mfu(result)
    message = str(error.value)
    assert "\n" not in message and "MFU 125% is a measurement error" in message
    assert message.startswith("train achieved 0.5 GFLOP/s, above the fp32 matmul peak measured (0.4 GFLOP/s;")


def test_run_bench_end_to_end_on_a_tiny_model(tmp_path, gpt2_tokenizer, squad_file, monkeypatch):
    """The whole bench on a random 2-layer GPT-2 without dropout and the five-question file: 2 steps of 2 questions
    per training variant (and TRL's where it is installed), all five questions evaluated. Every loraqa variant trains on the same questions in the
    same order with the same objective, so their step losses agree; the batched answers are generate's own."""
    model_dir = tmp_path / "tiny-gpt2-no-dropout"
    model = tiny_gpt2()
    model.config.update(dict(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0))
    model.save_pretrained(model_dir)
    gpt2_tokenizer.save_pretrained(model_dir)
    # each variant in this process: a spawned child only keeps its peak RSS apart, and imports torch afresh
    monkeypatch.setattr(bench, "in_child", lambda function, job: function(job))
    real_peak, answers = bench.matmul_peak, []
    monkeypatch.setattr(bench, "matmul_peak", lambda device: real_peak(device, sizes=(256,), windows=2, seconds=0.1))
    real_side_by_side = bench._side_by_side
    monkeypatch.setattr(bench, "_side_by_side", lambda *args, **kwargs: answers.append(
        real_side_by_side(*args, **kwargs)) or answers[-1])
    reference = importlib.util.find_spec("trl") is not None  # the [bench] extra
    output = tmp_path / "bench.json"
    result = run_bench(ModelArguments(model=str(model_dir), cache_dir=str(CACHE)),
                       BenchArguments(train_examples=4, eval_examples=5, batch_size=2, max_length=256,
                                      output=str(output), reference=reference, train_file=str(squad_file),
                                      eval_file=str(squad_file)))
    assert json.loads(output.read_text()) == json.loads(json.dumps(result))  # the file holds the whole result
    train, evaluation = result["train"], result["eval"]
    variants = ["loraqa", "padded_answer_only_logits", "padded_full_logits"] + (["reference_trl"] if reference else [])
    assert [name for name in train if isinstance(train[name], dict)] == variants
    for name in variants:
        assert len(train[name]["step_losses"]) == 2 and train[name]["examples_per_s"] > 0, name
        assert train[name]["peak_rss_mb"] > 0 and train[name]["mean_train_loss"] > 0, name
    for name in variants[1:3]:
        assert train[name]["step_losses"] == pytest.approx(train["loraqa"]["step_losses"], rel=1e-4), name
        assert train[f"speedup_over_{name}"] > 0
    # packing encodes each paragraph once; answer-only logits run the head on fewer positions
    assert train["loraqa"]["processed_tokens"] < train["padded_answer_only_logits"]["processed_tokens"]
    assert train["padded_answer_only_logits"]["logit_positions"] < train["padded_full_logits"]["logit_positions"]
    if reference:
        assert train["speedup"] > 0 and train["peak_rss_ratio"] > 0
    assert 0 < train["loraqa_mfu"] <= 1 and 0 < evaluation["loraqa_mfu"] <= 1
    assert evaluation["questions"] == 5 and evaluation["speedup"] > 0 and evaluation["speedup_at_peak"] > 0
    assert evaluation["speedup_if_only_linear_layers"] > 0 and evaluation["generated_tokens"] > 0
    ours, _, one_by_one, _ = answers[0]  # float32: the batched path's answers are one-by-one generate's
    assert ours == one_by_one and len(one_by_one) == 5 and len(set(one_by_one.values())) > 1
    assert evaluation["greedy_identical"] and evaluation["full_prompt_rows_identical_count"] == 5
    lines = "\n".join(summary_lines(json.loads(output.read_text())))  # every figure the summary reads is there
    assert "greedy identical 5/5" in lines and "eval linear layers alone" in lines and "train loraqa " in lines
    assert ("train speedup over TRL reference" in lines) == reference
