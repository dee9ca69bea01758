import numpy as np
import pytest
from scipy.stats import binomtest

from loraqa.stats import bootstrap_ci, mcnemar_pvalue, paired_comparison, paired_permutation_pvalue


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
