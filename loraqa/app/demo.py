"""A base model, its adapter and evaluation JSONs -> a local Gradio app (`loraqa demo`) with two tabs.

Ask: a context and a question answered by the base model and by the adapter side by side, through the very
prompt, prompt cut and decoder of `loraqa evaluate` (`generation.decode.generate_answers`), each answer's tokens shaded
by the model's probability, the answers' spans highlighted in the context, EM/F1 against gold answers when
given. Errors: one or two evaluation JSONs as a table filterable by `loraqa failures`' categories, by "A
right, B wrong" and by text; a selected question shows its context with the gold and predicted spans. It opens
only the files `demo_files.AllowList` allows; uploads are off (`NoUploads`); another host than loopback needs
`--auth` (`demo_files.launch_auth`).

The pure view (spans, HTML, filters) is `demo_view`; here are the models, then the page. Gradio is imported
only by `build_demo` and `serve` (it is the optional extra `demo`).

Why one file of ~450 lines: the page's callbacks close over the loaded models and the allow-list; split, they would
pass the same state through every module boundary.
"""
from __future__ import annotations

import functools
import hashlib
import html
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ..config import ConfigError, GenerationSettings, ModelArguments
from ..data.squad import SquadFormatError, encode_prompt_counting_cut, load_squad, read_squad_json, take_subset
from ..evaluation.analysis import read_evaluation
from ..evaluation.evaluate import load_model_for_eval, training_max_length
from ..generation.decode import generate_answers, max_prompt_tokens, stop_token_ids
from ..model.loading import ModelSetupError
from .demo_view import (COMPARISONS, CSS, ERRORS_LEGEND, GOLD_SEPARATOR, LEGEND, TABLE_HEADERS, answer_scores,
                        error_rows, filter_rows, find_span, highlight_spans, parse_golds, render_error, shade_tokens,
                        table_rows)
from .demo_files import AllowList, NoUploads, RefusedPath, is_loopback, launch_auth

logger = logging.getLogger(__name__)

# ------------------------------------------------------------------------------------------------ models


@dataclass
class DemoModels:
    """The models of the Ask tab, loaded once: the base model and the adapter (merged, as `loraqa evaluate` and
    `loraqa ask` load it), each with the max_length `evaluate` gives it, and why the adapter is missing."""
    base: torch.nn.Module
    adapted: torch.nn.Module | None
    tokenizer: object
    base_max_length: int
    adapter_max_length: int
    model_name: str
    adapter: str | None
    adapter_error: str | None = None


def load_demo_models(model_args: ModelArguments, adapter: str | None, *, device: str = "auto",
                     dtype: str = "auto") -> DemoModels:
    """Both models; an adapter that cannot be loaded is logged and recorded in `adapter_error`, not raised."""
    base, tokenizer, resolved = load_model_for_eval(model_args, None, device=device, dtype=dtype)
    adapted, error, adapter_max_length = None, None, training_max_length(None)
    if not adapter:
        error = "no adapter given (start the demo with --adapter RUN_DIR)"
    else:
        try:
            adapted, _, _ = load_model_for_eval(model_args, adapter, device=device, dtype=dtype)
            adapter_max_length = training_max_length(adapter)
        except (SquadFormatError, ModelSetupError, OSError, ValueError) as err:
            error = f"the adapter {adapter} could not be loaded: {err}"
    if error:
        logger.warning("demo: %s; only the base model answers", error)
    return DemoModels(base, adapted, tokenizer, training_max_length(None), adapter_max_length, resolved, adapter, error)


@dataclass
class Answer:
    """One model's answer: text, tokens with probabilities, seconds, and how much of the context it saw."""
    text: str
    tokens: list[tuple[str, float]]
    greedy_path: bool  # every token is the model's most probable one: these are greedy decoding's own tokens
    seconds: float
    context_cut: int  # context tokens cut off so that prompt + max_new_tokens fit max_length
    context_chars_seen: int
    max_length: int


