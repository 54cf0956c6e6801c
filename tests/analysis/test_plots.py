"""Tests of memreason.analysis.plots: every figure is a PNG drawn from a table alone, and drawing one never
imports pyplot or switches the process's matplotlib backend."""

from __future__ import annotations

import subprocess
import sys

import pytest

from attention_fixtures import TRACE, collected, scheme_tokenizer  # noqa: F401 - a fixture
from attention_fixtures import prompt_for as _prompt
from memreason.analysis import attention as A
from memreason.analysis import attention_tables as T
from memreason.analysis.plots import plot_layer_heatmap, plot_sweep_heatmap, plot_token_heatmap, plot_training_curves
from memreason.model.tokens import format_target

PNG = b"\x89PNG\r\n\x1a\n"


def test_plots_write_pngs_from_tables_alone(scheme_tokenizer, tmp_path):
    tokenizer, model, scheme = scheme_tokenizer
    result = collected(scheme_tokenizer)
    png = plot_layer_heatmap(T.layer_table(result), tmp_path / "layers.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    example = A.teacher_force(model, tokenizer, _prompt(tokenizer), format_target(TRACE, scheme), keep=(0, 0))
    png = plot_token_heatmap(A.token_table(example, layer=0, head=0, example_id="q"), tmp_path / "tokens.png")
    assert png.stat().st_size > 5000
    with pytest.raises(ValueError, match="no attention rows"):
        plot_layer_heatmap([], tmp_path / "empty.png")


SWEEP = [{"split": split, "condition": condition, "layer": layer, "tau": tau,
          "mean_dlogp": (layer - 2) * tau * (1 if condition == "memory" else -1)}
         for split in ("dev", "test") for condition in ("memory", "random") for layer in range(4) for tau in (0.5, 2.0)]
CURVES = ([{"step": step, "loss": 3.0 - 0.1 * step} for step in range(10)] +
          [{"step": step, "eval_loss": 2.5, "eval_val_accuracy": 0.1 * step, "eval_val_format_rate": 0.9}
           for step in (0, 5, 9)])


def test_sweep_heatmap_and_training_curves_are_pngs_from_their_tables(tmp_path):
    from PIL import Image

    sweep = plot_sweep_heatmap(SWEEP, tmp_path / "deep" / "sweep.png", best=(3, 2.0), title="sweep")
    curves = plot_training_curves(CURVES, tmp_path / "curves.png")
    assert sweep.read_bytes()[:8] == PNG and curves.read_bytes()[:8] == PNG
    # training curves: 7 x 4 inches written at 120 dpi, as before the figures moved here
    assert Image.open(curves).size == (840, 480)
    # the chosen cell is starred in gold: more gold pixels than a sweep without a best cell
    plain = plot_sweep_heatmap(SWEEP, tmp_path / "plain.png", title="sweep")
    def gold(path):
        import numpy as np

        rgb = np.asarray(Image.open(path).convert("RGB")).astype(int)
        return int(((rgb[..., 0] > 200) & (rgb[..., 1] > 170) & (rgb[..., 1] < 230) & (rgb[..., 2] < 60)).sum())

    assert gold(sweep) > gold(plain) + 20


def test_drawing_every_figure_leaves_pyplot_unimported_and_the_backend_unchanged(tmp_path):
    code = f"""
import sys, matplotlib
# the raw setting: matplotlib.get_backend() would itself resolve the backend by importing pyplot
backend = lambda: dict.__getitem__(matplotlib.rcParams, "backend")
before = backend()
sys.path.insert(0, {str(tmp_path)!r})
from memreason.analysis import plots
from test_plots_data import SWEEP, CURVES, LAYER_ROWS, TOKEN_TABLE
plots.plot_sweep_heatmap(SWEEP, {str(tmp_path / "a.png")!r})
plots.plot_training_curves(CURVES, {str(tmp_path / "b.png")!r})
plots.plot_layer_heatmap(LAYER_ROWS, {str(tmp_path / "c.png")!r})
plots.plot_token_heatmap(TOKEN_TABLE, {str(tmp_path / "d.png")!r})
assert "matplotlib.pyplot" not in sys.modules, "pyplot was imported"
assert backend() is before or backend() == before, (before, backend())
print("clean")
"""
    layer_rows = [{"layer": layer, "query": "answer", "key": key, "n": 2, "n_seen": 2, "mean": 0.1 * (layer + 1),
                   "enrichment": 1.5} for layer in range(3) for key in ("first", "memory", "reason")]
    token_table = {"id": "q", "layer": 0, "head": 0, "query_tokens": ["a", "b"], "query_kinds": ["memory", "answer"],
                   "key_tokens": ["[first]", "[prompt]", "[question]", "a", "b"],
                   "key_kinds": ["first", "prompt", "question", "memory", "answer"],
                   "values": [[0.5, 0.2, 0.1, 0.2, 0.0], [0.4, 0.1, 0.1, 0.2, 0.2]]}
    (tmp_path / "test_plots_data.py").write_text(f"SWEEP = {SWEEP!r}\nCURVES = {CURVES!r}\n"
                                                 f"LAYER_ROWS = {layer_rows!r}\nTOKEN_TABLE = {token_table!r}\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "clean", done.stderr[-2000:]
    assert all((tmp_path / f"{name}.png").read_bytes()[:8] == PNG for name in "abcd")
