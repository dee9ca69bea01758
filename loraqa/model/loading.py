"""Model names -> loaded causal LMs and tokenizers, for training and for inference.

`load_model_and_tokenizer` resolves aliases (`gpt2`, `smollm2-135m`), hub ids and local folders;
`inference_placement` picks device and dtype; `load_adapter` puts a trained LoRA adapter on its base model.
"""

from __future__ import annotations

import difflib
import logging
import os
from pathlib import Path

import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

from ..data.assets import GPT2_HUB_ID, MODEL_ALIASES, fetch, hub_status

logger = logging.getLogger(__name__)


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
    unloaded = _unloaded_lora_weights(peft_model, adapter_dir)
    if unloaded:  # PEFT leaves them at their initialisation (B = 0): those layers would silently not adapt
        raise ModelSetupError(f"{adapter_dir}: adapter_model.safetensors lacks {len(unloaded)} of the LoRA weights "
                              f"its config targets (first: {unloaded[0]}); the file is incomplete or not this adapter's")
    peft_model.eval()
    return peft_model.merge_and_unload() if merge else peft_model


def _missing_lora_keys(peft_model: PeftModel) -> bool:
    return not any("lora_" in name for name, _ in peft_model.named_parameters())


def _unloaded_lora_weights(peft_model: PeftModel, adapter_dir: str | os.PathLike) -> list[str]:
    """The LoRA weights the model expects that the adapter file does not hold (PEFT loads the rest without a word).
    Saved keys are the parameters' names without the adapter's name: `...q_proj.lora_A.default.weight` is saved
    as `...q_proj.lora_A.weight`."""
    from safetensors import safe_open

    path = Path(adapter_dir) / "adapter_model.safetensors"
    if not path.exists():
        return []
    with safe_open(str(path), "pt") as f:
        saved = set(f.keys())
    name = peft_model.active_adapter
    expected = {n.replace(f".{name}.", ".") for n, _ in peft_model.named_parameters() if "lora_" in n}
    return sorted(expected - saved)

