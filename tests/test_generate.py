import pytest
import torch
from transformers import LogitsProcessorList

from conftest import tiny_gpt2, tiny_llama
from loraqa.model.attention import SharedPrefixBatch, shared_prefix_attention, supports_shared_prefix
from loraqa.config import ConfigError, GenerationSettings
from loraqa.data.squad import load_squad
from loraqa.evaluation.evaluate import one_by_one_answers
from loraqa.generation.decode import (PaddedRowsBatch, _decode, _Rows, answer_text, generate_answer_sets,
                                      generate_answers, stop_token_ids)
from test_attention import _prompts


def _records(squad_file, extra: int = 0):
    records = list(load_squad(str(squad_file)))
    for i in range(extra):  # more questions on the first paragraph: prefix sharing and several batches
        records.append({**records[0], "id": f"extra{i}", "question": f"What happened in minute {i}?"})
    return records


def test_stop_tokens_and_answer_text(gpt2_tokenizer):
    stops = set(stop_token_ids(gpt2_tokenizer).tolist())
    assert gpt2_tokenizer.eos_token_id in stops
    assert gpt2_tokenizer.convert_tokens_to_ids("Ċ") in stops  # "\n"
    assert gpt2_tokenizer.convert_tokens_to_ids(".Ċ") in stops  # ".\n"
    assert gpt2_tokenizer.convert_tokens_to_ids("Ġthe") not in stops
    ids = gpt2_tokenizer(" Denver Broncos.\nQuestion: more").input_ids
    assert answer_text(gpt2_tokenizer, ids) == "Denver Broncos."


def _newline_model(tokenizer):
    """A GPT-2 whose every next token is '\\n': decoding must stop after the first step."""
    model = tiny_gpt2(vocab_size=len(tokenizer))
    newline = tokenizer.convert_tokens_to_ids("Ċ")
    with torch.no_grad():
        model.transformer.ln_f.weight.zero_()
        model.transformer.wte.weight[newline] = 3.0
        model.transformer.ln_f.bias.copy_(model.transformer.wte.weight[newline])
    return model


def _forward_counter(model) -> list:
    """Forward calls of `model`; each must run without autograd (a graph would make decoding slow)."""
    calls = []

    def count(module, args):
        assert not torch.is_grad_enabled()
        calls.append(1)

    model.register_forward_pre_hook(count)
    return calls


def test_decoding_stops_at_newline_without_wasted_steps(gpt2_tokenizer, squad_file):
    model = _newline_model(gpt2_tokenizer)
    calls, work = _forward_counter(model), {}
    answers = generate_answers(model, gpt2_tokenizer, _records(squad_file), settings=GenerationSettings(),
                               progress=False, stats=work)
    assert set(answers.values()) == {""}
    assert work["decode_steps"] == 0  # the first generated token (from the question pass) stops every row
    assert len(calls) == 2  # prefill only: the contexts, then the questions


def test_max_new_tokens_caps_the_steps(gpt2_tokenizer, squad_file, monkeypatch):
    """With no stop token no row ends early, so the cap alone ends decoding: the prefill gives each answer its
    first token and exactly max_new_tokens - 1 steps the rest."""
    import loraqa.generation.decode as decode

    monkeypatch.setattr(decode, "stop_token_ids", lambda tokenizer: torch.tensor([], dtype=torch.long))
    model = tiny_gpt2(vocab_size=len(gpt2_tokenizer))
    calls, work = _forward_counter(model), {}
    answers = generate_answers(model, gpt2_tokenizer, _records(squad_file), progress=False, stats=work,
                               settings=GenerationSettings(max_new_tokens=4))
    assert work["decode_steps"] == 3 and len(calls) == 2 + 3  # contexts, questions, then one forward a step
    assert len(answers) == 5


@pytest.mark.parametrize("make_model, tokenizer_name", [(tiny_gpt2, "gpt2_tokenizer"), (tiny_llama, "smollm2_tokenizer")])
def test_batched_greedy_equals_one_by_one_generate(request, make_model, tokenizer_name, squad_file):
    tokenizer = request.getfixturevalue(tokenizer_name)
    model = make_model(vocab_size=len(tokenizer))
    records = _records(squad_file, extra=6)
    settings = GenerationSettings(max_new_tokens=6, batch_size=4)
    reference = one_by_one_answers(model, tokenizer, records, settings)
    assert len(set(reference.values())) > 1
    for prefix_cache in (True, False):
        for batch_size in (1, 4, 16):
            ours = generate_answers(model, tokenizer, records, progress=False,
                                    settings=GenerationSettings(max_new_tokens=6, batch_size=batch_size,
                                                                prefix_cache=prefix_cache))
            assert ours == reference, (prefix_cache, batch_size)


