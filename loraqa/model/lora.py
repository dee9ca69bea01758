"""LoRA on a loaded model through PEFT, with architecture-aware presets.

`attach_lora` turns a `target_modules` preset into full-path module suffixes, so `attn.c_proj` never
silently also matches GPT-2's `mlp.c_proj` (PEFT matches bare names as suffixes), sets `fan_in_fan_out`
for GPT-2's Conv1D layers, checks the rank against every targeted layer and freezes everything else.
"""

from __future__ import annotations

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers.pytorch_utils import Conv1D

from ..config import LoraArguments
from .loading import ModelSetupError

# model_type -> preset -> module path suffixes. Other architectures can always name modules explicitly.
_ATTENTION = {"gpt2": ["attn.c_attn", "attn.c_proj"]}
_MLP = {"gpt2": ["mlp.c_fc", "mlp.c_proj"]}
_LLAMA_ATTENTION = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"]
_LLAMA_MLP = ["mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]
PRESETS = ("attention", "attention+mlp", "all-linear")


def preset_targets(model_type: str, preset: str) -> list[str]:
    """The module suffixes the attention / attention+mlp presets name for a model type (Llama's by default):
    gpt2, attention -> ['attn.c_attn', 'attn.c_proj']."""
    attention = _ATTENTION.get(model_type, _LLAMA_ATTENTION)
    return attention + (_MLP.get(model_type, _LLAMA_MLP) if preset == "attention+mlp" else [])


def linear_layer_names(model: torch.nn.Module) -> list[str]:
    """Distinct two-level names (`attn.c_attn`, `self_attn.q_proj`) of the model's Linear/Conv1D layers."""
    names = []
    for path, module in model.named_modules():
        if isinstance(module, (torch.nn.Linear, Conv1D)):
            short = ".".join(path.split(".")[-2:])
            if short not in names:
                names.append(short)
    return names


def resolve_target_modules(model: torch.nn.Module, target_modules: str) -> list[str] | str:
    """Preset or comma-separated names -> the list handed to PEFT, checked against the model's layers."""
    model_type = model.config.model_type
    spec = target_modules.strip()
    if spec == "all-linear":
        return "all-linear"
    if spec in ("attention", "attention+mlp"):
        targets = preset_targets(model_type, spec)
    else:
        targets = [t.strip() for t in spec.split(",") if t.strip()]
    module_paths = [p for p, m in model.named_modules() if isinstance(m, (torch.nn.Linear, Conv1D))]
    for target in targets:
        if not any(p == target or p.endswith("." + target) for p in module_paths):
            raise ModelSetupError(
                f"target_modules: {target!r} matches no linear layer of this {model_type} model; its linear "
                f"layers are {', '.join(linear_layer_names(model))} (presets: {', '.join(PRESETS)})")
    return targets


def _targeted(model: torch.nn.Module, targets: list[str] | str) -> list[tuple[str, torch.nn.Module]]:
    output = model.get_output_embeddings()
    layers = [(p, m) for p, m in model.named_modules() if isinstance(m, (torch.nn.Linear, Conv1D)) and m is not output]
    if targets == "all-linear":
        return layers
    return [(p, m) for p, m in layers if any(p == t or p.endswith("." + t) for t in targets)]


def attach_lora(model: torch.nn.Module, settings: LoraArguments) -> PeftModel:
    """Wrap `model` with LoRA adapters per `settings`; only LoRA weights require grad afterwards.

    Scaling is PEFT's: lora_alpha / r (lora_alpha / sqrt(r) with use_rslora). B starts at zero, so the
    adapted model equals the base model at step 0.
    """
    targets = resolve_target_modules(model, settings.target_modules)
    layers = _targeted(model, targets)
    for path, module in layers:
        width = min(module.weight.shape)
        if settings.lora_r > width:
            raise ModelSetupError(f"lora_r={settings.lora_r} exceeds the width {width} of layer {path}")
    config = LoraConfig(
        r=settings.lora_r, lora_alpha=settings.lora_alpha, lora_dropout=settings.lora_dropout,
        target_modules=targets, use_rslora=settings.use_rslora, task_type="CAUSAL_LM",
        fan_in_fan_out=any(isinstance(m, Conv1D) for _, m in layers), bias="none")
    return get_peft_model(model, config)


def count_parameters(model: torch.nn.Module) -> dict[str, int | float]:
    """Trainable and total parameter counts (tied weights once) and the reduction factor rho = P / P_trainable,
    P the base model's own parameters (everything but the adapters), as `lora_math.reduction_factor` defines it."""
    seen, total, trainable, adapters = set(), 0, 0, 0
    for name, parameter in model.named_parameters(remove_duplicate=False):
        if id(parameter) in seen:
            continue
        seen.add(id(parameter))
        total += parameter.numel()
        trainable += parameter.numel() if parameter.requires_grad else 0
        adapters += parameter.numel() if "lora_" in name else 0
    return {"trainable_params": trainable, "total_params": total,
            "reduction_factor": round((total - adapters) / trainable, 1) if trainable else float("inf")}

