"""Result files -> the study's figures, PNG (README) and PDF (report), in one matplotlib style.

Inputs: `results/evaluation_results.json` (`study.collect`'s schema), optionally strategy-grid evaluations
(`loraqa evaluate --strategy_grid true`), `results/padding_study.json` (`loraqa.measure.padding`) and
`results/cost_study.json` (`loraqa.measure.cost`). Outputs, in
`output_dir`: loss_curves, params_vs_f1, f1_heatmaps, cost, decoding_strategies, padding_study (.png, .pdf).

The study fills its results file run by run, so every plot draws whatever runs exist and leaves out, with a
logged note, what has no data yet; a plot with nothing to draw is not written. Each `plot_*` function takes
the parsed JSON and returns the `Figure` (or None), so tests can read back what was drawn.
Why one file of ~580 lines: one `plot_*` function per figure, each readable on its own, sharing one style.
"""
from __future__ import annotations

import functools
import json
import logging
import math
import textwrap
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

import matplotlib
import numpy as np
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch, Rectangle
from matplotlib.textpath import TextPath
from matplotlib.ticker import EngFormatter, FuncFormatter

logger = logging.getLogger(__name__)

# The report prints a figure at one IEEE column or across both (100% of either): drawn at that width, a point
# here is a point on paper, so 7 pt is the smallest text and the layout is the one that is read.
COLUMN_WIDTH, PAGE_WIDTH = 3.5, 7.16
STYLE = {"font.size": 8, "axes.titlesize": 8, "axes.labelsize": 8, "figure.titlesize": 7, "legend.fontsize": 7,
         "xtick.labelsize": 7, "ytick.labelsize": 7, "axes.grid": True, "grid.alpha": 0.3, "grid.linewidth": 0.5,
         "axes.linewidth": 0.6, "xtick.major.width": 0.6, "ytick.major.width": 0.6, "xtick.minor.width": 0.4,
         "ytick.minor.width": 0.4, "xtick.major.size": 2.5, "ytick.major.size": 2.5, "xtick.minor.size": 1.5,
         "ytick.minor.size": 1.5, "axes.spines.top": False, "axes.spines.right": False, "lines.linewidth": 1.0,
         "lines.markersize": 3, "errorbar.capsize": 1.5, "legend.handlelength": 1.8, "legend.columnspacing": 1.2,
         "legend.borderpad": 0.3, "legend.labelspacing": 0.3, "figure.constrained_layout.w_pad": 0.02,
         "figure.constrained_layout.h_pad": 0.02, "savefig.dpi": 300, "savefig.bbox": "standard",
         "pdf.fonttype": 42, "image.cmap": "viridis"}
PALETTE = [matplotlib.colormaps["tab10"](i) for i in range(10)]
MARKERS = "os^Dv<>p"


def _styled(plot):
    """Draw under STYLE, so a figure looks the same from `make_plots`, a test or a notebook."""
    @functools.wraps(plot)
    def wrapper(*args, **kwargs):
        with matplotlib.rc_context(STYLE):
            return plot(*args, **kwargs)
    return wrapper


def _figure(width: float, height: float, nrows: int = 1, ncols: int = 1, **kwargs):
    """A figure of the printed size (`COLUMN_WIDTH` or `PAGE_WIDTH` wide, in inches) and its axes grid."""
    fig = Figure(figsize=(width, height), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False, **kwargs)
    return fig, axes


def _wrap(text: str, width: float, fontsize: float) -> str:
    """`text` broken into lines that fit `width` inches at `fontsize` points (a note above a narrow figure)."""
    chars = int(width * 72 / (0.55 * fontsize))  # DejaVu Sans averages about 0.55 em a character
    return "\n".join(textwrap.fill(line, chars) for line in text.split("\n"))


def _plain_log(axis, formatter=None) -> None:
    """Log-scale ticks as plain numbers (300, not 3x10^2; or `formatter`'s), minor ones labelled at 2 and 5 only:
    these axes span one or two decades, where matplotlib's own minor labels collide."""
    formatter = formatter or FuncFormatter(lambda v, _: f"{v:g}")
    axis.set_major_formatter(formatter)
    axis.set_minor_formatter(FuncFormatter(lambda v, pos: formatter(v, pos) if f"{v:e}"[0] in "25" else ""))


