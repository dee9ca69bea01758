import copy
import json

import datasets
import pytest
import torch

from conftest import tiny_gpt2, tiny_llama
from loraqa.config import ConfigError, GenerationSettings, LoraArguments, ModelArguments
from loraqa.args import parse_config
from loraqa.data.squad import encode_prompt, encode_prompt_counting_cut, heldout_split, load_squad, take_subset
from loraqa.config import EvaluateArguments
from loraqa.evaluation.evaluate import evaluate
from loraqa.generation.decode import answer_text, generate_answers, max_prompt_tokens, stop_token_ids
from loraqa.model.lora import attach_lora
from loraqa.data.prompting import (EXAMPLE_MAX_CHARS, INSTRUCTION, _chat_messages, check_disjoint, choose_examples,
                                   prompt_format)


def _records(squad_file):
    return list(load_squad(str(squad_file)))


def _shots(n: int) -> list[dict]:
    """n worked examples (each its own article) in the records' schema."""
    return [{"id": f"s{i}", "title": f"Shot_{i}", "context": f"Rome was founded in {753 + i} BC by Romulus.",
             "question": f"When was Rome founded ({i})?", "answers": {"text": [f"{753 + i} BC"], "answer_start": [20]}}
            for i in range(n)]


@pytest.mark.parametrize("tokenizer_name", ["gpt2_tokenizer", "smollm2_tokenizer"])
@pytest.mark.parametrize("max_prompt_tokens", [None, 100])
def test_no_examples_no_template_is_todays_prompt_bit_for_bit(request, tokenizer_name, max_prompt_tokens, squad_file):
    tokenizer = request.getfixturevalue(tokenizer_name)
    plain = prompt_format(tokenizer)
    cuts = 0
    for r in _records(squad_file):
        ours = plain.encode(tokenizer, r["context"], r["question"], max_prompt_tokens)
        assert ours[:2] == encode_prompt(tokenizer, r["context"], r["question"], max_prompt_tokens)
        assert ours == encode_prompt_counting_cut(tokenizer, r["context"], r["question"], max_prompt_tokens)
        cuts += ours[2] > 0
    assert cuts == (2 if max_prompt_tokens else 0)  # the long paragraph's two questions are cut at 100 tokens
    assert plain.extra_tokens(tokenizer) == 0


def test_docstring_example(gpt2_tokenizer):
    assert prompt_format(gpt2_tokenizer).encode(gpt2_tokenizer, "Paris is in France.", "Where is Paris?") == (
        [21947, 25, 6342, 318, 287, 4881, 13], [198, 24361, 25, 6350, 318, 6342, 30, 198, 33706, 25], 0)


@pytest.mark.parametrize("tokenizer_name", ["gpt2_tokenizer", "smollm2_tokenizer"])
def test_examples_are_a_true_token_prefix_shared_by_a_paragraphs_questions(request, tokenizer_name, squad_file):
    tokenizer = request.getfixturevalue(tokenizer_name)
    records = _records(squad_file)
    shots = _shots(2)
    fmt = prompt_format(tokenizer, examples=shots)
    examples_text = "".join(f"Context: {s['context']}\nQuestion: {s['question']}\nAnswer: {s['answers']['text'][0]}\n\n"
                            for s in shots)
    prefixes = {}
    for r in records:
        prefix, question_ids, cut = fmt.encode(tokenizer, r["context"], r["question"])
        plain = encode_prompt(tokenizer, r["context"], r["question"])
        text = examples_text + f"Context: {r['context']}\nQuestion: {r['question']}\nAnswer:"
        assert prefix + question_ids == tokenizer(text).input_ids  # pieces == the whole prompt at once
        assert question_ids == plain[1] and cut == 0
        assert prefix[len(prefix) - len(plain[0]):] == plain[0]  # the examples come before today's prompt
        prefixes.setdefault(r["context"], set()).add(tuple(prefix))
    assert all(len(p) == 1 for p in prefixes.values())  # one prefix per paragraph: the decoder shares it
    # (not the examples' own count: GPT-2 spells "\n\n" as one token at the end of a text, two before "Context")
    head_alone = tokenizer("Context:", add_special_tokens=False).input_ids
    assert fmt.extra_tokens(tokenizer) == len(tokenizer(examples_text + "Context:").input_ids) - len(head_alone)


