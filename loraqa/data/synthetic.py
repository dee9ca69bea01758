"""Made-up SQuAD v1.1 files for checks that must run where the fetched SQuAD is not (a bare accelerator machine).

`synthetic_squad(n)` -> a dict in SQuAD v1.1's JSON shape (what `squad.read_squad_json` reads and validates):
articles of paragraphs that state invented facts ("The capital of Velora is Tamsin."), amid a varying number of
filler sentences so that prompt lengths vary as real ones do, and one question per fact whose answer is a span
of its paragraph. Deterministic in `seed`. Scores on it mean nothing; speed, memory and greedy agreement
between two ways of decoding do not depend on what the text says.
"""
from __future__ import annotations

import random

SYLLABLES = ("ka", "lo", "mi", "ren", "ta", "vo", "sel", "dun", "ar", "bel", "cor", "fi", "gan", "hul", "is", "jor")
FACTS = (("capital", "What is the capital of {e}?"), ("founder", "Who founded {e}?"),
         ("river", "Which river flows through {e}?"), ("emblem", "What is the emblem of {e}?"),
         ("language", "What language is spoken in {e}?"), ("festival", "Which festival is held in {e}?"))
FILLER = ("Travellers often describe the roads as long and quiet.", "Records from that time are incomplete.",
          "Many visitors arrive in the spring.", "The climate is mild for most of the year.",
          "Local markets sell grain, wool and salt.", "Several old bridges still stand.")


def _name(rng: random.Random) -> str:
    return "".join(rng.choice(SYLLABLES) for _ in range(rng.randint(2, 3))).capitalize()


def synthetic_squad(n_questions: int, *, seed: int = 0, paragraphs_per_article: int = 3) -> dict:
    """{"version": "1.1", "data": [...]} with exactly `n_questions` answerable questions (ids `syn-<k>`),
    one to six per paragraph.

    >>> qa = synthetic_squad(1)["data"][0]["paragraphs"][0]["qas"][0]
    >>> sorted(qa), qa["id"]
    (['answers', 'id', 'question'], 'syn-0')
    """
    rng = random.Random(seed)
    articles, paragraphs, made = [], [], 0
    while made < n_questions:
        entity = _name(rng)
        facts = rng.sample(FACTS, k=min(rng.randint(1, len(FACTS)), n_questions - made))
        sentences = [rng.choice(FILLER) for _ in range(rng.randint(0, 12))]
        values = {attribute: _name(rng) for attribute, _ in facts}
        for attribute, _ in facts:
            sentences.insert(rng.randint(0, len(sentences)), f"The {attribute} of {entity} is {values[attribute]}.")
        context = " ".join(sentences)
        qas = []
        for attribute, question in facts:
            answer = values[attribute]
            start = context.index(f"The {attribute} of {entity} is {answer}.") + len(f"The {attribute} of {entity} is ")
            qas.append({"id": f"syn-{made}", "question": question.format(e=entity),
                        "answers": [{"text": answer, "answer_start": start}]})
            made += 1
        paragraphs.append({"context": context, "qas": qas})
        if len(paragraphs) == paragraphs_per_article or made == n_questions:
            articles.append({"title": f"Synthetic_{len(articles)}", "paragraphs": paragraphs})
            paragraphs = []
    return {"version": "1.1", "data": articles}
