"""The report's theory, checked: the hand-written LoRA backward equals autograd and PEFT's lora.Linear
(nn.Linear and GPT-2's Conv1D layout), and the closed-form counts equal PEFT's on the real configs."""
from __future__ import annotations

import copy
import doctest
import os
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM
from transformers.pytorch_utils import Conv1D

from loraqa.measure import lora_math
from loraqa.config import LoraArguments, default_cache_dir
from loraqa.measure.lora_math import (LoraLinear, base_parameters, full_layer_costs, lora_layer_costs,
                                      lora_trainable_parameters, step_costs)
from loraqa.model.lora import PRESETS, attach_lora, count_parameters

SMOLLM2 = Path(os.environ.get("LORAQA_CACHE", default_cache_dir())).resolve() / "smollm2-135m"  # its config.json
N, D_IN, D_OUT, R, ALPHA = 5, 7, 6, 3, 6


class Tiny(torch.nn.Module):
    def __init__(self, layer: torch.nn.Module):
        super().__init__()
        self.proj = layer

    def forward(self, x):
        return self.proj(x)


def peft_layer(conv1d: bool, dropout: float = 0.0, use_rslora: bool = False):
    """PEFT's lora.Linear around a float64 nn.Linear (W stored (d_out, d_in)) or Conv1D (stored (d_in, d_out)),
    with a random non-zero B."""
    torch.manual_seed(0)
    base = Conv1D(D_OUT, D_IN) if conv1d else torch.nn.Linear(D_IN, D_OUT)
    torch.nn.init.normal_(base.weight)
    torch.nn.init.normal_(base.bias)
    config = LoraConfig(r=R, lora_alpha=ALPHA, lora_dropout=dropout, target_modules=["proj"],
                        fan_in_fan_out=conv1d, use_rslora=use_rslora)
    model = get_peft_model(Tiny(base.double()), config)
    layer = model.base_model.model.proj
    torch.nn.init.normal_(layer.lora_B["default"].weight)
    return model, layer


def ours(layer, conv1d: bool, use_rslora: bool = False, **kw) -> LoraLinear:
    base = layer.base_layer
    return LoraLinear(base.weight.detach(), base.bias.detach(), lora_A=layer.lora_A["default"].weight.detach(),
                      lora_B=layer.lora_B["default"].weight.detach(), lora_alpha=ALPHA, fan_in_fan_out=conv1d,
                      use_rslora=use_rslora, **kw)


def run_autograd(model, layer, X, G):
    """Forward, then <H, G> backward: dL/dH = G. Returns H, dL/dA, dL/dB, dL/dX."""
    X = X.clone().requires_grad_(True)
    H = model(X)
    (H * G).sum().backward()
    return H.detach(), layer.lora_A["default"].weight.grad, layer.lora_B["default"].weight.grad, X.grad


def batch():
    generator = torch.Generator().manual_seed(1)
    return (torch.randn(N, D_IN, dtype=torch.float64, generator=generator),
            torch.randn(N, D_OUT, dtype=torch.float64, generator=generator))


@pytest.mark.parametrize("conv1d", [False, True], ids=["linear", "conv1d"])
@pytest.mark.parametrize("use_rslora", [False, True], ids=["alpha_over_r", "rslora"])
def test_backward_equals_autograd_and_peft(conv1d, use_rslora):
    model, layer = peft_layer(conv1d, use_rslora=use_rslora)
    X, G = batch()
    H, grad_A, grad_B, grad_X = run_autograd(model, layer, X, G)
    mine = ours(layer, conv1d, use_rslora=use_rslora)
    torch.testing.assert_close(mine.forward(X), H, rtol=0, atol=1e-10)
    grads = mine.backward(G)
    torch.testing.assert_close(grads.lora_A, grad_A, rtol=0, atol=1e-10)
    torch.testing.assert_close(grads.lora_B, grad_B, rtol=0, atol=1e-10)
    torch.testing.assert_close(grads.input, grad_X, rtol=0, atol=1e-10)
    # W and b are frozen: autograd leaves them without a gradient, as the derivation never forms G^T X.
    assert layer.base_layer.weight.grad is None and layer.base_layer.bias.grad is None
    assert not hasattr(grads, "weight")


