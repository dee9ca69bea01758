import warnings

import pytest
import torch

from conftest import CACHE, tiny_gpt2, tiny_llama
from loraqa.config import LoraArguments
from loraqa.model.loading import ModelSetupError, load_adapter, resolve_model
from loraqa.model.lora import attach_lora, count_parameters, resolve_target_modules


def _lora_layers(peft_model):
    return sorted({name.split(".lora_A")[0].split("base_model.model.")[1]
                   for name, _ in peft_model.named_parameters() if ".lora_A" in name})


@pytest.mark.parametrize("preset, expected", [
    ("attention", ["transformer.h.{i}.attn.c_attn", "transformer.h.{i}.attn.c_proj"]),
    ("attention+mlp", ["transformer.h.{i}.attn.c_attn", "transformer.h.{i}.attn.c_proj",
                       "transformer.h.{i}.mlp.c_fc", "transformer.h.{i}.mlp.c_proj"]),
])
def test_gpt2_presets_hit_exactly_their_layers(preset, expected):
    model = attach_lora(tiny_gpt2(vocab_size=100), LoraArguments(lora_r=4, target_modules=preset))
    assert _lora_layers(model) == sorted(e.format(i=i) for i in range(2) for e in expected)


def test_gpt2_attention_parameter_count_by_formula():
    r, d, layers = 4, 32, 2
    model = attach_lora(tiny_gpt2(vocab_size=100), LoraArguments(lora_r=r, target_modules="attention"))
    per_layer = r * (d + 3 * d) + r * (d + d)  # c_attn: d -> 3d, attn.c_proj: d -> d
    counts = count_parameters(model)
    assert counts["trainable_params"] == layers * per_layer
    base = count_parameters(tiny_gpt2(vocab_size=100))
    assert counts["total_params"] == base["total_params"] + layers * per_layer
    assert counts["reduction_factor"] == round(base["total_params"] / (layers * per_layer), 1)  # rho = P / P_LoRA
    assert base["reduction_factor"] == 1.0  # full fine-tuning trains every base weight
    assert all(p.requires_grad == ("lora_" in n) for n, p in model.named_parameters())


def test_llama_presets_and_counts():
    model = attach_lora(tiny_llama(vocab_size=100), LoraArguments(lora_r=2, target_modules="attention+mlp"))
    names = {n.rsplit(".", 1)[-1] for n in _lora_layers(model)}
    assert names == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    d, kv, ff, r = 32, 16, 64, 2  # kv = 2 heads x head_dim 8
    per_layer = r * ((d + d) * 2 + (d + kv) * 2 + (d + ff) * 3)
    assert count_parameters(model)["trainable_params"] == 2 * per_layer
    all_linear = attach_lora(tiny_llama(vocab_size=100), LoraArguments(lora_r=2, target_modules="all-linear"))
    assert count_parameters(all_linear)["trainable_params"] == 2 * per_layer  # lm_head excluded


def test_conv1d_gets_fan_in_fan_out_without_warning():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = attach_lora(tiny_gpt2(vocab_size=100), LoraArguments(lora_r=4))
    assert not [w for w in caught if "fan_in_fan_out" in str(w.message)]
    assert model.peft_config["default"].fan_in_fan_out is True


def test_bad_targets_and_rank_get_clear_errors():
    with pytest.raises(ModelSetupError, match=r"'qkv' matches no linear layer .*attn\.c_attn, attn\.c_proj, mlp\.c_fc"):
        resolve_target_modules(tiny_gpt2(vocab_size=100), "qkv")
    with pytest.raises(ModelSetupError, match="lora_r=64 exceeds the width 32 of layer"):
        attach_lora(tiny_gpt2(vocab_size=100), LoraArguments(lora_r=64))


def test_lora_starts_as_the_base_model_and_merging_is_exact(tmp_path):
    ids = torch.randint(0, 100, (2, 12))
    base = tiny_gpt2(vocab_size=100)
    with torch.no_grad():
        expected = base(ids).logits
    model = attach_lora(tiny_gpt2(vocab_size=100), LoraArguments(lora_r=4, target_modules="attention+mlp"))
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(ids).logits, expected)  # B = 0 at init
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
        adapted = model(ids).logits
    assert not torch.allclose(adapted, expected, atol=1e-3)
    model.save_pretrained(tmp_path)
    merged = load_adapter(tiny_gpt2(vocab_size=100), tmp_path, merge=True)
    unmerged = load_adapter(tiny_gpt2(vocab_size=100), tmp_path, merge=False)
    with torch.no_grad():
        assert torch.allclose(merged(ids).logits, adapted, atol=1e-5)
        assert torch.allclose(unmerged(ids).logits, adapted, atol=1e-6)


