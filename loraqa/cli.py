"""`loraqa SUBCOMMAND ...`: a thin layer over the library: parse, build the config, call, say where output went.

The subcommands are `COMMANDS` (listed by `loraqa --help`). `train`, `evaluate`, `ask`, `bench` and `run` take
transformers-style flags (`--learning_rate`, dash spellings too) and `--config run.yaml`; flags override the YAML
file. Errors are one line and exit with status 2 (argparse-based subcommands: `args.ArgumentParser`);
`--debug` anywhere on the command line shows the traceback instead.

Why one file of ~500 lines: one short function per subcommand (parse, call one library function, report), so that
`loraqa --help` and every one-line mistake answer without importing torch or transformers.
"""
from __future__ import annotations

import difflib
import importlib.util
import json
import logging
import sys
import traceback
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from .args import ArgumentParser
from .config import ConfigError, default_cache_dir
from .data.assets import ASSET_NAMES, FetchError

log = logging.getLogger("loraqa")


def _fetch(argv):
    parser = ArgumentParser(prog="loraqa fetch", description="Fetch verified offline assets.")
    parser.add_argument("assets", nargs="*", metavar="ASSET",
                        help=f"assets to fetch: {', '.join(ASSET_NAMES)} (default: all)")
    parser.add_argument("--cache_dir", "--cache-dir", default=default_cache_dir(), help="cache (env LORAQA_CACHE)")
    args = parser.parse_args(argv)
    from .data.assets import fetch

    for name in args.assets or ASSET_NAMES:
        print(f"{name}: {fetch(name, args.cache_dir)}")