@torch.no_grad()
def token_probabilities(model, tokenizer, prompt_ids: list[int], answer: str) -> tuple[list[tuple[str, float]], bool]:
    """The answer's tokens and the model's probability of each after the prompt and the tokens before it, from
    one teacher-forced forward pass, and whether each is also the most probable token (then they are exactly
    greedy decoding's tokens). The answer was whitespace-stripped, so its tokens are those of " " + answer or
    of answer, whichever the model finds more probable. Probabilities are the model's own (before top-k, top-p,
    temperature).

    >>> token_probabilities(model, tokenizer, prompt_ids, "France")
    ([(' France', 0.93)], True)
    """
    candidates = [list(ids) for ids in dict.fromkeys(
        tuple(tokenizer(text, add_special_tokens=False).input_ids) for text in (" " + answer, answer)) if ids]
    if not answer or not candidates:
        return [], True
    longest = max(len(c) for c in candidates)
    ids = torch.full((len(candidates), len(prompt_ids) + longest), tokenizer.pad_token_id or 0, dtype=torch.long)
    attention = torch.zeros_like(ids)
    for r, candidate in enumerate(candidates):  # right-padded: a row's own positions never see the padding
        ids[r, :len(prompt_ids) + len(candidate)] = torch.tensor(prompt_ids + candidate)
        attention[r, :len(prompt_ids) + len(candidate)] = 1
    logits = model(input_ids=ids.to(model.device), attention_mask=attention.to(model.device),
                   logits_to_keep=longest + 1).logits[:, :longest].float()  # (R, longest, V): predict answer tokens
    log_probs = logits.log_softmax(-1)
    best = None
    for r, candidate in enumerate(candidates):
        steps = torch.arange(len(candidate))
        chosen = log_probs[r, steps, torch.tensor(candidate)]  # (len(candidate),)
        if best is None or chosen.sum() > best[0]:
            greedy = bool((log_probs[r, steps].argmax(-1).cpu() == torch.tensor(candidate)).all())
            best = (chosen.sum(), candidate, chosen.exp().tolist(), greedy)
    _, candidate, probs, greedy = best
    return [(tokenizer.decode([t]), p) for t, p in zip(candidate, probs)], greedy


def context_chars_seen(tokenizer, context: str, cut: int) -> int:
    """How many characters of `context` the prompt keeps when its last `cut` context tokens are cut (the
    context is encoded as " " + context, as `data.squad.encode_prompt` does)."""
    if not cut:
        return len(context)
    encoded = tokenizer(" " + context, add_special_tokens=False, return_offsets_mapping=True)
    kept = len(encoded.input_ids) - cut
    return max(0, encoded.offset_mapping[kept - 1][1] - 1) if kept > 0 else 0


def answer(model, tokenizer, context: str, question: str, settings: GenerationSettings, max_length: int) -> Answer:
    """`loraqa evaluate`'s answer to one question (same prompt, cut and decoder) with token probabilities.
    The question id is `evaluation.evaluate.answer_question`'s, so a sampled answer equals `loraqa ask`'s for a seed."""
    limit = max_prompt_tokens(model, settings, max_length)
    context_ids, question_ids, cut = encode_prompt_counting_cut(tokenizer, context, question, limit)
    qid = hashlib.sha1(f"{context}\n{question}".encode()).hexdigest()
    started = time.perf_counter()
    text = generate_answers(model, tokenizer, [{"id": qid, "context": context, "question": question}],
                            settings=settings, progress=False, max_length=max_length)[qid]
    seconds = time.perf_counter() - started
    tokens, greedy_path = token_probabilities(model, tokenizer, context_ids + question_ids, text)
    return Answer(text, tokens, greedy_path, seconds, cut, context_chars_seen(tokenizer, context, cut), max_length)


def demo_settings(do_sample: bool, top_k: float, top_p: float, temperature: float, seed: float,
                  max_new_tokens: float) -> GenerationSettings:
    """The page's controls as `GenerationSettings` (top_k 0 and top_p 1 mean off; greedy ignores them, as
    `loraqa evaluate` does without sampling flags). Raises ConfigError for values out of range."""
    if not do_sample:
        return GenerationSettings(max_new_tokens=int(max_new_tokens), seed=int(seed or 0))
    return GenerationSettings(max_new_tokens=int(max_new_tokens), do_sample=True, top_k=int(top_k) or None,
                              top_p=None if top_p is None or float(top_p) >= 1.0 else float(top_p),
                              temperature=float(temperature), seed=int(seed or 0))


