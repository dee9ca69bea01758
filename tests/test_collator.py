import pytest
import torch

from conftest import tiny_gpt2, tiny_llama
from loraqa.data.collate import ContextGroupedSampler, QADataCollator, SharedContextCollator
from loraqa.data.squad import IGNORE_INDEX, build_train_dataset, load_squad
from loraqa.model.attention import PARAGRAPH_ATTENTION, register_paragraph_attention
from loraqa.training.loss import answer_loss


def test_collator_pads_right_and_keeps_eos_label_when_pad_is_eos(gpt2_tokenizer):
    eos = gpt2_tokenizer.eos_token_id
    assert gpt2_tokenizer.pad_token_id == eos  # the classic pad=eos setting
    batch = QADataCollator(gpt2_tokenizer)([
        {"input_ids": [5, 6, 7, eos], "labels": [-100, -100, 7, eos]},
        {"input_ids": [5, eos], "labels": [-100, eos]},
    ])
    assert batch["input_ids"].tolist() == [[5, 6, 7, eos], [5, eos, eos, eos]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 0, 0]]
    assert batch["labels"].tolist() == [[-100, -100, 7, eos], [-100, eos, -100, -100]]  # EOS label survives
    assert all(t.dtype == torch.long for t in batch.values())


def test_collator_pad_to_multiple_of(gpt2_tokenizer):
    batch = QADataCollator(gpt2_tokenizer, pad_to_multiple_of=8)([{"input_ids": [1, 2, 3], "labels": [-100, 2, 3]}])
    assert batch["input_ids"].shape == (1, 8) and batch["labels"][0, 3:].eq(IGNORE_INDEX).all()


def test_shared_context_collator_docstring_example():
    features = [{"input_ids": [10, 11, 12, 20, 21], "labels": [-100, -100, -100, -100, 21],
                 "context_length": 3, "context_key": "c"},
                {"input_ids": [10, 11, 12, 30, 31], "labels": [-100, -100, -100, -100, 31],
                 "context_length": 3, "context_key": "c"}]
    batch = SharedContextCollator()(features)
    assert batch["input_ids"].tolist() == [[10, 11, 12, 20, 21, 30, 31]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 4, 3, 4]]
    assert batch["labels"].tolist() == [[-100, -100, -100, -100, 21, -100, 31]]
    assert batch["attention_mask"].dtype == torch.bool
    allowed = batch["attention_mask"][0, 0].int().tolist()
    assert allowed[5] == [1, 1, 1, 0, 0, 1, 0]  # q2's first token: its context and itself, not q1
    assert allowed[4] == [1, 1, 1, 1, 1, 0, 0]
    assert batch["paragraph_spans"].tolist() == [[0, 7]]
    other = {"input_ids": [40, 41, 50], "labels": [-100, -100, 50], "context_length": 2, "context_key": "d"}
    assert SharedContextCollator()(features + [other])["paragraph_spans"].tolist() == [[0, 7], [7, 10]]


@pytest.mark.parametrize("make_model, tokenizer_name", [(tiny_gpt2, "gpt2_tokenizer"), (tiny_llama, "smollm2_tokenizer")])
def test_packed_rows_give_each_answer_token_its_unpacked_logits(request, make_model, tokenizer_name, squad_file):
    tokenizer = request.getfixturevalue(tokenizer_name)
    rows, _ = build_train_dataset(load_squad(str(squad_file)), tokenizer, max_length=256)
    features = [rows[i] for i in range(len(rows))]
    model = make_model(vocab_size=len(tokenizer))
    packed = SharedContextCollator()(features)
    at_labels = packed["labels"][0] != IGNORE_INDEX
    with torch.no_grad():
        separate = []
        for f in features:
            logits = model(input_ids=torch.tensor([f["input_ids"]])).logits[0]
            separate.append(logits[torch.tensor(f["labels"]) != IGNORE_INDEX])
        # the whole row under its block mask, then the same row attended one paragraph at a time
        register_paragraph_attention()
        for attention, spans in [("sdpa", {}), (PARAGRAPH_ATTENTION, {"paragraph_spans": packed["paragraph_spans"].tolist()})]:
            model.set_attn_implementation(attention)
            packed_logits = model(input_ids=packed["input_ids"], position_ids=packed["position_ids"],
                                  attention_mask=packed["attention_mask"], **spans).logits[0]  # (T, V)
            # logits at the label positions themselves, in both layouts (the loss uses the position before)
            assert torch.allclose(packed_logits[at_labels], torch.cat(separate), atol=1e-4), attention
    assert len(set(f["context_key"] for f in features)) < len(features)  # some context really was shared
    assert len(packed["paragraph_spans"]) > 1  # and the row holds several paragraphs


