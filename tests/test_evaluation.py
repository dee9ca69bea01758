import dataclasses
import json

import pytest
import torch

from conftest import tiny_gpt2
from loraqa.evaluation.analysis import compare
from loraqa.config import GenerationSettings, LoraArguments, ModelArguments, to_dict
from loraqa.config import EvaluateArguments
from loraqa.evaluation.evaluate import evaluate
from loraqa.model.loading import ModelSetupError, inference_placement, native_bf16
from loraqa.model.lora import attach_lora


def _evaluate(model_dir, squad_file, output, **kwargs):
    return evaluate(ModelArguments(model=str(model_dir)),
                    EvaluateArguments(data=str(squad_file), output=str(output), max_samples=None, **kwargs),
                    GenerationSettings(max_new_tokens=4))


# answers of a stub decoder and the official rules' scores, worked by hand (normalized texts in comments)
STUB_ANSWERS = {"q1": "the Denver Broncos!",  # "denver broncos" = gold: EM 1, F1 1
                "q2": "Levi's",               # "levis" vs "levis stadium": P 1, R 1/2, F1 2/3
                "q3": "24 - 10",              # "24 10" vs "2410": no common token
                "q4": "buried under an oak",  # "buried under oak" vs "under old oak tree": P 2/3, R 1/2, F1 4/7
                "q5": ""}                     # empty: 0
STUB_SCORES = {"q1": (1.0, 1.0), "q2": (0.0, 2 / 3), "q3": (0.0, 0.0), "q4": (0.0, 4 / 7), "q5": (0.0, 0.0)}


def _stub_decoder(answers):
    def generate_answers(model, tokenizer, records, *, stats, **kwargs):
        stats["prompts_cut"] = 0
        return {r["id"]: answers[r["id"]] for r in records}
    return generate_answers


def test_evaluation_json_holds_the_official_scores_of_known_answers(tmp_path, tiny_gpt2_dir, squad_file, monkeypatch):
    monkeypatch.setattr("loraqa.evaluation.evaluate.generate_answers", _stub_decoder(STUB_ANSWERS))
    result = _evaluate(tiny_gpt2_dir, squad_file, tmp_path / "e.json")
    written = json.loads((tmp_path / "e.json").read_text())
    assert written == json.loads(json.dumps(result))
    assert written["n"] == 5 and written["predictions"] == STUB_ANSWERS
    assert {q: (s["exact_match"], pytest.approx(s["f1"])) for q, s in written["per_question"].items()} == STUB_SCORES
    assert written["exact_match"] == pytest.approx(20.0)
    assert written["f1"] == pytest.approx(100 * (1 + 2 / 3 + 4 / 7) / 5)
    # two paragraphs (q1-q3 Super Bowl, q4-q5 treasure) resampled whole: a resample holds both, or one twice
    paragraphs = {q: v["paragraph"] for q, v in written["questions"].items()}
    assert paragraphs["q1"] == paragraphs["q2"] == paragraphs["q3"] != paragraphs["q4"] == paragraphs["q5"]
    assert written["exact_match_ci"] == [pytest.approx(0.0), pytest.approx(100 / 3)]  # paragraph EM 1/3 and 0
    assert written["f1_ci"] == [pytest.approx(100 * (4 / 7) / 2), pytest.approx(100 * (1 + 2 / 3) / 3)]
    assert written["resampled"] == "paragraphs"
    for key in ("generation", "model", "adapter", "data_hash", "questions_per_s", "transformers", "torch",
                "mean_answer_words", "verbatim_in_context"):
        assert key in written, key
    assert written["verbatim_in_context"] == pytest.approx(1 / 5)  # only "Levi's" is a span of its context as written


