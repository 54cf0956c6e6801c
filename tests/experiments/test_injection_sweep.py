"""Tests for memreason.experiments.injection_sweep and .injection_grid (with the prompt files of
memreason.data.two_hop they read): data loading, statistics, controls, that the batched, resumed sweep measures
exactly what the ``inject`` context manager does one prompt at a time (on the table's families and on detected
ones), and that a sweep killed with SIGKILL resumes to the same outputs."""

from __future__ import annotations

import csv
import json
import math
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from memreason.analysis.plots import plot_sweep_heatmap
import torch
from conftest import build_tiny_model
from tiny_families import build_family
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from memreason.config import load_settings
from memreason.data.two_hop import PromptItem, answer_token, load_pos_words, load_prompts
from memreason.errors import ConfigError, DataError
from memreason.experiments.injection_grid import (
    CONTROLS,
    condition_vectors,
    default_layers,
    pos_matched_memories,
    shuffled_memories,
    split_items,
)
from memreason.experiments.injection_sweep import (
    SweepConfig,
    cell_metrics,
    run,
    run_sweep,
    write_outputs,
)
from memreason.interventions import hooks
from memreason.interventions.memory_injection import inject, left_padded_batch, memory_token_ids, residual_norms
from memreason.stats import bootstrap_ci, sign_test_p

WORDS = ["France", "Japan", "Italy", "Paris", "Tokyo", "Rome", "capital", "country", "tower", "mountain", "apple",
         "window", "garden", "pencil", "river", "stands", "where", "the", "of", "is", "The", "Eiffel", "Fuji"]
CORPUS = [" ".join(WORDS), "The capital of the country where the Eiffel Tower stands is Paris.",
          "The capital of Japan is Tokyo.", "The capital of Italy is Rome.", "apple window garden pencil river"] * 3


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="module")
def tokenizer():
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=340, special_tokens=["<pad>", "<eos>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>")


def build(kind, vocab):
    """A 4-layer random model: conftest's tiny Llama, or another family's tiny config."""
    if kind == "llama":
        return build_tiny_model(vocab, layers=4)
    return build_family(kind, vocab, layers=4)


@pytest.fixture(scope="module")
def llama(tokenizer):
    return build("llama", len(tokenizer))


ITEMS = [
    PromptItem(0, "The capital of France is", "The capital of the country where the Eiffel Tower stands is",
               "France", "the country where the Eiffel Tower stands", " Paris"),
    PromptItem(1, "The capital of Japan is", "The capital of the country where Fuji stands is", "Japan",
               "the country where Fuji stands", " Tokyo"),
    PromptItem(2, "The capital of Italy is", "The capital of the country of the tower is", "Italy",
               "the country of the tower", " Rome"),
    PromptItem(3, "The river of France is", "The river of the country where the garden is", "France",
               "the country where the garden is", " river"),
    PromptItem(4, "The apple of Japan is", "The apple of the mountain country is", "Japan",
               "the mountain country", " apple"),
    PromptItem(5, "The window of Italy is", "The window where the pencil is", "Italy",
               "where the pencil is", " window"),
]
NEUTRAL = ("apple window garden", "The pencil is where the river is")
SMALL = dict(layers=(0, 2), taus=(0.0, 0.5, 2.0), n_bootstrap=200, neutral_prompts=NEUTRAL, batch_size=16)


def write_rows(path, header, rows):
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)
    return path


# ------------------------------------------------------------------ data

def test_bundled_two_hop_set_is_complete_and_well_formed():
    items = load_prompts()
    assert len(items) >= 60
    assert len({it.obscure for it in items}) == len(items)
    for it in items:
        assert it.answer.startswith(" ") and it.answer.strip()
        assert it.memory and it.obscure_entity and it.explicit
        assert it.memory not in it.obscure  # the obscure prompt must not name the bridge entity
        assert it.memory in it.explicit


