"""Report numbers and sentences: every number printed with the result file, JSON pointer and operation it came
from (`Values.put/number`), and sentences whose truth depends on the numbers (`claim_*`, which compare what
they print). `loraqa.report.values` uses them to turn the result files into placeholder values."""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path

from ..evaluation.stats import format_p

MINUS = "\u2212"


# ---------------------------------------------------------------------------------------------- numbers

def _signed(x: float, digits: int = 1) -> str:
    return f"{x:+.{digits}f}".replace("-", MINUS)


def _power(x: float, digits: int = 1) -> str:
    """3.4e-67 -> '3.4×10#super[−67]' (Typst markup); 2e-4 -> '2×10#super[−4]' with digits=0."""
    exponent = math.floor(math.log10(abs(x)))
    mantissa = f"{x / 10 ** exponent:.{digits}f}"
    if mantissa.startswith("10"):
        mantissa, exponent = f"{1:.{digits}f}", exponent + 1
    return f"{mantissa}×10#super[{str(exponent).replace('-', MINUS)}];"  # `;`: see literal()


FORMATS = {
    "score": lambda x: f"{x:.1f}", "signed": _signed, "signed2": lambda x: _signed(x, 2), "int": lambda x: f"{round(x):,}",
    "x": lambda x: f"{x:.1f}×" if x < 20 else f"{x:.0f}×", "x2": lambda x: f"{x:.2f}×",
    "pct": lambda x: f"{x:.1f}%", "pct0": lambda x: f"{x:.0f}%",
    "1": lambda x: f"{x:.1f}", "2": lambda x: f"{x:.2f}", "3": lambda x: f"{x:.3f}", "g": lambda x: f"{x:g}",
    "millions": lambda x: f"{x / 1e6:.2f}M", "lr": lambda x: _power(x, 0) if x < 0.01 else f"{x:g}",
    "p": lambda x: f"{x:.3f}" if x >= 1e-3 else _power(x),
    # a permutation p-value in a sentence ('= 0.042', '< 1×10^−4' at its floor) or a table cell; McNemar's exact p
    "p_is": lambda x: format_p(x, number=FORMATS["p"]), "p_cell": lambda x: format_p(x, number=FORMATS["p"], relation=False),
    "p_exact": lambda x: format_p(x, resamples=None, number=FORMATS["p"], relation=False),
    "p_exact_is": lambda x: format_p(x, resamples=None, number=FORMATS["p"]),
}
OPS = {  # how a printed number is computed from the values at its sources
    "value": lambda x: x, "ratio": lambda a, b: a / b, "diff": lambda a, b: a - b, "sum": lambda a, b: a + b,
    "ratio_of_diffs": lambda a, b, c, d: (a - b) / (c - d), "inverse_plus_one": lambda n: 1 / (n + 1),
    # a LoRA model's total counts its adapter too: full fine-tuning trains the rest, (total - trainable)
    "frozen_per_trainable": lambda total, trainable: (total - trainable) / trainable,
    "len": len, "product": lambda a, b: a * b,
    # transformers reads a warm-up below 1 as a share of the steps, rounded up
    "warmup_steps": lambda warmup, steps: warmup if warmup >= 1 else math.ceil(warmup * steps),
    # loss curves, [[step, loss], ...]: see loraqa.report.values._dynamics
    "runs_reaching": lambda threshold, *curves: sum(_first_step_at(c, threshold) is not None for c in curves),
    "median_first_step": lambda threshold, *curves: _median([s for c in curves
                                                              if (s := _first_step_at(c, threshold)) is not None]),
    "median_step_90": lambda *curves: _median([_step_of_90(c) for c in curves]),
    "mean_gap": lambda *curves: sum(_gap(t, v) for t, v in zip(curves[::2], curves[1::2])) / (len(curves) // 2),
    "grid_size": lambda grid: math.prod(len(v) for v in grid.values()),
    "n_significant": lambda tests: sum(t["p_holm"] < 0.05 for t in tests),
    "n_survive_both": lambda tests: sum(t["p_holm"] < 0.05 and bool(t.get("survives_seed_sd")) for t in tests),
    "len_sum": lambda a, b: len(a) + len(b),
    "n_grid": lambda runs: sum(r.get("group") == "grid" for r in runs),
}


def _median(values: list[float]) -> float:
    if not values:
        raise ValueError("no values")
    ordered = sorted(values)
    middle = len(ordered) // 2
    return ordered[middle] if len(ordered) % 2 else (ordered[middle - 1] + ordered[middle]) / 2


def _first_step_at(curve: list, threshold: float) -> float | None:
    """The first step at which a loss curve is at or below `threshold` (None: never)."""
    return next((step for step, loss in curve if loss <= threshold), None)


def _step_of_90(curve: list) -> float:
    """The first step by which 90% of the curve's fall, from its first to its last point, is done."""
    first, last = curve[0][1], curve[-1][1]
    return next(step for step, loss in curve if first - loss >= 0.9 * (first - last))


def _gap(train: list, validation: list) -> float:
    """Final validation loss minus the mean training loss over the last tenth of the steps (one epoch: every
    training batch is scored before the model learns from it)."""
    end = validation[-1][0]
    tail = [loss for step, loss in train if step > 0.9 * end]
    return validation[-1][1] - sum(tail) / len(tail)


@dataclass(frozen=True)
class Number:
    """A number as printed, and where it came from: OPS[op](*values at sources) * scale, then FORMATS[fmt]."""
    value: float
    text: str
    sources: tuple[str, ...] = ()
    op: str = "value"
    scale: float = 1.0
    fmt: str = "score"


class ReportError(ValueError):
    """The report cannot be built; the message names the placeholder, file or section."""


class Inputs:
    """The results folder: JSON files read on first use, values addressed as 'file.json#/json/pointer'."""

    def __init__(self, results_dir: str | Path):
        self.root = Path(results_dir)
        self._cache: dict[str, object] = {}

    def json(self, name: str):
        if name not in self._cache:
            try:
                self._cache[name] = json.loads((self.root / name).read_text())
            except FileNotFoundError:  # not produced yet: the report says what is pending
                self._cache[name] = None
            except (OSError, json.JSONDecodeError, UnicodeDecodeError) as err:  # there but unreadable: stop
                raise ReportError(f"{self.root / name}: not readable as JSON ({err})") from None
        return self._cache[name]

    def has(self, source: str) -> bool:
        try:
            self.resolve(source)
        except (KeyError, IndexError, ValueError):
            return False
        return True

    def resolve(self, source: str):
        """'bench.json#/train/speedup' -> its value; KeyError when the file or a field is missing."""
        name, _, pointer = source.partition("#")
        node = self.json(name)
        if node is None:
            raise KeyError(name)
        for part in [p.replace("~1", "/").replace("~0", "~") for p in pointer.split("/")[1:]]:
            if isinstance(node, list):
                node = node[int(part)]
            elif isinstance(node, dict) and part in node:
                node = node[part]
            else:
                raise KeyError(f"{source}: {part}")
            if node is None:
                raise KeyError(f"{source}: {part} is null")
        return node


class Values:
    """Placeholder name -> Typst markup, and every number printed, with its source."""

    def __init__(self, inputs: Inputs):
        self.inputs = inputs
        self.fields: dict[str, str] = {}
        self.missing: dict[str, str] = {}
        self.numbers: list[Number] = []

    def number(self, fmt: str, *sources: str, op: str = "value", scale: float = 1.0) -> Number | None:
        try:
            value = OPS[op](*(self.inputs.resolve(s) for s in sources)) * scale
        except (KeyError, IndexError, TypeError, ValueError, ZeroDivisionError):
            return None
        if isinstance(value, float) and not math.isfinite(value):
            return None
        number = Number(value, FORMATS[fmt](value), sources, op, scale, fmt)
        self.numbers.append(number)
        return number

    def put(self, name: str, fmt: str, *sources: str, op: str = "value", scale: float = 1.0) -> Number | None:
        number = self.number(fmt, *sources, op=op, scale=scale)
        if number is None:
            self.missing[name] = " ".join(sources)
        else:
            self.fields[name] = number.text
        return number

    def ci(self, source: str, name: str | None = None) -> str | None:
        """'[lo, hi]' from a two-element list at `source`."""
        lo, hi = self.number("score", f"{source}/0"), self.number("score", f"{source}/1")
        text = f"[{lo.text}, {hi.text}]" if lo and hi else None
        if name:
            self.text(name, text, source)
        return text

    def text(self, name: str, markup: str | None, source: str = "") -> None:
        if markup is None:
            self.missing[name] = source
        else:
            self.fields[name] = markup

    def flag(self, name: str, value: bool) -> bool:
        self.fields[name] = "true" if value else "false"
        return bool(value)


def literal(text: str) -> str:
    """Arbitrary text as a Typst string literal, which renders verbatim (no markup). The `;` ends the embedded
    expression: without it a `;` that follows the placeholder in the prose would be taken as the end marker
    and vanish."""
    return '#"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", " ") + '";'


# ---------------------------------------------------------------------------------------------- claims

def _unsigned(number: Number) -> str:
    """A signed number's printed digits without the sign (the margin of a difference)."""
    return number.text.lstrip("+" + MINUS + "-")


def holm_bound(p_holm: Number, test: dict) -> Number:
    """Holm's p of a test whose permutation p is at the floor is itself a bound (k x floor at most), written
    rounded up to two significant digits so that it stays a bound: 21/10,001 is '≤ 0.0021', not '≤ 0.002'."""
    resamples = test.get("permutation_resamples")
    at_floor = bool(resamples) and test["p_value"] * (resamples + 1) <= 1 + 1e-9
    if not at_floor or p_holm.value <= 0:
        return p_holm
    decimals = max(0, 1 - math.floor(math.log10(p_holm.value)))
    bound = math.ceil(p_holm.value * 10 ** decimals - 1e-9) / 10 ** decimals
    return dataclasses.replace(p_holm, text="≤ " + f"{bound:.{decimals}f}".rstrip("0").rstrip("."))


def p_relation(p: Number) -> str:
    """'= 0.04' for a p-value, or the bound as it stands ('≤ 0.002', '< 1e-4')."""
    return p.text if p.text.startswith(("≤", "<")) else f"= {p.text}"


def claim_difference(a: str, b: str, delta: Number, ci: str, p_holm: Number, *, alpha: float = 0.05,
                     flipped_ci: str | None = None) -> str:
    """A sentence on B - A (F1) that follows the numbers: who wins only when Holm's p says so. The winner's
    margin is printed unsigned, with the CI of A - B (`flipped_ci`) when A wins."""
    if p_holm.value < alpha and delta.value > 0:
        return f"{b} beats {a} by {_unsigned(delta)} F1 points (95% CI {ci}, Holm-adjusted " \
               f"_p_ {p_relation(p_holm)})"
    if p_holm.value < alpha and delta.value < 0:
        interval = f"95% CI {flipped_ci}" if flipped_ci else f"95% CI of {b} − {a}: {ci}"
        return f"{a} beats {b} by {_unsigned(delta)} F1 points ({interval}, " \
               f"Holm-adjusted _p_ {p_relation(p_holm)})"
    # the CI is per comparison (unadjusted), so it may exclude 0 where Holm's correction does not reject
    return f"{b} and {a} do not differ significantly ({delta.text} F1 for {b}, unadjusted 95% CI {ci}, " \
           f"Holm-adjusted _p_ {p_relation(p_holm)})"


def claim_trend(levels: list[tuple[str, Number]], what: str) -> str:
    """'F1 rises with rank' only when every step rises; likewise falls; else names the best level."""
    values = [n.value for _, n in levels]
    steps = [b - a for a, b in zip(values, values[1:])]
    shown = ", ".join(f"{n.text} at {label}" for label, n in levels)
    if len(values) > 1 and all(s > 0 for s in steps):
        return f"mean test F1 rises with every step of {what} ({shown})"
    if len(values) > 1 and all(s < 0 for s in steps):
        return f"mean test F1 falls with every step of {what} ({shown})"
    best = max(levels, key=lambda level: level[1].value)[0]
    return f"mean test F1 is not monotonic in {what} and peaks at {best} ({shown})"


def claim_edge(axes: dict[str, tuple[float, list[float]]]) -> str | None:
    """{axis name: (selected value, the grid's levels)} -> 'it uses the largest learning rate and the largest
    rank the grid tried, so the grid does not bracket the optimum ...': where the selected configuration sits
    at an end of an axis, a value beyond it may do better. None when it is inside the grid on every axis."""
    ends = [f"the {'largest' if value == max(levels) else 'smallest'} {axis}" for axis, (value, levels) in axes.items()
            if len(set(levels)) > 1 and value in (min(levels), max(levels))]
    if not ends:
        return None
    one = len(ends) == 1
    return (f"it uses {' and '.join(ends)} tried, so "
            f"{'a value beyond it' if one else 'values beyond them'} may do better still")


def claim_agreement(runs: Number, rho: Number, test_choice: str | None, test_f1: Number | None,
                    gap: Number | None) -> str:
    """How the selection set ranks the grid against the test set, and what selecting on the test set itself
    would have picked (`test_choice` None: the same run) and over-reported."""
    how = ("rank the configurations alike" if rho.value >= 0.8 else
           "rank the configurations similarly" if rho.value >= 0.5 else "rank the configurations differently")
    text = f"over the {runs.text} grid runs, validation and test F1 {how} (Spearman’s rank correlation {rho.text})"
    if test_choice is None:
        return text + "; selecting on the test set would have picked the same run"
    return (text + f"; selecting on the test set would have picked {test_choice} and reported test F1 "
            f"{test_f1.text}, {gap.text} points above the validation choice, an optimism the protocol avoids")


def claim_best_strategy(rows: list[tuple[str, Number]]) -> str:
    """Which decoding strategy has the highest mean F1; rows[0] is greedy."""
    (greedy, greedy_f1), best = rows[0], max(rows, key=lambda row: row[1].value)
    if best[0] == greedy or best[1].value <= greedy_f1.value:
        return f"greedy decoding gives the highest F1 ({greedy_f1.text})"
    return f"{best[0]} has the highest F1 ({best[1].text}, against {greedy_f1.text} for greedy decoding)"


OVERFIT_FREE = "no sign of over-fitting within one epoch"


def claim_curve(steps: list[Number], losses: list[Number], *, tolerance: float = 0.01, again: bool = False) -> str:
    """Whether the validation loss still falls at the end of training, levels off (ends within `tolerance`,
    relative, of its minimum) or turned up before. Of equal losses the last one counts as the lowest.
    `again`: a sentence before this one said the same of another run."""
    best = min(reversed(range(len(losses))), key=lambda i: losses[i].value)
    last = len(losses) - 1
    if best == last or losses[last].value <= losses[best].value:
        return f"its validation loss falls to its lowest value, {losses[last].text}, at the last evaluation " \
               f"(step {steps[last].text}): {'again ' if again else ''}{OVERFIT_FREE}"
    if losses[last].value - losses[best].value <= tolerance * abs(losses[best].value):
        return f"its validation loss levels off: it is lowest at step {steps[best].text} ({losses[best].text}) " \
               f"and ends at {losses[last].text} (step {steps[last].text})"
    return f"its validation loss is lowest at step {steps[best].text} ({losses[best].text}) and ends at " \
           f"{losses[last].text} (step {steps[last].text}): it starts to over-fit"


def claim_sampling(greedy: str, closest: tuple[str, Number], worst: tuple[str, Number]) -> str:
    """How much F1 sampling costs against greedy; the Numbers are greedy F1 minus the strategy's F1."""
    (near, near_cost), (far, far_cost) = closest, worst
    if near_cost.value > 0:
        return f"Every sampled strategy loses F1 against {greedy}: from {near_cost.text} points ({near}) to " \
               f"{far_cost.text} ({far})"
    return f"Sampled strategies range from {FORMATS['1'](-near_cost.value)} F1 points above {greedy} ({near}) to " \
           f"{FORMATS['1'](far_cost.value)} below it ({far})"


def claim_verbatim(shares: list[Number], greedy: Number) -> str:
    """Whether every span-constrained answer is found verbatim in its context (the constraint's promise)."""
    if all(share.value >= 1 for share in shares):
        return f"every span-constrained answer is found verbatim in its context (a share of {shares[0].text}, " \
               f"against {greedy.text} for greedy)"
    return f"span-constrained answers are found verbatim in their context at shares of " \
           f"{', '.join(s.text for s in shares)} (against {greedy.text} for greedy)"


def claim_beams(greedy_words: Number, greedy_f1: Number, beams: list[tuple[int, Number, Number]]) -> str:
    """How beam search moves the answers' length and F1 against greedy: beams = [(num_beams, words, F1)]."""
    words = all(w.value > greedy_words.value for _, w, _ in beams), all(w.value < greedy_words.value for _, w, _ in beams)
    f1 = all(f.value < greedy_f1.value for _, _, f in beams), all(f.value > greedy_f1.value for _, _, f in beams)
    length = "lengthens the answers" if words[0] else "shortens the answers" if words[1] else "changes the answers' length"
    quality = "lowers F1" if f1[0] else "raises F1" if f1[1] else "moves F1 both ways"
    shown = ", ".join(f"{w.text} with {n} beams" for n, w, _ in beams)
    scores = ", ".join(f"{f.text}" for _, _, f in beams)
    return f"beam search {length} (a mean of {greedy_words.text} words for greedy, {shown}) and {quality} " \
           f"({scores}, against {greedy_f1.text})"


def claim_bf16(identical: Number, n: Number) -> str:
    if identical.value >= n.value:
        return f"without changing an answer ({identical.text} of {n.text} equal to float32)"
    return f"but change some answers (only {identical.text} of {n.text} equal to float32), so float32 stays " \
           "the default where answers must be exact"


FAILURE_MEANINGS = {
    "wrong span of the context": "a span of the right paragraph with no word in common with the gold answer, often "
                                 "the answer to a neighbouring question",
    "partial overlap": "an answer that shares words with the gold span but starts or ends elsewhere: the "
                       "boundaries, not the location, are wrong",
    "answer not in context": "an answer that is not copied from the paragraph: the model paraphrases or "
                             "composes instead of extracting",
    "right answer with extra words": "the gold answer with extra words around it: the span is too long",
    "empty answer": "no answer at all",
    "answered an unanswerable question": "an answer to a question that has none",
}


def claim_failure_top(category: str) -> str:
    meaning = FAILURE_MEANINGS.get(category, "a category without a description here")
    return f"_{literal(category)}_, is {meaning}"


def claim_padding(steps: list[tuple[str, Number]], tokens: list[tuple[str, Number]], unit: str = "s") -> str:
    """Which collation computes the fewest tokens per question and, where timed, which steps fastest."""
    fewest = min(tokens, key=lambda t: t[1].value)
    most = max(tokens, key=lambda t: t[1].value)
    text = f"{fewest[0]} computes the fewest tokens per question ({fewest[1].text}, against {most[1].text} for " \
           f"{most[0]})"
    if steps:
        fastest = min(steps, key=lambda t: t[1].value)
        text += f" and {fastest[0]} the fastest step ({fastest[1].text} {unit})"
    return text


def claim_count(count: Number, one: str, many: str, none: str) -> str:
    """'3 questions are dropped', '1 question is dropped', or the `none` sentence."""
    return none if count.value == 0 else f"{count.text} {one if count.value == 1 else many}"


def plural(count: Number, singular: str, plural_form: str | None = None) -> str:
    """'1 test', '9 tests'."""
    return f"{count.text} {singular if count.value == 1 else plural_form or singular + 's'}"


def claim_significant(significant: Number, tests: Number) -> str:
    """'4 of the 9 differences are significant', with the singular cases spelled out."""
    if tests.value == 1:
        return "the difference is significant" if significant.value else "the difference is not significant"
    if significant.value == 0:
        return f"none of the {tests.text} differences is significant"
    if significant.value == tests.value:
        return f"all {tests.text} differences are significant"
    return f"{significant.text} of the {tests.text} differences {'is' if significant.value == 1 else 'are'} significant"


def claim_same_loss(losses: list[Number], *, tolerance: float = 1e-4) -> str:
    """Whether the training variants' mean losses agree (relative `tolerance`)."""
    lo, hi = min(losses, key=lambda n: n.value), max(losses, key=lambda n: n.value)
    if hi.value - lo.value <= tolerance * abs(hi.value):
        return f"reach the same mean loss ({hi.text})"
    return f"reach mean losses from {lo.text} to {hi.text}"


def claim_identical(identical: Number, n: Number) -> str:
    """Whether two generation paths gave the same greedy answer to every question."""
    if identical.value >= n.value:
        return f"with identical greedy answers ({identical.text} of {n.text})"
    return f"with the same greedy answer to {identical.text} of {n.text} questions"
