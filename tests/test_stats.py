import numpy as np
import pytest
from scipy.stats import binomtest

from loraqa.evaluation.stats import bootstrap_ci, holm, mcnemar_pvalue, paired_comparison, paired_permutation_pvalue


def test_bootstrap_ci_matches_the_normal_approximation():
    values = np.array([1.0] * 200 + [0.0] * 200)
    low, high = bootstrap_ci(values, seed=0)
    half = 1.96 * np.sqrt(0.25 / 400)
    assert low == pytest.approx(0.5 - half, abs=0.01) and high == pytest.approx(0.5 + half, abs=0.01)
    assert bootstrap_ci([0.7] * 50) == [pytest.approx(0.7), pytest.approx(0.7)]
    assert bootstrap_ci(values, seed=0) == [low, high]  # seeded


def test_permutation_test_detects_a_shift_and_not_noise():
    rng = np.random.default_rng(0)
    a = rng.uniform(size=200)
    assert paired_permutation_pvalue(a + 0.1 + rng.normal(0, 0.05, 200), a) < 0.001
    assert paired_permutation_pvalue(a + rng.normal(0, 0.05, 200), a) > 0.05
    assert paired_permutation_pvalue(a, a) == 1.0


def test_mcnemar_counts_discordant_pairs_exactly():
    a = [1] * 8 + [0] * 1 + [1] * 5 + [0] * 6
    b = [0] * 8 + [1] * 1 + [1] * 5 + [0] * 6
    result = mcnemar_pvalue(a, b)
    assert result["only_a_correct"] == 8 and result["only_b_correct"] == 1
    assert result["p_value"] == pytest.approx(binomtest(8, 9, 0.5).pvalue) == pytest.approx(0.0390625)


def test_paired_comparison_on_common_questions():
    a = {f"q{i}": {"exact_match": 0.0, "f1": 0.2} for i in range(50)}
    b = {f"q{i}": {"exact_match": 1.0, "f1": 0.7} for i in range(40)}  # 40 in common
    b["extra"] = {"exact_match": 0.0, "f1": 0.0}
    r = paired_comparison(a, b)
    assert r["n_common"] == 40
    assert r["exact_match"]["delta"] == pytest.approx(100.0) and r["f1"]["delta"] == pytest.approx(50.0)
    assert r["exact_match"]["mcnemar"]["only_b_correct"] == 40 and r["exact_match"]["mcnemar"]["p_value"] < 1e-10
    assert r["f1"]["delta_ci"] == [pytest.approx(50.0), pytest.approx(50.0)]
    assert r["f1"]["permutation_p_value"] < 0.001


def test_cluster_bootstrap_of_paragraph_constant_scores_is_the_bootstrap_of_paragraph_means():
    rng = np.random.default_rng(1)
    paragraph_scores = rng.integers(0, 2, 40).astype(float)
    values = np.repeat(paragraph_scores, 5)  # five questions per paragraph, all scored alike
    clusters = np.repeat([f"p{i:02d}" for i in range(40)], 5)  # labels sort in paragraph order
    clustered = bootstrap_ci(values, clusters=clusters, seed=0)
    assert clustered == [pytest.approx(x) for x in bootstrap_ci(paragraph_scores, seed=0)]
    questions = bootstrap_ci(values, seed=0)
    width = lambda ci: ci[1] - ci[0]  # noqa: E731
    assert width(clustered) / width(questions) == pytest.approx(np.sqrt(5), rel=0.15)  # 40 units, not 200


def test_cluster_bootstrap_averages_over_the_questions_drawn():
    # paragraph "a": 3 questions scoring 1; "b": 1 question scoring 0. Resamples: aa (p=1/4) -> 1,
    # ab (1/2) -> 3/4 (a question mean, not the paragraph means' 1/2), bb (1/4) -> 0
    values, clusters = [1.0, 1.0, 1.0, 0.0], ["a", "a", "a", "b"]
    assert bootstrap_ci(values, clusters=clusters, confidence=0.4) == [pytest.approx(0.75), pytest.approx(0.75)]
    assert bootstrap_ci(values, clusters=clusters) == [0.0, 1.0]
    with pytest.raises(ValueError, match="clusters: 3 labels for 4 values"):
        bootstrap_ci(values, clusters=clusters[:3])


def test_permutation_test_flips_whole_paragraphs():
    diff = np.repeat([0.5] * 10, 20)  # 10 paragraphs of 20 questions, every difference positive
    clusters = np.repeat(np.arange(10), 20)
    assert paired_permutation_pvalue(diff, np.zeros(200)) == pytest.approx(1 / 10_001)
    # only the all-plus and all-minus flips of 10 paragraphs reach the observed mean: p = 2 / 2**10
    assert paired_permutation_pvalue(diff, np.zeros(200), clusters=clusters) == pytest.approx(2 / 1024, abs=0.001)


def test_holm_matches_a_hand_worked_example():
    # sorted: 0.005 * 4 = 0.02, 0.01 * 3 = 0.03, 0.03 * 2 = 0.06, 0.04 * 1 = 0.04 -> 0.06 (monotone)
    assert holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert holm([0.5, 0.3]) == pytest.approx([0.6, 0.6])  # 0.3 * 2 = 0.6; 0.5 * 1 raised to 0.6 (monotone)
    assert holm([0.7, 0.9]) == [1.0, 1.0]  # 0.7 * 2 capped at 1
    assert holm([0.02]) == [0.02] and holm([]) == []


