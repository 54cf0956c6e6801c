"""Every figure memreason draws, each from a table (never a model), written as a PNG:

* ``plot_layer_heatmap``: attention mass and enrichment by layer and span kind
  (``memreason.analysis.attention_tables.layer_table``);
* ``plot_token_heatmap``: one head's attention over one example's tokens (``attention.token_table``);
* ``plot_sweep_heatmap``: a memory-injection sweep's layer × tau grid per condition (its cell table);
* ``plot_training_curves``: training loss, validation loss and accuracy against steps (``metrics.jsonl`` rows).

Figures are drawn on a ``matplotlib.figure.Figure`` with the Agg canvas directly: pyplot is never imported
and the backend is never switched, so no figure state or backend choice leaks into the caller's process.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

from memreason.analysis.attention import QUERY_GROUPS, TABLE_KEY_KINDS

# One colour per span kind, shared with the HTML report (memory blue, reason green).
KIND_COLOURS = {
    "first": "#1a202c", "prompt": "#cbd5e0", "question": "#dd6b20", "memory": "#2b6cb0", "reason": "#2f855a",
    "step": "#b7791f", "answer": "#805ad5", "marker_memory": "#90cdf4", "marker_reason": "#9ae6b4",
    "marker_step": "#f6e05e", "marker_answer": "#d6bcfa", "markers": "#718096",
}
QUERY_LABELS = {"memory": "memory-step tokens", "reason": "reason-step tokens", "step": "unlabelled-step tokens",
                "answer": "answer-line tokens", "markers": "marker tokens"}


def _figure(width: float, height: float, dpi: float = 110):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), dpi=dpi)
    FigureCanvasAgg(figure)
    return figure


def _save(figure, path: str | Path, **kwargs) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, **kwargs)
    return path


def plot_layer_heatmap(rows: Sequence[dict], path: str | Path, *, query_groups: Sequence[str] | None = None,
                       title: str | None = None) -> Path:
    """Layer × span-kind heatmaps, one column per query group: attention mass (top row) and log2
    enrichment over the uniform baseline (bottom row; red = more than the span's share of visible tokens).

    Args:
        rows: ``attention_tables.layer_table`` rows (``layer, query, key, n, mean, enrichment, ...``).
        path: the PNG to write.
        query_groups: which query groups to show (default: every group present, in ``QUERY_GROUPS`` order).
        title (str | None): figure title.

    Returns:
        Path: ``path``.

    Raises:
        ValueError: no rows, or none for the requested groups.
    """
    import numpy as np
    from matplotlib.colors import TwoSlopeNorm

    present = {row["query"] for row in rows}
    groups = [g for g in (query_groups or QUERY_GROUPS) if g in present]
    if not groups:
        raise ValueError("no attention rows to plot" if not rows else f"no rows for query groups {query_groups}")
    layers = sorted({int(row["layer"]) for row in rows})
    kinds = [k for k in TABLE_KEY_KINDS
             if any(row["key"] == k and row["query"] in groups and int(row.get("n_seen", 1)) > 0 for row in rows)]
    figure = _figure(2.2 + 3.2 * len(groups), 1.6 + 0.16 * len(layers) * 2 + 1.6)
    axes = figure.subplots(2, len(groups), squeeze=False)
    for column, group in enumerate(groups):
        mass = np.full((len(layers), len(kinds)), np.nan)
        enrich = np.full((len(layers), len(kinds)), np.nan)
        n = 0
        for row in rows:
            if row["query"] != group or row["key"] not in kinds:
                continue
            if int(row.get("n_seen", 1)) == 0:
                continue  # no example's group could see this kind: leave the cell blank
            i, j = layers.index(int(row["layer"])), kinds.index(row["key"])
            mass[i, j] = float(row["mean"])
            value = float(row["enrichment"])
            enrich[i, j] = math.log2(value) if value > 0 and math.isfinite(value) else np.nan
            n = max(n, int(row["n"]))
        top, bottom = axes[0][column], axes[1][column]
        image = top.imshow(mass, aspect="auto", cmap="viridis", vmin=0.0, vmax=max(1e-9, float(np.nanmax(mass))),
                           interpolation="nearest")
        figure.colorbar(image, ax=top, fraction=0.05, pad=0.02, label="attention mass")
        top.set_title(f"queries: {QUERY_LABELS.get(group, group)} (n≤{n})", fontsize=9)
        limit = float(np.nanmax(np.abs(enrich))) if np.isfinite(enrich).any() else 1.0
        limit = max(limit, 0.5)
        image = bottom.imshow(enrich, aspect="auto", cmap="RdBu_r", interpolation="nearest",
                              norm=TwoSlopeNorm(vcenter=0.0, vmin=-limit, vmax=limit))
        figure.colorbar(image, ax=bottom, fraction=0.05, pad=0.02, label="log2 enrichment")
        for ax in (top, bottom):
            ax.set_xticks(range(len(kinds)))
            ax.set_xticklabels(kinds, rotation=60, ha="right", fontsize=7)
            for tick, kind in zip(ax.get_xticklabels(), kinds):
                tick.set_color(KIND_COLOURS.get(kind, "black") if kind not in ("prompt",) else "#4a5568")
            step = max(1, len(layers) // 12)
            ax.set_yticks(range(0, len(layers), step))
            ax.set_yticklabels([str(layers[i]) for i in range(0, len(layers), step)], fontsize=7)
            ax.set_ylabel("layer", fontsize=8)
    figure.suptitle(title or "Attention by layer and span kind (mean over heads and examples)", fontsize=10)
    figure.tight_layout()
    return _save(figure, path)


def _label(token: str) -> str:
    text = token.replace("\n", "\\n").replace("\t", "\\t")
    return (text[:14] + "…") if len(text) > 15 else text


def plot_token_heatmap(table: dict, path: str | Path, *, max_tokens: int = 120, title: str | None = None) -> Path:
    """One head's attention over the generated tokens of one example (``attention.token_table``).

    Rows are query tokens, columns key tokens (the first three columns sum the attention on the prompt's
    first token, the rest of the prompt and the question). Coloured strips along both axes show each
    token's span kind. A square-root colour scale keeps small weights visible.

    Args:
        table (dict): from ``attention.token_table`` (or its JSON file).
        path: the PNG to write.
        max_tokens (int, default 120): show at most this many generated tokens (the first ones).
        title (str | None): figure title.

    Returns:
        Path: ``path``.
    """
    import numpy as np
    from matplotlib.colors import ListedColormap, PowerNorm

    values = np.asarray(table["values"], dtype=float)  # [q, 3 + k_generated]
    q = min(values.shape[0], max_tokens)
    values = values[:q, :3 + q]
    q_tokens, k_tokens = table["query_tokens"][:q], table["key_tokens"][:3 + q]
    q_kinds, k_kinds = table["query_kinds"][:q], table["key_kinds"][:3 + q]
    size = 2.5 + 0.11 * (q + 3)
    figure = _figure(size + 1.2, size)
    grid = figure.add_gridspec(2, 3, width_ratios=[0.35, 12, 0.4], height_ratios=[0.35, 12], wspace=0.02, hspace=0.02)
    ax = figure.add_subplot(grid[1, 1])
    norm = PowerNorm(0.5, vmin=0.0, vmax=max(1e-9, values.max()))
    image = ax.imshow(values, aspect="auto", cmap="magma_r", norm=norm, interpolation="nearest")
    fontsize = 6 if q <= 60 else 4
    ax.set_xticks(range(len(k_tokens)))
    ax.set_xticklabels([_label(t) for t in k_tokens], rotation=90, fontsize=fontsize)
    kinds = list(KIND_COLOURS)
    cmap = ListedColormap([KIND_COLOURS[k] for k in kinds])
    left = figure.add_subplot(grid[1, 0], sharey=ax)
    left.imshow(np.array([[kinds.index(k)] for k in q_kinds]), aspect="auto", cmap=cmap, vmin=0, vmax=len(kinds) - 1,
                interpolation="nearest")
    left.set_xticks([])
    left.set_yticks(range(q))
    left.set_yticklabels([_label(t) for t in q_tokens], fontsize=fontsize)
    ax.tick_params(labelleft=False, left=False)  # the shared y ticks are labelled on the kind strip
    top = figure.add_subplot(grid[0, 1], sharex=ax)
    top.imshow(np.array([[kinds.index(k) for k in k_kinds]]), aspect="auto", cmap=cmap, vmin=0, vmax=len(kinds) - 1,
               interpolation="nearest")
    top.set_yticks([])
    top.tick_params(labelbottom=False, bottom=False)
    cax = figure.add_subplot(grid[1, 2])
    figure.colorbar(image, cax=cax, label="attention weight")
    shown = [k for k in kinds if k in set(q_kinds) | set(k_kinds)]
    from matplotlib.patches import Patch

    figure.legend(handles=[Patch(color=KIND_COLOURS[k], label=k) for k in shown], loc="upper right", fontsize=6,
                  ncol=min(len(shown), 6), frameon=False)
    name = title or f"example {table.get('id')}: layer {table.get('layer')}, head {table.get('head')}"
    figure.suptitle(name, fontsize=9, x=0.02, ha="left")
    return _save(figure, path, bbox_inches="tight")


def plot_sweep_heatmap(cells: Sequence[dict], path: str | Path, split: str = "dev", metric: str = "mean_dlogp",
                       best: tuple[int, float] | None = None, title: str | None = None) -> Path:
    """Layer × tau heatmaps of ``metric`` on ``split``, one panel per condition, on one diverging scale.

    Args:
        cells: a memory-injection sweep's cell table (``SweepResult.cells`` or ``cells.csv`` rows: ``split``,
            ``condition``, ``layer``, ``tau`` and the metric).
        path: the PNG to write.
        split (str, default "dev"): which split to show (the one the cell was chosen on).
        metric (str, default "mean_dlogp"): a column of the cell table.
        best (tuple[int, float] | None): (layer, tau) to mark.
        title (str | None): figure title.

    Returns:
        Path: ``path``.
    """
    import numpy as np
    from matplotlib.colors import TwoSlopeNorm

    rows = [r for r in cells if r["split"] == split]
    conditions = list(dict.fromkeys(r["condition"] for r in rows))
    layers = sorted({int(r["layer"]) for r in rows})
    taus = sorted({float(r["tau"]) for r in rows})
    grids = {}
    for c in conditions:
        grid = np.full((len(layers), len(taus)), np.nan)
        for r in rows:
            if r["condition"] == c:
                grid[layers.index(int(r["layer"])), taus.index(float(r["tau"]))] = float(r[metric])
        grids[c] = grid
    # Zero is white; the two sides get their own ranges, negatives clipped at the 5th percentile: destroyed
    # cells (Δlog p of -10 or worse) would otherwise wash out the small positive effects that matter.
    values = np.concatenate([g[np.isfinite(g)] for g in grids.values()])
    low = min(float(np.percentile(values, 5)) if values.size else -1.0, -1e-3)
    high = max(float(values.max()) if values.size else 1.0, 1e-3)
    scale = TwoSlopeNorm(vcenter=0.0, vmin=low, vmax=high)
    # dpi 100 while drawing (pyplot's default, which the layout was made for); the file is written at 110
    figure = _figure(2.2 + 2.0 * len(conditions), 0.28 * len(layers) + 2, dpi=100)
    axes = figure.subplots(1, len(conditions), squeeze=False, sharey=True)
    for ax, c in zip(axes[0], conditions):
        image = ax.imshow(grids[c], cmap="RdBu", norm=scale, aspect="auto", origin="lower")
        ax.set_title(c)
        ax.set_xticks(range(len(taus)), [f"{t:g}" for t in taus], rotation=45)
        ax.set_yticks(range(len(layers)), [str(layer) for layer in layers])
        ax.set_xlabel("tau")
        if best is not None and best[0] in layers and best[1] in taus:
            ax.scatter([taus.index(best[1])], [layers.index(best[0])], marker="*", s=120, c="gold",
                       edgecolors="black")
    axes[0][0].set_ylabel("layer")
    bar = figure.colorbar(image, ax=axes[0].tolist(), shrink=0.8, label=f"{metric} ({split}; clipped)")
    bar.set_ticks([*np.linspace(low, 0, 4), *np.linspace(0, high, 3)[1:]])
    if title:
        figure.suptitle(title, y=1.0 + 0.3 / figure.get_figheight())
    return _save(figure, path, dpi=110, bbox_inches="tight")


def plot_training_curves(rows: Sequence[dict], path: str | Path) -> Path:
    """Training loss, validation loss, validation accuracy and format rate against optimiser steps.

    Args:
        rows: ``metrics.jsonl`` rows of a run (``step`` with ``loss``, ``eval_loss``, ``eval_val_accuracy``,
            ``eval_val_format_rate``, each where logged).
        path: the PNG to write.

    Returns:
        Path: ``path``.
    """
    train = [(r["step"], r["loss"]) for r in rows if "loss" in r]
    val_loss = [(r["step"], r["eval_loss"]) for r in rows if "eval_loss" in r]
    val_acc = [(r["step"], r["eval_val_accuracy"]) for r in rows if "eval_val_accuracy" in r]
    val_fmt = [(r["step"], r["eval_val_format_rate"]) for r in rows if "eval_val_format_rate" in r]
    figure = _figure(7, 4, dpi=100)
    loss_axis = figure.subplots()
    if train:
        loss_axis.plot(*zip(*train), label="train loss", color="tab:blue")
    if val_loss:
        loss_axis.plot(*zip(*val_loss), "o-", label="val loss", color="tab:orange")
    loss_axis.set_xlabel("optimiser step")
    loss_axis.set_ylabel("loss (target tokens)")
    acc_axis = loss_axis.twinx()
    if val_acc:
        acc_axis.plot(*zip(*val_acc), "s-", label="val accuracy", color="tab:green")
    if val_fmt:
        acc_axis.plot(*zip(*val_fmt), "^:", label="val format rate", color="tab:gray")
    acc_axis.set_ylim(0, 1.02)
    acc_axis.set_ylabel("validation (greedy generations)")
    handles = loss_axis.get_legend_handles_labels()[0] + acc_axis.get_legend_handles_labels()[0]
    labels = loss_axis.get_legend_handles_labels()[1] + acc_axis.get_legend_handles_labels()[1]
    loss_axis.legend(handles, labels, loc="center right", fontsize=8)
    figure.tight_layout()
    return _save(figure, path, dpi=120)
