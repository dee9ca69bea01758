"""`make gpu-check` as a CPU dry run (DEVICE=cpu): tiny sizes, nothing fetched, every number real."""
import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch

from conftest import CACHE

ROOT = Path(__file__).resolve().parent.parent
spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "scripts" / "gpu_check.py")
gpu_check = importlib.util.module_from_spec(spec)
spec.loader.exec_module(gpu_check)


def test_cpu_dry_run_with_nothing_fetched(tmp_path, monkeypatch):
    monkeypatch.setenv("LORAQA_CACHE", str(tmp_path / "empty_cache"))  # a bare machine: no SQuAD, no SmolLM2
    output = tmp_path / "results" / "gpu_check.json"
    result = gpu_check.main(["--device", "cpu", "--steps", "6", "--batch_size", "4", "--learning_rate", "1e-2",
                             "--eval_questions", "8", "--speed_questions", "4", "--max_new_tokens", "4",
                             "--max_length", "256", "--output", str(output)])
    assert json.loads(output.read_text()) == json.loads(json.dumps(result))  # what it returns is what it wrote
    assert not list(output.parent.glob("*.tmp*"))
    assert result["device"] == "cpu" and result["dry_run"] is True
    assert result["model"]["config"] == "tiny Llama" and "BPE" in result["model"]["tokenizer"]
    assert result["questions"] == {"file": "synthetic", "synthetic": True, "evaluated": 8}
    assert any("synthetic" in note for note in result["notes"])
    # on a CPU: fp32 training only, and it says why the others and the CUDA tests were skipped
    assert set(result["train"]) == {"fp32"}
    assert {"train_bf16", "train_fp16", "cuda_tests"} <= set(result["skipped"])
    assert all(result["skipped"].values())
    run = result["train"]["fp32"]
    assert run["steps"] == 6 and len(run["losses"]) == 6
    assert all(math.isfinite(x) for x in run["losses"])
    assert run["losses"][-1] < run["losses"][0] and run["loss_last_fifth"] < run["loss_first_fifth"]
    assert run["loss_scaling"] is False and run["seconds_per_step"] > 0 and run["peak_memory_mb"] > 0
    agreement = result["precision_agreement"]
    assert agreement["questions"] == 8 and 0 <= agreement["identical"] <= 8
    assert agreement["agreement_percent"] == pytest.approx(100 * agreement["identical"] / 8)
    assert all(v > 0 for v in agreement["questions_per_s"].values())
    speed = result["speed"]
    assert speed["questions"] == 4 and speed["dtype"] == "float32"
    assert speed["ratio"] == pytest.approx(speed["loraqa_questions_per_s"] / speed["one_by_one_questions_per_s"])
    assert speed["ratio"] > 0
    assert speed["greedy_identical"] == 4  # fp32 on a CPU: batched greedy decoding equals one-by-one generate
    assert result["checks"] == {"train_fp32_finite": True, "train_fp32_decreasing": True} and result["ok"]
    lines = gpu_check.summary_lines(result)
    assert lines[-1] == "all checks passed" and any(line.startswith("speed: 4 questions") for line in lines)


@pytest.mark.skipif(not (CACHE / "smollm2-135m" / "config.json").exists(), reason="smollm2-135m not fetched")
def test_model_config_is_smollm2s_when_fetched():
    fetched = json.loads((CACHE / "smollm2-135m" / "config.json").read_text())
    config, source = gpu_check.model_config("auto", CACHE)
    assert source.endswith("smollm2-135m/config.json")
    assert (config.hidden_size, config.num_hidden_layers, config.num_attention_heads, config.vocab_size) == (
        fetched["hidden_size"], fetched["num_hidden_layers"], fetched["num_attention_heads"], fetched["vocab_size"])
    assert gpu_check.model_config("tiny", CACHE)[1] == "tiny Llama"


def test_what_cannot_run_is_one_clear_error(tmp_path):
    with pytest.raises(gpu_check.CheckError, match="--model_config smollm2: .* not found"):
        gpu_check.model_config("smollm2", tmp_path)
    if not torch.cuda.is_available():
        with pytest.raises(gpu_check.CheckError, match="CUDA is not available here"):
            gpu_check.check_environment("cuda")
