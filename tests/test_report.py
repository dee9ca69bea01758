"""loraqa.report.build: the report builds offline from a small results fixture, every number it prints is read from
its source, claims follow the numbers in both directions, and what is missing is printed as pending."""
import json
import re
import shutil
from pathlib import Path

import pytest

pytest.importorskip("typst")

from loraqa.report.build import PLACEHOLDER, ReportError, build_report, count_pages  # noqa: E402
from loraqa.report.inputs import excerpt, label_example  # noqa: E402
from loraqa.report.text import (FORMATS, OPS, Number, claim_agreement, claim_beams, claim_best_strategy, claim_bf16,
                                claim_count, claim_curve, claim_difference, claim_edge, claim_identical, claim_padding,
                                claim_same_loss, claim_sampling, claim_significant, claim_trend, claim_verbatim)
from loraqa.report.values import FIGURES, report_values  # noqa: E402

ROOT = Path(__file__).parents[1]
FIXTURE = Path(__file__).parent / "fixtures" / "report"
SECTIONS = ROOT / "report" / "sections"
OURS = ("abstract", "introduction", "methodology", "results", "analysis", "conclusion")  # theory has its own author


def _placeholders(path: Path) -> set[str]:
    return set(PLACEHOLDER.findall(path.read_text())) if path.exists() else set()


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    out = tmp_path_factory.mktemp("report")
    return build_report(FIXTURE, out / "report.pdf", png_dir=out / "pages", source_dir=out / "source", ppi=30)


def _source_text(source_dir: Path) -> str:
    return "\n".join(p.read_text() for p in sorted(source_dir.rglob("*.typ")))


def _resolve(root: Path, source: str):
    """An independent reading of 'file.json#/json/pointer'."""
    name, _, pointer = source.partition("#")
    node = json.loads((root / name).read_text())
    for part in pointer.split("/")[1:]:
        part = part.replace("~1", "/").replace("~0", "~")
        node = node[int(part)] if isinstance(node, list) else node[part]
    return node


def _rendered_paragraphs(source_dir: Path) -> list[str]:
    """The text of every paragraph, figure and list the compiled document holds (branches not taken are absent)."""
    import typst

    def walk(node, out):
        if isinstance(node, dict) and node.get("func") in ("space", "linebreak", "parbreak", "smartquote"):
            out.append("'" if node["func"] == "smartquote" else " ")
        elif isinstance(node, dict):
            for key, value in node.items():
                out.append(value) if key == "text" and isinstance(value, str) else walk(value, out)
        elif isinstance(node, list):
            for value in node:
                walk(value, out)
        return out

    found = []
    for selector in ("par", "figure", "list"):
        found += json.loads(typst.query(str(source_dir / "main.typ"), selector, root=str(source_dir)))
    return ["".join(walk(element, [])) for element in found]


def _copy_fixture(tmp_path: Path) -> Path:
    results = tmp_path / "results"
    shutil.copytree(FIXTURE, results, ignore=shutil.ignore_patterns("*.py"))
    return results


# ---------------------------------------------------------------------------------------------- the build

def test_fixture_report_builds_offline_with_every_figure_and_no_placeholder(built):
    assert built.pdf.exists() and built.pages >= 1 and len(built.png) == built.pages == count_pages(built.pdf)
    source = _source_text(built.source_dir)
    assert "{{" not in source and "missing(" not in source.replace("#let missing(", "")
    images = re.findall(r'image\("(/figures/[^"]+)"', source)
    assert {Path(p).stem for p in images} == set(FIGURES.values())
    assert all((built.source_dir / p.lstrip("/")).exists() for p in images)
    fields = built.values.fields
    # the complete fixture fills every placeholder of the sections, and every flag is on but the trends over the
    # main effects' levels: its row extension leaves the levels unequal mixes of the other factors
    unbalanced = {"has_claim_rank", "has_claim_learning_rate"}
    for name in OURS:
        for placeholder in _placeholders(SECTIONS / f"{name}.typ"):
            assert placeholder in fields, f"{name}.typ: {{{{{placeholder}}}}} has no value on the complete fixture"
            if placeholder.startswith("has_"):
                assert fields[placeholder] == ("false" if placeholder in unbalanced else "true"), placeholder
    rendered = " ".join(_rendered_paragraphs(built.source_dir))
    assert "else [" not in rendered and "else[" not in rendered  # a Typst `else` must follow its `]` on one line
    assert "[Pending:" not in rendered and "still running" not in rendered  # nothing is pending on a complete study
    assert "Grid best so far" not in rendered and "Only one pair" not in rendered
    labels = set(re.findall(r"<((?:fig|tab|sec):[\w-]+)>", source))
    assert {"tab:main", "tab:tests", "tab:effects", "tab:strategies", "tab:failures", "tab:bench", "tab:lorafull",
            "tab:hyper", "fig:labels", "fig:loss"} <= labels
    assert set(re.findall(r"@((?:fig|tab|sec):[\w-]+)", source)) <= labels


def test_every_printed_number_is_its_source_value(built):
    numbers = built.values.numbers
    assert len(numbers) > 300
    for number in numbers:
        value = OPS[number.op](*(_resolve(FIXTURE, s) for s in number.sources)) * number.scale
        assert FORMATS[number.fmt](value) == number.text, number


def test_headline_numbers_are_the_final_models(built):
    study = json.loads((FIXTURE / "evaluation_results.json").read_text())
    final = next(r for r in study["runs"] if r["run_id"] == study["final"]["run"])
    abstract = next(p for p in _rendered_paragraphs(built.source_dir) if "We adapt a causal" in p)
    assert f"F1 {study['final']['test']['f1']:.1f} on the full SQuAD dev set" in abstract
    # the gain is quoted against the best prompt on all of dev, with the zero-shot prompt beside it
    assert (f"against F1 {study['final']['prompted_baseline_full_dev']['f1']:.1f} for the untuned model with its best "
            f"prompt (3 examples) and {study['final']['baseline_full_dev']['f1']:.1f} zero-shot") in abstract
    assert f"{final['trainable_params']:,} parameters" in abstract
    # rho = P / P_LoRA (lora_math's definition): what full fine-tuning trains per trainable adapter parameter,
    # the very number the theory section prints for the same model, targets and rank
    from loraqa.measure.lora_math import reduction_factor

    full_ft = next(r for r in study["runs"] if r["group"] == "full_ft")
    assert full_ft["trainable_params"] == final["total_params"] - final["trainable_params"]
    rho = f"{reduction_factor(full_ft['trainable_params'], final['trainable_params']):.1f}"
    assert f"({rho} times fewer than full fine-tuning)" in abstract
    assert final["settings"]["target_modules"] == "attention+mlp" and final["settings"]["lora_r"] == 16
    assert built.values.fields["final_reduction"] == built.values.fields["smollm2_attention_mlp_r16_reduction"] == rho
    theory = (built.source_dir / "sections" / "theory.typ").read_text()
    assert f"$rho = {rho}$" in theory and "$rho = P slash P_\"LoRA\"$" in theory
    # resumed across sessions: the whole run's time, extrapolated and said so, not the last process's
    assert f"16,000 questions in about {final['train_time_s'] / 60:.0f} minutes" in abstract
    assert "preliminary" not in abstract  # the final model replaces the preliminary numbers
    results = next(p for p in _rendered_paragraphs(built.source_dir) if "the final model reaches" in p)
    curves = next(p for p in _rendered_paragraphs(built.source_dir) if "For the final model, trained on 16,000" in p)
    assert "For the final model, trained on 16,000 questions, its validation loss falls to its lowest value" in curves
    assert curves.count("no sign of over-fitting") <= 1 or "again no sign of over-fitting" in curves
    budget = next(t for t in study["tests"] if t["name"].startswith("LoRA (best) on "))
    assert f"the final model beats its configuration on the grid’s budget by {budget['delta_f1']:.1f} F1" \
        in results


def test_the_permutation_tests_smallest_p_value_is_explained(built):
    """p = (b + 1) / (resamples + 1): its floor, printed as a p-value, says that no resample reached the
    observed difference (read from the comparison that recorded its resamples)."""
    resamples = json.loads((FIXTURE / "compare_500.json").read_text())["f1"]["permutation_resamples"]
    method = next(p for p in _rendered_paragraphs(built.source_dir) if "random sign vectors" in p)
    assert f"({resamples:,} random sign vectors" in method
    assert f"smallest p-value is {FORMATS['p'](1 / (resamples + 1)).split('×')[0]}×10" in method