def test_unanswerable_questions_are_scored_after_generation(tmp_path, tiny_gpt2_dir, squad_file, monkeypatch):
    squad = json.loads(squad_file.read_text())
    squad["data"][0]["paragraphs"][0]["qas"] += [
        {"id": "u1", "question": "Who lost in 1999?", "is_impossible": True, "answers": []},
        {"id": "u2", "question": "Who won in 1999?", "is_impossible": True, "answers": []}]
    squad_file.write_text(json.dumps(squad))
    monkeypatch.setattr("loraqa.evaluation.evaluate.generate_answers",
                        _stub_decoder({**STUB_ANSWERS, "u1": "", "u2": "Denver Broncos"}))
    result = _evaluate(tiny_gpt2_dir, squad_file, tmp_path / "v2.json")
    assert result["per_question"]["u1"] == {"exact_match": 1.0, "f1": 1.0}  # no answer, rightly
    assert result["per_question"]["u2"] == {"exact_match": 0.0, "f1": 0.0}
    assert result["exact_match"] == pytest.approx(100 * 2 / 7)


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
    # the random model's top token leads by >= 2% of the largest logit, far above bf16 rounding: same answers
    assert bf16["predictions"] == fp32["predictions"] and all(fp32["predictions"].values())
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
    assert comparison["resampled"] == "paragraphs"  # evaluations record each question's paragraph
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
                     "temperature=0.7", "sample", "temperature=1.3", "greedy,in_context", "num_beams=2",
                     "num_beams=4", "num_beams=4,in_context"]
    assert result["strategies"][0]["seeds"] == [0] and result["strategies"][1]["seeds"] == [0, 1]
    assert [row["seeds"] for row in result["strategies"][-4:]] == [[0]] * 4
    for row in result["strategies"][-4:]:
        assert row["verbatim_in_context"] == 1.0 or "in_context" not in row["strategy"]
    for row in result["strategies"]:
        assert 0.0 <= row["distinct_1"] <= 1.0 and 0.0 <= row["seed_disagreement"] <= 1.0
        assert "questions_per_s" not in row  # the rows decode together: only the whole pass has a speed
    assert result["grid_questions_per_s"] == pytest.approx(len(result["paragraphs"]) / result["grid_seconds"])
    greedy = _evaluate(tiny_gpt2_dir, squad_file, tmp_path / "greedy.json")
    assert result["strategies"][0]["runs"][0]["predictions"] == greedy["predictions"]  # shared prefill, same answers


def test_grid_rows_give_the_ci_of_their_mean_over_seeds(tmp_path, tiny_gpt2_dir, squad_file, monkeypatch):
    gold = {"q1": "Denver Broncos", "q2": "Levi's Stadium", "q3": "24-10", "q4": "under the old oak tree",
            "q5": "number 399"}
    right = {0: {"q1", "q2", "q4"}, 1: {"q1"}}  # per seed; greedy answers as seed 0

    def generate_answer_sets(model, tokenizer, records, settings_list, *, stats, **kwargs):
        for work in stats:
            work.update(prompts_cut=0, prefill_s=0.5, decode_s=0.5)
        return [{r["id"]: gold[r["id"]] if r["id"] in right[s.seed] else "" for r in records} for s in settings_list]

    monkeypatch.setattr("loraqa.evaluation.evaluate.generate_answer_sets", generate_answer_sets)
    result = _evaluate(tiny_gpt2_dir, squad_file, tmp_path / "grid.json", strategy_grid=True, grid_seeds=2)
    greedy, sampled = result["strategies"][0], result["strategies"][1]
    assert (greedy["exact_match"], greedy["exact_match_sd"]) == (pytest.approx(60.0), 0.0)
    assert (sampled["exact_match"], sampled["exact_match_sd"]) == (pytest.approx(40.0), pytest.approx(20.0))
    # seed means per question: q1 1, q2 1/2, q3 0 (paragraph mean 1/2); q4 1/2, q5 0 (paragraph mean 1/4)
    assert sampled["exact_match_ci"] == sampled["f1_ci"] == [pytest.approx(25.0), pytest.approx(50.0)]
    assert greedy["exact_match_ci"] == [pytest.approx(50.0), pytest.approx(200 / 3)]  # paragraphs 2/3 and 1/2
    assert sampled["resampled"] == "paragraphs"
    assert result["paragraphs"]["q1"] == result["paragraphs"]["q3"] != result["paragraphs"]["q4"]


