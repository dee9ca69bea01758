"""Questions -> answer texts: batched decoding that encodes each paragraph once, with early stopping.

Each question's prompt is (context ids, question ids) from `data.encode_prompt`, the very tokens used in
training. A batch holds whole paragraphs' questions. With `prefix_cache` (models whose attention goes
through transformers' attention interface, GPT-2 and Llama among them) the batch runs in three kinds of
forward pass, every one a single packed row so that no token is padding:
  1. the distinct contexts back to back, each attending causally to itself; their keys/values are kept
     once per context (the shared prefix);
  2. all questions back to back, each attending to its context's keys/values and causally to itself;
  3. one new token per unfinished question, attending to its context and to its own tokens.
Attention over the shared prefix is computed for all of a context's questions in one matrix product and
merged with attention over the question's own tokens through their log-sum-exp, which is exactly softmax
attention over the concatenation; the context's keys/values are never copied per question. Without
`prefix_cache` (or for other architectures) every row carries its full prompt, left-padded, on the model's
own KV cache.

A row stops at EOS or at any token containing a newline; finished rows leave the batch once an eighth of
it is done (compacting copies the per-row keys/values). Once seven eighths have stopped, the rest wait and
are decoded together with the leftovers of later batches (`SharedPrefixBatch.merge`): a few long answers no
longer keep a whole batch's worth of steps to themselves. Sampling draws one uniform number per step from
a generator per question seeded by (seed, id), so sampled answers do not depend on batch size or order
(except where float rounding of the logits moves a draw across a token boundary, which is rare).
`generate_answer_sets` decodes several settings (a strategy grid) together: a row per (question, setting),
all from one prefill per batch.
"""
from __future__ import annotations

import contextlib
import hashlib
import time
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm
from transformers import (AttentionInterface, DynamicCache, LogitsProcessorList, TemperatureLogitsWarper,
                          TopKLogitsWarper, TopPLogitsWarper)

from .config import GenerationSettings
from .data import encode_prompt_counting_cut

SHARED_PREFIX_ATTENTION = "loraqa_shared_prefix"
_STOP_IDS: dict[tuple, torch.Tensor] = {}


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


def max_prompt_tokens(model, settings: GenerationSettings, max_length: int | None = None) -> int:
    """Prompt tokens allowed so that prompt + `max_new_tokens` fits `max_length` (the length the model was
    trained at; `evaluate` takes it from the adapter's run config) and the model's window."""
    positions = getattr(model.config, "max_position_embeddings", None) or getattr(model.config, "n_positions", 2048)
    return min(positions, max_length or positions) - settings.max_new_tokens


# --- shared-prefix attention ------------------------------------------------------------------------------

def _attention_with_mass(query, keys, values, bias, scale):
    """Softmax attention and the log of its normaliser, (..., M, D) and (..., M, 1); `bias` is 0 or -inf.

    amax/exp/sum is about twice as fast as logsumexp on CPU, and exp is 3-8x slower on inputs that
    underflow (-inf included), so shifted scores are clamped at -80 first: exp(-80) = 2e-35 is far below
    float32 resolution next to the maximum's exp(0) = 1, and masked keys have zero values.
    """
    scores = torch.matmul(query, keys.transpose(-1, -2)).float().mul_(scale).add_(bias)
    top = scores.amax(dim=-1, keepdim=True)
    weights = scores.sub_(top).clamp_(min=-80.0).exp_()
    mass = weights.sum(dim=-1, keepdim=True)
    return torch.matmul(weights.to(values.dtype), values).div_(mass), top + mass.log()


def _masked_bias(visible: torch.Tensor) -> torch.Tensor:
    return torch.zeros(visible.shape, dtype=torch.float32, device=visible.device).masked_fill_(~visible, float("-inf"))


