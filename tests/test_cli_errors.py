"""Mistakes in the user's input are one line naming the file and the record or field, with a non-zero exit
code (issue 25, item 4); `--debug` shows the traceback instead."""
import json

import pytest

from loraqa.cli import main


def _evaluation(path, data, ids) -> None:
    """An evaluation JSON as `loraqa evaluate` writes it (the fields `failures` reads), for question `ids`."""
    path.write_text(json.dumps({
        "data": str(data), "exact_match": 0.0, "f1": 0.0, "n": len(ids),
        "per_question": {q: {"exact_match": 0.0, "f1": 0.0} for q in ids},
        "predictions": {q: "x" for q in ids}}))


def _one_line(capsys) -> str:
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert len(err.splitlines()) == 1, err
    assert "Traceback" not in err
    return err


def test_failures_on_ids_missing_from_the_data_names_the_files_and_the_id(tmp_path, squad_file, capsys):
    evaluation = tmp_path / "eval.json"
    _evaluation(evaluation, squad_file, ["q1", "not-in-the-data", "q2"])
    assert main(["failures", str(evaluation)]) == 2
    err = _one_line(capsys)
    assert err.startswith("loraqa failures: error: ")
    assert str(evaluation) in err and str(squad_file) in err and "'not-in-the-data'" in err
    assert "1 of 3" in err


def test_failures_with_another_data_file_than_the_evaluation_used(tmp_path, squad_file, capsys):
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"version": "1.1", "data": [{"title": "t", "paragraphs": [
        {"context": "A cat sat.", "qas": [{"id": "c1", "question": "Who sat?",
                                           "answers": [{"text": "A cat", "answer_start": 0}]}]}]}]}))
    evaluation = tmp_path / "eval.json"
    _evaluation(evaluation, squad_file, ["q1", "q2"])
    assert main(["failures", str(evaluation), "--data", str(other)]) == 2
    err = _one_line(capsys)
    assert str(other) in err and "'q1'" in err and "2 of 2" in err


def test_failures_without_a_data_field_names_the_field(tmp_path, capsys):
    evaluation = tmp_path / "eval.json"
    evaluation.write_text(json.dumps({"per_question": {"q1": {"exact_match": 1.0, "f1": 1.0}},
                                      "predictions": {"q1": "x"}, "exact_match": 100.0, "f1": 100.0}))
    assert main(["failures", str(evaluation)]) == 2
    err = _one_line(capsys)
    assert str(evaluation) in err and "'data'" in err and "--data" in err


def test_failures_with_a_directory_as_data(tmp_path, squad_file, capsys):
    evaluation = tmp_path / "eval.json"
    _evaluation(evaluation, squad_file, ["q1"])
    assert main(["failures", str(evaluation), "--data", str(tmp_path)]) == 2
    err = _one_line(capsys)
    assert f"{tmp_path}: is a directory" in err


def test_evaluate_with_a_directory_as_data(tmp_path, tiny_gpt2_dir, capsys):
    folder = tmp_path / "squad_dir"
    folder.mkdir()
    assert main(["evaluate", "--model", str(tiny_gpt2_dir), "--data", str(folder), "--device", "cpu",
                 "--output", str(tmp_path / "e.json")]) == 2
    err = _one_line(capsys)
    assert err.startswith("loraqa evaluate: error: ") and f"{folder}: is a directory" in err
    assert not (tmp_path / "e.json").exists()


@pytest.mark.parametrize("which", ["dataset", "predictions"])
def test_score_with_a_directory_names_it(tmp_path, squad_file, capsys, which):
    folder = tmp_path / "a_dir"
    folder.mkdir()
    predictions = tmp_path / "pred.json"
    predictions.write_text(json.dumps({"q1": "Denver Broncos"}))
    args = [str(folder), str(predictions)] if which == "dataset" else [str(squad_file), str(folder)]
    assert main(["score", *args]) == 2
    err = _one_line(capsys)
    assert err.startswith("loraqa score: error: ") and str(folder) in err


def test_an_unreadable_file_is_one_line_naming_it(tmp_path, capsys):
    """Any OSError with a file name (here: a directory where a JSON file is written) is one line too."""
    folder = tmp_path / "taken"
    (folder / "x").mkdir(parents=True)
    evaluation = tmp_path / "eval.json"
    evaluation.write_text(json.dumps({"per_question": {"q1": {"exact_match": 1.0, "f1": 1.0}},
                                      "predictions": {"q1": "x"}}))
    assert main(["compare", str(evaluation), str(evaluation), "--output", str(folder)]) == 2
    err = _one_line(capsys)
    assert err.startswith("loraqa compare: error: ") and str(folder) in err


@pytest.mark.parametrize("position", ["before", "after"])
def test_debug_shows_the_traceback(tmp_path, squad_file, capsys, position):
    evaluation = tmp_path / "eval.json"
    _evaluation(evaluation, squad_file, ["not-in-the-data"])
    argv = ["--debug", "failures", str(evaluation)] if position == "before" else ["failures", str(evaluation),
                                                                                  "--debug"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("Traceback (most recent call last):")
    assert "SquadFormatError" in err and "'not-in-the-data'" in err
    assert "failure_report" in err  # the frames, down to where it was raised


def test_debug_alone_or_before_help(capsys):
    assert main(["--debug", "--help"]) == 0
    assert "--debug" in capsys.readouterr().out
