import json
import subprocess
import sys

import pytest

from loraqa.evaluation.analysis import compare, failure_category, failure_report, question_type
from loraqa.cli import main
from loraqa.data.squad import SquadFormatError, read_squad_json, squad_references
from loraqa.evaluation.metrics import score_questions, squad_scores

CONTEXT = "The Denver Broncos defeated the Carolina Panthers 24-10."


def test_analysis_reads_result_files_without_torch():
    probe = "import sys, loraqa.evaluation.analysis; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", probe], check=True)


@pytest.mark.parametrize("prediction, golds, em, f1, expected", [
    ("Denver Broncos", ["Denver Broncos"], 1.0, 1.0, "correct"),
    ("", ["Denver Broncos"], 0.0, 0.0, "empty answer"),
    ("Denver Broncos", [], 0.0, 0.0, "answered an unanswerable question"),
    ("the New England Patriots", ["Denver Broncos"], 0.0, 0.0, "answer not in context"),
    ("The Denver Broncos defeated", ["Denver Broncos"], 0.0, 0.8, "right answer with extra words"),
    ("Broncos defeated the Carolina", ["Denver Broncos"], 0.0, 0.33, "partial overlap"),
    ("Carolina Panthers", ["Denver Broncos"], 0.0, 0.0, "wrong span of the context"),
])
def test_failure_categories(prediction, golds, em, f1, expected):
    assert failure_category(prediction, golds, CONTEXT, em, f1) == expected


def test_question_types():
    assert question_type("How many goals?") == "how many" and question_type("Who won?") == "who"
    assert question_type("In which year?") == "which" and question_type("Name it.") == "other"


# one question per category: (id, question, gold or None for unanswerable, prediction, category)
KNOWN = [("c1", "Who won?", "Denver Broncos", "Denver Broncos", "correct"),
         ("c2", "Who lost?", "Carolina Panthers", "", "empty answer"),
         ("c3", "Which team won?", "Denver Broncos", "New England Patriots", "answer not in context"),
         ("c4", "Who won the game?", "Denver Broncos", "The Denver Broncos defeated", "right answer with extra words"),
         ("c5", "Who was defeated?", "Carolina Panthers", "the Carolina", "partial overlap"),
         ("c6", "What was the score?", "24-10", "Carolina Panthers", "wrong span of the context"),
         ("c7", "Who won in 1999?", None, "Denver Broncos", "answered an unanswerable question"),
         ("c8", "Who lost in 1999?", None, "", "correct")]


def test_failure_report_puts_each_known_example_in_its_category(tmp_path):
    qas = [{"id": qid, "question": question, "is_impossible": gold is None,
            "answers": [] if gold is None else [{"text": gold, "answer_start": CONTEXT.index(gold)}]}
           for qid, question, gold, _, _ in KNOWN]
    data = tmp_path / "squad.json"
    data.write_text(json.dumps({"data": [{"title": "t", "paragraphs": [{"context": CONTEXT, "qas": qas}]}]}))
    predictions = {qid: prediction for qid, _, _, prediction, _ in KNOWN}
    scores = score_questions(predictions, squad_references(read_squad_json(data)))
    evaluation = tmp_path / "e.json"
    evaluation.write_text(json.dumps({"data": str(data), "predictions": predictions,
                                      **squad_scores(predictions, squad_references(read_squad_json(data))),
                                      "per_question": {q: vars(s) for q, s in scores.items()}}))
    report = failure_report(str(evaluation))
    for category in {c for *_, c in KNOWN} - {"correct"}:
        assert f"| {category} | 1 | 12.5% |" in report, category
        (qid, question, *_), = [k for k in KNOWN if k[4] == category]
        section = report.split(f"## {category}\n\n")[1].split("\n")[0]
        assert section.startswith(f"- **{question}** predicted `{predictions[qid]}`"), category
    assert "| correct | 2 | 25.0% |" in report and "## correct" not in report
    assert "gold none (unanswerable)" in report
    # who: c1, c2, c4, c5, c7, c8; EM c1 + c8; F1 1 + 0.8 + 2/3 + 1 over 6
    assert "| who | 6 | 33.3 | 57.8 |" in report and "| which | 1 | 0.0 | 0.0 |" in report
    assert main(["failures", str(evaluation), "--output", str(tmp_path / "failures.md"),
                 "--report_json", str(tmp_path / "failure_examples.json")]) == 0
    assert (tmp_path / "failures.md").read_text() == report
    examples = json.loads((tmp_path / "failure_examples.json").read_text())  # the report's input
    assert examples["n"] == len(KNOWN) and examples["counts"] == {c: sum(k[4] == c for k in KNOWN) for *_, c in KNOWN}
    assert {e["category"] for e in examples["examples"]} == {c for *_, c in KNOWN} - {"correct"}
    # who: c1, c2, c4, c5, c7, c8 (EM c1 + c8; F1 1 + 0.8 + 2/3 + 1 over 6), as in the markdown table above
    assert examples["by_question_type"]["who"]["n"] == 6
    assert examples["by_question_type"]["who"]["exact_match"] == pytest.approx(100 * 2 / 6)
    assert examples["by_question_type"]["who"]["f1"] == pytest.approx(100 * (1 + 0.8 + 2 / 3 + 1) / 6)
    unanswerable = next(e for e in examples["examples"] if e["category"] == "answered an unanswerable question")
    assert unanswerable["gold"] == [] and all(kind != "gold" for *_, kind in unanswerable["spans"])