def test_adapter_for_another_model_is_rejected(tmp_path):
    attach_lora(tiny_gpt2(vocab_size=100), LoraArguments(lora_r=4)).save_pretrained(tmp_path)
    with pytest.raises(ModelSetupError, match="does not fit this llama model|does not match this llama"):
        load_adapter(tiny_llama(vocab_size=100), tmp_path)


def test_adapter_whose_file_lacks_some_lora_weights_is_rejected(tmp_path):
    """PEFT loads an incomplete adapter file without a word, leaving the missing layers at B = 0."""
    from safetensors.torch import load_file, save_file

    attach_lora(tiny_gpt2(vocab_size=100), LoraArguments(lora_r=4)).save_pretrained(tmp_path)
    assert load_adapter(tiny_gpt2(vocab_size=100), tmp_path) is not None  # the complete file loads
    weights = load_file(str(tmp_path / "adapter_model.safetensors"))
    dropped = sorted(k for k in weights if ".h.1.attn.c_proj." in k)
    assert len(dropped) == 2  # lora_A and lora_B of one layer
    save_file({k: v for k, v in weights.items() if k not in dropped}, str(tmp_path / "adapter_model.safetensors"))
    with pytest.raises(ModelSetupError, match=r"lacks 2 of the LoRA weights its config targets \(first: "
                                              + dropped[0].replace(".", r"\.")):
        load_adapter(tiny_gpt2(vocab_size=100), tmp_path)


def _no_hub(monkeypatch, answer=None):
    """The hub as `hub_status` sees it: None unreachable, False no such repo; records what was asked."""
    asked = []
    monkeypatch.setattr("loraqa.model.loading.hub_status",
                        lambda repo_id, repo_type="model": asked.append(repo_id) or answer)
    return asked


def test_unloadable_model_names_itself_and_the_aliases(monkeypatch, tmp_path):
    asked = _no_hub(monkeypatch, None)
    with pytest.raises(ModelSetupError, match=r"^model 'smolm2-135m': no such directory, alias or hub model \(the hub "
                                              r"is unreachable\), did you mean smollm2-135m\?; aliases: gpt2 .*"
                                              r"smollm2-135m \(`loraqa fetch smollm2-135m`\)$"):
        resolve_model("smolm2-135m", tmp_path)  # an empty cache: the alias is not fetched there
    _no_hub(monkeypatch, False)
    with pytest.raises(ModelSetupError, match=r"^model 'runs/r16': no such directory, alias or hub model; "
                                              r"aliases: gpt2 \(the hub's GPT-2, else smollm2-135m\), "
                                              r"smollm2-135m \(fetched in "):
        resolve_model("runs/r16", CACHE)
    assert asked == ["smolm2-135m"]


def test_gpt2_falls_back_after_one_quick_hub_request(monkeypatch):
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HTTPError

    from loraqa.data.assets import GPT2_HUB_ID, HUB_TIMEOUT_S, hub_status

    calls = []

    def unreachable(self, repo_id, **kwargs):
        calls.append((repo_id, kwargs))
        raise HTTPError("[Errno -2] Name or service not known")

    monkeypatch.setattr(HfApi, "repo_info", unreachable)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", False)  # HF_HUB_OFFLINE=1 would skip the request
    hub_status.cache_clear()
    try:
        assert resolve_model("gpt2", CACHE) == str(CACHE / "smollm2-135m")
        assert resolve_model("gpt2", CACHE) == str(CACHE / "smollm2-135m")
    finally:
        hub_status.cache_clear()
    assert calls == [(GPT2_HUB_ID, {"repo_type": "model", "timeout": HUB_TIMEOUT_S})]  # once, no retries
    _no_hub(monkeypatch, True)
    assert resolve_model("gpt2", CACHE) == GPT2_HUB_ID


def test_offline_mode_asks_the_hub_nothing(monkeypatch):
    from huggingface_hub import HfApi

    from loraqa.data.assets import hub_status

    monkeypatch.setattr(HfApi, "repo_info", lambda *a, **k: pytest.fail("the hub was asked in offline mode"))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    hub_status.cache_clear()
    try:
        assert hub_status("openai-community/gpt2") is None
    finally:
        hub_status.cache_clear()
