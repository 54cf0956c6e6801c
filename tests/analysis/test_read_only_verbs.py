"""The read-only verbs (`report`, `inspect errors`, `inspect attention`) never change a file they read.

Every input file (the results file, the files beside it, the inspect directory `report` reads) is
checksummed before and after each run, for good, torn, garbage, non-UTF-8, empty and not-a-results files
and a one-line notes file. A bad input gives exit code 2 and one stderr line naming the file; a torn last
line (an interrupted write) is skipped and the verb does its documented work. `--out` mistakes fail with
one line before any work. (memreason compare and data check have their own owners and tests.)"""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from memreason.cli import main
from memreason.traces import Result, Step, Trace

FACTS = {"format": "memreason-facts/1", "facts": [{"id": "f", "text": "The Pacific is the largest ocean."}]}


def _result(rid: str, outcome: str) -> dict:
    trace = Trace("Is the Pacific the largest ocean?", (Step("memory", "The Pacific is the largest ocean."),
                                                        Step("reason", "So it is larger than the Atlantic.")),
                  "True" if outcome == "correct" else "False", meta={"id": rid})
    return Result(trace=trace, gold="True", outcome=outcome, prompt="Question: Is the Pacific the largest ocean?\n",
                  raw="The Pacific is the largest ocean.\nSo it is larger.\nThe answer is: True\n", n_tokens=12,
                  task="strategyqa").to_dict()


GOOD = "".join(json.dumps(_result(rid, outcome)) + "\n" for rid, outcome in (("a", "correct"), ("b", "wrong")))
# Inputs that are not results: exit code 2 and one line naming the file.
BAD = {
    "garbage": b"\x00\x01\x02 binary \xff\xfe garbage\n\x00\x00\n",
    "non_utf8": json.dumps(_result("a", "wrong")).encode().replace(b"Pacific", b"Pac\xe9fic") + b"\n",
    "empty": b"",
    "notes": b"remember to rerun with seed 1\n",
    "notes_without_newline": b"remember to rerun with seed 1",
    "traces_not_results": b'{"question": "Is it?", "steps": [], "answer": "True", "meta": {"id": "x"}}\n',
    "corrupt_middle_line": (GOOD + "{not json\n" + GOOD).encode(),
}
TORN = (GOOD + '{"id": "c", "question": "Is the Atl').encode()  # a kill mid-append: the rows before it count


def _snapshot(root: Path) -> dict[str, str]:
    """sha256 of every file under ``root``, by relative path (directories included, as a marker)."""
    return {str(path.relative_to(root)): (hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else "dir")
            for path in sorted(root.rglob("*"))}


def _inputs(tmp_path: Path, results: bytes) -> Path:
    """An evaluation directory as `memreason eval` and `memreason inspect` leave it, with ``results``."""
    root = tmp_path / "in"
    (root / "inspect").mkdir(parents=True)
    (root / "results.jsonl").write_bytes(results)
    (root / "eval_config.json").write_text(json.dumps({"model": "nowhere/no-model", "task": "strategyqa"}))
    (root / "summary.json").write_text(json.dumps({"config": {"model": "m", "task": "strategyqa"}}))
    (root / "facts.json").write_text(json.dumps(FACTS))
    verdict = {"id": "b", "judge": "exact", "status": "ok", "source": "memory", "first_faulty": 0}
    # verdicts from an earlier, interrupted inspect run: its last line is torn
    (root / "inspect" / "errors_exact.jsonl").write_text(json.dumps(verdict) + '\n{"id": "a", "jud')
    return root


def _verbs(root: Path, out: Path) -> dict[str, list[str]]:
    results = str(root / "results.jsonl")
    return {
        "report": ["report", "--results", results, "--inspect", str(root / "inspect"), "--out", str(out / "r.html")],
        "inspect errors": ["inspect", "errors", "--results", results, "--judge", "exact", "--facts",
                           str(root / "facts.json"), "--out", str(out / "inspect")],
        "inspect attention": ["inspect", "attention", "--results", results, "--run", str(root / "no-model"),
                              "--out", str(out / "attention")],
    }


