import json

import datasets
import pytest

from conftest import SQUAD
from loraqa.data.squad import (IGNORE_INDEX, SKIP_TOO_LONG, SKIP_UNANSWERABLE, SquadFormatError, build_train_dataset,
                               encode_prompt, format_prompt, load_squad, preprocess_function, read_squad_json,
                               take_subset, token_length_stats)


def _rows(tokenizer, path, max_length=512, **kwargs):
    dataset = load_squad(str(path))
    return preprocess_function(dataset[:], tokenizer, max_length=max_length, **kwargs), dataset


@pytest.mark.parametrize("tokenizer_name", ["gpt2_tokenizer", "smollm2_tokenizer"])
def test_labels_are_exactly_the_answer_and_eos(request, tokenizer_name, squad_file):
    tokenizer = request.getfixturevalue(tokenizer_name)
    rows, dataset = _rows(tokenizer, squad_file, max_length=100_000)
    for i, record in enumerate(dataset):
        ids, labels = rows["input_ids"][i], rows["labels"][i]
        answer_ids = tokenizer(" " + record["answers"]["text"][0], add_special_tokens=False).input_ids
        n_prompt = len(ids) - len(answer_ids) - 1
        assert labels[:n_prompt] == [IGNORE_INDEX] * n_prompt
        assert labels[n_prompt:] == answer_ids + [tokenizer.eos_token_id] == ids[n_prompt:]
        assert tokenizer.decode(ids[:n_prompt]) == format_prompt(record["context"], record["question"])
        context_ids, question_ids = encode_prompt(tokenizer, record["context"], record["question"])
        assert ids[:n_prompt] == context_ids + question_ids  # inference sees the very same prompt tokens
        assert rows["context_length"][i] == len(context_ids)


def test_gpt2_piecewise_prompt_equals_joint_tokenization(gpt2_tokenizer, squad_file):
    for record in load_squad(str(squad_file)):
        context_ids, question_ids = encode_prompt(gpt2_tokenizer, record["context"], record["question"])
        joint = gpt2_tokenizer(format_prompt(record["context"], record["question"])).input_ids
        assert context_ids + question_ids == joint


def test_encode_prompt_docstring_example(gpt2_tokenizer):
    assert encode_prompt(gpt2_tokenizer, "Paris is in France.", "Where is Paris?") == (
        [21947, 25, 6342, 318, 287, 4881, 13], [198, 24361, 25, 6350, 318, 6342, 30, 198, 33706, 25])


@pytest.mark.parametrize("max_length", [64, 100, 200])
def test_truncation_keeps_the_answer_question_and_cue(gpt2_tokenizer, squad_file, max_length):
    rows, dataset = _rows(gpt2_tokenizer, squad_file, max_length=max_length)
    i = dataset["id"].index("q4")  # its context is ~4,000 tokens
    ids, labels = rows["input_ids"][i], rows["labels"][i]
    assert rows["skip_reason"][i] == "" and len(ids) <= max_length
    text = gpt2_tokenizer.decode(ids)
    assert text.startswith("Context: ")
    assert text.endswith("\nQuestion: Where is the treasure buried?\nAnswer: under the old oak tree<|endoftext|>")
    context_part = gpt2_tokenizer.decode(ids[:rows["context_length"][i]])
    assert "buried under the old oak tree" in context_part
    before, after = context_part.split("under the old oak tree")
    assert "Filler" in before and "Filler" in after  # context on both sides of the answer
    assert [t for t in labels if t != IGNORE_INDEX] == ids[len(ids) - len([t for t in labels if t != IGNORE_INDEX]):]


def test_answer_that_cannot_fit_is_dropped_and_counted(gpt2_tokenizer, squad_file):
    dataset = load_squad(str(squad_file))
    rows, counts = build_train_dataset(dataset, gpt2_tokenizer, max_length=20)
    assert counts[SKIP_TOO_LONG] >= 1 and counts["kept"] + counts[SKIP_TOO_LONG] == len(dataset)
    assert all(len(ids) <= 20 for ids in rows["input_ids"])
    stats = token_length_stats(dataset, gpt2_tokenizer, max_lengths=(20, 100_000))
    assert stats["max_length"]["20"]["dropped"] == counts[SKIP_TOO_LONG]
    assert stats["max_length"]["100000"] == {"truncated": 0, "dropped": 0}
    assert stats["percentiles"]["context"]["p100"] > 4000


