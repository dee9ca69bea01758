"""A context -> the token sequences an extractive answer can be: a trie of its spans, and scores masked to it.

An answer is trained as `" " + answer + EOS`, so the tokens of a span are those of `" " + context[a:b]`, not
always a slice of the context's own tokens. For byte-level BPE (GPT-2, SmolLM2/Llama) pre-tokenization cuts
before every space that follows a non-space, so:
- a span that starts after a space ("the Denver Broncos" -> " Denver Broncos") is exactly a run of the
  context's tokens;
- a span that starts after punctuation ('("Denver' -> " Denver") differs only in its first word, which the
  leading space re-tokenizes.
`SpanTrie.from_context` therefore tokenizes `" " + context[a:]` for every start `a` of a word (a character after
whitespace, or a letter/digit after punctuation) and marks where a span may end (before whitespace, at the end,
or between a letter/digit and punctuation: "Broncos" in "Broncos,"). EOS, and the newline tokens with nothing
but whitespace before their newline, are allowed exactly where a span may end, so a stopped answer's text
(cut at the newline, stripped) is `context[a:b]` itself. Tested against tokenizing every span separately.

    >>> trie = SpanTrie.from_context(gpt2_tokenizer, "Paris is in France.", max_tokens=8)
    >>> [gpt2_tokenizer.decode([t]) for t in trie.allowed([6342])]  # after " Paris": stop, or " is"
    ['\\n', '\\n\\n', '\\n\\xa0', '<|endoftext|>', ' is']
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch

_TEXTS: dict[tuple, list[str]] = {}


def token_texts(tokenizer) -> list[str]:
    """Each vocabulary entry decoded on its own (a piece of a multi-byte character decodes to U+FFFD)."""
    key = (tokenizer.name_or_path, len(tokenizer), tokenizer.eos_token_id)
    if key not in _TEXTS:
        _TEXTS[key] = tokenizer.batch_decode([[i] for i in range(len(tokenizer))])
    return _TEXTS[key]


def span_terminators(tokenizer) -> list[int]:
    """EOS and the tokens whose text is whitespace up to a newline: stopping on them adds nothing to an answer."""
    texts = token_texts(tokenizer)
    return sorted({tokenizer.eos_token_id} | {i for i, t in enumerate(texts) if "\n" in t
                                               and not t.split("\n", 1)[0].strip()})


def _word(char: str) -> bool:
    return char.isalnum() or char == "\ufffd"  # a piece of a multi-byte character belongs to its word


def span_starts(text: str) -> list[int]:
    """Characters where an answer may start: after whitespace (or at 0), or a letter/digit after punctuation.

    >>> span_starts('a ("Bc") 1-2')
    [0, 2, 4, 9, 11]
    """
    return [a for a, char in enumerate(text) if not char.isspace()
            and (a == 0 or text[a - 1].isspace() or (_word(char) and not _word(text[a - 1])))]


def may_end(before: str, after: str | None) -> bool:
    """Whether an answer may end between text `before` and `after` (None: the end of the text): never after
    whitespace; before whitespace, at the end, or between a letter/digit and punctuation."""
    if not before or before[-1].isspace():
        return False
    if after is None:
        return True
    return bool(after) and (after[0].isspace() or (_word(before[-1]) and not _word(after[0])))


def visible_context(tokenizer, context: str, cut: int) -> str:
    """The part of `context` a prompt keeps when `cut` tokens were cut off its end (`data.squad.encode_prompt`)."""
    if not cut:
        return context
    body = tokenizer(" " + context, add_special_tokens=False).input_ids
    return tokenizer.decode(body[:len(body) - cut]).removeprefix(" ").rstrip("\ufffd")


class SpanTrie:
    """The token sequences of a context's spans (each at most `max_tokens`), and where each may stop.

    Node 0 is the root; `children[n]` maps a token to the next node, `ends[n]` says a span may end there.
    """

    def __init__(self, sequences: Iterable[tuple[Sequence[int], Sequence[bool]]], terminators: Sequence[int]):
        self.children: list[dict[int, int]] = [{}]
        self.ends: list[bool] = [False]
        self.terminators = list(terminators)
        self._allowed: dict[tuple, torch.Tensor] = {}
        for tokens, ends in sequences:
            node = 0
            for token, end in zip(tokens, ends):
                child = self.children[node].get(token)
                if child is None:
                    child = self.children[node][token] = len(self.children)
                    self.children.append({})
                    self.ends.append(False)
                node = child
                self.ends[node] = self.ends[node] or end

    @classmethod
    def from_context(cls, tokenizer, context: str, max_tokens: int) -> SpanTrie:
        """Every span of `context` that starts at a `span_starts` character, as the tokens of " " + span."""
        texts, starts = token_texts(tokenizer), span_starts(context)
        # a window ends at whitespace after a non-space or at the end: a pre-token boundary, so its tokens are
        # those of the whole suffix; 6 characters a token mostly covers max_tokens + 1 (else: the whole suffix)
        def window(a: int, chars: int) -> str:
            w = a + chars
            while w < len(context) and not (context[w].isspace() and not context[w - 1].isspace()):
                w += 1
            return " " + context[a:w]

        windows = [window(a, 6 * max_tokens) for a in starts]
        encoded = tokenizer(windows, add_special_tokens=False).input_ids
        for i, (a, tokens) in enumerate(zip(starts, encoded)):
            if len(tokens) < max_tokens + 1 and len(windows[i]) - 1 < len(context) - a:
                encoded[i] = tokenizer(" " + context[a:], add_special_tokens=False).input_ids

        def marked(tokens: list[int]) -> tuple[list[int], list[bool]]:
            tokens = tokens[:max_tokens + 1]  # one past the budget: says whether the last kept token may end
            ends = [may_end(texts[t], texts[tokens[k + 1]] if k + 1 < len(tokens) else None)
                    for k, t in enumerate(tokens)]
            return tokens[:max_tokens], ends[:max_tokens]

        # a suffix cut at max_tokens + 1 tokens ends mid-text: its last token's "end" was only judged from the
        # next token, which is there because of the +1
        return cls((marked(tokens) for tokens in encoded), span_terminators(tokenizer))

    def node(self, tokens: Sequence[int]) -> int | None:
        """The node after `tokens`, or None when they are not (a prefix of) a span."""
        node = 0
        for token in tokens:
            node = self.children[node].get(token)
            if node is None:
                return None
        return node

    def allowed(self, tokens: Sequence[int]) -> list[int] | None:
        """Tokens that may follow `tokens` (the terminators where a span may end); None when `tokens` have left
        the trie already (a finished row, whose next token is ignored)."""
        node = self.node(tokens)
        if node is None:
            return None
        return (self.terminators if self.ends[node] else []) + sorted(self.children[node])

    def allowed_ids(self, tokens: Sequence[int], device) -> torch.Tensor | None:
        """`allowed` as a tensor on `device`, kept per node."""
        node = self.node(tokens)
        if node is None:
            return None
        key = (node, str(device))
        if key not in self._allowed:
            self._allowed[key] = torch.tensor(self.allowed(tokens), dtype=torch.long, device=device)
        return self._allowed[key]


def restrict(scores: torch.Tensor, allowed: list[torch.Tensor | None]) -> torch.Tensor:
    """`scores` (A, V) with -inf outside each row's allowed ids (a row with None keeps all of its scores).

    >>> restrict(torch.tensor([[1., 2., 3.], [4., 5., 6.]]), [torch.tensor([0, 2]), None])
    tensor([[1., -inf, 3.],
            [4., 5., 6.]])
    """
    if all(ids is None for ids in allowed):
        return scores
    free = [i for i, ids in enumerate(allowed) if ids is None]
    rows = torch.cat([torch.full((len(ids),), i, dtype=torch.long) for i, ids in enumerate(allowed)
                      if ids is not None]).to(scores.device)
    columns = torch.cat([ids for ids in allowed if ids is not None])
    out = torch.full_like(scores, float("-inf"))
    out[rows, columns] = scores[rows, columns]
    if free:
        out[free] = scores[free]
    return out
