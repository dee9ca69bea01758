"""Model names -> loaded causal LMs and tokenizers; LoRA attached through PEFT with architecture-aware presets.

`load_model_and_tokenizer` resolves aliases (`gpt2`, `smollm2-135m`), hub ids and local folders.
`attach_lora` turns a `target_modules` preset into full-path module suffixes, so `attn.c_proj` never
silently also matches GPT-2's `mlp.c_proj` (PEFT matches bare names as suffixes), sets `fan_in_fan_out`
for GPT-2's Conv1D layers, checks the rank against every targeted layer and freezes everything else.
"""
from __future__ import annotations

import difflib
import logging
import os
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.pytorch_utils import Conv1D

from .assets import GPT2_HUB_ID, MODEL_ALIASES, fetch, hub_status
from .config import LoraArguments

logger = logging.getLogger(__name__)

# model_type -> preset -> module path suffixes. Other architectures can always name modules explicitly.
_ATTENTION = {"gpt2": ["attn.c_attn", "attn.c_proj"]}
_MLP = {"gpt2": ["mlp.c_fc", "mlp.c_proj"]}
_LLAMA_ATTENTION = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"]
_LLAMA_MLP = ["mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]
PRESETS = ("attention", "attention+mlp", "all-linear")


class ModelSetupError(ValueError):
    """A model, adapter or LoRA setting that cannot be used; the message says why."""


def load_tokenizer(name_or_path: str):
    """AutoTokenizer with a pad token (EOS when the model has none: safe, labels are padded by position)."""
    tokenizer = AutoTokenizer.from_pretrained(name_or_path)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def resolve_model(name: str, cache_dir: str | os.PathLike) -> str:
    """A loadable path or hub id for `name`: a local directory, an alias or a hub model (a hub model already
    in the local cache loads from there when the hub is unreachable). 'gpt2' falls back, loudly, to the
    fetched smollm2-135m when the hub is unreachable. Anything else is a one-line ModelSetupError that names
    it and lists the aliases, after one quick hub request instead of transformers' retries."""
    if Path(name).exists():
        return name
    if name == "smollm2-135m":
        return str(fetch("smollm2-135m", cache_dir))
    repo_id = GPT2_HUB_ID if name == "gpt2" else name
    found = hub_status(repo_id)
    if found:
        return repo_id
    if found is None and (snapshot := _cached_snapshot(repo_id)):
        return snapshot
    if name == "gpt2" and found is None:
        logger.warning("=" * 78 + "\nGPT-2 cannot be loaded from the hub (offline?): FALLING BACK to the "
                       "fetched SmolLM2-135M-Instruct (same size).\nResult files record the model "
                       "actually used.\n" + "=" * 78)
        return str(fetch("smollm2-135m", cache_dir))
    close = difflib.get_close_matches(name, MODEL_ALIASES, n=1)
    fetched = (Path(cache_dir) / "smollm2-135m" / "config.json").exists()
    raise ModelSetupError(
        f"model {name!r}: no such directory, alias or hub model"
        + (" (the hub is unreachable)" if found is None else "") + (f", did you mean {close[0]}?" if close else "")
        + "; aliases: gpt2 (the hub's GPT-2, else smollm2-135m), "
        + (f"smollm2-135m (fetched in {cache_dir})" if fetched else "smollm2-135m (`loraqa fetch smollm2-135m`)"))


def _cached_snapshot(repo_id: str) -> str | None:
    """The local folder of a hub model already in the Hugging Face cache, if any."""
    from huggingface_hub import try_to_load_from_cache
    from huggingface_hub.errors import HFValidationError

    try:
        config = try_to_load_from_cache(repo_id, "config.json")
    except HFValidationError:
        return None
    return str(Path(config).parent) if isinstance(config, str) else None


def load_model_and_tokenizer(name: str, cache_dir: str | os.PathLike, dtype: torch.dtype = torch.float32):
    """(model, tokenizer, resolved name). fp32 by default: bf16 autocast is ~15x slower on AVX2-only CPUs."""
    resolved = resolve_model(name, cache_dir)
    tokenizer = load_tokenizer(resolved)
    model = AutoModelForCausalLM.from_pretrained(resolved, dtype=dtype)
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer, resolved


INFERENCE_DTYPES = ("auto", "float32", "bfloat16", "float16")


def native_bf16(device: torch.device) -> bool:
    """Whether `device` multiplies bf16 matrices natively: CUDA with bf16 support, or a CPU with AMX or
    AVX512-BF16 (other CPUs emulate bf16; bf16 autocast was ~15x slower than fp32 on an AVX2-only one)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    probes = ("_is_amx_tile_supported", "_is_avx512_bf16_supported")  # torch's own CPU feature checks
    return device.type == "cpu" and any(getattr(torch.cpu, probe, lambda: False)() for probe in probes)


def inference_placement(device: str = "auto", dtype: str = "auto") -> tuple[torch.device, torch.dtype]:
    """Device and weight dtype for inference. auto: CUDA when there is one, else the CPU; bfloat16 on a CUDA
    device that supports it, float32 elsewhere. On a CPU, auto keeps float32 even where bf16 is native (about
    twice as fast here, see README): bf16 changes some greedy answers, and CPU results stay exact."""
    if dtype not in INFERENCE_DTYPES:
        raise ModelSetupError(f"dtype {dtype!r}: must be one of {', '.join(INFERENCE_DTYPES)}")
    try:
        place = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device)
    except RuntimeError as error:
        raise ModelSetupError(f"device {device!r}: {error}") from None
    if place.type == "cuda" and not torch.cuda.is_available():
        raise ModelSetupError(f"device {device!r}: CUDA is not available on this machine")
    if dtype == "auto":
        return place, torch.bfloat16 if place.type == "cuda" and native_bf16(place) else torch.float32
    return place, getattr(torch, dtype)


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
        attention = _ATTENTION.get(model_type, _LLAMA_ATTENTION)
        targets = attention + (_MLP.get(model_type, _LLAMA_MLP) if spec == "attention+mlp" else [])
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


def load_adapter(model: torch.nn.Module, adapter_dir: str | os.PathLike, *, merge: bool = True) -> torch.nn.Module:
    """Load a trained adapter onto its base model; merged by default (fastest inference, same logits)."""
    from peft import PeftConfig

    config = PeftConfig.from_pretrained(str(adapter_dir))
    try:
        peft_model = PeftModel.from_pretrained(model, str(adapter_dir))
    except (RuntimeError, ValueError, KeyError) as err:
        raise ModelSetupError(
            f"{adapter_dir}: adapter (trained on {config.base_model_name_or_path}) does not fit this "
            f"{model.config.model_type} model: {str(err).splitlines()[0][:300]}") from None
    if _missing_lora_keys(peft_model):
        raise ModelSetupError(f"{adapter_dir}: adapter (trained on {config.base_model_name_or_path}) does not "
                              f"match this {model.config.model_type} model's layers")
    peft_model.eval()
    return peft_model.merge_and_unload() if merge else peft_model


def _missing_lora_keys(peft_model: PeftModel) -> bool:
    return not any("lora_" in name for name, _ in peft_model.named_parameters())


def count_parameters(model: torch.nn.Module) -> dict[str, int | float]:
    """Trainable and total parameter counts (tied weights once) and the reduction factor total/trainable."""
    seen, total, trainable = set(), 0, 0
    for parameter in model.parameters():
        if id(parameter) in seen:
            continue
        seen.add(id(parameter))
        total += parameter.numel()
        trainable += parameter.numel() if parameter.requires_grad else 0
    return {"trainable_params": trainable, "total_params": total,
            "reduction_factor": round(total / trainable, 1) if trainable else float("inf")}
