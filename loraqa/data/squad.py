"""SQuAD records -> prompt and answer token ids with answer-only labels.

Input: SQuAD-format JSON (v1.1 or v2.0 shape) or a hub dataset. Output: rows of `input_ids`, `labels`
(-100 on every prompt token), `context_length` (how many leading tokens are the context) and
`context_key` (equal for questions that share the same context tokens, which packing relies on).

The prompt is `Context: {context}\\nQuestion: {question}\\nAnswer:` and the target `" " + answer + EOS`.
It is tokenized in pieces (context | question and cue | answer) and the pieces concatenated, so that
1. the answer boundary is exact: the leading space belongs to the answer, as it does in generation;
2. the context's tokens are the same for every question about it, which makes shared-context training
   and prefix-cached decoding exact rather than approximate.
Inference uses the same `encode_prompt`, so training and generation see identical prompt tokens.
"""
from __future__ import annotations

import hashlib
import json
import os
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import numpy as np

if TYPE_CHECKING:
    import datasets

IGNORE_INDEX = -100
CONTEXT_HEADER = "Context:"
QUESTION_TEMPLATE = "\nQuestion: {question}\nAnswer:"

SKIP_UNANSWERABLE = "unanswerable"
SKIP_TOO_LONG = "answer_does_not_fit"


class SquadFormatError(ValueError):
    """A SQuAD file that cannot be used; the message names the file, the record and the field."""


def format_prompt(context: str, question: str) -> str:
    """The prompt string the model sees (before tokenization)."""
    return f"{CONTEXT_HEADER} {context}{QUESTION_TEMPLATE.format(question=question.strip())}"


# ---------------------------------------------------------------------------------------------- loading

def _require(condition: bool, path, record: str, field: str, problem: str) -> None:
    if not condition:
        raise SquadFormatError(f"{path}: record {record}: field '{field}' {problem}")


def read_squad_json(path: str | os.PathLike) -> list[dict]:
    """Flatten a SQuAD v1.1/v2.0 JSON file into records of the Hugging Face `squad` schema, validated.

    {"data": [{"title": t, "paragraphs": [{"context": c, "qas": [{"id", "question", "answers"}]}]}]}
    -> [{"id", "title", "context", "question", "answers": {"text": [...], "answer_start": [...]}}]
    """
    try:
        raw = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise SquadFormatError(f"{path}: file not found") from None
    except IsADirectoryError:
        raise SquadFormatError(f"{path}: is a directory, not a SQuAD JSON file") from None
    except OSError as err:
        raise SquadFormatError(f"{path}: not readable ({err.strerror or err})") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise SquadFormatError(f"{path}: not valid JSON ({err})") from None
    _require(isinstance(raw, dict) and isinstance(raw.get("data"), list), path, "-", "data",
             "is missing or not a list (expected SQuAD format)")
    records, seen = [], set()
    for a, article in enumerate(raw["data"]):
        where = f"data[{a}]"
        _require(isinstance(article, dict) and isinstance(article.get("paragraphs"), list), path, where,
                 "paragraphs", "is missing or not a list")
        title = article.get("title", "")
        for p, paragraph in enumerate(article["paragraphs"]):
            where = f"data[{a}].paragraphs[{p}]"
            _require(isinstance(paragraph, dict) and isinstance(paragraph.get("context"), str), path, where,
                     "context", "is missing or not a string")
            _require(isinstance(paragraph.get("qas"), list), path, where, "qas", "is missing or not a list")
            context = paragraph["context"]
            for q, qa in enumerate(paragraph["qas"]):
                qid = qa.get("id") if isinstance(qa, dict) else None
                record = repr(qid) if qid is not None else f"{where}.qas[{q}]"
                _require(isinstance(qid, str) and qid, path, record, "id", "is missing or empty")
                _require(qid not in seen, path, record, "id", "is a duplicate")
                seen.add(qid)
                _require(isinstance(qa.get("question"), str), path, record, "question", "is missing or not a string")
                _require(isinstance(qa.get("answers"), list), path, record, "answers", "is missing or not a list")
                answers = [] if qa.get("is_impossible") else qa["answers"]
                texts, starts = [], []
                for i, answer in enumerate(answers):
                    field = f"answers[{i}]"
                    _require(isinstance(answer, dict) and isinstance(answer.get("text"), str), path, record,
                             f"{field}.text", "is missing or not a string")
                    start = answer.get("answer_start")
                    _require(isinstance(start, int), path, record, f"{field}.answer_start", "is missing or not an int")
                    _require(context[start:start + len(answer["text"])] == answer["text"], path, record,
                             f"{field}.answer_start",
                             f"= {start} does not index the answer text {answer['text']!r} in the context")
                    texts.append(answer["text"])
                    starts.append(start)
                records.append({"id": qid, "title": title, "context": context, "question": qa["question"],
                                "answers": {"text": texts, "answer_start": starts}})
    return records


