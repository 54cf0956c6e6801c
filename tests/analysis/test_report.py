"""Tests of memreason.analysis.report and `memreason report`: a self-contained page whose JSON cannot be
broken by generated text, and that renders its examples in headless Chromium (skipped without it; on
Debian: apt-get install -y chromium)."""

from __future__ import annotations

import html
import json
import re
import shutil
import subprocess

import pytest

from memreason.analysis.report import STEP_COLOURS, build_report, collect_inspect, write_report
from memreason.traces import Result

EVIL = "</script><script>document.title='PWNED'</script><!--"


def _row_dicts():
    """Result rows as ``results.jsonl`` holds them (schema 1: no prompt kept)."""
    rows = []
    for i in range(6):
        outcome = ["correct", "wrong", "unparseable"][i % 3]
        rows.append({"id": f"ex{i}", "question": f"Is ocean number {i} larger than the Atlantic Ocean?",
                     "gold": "True", "predicted": None if outcome == "unparseable" else ("True" if outcome == "correct"
                                                                                         else "False"),
                     "outcome": outcome, "n_tokens": 40 + i, "n_memory": 2, "n_reason": 1, "marker_tokens": 0,
                     "steps": [{"kind": "memory", "text": f"Ocean {i} covers a very large area of the planet."},
                               {"kind": "memory", "text": "The Atlantic Ocean is the second largest ocean."},
                               {"kind": "reason", "text": "So the first ocean is larger than the Atlantic."}],
                     "raw": "<memory> ...\n<reason> ...\n<answer> The answer is: True\n"})
    rows[1]["question"] = "Does this question mention pasta " + EVIL
    rows[1]["steps"][0]["text"] = EVIL
    return rows


def _rows():
    return [Result.from_dict(row) for row in _row_dicts()]


def _inspect():
    verdicts = [{"id": "ex1", "judge": "exact", "status": "ok", "source": "memory", "first_faulty": 0,
                 "explanation": "memory step 1 matches no fact"},
                {"id": "ex4", "judge": "exact", "status": "not_applicable", "reason": "no facts for this question"}]
    summary = {"judges": {"exact": {"summary": {"n": 1, "memory": {"count": 1, "share": 1.0, "ci95": [0.2, 1.0]},
                                                "reason": {"count": 0, "share": 0.0, "ci95": [0.0, 0.8]},
                                                "at_answer": 0, "status": {"ok": 1, "not_applicable": 1,
                                                                           "failed": 0}}}},
               "agreement": {}}
    return {"errors": {"summary": summary, "verdicts": {"exact": verdicts}}, "figures": []}


def _payload(page: str) -> dict:
    block = re.search(r"<script type='application/json' id='mr-data'>(.*?)</script>", page, re.DOTALL).group(1)
    return json.loads(block)


def test_generated_text_cannot_break_out_of_the_data_block():
    page = build_report(_rows(), inspect=_inspect())
    assert EVIL not in page and "PWNED'</script>" not in page
    assert page.count("</script>") == 2  # the data block and the script, nothing injected
    data = _payload(page)
    assert [e["id"] for e in data["examples"]] == [f"ex{i}" for i in range(6)]
    assert data["examples"][1]["steps"][0]["text"] == EVIL  # intact after parsing


def test_page_is_self_contained():
    png = b"\x89PNG\r\n\x1a\nfake"
    inspect = _inspect() | {"figures": [("layers", png)]}
    page = build_report(_rows(), inspect=inspect)
    assert not re.search(r"""(src|href)\s*=\s*['"]?(https?:)?//""", page)
    assert "<link" not in page and "@import" not in page
    assert "data:image/png;base64,iVBORw0KGgpmYWtl" in page
    assert "Error attribution" in page and "100.0%" in page


def test_collect_inspect_reads_what_inspect_wrote(tmp_path):
    (tmp_path / "errors_summary.json").write_text(json.dumps(_inspect()["errors"]["summary"]))
    (tmp_path / "errors_exact.jsonl").write_text("".join(json.dumps(v) + "\n" for v in
                                                         _inspect()["errors"]["verdicts"]["exact"]))
    (tmp_path / "attention_layers.png").write_bytes(b"\x89PNG-layers")
    (tmp_path / "attention_example_ex1_L3_H5.png").write_bytes(b"\x89PNG-example")
    found = collect_inspect(tmp_path)
    assert found["errors"]["verdicts"]["exact"][0]["source"] == "memory"
    assert [png for _, png in found["figures"]] == [b"\x89PNG-layers", b"\x89PNG-example"]
    assert "layer 3, head 5" in found["figures"][1][0]
    assert collect_inspect(tmp_path / "missing") == {"figures": []}