def test_failure_examples_spread_over_articles_and_list_each_gold_once(tmp_path):
    """Dev order would take every example from its first article; equal golds up to SQuAD normalisation
    (an answer per annotator) are listed once, in their first spelling."""
    from loraqa.report.inputs import failure_examples

    articles = []
    for title in ("first", "second", "third"):
        context = f"The {title} bridge was opened in 1900 by the mayor."
        qas = [{"id": f"{title}-{k}", "question": f"Question {k}?",
                "answers": [{"text": "1900", "answer_start": context.index("1900")},
                            {"text": " 1900", "answer_start": context.index(" 1900")},
                            {"text": "in 1900", "answer_start": context.index("in 1900")}]} for k in range(2)]
        articles.append({"title": title, "paragraphs": [{"context": context, "qas": qas}]})
    data = tmp_path / "squad.json"
    data.write_text(json.dumps({"version": "1.1", "data": articles}))
    wrong = {f"{t}-{k}": "the mayor" for t in ("first", "second", "third") for k in range(2)}  # wrong span each
    evaluation = tmp_path / "e.json"
    evaluation.write_text(json.dumps({"data": str(data), "predictions": wrong,
                                      "per_question": {q: {"exact_match": 0.0, "f1": 0.0} for q in wrong}}))
    examples = failure_examples(str(evaluation), per_category=3)["examples"]
    assert [e["title"] for e in examples] == ["first", "second", "third"]
    assert all(e["gold"] == ["1900", "in 1900"] for e in examples)
    assert [e["id"] for e in failure_examples(str(evaluation), per_category=1)["examples"]] == ["first-0"]


def _write_evaluation(path, gains: dict[str, float], *, data_hash="d1", paragraphs=None) -> str:
    """An evaluation JSON where question q scores gains[q] (EM = F1)."""
    result = {"data_hash": data_hash, "per_question": {q: {"exact_match": g, "f1": g} for q, g in gains.items()},
              "predictions": {q: "x" if g else "" for q, g in gains.items()}}
    if paragraphs:
        result["questions"] = {q: {"question": "?", "gold": ["x"], "paragraph": paragraphs[q]} for q in gains}
    path.write_text(json.dumps(result))
    return str(path)


IDS = [f"q{i}" for i in range(12)]
PARAGRAPHS = {q: "p1" if i < 6 else "p2" for i, q in enumerate(IDS)}


def test_compare_resamples_paragraphs_and_says_when_it_cannot(tmp_path, capsys):
    base = {q: 0.0 for q in IDS}
    tuned = {q: float(i < 8) for i, q in enumerate(IDS)}  # p1 gains 6 of 6 questions, p2 2 of 6
    a = _write_evaluation(tmp_path / "a.json", base, paragraphs=PARAGRAPHS)
    b = _write_evaluation(tmp_path / "b.json", tuned, paragraphs=PARAGRAPHS)
    clustered = compare(a, b)
    assert clustered["resampled"] == "paragraphs" and clustered["answers_differ"] == 8
    assert clustered["f1"]["delta_ci"] == [pytest.approx(100 / 3), pytest.approx(100.0)]  # p2 p2 ... p1 p1
    assert clustered["f1"]["permutation_p_value"] == pytest.approx(0.5, abs=0.02)
    old = _write_evaluation(tmp_path / "old.json", base)  # written before evaluations recorded paragraphs
    assert compare(old, b)["resampled"] == "paragraphs"  # one file that records them is enough
    assert main(["compare", old, _write_evaluation(tmp_path / "old_b.json", tuned)]) == 0
    out = capsys.readouterr().out
    assert "CIs and p resample questions (the files record no paragraphs)" in out
    questions = compare(old, str(tmp_path / "old_b.json"))
    assert questions["resampled"] == "questions"
    assert questions["f1"]["permutation_p_value"] == pytest.approx(2 / 256, abs=0.003)


def test_compare_refuses_different_data_and_no_common_question(tmp_path, capsys):
    a = _write_evaluation(tmp_path / "a.json", {"q1": 1.0, "q2": 0.0})
    other_subset = _write_evaluation(tmp_path / "b.json", {"q1": 1.0, "q3": 0.0}, data_hash="d2")
    with pytest.raises(SquadFormatError, match=r"a\.json and .*b\.json: field 'data_hash' differs"):
        compare(a, other_subset)
    disjoint = _write_evaluation(tmp_path / "c.json", {"q3": 1.0, "q4": 0.0})
    with pytest.raises(SquadFormatError, match=r"a\.json and .*c\.json: no question id in common"):
        compare(a, disjoint)
    assert main(["compare", a, disjoint]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and err.startswith("loraqa compare: error: ")
