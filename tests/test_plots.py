"""Every plot draws exactly the numbers of the results it was given, skips what has no data, and writes PNG+PDF."""
from __future__ import annotations

import copy
import importlib.util
import json
import logging
import re
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.text import Text
import pytest

from loraqa.study import plots
from loraqa.cli import main

FIXTURES = Path(__file__).parent / "fixtures"
_spec = importlib.util.spec_from_file_location("make_fixtures", FIXTURES / "make_fixtures.py")
make_fixtures = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(make_fixtures)


def _load(name: str) -> dict:
    return json.loads((FIXTURES / name).read_text())


@pytest.fixture
def results() -> dict:
    return _load("evaluation_results.json")


def _grid(results: dict) -> list[dict]:
    return [r for r in results["runs"] if r["group"] == "grid"]


def _axis(fig, title: str):
    matches = [ax for ax in fig.axes if ax.get_title() == title]
    assert len(matches) == 1, f"{title!r}: {[ax.get_title() for ax in fig.axes]}"
    return matches[0]


def _line(ax, label: str):
    matches = [line for line in ax.get_lines() if line.get_label() == label]
    assert len(matches) == 1, f"{label!r}: {[line.get_label() for line in ax.get_lines()]}"
    return matches[0]


def test_fixtures_are_what_the_generator_builds():
    for filename, build in make_fixtures.FIXTURES.items():
        assert _load(filename) == json.loads(json.dumps(build())), f"rerun tests/fixtures/make_fixtures.py ({filename})"


def test_fixture_covers_every_group_and_the_partial_cases(results):
    assert {r["group"] for r in results["runs"]} == {"baseline", "grid", "seed", "alpha", "full_ft", "ablation", "final"}
    assert results["pending"], "one grid run is still pending"
    assert any(not r["curves"]["train"] for r in _grid(results)), "one grid run has no curves"


def test_loss_curves_draw_each_runs_train_and_validation_points(results):
    fig = plots.plot_loss_curves(results)
    grid = _grid(results)
    rates = {r["settings"]["learning_rate"] for r in grid}
    targets = {r["settings"]["target_modules"] for r in grid}
    assert len(fig.axes) == len(rates) * len(targets)
    for run in grid:
        s = run["settings"]
        (ax,) = [ax for ax in fig.axes if ax.get_label() == f"lr {s['learning_rate']:g} · {s['target_modules']}"]
        for split, style in (("train", "-"), ("validation", "--")):
            labels = [line.get_label() for line in ax.get_lines()]
            if not run["curves"][split]:
                assert f"r={s['lora_r']} {split}" not in labels
                continue
            line = _line(ax, f"r={s['lora_r']} {split}")
            assert line.get_linestyle() == style
            np.testing.assert_array_equal(np.column_stack([line.get_xdata(), line.get_ydata()]), run["curves"][split])


def test_params_vs_f1_points_and_ci_bars_and_control_lines(results):
    fig = plots.plot_params_vs_f1(results)
    ax = fig.axes[0]
    assert ax.get_xscale() == "log"
    grid = _grid(results)
    containers = {c.get_label(): c for c in ax.containers}
    drawn = 0
    for (target, rate), members in _by(grid, "target_modules", "learning_rate").items():
        members.sort(key=lambda r: r["trainable_params"])
        container = containers[f"{target}, lr {rate:g}"]
        data_line, _, (bars,) = container.lines
        np.testing.assert_array_equal(data_line.get_xdata(), [r["trainable_params"] for r in members])
        np.testing.assert_array_equal(data_line.get_ydata(), [r["scores"]["test"]["f1"] for r in members])
        segments = np.array(bars.get_segments())  # (points, 2 ends, xy)
        np.testing.assert_allclose(segments[:, :, 1], [r["scores"]["test"]["f1_ci"] for r in members])
        drawn += len(members)
    assert drawn == len(grid)
    # the baseline scored on the grid's 500 questions, not the full-dev one; the selected full-FT run
    baseline = next(r for r in results["runs"] if r["group"] == "baseline" and r["scores"]["test"]["n"] == 500)
    full_ft = next(r for r in results["runs"] if r["run_id"] == results["selection"]["best_full_ft_run"])
    for label, run in (("baseline (untuned)", baseline),
                       (f"full fine-tuning, lr {full_ft['settings']['learning_rate']:g}", full_ft)):
        assert list(_line(ax, label).get_ydata()) == [run["scores"]["test"]["f1"]] * 2
        band = next(p for p in ax.patches if p.get_label() == f"_{label.split(',')[0]} CI")
        assert [band.get_y(), band.get_y() + band.get_height()] == pytest.approx(run["scores"]["test"]["f1_ci"])


