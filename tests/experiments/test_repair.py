"""Tests of memreason.experiments.repair and `memreason repair`: a false memory step corrected from the gold
trace turns a wrong answer right on a tiny trained Llama; rows keep both answers; the summary's rates,
CIs and McNemar test are those of the rows; the injection is chosen on a dev split only; and a repair
killed with SIGKILL resumes with no row lost or written twice."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from memreason.errors import ConfigError, DataError
from memreason.evaluate import read_results
from memreason.experiments.repair import (RepairSettings, check_settings, parse_injection, read_evaluation,
                                          run_repair, summarise_repair)
from memreason.stats import mcnemar_exact, wilson_ci
from memreason.traces import Result, Step, Trace
from repair_fixtures import FALSE_FACT, N_RIGHT, N_WRONG, crafted_evaluation


@pytest.fixture(scope="module")
def setup(tiny_reasoner, tmp_path_factory):
    return crafted_evaluation(tiny_reasoner, tmp_path_factory.mktemp("repair"))


def _settings(setup, out, **changes) -> RepairSettings:
    base = setup["base"]
    values = {"results": str(base / "crafted"), "source": f"gold:{base / 'gold.jsonl'}", "out": str(out),
              "batch_size": 2, **changes}
    return RepairSettings(**values)


@pytest.fixture(scope="module")
def straight(setup, tmp_path_factory):
    out = tmp_path_factory.mktemp("straight")
    return out, run_repair(_settings(setup, out), reasoner=setup["reasoner"])


def test_a_false_memory_step_corrected_from_the_gold_trace_turns_the_answer_right(setup, straight):
    out, summary = straight
    rows = read_results(out / "repaired.jsonl")
    gold_fact = setup["gold"].steps[0].text
    assert [r.id for r in rows] == [f"b{i}" for i in range(N_WRONG)]  # the wrong answers, in order
    for row in rows:
        repair = row.extra["repair"]
        assert repair["status"] == "repaired" and repair["located"] == 0 and repair["by"] == "judge"
        assert repair["correction"]["text"] == gold_fact and repair["judge"] == "exact"
        assert repair["original"]["predicted"] == "False" and repair["original"]["outcome"] == "wrong"
        assert repair["original"]["steps"][0]["text"] == FALSE_FACT
        assert row.steps[0] == Step("memory", gold_fact) and row.predicted == "True" and row.outcome == "correct"
        assert row.extra["revision"]["old"]["text"] == FALSE_FACT
    assert summary["fix"] == {"count": N_WRONG, "n": N_WRONG, "rate": 1.0, "ci95": list(wilson_ci(N_WRONG, N_WRONG))}
    assert summary["break"]["n"] == 0 and summary["new_unparseable"]["count"] == 0
    assert summary["accuracy_before"]["count"] == N_RIGHT and summary["accuracy_after"]["count"] == N_WRONG + N_RIGHT
    assert summary["mcnemar"] == {"gained": N_WRONG, "lost": 0, "p": mcnemar_exact(0, N_WRONG)}
    assert json.loads((out / "summary.json").read_text())["fix"]["count"] == N_WRONG


def test_locating_by_confidence_corrects_with_typed_text_and_a_reasoning_error_is_skipped(setup, tmp_path):
    text = "Water boils at 100 degrees Celsius at sea level."
    summary = run_repair(_settings(setup, tmp_path / "c", source=f"text:{text}", locate="confidence", limit=1),
                         reasoner=setup["reasoner"])
    row = read_results(tmp_path / "c" / "repaired.jsonl")[0]
    assert row.extra["repair"]["by"] == "confidence" and row.extra["repair"]["located"] == 0
    assert row.steps[0].text == text and summary["repaired"] == 1
    # rows=all: the right answers' memory steps match the gold trace, so the judge locates nothing there
    summary = run_repair(_settings(setup, tmp_path / "a", rows="all", limit=None), reasoner=setup["reasoner"])
    skipped = [r for r in read_results(tmp_path / "a" / "repaired.jsonl") if r.extra["repair"]["status"] == "skipped"]
    assert [r.id for r in skipped] == [f"c{i}" for i in range(N_RIGHT)]
    assert summary["skipped"] == {"the judge finds a reasoning error, no faulty memory step": N_RIGHT}
    assert all(r.raw == r.extra["repair"]["original"]["raw"] for r in skipped)


def test_summary_counts_fixes_breaks_and_new_unparseable_answers_with_their_cis():
    def result(rid, outcome, original=None):
        trace = Trace("q", (), {"correct": "True", "wrong": "False"}.get(outcome), meta={"id": rid})
        extra = {} if original is None else {"repair": {"status": "repaired", "reason": "", "original": {
            "outcome": original, "predicted": {"correct": "True", "wrong": "False"}.get(original)}}}
        return Result(trace=trace, gold="True", outcome=outcome, extra=extra)

    originals = [result("1", "wrong"), result("2", "wrong"), result("3", "correct"), result("4", "correct"),
                 result("5", "unparseable"), result("6", "correct")]
    repaired = [result("1", "correct", "wrong"), result("2", "unparseable", "wrong"),
                result("3", "wrong", "correct"), result("4", "correct", "correct"), result("5", "correct", "unparseable")]
    summary = summarise_repair(originals, repaired)
    assert summary["fix"]["count"] == 2 and summary["fix"]["n"] == 3  # wrong or unparseable before
    assert summary["break"]["count"] == 1 and summary["break"]["n"] == 2
    assert summary["new_unparseable"] == {"count": 1, "n": 4, "rate": 0.25, "ci95": list(wilson_ci(1, 4))}
    assert summary["accuracy_before"]["count"] == 3 and summary["accuracy_after"]["count"] == 4
    assert summary["mcnemar"] == {"gained": 2, "lost": 1, "p": mcnemar_exact(1, 2)}
    assert summary["answer_changed"] == 4


def test_the_injection_is_chosen_on_a_dev_split_never_on_the_repaired_rows(setup, tmp_path):
    base = setup["base"]
    with pytest.raises(ConfigError, match="shares 12 questions"):
        run_repair(_settings(setup, tmp_path / "x", choose_injection=True, dev_results=str(base / "crafted")),
                   reasoner=setup["reasoner"])
    summary = run_repair(_settings(setup, tmp_path / "i", choose_injection=True, dev_results=str(base / "dev"),
                                   layers=[0, 1], taus=[20.0], tau_mode="absolute", limit=2),
                         reasoner=setup["reasoner"])
    sweep = json.loads((tmp_path / "i" / "injection_sweep.json").read_text())
    assert [(c["layer"], c["tau"]) for c in sweep["cells"]] == [(None, 0.0), (0, 20.0), (1, 20.0)]
    assert all(c["n"] == 2 and c["score"] == c["fixed"] - c["broke"] for c in sweep["cells"])
    best = max(c["score"] for c in sweep["cells"])
    winner = next(c for c in sweep["cells"] if c["score"] == best)  # ties: no injection, then in grid order
    assert sweep["chosen"] == (None if winner["layer"] is None else {"layer": winner["layer"], "tau": 20.0})
    assert summary["sweep"]["cells"] == sweep["cells"]
    used = [r.extra["repair"]["injection"] for r in read_results(tmp_path / "i" / "repaired.jsonl")]
    assert used == [None if sweep["chosen"] is None else {**sweep["chosen"], "memory": None, "encoder": "unembed",
                                                          "tau_mode": "absolute"}] * 2


def test_bad_settings_and_stale_results_are_one_clear_error(setup, tmp_path, capsys):
    from memreason.cli import main

    assert parse_injection("layer=3,tau=0.5,tau_mode=absolute").layer == 3
    for text, message in (("layer=3", "needs both"), ("depth=3,tau=1", "is not one of"), ("layer=x,tau=1", "integer")):
        with pytest.raises(ConfigError, match=message):
            parse_injection(text)
    problems = check_settings(RepairSettings(inject="layer=1,tau=1", choose_injection=True))
    assert any("not both" in p for p in problems) and any("results: required" in p for p in problems)
    assert main(["repair", "--results", str(setup["base"] / "crafted"), "--out", str(tmp_path / "o")]) == 2
    assert "source: required" in capsys.readouterr().err
    stale = tmp_path / "stale"
    stale.mkdir()
    row = setup["rows"][0].replace(prompt=None)
    (stale / "results.jsonl").write_text(json.dumps(row.to_dict()) + "\n")
    shutil.copy(setup["base"] / "crafted" / "eval_config.json", stale / "eval_config.json")
    with pytest.raises(DataError, match="keep no prompt"):
        read_evaluation(stale)


_KILL_AFTER_FIRST_CHUNK = """
import os, signal, sys
import torch
torch.set_num_threads(1)
from memreason.experiments.repair import RepairSettings, run_repair