def _skip(plot: str, reason: str) -> None:
    logger.info("plot %s: %s", plot, reason)


def _fmt(value) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


# ---------------------------------------------------------------------------------------------- runs

def _runs(results: dict, group: str) -> list[dict]:
    return [r for r in results.get("runs") or [] if r.get("group") == group]


def _test(run: dict) -> dict | None:
    return (run.get("scores") or {}).get("test")


def _grid_levels(results: dict, setting: str) -> list:
    """Levels of one setting in the spec's grid order (a tied axis such as {lora_r, lora_alpha} contributes
    its `setting`), then any other level the grid runs have, sorted."""
    levels = []
    for axis, values in ((results.get("protocol") or {}).get("grid") or {}).items():
        for value in values:
            level = value.get(setting) if isinstance(value, dict) else (value if axis == setting else None)
            if level is not None and level not in levels:
                levels.append(level)
    seen = {r["settings"].get(setting) for r in _runs(results, "grid")} - {None} - set(levels)
    return levels + sorted(seen, key=str)


def _sorted_levels(results: dict, setting: str) -> list:
    levels = _grid_levels(results, setting)
    return sorted(levels) if all(isinstance(v, (int, float)) for v in levels) else levels


def _present(results: dict, setting: str, runs: list[dict]) -> list:
    """The levels of `setting` (in `_sorted_levels` order) that some of `runs` have."""
    return [v for v in _sorted_levels(results, setting) if any(r["settings"].get(setting) == v for r in runs)]


def _grid_n(results: dict) -> int | None:
    """The number of test questions the grid runs were scored on (controls are drawn only when they match)."""
    counts = Counter(_test(r)["n"] for r in _runs(results, "grid") if _test(r))
    return counts.most_common(1)[0][0] if counts else None


def _baseline(results: dict, n: int | None) -> dict | None:
    """The untuned model prompted zero-shot (the run named `baseline` where there is one) on `n` questions."""
    scored = [r for r in _runs(results, "baseline") if _test(r) and _test(r)["n"] == n]
    return next((r for r in scored if r.get("name") == "baseline"), None) or next(iter(scored), None)


def _best_prompt(results: dict, n: int | None) -> dict | None:
    """The untuned model with its best prompt (chosen on validation by the study), when it is not zero-shot."""
    best = (results.get("prompted_baselines") or {}).get("best_run")
    return next((r for r in _runs(results, "baseline") if r["run_id"] == best and r.get("name") != "baseline"
                 and _test(r) and _test(r)["n"] == n), None)


def _full_ft(results: dict, n: int | None) -> dict | None:
    """The full fine-tuning control that was selected (best on the selection split), else the best scored one."""
    scored = [r for r in _runs(results, "full_ft") if _test(r) and _test(r)["n"] == n]
    chosen = (results.get("selection") or {}).get("best_full_ft_run")
    select_on = (results.get("selection") or {}).get("select_on", "validation")
    return next((r for r in scored if r["run_id"] == chosen), None) or max(
        scored, key=lambda r: (r["scores"].get(select_on) or {}).get("f1", -math.inf), default=None)


# ---------------------------------------------------------------------------------------------- 1-4: the study