def render_answer(result: Answer, golds: list[str]) -> str:
    """An answer's shaded tokens, EM/F1 when there are gold answers, the time taken and how it was decoded."""
    parts = [f'<div class="answer-tokens">{shade_tokens(result.tokens) or "<i>(empty answer)</i>"}</div>']
    facts = [f"answered in {result.seconds:.2f} s"]
    if golds:
        em, f1 = answer_scores(result.text, golds)
        facts.insert(0, f"<b>EM {100 * em:.0f} · F1 {100 * f1:.1f}</b>")
    if result.tokens and not result.greedy_path:
        facts.append("shading: the model's probability of each token (not all are its most probable one)")
    if result.context_cut:
        facts.append(f"context cut by {result.context_cut} tokens (max_length {result.max_length})")
    return "\n".join(parts) + f'<p class="answer-facts">{" · ".join(facts)}</p>'


def ask(models: DemoModels, context: str, question: str, gold: str, settings: GenerationSettings) -> dict:
    """Both answers to one question: {"status", "base", "adapter" (each {"text", "html"}), "context"}. Problems
    (empty context or question) come back as a status message, never as an exception. The texts are used as
    typed (not stripped), as `loraqa ask` uses them."""
    context, question, golds = context or "", question or "", parse_golds(gold)
    missing = [name for name, value in (("context", context), ("question", question)) if not value.strip()]
    if missing:
        message = f"Please type a {' and a '.join(missing)}: there is nothing to answer yet."
        logger.warning("demo ask: empty %s", " and ".join(missing))
        return {"status": message, "base": {"text": "", "html": ""}, "adapter": {"text": "", "html": ""},
                "context": f'<div class="context">{html.escape(context)}</div>'}
    results = {"base": answer(models.base, models.tokenizer, context, question, settings, models.base_max_length)}
    if models.adapted is not None:
        results["adapter"] = answer(models.adapted, models.tokenizer, context, question, settings,
                                    models.adapter_max_length)
    status = [f"Answered ({settings.name}, at most {settings.max_new_tokens} new tokens): "
              + ", ".join(f"{name} in {r.seconds:.2f} s" for name, r in results.items()) + "."]
    for name, r in results.items():
        if r.context_cut:
            status.append(f"The context is too long for the {name} model: its last {r.context_cut} tokens were cut "
                          f"(struck through below) so that prompt + {settings.max_new_tokens} new tokens fit "
                          f"max_length {r.max_length}, as `loraqa evaluate` cuts it.")
            logger.info("demo ask: context cut by %d tokens for the %s model", r.context_cut, name)
    if models.adapter_error:
        status.append(f"No adapter answer: {models.adapter_error}.")
    logger.info("demo ask: %s", " ".join(f"{name}={r.text!r} ({r.seconds:.2f} s)" for name, r in results.items()))
    spans = [(*span, "gold") for g in golds if (span := find_span(context, g))]
    spans += [(*span, f"pred-{name}") for name, r in results.items() if (span := find_span(context, r.text))]
    seen = min(r.context_chars_seen for r in results.values())
    spans += [(seen, len(context), "cut")] if seen < len(context) else []
    adapter = results.get("adapter")
    return {"status": " ".join(status),
            "base": {"text": results["base"].text, "html": render_answer(results["base"], golds)},
            "adapter": {"text": adapter.text if adapter else "",
                        "html": render_answer(adapter, golds) if adapter
                        else f'<p class="demo-error">{html.escape(models.adapter_error or "")}</p>'},
            "context": f'<div class="context">{highlight_spans(context, spans)}</div>'}


def dev_examples(source: str, n: int = 4) -> list[list[str]]:
    """[context, question, gold answers joined by GOLD_SEPARATOR] for the first question of `n` short
    paragraphs of a seeded dev subset (`data.squad.take_subset`, seed 0)."""
    dataset = take_subset(load_squad(source, "validation"), 40, 0)
    examples, contexts = [], set()
    for record in dataset:
        if record["context"] not in contexts and len(record["context"]) <= 1200 and len(examples) < n:
            contexts.add(record["context"])
            golds = GOLD_SEPARATOR.join(dict.fromkeys(record["answers"]["text"]))
            examples.append([record["context"], record["question"], golds])
    return examples


@functools.lru_cache(maxsize=4)
def _records(path: Path, mtime_ns: int) -> dict[str, dict]:
    """id -> record of a SQuAD file, read as a file (never `load_squad`'s hub fallback); cached per version."""
    return {r["id"]: r for r in read_squad_json(path)}


def evaluation_labels(path_a: str, path_b: str | None) -> tuple[str, str]:
    """Short labels for the two evaluations: their file names, with the folder when the names are the same (a
    sweep's runs all write eval_test.json)."""
    a, b = Path(path_a), Path(path_b) if path_b else None
    if b is not None and a.name == b.name:
        return f"{a.parent.name}/{a.name}", f"{b.parent.name}/{b.name}"
    return a.name, b.name if b is not None else ""


