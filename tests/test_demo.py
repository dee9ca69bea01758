"""loraqa.app.demo: the pure helpers without a browser, the Ask logic on a tiny model against `loraqa evaluate`'s
file, `loraqa demo` itself through its API routes (the Errors tab's allow-list, uploads off, the login), and
driven as a person would, in headless Chromium through Selenium (skipped, saying why, without them). The
allow-list's own rules: test_demo_security.py."""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from http.cookiejar import CookieJar
from pathlib import Path

import pytest
import torch
from conftest import SQUAD, SUPER_BOWL, TREASURE, tiny_gpt2

from loraqa.cli import main
from loraqa.config import ConfigError, GenerationSettings, LoraArguments, ModelArguments
from loraqa.data.squad import read_squad_json, squad_references
from loraqa.app.demo import (answer, ask, demo_settings, evaluation_labels, load_demo_models, load_error_rows,
                             token_probabilities)
from loraqa.app.demo_files import REFUSAL, AllowList
from loraqa.app.demo_view import (error_rows, filter_rows, find_span, highlight_spans, parse_golds, render_error,
                                  shade_tokens, table_rows)
from loraqa.evaluation.evaluate import answer_question, load_model_for_eval
from loraqa.evaluation.metrics import score_questions
from loraqa.model.lora import attach_lora

ADAPTER_MAX_LENGTH = 128
USER, PASSWORD = "reviewer", "not-a-real-secret"  # the test server's --auth
QUESTION = "Which team won Super Bowl 50?"
# Evaluation A and B of the five questions of conftest's SQuAD file: A right and B wrong on q1 and q4, the
# other way round on q2 and q5; one prediction per failure category.
PREDICTIONS_A = {"q1": "Denver Broncos", "q2": "Santa Clara", "q3": "24-10 to earn", "q4": "under the old oak tree",
                 "q5": "a dragon"}
PREDICTIONS_B = {"q1": "Carolina Panthers", "q2": "Levi's Stadium", "q3": "", "q4": "the old oak",
                 "q5": "number 399"}


# ------------------------------------------------------------------------------------------ pure helpers

def test_find_span_exact_then_ignoring_case():
    assert find_span("The Denver Broncos won.", "denver broncos") == (4, 18)
    assert find_span("The Denver Broncos won.", "Broncos") == (11, 18)
    assert find_span("The Denver Broncos won.", "Panthers") is None
    assert find_span("abc", "  ") is None


def test_highlight_spans_docstring_overlap_and_escaping():
    assert highlight_spans("Paris is in France.", [(12, 18, "gold"), (9, 18, "pred-a")]) == \
        'Paris is <mark class="pred-a">in </mark><mark class="gold pred-a">France</mark>.'
    assert highlight_spans("a <b> & c", [(2, 5, "gold")]) == 'a <mark class="gold">&lt;b&gt;</mark> &amp; c'
    assert highlight_spans("abc", [(1, 99, "cut"), (2, 2, "gold")]) == 'a<mark class="cut">bc</mark>'
    assert highlight_spans("abc", []) == "abc"


def test_shade_tokens_colour_follows_probability():
    assert shade_tokens([(" Paris", 0.5)]) == \
        '<span class="tok" style="background:hsl(60,75%,80%)" title="p=0.500">&nbsp;Paris</span>'
    html = shade_tokens([("<", 0.0), ("x", 1.0)])
    assert "hsl(0," in html and "hsl(120," in html and "&lt;" in html and shade_tokens([]) == ""


def test_parse_golds_and_demo_settings():
    assert parse_golds("Denver Broncos | The Denver Broncos") == ["Denver Broncos", "The Denver Broncos"]
    assert parse_golds("a\nb|c\n\n") == ["a", "b", "c"] and parse_golds(None) == []
    assert demo_settings(False, 50, 0.9, 0.7, 3, 16) == GenerationSettings(max_new_tokens=16, seed=3)
    assert demo_settings(True, 0, 1.0, 0.7, 3, 16) == GenerationSettings(max_new_tokens=16, do_sample=True,
                                                                         temperature=0.7, seed=3)
    assert demo_settings(True, 10, 0.9, 1.0, 0, 32).top_k == 10
    with pytest.raises(ConfigError, match="temperature"):
        demo_settings(True, 0, 1.0, 0.0, 0, 32)