@_styled
def plot_loss_curves(results: dict) -> Figure | None:
    """Training (thin, light) and validation (dashed, markers) loss of the grid runs: rows learning rate (named
    on the right), columns target modules (named on top), one colour per rank, so each panel isolates rank at a
    fixed step size and target set. Log loss: the curves' end, where ranks differ, gets the height. Each axes'
    label is 'lr <rate> · <target>' (not drawn), for whoever reads the figure back."""
    runs = [r for r in _runs(results, "grid") if (r.get("curves") or {}).get("train") or
            (r.get("curves") or {}).get("validation")]
    if not runs:
        _skip("loss_curves", "no grid run has loss curves yet")
        return None
    rates, targets = _present(results, "learning_rate", runs), _present(results, "target_modules", runs)
    ranks = _sorted_levels(results, "lora_r")
    colours = {rank: matplotlib.colormaps["viridis"](i / max(1, len(ranks) - 1) * 0.9) for i, rank in enumerate(ranks)}
    fig, axes = _figure(COLUMN_WIDTH, 0.55 + min(1.2, 7.0 / len(rates)) * len(rates), len(rates), len(targets),
                        sharex=True, sharey=True)  # at most about 7.5 in: one column of the page
    for i, rate in enumerate(rates):
        for j, target in enumerate(targets):
            ax = axes[i][j]
            ax.set_label(f"lr {_fmt(rate)} · {target}")
            if i == 0:
                ax.set_title(target)
            if j == len(targets) - 1:
                ax.yaxis.set_label_position("right")
                ax.set_ylabel(f"lr {_fmt(rate)}", rotation=270, labelpad=9)
            panel = [r for r in runs if r["settings"].get("learning_rate") == rate
                     and r["settings"].get("target_modules") == target]
            for run in sorted(panel, key=lambda r: r["settings"]["lora_r"]):
                rank, curves = run["settings"]["lora_r"], run["curves"]
                if curves.get("train"):
                    x, y = zip(*curves["train"])
                    ax.plot(x, y, color=colours[rank], linewidth=0.6, alpha=0.5, label=f"r={rank} train")
                if curves.get("validation"):
                    x, y = zip(*curves["validation"])
                    ax.plot(x, y, color=colours[rank], linestyle="--", marker="o", markersize=2.2,
                            label=f"r={rank} validation")
            ax.set_yscale("log")
            _plain_log(ax.yaxis)
            if i == len(rates) - 1:
                ax.set_xlabel("step")
    fig.supylabel("answer loss (log scale)", fontsize=8)
    handles = [Line2D([], [], color=colours[r], label=f"r={r}") for r in _present(results, "lora_r", runs)]
    handles += [Line2D([], [], color="grey", linewidth=0.6, alpha=0.5, label="train"),
                Line2D([], [], color="grey", linestyle="--", marker="o", markersize=2.2, label="validation")]
    fig.legend(handles=handles, loc="outside lower center", ncols=math.ceil(len(handles) / 2))
    return fig