def load_error_rows(path_a: str, path_b: str | None = None, *, files: AllowList) -> tuple[list[dict], str]:
    """(rows, a one-line summary) for the Errors tab from one or two evaluation JSONs that `files` allows; the
    contexts come from the SQuAD file evaluation A names, resolved by `files.squad_data`. Raises RefusedPath
    (the same line for every path outside the allow-list) or SquadFormatError with a clear message."""
    resolved_a = files.evaluation(path_a)
    resolved_b = files.evaluation(path_b) if path_b else None
    a = read_evaluation(str(resolved_a))
    b = read_evaluation(str(resolved_b)) if resolved_b else None
    split = "train" if (a.get("evaluate_args") or {}).get("heldout_articles") else "validation"
    data = files.squad_data(a.get("data"), split, evaluation=path_a)
    try:
        records = _records(data, data.stat().st_mtime_ns)
    except (OSError, ValueError) as err:
        raise SquadFormatError(f"{path_a}: its SQuAD file {data} is not readable ({err})") from None
    rows = error_rows(a, b, records)
    summary = f"A = {path_a}: EM {a.get('exact_match', float('nan')):.1f}, F1 {a.get('f1', float('nan')):.1f}"
    if b is not None:
        summary += f"; B = {path_b}: EM {b.get('exact_match', float('nan')):.1f}, F1 {b.get('f1', float('nan')):.1f}"
    return rows, f"{len(rows)} questions. {summary}."


# -------------------------------------------------------------------------------------------------- page

