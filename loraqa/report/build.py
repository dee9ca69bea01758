"""Result files -> the technical report: Typst source with every number filled in -> `report.pdf` (+ PNG pages).

Inputs: files in the results folder only, never models; each is optional and whatever is missing is
printed as pending (the study fills in as its runs finish):
    evaluation_results.json          the study (`loraqa.study.collect`)
    eval_baseline_500.json, eval_finetuned_500.json, compare_500.json, main_run/{summary,run_config}.json
                                     the preliminary `make run` adapter on the fixed 500-question dev subset
    strategies_finetuned_500.json    decoding strategies;  bench.json: speed;  data_stats_<tokenizer>_<split>.json
    label_example.json               one tokenized example (`report_inputs.write_label_example`, run once)
    failure_examples.json            failure examples with context (`loraqa failures EVAL --report_json ...`)
    parameter_counts.json            closed-form LoRA counts and costs (`loraqa param-counts`)
    padding_study.json               the padding study (`loraqa padding-study`)
    plots/<name>.pdf|png             figures (`loraqa plots`), looked up through FIGURES
Output: `source_dir` (default report/build/) holding main.typ and sections/*.typ with every placeholder
filled and the figures copied next to them; the PDF; optionally one PNG per page.

The prose lives in report/sections/*.typ, one file per section, with `{{name}}` placeholders, filled from
`loraqa.report.values` (what each result says) through `loraqa.report.text` (numbers and claims). A number
enters the text only through `Values.put/number`, which records the files, JSON pointers, operation and
format it came from, so a test can re-read every printed number from its source. A value that does not
exist becomes `missing("name: where")`, which stops compilation with that message if the text around it is
rendered; the sections guard such text with `#if` on `has_*` flags (an unset flag is false). Sentences
whose truth depends on results come from the `claim_*` functions, which compare the numbers they print.
The theory section's values come from `loraqa param-counts` and the study.
"""
from __future__ import annotations

import json
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from ..files import write_bytes_atomic
from .text import ReportError, Values, literal
from .values import report_values

TEMPLATE_DIR = Path(__file__).resolve().parents[2] / "report"
BUILD_MARKER = ".loraqa-report-build"
SECTIONS = ("abstract", "introduction", "methodology", "results", "analysis", "theory", "conclusion")
PLACEHOLDER = re.compile(r"\{\{\s*([A-Za-z0-9_]+)\s*\}\}")
# the title block's defaults name the project, not people (`loraqa report --author ... --affiliation ...`)
AUTHOR, AFFILIATION = "The loraqa project", "LoRA fine-tuning for extractive question answering"


# ---------------------------------------------------------------------------------------------- building

CODE_PREFIXES = ("table_", "fig_", "has_")  # placeholders that stand in Typst code (arguments, conditions)


def fill(template: str, values: Values) -> str:
    """Replace every {{name}} by its value. An unset `has_*` flag is false; any other value that does not
    exist becomes `missing("name: where")`, which stops compilation with that message if the text around
    it is rendered (so a section must guard it with a flag) and is harmless in a branch not taken."""

    def value(match: re.Match) -> str:
        name = match.group(1)
        if name in values.fields:
            return values.fields[name]
        if name.startswith("has_"):
            return "false"
        where = values.missing.get(name, "no value computed")
        call = f"missing({json.dumps(f'{name}: {where}')})"
        return call if name.startswith(CODE_PREFIXES) else "#" + call

    return PLACEHOLDER.sub(value, template)


# flags that describe the results rather than name an input: never listed as pending
STATE_FLAGS = ("has_claim_", "has_complete_", "has_grid_spread", "has_param_range", "has_test_table",
               "has_final_matches_best", "has_cost_spread")


@dataclass
class Report:
    pdf: Path
    pages: int
    source_dir: Path
    values: Values
    png: list[Path] = field(default_factory=list)

    @property
    def pending(self) -> list[str]:
        """Inputs and figures the report marks as pending (its has_* flags that are off, claims aside)."""
        return sorted(k[4:] for k, val in self.values.fields.items()
                      if k.startswith("has_") and val == "false" and not k.startswith(STATE_FLAGS))