@pytest.mark.parametrize("shots", [0, 1, 2])
def test_chat_template_pieces_equal_the_template_applied_at_once(smollm2_tokenizer, squad_file, shots):
    examples = _shots(shots)
    fmt = prompt_format(smollm2_tokenizer, examples=examples, chat_template=True, model_name="smollm2-135m")
    last_user = "<|im_start|>user\n" + (f"{INSTRUCTION}\n\n" if shots == 0 else "") + "Context:"
    assert fmt.head.startswith("<|im_start|>system\n") and fmt.head.endswith(last_user)
    assert fmt.question_template == "\nQuestion: {question}<|im_end|>\n<|im_start|>assistant\n"
    assert fmt.head.count(INSTRUCTION) == 1 and fmt.head.count("<|im_start|>assistant\n") == shots
    for r in _records(squad_file):
        prefix, question_ids, _ = fmt.encode(smollm2_tokenizer, r["context"], r["question"])
        whole = smollm2_tokenizer.apply_chat_template(_chat_messages(examples, r["context"], r["question"]),
                                                      tokenize=True, add_generation_prompt=True, return_dict=False)
        assert prefix + question_ids == whole
    described = fmt.describe()
    assert described["few_shot"] == shots and described["chat_template"] and described["instruction"] == INSTRUCTION


def test_chat_template_missing_is_one_line_naming_the_model(gpt2_tokenizer):
    with pytest.raises(ConfigError, match="^chat_template=true: the tokenizer of model 'gpt2' has no chat template$"):
        prompt_format(gpt2_tokenizer, chat_template=True, model_name="gpt2")


def test_template_that_puts_the_question_first_is_refused(smollm2_tokenizer):
    tokenizer = copy.deepcopy(smollm2_tokenizer)
    tokenizer.chat_template = ("{% for m in messages %}{{ m['content'].split('\\nQuestion: ')[1] }}|"
                               "{{ m['content'] }}{% endfor %}")
    with pytest.raises(ConfigError, match="does not put the context once, before the question"):
        prompt_format(tokenizer, chat_template=True, model_name="odd")


@pytest.mark.parametrize("chat", [False, True])
def test_prefix_shared_decoding_with_examples_equals_one_prompt_at_a_time(smollm2_tokenizer, squad_file, chat):
    tokenizer = smollm2_tokenizer
    model = tiny_llama(vocab_size=len(tokenizer))
    records = _records(squad_file)
    records += [{**records[0], "id": f"extra{i}", "question": f"What happened in minute {i}?"} for i in range(3)]
    fmt = prompt_format(tokenizer, examples=_shots(1), chat_template=chat)
    settings = GenerationSettings(max_new_tokens=5, batch_size=4)
    limit = max_prompt_tokens(model, settings)
    reference, stop = {}, stop_token_ids(tokenizer).tolist()
    for r in records:
        prefix, question_ids, _ = fmt.encode(tokenizer, r["context"], r["question"], limit)
        ids = torch.tensor([prefix + question_ids])
        with torch.no_grad():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=5, do_sample=False,
                                 eos_token_id=stop, pad_token_id=tokenizer.pad_token_id)
        reference[r["id"]] = answer_text(tokenizer, out[0, ids.shape[1]:].tolist())
    assert len(set(reference.values())) > 1
    for prefix_cache in (True, False):
        work = {}
        ours = generate_answers(model, tokenizer, records, progress=False, stats=work, prompt_format=fmt,
                                settings=GenerationSettings(max_new_tokens=5, batch_size=4, prefix_cache=prefix_cache))
        assert ours == reference, prefix_cache
        assert work["prompts_cut"] == 2  # the long paragraph, past the tiny model's 4,096 positions with an example


def _dataset(articles: int, paragraphs: int) -> datasets.Dataset:
    rows = []
    for a in range(articles):
        for p in range(paragraphs):
            context = f"Article {a} paragraph {p} mentions the number {a * 100 + p}." + ("!" * (900 if p == 0 else 0))
            for q in range(2):
                rows.append({"id": f"a{a}p{p}q{q}", "title": f"T{a}", "context": context, "question": f"Which {q}?",
                             "answers": {"text": [str(a * 100 + p)], "answer_start": [context.index("number") + 7]}})
    return datasets.Dataset.from_list(rows)


def test_examples_come_from_the_heldout_articles_a_validation_subset_reaches_last():
    dataset = _dataset(articles=8, paragraphs=4)
    heldout = heldout_split(dataset, 4, seed=3)[1]
    three = choose_examples(dataset, 3, articles=4, seed=3)
    assert choose_examples(dataset, 1, articles=4, seed=3) == three[:1]  # nested
    assert choose_examples(dataset, 0, articles=4, seed=3) == []
    assert {e["title"] for e in three} <= set(heldout["title"])  # held out, never trained on
    assert len({e["context"] for e in three}) == 3 and all(len(e["context"]) <= EXAMPLE_MAX_CHARS for e in three)
    # how many validation questions it takes before each held-out article is first included
    entry = {}
    for n in range(1, len(heldout) + 1):
        for title in take_subset(heldout, n, seed=3)["title"]:
            entry.setdefault(title, n)
    assert three[0]["title"] == max(entry, key=entry.get)  # the article entered last
    first = entry[three[0]["title"]]
    check_disjoint(three[:1], list(take_subset(heldout, first - 1, seed=3)))  # every subset before it is disjoint
    with pytest.raises(ConfigError, match=f"few_shot: example '{three[0]['id']}' comes from article"):
        check_disjoint(three, list(take_subset(heldout, len(heldout), seed=3)))
    with pytest.raises(Exception, match="few_shot=99: the 4 held-out articles have only 12 paragraphs"):
        choose_examples(dataset, 99, articles=4, seed=3)  # the 900-character first paragraphs are too long