def build_demo(models: DemoModels, *, files: AllowList, examples: list[list[str]] = (), errors: tuple[str, ...] = ()):
    """The Gradio Blocks of the two tabs (not launched); the Errors tab opens only what `files` allows. Its load
    is also the API route `load_errors` (two paths in, the table and a status line out)."""
    import gradio as gr

    adapter_label = models.adapter or "no adapter"
    with gr.Blocks(title="loraqa demo", analytics_enabled=False) as demo:
        gr.Markdown(f"## loraqa demo: {models.model_name} vs {adapter_label}")
        with gr.Tab("Ask"):
            with gr.Row():
                with gr.Column(scale=3):
                    context = gr.Textbox(label="Context", lines=8, elem_id="ask-context")
                    question = gr.Textbox(label="Question", lines=1, elem_id="ask-question")
                    gold = gr.Textbox(label=f"Gold answers (optional, separated by '{GOLD_SEPARATOR.strip()}'): "
                                      "EM/F1 against them", lines=1, elem_id="ask-gold")
                with gr.Column(scale=1):
                    do_sample = gr.Checkbox(label="sample (unticked: greedy)", value=False, elem_id="ask-sample")
                    top_k = gr.Slider(0, 100, value=0, step=1, label="top-k (0: off)", elem_id="ask-top-k")
                    top_p = gr.Slider(0.05, 1.0, value=1.0, step=0.05, label="top-p (1: off)", elem_id="ask-top-p")
                    temperature = gr.Slider(0.1, 2.0, value=1.0, step=0.05, label="temperature",
                                            elem_id="ask-temperature")
                    seed = gr.Number(value=0, precision=0, label="seed", elem_id="ask-seed")
                    max_new_tokens = gr.Slider(1, 128, value=GenerationSettings.max_new_tokens, step=1,
                                               label="max new tokens", elem_id="ask-max-new-tokens")
                    button = gr.Button("Answer", variant="primary", elem_id="ask-button")
            status = gr.Markdown(elem_id="ask-status")
            with gr.Row():
                with gr.Column():
                    gr.Markdown(f"### Base: {models.model_name}")
                    base_text = gr.Textbox(label="answer", interactive=False, elem_id="base-answer")
                    base_html = gr.HTML(elem_id="base-details")
                with gr.Column():
                    gr.Markdown(f"### Adapter: {adapter_label}")
                    adapter_text = gr.Textbox(label="answer", interactive=False, elem_id="adapter-answer")
                    adapter_html = gr.HTML(elem_id="adapter-details")
            gr.HTML(LEGEND)
            context_view = gr.HTML(elem_id="context-view")
            if examples:
                gr.Examples(examples=[list(e) for e in examples], inputs=[context, question, gold],
                            label="Dev examples (click one: context, question and gold answers fill in)")

            def on_ask(context, question, gold, do_sample, top_k, top_p, temperature, seed, max_new_tokens):
                try:
                    settings = demo_settings(do_sample, top_k, top_p, temperature, seed, max_new_tokens)
                    out = ask(models, context, question, gold, settings)
                except (ValueError, TypeError) as err:  # ConfigError included: a setting out of range
                    logger.warning("demo ask: %s", err)
                    return f"Cannot answer: {err}", "", "", "", "", ""
                except Exception as err:  # a page shows a message, never a traceback; the log keeps it
                    logger.error("demo ask failed: %s", err, exc_info=logger.isEnabledFor(logging.DEBUG))
                    return f"Something went wrong: {type(err).__name__}: {err}", "", "", "", "", ""
                return (out["status"], out["base"]["text"], out["base"]["html"], out["adapter"]["text"],
                        out["adapter"]["html"], out["context"])

            ask_inputs = [context, question, gold, do_sample, top_k, top_p, temperature, seed, max_new_tokens]
            ask_outputs = [status, base_text, base_html, adapter_text, adapter_html, context_view]
            # A static note while answering, not Gradio's ticking timer: redrawing it every frame costs a CPU the
            # models would rather have. One concurrency id: the models answer one request at a time.
            for trigger in (button.click, question.submit):
                trigger(lambda: "Answering with both models ...", None, status, queue=False).then(
                    on_ask, ask_inputs, ask_outputs, show_progress="hidden", concurrency_limit=1,
                    concurrency_id="models")

        with gr.Tab("Errors") as errors_tab:
            with gr.Row():
                path_a = gr.Textbox(label="evaluation A (e.g. the fine-tuned model's): a file given with --errors "
                                    "or under results/", value=errors[0] if errors else "", elem_id="eval-a")
                path_b = gr.Textbox(label="evaluation B (optional, e.g. the baseline's)",
                                    value=errors[1] if len(errors) > 1 else "", elem_id="eval-b")
                load = gr.Button("Load", elem_id="errors-load")
            errors_status = gr.Markdown(elem_id="errors-status")
            with gr.Row():
                category = gr.Dropdown(["all"], value="all", label="A's failure category (`loraqa failures`)",
                                       elem_id="errors-category")
                comparison = gr.Radio(list(COMPARISONS), value="all", label="A vs B (right = exact match)",
                                      elem_id="errors-comparison")
                search = gr.Textbox(label="text (id, question, context, answers)", elem_id="errors-search")
            table = gr.Dataframe(headers=TABLE_HEADERS, value=[], interactive=False, wrap=True, max_height=420,
                                 column_widths=["11%", "21%", "12%", "12%", "10%", "5%", "12%", "12%", "5%"],
                                 elem_id="errors-table")
            qid = gr.Textbox(label="question id (click a row, or type one)", elem_id="errors-qid")
            gr.HTML(ERRORS_LEGEND)
            detail = gr.HTML(elem_id="errors-detail")
            rows_state = gr.State([])
            names_state = gr.State(("", ""))

            def on_load(a, b):
                a, b = (a or "").strip(), (b or "").strip()
                if not a:
                    return [], ("", ""), "Give evaluation A's path.", gr.Dropdown(["all"], value="all"), []
                try:
                    rows, summary = load_error_rows(a, b or None, files=files)
                except RefusedPath as err:  # one line, the same whether the path exists
                    logger.warning("demo errors: refused %r %r", a, b)
                    return [], ("", ""), str(err), gr.Dropdown(["all"], value="all"), []
                except (SquadFormatError, OSError, KeyError, TypeError, ValueError) as err:
                    logger.warning("demo errors: %s", err)
                    return [], ("", ""), f"Cannot load: {err}", gr.Dropdown(["all"], value="all"), []
                counts: dict[str, int] = {}
                for row in rows:
                    counts[row["a"]["category"]] = counts.get(row["a"]["category"], 0) + 1
                choices = ["all"] + sorted(counts, key=lambda c: -counts[c])
                names = evaluation_labels(a, b)
                return rows, names, summary, gr.Dropdown(choices, value="all"), table_rows(rows)

            def on_filter(rows, category, comparison, search):
                return table_rows(filter_rows(rows, category=category or "all", comparison=comparison or "all",
                                              text=search or ""))

            def on_show(rows, names, qid):
                row = next((r for r in rows if r["id"] == (qid or "").strip()), None)
                if row is None:
                    return f"<p>No loaded question has the id {html.escape(qid or '')!r}.</p>"
                return render_error(row, names)

            def on_select(rows, names, evt: gr.SelectData):
                chosen = evt.row_value[0] if evt.row_value else ""
                return chosen, on_show(rows, names, chosen)

            load_event = dict(fn=on_load, inputs=[path_a, path_b],
                              outputs=[rows_state, names_state, errors_status, category, table])
            load.click(**load_event, api_name="load_errors")

            def on_first_visit(rows, a, b):  # the table is drawn when first needed, not with every page load
                return on_load(a, b) if not rows else gr.skip()

            errors_tab.select(on_first_visit, [rows_state, path_a, path_b], load_event["outputs"])
            for control in (category, comparison):
                control.change(on_filter, [rows_state, category, comparison, search], table)
            search.submit(on_filter, [rows_state, category, comparison, search], table)
            search.input(on_filter, [rows_state, category, comparison, search], table)
            on_select.__annotations__["evt"] = gr.SelectData  # Gradio finds event data by the evaluated type
            table.select(on_select, [rows_state, names_state], [qid, detail])
            qid.submit(on_show, [rows_state, names_state, qid], detail)
    return demo