def progress(n):
    if n:  # the first chunk is on disk: die without any cleanup
        os.kill(os.getpid(), signal.SIGKILL)

run_repair(RepairSettings(results=sys.argv[1], source=sys.argv[2], out=sys.argv[3], model=sys.argv[4],
                          batch_size=2, device="cpu", dtype="float32"), progress=progress)
"""


def test_repair_killed_with_sigkill_resumes_with_no_row_lost_or_written_twice(setup, straight, tmp_path, capsys):
    from memreason.cli import main

    base, out = setup["base"], tmp_path / "killed"
    args = [str(base / "crafted"), f"gold:{base / 'gold.jsonl'}", str(out), str(setup["model_dir"])]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    killed = subprocess.run([sys.executable, "-c", _KILL_AFTER_FIRST_CHUNK, *args], capture_output=True, text=True,
                            timeout=600, env=env)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert len((out / "repaired.jsonl").read_text().splitlines()) == 4  # one chunk of 2 x batch_size
    with open(out / "repaired.jsonl", "a") as handle:  # what a kill in the middle of an append leaves
        handle.write('{"id": "b4", "raw": "half a ro')
    assert main(["repair", "--results", args[0], "--source", args[1], "--out", args[2], "--model", args[3],
                 "--batch-size", "2", "--device", "cpu", "--dtype", "float32"]) == 0
    printed = capsys.readouterr().out
    assert "fix rate (wrong → right):       8/8 = 1.000" in printed and "correction of step 1" in printed
    resumed = read_results(out / "repaired.jsonl")
    reference = read_results(Path(straight[0]) / "repaired.jsonl")
    assert [r.id for r in resumed] == [r.id for r in reference]
    assert [(r.raw, r.token_ids) for r in resumed] == [(r.raw, r.token_ids) for r in reference]
