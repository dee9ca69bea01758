import torch
from conftest import tiny_gpt2, tiny_llama
from loraqa.bench import _decode_linear_seconds, _linear_layers, _matmul_params, summary_lines


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
        "machine": {"matmul_peak_gflops": 400.0},
        "train": {"loraqa": run, "reference_trl": {**run, "examples_per_s": 0.5}, "speedup": 6.0,
                  "loraqa_achieved_gflops": 120.0, "loraqa_mfu": 0.3},
        "eval": {"one_by_one_questions_per_s": 1.5, "loraqa_questions_per_s": 9.0, "speedup": 6.0,
                 "greedy_identical_count": 64, "questions": 64, "full_prompt_rows_questions_per_s": 2.0,
                 "loraqa_achieved_gflops": 130.0, "loraqa_mfu": 0.325, "loraqa_questions_per_s_at_peak": 27.0,
                 "speedup_at_peak": 18.0, "prefill_linear_at_peak_s": 2.5, "decode_linear_s": 1.5,
                 "linear_layers_s": 4.0, "speedup_if_only_linear_layers": 11.0},
    }
    text = "\n".join(summary_lines(result))
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