def test_bundled_pos_words_have_nouns_and_no_bundled_memories():
    words = load_pos_words()
    assert len(words["noun"]) >= 100 and {"verb", "adjective", "adverb"} <= set(words)
    memories = {it.memory.lower() for it in load_prompts()}
    assert not memories & {w.lower() for w in words["noun"]}


def test_original_column_spellings_and_index_column_are_accepted(tmp_path):
    path = write_rows(tmp_path / "p.csv", ["", "explicit_sent", "obscure_sent", "explicit_entity", "obscure_entity",
                                           "fact1", "answer"],
                      [[0, "The capital of France is", "The capital of X is", "France", "X", "(a,b)", "Paris"]])
    (item,) = load_prompts(path)
    assert (item.explicit, item.obscure, item.memory, item.answer) == (
        "The capital of France is", "The capital of X is", "France", " Paris")


def test_missing_column_is_named(tmp_path):
    path = write_rows(tmp_path / "p.csv", ["explicit_sentence", "obscure_sentence", "explicit_entity"],
                      [["a", "b", "c"]])
    with pytest.raises(DataError, match=r"p\.csv: missing column\(s\) answer"):
        load_prompts(path)


def test_empty_field_names_record_and_field(tmp_path):
    path = write_rows(tmp_path / "p.csv", ["explicit_sentence", "obscure_sentence", "explicit_entity", "answer"],
                      [["a", "b", "c", "d"], ["a", "b", " ", "d"]])
    with pytest.raises(DataError, match="record 1, field 'explicit_entity': empty value"):
        load_prompts(path)


def test_missing_file_is_reported(tmp_path):
    with pytest.raises(DataError, match="file not found"):
        load_prompts(tmp_path / "nope.csv")


def test_answer_token_skips_whitespace_only_tokens(tokenizer):
    ids = tokenizer("  Paris", add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids[:1]).strip() == ""  # the first token is a bare space, like Llama's '▁'
    assert answer_token(tokenizer, "  Paris") == ids[1]
    assert answer_token(tokenizer, " Paris") == tokenizer(" Paris", add_special_tokens=False)["input_ids"][0]
    with pytest.raises(DataError, match="no non-whitespace token"):
        answer_token(tokenizer, "   ")


# ------------------------------------------------------------------ statistics

def test_cell_metrics_on_a_worked_example():
    before = np.log([0.1, 0.2, 0.5, 0.2])
    after = np.log([0.2, 0.1, 0.5, 0.8])
    m = cell_metrics(before, after, rank_before=[3, 0, 7, 1], rank_after=[0, 2, 7, 0])
    assert m["n"] == 4
    assert m["mean_dlogp"] == pytest.approx(math.log(2) / 2)  # (ln2 - ln2 + 0 + ln4) / 4
    assert m["median_pct"] == pytest.approx(50.0)  # pct = [100, -50, 0, 300]
    assert m["mean_pct"] == pytest.approx(87.5)
    assert m["trimmed_mean_pct"] == pytest.approx(50 / 3)  # 300 lies above the 99th percentile and goes
    assert m["ratio_of_means_pct"] == pytest.approx(60.0)  # 0.4 / 0.25 - 1
    assert m["frac_improved"] == 0.5
    assert (m["top1_before"], m["top1_after"], m["top5_before"], m["top5_after"]) == (0.25, 0.5, 0.75, 0.75)


def test_bootstrap_ci_brackets_the_mean_and_is_seeded():
    values = np.random.default_rng(1).normal(0.3, 1.0, 200)
    low, high = bootstrap_ci(values, n_resamples=2000, seed=5)
    assert low < values.mean() < high
    assert high - low == pytest.approx(2 * 1.96 / math.sqrt(200), rel=0.2)
    assert bootstrap_ci(values, n_resamples=2000, seed=5) == (low, high)
    assert bootstrap_ci([0.7] * 10, n_resamples=100) == pytest.approx((0.7, 0.7))