def test_lora_gradients_are_projections_of_the_full_gradient():
    """Without dropout dL/dB = s (G^T X) A^T and dL/dA = s B^T (G^T X): what full fine-tuning would give W."""
    model, layer = peft_layer(conv1d=False)
    X, G = batch()
    mine = ours(layer, False)
    mine.forward(X)
    grads, full = mine.backward(G), G.T @ X  # full: (d_out, d_in)
    torch.testing.assert_close(grads.lora_B, mine.s * full @ mine.A.T, rtol=0, atol=1e-10)
    torch.testing.assert_close(grads.lora_A, mine.s * mine.B.T @ full, rtol=0, atol=1e-10)


@pytest.mark.parametrize("conv1d", [False, True], ids=["linear", "conv1d"])
def test_dropout_masks_only_the_lora_path(conv1d):
    model, layer = peft_layer(conv1d, dropout=0.5)
    X, G = batch()
    mine = ours(layer, conv1d, lora_dropout=0.5)
    mask = mine.dropout_mask(X.shape, torch.Generator().manual_seed(2))
    assert set(mask.unique().tolist()) == {0.0, 2.0}

    class FixedMask(torch.nn.Module):
        def forward(self, x):
            return mask * x

    layer.lora_dropout["default"] = FixedMask()  # PEFT applies lora_dropout to the LoRA input only
    H, grad_A, grad_B, grad_X = run_autograd(model, layer, X, G)
    torch.testing.assert_close(mine.forward(X, mask=mask), H, rtol=0, atol=1e-10)
    grads = mine.backward(G)
    torch.testing.assert_close(grads.lora_A, grad_A, rtol=0, atol=1e-10)
    torch.testing.assert_close(grads.lora_B, grad_B, rtol=0, atol=1e-10)
    torch.testing.assert_close(grads.input, grad_X, rtol=0, atol=1e-10)
    # The mask matters: without it, the LoRA gradients differ.
    plain = ours(layer, conv1d)
    plain.forward(X)
    assert not torch.allclose(plain.backward(G).lora_A, grad_A)


@pytest.mark.parametrize("conv1d", [False, True], ids=["linear", "conv1d"])
def test_at_initialisation_A_gets_no_gradient_and_B_does(conv1d):
    torch.manual_seed(0)
    base = Conv1D(D_OUT, D_IN) if conv1d else torch.nn.Linear(D_IN, D_OUT)
    model = get_peft_model(Tiny(base.double()), LoraConfig(r=R, lora_alpha=ALPHA, target_modules=["proj"],
                                                           fan_in_fan_out=conv1d))
    layer = model.base_model.model.proj
    assert torch.count_nonzero(layer.lora_B["default"].weight) == 0  # PEFT's initialisation: B = 0, A random
    X, G = batch()
    H, grad_A, grad_B, grad_X = run_autograd(model, layer, X, G)
    mine = ours(layer, conv1d)
    torch.testing.assert_close(mine.forward(X), X @ mine.W.T + layer.base_layer.bias.detach(), rtol=0, atol=0)
    grads = mine.backward(G)
    assert torch.count_nonzero(grads.lora_A) == 0 and torch.count_nonzero(grad_A) == 0  # exactly zero
    assert torch.count_nonzero(grads.lora_B) == grads.lora_B.numel()
    torch.testing.assert_close(grads.lora_B, grad_B, rtol=0, atol=1e-10)
    torch.testing.assert_close(grads.input, G @ mine.W, rtol=0, atol=0)  # the LoRA path adds exactly 0


def test_docstring_examples():
    assert doctest.testmod(lora_math, raise_on_error=True).attempted >= 1


# ----------------------------------------------------------------------------------------------------
# Parameter counts: closed form against PEFT, on the real configurations (meta tensors: no memory, fast)


