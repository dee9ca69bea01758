import json

from loraqa.data.squad import read_squad_json
from loraqa.data.synthetic import synthetic_squad


def test_synthetic_squad_is_valid_squad_with_exactly_n_answerable_questions(tmp_path):
    path = tmp_path / "synthetic.json"
    path.write_text(json.dumps(synthetic_squad(37, seed=3)))
    records = read_squad_json(path)  # validates every answer_start against its context
    assert [r["id"] for r in records] == [f"syn-{k}" for k in range(37)]
    for r in records:
        (text,), (start,) = r["answers"]["text"], r["answers"]["answer_start"]
        assert r["context"][start:start + len(text)] == text
        entity = r["question"].split(" ")[-1].rstrip("?")
        assert f"of {entity} is {text}." in r["context"]  # the answer is the fact the question asks for
    assert len({r["context"] for r in records}) > 5 and len({len(r["context"]) for r in records}) > 5
    assert synthetic_squad(37, seed=3) == synthetic_squad(37, seed=3) != synthetic_squad(37, seed=4)