@_styled
def plot_params_vs_f1(results: dict) -> Figure | None:
    """Test F1 (95% CI) against trainable parameters, one colour per target set and one marker per learning
    rate; full fine-tuning and the untuned baseline as lines with their CI as a band: what each extra
    parameter buys, and how far LoRA is from training everything."""
    runs = [r for r in _runs(results, "grid") if _test(r) and r.get("trainable_params")]
    if not runs:
        _skip("params_vs_f1", "no grid run has test scores yet")
        return None
    n = _grid_n(results)
    runs = [r for r in runs if _test(r)["n"] == n]
    targets = _present(results, "target_modules", runs)
    rates = _sorted_levels(results, "learning_rate")
    fig, axes = _figure(COLUMN_WIDTH, 3.1)
    ax = axes[0][0]
    for i, target in enumerate(targets):
        for k, rate in enumerate(rates):
            members = sorted((r for r in runs if r["settings"].get("target_modules") == target
                              and r["settings"].get("learning_rate") == rate), key=lambda r: r["trainable_params"])
            if not members:
                continue
            for diverged in (False, True):  # a diverged run (loraqa.study.selection) is drawn hollow
                shown = [r for r in members if bool(r.get("diverged")) == diverged]
                if not shown:
                    continue
                x = [r["trainable_params"] for r in shown]
                y = [_test(r)["f1"] for r in shown]
                low = [_test(r)["f1"] - _test(r)["f1_ci"][0] for r in shown]
                high = [_test(r)["f1_ci"][1] - _test(r)["f1"] for r in shown]
                ax.errorbar(x, y, yerr=[low, high], color=PALETTE[i], marker=MARKERS[k % len(MARKERS)], linestyle="none",
                            markerfacecolor="none" if diverged else PALETTE[i],
                            label=f"{target}, lr {_fmt(rate)}" + (" (diverged)" if diverged else ""))
    best_prompt = _best_prompt(results, n)
    for name, run, colour, style in (("full fine-tuning", _full_ft(results, n), "black", "--"),
                                     ("baseline (untuned)", _baseline(results, n), "grey", "--"),
                                     ("untuned, best prompt", best_prompt, "grey", ":")):
        if run is None:
            if name != "untuned, best prompt":  # a study without prompted baselines has no such line to miss
                _skip("params_vs_f1", f"no {name} run scored on the grid's {n} test questions yet")
            continue
        score = _test(run)
        lr = f", lr {_fmt(run['settings']['learning_rate'])}" if name.startswith("full") else ""
        label = "untuned, zero-shot" if name == "baseline (untuned)" and best_prompt else name
        ax.axhline(score["f1"], color=colour, linestyle=style, label=f"{label}{lr}")
        ax.axhspan(*score["f1_ci"], color=colour, alpha=0.12, linewidth=0, label=f"_{label} CI")
    ax.set_xscale("log")
    _plain_log(ax.xaxis, EngFormatter())
    ax.set_xlabel("trainable parameters")
    ax.set_ylabel(f"test F1 ({n} questions, 95% CI)")
    # the legend names colours and markers once each (not every pair), so it fits a column; inside, it hid the
    # baseline. Two columns: target sets and controls, then learning rates.
    handles = [Patch(color=PALETTE[i], label=target) for i, target in enumerate(targets)]
    handles += [line for line in ax.get_lines() if line.get_label().startswith(("baseline", "untuned", "full"))]
    handles += [Line2D([], [], color="grey", marker=MARKERS[k % len(MARKERS)], linestyle="none",
                       label=f"lr {_fmt(rate)}")
                for k, rate in enumerate(rates) if any(r["settings"].get("learning_rate") == rate for r in runs)]
    if any(r.get("diverged") for r in runs):
        handles.append(Line2D([], [], color="grey", marker="o", markerfacecolor="none", linestyle="none",
                              label="diverged"))
    fig.legend(handles=handles, loc="outside lower center", ncols=2)
    return fig


def diverged_cells(results: dict, target: str) -> set[tuple[int, int]]:
    """(rank index, rate index) of `f1_matrix`'s cells whose run diverged."""
    ranks, rates = _sorted_levels(results, "lora_r"), _sorted_levels(results, "learning_rate")
    return {(ranks.index(r["settings"]["lora_r"]), rates.index(r["settings"]["learning_rate"]))
            for r in _runs(results, "grid") if r.get("diverged") and r["settings"].get("target_modules") == target
            and r["settings"].get("lora_r") in ranks and r["settings"].get("learning_rate") in rates}


def f1_matrix(results: dict, target: str) -> tuple[list, list, np.ndarray]:
    """(ranks, learning rates, test F1 matrix ranks x rates) of one target set; NaN where no run is scored.
    The rates are the spec's and those the row extensions added (a row not extended is blank there)."""
    ranks, rates = _sorted_levels(results, "lora_r"), _sorted_levels(results, "learning_rate")
    matrix = np.full((len(ranks), len(rates)), np.nan)
    for run in _runs(results, "grid"):
        s = run["settings"]
        if (s.get("target_modules") == target and _test(run) and s.get("lora_r") in ranks
                and s.get("learning_rate") in rates):
            matrix[ranks.index(s["lora_r"]), rates.index(s["learning_rate"])] = _test(run)["f1"]
    return ranks, rates, matrix