def test_params_vs_f1_shows_the_untuned_models_best_prompt_beside_zero_shot(results):
    """With prompted baselines the untuned model has two lines: zero-shot (the run named `baseline`, whatever
    the order of the runs) and the prompt the study chose on validation, which the headline gain is quoted against."""
    prompted = copy.deepcopy(results)
    zero_shot = next(r for r in prompted["runs"] if r["name"] == "baseline")
    shot = copy.deepcopy(zero_shot)
    shot.update(run_id="baseline_3shot-x", name="baseline_3shot")
    shot["scores"]["test"].update(f1=zero_shot["scores"]["test"]["f1"] + 13.0)
    prompted["runs"].insert(0, shot)  # before zero-shot: picked by name, not by position
    prompted["prompted_baselines"] = {"best_run": "baseline_3shot-x", "best_name": "baseline_3shot"}
    ax = plots.plot_params_vs_f1(prompted).axes[0]
    assert list(_line(ax, "untuned, zero-shot").get_ydata()) == [zero_shot["scores"]["test"]["f1"]] * 2
    best = _line(ax, "untuned, best prompt")
    assert list(best.get_ydata()) == [shot["scores"]["test"]["f1"]] * 2 and best.get_linestyle() == ":"


def _by(runs: list[dict], *keys: str) -> dict[tuple, list[dict]]:
    groups: dict[tuple, list[dict]] = {}
    for run in runs:
        groups.setdefault(tuple(run["settings"][k] for k in keys), []).append(run)
    return groups


def test_f1_heatmaps_cells_equal_test_f1_and_missing_runs_are_blank(results):
    fig = plots.plot_f1_heatmaps(results)
    grid = _grid(results)
    ranks = sorted({r["settings"]["lora_r"] for r in grid})
    rates = sorted({r["settings"]["learning_rate"] for r in grid})
    for target in results["protocol"]["grid"]["target_modules"]:
        ax = _axis(fig, target)
        image = ax.images[0].get_array()
        expected = np.full((len(ranks), len(rates)), np.nan)
        for run in grid:
            if run["settings"]["target_modules"] == target:
                expected[ranks.index(run["settings"]["lora_r"]), rates.index(run["settings"]["learning_rate"])] = \
                    run["scores"]["test"]["f1"]
        np.testing.assert_array_equal(np.ma.getmaskarray(image), np.isnan(expected))
        np.testing.assert_array_equal(image.filled(np.nan), expected)
        assert sorted(t.get_text() for t in ax.texts) == sorted(f"{v:.1f}" for v in expected[np.isfinite(expected)])
        assert [t.get_text() for t in ax.get_yticklabels()] == [str(r) for r in ranks]
    # the panels are stacked and share the bottom one's learning-rate labels
    xticks = [[t.get_text() for t in _axis(fig, target).get_xticklabels()]
              for target in results["protocol"]["grid"]["target_modules"]]
    assert xticks[-1] == [f"{r:g}" for r in rates] and not any(xticks[:-1])
    assert any(np.ma.getmaskarray(ax.images[0].get_array()).any() for ax in fig.axes if ax.images), "pending cell"


@pytest.mark.parametrize("repeated", [False, True])
def test_cost_lines_are_the_cost_studys_numbers_and_full_ft_is_a_line(repeated):
    """One repetition: the mean step time; repeated steps: the median, the number the report's text quotes."""
    study = _load("cost_study.json")
    if repeated:
        for c in study["configs"]:
            c["step_cpu_seconds_median"] = c["step_cpu_seconds_mean"] - 0.25
    fig = plots.plot_cost(study)
    lora = [c for c in study["configs"] if c["method"] == "lora"]
    full = next(c for c in study["configs"] if c["method"] == "full_finetune")
    metrics = plots.cost_metrics(study)
    assert metrics[0][0] == ("step_cpu_seconds_median" if repeated else "step_cpu_seconds_mean")
    for metric, title, scale in metrics:
        ax = _axis(fig, title)
        for target in ("attention", "attention+mlp"):
            line = _line(ax, f"LoRA {target}")
            expected = sorted((c["lora_r"], c[metric] * scale) for c in lora if c["target_modules"] == target)
            np.testing.assert_allclose(np.column_stack([line.get_xdata(), line.get_ydata()]), expected)
        assert _line(ax, "full fine-tuning").get_ydata()[0] == pytest.approx(full[metric] * scale)
    assert "fixture CPU, 2 threads" in fig._suptitle.get_text()


