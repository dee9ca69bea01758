"""The training objective: causal-LM cross-entropy over answer tokens, a token mean.

Logits are computed only at positions that predict an answer token (`logits_to_keep`): the LM head over a
50k vocabulary is a quarter of the compute and the largest activation, yet only answers carry loss. With
`answer_only=False` the head runs everywhere, the usual computation, and gives the same loss.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..data.squad import IGNORE_INDEX
from ..model.attention import PARAGRAPH_ATTENTION


def answer_loss(model, batch: dict[str, torch.Tensor], *, answer_only: bool = True,
                num_items_in_batch: torch.Tensor | int | None = None) -> torch.Tensor:
    """Causal-LM cross-entropy over answer tokens, with logits computed only where they are needed.

    Returns sum(CE) / num_items_in_batch when given (token mean over an accumulated batch), else the mean.
    """
    total, count = answer_loss_sum(model, batch, answer_only=answer_only)
    return total / (num_items_in_batch if num_items_in_batch is not None else count)


def answer_loss_sum(model, batch: dict[str, torch.Tensor], *, answer_only: bool = True
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed cross-entropy over the batch's labelled tokens, their count).

    Position t predicts token t+1, so the LM head runs on the positions `keep` where some row has a label
    at t+1 (`logits_to_keep`, supported by every transformers causal LM); with `answer_only=False` it runs
    on all positions (the usual computation), giving the same loss.
    """
    labels = batch["labels"]
    targets = labels[:, 1:]  # (B, T-1)
    if answer_only:
        keep = (targets != IGNORE_INDEX).any(dim=0).nonzero().squeeze(-1)  # (K,)
    else:
        keep = torch.arange(targets.shape[1], device=labels.device)
    inputs = {k: v for k, v in batch.items() if k not in ("labels", "paragraph_spans")}
    attention = getattr(model, "module", model).config._attn_implementation  # `module`: inside DDP
    if inputs["attention_mask"].dim() == 4:
        inputs["attention_mask"] = block_mask_for(inputs["attention_mask"], attention, next(model.parameters()).dtype)
    if "paragraph_spans" in batch and attention == PARAGRAPH_ATTENTION:
        inputs["paragraph_spans"] = batch["paragraph_spans"].tolist()
    logits = model(**inputs, logits_to_keep=keep, use_cache=False).logits  # (B, K, V)
    picked = targets[:, keep]  # (B, K)
    total = F.cross_entropy(logits.flatten(0, 1).float(), picked.flatten(), ignore_index=IGNORE_INDEX, reduction="sum")
    return total, (picked != IGNORE_INDEX).sum()


def block_mask_for(mask: torch.Tensor, attention: str, dtype: torch.dtype) -> torch.Tensor:
    """The shared-context block mask (boolean, (1, 1, T, T)) as the attention kernel takes it: as it is for sdpa,
    whole-row or per paragraph; additive in the weights' dtype (0 or the dtype's minimum) for kernels that add
    it to their scores (eager)."""
    if attention in ("sdpa", PARAGRAPH_ATTENTION):
        return mask
    return torch.full(mask.shape, torch.finfo(dtype).min, dtype=dtype, device=mask.device).masked_fill_(mask, 0.0)