def test_sign_test_p_values():
    assert sign_test_p([1.0] * 10) == pytest.approx(2 / 1024)
    assert sign_test_p([1, -1]) == 1.0
    assert sign_test_p([0, 0]) == 1.0
    assert sign_test_p([1, 1, 1, -1, 0]) == pytest.approx(2 * 5 / 16)


def test_split_is_seeded_and_sized():
    a = split_items(20, 0.5, seed=3)
    assert a == split_items(20, 0.5, seed=3) and a.count("dev") == 10
    assert a != split_items(20, 0.5, seed=4)
    assert split_items(10, 0.3, seed=0).count("dev") == 3


# ------------------------------------------------------------------ controls

def test_shuffled_memories_never_keep_their_own_text():
    memories = ["France", "France", "Japan", "Italy", "Spain", "Peru"]
    shuffled = shuffled_memories(memories, seed=0)
    assert sorted(shuffled) == sorted(memories)
    assert all(s != m for s, m in zip(shuffled, memories))
    assert shuffled == shuffled_memories(memories, seed=0)
    with pytest.raises(DataError, match="share one memory"):
        shuffled_memories(["France", "France", "France", "Japan"], seed=0)


def test_pos_control_matches_distinct_token_count(tokenizer):
    memories = ["France", "Eiffel Tower", "the country of Japan"]
    controls = pos_matched_memories(tokenizer, memories, ["apple", "window", "garden", "pencil", "river"], seed=0)
    for memory, control in zip(memories, controls):
        assert len(memory_token_ids(tokenizer, control)) == len(memory_token_ids(tokenizer, memory))
        assert set(control.split()) <= {"apple", "window", "garden", "pencil", "river"}


def test_condition_vectors_match_norms_and_texts(llama, tokenizer):
    config = SweepConfig(controls=CONTROLS, seed=0, **SMALL)
    texts, vectors = condition_vectors(llama, tokenizer, ITEMS, config, (0, 2), {"noun": ["apple", "window"]})
    assert list(vectors) == ["curated", *CONTROLS]
    assert texts["answer"] == ["Paris", "Tokyo", "Rome", "river", "apple", "window"]
    assert texts["obscure"][0] == "the country where the Eiffel Tower stands"
    assert all(s != m for s, m in zip(texts["shuffled"], texts["curated"]))
    torch.testing.assert_close(vectors["random"].norm(dim=-1), vectors["curated"].norm(dim=-1))
    cosine = torch.nn.functional.cosine_similarity(vectors["random"], vectors["curated"], dim=-1)
    assert float(cosine.abs().max()) < 0.9


# ------------------------------------------------------------------ the sweep measures what inject() does

# (family, positions, resumed from cached residuals): Gemma-2 alternates sliding-window layers and soft-caps its
# logits, OPT adds learned positions inside a nested body, Phi-3 is a Llama shape under another name.
SWEEP_CASES = [("llama", "all", True), ("llama", "last", True), ("gpt2", "all", False), ("phi3", "all", True),
               ("gemma2", "all", False), ("opt", "last", False)]


@pytest.mark.parametrize("kind,positions,resumable", SWEEP_CASES)
def test_sweep_cells_equal_one_prompt_at_a_time_injection(kind, positions, resumable, tokenizer):
    """Every (layer, tau) cell of the batched sweep — resumed from cached residuals on Llama, full forwards on
    GPT-2 — equals running ``inject`` on each prompt alone and scoring it."""
    model = build(kind, len(tokenizer))
    config = SweepConfig(controls=(), positions=positions, seed=1, **SMALL)
    result = run_sweep(model, tokenizer, ITEMS, config)
    assert result.meta["resumed_from_cache"] == resumable
    norms = residual_norms(model, tokenizer, NEUTRAL)
    split = split_items(len(ITEMS), 0.5, 1)
    for layer in config.layers:
        for tau in config.taus:
            before, after = [], []
            for it in ITEMS:
                batch = left_padded_batch(tokenizer, [it.obscure])
                target = answer_token(tokenizer, it.answer)
                with torch.no_grad():
                    before.append(float(model(**batch).logits[0, -1].log_softmax(-1)[target]))
                    with inject(model, tokenizer, memory=it.memory, layer=layer, tau=tau, tau_mode="relative",
                                reference_norm=float(norms[layer]), positions=positions):
                        after.append(float(model(**batch).logits[0, -1].log_softmax(-1)[target]))
            for s in ("dev", "test"):
                pick = [i for i, x in enumerate(split) if x == s]
                cell = next(r for r in result.cells if (r["layer"], r["tau"], r["split"]) == (layer, tau, s))
                expected = np.mean([after[i] - before[i] for i in pick])
                assert cell["mean_dlogp"] == pytest.approx(expected, abs=2e-5)