def _score(argv):
    parser = ArgumentParser(prog="loraqa score", description="Official SQuAD v1.1 evaluation (unanswerable "
                                     "v2.0 questions as the v2.0 script scores them).")
    parser.add_argument("dataset_file", help="SQuAD v1.1 or v2.0 dataset JSON")
    parser.add_argument("prediction_file", help="JSON object {question id: answer text}")
    args = parser.parse_args(argv)
    from .data.squad import SquadFormatError, read_squad_json, squad_references
    from .evaluation.metrics import squad_scores

    references = squad_references(read_squad_json(args.dataset_file))
    try:
        predictions = json.loads(Path(args.prediction_file).read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise SquadFormatError(f"{args.prediction_file}: not a readable JSON file ({err})") from None
    if not isinstance(predictions, dict) or not all(isinstance(v, str) for v in predictions.values()):
        raise SquadFormatError(f"{args.prediction_file}: expected a JSON object of question id -> answer text")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        scores = squad_scores(predictions, references)
    for w in caught:
        print(f"warning: {w.message}", file=sys.stderr)
    print(json.dumps(scores))


def _data_stats(argv):
    parser = ArgumentParser(prog="loraqa data-stats", description="Token-length statistics of a SQuAD file.")
    parser.add_argument("--model", default="smollm2-135m", help="model (or tokenizer folder) whose tokenizer to use")
    parser.add_argument("--data", default="squad", help="SQuAD JSON, or 'squad' for fetched v1.1")
    parser.add_argument("--split", default="train", choices=["train", "validation"])
    parser.add_argument("--max_lengths", "--max-lengths", default="256,384,512,768,1024")
    parser.add_argument("--cache_dir", "--cache-dir", default=default_cache_dir())
    parser.add_argument("--output", default=None, help="also write the statistics as JSON here")
    args = parser.parse_args(argv)
    from .data.assets import fetch, squad_file
    from .files import write_json_atomic
    from .data.squad import load_squad, token_length_stats
    from .model.loading import load_tokenizer, resolve_model

    source = str(fetch("gpt2-tokenizer", args.cache_dir)) if args.model == "gpt2-tokenizer" else \
        resolve_model(args.model, args.cache_dir)
    tokenizer = load_tokenizer(source)
    dataset = load_squad(squad_file(args.data, args.split, args.cache_dir), args.split)
    stats = token_length_stats(dataset, tokenizer, [int(x) for x in args.max_lengths.split(",")])
    stats.update(tokenizer=source, data=args.data, split=args.split)
    print(f"{stats['n']} questions, tokenizer {source}")
    print("part      " + "".join(f"{k:>7s}" for k in stats["percentiles"]["total"]))
    for part, values in stats["percentiles"].items():
        print(f"{part:10s}" + "".join(f"{v:7d}" for v in values.values()))
    for max_length, row in stats["max_length"].items():
        print(f"max_length {max_length:>5s}: {row['truncated']:6d} truncated (context window), {row['dropped']:4d} dropped")
    if args.output:
        write_json_atomic(args.output, stats)


def _train(argv, defaults: dict | None = None):
    """`loraqa train`; `defaults` are a calling command's own settings (`run`'s), below the user's file and flags."""
    from .config import DataArguments, LoraArguments, ModelArguments
    from .training.arguments import LoraQATrainingArguments
    from .args import parse_config_with_sources
    from .training.run import train

    (model_args, lora_args, data_args, training_args), sources = parse_config_with_sources(
        (ModelArguments, LoraArguments, DataArguments, LoraQATrainingArguments), argv, defaults=defaults,
        defaults_source="run")
    result = train(model_args, lora_args, data_args, training_args, sources=sources)
    if result.summary:
        s = result.summary
        print(f"trained {s['model_resolved']} ({s['method']}): {s['trainable_params']:,} of {s['total_params']:,} "
              f"parameters trainable (x{s['reduction_factor']}), {s['global_steps']} steps, "
              f"{s['train_examples_per_s']:.2f} examples/s, final validation loss {s['final_validation_loss']}")
        print(f"run directory: {result.output_dir}")
    return model_args, result


def _evaluate(argv):
    from .config import EvaluateArguments, GenerationSettings, ModelArguments
    from .args import parse_config

    model_args, eval_args, settings = parse_config((ModelArguments, EvaluateArguments, GenerationSettings), argv)
    from .evaluation.evaluate import evaluate, strategy_table

    result = evaluate(model_args, eval_args, settings)
    if "strategies" in result:
        print(strategy_table(result))
    else:
        print(f"EM {result['exact_match']:.2f} [{result['exact_match_ci'][0]:.2f}, {result['exact_match_ci'][1]:.2f}]  "
              f"F1 {result['f1']:.2f} [{result['f1_ci'][0]:.2f}, {result['f1_ci'][1]:.2f}]  n={result['n']}  "
              f"{result['questions_per_s']:.2f} questions/s")
    print(f"written: {eval_args.output}")


def _compare(argv):
    parser = ArgumentParser(prog="loraqa compare", description="Paired comparison of two evaluations.")
    parser.add_argument("a", help="evaluation JSON A (e.g. the baseline)")
    parser.add_argument("b", help="evaluation JSON B; deltas are B - A")
    parser.add_argument("--output", default=None, help="also write the comparison JSON here")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    from .evaluation.analysis import compare
    from .files import write_json_atomic

    r = compare(args.a, args.b, seed=args.seed)
    em, f1 = r["exact_match"], r["f1"]
    at_floor = f1["permutation_p_value"] <= 1 / (f1["permutation_resamples"] + 1)
    print(f"{r['n_common']} common questions" + (f", {r['answers_differ']} answers differ" if "answers_differ" in r else "")
          + ("; CIs and p resample paragraphs" if r["resampled"] == "paragraphs" else
             "; CIs and p resample questions (the files record no paragraphs)"))
    print(f"EM {em['a']:.2f} -> {em['b']:.2f}: delta {em['delta']:+.2f} [{em['delta_ci'][0]:+.2f}, "
          f"{em['delta_ci'][1]:+.2f}], McNemar p = {em['mcnemar']['p_value']:.3g}")
    print(f"F1 {f1['a']:.2f} -> {f1['b']:.2f}: delta {f1['delta']:+.2f} [{f1['delta_ci'][0]:+.2f}, "
          f"{f1['delta_ci'][1]:+.2f}], permutation p = {f1['permutation_p_value']:.3g}"
          + (f" (the smallest p {f1['permutation_resamples']} resamples can give)" if at_floor else ""))
    if args.output:
        write_json_atomic(args.output, r)


def _failures(argv):
    parser = ArgumentParser(prog="loraqa failures", description="Failure categories as Markdown.")
    parser.add_argument("evaluation", help="evaluation JSON written by `loraqa evaluate`")
    parser.add_argument("--data", default=None, help="SQuAD JSON (default: the file the evaluation used)")
    parser.add_argument("--examples", type=int, default=3, help="examples per category")
    parser.add_argument("--output", default=None, help="write the Markdown here instead of printing it")
    parser.add_argument("--report_json", default=None, metavar="PATH", help="also write the report's input: the "
                        "category counts and one example per category with a context excerpt "
                        "(results/failure_examples.json)")
    args = parser.parse_args(argv)
    from .evaluation.analysis import failure_report
    from .files import write_json_atomic, write_text_atomic

    report = failure_report(args.evaluation, args.data, args.examples)
    if args.output:
        write_text_atomic(args.output, report)
        print(f"written: {args.output}")
    else:
        print(report)
    if args.report_json:
        from .report.inputs import failure_examples

        write_json_atomic(args.report_json, failure_examples(args.evaluation, args.data))
        print(f"written: {args.report_json}")


@dataclass
class AskArguments:
    adapter: str | None = field(default=None, metadata={"help": "Run directory of a trained adapter (or full model)."})
    context: str | None = field(default=None, metadata={"help": "The paragraph (asked for when missing)."})
    question: str | None = field(default=None, metadata={"help": "The question (an interactive loop when missing)."})
    device: str = field(default="auto", metadata={"help": "auto (CUDA when available, else cpu), cpu, cuda, ..."})
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = field(default="auto", metadata={
        "help": "auto: bfloat16 on a CUDA device that supports it, float32 elsewhere."})


def _ask(argv):
    from .config import GenerationSettings, ModelArguments
    from .args import parse_config

    model_args, args, settings = parse_config((ModelArguments, AskArguments, GenerationSettings), argv)
    from .evaluation.evaluate import answer_question, load_model_for_eval, training_max_length

    max_length = training_max_length(args.adapter)  # long contexts are cut as `evaluate` cuts them
    model, tokenizer, _ = load_model_for_eval(model_args, args.adapter, device=args.device, dtype=args.dtype)
    context = args.context if args.context is not None else input("Context: ")
    if args.question is not None:
        print(answer_question(model, tokenizer, context, args.question, settings, max_length))
        return
    while True:
        try:
            question = input("Question (empty to quit): ").strip()
        except EOFError:
            return
        if not question:
            return
        print(f"Answer: {answer_question(model, tokenizer, context, question, settings, max_length)}")


def _bench(argv):
    from .measure.bench import BenchArguments, BenchMeasurementError, run_bench, summary_lines
    from .config import ModelArguments
    from .args import parse_config

    model_args, bench_args = parse_config((ModelArguments, BenchArguments), argv)
    try:
        result = run_bench(model_args, bench_args)
    except BenchMeasurementError as err:
        print(f"loraqa bench: error: {err}", file=sys.stderr)
        raise SystemExit(1) from None
    print("\n".join(summary_lines(result)))
    print(f"written: {bench_args.output}")


# `loraqa run`'s own settings: a user's --config file and flags override them (run_config.json: sources).
# 12 minutes of training (steps sized by a speed probe) keep the whole job near 20 minutes on 2 CPU cores.
def _run(argv):
    """The main job (`make run`): fetch, fine-tune on a time budget, evaluate baseline and tuned, compare."""
    from .study.main_run import RUN_DEFAULTS, evaluate_run, summary_lines

    model_args, result = _train(argv, defaults=RUN_DEFAULTS)
    if not result.summary:  # another process of a torchrun / accelerate launch: it trained, rank 0 evaluates
        return
    print("\n".join(summary_lines(evaluate_run(result.output_dir, model_args))))


def _sweep(argv):
    parser = ArgumentParser(prog="loraqa sweep", description="Run a sweep spec: train + evaluate per run, "
                                     "resumable (rerun the same command after an interruption).")
    parser.add_argument("spec", help="sweep spec YAML (see loraqa.study.sweep)")
    parser.add_argument("--output_dir", "--output-dir", required=True, help="where the run directories go")
    parser.add_argument("--print_commands", "--print-commands", action="store_true",
                        help="print each pending run as a stand-alone shell line instead of running it")
    parser.add_argument("--max_runs", "--max-runs", type=int, default=None, help="stop after this many runs")
    parser.add_argument("--torch_threads", "--torch-threads", type=int, default=None,
                        help="threads per run (default: all cores); not part of a run's identity")
    parser.add_argument("--collect", default=None, metavar="RESULTS_JSON",
                        help="instead of running: build the study's results file (e.g. results/evaluation_results.json) "
                             "from the run directories that exist")
    parser.add_argument("--checkpoints", default=None, metavar="DIR", help="with --collect: export the "
                        "selected grid run's and the final model's adapter, run_config.json and tokenizer to "
                        "DIR/grid_best and DIR/final (e.g. results/model_checkpoints)")
    parser.add_argument("--readme", default=None, help="with --collect: rewrite the main table between the "
                        "README's study-table markers")
    parser.add_argument("--executor", choices=["local", "slurm"], default="local",
                        help="local: one run after another in this process (default); slurm: one Slurm job per "
                             "pending run through submitit (see loraqa.study.slurm)")
    parser.add_argument("--wait", action="store_true", help="with --executor slurm: follow the jobs until every run "
                        "is done (submitting the runs that wait for the grid once it is); without it, submit and return")
    slurm = parser.add_argument_group("Slurm (--executor slurm; also the spec's `slurm:` mapping, which flags override)")
    slurm.add_argument("--slurm_partition", default=None, help="partition to submit to (default: the cluster's)")
    slurm.add_argument("--slurm_gpus_per_run", type=int, default=None,
                       help="GPUs per run (default 0); more than 1 trains under torchrun, one process per GPU")
    slurm.add_argument("--slurm_cpus_per_run", type=int, default=None, help="CPUs per run (default: the cluster's)")
    slurm.add_argument("--slurm_time_min", type=int, default=None, help="time limit per job in minutes (default "
                       "1440); a run that reaches it is requeued and resumes from its last checkpoint")
    slurm.add_argument("--slurm_mem_gb", type=float, default=None, help="memory per run in GB")
    slurm.add_argument("--slurm_setup", action="append", default=None, metavar="LINE",
                       help="a shell line run before each job, e.g. 'module load cuda' (repeatable)")
    args = parser.parse_args(argv)
    if args.collect:
        from .study.collect import collect, main_table, update_readme
        from .study.sweep import other_revisions

        result = collect(args.spec, args.output_dir, args.collect, checkpoints=args.checkpoints)
        print(f"{len(result['runs'])} runs collected, {len(result['pending'])} pending; written: {args.collect}")
        for revision, run_ids in other_revisions(args.output_dir, [r["run_id"] for r in result["runs"]]).items():
            print(f"{len(run_ids)} run(s) made at another revision ({revision}): {', '.join(sorted(run_ids))}")
        if args.readme and update_readme(args.readme, main_table(result)):
            print(f"main table updated in {args.readme}")
        return
    if args.executor == "slurm":
        if args.print_commands or args.max_runs is not None:
            raise ConfigError("--print_commands and --max_runs go with --executor local")
        if importlib.util.find_spec("submitit") is None:
            raise ConfigError("--executor slurm needs submitit: pip install -e '.[slurm]'")
        from .study.slurm import slurm_settings, submit_sweep
        from .study.sweep import load_spec

        settings = slurm_settings(load_spec(args.spec), partition=args.slurm_partition,
                                  gpus_per_run=args.slurm_gpus_per_run, cpus_per_run=args.slurm_cpus_per_run,
                                  time_min=args.slurm_time_min, mem_gb=args.slurm_mem_gb, setup=args.slurm_setup)
        submit_sweep(args.spec, args.output_dir, settings, wait=args.wait, torch_threads=args.torch_threads)
        return
    if args.wait:
        raise ConfigError("--wait goes with --executor slurm")
    from .study.sweep import run_sweep

    run_sweep(args.spec, args.output_dir, print_commands=args.print_commands, limit=args.max_runs,
              torch_threads=args.torch_threads)


def _plots(argv):
    parser = ArgumentParser(prog="loraqa plots", description="Draw the study's figures (PNG and PDF) from "
                                     "its results files; plots without data yet are skipped with a note.")
    parser.add_argument("--results", default="results/evaluation_results.json", help="`loraqa sweep --collect` output")
    parser.add_argument("--output_dir", "--output-dir", default="results/plots")
    parser.add_argument("--strategies", nargs="*", default=[], metavar="PATH",
                        help="strategy-grid evaluations (`loraqa evaluate --strategy_grid true`), one colour each")
    parser.add_argument("--padding", default="results/padding_study.json", help="`loraqa padding-study` output")
    parser.add_argument("--cost", default="results/cost_study.json", help="`loraqa cost-study` output")
    args = parser.parse_args(argv)
    from .study.plots import make_plots

    written = make_plots(args.results, args.output_dir, strategies=args.strategies, padding=args.padding,
                         cost=args.cost)
    print(f"{len(written)} files written to {args.output_dir}: {', '.join(sorted({p.stem for p in written})) or 'none'}")


def _padding_study(argv):
    from .config import ModelArguments
    from .args import parse_config
    from .measure.padding import PaddingStudyArguments, run_padding_study, summary_lines

    model_args, study_args = parse_config((ModelArguments, PaddingStudyArguments),
                                          ["--model", "smollm2-135m"] + argv)
    result = run_padding_study(model_args, study_args)
    print("\n".join(summary_lines(result)))
    print(f"written: {study_args.output} ({result['wall_seconds']:.0f} s)")


def _cost_study(argv):
    from .config import ModelArguments
    from .args import parse_config
    from .measure.cost import CostStudyArguments, run_cost_study, summary_lines

    model_args, study_args = parse_config((ModelArguments, CostStudyArguments), ["--model", "smollm2-135m"] + argv)
    result = run_cost_study(model_args, study_args)
    print("\n".join(summary_lines(result)))
    print(f"written: {study_args.output} ({result['wall_seconds']:.0f} s)")


def _decoding_speed(argv):
    from .config import GenerationSettings, ModelArguments
    from .args import parse_config
    from .measure.decoding_speed import DecodingSpeedArguments, run_decoding_speed, summary_lines

    model_args, speed_args, settings = parse_config((ModelArguments, DecodingSpeedArguments, GenerationSettings),
                                                    ["--model", "smollm2-135m"] + argv)
    result = run_decoding_speed(model_args, speed_args, settings)
    print("\n".join(summary_lines(result)))
    print(f"written: {speed_args.output} ({result['wall_seconds']:.0f} s)")


def _report(argv):
    parser = ArgumentParser(prog="loraqa report", description="Build the technical report (Typst -> PDF) from "
                                     "the result files alone; what is not measured yet is printed as pending.")
    parser.add_argument("--results", default="results", help="folder of result files (never models)")
    parser.add_argument("--output", default="report.pdf")
    parser.add_argument("--png_dir", "--png-dir", default=None, help="also write one PNG per page here")
    parser.add_argument("--source_dir", "--source-dir", default=None,
                        help="where the filled Typst source goes (default report/build)")
    parser.add_argument("--author", default=None, help="the title block's author (default: the project's name)")
    parser.add_argument("--affiliation", default=None, help="the title block's affiliation line")
    args = parser.parse_args(argv)
    from .report.build import AFFILIATION, AUTHOR, ReportError, build_report

    try:
        built = build_report(args.results, args.output, png_dir=args.png_dir, source_dir=args.source_dir,
                             author=args.author or AUTHOR, affiliation=args.affiliation or AFFILIATION)
    except ReportError as err:
        raise ConfigError(str(err)) from None
    print(f"{built.pdf}: {built.pages} pages (Typst source in {built.source_dir}"
          + (f", PNG pages in {args.png_dir})" if args.png_dir else ")"))
    if built.pending:
        print("pending: " + ", ".join(built.pending))


def _param_counts(argv):
    parser = ArgumentParser(prog="loraqa param-counts", description="LoRA parameter counts and per-step "
                                     "costs in closed form (loraqa.measure.lora_math) for GPT-2 (124M, from its config) and "
                                     "the fetched SmolLM2-135M, and the prompt-token share of the training rows.")
    parser.add_argument("--cache_dir", "--cache-dir", default=default_cache_dir())
    parser.add_argument("--max_train_samples", type=int, default=2000, help="training questions for the token share")
    parser.add_argument("--output", default="results/parameter_counts.json")
    args = parser.parse_args(argv)
    from .files import run_metadata, write_json_atomic
    from .measure.lora_math import parameter_counts

    table = parameter_counts(args.cache_dir, max_train_samples=args.max_train_samples)
    write_json_atomic(args.output, {**table, **run_metadata()})
    s, share = table["smollm2-135m"]["presets"]["attention"]["16"], table["prompt_tokens"]["prompt_share"]
    print(f"smollm2-135m attention r=16: {s['trainable_params']:,} trainable (x{s['reduction_factor']}); "
          f"prompt tokens {100 * share:.1f}% of training tokens; written: {args.output}")


def _demo(argv):
    parser = ArgumentParser(prog="loraqa demo", description="A local web demo: base vs adapter answers side "
                                     "by side (Ask) and an evaluation browser (Errors). Needs the extra `demo`. "
                                     "The Errors tab opens only the --errors files and files under results/; "
                                     "uploads are off.")
    parser.add_argument("--model", default="gpt2", help="base model (alias, hub id or folder)")
    parser.add_argument("--adapter", default=None, help="run directory of a trained adapter")
    parser.add_argument("--port", type=int, default=7860)
    parser.add_argument("--host", default="127.0.0.1", help="address to bind; anything but loopback needs --auth "
                        "or --no_auth_i_understand true")
    parser.add_argument("--auth", default=None, metavar="USER:PASSWORD",
                        help="Gradio's login page with this user and password (visible to other users of this "
                        "machine in the process list)")
    parser.add_argument("--no_auth_i_understand", "--no-auth-i-understand", type=str.lower, nargs="?",
                        const="true", default="false", choices=("true", "false"),
                        help="serve a --host other than loopback without a password: anyone who reaches it can "
                        "use the models and read the evaluations under results/")
    parser.add_argument("--examples", default="squad", help="SQuAD JSON whose dev questions prefill the Ask tab, "
                        "'squad' (fetched v1.1 dev) or 'none'")
    parser.add_argument("--errors", nargs="*", metavar="EVAL_JSON", default=None,
                        help="one or two evaluation JSONs for the Errors tab (A, B); default: the study's final "
                        "model and untuned baseline on all of dev once they exist (results/evaluation_results.json), "
                        "else the complete grid's selection and the baseline on the test subset, else "
                        "results/eval_finetuned_500.json results/eval_baseline_500.json")
    parser.add_argument("--cache_dir", "--cache-dir", default=default_cache_dir())
    parser.add_argument("--device", default="auto", help="auto (CUDA when available, else cpu), cpu, cuda, ...")
    parser.add_argument("--dtype", default="auto", help="auto, float32, bfloat16, float16 (as `loraqa evaluate`)")
    parser.add_argument("--torch_threads", "--torch-threads", type=int, default=None,
                        help="torch threads, set once (default: the CPUs this process may use)")
    args = parser.parse_args(argv)
    if len(args.errors or []) > 2:
        parser.error("--errors takes one or two evaluation JSONs")
    from .app.demo_files import launch_auth

    args.no_auth_i_understand = args.no_auth_i_understand == "true"
    launch_auth(args.host, args.auth, args.no_auth_i_understand)  # a mistake here is a line before torch loads
    import importlib.util

    if importlib.util.find_spec("gradio") is None:  # the optional extra
        raise ConfigError("the demo needs gradio: pip install -e '.[demo]'")
    from .app.demo import serve
    from .config import ModelArguments

    from .study.collect import final_evaluations

    errors = args.errors if args.errors is not None else final_evaluations()
    serve(ModelArguments(args.model, args.cache_dir), args.adapter, host=args.host, port=args.port,
          examples=args.examples, errors=tuple(errors), device=args.device, dtype=args.dtype,
          torch_threads=args.torch_threads, auth=args.auth, no_auth_i_understand=args.no_auth_i_understand)


def _input_errors() -> tuple[type, ...]:
    """The errors that mean bad input: one line, no traceback. A stage's own error type is looked up only if the
    stage was imported (it cannot have raised otherwise), so that the CLI itself imports no torch or datasets."""
    errors = [ConfigError, FetchError, OSError]
    for module, name in (("loraqa.data.squad", "SquadFormatError"), ("loraqa.model.loading", "ModelSetupError")):
        if module in sys.modules:
            errors.append(getattr(sys.modules[module], name))
    return tuple(errors)


COMMANDS = {"fetch": _fetch, "data-stats": _data_stats, "score": _score, "train": _train, "evaluate": _evaluate,
            "compare": _compare, "failures": _failures, "ask": _ask, "demo": _demo, "bench": _bench, "run": _run, "sweep": _sweep,
            "plots": _plots, "padding-study": _padding_study, "cost-study": _cost_study,
            "decoding-speed": _decoding_speed, "report": _report,
            "param-counts": _param_counts}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv  # a global flag, before or after the subcommand
    argv = [arg for arg in argv if arg != "--debug"]
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__.strip())
        print("\nusage: loraqa {" + ",".join(COMMANDS) + "} [--help]")
        return 0
    if argv[0] not in COMMANDS:
        close = difflib.get_close_matches(argv[0], COMMANDS, n=1)
        print(f"loraqa: error: unknown command {argv[0]!r}" + (f" (did you mean {close[0]!r}?)" if close else "")
              + f"; commands: {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        COMMANDS[argv[0]](argv[1:])
    except Exception as err:
        if not isinstance(err, _input_errors()) or (isinstance(err, OSError) and err.filename is None):
            raise  # not about the user's input (an OSError naming no file: a bug or the network)
        if debug:
            traceback.print_exc()
        else:
            print(f"loraqa {argv[0]}: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
