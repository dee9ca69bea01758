import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from loraqa.cli import main
from loraqa.config import GenerationSettings, ModelArguments
from loraqa.evaluation.evaluate import answer_question, load_model_for_eval

ROOT = Path(__file__).resolve().parent.parent


def test_fetch_is_idempotent_and_names_unknown_assets(capsys):
    from conftest import CACHE

    assert main(["fetch", "--cache_dir", str(CACHE)]) == 0
    assert "squad: " in capsys.readouterr().out
    assert main(["fetch", "wikipedia", "--cache_dir", str(CACHE)]) == 2
    assert "unknown asset 'wikipedia'" in capsys.readouterr().err


def test_score_has_the_official_interface(tmp_path, squad_file, capsys):
    predictions = tmp_path / "pred.json"
    predictions.write_text(json.dumps({"q1": "the Denver Broncos", "q2": "Levi's", "q3": "24-10", "q4": "",
                                       "q5": "number 399"}))
    assert main(["score", str(squad_file), str(predictions)]) == 0
    scores = json.loads(capsys.readouterr().out)
    assert scores == {"exact_match": pytest.approx(60.0), "f1": pytest.approx(100 * (3 + 2 / 3) / 5)}


def test_bad_prediction_file_is_one_clear_line(tmp_path, squad_file, capsys):
    predictions = tmp_path / "pred.json"
    predictions.write_text(json.dumps(["not", "a", "mapping"]))
    assert main(["score", str(squad_file), str(predictions)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "pred.json: expected a JSON object" in err


def test_train_evaluate_compare_failures_end_to_end(tmp_path, tiny_gpt2_dir, squad_file, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = tmp_path / "run.yaml"
    config.write_text("learning_rate: 0.01\nmax_steps: 3\nlora_r: 2\n")
    run = tmp_path / "run"
    assert main(["train", "--config", str(config), "--model", str(tiny_gpt2_dir), "--train_file", str(squad_file),
                 "--validation-file", str(squad_file), "--max_steps", "2", "--output_dir", str(run),
                 "--eval_steps", "1", "--logging_steps", "1", "--disable_tqdm", "true"]) == 0
    resolved = json.loads((run / "run_config.json").read_text())
    assert resolved["training"]["learning_rate"] == 0.01  # from YAML
    assert resolved["training"]["max_steps"] == 2  # the flag wins over YAML
    assert resolved["lora"]["lora_r"] == 2
    assert {k: resolved["sources"][k] for k in ("learning_rate", "max_steps", "lora_r", "lora_alpha", "model")} == {
        "learning_rate": "config file", "max_steps": "flag", "lora_r": "config file", "lora_alpha": "default",
        "model": "flag"}
    for name, adapter in (("base", []), ("tuned", ["--adapter", str(run)])):
        assert main(["evaluate", "--model", str(tiny_gpt2_dir), *adapter, "--data", str(squad_file),
                     "--max_new_tokens", "3", "--output", str(tmp_path / f"{name}.json")]) == 0
    assert main(["compare", str(tmp_path / "base.json"), str(tmp_path / "tuned.json"),
                 "--output", str(tmp_path / "cmp.json")]) == 0
    assert json.loads((tmp_path / "cmp.json").read_text())["n_common"] == 5
    assert main(["failures", str(tmp_path / "tuned.json"), "--output", str(tmp_path / "failures.md")]) == 0
    assert (tmp_path / "failures.md").read_text().startswith("# Failure analysis")
    ask_config = tmp_path / "ask.yaml"
    ask_config.write_text("do_sample: true\ntop_k: 5\ntemperature: 1.5\n")  # evaluate's decoding settings
    capsys.readouterr()
    for _ in range(2):
        assert main(["ask", "--config", str(ask_config), "--model", str(tiny_gpt2_dir), "--adapter", str(run),
                     "--context", "Paris is in France.", "--question", "Where is Paris?", "--max_new_tokens", "4",
                     "--seed", "3", "--device", "cpu", "--dtype", "float32"]) == 0
    model, tokenizer, _ = load_model_for_eval(ModelArguments(str(tiny_gpt2_dir)), str(run), device="cpu",
                                              dtype="float32")
    expected = answer_question(model, tokenizer, "Paris is in France.", "Where is Paris?",
                               GenerationSettings(do_sample=True, top_k=5, temperature=1.5, seed=3, max_new_tokens=4))
    assert expected and capsys.readouterr().out == f"{expected}\n" * 2


def test_out_of_range_settings_fail_before_any_work(tmp_path, capsys):
    assert main(["evaluate", "--model", "does-not-exist", "--top_p", "1.5", "--output", str(tmp_path / "e.json")]) == 2
    assert "top_p=1.5: must be in (0, 1]" in capsys.readouterr().err
    assert not (tmp_path / "e.json").exists()
    assert main(["train", "--model", "x", "--lora_r", "0"]) == 2
    assert "lora_r=0" in capsys.readouterr().err
    assert main(["train", "--model", "x", "--load_best_model_at_end", "true", "--eval_strategy", "steps",
                 "--save_strategy", "epoch"]) == 2  # transformers' own check, as one line
    assert capsys.readouterr().err.startswith("loraqa train: error: training arguments: --load_best_model_at_end")


def test_unusable_device_fails_before_any_work(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert main(["evaluate", "--model", "does-not-exist", "--device", "cuda", "--output", str(tmp_path / "e.json")]) == 2
    assert "device 'cuda': CUDA is not available on this machine" in capsys.readouterr().err
    assert not (tmp_path / "e.json").exists()


def test_unknown_yaml_key_is_named(tmp_path, capsys):
    config = tmp_path / "bad.yaml"
    config.write_text("learnin_rate: 0.1\n")
    assert main(["train", "--config", str(config)]) == 2
    assert "bad.yaml: unknown setting(s) learnin_rate" in capsys.readouterr().err


def test_single_file_entry_point_delegates():
    out = subprocess.run([sys.executable, str(ROOT / "lora_qa_finetuning.py"), "--help"], capture_output=True,
                         text=True, check=True)
    assert "usage: loraqa {fetch,data-stats,score,train,evaluate" in out.stdout


def test_bf16_training_on_a_cpu_needs_no_extra_flag(monkeypatch, tmp_path):
    import loraqa.training.arguments as arguments

    monkeypatch.setattr(arguments, "_has_accelerator", lambda: False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    args = arguments.LoraQATrainingArguments(output_dir=str(tmp_path), bf16=True)
    assert args.bf16 and args.use_cpu  # transformers alone refuses bf16 without a GPU unless use_cpu is set
    assert not arguments.LoraQATrainingArguments(output_dir=str(tmp_path)).use_cpu


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1, err
    return err.strip()


@pytest.mark.parametrize("argv, message", [
    (["train", "--modle", "x"], "loraqa train: error: unknown flag --modle (did you mean --model?)"),
    (["evaluate", "--max-sample", "5"],
     "loraqa evaluate: error: unknown flag --max-sample (did you mean --max-samples?)"),
    (["ask", "--temprature", "0.5"], "loraqa ask: error: unknown flag --temprature (did you mean --temperature?)"),
    (["fetch", "--cache_dri", "d"], "loraqa fetch: error: unknown flag --cache_dri (did you mean --cache_dir?)"),
    (["data-stats", "--split", "test"], "loraqa data-stats: error: argument --split: invalid choice: 'test'"),
    (["trian"], "loraqa: error: unknown command 'trian' (did you mean 'train'?); commands: fetch, data-stats, score"),
])
def test_mistyped_flag_or_command_is_one_line_with_the_closest_spelling(argv, message, capsys):
    assert main(argv) == 2
    assert _one_line_error(capsys).startswith(message)


def test_unloadable_model_or_data_is_one_line_before_anything_loads(tmp_path, squad_file, tiny_gpt2_dir, capsys,
                                                                      monkeypatch):
    monkeypatch.setattr("loraqa.model.loading.hub_status", lambda repo_id, repo_type="model": None)  # offline
    monkeypatch.setattr("loraqa.training.run.hub_status", lambda repo_id, repo_type="model": None)
    run = tmp_path / "run"
    assert main(["train", "--model", "x", "--train_file", str(squad_file), "--output_dir", str(run)]) == 2
    assert _one_line_error(capsys).startswith("loraqa train: error: model 'x': no such directory, alias or hub model "
                                              "(the hub is unreachable); aliases: gpt2")
    assert main(["ask", "--model", "x", "--context", "c", "--question", "q"]) == 2
    assert "model 'x': no such directory" in _one_line_error(capsys)
    assert main(["train", "--model", str(tiny_gpt2_dir), "--train_file", str(tmp_path / "train.json"),
                 "--output_dir", str(run)]) == 2
    assert _one_line_error(capsys).endswith(f"train_file='{tmp_path / 'train.json'}': no such file")
    assert main(["train", "--model", str(tiny_gpt2_dir), "--validation_file", "sqaud", "--output_dir", str(run)]) == 2
    assert _one_line_error(capsys).endswith("validation_file='sqaud': no such file or hub dataset (the hub is "
                                            "unreachable); did you mean squad, the fetched SQuAD v1.1?")
    assert not run.exists()


def test_run_defaults_yield_to_the_users_file_and_flags(tmp_path, monkeypatch):
    class Stop(Exception):
        pass

    def stop(*args, sources):
        raise Stop(args, sources)

    monkeypatch.setattr("loraqa.training.run.train", stop)
    config = tmp_path / "mine.yaml"
    config.write_text("output_dir: runs/mine\nmax_train_samples: 500\n")
    with pytest.raises(Stop) as stopped:
        main(["run", "--config", str(config), "--eval_steps", "20"])
    (model, lora, data, training), sources = stopped.value.args
    assert (training.output_dir, data.max_train_samples, training.eval_steps) == ("runs/mine", 500, 20)
    assert (training.save_steps, training.max_train_minutes, data.max_eval_samples) == (50, 12, 64)  # run's own
    assert [sources[k] for k in ("output_dir", "max_train_samples", "eval_steps", "save_steps", "learning_rate")] == [
        "config file", "config file", "flag", "run", "default"]


def _train_argv(model, squad, run, *extra):
    return ["train", "--model", str(model), "--train_file", str(squad), "--validation_file", str(squad),
            "--output_dir", str(run), "--lora_r", "2", "--logging_steps", "1", "--disable_tqdm", "true", *extra]


def test_output_dir_of_another_configuration_is_refused(tmp_path, tiny_gpt2_dir, squad_file, capsys):
    run = tmp_path / "run"
    first = _train_argv(tiny_gpt2_dir, squad_file, run, "--max_steps", "2", "--save_steps", "1")
    assert main(first + ["--learning_rate", "0.01"]) == 0
    assert sorted(p.name for p in run.glob("checkpoint-*")) == ["checkpoint-1", "checkpoint-2"]
    (run / "eval_test.json").write_text("{}")  # evaluations live in the run directory too
    capsys.readouterr()
    second = _train_argv(tiny_gpt2_dir, squad_file, run, "--max_steps", "1", "--save_steps", "1")
    assert main(second + ["--learning_rate", "0.02"]) == 2
    assert _one_line_error(capsys) == (f"loraqa train: error: output_dir='{run}' holds a run of another configuration "
                                       "(max_steps 2 -> 1, learning_rate 0.01 -> 0.02); --overwrite_output_dir true "
                                       "replaces it, or choose another --output_dir")
    assert main(second + ["--learning_rate", "0.02", "--overwrite_output_dir", "true"]) == 0
    assert sorted(p.name for p in run.glob("checkpoint-*")) == ["checkpoint-1"]  # the old run's are gone
    assert json.loads((run / "run_config.json").read_text())["training"]["learning_rate"] == 0.02
    # an interrupted run of the same configuration resumes (as `loraqa sweep` does), never starts over by accident
    (run / "summary.json").unlink()
    capsys.readouterr()
    assert main(second + ["--learning_rate", "0.02", "--torch_threads", "1"]) == 2
    assert _one_line_error(capsys).endswith(f"holds an unfinished run of this configuration: --resume_from_checkpoint "
                                            f"{run / 'checkpoint-1'} continues it, --overwrite_output_dir true starts "
                                            "it over")
    assert main(second + ["--learning_rate", "0.02", "--resume_from_checkpoint", str(run / "checkpoint-1")]) == 0
    assert main(second + ["--learning_rate", "0.02"]) == 0  # finished: the same configuration may run again


def test_time_budget_sizes_the_schedule_to_end_at_zero(tmp_path, tiny_gpt2_dir, squad_file, monkeypatch):
    import loraqa.training.budget

    # a probed 4 s a step against the real few milliseconds: the budget (2 min) is far from the deadline even on a
    # loaded machine, where a tighter one (30 s) was reached while setting up
    probe = {"step_s": 4.0, "evaluation_s": 2.0, "timed_batches": 4, "warmup_batch_s": 0.1}
    monkeypatch.setattr(loraqa.training.budget, "probe_seconds", lambda trainer: dict(probe))
    run = tmp_path / "run"
    assert main(_train_argv(tiny_gpt2_dir, squad_file, run, "--max_train_minutes", "2", "--max_steps", "1000",
                            "--eval_steps", "10", "--warmup_ratio", "0")) == 0
    summary = json.loads((run / "summary.json").read_text())
    config = json.loads((run / "run_config.json").read_text())
    budget = summary["budget"]
    steps = budget["max_steps"]
    def cost(s):  # S steps of 4 s and S // 10 + 1 validation passes of 2 s
        return s * 4.0 + (s // 10 + 1) * 2.0

    assert cost(steps) <= 0.95 * (120 - budget["setup_s"]) < cost(steps + 1)  # the most that fit 95% of what is left
    assert budget["limited"] and budget["steps_without_budget"] == 1000 and budget["stopped_at_deadline"] is None
    assert budget["probe"]["step_s"] == 4.0 and budget["expected_s"] <= 120
    assert summary["global_steps"] == config["training"]["max_steps"] == steps
    assert config["sources"]["max_steps"] == "max_train_minutes"
    logged = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    rates = [(r["step"], r["learning_rate"]) for r in logged if "learning_rate" in r]
    peak = config["training"]["learning_rate"]
    # the linear schedule was built for the chosen steps: step k trains at peak * (S - k + 1) / S, 0 after step S
    assert rates == [(k, pytest.approx(peak * (steps - k + 1) / steps)) for k in range(1, steps + 1)]


def test_probe_changes_nothing_about_the_run(tmp_path, tiny_gpt2_dir, squad_file):
    from safetensors.torch import load_file

    common = ("--max_steps", "3", "--lora_dropout", "0.3", "--learning_rate", "0.01")
    assert main(_train_argv(tiny_gpt2_dir, squad_file, tmp_path / "plain", *common)) == 0
    assert main(_train_argv(tiny_gpt2_dir, squad_file, tmp_path / "probed", *common, "--max_train_minutes", "10")) == 0
    summary = json.loads((tmp_path / "probed" / "summary.json").read_text())
    assert summary["budget"]["probe"]["step_s"] > 0 and not summary["budget"]["limited"]  # 3 steps fit 10 minutes
    plain, probed = (load_file(tmp_path / name / "adapter_model.safetensors") for name in ("plain", "probed"))
    assert any(v.abs().sum() > 0 for k, v in plain.items() if "lora_B" in k)  # trained, B no longer zero
    assert plain.keys() == probed.keys() and all(torch.equal(plain[k], probed[k]) for k in plain)


def test_run_summary_says_what_the_budget_trained(tmp_path):
    """`make run` on a budget that cut the schedule names the steps and questions actually trained."""
    from loraqa.study.main_run import summary_lines, trained

    run = tmp_path / "main"
    run.mkdir()
    (run / "run_config.json").write_text(json.dumps({"training": {
        "per_device_train_batch_size": 8, "gradient_accumulation_steps": 1, "num_train_epochs": 1.0, "max_steps": -1}}))
    (run / "summary.json").write_text(json.dumps({
        "model_resolved": "m", "train_examples": 3000, "global_steps": 179, "train_runtime_s": 700.0,
        "budget": {"max_train_minutes": 12, "steps_without_budget": 375, "limited": True, "stopped_at_deadline": None}}))
    done = trained(run)
    assert (done["steps"], done["planned_steps"], done["questions"], done["cut_by_budget"]) == (179, 375, 1432, True)
    scores = {"exact_match": 50.0, "exact_match_ci": [45.0, 55.0], "f1": 60.0, "f1_ci": [55.0, 65.0], "n": 300}
    result = {"run_dir": str(run), "summary": json.loads((run / "summary.json").read_text()), "trained": done,
              "evaluations": {"baseline": scores, "finetuned": scores},
              "comparison": {"f1": {"delta": 0.0, "delta_ci": [-1.0, 1.0], "permutation_p_value": 1.0}}}
    assert "trained 179 of 375 steps: 1,432 of 3,000 training questions, the rest cut by the 12-minute budget" in \
        summary_lines(result)[0]


@pytest.mark.parametrize("command", ["fetch", "data-stats", "score", "train", "evaluate", "compare", "failures", "ask",
                                     "bench", "run", "sweep", "plots", "padding-study", "cost-study", "param-counts",
                                     "report", "demo", "decoding-speed"])
def test_every_subcommand_answers_help(command, capsys):
    try:
        code = main([command, "--help"])
    except SystemExit as exit_:
        code = exit_.code
    assert code == 0 and "usage" in capsys.readouterr().out.lower()
