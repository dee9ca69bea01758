"""An exported adapter names its base by hub name, and `loraqa fetch` places the converted model in the Hugging Face
cache under that name, so that plain `AutoPeftModelForCausalLM.from_pretrained(adapter)` loads it in a fresh process,
offline, from any directory; loraqa's own loaders still find the fetched folder by its short name."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM

from loraqa.data.assets import SMOLLM2_HUB_ID, hub_name, place_in_hub_cache
from loraqa.study.collect import export_checkpoint
from conftest import tiny_llama

REPO = "models--HuggingFaceTB--SmolLM2-135M-Instruct"
IDS = [[1, 17, 230, 4021, 9, 77]]

LOAD = """
import json, sys, torch
from peft import AutoPeftModelForCausalLM
from loraqa.model.loading import resolve_model
model = AutoPeftModelForCausalLM.from_pretrained(sys.argv[1])
with torch.no_grad():
    logits = model(torch.tensor(json.loads(sys.argv[3]))).logits[0, -1].tolist()
print(json.dumps({"logits": logits, "hub_name": resolve_model(sys.argv[4], sys.argv[2]),
                  "short_name": resolve_model("smollm2-135m", sys.argv[2])}))
"""


def _fresh_env(**hf) -> dict:
    """This environment without any Hugging Face cache setting, offline, plus `hf`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_", "TRANSFORMERS_"))}
    return {**env, "HF_HUB_OFFLINE": "1", **hf}


def _fetch(cache: Path, cwd: Path, env: dict) -> str:
    """`loraqa fetch smollm2-135m` in a fresh process: the path it prints."""
    command = [sys.executable, "-c", "import sys; from loraqa.cli import main; sys.exit(main(sys.argv[1:]))",
               "fetch", "smollm2-135m", "--cache_dir", str(cache)]
    result = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout.strip().removeprefix("smollm2-135m: ")


def test_an_exported_adapter_loads_by_hub_name_offline_from_any_directory(tmp_path, smollm2_tokenizer):
    # a tiny random Llama where `loraqa fetch` leaves the converted SmolLM2, with the real tokenizer
    cache = tmp_path / "data"
    local = cache / "smollm2-135m"
    tiny_llama().save_pretrained(local)
    smollm2_tokenizer.save_pretrained(local)
    # a run's adapter, trained on the local folder as the study's were (B != 0: the adapter changes the logits)
    base = AutoModelForCausalLM.from_pretrained(str(local)).eval()
    with torch.no_grad():
        base_logits = base(torch.tensor(IDS)).logits[0, -1]
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                            init_lora_weights=False)).eval()
    with torch.no_grad():
        expected = model(torch.tensor(IDS)).logits[0, -1]
    assert not torch.allclose(expected, base_logits, atol=1e-4)
    run_dir = tmp_path / "sweep" / "final-0"
    model.save_pretrained(run_dir)
    (run_dir / "run_config.json").write_text(json.dumps({"training": {"output_dir": str(run_dir)}}))
    assert json.loads((run_dir / "adapter_config.json").read_text())["base_model_name_or_path"] == str(local)

    exported = tmp_path / "checkpoints" / "final"
    assert export_checkpoint(run_dir, exported)
    assert json.loads((exported / "adapter_config.json").read_text())["base_model_name_or_path"] == SMOLLM2_HUB_ID

    # `loraqa fetch` places the model in a fresh HF_HOME's hub cache (hard links: no second copy)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = _fresh_env(HF_HOME=str(tmp_path / "hf"))
    assert _fetch(cache, elsewhere, env) == str(local)
    repo = tmp_path / "hf" / "hub" / REPO
    revision = (repo / "refs" / "main").read_text()
    assert len(revision) == 40 and int(revision, 16) >= 0
    snapshot = repo / "snapshots" / revision
    assert sorted(p.name for p in snapshot.iterdir()) == sorted(p.name for p in local.iterdir())
    assert os.path.samefile(snapshot / "model.safetensors", local / "model.safetensors")

    # a fresh process, hub unreachable, another directory: plain PEFT finds the base by its hub name
    result = subprocess.run([sys.executable, "-c", LOAD, str(exported), str(cache), json.dumps(IDS), SMOLLM2_HUB_ID],
                            cwd=elsewhere, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    loaded = json.loads(result.stdout.strip().splitlines()[-1])
    assert torch.allclose(torch.tensor(loaded["logits"]), expected, atol=1e-5)
    assert loaded["hub_name"] == str(snapshot)  # loraqa's loader takes the hub name offline from the cache
    assert loaded["short_name"] == str(local)  # and still the fetched folder for its alias

    # HF_HUB_CACHE, when set, is where the model goes
    hub_cache = tmp_path / "hub-cache"
    _fetch(cache, elsewhere, _fresh_env(HF_HUB_CACHE=str(hub_cache)))
    assert (hub_cache / REPO / "snapshots" / (hub_cache / REPO / "refs" / "main").read_text() / "config.json").is_file()


def test_a_repo_the_cache_already_holds_is_left_alone(tmp_path, monkeypatch):
    """The hub's own SmolLM2 in the cache (or an earlier fetch) is not replaced, and placing twice is a no-op."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    model = tmp_path / "smollm2-135m"
    model.mkdir()
    (model / "config.json").write_text("{}")
    (model / "model.safetensors").write_bytes(b"weights")
    snapshot = place_in_hub_cache(model, SMOLLM2_HUB_ID)
    assert place_in_hub_cache(model, SMOLLM2_HUB_ID) == snapshot
    (model / "model.safetensors").write_bytes(b"other weights")  # another revision, were it placed
    assert place_in_hub_cache(model, SMOLLM2_HUB_ID) == snapshot
    hub = tmp_path / "hub" / REPO
    hub_revision = "a" * 40
    (hub / "snapshots" / hub_revision).mkdir(parents=True)
    (hub / "snapshots" / hub_revision / "config.json").write_text("{}")
    (hub / "refs" / "main").write_text(hub_revision)
    assert place_in_hub_cache(model, SMOLLM2_HUB_ID) == hub / "snapshots" / hub_revision
    assert (hub / "refs" / "main").read_text() == hub_revision


def test_hub_names():
    assert hub_name("data/smollm2-135m") == hub_name("/work/x/data/smollm2-135m") == SMOLLM2_HUB_ID
    assert hub_name("/root/.cache/huggingface/hub/models--openai-community--gpt2/snapshots/" + "0" * 40) == \
        "openai-community/gpt2"
    assert hub_name("openai-community/gpt2") == "openai-community/gpt2"
    assert hub_name("/tmp/my-model") == "/tmp/my-model"  # a folder of one's own cannot be named portably