def _evaluation(path: Path, squad_path: Path, predictions: dict[str, str]) -> Path:
    scores = score_questions(predictions, squad_references(read_squad_json(squad_path)))
    per_question = {q: {"exact_match": s.exact_match, "f1": s.f1} for q, s in scores.items()}
    path.write_text(json.dumps({
        "data": str(squad_path), "n": len(scores), "predictions": predictions, "per_question": per_question,
        "exact_match": 100 * sum(s["exact_match"] for s in per_question.values()) / len(scores),
        "f1": 100 * sum(s["f1"] for s in per_question.values()) / len(scores)}))
    return path


@pytest.fixture(scope="module")
def files(tmp_path_factory, gpt2_tokenizer) -> dict:
    """A tiny random GPT-2, an adapter with random non-zero B trained 'at' max_length 128, and under root/results
    the five-question SQuAD file and two evaluations of it; `allow` is the demo's allow-list when started in
    root; `outside` is an evaluation outside results/ and `link` a symlink under results/ leading to it."""
    root = tmp_path_factory.mktemp("demo")
    model_dir, adapter_dir = root / "tiny-gpt2", root / "adapter"
    tiny_gpt2().save_pretrained(model_dir)
    gpt2_tokenizer.save_pretrained(model_dir)
    peft_model = attach_lora(tiny_gpt2(), LoraArguments(lora_r=4, lora_alpha=8))
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, weight in peft_model.named_parameters():
            if "lora_B" in name:
                weight.copy_(0.5 * torch.randn(weight.shape, generator=generator))
    peft_model.save_pretrained(adapter_dir)
    (adapter_dir / "run_config.json").write_text(json.dumps({"data": {"max_length": ADAPTER_MAX_LENGTH}}))
    results = root / "results"
    results.mkdir()
    squad_path = results / "squad.json"
    squad_path.write_text(json.dumps(SQUAD))
    outside = _evaluation(root / "eval_outside.json", squad_path, PREDICTIONS_A)
    (results / "link.json").symlink_to(outside)
    return {"root": root, "model": model_dir, "adapter": adapter_dir, "squad": squad_path, "outside": outside,
            "link": results / "link.json",
            "a": _evaluation(results / "eval_a.json", squad_path, PREDICTIONS_A),
            "b": _evaluation(results / "eval_b.json", squad_path, PREDICTIONS_B),
            "allow": AllowList.create(results_dir=results, cache_dir=root / "cache")}


def test_error_rows_categories_and_filters(files):
    rows, summary = load_error_rows(str(files["a"]), str(files["b"]), files=files["allow"])
    assert summary.startswith("5 questions.") and [r["id"] for r in rows] == ["q1", "q2", "q3", "q4", "q5"]
    assert {r["id"]: r["a"]["category"] for r in rows} == {
        "q1": "correct", "q2": "wrong span of the context", "q3": "right answer with extra words", "q4": "correct",
        "q5": "answer not in context"}
    assert {r["id"]: r["b"]["category"] for r in rows}["q3"] == "empty answer"
    ids = lambda kept: [r["id"] for r in kept]  # noqa: E731
    assert ids(filter_rows(rows, comparison="A right, B wrong")) == ["q1", "q4"]
    assert ids(filter_rows(rows, comparison="B right, A wrong")) == ["q2", "q5"]
    assert ids(filter_rows(rows, comparison="both wrong")) == ["q3"]
    assert ids(filter_rows(rows, category="correct", text="OAK")) == ["q4"]
    assert ids(filter_rows(rows, text="dragon")) == ["q5"] and filter_rows(rows, text="zebra") == []
    only_a = error_rows(json.loads(files["a"].read_text()), None, {r["id"]: r for r in read_squad_json(files["squad"])})
    assert filter_rows(only_a, comparison="A right, B wrong") == [] and len(filter_rows(only_a)) == 5
    assert table_rows(rows[:1])[0] == ["q1", QUESTION, "Denver Broncos | The Denver Broncos", "Denver Broncos",
                                       "correct", 100.0, "Carolina Panthers", "wrong span of the context", 0.0]
    detail = render_error(rows[0], ("eval_a.json", "eval_b.json"))
    assert '<mark class="gold pred-a">Denver Broncos</mark>' in detail
    assert '<mark class="pred-b">Carolina Panthers</mark>' in detail
    # a sweep's runs all write eval_test.json: the labels keep the run's folder to tell A from B
    assert evaluation_labels("sweep/best-1/eval_test.json", "sweep/baseline-2/eval_test.json") == \
        ("best-1/eval_test.json", "baseline-2/eval_test.json")
    assert evaluation_labels("results/eval_a.json", "results/eval_b.json") == ("eval_a.json", "eval_b.json")
    assert evaluation_labels("results/eval_a.json", None) == ("eval_a.json", "")


