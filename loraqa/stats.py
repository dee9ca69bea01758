"""Per-question scores -> confidence intervals and paired significance tests.

Bootstrap CIs resample questions (percentile method, seeded). Paired comparisons use the questions two
runs have in common: the F1 difference gets a bootstrap CI and a paired sign-flip permutation test,
the EM difference a bootstrap CI and McNemar's exact test on the discordant pairs.
"""
from __future__ import annotations

import numpy as np
from scipy.stats import binomtest


def bootstrap_ci(values, *, confidence: float = 0.95, resamples: int = 10_000, seed: int = 0) -> list[float]:
    """Percentile bootstrap CI of the mean of `values` (same scale as the values)."""
    values = np.asarray(values, dtype=float)
    if len(values) == 0:
        return [float("nan"), float("nan")]
    rng = np.random.default_rng(seed)
    means = np.empty(resamples)
    for start in range(0, resamples, 1000):  # chunks keep memory flat for large n
        stop = min(start + 1000, resamples)
        means[start:stop] = values[rng.integers(0, len(values), (stop - start, len(values)))].mean(axis=1)
    alpha = (1 - confidence) / 2
    return [float(np.quantile(means, alpha)), float(np.quantile(means, 1 - alpha))]


PERMUTATION_RESAMPLES = 10_000  # p >= 1/10,001: the smallest value the permutation test can report


def paired_permutation_pvalue(a, b, *, resamples: int = PERMUTATION_RESAMPLES, seed: int = 0) -> float:
    """Two-sided p-value of mean(a - b) = 0 by random sign flips of the paired differences."""
    diff = np.asarray(a, dtype=float) - np.asarray(b, dtype=float)
    if len(diff) == 0 or not diff.any():
        return 1.0
    observed = abs(diff.mean())
    rng = np.random.default_rng(seed)
    hits = 0
    for start in range(0, resamples, 1000):
        stop = min(start + 1000, resamples)
        signs = rng.choice([-1.0, 1.0], size=(stop - start, len(diff)))
        hits += int((np.abs((signs * diff).mean(axis=1)) >= observed - 1e-12).sum())
    return (hits + 1) / (resamples + 1)


def mcnemar_pvalue(a_correct, b_correct) -> dict:
    """McNemar's exact test for paired binary outcomes: counts of discordant pairs and the p-value."""
    a = np.asarray(a_correct, dtype=bool)
    b = np.asarray(b_correct, dtype=bool)
    only_a, only_b = int((a & ~b).sum()), int((~a & b).sum())
    p = 1.0 if only_a + only_b == 0 else float(binomtest(only_a, only_a + only_b, 0.5).pvalue)
    return {"only_a_correct": only_a, "only_b_correct": only_b, "p_value": p}


def paired_comparison(a: dict[str, dict], b: dict[str, dict], *, seed: int = 0) -> dict:
    """Compare per-question scores {id: {"exact_match", "f1"}} (0..1) of runs A and B on common ids.

    Deltas are B - A in percentage points.
    """
    common = sorted(set(a) & set(b))
    em_a = np.array([a[q]["exact_match"] for q in common])
    em_b = np.array([b[q]["exact_match"] for q in common])
    f1_a = np.array([a[q]["f1"] for q in common])
    f1_b = np.array([b[q]["f1"] for q in common])
    em_delta, f1_delta = 100 * (em_b - em_a), 100 * (f1_b - f1_a)
    return {
        "n_common": len(common),
        "exact_match": {"a": 100 * em_a.mean() if common else None, "b": 100 * em_b.mean() if common else None,
                        "delta": em_delta.mean() if common else None,
                        "delta_ci": bootstrap_ci(em_delta, seed=seed),
                        "mcnemar": mcnemar_pvalue(em_a > 0.5, em_b > 0.5)},
        "f1": {"a": 100 * f1_a.mean() if common else None, "b": 100 * f1_b.mean() if common else None,
               "delta": f1_delta.mean() if common else None,
               "delta_ci": bootstrap_ci(f1_delta, seed=seed),
               "permutation_p_value": paired_permutation_pvalue(f1_b, f1_a, resamples=PERMUTATION_RESAMPLES,
                                                                seed=seed),
               "permutation_resamples": PERMUTATION_RESAMPLES},
    }
