"""The two attention kernels, side by side: shared-prefix decoding and per-paragraph training.

Decoding (`SharedPrefixBatch`): a batch of questions decoded over their contexts' keys/values, each context once.

Input: prompts as (context ids, question ids), a paragraph's questions adjacent. Output: next-token logits
per question, at the question and at every decoding step, equal to those of the question's own full prompt
(tested against the model's ordinary attention and cache). For models whose attention goes through
transformers' attention interface (GPT-2 and Llama among them; `supports_shared_prefix`), a batch runs in
three kinds of forward pass, every one a single packed row so that no token is padding:
  1. the distinct contexts back to back, each attending causally to itself; their keys/values are kept
     once per context (the shared prefix);
  2. all questions back to back, each attending to its context's keys/values and causally to itself;
  3. one new token per unfinished question, attending to its context and to its own tokens.
Attention over the shared prefix is computed for all of a context's questions in one matrix product and
merged with attention over the question's own tokens through their log-sum-exp, which is exactly softmax
attention over the concatenation; the context's keys/values are never copied per question.

transformers' registry of attention functions is global, so nothing registers at import: the
`shared_prefix_attention(model)` block that switches a model to it registers it.

Training (`PARAGRAPH_ATTENTION`): a shared-context row (see `data.collate.SharedContextCollator`) packs several
paragraphs, each followed by its questions; sdpa runs one paragraph at a time instead of over the whole row
with the cross-paragraph blocks masked. `register_paragraph_attention` makes the name resolvable.
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward

SHARED_PREFIX_ATTENTION = "loraqa_shared_prefix"


def supports_shared_prefix(model) -> bool:
    """Decoder-only models whose attention layers go through transformers' attention interface, all global."""
    config = model.config
    layer_types = set(getattr(config, "layer_types", None) or ["full_attention"])
    windowed = getattr(config, "sliding_window", None) and getattr(config, "use_sliding_window", True)
    return (getattr(model, "_supports_attention_backend", False) and not config.is_encoder_decoder
            and layer_types == {"full_attention"} and not windowed)


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
    attention layers call (inside `shared_prefix_attention(model)`) while this batch runs. The prompts of one
    context must be adjacent (as `generation.decode._batches` makes them).
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
        raise RuntimeError(f"{SHARED_PREFIX_ATTENTION} attention needs a SharedPrefixBatch (`shared_prefix=`)")
    unsupported = [name for name in ("sliding_window", "softcap", "s_aux") if kwargs.get(name) is not None]
    if unsupported:
        raise NotImplementedError(f"shared-prefix decoding does not support {', '.join(unsupported)}; "
                                  "use --prefix_cache false")
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    return shared_prefix.attend(module.layer_idx, query, key, value, scale), None


@contextlib.contextmanager
def shared_prefix_attention(model):
    """Inside the block, `model`'s attention layers call `SharedPrefixBatch.attend` (of the batch passed as
    `shared_prefix=` to the forward); the previous implementation is restored on exit, even on error."""
    AttentionInterface.register(SHARED_PREFIX_ATTENTION, _shared_prefix_attention)
    previous = model.config._attn_implementation
    model.set_attn_implementation(SHARED_PREFIX_ATTENTION)
    try:
        yield
    finally:
        model.set_attn_implementation(previous)


# Training: a shared-context row holds several paragraphs, each with its questions after it.
PARAGRAPH_ATTENTION = "loraqa_paragraphs"


def _paragraph_attention(module, query, key, value, attention_mask, paragraph_spans: list | None = None,
                         **kwargs):
    """transformers' sdpa attention, one paragraph of a shared-context row at a time: the paragraphs never
    attend to each other, so the mask's cross-paragraph blocks are skipped instead of computed and masked
    (training steps ~10% faster at batch 8). Without spans it is plain sdpa."""
    if paragraph_spans is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    outputs = [sdpa_attention_forward(module, query[:, :, s:e], key[:, :, s:e], value[:, :, s:e],
                                      attention_mask[:, :, s:e, s:e], **kwargs)[0] for s, e in paragraph_spans]
    return torch.cat(outputs, dim=1), None  # (1, T, heads, head_dim)


def register_paragraph_attention() -> None:
    """Make PARAGRAPH_ATTENTION a name that attention layers resolve. transformers' registry is global, so the
    code that sets the implementation registers it first (as `setup` does), never an import."""
    AttentionInterface.register(PARAGRAPH_ATTENTION, _paragraph_attention)

