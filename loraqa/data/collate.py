"""Training rows -> batches of tensors.

`QADataCollator` is the plain path: one right-padded row per question. `SharedContextCollator` is the fast
path: the questions of a batch that share a context become one row holding the context once, followed by
each question+answer block; a 4D block mask lets every block see only its context and itself, and the
position ids of every block restart right after the context. Each answer token therefore sees exactly
what it sees in its own unpacked row, while the context is encoded once per paragraph instead of once
per question (SQuAD has about 4.6 questions per paragraph). `ContextGroupedSampler` orders questions so
that a paragraph's questions land in the same batch.
"""
from __future__ import annotations

import random
from collections.abc import Iterator

import torch
from torch.utils.data import Sampler

from .squad import IGNORE_INDEX


class QADataCollator:
    """Dynamic right padding to the batch maximum; labels padded with -100, never derived from pad ids.

    >>> QADataCollator(tokenizer)([{"input_ids": [5, 6, 7], "labels": [-100, 7, 2]}, {"input_ids": [5], "labels": [2]}])
    {'input_ids': tensor([[5, 6, 7], [5, P, P]]), 'attention_mask': tensor([[1, 1, 1], [1, 0, 0]]),
     'labels': tensor([[-100, 7, 2], [2, -100, -100]])}          # P = tokenizer.pad_token_id
    Because labels are padded by position, a pad token equal to EOS (GPT-2, SmolLM2) never masks the
    answer's EOS label.
    """

    def __init__(self, tokenizer, pad_to_multiple_of: int | None = None):
        if tokenizer.pad_token_id is None:
            raise ValueError("the tokenizer has no pad token; load it through loraqa.model.loading.load_tokenizer")
        self.pad_token_id = tokenizer.pad_token_id
        self.pad_to_multiple_of = pad_to_multiple_of

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        length = max(len(f["input_ids"]) for f in features)
        if self.pad_to_multiple_of:
            length = -(-length // self.pad_to_multiple_of) * self.pad_to_multiple_of
        batch = len(features)
        input_ids = torch.full((batch, length), self.pad_token_id, dtype=torch.long)  # (B, T)
        attention_mask = torch.zeros((batch, length), dtype=torch.long)
        labels = torch.full((batch, length), IGNORE_INDEX, dtype=torch.long)
        for row, f in enumerate(features):
            n = len(f["input_ids"])
            input_ids[row, :n] = torch.as_tensor(f["input_ids"])
            attention_mask[row, :n] = 1
            labels[row, :n] = torch.as_tensor(f["labels"])
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


class SharedContextCollator:
    """Pack a batch into one row: each distinct context once, then its questions' blocks.

    Two questions q1, q2 on context C (C = 3 tokens, blocks of 2) become
        input_ids     C0 C1 C2 | q1a q1b | q2a q2b
        position_ids   0  1  2 |  3   4  |  3   4
        labels        -  -  -  |  -  y1  |  -  y2
    and `attention_mask` is a (1, 1, T, T) boolean mask: True where a token may attend (causal, within its
    own block or to its own context), which sdpa takes as it is (a float mask was 4x the memory, 1 GiB at
    T = 16k, and was cast again for the model). No padding at all. `paragraph_spans` (P, 2) holds each
    paragraph's [start, end) in the row: paragraphs never attend to each other, so the mask is built one
    paragraph block at a time, and attention can run per paragraph (`model.attention.PARAGRAPH_ATTENTION`)
    on views of those blocks instead of over the whole masked row.
    """

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        groups: dict[str, list[dict]] = {}
        for f in features:
            groups.setdefault(f["context_key"], []).append(f)
        ids, positions, labels, block_of, spans = [], [], [], [], []
        for members in groups.values():
            start = len(ids)
            n_context = members[0]["context_length"]
            ids.extend(members[0]["input_ids"][:n_context])
            positions.extend(range(n_context))
            labels.extend([IGNORE_INDEX] * n_context)
            block_of.extend([-1] * n_context)
            for b, f in enumerate(members):
                block = f["input_ids"][n_context:]
                ids.extend(block)
                positions.extend(range(n_context, n_context + len(block)))
                labels.extend(f["labels"][n_context:])
                block_of.extend([b] * len(block))
            spans.append([start, len(ids)])
        mask = torch.zeros(len(ids), len(ids), dtype=torch.bool)  # (T, T): no paragraph sees another
        for start, end in spans:
            block = torch.tensor(block_of[start:end])
            visible = block[:, None] == block[None, :]  # (L, L): the query's own block
            visible |= block[None, :] == -1  # or the context
            mask[start:end, start:end] = visible.tril_()  # causal
        return {"input_ids": torch.tensor([ids]), "position_ids": torch.tensor([positions]),
                "attention_mask": mask[None, None], "labels": torch.tensor([labels]),
                "paragraph_spans": torch.tensor(spans)}


class ContextGroupedSampler(Sampler[int]):
    """Shuffle paragraphs (not questions) each epoch and yield each paragraph's questions together.

    Deterministic for a (seed, epoch), so a resumed run sees the same order and skips exactly the
    batches it already trained on.
    """

    def __init__(self, context_keys: list[str], seed: int = 0):
        groups: dict[str, list[int]] = {}
        for index, key in enumerate(context_keys):
            groups.setdefault(key, []).append(index)
        self.groups = list(groups.values())
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return sum(len(g) for g in self.groups)

    def __iter__(self) -> Iterator[int]:
        order = list(range(len(self.groups)))
        random.Random(self.seed * 1_000_003 + self.epoch).shuffle(order)
        for g in order:
            yield from self.groups[g]
