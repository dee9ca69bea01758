"""Result files the report needs that come from a tokenizer or the SQuAD data, written once (the report itself
reads only results): one tokenized example with its labels, and failure examples with their context."""
from __future__ import annotations

import json
import re
from pathlib import Path


# ---------------------------------------------------------------------------------------------- inputs written once

EXAMPLE = {"id": "56f8ca289b226e1400dd1007", "title": "Martin_Luther",  # a short SQuAD v1.1 dev paragraph
           "context": "A piece of paper was later found on which Luther had written his last statement. The "
                      "statement was in Latin, apart from \"We are beggars,\" which was in German.",
           "question": "What was later discovered written by Luther?",
           "answers": {"text": ["his last statement"], "answer_start": [64]}}


def label_example(tokenizer, record: dict = EXAMPLE, max_length: int = 512) -> dict:
    """One training row as `loraqa.data.squad` builds it: each token's text, its label and whether it is prompt,
    answer or EOS (the report's label-masking figure)."""
    from ..data.squad import IGNORE_INDEX, preprocess_function

    columns = {k: [record[k]] for k in ("context", "question", "answers")}
    row = preprocess_function(columns, tokenizer, max_length=max_length)
    ids, labels = row["input_ids"][0], row["labels"][0]
    tokens = []
    for position, (token, label) in enumerate(zip(ids, labels)):
        kind = "prompt" if label == IGNORE_INDEX else ("eos" if position == len(ids) - 1 else "answer")
        text = tokenizer.decode([token]) if kind != "eos" else tokenizer.eos_token
        text = text.replace(" ", "␣").replace("\n", "↵")
        tokens.append({"id": token, "text": text, "label": label, "kind": kind})
    return {"tokenizer": str(getattr(tokenizer, "name_or_path", "")), "record": record, "tokens": tokens,
            "prompt_tokens": sum(t["kind"] == "prompt" for t in tokens),
            "target_tokens": sum(t["kind"] != "prompt" for t in tokens)}


def write_label_example(tokenizer, output: str | Path = "results/label_example.json") -> dict:
    example = label_example(tokenizer)
    Path(output).write_text(json.dumps(example, indent=1, ensure_ascii=False) + "\n")
    return example


def _window(context: str, start: int, end: int, words: int) -> tuple[int, int]:
    """Character window of `words` words either side of [start, end), cut at spaces."""
    lo, hi = start, end
    for _ in range(words):
        lo = context.rfind(" ", 0, max(lo - 1, 0)) + 1 if lo > 0 else 0
        nxt = context.find(" ", hi + 1)
        hi = len(context) if nxt < 0 else nxt
    return lo, hi


def excerpt(context: str, gold: tuple[int, int] | None, predicted: tuple[int, int] | None, words: int = 8) -> dict:
    """Windows of `context` around the gold span and the predicted span (merged when they overlap), joined
    by ' … ', with both spans' positions in the excerpt: {"excerpt", "spans": [[start, end, kind]]}. With
    neither span (an unanswerable question answered off the context) the excerpt is the context's start."""
    marks = ([(*gold, "gold")] if gold else []) + ([(*predicted, "prediction")] if predicted else [])
    windows = sorted(_window(context, s, e, words) for s, e, _ in marks or [(0, 0, None)])
    merged = [list(windows[0])]
    for lo, hi in windows[1:]:
        if lo <= merged[-1][1]:
            merged[-1][1] = max(hi, merged[-1][1])
        else:
            merged.append([lo, hi])
    text, offsets = "", []
    for lo, hi in merged:
        text += ("… " if lo > 0 else "") if not text else " … "
        offsets.append((lo, hi, len(text) - lo))
        text += context[lo:hi]
    if merged[-1][1] < len(context):
        text += " …"
    spans = [[s + shift, e + shift, kind] for s, e, kind in marks for lo, hi, shift in offsets if lo <= s and e <= hi]
    return {"excerpt": text, "spans": spans}


def failure_examples(eval_path: str, data_path: str | None = None, *, per_category: int = 1) -> dict:
    """Failure categories over an evaluation and a few examples with a context excerpt (gold and predicted
    spans marked), for the report: {evaluation, n, counts: {category: count}, by_question_type: {type: {n,
    exact_match, f1}} (0-100), examples: [...]}. The examples come from different articles where the data
    allows (dev order would take them all from its first one)."""
    from ..evaluation.analysis import evaluated_records, failure_category, read_evaluation, scores_by_question_type
    from ..evaluation.metrics import normalize_answer

    result = read_evaluation(eval_path)
    records = evaluated_records(result, eval_path, data_path)
    counts: dict[str, int] = {}
    candidates: dict[str, list[tuple[str, dict]]] = {}
    for qid, score in result["per_question"].items():
        record, prediction = records[qid], result["predictions"].get(qid, "")
        category = failure_category(prediction, record["answers"]["text"], record["context"],
                                    score["exact_match"], score["f1"])
        counts[category] = counts.get(category, 0) + 1
        if category != "correct":
            candidates.setdefault(category, []).append((qid, score))
    examples, articles = [], set()
    for category, found in candidates.items():
        for _ in range(min(per_category, len(found))):
            pick = next((c for c in found if records[c[0]]["title"] not in articles), found[0])
            found.remove(pick)
            qid, score = pick
            record, prediction = records[qid], result["predictions"].get(qid, "")
            articles.add(record["title"])
            context, answers = record["context"], record["answers"]
            start = answers["answer_start"][0] if answers["text"] else 0  # SQuAD v2: unanswerable has no span
            gold = (start, start + len(answers["text"][0])) if answers["text"] else None
            found_at = [m.start() for m in re.finditer(re.escape(prediction), context)] if prediction.strip() else []
            nearest = min(found_at, key=lambda at: abs(at - start), default=None)
            predicted = (nearest, nearest + len(prediction)) if nearest is not None else None
            distinct: dict[str, str] = {}  # one gold per normalised form (SQuAD lists an answer per annotator)
            for text in answers["text"]:
                distinct.setdefault(normalize_answer(text), text)
            examples.append({"id": qid, "category": category, "question": record["question"].strip(),
                             "title": record["title"], "gold": list(distinct.values()),
                             "prediction": prediction, "exact_match": score["exact_match"], "f1": score["f1"],
                             **excerpt(context, gold, predicted)})
    return {"evaluation": str(eval_path), "model": result.get("model"), "adapter": result.get("adapter"),
            "adapter_run": result.get("adapter_run"), "n": len(result["per_question"]), "counts": counts,
            "by_question_type": scores_by_question_type({q: records[q]["question"] for q in result["per_question"]},
                                                        result["per_question"]),
            "examples": examples}