def test_best_cell_is_chosen_on_dev_and_reported_on_test(llama, tokenizer):
    result = run_sweep(llama, tokenizer, ITEMS, SweepConfig(controls=("shuffled", "random"), **SMALL))
    dev = [r for r in result.cells if r["condition"] == "curated" and r["split"] == "dev"]
    top = max(dev, key=lambda r: r["mean_dlogp"])
    assert (result.best["layer"], result.best["tau"]) == (top["layer"], top["tau"])
    test = next(r for r in result.cells if r["condition"] == "curated" and r["split"] == "test"
                and (r["layer"], r["tau"]) == (top["layer"], top["tau"]))
    assert result.best["test"] == test
    assert [c["control"] for c in result.comparisons] == ["shuffled", "random"]
    for comp in result.comparisons:
        control = next(r for r in result.cells if r["condition"] == comp["control"] and r["split"] == "test"
                       and (r["layer"], r["tau"]) == (top["layer"], top["tau"]))
        assert comp["diff_mean_dlogp"] == pytest.approx(test["mean_dlogp"] - control["mean_dlogp"], abs=1e-9)
        low, high = comp["diff_ci"]
        assert low <= comp["diff_mean_dlogp"] <= high
    assert {c["condition"] for c in result.collateral} == {"curated", "shuffled", "random"}
    assert all(c["mean_kl"] >= 0 for c in result.collateral)
    assert hooks.hook_count(llama) == 0


def test_zero_tau_cells_change_nothing(llama, tokenizer):
    result = run_sweep(llama, tokenizer, ITEMS, SweepConfig(controls=("random",), **SMALL))
    for row in result.cells:
        if row["tau"] == 0.0:
            assert row["mean_dlogp"] == pytest.approx(0.0, abs=1e-5)
            assert row["frac_improved"] <= 0.5  # only float noise can "improve" an unchanged item


def test_absolute_tau_and_centered_encoder_run(llama, tokenizer):
    config = SweepConfig(tau_mode="absolute", encoder="unembed-centered", controls=("pos",), layers=(1,),
                         taus=(0.5,), n_bootstrap=50, neutral_prompts=NEUTRAL)
    result = run_sweep(llama, tokenizer, ITEMS, config, pos_words={"noun": ["apple", "window", "garden"]})
    assert result.best["layer"] == 1 and result.config["tau_mode"] == "absolute"
    assert "pos_memory" in result.items[0]