@_styled
def plot_f1_heatmaps(results: dict) -> Figure | None:
    """Test F1 over rank x learning rate, one panel per target set, one colour scale, values written in the
    cells and missing runs left blank: where the good region is and whether it moves with the targets. Rates
    past the spec's grid (row extensions) are marked '+', diverged runs hatched and labelled 'div.'."""
    targets = _grid_levels(results, "target_modules")
    matrices = {t: f1_matrix(results, t) for t in targets}
    if not any(np.isfinite(m).any() for _, _, m in matrices.values()):
        _skip("f1_heatmaps", "no grid run has test scores yet")
        return None
    values = np.concatenate([m[np.isfinite(m)] for _, _, m in matrices.values()])
    low, high = values.min(), values.max()
    if high - low < 1.0:  # one run, or all alike: a one-point scale would colour by rounding noise
        low, high = (low + high) / 2 - 0.5, (low + high) / 2 + 0.5
    # one panel above the other: each gets the column's width, room for a written value in every cell
    fig, axes = _figure(COLUMN_WIDTH, 0.45 + 1.25 * len(targets), len(targets), 1, sharex=True)
    for ax, target in zip(axes[:, 0], targets):
        ranks, rates, matrix = matrices[target]
        image = ax.imshow(np.ma.masked_invalid(matrix), vmin=low, vmax=high, aspect="auto", origin="lower")
        ax.grid(False)
        diverged = diverged_cells(results, target)
        for (i, j), value in np.ndenumerate(matrix):
            if np.isfinite(value):
                ax.text(j, i, f"{value:.1f}" + ("\ndiv." if (i, j) in diverged else ""), ha="center", va="center",
                        fontsize=7, color="white" if value < (low + high) / 2 else "black")
        for i, j in diverged:
            ax.add_patch(Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, hatch="///", edgecolor="red", linewidth=0))
        spec_rates = ((results.get("protocol") or {}).get("grid") or {}).get("learning_rate") or rates
        ax.set_xticks(range(len(rates)), [_fmt(r) + ("" if r in spec_rates else "+") for r in rates])
        ax.set_yticks(range(len(ranks)), [str(r) for r in ranks])
        ax.set_ylabel("rank r")
        ax.set_title(target)
    axes[-1][0].set_xlabel("learning rate")
    fig.colorbar(image, ax=list(axes[:, 0]), label="test F1", aspect=30)
    return fig


COST_METRICS = (("step_cpu_seconds_mean", "CPU seconds per step", 1.0), ("peak_rss_mb", "peak memory (MiB)", 1.0),
                ("checkpoint_bytes", "checkpoint size (MiB)", 1 / 2**20))


def cost_metrics(study: dict) -> tuple[tuple[str, str, float], ...]:
    """COST_METRICS, with the step time's median where the study repeated its steps (`--repeats`): the
    report's text quotes medians, so the figure shows the same numbers."""
    if not all(c.get("step_cpu_seconds_median") is not None for c in study.get("configs") or [{}]):
        return COST_METRICS
    return (("step_cpu_seconds_median", "CPU seconds per step (median)", 1.0),) + COST_METRICS[1:]


def cost_series(study: dict, metric: str, target: str) -> tuple[list[int], list[float]]:
    """(ranks, `metric` at each rank) of the cost study's LoRA configurations on one target set."""
    scale = dict((m, s) for m, _, s in cost_metrics(study) + COST_METRICS)[metric]
    points = sorted((c["lora_r"], c[metric] * scale) for c in study["configs"]
                    if c["method"] == "lora" and c["target_modules"] == target and c.get(metric) is not None)
    return [r for r, _ in points], [v for _, v in points]