def test_strategies_plot_f1_against_seed_disagreement_with_seed_sd():
    evaluation = _load("strategies.json")
    fig = plots.plot_strategies([evaluation])
    ax = fig.axes[0]
    (container,) = ax.containers
    data_line, _, (bars,) = container.lines
    rows = [r for r in evaluation["strategies"] if "seed_disagreement" in r]
    assert len(rows) < len(evaluation["strategies"]), "the fixture has a row without diversity figures"
    np.testing.assert_allclose(np.asarray(data_line.get_xdata(), dtype=float), [100 * r["seed_disagreement"] for r in rows])
    np.testing.assert_array_equal(data_line.get_ydata(), [r["f1"] for r in rows])
    segments = np.array(bars.get_segments())
    np.testing.assert_allclose(segments[:, 1, 1] - segments[:, 0, 1], [2 * r["f1_sd"] for r in rows])
    assert sorted(t.get_text() for t in ax.texts) == sorted(r["strategy"] for r in rows)
    assert rows[0]["strategy"] == "greedy" and data_line.get_xdata()[0] == 0.0
    assert not fig.legends and f"F1 on {evaluation['n']} questions" in ax.get_ylabel()  # one file: no legend
    two = plots.plot_strategies([evaluation, {**evaluation, "label": "second"}])
    assert [t.get_text() for t in two.legends[0].get_texts()][1] == f"second (n={evaluation['n']})"


def test_padding_plot_a_line_per_strategy_and_untimed_cells_left_out():
    study = _load("padding_study.json")
    fig = plots.plot_padding(study)
    for metric, title in plots.PADDING_METRICS:
        ax = _axis(fig, title)
        assert ax.get_xlabel() == "batch size (questions)"  # every panel, so no title reads as the one above's label
        for strategy in study["strategies"]:
            line = _line(ax, strategy.replace("_", " "))
            cells = sorted((c for c in study["cells"] if c["strategy"] == strategy), key=lambda c: c["batch_size"])
            if metric == "padded_share":
                expected = [(c["batch_size"], 100 * c["padded_share"]) for c in cells]
            elif metric == "tokens_per_question":
                expected = [(c["batch_size"], c["tokens_per_question"]) for c in cells]
            else:
                key = {"step_seconds": "step_cpu_seconds_median", "peak_memory_mb": "peak_memory_mb_max"}[metric]
                expected = [(c["batch_size"], c["timing"][key]) for c in cells if "timing" in c]
            np.testing.assert_allclose(np.column_stack([line.get_xdata(), line.get_ydata()]), expected)
    assert any("timing" not in c for c in study["cells"]), "the fixture has an untimed cell"


def test_make_plots_writes_png_and_pdf_of_every_plot(tmp_path):
    written = plots.make_plots(FIXTURES / "evaluation_results.json", tmp_path,
                               strategies=[FIXTURES / "strategies.json"], padding=FIXTURES / "padding_study.json",
                               cost=FIXTURES / "cost_study.json")
    names = ["loss_curves", "params_vs_f1", "f1_heatmaps", "cost", "decoding_strategies", "padding_study"]
    assert sorted(written) == sorted(tmp_path / f"{n}{s}" for n in names for s in (".png", ".pdf"))
    for path in written:
        head = path.read_bytes()[:8]
        assert head.startswith(b"\x89PNG" if path.suffix == ".png" else b"%PDF"), path


def test_make_plots_draws_what_exists_and_notes_the_rest(tmp_path, results, caplog):
    only_baseline = copy.deepcopy(results)
    only_baseline["runs"] = [r for r in results["runs"] if r["group"] == "baseline"]
    path = tmp_path / "partial.json"
    path.write_text(json.dumps(only_baseline))
    with caplog.at_level(logging.INFO, logger="loraqa.study.plots"):
        written = plots.make_plots(path, tmp_path / "plots", padding=tmp_path / "missing.json")
    assert written == []
    notes = caplog.text
    for plot in ("loss_curves", "params_vs_f1", "f1_heatmaps"):
        assert f"plot {plot}:" in notes
    assert "missing.json: not there yet" in notes


