"""Questions -> answer texts: batched decoding that encodes each paragraph once, with early stopping.

Each question's prompt is (context ids, question ids) from `data.squad.encode_prompt`, the very tokens used in
training. A batch holds whole paragraphs' questions. With `prefix_cache` (models where
`attention.supports_shared_prefix`, GPT-2 and Llama among them) a batch is an `attention.SharedPrefixBatch`:
each distinct context encoded once and its keys/values shared by its questions. Without `prefix_cache` (or
for other architectures) it is a `PaddedRowsBatch`: every row carries its full prompt, left-padded, on the
model's own KV cache. Both give each question the logits of its own full prompt; `sampling` turns them into
tokens.

A row stops at EOS or at any token containing a newline; finished rows leave the batch once an eighth of
it is done (compacting copies the per-row keys/values). Once seven eighths have stopped, the rest wait and
are decoded together with the leftovers of later batches (`SharedPrefixBatch.merge`): a few long answers no
longer keep a whole batch's worth of steps to themselves. `generate_answer_sets` decodes several settings
(a strategy grid) together: a row per (question, setting), all from one prefill per batch.
"""
from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm
from transformers import DynamicCache

from ..config import GenerationSettings
from ..data.squad import encode_prompt_counting_cut
from ..model.attention import SharedPrefixBatch, shared_prefix_attention, supports_shared_prefix
from .beams import decode_beams
from .constraints import SpanTrie, restrict, visible_context
from .sampling import choose_rows, logits_processors, question_generator

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


class PaddedRowsBatch:
    """The plain layout: every row its full prompt, left-padded, on the model's own KV cache. Same interface
    as `SharedPrefixBatch` (prefill, step, keep), for any causal LM."""

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
    plans: logits processors and whether to sample), when sampling its generator, and when constrained to its
    context the `SpanTrie` of that context."""
    answers: list[list[int]]
    kinds: list[int]
    generators: list[torch.Generator | None]
    spans: list[SpanTrie | None] | None = None  # None: no row is constrained

    def pick(self, rows: list[int]) -> _Rows:
        return _Rows([self.answers[r] for r in rows], [self.kinds[r] for r in rows],
                     [self.generators[r] for r in rows], None if self.spans is None else [self.spans[r] for r in rows])


def _within_spans(logits: torch.Tensor, rows: _Rows, active) -> torch.Tensor:
    """`logits` (A, V) of the rows `active`, -inf outside its context's spans for each constrained row."""
    if rows.spans is None or all(rows.spans[row] is None for row in active):
        return logits
    return restrict(logits, [None if rows.spans[row] is None else
                             rows.spans[row].allowed_ids(rows.answers[row], logits.device) for row in active])


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
        tokens = choose_rows(plans, _within_spans(batch.step(tokens, live), rows, active), rows.kinds,
                             rows.generators, active)
        work["decode_steps"] += 1
        work["steps_by_rows"][len(active)] = work["steps_by_rows"].get(len(active), 0) + 1


def _finish_leftovers(leftovers: list, plans: list, max_new_tokens: int, stop: set[int], work: dict):
    """Decode the leftover rows of several batches as one batch, to the end."""
    if leftovers:
        batch = SharedPrefixBatch.merge([part for part, _, _ in leftovers])
        tokens = torch.cat([tokens for _, tokens, _ in leftovers])
        parts = [rows for _, _, rows in leftovers]
        rows = _Rows([a for p in parts for a in p.answers], [k for p in parts for k in p.kinds],
                     [g for p in parts for g in p.generators],
                     [t for p in parts for t in (p.spans or [None] * len(p.answers))])
        _decode(batch, tokens, rows, plans, max_new_tokens, stop, work)
        leftovers.clear()


