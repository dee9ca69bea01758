import pytest
import torch

from conftest import SUPER_BOWL, tiny_gpt2, tiny_llama
from loraqa.evaluation.analysis import failure_category
from loraqa.config import GenerationSettings
from loraqa.generation.constraints import SpanTrie, may_end, restrict, span_starts, span_terminators, visible_context
from loraqa.data.squad import encode_prompt, encode_prompt_counting_cut, load_squad
from loraqa.generation.decode import generate_answer_sets, generate_answers, stop_token_ids

TRICKY = 'The Broncos ("Denver") won 24-10, at Levi\'s Stadium; Cafe Noir (1990s) was open.'


def _char_spans(text: str) -> list[str]:
    """Every span by the character rule, written out independently of the token rule: starts after whitespace
    or as a letter/digit after punctuation, ends before whitespace, at the end, or letter/digit -> punctuation."""
    starts = [a for a in range(len(text)) if not text[a].isspace() and
              (a == 0 or text[a - 1].isspace() or (text[a].isalnum() and not text[a - 1].isalnum()))]
    ends = [b for b in range(1, len(text) + 1) if not text[b - 1].isspace() and
            (b == len(text) or text[b].isspace() or (text[b - 1].isalnum() and not text[b].isalnum()))]
    return [text[a:b] for a in starts for b in ends if b > a]


def _ending_paths(trie: SpanTrie, node: int = 0, path: tuple = ()) -> set[tuple]:
    found = {path} if trie.ends[node] else set()
    for token, child in trie.children[node].items():
        found |= _ending_paths(trie, child, path + (token,))
    return found


def test_span_starts_and_ends():
    assert span_starts('a ("Bc") 1-2') == [0, 2, 4, 9, 11]
    assert may_end(" Denver", ",") and may_end(" Denver", " Broncos") and may_end(" Denver", None)
    assert not may_end(" Den", "ver") and not may_end(" (", '"') and not may_end(" ", "2")
    assert may_end("24", "-") and not may_end("-", "10") and not may_end(" caf", "\ufffd")


def test_restrict_masks_outside_allowed():
    scores = torch.tensor([[1., 2., 3.], [4., 5., 6.]])
    out = restrict(scores, [torch.tensor([0, 2]), None])
    assert out.tolist() == [[1., float("-inf"), 3.], [4., 5., 6.]]
    assert restrict(scores, [None, None]) is scores


@pytest.mark.parametrize("tokenizer_name", ["gpt2_tokenizer", "smollm2_tokenizer"])
@pytest.mark.parametrize("context", [SUPER_BOWL, TRICKY])
def test_trie_holds_exactly_the_tokenized_spans(tokenizer_name, context, request):
    """The trie's complete paths are exactly tokenizer(" " + span) for every span of the character rule that
    fits the budget: the span tokens are worked out right for both tokenizers, "(Denver" and "24-10" included."""
    tokenizer, budget = request.getfixturevalue(tokenizer_name), 12
    trie = SpanTrie.from_context(tokenizer, context, max_tokens=budget)
    spans = _char_spans(context)
    encoded = tokenizer([" " + span for span in spans], add_special_tokens=False).input_ids
    expected = {tuple(ids) for ids in encoded if len(ids) <= budget}
    assert _ending_paths(trie) == expected
    assert tuple(tokenizer(' Denver', add_special_tokens=False).input_ids) in expected or context != TRICKY
    # a span's text is the context's: decoding any complete path gives " " + a substring
    assert all(tokenizer.decode(list(p))[1:] in context for p in expected)


def test_trie_allows_stop_tokens_only_where_a_span_ends(gpt2_tokenizer):
    trie = SpanTrie.from_context(gpt2_tokenizer, "Paris is in France.", max_tokens=8)
    enc = lambda text: gpt2_tokenizer(text, add_special_tokens=False).input_ids  # noqa: E731
    stops = set(span_terminators(gpt2_tokenizer))
    assert gpt2_tokenizer.eos_token_id in stops and enc("\n")[0] in stops
    assert stops <= set(stop_token_ids(gpt2_tokenizer).tolist()) and enc(".\n")[0] not in stops
    assert set(trie.allowed(enc(" Paris"))) == stops | {enc(" is")[0]}
    assert set(trie.allowed([])) == {enc(" " + w)[0] for w in ("Paris", "is", "in", "France")}  # "." follows "France"
    assert trie.allowed(enc(" France")) == sorted(stops) + [enc(".")[0]]  # "France" or "France."
    assert trie.allowed(enc(" Paris France")) is None