def _float_block_mask(features: list[dict]) -> torch.Tensor:
    """The collator's previous mask, the reference: the whole row's (1, 1, T, T) additive float mask, 0 where a
    token attends (causal, same paragraph, key in the context or the query's own block), float32's minimum else."""
    paragraphs: dict[str, list[dict]] = {}
    for f in features:
        paragraphs.setdefault(f["context_key"], []).append(f)
    group, block = [], []
    for g, members in enumerate(paragraphs.values()):
        n_context = members[0]["context_length"]
        group += [g] * n_context
        block += [-1] * n_context
        for b, f in enumerate(members):
            group += [g] * (len(f["input_ids"]) - n_context)
            block += [b] * (len(f["input_ids"]) - n_context)
    group, block = torch.tensor(group), torch.tensor(block)
    allowed = (torch.ones(len(group), len(group), dtype=torch.bool).tril() & (group[:, None] == group[None, :])
               & ((block[None, :] == -1) | (block[:, None] == block[None, :])))
    return torch.zeros(allowed.shape).masked_fill_(~allowed, torch.finfo(torch.float32).min)[None, None]


@pytest.mark.parametrize("make_model, tokenizer_name", [(tiny_gpt2, "gpt2_tokenizer"), (tiny_llama, "smollm2_tokenizer")])
def test_boolean_mask_gives_the_float_masks_logits_and_loss(request, make_model, tokenizer_name, squad_file):
    """The boolean block mask, built one paragraph at a time, is the dense float mask it replaced: the same mask,
    the same logits (bit for bit) and the same training loss, for sdpa, per-paragraph and eager attention."""
    tokenizer = request.getfixturevalue(tokenizer_name)
    rows, _ = build_train_dataset(load_squad(str(squad_file)), tokenizer, max_length=256)
    features = [rows[i] for i in range(len(rows))]
    batch = SharedContextCollator()(features)
    reference = _float_block_mask(features)
    assert torch.equal(batch["attention_mask"], reference == 0)
    assert len(batch["paragraph_spans"]) > 1 and not reference.eq(0).all()
    model = make_model(vocab_size=len(tokenizer))
    register_paragraph_attention()
    labels = batch["labels"][0, 1:]
    with torch.no_grad():
        for attention in ("sdpa", PARAGRAPH_ATTENTION, "eager"):
            model.set_attn_implementation(attention)
            spans = {"paragraph_spans": batch["paragraph_spans"].tolist()} if attention == PARAGRAPH_ATTENTION else {}
            inputs = dict(input_ids=batch["input_ids"], position_ids=batch["position_ids"], **spans)
            expected = model(**inputs, attention_mask=reference).logits[0]  # (T, V)
            if attention != "eager":  # eager adds its mask to the scores: answer_loss converts a boolean one
                assert torch.equal(model(**inputs, attention_mask=batch["attention_mask"]).logits[0], expected)
            expected_loss = torch.nn.functional.cross_entropy(expected[:-1], labels, ignore_index=IGNORE_INDEX)
            assert answer_loss(model, batch).item() == pytest.approx(expected_loss.item(), rel=1e-6), attention
            assert answer_loss(model, batch, answer_only=False).item() == pytest.approx(expected_loss.item(), rel=1e-6)


def test_context_grouped_sampler_groups_and_is_deterministic():
    keys = ["a", "b", "a", "c", "b", "a"]
    sampler = ContextGroupedSampler(keys, seed=3)
    order = list(sampler)
    assert sorted(order) == list(range(6))
    runs = [keys[i] for i in order]
    assert sum(1 for x, y in zip(runs, runs[1:]) if x != y) == 2  # each context appears as one run
    assert list(ContextGroupedSampler(keys, seed=3)) == order
    orders = {tuple(ContextGroupedSampler(keys, seed=s)) for s in range(10)}
    assert len(orders) > 1


def test_context_grouped_sampler_reshuffles_each_epoch_and_repeats_a_seed_and_epoch():
    keys = [f"p{i % 12}" for i in range(36)]  # 12 paragraphs of 3 questions
    sampler = ContextGroupedSampler(keys, seed=3)
    epochs = []
    for epoch in range(3):
        sampler.set_epoch(epoch)
        epochs.append(list(sampler))
        assert sorted(epochs[-1]) == list(range(36))
    assert epochs[0] != epochs[1] != epochs[2] != epochs[0]  # a new epoch, a new paragraph order
    resumed = ContextGroupedSampler(keys, seed=3)
    resumed.set_epoch(1)
    assert list(resumed) == epochs[1]  # a resumed run replays its epoch exactly