def test_a_complete_grid_without_the_final_model_gives_the_headline(tmp_path):
    """Between the grid and the final model, the abstract quotes the grid's selection on the test subset (the
    study's own protocol), not the preliminary adapter trained before the study."""
    results = _copy_fixture(tmp_path)
    study = json.loads((results / "evaluation_results.json").read_text())
    final_id = study["final"]["run"]
    study["runs"] = [r for r in study["runs"] if r["run_id"] != final_id and not r["name"].endswith("full_dev")]
    study.update(final=None, pending=[final_id])
    (results / "evaluation_results.json").write_text(json.dumps(study))
    failures = json.loads((results / "failure_examples.json").read_text())  # `make collect` on the selection
    failures["adapter"] = f"results/sweep/{study['selection']['best_run']}"
    (results / "failure_examples.json").write_text(json.dumps(failures))
    built = build_report(results, tmp_path / "r.pdf", source_dir=tmp_path / "source")
    best = next(r for r in study["runs"] if r["run_id"] == study["selection"]["best_run"])
    base = next(r for r in study["runs"] if r["name"] == "baseline")
    rendered = _rendered_paragraphs(built.source_dir)
    abstract = next(p for p in rendered if "We adapt a causal" in p)
    assert (f"EM {best['scores']['test']['exact_match']:.1f} / F1 {best['scores']['test']['f1']:.1f} on a "
            f"{best['scores']['test']['n']}-question dev subset") in abstract
    assert f"F1 {base['scores']['test']['f1']:.1f} for the untuned model" in abstract
    assert f"{best['trainable_params']:,} trainable parameters" in abstract
    assert "preliminary" not in abstract and "final model, trained longer, is still running" in abstract
    text = " ".join(rendered)
    assert re.search(r"the grid’s selection \(.+, chosen on validation F1;.+\) gives the headline: .+Holm _?p", text)
    assert "answered by the grid’s selected adapter" in text
    assert "validation and test F1 rank the configurations alike" in text
    study["selection"]["grid_complete"] = False  # an unfinished grid falls back to the preliminary adapter
    (results / "evaluation_results.json").write_text(json.dumps(study))
    assert report_values(results).fields["has_grid_headline"] == "false"


def test_the_final_model_before_its_full_dev_baseline_stands_alone(tmp_path):
    """The sweep scores the untuned model on all of dev after the final model: a collect in between reports
    the final model without a comparison instead of stopping on the missing numbers."""
    results = _copy_fixture(tmp_path)
    study = json.loads((results / "evaluation_results.json").read_text())
    base_id = next(r["run_id"] for r in study["runs"] if r["name"] == "baseline_full_dev")
    study["runs"] = [r for r in study["runs"] if r["run_id"] != base_id]
    study["pending"] = [base_id]
    for key in ("baseline_full_dev", "baseline_evaluation", "comparison"):
        study["final"].pop(key, None)
    (results / "evaluation_results.json").write_text(json.dumps(study))
    built = build_report(results, tmp_path / "r.pdf", source_dir=tmp_path / "source")
    rendered = _rendered_paragraphs(built.source_dir)
    abstract = next(p for p in rendered if "We adapt a causal" in p)
    assert f"F1 {study['final']['test']['f1']:.1f} on the full SQuAD dev set." in abstract
    text = " ".join(rendered)
    assert "the untuned model’s full-dev run, which the paired comparison needs, is still running" in text
    status = next(p for p in rendered if "The study is still running" in p)
    assert "the untuned model on all of dev" in status and "the final model" not in status
    assert built.values.fields["has_final_baseline"] == "false"


def test_lora_and_full_fine_tuning_at_the_shared_budget_are_quoted_with_their_paired_test(built, tmp_path):
    """Both budget runs' full-dev F1 and training time, the paired test's claim (full fine-tuning is A, LoRA B) and
    the seed sd beside it; until LoRA's budget run lands, the comparison is said to be pending."""
    study = json.loads((FIXTURE / "evaluation_results.json").read_text())
    lora, full = (next(r for r in study["runs"] if r["name"] == name) for name in ("budget_lora", "budget_full_ft"))
    test = next(t for t in study["tests"] if t["name"].startswith("full fine-tuning vs LoRA (best) on "))
    text = " ".join(_rendered_paragraphs(built.source_dir))
    assert (f"Trained on the same 8,000 questions (1,000 steps, the same schedule) and scored on all 10,570 dev "
            f"questions, LoRA reaches F1 {lora['scores']['test']['f1']:.1f} [{lora['scores']['test']['f1_ci'][0]:.1f}, "
            f"{lora['scores']['test']['f1_ci'][1]:.1f}] and full fine-tuning {full['scores']['test']['f1']:.1f}") in text
    assert test["delta_f1"] < 0 and test["p_holm"] < 0.05  # the fixture's full fine-tuning wins
    assert f"full fine-tuning beats LoRA by {-test['delta_f1']:.1f} F1 points" in text
    sd = study["seeds"]["centre"]["test_f1_sd"]
    assert test["survives_seed_sd"] and f"more than root two times the seed standard deviation ({sd:.2f} points at " \
        "the grid’s budget)" in re.sub(r"\s+", " ", text)
    study["tests"] = [{**t, "survives_seed_sd": False} if t is test else t for t in study["tests"]]
    results = _copy_fixture(tmp_path / "within")
    (results / "evaluation_results.json").write_text(json.dumps(study))
    assert report_values(results).fields["budget_seed_clause"] == "less than"  # the seeds alone could make it

    results = _copy_fixture(tmp_path)
    study["runs"] = [r for r in study["runs"] if r["name"] != "budget_lora"]
    study["tests"] = [t for t in study["tests"] if t is not test and t["name"] != test["name"]]
    study["pending"] = [lora["run_id"]]
    (results / "evaluation_results.json").write_text(json.dumps(study))
    built = build_report(results, tmp_path / "r.pdf", source_dir=tmp_path / "source")
    text = " ".join(_rendered_paragraphs(built.source_dir))
    assert "The comparison at a shared larger budget is pending." in text and "Trained on the same" not in text


def test_partial_results_render_and_say_what_is_pending(tmp_path, monkeypatch):
    results = _copy_fixture(tmp_path)
    study = json.loads((results / "evaluation_results.json").read_text())
    keep = [r for r in study["runs"] if r["name"] == "baseline" or r["group"] == "grid"][:4]
    kept = {r["run_id"] for r in keep}
    study["pending"] = [r["run_id"] for r in study["runs"] if r["run_id"] not in kept]
    study["runs"] = keep
    grid = [r for r in keep if r["group"] == "grid"]
    best = max(grid, key=lambda r: r["scores"]["validation"]["f1"])
    study["selection"].update(grid_complete=False, best_run=best["run_id"], best_full_ft_run=None,
                              centre_run=grid[0]["run_id"])
    study["tests"] = [t for t in study["tests"] if t["a"] in kept and t["b"] in kept]
    study.update(final=None, seeds={}, main_effects={"learning_rate": study["main_effects"]["learning_rate"][:1]})
    (results / "evaluation_results.json").write_text(json.dumps(study))
    for name in ("padding_study.json", "failure_examples.json", "plots/loss_curves.png"):
        (results / name).unlink()
    built = build_report(results, tmp_path / "r.pdf", source_dir=tmp_path / "source")
    assert built.pages >= 1
    rendered = _rendered_paragraphs(built.source_dir)
    text = " ".join(rendered)
    # the study's missing parts are listed once, in one status note, not marked pending section by section
    status = [p for p in rendered if "The study is still running" in p]
    assert len(status) == 1 and f"{len(study['pending'])} are queued" in status[0]
    for part in ("the remaining grid runs", "the extra seeds", "full fine-tuning", "the prompt-masking ablation",
                 "the final model"):
        assert part in status[0], part
    assert text.count("still running") == 3  # the status note, the abstract and the conclusion
    assert "[Pending: the final model" not in text and "[Pending: the extra seeds" not in text
    # inputs outside the study that are missing say so where they would be
    for pending in ("the padding study", "the failure examples", "results/plots/loss_curves.pdf"):
        assert pending in text, pending
    assert "Grid best so far" in text or "Grid centre = grid best so far" in text
    abstract = next(p for p in rendered if "We adapt a causal" in p)
    assert "preliminary adapter" in abstract and "still running" in abstract
    final_f1 = json.loads((FIXTURE / "evaluation_results.json").read_text())["final"]["test"]["f1"]
    assert f"{final_f1:.1f}" not in abstract
    for number in built.values.numbers:  # nothing printed that the partial files do not hold
        assert FORMATS[number.fmt](OPS[number.op](*(_resolve(results, s) for s in number.sources)) * number.scale) \
            == number.text
    study["pending"] = study["pending"][:1]  # one run left: the verb agrees
    (results / "evaluation_results.json").write_text(json.dumps(study))
    assert report_values(results).fields["runs_queued"] == "1 is queued"