def _prefill(model, tokenizer, batch_prompts: list, shared: bool, max_new_tokens: int, work: dict):
    """A batch in its layout (shared prefixes or padded rows) and its first logits; `work` counts the prompt
    tokens encoded (each distinct context once when shared), the batch and the seconds."""
    batch = (SharedPrefixBatch(model, batch_prompts, max_new_tokens) if shared
             else PaddedRowsBatch(model, batch_prompts, tokenizer.pad_token_id))
    contexts = {tuple(c) for c, _ in batch_prompts} if shared else [c for c, _ in batch_prompts]
    work["prompt_tokens"] += sum(len(c) for c in contexts) + sum(len(q) for _, q in batch_prompts)
    started = time.perf_counter()
    logits = batch.prefill()
    work["prefill_s"] += time.perf_counter() - started
    work["batches"] += 1
    return batch, logits


def generate_answers(model, tokenizer, examples: list[dict], *, settings: GenerationSettings,
                     progress: bool = True, stats: dict | None = None, max_length: int | None = None,
                     prompt_format=None) -> dict[str, str]:
    """{id: answer} for records with `id`, `context`, `question`, decoded per `settings`.

    `stats`, if given, receives the work done: prompt tokens encoded (each batch's distinct contexts once
    with prefix caching), tokens generated, batches, decoding steps (and `steps_by_rows`, {rows: steps}: how many
    steps ran with how many rows), seconds spent encoding prompts (prefill) and decoding, and `prompts_cut`:
    prompts whose context was cut at the end so that prompt + `max_new_tokens` fits `max_length`.
    `prompt_format` (a `prompting.PromptFormat`: worked examples, a chat template) replaces the plain prompt.

    >>> generate_answers(model, tokenizer, [{"id": "q1", "context": "Paris is in France.",
    ...                                      "question": "Where is Paris?"}], settings=GenerationSettings())
    {'q1': 'France'}
    """
    return generate_answer_sets(model, tokenizer, examples, [settings], progress=progress,
                                stats=None if stats is None else [stats], max_length=max_length,
                                prompt_format=prompt_format)[0]


