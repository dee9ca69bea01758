"""Logits -> next tokens: greedy, or sampled under temperature, top-k and top-p.

Input: next-token logits (rows, V) and, per row, a decoding setting and (when sampling) its own generator.
Output: one token id per row. Sampling draws one uniform number per step from a generator per question
seeded by (seed, id), so sampled answers do not depend on batch size or order (except where float rounding
of the logits moves a draw across a token boundary, which is rare).
"""
from __future__ import annotations

import hashlib

import torch
from transformers import LogitsProcessorList, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

from ..config import GenerationSettings


class NucleusFilter:
    """`TopPLogitsWarper`'s rule (keep a token while the probability of the tokens ranked above it is below
    top_p) decided among the 64 most probable tokens, which settles it whenever they already hold top_p of
    the mass; other rows go through `TopPLogitsWarper` itself. transformers sorts the whole vocabulary of
    every row at every step: 220 ms for 128 rows of SmolLM2's 49,152 tokens here, more than the model's step.
    """

    def __init__(self, top_p: float, candidates: int = 64):
        self.top_p, self.candidates, self.full = top_p, candidates, TopPLogitsWarper(top_p)

    def __call__(self, input_ids, scores: torch.Tensor) -> torch.Tensor:
        top, index = scores.softmax(-1).topk(min(self.candidates, scores.shape[-1]), dim=-1)  # descending
        keep = (top.cumsum(-1) - top) < self.top_p  # mass of the tokens ranked above each candidate
        filtered = torch.full_like(scores, float("-inf")).scatter_(
            -1, index, scores.gather(-1, index).masked_fill(~keep, float("-inf")))
        undecided = keep[:, -1]  # the last candidate is still in: tokens below it may be too
        if undecided.any():
            filtered[undecided] = self.full(input_ids, scores[undecided])
        return filtered


def logits_processors(settings: GenerationSettings) -> LogitsProcessorList:
    """The warpers of `settings` (none for greedy decoding)."""
    processors = LogitsProcessorList()
    if settings.do_sample:
        if settings.temperature != 1.0:
            processors.append(TemperatureLogitsWarper(settings.temperature))
        if settings.top_k:
            processors.append(TopKLogitsWarper(settings.top_k))
        if settings.top_p is not None and settings.top_p < 1.0:
            processors.append(NucleusFilter(settings.top_p))
    return processors


def question_generator(qid: str, seed: int, device) -> torch.Generator:
    """A question's own random stream, seeded by (seed, id): its draws do not depend on its batch."""
    generator = torch.Generator(device=device)
    generator.manual_seed(int.from_bytes(hashlib.sha256(f"{seed}:{qid}".encode()).digest()[:8], "little"))
    return generator


def choose(processors, logits: torch.Tensor, generators, active) -> torch.Tensor:
    """Next token per row: argmax, or a draw from the row's own generator (`generators[row]` for the row
    `active[i]` of `logits[i]`) when sampling.

    A draw inverts the row's cumulative distribution at one uniform number from its generator: exact, and
    one random number per row where `torch.multinomial` draws one per vocabulary entry (1 ms per row here).
    """
    scores = processors(None, logits.float())  # the warpers used here ignore input_ids
    if generators is None:
        return scores.argmax(-1)
    precision = torch.float32 if logits.device.type == "mps" else torch.float64  # MPS has no float64
    cumulative = scores.softmax(-1).to(precision).cumsum(-1)
    uniform = torch.cat([torch.rand(1, generator=generators[row], device=logits.device, dtype=precision)
                         for row in active])
    # right=True: the first token whose cumulative mass exceeds the draw, never one of probability zero
    drawn = torch.searchsorted(cumulative, (uniform * cumulative[:, -1])[:, None], right=True)[:, 0]
    return drawn.clamp_(max=scores.shape[-1] - 1)


def choose_rows(plans: list, logits: torch.Tensor, kinds: list[int], generators: list, active) -> torch.Tensor:
    """Next token per active row, each under its own setting: `plans[kinds[row]]` is (processors, sample or
    not) for the row `active[i]` of `logits[i]` (A, V), so rows of a strategy grid decode in one batch."""
    kinds = [kinds[row] for row in active]
    if len(set(kinds)) == 1:
        processors, sample = plans[kinds[0]]
        return choose(processors, logits, generators if sample else None, active)
    tokens = torch.empty(len(active), dtype=torch.long, device=logits.device)
    for kind in sorted(set(kinds)):
        at = [i for i, k in enumerate(kinds) if k == kind]
        index = torch.tensor(at, device=logits.device)
        processors, sample = plans[kind]
        tokens[index] = choose(processors, logits[index], generators if sample else None, [active[i] for i in at])
    return tokens