def load_squad(source: str, split: str = "train") -> datasets.Dataset:
    """A SQuAD-format JSON file, or a hub dataset name (e.g. rajpurkar/squad), as a `datasets.Dataset`."""
    import datasets  # here, not at the top: `loraqa score` reads SQuAD files without it

    if Path(source).exists() or source.endswith(".json"):
        records = read_squad_json(source)
        if not records:
            raise SquadFormatError(f"{source}: no questions in the file")
        return datasets.Dataset.from_list(records)
    return datasets.load_dataset(source, split="validation" if split != "train" else "train")


def squad_references(records: datasets.Dataset | list[dict]) -> dict[str, list[str]]:
    """id -> gold answer texts, what the scorer needs."""
    return {r["id"]: list(r["answers"]["text"]) for r in records}


def take_subset(dataset: datasets.Dataset, n: int | None, seed: int = 0) -> datasets.Dataset:
    """The documented subset rule: whole paragraphs, ordered by sha1(f"{seed}:{context}"), until n questions.

    Paragraphs are kept whole (the last one cut to reach exactly n, its questions ordered by
    sha1(f"{seed}:{id}")) so that shared-context training and
    prefix-cached decoding pay on subsets too. The rule is independent of file order, nested (the first
    100 questions are inside the first 500) and the same for any two runs with the same seed, so their
    per-question scores can be paired. Rows keep file order.
    """
    if n is None or n >= len(dataset):
        return dataset
    def key(text: str) -> str:
        return hashlib.sha1(f"{seed}:{text}".encode()).hexdigest()

    paragraphs: dict[str, list[int]] = {}
    for index, context in enumerate(dataset["context"]):
        paragraphs.setdefault(context, []).append(index)
    ids = list(dataset["id"])  # a list: indexing datasets' lazy column reads one row per access (~10 s on train)
    for members in paragraphs.values():
        members.sort(key=lambda i: key(ids[i]))
    order = sorted(paragraphs, key=key)
    chosen: list[int] = []
    for context in order:
        chosen.extend(paragraphs[context][: n - len(chosen)])
        if len(chosen) == n:
            break
    return dataset.select(sorted(chosen))


def heldout_split(dataset: datasets.Dataset, articles: int, seed: int = 0
                  ) -> tuple[datasets.Dataset, datasets.Dataset]:
    """(the rest, held-out articles): whole articles chosen by sha1(f"{seed}:{title}"), so that no paragraph
    of a held-out article is ever trained on. The selection set for hyperparameters comes from the training
    file this way, and the dev set stays a test set. Rows keep file order."""
    titles = sorted(set(dataset["title"]), key=lambda t: hashlib.sha1(f"{seed}:{t}".encode()).hexdigest())
    if articles >= len(titles):
        raise SquadFormatError(f"heldout_articles={articles}: the file has only {len(titles)} articles")
    heldout = set(titles[:articles])
    flags = [title in heldout for title in dataset["title"]]
    return (dataset.select([i for i, f in enumerate(flags) if not f]),
            dataset.select([i for i, f in enumerate(flags) if f]))


def data_fingerprint(dataset: datasets.Dataset) -> str:
    """sha256 over the question ids, contexts, questions and answers actually used."""
    digest = hashlib.sha256()
    for r in dataset:
        digest.update(json.dumps([r["id"], r["context"], r["question"], r["answers"]["text"]]).encode())
    return digest.hexdigest()


# ---------------------------------------------------------------------------------------------- tokens

def _prefix_ids(tokenizer) -> list[int]:
    """BOS when the tokenizer adds one by itself (Llama 2 style), else nothing (GPT-2, SmolLM2)."""
    with_special = tokenizer("a", add_special_tokens=True).input_ids
    without = tokenizer("a", add_special_tokens=False).input_ids
    return with_special[: len(with_special) - len(without)] if with_special[-len(without):] == without else []