def test_one_finished_grid_run_leaves_out_what_needs_several(tmp_path):
    """Early in the study (the baseline and one grid run): no main-effects table, no figure over the grid, no
    table for a single paired test, and no 'selection' among one run."""
    import typst

    results = _copy_fixture(tmp_path)
    study = json.loads((results / "evaluation_results.json").read_text())
    grid = next(r for r in study["runs"] if r["group"] == "grid")
    keep = [r for r in study["runs"] if r["name"] == "baseline"] + [grid]
    study["pending"] = [r["run_id"] for r in study["runs"] if r not in keep]
    study["runs"] = keep
    study["selection"].update(grid_complete=False, best_run=grid["run_id"], centre_run=grid["run_id"],
                              best_full_ft_run=None)
    study["tests"] = [t for t in study["tests"] if t["name"].startswith("baseline vs")]
    study["tests"][0].update(a=keep[0]["run_id"], b=grid["run_id"])
    study.update(final=None, seeds={}, main_effects={k: v[:1] for k, v in study["main_effects"].items()})
    (results / "evaluation_results.json").write_text(json.dumps(study))
    built = build_report(results, tmp_path / "r.pdf", source_dir=tmp_path / "source")
    main = str(built.source_dir / "main.typ")
    for label in ("fig:params", "fig:heatmaps", "tab:effects", "tab:tests"):
        assert json.loads(typst.query(main, f"<{label}>", root=str(built.source_dir))) == [], label
    assert json.loads(typst.query(main, "<fig:loss>", root=str(built.source_dir)))  # one run still has a curve
    assert json.loads(typst.query(main, "<fig:cost>", root=str(built.source_dir)))  # measured apart from the grid
    text = " ".join(_rendered_paragraphs(built.source_dir))
    assert "The one grid run finished so far" in text and "selection on the validation set picks" not in text
    assert "Only one pair of finished runs can be compared so far" in text
    assert "Grid centre = grid best so far" in text and "None of the ablations is finished yet" in text


def test_an_empty_results_folder_builds_with_everything_pending(tmp_path, monkeypatch):
    (tmp_path / "results").mkdir()  # but for the closed-form counts of the theory section (`loraqa param-counts`)
    shutil.copy(FIXTURE / "parameter_counts.json", tmp_path / "results")
    built = build_report(tmp_path / "results", tmp_path / "r.pdf", source_dir=tmp_path / "source")
    assert built.pages >= 1 and all(n.sources[0].startswith("parameter_counts.json") for n in built.values.numbers)
    assert {"study", "final", "preliminary", "bench", "strategies", "failures"} <= set(built.pending)


def test_a_placeholder_without_a_value_stops_the_build_naming_it(tmp_path, monkeypatch):
    template = tmp_path / "template"
    shutil.copytree(ROOT / "report", template, ignore=shutil.ignore_patterns("build"))
    conclusion = template / "sections" / "conclusion.typ"
    conclusion.write_text(conclusion.read_text() + "\n#if false [{{not_rendered}}] Shown: {{no_such_value}}.\n")
    with pytest.raises(ReportError, match="no_such_value"):
        build_report(FIXTURE, tmp_path / "r.pdf", source_dir=tmp_path / "source", template_dir=template)
    conclusion.write_text(conclusion.read_text().replace(" Shown: {{no_such_value}}.", ""))
    assert build_report(FIXTURE, tmp_path / "r.pdf", source_dir=tmp_path / "source", template_dir=template).pages


def test_theory_placeholders_all_have_values_from_lora_math():
    from transformers import GPT2Config

    from loraqa.measure.lora_math import lora_trainable_parameters

    values = report_values(FIXTURE)
    names = _placeholders(SECTIONS / "theory.typ")
    assert names <= set(values.fields), sorted(names - set(values.fields))
    counts = lora_trainable_parameters(GPT2Config(), "attention", 16)  # GPT-2 124M needs no weights, only its config
    assert values.fields["gpt2_attention_r16_trainable"] == f"{counts['trainable_params']:,}"
    assert values.fields["gpt2_attention_r16_reduction"] == f"{counts['reduction_factor']:.1f}"


def test_author_and_affiliation_come_from_the_settings(tmp_path):
    from loraqa.cli import main

    assert main(["report", "--results", str(FIXTURE), "--output", str(tmp_path / "r.pdf"), "--source_dir",
                 str(tmp_path / "source"), "--author", "Ada Examiner", "--affiliation", "Example Lab"]) == 0
    pdf = (tmp_path / "r.pdf").read_bytes()
    assert b"/Author(Ada Examiner)" in pdf  # the PDF's author field (document metadata)
    assert '(name: "Ada Examiner", affiliation: "Example Lab")' in (tmp_path / "source" / "main.typ").read_text()
    default = build_report(FIXTURE, tmp_path / "d.pdf", source_dir=tmp_path / "source")
    assert b"The loraqa project" in default.pdf.read_bytes() and b"developers" not in default.pdf.read_bytes()


def test_no_file_names_or_code_identifiers_outside_the_reproducibility_paragraph(built):
    rendered = [p.replace("<|endoftext|>", "").replace("<|im_end|>", "")  # the tokenized example's EOS
                for p in _rendered_paragraphs(built.source_dir)]
    commands = [p for p in rendered if p.startswith("Reproducibility.")]
    assert len(commands) == 1 and "make study" in commands[0] and "loraqa report" in commands[0]
    for paragraph in rendered:
        if paragraph in commands:
            continue
        assert not re.search(r"\b[\w-]+\.(json|jsonl|py|typ|md|yaml|pdf)\b", paragraph), paragraph
        assert not re.search(r"\bmake (install|test|study|collect|run|report|bench)\b|\bloraqa [a-z]", paragraph), paragraph
        # snake_case names and class names: eval_test, max_length, attention+mlp, LoraLinear, top_k=10
        assert not re.search(r"\b[a-z]+_[a-z_]+\b|attention\+mlp|LoraLinear|Conv1D|nn\.Linear|\btop_[kp]\b",
                             paragraph), paragraph


def test_comparison_and_strategy_labels_read_as_words():
    from loraqa.report.values import _test_label, strategy_label

    assert _test_label("centre vs lr=0.0001") == '#"centre vs ";lr = 1×10#super[−4];'
    assert _test_label("alpha=2r vs alpha=32 at r=8") == '$alpha = 2r$#" vs ";$alpha = 32$#" at ";_r_ = 8'
    assert _test_label("centre vs target_modules=attention+mlp") == '#"centre vs attention+MLP";'
    assert _test_label("max_length 512 vs 256") == '#"maximum length 512 vs 256";'
    assert strategy_label("top_k=10") == 'top-_k_, _k_ = #"10";' and strategy_label("top_p=0.9").startswith("nucleus")
    assert strategy_label("greedy,in_context") == '#"greedy";, #"span-constrained";'
    assert strategy_label("num_beams=2") == "beam search, 2 beams"
    assert strategy_label("num_beams=4,in_context") == 'beam search, 4 beams, #"span-constrained";'


def test_hyperparameter_table_is_each_runs_recorded_configuration(built):
    """Every value of the final model's column is its run_config.json (warm-up as transformers resolves a share of
    the steps), its step count and its test evaluation's decoding settings."""
    import math

    study = json.loads((FIXTURE / "evaluation_results.json").read_text())
    run = FIXTURE / "sweep" / study["final"]["run"]
    config = json.loads((run / "run_config.json").read_text())
    steps = json.loads((run / "summary.json").read_text())["global_steps"]
    generation = json.loads((run / "eval_test.json").read_text())["generation"]
    table = built.values.fields["table_hyperparameters"]
    rows = {re.match(r"\s*\[(.*?)\], ", line).group(1): line for line in table.splitlines()
            if re.match(r"\s*\[(.*?)\], ", line)}
    t = config["training"]
    expected = {"Peak learning rate": FORMATS["lr"](t["learning_rate"]),
                "Warm-up from 0 (steps)": str(math.ceil(t["warmup_steps"] * steps)),
                "Gradient clipping (norm)": f"{t['max_grad_norm']:g}",
                "Questions per step": str(t["per_device_train_batch_size"] * t["gradient_accumulation_steps"]),
                "Epochs (steps)": f"{t['num_train_epochs']:g} ({steps:,})",
                "LoRA dropout": f"{config['lora']['lora_dropout']:g}",
                "Maximum length (tokens)": str(config["data"]["max_length"]),
                "Decoding (new tokens)": f'#"greedy"; ({generation["max_new_tokens"]})'}
    for label, value in expected.items():
        assert rows[label].rstrip(",").endswith(f"[{value}]"), (label, rows[label])
    assert "Final model" in table and "Grid runs" in table
    assert built.values.fields["warmup_final"] == expected["Warm-up from 0 (steps)"]