def test_report_cli_writes_a_page_beside_the_results(tmp_path, capsys):
    from memreason.cli import main

    results = tmp_path / "results.jsonl"
    results.write_text("".join(json.dumps(r) + "\n" for r in _row_dicts()))
    (tmp_path / "summary.json").write_text(json.dumps({"config": {"model": "tiny-model", "task": "strategyqa"},
                                                       "config_hash": "abc123"}))
    assert main(["report", "--results", str(results), "--title", "My <report>"]) == 0
    page = (tmp_path / "report.html").read_text()
    assert "<title>My &lt;report&gt;</title>" in page and "tiny-model" in page and "config abc123" in page
    assert "33.3%" in page  # 2 of 6 correct
    assert main(["report", "--results", str(tmp_path / "nope.jsonl")]) == 2
    assert "results file not found" in capsys.readouterr().err


def test_write_report_is_atomic_and_leaves_no_temporary_file_when_it_fails(tmp_path, monkeypatch):
    import memreason.io
    from memreason.errors import ConfigError

    page = tmp_path / "report.html"
    write_report("old page", page)
    monkeypatch.setattr(memreason.io.os, "replace", lambda *a: (_ for _ in ()).throw(OSError("disk full")))
    with pytest.raises(OSError, match="disk full"):
        write_report("new page", page)
    assert page.read_text() == "old page" and [p.name for p in tmp_path.iterdir()] == ["report.html"]
    monkeypatch.undo()
    with pytest.raises(ConfigError, match="directory"):
        write_report("page", tmp_path)


def test_report_from_legacy_and_current_rows_renders_the_same_page():
    legacy = _rows()
    current = [Result.from_dict(row.to_dict()) for row in legacy]  # schema 2 as written now
    assert all(row.to_dict()["schema"] == "memreason-result/2" for row in current)
    assert build_report(legacy, inspect=_inspect()) == build_report(current, inspect=_inspect())


# ---------------------------------------------------------------- in the browser

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
needs_chromium = pytest.mark.skipif(CHROMIUM is None, reason="chromium is not on PATH (Debian: apt-get install -y "
                                                            "chromium); the browser rendering checks need it")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def _chromium(tmp_path, url: str, *mode: str) -> subprocess.CompletedProcess:
    profile = tmp_path / f"profile-{len(list(tmp_path.iterdir()))}"
    return subprocess.run([CHROMIUM, *FLAGS, f"--user-data-dir={profile}", "--window-size=1280,2000", *mode, url],
                          capture_output=True, text=True, timeout=120)


@pytest.fixture
def page(tmp_path):
    return write_report(build_report(_rows(), inspect=_inspect(), title="browser test"), tmp_path / "report.html")


def _articles(dom: str) -> list[str]:
    return re.findall(r'<article class="example (\w+)" data-id="(\w+)"', dom)


@needs_chromium
def test_browser_renders_every_example_after_the_script_runs(tmp_path, page):
    dom = _chromium(tmp_path, page.as_uri(), "--dump-dom").stdout
    assert [i for _, i in _articles(dom)] == [f"ex{i}" for i in range(6)]
    assert "showing 6 of 6" in dom
    assert dom.count('class="step-row memory') == 12 and dom.count('class="step-row reason') == 6
    assert "step-row memory faulty" in dom and "first faulty step (exact)" in dom  # the judge's verdict on ex1
    assert html.escape(EVIL, quote=False) in dom  # shown as text, not run
    assert "<title>browser test</title>" in dom  # the injected script did not rename the page


@needs_chromium
def test_browser_filters_by_outcome_and_text_from_the_url_fragment(tmp_path, page):
    wrong = _chromium(tmp_path, page.as_uri() + "#outcome=wrong", "--dump-dom").stdout
    assert _articles(wrong) == [("wrong", "ex1"), ("wrong", "ex4")] and "showing 2 of 6" in wrong
    pasta = _chromium(tmp_path, page.as_uri() + "#q=pasta", "--dump-dom").stdout
    assert [i for _, i in _articles(pasta)] == ["ex1"]


@needs_chromium
def test_browser_screenshot_shows_the_coloured_steps(tmp_path, page):
    import numpy as np
    from PIL import Image

    def shot(fragment: str):
        path = tmp_path / f"shot{len(fragment)}.png"
        _chromium(tmp_path, page.as_uri() + fragment, f"--screenshot={path}")
        return np.asarray(Image.open(path).convert("RGB")).astype(int)

    def near(image, colour: str) -> int:
        rgb = np.array([int(colour[i:i + 2], 16) for i in (1, 3, 5)])
        return int((np.abs(image - rgb).sum(-1) < 30).sum())

    full, empty = shot(""), shot("#q=matches-nothing-at-all")
    assert full.shape[:2] == (2000, 1280)
    inked = lambda image: float((image.sum(-1) < 720).mean())  # noqa: E731 - share of non-near-white pixels
    assert inked(full) > 0.03 and inked(full) > 2 * inked(empty), (inked(full), inked(empty))  # far from blank
    assert len(np.unique(full.reshape(-1, 3), axis=0)) > 50
    for kind in ("memory", "reason"):
        # the legend shows each colour once; the rendered examples add far more of it
        assert near(full, STEP_COLOURS[kind]) > 5 * max(1, near(empty, STEP_COLOURS[kind])), kind
