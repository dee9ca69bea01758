"""Questions -> answer texts: batched decoding with the KV cache, prefix caching and early stopping.

Each question's prompt is (context ids, question ids) from `data.encode_prompt`, the very tokens used in
training. With `prefix_cache` a batch encodes each distinct context once, copies its KV cache to the
rows of its questions and decodes all of them together; without it every row carries its own context.
Rows are laid out as  context (right-padded) | question (left-padded) | generated tokens,  with explicit
position ids, so padding never shifts a position and every row's last column is its next-token
position. A row stops at EOS or at any token containing a newline; finished rows leave the batch (once
half of it is done, as compacting copies the cache), and decoding ends when none is left. New keys and
values are written into reserved memory instead of being concatenated. Sampling draws from one
generator per question seeded by (seed, id), so sampled answers do not depend on batch size or order.
"""
from __future__ import annotations

import hashlib
from collections.abc import Iterator

import torch
from tqdm.auto import tqdm
from transformers.cache_utils import DynamicLayer
from transformers import DynamicCache, LogitsProcessorList, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

from .config import GenerationSettings
from .data import encode_prompt

_STOP_IDS: dict[tuple, torch.Tensor] = {}


class _ReservedLayer(DynamicLayer):
    """A DynamicLayer that writes new keys/values into memory reserved for the whole decode.

    Growing the cache with torch.cat copies all of it at every step: 78% of a decode step's CPU time for
    SmolLM2-135M at batch 64. Here `keys`/`values` are views of buffers sized for context + question +
    max_new_tokens, which a batch never exceeds.
    """

    def __init__(self, capacity: int):
        super().__init__()
        self.capacity = capacity
        self.length = 0

    def update(self, key_states, value_states, *args, **kwargs):
        new = key_states.shape[-2]
        if not self.is_initialized:
            shape = (*key_states.shape[:2], self.capacity, key_states.shape[-1])
            self._keys, self._values = key_states.new_empty(shape), value_states.new_empty(shape)
            self.device, self.is_initialized = key_states.device, True
        if self.length + new > self.capacity:
            raise RuntimeError(f"KV cache reserved for {self.capacity} positions, asked for {self.length + new}")
        self._keys[..., self.length:self.length + new, :] = key_states
        self._values[..., self.length:self.length + new, :] = value_states
        self.length += new
        self._refresh()
        return self.keys, self.values

    def _refresh(self):
        self.keys, self.values = self._keys[..., :self.length, :], self._values[..., :self.length, :]

    def reorder_cache(self, beam_idx):
        if self.is_initialized:
            self._keys, self._values = self._keys.index_select(0, beam_idx), self._values.index_select(0, beam_idx)
            self._refresh()

    def batch_select_indices(self, indices):
        self.reorder_cache(indices)


def _reserved_cache(model, capacity: int) -> DynamicCache:
    cache = DynamicCache(config=model.config)
    cache.layers = [_ReservedLayer(capacity) if type(layer) is DynamicLayer else layer for layer in cache.layers]
    return cache


def stop_token_ids(tokenizer) -> torch.Tensor:
    """EOS and every token whose text contains a newline (an answer is one line)."""
    key = (tokenizer.name_or_path, len(tokenizer), tokenizer.eos_token_id)
    if key not in _STOP_IDS:
        texts = tokenizer.batch_decode([[i] for i in range(len(tokenizer))])
        ids = {i for i, text in enumerate(texts) if "\n" in text} | {tokenizer.eos_token_id}
        _STOP_IDS[key] = torch.tensor(sorted(ids))
    return _STOP_IDS[key]


def answer_text(tokenizer, token_ids: list[int]) -> str:
    """Decoded tokens cut at the first newline, whitespace stripped; nothing else is changed."""
    text = tokenizer.decode(token_ids, skip_special_tokens=True)
    return text.split("\n", 1)[0].strip()


def max_prompt_tokens(model, settings: GenerationSettings) -> int:
    positions = getattr(model.config, "max_position_embeddings", None) or getattr(model.config, "n_positions", 2048)
    return positions - settings.max_new_tokens


def _logits_processors(settings: GenerationSettings) -> LogitsProcessorList:
    processors = LogitsProcessorList()
    if settings.do_sample:
        if settings.temperature != 1.0:
            processors.append(TemperatureLogitsWarper(settings.temperature))
        if settings.top_k:
            processors.append(TopKLogitsWarper(settings.top_k))
        if settings.top_p is not None and settings.top_p < 1.0:
            processors.append(TopPLogitsWarper(settings.top_p))
    return processors


def _generators(ids: list[str], seed: int, device) -> list[torch.Generator]:
    generators = []
    for qid in ids:
        g = torch.Generator(device=device)
        g.manual_seed(int.from_bytes(hashlib.sha256(f"{seed}:{qid}".encode()).digest()[:8], "little"))
        generators.append(g)
    return generators


def _batches(prompts: list[tuple[list[int], list[int]]], batch_size: int, share_context: bool) -> Iterator[list[int]]:
    """Index batches of at most batch_size questions, longest contexts first so that padding stays small;
    with sharing, a paragraph's questions stay together."""
    groups: dict[tuple, list[int]] = {}
    for i, (context_ids, _) in enumerate(prompts):
        groups.setdefault(tuple(context_ids) if share_context else (i,), []).append(i)
    ordered = sorted(groups.values(), key=lambda members: -len(prompts[members[0]][0]))
    batch: list[int] = []
    for members in ordered:
        for start in range(0, len(members), batch_size):
            chunk = members[start:start + batch_size]
            if len(batch) + len(chunk) > batch_size:
                yield batch
                batch = []
            batch.extend(chunk)
    if batch:
        yield batch