def test_training_dynamics_and_the_evaluation_cut_are_read_from_the_runs(built):
    study = json.loads((FIXTURE / "evaluation_results.json").read_text())
    fields = built.values.fields
    centre = next(r for r in study["runs"] if r["run_id"] == study["selection"]["centre_run"])
    threshold = centre["curves"]["validation"][-1][1]
    assert fields["dyn_threshold"] == f"{threshold:.3f}"
    for rate in {r["settings"]["learning_rate"] for r in study["runs"] if r["group"] == "grid"}:
        curves = [r["curves"]["validation"] for r in study["runs"]
                  if r["group"] == "grid" and r["settings"]["learning_rate"] == rate]
        reached = sum(any(loss <= threshold for _, loss in c) for c in curves)
        phrase = f"all {len(curves)} runs" if reached == len(curves) else f"{reached} of {len(curves)} runs"
        assert f"{phrase} at lr = {FORMATS['lr'](rate)}" in fields["dyn_reach"] or reached == 0
    evaluation = json.loads((FIXTURE / "sweep" / study["final"]["run"] / "eval_test.json").read_text())
    config = json.loads((FIXTURE / "sweep" / study["final"]["run"] / "run_config.json").read_text())
    assert fields["eval_cut_n"] == f"{evaluation['prompts_cut']:,}" and fields["eval_cut_of"] == f"{evaluation['n']:,}"
    assert fields["eval_prompt_limit"] == str(config["data"]["max_length"] - evaluation["generation"]["max_new_tokens"])
    text = " ".join(_rendered_paragraphs(built.source_dir))
    assert "a prompt that is too long loses the end of its context" in text
    assert f"this cut {fields['eval_cut_n']} of the {fields['eval_cut_of']} dev prompts" in text
    assert "exactly the tokens it was trained on" not in text  # false for a cut prompt
    assert "keys and values are what every answer token attends to" in text  # masked prompts still pass gradient
    assert "a mean over the answer tokens of the whole batch, not over questions" in text
    assert "Nine tenths of each run" in text and "this gap is not memorisation" in text
    assert "greedy decoding maximises" not in text.lower() and "need not give the most likely answer" in text
    assert "first update changes no weight" in text and "without warm-up this lasts a single update" in text


def test_source_folder_that_is_not_a_build_is_never_deleted(tmp_path):
    (tmp_path / "keep.txt").write_text("mine")
    with pytest.raises(ReportError, match="not deleting"):
        build_report(FIXTURE, tmp_path / "r.pdf", source_dir=tmp_path)
    assert (tmp_path / "keep.txt").exists()


def test_failed_build_keeps_previous_pdf_and_is_cleared_by_the_next(tmp_path):
    """A results file that does not parse stops the build before main.typ is written: the half-made
    build folder is still recognised as a build and replaced, and report.pdf is never half-written."""
    pdf, build = tmp_path / "report.pdf", tmp_path / "build"
    pdf.write_bytes(b"%PDF previous")
    broken = tmp_path / "results"
    shutil.copytree(FIXTURE, broken)
    (broken / "evaluation_results.json").write_text('{"runs": [')
    with pytest.raises(ReportError, match="evaluation_results.json: not readable as JSON"):
        build_report(broken, pdf, source_dir=build)
    assert not (build / "main.typ").exists() and any(build.iterdir())
    (tmp_path / "empty").mkdir()
    with pytest.raises(ReportError, match="could not compile"):  # an empty results folder compiles to an error
        build_report((tmp_path / "empty").resolve(), pdf, source_dir=build)
    assert pdf.read_bytes() == b"%PDF previous"
    built = build_report(FIXTURE, pdf, source_dir=build)
    assert built.pages >= 1 and pdf.read_bytes().startswith(b"%PDF-")
    assert not list(tmp_path.glob(".report.pdf.tmp*"))


# ---------------------------------------------------------------------------------------------- claims

def _n(value: float, fmt: str = "signed") -> Number:
    return Number(value, FORMATS[fmt](value))


@pytest.mark.parametrize("delta, p_holm, expected", [
    (2.0, 0.01, "B beats A by 2.0 F1 points"), (-2.0, 0.01, "A beats B by 2.0 F1 points"),
    (2.0, 0.2, "B and A do not differ significantly"), (-2.0, 0.06, "B and A do not differ significantly"),
])
def test_difference_claims_follow_sign_and_significance(delta, p_holm, expected):
    text = claim_difference("A", "B", _n(delta), "[x, y]", _n(p_holm, "p"))
    assert text.startswith(expected) and FORMATS["p"](p_holm) in text


@pytest.mark.parametrize("values, expected", [
    ([50.0, 52.0, 53.0], "rises with every step"), ([53.0, 52.0, 50.0], "falls with every step"),
    ([50.0, 54.0, 53.0], "is not monotonic in rank and peaks at b"),
])
def test_trend_claims(values, expected):
    assert expected in claim_trend([(label, _n(v, "score")) for label, v in zip("abc", values)], "rank")


def test_edge_claim_names_each_axis_the_selection_ends():
    lrs, ranks = [1e-4, 2e-4, 5e-4], [4, 8, 16, 32]
    both = claim_edge({"learning rate": (5e-4, lrs), "rank": (32, ranks)})
    assert both == "it uses the largest learning rate and the largest rank tried, so values beyond them may do better still"
    one = claim_edge({"learning rate": (2e-4, lrs), "rank": (4, ranks)})
    assert one == "it uses the smallest rank tried, so a value beyond it may do better still"
    assert claim_edge({"learning rate": (2e-4, lrs), "rank": (16, ranks)}) is None
    assert claim_edge({"learning rate": (2e-4, [2e-4]), "rank": (16, ranks)}) is None  # one level: no edge


def test_agreement_claim_follows_the_correlation_and_the_test_sets_own_choice():
    same = claim_agreement(_n(24, "int"), _n(0.98, "2"), None, None, None)
    assert same == ("over the 24 grid runs, validation and test F1 rank the configurations alike (Spearman’s "
                    "rank correlation 0.98); selecting on the test set would have picked the same run")
    other = claim_agreement(_n(24, "int"), _n(0.3, "2"), "attention, _r_ = 32", _n(63.6, "score"), _n(1.6, "1"))
    assert "rank the configurations differently" in other
    assert other.endswith("would have picked attention, _r_ = 32 and reported test F1 63.6, 1.6 points above the "
                          "validation choice, an optimism the protocol avoids")


def test_strategy_sampling_and_bf16_claims_go_both_ways():
    greedy = ("greedy", _n(60, "score"))
    assert claim_best_strategy([greedy, ("top_k", _n(55, "score"))]).startswith("greedy decoding")
    assert claim_best_strategy([greedy, ("top_k", _n(61, "score"))]).startswith("top_k has the highest F1 (61.0")
    assert claim_verbatim([_n(1.0, "2"), _n(1.0, "2")], _n(0.97, "2")).startswith(
        "every span-constrained answer is found verbatim in its context (a share of 1.00, against 0.97")
    assert claim_verbatim([_n(0.99, "2")], _n(0.97, "2")).startswith("span-constrained answers are found verbatim "
                                                                     "in their context at shares of 0.99")
    beams = [(2, _n(3.6, "1"), _n(73.4, "score")), (4, _n(4.5, "1"), _n(69.5, "score"))]
    assert claim_beams(_n(3.0, "1"), _n(73.9, "score"), beams) == (
        "beam search lengthens the answers (a mean of 3.0 words for greedy, 3.6 with 2 beams, 4.5 with 4 beams) and "
        "lowers F1 (73.4, 69.5, against 73.9)")
    assert claim_beams(_n(5.0, "1"), _n(80.0, "score"), beams).startswith("beam search shortens the answers")
    mixed = claim_beams(_n(4.0, "1"), _n(70.0, "score"), beams)
    assert mixed.startswith("beam search changes the answers' length") and "moves F1 both ways" in mixed
    assert "raises F1" in claim_beams(_n(4.0, "1"), _n(60.0, "score"), beams[1:])
    assert claim_sampling("greedy", ("a", _n(4.8, "1")), ("b", _n(31.3, "1"))).startswith("Every sampled strategy")
    assert claim_sampling("greedy", ("a", _n(-1.5, "1")), ("b", _n(3.0, "1"))).startswith("Sampled strategies range")
    assert claim_bf16(_n(64, "int"), _n(64, "int")).startswith("without changing an answer")
    assert claim_bf16(_n(59, "int"), _n(64, "int")).startswith("but change some answers")


