"""Tests of memreason.experiments.world_ablation: config overrides and their errors, and one end-to-end ablation on a tiny
random Llama (every stage, every arm, resume, a refused config change) in well under a minute."""

from __future__ import annotations

import csv
import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch

from conftest import build_tiny_model, build_tiny_tokenizer
from memreason.cli import main as cli_main
from memreason.errors import ConfigError
from memreason.experiments.world_ablation import ARMS, arm_config, load_ablation, run_ablation


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


TINY = ["world.n_people=4", "world.n_cities=3", "world.n_countries=3", "world.n_organisations=3",
        "world.n_train=12", "world.n_test=4", "world.n_heldout=3", "world.mentions=1", "world.max_hops=2",
        "knowledge_steps=2", "knowledge_batch=4", "reason_steps=2", "reason_batch=4", "val_size=2",
        "max_new_tokens=6", "eval_batch=8", "device=cpu"]


def test_overrides_reach_the_world_and_the_budget():
    cfg = load_ablation(None, ["world.n_people=12", "reason_steps=7", "arms=tokens,direct", "model=null"])
    assert (cfg.world.n_people, cfg.reason_steps, cfg.model) == (12, 7, None)
    assert [a.name for a in cfg.arm_list()] == ["tokens", "direct"]


@pytest.mark.parametrize("overrides, message", [
    (["reason_step=3"], "did you mean reason_steps"),
    (["arms=tokens,cot"], "unknown arm"),
    (["reason_steps=0"], "reason_steps must be >= 1"),
    (["knowledge_lr=fast"], "knowledge_lr: expected a number"),
    (["world.hops=2"], "unknown config key 'world.hops'"),
    (["reason_steps"], "key=value"),
])
def test_bad_overrides_are_one_clear_config_error(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_ablation(None, overrides)


def test_arms_differ_only_in_scheme_mode_and_marker_allocation(tmp_path):
    from memreason.data.world import generate_world, write_world

    cfg = load_ablation(None, TINY)
    write_world(generate_world(cfg.world), tmp_path / "world")
    configs = {name: arm_config(cfg, arm, tmp_path / "world", tmp_path, tmp_path / name) for name, arm in ARMS.items()}
    shared = {json.dumps({k: v for k, v in vars(c).items() if k not in ("scheme", "mode", "data", "output_dir")},
                         default=str) for c in configs.values()}
    assert len(shared) == 1
    assert configs["s0"].scheme.n_special == 0 and configs["random"].data.marker_allocation == "random"
    assert configs["plain_cot"].scheme.style == "plain" and configs["direct"].scheme.style == "direct"
    assert len({c.optim.max_steps for c in configs.values()}) == 1 and len({c.seed for c in configs.values()}) == 1


def test_tiny_ablation_runs_every_stage_resumes_and_refuses_a_changed_config(tmp_path, capsys):
    model_dir = tmp_path / "tiny"
    tokenizer = build_tiny_tokenizer()
    build_tiny_model(len(tokenizer)).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    out = tmp_path / "ablate"
    overrides = TINY + [f"model={model_dir}"]

    summary = run_ablation(load_ablation(None, overrides), out, progress=False)
    assert [(r["arm"], r["split"]) for r in summary["rows"]] == [(a, s) for a in ARMS for s in ("test", "test_heldout")]
    for row in summary["rows"]:
        parts = (row["accuracy"] + row["memory_error_rate"] + row["reason_error_rate"] + row["unparseable_rate"]
                 + row["unjudged_rate"])
        assert parts == pytest.approx(1.0), row
    assert set(summary["cloze"]) == {"base", "knowledge"}
    assert summary["cloze"]["base"]["heldout_wording"]["n"] == summary["world"]["facts"]
    with open(out / "ablation.csv", newline="") as handle:
        assert len(list(csv.DictReader(handle))) == len(summary["rows"])
    assert (out / "knowledge" / "model" / "model.safetensors").is_file()
    run = json.loads((out / "arms" / "tokens" / "run" / "run.json").read_text())
    assert run["base_model"] == str((out / "knowledge" / "model").resolve())

    # a re-run through the CLI reuses every stage: same table, no training step taken again
    stamps = {p: p.stat().st_mtime_ns for p in out.glob("arms/*/run/run.json")}
    assert cli_main(["world", "ablate", "--out", str(out), "--no-progress", *overrides]) == 0
    printed = capsys.readouterr().out
    assert "cloze recall@1, knowledge model" in printed and "plain_cot" in printed
    assert {p: p.stat().st_mtime_ns for p in out.glob("arms/*/run/run.json")} == stamps
    assert json.loads((out / "summary.json").read_text())["rows"] == summary["rows"]

    assert cli_main(["world", "ablate", "--out", str(out), *overrides, "reason_steps=3"]) == 2
    assert "different settings (reason_steps differ)" in capsys.readouterr().err


def _ablate_command(out, overrides):
    return [sys.executable, "-m", "memreason.cli", "world", "ablate", "--out", str(out), "--no-progress", *overrides]


def _outputs(out):
    summary = json.loads((out / "summary.json").read_text())
    # a row's config digest covers the run's path, which differs between the two output directories
    results = {str(p.relative_to(out)): sorted(json.dumps({k: v for k, v in json.loads(line).items() if k != "config"})
                                               for line in p.read_text().splitlines())
               for p in out.glob("arms/*/*/results.jsonl")}
    return {k: summary[k] for k in ("rows", "counts", "cloze", "world")}, results


def test_kill_9_at_random_points_then_rerun_reaches_the_same_table(tmp_path):
    """Two kill -9 at seeded random times (each from its own process's start) of one ablation, then a rerun:
    the table, the cloze scores and every arm's results (one row per question, none duplicated) equal an
    uninterrupted run's."""
    model_dir = tmp_path / "tiny"
    tokenizer = build_tiny_tokenizer()
    build_tiny_model(len(tokenizer)).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    overrides = TINY + [f"model={model_dir}"]
    # reference and resumed runs in processes of their own with the same thread count: bit-identical training
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}

    started = time.perf_counter()
    reference = subprocess.run(_ablate_command(tmp_path / "reference", overrides), env=env, capture_output=True,
                               text=True, timeout=600)
    duration = time.perf_counter() - started
    assert reference.returncode == 0, reference.stderr[-2000:]

    rng = random.Random(16)
    out = tmp_path / "killed"
    # the second run resumes with more than half the work left, so both kills land before the end
    kill_times = [rng.uniform(0.25, 0.5) * duration, rng.uniform(0.1, 0.4) * duration]
    for at in kill_times:
        proc = subprocess.Popen(_ablate_command(out, overrides), env=env, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        try:
            proc.wait(timeout=at)
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
        assert proc.returncode == -signal.SIGKILL, f"the run ended before its kill at {at:.1f} s of {duration:.1f} s"
    final = subprocess.run(_ablate_command(out, overrides), env=env, capture_output=True, text=True, timeout=600)
    assert final.returncode == 0, final.stderr[-2000:]

    got, want = _outputs(out), _outputs(tmp_path / "reference")
    assert got[0] == want[0], f"killed at {[round(t, 1) for t in kill_times]} s"
    assert got[1] == want[1]
    for rows in got[1].values():
        ids = [json.loads(line)["id"] for line in rows]
        assert len(ids) == len(set(ids))