@pytest.mark.parametrize("make_model", [tiny_gpt2, tiny_llama])
@torch.no_grad()
def test_finished_rows_of_a_merged_batch_stay_inside_their_buffer(make_model):
    """A merged batch whose rows are at different depths: the row 5 tokens ahead reaches max_new_tokens while
    the others still decode. It must neither write past its key/value buffer (this raised IndexError) nor
    advance its position, and every answer must be that of its own full prompt, to the last token."""
    model, max_new = make_model(vocab_size=100), 6
    prompts = _prompts(100)
    # 16 rows behind: one finished row alone is not compacted away (that waits for an eighth of the rows)
    ahead, behind = prompts[:1], [prompts[3 + i % 3] for i in range(16)]
    behind.sort(key=lambda prompt: len(prompt[0]))  # a context's rows next to each other
    with shared_prefix_attention(model):
        first = SharedPrefixBatch(model, ahead, max_new_tokens=max_new)
        tokens_first = first.prefill().argmax(-1)
        answers_first = [[]]
        for _ in range(5):  # row 0: 5 tokens decoded before the merge
            answers_first[0].append(int(tokens_first[0]))
            tokens_first = first.step(tokens_first).argmax(-1)
        second = SharedPrefixBatch(model, behind, max_new_tokens=max_new)
        tokens_second = second.prefill().argmax(-1)
        merged = SharedPrefixBatch.merge([first, second])
        rows = _Rows(answers_first + [[] for _ in behind], [0] * 17, [None] * 17)
        work = {"decode_steps": 0, "steps_by_rows": {}, "decode_s": 0.0}
        _decode(merged, torch.cat([tokens_first, tokens_second]), rows, [(LogitsProcessorList(), False)],
                max_new, set(), work)
    assert [len(a) for a in rows.answers] == [max_new] * 17
    assert int(merged.suffix_lengths.max()) <= merged.capacity
    for prompt, answer in zip(ahead + behind, rows.answers):  # the reference: one full prompt, greedy
        reference = PaddedRowsBatch(model, [prompt], pad_token_id=0)
        expected = [int(reference.prefill().argmax(-1))]
        while len(expected) < max_new:
            expected.append(int(reference.step(torch.tensor(expected[-1:])).argmax(-1)))
        assert answer == expected


def test_leftover_rows_finish_with_other_batches(gpt2_tokenizer, squad_file, monkeypatch):
    """With answers of many lengths (every fifth token stops a row), the rows left at the end of a batch are
    finished together with later batches' and the answers stay those of one-by-one `generate`."""
    import loraqa.generation.decode as generate

    monkeypatch.setattr(generate, "stop_token_ids", lambda tokenizer: torch.arange(0, len(tokenizer), 5))
    merges = []
    merge = SharedPrefixBatch.merge
    monkeypatch.setattr(SharedPrefixBatch, "merge", staticmethod(lambda parts: merges.append(len(parts)) or merge(parts)))
    model = tiny_gpt2(vocab_size=len(gpt2_tokenizer))
    with torch.no_grad():  # larger weights: the tiny model's answers differ from row to row, and in length
        for parameter in model.parameters():
            parameter.mul_(8)
    records = _records(squad_file, extra=40)
    settings = GenerationSettings(max_new_tokens=16, batch_size=16)
    assert generate_answers(model, gpt2_tokenizer, records, settings=settings, progress=False) == \
        one_by_one_answers(model, gpt2_tokenizer, records, settings)
    assert merges and max(merges) > 1
    merges.clear()
    model = tiny_gpt2(vocab_size=len(gpt2_tokenizer))  # sampled: lengths vary anyway, logits stay small
    sampled = GenerationSettings(max_new_tokens=16, batch_size=16, do_sample=True, temperature=1.5, seed=3)
    ours = generate_answers(model, gpt2_tokenizer, records, settings=sampled, progress=False)
    assert merges and ours == generate_answers(model, gpt2_tokenizer, records, progress=False,
                                               settings=GenerationSettings(**{**vars(sampled), "batch_size": 1}))
    merges.clear()  # a grid: rows of two settings decoded together, leftovers of both merged
    greedy = GenerationSettings(max_new_tokens=16, batch_size=16)
    assert generate_answer_sets(model, gpt2_tokenizer, records, [greedy, sampled], progress=False) == \
        [generate_answers(model, gpt2_tokenizer, records, settings=greedy, progress=False), ours]
    assert merges