def encode_prompt(tokenizer, context: str, question: str, max_prompt_tokens: int | None = None
                  ) -> tuple[list[int], list[int]]:
    """(context_ids, question_ids) for inference; the context is cut at the end if the prompt is too long.

    >>> encode_prompt(gpt2_tokenizer, "Paris is in France.", "Where is Paris?")
    ([21947, 25, 6342, 318, 287, 4881, 13], [198, 24361, 25, 6350, 318, 6342, 30, 198, 33706, 25])
    """
    context_ids, question_ids, _ = encode_prompt_counting_cut(tokenizer, context, question, max_prompt_tokens)
    return context_ids, question_ids


def encode_prompt_counting_cut(tokenizer, context: str, question: str, max_prompt_tokens: int | None = None, *,
                               head: str = CONTEXT_HEADER, question_template: str = QUESTION_TEMPLATE,
                               bos: bool = True) -> tuple[list[int], list[int], int]:
    """`encode_prompt` and how many context tokens it cut off (0 when the prompt fits). `head` (the text before
    " " + context), `question_template` (after it, with a `{question}` field) and `bos` (the tokenizer's own
    BOS first) are the plain prompt's unless a `prompting.PromptFormat` passes others (examples, a chat
    template)."""
    header = (_prefix_ids(tokenizer) if bos else []) + tokenizer(head, add_special_tokens=False).input_ids
    body = tokenizer(" " + context, add_special_tokens=False).input_ids
    question_text = question_template.replace("{question}", question.strip())  # not format: a template may hold braces
    question_ids = tokenizer(question_text, add_special_tokens=False).input_ids
    room = len(body) if max_prompt_tokens is None else max(0, max_prompt_tokens - len(header) - len(question_ids))
    return header + body[:room], question_ids, max(0, len(body) - room)


