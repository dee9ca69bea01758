import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import TrainerCallback

from conftest import tiny_gpt2, tiny_llama
from loraqa.data.collate import QADataCollator, SharedContextCollator
from loraqa.config import DataArguments, LoraArguments, ModelArguments
from loraqa.training.arguments import LoraQATrainingArguments
from loraqa.data.squad import build_train_dataset, load_squad
from loraqa.model.loading import ModelSetupError
from loraqa.model.lora import attach_lora
from loraqa.model.attention import PARAGRAPH_ATTENTION, register_paragraph_attention
from loraqa.training.loss import answer_loss
from loraqa.training.run import fit, setup, train


@pytest.mark.parametrize("collate", ["padded", "shared_context"])
def test_answer_only_loss_and_grads_equal_full_logits(gpt2_tokenizer, squad_file, collate):
    rows, _ = build_train_dataset(load_squad(str(squad_file)), gpt2_tokenizer, max_length=128)
    features = [rows[i] for i in range(len(rows))]
    batch = (QADataCollator(gpt2_tokenizer) if collate == "padded" else SharedContextCollator())(features)
    model = attach_lora(tiny_gpt2(), LoraArguments(lora_r=4, lora_dropout=0.0, target_modules="attention+mlp"))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    results = []
    for answer_only in (True, False):
        model.zero_grad()
        loss = answer_loss(model, batch, answer_only=answer_only)
        loss.backward()
        results.append((loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}))
    (loss_a, grads_a), (loss_b, grads_b) = results
    assert loss_a == pytest.approx(loss_b, rel=1e-5)
    assert all(torch.allclose(grads_a[n], grads_b[n], atol=1e-6, rtol=1e-4) for n in grads_a)
    # and the reference: the model's own loss on full logits over a padded batch
    padded = QADataCollator(gpt2_tokenizer)(features)
    with torch.no_grad():
        assert model(**padded).loss.item() == pytest.approx(loss_a, rel=1e-5)


@pytest.mark.parametrize("make_model, tokenizer_name", [(tiny_gpt2, "gpt2_tokenizer"), (tiny_llama, "smollm2_tokenizer")])
def test_paragraph_attention_gives_the_block_mask_loss_and_grads(request, make_model, tokenizer_name, squad_file):
    tokenizer = request.getfixturevalue(tokenizer_name)
    rows, _ = build_train_dataset(load_squad(str(squad_file)), tokenizer, max_length=128)
    batch = SharedContextCollator()([rows[i] for i in range(len(rows))])
    assert len(batch["paragraph_spans"]) > 1
    model = attach_lora(make_model(vocab_size=len(tokenizer)), LoraArguments(lora_r=4, lora_dropout=0.0,
                                                                           target_modules="all-linear"))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    results = []
    register_paragraph_attention()
    for attention in ("sdpa", PARAGRAPH_ATTENTION):
        model.set_attn_implementation(attention)
        model.zero_grad()
        loss = answer_loss(model, batch)
        loss.backward()
        results.append((loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}))
    (loss_a, grads_a), (loss_b, grads_b) = results
    assert loss_a == pytest.approx(loss_b, rel=1e-5)
    assert all(torch.allclose(grads_a[n], grads_b[n], atol=1e-6, rtol=1e-4) for n in grads_a)


def test_setup_attends_per_paragraph_for_shared_context_rows_only(tmp_path, tiny_gpt2_dir, squad_file):
    shared = setup(*_args(tmp_path, tiny_gpt2_dir, squad_file))
    assert shared.trainer.model.config._attn_implementation == PARAGRAPH_ATTENTION
    padded = setup(*_args(tmp_path, tiny_gpt2_dir, squad_file, packing="none"))
    assert padded.trainer.model.config._attn_implementation != PARAGRAPH_ATTENTION
    compiled = setup(*_args(tmp_path, tiny_gpt2_dir, squad_file, torch_compile=True))
    assert compiled.trainer.model.config._attn_implementation != PARAGRAPH_ATTENTION


