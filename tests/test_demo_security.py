"""loraqa.app.demo_files: what the demo's Errors tab may open (called directly; the same against the running app
and in the browser: test_demo.py), the data an evaluation may name, and the --host/--auth rule."""
from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
from conftest import SQUAD

from loraqa.app.demo import load_error_rows
from loraqa.app.demo_files import REFUSAL, AllowList, NoUploads, RefusedPath, is_loopback, launch_auth
from loraqa.cli import main
from loraqa.config import ConfigError

PREDICTIONS = {"q1": "Denver Broncos", "q2": "Santa Clara", "q3": "24-10", "q4": "the old oak tree", "q5": ""}


def _evaluation(path: Path, data) -> Path:
    per_question = {q: {"exact_match": 0.0, "f1": 0.0} for q in PREDICTIONS}
    path.write_text(json.dumps({"data": data, "predictions": PREDICTIONS, "per_question": per_question,
                                "exact_match": 0.0, "f1": 0.0}))
    return path


@pytest.fixture
def tree(tmp_path, monkeypatch) -> dict:
    """In tmp_path (the working directory): results/ with an evaluation and SQuAD file, a sub-folder and
    symlinks leading in and out; outside/ with a given (--errors) and a not-given evaluation and a SQuAD file;
    cache/squad/dev-v1.1.json, a fetched SQuAD asset (the five questions)."""
    monkeypatch.chdir(tmp_path)
    for folder in ("results/sub", "outside", "cache/squad"):
        (tmp_path / folder).mkdir(parents=True)
    for path in ("results/squad.json", "outside/squad.json", "cache/squad/dev-v1.1.json"):
        (tmp_path / path).write_text(json.dumps(SQUAD))
    inside = _evaluation(tmp_path / "results/eval.json", "results/squad.json")
    given = _evaluation(tmp_path / "outside/given.json", "squad")
    other = _evaluation(tmp_path / "outside/other.json", "results/squad.json")
    (tmp_path / "results/link_out.json").symlink_to(other)
    (tmp_path / "results/folder_out").symlink_to(tmp_path / "outside", target_is_directory=True)
    (tmp_path / "results/link_in.json").symlink_to(inside)
    (tmp_path / "results/loop.json").symlink_to(tmp_path / "results/loop.json")
    allow = AllowList.create([str(given), "outside/missing.json"], results_dir="results", cache_dir="cache")
    return {"root": tmp_path, "inside": inside, "given": given, "other": other, "allow": allow}


def test_evaluations_given_or_under_results_open(tree):
    allow = tree["allow"]
    assert allow.evaluation("results/eval.json") == tree["inside"].resolve()
    assert allow.evaluation(f"  {tree['inside']}\n") == tree["inside"].resolve()
    assert allow.evaluation("results/link_in.json") == tree["inside"].resolve()  # a link that stays inside
    assert allow.evaluation("outside/given.json") == tree["given"].resolve()  # given with --errors
    rows, summary = load_error_rows("outside/given.json", "results/eval.json", files=allow)
    assert [r["id"] for r in rows] == ["q1", "q2", "q3", "q4", "q5"] and summary.startswith("5 questions.")


@pytest.mark.parametrize("path", [
    "outside/other.json",            # a readable evaluation outside results/, not given
    "results/link_out.json",         # a symlink under results/ leading to it
    "results/folder_out/other.json",  # through a symlinked folder under results/
    "results/../outside/other.json",  # `..`, leading out
    "results/sub/../eval.json",      # `..` even where it stays inside
    "outside/missing.json",          # given with --errors but missing
    "results/missing.json",          # missing under results/
    "results/sub", "results", "/",   # directories
    "/etc/passwd", "/etc/shadow", "/proc/self/environ",
    "results/loop.json",             # a symlink loop
    "", "   ", "results/eval.json\x00.txt",
])
def test_every_other_path_gets_the_same_refusal(tree, path):
    """One line, the same for a missing file, a directory, a readable file elsewhere and a symlink leading out:
    nothing tells a visitor which paths exist. For evaluation A and for B."""
    with pytest.raises(RefusedPath) as refused:
        tree["allow"].evaluation(path)
    assert str(refused.value) == REFUSAL
    for a, b in ((path, None), ("results/eval.json", path)):
        if b == "" or b is not None and not b.strip():
            continue  # an empty B means no B
        with pytest.raises(RefusedPath) as refused:
            load_error_rows(a, b, files=tree["allow"])
        assert str(refused.value) == REFUSAL


