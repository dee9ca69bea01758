"""The theory of the report, in code: a LoRA linear layer with its backward pass written out by hand,
trainable-parameter counts in closed form, and the per-layer cost of LoRA against full fine-tuning.

Inputs: tensors (the layer), a transformers config and a `target_modules` preset (the counts), token and
layer sizes (the costs). Outputs: tensors, integers and dicts of numbers that the report prints. The
symbols are the report's (report/sections/theory.typ), and tests/test_lora_math.py checks every formula
against autograd, PEFT's `lora.Linear` and PEFT's own parameter count:

    X  (N, d_in)        a batch of N token vectors, one per row
    W  (d_out, d_in)    frozen weight; GPT-2's Conv1D stores W^T, (d_in, d_out) (fan_in_fan_out)
    b  (d_out,)         frozen bias (or none)
    A  (r, d_in)        LoRA down-projection, PEFT's lora_A.weight (random at initialisation)
    B  (d_out, r)       LoRA up-projection, PEFT's lora_B.weight (zero at initialisation)
    s = alpha / r       scaling (alpha / sqrt(r) with rsLoRA)
    M  (N, d_in)        inverted-dropout mask, entries 0 or 1/(1-p); X~ = M * X
    U = X~ A^T  (N, r)  the low-rank code
    H = X W^T + 1 b^T + s U B^T  (N, d_out)
    G = dL/dH   (N, d_out)
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..model.lora import PRESETS, preset_targets

# ----------------------------------------------------------------------------------------------------
# (1) The layer: forward and a hand-written backward (report eqs. lora-forward .. lora-grad-x)


@dataclass
class LoraGradients:
    """dL/dA, dL/dB and dL/dX. There is no dL/dW or dL/db: W and b are frozen, so the backward pass
    never forms G^T X (a d_out x d_in product) and the optimizer keeps no state for them."""

    lora_A: torch.Tensor  # (r, d_in)
    lora_B: torch.Tensor  # (d_out, r)
    input: torch.Tensor  # (N, d_in)


class LoraLinear:
    """h = W x + b + s B A dropout(x), for a batch X of N rows; `backward(G)` is the derivation, no autograd.

    >>> layer = LoraLinear(torch.eye(2), None, lora_A=torch.ones(1, 2), lora_B=torch.zeros(2, 1), lora_alpha=1)
    >>> layer.forward(torch.tensor([[1.0, 2.0]]))                      # B = 0: the base layer alone
    tensor([[1., 2.]])
    >>> grads = layer.backward(torch.tensor([[1.0, 0.0]]))
    >>> grads.lora_A, grads.lora_B.T                                   # dL/dA = 0 exactly at B = 0
    (tensor([[0., 0.]]), tensor([[3., 0.]]))
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, *, lora_A: torch.Tensor,
                 lora_B: torch.Tensor, lora_alpha: float, lora_dropout: float = 0.0,
                 fan_in_fan_out: bool = False, use_rslora: bool = False):
        self.W = weight.T if fan_in_fan_out else weight  # (d_out, d_in) whichever way it is stored
        self.b, self.A, self.B, self.p = bias, lora_A, lora_B, lora_dropout
        r = lora_A.shape[0]
        self.s = lora_alpha / (r ** 0.5 if use_rslora else r)
        if self.A.shape[1] != self.W.shape[1] or self.B.shape != (self.W.shape[0], r):
            raise ValueError(f"shapes W {tuple(self.W.shape)}, A {tuple(self.A.shape)}, B {tuple(self.B.shape)} "
                             f"do not fit: need A (r, d_in) and B (d_out, r)")

    def dropout_mask(self, shape: torch.Size, generator: torch.Generator | None = None) -> torch.Tensor:
        """M: each entry 0 with probability p, else 1/(1-p) (inverted dropout, as nn.Dropout in training)."""
        keep = torch.rand(shape, generator=generator, dtype=self.A.dtype) >= self.p  # (N, d_in)
        return keep.to(self.A.dtype) / (1.0 - self.p)

    def forward(self, X: torch.Tensor, *, mask: torch.Tensor | None = None,
                generator: torch.Generator | None = None) -> torch.Tensor:
        """H = X W^T + 1 b^T + s (M * X) A^T B^T; keeps X, M and U for the backward pass."""
        if mask is None:
            mask = self.dropout_mask(X.shape, generator) if self.p > 0 else torch.ones_like(X)
        self.X, self.M = X, mask  # (N, d_in)
        self.X_tilde = mask * X  # (N, d_in)
        self.U = self.X_tilde @ self.A.T  # (N, r)
        H = X @ self.W.T + self.s * self.U @ self.B.T  # (N, d_out)
        return H if self.b is None else H + self.b

    def backward(self, grad_h: torch.Tensor) -> LoraGradients:
        """From G = dL/dH (N, d_out): dL/dB = s G^T U, G_U = s G B, dL/dA = G_U^T X~, dL/dX = G W + M * (G_U A)."""
        G = grad_h  # (N, d_out)
        grad_U = self.s * G @ self.B  # (N, r)
        return LoraGradients(
            lora_A=grad_U.T @ self.X_tilde,  # (r, d_in); exactly 0 while B = 0
            lora_B=self.s * G.T @ self.U,  # (d_out, r)
            input=G @ self.W + self.M * (grad_U @ self.A),  # (N, d_in); the LoRA path goes through the mask
        )