# ---------------------------------------------------------------------------------- the Ask logic, in-process

@pytest.fixture(scope="module")
def models(files):
    return load_demo_models(ModelArguments(str(files["model"])), str(files["adapter"]), device="cpu")


@pytest.fixture(scope="module")
def evaluations(files) -> dict[str, dict]:
    """`loraqa evaluate` (greedy) of the five questions, by the base model and by the adapter."""
    out = {}
    for name, adapter in (("base", []), ("adapter", ["--adapter", str(files["adapter"])])):
        path = files["root"] / f"evaluate_{name}.json"
        assert main(["evaluate", "--model", str(files["model"]), "--data", str(files["squad"]), "--device", "cpu",
                     "--output", str(path), *adapter]) == 0
        out[name] = json.loads(path.read_text())
    return out


def test_ask_answers_as_the_evaluation_file_and_cuts_as_evaluate(files, models, evaluations):
    """Each column's greedy answer to each of the five questions is the one `loraqa evaluate` wrote for it (the
    base model's file and the adapter's, at its training max_length); the long paragraph is cut for both
    models and the page says so. A sampled answer is `loraqa ask`'s for the same seed."""
    records = read_squad_json(files["squad"])
    assert evaluations["adapter"]["max_length"] == ADAPTER_MAX_LENGTH and evaluations["adapter"]["prompts_cut"] == 2
    for record in records:
        golds = " | ".join(record["answers"]["text"])
        out = ask(models, record["context"], record["question"], golds, GenerationSettings())
        assert {side: out[side]["text"] for side in ("base", "adapter")} == \
            {side: evaluations[side]["predictions"][record["id"]] for side in ("base", "adapter")}, record["id"]
        assert out["status"].startswith("Answered (greedy,") and 'class="tok"' in out["base"]["html"]
        em = evaluations["adapter"]["per_question"][record["id"]]["exact_match"]
        assert f"EM {100 * em:.0f} · F1" in out["adapter"]["html"]
        long = record["context"] == TREASURE
        assert ("too long for the adapter model" in out["status"]) == long
        assert (f"max_length {ADAPTER_MAX_LENGTH}" in out["status"]) == long
        assert ('<mark class="cut">' in out["context"]) == long
    assert any(evaluations["base"]["predictions"][q] != evaluations["adapter"]["predictions"][q]
               for q in evaluations["base"]["predictions"])  # the adapter changes the model
    merged, tokenizer, _ = load_model_for_eval(ModelArguments(str(files["model"])), str(files["adapter"]), device="cpu")
    sampled = GenerationSettings(do_sample=True, top_k=20, temperature=0.8, seed=5)
    out = ask(models, SUPER_BOWL, QUESTION, "", sampled)
    assert out["adapter"]["text"] == answer_question(merged, tokenizer, SUPER_BOWL, QUESTION, sampled,
                                                     ADAPTER_MAX_LENGTH)


