"""Per-question scores -> confidence intervals, paired significance tests and multiple-test corrections.

Questions on one paragraph are not independent (every subset is taken paragraph by paragraph), so when
the paragraph of each question is known the bootstrap resamples whole paragraphs (cluster bootstrap)
and the permutation test flips the signs of a whole paragraph's differences together; without it, each
question is its own cluster. Bootstrap CIs are percentile intervals, seeded. Paired comparisons use the
questions two runs have in common: the F1 difference gets a bootstrap CI and a paired sign-flip
permutation test, the EM difference a bootstrap CI and McNemar's exact test on the discordant pairs
(question level). `holm` adjusts the p-values of several comparisons made together.
"""
from __future__ import annotations

import math

import numpy as np


def _cluster_sums(values: np.ndarray, clusters) -> tuple[np.ndarray, np.ndarray]:
    """Per-cluster sums and sizes of `values`; every value its own cluster when `clusters` is None.

    [1, 0, 1], clusters ["p", "q", "p"] -> sums [2, 0], sizes [2, 1]
    """
    if clusters is None:
        return values, np.ones(len(values))
    if len(clusters) != len(values):
        raise ValueError(f"clusters: {len(clusters)} labels for {len(values)} values")
    _, index = np.unique(np.asarray(clusters, dtype=str), return_inverse=True)
    return np.bincount(index, weights=values), np.bincount(index).astype(float)


def bootstrap_ci(values, *, clusters=None, confidence: float = 0.95, resamples: int = 10_000,
                 seed: int = 0) -> list[float]:
    """Percentile bootstrap CI of the mean of `values` (same scale as the values).

    With `clusters` (one label per value, e.g. its paragraph) whole clusters are resampled and each
    resample's mean is over the questions it drew, so correlated questions widen the interval as they should.
    """
    values = np.asarray(values, dtype=float)
    if len(values) == 0:
        return [float("nan"), float("nan")]
    sums, sizes = _cluster_sums(values, clusters)
    rng = np.random.default_rng(seed)
    means = np.empty(resamples)
    for start in range(0, resamples, 1000):  # chunks keep memory flat for large n
        stop = min(start + 1000, resamples)
        drawn = rng.integers(0, len(sums), (stop - start, len(sums)))
        means[start:stop] = sums[drawn].sum(axis=1) / sizes[drawn].sum(axis=1)
    alpha = (1 - confidence) / 2
    return [float(np.quantile(means, alpha)), float(np.quantile(means, 1 - alpha))]


PERMUTATION_RESAMPLES = 10_000  # p >= 1/10,001: the smallest value the permutation test can report


def paired_permutation_pvalue(a, b, *, clusters=None, resamples: int = PERMUTATION_RESAMPLES, seed: int = 0) -> float:
    """Two-sided p-value of mean(a - b) = 0 by random sign flips of the paired differences, one sign per
    cluster when `clusters` is given (under the null a whole paragraph's differences swap together)."""
    diff = np.asarray(a, dtype=float) - np.asarray(b, dtype=float)
    if len(diff) == 0 or not diff.any():
        return 1.0
    sums, _ = _cluster_sums(diff, clusters)
    observed = abs(sums.sum())
    rng = np.random.default_rng(seed)
    hits = 0
    for start in range(0, resamples, 1000):
        stop = min(start + 1000, resamples)
        signs = rng.choice([-1.0, 1.0], size=(stop - start, len(sums)))
        hits += int((np.abs(signs @ sums) >= observed - 1e-9).sum())
    return (hits + 1) / (resamples + 1)


def _plain(x: float) -> str:
    """0.0421 -> '0.042', 1e-4 -> '1e-4', 3.14e-12 -> '3.1e-12'."""
    if x >= 1e-3:
        return f"{x:.2g}"
    mantissa, exponent = f"{x:.1e}".split("e")
    return f"{float(mantissa):g}e{int(exponent)}"