def serve(model_args: ModelArguments, adapter: str | None, *, host: str = "127.0.0.1", port: int = 7860,
          examples: str | None = "squad", errors: tuple[str, ...] = (), device: str = "auto", dtype: str = "auto",
          torch_threads: int | None = None, auth: str | None = None, no_auth_i_understand: bool = False,
          results_dir: str | Path = "results") -> None:
    """Load both models once, then serve the demo until interrupted (one request at a time, Gradio's queue).
    `auth` is 'USER:PASSWORD' (Gradio's login page); a host other than loopback needs it or
    `no_auth_i_understand` (ConfigError otherwise, before anything loads). The Errors tab opens the `errors`
    files and files under `results_dir` (`demo_files.AllowList`)."""
    credentials = launch_auth(host, auth, no_auth_i_understand)
    if credentials is None and not is_loopback(host):
        logger.warning("demo: --host %s without --auth: anyone who reaches it can use it", host)
    os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"  # no telemetry, no version check: works offline
    threads = torch_threads or (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count())
    torch.set_num_threads(max(1, threads or 1))  # once; requests run one at a time, so nothing oversubscribes
    files = AllowList.create(errors, results_dir=results_dir, cache_dir=model_args.cache_dir)
    models = load_demo_models(model_args, adapter, device=device, dtype=dtype)
    stop_token_ids(models.tokenizer)  # decodes the whole vocabulary once: now, not during the first question
    example_rows = []
    if examples and examples != "none":
        try:
            from ..data.assets import squad_file

            example_rows = dev_examples(squad_file(examples, "validation", model_args.cache_dir))
        except (SquadFormatError, OSError, ValueError) as err:
            logger.warning("demo: no prefilled examples (%s)", err)
    readable = [path for path in errors if os.path.isfile(path)]
    for path in sorted(set(errors) - set(readable)):
        logger.warning("demo: evaluation %s is not a file (the Errors tab will refuse it)", path)
    if readable:
        try:  # read the SQuAD file once now, not at the first page load
            load_error_rows(readable[0], readable[1] if len(readable) > 1 else None, files=files)
        except SquadFormatError as err:
            logger.warning("demo errors: %s", err)
        except RefusedPath as err:
            logger.warning("demo errors: %s: %s", readable[0], err)
    from starlette.middleware import Middleware
    import gradio as gr

    demo = build_demo(models, files=files, examples=example_rows, errors=errors)
    demo.queue(default_concurrency_limit=1)
    logger.info("demo: starting on http://%s:%d (Ctrl+C to stop)", host, port)
    theme = gr.themes.Default(font=["ui-sans-serif", "system-ui", "sans-serif"],
                              font_mono=["ui-monospace", "monospace"])
    try:
        demo.launch(server_name=host, server_port=port, share=False, ssr_mode=False, show_error=False,
                    theme=theme, css=CSS, footer_links=[], auth=credentials, max_file_size=0, mcp_server=False,
                    app_kwargs={"middleware": [Middleware(NoUploads)]})
    except OSError as err:
        raise ConfigError(f"port {port} on {host}: {err}") from None