@_styled
def plot_cost(study: dict) -> Figure | None:
    """CPU seconds per training step, peak memory and checkpoint size against rank, a line per target set, full
    fine-tuning as a dashed line: what LoRA saves and what rank and targets cost. From `loraqa cost-study`,
    which measures every configuration side by side on the same batches (the sweep's own timings come from
    different sessions and machines, so they are not compared here)."""
    configs = study.get("configs") or []
    if not configs:
        _skip("cost", "the cost study has no configuration")
        return None
    targets = list(dict.fromkeys(c["target_modules"] for c in configs if c["method"] == "lora"))
    full = next((c for c in configs if c["method"] == "full_finetune"), None)
    ranks = sorted({c["lora_r"] for c in configs if c["method"] == "lora"})
    metrics = cost_metrics(study)
    fig, axes = _figure(PAGE_WIDTH, 1.9, 1, len(metrics))
    for ax, (metric, label, scale) in zip(axes[0], metrics):
        for i, target in enumerate(targets):
            x, y = cost_series(study, metric, target)
            ax.plot(x, y, color=PALETTE[i], marker=MARKERS[i], label=f"LoRA {target}")
        if full and full.get(metric) is not None:
            ax.axhline(full[metric] * scale, color="black", linestyle="--", label="full fine-tuning")
        ax.set_xscale("log", base=2)
        if ranks:
            ax.set_xticks(ranks, [str(r) for r in ranks])
        if metric == "checkpoint_bytes":  # full fine-tuning's checkpoint is ~100x a LoRA adapter
            ax.set_yscale("log")
            _plain_log(ax.yaxis)
        ax.set_xlabel("rank r")
        ax.set_title(label)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncols=len(labels))
    machine = study.get("machine") or {}
    model = _model_name(study.get("model", ""))
    fig.suptitle(_wrap(f"{model}, batch of {max(study.get('batches') or [0])} questions, the same "
                       f"batches for every configuration; measured on "
                       f"{machine.get('cuda') or machine.get('cpu_model', '?')}, {_threads(machine)}", PAGE_WIDTH, 7))
    return fig


# ---------------------------------------------------------------------------------------------- 5: decoding

@_styled
def plot_strategies(evaluations: Iterable[dict]) -> Figure | None:
    """F1 against how often a question's answer changes with the seed, for each decoding strategy, the
    seeds' standard deviation as error bars: what sampling trades in accuracy for variety (greedy sits at 0).
    One colour per evaluation file."""
    fig, axes = _figure(COLUMN_WIDTH, 2.7)
    ax, drawn, labels = axes[0][0], [], []
    for i, evaluation in enumerate(evaluations):
        rows = [r for r in evaluation.get("strategies") or []
                if r.get("seed_disagreement") is not None and r.get("f1") is not None]
        if not rows:
            _skip("decoding_strategies", f"{evaluation.get('adapter') or evaluation.get('model')}: no strategy rows")
            continue
        label = (evaluation.get("label") or evaluation.get("adapter") or evaluation.get("model_resolved")
                 or evaluation.get("model") or f"file {i + 1}")
        ax.errorbar([100 * r["seed_disagreement"] for r in rows], [r["f1"] for r in rows],
                    yerr=[r.get("f1_sd") or 0.0 for r in rows],
                    color=PALETTE[i], marker="o", linestyle="none", label=f"{label} (n={evaluation.get('n')})")
        labels += [(r["strategy"], 100 * r["seed_disagreement"], r["f1"]) for r in rows]
        drawn.append(evaluation)
    if not drawn:
        _skip("decoding_strategies", "no strategy-grid evaluation given")
        return None
    ax.set_xlabel("questions whose answer differs between seeds (%)")
    if len(drawn) == 1:  # one series: its size on the axis, no legend box of file names
        ax.set_ylabel(f"F1 on {drawn[0].get('n')} questions\n(error bars: SD over seeds)")
    else:
        ax.set_ylabel("F1 (error bars: SD over seeds)")
        fig.legend(loc="outside lower center")
    _label_points(ax, labels)
    return fig


def _spread(wanted: list[float], gap: float) -> list[float]:
    """Positions as close as possible to `wanted` (any order) and at least `gap` apart: sorted from the top,
    labels that would collide are merged into a block centred on their wanted positions (pool adjacent
    violators), so a crowd of labels fans out around where it was, not only downwards."""
    order = sorted(range(len(wanted)), key=lambda i: -wanted[i])
    blocks: list[list[int]] = []  # runs of labels stacked `gap` apart, the first one on top

    def top(block):  # the top that minimises the squared displacement of the block's labels
        return float(np.mean([wanted[i] + k * gap for k, i in enumerate(block)]))

    for i in order:
        blocks.append([i])
        while len(blocks) > 1 and top(blocks[-2]) - (len(blocks[-2]) - 1) * gap - gap < top(blocks[-1]):
            blocks[-2:] = [blocks[-2] + blocks[-1]]
    placed = [0.0] * len(wanted)
    for block in blocks:
        for k, i in enumerate(block):
            placed[i] = top(block) - k * gap
    return placed