def test_ask_messages_instead_of_tracebacks(files, models):
    empty = ask(models, "  ", "", "", GenerationSettings())
    assert empty["status"] == "Please type a context and a question: there is nothing to answer yet."
    assert empty["base"]["text"] == empty["adapter"]["text"] == ""
    missing = load_demo_models(ModelArguments(str(files["model"])), str(files["squad"].parent / "no-such-run"),
                               device="cpu")
    assert missing.adapted is None and "no-such-run" in missing.adapter_error
    out = ask(missing, SUPER_BOWL, QUESTION, "", GenerationSettings())
    assert out["base"]["text"] and "No adapter answer" in out["status"] and "no-such-run" in out["adapter"]["html"]


def test_token_probabilities_are_greedy_decodings_own(models):
    """For a greedy answer whose text re-tokenizes to the generated tokens, the shading is exact: the same
    tokens, each the most probable one, with the probabilities `generate` computed."""
    model, tokenizer = models.base, models.tokenizer
    checked = 0
    for k in range(12):
        prompt = tokenizer(f"Context: {SUPER_BOWL}\nQuestion: question {k}?\nAnswer:").input_ids
        out = model.generate(torch.tensor([prompt]), max_new_tokens=4, do_sample=False, output_scores=True,
                             return_dict_in_generate=True, pad_token_id=tokenizer.eos_token_id)
        generated = out.sequences[0, len(prompt):].tolist()
        text = tokenizer.decode(generated)
        if text.strip() != text.lstrip() or tokenizer(" " + text.strip()).input_ids != generated:
            continue
        tokens, greedy_path = token_probabilities(model, tokenizer, prompt, text.strip())
        expected = [torch.softmax(s[0], -1)[t].item() for s, t in zip(out.scores, generated)]
        assert greedy_path and [t for t, _ in tokens] == [tokenizer.decode([t]) for t in generated]
        assert [p for _, p in tokens] == pytest.approx(expected, rel=1e-4)
        checked += 1
    assert checked >= 3
    assert token_probabilities(model, tokenizer, prompt, "") == ([], True)
    result = answer(model, tokenizer, SUPER_BOWL, QUESTION, GenerationSettings(max_new_tokens=8), 512)
    assert "".join(t for t, _ in result.tokens).strip() == result.text and result.context_cut == 0


# ------------------------------------------------------------------------------------ in a real browser

def _browser_paths() -> tuple[str, str]:
    pytest.importorskip("gradio", reason="the demo's browser test needs gradio (pip install -e '.[demo]')")
    pytest.importorskip("selenium", reason="the demo's browser test needs selenium (pip install -e '.[demo]')")
    chromium = next(filter(None, map(shutil.which, ("chromium", "chromium-browser", "google-chrome"))), None)
    driver = shutil.which("chromedriver")
    if not chromium or not driver:
        pytest.skip("headless Chromium or chromedriver is not installed: `make browser-test` installs Debian's "
                    "chromium and chromium-driver and runs this test")
    return chromium, driver


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(files):
    """`loraqa demo` on the tiny model and adapter, on a free port, started in the folder holding results/ and
    behind a login (--auth); its log is shown when it fails."""
    pytest.importorskip("gradio", reason="the demo's tests against the running app need gradio "
                                         "(pip install -e '.[demo]')")
    port = _free_port()
    log = tempfile.TemporaryFile(mode="w+")
    process = subprocess.Popen(
        [sys.executable, "-m", "loraqa.cli", "demo", "--model", str(files["model"]), "--adapter", str(files["adapter"]),
         "--port", str(port), "--device", "cpu", "--examples", str(files["squad"]), "--auth", f"{USER}:{PASSWORD}",
         "--errors", "results/eval_a.json", "results/eval_b.json"],
        stdout=log, stderr=subprocess.STDOUT, cwd=files["root"],
        env={**os.environ, "GRADIO_ANALYTICS_ENABLED": "False", "GRADIO_TEMP_DIR": str(files["root"] / "gradio-tmp")})
    url = f"http://127.0.0.1:{port}/"
    deadline = time.monotonic() + 300  # imports take ~15 s alone; much longer on a CPU shared with others
    try:
        while True:
            if process.poll() is not None or time.monotonic() > deadline:
                log.seek(0)
                pytest.fail(f"`loraqa demo` did not start (exit code {process.poll()}):\n{log.read()[-3000:]}")
            try:
                with urllib.request.urlopen(url, timeout=2):
                    break
            except OSError:
                time.sleep(0.5)
        yield url, log
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()