# ----------------------------------------------------------------------------------------------------
# (2) Parameter counts in closed form


def _llama_dims(config) -> tuple[int, int, int, int]:
    d = config.hidden_size
    head_dim = getattr(config, "head_dim", None) or d // config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    return d, config.num_attention_heads * head_dim, kv_heads * head_dim, config.intermediate_size


def block_linear_shapes(config) -> dict[str, tuple[int, int]]:
    """(d_in, d_out) of every linear layer of one transformer block, by the names the presets use.

    GPT2Config() -> {'attn.c_attn': (768, 2304), 'attn.c_proj': (768, 768), 'mlp.c_fc': (768, 3072),
    'mlp.c_proj': (3072, 768)}; Llama: q/o (d, H*d_h), k/v (d, H_kv*d_h) (grouped-query attention),
    gate/up (d, d_ff), down (d_ff, d).
    """
    if config.model_type == "gpt2":
        d = config.n_embd
        inner = config.n_inner or 4 * d
        return {"attn.c_attn": (d, 3 * d), "attn.c_proj": (d, d), "mlp.c_fc": (d, inner), "mlp.c_proj": (inner, d)}
    if config.model_type == "llama":
        d, q, kv, ff = _llama_dims(config)
        return {"self_attn.q_proj": (d, q), "self_attn.k_proj": (d, kv), "self_attn.v_proj": (d, kv),
                "self_attn.o_proj": (q, d), "mlp.gate_proj": (d, ff), "mlp.up_proj": (d, ff),
                "mlp.down_proj": (ff, d)}
    raise ValueError(f"model_type {config.model_type!r}: closed forms exist for gpt2 and llama")


def targeted_block_layers(config, preset: str) -> list[str]:
    """The block layers a preset adapts, from `model.lora.preset_targets`. all-linear takes every linear
    layer except the LM head, which for GPT-2 and Llama are exactly the block layers (= attention+mlp)."""
    if preset not in PRESETS:
        raise ValueError(f"preset {preset!r}: must be one of {', '.join(PRESETS)}")
    if preset == "all-linear":
        return list(block_linear_shapes(config))
    return preset_targets(config.model_type, preset)


def base_parameters(config) -> int:
    """P: every parameter of the base model, tied input/output embeddings counted once.

    GPT-2: V d + n_pos d + L (d*3d + 3d + d*d + d + d*d_ff + d_ff + d_ff*d + d + 4d) + 2d;
    Llama: V d + L (d (2 q + 2 kv) + 3 d d_ff + 2d) + d (+ biases, + V d when untied).
    """
    tied = getattr(config, "tie_word_embeddings", True)
    if config.model_type == "gpt2":
        d, V = config.n_embd, config.vocab_size
        weights = sum(d_in * d_out + d_out for d_in, d_out in block_linear_shapes(config).values())
        return V * d + config.n_positions * d + config.n_layer * (weights + 4 * d) + 2 * d + (0 if tied else V * d)
    d, q, kv, ff = _llama_dims(config)
    V = config.vocab_size
    attention = d * q + 2 * d * kv + q * d + (q + 2 * kv + d if config.attention_bias else 0)
    mlp = 3 * d * ff + (2 * ff + d if getattr(config, "mlp_bias", False) else 0)
    return V * d + config.num_hidden_layers * (attention + mlp + 2 * d) + d + (0 if tied else V * d)