def _label_points(ax, labels: list[tuple[str, float, float]], fontsize: float = 7) -> None:
    """Name each point: labels that would overlap are spread vertically, each starts right of every point
    near its height (so no label covers a marker of a crowd), or ends left of them where the axes have no room
    on the right, and a thin leader line joins a moved label to its point. Works in display units, after the
    layout, which the labels then leave alone (they stay inside the axes)."""
    ax.figure.draw_without_rendering()  # the layout first: it decides where the points land on the page
    points = [ax.transData.transform((x, y)) for _, x, y in labels]
    points_per_pixel = 72 / ax.figure.dpi
    gap = fontsize * 1.25 / points_per_pixel
    placed = _spread([py for _, py in points], gap)
    for (text, x, y), (px, py), ly in zip(labels, points, placed):
        near = [qx for qx, qy in points if abs(qy - ly) < 1.5 * gap or (qx, qy) == (px, py)]
        width = TextPath((0, 0), text, size=fontsize).get_extents().width / points_per_pixel
        right = max(near) + 6 / points_per_pixel
        side = "left" if right + width <= ax.bbox.x1 else "right"  # the side of the label its anchor is on
        start = right if side == "left" else min(near) - 6 / points_per_pixel
        dx, dy = (start - px) * points_per_pixel, (ly - py) * points_per_pixel
        ax.annotate(text, (x, y), textcoords="offset points", xytext=(dx, dy), fontsize=fontsize, va="center",
                    ha=side, annotation_clip=False, in_layout=False,
                    arrowprops=dict(arrowstyle="-", lw=0.4, color="0.5", shrinkA=1, shrinkB=2, patchA=None,
                                    relpos=(0, 0.5) if side == "left" else (1, 0.5))  # from the label's start
                    if abs(dy) > 2 or abs(dx) > 8 else None)


# ---------------------------------------------------------------------------------------------- 6: padding

PADDING_METRICS = (("padded_share", "padded share of tokens (%)"),
                   ("tokens_per_question", "tokens per question"),
                   ("step_seconds", "step time (s)"),
                   ("peak_memory_mb", "peak memory (MiB)"))


def padding_series(study: dict, strategy: str, metric: str) -> tuple[list[int], list[float]]:
    """(batch sizes, values) of one strategy; timed metrics only where the cell was timed. Step time is CPU
    time where the study has it (the step's work, even beside other jobs on the core), else wall time."""
    xs, ys = [], []
    for cell in sorted((c for c in study["cells"] if c["strategy"] == strategy), key=lambda c: c["batch_size"]):
        timing = cell.get("timing") or {}
        value = {"padded_share": 100 * cell["padded_share"], "tokens_per_question": cell["tokens_per_question"],
                 "step_seconds": timing.get("step_cpu_seconds_median") or timing.get("step_seconds_median"),
                 "peak_memory_mb": timing.get("peak_memory_mb_max")}[metric]
        if value is not None:
            xs.append(cell["batch_size"])
            ys.append(value)
    return xs, ys


MODEL_NAMES = {"smollm2-135m": "SmolLM2-135M", "gpt2": "GPT-2"}


def _model_name(name: str) -> str:
    """The model as a reader knows it, not loraqa's short name for it."""
    return MODEL_NAMES.get(name, name)


def _threads(machine: dict) -> str:
    n = machine.get("torch_threads")
    return f"{n} thread{'' if n == 1 else 's'}"


def _untimed(study: dict) -> str:
    """'; not timed: static at 16, 32, ...' for the cells the study skipped (too costly on its machine)."""
    skipped = {}
    for cell in study["cells"]:
        if "timing" not in cell:
            skipped.setdefault(cell["strategy"].replace("_", " "), []).append(str(cell["batch_size"]))
    listed = "; ".join(f"{s} at {', '.join(sizes)}" for s, sizes in skipped.items())
    return f"; not timed (over {study.get('settings', {}).get('max_step_tokens', 'the')} tokens a step): {listed}" \
        if skipped else ""


