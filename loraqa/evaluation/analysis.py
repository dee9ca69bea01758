"""Evaluation JSONs -> paired comparisons and failure reports. Reads result files, never models (no torch).

`compare` pairs two single-setting evaluations question by question (see `stats.paired_comparison`),
resampling paragraphs when the files record them; `failure_report` sorts the misses into named categories
and scores each question type.
"""
from __future__ import annotations

import json
import re
from collections import defaultdict
from pathlib import Path


from ..data.squad import SquadFormatError, load_squad
from .metrics import normalize_answer
from .stats import paired_comparison


def read_evaluation(path: str) -> dict:
    """An evaluation JSON with per-question scores, or one clear error."""
    try:
        result = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise SquadFormatError(f"{path}: not a readable evaluation JSON ({err})") from None
    if not isinstance(result, dict) or not isinstance(result.get("per_question"), dict):
        raise SquadFormatError(f"{path}: field 'per_question' is missing (write it with `loraqa evaluate`)")
    return result


def _paragraphs(result: dict, ids) -> dict[str, str] | None:
    """id -> paragraph key for `ids` from an evaluation's `questions`; None for files written before
    evaluations recorded paragraphs."""
    questions = result.get("questions") or {}
    keys = {q: (questions.get(q) or {}).get("paragraph") for q in ids}
    return keys if all(keys.values()) else None


def compare(a_path: str, b_path: str, *, seed: int = 0) -> dict:
    """Paired comparison of two evaluations of the same data on their common questions (deltas are B - A),
    and how many of their answers differ (where both files hold predictions)."""
    a, b = read_evaluation(a_path), read_evaluation(b_path)
    if a.get("data_hash") and b.get("data_hash") and a["data_hash"] != b["data_hash"]:
        raise SquadFormatError(f"{a_path} and {b_path}: field 'data_hash' differs: they were scored on different "
                               "data (file, subset size or subset_seed)")
    common = a["per_question"].keys() & b["per_question"].keys()
    if not common:
        raise SquadFormatError(f"{a_path} and {b_path}: no question id in common in field 'per_question'")
    paragraphs = _paragraphs(a, common) or _paragraphs(b, common)
    result = paired_comparison(a["per_question"], b["per_question"], paragraphs=paragraphs, seed=seed)
    answers_a, answers_b = a.get("predictions") or {}, b.get("predictions") or {}
    answered = answers_a.keys() & answers_b.keys() & common
    differ = {"answers_differ": sum(answers_a[q] != answers_b[q] for q in answered)} if answered else {}
    return {"a": a_path, "b": b_path, **result, **differ}


QUESTION_TYPES = ("how many", "how much", "who", "whom", "whose", "when", "where", "which", "why", "what", "how")


def question_type(question: str) -> str:
    q = question.lower()
    for word in QUESTION_TYPES:
        if re.search(rf"\b{word}\b", q):
            return word
    return "other"


def scores_by_question_type(questions: dict[str, str], per_question: dict[str, dict]) -> dict[str, dict]:
    """{question word: {n, exact_match, f1}} (0-100), most frequent word first; `questions`: id -> question."""
    types: dict[str, list[dict]] = defaultdict(list)
    for qid, score in per_question.items():
        types[question_type(questions[qid])].append(score)
    return {t: {"n": len(scores), **{m: 100 * sum(s[m] for s in scores) / len(scores) for m in ("exact_match", "f1")}}
            for t, scores in sorted(types.items(), key=lambda kv: -len(kv[1]))}


def failure_category(prediction: str, golds: list[str], context: str, em: float, f1: float) -> str:
    """correct / empty / answered an unanswerable question / not in context / extra words / partial overlap /
    wrong span."""
    if em >= 1.0:
        return "correct"
    if not prediction.strip():
        return "empty answer"
    if not golds:
        return "answered an unanswerable question"
    pred_norm = normalize_answer(prediction)
    if pred_norm not in normalize_answer(context):
        return "answer not in context"
    pred_words = f" {pred_norm} "
    if any(normalize_answer(g) and f" {normalize_answer(g)} " in pred_words for g in golds):
        return "right answer with extra words"
    if f1 > 0:
        return "partial overlap"
    return "wrong span of the context"


def evaluated_records(result: dict, eval_path: str, data_path: str | None = None) -> dict[str, dict]:
    """id -> SQuAD record for every question of an evaluation (`read_evaluation`'s `result`), from `data_path`
    or else the file the evaluation names in its field 'data'; one clear error when an id is not in it."""
    if data_path is None and not isinstance(result.get("data"), str):
        raise SquadFormatError(f"{eval_path}: field 'data' is missing or not a path: pass the SQuAD file with --data")
    if not isinstance(result.get("predictions"), dict):
        raise SquadFormatError(f"{eval_path}: field 'predictions' is missing or not an object (write it with "
                               "`loraqa evaluate`)")
    source = data_path or result["data"]
    records = {r["id"]: r for r in load_squad(source, "validation")}
    missing = [qid for qid in result["per_question"] if qid not in records]
    if missing:
        raise SquadFormatError(f"{eval_path}: {len(missing)} of {len(result['per_question'])} question ids in field "
                               f"'per_question' are not in {source} (first: {missing[0]!r}); pass the data it was "
                               "evaluated on with --data")
    return records


def failure_report(eval_path: str, data_path: str | None = None, examples_per_category: int = 3) -> str:
    """Markdown: counts and examples per failure category, EM/F1 per question type."""
    result = read_evaluation(eval_path)
    records = evaluated_records(result, eval_path, data_path)
    categories: dict[str, list[str]] = defaultdict(list)
    for qid, score in result["per_question"].items():
        record = records[qid]
        prediction = result["predictions"].get(qid, "")
        category = failure_category(prediction, record["answers"]["text"], record["context"],
                                    score["exact_match"], score["f1"])
        categories[category].append(qid)
    n = len(result["per_question"])
    lines = [f"# Failure analysis: {eval_path}", "",
             f"{n} questions; EM {result['exact_match']:.1f}, F1 {result['f1']:.1f}.", "",
             "| category | count | share |", "|---|---|---|"]
    for category, ids in sorted(categories.items(), key=lambda kv: -len(kv[1])):
        lines.append(f"| {category} | {len(ids)} | {100 * len(ids) / n:.1f}% |")
    lines += ["", "| question type | count | EM | F1 |", "|---|---|---|---|"]
    questions = {qid: records[qid]["question"] for qid in result["per_question"]}
    for qtype, s in scores_by_question_type(questions, result["per_question"]).items():
        lines.append(f"| {qtype} | {s['n']} | {s['exact_match']:.1f} | {s['f1']:.1f} |")
    for category, ids in categories.items():
        if category == "correct":
            continue
        lines += ["", f"## {category}", ""]
        for qid in ids[:examples_per_category]:
            record = records[qid]
            golds = " / ".join(f"`{g}`" for g in dict.fromkeys(record["answers"]["text"])) or "none (unanswerable)"
            lines.append(f"- **{record['question'].strip()}** predicted `{result['predictions'].get(qid, '')}`; "
                         f"gold {golds}")
    return "\n".join(lines) + "\n"