def _logged_in(url: str):
    """An opener holding the session cookie of the demo's login (the form the login page posts)."""
    opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(CookieJar()))
    form = urllib.parse.urlencode({"username": USER, "password": PASSWORD}).encode()
    with opener.open(url + "login", data=form, timeout=30) as response:
        assert json.load(response) == {"success": True}
    return opener


def _load_errors(opener, url: str, a: str, b: str = "") -> str:
    """The Errors tab's Load through its API route (`load_errors`, Gradio's two-step call): the status line."""
    request = urllib.request.Request(url + "gradio_api/call/load_errors", data=json.dumps({"data": [a, b]}).encode(),
                                     headers={"Content-Type": "application/json"})
    with opener.open(request, timeout=30) as response:
        event_id = json.load(response)["event_id"]
    with opener.open(f"{url}gradio_api/call/load_errors/{event_id}", timeout=120) as response:
        stream = response.read().decode()
    assert "event: complete" in stream, stream[-500:]
    outputs = [json.loads(line[len("data: "):]) for line in stream.splitlines() if line.startswith("data: ")][-1]
    statuses = [o for o in outputs if isinstance(o, str)]
    assert len(statuses) == 1, outputs
    return statuses[0]


def _post(opener, url: str, body: bytes, content_type: str) -> tuple[int, str]:
    try:
        with opener.open(urllib.request.Request(url, data=body, headers={"Content-Type": content_type}),
                         timeout=30) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode()


def test_running_app_opens_only_its_files_and_takes_no_uploads(files, server):
    """Requests to `loraqa demo` as a visitor would send them: nothing without the login; then the Errors tab's
    API route opens the evaluations under results/, and answers every other path (a readable evaluation
    outside, a symlink under results/ leading to it, `..`, a directory, /etc/passwd, a missing file) with the
    same line; an evaluation naming a hub dataset as its data is refused; the upload routes answer 403 and
    leave nothing behind."""
    url = server[0]
    assert _post(urllib.request.build_opener(), url + "gradio_api/call/load_errors",
                 json.dumps({"data": ["results/eval_a.json", ""]}).encode(), "application/json")[0] == 401
    opener = _logged_in(url)
    assert _load_errors(opener, url, "results/eval_a.json", "results/eval_b.json").startswith("5 questions. A = ")
    assert _load_errors(opener, url, str(files["a"])).startswith("5 questions.")  # absolute, under results/
    refused = [str(files["outside"]), str(files["link"]), "results/link.json", "results/../eval_outside.json",
               "results/../results/eval_a.json", "results", "/etc", "/etc/passwd", "results/no-such.json",
               "/no/such/file.json"]
    for path in refused:
        assert _load_errors(opener, url, path) == REFUSAL, path
    assert _load_errors(opener, url, "results/eval_a.json", "/etc/passwd") == REFUSAL
    hub = json.loads(files["a"].read_text()) | {"data": "rajpurkar/squad"}
    (files["root"] / "results" / "eval_hub.json").write_text(json.dumps(hub))
    assert _load_errors(opener, url, "results/eval_hub.json") == (
        "results/eval_hub.json: field 'data' ('rajpurkar/squad') is neither the fetched SQuAD ('squad') nor a "
        "file under results/: the demo reads no other data")
    boundary = "loraqa-test-boundary"
    body = (f'--{boundary}\r\nContent-Disposition: form-data; name="files"; filename="eval.json"\r\n'
            f'Content-Type: application/json\r\n\r\n{files["a"].read_text()}\r\n--{boundary}--\r\n').encode()
    for route in ("gradio_api/upload", "gradio_api/upload?upload_id=x", "gradio_api/process_recording",
                  "gradio_api/component_server"):
        assert _post(opener, url + route, body, f"multipart/form-data; boundary={boundary}") == \
            (403, "uploads are off in the loraqa demo"), route
    assert not any((files["root"] / "gradio-tmp").rglob("*.json"))  # the server's GRADIO_TEMP_DIR