def test_outputs_are_written(llama, tokenizer, tmp_path):
    result = run_sweep(llama, tokenizer, ITEMS, SweepConfig(controls=("shuffled",), **SMALL))
    paths = write_outputs(result, tmp_path / "out")
    with open(paths["cells"], newline="") as handle:
        assert len(list(csv.DictReader(handle))) == 2 * 2 * 3 * 2  # conditions x layers x taus x splits
    summary = json.loads(paths["summary"].read_text())
    assert summary["best"]["layer"] in (0, 2) and summary["meta"]["seed"] == 0
    assert summary["comparisons"][0]["control"] == "shuffled"
    with open(paths["items"], newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == len(ITEMS) and "p_after_shuffled" in rows[0] and "shuffled_memory" in rows[0]
    assert paths["heatmap"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_heatmap_reads_cells_csv_rows(tmp_path):
    cells = [{"condition": c, "layer": str(layer), "tau": str(tau), "split": "dev", "mean_dlogp": str(v)}
             for c in ("curated", "random") for layer in (0, 3) for tau, v in ((0.1, 0.2), (0.5, -1.0))]
    path = plot_sweep_heatmap(cells, tmp_path / "h.png", best=(3, 0.1))
    assert path.stat().st_size > 1000


# ------------------------------------------------------------------ bad input

@pytest.mark.parametrize("kwargs,message", [
    (dict(taus=()), "taus"),
    (dict(taus=(-1.0,)), "taus"),
    (dict(tau_mode="percent"), "tau_mode"),
    (dict(encoder="bogus"), "encoder"),
    (dict(controls=("shuffled", "bogus")), "unknown control"),
    (dict(dev_fraction=1.0), "dev_fraction"),
    (dict(positions="first"), "positions"),
    (dict(layers=()), "layers"),
])
def test_bad_config_is_refused(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        SweepConfig(**kwargs)


def test_layer_out_of_range_and_too_few_items_are_refused(llama, tokenizer):
    with pytest.raises(ConfigError, match="out of range: this model has 4 layers"):
        run_sweep(llama, tokenizer, ITEMS, SweepConfig(layers=(4,), **{k: v for k, v in SMALL.items()
                                                                      if k != "layers"}))
    with pytest.raises(ConfigError, match="need at least 2 in each"):
        run_sweep(llama, tokenizer, ITEMS[:3], SweepConfig(**SMALL))
    with pytest.raises(ConfigError, match="obscure_entity"):
        items = [PromptItem(i, it.explicit, it.obscure, it.memory, None, it.answer) for i, it in enumerate(ITEMS)]
        run_sweep(llama, tokenizer, items, SweepConfig(controls=("obscure",), **SMALL))


def test_default_layers_are_evenly_spaced():
    assert default_layers(30) == (0, 3, 6, 9, 12, 15, 18, 21, 24, 27)
    assert default_layers(4) == (0, 1, 2, 3)


# ------------------------------------------------------------------ the real model

@pytest.mark.smollm2
def test_smollm2_sweep_resumed_cells_match_inject():
    from memreason.model import load

    model, tok = load(device="cpu", dtype="float32")
    items = load_prompts()[:4]
    config = SweepConfig(layers=(8,), taus=(0.25,), controls=(), n_bootstrap=100, neutral_prompts=NEUTRAL)
    result = run_sweep(model, tok, items, config)
    norm = float(residual_norms(model, tok, NEUTRAL)[8])
    deltas = []
    for it in items:
        batch = left_padded_batch(tok, [it.obscure])
        target = answer_token(tok, it.answer)
        with torch.no_grad():
            before = model(**batch).logits[0, -1].log_softmax(-1)[target]
            with inject(model, tok, memory=it.memory, layer=8, tau=0.25, tau_mode="relative", reference_norm=norm):
                deltas.append(float(model(**batch).logits[0, -1].log_softmax(-1)[target] - before))
    split = split_items(4, 0.5, 0)
    for s in ("dev", "test"):
        cell = next(r for r in result.cells if r["split"] == s)
        expected = np.mean([d for d, x in zip(deltas, split) if x == s])
        assert cell["mean_dlogp"] == pytest.approx(expected, abs=1e-4)


# ------------------------------------------------------------------ settings, resuming, kill -9

def test_settings_load_from_yaml_with_spans_written_either_way(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text("positions: '2:5'\ntaus: [1, 2]\nlimit: 6\n")
    cfg = load_settings(SweepConfig, path)
    assert (cfg.positions, cfg.taus, cfg.limit) == ((2, 5), (1.0, 2.0), 6)
    assert load_settings(SweepConfig, path, ["positions=[null, -1]"]).positions == (None, -1)
    with pytest.raises(ConfigError, match="--limit must be at least 4"):
        load_settings(SweepConfig, path, ["limit=3"])


@pytest.fixture(scope="module")
def saved_model(tokenizer, tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-sweep-model")
    build_tiny_model(len(tokenizer), layers=2).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def _sweep_settings(model_dir, out):
    # batch_size 4 < 6 rows per item: one item per group, two chunks (two progress calls) per (group, layer)
    return SweepConfig(model=str(model_dir), device="cpu", limit=8, layers=(0, 1), taus=(0.1, 0.3),
                       controls=("shuffled", "random"), n_bootstrap=50, batch_size=4, out=str(out))


def _outputs(out):
    summary = json.loads((out / "summary.json").read_text())
    summary["config"].pop("out")
    return ((out / "cells.csv").read_bytes(), (out / "items.csv").read_bytes(), summary,
            (out / "measurements.jsonl").read_text().splitlines())


def test_sweep_killed_with_sigkill_resumes_to_the_same_outputs(saved_model, tmp_path):
    reference, killed = tmp_path / "reference", tmp_path / "killed"
    # the reference runs in a process of its own too, so both see torch's default thread count (float
    # reductions differ in the last bits between thread counts, and the CSVs keep every digit)
    straight = textwrap.dedent(f"""
        from memreason.experiments.injection_sweep import SweepConfig, run
        run(SweepConfig(**{_sweep_settings(saved_model, reference).__dict__!r}))
    """)
    done = subprocess.run([sys.executable, "-c", straight], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "TRANSFORMERS_VERBOSITY": "error"})
    assert done.returncode == 0, done.stderr[-2000:]
    # Kill the sweep process itself (SIGKILL: no cleanup of any kind) in the middle of a block: after the
    # 7th batch, i.e. one chunk into group 1, layer 1; three blocks of group 0/1 are on disk by then.
    script = textwrap.dedent(f"""
        import os, signal
        from memreason.experiments.injection_sweep import SweepConfig, run
        calls = []
        def progress(done, total):
            calls.append(done)
            if len(calls) == 7:
                os.kill(os.getpid(), signal.SIGKILL)
        run(SweepConfig(**{_sweep_settings(saved_model, killed).__dict__!r}), progress=progress)
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "TRANSFORMERS_VERBOSITY": "error"})
    assert proc.returncode == -9, proc.stderr[-2000:]
    lines = (killed / "measurements.jsonl").read_text().splitlines()
    assert [json.loads(line)["block"] for line in lines] == ["clean", "edit", "edit", "clean", "edit"]
    assert not (killed / "summary.json").exists()
    with open(killed / "measurements.jsonl", "a") as handle:  # and a torn half-line, as a kill mid-append leaves
        handle.write('{"block": "edit", "group": 1, "lay')

    resume = textwrap.dedent(f"""
        from memreason.experiments.injection_sweep import SweepConfig, run
        result, _ = run(SweepConfig(**{_sweep_settings(saved_model, killed).__dict__!r}))
        print(result.meta["n_items"])
    """)
    resumed = subprocess.run([sys.executable, "-c", resume], capture_output=True, text=True, timeout=600,
                             env={**os.environ, "TRANSFORMERS_VERBOSITY": "error"})
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert _outputs(killed) == _outputs(reference)
    records = [json.loads(line) for line in _outputs(killed)[3]]
    keys = [(r["block"], r["group"], r.get("layer")) for r in records]
    assert len(keys) == len(set(keys)) == 8 * 3  # every block once: 8 groups x (clean + 2 layers)
    assert resumed.stdout.split()[-1] == "8"


def test_resume_refuses_an_output_dir_of_other_settings(saved_model, tmp_path):
    out = tmp_path / "o"
    run(_sweep_settings(saved_model, out))
    other = SweepConfig(**{**_sweep_settings(saved_model, out).__dict__, "taus": (0.2,)})
    with pytest.raises(ConfigError, match=r"different settings \(taus differ\).*--overwrite"):
        run(other)
    result, _ = run(other, overwrite=True)
    assert result.meta["taus"] == [0.2]
