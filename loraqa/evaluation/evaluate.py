"""A model (+ adapter) and a SQuAD file -> evaluation JSON (comparisons and failure reports: `analysis`).

`evaluate` decodes a seeded subset, scores it with the official metric and writes EM/F1 with bootstrap
CIs (resampling paragraphs), per-question scores and paragraphs, predictions, answer-quality measures and
everything needed to reproduce it. With `strategy_grid` it runs the decoding grid instead (greedy, top-k,
nucleus, temperature; sampled ones with several seeds; every run decodes from one shared prefill per
batch) and adds diversity measures; each row's CI is that of its mean over seeds.
"""
from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from ..config import ConfigError, DataArguments, EvaluateArguments, GenerationSettings, ModelArguments, to_dict
from ..data.assets import squad_file
from ..data.prompting import check_disjoint, choose_examples, prompt_format
from ..data.squad import (SquadFormatError, data_fingerprint, encode_prompt, heldout_split, load_squad,
                          squad_references, take_subset)
from ..files import run_metadata, write_json_atomic
from ..generation.decode import generate_answer_sets, generate_answers, max_prompt_tokens
from ..model.loading import inference_placement, load_adapter, load_model_and_tokenizer, native_bf16
from .metrics import score_questions
from .stats import bootstrap_ci

logger = logging.getLogger(__name__)


def grid_strategies(base: GenerationSettings) -> list[GenerationSettings]:
    """The assignment's strategies: greedy; top-k 10/25/50; nucleus 0.8/0.9/0.95; temperature 0.7/1.0/1.3;
    then decoding that knows the answer is a span: greedy within the context's spans, beams 2/4, and 4 beams
    within the spans."""
    base = replace(base, constrain_to_context=False, num_beams=1)
    sampled = dict(do_sample=True, top_k=None, top_p=None, temperature=1.0)
    greedy = replace(base, do_sample=False, top_k=None, top_p=None, temperature=1.0)
    return ([greedy]
            + [replace(base, **{**sampled, "top_k": k}) for k in (10, 25, 50)]
            + [replace(base, **{**sampled, "top_p": p}) for p in (0.8, 0.9, 0.95)]
            + [replace(base, **{**sampled, "temperature": t}) for t in (0.7, 1.0, 1.3)]
            + [replace(greedy, constrain_to_context=True), replace(greedy, num_beams=2), replace(greedy, num_beams=4),
               replace(greedy, num_beams=4, constrain_to_context=True)])


def load_model_for_eval(model_args: ModelArguments, adapter: str | None, merge: bool = True, *,
                        device: str = "auto", dtype: str = "auto"):
    """Base model (+ adapter, merged by default) and tokenizer, on `device` in `dtype` (see
    `model.loading.inference_placement`); a full fine-tune run directory loads as is."""
    place, weights = inference_placement(device, dtype)
    if dtype == "auto" and weights == torch.float32 and native_bf16(place):
        logger.info("this %s multiplies bf16 natively: --dtype bfloat16 is faster, but changes some answers "
                    "(README: bf16 on a CPU that has it)", place.type)
    if adapter and not (Path(adapter) / "adapter_config.json").exists():
        if not (Path(adapter) / "config.json").exists():
            raise SquadFormatError(f"{adapter}: neither an adapter (adapter_config.json) nor a model (config.json)")
        model_args = replace(model_args, model=adapter)
        adapter = None
    model, tokenizer, resolved = load_model_and_tokenizer(model_args.model, model_args.cache_dir, dtype=weights)
    if adapter:
        model = load_adapter(model, adapter, merge=merge)
    return model.to(place).eval(), tokenizer, resolved


def paragraph_key(context: str) -> str:
    """A short id of a question's paragraph: questions on one paragraph are resampled together (stats)."""
    return hashlib.sha1(context.encode()).hexdigest()[:12]


def training_max_length(adapter: str | None) -> int:
    """The max_length an adapter (or full fine-tune) was trained at, from its run_config.json; 512, loraqa's
    training default, for an untuned model, so that baseline and tuned models see the same prompts."""
    config_path = Path(adapter) / "run_config.json" if adapter else None
    if config_path and config_path.exists():
        try:
            return int(json.loads(config_path.read_text())["data"]["max_length"])
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as err:
            raise SquadFormatError(f"{config_path}: field 'data.max_length' is not readable ({err})") from None
    return DataArguments.max_length