def _evaluate(model_dir, data, output, **kwargs):
    return evaluate(ModelArguments(model=str(model_dir)),
                    EvaluateArguments(data=str(data), output=str(output), max_samples=None, **kwargs),
                    GenerationSettings(max_new_tokens=3))


def test_evaluate_records_the_prompt_and_widens_max_length(tmp_path, tiny_gpt2_dir, squad_file, gpt2_tokenizer):
    source = tmp_path / "train.json"  # another file's held-out article gives the example
    source.write_text(json.dumps({"version": "1.1", "data": [
        {"title": t, "paragraphs": [{"context": f"{t} was built in 1990.", "qas": [
            {"id": f"{t}-q", "question": f"When was {t} built?",
             "answers": [{"text": "1990", "answer_start": len(t) + 14}]}]}]}
        for t in ("Alpha", "Beta", "Gamma")]}))
    plain = _evaluate(tiny_gpt2_dir, squad_file, tmp_path / "plain.json")
    shot = _evaluate(tiny_gpt2_dir, squad_file, tmp_path / "shot.json", few_shot=1, few_shot_file=str(source),
                     few_shot_articles=2)
    written = json.loads((tmp_path / "shot.json").read_text())
    assert written["evaluate_args"]["few_shot"] == 1 and written["evaluate_args"]["chat_template"] is False
    example = choose_examples(load_squad(str(source)), 1, articles=2, seed=0)[0]
    assert written["prompt"]["examples"] == [{"id": example["id"], "title": example["title"]}]
    fmt = prompt_format(gpt2_tokenizer, examples=[example])
    assert shot["max_length"] == plain["max_length"] + fmt.extra_tokens(gpt2_tokenizer) > plain["max_length"]
    assert shot["prompts_cut"] == plain["prompts_cut"]  # each question's own context is cut as without examples
    assert plain["prompt"]["few_shot"] == 0 and plain["prompt"]["head"] == "Context:"
    with pytest.raises(ConfigError, match=f"few_shot: example '{example['id']}' comes from article"):  # validation
        _evaluate(tiny_gpt2_dir, source, tmp_path / "overlap.json", heldout_articles=2, few_shot=1,
                  few_shot_file=str(source), few_shot_articles=2)
    with pytest.raises(ConfigError, match=f"the tokenizer of model '{tiny_gpt2_dir}' has no chat template"):
        _evaluate(tiny_gpt2_dir, squad_file, tmp_path / "chat.json", chat_template=True)
    adapter = tmp_path / "adapter"  # the same flags with an adapter (B = 0: it answers as the base model)
    attach_lora(tiny_gpt2(), LoraArguments(lora_r=4)).save_pretrained(adapter)
    (adapter / "run_config.json").write_text(json.dumps({"data": {"max_length": 256}}))
    tuned = _evaluate(tiny_gpt2_dir, squad_file, tmp_path / "tuned.json", adapter=str(adapter), few_shot=1,
                      few_shot_file=str(source), few_shot_articles=2)
    assert tuned["max_length"] == 256 + fmt.extra_tokens(gpt2_tokenizer)  # the adapter's own max_length, widened
    base = _evaluate(tiny_gpt2_dir, squad_file, tmp_path / "base.json", few_shot=1, few_shot_file=str(source),
                     few_shot_articles=2, max_length=tuned["max_length"])
    assert tuned["predictions"] == base["predictions"]
    assert tuned["prompt"]["examples"] == written["prompt"]["examples"]


def test_flags_parse():
    _, eval_args, _ = parse_config((ModelArguments, EvaluateArguments, GenerationSettings),
                                   ["--few_shot", "3", "--chat_template", "true"])
    assert (eval_args.few_shot, eval_args.chat_template, eval_args.few_shot_articles) == (3, True, 20)
    with pytest.raises(ConfigError, match="^few_shot=-1: must be >= 0$"):
        parse_config((ModelArguments, EvaluateArguments, GenerationSettings), ["--few_shot", "-1"])
