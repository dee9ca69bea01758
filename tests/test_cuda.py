"""On a CUDA device, loraqa's own kernels give what the ordinary paths give (opt-in: `pytest -m cuda`, run by
`make gpu-check`; skipped without CUDA). Each compares two ways of computing one thing on the GPU, or the GPU
against the CPU, so that a wrong index or mask that happens to be right on one device shows."""
import pytest
import torch

from conftest import CACHE, tiny_gpt2, tiny_llama
from loraqa.config import GenerationSettings, LoraArguments
from loraqa.data.collate import SharedContextCollator
from loraqa.data.squad import build_train_dataset, load_squad
from loraqa.evaluation.evaluate import one_by_one_answers
from loraqa.generation.decode import PaddedRowsBatch, generate_answers
from loraqa.model.attention import PARAGRAPH_ATTENTION, SharedPrefixBatch, register_paragraph_attention, \
    shared_prefix_attention
from loraqa.model.lora import attach_lora
from loraqa.training.loss import answer_loss
from test_attention import _prompts

pytestmark = pytest.mark.cuda


@pytest.fixture
def device() -> torch.device:
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    return torch.device("cuda")


@pytest.fixture
def tokenizer():
    """GPT-2's tokenizer when fetched (a bare GPU machine has what was carried: data/gpt2-tokenizer, 5 MB)."""
    if not (CACHE / "gpt2-tokenizer" / "tokenizer_config.json").exists():
        pytest.skip(f"{CACHE}/gpt2-tokenizer not fetched (carry it)")
    from loraqa.model.loading import load_tokenizer

    return load_tokenizer(str(CACHE / "gpt2-tokenizer"))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("make_model", [tiny_gpt2, tiny_llama])
@torch.no_grad()
def test_shared_prefix_decoding_equals_full_prompt_rows(device, make_model, dtype):
    """Prefill and two decoding steps (rows leaving in between; bf16: one step) on the shared-prefix kernel
    against each question's own full prompt on the model's ordinary attention, on the GPU."""
    model = make_model(vocab_size=100).to(device=device, dtype=dtype)
    prompts = _prompts(100)
    reference = PaddedRowsBatch(model, prompts, pad_token_id=0)
    with shared_prefix_attention(model):
        shared = SharedPrefixBatch(model, prompts, max_new_tokens=4)
        ours = shared.prefill()
    expected = reference.prefill()
    tolerance = dict(atol=1e-4, rtol=1e-4) if dtype == torch.float32 else dict(
        atol=0.02 * float(expected.abs().max()), rtol=0)
    torch.testing.assert_close(ours.float(), expected.float(), **tolerance)
    tokens = expected.argmax(-1)
    # bf16: the first step only (the existing CPU test's check); its rounding compounds over further steps
    for keep in ((torch.tensor([0, 2, 3, 5], device=device), None) if dtype == torch.float32 else (None,)):
        if keep is not None:
            reference.keep(keep)
            shared.keep(keep)
            tokens = tokens[keep]
        with shared_prefix_attention(model):
            ours = shared.step(tokens)
        expected = reference.step(tokens)
        assert ours.dtype == dtype
        torch.testing.assert_close(ours.float(), expected.float(), **tolerance)
        tokens = expected.argmax(-1)


def test_paragraph_attention_training_on_the_gpu_equals_the_cpu(device, tokenizer, squad_file):
    """The shared-context training loss and LoRA gradients with per-paragraph attention on the GPU equal the
    CPU's with the ordinary (block-mask) attention."""
    rows, _ = build_train_dataset(load_squad(str(squad_file)), tokenizer, max_length=128)
    batch = SharedContextCollator()([rows[i] for i in range(len(rows))])
    assert len(batch["paragraph_spans"]) > 1
    model = attach_lora(tiny_gpt2(vocab_size=len(tokenizer)), LoraArguments(lora_r=4, lora_dropout=0.0,
                                                                          target_modules="all-linear"))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    register_paragraph_attention()
    results = []
    for place, attention in (("cpu", "sdpa"), (device, PARAGRAPH_ATTENTION)):
        model.to(place).set_attn_implementation(attention)
        model.zero_grad()
        loss = answer_loss(model, {k: v.to(place) if torch.is_tensor(v) else v for k, v in batch.items()})
        loss.backward()
        results.append((loss.item(), {n: p.grad.cpu() for n, p in model.named_parameters() if p.requires_grad}))
    (loss_cpu, grads_cpu), (loss_gpu, grads_gpu) = results
    assert loss_gpu == pytest.approx(loss_cpu, rel=1e-4)
    for name in grads_cpu:
        torch.testing.assert_close(grads_gpu[name], grads_cpu[name], atol=1e-5, rtol=1e-3)


def test_batched_greedy_equals_one_by_one_generate_on_the_gpu(device, tokenizer, squad_file):
    records = list(load_squad(str(squad_file)))
    records += [{**records[0], "id": f"extra{i}", "question": f"What happened in minute {i}?"} for i in range(6)]
    model = tiny_gpt2(vocab_size=len(tokenizer)).to(device)
    settings = GenerationSettings(max_new_tokens=6, batch_size=4)
    reference = one_by_one_answers(model, tokenizer, records, settings)
    assert len(set(reference.values())) > 1
    for prefix_cache in (True, False):
        ours = generate_answers(model, tokenizer, records, progress=False,
                                settings=GenerationSettings(max_new_tokens=6, batch_size=4, prefix_cache=prefix_cache))
        assert ours == reference, prefix_cache