def _args(tmp_path, model_dir, squad_file, **training):
    defaults = dict(output_dir=str(tmp_path / "run"), max_steps=6, per_device_train_batch_size=4, learning_rate=5e-3,
                    warmup_ratio=0.0, logging_steps=1, eval_steps=3, save_steps=3, seed=0, disable_tqdm=True)
    defaults.update(training)
    return (ModelArguments(model=str(model_dir)), LoraArguments(lora_r=4, lora_dropout=0.1),
            DataArguments(train_file=str(squad_file), validation_file=str(squad_file), max_length=128),
            LoraQATrainingArguments(**defaults))


def test_training_learns_only_lora_and_writes_the_run_directory(tmp_path, tiny_gpt2_dir, squad_file):
    base = load_file(str(tiny_gpt2_dir / "model.safetensors"))
    model_args, lora_args, data_args, training_args = _args(tmp_path, tiny_gpt2_dir, squad_file, max_steps=12)
    run = setup(model_args, lora_args, data_args, training_args)
    initial = {n: p.detach().clone() for n, p in run.trainer.model.named_parameters()}
    result = fit(run)
    out = tmp_path / "run"
    for name in ("adapter_config.json", "adapter_model.safetensors", "tokenizer.json", "run_config.json",
                 "metrics.jsonl", "summary.json"):
        assert (out / name).exists(), name
    changed = {n for n, p in run.trainer.model.named_parameters() if not torch.equal(p.detach(), initial[n])}
    lora = {n for n in initial if "lora_" in n}
    assert {n for n in lora if "lora_B" in n} <= changed and changed <= lora  # base weights bit-identical
    merged_base = {k: v for k, v in run.trainer.model.get_base_model().state_dict().items() if "lora_" not in k}
    for key, value in base.items():
        match = [v for k, v in merged_base.items() if k.replace(".base_layer", "").endswith(key)]
        assert match and torch.equal(match[0], value), key
    losses = [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()
              if "loss" in json.loads(line)]
    assert sum(losses[-3:]) < sum(losses[:3])  # it learns
    summary = json.loads((out / "summary.json").read_text())
    for key in ("trainable_params", "total_params", "train_runtime_s", "train_tokens_per_s", "peak_memory_mb",
                "final_train_loss", "final_validation_loss", "model", "data_hash"):
        assert summary[key] is not None, key
    assert summary["trainable_params"] == result.summary["trainable_params"] < summary["total_params"]
    config = json.loads((out / "run_config.json").read_text())
    assert config["lora"]["lora_r"] == 4 and config["training"]["learning_rate"] == 5e-3 and config["loraqa_version"]


class _Kill(TrainerCallback):
    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == 4:
            raise KeyboardInterrupt("killed")


