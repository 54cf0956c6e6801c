"""Tests for ``memreason rebalance eval`` (src/memreason/cli/rebalance.py): flags, --config and overrides as
one RebalanceSettings, one clear line for every bad argument before any model loads, an end-to-end run on a
tiny saved model, and a kill -9 mid-run followed by a rerun that loses and duplicates no row."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from memreason.cli import build_parser, main
from memreason.cli._settings import settings_from_args
from memreason.config import load_settings
from memreason.data.mmlu import bundled_sample_path, load_mmlu, select_questions
from memreason.experiments.rebalance_mmlu import RebalanceSettings

ROOT = Path(__file__).resolve().parents[2]
HEADER = ["question", "A", "B", "C", "D", "answer", "subject"]
GOOD_ROW = ["What is 2 + 2?", "3", "4", "5", "6", "B", "elementary_mathematics"]


@pytest.fixture(autouse=True)
def _one_intra_op_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def model_dir(tmp_path, tiny_tokenizer):
    """conftest's tiny tokenizer and a 3-layer tiny model (h = L - 1 leaves a 2-layer model unboosted), saved."""
    from conftest import build_tiny_model

    path = tmp_path / "tiny"
    build_tiny_model(len(tiny_tokenizer), layers=3).save_pretrained(path)
    tiny_tokenizer.save_pretrained(path)
    return path


@pytest.fixture
def no_model_load(monkeypatch):
    """Fail the test if anything tries to load a model."""
    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the arguments were checked")

    monkeypatch.setattr("memreason.model.load", refuse)


def write_csv(path, rows, header=HEADER):
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        if header:
            writer.writerow(header)
        writer.writerows(rows)
    return path


def _sample(tmp_path, n):
    questions = select_questions(load_mmlu(bundled_sample_path()), n)
    return write_csv(tmp_path / "sample.csv", [[q.question, *q.options, q.answer, q.subject] for q in questions])


def settings_of(*argv) -> RebalanceSettings:
    args = build_parser().parse_args(["rebalance", "eval", *argv])
    return settings_from_args(RebalanceSettings, args)


# ---------------------------------------------------------------------------------------------------------
# Arguments → settings
# ---------------------------------------------------------------------------------------------------------
def test_no_arguments_give_the_dataclass_defaults_and_so_does_the_shipped_config():
    assert settings_of() == RebalanceSettings()
    assert load_settings(RebalanceSettings, ROOT / "configs/rebalance/mmlu.yaml") == RebalanceSettings()


def test_every_old_flag_still_sets_its_field():
    settings = settings_of("--data", "d.csv", "--model", "m", "--mode", "cot", "--conditions", "mask,legacy",
                           "--alpha", "0.5", "--theta", "0.02", "--depth-h", "31", "--seed", "3",
                           "--prompt-style", "raw", "--limit", "7", "--max-new-tokens", "64", "--batch-size", "2",
                           "--bootstrap", "100", "--out", "o", "--overwrite", "--dtype", "float32",
                           "--device", "cpu")
    assert settings == RebalanceSettings(data="d.csv", model="m", mode="cot", conditions=("baseline", "mask", "legacy"),
                                         alpha=0.5, theta=0.02, depth_h=31, seed=3, prompt_style="raw", limit=7,
                                         max_new_tokens=64, batch_size=2, bootstrap_resamples=100, out="o",
                                         overwrite=True, dtype="float32", device="cpu")


def test_config_file_then_flags_then_overrides(tmp_path):
    config = tmp_path / "rb.yaml"
    config.write_text("defaults: " + str(ROOT / "configs/rebalance/mmlu.yaml") + "\nlimit: 2\nalpha: 0.1\n"
                      "conditions: [baseline, mask]\n")
    assert settings_of("--config", str(config)) == RebalanceSettings(limit=2, alpha=0.1,
                                                                     conditions=("baseline", "mask"))
    assert settings_of("--config", str(config), "--limit", "3").limit == 3
    settings = settings_of("--config", str(config), "--limit", "3", "limit=4", "conditions=mask,boost-all")
    assert settings.limit == 4 and settings.conditions == ("baseline", "mask", "boost-all") and settings.alpha == 0.1


# ---------------------------------------------------------------------------------------------------------
# Every bad argument: exit 2, one line, no model loaded
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("argv,message", [
    (["--limit", "0"], "limit must be a positive integer, got 0"),
    (["--limit", "-3"], "limit must be a positive integer, got -3"),
    (["--limit", "ten"], "limit: expected an integer or null, got 'ten'"),
    (["--batch-size", "-1"], "batch_size must be a positive integer, got -1"),
    (["--max-new-tokens", "0"], "max_new_tokens must be a positive integer, got 0"),
    (["--bootstrap", "0"], "bootstrap_resamples must be a positive integer, got 0"),
    (["--seed", "-1"], "seed must be a non-negative integer, got -1"),
    (["--depth-h", "0"], "depth_h must be a positive integer"),
    (["--theta", "2"], "theta must be a probability in [0, 1], got 2.0"),
    (["--alpha", "nan"], "alpha: expected a finite number"),
    (["--mode", "mc"], "mode: expected one of 'll', 'cot', got 'mc'"),
    (["--prompt-style", "html"], "prompt_style: expected"),
    (["--conditions", "baseline,inverse"], "unknown condition(s) inverse"),
    (["--data", "no/such.csv"], "data: no such file or directory: no/such.csv"),
    (["--model", "./no-such-model"], "model: no such file or directory: ./no-such-model"),
    (["--config", "no/such.yaml"], "config file not found: no/such.yaml"),
    (["--dtype", "float8"], "dtype: unknown dtype 'float8'"),
    (["--device", "gpu"], "device: 'gpu' is not a device"),
    (["lmit=3"], "unknown config key 'lmit' (did you mean limit?)"),
])
def test_bad_arguments_fail_in_one_line_before_a_model_loads(argv, message, capsys, no_model_load):
    code = main(["rebalance", "eval", *argv])
    err = capsys.readouterr().err
    assert code == 2
    assert len(err.strip().splitlines()) == 1 and err.startswith("memreason rebalance: error: ")
    assert message in err