class SharedPrefixBatch:
    """One batch of questions decoded over their contexts' shared keys/values.

    Per layer it keeps the prefix (C, kv heads, longest context, D), each context once, and the suffix
    (A, kv heads, capacity, D), each active question row's own tokens. `attend` is what the model's
    attention layers call (through `SHARED_PREFIX_ATTENTION`) while this batch runs. The prompts of one
    context must be adjacent (as `_batches` makes them).
    """

    def __init__(self, model, prompts: list[tuple[list[int], list[int]]], max_new_tokens: int):
        self.model, device = model, model.device
        contexts: dict[tuple, int] = {}
        group = [contexts.setdefault(tuple(context_ids), len(contexts)) for context_ids, _ in prompts]
        if group != sorted(group):
            raise ValueError("SharedPrefixBatch needs the questions of one context next to each other")
        self.contexts = [list(c) for c in contexts]
        self.questions = [question_ids for _, question_ids in prompts]
        self.group = torch.tensor(group, device=device)  # (A,) context of each active row
        self.capacity = max(len(q) for q in self.questions) + max_new_tokens
        self.prefix: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.suffix: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self._set_contexts([len(c) for c in self.contexts])
        self._place_rows()

    def _set_contexts(self, sizes: list[int]):
        self.context_sizes = sizes  # read by every layer: kept as ints
        self.context_lengths = torch.tensor(sizes, device=self.group.device)
        positions = torch.arange(max(sizes), device=self.group.device)
        self.prefix_bias = _masked_bias(positions < self.context_lengths[:, None])[:, None, None, :]  # (C,1,1,Lc)

    def _place_rows(self):
        """Slot of each active row among its context's rows, for the side-by-side prefix product."""
        counts = torch.bincount(self.group, minlength=len(self.context_sizes))
        first_row = torch.cumsum(counts, 0) - counts
        self.slot = torch.arange(len(self.group), device=self.group.device) - first_row[self.group]
        self.slots_per_context = int(counts.max())

    # the three kinds of forward pass, each one packed row

    def _encode_contexts(self):
        device = self.group.device
        ids = torch.tensor([t for c in self.contexts for t in c], device=device)[None]
        positions = torch.cat([torch.arange(len(c), device=device) for c in self.contexts])[None]
        self._mode = "contexts"
        self.model(input_ids=ids, position_ids=positions, use_cache=False, logits_to_keep=1, shared_prefix=self)

    def _encode_questions(self) -> torch.Tensor:
        """All questions back to back; logits at each question's last token, (A, V)."""
        device = self.group.device
        lengths = torch.tensor([len(q) for q in self.questions], device=device)
        rows = torch.repeat_interleave(torch.arange(len(lengths), device=device), lengths)  # (N,) row of each token
        ends = torch.cumsum(lengths, 0)
        self.token_rows, self.token_columns = rows, torch.arange(len(rows), device=device) - (ends - lengths)[rows]
        # per context: its questions' tokens see the whole context, and causally their own question
        self.question_spans, start = [], 0
        for c, length in enumerate(self.context_sizes):
            end = start + int(lengths[self.group == c].sum())
            r, column = rows[start:end], self.token_columns[start:end]
            own = (r[:, None] == r[None, :]) & (column[None, :] <= column[:, None])
            self.question_spans.append((start, end, torch.cat([own.new_ones((end - start, length)), own], dim=1)))
            start = end
        ids = torch.tensor([t for q in self.questions for t in q], device=device)[None]
        positions = (self.context_lengths[self.group][rows] + self.token_columns)[None]
        self._mode = "questions"
        logits = self.model(input_ids=ids, position_ids=positions, use_cache=False, shared_prefix=self,
                            logits_to_keep=ends - 1).logits[0]
        self.suffix_lengths = lengths
        return logits

    def prefill(self) -> torch.Tensor:
        """Contexts, then questions; next-token logits (A, V)."""
        self._encode_contexts()
        return self._encode_questions()

    def step(self, tokens: torch.Tensor, live: torch.Tensor | None = None) -> torch.Tensor:
        """One new token per active row; next-token logits (A, V). Rows with `live` False (finished, waiting
        for compaction) are computed but neither keep their token nor advance: a finished row rewrites the
        slot after its last token, so it never runs past its buffer or its position limit."""
        span = int(self.suffix_lengths.max()) + 1
        visible = torch.arange(span, device=tokens.device)[None, :] <= self.suffix_lengths[:, None]
        self.step_bias, self.span = _masked_bias(visible)[:, None, None, :], span  # (A, 1, 1, S)
        self.step_rows = torch.arange(len(tokens), device=tokens.device)
        positions = (self.context_lengths[self.group] + self.suffix_lengths)[None]
        self._mode = "step"
        logits = self.model(input_ids=tokens[None], position_ids=positions, use_cache=False,
                            shared_prefix=self).logits[0]
        self.suffix_lengths = self.suffix_lengths + (1 if live is None else live.long())
        return logits

    def keep(self, index: torch.Tensor):
        """Keep rows `index` of the active ones (finished rows leave; a repeated index copies a row)."""
        self.group, self.suffix_lengths = self.group[index], self.suffix_lengths[index]
        self.suffix = {layer: (k[index], v[index]) for layer, (k, v) in self.suffix.items()}
        self._place_rows()

    def drop_unread_contexts(self):
        """Keep only the contexts some active row reads (before the rows wait as leftovers, see `merge`)."""
        live = torch.unique(self.group)
        sizes = [self.context_sizes[c] for c in live.tolist()]
        self.prefix = {layer: (k[live, :, :max(sizes)], v[live, :, :max(sizes)]) for layer, (k, v) in self.prefix.items()}
        renumber = torch.zeros(len(self.context_sizes), dtype=torch.long, device=self.group.device)
        renumber[live] = torch.arange(len(live), device=self.group.device)
        self.group = renumber[self.group]
        self._set_contexts(sizes)
        self._place_rows()

    @staticmethod
    def merge(parts: list[SharedPrefixBatch]) -> SharedPrefixBatch:
        """One batch of all the parts' rows (in order), each still reading its own context."""
        def stack(tensors, width):  # (n, KV, L, D) each, zero-padded along L to `width`
            return torch.cat([F.pad(t, (0, 0, 0, width - t.shape[2])) for t in tensors])

        longest, capacity = max(max(p.context_sizes) for p in parts), max(p.capacity for p in parts)
        merged = object.__new__(SharedPrefixBatch)
        merged.model, merged.capacity = parts[0].model, capacity
        merged.prefix = {layer: (stack([p.prefix[layer][0] for p in parts], longest),
                                 stack([p.prefix[layer][1] for p in parts], longest)) for layer in parts[0].prefix}
        merged.suffix = {layer: (stack([p.suffix[layer][0] for p in parts], capacity),
                                 stack([p.suffix[layer][1] for p in parts], capacity)) for layer in parts[0].suffix}
        offsets = torch.cumsum(torch.tensor([0] + [len(p.context_sizes) for p in parts[:-1]]), 0).tolist()
        merged.group = torch.cat([p.group + offset for p, offset in zip(parts, offsets)])
        merged.suffix_lengths = torch.cat([p.suffix_lengths for p in parts])
        merged._set_contexts([size for p in parts for size in p.context_sizes])
        merged._place_rows()
        return merged

    # attention, called by every layer: query (1, H, N, D), key/value (1, KV heads, N, D) of the N new tokens

    def attend(self, layer: int, query, key, value, scale: float) -> torch.Tensor:
        """Output (1, N, H, D)."""
        if self._mode == "contexts":
            return self._attend_contexts(layer, query, key, value, scale)
        if self._mode == "questions":
            return self._attend_questions(layer, query, key, value, scale)
        return self._attend_step(layer, query, key, value, scale)

    def _attend_contexts(self, layer, query, key, value, scale):
        kv_heads, dim, longest = key.shape[1], key.shape[-1], max(self.context_sizes)
        prefix_keys = key.new_zeros((len(self.contexts), kv_heads, longest, dim))
        prefix_values = value.new_zeros((len(self.contexts), kv_heads, longest, dim))
        outputs, start = [], 0
        for c, length in enumerate(self.context_sizes):
            span = slice(start, start + length)
            prefix_keys[c, :, :length], prefix_values[c, :, :length] = key[0, :, span], value[0, :, span]
            outputs.append(F.scaled_dot_product_attention(query[:, :, span], key[:, :, span], value[:, :, span],
                                                          is_causal=True, scale=scale, enable_gqa=True))
            start += length
        self.prefix[layer] = prefix_keys, prefix_values
        return torch.cat(outputs, dim=2).transpose(1, 2)

    def _attend_questions(self, layer, query, key, value, scale):
        shape = (len(self.group), key.shape[1], self.capacity, key.shape[-1])
        suffix_keys, suffix_values = key.new_zeros(shape), value.new_zeros(shape)
        suffix_keys[self.token_rows, :, self.token_columns] = key[0].transpose(0, 1)
        suffix_values[self.token_rows, :, self.token_columns] = value[0].transpose(0, 1)
        self.suffix[layer] = suffix_keys, suffix_values
        prefix_keys, prefix_values = self.prefix[layer]
        outputs = []
        for c, (start, end, visible) in enumerate(self.question_spans):
            length = self.context_sizes[c]
            keys = torch.cat([prefix_keys[c, :, :length], key[0, :, start:end]], dim=1)[None]
            values = torch.cat([prefix_values[c, :, :length], value[0, :, start:end]], dim=1)[None]
            outputs.append(F.scaled_dot_product_attention(query[:, :, start:end], keys, values, attn_mask=visible,
                                                          scale=scale, enable_gqa=True))
        return torch.cat(outputs, dim=2).transpose(1, 2)

    def _attend_step(self, layer, query, key, value, scale):
        rows, heads, dim = len(self.group), query.shape[1], query.shape[-1]
        contexts, kv_heads, slots = len(self.context_sizes), key.shape[1], self.slots_per_context
        suffix_keys, suffix_values = self.suffix[layer]
        suffix_keys[self.step_rows, :, self.suffix_lengths] = key[0].transpose(0, 1)
        suffix_values[self.step_rows, :, self.suffix_lengths] = value[0].transpose(0, 1)
        query = query[0].transpose(0, 1).reshape(rows, kv_heads, heads // kv_heads, dim)  # (A, KV, G, D)

        # the context: all rows of a context side by side against its keys/values, (C, KV, slots*G, D)
        by_context = query.new_zeros((contexts, slots, kv_heads, heads // kv_heads, dim))
        by_context[self.group, self.slot] = query
        prefix_keys, prefix_values = self.prefix[layer]
        out_prefix, lse_prefix = _attention_with_mass(by_context.transpose(1, 2).reshape(contexts, kv_heads, -1, dim),
                                                      prefix_keys, prefix_values, self.prefix_bias, scale)
        out_prefix = out_prefix.view(contexts, kv_heads, slots, -1, dim).transpose(1, 2)[self.group, self.slot]
        lse_prefix = lse_prefix.view(contexts, kv_heads, slots, -1, 1).transpose(1, 2)[self.group, self.slot]

        # the row's own tokens: (A, KV, G, D)
        out_suffix, lse_suffix = _attention_with_mass(query, suffix_keys[:, :, :self.span],
                                                      suffix_values[:, :, :self.span], self.step_bias, scale)

        # softmax over the concatenation = the two partial softmaxes weighted by their mass
        top = torch.maximum(lse_prefix, lse_suffix)
        weight_prefix, weight_suffix = (lse_prefix - top).exp(), (lse_suffix - top).exp()
        out = (out_prefix * weight_prefix + out_suffix * weight_suffix) / (weight_prefix + weight_suffix)
        return out.to(query.dtype).reshape(1, rows, heads, dim)


def _shared_prefix_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0,
                             shared_prefix: SharedPrefixBatch | None = None, **kwargs):
    if shared_prefix is None:
        raise RuntimeError(f"{SHARED_PREFIX_ATTENTION} attention runs only inside loraqa.generate_answers")
    unsupported = [name for name in ("sliding_window", "softcap", "s_aux") if kwargs.get(name) is not None]
    if unsupported:
        raise NotImplementedError(f"shared-prefix decoding does not support {', '.join(unsupported)}; "
                                  "use --prefix_cache false")
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    return shared_prefix.attend(module.layer_idx, query, key, value, scale), None


AttentionInterface.register(SHARED_PREFIX_ATTENTION, _shared_prefix_attention)


def supports_shared_prefix(model) -> bool:
    """Decoder-only models whose attention layers go through transformers' attention interface, all global."""
    config = model.config
    layer_types = set(getattr(config, "layer_types", None) or ["full_attention"])
    windowed = getattr(config, "sliding_window", None) and getattr(config, "use_sliding_window", True)
    return (getattr(model, "_supports_attention_backend", False) and not config.is_encoder_decoder
            and layer_types == {"full_attention"} and not windowed)


@contextlib.contextmanager
def _attention_implementation(model, name: str):
    previous = model.config._attn_implementation
    model.set_attn_implementation(name)
    try:
        yield
    finally:
        model.set_attn_implementation(previous)


class PaddedRowsBatch:
    """The plain layout: every row its full prompt, left-padded, on the model's own KV cache."""

    def __init__(self, model, prompts: list[tuple[list[int], list[int]]], pad_token_id: int):
        self.model, device = model, model.device
        width = max(len(c) + len(q) for c, q in prompts)
        self.ids = torch.full((len(prompts), width), pad_token_id, dtype=torch.long, device=device)
        self.prompt_attention = torch.zeros((len(prompts), width), dtype=torch.long, device=device)
        for r, (context_ids, question_ids) in enumerate(prompts):
            prompt = context_ids + question_ids
            self.ids[r, width - len(prompt):] = torch.tensor(prompt)
            self.prompt_attention[r, width - len(prompt):] = 1

    def prefill(self) -> torch.Tensor:
        """The full prompts; next-token logits (A, V)."""
        self.cache, self.attention = DynamicCache(config=self.model.config), self.prompt_attention
        positions = (self.attention.cumsum(1) - 1).clamp(min=0)
        self.next_position = positions[:, -1] + 1
        return self.model(input_ids=self.ids, attention_mask=self.attention, position_ids=positions,
                          cache=self.cache, use_cache=True, logits_to_keep=1).logits[:, -1]

    def step(self, tokens: torch.Tensor, live: torch.Tensor | None = None) -> torch.Tensor:
        """As `SharedPrefixBatch.step`: a finished row's token is masked out and its position stays."""
        alive = self.attention.new_ones((len(tokens), 1)) if live is None else live.long()[:, None]
        self.attention = torch.cat([self.attention, alive], dim=1)
        logits = self.model(input_ids=tokens[:, None], attention_mask=self.attention,
                            position_ids=self.next_position[:, None], cache=self.cache,
                            use_cache=True).logits[:, -1]
        self.next_position = self.next_position + alive[:, 0]
        return logits

    def keep(self, index: torch.Tensor):
        self.cache.batch_select_indices(index)
        self.attention, self.next_position = self.attention[index], self.next_position[index]


# --- decoding -----------------------------------------------------------------------------------------------

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


def _logits_processors(settings: GenerationSettings) -> LogitsProcessorList:
    processors = LogitsProcessorList()
    if settings.do_sample:
        if settings.temperature != 1.0:
            processors.append(TemperatureLogitsWarper(settings.temperature))
        if settings.top_k:
            processors.append(TopKLogitsWarper(settings.top_k))
        if settings.top_p is not None and settings.top_p < 1.0:
            processors.append(NucleusFilter(settings.top_p))
    return processors


def _generator(qid: str, seed: int, device) -> torch.Generator:
    generator = torch.Generator(device=device)
    generator.manual_seed(int.from_bytes(hashlib.sha256(f"{seed}:{qid}".encode()).digest()[:8], "little"))
    return generator


def _batches(prompts: list[tuple[list[int], list[int]]], batch_size: int) -> Iterator[list[int]]:
    """Index batches of at most batch_size questions, a paragraph's questions together, longest contexts first
    (so that padded rows stay similar in length)."""
    groups: dict[tuple, list[int]] = {}
    for i, (context_ids, _) in enumerate(prompts):
        groups.setdefault(tuple(context_ids), []).append(i)
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


@dataclass
class _Rows:
    """Rows being decoded: each one's answer so far (lists owned by the caller), setting (an index into the
    plans: logits processors and whether to sample) and, when sampling, its generator."""
    answers: list[list[int]]
    kinds: list[int]
    generators: list[torch.Generator | None]

    def pick(self, rows: list[int]) -> _Rows:
        return _Rows([self.answers[r] for r in rows], [self.kinds[r] for r in rows],
                     [self.generators[r] for r in rows])


def _decode(batch, tokens: torch.Tensor, rows: _Rows, plans: list, max_new_tokens: int, stop: set[int],
            work: dict, leave_at: int = 0):
    """Append `tokens` (A,), each row's next token, and what follows to the rows' answers until every row has
    stopped. With `leave_at`, give up as soon as at most that many rows are left and return them as
    (batch, next tokens, _Rows) to be finished with other batches' leftovers; otherwise return None."""
    started = time.perf_counter()
    active = list(range(len(tokens)))
    finished: set[int] = set()
    while True:
        for row, token in zip(active, tokens.tolist()):
            if row not in finished:
                rows.answers[row].append(token)
                if token in stop or len(rows.answers[row]) == max_new_tokens:
                    finished.add(row)
        keep = [i for i, row in enumerate(active) if row not in finished]
        if len(keep) <= leave_at:
            work["decode_s"] += time.perf_counter() - started
            if not keep:
                return None
            index, left = torch.tensor(keep, device=tokens.device), [active[i] for i in keep]
            batch.keep(index)
            batch.drop_unread_contexts()
            for row in left:
                rows.answers[row].pop()  # appended again when the leftovers are fed this token
            return batch, tokens[index], rows.pick(left)
        # Compacting copies every layer's per-row keys/values; a finished row left in wastes its share of every
        # later step. Compacting once an eighth of the rows are done measured best (vs a half, a quarter, always).
        if len(keep) <= len(active) - max(1, len(active) // 8):
            index = torch.tensor(keep, device=tokens.device)
            batch.keep(index)
            tokens, active = tokens[index], [active[i] for i in keep]
        live = torch.tensor([row not in finished for row in active], device=tokens.device)
        tokens = _choose_rows(plans, batch.step(tokens, live), rows, active)
        work["decode_steps"] += 1
        work["steps_by_rows"][len(active)] = work["steps_by_rows"].get(len(active), 0) + 1


def _finish_leftovers(leftovers: list, plans: list, max_new_tokens: int, stop: set[int], work: dict):
    """Decode the leftover rows of several batches as one batch, to the end."""
    if leftovers:
        batch = SharedPrefixBatch.merge([part for part, _, _ in leftovers])
        tokens = torch.cat([tokens for _, tokens, _ in leftovers])
        parts = [rows for _, _, rows in leftovers]
        rows = _Rows([a for p in parts for a in p.answers], [k for p in parts for k in p.kinds],
                     [g for p in parts for g in p.generators])
        _decode(batch, tokens, rows, plans, max_new_tokens, stop, work)
        leftovers.clear()


def _choose_rows(plans: list, logits: torch.Tensor, rows: _Rows, active) -> torch.Tensor:
    """Next token per active row, each under its own setting (`plans[kind]`: processors, sample or not)."""
    kinds = [rows.kinds[row] for row in active]
    if len(set(kinds)) == 1:
        processors, sample = plans[kinds[0]]
        return _choose(processors, logits, rows.generators if sample else None, active)
    tokens = torch.empty(len(active), dtype=torch.long, device=logits.device)
    for kind in sorted(set(kinds)):
        at = [i for i, k in enumerate(kinds) if k == kind]
        index = torch.tensor(at, device=logits.device)
        processors, sample = plans[kind]
        tokens[index] = _choose(processors, logits[index], rows.generators if sample else None,
                                [active[i] for i in at])
    return tokens


def _choose(processors, logits: torch.Tensor, generators, active) -> torch.Tensor:
    """Next token per row: argmax, or a draw from the row's own generator (`generators[row]`) when sampling.

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


def generate_answers(model, tokenizer, examples: list[dict], *, settings: GenerationSettings,
                     progress: bool = True, stats: dict | None = None, max_length: int | None = None
                     ) -> dict[str, str]:
    """{id: answer} for records with `id`, `context`, `question`, decoded per `settings`.

    `stats`, if given, receives the work done: prompt tokens encoded (each batch's distinct contexts once
    with prefix caching), tokens generated, batches, decoding steps (and `steps_by_rows`, {rows: steps}: how many
    steps ran with how many rows), seconds spent encoding prompts (prefill) and decoding, and `prompts_cut`:
    prompts whose context was cut at the end so that prompt + `max_new_tokens` fits `max_length`.

    >>> generate_answers(model, tokenizer, [{"id": "q1", "context": "Paris is in France.",
    ...                                      "question": "Where is Paris?"}], settings=GenerationSettings())
    {'q1': 'France'}
    """
    return generate_answer_sets(model, tokenizer, examples, [settings], progress=progress,
                                stats=None if stats is None else [stats], max_length=max_length)[0]


@torch.no_grad()
def generate_answer_sets(model, tokenizer, examples: list[dict], settings: list[GenerationSettings], *,
                         progress: bool = True, stats: list[dict] | None = None, max_length: int | None = None
                         ) -> list[dict[str, str]]:
    """One {id: answer} per entry of `settings` (e.g. a decoding-strategy grid), equal to separate
    `generate_answers` calls. Each batch's prompts are encoded once, and its rows are its questions times the
    settings, decoded together (so a grid batches batch_size // len(settings) questions). The settings may
    differ in sampling and seed, not in `max_new_tokens`, `batch_size` or `prefix_cache`. Every `stats[k]`
    receives the shared work (prefill, decoding) and run k's own generated tokens.
    """
    first = settings[0]
    if any((s.max_new_tokens, s.batch_size, s.prefix_cache) != (first.max_new_tokens, first.batch_size,
                                                                  first.prefix_cache) for s in settings):
        raise ValueError("generate_answer_sets: settings must share max_new_tokens, batch_size and prefix_cache")
    model.eval()
    limit = max_prompt_tokens(model, first, max_length)
    encoded = [encode_prompt_counting_cut(tokenizer, e["context"], e["question"], limit) for e in examples]
    prompts = [(context_ids, question_ids) for context_ids, question_ids, _ in encoded]
    stop = set(stop_token_ids(tokenizer).tolist())
    shared = first.prefix_cache and supports_shared_prefix(model)
    plans = [(_logits_processors(run), run.do_sample) for run in settings]
    runs = len(settings)
    # A batch's last steps decode a few long answers, yet each step reads all the weights: the rows left once
    # seven eighths of a batch are done wait, and finish together with other batches' leftovers (at most
    # batch_size rows at a time).
    leave_at = first.batch_size // 8 if shared else 0
    generated: list[dict[str, list[int]]] = [{} for _ in settings]
    leftovers: list = []
    work = {"prompts_cut": sum(cut > 0 for _, _, cut in encoded), "prompt_tokens": 0, "batches": 0,
            "decode_steps": 0, "steps_by_rows": {}, "prefill_s": 0.0, "decode_s": 0.0}
    label = first.name if runs == 1 else f"{runs} settings"
    bar = tqdm(total=len(examples), desc=f"answering ({label})", disable=not progress, unit="q")
    with _attention_implementation(model, SHARED_PREFIX_ATTENTION) if shared else contextlib.nullcontext():
        batches = list(_batches(prompts, max(1, first.batch_size // runs)))
        for b, indices in enumerate(batches):
            ids = [examples[i]["id"] for i in indices]
            batch_prompts = [prompts[i] for i in indices]
            batch = (SharedPrefixBatch(model, batch_prompts, first.max_new_tokens) if shared
                     else PaddedRowsBatch(model, batch_prompts, tokenizer.pad_token_id))
            contexts = {tuple(c) for c, _ in batch_prompts} if shared else [c for c, _ in batch_prompts]
            work["prompt_tokens"] += sum(len(c) for c in contexts) + sum(len(q) for _, q in batch_prompts)
            started = time.perf_counter()
            logits = batch.prefill()
            work["prefill_s"] += time.perf_counter() - started
            work["batches"] += 1
            # a row per (question, setting), a question's rows next to each other (as its context's rows must be)
            rows = _Rows([generated[k].setdefault(qid, []) for qid in ids for k in range(runs)],
                         [k for _ in ids for k in range(runs)],
                         [_generator(qid, run.seed, model.device) if run.do_sample else None
                          for qid in ids for run in settings])
            if runs > 1:
                index = torch.arange(len(ids), device=logits.device).repeat_interleave(runs)
                batch.keep(index)
                logits = logits[index]
            tokens = _choose_rows(plans, logits, rows, range(len(rows.answers)))
            last_alone = b == len(batches) - 1 and not leftovers  # nothing to wait for
            left = _decode(batch, tokens, rows, plans, first.max_new_tokens, stop, work,
                           0 if last_alone else leave_at)
            if left:
                if sum(len(t) for _, t, _ in leftovers) + len(left[1]) > first.batch_size:
                    _finish_leftovers(leftovers, plans, first.max_new_tokens, stop, work)
                leftovers.append(left)
            bar.update(len(indices))
        _finish_leftovers(leftovers, plans, first.max_new_tokens, stop, work)
    bar.close()
    for target, answers in zip(stats or [], generated):
        target.update(work, generated_tokens=sum(len(tokens) for tokens in answers.values()))
    return [{qid: answer_text(tokenizer, tokens) for qid, tokens in answers.items()} for answers in generated]
