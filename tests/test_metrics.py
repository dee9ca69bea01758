import json

import pytest

from loraqa.cli import main
from loraqa.evaluation.metrics import exact_match_score, f1_score, normalize_answer, score_questions, squad_scores


@pytest.mark.parametrize("text, expected", [
    ("The Denver Broncos", "denver broncos"),          # lowercase + article
    ("a dog, an apple & the end.", "dog apple end"),  # articles a/an/the, ASCII punctuation
    ("  many\t spaces \n here ", "many spaces here"),  # whitespace
    ("theater", "theater"),                            # 'the' only as a word
    ("don't stop", "dont stop"),                       # apostrophe is punctuation
    ("café — “quoted”", "café — “quoted”"),            # non-ASCII punctuation is kept, as officially
])
def test_normalize_answer_rules(text, expected):
    assert normalize_answer(text) == expected


@pytest.mark.parametrize("prediction, gold, em, f1", [
    ("Denver Broncos", "the Denver Broncos", 1.0, 1.0),
    ("Broncos", "Denver Broncos", 0.0, 2 * (1.0 * 0.5) / 1.5),
    ("the Denver Broncos won", "Denver Broncos", 0.0, 2 * (2 / 3 * 1.0) / (2 / 3 + 1.0)),
    ("Panthers", "Denver Broncos", 0.0, 0.0),
    ("", "Denver Broncos", 0.0, 0.0),
    ("a", "the", 1.0, 0.0),  # both normalize to '': EM 1, F1 0 (no common tokens), as in the official script
])
def test_em_f1_table(prediction, gold, em, f1):
    assert exact_match_score(prediction, gold) == em
    assert f1_score(prediction, gold) == pytest.approx(f1)


def test_max_over_gold_answers_and_missing_predictions():
    references = {"q1": ["Denver Broncos", "Broncos"], "q2": ["24-10"], "q3": ["Levi's Stadium"]}
    predictions = {"q1": "Broncos!", "q2": "24 - 10"}
    with pytest.warns(UserWarning, match="1 of 3 questions have no prediction"):
        scores = score_questions(predictions, references)
    assert scores["q1"].exact_match == 1.0 and scores["q1"].f1 == 1.0
    assert scores["q2"].exact_match == 0.0 and scores["q2"].f1 == 0.0  # "24 - 10" -> "24 10" vs "2410"
    assert scores["q3"].exact_match == 0.0 and scores["q3"].f1 == 0.0
    with pytest.warns(UserWarning):
        overall = squad_scores(predictions, references)
    assert overall["exact_match"] == pytest.approx(100 / 3)
    assert overall["f1"] == pytest.approx(100 * (1.0 + scores["q2"].f1) / 3)


def test_unanswerable_questions_score_as_in_the_official_v2_script():
    references = {"u1": [], "u2": [], "u3": [], "a1": ["Denver Broncos"]}
    predictions = {"u1": "", "u2": "The.", "u3": "Denver Broncos", "a1": "Denver Broncos"}
    scores = score_questions(predictions, references)
    # no gold answer: right only when the answer normalizes to nothing ("The." does), in EM and F1 alike
    assert {q: (s.exact_match, s.f1) for q, s in scores.items()} == {
        "u1": (1.0, 1.0), "u2": (1.0, 1.0), "u3": (0.0, 0.0), "a1": (1.0, 1.0)}
    assert squad_scores(predictions, references) == {"exact_match": 75.0, "f1": 75.0}


def test_score_command_on_a_v2_file(tmp_path, capsys):
    context = "The Denver Broncos defeated the Carolina Panthers 24-10."
    squad_v2 = {"version": "v2.0", "data": [{"title": "t", "paragraphs": [{"context": context, "qas": [
        {"id": "a1", "question": "Who won?", "is_impossible": False,
         "answers": [{"text": "Denver Broncos", "answer_start": 4}]},
        {"id": "u1", "question": "Who lost the 1999 game?", "is_impossible": True, "answers": [],
         "plausible_answers": [{"text": "Carolina Panthers", "answer_start": 32}]},
        {"id": "u2", "question": "Where was it played?", "is_impossible": True, "answers": []}]}]}]}
    (tmp_path / "dev-v2.0.json").write_text(json.dumps(squad_v2))
    (tmp_path / "pred.json").write_text(json.dumps({"a1": "the Denver Broncos", "u1": "Carolina Panthers", "u2": ""}))
    assert main(["score", str(tmp_path / "dev-v2.0.json"), str(tmp_path / "pred.json")]) == 0
    assert json.loads(capsys.readouterr().out) == {"exact_match": pytest.approx(200 / 3), "f1": pytest.approx(200 / 3)}