@_styled
def plot_padding(study: dict) -> Figure | None:
    """Padded share, tokens computed per question, step time and peak memory against batch size, a line per
    batching strategy: what padding costs as batches grow, and what grouping and packing take back."""
    if not study.get("cells"):
        _skip("padding_study", "the padding study has no cells")
        return None
    fig, axes = _figure(COLUMN_WIDTH, 4.0, 2, 2)
    for ax, (metric, label) in zip(axes.flat, PADDING_METRICS):
        for i, strategy in enumerate(study["strategies"]):
            xs, ys = padding_series(study, strategy, metric)
            if xs:
                ax.plot(xs, ys, color=PALETTE[i], marker=MARKERS[i], label=strategy.replace("_", " "))
            elif metric in ("step_seconds", "peak_memory_mb"):
                _skip("padding_study", f"{strategy}: no timed batch size")
        ax.set_xscale("log", base=2)
        ax.set_xticks(study["batch_sizes"], [str(b) for b in study["batch_sizes"]])
        if metric in ("step_seconds", "peak_memory_mb", "tokens_per_question"):
            ax.set_yscale("log")
            _plain_log(ax.yaxis)
        ax.set_title(label)
        ax.set_xlabel("batch size (questions)")  # on both rows: the lower row's titles are not the upper's labels
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncols=math.ceil(len(labels) / 2))
    machine = study.get("machine") or {}
    on_cpu = any((c.get("timing") or {}).get("step_cpu_seconds_median") for c in study["cells"])
    fig.suptitle(_wrap(f"{_model_name(study.get('model', ''))} + LoRA r={(study.get('lora') or {}).get('lora_r')}, "
                       f"{(study.get('pool') or {}).get('questions', '?')} SQuAD questions; step: forward and backward "
                       f"on {machine.get('cuda') or machine.get('cpu_model', '?')}"
                       + (f", {_threads(machine)}, CPU seconds" if on_cpu else "")
                       + "; memory: peak over the model's own" + _untimed(study), COLUMN_WIDTH, 7))
    return fig


# ---------------------------------------------------------------------------------------------- all

def _read(path) -> dict | None:
    if path is None:
        return None
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        logger.info("%s: not there yet; its plots are skipped", path)
    except json.JSONDecodeError as err:
        logger.warning("%s: not valid JSON (%s); its plots are skipped", path, err)
    return None


def make_plots(results_path: str | Path | None, output_dir: str | Path, *, strategies: Iterable[str | Path] = (),
               padding: str | Path | None = None, cost: str | Path | None = None) -> list[Path]:
    """Draw every plot whose data exists and write it as PNG and PDF into `output_dir`; returns the files."""
    figures = {}
    results = _read(results_path)
    if results is not None:
        figures.update(loss_curves=plot_loss_curves(results), params_vs_f1=plot_params_vs_f1(results),
                       f1_heatmaps=plot_f1_heatmaps(results))
    evaluations = [{"label": Path(p).stem, **e} for p, e in ((p, _read(p)) for p in strategies) if e is not None]
    figures["decoding_strategies"] = plot_strategies(evaluations) if evaluations else None
    study = _read(padding)
    figures["padding_study"] = plot_padding(study) if study is not None else None
    costs = _read(cost)
    figures["cost"] = plot_cost(costs) if costs is not None else None
    logging.getLogger("fontTools").setLevel(logging.WARNING)  # the PDF backend's font subsetting chatters at INFO
    with matplotlib.rc_context(STYLE):  # savefig's dpi and bbox
        written = []
        out = Path(output_dir)
        out.mkdir(parents=True, exist_ok=True)
        for name, fig in figures.items():
            if fig is None:
                continue
            for suffix in (".png", ".pdf"):
                fig.savefig(out / f"{name}{suffix}", metadata={"CreationDate": None} if suffix == ".pdf" else None)
                written.append(out / f"{name}{suffix}")
    return written