def reduction_factor(base_params: int, trainable_params: int) -> float:
    """rho = P / P_LoRA: how many times fewer parameters LoRA trains than full fine-tuning (rounded to 0.1).

    >>> reduction_factor(134_515_008, 4_884_480)
    27.5
    """
    return round(base_params / trainable_params, 1)


def lora_trainable_parameters(config, preset: str, r: int) -> dict[str, int | float]:
    """Closed-form counts for LoRA of rank r on `preset`: r (d_in + d_out) per adapted layer, times L.

    trainable_params and total_params (P plus the adapters) as loraqa.model.lora.count_parameters counts
    them from a model; base_params (P, what full fine-tuning trains); per_layer (one block); and the report's
    reduction_factor rho = P / P_LoRA, base parameters per trainable adapter parameter (rounded to 0.1), the
    usual definition: the training log's total / trainable is rho + 1.
    GPT2Config(), 'attention', 16 -> 12 * 16 * ((768 + 2304) + (768 + 768)) = 884,736 trainable.
    """
    shapes = block_linear_shapes(config)
    per_layer = sum(r * (shapes[name][0] + shapes[name][1]) for name in targeted_block_layers(config, preset))
    trainable = config.num_hidden_layers * per_layer
    base = base_parameters(config)
    return {"trainable_params": trainable, "total_params": base + trainable,
            "reduction_factor": reduction_factor(base, trainable), "base_params": base, "per_layer": per_layer}


# ----------------------------------------------------------------------------------------------------
# (3) Cost per layer and per step. FLOPs count a multiply-add as 2 and only the matrix products
# (element-wise terms are O(N (d_in + d_out)), lower order); memory is in bytes.


def full_layer_costs(tokens: int, d_in: int, d_out: int, *, bytes_per_value: int = 4) -> dict[str, int]:
    """Full fine-tuning of one linear layer for N = `tokens`: H = X W^T, dL/dX = G W, dL/dW = G^T X."""
    N, D = tokens, d_in * d_out
    return {
        "forward_flops": 2 * N * D,
        "input_grad_flops": 2 * N * D,
        "weight_grad_flops": 2 * N * D,
        "step_flops": 6 * N * D,
        "trainable_params": D,
        "weight_bytes": D * bytes_per_value,
        "grad_bytes": D * bytes_per_value,
        "optimizer_state_bytes": 2 * D * bytes_per_value,  # AdamW: first and second moments
        "activation_bytes": N * d_in * bytes_per_value,  # X, kept for dL/dW = G^T X
    }


def lora_layer_costs(tokens: int, d_in: int, d_out: int, r: int, *, dropout: bool = True,
                     bytes_per_value: int = 4) -> dict[str, int]:
    """LoRA of rank r on one frozen linear layer (r = 0: a frozen layer without adapter).

    Forward: X W^T and s (X~ A^T) B^T. Input gradient: G W and (s G B) A, G_U = s G B counted here once and
    reused by dL/dA. Weight gradient: dL/dB = s G^T U and dL/dA = G_U^T X~ only; G^T X is never formed.
    Activations: X~ for dL/dA, U for dL/dB, and the mask (1 byte a value) when dropout is on; the frozen
    product X W^T keeps nothing, its input gradient needs W only.
    """
    N, D, R = tokens, d_in * d_out, r * (d_in + d_out)
    mask_bytes = N * d_in if dropout and r else 0
    return {
        "forward_flops": 2 * N * (D + R),
        "input_grad_flops": 2 * N * (D + R),
        "weight_grad_flops": 2 * N * R,
        "step_flops": 4 * N * D + 6 * N * R,
        "trainable_params": R,
        "weight_bytes": (D + R) * bytes_per_value,
        "grad_bytes": R * bytes_per_value,
        "optimizer_state_bytes": 2 * R * bytes_per_value,
        "activation_bytes": (N * (d_in + r) * bytes_per_value + mask_bytes) if r else 0,
    }


