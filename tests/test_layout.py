"""The package's layout: stages import only the stages before them, no private name crosses a module border,
the public API loads lazily and the command line starts without the heavy libraries."""
import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "loraqa"
# a stage may import from the stages before it (and the shared config/files); measure and app sit on top
ORDER = ["config", "files", "args", "data", "model", "training", "generation", "evaluation", "measure", "study", "report",
         "app", "cli"]
HEAVY = ("torch", "transformers", "peft", "datasets", "gradio", "accelerate")


def _stage(module: str) -> str:
    return module.split(".")[1] if module.count(".") else module


def _imports(path: Path) -> list[tuple[str, list[str]]]:
    """(absolute module, imported names) of every loraqa import in a file, relative ones resolved."""
    package = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts[:-1])
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and (node.level or (node.module or "").startswith("loraqa")):
            base = package.split(".")[: len(package.split(".")) - node.level + 1] if node.level else []
            module = ".".join(base + ([node.module] if node.module else []))
            found.append((module, [alias.name for alias in node.names]))
    return found


MODULES = sorted(p for p in PACKAGE.rglob("*.py"))


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_stages_import_only_earlier_stages_and_no_private_names(path):
    own = _stage(".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts))
    for module, names in _imports(path):
        if module == "loraqa":
            assert names == ["__version__"], f"{path.name} imports {names} from the package root"
            continue
        stage = _stage(module)
        assert ORDER.index(stage) <= ORDER.index(own) or own in ("config", "files", "args"), \
            f"{path.relative_to(PACKAGE)} ({own}) imports {module} ({stage}), a later stage"
        private = [n for n in names if n.startswith("_")]
        assert not private, f"{path.relative_to(PACKAGE)} imports private {private} from {module}"


def test_every_stage_says_what_it_takes_and_gives():
    for init in PACKAGE.glob("*/__init__.py"):
        doc = ast.get_docstring(ast.parse(init.read_text()))
        assert doc and "->" in doc or "on top" in (doc or ""), f"{init}: no docstring saying what the stage does"


def _fresh(code: str) -> str:
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout.strip()


def test_the_public_api_loads_lazily():
    out = _fresh("import sys, loraqa; before = [m for m in %r if m in sys.modules]; "
                 "from loraqa import train, QADataCollator, preprocess_function; import loraqa.training.run as run; "
                 "print(before, train is run.train, sorted(loraqa.__all__) == loraqa.__all__)" % (HEAVY,))
    assert out == "[] True True"
    with pytest.raises(AttributeError, match="no attribute 'trian'"):
        import loraqa
        loraqa.trian  # noqa: B018


def test_the_command_line_starts_without_the_heavy_libraries():
    out = _fresh("import sys; from loraqa.cli import main; print([m for m in %r if m in sys.modules])" % (HEAVY,))
    assert out == "[]"


# `--help` and a one-line mistake answer without the heavy libraries (only `train`/`run`, whose flags are
# transformers' TrainingArguments, may import it); each case: argv, the exit status, a piece of what it prints
LIGHT_ANSWERS = [
    (["--help"], 0, "usage: loraqa"),
    *[([command, "--help"], 0, "usage:") for command in ("fetch", "data-stats", "score", "evaluate", "compare",
                                                         "failures", "ask", "demo", "sweep", "plots", "report",
                                                         "param-counts", "decoding-speed")],
    (["evaluate", "--modle", "x"], 2, "unknown flag --modle (did you mean --model?)"),
    (["evaluate", "--max_samples", "many"], 2, "--max_samples"),
    (["ask", "--dtype", "float8"], 2, "invalid choice"),
    (["score", "no-such-dataset.json", "no-such-predictions.json"], 2, "no-such-dataset.json"),
    (["sweep", "no-such-spec.yaml", "--output_dir", "x"], 2, "no-such-spec.yaml"),
]


@pytest.mark.parametrize("argv,status,says", LIGHT_ANSWERS, ids=lambda v: " ".join(v) if isinstance(v, list) else "")
def test_help_and_one_line_mistakes_answer_without_the_heavy_libraries(argv, status, says, tmp_path):
    code = ("import contextlib, io, sys; from loraqa.cli import main\n"
            "out = io.StringIO()\n"
            "with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):\n"
            "    try:\n        status = main(%r)\n    except SystemExit as exit:\n        status = exit.code\n"
            "print(status, [m for m in %r if m in sys.modules]); print(out.getvalue())" % (argv, HEAVY))
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    first, printed = result.stdout.split("\n", 1)
    assert first == f"{status} []"
    assert says in printed
    if status:
        assert len(printed.strip().splitlines()) == 1  # one line, no traceback