def test_an_out_path_that_is_a_file_fails_before_a_model_loads(tmp_path, capsys, no_model_load):
    (tmp_path / "taken").write_text("x")
    assert main(["rebalance", "eval", "--out", str(tmp_path / "taken")]) == 2
    assert f"out: {tmp_path / 'taken'} is a file; give a directory" in capsys.readouterr().err


def test_several_bad_arguments_are_reported_together(capsys, no_model_load):
    assert main(["rebalance", "eval", "--limit", "0", "--batch-size", "0", "--theta", "5"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1
    assert "limit must be" in err and "batch_size must be" in err and "theta must be" in err


def test_cli_reports_bad_data_in_one_line_with_exit_code_2(tmp_path, capsys, no_model_load):
    path = write_csv(tmp_path / "bad.csv", [GOOD_ROW[:5] + ["Z", GOOD_ROW[6]]])
    code = main(["rebalance", "eval", "--data", str(path), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert err == (f"memreason rebalance: error: {path}, record 0, field 'answer': answer must be one of A, B, C, D, "
                   "got 'Z'")


def test_cli_rejects_an_unknown_condition_before_loading_a_model(tmp_path, capsys):
    code = main(["rebalance", "eval", "--conditions", "baseline,inverse", "--model", str(tmp_path / "missing")])
    assert code == 2 and "unknown condition(s) inverse" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------------
# Runs
# ---------------------------------------------------------------------------------------------------------
def test_cli_runs_an_evaluation_and_prints_the_table(tmp_path, model_dir, capsys):
    data = _sample(tmp_path, 4)
    code = main(["rebalance", "eval", "--model", str(model_dir), "--data", str(data), "--out",
                 str(tmp_path / "out"), "--batch-size", "2", "--bootstrap", "100", "--device", "cpu",
                 "--conditions", "baseline,mask,random-mask"])
    printed = capsys.readouterr().out
    assert code == 0
    assert "accuracy % [Wilson 95% CI], n = 4 questions (log-likelihood)" in printed
    assert "random-mask vs baseline" in printed and "mask vs random-mask" in printed
    assert (tmp_path / "out" / "summary.json").is_file()
    assert f"data: {data} (4 questions); out: {tmp_path / 'out'}" in printed


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_kill_9_mid_run_then_rerun_loses_and_duplicates_no_row(tmp_path, model_dir):
    data = _sample(tmp_path, 12)
    argv = ["rebalance", "eval", "--model", str(model_dir), "--data", str(data), "--batch-size", "1",
            "--bootstrap", "50", "--device", "cpu"]
    total = 12 * 4
    killed_dir = tmp_path / "killed"
    jsonl = killed_dir / "per_question.jsonl"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT / "src"))
    child = subprocess.Popen([sys.executable, "-m", "memreason.cli", *argv, "--out", str(killed_dir)], env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and child.poll() is None:
            if jsonl.exists() and jsonl.read_bytes().count(b"\n") >= 3:
                break
            time.sleep(0.005)
        child.kill()  # SIGKILL: no finally blocks, no flush, no cleanup
    finally:
        child.wait(timeout=60)
    assert child.returncode == -9, "the kill must land while the run is still going"
    at_kill = jsonl.read_bytes()
    assert 3 <= at_kill.count(b"\n") < total

    assert main([*argv, "--out", str(killed_dir)]) == 0
    assert jsonl.read_bytes().startswith(at_kill.rsplit(b"\n", 1)[0])  # rows written before the kill are kept
    resumed = _rows(jsonl)
    keys = [(row["qid"], row["condition"]) for row in resumed]
    assert len(keys) == total and len(set(keys)) == total

    assert main([*argv, "--out", str(tmp_path / "whole")]) == 0
    whole = {(row["qid"], row["condition"]): row for row in _rows(tmp_path / "whole" / "per_question.jsonl")}
    assert set(whole) == set(keys)
    for row in resumed:
        other = whole[(row["qid"], row["condition"])]
        assert row["predicted"] == other["predicted"] and row["run_key"] == other["run_key"]
        assert list(row["logprobs"].values()) == pytest.approx(list(other["logprobs"].values()), abs=1e-5)
    summary = json.loads((killed_dir / "summary.json").read_text())
    assert summary["run"]["n_questions"] == 12
    assert summary["conditions"] == json.loads((tmp_path / "whole" / "summary.json").read_text())["conditions"]