def adapter_run(adapter: str | None) -> str | None:
    """The run an adapter was trained as (its run_config.json's output folder name: a sweep's run id), recorded
    with every evaluation so that results of an earlier export at the same path are never taken for this one's."""
    try:
        config = json.loads((Path(adapter) / "run_config.json").read_text()) if adapter else {}
    except (OSError, json.JSONDecodeError):
        return None
    output_dir = (config.get("training") or {}).get("output_dir") if isinstance(config, dict) else None
    return Path(output_dir).name if output_dir else None


def check_heldout_unseen(adapter: str | None, heldout_articles: int, subset_seed: int) -> None:
    """Scoring a trained model on the training file's held-out articles is honest only if it never trained on
    them: the adapter must have held out at least as many articles by the same seed (`heldout_split` takes the
    first N titles of one seeded order, so fewer or another seed's include articles it trained on)."""
    config_path = Path(adapter) / "run_config.json" if adapter else None
    if not config_path or not config_path.exists():
        return
    try:
        data = json.loads(config_path.read_text())["data"]
        trained_heldout, trained_seed = int(data.get("heldout_articles") or 0), int(data.get("subset_seed") or 0)
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as err:
        raise SquadFormatError(f"{config_path}: field 'data' is not readable ({err})") from None
    if trained_heldout < heldout_articles or trained_seed != subset_seed:
        raise ConfigError(f"heldout_articles={heldout_articles} with subset_seed={subset_seed}: {config_path} held out "
                          f"{trained_heldout} articles with subset_seed={trained_seed}, so these include articles it "
                          "trained on")


def answer_quality(predictions: dict[str, str], records: list[dict]) -> dict:
    """Mean answer length (words), share of answers found verbatim in the context, share empty."""
    contexts = {r["id"]: r["context"] for r in records}
    texts = list(predictions.values())
    return {"mean_answer_words": float(np.mean([len(t.split()) for t in texts])) if texts else 0.0,
            "verbatim_in_context": float(np.mean([bool(t) and t in contexts[q] for q, t in predictions.items()]))
            if texts else 0.0,
            "empty_answers": float(np.mean([not t for t in texts])) if texts else 0.0}


