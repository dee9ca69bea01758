"""The demo's view: pure functions from answers, evaluation rows and spans to HTML and table rows, and the
page's CSS. No model, no Gradio: tested without a browser."""
from __future__ import annotations

import html

from ..evaluation.analysis import failure_category
from ..evaluation.metrics import exact_match_score, f1_score, metric_max_over_ground_truths

COMPARISONS = ("all", "A right, B wrong", "B right, A wrong", "both right", "both wrong")
TABLE_HEADERS = ["id", "question", "gold", "A answer", "A category", "A F1", "B answer", "B category", "B F1"]
GOLD_SEPARATOR = " | "


def find_span(context: str, text: str) -> tuple[int, int] | None:
    """Characters [start, end) of the first occurrence of `text` in `context`, exact, else ignoring case.

    >>> find_span("The Denver Broncos won.", "denver broncos")
    (4, 18)
    """
    text = text.strip()
    if not text:
        return None
    start = context.find(text)
    if start < 0:
        start = context.lower().find(text.lower())
    return (start, start + len(text)) if start >= 0 else None


def highlight_spans(text: str, spans: list[tuple[int, int, str]]) -> str:
    """HTML of `text` with each (start, end, css class) span in a <mark>; overlapping spans get both classes.

    >>> highlight_spans("Paris is in France.", [(12, 18, "gold"), (9, 18, "pred-a")])
    'Paris is <mark class="pred-a">in </mark><mark class="gold pred-a">France</mark>.'
    """
    spans = [(max(0, s), min(len(text), e), c) for s, e, c in spans if s < e]
    bounds = sorted({0, len(text), *(s for s, _, _ in spans), *(e for _, e, _ in spans)})
    pieces = []
    for lo, hi in zip(bounds, bounds[1:]):
        classes = sorted({c for s, e, c in spans if s <= lo and hi <= e})
        piece = html.escape(text[lo:hi])
        pieces.append(f'<mark class="{" ".join(classes)}">{piece}</mark>' if classes else piece)
    return "".join(pieces)


def shade_tokens(tokens: list[tuple[str, float]]) -> str:
    """HTML of tokens shaded by probability: red (0) to green (1), the probability in each one's tooltip.

    >>> shade_tokens([(" Paris", 0.5)])
    '<span class="tok" style="background:hsl(60,75%,80%)" title="p=0.500">&nbsp;Paris</span>'
    """
    return "".join(f'<span class="tok" style="background:hsl({round(120 * p)},75%,80%)" title="p={p:.3f}">'
                   f'{html.escape(text).replace(" ", "&nbsp;")}</span>' for text, p in tokens)


def parse_golds(text: str | None) -> list[str]:
    """Gold answers typed on the page: separated by '|' (or one per line), blanks dropped.

    >>> parse_golds("Denver Broncos | The Denver Broncos")
    ['Denver Broncos', 'The Denver Broncos']
    """
    return [g.strip() for line in (text or "").splitlines() for g in line.split(GOLD_SEPARATOR.strip()) if g.strip()]


def answer_scores(answer: str, golds: list[str]) -> tuple[float, float]:
    """(EM, F1) in [0, 1] of one answer, the best over the gold answers (the official SQuAD rule)."""
    return (metric_max_over_ground_truths(exact_match_score, answer, golds),
            metric_max_over_ground_truths(f1_score, answer, golds))


def error_rows(a: dict, b: dict | None, records: dict[str, dict]) -> list[dict]:
    """One row per question of evaluation `a` found in `records` (id -> SQuAD record): the question, its
    context and gold answers, and per evaluation (B where it scored the question) the prediction, EM, F1 and
    `loraqa failures`' category."""
    rows = []
    for qid in a["per_question"]:
        record = records.get(qid)
        if record is None:
            continue
        golds = list(record["answers"]["text"])
        sides = {}
        for name, result in (("a", a), ("b", b)):
            if result is None or qid not in result["per_question"]:
                sides[name] = None
                continue
            score = result["per_question"][qid]
            prediction = (result.get("predictions") or {}).get(qid, "")
            sides[name] = {"answer": prediction, "em": score["exact_match"], "f1": score["f1"],
                           "category": failure_category(prediction, golds, record["context"],
                                                        score["exact_match"], score["f1"])}
        rows.append({"id": qid, "question": record["question"], "context": record["context"], "golds": golds,
                     "gold_starts": list(record["answers"]["answer_start"]), **sides})
    return rows


def _right(side: dict | None) -> bool | None:
    return None if side is None else side["em"] >= 1.0