def test_visible_context_is_what_the_prompt_keeps(gpt2_tokenizer):
    context = "one two three four five six"
    full_ids, question_ids = encode_prompt(gpt2_tokenizer, context, "Q?")
    cut_ids, _ = encode_prompt(gpt2_tokenizer, context, "Q?", len(full_ids) + len(question_ids) - 2)
    kept = gpt2_tokenizer.decode(cut_ids).removeprefix("Context: ")
    assert visible_context(gpt2_tokenizer, context, 2) == kept == "one two three four"
    assert visible_context(gpt2_tokenizer, context, 0) == context


def _brute_force_greedy(model, tokenizer, context: str, question: str, max_new_tokens: int) -> list[int]:
    """Greedy under the same step-wise rule, from the spans enumerated one by one and full forwards: each step
    the most likely token that keeps the answer a prefix of some " " + span, or a stop token where it is one."""
    complete = {tuple(ids) for ids in tokenizer([" " + s for s in _char_spans(context)],
                                                add_special_tokens=False).input_ids}
    terminators = set(span_terminators(tokenizer))
    stops = set(stop_token_ids(tokenizer).tolist())
    context_ids, question_ids = encode_prompt(tokenizer, context, question)
    answer: list[int] = []
    while len(answer) < max_new_tokens:
        allowed = {span[len(answer)] for span in complete if len(span) > len(answer)
                   and span[:len(answer)] == tuple(answer)} | (terminators if tuple(answer) in complete else set())
        with torch.no_grad():
            logits = model(torch.tensor([context_ids + question_ids + answer])).logits[0, -1]
        token = max(allowed, key=lambda t: logits[t].item())
        answer.append(token)
        if token in stops:
            break
    return answer


@pytest.mark.parametrize("prefix_cache", [True, False])
@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_constrained_greedy_equals_brute_force(arch, prefix_cache, gpt2_tokenizer, smollm2_tokenizer):
    tokenizer = gpt2_tokenizer if arch == "gpt2" else smollm2_tokenizer
    model = (tiny_gpt2 if arch == "gpt2" else tiny_llama)(vocab_size=len(tokenizer), seed=3)
    contexts = ["The Broncos (Denver) beat Carolina 24-10.", "Levi's Stadium is in Santa Clara, California."]
    records = [{"id": f"q{i}{j}", "context": c, "question": q} for i, c in enumerate(contexts)
               for j, q in enumerate(["Who won?", "Where?", "What was the score?"])]
    settings = GenerationSettings(max_new_tokens=6, constrain_to_context=True, prefix_cache=prefix_cache)
    answers = generate_answers(model, tokenizer, records, settings=settings, progress=False)
    for r in records:
        expected = _brute_force_greedy(model, tokenizer, r["context"], r["question"], 6)
        assert answers[r["id"]] == tokenizer.decode(expected, skip_special_tokens=True).split("\n")[0].strip()
        assert answers[r["id"]] and answers[r["id"]] in r["context"]


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_every_constrained_answer_is_in_its_context(arch, squad_file, gpt2_tokenizer, smollm2_tokenizer):
    """Greedy, sampled and beam decoding of a random model, grid-style in one call, on the five-question file
    (two of its prompts are cut to fit the window): every answer is a non-empty piece of the context the
    prompt kept, in both batch layouts; unconstrained greedy decoding in the same call is not."""
    tokenizer = gpt2_tokenizer if arch == "gpt2" else smollm2_tokenizer
    model = (tiny_gpt2 if arch == "gpt2" else tiny_llama)(vocab_size=len(tokenizer))
    records = list(load_squad(str(squad_file)))
    for prefix_cache in (True, False):
        base = GenerationSettings(max_new_tokens=8, prefix_cache=prefix_cache, batch_size=8)
        runs = [GenerationSettings(**{**vars(base), **changes}) for changes in (
            {}, {"constrain_to_context": True}, {"constrain_to_context": True, "do_sample": True, "top_k": 50},
            {"constrain_to_context": True, "num_beams": 2})]
        plain, *constrained = generate_answer_sets(model, tokenizer, records, runs, progress=False, max_length=1024)
        assert not all(answer in r["context"] for r, answer in zip(records, plain.values()))
        for answers in constrained:
            for r in records:
                seen = visible_context(tokenizer, r["context"], encode_prompt_counting_cut(
                    tokenizer, r["context"], r["question"], 1024 - base.max_new_tokens)[2])
                assert answers[r["id"]] and answers[r["id"]] in seen, (r["id"], answers[r["id"]])
                assert failure_category(answers[r["id"]], ["-"], r["context"], 0.0, 0.0) != "answer not in context"
        assert len(seen) < len(r["context"])  # the last record's prompt was cut
