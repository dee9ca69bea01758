"""Prompts for an untuned model's best chance: worked examples before the question, the model's chat template.

Input: the training file (where examples come from), `few_shot` K and `chat_template`. Output: a
`PromptFormat` whose `encode` gives the same (prefix ids, question ids, cut) triple as
`data.squad.encode_prompt_counting_cut`, the examples and the template's opening inside the prefix:

    plain, K = 1:  Context: {c1}\\nQuestion: {q1}\\nAnswer: {a1}\\n\\n | Context: {context} | \\nQuestion: {q}\\nAnswer:
    chat, K = 0:   <|im_start|>system ...<|im_end|>\\n<|im_start|>user\\n{INSTRUCTION}\\n\\nContext: | {context} |
                   \\nQuestion: {q}<|im_end|>\\n<|im_start|>assistant\\n

(| marks the pieces: prefix head, " " + context, question part). The examples are one fixed set shared by
every question, so every question of a paragraph still shares one prefix and the decoder encodes it once.
With the chat template the examples are earlier user/assistant turns, and the instruction opens the first
user message. K = 0 without the template is the plain prompt, token for token.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass

import datasets

from ..config import ConfigError
from .squad import (CONTEXT_HEADER, QUESTION_TEMPLATE, SquadFormatError, encode_prompt_counting_cut, format_prompt,
                    heldout_split)

INSTRUCTION = "Answer the question with a short span copied from the context."
# Examples teach the format, not the facts: paragraphs of at most this many characters (SQuAD's median is about
# 680) keep three of them under ~600 tokens, so a 3-shot prompt costs about twice a zero-shot one.
EXAMPLE_MAX_CHARS = 800
# stand-ins rendered through the chat template to find where it puts the context and the question
_CONTEXT_MARK, _QUESTION_MARK = "\uE000loraqa-context\uE000", "\uE000loraqa-question\uE000"


@dataclass(frozen=True)
class PromptFormat:
    """What surrounds a question's context: `head` (before " " + context), `question_template` (after it, with
    a `{question}` field) and whether the tokenizer's own BOS goes first (a chat template writes its own)."""
    head: str = CONTEXT_HEADER
    question_template: str = QUESTION_TEMPLATE
    bos: bool = True
    examples: tuple[dict, ...] = ()
    chat_template: bool = False

    def encode(self, tokenizer, context: str, question: str, max_prompt_tokens: int | None = None
               ) -> tuple[list[int], list[int], int]:
        """(prefix ids, question ids, context tokens cut): `data.squad.encode_prompt_counting_cut` in this format."""
        return encode_prompt_counting_cut(tokenizer, context, question, max_prompt_tokens, head=self.head,
                                          question_template=self.question_template, bos=self.bos)

    def extra_tokens(self, tokenizer) -> int:
        """Tokens this format adds to a prompt beyond the plain one (examples, instruction, template): what an
        evaluation adds to its max_length so that each question's own context is cut exactly as without it."""
        probe = ("Paris is in France.", "Where is Paris?")
        ours = self.encode(tokenizer, *probe)
        plain = encode_prompt_counting_cut(tokenizer, *probe)
        return len(ours[0]) + len(ours[1]) - len(plain[0]) - len(plain[1])

    def describe(self) -> dict:
        """What an evaluation JSON records about its prompt."""
        return {"few_shot": len(self.examples), "chat_template": self.chat_template,
                "instruction": INSTRUCTION if self.chat_template else None,
                "examples": [{"id": e["id"], "title": e["title"]} for e in self.examples],
                "head": self.head, "question_template": self.question_template}


def _key(seed: int, text: str) -> str:
    return hashlib.sha1(f"{seed}:{text}".encode()).hexdigest()