def test_curve_and_padding_claims():
    steps = [_n(s, "int") for s in (25, 50, 75)]
    assert "falls to its lowest value, 0.600, at the last" in claim_curve(steps, [_n(v, "3") for v in (0.9, 0.7, 0.6)])
    assert "lowest at step 50 (0.600)" in claim_curve(steps, [_n(v, "3") for v in (0.9, 0.6, 0.7)])
    assert "starts to over-fit" in claim_curve(steps, [_n(v, "3") for v in (0.9, 0.6, 0.7)])
    # a repeated last evaluation is still the lowest, and a rise within 1% is levelling off, not over-fitting
    assert "falls to its lowest value" in claim_curve(steps, [_n(v, "3") for v in (0.9, 0.6, 0.6)])
    assert "levels off" in claim_curve(steps, [_n(v, "3") for v in (0.9, 0.600, 0.603)])
    assert claim_curve(steps, [_n(v, "3") for v in (0.9, 0.7, 0.6)], again=True).endswith(
        ": again no sign of over-fitting within one epoch")
    text = claim_padding([("static", _n(2.0, "2")), ("packed", _n(0.5, "2"))],
                         [("static", _n(512, "int")), ("packed", _n(60, "int"))])
    assert text.startswith("packed computes the fewest tokens per question (60, against 512 for static)")
    assert text.endswith("packed the fastest step (0.50 s)")