def test_data_is_read_only_from_fetched_squad_or_results(tree, monkeypatch):
    """An evaluation's "data": the alias 'squad' and any path ending in squad/dev-v1.1.json (as `loraqa evaluate`
    writes it, on any machine) read the fetched file; a file under results/ is read; a hub dataset name, a file
    elsewhere, `..` and a missing file are refused, the same way whether the file exists, and the hub is never
    asked."""
    import datasets

    def no_hub(*args, **kwargs):
        pytest.fail(f"datasets.load_dataset{args} was called: the demo must never fetch from a hub")
    monkeypatch.setattr(datasets, "load_dataset", no_hub)
    root, allow = tree["root"], tree["allow"]
    fetched = (root / "cache/squad/dev-v1.1.json").resolve()
    for data, expected in (("squad", fetched), ("/elsewhere/data/squad/dev-v1.1.json", fetched),
                           ("data/squad/dev-v1.1.json", fetched), ("results/squad.json", root / "results/squad.json"),
                           (str(root / "results/squad.json"), root / "results/squad.json")):
        assert allow.squad_data(data, "validation", evaluation="e.json") == expected.resolve(), data
        rows, _ = load_error_rows(str(_evaluation(root / "results/e.json", data)), files=allow)
        assert rows[0]["context"].startswith("Super Bowl 50"), data
    refusal = ("e.json: field 'data' ({!r}) is neither the fetched SQuAD ('squad') nor a file under results/: the "
               "demo reads no other data")
    for data in ("rajpurkar/squad", "user/ds", "outside/squad.json", str(root / "outside/squad.json"),
                 "outside/no-such.json", "results/../outside/squad.json", "results/folder_out/squad.json",
                 "/etc/passwd", "/etc/no-such-file", "results/sub", "", "../squad/dev-v1.1.json/../x"):
        with pytest.raises(RefusedPath) as refused:
            allow.squad_data(data, "validation", evaluation="e.json")
        assert str(refused.value) == refusal.format(data), data
        with pytest.raises(RefusedPath, match="field 'data'"):
            load_error_rows(str(_evaluation(root / "results/e.json", data)), files=allow)
    for data in (None, 3, ["squad"]):
        with pytest.raises(RefusedPath) as refused:
            allow.squad_data(data, "validation", evaluation="e.json")
        assert str(refused.value) == refusal.format("")
    # held-out articles are scored on the train file: not fetched here, and said so
    with pytest.raises(RefusedPath, match=r"fetched SQuAD file train-v1.1.json, which is not in .*loraqa fetch squad"):
        allow.squad_data("squad", "train", evaluation="e.json")


def test_host_other_than_loopback_needs_auth(capsys):
    assert [is_loopback(h) for h in ("127.0.0.1", "127.1.2.3", "localhost", "::1", "[::1]")] == [True] * 5
    assert [is_loopback(h) for h in ("0.0.0.0", "", "::", "192.168.1.5", "example.org")] == [False] * 5
    assert launch_auth("127.0.0.1", None) is None
    assert launch_auth("0.0.0.0", "ann:s3cret:with:colons") == ("ann", "s3cret:with:colons")
    assert launch_auth("0.0.0.0", None, no_auth_i_understand=True) is None
    with pytest.raises(ConfigError, match=r"^--host 0\.0\.0\.0 lets other machines reach the demo: give --auth"):
        launch_auth("0.0.0.0", None)
    for bad in ("ann", "ann:", ":s3cret", ""):
        with pytest.raises(ConfigError, match="^--auth: expected USER:PASSWORD") as err:
            launch_auth("127.0.0.1", bad)
        assert "s3cret" not in str(err.value)
    # the command: one line, exit 2, before any model or gradio loads (a missing model would fail later)
    for argv in (["--host", "0.0.0.0"], ["--host", "192.168.1.5", "--no_auth_i_understand", "false"],
                 ["--host", "0.0.0.0", "--auth", "ann"]):
        assert main(["demo", "--model", "no-such-model", *argv]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("loraqa demo: error: --"), err
    assert main(["demo", "--host", "0.0.0.0", "--no_auth_i_understand", "maybe"]) == 2
    assert "invalid choice: 'maybe'" in capsys.readouterr().err


def test_no_uploads_refuses_every_request_carrying_files():
    """The middleware before Gradio's routes: its upload routes and any multipart body are refused (also with a
    second Content-Type header or in capitals), the login form and JSON calls pass (the running app: test_demo)."""
    def status(path: str, *content_types: bytes) -> int:
        reached, sent = [], []

        async def app(scope, receive, send):
            reached.append(scope["path"])

        async def send(message):
            sent.append(message)
        headers = [(b"host", b"x")] + [(b"content-type", c) for c in content_types]
        asyncio.run(NoUploads(app)({"type": "http", "path": path, "headers": headers}, None, send))
        assert bool(reached) != bool(sent)
        return 200 if reached else sent[0]["status"]

    form = b"multipart/form-data; boundary=x"
    assert status("/gradio_api/upload", form) == status("/gradio_api/upload/") == 403
    assert status("/gradio_api/process_recording", form) == status("/upload") == 403
    for content_types in ((form,), (b"MULTIPART/FORM-DATA; boundary=x",), (form, b"application/json"),
                          (b"application/json", form)):
        assert status("/gradio_api/component_server", *content_types) == 403
    assert status("/login", form) == status("/login/", form) == 200
    assert status("/gradio_api/call/load_errors", b"application/json") == status("/gradio_api/info") == 200
