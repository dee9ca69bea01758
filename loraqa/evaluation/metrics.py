"""SQuAD scoring: predictions (id -> text) and gold answers -> exact match and F1.

A faithful re-implementation of the official v1.1 evaluation script (Rajpurkar et al., 2016), which the
`evaluate` library only loads from the hub, plus the v2.0 script's rule for unanswerable questions (no gold
answer: only an empty prediction is right). Pure Python on purpose: no torch, usable anywhere.
"""
from __future__ import annotations

import collections
import re
import string
import warnings
from dataclasses import dataclass

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = frozenset(string.punctuation)


def normalize_answer(text: str) -> str:
    """Lowercase, drop ASCII punctuation and the articles a/an/the, collapse whitespace.

    >>> normalize_answer("The  Denver Broncos!")
    'denver broncos'
    """
    text = text.lower()
    text = "".join(ch for ch in text if ch not in _PUNCTUATION)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def exact_match_score(prediction: str, ground_truth: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(ground_truth))


def f1_score(prediction: str, ground_truth: str) -> float:
    prediction_tokens = normalize_answer(prediction).split()
    ground_truth_tokens = normalize_answer(ground_truth).split()
    common = collections.Counter(prediction_tokens) & collections.Counter(ground_truth_tokens)
    num_same = sum(common.values())
    if num_same == 0:
        return 0.0
    precision = num_same / len(prediction_tokens)
    recall = num_same / len(ground_truth_tokens)
    return 2 * precision * recall / (precision + recall)


def metric_max_over_ground_truths(metric, prediction: str, ground_truths: list[str]) -> float:
    """The best score over the gold answers. A question without any (SQuAD 2.0 unanswerable) scores 1 for an
    answer that normalizes to nothing and 0 otherwise, in EM and F1 alike, as the official v2.0 script does."""
    if not ground_truths:
        return float(not normalize_answer(prediction))
    return max(metric(prediction, gt) for gt in ground_truths)


@dataclass(frozen=True)
class QuestionScore:
    """Scores of one question, in [0, 1]."""

    exact_match: float
    f1: float


def score_questions(predictions: dict[str, str], references: dict[str, list[str]]) -> dict[str, QuestionScore]:
    """Per-question EM/F1 (0 or 1 scale) for every question id in `references`.

    A question without a prediction scores 0, as in the official script, with one warning for all of them.
    """
    scores = {}
    missing = 0
    for qid, ground_truths in references.items():
        if qid not in predictions:
            missing += 1
            scores[qid] = QuestionScore(0.0, 0.0)
            continue
        prediction = predictions[qid]
        scores[qid] = QuestionScore(
            metric_max_over_ground_truths(exact_match_score, prediction, ground_truths),
            metric_max_over_ground_truths(f1_score, prediction, ground_truths),
        )
    if missing:
        warnings.warn(f"{missing} of {len(references)} questions have no prediction and score 0", stacklevel=2)
    return scores


def squad_scores(predictions: dict[str, str], references: dict[str, list[str]]) -> dict[str, float]:
    """The official output: `{"exact_match": .., "f1": ..}` in percent over all reference questions."""
    scores = score_questions(predictions, references)
    total = len(scores)
    if total == 0:
        return {"exact_match": 0.0, "f1": 0.0}
    return {
        "exact_match": 100.0 * sum(s.exact_match for s in scores.values()) / total,
        "f1": 100.0 * sum(s.f1 for s in scores.values()) / total,
    }
