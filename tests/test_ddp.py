"""Gradient accumulation and data parallelism only split a batch: an optimizer step sees the same loss (the token
mean over the whole batch) and makes the same LoRA update as one process stepping on the whole batch."""
import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import tiny_gpt2
from ddp_worker import one_step, validation

# sequential keeps file order (3 questions on the first paragraph, 2 on the second); random shuffles paragraphs
# (ContextGroupedSampler, shared-context packing only), and seed 3 puts the second first: questions 4, 5, 1, 2
SAMPLING = {"sequential": dict(train_sampling_strategy="sequential", seed=0),
            "random": dict(train_sampling_strategy="random", seed=3)}
# {name: (processes, training options, samplings)}: splits of the first 4 questions (in the sampling order) into
# micro-batches and processes; each step must equal the reference, one process with a batch of 4
SPLITS = {
    "accumulate_2x2": (1, dict(per_device_train_batch_size=2, gradient_accumulation_steps=2), SAMPLING),
    "accumulate_2x2_padded": (1, dict(per_device_train_batch_size=2, gradient_accumulation_steps=2, packing="none"),
                              ["sequential"]),
    "2_processes_x2": (2, dict(per_device_train_batch_size=2), SAMPLING),
    "2_processes_x2_padded": (2, dict(per_device_train_batch_size=2, packing="none"), ["sequential"]),
    "2_processes_accumulate_2x1": (2, dict(per_device_train_batch_size=1, gradient_accumulation_steps=2), SAMPLING),
}


@pytest.fixture
def dropout_free_gpt2_dir(tmp_path, gpt2_tokenizer) -> Path:
    """The tiny GPT-2 without its default dropout (0.1), which would draw different masks in each layout."""
    path = tmp_path / "tiny-gpt2-no-dropout"
    model = tiny_gpt2()
    model.config.update(dict(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0))
    model.save_pretrained(path)
    gpt2_tokenizer.save_pretrained(path)
    return path


def _step(output_dir: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """(the step's log: loss, grad_norm, learning_rate; the saved adapter's tensors)."""
    logs = [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]
    return next(log for log in logs if "loss" in log), load_file(str(output_dir / "adapter_model.safetensors"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _on_two_processes(tmp_path: Path, model_dir: Path, squad_file: Path, runs: dict) -> None:
    """ddp_worker.py's runs ({name: training options}) under torchrun on 2 gloo processes, into tmp_path/name."""
    (tmp_path / "runs.json").write_text(json.dumps(runs))
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                             "--master_port", str(_free_port()), str(Path(__file__).with_name("ddp_worker.py")),
                             str(model_dir), str(squad_file), str(tmp_path), str(tmp_path / "runs.json")],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]


def test_accumulation_and_two_processes_take_the_step_of_one_big_batch(tmp_path, dropout_free_gpt2_dir, squad_file):
    runs = {f"{split}_{sampling}": (processes, {**options, **SAMPLING[sampling]})
            for split, (processes, options, samplings) in SPLITS.items() for sampling in samplings}
    parallel = {name: options for name, (processes, options) in runs.items() if processes == 2}
    _on_two_processes(tmp_path, dropout_free_gpt2_dir, squad_file, parallel)
    for name, (processes, options) in runs.items():
        if processes == 1:
            one_step(dropout_free_gpt2_dir, squad_file, tmp_path / name, **options)
    references = {}
    for sampling, options in SAMPLING.items():
        one_step(dropout_free_gpt2_dir, squad_file, tmp_path / sampling, per_device_train_batch_size=4, **options)
        references[sampling] = _step(tmp_path / sampling)
    for name, (processes, options) in runs.items():
        log, adapter = _step(tmp_path / name)
        expected_log, expected = references[options["train_sampling_strategy"]]
        for key in ("loss", "grad_norm"):
            assert log[key] == pytest.approx(expected_log[key], rel=1e-5), (name, key)
        assert adapter.keys() == expected.keys()
        for key in adapter:
            torch.testing.assert_close(adapter[key], expected[key], rtol=1e-4, atol=1e-7, msg=f"{name}: {key}")
    # the checks can fail: the update is not zero, and the two batches differ (other questions, other loss)
    (sequential_log, sequential), (random_log, _) = references["sequential"], references["random"]
    assert all(sequential[key].abs().max() > 1e-3 for key in sequential if "lora_B" in key)
    assert abs(sequential_log["loss"] - random_log["loss"]) > 1e-3


def test_validation_on_two_processes_is_the_whole_sets_token_mean(tmp_path, dropout_free_gpt2_dir, squad_file):
    """5 validation questions on 2 processes at batch size 2: every question counted once (the Trainer's loader
    would repeat some to even out the processes' batches), so loss and token count equal one process's."""
    runs = {"two_processes": {"validation_only": True, "per_device_eval_batch_size": 2}}
    _on_two_processes(tmp_path, dropout_free_gpt2_dir, squad_file, runs)
    parallel = json.loads((tmp_path / "two_processes" / "validation.json").read_text())
    for batch in (2, 5):
        validation(dropout_free_gpt2_dir, squad_file, tmp_path / f"one_{batch}", per_device_eval_batch_size=batch)
        single = json.loads((tmp_path / f"one_{batch}" / "validation.json").read_text())
        assert parallel["eval_tokens"] == single["eval_tokens"] > 0
        assert parallel["eval_loss"] == pytest.approx(single["eval_loss"], rel=1e-6)


def test_run_under_torchrun_trains_on_every_process_and_evaluates_once(tmp_path, tiny_gpt2_dir, squad_file):
    """`loraqa run` on 2 gloo processes: both train (the steps see both processes' questions), only rank 0
    evaluates, compares and prints, and both exit 0."""
    logs, out = tmp_path / "logs", tmp_path / "main"
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_free_port()),
         "--log_dir", str(logs), "--redirects", "3", "-m", "loraqa.cli", "run", "--model", str(tiny_gpt2_dir),
         "--train_file", str(squad_file), "--validation_file", str(squad_file), "--output_dir", str(out),
         "--max_steps", "2", "--per_device_train_batch_size", "1", "--eval_steps", "1", "--lora_r", "2",
         "--disable_tqdm", "true"],
        capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = {int(path.parent.name): path.read_text() for path in logs.rglob("stdout.log")}
    assert sorted(ranks) == [0, 1]
    assert [line for line in ranks[0].splitlines() if line.startswith("results: ")] == [f"results: {out}/"]
    assert "trained 2 of 2 steps: 4 of 5 training questions" in ranks[0]  # a step: one question per process
    assert "F1 gain" in ranks[0] and "F1 gain" not in ranks[1] and "results:" not in ranks[1]
    errors = {int(path.parent.name): path.read_text() for path in logs.rglob("stderr.log")}
    assert "Traceback" not in errors[1] and "written" not in ranks[1]
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["global_steps"], summary["processes"], summary["examples_per_step"]) == (2, 2, 2)
    for name in ("baseline", "finetuned"):
        evaluation = json.loads((out / f"eval_{name}.json").read_text())
        assert evaluation["n"] == 5  # the whole validation file, once
    assert json.loads((out / "comparison.json").read_text())["n_common"] == 5
    assert sorted(p.name for p in tmp_path.iterdir()) == ["logs", "main", "squad.json", "tiny-gpt2"]  # nothing else