def _answer_window(text: str, offsets: list[tuple[int, int]], start: int, end: int, budget: int
                   ) -> tuple[int, int] | None:
    """Token window [lo, hi) of at most `budget` tokens covering characters [start, end) of `text`.

    Centred on the answer, then shrunk to whole words (a window never starts or ends inside a word).
    """
    inside = [i for i, (s, e) in enumerate(offsets) if s < end and e > start]
    if not inside:
        return None
    first, last = inside[0], inside[-1] + 1
    if last - first > budget:
        return None
    lo = max(0, first - (budget - (last - first)) // 2)
    hi = min(len(offsets), lo + budget)
    lo = max(0, hi - budget)

    def starts_word(i: int) -> bool:
        return i == 0 or i == len(offsets) or text[offsets[i][0]:offsets[i][0] + 1].isspace()

    while lo < first and not starts_word(lo):
        lo += 1
    while hi > last and not starts_word(hi):
        hi -= 1
    return lo, hi


def preprocess_function(examples: dict[str, list], tokenizer, max_length: int = 512,
                        unanswerable: Literal["skip", "eos"] = "skip", train_on_prompt: bool = False
                        ) -> dict[str, list]:
    """Batched `datasets.map` function: SQuAD columns -> training rows.

    Every output row has `input_ids`, `labels`, `context_length`, `context_key` and `skip_reason`
    ("" when kept; `SKIP_UNANSWERABLE` or `SKIP_TOO_LONG` rows have empty ids and are filtered later).
    Too-long examples keep a window of the context around the answer (context on both sides where room
    allows); the question, the cue and the answer are never cut. `train_on_prompt` labels the prompt tokens
    too (the ablation of prompt masking).
    """
    header = _prefix_ids(tokenizer) + tokenizer(CONTEXT_HEADER, add_special_tokens=False).input_ids
    bodies = tokenizer([" " + c for c in examples["context"]], add_special_tokens=False,
                       return_offsets_mapping=True)
    questions = tokenizer([QUESTION_TEMPLATE.format(question=q.strip()) for q in examples["question"]],
                          add_special_tokens=False).input_ids
    answer_texts = [a["text"][0] if a["text"] else "" for a in examples["answers"]]
    answers = tokenizer([" " + t for t in answer_texts], add_special_tokens=False).input_ids
    out = {"input_ids": [], "labels": [], "context_length": [], "context_key": [], "skip_reason": []}

    def emit(prompt_ids, target_ids, context_length, key, reason=""):
        out["input_ids"].append(prompt_ids + target_ids)
        out["labels"].append((prompt_ids if train_on_prompt else [IGNORE_INDEX] * len(prompt_ids)) + target_ids)
        out["context_length"].append(context_length)
        out["context_key"].append(key)
        out["skip_reason"].append(reason)

    for i, context in enumerate(examples["context"]):
        body, offsets = bodies.input_ids[i], bodies.offset_mapping[i]
        has_answer = bool(answer_texts[i])
        if not has_answer and unanswerable == "skip":
            emit([], [], 0, "", SKIP_UNANSWERABLE)
            continue
        target = (answers[i] if has_answer else []) + [tokenizer.eos_token_id]
        budget = max_length - len(header) - len(questions[i]) - len(target)
        lo, hi = 0, len(body)
        if len(body) > budget:
            window = None
            if has_answer:
                start = examples["answers"][i]["answer_start"][0] + 1  # +1: the space before the context
                window = _answer_window(" " + context, offsets, start, start + len(answer_texts[i]), budget)
            elif budget >= 0:
                window = (0, budget)
            if window is None:
                emit([], [], 0, "", SKIP_TOO_LONG)
                continue
            lo, hi = window
        context_ids = header + body[lo:hi]
        key = f"{hashlib.sha1(context.encode()).hexdigest()[:16]}:{lo}:{hi}"
        emit(context_ids + questions[i], target, len(context_ids), key)
    return out


def build_train_dataset(dataset: datasets.Dataset, tokenizer, *, max_length: int,
                        unanswerable: Literal["skip", "eos"] = "skip", train_on_prompt: bool = False,
                        desc: str = "tokenizing") -> tuple[datasets.Dataset, dict[str, int]]:
    """Tokenize a SQuAD dataset and drop skipped rows; returns the rows and the counts of each skip reason."""
    tokenized = dataset.map(preprocess_function, batched=True, remove_columns=dataset.column_names,
                            fn_kwargs={"tokenizer": tokenizer, "max_length": max_length,
                                       "unanswerable": unanswerable, "train_on_prompt": train_on_prompt},
                            desc=desc, keep_in_memory=True, load_from_cache_file=False)
    reasons = Counter(tokenized["skip_reason"])
    kept = tokenized.filter(lambda r: r == "", input_columns="skip_reason", keep_in_memory=True)
    counts = {"kept": len(kept), **{k: v for k, v in reasons.items() if k}}
    return kept.remove_columns("skip_reason"), counts


def token_length_stats(dataset: datasets.Dataset, tokenizer, max_lengths=(256, 384, 512, 768, 1024),
                       percentiles=(50, 90, 95, 99, 100)) -> dict:
    """Token-length percentiles of context, question and answer (+EOS), and what each max_length would do.

    One tokenization pass; `truncated` and `dropped` follow `preprocess_function`'s rule exactly: a row is
    truncated when its context does not fit the room left by question and answer, and dropped when not
    even the answer's own span of the context fits.
    """
    header = len(_prefix_ids(tokenizer) + tokenizer(CONTEXT_HEADER, add_special_tokens=False).input_ids)
    bodies = tokenizer([" " + c for c in dataset["context"]], add_special_tokens=False, return_offsets_mapping=True)
    questions = tokenizer([QUESTION_TEMPLATE.format(question=q.strip()) for q in dataset["question"]],
                          add_special_tokens=False).input_ids
    texts = [a["text"][0] if a["text"] else "" for a in dataset["answers"]]
    answers = tokenizer([" " + t for t in texts], add_special_tokens=False).input_ids
    spans = []
    for offsets, answer, text in zip(bodies.offset_mapping, dataset["answers"], texts):
        start = answer["answer_start"][0] + 1 if text else 0
        spans.append(sum(1 for s, e in offsets if s < start + len(text) and e > start))
    parts = {"context": np.array([header + len(b) for b in bodies.input_ids]),
             "question": np.array([len(q) for q in questions]),
             "answer": np.array([len(a) + 1 for a in answers])}
    parts["total"] = parts["context"] + parts["question"] + parts["answer"]
    stats = {"n": len(dataset), "percentiles": {
        name: {f"p{p}": int(np.percentile(values, p)) for p in percentiles} for name, values in parts.items()}}
    body_lengths = parts["context"] - header
    spans = np.array(spans)
    stats["max_length"] = {}
    for max_length in max_lengths:
        budget = max_length - header - parts["question"] - parts["answer"]
        over = body_lengths > budget
        dropped = over & (spans > budget)
        stats["max_length"][str(max_length)] = {"truncated": int((over & ~dropped).sum()), "dropped": int(dropped.sum())}
    return stats
