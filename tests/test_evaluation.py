import json

import pytest
import torch

from conftest import tiny_gpt2
from loraqa.config import GenerationSettings, LoraArguments, ModelArguments
from loraqa.evaluation import EvaluateArguments, compare, evaluate, failure_category, failure_report, question_type
from loraqa.metrics import squad_scores
from loraqa.modeling import ModelSetupError, attach_lora, inference_placement, native_bf16


def _evaluate(model_dir, squad_file, output, **kwargs):
    return evaluate(ModelArguments(model=str(model_dir)),
                    EvaluateArguments(data=str(squad_file), output=str(output), max_samples=None, **kwargs),
                    GenerationSettings(max_new_tokens=4))


def test_evaluation_json_matches_the_official_scorer(tmp_path, tiny_gpt2_dir, squad_file):
    result = _evaluate(tiny_gpt2_dir, squad_file, tmp_path / "e.json")
    written = json.loads((tmp_path / "e.json").read_text())
    assert written["n"] == 5 and set(written["predictions"]) == {"q1", "q2", "q3", "q4", "q5"}
    references = {q: v["gold"] for q, v in written["questions"].items()}
    official = squad_scores(written["predictions"], references)
    assert written["exact_match"] == pytest.approx(official["exact_match"])
    assert written["f1"] == pytest.approx(official["f1"])
    assert written["f1_ci"][0] <= written["f1"] <= written["f1_ci"][1]
    for key in ("exact_match_ci", "per_question", "generation", "model", "adapter", "data_hash", "questions_per_s",
                "transformers", "torch", "mean_answer_words", "verbatim_in_context"):
        assert key in written, key
    assert result["data_hash"] == written["data_hash"]


def test_inference_placement(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert inference_placement() == (torch.device("cpu"), torch.float32)
    assert inference_placement("cpu", "bfloat16") == (torch.device("cpu"), torch.bfloat16)
    with pytest.raises(ModelSetupError, match="device 'cuda': CUDA is not available"):
        inference_placement("cuda")
    with pytest.raises(ModelSetupError, match="device 'gpu0'"):
        inference_placement("gpu0")
    with pytest.raises(ModelSetupError, match="dtype 'fp8'"):
        inference_placement("cpu", "fp8")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: True)
    assert inference_placement() == (torch.device("cuda"), torch.bfloat16)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: False)
    assert inference_placement() == (torch.device("cuda"), torch.float32)
    assert inference_placement("cuda:1", "float16") == (torch.device("cuda:1"), torch.float16)


def test_native_bf16_follows_the_cpu_features_and_auto_stays_float32_on_cpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for amx, avx512_bf16, native in [(False, False, False), (True, False, True), (False, True, True)]:
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
        assert native_bf16(torch.device("cpu")) is native
        assert inference_placement() == (torch.device("cpu"), torch.float32)  # exact answers on a CPU
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: True)
    assert native_bf16(torch.device("cuda"))
    assert not native_bf16(torch.device("meta"))


def test_evaluation_in_bfloat16_records_it(tmp_path, tiny_gpt2_dir, squad_file):
    fp32 = _evaluate(tiny_gpt2_dir, squad_file, tmp_path / "fp32.json", device="cpu")
    bf16 = _evaluate(tiny_gpt2_dir, squad_file, tmp_path / "bf16.json", device="cpu", dtype="bfloat16")
    assert (fp32["device"], fp32["dtype"], bf16["device"], bf16["dtype"]) == ("cpu", "float32", "cpu", "bfloat16")
    assert set(bf16["predictions"]) == set(fp32["predictions"])
    adapter = tmp_path / "adapter"
    attach_lora(tiny_gpt2(), LoraArguments(lora_r=4)).save_pretrained(adapter)  # B = 0: answers as the base
    tuned = _evaluate(tiny_gpt2_dir, squad_file, tmp_path / "tuned.json", adapter=str(adapter), dtype="bfloat16")
    assert tuned["dtype"] == "bfloat16" and tuned["predictions"] == bf16["predictions"]