def test_shared_prefix_work_and_attention_restored(gpt2_tokenizer, squad_file):
    model = tiny_gpt2(vocab_size=len(gpt2_tokenizer))
    records = _records(squad_file, extra=3)
    before = model.config._attn_implementation
    work = {}
    generate_answers(model, gpt2_tokenizer, records, settings=GenerationSettings(max_new_tokens=3), progress=False,
                     stats=work)
    assert model.config._attn_implementation == before
    from loraqa.data.squad import encode_prompt
    from loraqa.generation.decode import max_prompt_tokens

    limit = max_prompt_tokens(model, GenerationSettings(max_new_tokens=3))
    prompts = [encode_prompt(gpt2_tokenizer, r["context"], r["question"], limit) for r in records]
    contexts = {tuple(c) for c, _ in prompts}
    assert work["prompt_tokens"] == sum(map(len, contexts)) + sum(len(q) for _, q in prompts)
    assert work["batches"] == 1 and len(records) <= work["generated_tokens"] <= 3 * len(records)
    assert 1 <= work["decode_steps"] <= 2 and work["prefill_s"] > 0 and work["decode_s"] > 0
    assert sum(work["steps_by_rows"].values()) == work["decode_steps"]
    assert all(1 <= rows <= len(records) for rows in work["steps_by_rows"])
    plain = {}
    generate_answers(model, gpt2_tokenizer, records, settings=GenerationSettings(max_new_tokens=3, prefix_cache=False),
                     progress=False, stats=plain)
    assert plain["prompt_tokens"] == sum(len(c) + len(q) for c, q in prompts)

    def fail(*args):
        raise RuntimeError("interrupted")

    SharedPrefixBatch.step, original = fail, SharedPrefixBatch.step
    try:
        with pytest.raises(RuntimeError, match="interrupted"):
            generate_answers(model, gpt2_tokenizer, records, settings=GenerationSettings(), progress=False)
    finally:
        SharedPrefixBatch.step = original
    assert model.config._attn_implementation == before


def test_sliding_window_models_decode_on_full_prompt_rows(smollm2_tokenizer, squad_file):
    from transformers import MistralConfig, MistralForCausalLM

    torch.manual_seed(0)
    model = MistralForCausalLM(MistralConfig(num_hidden_layers=2, hidden_size=32, intermediate_size=64,
                                             num_attention_heads=4, num_key_value_heads=2,
                                             vocab_size=len(smollm2_tokenizer), sliding_window=4096,
                                             initializer_range=0.5)).eval()
    assert not supports_shared_prefix(model)
    records = _records(squad_file)
    settings = GenerationSettings(max_new_tokens=4)
    assert generate_answers(model, smollm2_tokenizer, records, settings=settings, progress=False) == \
        one_by_one_answers(model, smollm2_tokenizer, records, settings)


def test_seeded_sampling_is_reproducible_and_batch_invariant(gpt2_tokenizer, squad_file):
    model = tiny_gpt2(vocab_size=len(gpt2_tokenizer))
    records = _records(squad_file, extra=4)

    def sample(**kwargs):
        settings = GenerationSettings(do_sample=True, top_k=50, temperature=1.3, max_new_tokens=5, **kwargs)
        return generate_answers(model, gpt2_tokenizer, records, settings=settings, progress=False)

    first = sample(seed=1)
    assert sample(seed=1) == first
    assert sample(seed=1, batch_size=2, prefix_cache=False) == first
    assert sample(seed=2) != first


@pytest.mark.parametrize("prefix_cache", [True, False])
def test_answer_sets_share_the_prefill_and_equal_separate_runs(smollm2_tokenizer, squad_file, prefix_cache):
    model = tiny_llama(vocab_size=len(smollm2_tokenizer))
    records = _records(squad_file, extra=5)
    base = GenerationSettings(max_new_tokens=5, batch_size=4, prefix_cache=prefix_cache)
    sampled = dict(do_sample=True, top_k=20, temperature=1.2)
    runs = [base, GenerationSettings(**{**vars(base), **sampled, "seed": 1}),
            GenerationSettings(**{**vars(base), **sampled, "seed": 2}), base]
    calls, works = _forward_counter(model), [{} for _ in runs]
    together = generate_answer_sets(model, smollm2_tokenizer, records, runs, progress=False, stats=works)
    assert all((w["batches"], w["decode_steps"]) == (works[0]["batches"], works[0]["decode_steps"]) for w in works)
    prefills = (2 if prefix_cache else 1) * works[0]["batches"]  # each batch encoded once for all settings
    assert len(calls) == prefills + works[0]["decode_steps"]  # and its settings decoded together
    assert together == [generate_answers(model, smollm2_tokenizer, records, settings=run, progress=False)
                        for run in runs]
    assert together[0] == together[3] and together[1] != together[2]
    with pytest.raises(ValueError, match="must share max_new_tokens"):
        generate_answer_sets(model, smollm2_tokenizer, records, [base, GenerationSettings(max_new_tokens=3)])


@pytest.mark.parametrize("kwargs, message", [
    ({"top_p": 0.0}, "top_p=0.0: must be in (0, 1]"), ({"top_p": 1.5}, "top_p=1.5"),
    ({"temperature": -1.0}, "temperature=-1.0: must be > 0"), ({"top_k": 0}, "top_k=0: must be >= 1"),
    ({"max_new_tokens": 0}, "max_new_tokens=0"),
])
def test_decoding_settings_out_of_range(kwargs, message):
    with pytest.raises(ConfigError) as info:
        GenerationSettings(**kwargs)
    assert message in str(info.value)