@pytest.mark.parametrize("case", sorted(BAD))
@pytest.mark.parametrize("verb", ["report", "inspect errors", "inspect attention"])
def test_a_bad_results_file_is_one_line_naming_it_and_no_input_changes(tmp_path, capsys, verb, case):
    root = _inputs(tmp_path, BAD[case])
    before = _snapshot(root)
    assert main(_verbs(root, tmp_path / "out")[verb]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(root / "results.jsonl") in err[0], err
    assert _snapshot(root) == before
    assert not (tmp_path / "out").exists()  # nothing written either


@pytest.mark.parametrize("verb", ["report", "inspect errors"])
def test_a_torn_last_line_is_skipped_and_left_in_place(tmp_path, capsys, verb):
    root = _inputs(tmp_path, TORN)
    before = _snapshot(root)
    assert main(_verbs(root, tmp_path / "out")[verb]) == 0, capsys.readouterr().err
    assert _snapshot(root) == before
    if verb == "report":
        page = (tmp_path / "out" / "r.html").read_text()
        block = re.search(r"<script type='application/json' id='mr-data'>(.*?)</script>", page, re.DOTALL).group(1)
        examples = json.loads(block)["examples"]
        assert [e["id"] for e in examples] == ["a", "b"]
        # the verdict before the torn line of the earlier inspect run is shown; the torn one is not
        assert [v["source"] for e in examples for v in e["errors"]] == ["memory"]
    else:
        verdicts = (tmp_path / "out" / "inspect" / "errors_exact.jsonl").read_text().splitlines()
        assert [json.loads(v)["id"] for v in verdicts] == ["b"]  # the one wrong answer of the two rows read


def test_inspect_attention_reads_a_torn_results_file_without_changing_it(tmp_path, capsys):
    from conftest import build_tiny_model, build_tiny_tokenizer

    root = _inputs(tmp_path, TORN)
    tokenizer = build_tiny_tokenizer()
    build_tiny_model(len(tokenizer)).save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    before = _snapshot(root)
    args = _verbs(root, tmp_path / "out")["inspect attention"]
    args[args.index("--run") + 1] = str(root / "model")
    assert main(args + ["--device", "cpu"]) == 0, capsys.readouterr().err
    assert _snapshot(root) == before
    tokens = [json.loads(line) for line in (tmp_path / "out" / "attention" / "attention_tokens.jsonl").open()]
    assert [t["id"] for t in tokens] == ["a", "b"]
    # teacher-forced with the prompt each row recorded (schema 2), not one rebuilt from eval_config.json
    prompt = json.loads(GOOD.splitlines()[0])["prompt"]
    assert [t["n_prompt"] for t in tokens] == [len(tokenizer(prompt, add_special_tokens=False)["input_ids"])] * 2


@pytest.mark.parametrize("name, content, verbs", [
    ("eval_config.json", b"{not json", ["inspect errors", "inspect attention"]),
    ("eval_config.json", b"[1, 2]", ["inspect errors"]),
    ("summary.json", b"\xff\xfe not utf-8", ["report"]),
    ("inspect/errors_summary.json", b"garbage", ["report"]),
    ("inspect/errors_exact.jsonl", b'{"id": "b"}\n[1, 2]\n', ["report"]),
])
def test_garbage_beside_the_results_is_one_line_naming_that_file(tmp_path, capsys, name, content, verbs):
    root = _inputs(tmp_path, GOOD.encode())
    (root / name).write_bytes(content)
    before = _snapshot(root)
    for verb in verbs:
        assert main(_verbs(root, tmp_path / "out")[verb]) == 2, verb
        # the torn verdict file of the earlier inspect run may add its warning line; the error is one line
        err = [line for line in capsys.readouterr().err.strip().splitlines() if not line.startswith("warning:")]
        assert len(err) == 1 and str(root / name) in err[0], (verb, err)
    assert _snapshot(root) == before


def test_a_one_line_notes_file_stays_byte_for_byte_under_the_real_command_line(tmp_path):
    notes = tmp_path / "notes.txt"
    notes.write_bytes(BAD["notes"])
    for verb in (["report"], ["inspect", "errors", "--judge", "exact", "--facts", "nowhere.json"]):
        done = subprocess.run([sys.executable, "-m", "memreason.cli", *verb, "--results", str(notes)],
                              capture_output=True, text=True, timeout=120, cwd=tmp_path)
        assert done.returncode == 2
        assert done.stderr.strip().count("\n") == 0 and str(notes) in done.stderr, done.stderr
    assert notes.read_bytes() == b"remember to rerun with seed 1\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


def _unwritable(tmp_path: Path, monkeypatch) -> Path:
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    if os.geteuid() == 0:  # root writes anywhere: make the permission check see what another user would
        import memreason.cli._paths as paths

        real = os.access
        monkeypatch.setattr(paths.os, "access", lambda p, mode: False if Path(p) == locked else real(p, mode))
    return locked


@pytest.mark.parametrize("mistake", ["directory", "under_a_file", "unwritable", "the_results_file"])
def test_report_out_mistakes_fail_in_one_line_before_any_work(tmp_path, capsys, monkeypatch, mistake):
    root = _inputs(tmp_path, GOOD.encode())
    out = {"directory": root / "inspect", "under_a_file": root / "summary.json" / "r.html",
           "unwritable": _unwritable(tmp_path, monkeypatch) / "r.html" if mistake == "unwritable" else None,
           "the_results_file": root / "results.jsonl"}[mistake]
    before = _snapshot(root)
    import memreason.analysis.report as report

    monkeypatch.setattr(report, "report_from_files", lambda *a, **k: pytest.fail("work began"))
    assert main(["report", "--results", str(root / "results.jsonl"), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--out" in err[0] and str(out) in err[0], err
    assert _snapshot(root) == before


@pytest.mark.parametrize("mistake", ["a_file", "under_a_file", "unwritable"])
@pytest.mark.parametrize("verb", ["inspect errors", "inspect attention"])
def test_inspect_out_mistakes_fail_in_one_line_before_any_work(tmp_path, capsys, monkeypatch, verb, mistake):
    root = _inputs(tmp_path, GOOD.encode())
    out = {"a_file": root / "summary.json", "under_a_file": root / "summary.json" / "inspect",
           "unwritable": _unwritable(tmp_path, monkeypatch) / "inspect" if mistake == "unwritable" else None}[mistake]
    import memreason.evaluate as evaluate

    monkeypatch.setattr(evaluate, "read_results", lambda *a, **k: pytest.fail("work began"))
    before = _snapshot(root)
    args = _verbs(root, tmp_path)[verb]
    args[args.index("--out") + 1] = str(out)
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--out" in err[0] and str(out) in err[0], err
    assert _snapshot(root) == before