@pytest.fixture(scope="module")
def browser(server):
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    chromium, driver_path = _browser_paths()
    options = Options()
    options.binary_location = chromium
    profile = tempfile.mkdtemp(prefix="loraqa-chromium-")
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 f"--user-data-dir={profile}", "--window-size=1400,1400"):
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=Service(driver_path))
    driver.get(server[0])
    _wait(driver, lambda d: _css(d, "input[type=password]").is_displayed(), "the login page", server)
    _css(driver, "input[type=text]").send_keys(USER)
    _css(driver, "input[type=password]").send_keys(PASSWORD)
    driver.find_element("xpath", "//button[contains(., 'Login')]").click()
    yield driver
    driver.quit()
    shutil.rmtree(profile, ignore_errors=True)


def _wait(driver, condition, what: str, server=None, timeout: float = 60):
    from selenium.common.exceptions import StaleElementReferenceException, WebDriverException
    from selenium.webdriver.support.ui import WebDriverWait

    def check(d):
        try:
            return condition(d)
        except (StaleElementReferenceException, WebDriverException):
            return False
    try:
        return WebDriverWait(driver, timeout, poll_frequency=0.2).until(check)
    except Exception:
        log = ""
        if server:
            server[1].seek(0)
            log = server[1].read()[-3000:]
        pytest.fail(f"the page never showed {what}\n--- demo log ---\n{log}")


def _css(driver, selector):
    from selenium.webdriver.common.by import By

    return driver.find_element(By.CSS_SELECTOR, selector)


def _csss(driver, selector):
    from selenium.webdriver.common.by import By

    return driver.find_elements(By.CSS_SELECTOR, selector)


def _type(driver, selector, text):
    """Set a text box at once (typing 6,000 words key by key takes minutes), as typing does: an input event."""
    driver.execute_script("arguments[0].value = arguments[1];"
                          "arguments[0].dispatchEvent(new Event('input', {bubbles: true}));",
                          _css(driver, selector), text)


def test_browser_ask_shows_the_answers_of_loraqa_ask(files, models, server, browser):
    merged, tokenizer, _ = load_model_for_eval(ModelArguments(str(files["model"])), str(files["adapter"]), device="cpu")
    context = "Super Bowl 50 was played in Santa Clara. The Denver Broncos won it against the Carolina Panthers."
    question = "Who won Super Bowl 50?"
    _wait(browser, lambda d: _css(d, "#ask-context textarea").is_displayed(), "the context box", server)
    _css(browser, "#ask-context textarea").send_keys(context)
    _css(browser, "#ask-question textarea").send_keys(question)
    _css(browser, "#ask-gold textarea").send_keys("Denver Broncos")
    for settings in (GenerationSettings(), GenerationSettings(do_sample=True, seed=7)):
        if settings.do_sample:  # the same controls a person uses: tick "sample", type a seed
            _css(browser, "#ask-sample input").click()
            seed = _css(browser, "#ask-seed input")
            seed.clear()
            seed.send_keys(str(settings.seed))
        _css(browser, "#ask-button").click()
        _wait(browser, lambda d: f"Answered ({settings.name}," in _css(d, "#ask-status").text,
              f"the {settings.name} answers", server)
        shown = {side: _css(browser, f"#{side}-answer textarea").get_property("value") for side in ("base", "adapter")}
        assert shown == {"base": answer_question(models.base, tokenizer, context, question, settings),
                         "adapter": answer_question(merged, tokenizer, context, question, settings)}
        assert _csss(browser, "#base-details span.tok") and _csss(browser, "#adapter-details span.tok")
        assert "EM 0 · F1 0.0" in _css(browser, "#adapter-details").text  # a random model misses the gold
        assert _css(browser, "#context-view .context").text.startswith("Super Bowl 50 was played")
    _type(browser, "#ask-context textarea", TREASURE)  # ~6,000 tokens: longer than max_length
    _css(browser, "#ask-button").click()
    _wait(browser, lambda d: "too long for the adapter model" in _css(d, "#ask-status").text, "the cut", server)
    assert f"max_length {ADAPTER_MAX_LENGTH}" in _css(browser, "#ask-status").text
    assert _csss(browser, "#context-view mark.cut")
    _type(browser, "#ask-question textarea", "")
    _css(browser, "#ask-button").click()
    _wait(browser, lambda d: _css(d, "#ask-status").text.startswith("Please type a question"), "the message", server)
    browser.find_element("xpath", "//button[contains(., 'Which team won Super Bowl 50?')] | "
                                  "//td[contains(., 'Which team won Super Bowl 50?')]").click()  # a dev example
    _wait(browser, lambda d: _css(d, "#ask-question textarea").get_property("value") == QUESTION,
          "the dev example filled in", server)
    assert _css(browser, "#ask-gold textarea").get_property("value") == "Denver Broncos | The Denver Broncos"


