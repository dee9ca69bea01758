import subprocess
import sys

import pytest
import torch

from conftest import tiny_gpt2, tiny_llama
from loraqa.model.attention import SharedPrefixBatch, shared_prefix_attention, supports_shared_prefix
from loraqa.generation.decode import PaddedRowsBatch


def _prompts(vocab_size: int):
    """Three contexts of different lengths with 3, 1 and 2 questions of different lengths, adjacent by context."""
    g = torch.Generator().manual_seed(0)
    contexts = [torch.randint(0, vocab_size, (n,), generator=g).tolist() for n in (9, 4, 13)]
    questions = [torch.randint(0, vocab_size, (n,), generator=g).tolist() for n in (3, 5, 1, 2, 6, 4)]
    return [(contexts[c], q) for c, q in zip((0, 0, 0, 1, 2, 2), questions)]


@pytest.mark.parametrize("make_model", [tiny_gpt2, tiny_llama])
@torch.no_grad()
def test_shared_prefix_logits_equal_full_prompt_rows(make_model):
    """Every question's next-token logits, at the question and at each decoding step (also after finished rows
    leave), equal those of its own full prompt on the model's ordinary attention and cache."""
    model = make_model(vocab_size=100)
    prompts = _prompts(100)
    assert supports_shared_prefix(model)
    reference = PaddedRowsBatch(model, prompts, pad_token_id=0)
    with shared_prefix_attention(model):
        shared = SharedPrefixBatch(model, prompts, max_new_tokens=4)
        ours = shared.prefill()
    expected = reference.prefill()
    torch.testing.assert_close(ours, expected, atol=1e-4, rtol=1e-4)
    tokens = expected.argmax(-1)
    for keep in (None, torch.tensor([0, 2, 3, 5]), None):
        if keep is not None:
            reference.keep(keep)
            shared.keep(keep)
            tokens = tokens[keep]
        with shared_prefix_attention(model):
            ours = shared.step(tokens)
        expected = reference.step(tokens)
        torch.testing.assert_close(ours, expected, atol=1e-4, rtol=1e-4)
        tokens = expected.argmax(-1)


@pytest.mark.parametrize("make_model", [tiny_gpt2, tiny_llama])
@torch.no_grad()
def test_leftover_rows_of_two_batches_decode_as_one(make_model):
    """Rows left in two batches mid-decoding, their unread contexts dropped, merged (contexts of different
    lengths, suffixes of different capacities) get the next-token logits of their own full prompts."""
    model = make_model(vocab_size=100)
    prompts = _prompts(100)
    halves, references, parts, pending = (prompts[:4], prompts[4:]), [], [], []
    for half, keep, steps in zip(halves, (torch.tensor([3]), torch.tensor([1])), (2, 1)):  # 1st: context 0 dropped
        reference = PaddedRowsBatch(model, half, pad_token_id=0)
        with shared_prefix_attention(model):
            shared = SharedPrefixBatch(model, half, max_new_tokens=2 + 2 * len(half))
            shared.prefill()
        tokens = reference.prefill().argmax(-1)
        for _ in range(steps):
            with shared_prefix_attention(model):
                shared.step(tokens)
            tokens = reference.step(tokens).argmax(-1)
        shared.keep(keep)
        reference.keep(keep)
        shared.drop_unread_contexts()
        parts.append(shared)
        references.append(reference)
        pending.append(tokens[keep])
    merged = SharedPrefixBatch.merge(parts)
    tokens = torch.cat(pending)
    for _ in range(2):
        with shared_prefix_attention(model):
            ours = merged.step(tokens)
        expected = torch.cat([reference.step(t) for reference, t in zip(references, tokens.split([1, 1]))])
        torch.testing.assert_close(ours, expected, atol=1e-4, rtol=1e-4)
        tokens = expected.argmax(-1)


@pytest.mark.parametrize("make_model", [tiny_gpt2, tiny_llama])
@torch.no_grad()
def test_shared_prefix_runs_in_bfloat16(make_model):
    """Half-precision models (GPUs) keep their dtype; scores and softmax mass are accumulated in float32."""
    model = make_model(vocab_size=100).to(torch.bfloat16)
    prompts = _prompts(100)
    reference = PaddedRowsBatch(model, prompts, pad_token_id=0)
    expected = reference.prefill()
    with shared_prefix_attention(model):
        shared = SharedPrefixBatch(model, prompts, max_new_tokens=2)
        ours = shared.prefill()
        tokens = expected.argmax(-1)
        ours_step = shared.step(tokens)
    expected_step = reference.step(tokens)
    for got, want in ((ours, expected), (ours_step, expected_step)):
        assert got.dtype == torch.bfloat16
        torch.testing.assert_close(got.float(), want.float(), rtol=0, atol=0.02 * float(want.abs().max()))


def test_importing_loraqa_registers_no_attention_function():
    """transformers' attention registry is global: loraqa registers its functions where it switches a model
    to them (`shared_prefix_attention`, `train.setup`), so no module relies on another's import side effect."""
    code = ("import loraqa.cli, loraqa.evaluation.evaluate, loraqa.generation.decode, loraqa.training.run; "
            "from transformers import AttentionInterface; "
            "print(sorted(name for name in AttentionInterface._global_mapping if name.startswith('loraqa')))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "[]"