def test_question_type_claim_names_the_hardest_and_easiest_common_wh_word(tmp_path):
    results = tmp_path / "results"
    shutil.copytree(FIXTURE, results)
    failures = json.loads((results / "failure_examples.json").read_text())
    n = failures["n"]
    failures["by_question_type"] = {"what": {"n": n // 2, "exact_match": 60.0, "f1": 70.04},
                                    "why": {"n": n // 10, "exact_match": 30.0, "f1": 44.96},
                                    "when": {"n": n // 10, "exact_match": 80.0, "f1": 91.0},
                                    "whom": {"n": 0, "exact_match": 0.0, "f1": 0.0},  # too rare to compare
                                    "other": {"n": n // 10, "exact_match": 0.0, "f1": 10.0}}
    (results / "failure_examples.json").write_text(json.dumps(failures))
    fields = report_values(results).fields
    assert fields["has_claim_question_types"] == "true"
    assert fields["claim_question_types"] == ("_#\"why\";_ questions are the hardest (F1 45.0) and _#\"when\";_ questions "
                                              "the easiest (F1 91.0) of the 3 question words that each make up at "
                                              "least 1% of the set")


@pytest.mark.parametrize("fixed_r8, conclusion", [(58.3, False), (50.0, False), (58.5, True)])
def test_alpha_series_claim_compares_the_spread_over_rank_at_both_scalings(tmp_path, fixed_r8, conclusion):
    """Fixed alpha (r 8 at alpha 32, r 16 = the centre) against alpha = 2r (the grid's r 8 and r 16) at the
    same learning rate and targets; 'most of the rise ... not capacity' only when the fixed series spreads
    less than half as much."""
    results = tmp_path / "results"
    shutil.copytree(FIXTURE, results)
    study = json.loads((results / "evaluation_results.json").read_text())
    by_name = {r["name"]: r for r in study["runs"]}
    by_name["fixed_alpha_r8"]["scores"]["test"]["f1"] = fixed_r8
    two_r = [by_name[f"attention-lr0.0002-r{r}-alpha{2 * r}"]["scores"]["test"]["f1"] for r in (8, 16)]
    (results / "evaluation_results.json").write_text(json.dumps(study))
    fields = report_values(results).fields
    claim = fields["claim_alpha_series"]
    fixed = sorted([fixed_r8, two_r[1]])  # r 16 at alpha 32 is the centre, in both series
    assert claim.startswith(f"at lr = {FORMATS['lr'](2e-4)}, with $alpha$ fixed at 32 test F1 stays between {fixed[0]:.1f} and {fixed[1]:.1f} "
                            f"over _r_ = 8, 16 (a spread of {fixed[1] - fixed[0]:.1f} points), against "
                            f"{min(two_r):.1f} to {max(two_r):.1f} ({max(two_r) - min(two_r):.1f} points)")
    assert ("rather than with capacity" in claim) == conclusion
    # one seed per point: the claim says so, with the seeds' deviation
    assert claim.endswith(f" (one seed per run, whose deviation over seeds is {fields['seeds_centre_sd']} points)")


def test_alpha_series_claim_has_one_clause_per_learning_rate_the_fixed_series_ran_at(tmp_path):
    """The fixed-alpha series repeated at attention's best rate (issue 28) adds a clause at that rate, compared with
    the grid's alpha = 2r runs at the same rate, not the centre's."""
    results = tmp_path / "results"
    shutil.copytree(FIXTURE, results)
    study = json.loads((results / "evaluation_results.json").read_text())
    by_name = {r["name"]: r for r in study["runs"]}
    for name, f1 in (("attention-lr0.0002-r8-alpha16", 61.0), ("attention-lr0.0002-r16-alpha32", 65.0),
                     ("fixed_alpha_r8", 63.5)):
        clone = json.loads(json.dumps(by_name[name]))
        clone["name"] = clone["run_id"] = name.replace("0.0002", "0.001") + "-at-1e-3"
        clone["settings"]["learning_rate"] = 1e-3
        clone["scores"]["test"]["f1"] = f1
        study["runs"].append(clone)
    (results / "evaluation_results.json").write_text(json.dumps(study))
    claim = report_values(results).fields["claim_alpha_series"]
    first, second = claim.split("; ")
    assert first.startswith(f"at lr = {FORMATS['lr'](2e-4)}, with $alpha$ fixed at 32")
    assert second.startswith(f"at lr = {FORMATS['lr'](1e-3)}, with $alpha$ fixed at 32 test F1 stays between 63.5 and "
                             "65.0 over _r_ = 8, 16 (a spread of 1.5 points), against 61.0 to 65.0 (4.0 points)")
    # 1.5 < 4.0 / 2 at 1e-3 but not at 2e-4 (0.5 against 0.8): the conclusion is the 1e-3 clause's alone
    assert "capacity" not in first
    assert second.endswith("(4.0 points) with $alpha = 2r$: at this rate most of the rise with rank at $alpha = 2r$ "
                           "is consistent with its growing update rather than with capacity (one seed per run, whose "
                           "deviation over seeds is 0.55 points)")
    by_name["fixed_alpha_r8"]["scores"]["test"]["f1"] = 58.6  # 0.2 < 0.8 / 2: now both rates conclude, said once
    (results / "evaluation_results.json").write_text(json.dumps(study))
    first, second = report_values(results).fields["claim_alpha_series"].split("; ")
    assert "capacity" not in first and "(4.0 points) with $alpha = 2r$: at both rates most of the rise" in second


def test_padding_claim_times_steps_as_the_figure_does(tmp_path):
    """CPU seconds where the study measured them (a 1-thread step's wall time counts whatever ran beside it),
    in the claim and the figure alike; wall time only for a study without CPU times."""
    results = tmp_path / "results"
    shutil.copytree(FIXTURE, results)
    study = json.loads((results / "padding_study.json").read_text())
    for k, cell in enumerate(study["cells"]):
        if "timing" in cell:  # the largest batch is counted, not timed
            cell["timing"]["step_cpu_seconds_median"] = 0.25 + k / 100
    (results / "padding_study.json").write_text(json.dumps(study))
    fields = report_values(results).fields
    batch = int(fields["pad_batch_size"])
    shown = [c["timing"]["step_cpu_seconds_median"] for c in study["cells"] if c["batch_size"] == batch and "timing" in c]
    assert fields["claim_padding"].endswith(f"the fastest step ({min(shown):.2f} CPU s)")
    assert not report_values(FIXTURE).fields["claim_padding"].endswith("CPU s)")


def test_count_and_equality_claims_go_both_ways():
    assert claim_significant(_n(1, "int"), _n(1, "int")) == "the difference is significant"
    assert claim_significant(_n(0, "int"), _n(1, "int")) == "the difference is not significant"
    assert claim_significant(_n(0, "int"), _n(9, "int")) == "none of the 9 differences is significant"
    assert claim_significant(_n(1, "int"), _n(9, "int")) == "1 of the 9 differences is significant"
    assert claim_significant(_n(4, "int"), _n(9, "int")) == "4 of the 9 differences are significant"
    counted = [claim_count(_n(n, "int"), "question is dropped", "questions are dropped", "none is") for n in (0, 1, 3)]
    assert counted == ["none is", "1 question is dropped", "3 questions are dropped"]
    assert claim_identical(_n(64, "int"), _n(64, "int")).startswith("with identical greedy answers")
    assert claim_identical(_n(60, "int"), _n(64, "int")) == "with the same greedy answer to 60 of 64 questions"
    assert claim_same_loss([_n(2.5673, "3"), _n(2.56731, "3")]).startswith("reach the same mean loss")
    assert claim_same_loss([_n(2.5, "3"), _n(2.7, "3")]) == "reach mean losses from 2.500 to 2.700"


def test_claims_in_the_report_are_regenerated_from_the_results(tmp_path):
    values = report_values(FIXTURE)
    assert values.fields["claim_targets"].startswith("attention+MLP beats attention only")
    # the fixture's row extension gives rank 8 one run more: no trend is read off unequal mixes
    assert values.fields["has_claim_rank"] == "false" and values.fields["claim_rank"] == ""
    results = _copy_fixture(tmp_path)
    study = json.loads((results / "evaluation_results.json").read_text())
    for level in study["main_effects"]["rank"]:
        level["runs"] = 4  # as on a grid without extensions
    (results / "evaluation_results.json").write_text(json.dumps(study))
    assert report_values(results).fields["claim_rank"].startswith("mean test F1 rises")
    test = next(t for t in study["tests"] if t["name"].startswith("centre vs target_modules="))
    test.update(delta_f1=-test["delta_f1"], delta_f1_ci=[-test["delta_f1_ci"][1], -test["delta_f1_ci"][0]])
    study["main_effects"]["rank"].reverse()
    (results / "evaluation_results.json").write_text(json.dumps(study))
    flipped = report_values(results)
    assert flipped.fields["claim_targets"].startswith("attention only beats attention+MLP")
    assert flipped.fields["claim_rank"].startswith("mean test F1 falls")


def test_prose_holds_no_hand_typed_measurement():
    """Numbers enter the text through placeholders; the prose may name versions, labels and fixed choices."""
    allowed = {"F1", "GPT-2", "GPT-2's", "GPT-2’s", "v1.1", "SmolLM2", "SmolLM2-135M-Instruct", "95", "95%", "99th",
               "−100", "0.05", "2r", "Conv1D", "float32", "bf16", "d_\"in\"", "d_\"out\""}
    for name in OURS:
        text = (SECTIONS / f"{name}.typ").read_text()
        text = re.sub(r"\{\{\w+\}\}|//.*|<[\w:-]+>|@[\w:-]+|`[^`]*`", " ", text)
        tokens = set(re.findall(r"[^\s(),;:\[\]{}$]*\d[^\s(),;:\[\]{}$]*", text))
        stray = {t.rstrip(".") for t in tokens} - allowed
        assert not stray, f"{name}.typ: {sorted(stray)}"


# ---------------------------------------------------------------------------------------------- inputs written once

def test_label_example_masks_the_prompt_and_labels_answer_and_eos(gpt2_tokenizer):
    example = label_example(gpt2_tokenizer)
    tokens = example["tokens"]
    kinds = [t["kind"] for t in tokens]
    assert kinds == ["prompt"] * example["prompt_tokens"] + ["answer"] * (example["target_tokens"] - 1) + ["eos"]
    assert all(t["label"] == -100 for t in tokens if t["kind"] == "prompt")
    assert all(t["label"] == t["id"] for t in tokens if t["kind"] != "prompt")
    assert tokens[-1]["id"] == gpt2_tokenizer.eos_token_id
    answer = gpt2_tokenizer.decode([t["id"] for t in tokens if t["kind"] == "answer"])
    assert answer == " " + example["record"]["answers"]["text"][0]


def test_excerpt_marks_gold_and_predicted_spans():
    context = " ".join(f"w{i}" for i in range(60))
    gold, predicted = context.index("w10 "), context.index("w50 ")
    out = excerpt(context, (gold, gold + 3), (predicted, predicted + 3), words=3)
    spans = {kind: out["excerpt"][s:e] for s, e, kind in out["spans"]}
    assert spans == {"gold": "w10", "prediction": "w50"}
    assert out["excerpt"].startswith("… w7") and " … " in out["excerpt"] and out["excerpt"].endswith(" …")
    near = excerpt(context, (gold, gold + 3), (gold + 4, gold + 7), words=2)
    assert near["excerpt"].count("…") == 2 and {k: near["excerpt"][s:e] for s, e, k in near["spans"]} == \
        {"gold": "w10", "prediction": "w11"}


# ---------------------------------------------------------------------------------------------- the real results

def test_real_results_build_and_count_pages(tmp_path, monkeypatch, capsys):
    """The report from this checkout's results/: 6-8 pages once the study and its final model are in."""
    built = build_report(ROOT / "results", tmp_path / "report.pdf", source_dir=tmp_path / "source")
    with capsys.disabled():
        print(f"\nreal report: {built.pages} pages; pending: {', '.join(built.pending) or 'nothing'}")
    study = ROOT / "results" / "evaluation_results.json"
    if study.exists() and not json.loads(study.read_text()).get("pending"):
        assert built.pages >= 6
    assert 1 <= built.pages <= 8  # detail that does not fit goes to the README and the results files


def test_cli_writes_the_pdf(tmp_path, monkeypatch, capsys):
    from loraqa.cli import main

    assert main(["report", "--results", str(FIXTURE), "--output", str(tmp_path / "r.pdf"),
                 "--source_dir", str(tmp_path / "source")]) == 0
    assert (tmp_path / "r.pdf").exists() and "pages" in capsys.readouterr().out
    # the same results give the same bytes (no build date inside), so a rebuilt report.pdf shows no diff
    assert main(["report", "--results", str(FIXTURE), "--output", str(tmp_path / "again.pdf"),
                 "--source_dir", str(tmp_path / "source")]) == 0
    assert (tmp_path / "again.pdf").read_bytes() == (tmp_path / "r.pdf").read_bytes()
    assert b"/CreationDate" not in (tmp_path / "r.pdf").read_bytes()


def test_the_final_models_decoding_grid_replaces_the_earlier_one(tmp_path):
    def grid_sources(values):
        return {s.partition("#")[0] for n in values.numbers for s in n.sources if s.startswith("strategies_")}

    results = _copy_fixture(tmp_path)
    (results / "strategies_final_500.json").unlink()  # before the final model's grid: the earlier adapter's
    assert grid_sources(report_values(results)) == {"strategies_finetuned_500.json"}
    grid = json.loads((results / "strategies_finetuned_500.json").read_text())
    grid["adapter"] = "results/model_checkpoints/final"
    grid["strategies"][0]["f1"] = 71.4
    (results / "strategies_final_500.json").write_text(json.dumps(grid))
    values = report_values(results)
    assert grid_sources(values) == {"strategies_final_500.json"}
    assert values.fields["has_strategies_on_final"] == "true" and "71.4" in values.fields["table_strategies"]
    grid["adapter"] = "results/model_checkpoints/grid_best"  # exported beside the final one, but not it
    (results / "strategies_final_500.json").write_text(json.dumps(grid))
    values = report_values(results)
    assert values.fields["has_strategies_on_final"] == "false" and values.fields["strat_adapter"] == "the grid’s selected"
    # a moved selection's final is the headline: the export's grid is the final's only if it records that run
    study = json.loads((results / "evaluation_results.json").read_text())
    earlier = next(r for r in study["runs"] if r["name"] == "final")
    study["final"]["earlier"] = [{"run": earlier["run_id"], "settings": earlier["settings"], "test": None}]
    study["final"]["run"] = "final-attention-r8-0123abcd"
    (results / "evaluation_results.json").write_text(json.dumps(study))
    grid["adapter"] = "results/model_checkpoints/final"
    for recorded, said in ((None, "the earlier selection’s final"), (earlier["run_id"], "the earlier selection’s final"),
                           ("final-attention-r8-0123abcd", "the final")):
        grid["adapter_run"] = recorded  # None: written before evaluations recorded their adapter's run
        (results / "strategies_final_500.json").write_text(json.dumps(grid))
        assert report_values(results).fields["strat_adapter"] == said, recorded


def test_cost_claims_follow_the_side_by_side_measurement(tmp_path):
    results = _copy_fixture(tmp_path)
    values = report_values(results)
    assert values.fields["has_cost_study"] == "true"
    assert values.fields["claim_rank_cost"] == "the frozen model's forward and backward dominate the step"
    cost = json.loads((results / "cost_study.json").read_text())
    lora = next(c for c in cost["configs"] if c.get("target_modules") == "attention" and c.get("lora_r") == 16)
    full = next(c for c in cost["configs"] if c["method"] == "full_finetune")
    assert values.fields["cost_full_step_ratio"] == f"{full['step_cpu_seconds_mean'] / lora['step_cpu_seconds_mean']:.1f}"
    flops = json.loads((results / "parameter_counts.json").read_text())["smollm2-135m"]["step_costs_r16"][
        "attention"]["ratio"]["step_flops"]
    forward_backward = (full["step_cpu_seconds_mean"] - full["update_cpu_seconds_mean"]) / (
        lora["step_cpu_seconds_mean"] - lora["update_cpu_seconds_mean"])
    assert values.fields["cost_fb_ratio"] == f"{forward_backward:.2f}"
    assert values.fields["claim_fb_vs_flops"] == ("close to" if abs(forward_backward / flops - 1) < 0.1 else
                                                  "more than" if forward_backward > flops else "less than")
    top = max((c for c in cost["configs"] if c.get("target_modules") == "attention"), key=lambda c: c["lora_r"])
    top["step_cpu_seconds_median"] *= 2  # the fixture repeated its steps: the claims read the medians
    (results / "cost_study.json").write_text(json.dumps(cost))
    assert report_values(results).fields["claim_rank_cost"] == "the adapters' own products are a visible share of the step"
    (results / "cost_study.json").unlink()
    values = report_values(results)
    assert values.fields["has_cost_study"] == "false" and "cost_full_step_ratio" not in values.fields


def test_repeated_cost_timings_are_quoted_as_medians_with_their_ranges(tmp_path):
    """A cost study with --repeats: the ratios come from the medians over the repetitions and the prose gives both
    ranges beside the two times it compares; a one-repetition study has no ranges to give."""
    results = _copy_fixture(tmp_path)
    cost = json.loads((results / "cost_study.json").read_text())
    single = [{k: v for k, v in c.items() if not k.endswith(("_repetitions", "_median", "_spread"))}
              for c in cost["configs"]]
    (results / "cost_study.json").write_text(json.dumps({**cost, "configs": single}))
    fields = report_values(results).fields
    assert fields["has_cost_spread"] == "false" and fields["cost_spread"] == ""
    assert fields["cost_rank_spread"] == fields["cost_mlp_spread"] == ""
    for k, config in enumerate(cost["configs"]):
        for key in ("step_cpu_seconds", "update_cpu_seconds"):
            repetitions = [config[f"{key}_mean"] * f for f in (0.9, 1.0, 1.3 + k / 10, 1.1, 0.95)]
            config.update({f"{key}_repetitions": repetitions, f"{key}_median": sorted(repetitions)[2],
                           f"{key}_spread": [min(repetitions), max(repetitions)], f"{key}_mean": 99.0})
    (results / "cost_study.json").write_text(json.dumps(cost))
    values = report_values(results)
    lora = next(c for c in cost["configs"] if c.get("target_modules") == "attention" and c.get("lora_r") == 16)
    full = next(c for c in cost["configs"] if c["method"] == "full_finetune")
    ratio = full["step_cpu_seconds_median"] / lora["step_cpu_seconds_median"]
    assert values.fields["cost_full_step_ratio"] == f"{ratio:.1f}"
    assert values.fields["cost_full_s"] == f"{full['step_cpu_seconds_median']:.2f}"
    (f_lo, f_hi), (l_lo, l_hi) = full["step_cpu_seconds_spread"], lora["step_cpu_seconds_spread"]
    assert values.fields["has_cost_spread"] == "true" and values.fields["cost_spread"] == \
        f"medians of 5 repetitions, ranges {f_lo:.2f}–{f_hi:.2f} and {l_lo:.2f}–{l_hi:.2f} s"
    # the rank's and the MLP's ratios too, saying whether the two ranges overlap
    mlp = next(c for c in cost["configs"] if c.get("target_modules") == "attention+mlp" and c.get("lora_r") == 16)
    (m_lo, m_hi) = mlp["step_cpu_seconds_spread"]
    overlap = ", which overlap" if m_lo <= l_hi and l_lo <= m_hi else ""
    assert values.fields["cost_mlp_spread"] == f" (ranges {m_lo:.2f}–{m_hi:.2f} and {l_lo:.2f}–{l_hi:.2f} s{overlap})"
    # and the MLP's step against full fine-tuning's, with both ranges
    assert values.fields["cost_mlp_vs_full"] == f"{mlp['step_cpu_seconds_median'] / full['step_cpu_seconds_median']:.2f}"
    top = max((c for c in cost["configs"] if c.get("target_modules") == "attention"), key=lambda c: c["lora_r"])
    top["step_cpu_seconds_spread"] = [l_hi + 1.0, l_hi + 2.0]  # apart from the smallest rank's: no overlap
    low = min((c for c in cost["configs"] if c.get("target_modules") == "attention"), key=lambda c: c["lora_r"])
    (results / "cost_study.json").write_text(json.dumps(cost))
    lo_lo, lo_hi = low["step_cpu_seconds_spread"]
    assert low["step_cpu_seconds_spread"][1] < l_hi + 1.0
    assert report_values(results).fields["cost_rank_spread"] == \
        f" (ranges {l_hi + 1.0:.2f}–{l_hi + 2.0:.2f} and {lo_lo:.2f}–{lo_hi:.2f} s)"


def test_full_fine_tuning_at_some_learning_rates_is_listed_as_pending(tmp_path):
    """The control's table appears with its first learning rate, and the status note still names the others."""
    results = _copy_fixture(tmp_path)
    study = json.loads((results / "evaluation_results.json").read_text())
    unfinished = next(r for r in study["runs"] if r["group"] == "full_ft" and
                      r["run_id"] != study["selection"]["best_full_ft_run"])
    study["runs"].remove(unfinished)
    study["pending"] = [unfinished["run_id"]]
    (results / "evaluation_results.json").write_text(json.dumps(study))
    values = report_values(results)
    assert values.fields["has_full_ft"] == "true"
    assert "full fine-tuning's other learning rates" in values.fields["pending_parts"]
    study["pending"] = []
    (results / "evaluation_results.json").write_text(json.dumps(study))
    assert "full fine-tuning" not in report_values(results).fields["pending_parts"]


def test_the_lora_versus_full_fine_tuning_text_states_each_search(tmp_path):
    results = _copy_fixture(tmp_path)
    built = build_report(results, tmp_path / "r.pdf", source_dir=tmp_path / "source")
    text = " ".join(_rendered_paragraphs(built.source_dir))
    study = json.loads((results / "evaluation_results.json").read_text())
    lora, full = len(study["selection"]["candidates"]), len(study["selection"]["full_ft_candidates"])
    assert lora > full
    assert f"LoRA among {lora} grid configurations and full fine-tuning among {full} learning rates." in text
    assert "larger search" not in text and "comparison at a shared larger budget is pending" not in text
    assert f"at {study['protocol']['base']['max_train_samples']:,} training questions, " in text


def test_prompted_baselines_are_listed_and_the_gain_follows_the_full_dev_run(tmp_path, built):
    """Every prompt of the untuned model is a row of the main table (the best marked); the headline gain is quoted
    against the best prompt on all of dev once that run is compared, and until then the text gives the best
    prompt's test-subset F1 and says its full-dev run is pending."""
    study = json.loads((FIXTURE / "evaluation_results.json").read_text())
    prompted, final = study["prompted_baselines"], study["final"]
    table = built.values.fields["table_main"]
    for label in ("Untuned, zero-shot", "Untuned, zero-shot, chat template", "Untuned, 1 example",
                  "Untuned, 1 example, chat template", "Untuned, 3 examples (best prompt)",
                  "Untuned, 3 examples, chat template", "Untuned, zero-shot (full dev)", "Untuned, best prompt (full dev)"):
        assert f"[{label}]," in table, label
    text = " ".join(_rendered_paragraphs(built.source_dir))
    best = next(r for r in prompted["runs"] if r["run_id"] == prompted["best_run"])
    assert (f"Of the untuned model’s {len(prompted['runs'])} prompts, the one with 3 examples has the best validation F1 "
            f"({best['validation']['f1']:.1f}) and reaches test F1 {best['test']['f1']:.1f}") in text
    gain = FORMATS["signed"](final["prompted_comparison"]["delta_f1"])
    assert f"{gain} over the untuned model with its best prompt (95% CI" in text
    assert "against which the gain is to be quoted" not in text
    # before the best prompt's full-dev run
    results = _copy_fixture(tmp_path)
    prompted["full_dev_run"] = None
    for key in ("prompted_baseline_run", "prompted_baseline_full_dev", "prompted_comparison"):
        final.pop(key)
    study["runs"] = [r for r in study["runs"] if r["name"] != "baseline_prompted_full_dev"]
    (results / "evaluation_results.json").write_text(json.dumps(study))
    pending = build_report(results, tmp_path / "r.pdf", source_dir=tmp_path / "source")
    assert pending.values.fields["has_prompted_full_dev"] == "false"
    rendered = _rendered_paragraphs(pending.source_dir)
    text = " ".join(rendered)
    assert (f"the untuned model’s best prompt (3 examples) reaches F1 {best['test']['f1']:.1f} on "
            f"{best['test']['n']} dev questions, and its run on all of dev, against which the gain is to be quoted, "
            "is pending") in text
    assert f"{FORMATS['signed'](final['comparison']['delta_f1'])} over the untuned model prompted zero-shot" in text
    abstract = next(p for p in rendered if "We adapt a causal" in p)
    assert f"F1 {final['baseline_full_dev']['f1']:.1f} for the untuned model prompted zero-shot" in abstract
    assert "Untuned, best prompt (full dev)" not in pending.values.fields["table_main"]


def test_decoding_names_strategies_in_words_and_says_what_the_span_strategies_do(tmp_path, built):
    grid = json.loads((FIXTURE / "strategies_final_500.json").read_text())
    rows = {r["strategy"]: r for r in grid["strategies"]}
    table = built.values.fields["table_strategies"]
    for label in ('[#"greedy";, #"span-constrained";]', "[beam search, 2 beams]", "[beam search, 4 beams]",
                  '[beam search, 4 beams, #"span-constrained";]'):
        assert label in table, label
    assert "num_beams" not in table and "in_context" not in table
    text = " ".join(_rendered_paragraphs(built.source_dir))
    assert "every span-constrained answer is found verbatim in its context (a share of 1.00, against " \
           f"{rows['greedy']['verbatim_in_context']:.2f} for greedy)" in text
    assert (f"beam search lengthens the answers (a mean of {rows['greedy']['mean_answer_words']:.1f} words for greedy, "
            f"{rows['num_beams=2']['mean_answer_words']:.1f} with 2 beams") in text and "and lowers F1" in text
    assert "greedy, span-constrained has the highest F1" in text
    compare = json.loads((FIXTURE / "compare_final_span_full_dev.json").read_text())
    assert (f"On all {compare['n_common']:,} dev questions, greedy, span-constrained changes F1 against greedy by "
            f"{FORMATS['signed2'](compare['f1']['delta'])} (95% CI [+0.20, +0.60]") in text
    assert f"and EM by {FORMATS['signed2'](compare['exact_match']['delta'])} (McNemar p = 2.1×10" in text
    assert "a gain that holds on all of dev" in text  # the F1 interval is above 0
    for ci, verdict in (([-0.85, -0.03], ": on all of dev it is worse than greedy"),
                        ([-0.2, 0.6], ", no difference all of dev can show")):
        results = _copy_fixture(tmp_path / verdict[-5:])
        worse = json.loads(json.dumps(compare))
        worse["f1"]["delta_ci"] = ci
        (results / "compare_final_span_full_dev.json").write_text(json.dumps(worse))
        assert report_values(results).fields["span_full_verdict"] == verdict
    decoding = next(p for p in _rendered_paragraphs(built.source_dir) if "span-constrained has the highest" in p)
    assert "questions/s" not in decoding and "faster" not in decoding  # the grid's timings are not comparable
    results = _copy_fixture(tmp_path)
    (results / "compare_final_span_full_dev.json").unlink()
    pending = " ".join(_rendered_paragraphs(build_report(results, tmp_path / "r.pdf",
                                                         source_dir=tmp_path / "source").source_dir))
    assert "The paired test of greedy, span-constrained against greedy on all of dev is pending" in pending


def test_decoding_speed_is_a_column_only_when_every_strategy_was_timed_alone(tmp_path):
    """The grid's own questions/s is the whole pass's, so the table's speed comes from `loraqa decoding-speed`
    (each strategy alone, relative to greedy in the same round) and appears only when it covers every row."""
    results = _copy_fixture(tmp_path)
    names = [r["strategy"] for r in json.loads((results / "strategies_final_500.json").read_text())["strategies"]]
    (results / "decoding_speed.json").unlink()
    assert "Speed" not in report_values(results).fields["table_strategies"]
    rows = [{"strategy": name, "vs_greedy_median": 1.0 - 0.05 * i} for i, name in enumerate(names)]
    speed = {"n": 120, "repeats": 3, "strategies": rows[:-1]}
    (results / "decoding_speed.json").write_text(json.dumps(speed))
    values = report_values(results)
    assert values.fields["has_decoding_speed"] == "false" and "Speed" not in values.fields["table_strategies"]
    speed["strategies"] = rows[::-1]  # matched by name, not by position
    (results / "decoding_speed.json").write_text(json.dumps(speed))
    values = report_values(results)
    table = values.fields["table_strategies"]
    assert values.fields["has_decoding_speed"] == "true" and "Speed" in table
    assert (values.fields["speed_n"], values.fields["speed_repeats"]) == ("120", "3")
    assert "1.00×" in table and f"{1.0 - 0.05 * (len(names) - 1):.2f}×" in table
    assert table.index("1.00×") < table.index("0.95×")  # in the grid's order
    assert values.fields["speed_spread"] == ""  # rows without their rounds' ranges: no span to quote
    for i, row in enumerate(rows):
        row["vs_greedy_spread"] = [row["vs_greedy_median"] - 0.01, row["vs_greedy_median"] + 0.01 * (1 + (i == 2))]
    (results / "decoding_speed.json").write_text(json.dumps(speed))
    assert report_values(results).fields["speed_spread"] == ", whose ratios span at most 0.03"


def test_a_holm_p_from_a_p_at_the_permutation_floor_is_written_as_a_bound():
    """k x floor is an upper bound when the raw p is at the floor (no resample reached the difference): '≤ 0.0021'
    for 21 x 1/10,001 (rounded up, never down below the bound), in the table and in the sentence; a p above the
    floor stays '= ...'."""
    from loraqa.report.text import Number, claim_difference, holm_bound

    floor = {"p_value": 1 / 10_001, "permutation_resamples": 10_000}
    above = {"p_value": 0.004, "permutation_resamples": 10_000}
    assert holm_bound(Number(21 / 10_001, "0.002"), floor).text == "≤ 0.0021"
    assert holm_bound(Number(0.05 / 2, "0.025"), floor).text == "≤ 0.025"
    p = Number(0.002, "0.002")
    assert holm_bound(p, floor).text == "≤ 0.002" and holm_bound(p, above).text == "0.002"
    delta = Number(11.9, "+11.9")
    assert "Holm-adjusted _p_ ≤ 0.002)" in claim_difference("A", "B", delta, "[8.2, 15.7]", holm_bound(p, floor))
    assert "Holm-adjusted _p_ = 0.002)" in claim_difference("A", "B", delta, "[8.2, 15.7]", holm_bound(p, above))


def test_best_edge_claim_reads_the_rates_of_the_selected_runs_own_row(tmp_path):
    """A selected run at its row's largest rate is at the edge; once the row is extended past it (issue 28's
    brackets, rates beyond the spec's), it is inside its row and the claim about the learning rate goes."""
    results = tmp_path / "results"
    shutil.copytree(FIXTURE, results)
    study = json.loads((results / "evaluation_results.json").read_text())
    best = next(r for r in study["runs"] if r["run_id"] == study["selection"]["best_run"])
    row = [r for r in study["runs"] if r["group"] == "grid" and r.get("trainable_params")
           and {a: r["grid_point"].get(a) for a in ("target_modules", "rank")}
           == {a: best["grid_point"].get(a) for a in ("target_modules", "rank")}]
    top = max(r["grid_point"]["learning_rate"] for r in row)
    best["grid_point"]["learning_rate"] = best["settings"]["learning_rate"] = top * 1.5  # past the row's rates
    (results / "evaluation_results.json").write_text(json.dumps(study))
    assert "the largest learning rate" in report_values(results).fields["claim_best_edge"]
    extension = json.loads(json.dumps(row[0]))
    extension["run_id"] = extension["name"] = "extension"
    extension["grid_point"]["learning_rate"] = extension["settings"]["learning_rate"] = top * 3
    study["runs"].append(extension)
    (results / "evaluation_results.json").write_text(json.dumps(study))
    assert "learning rate" not in (report_values(results).fields.get("claim_best_edge") or "")


def test_the_methodology_states_the_learning_rate_extensions_cap_from_the_collected_spec(tmp_path):
    """The extension rule's cap comes from the spec as collected (it was raised once, from 4e-3 to 8e-3, so
    that every row could end inside its rates); without an `extend` rule the clause is left out."""
    results = tmp_path / "results"
    shutil.copytree(FIXTURE, results)
    study = json.loads((results / "evaluation_results.json").read_text())
    study["protocol"].pop("extend", None)
    (results / "evaluation_results.json").write_text(json.dumps(study))
    fields = report_values(results).fields
    assert fields["has_lr_cap"] == "false" and fields["lr_cap"] == ""
    study["protocol"]["extend"] = {"learning_rate": {"factor": 2, "max": 8.0e-3}}
    (results / "evaluation_results.json").write_text(json.dumps(study))
    fields = report_values(results).fields
    assert fields["has_lr_cap"] == "true" and fields["lr_cap"] == "8×10#super[−3];"
    template = (Path(__file__).parents[1] / "report/sections/methodology.typ").read_text()
    assert "#if {{has_lr_cap}} [, up to {{lr_cap}}]" in template