def _v2_file(tmp_path):
    v2 = json.loads(json.dumps(SQUAD))
    qas = v2["data"][0]["paragraphs"][0]["qas"]
    qas.append({"id": "impossible", "question": "Who lost?", "answers": [], "is_impossible": True,
                "plausible_answers": [{"text": "Carolina Panthers", "answer_start": 70}]})
    path = tmp_path / "v2.json"
    path.write_text(json.dumps(v2))
    return path


def test_unanswerable_policy(gpt2_tokenizer, tmp_path):
    dataset = load_squad(str(_v2_file(tmp_path)))
    assert dataset[3]["answers"] == {"text": [], "answer_start": []}
    _, counts = build_train_dataset(dataset, gpt2_tokenizer, max_length=4096)
    assert counts[SKIP_UNANSWERABLE] == 1 and counts["kept"] == 5
    rows, counts = build_train_dataset(dataset, gpt2_tokenizer, max_length=4096, unanswerable="eos")
    assert counts["kept"] == 6
    assert [t for t in rows[3]["labels"] if t != IGNORE_INDEX] == [gpt2_tokenizer.eos_token_id]


def _broken(tmp_path, mutate):
    data = json.loads(json.dumps(SQUAD))
    mutate(data)
    path = tmp_path / "broken.json"
    path.write_text(json.dumps(data))
    return path


@pytest.mark.parametrize("mutate, message", [
    (lambda d: d.pop("data"), "record -: field 'data' is missing"),
    (lambda d: d["data"][0]["paragraphs"][0].pop("context"), "field 'context' is missing"),
    (lambda d: d["data"][0]["paragraphs"][0]["qas"][1].pop("question"), "record 'q2': field 'question' is missing"),
    (lambda d: d["data"][0]["paragraphs"][0]["qas"][2]["answers"][0].update(answer_start=3),
     "record 'q3': field 'answers[0].answer_start' = 3 does not index the answer text '24-10'"),
    (lambda d: d["data"][0]["paragraphs"][0]["qas"][1].update(id="q1"), "record 'q1': field 'id' is a duplicate"),
    (lambda d: d["data"][0]["paragraphs"][0]["qas"][0]["answers"][0].pop("text"),
     "record 'q1': field 'answers[0].text' is missing"),
])
def test_malformed_files_get_one_clear_line(tmp_path, mutate, message):
    path = _broken(tmp_path, mutate)
    with pytest.raises(SquadFormatError) as info:
        read_squad_json(path)
    assert str(info.value).startswith(str(path)) and message in str(info.value)
    assert "\n" not in str(info.value)


def test_non_json_and_missing_file(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(SquadFormatError, match="bad.json: not valid JSON"):
        read_squad_json(bad)
    with pytest.raises(SquadFormatError, match="nope.json: file not found"):
        read_squad_json(tmp_path / "nope.json")


def test_subset_rule_is_seeded_nested_and_keeps_paragraphs():
    records = [{"id": f"p{p}q{q}", "context": f"paragraph {p}", "question": "?", "title": "",
                "answers": {"text": ["x"], "answer_start": [0]}} for p in range(30) for q in range(4)]
    dataset = datasets.Dataset.from_list(records)
    small, large = take_subset(dataset, 10, seed=1), take_subset(dataset, 50, seed=1)
    assert len(small) == 10 and len(large) == 50
    assert set(small["id"]) <= set(large["id"])
    assert take_subset(dataset, 10, seed=1)["id"] == small["id"]
    assert take_subset(dataset, 10, seed=2)["id"] != small["id"]
    assert len(set(large["context"])) <= 13  # whole paragraphs: 50 questions from 13 paragraphs of 4
    shuffled = dataset.shuffle(seed=0)
    assert sorted(take_subset(shuffled, 10, seed=1)["id"]) == sorted(small["id"])  # independent of file order