def test_paired_comparison_resamples_paragraphs_when_given():
    ids = [f"q{i}" for i in range(12)]
    a = {q: {"exact_match": 0.0, "f1": 0.0} for q in ids}
    b = {q: {"exact_match": float(i < 8), "f1": float(i < 8)} for i, q in enumerate(ids)}
    paragraphs = {q: "p1" if i < 6 else "p2" for i, q in enumerate(ids)}  # p1 gains 6 of 6 questions, p2 2 of 6
    r = paired_comparison(a, b, paragraphs=paragraphs)
    assert r["resampled"] == "paragraphs"
    # resamples p1 p1 -> 100, p1 p2 -> 66.7, p2 p2 -> 33.3 points
    assert r["f1"]["delta_ci"] == r["exact_match"]["delta_ci"] == [pytest.approx(100 / 3), pytest.approx(100.0)]
    # flips of the paragraph sums 6 and 2: |+-6 +-2| reaches 8 in half of them
    assert r["f1"]["permutation_p_value"] == pytest.approx(0.5, abs=0.02)
    plain = paired_comparison(a, b)  # 8 independent +1s: p = 2 / 2**8
    assert plain["resampled"] == "questions" and plain["f1"]["permutation_p_value"] == pytest.approx(2 / 256, abs=0.003)


def test_format_p_never_writes_the_permutation_floor_as_equal():
    from loraqa.evaluation.stats import PERMUTATION_RESAMPLES, format_p

    floor = 1 / (PERMUTATION_RESAMPLES + 1)
    assert format_p(floor) == "< 1e-4" and format_p(floor, relation=False) == "< 1e-4"
    assert format_p(2 * floor) == "= 2e-4" and format_p(0.0421) == "= 0.042" and format_p(0.5, relation=False) == "0.5"
    assert format_p(1 / 101, resamples=100) == "< 0.01" and format_p(1 / 100, resamples=99) == "<= 0.01"
    # an exact test (McNemar) has no floor: tiny values are printed, an underflowed 0 as a bound
    assert format_p(3.14e-12, resamples=None) == "= 3.1e-12" and format_p(0.0, resamples=None) == "< 1e-300"
    assert format_p(floor, number=lambda x: f"{x:.1e}") == "< 1.0e-04"


def _evaluation(scores: dict[str, float], paragraphs: dict[str, str]) -> dict:
    return {"per_question": {q: {"f1": f, "exact_match": float(f == 1.0)} for q, f in scores.items()},
            "questions": {q: {"paragraph": p} for q, p in paragraphs.items()}}


def test_main_effect_contrasts_pair_questions_over_the_other_factors():
    from loraqa.study.collect import main_effect_contrasts
    from loraqa.evaluation.stats import PERMUTATION_RESAMPLES

    rng = np.random.default_rng(1)
    ids = [f"q{i}" for i in range(40)]
    paragraphs = {q: f"p{i // 4}" for i, q in enumerate(ids)}
    spec = {"grid": {"target_modules": ["attention", "attention+mlp"], "learning_rate": [1e-4, 2e-4, 5e-4],
                     "rank": [{"lora_r": 4, "lora_alpha": 8}, {"lora_r": 16, "lora_alpha": 32}]}}
    grid, f1 = [], {}
    for target in spec["grid"]["target_modules"]:
        for lr, validation in zip(spec["grid"]["learning_rate"], (50.0, 70.0, 60.0)):  # 1e-4 worst, 2e-4 best
            for rank in spec["grid"]["rank"]:
                scores = {q: float(rng.uniform()) for q in ids}
                f1[(target, lr, rank["lora_r"])] = scores
                grid.append({"run_id": f"{target}-{lr}-{rank['lora_r']}",
                             "grid_point": {"target_modules": target, "learning_rate": lr, "rank": rank},
                             "scores": {"validation": {"f1": validation + rank["lora_r"]}},
                             "_evaluations": {"test": _evaluation(scores, paragraphs)}})
    tests = {t["name"]: t for t in main_effect_contrasts(spec, grid, "test", "validation")}
    assert set(tests) == {"main effect target_modules=attention vs target_modules=attention+mlp",
                          "main effect learning_rate=0.0001 vs learning_rate=0.0002",
                          "main effect rank=lora_r=4,lora_alpha=8 vs rank=lora_r=16,lora_alpha=32"}
    rate = tests["main effect learning_rate=0.0001 vs learning_rate=0.0002"]
    # the reference: per question, the mean over the 4 (targets x ranks) pairs of B - A
    delta = np.array([100 * np.mean([f1[(t, 2e-4, r)][q] - f1[(t, 1e-4, r)][q] for t in spec["grid"]["target_modules"]
                                     for r in (4, 16)]) for q in ids])
    clusters = [paragraphs[q] for q in ids]
    assert rate["n"] == 40 and len(rate["pairs"]) == 4
    assert rate["delta_f1"] == pytest.approx(delta.mean())
    assert rate["delta_f1_ci"] == pytest.approx(bootstrap_ci(delta, clusters=clusters, seed=0))
    assert rate["p_value"] == pytest.approx(paired_permutation_pvalue(delta, np.zeros(40), clusters=clusters, seed=0))
    assert rate["permutation_resamples"] == PERMUTATION_RESAMPLES
    # a rate only some rows have (a row extension) is left out of the rate contrast, and unmatched runs of pairs
    grid.append({**grid[0], "run_id": "extension", "grid_point": {**grid[0]["grid_point"], "learning_rate": 1e-3},
                 "scores": {"validation": {"f1": 99.0}}})
    again = {t["name"]: t for t in main_effect_contrasts(spec, grid, "test", "validation")}
    assert again["main effect learning_rate=0.0001 vs learning_rate=0.0002"]["delta_f1"] == pytest.approx(delta.mean())
    assert len(again["main effect rank=lora_r=4,lora_alpha=8 vs rank=lora_r=16,lora_alpha=32"]["pairs"]) == 6