def filter_rows(rows: list[dict], *, category: str = "all", comparison: str = "all", text: str = "") -> list[dict]:
    """Rows whose A category is `category`, whose A/B outcome is `comparison` (one of COMPARISONS; rows without
    a B answer never match a comparison) and which contain `text` (ignoring case) in the id, question,
    context, gold or an answer; "all" and "" keep everything."""
    wanted = {"A right, B wrong": (True, False), "B right, A wrong": (False, True), "both right": (True, True),
              "both wrong": (False, False)}.get(comparison)
    needle = text.strip().lower()
    kept = []
    for row in rows:
        if category != "all" and (row["a"] or {}).get("category") != category:
            continue
        if wanted and (row["b"] is None or (_right(row["a"]), _right(row["b"])) != wanted):
            continue
        if needle:
            haystack = [row["id"], row["question"], row["context"], *row["golds"],
                        *(side["answer"] for side in (row["a"], row["b"]) if side)]
            if not any(needle in field.lower() for field in haystack):
                continue
        kept.append(row)
    return kept


def _short(text: str, limit: int = 80) -> str:
    return text if len(text) <= limit else text[:limit - 1].rstrip() + "…"


def table_rows(rows: list[dict]) -> list[list]:
    """The Errors table (TABLE_HEADERS), one line per row; answers past 80 characters are shortened (a
    selected row shows them whole)."""
    def side(s: dict | None) -> list:
        return ["", "", ""] if s is None else [_short(s["answer"]), s["category"], round(100 * s["f1"], 1)]

    return [[r["id"], r["question"], " | ".join(dict.fromkeys(r["golds"])), *side(r["a"]), *side(r["b"])]
            for r in rows]


def render_error(row: dict, names: tuple[str, str]) -> str:
    """One question of the Errors tab: gold and predictions, and the context with their spans highlighted
    (gold spans where the data puts them, predictions at their first occurrence)."""
    spans = [(s, s + len(g), "gold") for g, s in zip(row["golds"], row["gold_starts"])]
    lines = [f"<p><b>{html.escape(row['question'])}</b> <code>{html.escape(row['id'])}</code></p>",
             "<p>gold: " + " / ".join(f'<mark class="gold">{html.escape(g)}</mark>'
                                      for g in dict.fromkeys(row["golds"])) + "</p>"]
    for key, name in zip(("a", "b"), names):
        side = row[key]
        if side is None:
            continue
        span = find_span(row["context"], side["answer"])
        if span:
            spans.append((*span, f"pred-{key}"))
        where = "" if span or not side["answer"] else " (not found in the context)"
        lines.append(f'<p>{key.upper()} ({html.escape(name)}): <mark class="pred-{key}">'
                     f'{html.escape(side["answer"]) or "(empty)"}</mark>{where}: {html.escape(side["category"])}, '
                     f'EM {100 * side["em"]:.0f}, F1 {100 * side["f1"]:.1f}</p>')
    return "\n".join(lines) + f'\n<div class="context">{highlight_spans(row["context"], spans)}</div>'


CSS = """
mark.gold { background: #b6f0b6; } mark.pred-a, mark.pred-base { background: #add8ff; }
mark.pred-b, mark.pred-adapter { background: #ffd59a; }
mark.gold.pred-a, mark.gold.pred-b, mark.gold.pred-base, mark.gold.pred-adapter { outline: 2px solid #2a8a2a; }
mark.pred-a.pred-b, mark.pred-base.pred-adapter { background: linear-gradient(#add8ff 50%, #ffd59a 50%); }
mark.cut { background: #e5e5e5; color: #888; text-decoration: line-through; }
.context { line-height: 1.6; white-space: pre-wrap; }
.tok { border-radius: 3px; padding: 1px 0; margin-right: 1px; }
.answer-facts { font-size: 0.9em; color: #555; } .demo-error { color: #b00020; }
"""
LEGEND = ('<p>In the context: <mark class="gold">gold</mark> <mark class="pred-base">base answer</mark> '
          '<mark class="pred-adapter">adapter answer</mark> <mark class="cut">cut from the prompt</mark>. '
          'Tokens: <span class="tok" style="background:hsl(0,75%,80%)">p=0</span> to '
          '<span class="tok" style="background:hsl(120,75%,80%)">p=1</span>: the model\'s probability of the token, '
          'before top-k, top-p and temperature (hover for the number).</p>')
ERRORS_LEGEND = ('<p><mark class="gold">gold</mark> <mark class="pred-a">A\'s answer</mark> '
                 '<mark class="pred-b">B\'s answer</mark></p>')