def _table_ids(driver) -> list[str]:
    """The id column of the Errors table as shown (Gradio draws its body rows as role=row divs)."""
    return [cell.text for cell in _csss(driver, "#errors-table [role=row] [role=gridcell][data-col='0']")]


def test_browser_errors_tab_filters_and_highlights(server, browser):
    browser.find_element("xpath", "//button[@role='tab' and contains(., 'Errors')]").click()
    _wait(browser, lambda d: _css(d, "#errors-status").text.startswith("5 questions."), "the two evaluations", server)
    _wait(browser, lambda d: _table_ids(d) == ["q1", "q2", "q3", "q4", "q5"], "the five questions", server)
    browser.find_element("xpath", "//*[@id='errors-comparison']//label[contains(., 'A right, B wrong')]").click()
    _wait(browser, lambda d: _table_ids(d) == ["q1", "q4"], "the questions A gets right and B wrong", server)
    search = _css(browser, "#errors-search textarea")
    search.send_keys("oak")
    _wait(browser, lambda d: _table_ids(d) == ["q4"], "the text filter", server)
    search.clear()
    search.send_keys(" ")  # an input event with an empty filter
    _wait(browser, lambda d: _table_ids(d) == ["q1", "q4"], "the cleared text filter", server)
    browser.find_element("xpath", "//*[@id='errors-table']//*[@role='gridcell'][contains(., 'Which team won')]").click()
    _wait(browser, lambda d: _csss(d, "#errors-detail mark.pred-a"), "the selected question", server)
    assert _css(browser, "#errors-qid textarea").get_property("value") == "q1"
    marks = {cls: [m.text for m in _csss(browser, f"#errors-detail .context mark.{cls}")]
             for cls in ("gold", "pred-a", "pred-b")}
    assert marks == {"gold": ["The ", "Denver Broncos"], "pred-a": ["Denver Broncos"], "pred-b": ["Carolina Panthers"]}
    # paths outside the allow-list, typed as a visitor would: the one refusal line, and no table
    for path in ("/etc/passwd", "results/link.json", "results/../eval_outside.json", "/no/such/file.json"):
        _type(browser, "#eval-a textarea", "results/eval_b.json")
        _css(browser, "#errors-load").click()
        _wait(browser, lambda d: _css(d, "#errors-status").text.startswith("5 questions. A = results/eval_b.json"),
              "evaluation B loaded as A", server)
        _type(browser, "#eval-a textarea", path)
        _css(browser, "#errors-load").click()
        _wait(browser, lambda d: _css(d, "#errors-status").text == REFUSAL, f"the refusal of {path}", server)
        _wait(browser, lambda d: _table_ids(d) == [], "an empty table", server)