def choose_examples(dataset: datasets.Dataset, k: int, *, articles: int, seed: int = 0) -> list[dict]:
    """K worked examples from the training file's `articles` held-out articles (`data.squad.heldout_split`, same seed),
    which training with that many held-out articles never sees, taken from the articles that a validation
    subset reaches last.

    `data.squad.take_subset` takes paragraphs in sha1(f"{seed}:{context}") order, so an article enters a validation
    subset with its first paragraph in that order. Articles are visited latest-entering first, their paragraphs
    in reverse subset order; each paragraph of at most `EXAMPLE_MAX_CHARS` characters gives one question (its
    first in the subset rule's order) until K. Every validation subset that stops before those articles shares
    no article with the examples (`check_disjoint` enforces it); the K = 1 example is the first of K = 3's.
    """
    if k == 0:
        return []
    heldout = heldout_split(dataset, articles, seed)[1]
    paragraphs: dict[str, list[dict]] = {}
    for record in heldout:
        paragraphs.setdefault(record["context"], []).append(record)
    by_article: dict[str, list[str]] = {}
    for context in sorted(paragraphs, key=lambda c: _key(seed, c), reverse=True):
        by_article.setdefault(paragraphs[context][0]["title"], []).append(context)
    # an article's entry point is its earliest paragraph, the last in its reversed list
    order = sorted(by_article, key=lambda title: _key(seed, by_article[title][-1]), reverse=True)
    examples = []
    for title in order:
        for context in by_article[title]:
            if len(context) <= EXAMPLE_MAX_CHARS and len(examples) < k:
                examples.append(min(paragraphs[context], key=lambda r: _key(seed, r["id"])))
    if len(examples) < k:
        raise SquadFormatError(f"few_shot={k}: the {articles} held-out articles have only {len(examples)} "
                               f"paragraphs of at most {EXAMPLE_MAX_CHARS} characters")
    return examples


def check_disjoint(examples: list[dict] | tuple[dict, ...], records: list[dict]) -> None:
    """Refuse an evaluation whose questions share an article (or a question) with its worked examples."""
    ids, titles = {r["id"] for r in records}, {r["title"] for r in records if r.get("title")}
    for example in examples:
        if example["id"] in ids or example["title"] in titles:
            raise ConfigError(f"few_shot: example {example['id']!r} comes from article {example['title']!r}, which "
                              f"the evaluated questions include: evaluate fewer questions or hold out more "
                              f"articles for the examples (few_shot_articles)")


def _plain_head(examples) -> str:
    shots = "".join(f"{format_prompt(e['context'], e['question'])} {e['answers']['text'][0]}\n\n" for e in examples)
    return shots + CONTEXT_HEADER


def _chat_messages(examples, context: str, question: str) -> list[dict]:
    """The instruction opens the first user message; each example is a user turn and its answer's turn."""
    def user(c: str, q: str) -> str:
        return f"{CONTEXT_HEADER} {c}\nQuestion: {q.strip()}"

    turns = [(user(e["context"], e["question"]), e["answers"]["text"][0]) for e in examples]
    turns.append((user(context, question), None))
    messages = []
    for i, (content, answer) in enumerate(turns):
        messages.append({"role": "user", "content": f"{INSTRUCTION}\n\n{content}" if i == 0 else content})
        if answer is not None:
            messages.append({"role": "assistant", "content": answer})
    return messages


def _chat_pieces(tokenizer, examples, model_name: str) -> tuple[str, str]:
    """(head, question template) of the model's chat template, found by rendering stand-ins for the context and
    the question. The context must come before the question, each once, for the prefix to be shared."""
    if not getattr(tokenizer, "chat_template", None):
        raise ConfigError(f"chat_template=true: the tokenizer of model {model_name!r} has no chat template")
    text = tokenizer.apply_chat_template(_chat_messages(examples, _CONTEXT_MARK, _QUESTION_MARK),
                                         tokenize=False, add_generation_prompt=True)
    marker = f"{CONTEXT_HEADER} {_CONTEXT_MARK}"
    if text.count(marker) != 1 or text.count(_QUESTION_MARK) != 1 or text.index(marker) > text.index(_QUESTION_MARK):
        raise ConfigError(f"chat_template=true: the chat template of model {model_name!r} does not put the context "
                          f"once, before the question, in the user's message; its prompts cannot share a prefix")
    before, after = text.split(marker)
    return before + CONTEXT_HEADER, after.replace(_QUESTION_MARK, "{question}")


def prompt_format(tokenizer, *, examples: list[dict] = (), chat_template: bool = False,
                  model_name: str = "") -> PromptFormat:
    """The format for these examples, plain or in the model's chat template (a ConfigError naming the model
    when its tokenizer has none).

    >>> prompt_format(gpt2_tokenizer).encode(gpt2_tokenizer, "Paris is in France.", "Where is Paris?")
    ([21947, 25, 6342, 318, 287, 4881, 13], [198, 24361, 25, 6350, 318, 6342, 30, 198, 33706, 25], 0)
    """
    examples = tuple(examples)
    if not chat_template:
        return PromptFormat(head=_plain_head(examples), examples=examples)
    head, question_template = _chat_pieces(tokenizer, examples, model_name or tokenizer.name_or_path)
    return PromptFormat(head=head, question_template=question_template, bos=False, examples=examples,
                        chat_template=True)
