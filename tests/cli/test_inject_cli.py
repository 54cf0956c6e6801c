"""Tests for ``memreason inject sweep`` (src/memreason/cli/inject.py): argument parsing, clear errors before any
model loads, and an end-to-end run on a tiny saved model (and, marked, on the embedded SmolLM2)."""

from __future__ import annotations

import csv
import json

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoModelForCausalLM, LlamaConfig, PreTrainedTokenizerFast

from memreason.cli import main
from memreason.cli.inject import parse_floats, parse_layers, parse_positions
from memreason.errors import ConfigError
from memreason.interventions.injection_sweep import load_prompts


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
    model = AutoModelForCausalLM.from_config(LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2))
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
