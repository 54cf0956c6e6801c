"""Tests for ``memreason inject sweep`` (src/memreason/cli/inject.py): argument parsing, --config with flags and
dotted overrides, clear one-line errors before any model loads, resuming and refusing output directories, and an
end-to-end run on a tiny saved model (and, marked, on the embedded SmolLM2)."""

from __future__ import annotations

import csv
import json

import pytest
import torch
from conftest import build_tiny_model
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from memreason.cli import build_parser, main
from memreason.cli.inject import parse_floats, parse_layers, parse_positions, settings
from memreason.data.two_hop import load_prompts
from memreason.errors import ConfigError
from memreason.experiments.injection_sweep import SweepConfig


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    """A 2-layer random Llama and a byte-level BPE tokenizer, saved like any local checkpoint."""
    torch.manual_seed(0)
    corpus = [f"{it.explicit} {it.answer} {it.obscure}" for it in load_prompts()]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=400, special_tokens=["<pad>", "<eos>"],
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>")
    model = build_tiny_model(len(tokenizer), layers=2)
    path = tmp_path_factory.mktemp("tiny-llama")
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def test_parse_layers_accepts_lists_and_ranges():
    assert parse_layers("0,4,8") == (0, 4, 8)
    assert parse_layers("0:10:3,10") == (0, 3, 6, 9, 10)
    assert parse_layers("2:4,3") == (2, 3)
    for bad in ("a", "1:2:3:4", "5:5"):
        with pytest.raises(ConfigError, match="--layers"):
            parse_layers(bad)


def test_parse_floats_and_positions():
    assert parse_floats("0.1, 0.5", "--taus") == (0.1, 0.5)
    with pytest.raises(ConfigError, match="--taus"):
        parse_floats("0.1,x", "--taus")
    assert parse_positions("all") == "all" and parse_positions("last") == "last"
    assert parse_positions("2:5") == (2, 5) and parse_positions("-3:") == (-3, None)
    with pytest.raises(ConfigError, match="--positions"):
        parse_positions("first")


def test_csv_missing_columns_fails_with_one_line(tmp_path, capsys):
    bad = tmp_path / "bad.csv"
    bad.write_text("explicit_sentence,obscure_sentence,answer\na,b,c\n")
    assert main(["inject", "sweep", "--prompts", str(bad), "--model", str(tmp_path / "never-loaded")]) == 2
    err = capsys.readouterr().err
    assert "missing column(s) explicit_entity" in err and "Traceback" not in err


@pytest.mark.parametrize("argv,message", [
    (["--controls", "shuffled,bogus"], "unknown control(s) bogus"),
    (["--taus", "-1"], "taus must be non-negative"),
    (["--limit", "3"], "--limit must be at least 4"),
    (["--positions", "x:y"], "--positions"),
])
def test_bad_options_fail_before_loading_a_model(tmp_path, capsys, argv, message):
    assert main(["inject", "sweep", "--model", str(tmp_path / "never-loaded"), *argv]) == 2
    assert message in capsys.readouterr().err


def _settings(argv):
    return settings(build_parser().parse_args(["inject", "sweep", *argv]))


def test_no_flags_give_the_dataclass_defaults():
    assert _settings([]) == SweepConfig()