def test_adapter_evaluation_and_compare(tmp_path, tiny_gpt2_dir, squad_file):
    base = _evaluate(tiny_gpt2_dir, squad_file, tmp_path / "base.json")
    adapter = tmp_path / "adapter"
    model = attach_lora(tiny_gpt2(), LoraArguments(lora_r=4))
    model.save_pretrained(adapter)  # B = 0: the adapted model answers exactly like the base
    tuned = _evaluate(tiny_gpt2_dir, squad_file, tmp_path / "tuned.json", adapter=str(adapter))
    assert tuned["predictions"] == base["predictions"] and tuned["adapter"] == str(adapter)
    comparison = compare(str(tmp_path / "base.json"), str(tmp_path / "tuned.json"))
    assert comparison["n_common"] == 5 and comparison["f1"]["delta"] == 0.0 and comparison["answers_differ"] == 0
    changed = json.loads((tmp_path / "tuned.json").read_text())
    first = next(iter(changed["predictions"]))
    changed["predictions"][first] += " (edited)"
    (tmp_path / "edited.json").write_text(json.dumps(changed))
    assert compare(str(tmp_path / "base.json"), str(tmp_path / "edited.json"))["answers_differ"] == 1
    assert comparison["f1"]["permutation_p_value"] == 1.0 and comparison["exact_match"]["mcnemar"]["p_value"] == 1.0


def test_strategy_grid(tmp_path, tiny_gpt2_dir, squad_file):
    result = _evaluate(tiny_gpt2_dir, squad_file, tmp_path / "grid.json", strategy_grid=True, grid_seeds=2)
    names = [row["strategy"] for row in result["strategies"]]
    assert names == ["greedy", "top_k=10", "top_k=25", "top_k=50", "top_p=0.8", "top_p=0.9", "top_p=0.95",
                     "temperature=0.7", "sample", "temperature=1.3"]
    assert result["strategies"][0]["seeds"] == [0] and result["strategies"][1]["seeds"] == [0, 1]
    for row in result["strategies"]:
        assert 0.0 <= row["distinct_1"] <= 1.0 and 0.0 <= row["seed_disagreement"] <= 1.0
    greedy = _evaluate(tiny_gpt2_dir, squad_file, tmp_path / "greedy.json")
    assert result["strategies"][0]["runs"][0]["predictions"] == greedy["predictions"]  # shared prefill, same answers


@pytest.mark.parametrize("prediction, golds, em, f1, expected", [
    ("Denver Broncos", ["Denver Broncos"], 1.0, 1.0, "correct"),
    ("", ["Denver Broncos"], 0.0, 0.0, "empty answer"),
    ("the New England Patriots", ["Denver Broncos"], 0.0, 0.0, "answer not in context"),
    ("The Denver Broncos defeated", ["Denver Broncos"], 0.0, 0.8, "right answer with extra words"),
    ("Broncos defeated the Carolina", ["Denver Broncos"], 0.0, 0.33, "partial overlap"),
    ("Carolina Panthers", ["Denver Broncos"], 0.0, 0.0, "wrong span of the context"),
])
def test_failure_categories(prediction, golds, em, f1, expected):
    context = "The Denver Broncos defeated the Carolina Panthers 24-10."
    assert failure_category(prediction, golds, context, em, f1) == expected


def test_question_types_and_report(tmp_path, tiny_gpt2_dir, squad_file):
    assert question_type("How many goals?") == "how many" and question_type("Who won?") == "who"
    assert question_type("In which year?") == "which" and question_type("Name it.") == "other"
    _evaluate(tiny_gpt2_dir, squad_file, tmp_path / "e.json")
    report = failure_report(str(tmp_path / "e.json"))
    assert report.startswith("# Failure analysis") and "| question type | count | EM | F1 |" in report