def test_grid_diversity_is_per_seed_so_seeds_that_agree_with_greedy_match_it(tmp_path, tiny_gpt2_dir, squad_file,
                                                                             monkeypatch):
    answers = {"q1": "the Denver Broncos", "q2": "Levi's Stadium", "q3": "24-10", "q4": "under the old oak tree",
               "q5": "the number 399"}

    def generate_answer_sets(model, tokenizer, records, settings_list, *, stats, **kwargs):
        for work in stats:
            work.update(prompts_cut=0, prefill_s=0.5, decode_s=0.5)
        return [{r["id"]: answers[r["id"]] for r in records} for _ in settings_list]  # every seed answers alike

    monkeypatch.setattr("loraqa.evaluation.evaluate.generate_answer_sets", generate_answer_sets)
    result = _evaluate(tiny_gpt2_dir, squad_file, tmp_path / "grid.json", strategy_grid=True, grid_seeds=3)
    greedy, sampled = result["strategies"][0], result["strategies"][1]
    assert greedy["distinct_1"] == pytest.approx(12 / 14) and greedy["distinct_2"] == 1.0  # "the" three times
    assert (sampled["distinct_1"], sampled["distinct_2"]) == (greedy["distinct_1"], greedy["distinct_2"])
    assert sampled["seed_disagreement"] == 0.0


@pytest.mark.parametrize("trained, asked, refused", [((20, 0), (20, 0), False), ((20, 0), (10, 0), False),
                                                     ((20, 0), (25, 0), True), ((20, 0), (20, 1), True),
                                                     ((0, 0), (20, 0), True)])
def test_heldout_evaluation_of_an_adapter_needs_articles_it_never_trained_on(tmp_path, trained, asked, refused):
    from loraqa.config import ConfigError
    from loraqa.evaluation.evaluate import check_heldout_unseen

    (tmp_path / "run_config.json").write_text(json.dumps({"data": {"heldout_articles": trained[0],
                                                                   "subset_seed": trained[1]}}))
    if refused:
        with pytest.raises(ConfigError, match=r"run_config.json held out \d+ articles .* include articles it trained on"):
            check_heldout_unseen(str(tmp_path), *asked)
    else:
        check_heldout_unseen(str(tmp_path), *asked)
    check_heldout_unseen(None, *asked)  # the untuned model trained on nothing


def test_the_best_span_strategy_is_scored_on_all_of_dev_with_its_own_flags():
    """`make decoding-full-dev` picks the span-aware grid row with the best F1 (never greedy or a sampled one, however
    good) and evaluates it with flags that give back exactly that row's decoding settings."""
    from loraqa.args import parse_config
    from loraqa.config import ConfigError, GenerationSettings, ModelArguments
    from loraqa.evaluation.evaluate import best_span_strategy, strategy_flags

    def row(f1, **changes):
        return {"f1": f1, "generation": to_dict(dataclasses.replace(GenerationSettings(), **changes))}

    grid = {"strategies": [row(80.0), row(79.0, do_sample=True, top_k=10), row(74.5, constrain_to_context=True),
                           row(75.0, num_beams=2), row(69.0, num_beams=4, constrain_to_context=True)]}
    best = best_span_strategy(grid)
    assert best["f1"] == 75.0 and best["generation"]["num_beams"] == 2
    for chosen in grid["strategies"][2:]:
        _, _, parsed = parse_config((ModelArguments, EvaluateArguments, GenerationSettings),
                                    ["--model", "m"] + strategy_flags(chosen["generation"]))
        assert to_dict(parsed) == chosen["generation"]
    with pytest.raises(ConfigError, match="no span-aware strategy"):
        best_span_strategy({"strategies": grid["strategies"][:2]})


def test_evaluations_record_which_run_their_adapter_was(tmp_path):
    """An export at a fixed path (results/model_checkpoints/final) is replaced when the selection moves: each
    evaluation records the run its adapter came from, so results of the earlier export are never taken for it."""
    from loraqa.evaluation.evaluate import adapter_run

    export = tmp_path / "final"
    export.mkdir()
    assert adapter_run(str(export)) is None and adapter_run(None) is None  # no run_config.json: not a loraqa run
    (export / "run_config.json").write_text(json.dumps({"training": {"output_dir": "results/sweep/final-24333e66"}}))
    assert adapter_run(str(export)) == "final-24333e66"
    (export / "run_config.json").write_text("{not json")
    assert adapter_run(str(export)) is None
