import pytest
import torch

from conftest import tiny_gpt2, tiny_llama
from loraqa.model.attention import SharedPrefixBatch, shared_prefix_attention
from loraqa.generation.beams import decode_beams
from loraqa.config import ConfigError, GenerationSettings
from loraqa.generation.constraints import SpanTrie
from loraqa.data.squad import encode_prompt, load_squad
from loraqa.generation.decode import PaddedRowsBatch, answer_text, generate_answers, stop_token_ids

CONTEXTS = ["The Broncos (Denver) beat Carolina 24-10.", "Levi's Stadium is in Santa Clara, California."]
QUESTIONS = ["Who won?", "Where?", "What was the score?"]


def _model(arch, tokenizer, seed=1):
    return (tiny_gpt2 if arch == "gpt2" else tiny_llama)(vocab_size=len(tokenizer), seed=seed)


def _reference(model, prompt: list[int], num_beams: int, max_new_tokens: int, stops: list[int], pad: int,
               spans: SpanTrie | None = None) -> list[int]:
    ids = torch.tensor([prompt])
    allowed = None
    if spans is not None:
        vocab = list(range(model.config.vocab_size))

        def allowed(batch_id, sent):
            found = spans.allowed(sent[len(prompt):].tolist())
            return vocab if found is None else found
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), num_beams=num_beams, do_sample=False,
                             length_penalty=1.0, early_stopping=False, eos_token_id=stops,
                             max_new_tokens=max_new_tokens, pad_token_id=pad, prefix_allowed_tokens_fn=allowed)
    return out[0, len(prompt):].tolist()


def _batched(model, prompts, num_beams, max_new_tokens, stops, pad, shared, spans=None) -> list[list[int]]:
    if shared:
        with shared_prefix_attention(model):
            batch = SharedPrefixBatch(model, prompts, max_new_tokens)
            return decode_beams(batch, batch.prefill(), num_beams=num_beams, max_new_tokens=max_new_tokens,
                                stop_ids=torch.tensor(stops), spans=spans)
    batch = PaddedRowsBatch(model, prompts, pad)
    return decode_beams(batch, batch.prefill(), num_beams=num_beams, max_new_tokens=max_new_tokens,
                        stop_ids=torch.tensor(stops), spans=spans)


@pytest.mark.parametrize("shared", [True, False])
@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_beams_equal_generate(arch, shared, gpt2_tokenizer, smollm2_tokenizer):
    """Every question's beam search, batched (questions of one context sharing its keys/values, or padded
    rows), is token for token `model.generate(num_beams=N)` on its prompt alone. A random tenth of the
    vocabulary stops a beam, so that beams end at different lengths, finished hypotheses compete and the
    early-stopping rule is exercised, not only the length limit."""
    tokenizer = gpt2_tokenizer if arch == "gpt2" else smollm2_tokenizer
    model = _model(arch, tokenizer)
    stops = torch.randperm(len(tokenizer), generator=torch.Generator().manual_seed(0))[:len(tokenizer) // 10].tolist()
    prompts = [encode_prompt(tokenizer, c, q) for c in CONTEXTS for q in QUESTIONS]
    lengths = set()
    for num_beams in (2, 4):
        got = _batched(model, prompts, num_beams, 8, stops, tokenizer.pad_token_id, shared)
        for (context_ids, question_ids), tokens in zip(prompts, got):
            expected = _reference(model, context_ids + question_ids, num_beams, 8, stops, tokenizer.pad_token_id)
            assert tokens == expected
            lengths.add(len(tokens))
    if arch == "llama":  # peaked random weights (conftest): beams really end at stop tokens, at several lengths
        assert len(lengths) > 2


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_constrained_beams_equal_generate_with_allowed_tokens(arch, gpt2_tokenizer, smollm2_tokenizer):
    """Span-constrained beams are generate's beams under `prefix_allowed_tokens_fn` (the same trie)."""
    tokenizer = gpt2_tokenizer if arch == "gpt2" else smollm2_tokenizer
    model = _model(arch, tokenizer, seed=2)
    stops = stop_token_ids(tokenizer).tolist()
    prompts = [encode_prompt(tokenizer, c, q) for c in CONTEXTS for q in QUESTIONS]
    tries = {c: SpanTrie.from_context(tokenizer, c, 8) for c in CONTEXTS}
    spans = [tries[c] for c in CONTEXTS for _ in QUESTIONS]
    got = _batched(model, prompts, 3, 8, stops, tokenizer.pad_token_id, True, spans)
    for (context_ids, question_ids), trie, tokens, context in zip(prompts, spans, got, CONTEXTS * 3):
        assert tokens == _reference(model, context_ids + question_ids, 3, 8, stops, tokenizer.pad_token_id, trie)
    assert all(answer_text(tokenizer, t) in c for t, c in zip(got, [c for c in CONTEXTS for _ in QUESTIONS]))


def test_num_beams_through_generate_answers(squad_file, smollm2_tokenizer):
    """`generate_answers` with num_beams: the answers of `model.generate` with the EOS and newline tokens as
    stop tokens, cut as greedy answers are, for both layouts; num_beams 1 is greedy decoding as before."""
    tokenizer, records = smollm2_tokenizer, list(load_squad(str(squad_file)))[:3]
    model = _model("llama", tokenizer, seed=4)
    stops = stop_token_ids(tokenizer).tolist()
    expected = {r["id"]: answer_text(tokenizer, _reference(model, sum(encode_prompt(tokenizer, r["context"],
                                                                                    r["question"]), []),
                                                           2, 6, stops, tokenizer.pad_token_id)) for r in records}
    for prefix_cache in (True, False):
        settings = GenerationSettings(max_new_tokens=6, num_beams=2, prefix_cache=prefix_cache)
        assert generate_answers(model, tokenizer, records, settings=settings, progress=False) == expected


def test_beam_settings_checked_and_named():
    with pytest.raises(ConfigError, match="num_beams=0"):
        GenerationSettings(num_beams=0)
    with pytest.raises(ConfigError, match="num_beams=2: beam search is deterministic"):
        GenerationSettings(num_beams=2, do_sample=True)
    names = [GenerationSettings(**kw).name for kw in (
        {}, {"constrain_to_context": True}, {"num_beams": 4}, {"num_beams": 4, "constrain_to_context": True},
        {"do_sample": True, "top_k": 50}, {"do_sample": True, "top_k": 50, "constrain_to_context": True})]
    assert names == ["greedy", "greedy,in_context", "num_beams=4", "num_beams=4,in_context", "top_k=50",
                     "top_k=50,in_context"]
