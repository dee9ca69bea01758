import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from loraqa.cli import main

ROOT = Path(__file__).resolve().parent.parent


def test_fetch_is_idempotent_and_names_unknown_assets(capsys):
    from conftest import CACHE

    assert main(["fetch", "--cache_dir", str(CACHE)]) == 0
    assert "squad: " in capsys.readouterr().out
    assert main(["fetch", "wikipedia", "--cache_dir", str(CACHE)]) == 2
    assert "unknown asset 'wikipedia'" in capsys.readouterr().err


def test_score_has_the_official_interface(tmp_path, squad_file, capsys):
    predictions = tmp_path / "pred.json"
    predictions.write_text(json.dumps({"q1": "the Denver Broncos", "q2": "Levi's", "q3": "24-10", "q4": "",
                                       "q5": "number 399"}))
    assert main(["score", str(squad_file), str(predictions)]) == 0
    scores = json.loads(capsys.readouterr().out)
    assert scores == {"exact_match": pytest.approx(60.0), "f1": pytest.approx(100 * (3 + 2 / 3) / 5)}


def test_bad_prediction_file_is_one_clear_line(tmp_path, squad_file, capsys):
    predictions = tmp_path / "pred.json"
    predictions.write_text(json.dumps(["not", "a", "mapping"]))
    assert main(["score", str(squad_file), str(predictions)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "pred.json: expected a JSON object" in err


def test_train_evaluate_compare_failures_end_to_end(tmp_path, tiny_gpt2_dir, squad_file, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = tmp_path / "run.yaml"
    config.write_text("learning_rate: 0.01\nmax_steps: 3\nlora_r: 2\n")
    run = tmp_path / "run"
    assert main(["train", "--config", str(config), "--model", str(tiny_gpt2_dir), "--train_file", str(squad_file),
                 "--validation-file", str(squad_file), "--max_steps", "2", "--output_dir", str(run),
                 "--eval_steps", "1", "--logging_steps", "1", "--disable_tqdm", "true"]) == 0
    resolved = json.loads((run / "run_config.json").read_text())
    assert resolved["training"]["learning_rate"] == 0.01  # from YAML
    assert resolved["training"]["max_steps"] == 2  # the flag wins over YAML
    assert resolved["lora"]["lora_r"] == 2
    for name, adapter in (("base", []), ("tuned", ["--adapter", str(run)])):
        assert main(["evaluate", "--model", str(tiny_gpt2_dir), *adapter, "--data", str(squad_file),
                     "--max_new_tokens", "3", "--output", str(tmp_path / f"{name}.json")]) == 0
    assert main(["compare", str(tmp_path / "base.json"), str(tmp_path / "tuned.json"),
                 "--output", str(tmp_path / "cmp.json")]) == 0
    assert json.loads((tmp_path / "cmp.json").read_text())["n_common"] == 5
    assert main(["failures", str(tmp_path / "tuned.json"), "--output", str(tmp_path / "failures.md")]) == 0
    assert (tmp_path / "failures.md").read_text().startswith("# Failure analysis")
    assert main(["ask", "--model", str(tiny_gpt2_dir), "--adapter", str(run), "--context", "Paris is in France.",
                 "--question", "Where is Paris?", "--max_new_tokens", "2"]) == 0


def test_out_of_range_settings_fail_before_any_work(tmp_path, capsys):
    assert main(["evaluate", "--model", "does-not-exist", "--top_p", "1.5", "--output", str(tmp_path / "e.json")]) == 2
    assert "top_p=1.5: must be in (0, 1]" in capsys.readouterr().err
    assert not (tmp_path / "e.json").exists()
    assert main(["train", "--model", "x", "--lora_r", "0"]) == 2
    assert "lora_r=0" in capsys.readouterr().err
    assert main(["train", "--model", "x", "--load_best_model_at_end", "true", "--eval_strategy", "steps",
                 "--save_strategy", "epoch"]) == 2  # transformers' own check, as one line
    assert capsys.readouterr().err.startswith("loraqa train: error: training arguments: --load_best_model_at_end")


def test_unusable_device_fails_before_any_work(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert main(["evaluate", "--model", "does-not-exist", "--device", "cuda", "--output", str(tmp_path / "e.json")]) == 2
    assert "device 'cuda': CUDA is not available on this machine" in capsys.readouterr().err
    assert not (tmp_path / "e.json").exists()


def test_unknown_yaml_key_is_named(tmp_path, capsys):
    config = tmp_path / "bad.yaml"
    config.write_text("learnin_rate: 0.1\n")
    assert main(["train", "--config", str(config)]) == 2
    assert "bad.yaml: unknown setting(s) learnin_rate" in capsys.readouterr().err


def test_single_file_entry_point_delegates():
    out = subprocess.run([sys.executable, str(ROOT / "lora_qa_finetuning.py"), "--help"], capture_output=True,
                         text=True, check=True)
    assert "usage: loraqa {fetch,data-stats,score,train,evaluate" in out.stdout


def test_bf16_training_on_a_cpu_needs_no_extra_flag(monkeypatch, tmp_path):
    import loraqa.config as config

    monkeypatch.setattr(config, "_has_accelerator", lambda: False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    args = config.LoraQATrainingArguments(output_dir=str(tmp_path), bf16=True)
    assert args.bf16 and args.use_cpu  # transformers alone refuses bf16 without a GPU unless use_cpu is set
    assert not config.LoraQATrainingArguments(output_dir=str(tmp_path)).use_cpu
