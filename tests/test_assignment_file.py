"""lora_qa_finetuning.py, the assignment's file: every task's name imports from the repository root and runs
on a tiny model and the five-question fixture; with no arguments it prints the task map."""
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import tiny_gpt2

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import lora_qa_finetuning as assignment  # noqa: E402
from loraqa.data.squad import IGNORE_INDEX, load_squad, squad_references  # noqa: E402


def test_every_task_name_is_importable_and_says_its_task():
    for name in assignment.__all__:
        obj = getattr(assignment, name)
        if name == "TASKS":
            continue
        doc = obj.__doc__ or ""
        assert doc.strip(), f"{name} has no docstring"
    for name in ("setup_lora", "training_arguments", "train_model", "answer_questions", "squad_metrics",
                 "compare_with_baseline", "decoding_strategy_experiment"):
        assert getattr(assignment, name).__doc__.startswith("Task "), name
    mapped = {n.strip() for _, names, _ in assignment.TASKS for n in names.split(",")}
    assert set(assignment.__all__) - {"TASKS"} <= mapped


def test_preprocess_and_collate_give_exact_label_masks(gpt2_tokenizer, squad_file):
    rows = assignment.preprocess_function({k: v[:2] for k, v in load_squad(str(squad_file))[:2].items()},
                                          gpt2_tokenizer, max_length=256)
    batch = assignment.QADataCollator(gpt2_tokenizer)([{"input_ids": i, "labels": l}
                                                      for i, l in zip(rows["input_ids"], rows["labels"])])
    for row, labels in enumerate(rows["labels"]):
        answer = [t for t in labels if t != IGNORE_INDEX]
        assert gpt2_tokenizer.decode(answer[:-1]).strip() in ("Denver Broncos", "Levi's Stadium")
        assert answer[-1] == gpt2_tokenizer.eos_token_id
        assert batch["labels"][row, len(labels):].eq(IGNORE_INDEX).all()  # padding never carries loss


def test_lora_setup_freezes_the_base_model():
    model = assignment.setup_lora(tiny_gpt2(), lora_r=2, lora_alpha=4, target_modules="attention")
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    assert {n.split(".lora_")[0].split(".")[-1] for n in trainable} == {"c_attn", "c_proj"}
    assert not any("mlp" in n for n in trainable)


def test_train_answer_score_compare_and_the_strategy_grid(tmp_path, tiny_gpt2_dir, squad_file, gpt2_tokenizer):
    result = assignment.train_model(str(tiny_gpt2_dir), str(tmp_path / "run"),
                                    lora=assignment.LoraArguments(lora_r=2, lora_alpha=4),
                                    data=assignment.DataArguments(train_file=str(squad_file),
                                                                  validation_file=str(squad_file), max_length=256),
                                    max_steps=2, learning_rate=1e-2, eval_strategy="no", save_strategy="no",
                                    disable_tqdm=True)
    assert (tmp_path / "run" / "adapter_model.safetensors").exists() and result.summary["global_steps"] == 2

    records = list(load_squad(str(squad_file)))
    model = tiny_gpt2()
    greedy = assignment.answer_questions(model, gpt2_tokenizer, records, max_new_tokens=4)
    spans = assignment.answer_questions(model, gpt2_tokenizer, records, max_new_tokens=4, constrain_to_context=True)
    assert greedy.keys() == spans.keys() == {r["id"] for r in records}
    assert all(spans[r["id"]] in r["context"] for r in records)

    references = squad_references(records)
    assert assignment.squad_metrics({q: golds[0] for q, golds in references.items()}, references) == \
        {"exact_match": 100.0, "f1": 100.0}

    grid = assignment.decoding_strategy_experiment(str(tiny_gpt2_dir), str(tmp_path / "grid.json"),
                                                   adapter=str(tmp_path / "run"), max_samples=5, grid_seeds=1,
                                                   data=str(squad_file))
    names = [row["strategy"] for row in grid["strategies"]]
    assert names[0] == "greedy" and "num_beams=2" in names and len(names) == len(set(names))

    from loraqa.cli import main

    for name, adapter in (("base", []), ("tuned", ["--adapter", str(tmp_path / "run")])):
        assert main(["evaluate", "--model", str(tiny_gpt2_dir), *adapter, "--data", str(squad_file),
                     "--max_new_tokens", "4", "--output", str(tmp_path / f"{name}.json")]) == 0
    comparison = assignment.compare_with_baseline(str(tmp_path / "base.json"), str(tmp_path / "tuned.json"))
    assert comparison["n_common"] == 5 and "delta_ci" in comparison["f1"] and "mcnemar" in comparison["exact_match"]


def test_running_the_file_prints_the_task_map():
    out = subprocess.run([sys.executable, str(ROOT / "lora_qa_finetuning.py")], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    for _, name, command in assignment.TASKS:
        assert name in out.stdout and command in out.stdout


@pytest.mark.parametrize("argv", [["--help"], ["score", "--help"]])
def test_with_a_subcommand_it_is_the_cli(argv):
    out = subprocess.run([sys.executable, str(ROOT / "lora_qa_finetuning.py"), *argv], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0 and "loraqa" in out.stdout

