"""Shared fixtures: the real GPT-2 and SmolLM2 tokenizers (fetched), tiny random GPT-2 / Llama models,
and a five-question SQuAD file. Nothing here touches the network beyond `loraqa fetch`'s registries."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from loraqa.data.assets import fetch
from loraqa.config import default_cache_dir
from loraqa.model.loading import load_tokenizer

CACHE = Path(os.environ.get("LORAQA_CACHE", default_cache_dir())).resolve()
torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS") or min(2, os.cpu_count() or 1)))  # 1 beside a sweep

LONG_CONTEXT = " ".join(f"Filler sentence number {i} says nothing." for i in range(400))
SUPER_BOWL = ("Super Bowl 50 was an American football game. The Denver Broncos defeated the Carolina Panthers "
              "24-10 to earn their third Super Bowl title. The game was played on February 7, 2016, at Levi's "
              "Stadium in Santa Clara, California.")
TREASURE = LONG_CONTEXT + " The treasure is buried under the old oak tree. " + LONG_CONTEXT


def _qa(qid: str, question: str, context: str, *answers: str) -> dict:
    return {"id": qid, "question": question, "answers": [{"text": a, "answer_start": context.index(a)} for a in answers]}


SQUAD = {"version": "1.1", "data": [
    {"title": "Super_Bowl_50", "paragraphs": [{"context": SUPER_BOWL, "qas": [
        _qa("q1", "Which team won Super Bowl 50?", SUPER_BOWL, "Denver Broncos", "The Denver Broncos"),
        _qa("q2", "Where was the game played?", SUPER_BOWL, "Levi's Stadium"),
        _qa("q3", "What was the score?", SUPER_BOWL, "24-10")]}]},
    {"title": "Long", "paragraphs": [{"context": TREASURE, "qas": [
        _qa("q4", "Where is the treasure buried?", TREASURE, "under the old oak tree"),
        _qa("q5", "Which sentence number is the last?", TREASURE, "number 399")]}]},
]}


@pytest.fixture(scope="session")
def gpt2_tokenizer():
    return load_tokenizer(str(fetch("gpt2-tokenizer", CACHE)))


@pytest.fixture(scope="session")
def smollm2_tokenizer():
    return load_tokenizer(str(fetch("smollm2-135m", CACHE)))


@pytest.fixture
def squad_file(tmp_path) -> Path:
    path = tmp_path / "squad.json"
    path.write_text(json.dumps(SQUAD))
    return path


def tiny_gpt2(vocab_size: int = 50257, seed: int = 0) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    return GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, n_positions=4096, vocab_size=vocab_size)).eval()


def tiny_llama(vocab_size: int = 49152, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(num_hidden_layers=2, hidden_size=32, intermediate_size=64,
                                        num_attention_heads=4, num_key_value_heads=2, vocab_size=vocab_size,
                                        max_position_embeddings=4096, tie_word_embeddings=True,
                                        initializer_range=0.5)).eval()  # varied answers from a random model


@pytest.fixture
def tiny_gpt2_dir(tmp_path, gpt2_tokenizer) -> Path:
    """A saved random 2-layer GPT-2 with the real tokenizer, loadable by name like any model."""
    path = tmp_path / "tiny-gpt2"
    tiny_gpt2().save_pretrained(path)
    gpt2_tokenizer.save_pretrained(path)
    return path