def test_resume_reaches_the_same_final_state(tmp_path, tiny_gpt2_dir, squad_file):
    straight = train(*_args(tmp_path / "a", tiny_gpt2_dir, squad_file))
    args = _args(tmp_path / "b", tiny_gpt2_dir, squad_file)
    run = setup(*args)
    run.trainer.add_callback(_Kill())
    with pytest.raises(KeyboardInterrupt):
        fit(run)
    assert not (tmp_path / "b" / "run" / "summary.json").exists()
    args[3].resume_from_checkpoint = str(tmp_path / "b" / "run" / "checkpoint-3")
    resumed = train(*args)
    steps = [json.loads(line)["step"] for line in (tmp_path / "b" / "run" / "metrics.jsonl").read_text().splitlines()
             if "loss" in json.loads(line)]
    assert steps == [json.loads(line)["step"] for line in (tmp_path / "a" / "run" / "metrics.jsonl").read_text()
                     .splitlines() if "loss" in json.loads(line)]  # steps 4 (logged before the kill) not twice
    assert (resumed.summary["resumed_from_step"], resumed.summary["steps_timed"]) == (3, 3)
    assert resumed.summary["seconds_per_step"] == pytest.approx(resumed.summary["train_runtime_s"] / 3)
    a = load_file(f"{straight.output_dir}/adapter_model.safetensors")
    b = load_file(f"{resumed.output_dir}/adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


def test_full_finetune_control(tmp_path, tiny_gpt2_dir, squad_file):
    model_args, lora_args, data_args, training_args = _args(tmp_path, tiny_gpt2_dir, squad_file, max_steps=2,
                                                            eval_strategy="no", save_strategy="no")
    lora_args.full_finetune = True
    result = train(model_args, lora_args, data_args, training_args)
    assert result.summary["method"] == "full_finetune"
    assert result.summary["trainable_params"] == result.summary["total_params"]
    assert (tmp_path / "run" / "model.safetensors").exists()


def test_bad_training_input_gets_clear_errors(tmp_path, tiny_gpt2_dir, squad_file, gpt2_tokenizer):
    empty = tmp_path / "empty.json"
    empty.write_text(json.dumps({"data": []}))
    model_args, lora_args, data_args, training_args = _args(tmp_path, tiny_gpt2_dir, squad_file)
    data_args.train_file = str(empty)
    with pytest.raises(ValueError, match="empty.json: no questions in the file"):
        setup(model_args, lora_args, data_args, training_args)
    other = tmp_path / "other-checkpoint"
    attach_lora(tiny_gpt2(vocab_size=100), LoraArguments(lora_r=4)).save_pretrained(other)
    model_args, lora_args, data_args, training_args = _args(tmp_path, tiny_gpt2_dir, squad_file,
                                                            resume_from_checkpoint=str(other))
    with pytest.raises(ModelSetupError, match="checkpoint was trained on"):
        setup(model_args, lora_args, data_args, training_args)


@pytest.mark.parametrize("packing", ["shared_context", "none"])
def test_validation_loss_is_the_token_mean_over_the_whole_set(tmp_path, tiny_gpt2_dir, squad_file, packing):
    """eval_loss does not depend on the validation batch size or the packing: it is the token mean of the
    whole set (a mean of batch means weighted the two-question and the three-question batches equally)."""
    losses = []
    for batch_size in (2, 5):
        run = setup(*_args(tmp_path / f"{packing}{batch_size}", tiny_gpt2_dir, squad_file, packing=packing,
                           per_device_eval_batch_size=batch_size))
        losses.append(run.trainer.evaluate()["eval_loss"])
    rows = run.trainer.eval_dataset
    whole = QADataCollator(run.tokenizer)([rows[i] for i in range(len(rows))])
    run.trainer.model.eval()  # no LoRA dropout, as in evaluate
    with torch.no_grad():
        reference = answer_loss(run.trainer.model, whole, answer_only=False).item()
    assert losses[0] == pytest.approx(reference, rel=1e-5) and losses[1] == pytest.approx(reference, rel=1e-5)
    # the old definition, a mean of batch means, differs here: the check above can fail
    first, second = (QADataCollator(run.tokenizer)([rows[i] for i in idx]) for idx in ([0, 1], range(2, len(rows))))
    with torch.no_grad():
        batch_means = [answer_loss(run.trainer.model, b, answer_only=False).item() for b in (first, second)]
    assert abs(sum(batch_means) / 2 - reference) > 1e-4


def test_train_on_prompt_labels_every_training_token_but_validates_on_the_answer(tmp_path, tiny_gpt2_dir, squad_file):
    """The masking ablation: the training loss covers the prompt, the validation loss is still the answer's,
    so its curve compares with every other run's; shared-context packing is refused (one loss per paragraph)."""
    model_args, lora_args, data_args, training_args = _args(tmp_path, tiny_gpt2_dir, squad_file, packing="none")
    data_args.train_on_prompt = True
    run = setup(model_args, lora_args, data_args, training_args)
    masked, _ = build_train_dataset(load_squad(str(squad_file)), run.tokenizer, max_length=128)
    by_ids = {tuple(r["input_ids"]): r["labels"] for r in masked}
    train_rows, eval_rows = run.trainer.train_dataset, run.trainer.eval_dataset
    assert all(row["labels"] == row["input_ids"] for row in train_rows)  # every position carries loss
    assert all(row["labels"] == by_ids[tuple(row["input_ids"])] for row in eval_rows)  # -100 on the prompt
    assert any(-100 in row["labels"] for row in eval_rows)
    before = run.trainer.evaluate()["eval_tokens"]
    assert before == sum(sum(label != -100 for label in row["labels"][1:]) for row in eval_rows)
    data_args.train_on_prompt, training_args.packing = True, "shared_context"
    with pytest.raises(Exception, match="train_on_prompt=True: needs --packing none"):
        setup(model_args, lora_args, data_args, training_args)
