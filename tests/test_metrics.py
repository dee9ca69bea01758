import pytest

from loraqa.metrics import exact_match_score, f1_score, normalize_answer, score_questions, squad_scores


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
