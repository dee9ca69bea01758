"""loraqa.measure.cost: every configuration measured on the same batches, in its own process, with the counts and
checkpoint sizes the configuration implies."""
import json
import statistics

from transformers import AutoConfig

from loraqa.cli import main
from loraqa.config import ModelArguments
from loraqa.measure import cost
from loraqa.measure.cost import CostStudyArguments, summary_lines
from loraqa.measure.lora_math import lora_trainable_parameters


def test_configurations_cross_targets_and_ranks_then_full_finetuning():
    configs = CostStudyArguments(ranks="4,16", targets="attention,attention+mlp").configurations()
    assert configs == [{"method": "lora", "target_modules": t, "lora_r": r, "lora_alpha": 2 * r}
                       for t in ("attention", "attention+mlp") for r in (4, 16)] + [{"method": "full_finetune"}]
    assert CostStudyArguments(ranks="8", full_finetune=False).configurations()[-1]["method"] == "lora"


def test_cost_study_measures_each_configuration_on_the_same_batches(tmp_path, tiny_gpt2_dir, squad_file, capsys):
    out = tmp_path / "cost_study.json"
    # 2 configurations x 2 repetitions: 4 fresh processes (the order of many is tested with a fake process below)
    assert main(["cost-study", "--model", str(tiny_gpt2_dir), "--data", str(squad_file), "--heldout_articles", "0",
                 "--ranks", "4", "--targets", "attention+mlp", "--batch_size", "2", "--steps", "2",
                 "--torch_threads", "1", "--repeats", "2", "--output", str(out)]) == 0
    result = json.loads(out.read_text())
    configs = result["configs"]
    assert [(c["method"], c.get("target_modules"), c.get("lora_r")) for c in configs] == \
        [("lora", "attention+mlp", 4), ("full_finetune", None, None)]
    config = AutoConfig.from_pretrained(tiny_gpt2_dir)
    total = configs[-1]["total_params"]
    for c in configs:
        assert c["repeats"] == 2 and len(c["step_seconds"]) == len(c["step_cpu_seconds"]) == 2
        assert all(len(rep) == 2 for rep in c["step_cpu_seconds"])  # the warm-up step is not timed
        assert all(0 <= u <= t for us, ts in zip(c["update_cpu_seconds"], c["step_cpu_seconds"])
                   for u, t in zip(us, ts))
        means = [statistics.fmean(rep) for rep in c["step_cpu_seconds"]]
        assert c["step_cpu_seconds_repetitions"] == means and c["step_cpu_seconds_median"] == statistics.median(means)
        assert c["step_cpu_seconds_spread"] == [min(means), max(means)]
        assert c["tokens_per_step"] == configs[0]["tokens_per_step"]  # the same batches for every configuration
        assert c["peak_rss_mb"] >= c["rss_after_load_mb"] > 0 and c["peak_rss_mb"] == max(c["peak_rss_mb_repetitions"])
        if c["method"] == "lora":
            assert c["trainable_params"] == lora_trainable_parameters(config, c["target_modules"], c["lora_r"])[
                "trainable_params"]
            assert c["total_params"] == total + c["trainable_params"]
            # the adapter file: its float32 weights plus a small safetensors header
            assert 4 * c["trainable_params"] <= c["checkpoint_bytes"] < 4 * c["trainable_params"] + 16384
    assert configs[-1]["trainable_params"] == total
    assert 4 * total <= configs[-1]["checkpoint_bytes"] < 4 * total + 65536  # tied embeddings saved once
    assert len(result["batches"]) == 3 and all(1 <= n <= 2 for n in result["batches"])  # warm-up + 2 timed
    assert result["machine"]["torch_threads"] == 1 and result["settings"]["steps"] == 2
    assert len(result["load_average_by_round"]) == 2 and isinstance(result["machine"]["cpu_idle_at_end"], bool)
    printed = capsys.readouterr().out
    assert "full fine-tuning" in printed and "written:" in printed
    assert len(summary_lines(result)) == 1 + len(configs) + 1  # no r=16 here, so no ratio line; then the load


def _repetition(cpu: list[float], peak: float, checkpoint: int | None) -> dict:
    return {"trainable_params": 10, "total_params": 110, "step_seconds": [2 * t for t in cpu],
            "step_cpu_seconds": cpu, "update_cpu_seconds": [t / 4 for t in cpu], "tokens_per_step": [40, 44],
            "rss_after_load_mb": peak - 50, "peak_rss_mb": peak, "checkpoint_bytes": checkpoint}


def test_combine_takes_the_median_of_the_repetitions_means():
    config = {"method": "lora", "target_modules": "attention", "lora_r": 16, "lora_alpha": 32}
    record = cost.combine(config, [_repetition([1, 3], 900, 4096), _repetition([2, 2], 950, None),
                                   _repetition([10, 12], 920, None)])  # a disturbed repetition
    assert record["step_cpu_seconds"] == [[1, 3], [2, 2], [10, 12]]
    assert record["step_cpu_seconds_repetitions"] == [2, 2, 11]
    assert record["step_cpu_seconds_median"] == 2 and record["step_cpu_seconds_spread"] == [2, 11]
    assert record["step_cpu_seconds_mean"] == 5  # the mean over every step, as before repetitions
    assert record["step_seconds_median"] == 4 and record["update_cpu_seconds_median"] == 0.5
    assert (record["peak_rss_mb"], record["rss_after_load_mb"], record["peak_over_load_mb"]) == (950, 900, 50)
    assert record["peak_rss_mb_spread"] == [900, 950] and record["checkpoint_bytes"] == 4096
    assert record["repeats"] == 3 and record["lora_r"] == 16


def test_repetitions_run_in_rounds_alternating_over_the_configurations(monkeypatch, tmp_path, tiny_gpt2_dir,
                                                                       squad_file):
    """A fake measuring process whose CPU seconds are its call number: the record shows the order of the calls."""
    calls = []

    def fake_child(function, job):
        assert function is cost.measure
        calls.append((cost.label(job["config"]), job["checkpoint"]))
        n = float(len(calls))
        return _repetition([n, n], 1000 + n, 1 if job["checkpoint"] else None)

    monkeypatch.setattr(cost, "in_child", fake_child)
    args = CostStudyArguments(ranks="2,4", targets="attention", data=str(squad_file), heldout_articles=0,
                              batch_size=2, steps=1, repeats=3, output=str(tmp_path / "cost.json"))
    result = cost.run_cost_study(ModelArguments(model=str(tiny_gpt2_dir)), args)
    names = ["LoRA attention r=2", "LoRA attention r=4", "full fine-tuning"]
    assert [name for name, _ in calls] == names + names[::-1] + names
    assert [checkpoint for _, checkpoint in calls] == [True] * 3 + [False] * 6  # the checkpoint is saved once
    first = result["configs"][0]
    assert first["step_cpu_seconds_repetitions"] == [1, 6, 7] and first["step_cpu_seconds_median"] == 6
    assert first["step_cpu_seconds_spread"] == [1, 7] and first["checkpoint_bytes"] == 1
    assert result["configs"][2]["step_cpu_seconds_repetitions"] == [3, 4, 9]
    assert len(result["load_average_by_round"]) == 3
    assert json.loads((tmp_path / "cost.json").read_text())["configs"][1]["step_cpu_seconds_repetitions"] == [2, 5, 8]