def distinct_n(texts: list[str], n: int) -> float:
    """Unique n-grams over all n-grams across the answers (word level)."""
    grams = [tuple(words[i:i + n]) for t in texts for words in [t.split()] for i in range(len(words) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0


def _score(predictions: dict[str, str], records: list[dict]) -> dict:
    per_question = score_questions(predictions, squad_references(records))
    return {"exact_match": 100 * float(np.mean([s.exact_match for s in per_question.values()])),
            "f1": 100 * float(np.mean([s.f1 for s in per_question.values()])), "n": len(per_question),
            "per_question": {q: {"exact_match": s.exact_match, "f1": s.f1} for q, s in per_question.items()}}


def _cis(per_question: dict[str, dict], paragraphs: dict[str, str], seed: int) -> dict:
    """EM/F1 bootstrap CIs in percent, resampling paragraphs: questions on one paragraph are not independent."""
    clusters = [paragraphs[q] for q in per_question]
    cis = {f"{metric}_ci": [100 * x for x in bootstrap_ci([s[metric] for s in per_question.values()],
                                                          clusters=clusters, seed=seed)]
           for metric in ("exact_match", "f1")}
    return {**cis, "resampled": "paragraphs"}


def _scored(predictions: dict[str, str], records, settings: GenerationSettings, seconds: float, work: dict) -> dict:
    return {**_score(predictions, records), **answer_quality(predictions, records),
            "questions_per_s": len(records) / seconds, "generation_work": work, "generation": to_dict(settings),
            "predictions": predictions}


def _prompt_format(eval_args: EvaluateArguments, model_args: ModelArguments, tokenizer, records: list[dict]):
    """The evaluation's prompt: its worked examples (disjoint from `records`) and template, if any."""
    examples = []
    if eval_args.few_shot:
        source = load_squad(squad_file(eval_args.few_shot_file, "train", model_args.cache_dir), "train")
        examples = choose_examples(source, eval_args.few_shot, articles=eval_args.few_shot_articles,
                                   seed=eval_args.subset_seed)
        check_disjoint(examples, records)
    return prompt_format(tokenizer, examples=examples, chat_template=eval_args.chat_template,
                         model_name=model_args.model)


def evaluate(model_args: ModelArguments, eval_args: EvaluateArguments, settings: GenerationSettings) -> dict:
    """Evaluate one decoding setting (or the grid) and write `eval_args.output` atomically."""
    inference_placement(eval_args.device, eval_args.dtype)  # a device or dtype that cannot work fails first
    if eval_args.torch_threads:
        torch.set_num_threads(eval_args.torch_threads)
    if eval_args.heldout_articles:
        check_heldout_unseen(eval_args.adapter, eval_args.heldout_articles, eval_args.subset_seed)
    split = "train" if eval_args.heldout_articles else "validation"
    data_path = squad_file(eval_args.data, split, model_args.cache_dir)
    dataset = load_squad(data_path, split)
    if eval_args.heldout_articles:
        dataset = heldout_split(dataset, eval_args.heldout_articles, eval_args.subset_seed)[1]
    dataset = take_subset(dataset, eval_args.max_samples, eval_args.subset_seed)
    model, tokenizer, resolved = load_model_for_eval(model_args, eval_args.adapter, eval_args.merge_adapter,
                                                     device=eval_args.device, dtype=eval_args.dtype)
    records = list(dataset)
    prompt = _prompt_format(eval_args, model_args, tokenizer, records)
    max_length = eval_args.max_length or training_max_length(eval_args.adapter) + prompt.extra_tokens(tokenizer)
    weights = next(model.parameters())
    paragraphs = {r["id"]: paragraph_key(r["context"]) for r in records}
    header = {"model": model_args.model, "model_resolved": resolved, "adapter": eval_args.adapter,
              "adapter_run": adapter_run(eval_args.adapter),
              "device": str(weights.device), "dtype": str(weights.dtype).removeprefix("torch."),
              "data": data_path, "data_hash": data_fingerprint(dataset), "subset_seed": eval_args.subset_seed,
              "max_length": max_length, "evaluate_args": to_dict(eval_args), "prompt": prompt.describe(),
              **run_metadata()}
    if not eval_args.strategy_grid:
        started, work = time.perf_counter(), {}
        predictions = generate_answers(model, tokenizer, records, settings=settings, stats=work, max_length=max_length,
                                       prompt_format=prompt)
        scored = _scored(predictions, records, settings, time.perf_counter() - started, work)
        result = {**header, "prompts_cut": work["prompts_cut"], **scored,
                  **_cis(scored["per_question"], paragraphs, settings.seed),
                  "questions": {r["id"]: {"question": r["question"], "gold": r["answers"]["text"],
                                          "paragraph": paragraphs[r["id"]]} for r in records}}
        write_json_atomic(eval_args.output, result)
        return result
    # every (strategy, seed) run decodes together with the others from one prefill per batch, so no row has a speed
    # of its own: the header keeps the whole pass's time, and `loraqa decoding-speed` times each strategy alone
    plan = [(strategy, list(range(eval_args.grid_seeds)) if strategy.do_sample else [settings.seed])
            for strategy in grid_strategies(settings)]
    settings_list = [replace(strategy, seed=seed) for strategy, seeds in plan for seed in seeds]
    works = [{} for _ in settings_list]
    started = time.perf_counter()
    answer_sets = generate_answer_sets(model, tokenizer, records, settings_list, stats=works, max_length=max_length,
                                       prompt_format=prompt)
    header["grid_seconds"] = time.perf_counter() - started
    header["grid_questions_per_s"] = len(records) / header["grid_seconds"]
    scored = iter([_scored(answers, records, run, work["prefill_s"] + work["decode_s"], work)
                   for run, answers, work in zip(settings_list, answer_sets, works)])
    rows = []
    for strategy, seeds in plan:
        runs = [next(scored) for _ in seeds]
        answers_by_seed = [r["predictions"] for r in runs]
        # diversity within one seed's answers, averaged over seeds: pooling the seeds would count the answers
        # they agree on again and make a strategy with more seeds look less diverse than greedy's single run
        distinct = {n: float(np.mean([distinct_n(list(answers.values()), n) for answers in answers_by_seed]))
                    for n in (1, 2)}
        # the CI of the mean over seeds: each question's score averaged over the seeds, paragraphs resampled
        seed_mean = {q: {m: float(np.mean([r["per_question"][q][m] for r in runs])) for m in ("exact_match", "f1")}
                     for q in runs[0]["per_question"]}
        rows.append({
            "strategy": strategy.name, "generation": to_dict(strategy), "seeds": list(seeds),
            **{k: float(np.mean([r[k] for r in runs])) for k in
               ("exact_match", "f1", "mean_answer_words", "verbatim_in_context", "empty_answers")},
            "exact_match_sd": float(np.std([r["exact_match"] for r in runs])),
            "f1_sd": float(np.std([r["f1"] for r in runs])),
            **_cis(seed_mean, paragraphs, settings.seed),
            "distinct_1": distinct[1], "distinct_2": distinct[2],
            "seed_disagreement": float(np.mean([len({a[q] for a in answers_by_seed}) > 1 for q in answers_by_seed[0]]))
            if len(answers_by_seed) > 1 else 0.0,
            "runs": [{k: r[k] for k in ("exact_match", "f1", "predictions", "per_question")} for r in runs],
        })
    result = {**header, "prompts_cut": works[0]["prompts_cut"], "n": len(records), "strategies": rows,
              "paragraphs": paragraphs}
    write_json_atomic(eval_args.output, result)
    return result


def best_span_strategy(result: dict) -> dict:
    """The grid row of the span-aware decoding (within the context's spans, or beam search) with the best F1: the
    one `make decoding-full-dev` scores on all of dev against greedy."""
    rows = [r for r in result["strategies"]
            if r["generation"].get("constrain_to_context") or r["generation"].get("num_beams", 1) > 1]
    if not rows:
        raise ConfigError("the strategy grid has no span-aware strategy (within the context's spans or beams)")
    return max(rows, key=lambda r: r["f1"])


def strategy_flags(generation: dict) -> list[str]:
    """`loraqa evaluate` flags for a greedy-based grid row's decoding (span constraint, beams)."""
    return ["--constrain_to_context", str(bool(generation.get("constrain_to_context"))).lower(),
            "--num_beams", str(generation.get("num_beams", 1))]


def strategy_table(result: dict) -> str:
    """Markdown table of a grid evaluation. No speed column: the grid decodes its strategies together, so a row's
    questions/s is the whole pass's (each strategy's own: `loraqa decoding-speed`)."""
    lines = ["| strategy | EM | F1 | F1 95% CI | words | verbatim | distinct-1 | distinct-2 | seeds differ |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in result["strategies"]:
        lines.append(f"| {r['strategy']} | {r['exact_match']:.1f} ± {r['exact_match_sd']:.1f} | "
                     f"{r['f1']:.1f} ± {r['f1_sd']:.1f} | [{r['f1_ci'][0]:.1f}, {r['f1_ci'][1]:.1f}] | "
                     f"{r['mean_answer_words']:.1f} | {r['verbatim_in_context']:.2f} | {r['distinct_1']:.2f} | "
                     f"{r['distinct_2']:.2f} | {r['seed_disagreement']:.2f} |")
    return "\n".join(lines)


def answer_question(model, tokenizer, context: str, question: str, settings: GenerationSettings,
                    max_length: int | None = None) -> str:
    """One answer, through the same prompt, cut (`max_length`: pass `training_max_length(adapter)`, as
    `evaluate` does) and decoder as evaluation."""
    qid = hashlib.sha1(f"{context}\n{question}".encode()).hexdigest()
    return generate_answers(model, tokenizer, [{"id": qid, "context": context, "question": question}],
                            settings=settings, progress=False, max_length=max_length)[qid]


def one_by_one_answers(model, tokenizer, records: list[dict], settings: GenerationSettings) -> dict[str, str]:
    """The notebook way: `model.generate` on one prompt at a time (same prompt ids, same stopping rule)."""
    from ..generation.decode import answer_text, stop_token_ids

    stop = stop_token_ids(tokenizer).tolist()
    limit = max_prompt_tokens(model, settings)
    answers = {}
    for r in records:
        context_ids, question_ids = encode_prompt(tokenizer, r["context"], r["question"], limit)
        ids = torch.tensor([context_ids + question_ids], device=model.device)
        with torch.no_grad():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=settings.max_new_tokens,
                                 do_sample=False, eos_token_id=stop, pad_token_id=tokenizer.pad_token_id)
        answers[r["id"]] = answer_text(tokenizer, out[0, ids.shape[1]:].tolist())
    return answers
