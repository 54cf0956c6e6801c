"""Figures from analysis tables: a layer × span-kind attention heatmap and a per-example token heatmap.

Each function takes a table (rows from ``memreason.analysis.attention``; never a model) and writes a PNG.
Figures are drawn on a ``matplotlib.figure.Figure`` with the Agg canvas directly, so no pyplot state and
no backend switch leak into the caller's process.
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


def _figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), dpi=110)
    FigureCanvasAgg(figure)
    return figure


def plot_layer_heatmap(rows: Sequence[dict], path: str | Path, *, query_groups: Sequence[str] | None = None,
                       title: str | None = None) -> Path:
    """Layer × span-kind heatmaps, one column per query group: attention mass (top row) and log2
    enrichment over the uniform baseline (bottom row; red = more than the span's share of visible tokens).

    Args:
        rows: ``attention.layer_table`` rows (``layer, query, key, n, mean, enrichment, ...``).
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
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path)
    return path


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
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, bbox_inches="tight")
    return path