@torch.no_grad()
def _decode_batch(model, tokenizer, prompts, ids, settings: GenerationSettings, stop_ids, share_context) -> list[str]:
    device = model.device
    contexts: dict[tuple, int] = {}
    group = []
    for context_ids, _ in prompts:
        key = tuple(context_ids) if share_context else len(contexts)
        group.append(contexts.setdefault(key, len(contexts)))
    context_rows = [prompts[group.index(g)][0] for g in range(len(contexts))]
    pad = tokenizer.pad_token_id

    # 1. Encode each distinct context once (right-padded): (C, Lc)
    lc = max(len(c) for c in context_rows)
    context_input = torch.full((len(context_rows), lc), pad, dtype=torch.long)
    context_mask = torch.zeros((len(context_rows), lc), dtype=torch.long)
    for r, c in enumerate(context_rows):
        context_input[r, :len(c)] = torch.tensor(c)
        context_mask[r, :len(c)] = 1
    context_input, context_mask = context_input.to(device), context_mask.to(device)
    lq = max(len(q) for _, q in prompts)
    cache = _reserved_cache(model, lc + lq + settings.max_new_tokens)
    model(input_ids=context_input, attention_mask=context_mask, past_key_values=cache, use_cache=True,
          position_ids=torch.arange(lc, device=device).expand(len(context_rows), lc), logits_to_keep=1)

    # 2. Copy each context's cache to its questions' rows; encode the questions (left-padded): (Q, Lq)
    group_index = torch.tensor(group, device=device)
    cache.reorder_cache(group_index)
    question_input = torch.full((len(prompts), lq), pad, dtype=torch.long)
    question_mask = torch.zeros((len(prompts), lq), dtype=torch.long)
    for r, (_, q) in enumerate(prompts):
        question_input[r, lq - len(q):] = torch.tensor(q)
        question_mask[r, lq - len(q):] = 1
    question_input, question_mask = question_input.to(device), question_mask.to(device)
    context_lengths = context_mask.sum(1)[group_index]  # (Q,)
    positions = (context_lengths[:, None] + question_mask.cumsum(1) - 1).clamp(min=0)  # (Q, Lq)
    attention = torch.cat([context_mask[group_index], question_mask], dim=1)
    logits = model(input_ids=question_input, attention_mask=attention, position_ids=positions,
                   past_key_values=cache, use_cache=True, logits_to_keep=1).logits[:, -1]  # (Q, V)

    # 3. Decode. Finished rows stay until half the batch is done: compacting copies the whole cache.
    processors = _logits_processors(settings)
    generators = _generators(ids, settings.seed, device) if settings.do_sample else None
    stop = set(stop_ids.tolist())
    active = list(range(len(prompts)))
    finished: set[int] = set()
    next_position = positions[:, -1] + 1  # (A,) position of the next token fed
    generated: list[list[int]] = [[] for _ in prompts]
    tokens = _choose(processors, logits, generators, active)  # (A,)
    while True:
        for row, token in zip(active, tokens.tolist()):
            if row not in finished:
                generated[row].append(token)
                if token in stop or len(generated[row]) == settings.max_new_tokens:
                    finished.add(row)
        keep = [i for i, row in enumerate(active) if row not in finished]
        if not keep:
            break
        if len(keep) <= len(active) // 2:
            index = torch.tensor(keep, device=device)
            cache.batch_select_indices(index)
            attention, next_position, tokens = attention[index], next_position[index], tokens[index]
            active = [active[i] for i in keep]
        attention = torch.cat([attention, attention.new_ones((len(active), 1))], dim=1)
        logits = model(input_ids=tokens[:, None], attention_mask=attention, position_ids=next_position[:, None],
                       past_key_values=cache, use_cache=True).logits[:, -1]  # (A, V)
        next_position = next_position + 1
        tokens = _choose(processors, logits, generators, active)
    return [answer_text(tokenizer, tokens) for tokens in generated]


def _choose(processors, logits: torch.Tensor, generators, active: list[int]) -> torch.Tensor:
    """Next token per row: argmax, or a draw from the row's own generator when sampling."""
    scores = processors(None, logits.float())  # the warpers used here ignore input_ids
    if generators is None:
        return scores.argmax(-1)
    probs = scores.softmax(-1)
    return torch.cat([torch.multinomial(probs[i], 1, generator=generators[row]) for i, row in enumerate(active)])


def generate_answers(model, tokenizer, examples: list[dict], *, settings: GenerationSettings,
                     progress: bool = True) -> dict[str, str]:
    """{id: answer} for records with `id`, `context`, `question`, decoded per `settings`.

    >>> generate_answers(model, tokenizer, [{"id": "q1", "context": "Paris is in France.",
    ...                                      "question": "Where is Paris?"}], settings=GenerationSettings())
    {'q1': 'France'}
    """
    model.eval()
    limit = max_prompt_tokens(model, settings)
    prompts = [encode_prompt(tokenizer, e["context"], e["question"], limit) for e in examples]
    stop_ids = stop_token_ids(tokenizer)
    answers: dict[str, str] = {}
    bar = tqdm(total=len(examples), desc=f"answering ({settings.name})", disable=not progress, unit="q")
    for batch in _batches(prompts, settings.batch_size, settings.prefix_cache):
        ids = [examples[i]["id"] for i in batch]
        texts = _decode_batch(model, tokenizer, [prompts[i] for i in batch], ids, settings, stop_ids,
                              settings.prefix_cache)
        answers.update(zip(ids, texts))
        bar.update(len(batch))
    bar.close()
    return answers
