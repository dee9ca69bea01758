"""loraqa.measure.cost: every configuration measured on the same batches, in its own process, with the counts and
checkpoint sizes the configuration implies."""
import json

from transformers import AutoConfig

from loraqa.cli import main
from loraqa.measure.cost import CostStudyArguments, summary_lines
from loraqa.measure.lora_math import lora_trainable_parameters


def test_configurations_cross_targets_and_ranks_then_full_finetuning():
    configs = CostStudyArguments(ranks="4,16", targets="attention,attention+mlp").configurations()
    assert configs == [{"method": "lora", "target_modules": t, "lora_r": r, "lora_alpha": 2 * r}
                       for t in ("attention", "attention+mlp") for r in (4, 16)] + [{"method": "full_finetune"}]
    assert CostStudyArguments(ranks="8", full_finetune=False).configurations()[-1]["method"] == "lora"


def test_cost_study_measures_each_configuration_on_the_same_batches(tmp_path, tiny_gpt2_dir, squad_file, capsys):
    out = tmp_path / "cost_study.json"
    assert main(["cost-study", "--model", str(tiny_gpt2_dir), "--data", str(squad_file), "--heldout_articles", "0",
                 "--ranks", "2,4", "--targets", "attention+mlp", "--batch_size", "2", "--steps", "2", "--torch_threads", "1",
                 "--output", str(out)]) == 0
    result = json.loads(out.read_text())
    configs = result["configs"]
    assert [(c["method"], c.get("target_modules"), c.get("lora_r")) for c in configs] == \
        [("lora", "attention+mlp", 2), ("lora", "attention+mlp", 4), ("full_finetune", None, None)]
    config = AutoConfig.from_pretrained(tiny_gpt2_dir)
    total = configs[-1]["total_params"]
    for c in configs:
        assert len(c["step_seconds"]) == len(c["step_cpu_seconds"]) == 2  # the warm-up step is not timed
        assert all(0 <= u <= t for u, t in zip(c["update_cpu_seconds"], c["step_cpu_seconds"]))
        assert c["tokens_per_step"] == configs[0]["tokens_per_step"]  # the same batches for every configuration
        assert c["peak_rss_mb"] >= c["rss_after_load_mb"] > 0
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
    printed = capsys.readouterr().out
    assert "full fine-tuning" in printed and "written:" in printed
    assert len(summary_lines(result)) == 1 + len(configs)  # no r=16 here, so no ratio line