def count_pages(pdf: Path) -> int:
    """Pages of a PDF: pypdf when installed, else the page objects in the file."""
    try:
        from pypdf import PdfReader
    except ImportError:
        return len(re.findall(rb"/Type\s*/Page\b(?!s)", pdf.read_bytes()))
    return len(PdfReader(str(pdf)).pages)


def build_report(results_dir: str | Path, output: str | Path = "report.pdf", *, png_dir: str | Path | None = None,
                 source_dir: str | Path | None = None, template_dir: str | Path = TEMPLATE_DIR,
                 ppi: int = 110, serif: str | None = None, author: str = AUTHOR,
                 affiliation: str = AFFILIATION) -> Report:
    """Fill the report's sections from `results_dir`, write the Typst source to `source_dir` and compile it.

    By default only the fonts inside the typst package are used (Libertinus Serif, New Computer Modern Math,
    DejaVu Sans Mono), so every machine builds the same PDF; `serif` names an installed font to use instead
    (it needs real small capitals for the headings, which Times-metric Liberation Serif lacks). `author` and
    `affiliation` fill the title block and the PDF's author field."""
    import typst

    template, source = Path(template_dir), Path(source_dir or Path(template_dir) / "build")
    if not (template / "main.typ").exists():
        raise ReportError(f"{template}: main.typ not found (the report's Typst sources)")
    if source.exists() and any(source.iterdir()):
        if not any((source / name).exists() for name in ("main.typ", BUILD_MARKER)):
            raise ReportError(f"{source}: not empty and not a previous report build (no main.typ, no "
                              f"{BUILD_MARKER}); not deleting it")
        shutil.rmtree(source)
    (source / "sections").mkdir(parents=True)
    # marked first, so that a build stopped half-way (a results file that does not parse) is still recognised
    (source / BUILD_MARKER).write_text("written by loraqa report; deleted and rebuilt by the next build\n")
    values = report_values(results_dir, source / "figures")
    for name, text in (("author", author), ("affiliation", affiliation)):  # Typst strings (code, not markup)
        values.fields[name] = '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'
    for path in template.glob("*.*"):
        if path.suffix in (".typ", ".bib", ".yml"):
            text = path.read_text()
            (source / path.name).write_text(fill(text, values) if path.suffix == ".typ" else text)
    for name in SECTIONS:
        path = template / "sections" / f"{name}.typ"
        text = path.read_text() if path.exists() else \
            f"#pending[{literal(f'report/sections/{name}.typ has not been written yet.')}]\n"
        (source / "sections" / path.name).write_text('#import "/lib.typ": *\n' + fill(text, values))
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    fonts = {"sys_inputs": {"serif": serif or "Libertinus Serif"}, "ignore_system_fonts": serif is None}
    try:
        # compiled to memory, then renamed into place: a failed compile keeps the previous report.pdf
        write_bytes_atomic(output, typst.compile(str(source / "main.typ"), root=str(source), **fonts))
        pngs = []
        if png_dir is not None:
            png_dir = Path(png_dir)
            png_dir.mkdir(parents=True, exist_ok=True)
            for old in png_dir.glob("page-*.png"):
                old.unlink()
            typst.compile(str(source / "main.typ"), output=str(png_dir / "page-{p}.png"), root=str(source),
                          format="png", ppi=ppi, **fonts)
            pngs = sorted(png_dir.glob("page-*.png"), key=lambda p: int(re.sub(r"\D", "", p.stem)))
    except typst.TypstError as err:
        raise ReportError(f"{source / 'main.typ'}: Typst could not compile the report:\n"
                          f"{getattr(err, 'diagnostic', None) or err}") from None
    return Report(output, count_pages(output), source, values, pngs)