def format_p(p: float, *, resamples: int | None = PERMUTATION_RESAMPLES, number=_plain,
             relation: bool = True) -> str:
    """A p-value for print: '= 0.042' (`relation`) or '0.042'; at the permutation test's floor, 1 / (resamples
    + 1) (no resample reached the observed difference), a bound instead, never '=': '< 1e-4'. `number` formats
    the value (the report passes its Typst one); `resamples=None` for a p-value with no floor (McNemar's).

    0.0421 -> '= 0.042'; 1 / 10_001 -> '< 1e-4'; 1 / 101 with resamples=100 -> '< 0.01'
    """
    if not resamples and p <= 0:  # an exact p that underflowed
        return f"< {number(1e-300)}"
    floor = 1 / (resamples + 1) if resamples else 0.0
    if p > floor * (1 + 1e-9):
        return f"= {number(p)}" if relation else number(p)
    bound = 10.0 ** math.ceil(math.log10(floor))  # the power of ten at or just above the floor
    return f"{'<' if floor < bound else '<='} {number(bound)}"


def mcnemar_pvalue(a_correct, b_correct) -> dict:
    """McNemar's exact test for paired binary outcomes: counts of discordant pairs and the p-value."""
    from scipy.stats import binomtest  # heavy: only when a test is run (the report imports format_p)

    a = np.asarray(a_correct, dtype=bool)
    b = np.asarray(b_correct, dtype=bool)
    only_a, only_b = int((a & ~b).sum()), int((~a & b).sum())
    p = 1.0 if only_a + only_b == 0 else float(binomtest(only_a, only_a + only_b, 0.5).pvalue)
    return {"only_a_correct": only_a, "only_b_correct": only_b, "p_value": p}


def holm(p_values) -> list[float]:
    """Holm-Bonferroni step-down adjusted p-values, in the input order: reject where adjusted p <= alpha.

    The k-th smallest of m p-values is multiplied by m - k + 1, then made non-decreasing and capped at 1:
    [0.01, 0.04, 0.03] -> [0.03, 0.06, 0.06]
    """
    p = np.asarray(p_values, dtype=float)
    order = np.argsort(p, kind="stable")
    stepped = np.maximum.accumulate(p[order] * (len(p) - np.arange(len(p))))
    adjusted = np.empty(len(p))
    adjusted[order] = np.minimum(stepped, 1.0)
    return adjusted.tolist()


def paired_comparison(a: dict[str, dict], b: dict[str, dict], *, paragraphs: dict[str, str] | None = None,
                      seed: int = 0) -> dict:
    """Compare per-question scores {id: {"exact_match", "f1"}} (0..1) of runs A and B on common ids.

    Deltas are B - A in percentage points. With `paragraphs` (id -> paragraph key) the CIs and the
    permutation test resample paragraphs; `resampled` says which was done.
    """
    common = sorted(set(a) & set(b))
    clusters = [paragraphs[q] for q in common] if paragraphs is not None else None
    em_a = np.array([a[q]["exact_match"] for q in common])
    em_b = np.array([b[q]["exact_match"] for q in common])
    f1_a = np.array([a[q]["f1"] for q in common])
    f1_b = np.array([b[q]["f1"] for q in common])
    em_delta, f1_delta = 100 * (em_b - em_a), 100 * (f1_b - f1_a)
    return {
        "n_common": len(common),
        "resampled": "paragraphs" if clusters is not None else "questions",
        "exact_match": {"a": 100 * em_a.mean() if common else None, "b": 100 * em_b.mean() if common else None,
                        "delta": em_delta.mean() if common else None,
                        "delta_ci": bootstrap_ci(em_delta, clusters=clusters, seed=seed),
                        "mcnemar": mcnemar_pvalue(em_a > 0.5, em_b > 0.5)},
        "f1": {"a": 100 * f1_a.mean() if common else None, "b": 100 * f1_b.mean() if common else None,
               "delta": f1_delta.mean() if common else None,
               "delta_ci": bootstrap_ci(f1_delta, clusters=clusters, seed=seed),
               "permutation_p_value": paired_permutation_pvalue(f1_b, f1_a, clusters=clusters, seed=seed),
               "permutation_resamples": PERMUTATION_RESAMPLES},
    }