def step_costs(config, preset: str, r: int, tokens: int, *, dropout: bool = True,
               bytes_per_value: int = 4) -> dict[str, dict[str, int | float]]:
    """One optimizer step on N = `tokens` tokens, summed over the linear layers of all L blocks.

    {'lora': ..., 'full': ..., 'ratio': full / lora per key}. FLOPs and activations cover the block linear
    layers (attention products, norms and the LM head are the same for both methods and left out; an input
    shared by several layers, as q/k/v share theirs, is counted once per layer: an upper bound);
    parameters, gradients and AdamW state cover the whole model (full fine-tuning trains all P).
    The FLOP ratio does not depend on `tokens`: every FLOP term is linear in N.
    """
    shapes, targeted = block_linear_shapes(config), set(targeted_block_layers(config, preset))
    lora = {key: 0 for key in full_layer_costs(1, 1, 1)}
    full = dict(lora)
    for name, (d_in, d_out) in shapes.items():
        for key, value in lora_layer_costs(tokens, d_in, d_out, r if name in targeted else 0, dropout=dropout,
                                           bytes_per_value=bytes_per_value).items():
            lora[key] += config.num_hidden_layers * value
        for key, value in full_layer_costs(tokens, d_in, d_out, bytes_per_value=bytes_per_value).items():
            full[key] += config.num_hidden_layers * value
    counts = lora_trainable_parameters(config, preset, r)
    for costs, trainable, stored in ((lora, counts["trainable_params"], counts["total_params"]),
                                     (full, counts["base_params"], counts["base_params"])):
        costs.update(trainable_params=trainable, weight_bytes=stored * bytes_per_value,
                     grad_bytes=trainable * bytes_per_value, optimizer_state_bytes=2 * trainable * bytes_per_value)
    return {"lora": lora, "full": full, "ratio": {key: full[key] / lora[key] for key in lora if lora[key]}}


def parameter_table(configs: dict, ranks=(4, 8, 16, 32), presets=("attention", "attention+mlp", "all-linear")) -> dict:
    """{model: {base_params, presets: {preset: {r: counts}}, step_costs_r16: {preset: ratios}}} for the report."""
    table = {}
    for name, config in configs.items():
        table[name] = {
            "base_params": base_parameters(config),
            "presets": {preset: {str(r): lora_trainable_parameters(config, preset, r) for r in ranks}
                        for preset in presets},
            "step_costs_r16": {preset: step_costs(config, preset, 16, tokens=1) for preset in presets[:2]},
        }
    return table


def parameter_counts(cache_dir: str, *, max_train_samples: int = 2000, max_length: int = 512) -> dict:
    """`loraqa param-counts`: `parameter_table` for GPT-2 (124M, from its config) and the fetched SmolLM2-135M,
    with the prompt-token share of the first `max_train_samples` training rows (SmolLM2's tokenizer)."""
    from transformers import AutoConfig, GPT2Config

    from ..data.assets import fetch, squad_file
    from ..data.squad import IGNORE_INDEX, build_train_dataset, load_squad, take_subset
    from ..model.loading import load_tokenizer

    smollm2 = fetch("smollm2-135m", cache_dir)
    table = parameter_table({"gpt2": GPT2Config(), "smollm2-135m": AutoConfig.from_pretrained(smollm2)})
    rows, _ = build_train_dataset(take_subset(load_squad(squad_file("squad", "train", cache_dir)), max_train_samples),
                                  load_tokenizer(str(smollm2)), max_length=max_length)
    prompt = sum(sum(label == IGNORE_INDEX for label in labels) for labels in rows["labels"])
    total = sum(len(labels) for labels in rows["labels"])
    table["prompt_tokens"] = {"rows": len(rows), "prompt_tokens": prompt, "all_tokens": total,
                              "prompt_share": prompt / total, "tokenizer": "smollm2-135m", "max_length": max_length}
    return table