def test_config_file_then_flags_then_dotted_overrides(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text("taus: [0.5, 1.0]\nlayers: [1, 2]\nseed: 7\nout: runs/x\npositions: [0, 3]\n")
    cfg = _settings(["--config", str(path)])
    assert (cfg.taus, cfg.layers, cfg.seed, cfg.out, cfg.positions) == ((0.5, 1.0), (1, 2), 7, "runs/x", (0, 3))
    cfg = _settings(["--config", str(path), "--taus", "0.1,0.2", "--positions", "last", "--controls", "none",
                     "--limit", "6", "seed=9", "layers=[4]"])
    assert (cfg.taus, cfg.positions, cfg.controls, cfg.limit, cfg.seed, cfg.layers) == (
        (0.1, 0.2), "last", (), 6, 9, (4,))
    assert _settings(["--seed", "3", "seed=5"]).seed == 5  # a dotted override has the last word
    assert _settings(["--positions=-3:"]).positions == (-3, None)  # argparse reads "-3:" alone as a flag
    assert _settings(["--bootstrap", "50", "--tau-mode", "absolute"]).n_bootstrap == 50


def test_shipped_config_loads_through_the_cli():
    cfg = _settings(["--config", "configs/inject/paper_absolute.yaml", "limit=8"])
    assert cfg.tau_mode == "absolute" and cfg.encoder == "unembed-centered" and cfg.limit == 8
    assert cfg.controls == ("shuffled", "pos", "random", "obscure", "answer")  # from sweep.yaml, its defaults


def _one_line_error(capsys, code):
    captured = capsys.readouterr()
    assert code == 2
    lines = [line for line in captured.err.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in captured.err, captured.err
    return lines[0]


def test_directory_given_as_prompts_says_it_is_a_directory(tmp_path, capsys):
    line = _one_line_error(capsys, main(["inject", "sweep", "--prompts", str(tmp_path), "--model",
                                         str(tmp_path / "never-loaded"), "--out", str(tmp_path / "o")]))
    assert "is a directory; give a CSV file" in line and "not found" not in line


@pytest.mark.parametrize("argv,message", [
    (["--taus", "nan"], "taus[0]: expected a finite number"),
    (["--taus", "0.1,,x"], "--taus: expected a comma list of numbers"),
    (["--layers", "1:a"], "--layers: cannot read '1:a'"),
    (["--layers", "5:2"], "--layers '5:2' selects no layer"),
    (["--dev-fraction", "1.5"], "dev_fraction must be between 0 and 1"),
    (["--batch-size", "0"], "batch_size and n_bootstrap must be positive"),
    (["taus=[]"], "taus must be non-negative"),
    (["positions=[1]"], "positions must be 'all', 'last'"),
    (["taus=[0.1,oops]"], "taus[1]: expected a number"),
    (["no_such_key=1"], "unknown config key 'no_such_key'"),
])
def test_bad_grid_values_give_one_clear_line_before_the_model_loads(tmp_path, capsys, argv, message):
    line = _one_line_error(capsys, main(["inject", "sweep", "--model", str(tmp_path / "never-loaded"),
                                         "--out", str(tmp_path / "o"), *argv]))
    assert message in line
    assert not (tmp_path / "o").exists()  # nothing was written either


def test_out_that_is_a_file_fails_before_the_model_loads(tmp_path, capsys):
    out = tmp_path / "a-file"
    out.write_text("x")
    line = _one_line_error(capsys, main(["inject", "sweep", "--model", str(tmp_path / "never-loaded"),
                                         "--limit", "4", "--out", str(out)]))
    assert "is a file" in line and out.read_text() == "x"


def test_rerun_with_other_settings_is_refused_and_overwrite_starts_again(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "o"
    argv = ["inject", "sweep", "--model", str(tiny_model_dir), "--device", "cpu", "--limit", "4", "--layers", "0",
            "--taus", "0.1", "--controls", "shuffled", "--bootstrap", "20", "--out", str(out)]
    assert main(argv) == 0
    first = (out / "measurements.jsonl").read_bytes()
    capsys.readouterr()
    line = _one_line_error(capsys, main([*argv, "seed=1"]))
    assert "holds results made with different settings (seed differ)" in line and "--overwrite" in line
    assert (out / "measurements.jsonl").read_bytes() == first
    assert main(argv) == 0  # the same settings resume: every block is reused, none measured twice
    assert (out / "measurements.jsonl").read_bytes() == first
    assert main([*argv, "seed=1", "--overwrite"]) == 0
    assert json.loads((out / "summary.json").read_text())["meta"]["seed"] == 1


def test_layer_out_of_range_names_the_model_size(tiny_model_dir, tmp_path, capsys):
    code = main(["inject", "sweep", "--model", str(tiny_model_dir), "--device", "cpu", "--layers", "5",
                 "--limit", "4", "--out", str(tmp_path / "o")])
    assert code == 2
    assert "layer 5 is out of range: this model has 2 layers" in capsys.readouterr().err


def test_sweep_runs_end_to_end_on_a_local_model(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "out"
    code = main(["inject", "sweep", "--model", str(tiny_model_dir), "--device", "cpu", "--limit", "8",
                 "--layers", "0:2", "--taus", "0.1,0.3", "--controls", "shuffled,random", "--bootstrap", "200",
                 "--out", str(out)])
    printed = capsys.readouterr().out
    assert code == 0
    summary = json.loads((out / "summary.json").read_text())
    best = summary["best"]
    assert f"best dev cell: layer {best['layer']}, tau {best['tau']:g}" in printed
    assert "shuffled" in printed and "random" in printed and "collateral KL" in printed
    with open(out / "cells.csv", newline="") as handle:
        assert len(list(csv.DictReader(handle))) == 3 * 2 * 2 * 2  # conditions x layers x taus x splits
    assert (out / "heatmap.png").stat().st_size > 1000


@pytest.mark.smollm2
def test_sweep_on_smollm2_prints_the_chosen_cell(tmp_path, capsys):
    code = main(["inject", "sweep", "--limit", "6", "--layers", "8", "--taus", "0.25", "--controls", "shuffled",
                 "--bootstrap", "200", "--out", str(tmp_path / "o"), "--device", "cpu"])
    printed = capsys.readouterr().out
    assert code == 0
    assert "best dev cell: layer 8, tau 0.25" in printed
    assert "SmolLM2" in printed