@pytest.fixture(scope="module")
def base_models():
    with torch.device("meta"):
        return {"gpt2": GPT2LMHeadModel(GPT2Config()),
                "smollm2": LlamaForCausalLM(LlamaConfig.from_pretrained(str(SMOLLM2)))}


def test_base_parameters_closed_form(base_models):
    assert base_parameters(base_models["gpt2"].config) == count_parameters(base_models["gpt2"])["total_params"] == 124_439_808
    assert base_parameters(base_models["smollm2"].config) == count_parameters(base_models["smollm2"])["total_params"] == 134_515_008


@pytest.mark.parametrize("r", [4, 8, 16, 32])
@pytest.mark.parametrize("preset", PRESETS)
@pytest.mark.parametrize("name", ["gpt2", "smollm2"])
def test_trainable_parameters_equal_peft_count(base_models, name, preset, r):
    model = attach_lora(copy.deepcopy(base_models[name]), LoraArguments(lora_r=r, target_modules=preset))
    trainable, total = model.get_nb_trainable_parameters()
    closed = lora_trainable_parameters(model.config, preset, r)
    assert (closed["trainable_params"], closed["total_params"]) == (trainable, total)
    counted = count_parameters(model)
    assert (closed["trainable_params"], closed["total_params"]) == (counted["trainable_params"], counted["total_params"])
    # rho = P / P_LoRA (base per trainable), the usual factor, in the closed form and in the training log's count
    assert closed["reduction_factor"] == counted["reduction_factor"] == round(closed["base_params"] / trainable, 1)
    assert closed["total_params"] / trainable == pytest.approx(closed["base_params"] / trainable + 1)


def test_known_counts():
    gpt2 = lora_trainable_parameters(GPT2Config(), "attention", 16)
    assert gpt2["trainable_params"] == 12 * 16 * (768 + 2304 + 768 + 768) == 884_736
    smollm2 = lora_trainable_parameters(LlamaConfig.from_pretrained(str(SMOLLM2)), "attention", 16)
    # q/o 576 -> 576; k/v 576 -> 3 KV heads x 64 = 192 (grouped-query attention); the main run's count
    assert smollm2["trainable_params"] == 30 * 16 * (2 * (576 + 576) + 2 * (576 + 192)) == 1_843_200
    assert smollm2["reduction_factor"] == round(134_515_008 / 1_843_200, 1) == 73.0
    assert gpt2["reduction_factor"] == round(124_439_808 / 884_736, 1) == 140.7


# ----------------------------------------------------------------------------------------------------
# Costs


def test_layer_costs():
    full, lora = full_layer_costs(100, 768, 2304), lora_layer_costs(100, 768, 2304, 16)
    assert full["forward_flops"] == full["input_grad_flops"] == full["weight_grad_flops"] == 2 * 100 * 768 * 2304
    assert lora["weight_grad_flops"] == 2 * 100 * 16 * (768 + 2304)
    assert full["optimizer_state_bytes"] / lora["optimizer_state_bytes"] == 768 * 2304 / (16 * (768 + 2304))
    for costs in (full, lora):
        assert costs["step_flops"] == costs["forward_flops"] + costs["input_grad_flops"] + costs["weight_grad_flops"]
    frozen = lora_layer_costs(100, 768, 2304, 0)
    assert frozen["weight_grad_flops"] == frozen["optimizer_state_bytes"] == frozen["activation_bytes"] == 0


def test_step_costs_use_the_counts():
    config = GPT2Config()
    costs = step_costs(config, "attention", 16, tokens=512)
    counts = lora_trainable_parameters(config, "attention", 16)
    assert costs["lora"]["optimizer_state_bytes"] == 8 * counts["trainable_params"]
    assert costs["full"]["optimizer_state_bytes"] == 8 * counts["base_params"]
    # Unadapted MLP layers: forward and input gradient only; full fine-tuning pays 3x their forward.
    mlp = 2 * 512 * 2 * 768 * 3072 * 12
    assert costs["full"]["weight_grad_flops"] - costs["lora"]["weight_grad_flops"] > mlp