def test_make_plots_with_grid_runs_but_no_controls_yet(tmp_path, results, caplog):
    grid_only = copy.deepcopy(results)
    grid_only["runs"] = _grid(results)[:3]
    for run in grid_only["runs"][1:]:
        run["scores"] = {}  # trained, not yet evaluated
    path = tmp_path / "grid.json"
    path.write_text(json.dumps(grid_only))
    with caplog.at_level(logging.INFO, logger="loraqa.study.plots"):
        written = plots.make_plots(path, tmp_path)
    assert {p.stem for p in written} == {"loss_curves", "params_vs_f1", "f1_heatmaps"}
    assert "no full fine-tuning run scored" in caplog.text and "no baseline (untuned) run scored" in caplog.text


def test_cli_plots(tmp_path, capsys):
    out = tmp_path / "plots"
    assert main(["plots", "--results", str(FIXTURES / "evaluation_results.json"), "--output_dir", str(out),
                 "--strategies", str(FIXTURES / "strategies.json"),
                 "--padding", str(FIXTURES / "padding_study.json"), "--cost", str(FIXTURES / "cost_study.json")]) == 0
    assert len(list(out.glob("*.png"))) == len(list(out.glob("*.pdf"))) == 6
    assert str(out) in capsys.readouterr().out


def test_spread_keeps_labels_apart_and_near_their_points():
    wanted = [10.0, 10.5, 30.0, 9.8, 50.0]
    placed = plots._spread(wanted, gap=2.0)
    ordered = sorted(placed)
    assert min(b - a for a, b in zip(ordered, ordered[1:])) >= 2.0 - 1e-9
    assert placed[2] == 30.0 and placed[4] == 50.0  # labels with room stay where they are
    crowd = [placed[i] for i in (0, 1, 3)]  # the three that collided, centred on their wanted positions
    assert np.mean(crowd) == pytest.approx(np.mean([10.0, 10.5, 9.8]))
    assert placed[1] > placed[0] > placed[3]  # and in the same order


def test_crowded_strategy_labels_do_not_overlap():
    rows = [{"strategy": f"top_p={p}", "seed_disagreement": 0.6 + 0.002 * k, "f1": 50 + 0.02 * k, "f1_sd": 1.0}
            for k, p in enumerate((0.8, 0.85, 0.9, 0.95, 0.99))]  # a crowd, as sampling strategies are
    rows += [{"strategy": "greedy", "seed_disagreement": 0.0, "f1": 60.0},
             {"strategy": "hot", "seed_disagreement": 0.92, "f1": 30.0}]
    fig = plots.plot_strategies([{"strategies": rows, "n": 10}])
    renderer = FigureCanvasAgg(fig).get_renderer()
    fig.draw(renderer)
    boxes = [Text.get_window_extent(t, renderer) for t in fig.axes[0].texts]  # the text alone, not its leader
    assert len(boxes) == len(rows)
    assert not any(a.overlaps(b) for i, a in enumerate(boxes) for b in boxes[i + 1:])


def test_strategy_leader_lines_cross_no_other_label():
    """The final model's grid (rounded), where leaders once ran through their neighbours' labels: two points
    coincide (top_k 25 and 50) and two share a height at different seed disagreement (top_k=10, top_p=0.9)."""
    grid = [("greedy", 0.0, 73.9, 0.0), ("top_k=10", 64.2, 67.0, 0.9), ("top_k=25", 66.4, 64.9, 0.9),
            ("top_k=50", 66.6, 64.8, 0.7), ("top_p=0.8", 50.4, 70.5, 0.8), ("top_p=0.9", 58.6, 67.0, 0.7),
            ("top_p=0.95", 63.0, 65.4, 0.6), ("temperature=0.7", 48.8, 70.3, 0.1), ("sample", 69.0, 62.6, 1.1),
            ("temperature=1.3", 86.2, 45.0, 1.2)]
    rows = [{"strategy": s, "seed_disagreement": d / 100, "f1": f1, "f1_sd": sd} for s, d, f1, sd in grid]
    fig = plots.plot_strategies([{"strategies": rows, "n": 500}])
    renderer = FigureCanvasAgg(fig).get_renderer()
    fig.draw(renderer)
    labels = fig.axes[0].texts
    boxes = {t.get_text(): Text.get_window_extent(t, renderer).padded(-0.5) for t in labels}
    crossed = [(t.get_text(), other) for t in labels if t.arrow_patch for other, box in boxes.items()
               if other != t.get_text() and t.arrow_patch.get_path().intersects_bbox(box, filled=False)]
    assert len(boxes) == len(rows) and not crossed
    inside = fig.axes[0].bbox
    assert all(inside.contains(b.x0, b.y0) and inside.contains(b.x1, b.y1) for b in boxes.values())