@torch.no_grad()
def generate_answer_sets(model, tokenizer, examples: list[dict], settings: list[GenerationSettings], *,
                         progress: bool = True, stats: list[dict] | None = None, max_length: int | None = None,
                         prompt_format=None) -> list[dict[str, str]]:
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
    if any(s.num_beams > 1 for s in settings):
        return _answer_sets_with_beams(model, tokenizer, examples, settings, progress=progress, stats=stats,
                                       max_length=max_length)
    model.eval()
    limit = max_prompt_tokens(model, first, max_length)
    # a format's examples and template head sit inside each context's prefix, so it stays shared per paragraph
    encode = encode_prompt_counting_cut if prompt_format is None else prompt_format.encode
    encoded = [encode(tokenizer, e["context"], e["question"], limit) for e in examples]
    prompts = [(context_ids, question_ids) for context_ids, question_ids, _ in encoded]
    stop = set(stop_token_ids(tokenizer).tolist())
    shared = first.prefix_cache and supports_shared_prefix(model)
    plans = [(logits_processors(run), run.do_sample) for run in settings]
    spans = _span_tries(tokenizer, examples, encoded, first.max_new_tokens) if any(
        run.constrain_to_context for run in settings) else {}
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
    with shared_prefix_attention(model) if shared else contextlib.nullcontext():
        batches = list(_batches(prompts, max(1, first.batch_size // runs)))
        for b, indices in enumerate(batches):
            ids = [examples[i]["id"] for i in indices]
            batch, logits = _prefill(model, tokenizer, [prompts[i] for i in indices], shared, first.max_new_tokens,
                                     work)
            # a row per (question, setting), a question's rows next to each other (as its context's rows must be)
            rows = _Rows([generated[k].setdefault(qid, []) for qid in ids for k in range(runs)],
                         [k for _ in ids for k in range(runs)],
                         [question_generator(qid, run.seed, model.device) if run.do_sample else None
                          for qid in ids for run in settings],
                         [spans[i] if run.constrain_to_context else None for i in indices for run in settings]
                         if spans else None)
            if runs > 1:
                index = torch.arange(len(ids), device=logits.device).repeat_interleave(runs)
                batch.keep(index)
                logits = logits[index]
            tokens = choose_rows(plans, _within_spans(logits, rows, range(len(rows.answers))), rows.kinds,
                                 rows.generators, range(len(rows.answers)))
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


def _span_tries(tokenizer, examples: list[dict], encoded: list, max_new_tokens: int) -> dict[int, SpanTrie]:
    """{example index: the `SpanTrie` of the context its prompt keeps}, one per distinct context."""
    tries: dict[tuple, SpanTrie] = {}
    for example, (_, _, cut) in zip(examples, encoded):
        key = (example["context"], cut)
        if key not in tries:
            tries[key] = SpanTrie.from_context(tokenizer, visible_context(tokenizer, *key), max_new_tokens)
    return {i: tries[(example["context"], cut)] for i, (example, (_, _, cut)) in enumerate(zip(examples, encoded))}


def _answer_sets_with_beams(model, tokenizer, examples: list[dict], settings: list[GenerationSettings], *,
                            progress: bool, stats: list[dict] | None, max_length: int | None
                            ) -> list[dict[str, str]]:
    """`generate_answer_sets` with beam settings: the others decode together as usual; each beam setting
    decodes on its own (its own prefill per batch, so its questions/s is its own), batch_size // num_beams
    questions a batch, each question's beams adjacent rows of the same layouts."""
    stats = stats or [{} for _ in settings]
    results: list[dict[str, str] | None] = [None] * len(settings)
    plain = [k for k, run in enumerate(settings) if run.num_beams == 1]
    if plain:
        answers = generate_answer_sets(model, tokenizer, examples, [settings[k] for k in plain],
                                       progress=progress, stats=[stats[k] for k in plain], max_length=max_length)
        for k, found in zip(plain, answers):
            results[k] = found
    for k, run in enumerate(settings):
        if run.num_beams > 1:
            results[k] = _beam_answers(model, tokenizer, examples, run, progress=progress, stats=stats[k],
                                       max_length=max_length)
    return results


def _beam_answers(model, tokenizer, examples: list[dict], settings: GenerationSettings, *, progress: bool,
                  stats: dict, max_length: int | None) -> dict[str, str]:
    """{id: answer} by beam search (`beams.decode_beams`), batches of whole paragraphs as for the other settings."""
    model.eval()
    limit = max_prompt_tokens(model, settings, max_length)
    encoded = [encode_prompt_counting_cut(tokenizer, e["context"], e["question"], limit) for e in examples]
    prompts = [(context_ids, question_ids) for context_ids, question_ids, _ in encoded]
    stop = stop_token_ids(tokenizer)
    shared = settings.prefix_cache and supports_shared_prefix(model)
    spans = (_span_tries(tokenizer, examples, encoded, settings.max_new_tokens) if settings.constrain_to_context
             else None)
    work = {"prompts_cut": sum(cut > 0 for _, _, cut in encoded), "prompt_tokens": 0, "batches": 0,
            "decode_steps": 0, "steps_by_rows": {}, "prefill_s": 0.0, "decode_s": 0.0}
    generated: dict[str, list[int]] = {}
    bar = tqdm(total=len(examples), desc=f"answering ({settings.name})", disable=not progress, unit="q")
    with shared_prefix_attention(model) if shared else contextlib.nullcontext():
        for indices in _batches(prompts, max(1, settings.batch_size // settings.num_beams)):
            batch, logits = _prefill(model, tokenizer, [prompts[i] for i in indices], shared, settings.max_new_tokens,
                                     work)
            started = time.perf_counter()
            best = decode_beams(batch, logits, num_beams=settings.num_beams, max_new_tokens=settings.max_new_tokens,
                                stop_ids=stop, spans=None if spans is None else [spans[i] for i in indices],
                                work=work)
            work["decode_s"] += time.perf_counter() - started
            generated.update({examples[i]["id"]: tokens for i, tokens in zip(indices, best)})
            bar.update(len(indices))
    bar.close()
    stats.update(work, generated_tokens=sum(len(tokens) for tokens in generated.values()))
    return {qid: answer_text(tokenizer, tokens) for qid, tokens in generated.items()}
