"""The trace-editor page (``memreason/serve/page.html``) in a real browser: Debian's headless Chromium driven
by Playwright with the system browser (no browser download), on the tiny reasoner. Ask, see the steps,
edit a memory step, regenerate, see the new answer; correct a step from a source; inject instead of
editing; keyboard only; the API key prompt; and model text that looks like markup stays text."""

import json
import os
import re
import shutil

import pytest
from serve_fixtures import ICE, editor_server, facts_file, tiny_editor  # noqa: F401

from memreason.interventions.revise import Edit
from memreason.model.tokens import parse
from memreason.serve import Server
from memreason.serve.page import page as editor_page
from memreason.tasks import get_task
from memreason.traces import Result, Trace

CHROMIUM = os.environ.get("MEMREASON_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
NEW_MEMORY = "Paris is the capital of France."


def _playwright():
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        return None
    return sync_playwright


needs_browser = pytest.mark.skipif(
    CHROMIUM is None or _playwright() is None,
    reason="the page is tested in Debian's headless Chromium through Playwright: needs chromium on PATH "
           "(apt-get install -y chromium; run.sh does it in CI) and `pip install playwright` (never "
           "`playwright install`: the system browser is used)")


# ---------------------------------------------------------------- the page as a file (no browser)

def test_the_page_loads_nothing_from_elsewhere_and_never_parses_text_as_html():
    html = editor_page()[0].decode()
    assert not re.search(r"https?://|//[a-z0-9.-]+\.[a-z]{2,}/", html, re.IGNORECASE)
    style = re.search(r"<style>(.*?)</style>", html, re.DOTALL).group(1)
    assert not re.search(r"url\(|@import|@font-face", style)
    assert not re.search(r"<(link|script|img)[^>]+(src|href)=\"(?!data:)", html)
    for sink in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval(", "new Function"):
        assert sink not in html, sink
    assert html.count("<script>") == 1 and html.count("<style>") == 1  # what the CSP hashes cover


# ---------------------------------------------------------------- in the browser

@pytest.fixture(scope="module")
def browser():
    with _playwright()() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True)
        try:
            yield browser
        finally:
            browser.close()


@pytest.fixture
def open_page(browser):
    """``open_page(server)``: a fresh tab on the server's page, ready; page errors fail the test."""
    pages, errors = [], []

    def open_(server, ready=True):
        page = browser.new_page(accept_downloads=True)
        page.on("pageerror", lambda error: errors.append(str(error)))
        def console(message):
            # a refused key is the browser's "Failed to load resource ... 401" by design; anything else is a bug
            if message.type == "error" and "status of 401" not in message.text:
                errors.append(message.text)

        page.on("console", console)
        page.set_default_timeout(120_000)  # a regeneration on a busy 2-core machine
        page.goto(f"http://127.0.0.1:{server.port}/")
        if ready:
            page.wait_for_selector("body[data-ready=true]")
        pages.append(page)
        return page

    yield open_
    for page in pages:
        page.close()
    assert errors == []


def _steps(page, where="#steps"):
    return [(li.get_attribute("class"), li.query_selector(".step-text").text_content())
            for li in page.query_selector_all(f"{where} > li")]


def _ask(page, question):
    page.fill("#question", question)
    page.press("#question", "Enter")
    page.wait_for_selector("#steps > li")


def _finished(page, count):
    # (not wait_for_function: the page's CSP forbids evaluating strings, which is what it does)
    page.wait_for_selector(f"#history-list > li:nth-child({count})")
    page.wait_for_selector("body[aria-busy=false]")


@needs_browser
def test_ask_edit_a_memory_step_regenerate_and_see_the_new_answer(editor_server, open_page):
    editor = editor_server.editor
    answered = editor.answer(ICE)
    expected = editor.revise(answered, Edit(0, text=NEW_MEMORY, kind="memory"))
    assert expected.predicted != answered.predicted  # the edit changes the answer (True -> none)
    page = open_page(editor_server)
    _ask(page, ICE)
    assert _steps(page) == [("kind-memory", "Ice is less dense than water."),
                            ("kind-reason", "Less dense things fgiat.")]
    assert page.text_content("#answer strong") == "True"
    assert page.text_content("#steps > li:first-child .conf").endswith("%")  # the model's own confidence
    page.click("#steps li[data-step='0'] .step-button")
    page.fill("#edit-text", NEW_MEMORY)
    page.click("#do-replace")
    _finished(page, 1)
    assert _steps(page) == [("kind-" + s.kind, s.text) for s in expected.steps]
    shown = "(none)" if expected.predicted is None else expected.predicted
    assert page.text_content("#answer strong") == shown and page.text_content("#after .answer-line strong") == shown
    assert page.text_content("#before .answer-line strong") == "True"
    # the word diff: the new memory's words are marked inserted, the old one's deleted; "is" is shared
    inserted = [e.text_content() for e in page.query_selector_all("#after li:first-child ins")]
    deleted = [e.text_content() for e in page.query_selector_all("#before li:first-child del")]
    assert inserted == ["Paris", "the", "capital", "of", "France."]
    assert deleted == ["Ice", "less", "dense", "than", "water."]
    assert "True → " + shown in page.text_content("#compare-summary")
    with page.expect_download() as download:
        page.click("#download")
    row = json.loads(open(download.value.path(), encoding="utf-8").read())
    assert row == expected.to_dict() and download.value.suggested_filename == f"{answered.id}.repaired.jsonl"


@needs_browser
def test_mark_wrong_and_correct_from_a_source_then_inject_instead_of_editing(editor_server, facts_file, open_page):
    facts = f"facts:{facts_file}"
    page = open_page(editor_server)
    _ask(page, ICE)
    page.click("#steps li[data-step='0'] .step-button")
    assert page.eval_on_selector("#edit-source", "s => [...s.options].map(o => o.value)") == [facts, "fake"]
    page.select_option("#edit-source", facts)
    page.click("#do-repair")
    _finished(page, 1)
    assert _steps(page)[0] == ("kind-memory", "Ice floats on water.")
    assert f"Correction from {facts} for step 1: Ice floats on water." in page.text_content("#compare-correction")
    # the inject switch: the step's text stays the model's, the memory goes in as a vector
    page.check("#inject")
    page.click("#steps li[data-step='0'] .step-button")
    assert page.text_content("#do-replace") == "Inject this memory and regenerate"
    assert page.is_disabled("#do-delete")
    page.fill("#edit-text", NEW_MEMORY)
    page.press("#edit-text", "Enter")
    _finished(page, 2)
    assert NEW_MEMORY not in [text for _, text in _steps(page)]
    assert "with the memory injected at layer 0" in page.text_content("#trace-note")
    assert page.eval_on_selector_all("#history-list > li", "items => items.length") == 2


@needs_browser
def test_the_editor_works_from_the_keyboard(editor_server, open_page):
    page = open_page(editor_server)
    _ask(page, ICE)
    page.focus("#steps li[data-step='1'] .step-button")
    page.keyboard.press("Enter")
    assert page.evaluate("document.activeElement.id") == "edit-text"
    assert page.get_attribute("#steps li[data-step='1'] .step-button", "aria-expanded") == "true"
    page.keyboard.press("Tab")
    assert page.evaluate("document.activeElement.id") == "edit-kind"  # focus order follows the editor
    page.keyboard.press("Escape")
    assert page.query_selector(".editor") is None
    assert page.evaluate("document.activeElement.closest('li').dataset.step") == "1"
    page.focus("#inject")
    page.keyboard.press("Space")
    assert page.is_checked("#inject")


@needs_browser
def test_with_an_api_key_the_page_asks_for_it_and_sends_it(tiny_reasoner, open_page):
    backend, editor = tiny_editor(tiny_reasoner)
    with Server(backend, editor=editor, api_key="sesame") as server:
        page = open_page(server, ready=False)
        page.wait_for_selector("#key-panel:not(.hidden)")
        assert page.evaluate("document.activeElement.id") == "api-key"
        page.fill("#api-key", "wrong")
        page.press("#api-key", "Enter")
        page.wait_for_selector("#key-panel:not(.hidden)")  # refused: asked again
        page.fill("#api-key", "sesame")
        page.press("#api-key", "Enter")
        page.wait_for_selector("body[data-ready=true]")
        assert page.text_content("#model-info").startswith("model tiny")
        assert page.is_hidden("#key-panel")


EVIL_QUESTION = '<script>window.__pwned = 1</script></textarea><img src=x onerror="window.__pwned = 2">'
EVIL_MEMORY = '</textarea><script>window.__pwned = 3</script><b>bold?</b>'
EVIL_REASON = '<img src=x onerror="window.__pwned = 4"> &amp; <style>body{display:none}</style>'
EVIL_ANSWER = '<iframe src="javascript:window.__pwned = 5"></iframe>'


def _evil_row() -> Result:
    raw = f"<memory> {EVIL_MEMORY}\n<reason> {EVIL_REASON}\n<answer> The answer is: True"
    trace = Trace(EVIL_QUESTION, parse(raw).steps, EVIL_ANSWER, meta={"id": "evil</textarea>"})
    return Result(trace=trace, gold="True", outcome="wrong", raw=raw,
                  prompt=get_task("strategyqa").plain_prompt(EVIL_QUESTION))


def _no_markup_ran(page):
    assert page.evaluate("window.__pwned") is None
    assert page.evaluate("document.scripts.length") == 1  # the page's own
    assert page.evaluate("document.querySelectorAll('img, iframe, b, body style').length") == 0
    assert page.is_visible("#trace-panel")


@needs_browser
def test_model_text_that_looks_like_markup_renders_as_text(tiny_reasoner, open_page):
    evil = _evil_row()
    assert [s.text for s in evil.steps] == [EVIL_MEMORY, EVIL_REASON]
    backend, editor = tiny_editor(tiny_reasoner, rows=[evil])
    with Server(backend, editor=editor) as server:
        page = open_page(server)
        # listed from --results: the question is an option's text
        assert EVIL_QUESTION in page.eval_on_selector("#row-list", "s => s.options[0].textContent")
        page.fill("#row-paste", json.dumps(evil.to_dict()))
        page.click("#open-pasted")
        page.wait_for_selector("#steps > li")
        assert page.text_content("#trace-question") == EVIL_QUESTION
        assert _steps(page) == [("kind-memory", EVIL_MEMORY), ("kind-reason", EVIL_REASON)]
        assert page.text_content("#answer strong") == EVIL_ANSWER
        _no_markup_ran(page)
        # through the model and the word diff too: delete the reason step, keep the memory step
        page.click("#steps li[data-step='1'] .step-button")
        assert page.input_value("#edit-text") == EVIL_REASON
        page.click("#do-delete")
        _finished(page, 1)
        assert page.text_content("#before li:first-child .step-text") == EVIL_MEMORY
        expected = editor.revise(evil, Edit(1, "delete"))
        assert expected.steps[0].text.startswith(EVIL_MEMORY)  # the model may go on writing the kept line
        assert _steps(page, "#after ol") == [("kind-" + s.kind, " ".join(s.text.split())) for s in expected.steps]
        assert page.text_content("#before li:nth-child(2) .step-text") == EVIL_REASON
        _no_markup_ran(page)


@needs_browser
def test_a_row_opens_from_an_uploaded_results_file(editor_server, open_page):
    first = editor_server.editor.answer(ICE, gold="True")
    second = first.replace(trace=Trace("Is Paris in Spain?", first.steps, "True", meta={"id": "p1"}))
    data = (json.dumps(first.to_dict()) + "\n" + json.dumps(second.to_dict()) + "\n").encode()
    page = open_page(editor_server)
    page.click("#open-panel summary")
    page.set_input_files("#row-file", files=[{"name": "results.jsonl", "mimeType": "text/plain", "buffer": data}])
    page.wait_for_selector("#row-list option:nth-child(2)")
    assert page.eval_on_selector("#row-list", "s => [...s.options].map(o => o.textContent)") == [
        f"line 1 [correct] {ICE}", "line 2 [correct] Is Paris in Spain?"]
    page.select_option("#row-list", "1")
    page.focus("#row-list")
    page.keyboard.press("Enter")
    page.wait_for_selector("#trace-question:has-text('Is Paris in Spain?')")
    assert _steps(page) == [("kind-" + s.kind, s.text) for s in second.steps]