# ---------------------------------------------------------------------------------------------- print size

SECTIONS = Path(__file__).parent.parent / "report" / "sections"


def _print_widths() -> dict[str, float]:
    """Each figure's printed width, read from the report: two columns (7.16 in) for `scope: "parent"`, else one
    IEEE column (3.5 in). A figure drawn at that width prints at the font sizes it was drawn with."""
    source = "\n".join(p.read_text() for p in sorted(SECTIONS.glob("*.typ")))
    widths = {}
    for match in re.finditer(r"#figure\(\{\{fig_(\w+)\}\}(.*?)<fig:", source, re.DOTALL):
        widths[match[1]] = 7.16 if 'scope: "parent"' in match[2] else 3.5
    return widths


def _figures() -> dict:
    """Every figure as the report gets it: the study's fixture, the padding, cost and strategy studies."""
    results = _load("evaluation_results.json")
    diverged = copy.deepcopy(results)  # a diverged cell writes 'div.' in the heatmap, in the same type size
    next(r for r in _grid(diverged) if r["scores"].get("test"))["diverged"] = True
    return {"loss_curves": plots.plot_loss_curves(results), "params_vs_f1": plots.plot_params_vs_f1(diverged),
            "f1_heatmaps": plots.plot_f1_heatmaps(diverged), "cost": plots.plot_cost(_load("cost_study.json")),
            "decoding_strategies": plots.plot_strategies([_load("strategies.json")]),
            "padding_study": plots.plot_padding(_load("padding_study.json"))}


def _drawn_texts(fig, monkeypatch) -> tuple[list, object]:
    """(every Text the renderer drew, the renderer): tick labels outside the view are not drawn, so they are
    collected by drawing, not by walking the artist tree."""
    drawn, draw = [], Text.draw

    def record(text, renderer):
        if text.get_visible() and text.get_text().strip():
            drawn.append(text)
        return draw(text, renderer)

    monkeypatch.setattr(Text, "draw", record)
    renderer = FigureCanvasAgg(fig).get_renderer()
    fig.draw(renderer)
    monkeypatch.setattr(Text, "draw", draw)
    return drawn, renderer


def test_every_figure_is_drawn_at_its_printed_width_with_legible_unclipped_text(monkeypatch):
    widths = _print_widths()
    figures = _figures()
    assert set(widths) <= set(figures), "a figure of the report is not drawn here"
    for name, fig in figures.items():  # one the report leaves out (the README shows it) is drawn a column wide
        assert fig.get_size_inches()[0] == pytest.approx(widths.get(name, 3.5)), name
        texts, renderer = _drawn_texts(fig, monkeypatch)
        page = fig.bbox.padded(0.5)
        for text in texts:
            assert text.get_fontsize() >= 7, f"{name}: {text.get_text()!r} at {text.get_fontsize()} pt"
            box = Text.get_window_extent(text, renderer)  # the text alone, not an annotation's leader
            assert page.contains(box.x0, box.y0) and page.contains(box.x1, box.y1), \
                f"{name}: {text.get_text()!r} runs off the figure"
        boxes = [(t.get_text(), Text.get_window_extent(t, renderer).padded(-0.5)) for t in texts]
        overlaps = [(a, b) for i, (a, box) in enumerate(boxes) for b, other in boxes[i + 1:] if box.overlaps(other)]
        assert not overlaps, f"{name}: overlapping text {overlaps[:5]}"
        leaders = [(t.get_text(), t.arrow_patch.get_path()) for t in texts if getattr(t, "arrow_patch", None)]
        crossed = [(a, b) for a, leader in leaders for b, box in boxes
                   if b != a and leader.intersects_bbox(box, filled=False)]
        assert not crossed, f"{name}: a label's leader line crosses another label {crossed[:5]}"


def test_make_plots_saves_each_figure_at_the_size_it_was_drawn(tmp_path):
    """No tight bounding box: the saved page is the figure, so the report's 100% width is the drawn width."""
    plots.make_plots(FIXTURES / "evaluation_results.json", tmp_path, cost=FIXTURES / "cost_study.json")
    for name, width in (("params_vs_f1", 3.5), ("cost", 7.16)):
        box = re.search(rb"/MediaBox \[\s*0 0 ([\d.]+) ([\d.]+)", (tmp_path / f"{name}.pdf").read_bytes())
        assert float(box[1]) == pytest.approx(72 * width), name
