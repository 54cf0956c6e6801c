"""The memory-injection experiment: a layer x tau sweep with dev/test selection, matched controls and robust metrics.

The original experiment (spec/memory_injection.md §5) ran two batch-1 forwards per (item, layer, tau), chose
the cell on the items it reported, scored a heavy-tailed mean of per-item ratios and compared against random
words at one cell only, unmatched in norm (§7). This module keeps the measurement and fixes the protocol:

* **Selection on dev, report on test.** Items are split by a seeded shuffle; the cell maximising the mean
  Δlog p of the curated memory on dev is reported on test (§10 B2).
* **Robust metrics first** (§9): mean Δlog p (primary), median % change, the legacy mean of % changes and
  its 99th-percentile-trimmed version, ratio of means, fraction improved, top-1/top-5 hits before and after.
  The target is the first non-whitespace token of " " + answer (§7 item 9, the Llama '▁' bug).
* **Matched controls at every cell** (§10 B4): another item's memory (a derangement), random nouns with the
  memory's token count, a random direction with the memory vector's norm; optionally the obscure entity and
  the answer itself (leakage upper bound). Curated − control differences get paired bootstrap 95% CIs and a
  sign test (``memreason.stats``), both at the curated cell and at each control's own best dev cell.
* **Collateral damage**: KL(edited ‖ clean) of next-token distributions on neutral prompts at the chosen cell.

This module owns the settings (``SweepConfig``, loadable from YAML with ``memreason.config.load_settings``),
``run(config)`` (inputs checked before the model loads; a resumable output directory), the statistics
(``summarise``) and the outputs (``write_outputs``; the heatmap is ``analysis.plots.plot_sweep_heatmap``). Measuring lives in
``experiments.injection_grid``, the mechanism in ``interventions.memory_injection``, the prompt files in
``data.two_hop``. ``benchmarks/injection_sweep.py`` measures the batched sweep against the original loop.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from memreason.data.two_hop import PromptItem, load_pos_words, load_prompts
from memreason.errors import ConfigError
from memreason.experiments.injection_grid import (
    CONTROLS,
    CURATED,
    GridMeasurements,
    check_controls,
    check_split,
    measure_grid,
)
from memreason.analysis.plots import plot_sweep_heatmap
from memreason.interventions.memory_injection import (
    CALIBRATION_TEXTS,
    ENCODERS,
    TAU_MODES,
    add_to_attention_output,
    check_positions,
    left_padded_batch,
)
from memreason.io import OutputDir, append_jsonl, atomic_write, csv_text, settings_digest, write_json
from memreason.model.layers import layout, unwrap
from memreason.stats import bootstrap_ci, sign_test_p

logger = logging.getLogger(__name__)

DEFAULT_CONTROLS = ("shuffled", "pos", "random")
DEFAULT_TAUS = (0.05, 0.1, 0.2, 0.4)
MEASUREMENTS = "measurements.jsonl"
OUTPUTS = (MEASUREMENTS, "cells.csv", "items.csv", "summary.json", "heatmap.png")


# --------------------------------------------------------------------------------------------------------
# Settings
# --------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class SweepConfig:
    """What to sweep, on what, and how to judge it (``memreason inject sweep --config`` reads these keys).

    Attributes:
        model (str | None): model dir, .gguf file or hub id for ``run``; None = the embedded SmolLM2.
        device (str): ``auto``, ``cpu``, ``cuda``, ``cuda:1``, ...
        prompts (str | None): CSV of two-hop items (``data.two_hop.load_prompts``); None = the bundled set.
        limit (int | None): use only the first ``limit`` prompts (at least 4: 2 dev and 2 test).
        out (str): output directory of ``run``; a rerun with the same settings resumes it.
        layers (tuple[int, ...] | None): layers to sweep; None = about 10 evenly spaced layers.
        taus (tuple[float, ...]): strengths; with ``tau_mode="relative"`` a fraction of the residual norm.
        tau_mode (str): ``"relative"`` (the delta's norm is tau x the median residual norm entering the
            layer, measured on ``neutral_prompts``; comparable across layers and models) or ``"absolute"``
            (tau x v, the paper's tweak factor).
        positions: ``"all"`` (the paper), ``"last"``, or a ``[start, stop]`` span of prompt tokens (YAML
            ``[0, 4]``; the string ``"0:4"`` is read the same way).
        encoder (str): memory encoder (see ``memory_injection.memory_vector``).
        controls (tuple[str, ...]): subset of ``CONTROLS``.
        dev_fraction (float): share of items used to choose the cell.
        seed (int): seeds the split, the controls and the bootstrap.
        batch_size (int): rows per forward.
        n_bootstrap (int): bootstrap resamples for CIs.
        control_pos (str): part of speech of the random-word control (a ``pos`` value of the word list).
        neutral_prompts (tuple[str, ...]): calibration and collateral-damage prompts.
    """

    model: str | None = None
    device: str = "auto"
    prompts: str | None = None
    limit: int | None = None
    out: str = "runs/inject_sweep"
    layers: tuple[int, ...] | None = None
    taus: tuple[float, ...] = DEFAULT_TAUS
    tau_mode: str = "relative"
    positions: tuple[int | None, int | None] | str = "all"
    encoder: str = "unembed"
    controls: tuple[str, ...] = DEFAULT_CONTROLS
    dev_fraction: float = 0.5
    seed: int = 0
    batch_size: int = 64
    n_bootstrap: int = 10_000
    control_pos: str = "noun"
    neutral_prompts: tuple[str, ...] = field(default=CALIBRATION_TEXTS)

    def __post_init__(self):
        if isinstance(self.positions, str) and ":" in self.positions:
            start, _, stop = self.positions.partition(":")
            try:
                span = tuple(int(p) if p.strip() else None for p in (start, stop))
            except ValueError:
                span = self.positions  # reported below
            object.__setattr__(self, "positions", span)
        elif isinstance(self.positions, list):
            object.__setattr__(self, "positions", tuple(self.positions))
        problems = self._problems()
        if problems:
            raise ConfigError("; ".join(problems))

    def _problems(self) -> list[str]:
        problems = []
        if not self.taus or any(isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t)
                                or t < 0 for t in self.taus):
            problems.append(f"taus must be non-negative finite numbers, got {self.taus!r}")
        if self.layers is not None and not self.layers:
            problems.append("layers must not be empty")
        if self.tau_mode not in TAU_MODES:
            problems.append(f"tau_mode must be one of {', '.join(TAU_MODES)}, got {self.tau_mode!r}")
        if self.encoder not in ENCODERS:
            problems.append(f"encoder must be one of {', '.join(ENCODERS)}, got {self.encoder!r}")
        unknown = [c for c in self.controls if c not in CONTROLS]
        if unknown:
            problems.append(f"unknown control(s) {', '.join(unknown)}; choose from {', '.join(CONTROLS)}")
        if len(set(self.controls)) != len(self.controls):
            problems.append("controls are listed more than once")
        if not 0 < self.dev_fraction < 1:
            problems.append(f"dev_fraction must be between 0 and 1, got {self.dev_fraction}")
        if self.batch_size < 1 or self.n_bootstrap < 1:
            problems.append("batch_size and n_bootstrap must be positive")
        if self.limit is not None and self.limit < 4:
            problems.append(f"limit={self.limit}: --limit must be at least 4 (2 dev and 2 test items)")
        if not self.neutral_prompts:
            problems.append("neutral_prompts must not be empty")
        try:
            check_positions(self.positions)
        except ConfigError as exc:
            problems.append(str(exc))
        return problems


# --------------------------------------------------------------------------------------------------------
# Statistics (pure functions on numpy arrays)
# --------------------------------------------------------------------------------------------------------

def cell_metrics(logp_before, logp_after, rank_before, rank_after) -> dict:
    """Per-cell statistics of §9 from per-item next-token log-probabilities and ranks (0 = top-1).

    Returns:
        dict: ``n``, ``mean_dlogp`` (primary), ``median_dlogp``, ``median_pct``, ``mean_pct`` (legacy mean of
        per-item % changes), ``trimmed_mean_pct`` (values at or above the 99th percentile dropped, as the
        original's unused ``reject_outliers``), ``ratio_of_means_pct``, ``frac_improved``, ``top1_before``,
        ``top1_after``, ``top5_before``, ``top5_after``, ``mean_p_before``, ``mean_p_after``.
    """
    import numpy as np

    lb, la = np.asarray(logp_before, dtype=np.float64), np.asarray(logp_after, dtype=np.float64)
    rb, ra = np.asarray(rank_before), np.asarray(rank_after)
    pb, pa = np.exp(lb), np.exp(la)
    dlogp = la - lb
    pct = 100.0 * np.expm1(dlogp)  # = 100 (p_after - p_before) / p_before, without cancellation
    trimmed = pct[pct < np.percentile(pct, 99)] if len(pct) > 1 else pct
    return {
        "n": int(len(lb)),
        "mean_dlogp": float(dlogp.mean()),
        "median_dlogp": float(np.median(dlogp)),
        "median_pct": float(np.median(pct)),
        "mean_pct": float(pct.mean()),
        "trimmed_mean_pct": float(trimmed.mean()) if len(trimmed) else float("nan"),
        "ratio_of_means_pct": float(100.0 * (pa.mean() / pb.mean() - 1.0)),
        "frac_improved": float((la > lb).mean()),
        "top1_before": float((rb == 0).mean()),
        "top1_after": float((ra == 0).mean()),
        "top5_before": float((rb < 5).mean()),
        "top5_after": float((ra < 5).mean()),
        "mean_p_before": float(pb.mean()),
        "mean_p_after": float(pa.mean()),
    }


@dataclass
class SweepResult:
    """Everything a sweep measured. ``cells`` and ``items`` are lists of flat dicts (CSV rows)."""

    config: dict
    meta: dict
    cells: list[dict]
    items: list[dict]
    best: dict
    comparisons: list[dict]
    own_best: list[dict]
    collateral: list[dict]


def run_sweep(model, tokenizer, items: Sequence[PromptItem], config: SweepConfig | None = None,
              progress: Callable[[int, int], None] | None = None, pos_words: dict | None = None,
              log: MeasurementLog | None = None) -> SweepResult:
    """Sweep layers x taus over ``items`` with the curated memory and the configured controls, and judge it.

    ``measure_grid`` followed by ``summarise``. ``config.model``, ``device``, ``prompts``, ``limit`` and
    ``out`` are ``run``'s business; here the caller passes the model and the items.

    Args:
        model: a causal LM whose layout ``memreason.model.layers`` knows or detects.
        tokenizer: its tokenizer.
        items (Sequence[PromptItem]): at least 4 items (2 per split).
        config (SweepConfig | None): what to sweep; None = ``SweepConfig()``.
        progress (Callable[[int, int], None] | None): called with (rows done, rows total) after each batch.
        pos_words (dict | None): ``{pos: words}`` for the random-word control; None = the bundled list.
        log (MeasurementLog | None): finished blocks to reuse and record (resumable runs).

    Returns:
        SweepResult: cell table (every condition x layer x tau x split), per-item rows at the chosen cell,
        the chosen cell, test-set comparisons with CIs, and collateral KL.

    Raises:
        ConfigError: layers out of range, too few items for the split, a control the data cannot support.
        DataError: an answer without a scorable token.
    """
    config = config if config is not None else SweepConfig()
    grid = measure_grid(model, tokenizer, items, config, progress, pos_words, log)
    return summarise(model, tokenizer, items, config, grid)


def _cell_table(grid: GridMeasurements, masks: dict) -> list[dict]:
    cells = []
    for c in grid.conditions:
        for g, layer in enumerate(grid.layers):
            for t, tau in enumerate(grid.taus):
                for s, m in masks.items():
                    cells.append({"condition": c, "layer": layer, "tau": tau, "split": s,
                                  **cell_metrics(grid.logp_before[m], grid.logp_after[c][m, g, t],
                                                 grid.rank_before[m], grid.rank_after[c][m, g, t])})
    return cells


def _compare(grid: GridMeasurements, config: SweepConfig, cells: list[dict], masks: dict):
    """The dev-chosen cell, each control against it on test, and each control at its own best dev cell."""
    layers, taus, lb, la = grid.layers, grid.taus, grid.logp_before, grid.logp_after

    def cell(condition, split, g, t):
        return next(r for r in cells if (r["condition"], r["split"], r["layer"], r["tau"])
                    == (condition, split, layers[g], taus[t]))

    def best_cell(condition):
        dev = [r for r in cells if r["condition"] == condition and r["split"] == "dev"]
        top = max(dev, key=lambda r: r["mean_dlogp"])  # first maximum: deterministic on ties
        return layers.index(top["layer"]), taus.index(top["tau"])

    def ci(values):
        return bootstrap_ci(values, n_resamples=config.n_bootstrap, seed=config.seed + 4)

    g, t = best_cell(CURATED)
    test = masks["test"]
    curated_test = la[CURATED][test, g, t] - lb[test]
    best = {"layer": layers[g], "tau": taus[t], "tau_mode": config.tau_mode,
            "dev": cell(CURATED, "dev", g, t), "test": cell(CURATED, "test", g, t), "test_ci": ci(curated_test)}
    comparisons, own_best = [], []
    for c in grid.conditions[1:]:
        control_test = la[c][test, g, t] - lb[test]
        diff = curated_test - control_test
        comparisons.append({"control": c, "layer": layers[g], "tau": taus[t],
                            **{f"control_{k}": v for k, v in cell(c, "test", g, t).items()
                               if k not in ("condition", "layer", "tau", "split")},
                            "control_ci": ci(control_test), "diff_mean_dlogp": float(diff.mean()),
                            "diff_ci": ci(diff), "sign_test_p": sign_test_p(diff)})
        cg, ct = best_cell(c)
        own_test = la[c][test, cg, ct] - lb[test]
        own_best.append({"control": c, "layer": layers[cg], "tau": taus[ct],
                         "test_mean_dlogp": float(own_test.mean()), "test_ci": ci(own_test),
                         "diff_vs_curated_best": float((curated_test - own_test).mean()),
                         "diff_ci": ci(curated_test - own_test)})
    return (g, t), best, comparisons, own_best


def summarise(model, tokenizer, items: Sequence[PromptItem], config: SweepConfig,
              grid: GridMeasurements) -> SweepResult:
    """Statistics of a measured grid: cell table, dev-chosen cell, test comparisons with CIs, collateral KL.

    Needs the model only for the collateral-damage forwards on the neutral prompts.
    """
    import numpy as np

    lb, rb, la, ra = grid.logp_before, grid.rank_before, grid.logp_after, grid.rank_after
    masks = {s: np.array([x == s for x in grid.split]) for s in ("dev", "test")}
    cells = _cell_table(grid, masks)
    (g, t), best, comparisons, own_best = _compare(grid, config, cells, masks)
    collateral = _collateral_kl(model, tokenizer, config, grid, g, t, masks["test"])

    item_rows = []
    for i, it in enumerate(items):
        row = {"index": it.index, "split": grid.split[i], "obscure_sentence": it.obscure,
               "answer": it.answer.strip(), "target_token": tokenizer.decode([int(grid.targets[i])]),
               "memory": it.memory, "p_explicit": math.exp(grid.logp_explicit[i]), "p_before": math.exp(lb[i]),
               "rank_before": int(rb[i])}
        for c in grid.conditions:
            if c in grid.texts and c != CURATED:
                row[f"{c}_memory"] = grid.texts[c][i]
            row[f"p_after_{c}"] = math.exp(la[c][i, g, t])
            row[f"rank_after_{c}"] = int(ra[c][i, g, t])
        item_rows.append(row)

    meta = {
        "model": getattr(unwrap(model).config, "name_or_path", "") or type(unwrap(model)).__name__,
        "n_layers": layout(model).num_layers, "layers": list(grid.layers), "taus": list(grid.taus),
        "conditions": grid.conditions, "n_items": len(items), "n_dev": int(masks["dev"].sum()),
        "n_test": int(masks["test"].sum()), "explicit_beats_obscure": float((grid.logp_explicit > lb).mean()),
        "multi_token_answers": sum(len(tokenizer(it.answer, add_special_tokens=False)["input_ids"]) > 1
                                   for it in items),
        "digit_answers": sum(it.answer.strip()[:1].isdigit() for it in items),
        "tokenizer_adds_bos": grid.bos, "resumed_from_cache": grid.resumable, "seed": config.seed,
    }
    config_dict = {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(config).items()}
    config_dict["layers"] = list(grid.layers)
    return SweepResult(config=config_dict, meta=meta, cells=cells, items=item_rows, best=best,
                       comparisons=comparisons, own_best=own_best, collateral=collateral)


def _collateral_kl(model, tokenizer, config, grid: GridMeasurements, g, t, test, per_prompt=4):
    """Mean KL(edited ‖ clean) over the real positions of neutral prompts, each edited with the vectors of up
    to ``per_prompt`` test items, for every condition at the chosen cell (g, t)."""
    import numpy as np
    import torch

    base = unwrap(model)
    device = next(base.parameters()).device
    test_items = [int(i) for i in np.flatnonzero(test)][:per_prompt]
    prompts = [p for p in config.neutral_prompts for _ in test_items]
    kls = {c: [] for c in grid.conditions}
    # Full-vocabulary distributions at every position are large ([rows, pos, vocab]): go in small chunks,
    # with one clean pass per chunk shared by every condition.
    for start in range(0, len(prompts), 16):
        batch = left_padded_batch(tokenizer, prompts[start:start + 16], device)
        real = batch["attention_mask"].bool()
        with torch.no_grad():
            clean = base(**batch, use_cache=False).logits.float().log_softmax(-1)
            for c in grid.conditions:
                row_deltas = torch.stack([grid.deltas[c][test_items[(start + k) % len(test_items)], g, t]
                                          for k in range(real.shape[0])])
                with add_to_attention_output(model, {grid.layers[g]: row_deltas}, grid.positions):
                    edited = base(**batch, use_cache=False).logits.float().log_softmax(-1)
                kls[c].append((edited.exp() * (edited - clean)).sum(-1)[real])  # [real tokens]
    out = []
    for c in grid.conditions:
        kl = torch.cat(kls[c])
        out.append({"condition": c, "layer": grid.layers[g], "tau": grid.taus[t], "mean_kl": float(kl.mean()),
                    "max_kl": float(kl.max()), "n_prompts": len(config.neutral_prompts),
                    "n_memories": len(test_items)})
    return out


# --------------------------------------------------------------------------------------------------------
# Running it: inputs first, then a resumable output directory, then the model
# --------------------------------------------------------------------------------------------------------

class MeasurementLog:
    """The finished blocks of one sweep, read from and appended to ``measurements.jsonl`` in its output dir.

    A block is one item group's clean measurements (``("clean", group)``) or one (item group, layer) of
    edited measurements (``("edit", group, layer)``), written with one append + fsync as soon as it is
    measured. A kill loses at most the block in flight; the torn line it may leave is cut off on resume.

    Args:
        out (OutputDir): the sweep's output directory (its settings digest guarantees that every stored
            block was measured with the settings of this run).
    """

    def __init__(self, out: OutputDir):
        self.path = out.file(MEASUREMENTS)
        self._blocks: dict[tuple, list] = {}
        for row in out.resume_rows(MEASUREMENTS):
            self._blocks[self._key(row)] = row["rows"]
        if self._blocks:
            logger.info("resuming %s: %d measured blocks kept", out.path, len(self._blocks))

    @staticmethod
    def _key(row: dict) -> tuple:
        if row["block"] == "edit":
            return ("edit", row["group"], row["layer"])
        return ("clean", row["group"])

    def __len__(self) -> int:
        return len(self._blocks)

    def get(self, key: tuple) -> list | None:
        """The rows of a finished block, or None when it still has to be measured."""
        return self._blocks.get(key)

    def put(self, key: tuple, rows: list) -> None:
        """Record a finished block (appended and fsynced before this returns)."""
        record = {"block": key[0], "group": key[1], **({"layer": key[2]} if key[0] == "edit" else {}), "rows": rows}
        append_jsonl(self.path, [record])
        self._blocks[key] = rows


def load_items(config: SweepConfig) -> list[PromptItem]:
    """The prompts ``config`` names (``prompts``, the first ``limit`` of them).

    Raises:
        DataError: the prompt file is missing, a directory or malformed.
    """
    items = load_prompts(config.prompts)
    return items[:config.limit] if config.limit is not None else items


def check_inputs(config: SweepConfig, items: Sequence[PromptItem], pos_words: dict | None) -> None:
    """Every check that needs no model: enough items for the split, and data for each control.

    Raises:
        ConfigError: too few items, or a control the data cannot support.
    """
    check_split(len(items), config.dev_fraction)
    check_controls(items, config, pos_words or {})


def open_output(config: SweepConfig, items: Sequence[PromptItem], *, overwrite: bool = False) -> OutputDir:
    """The output directory of a sweep, keyed by everything that decides its measurements.

    The digest covers the settings except ``out`` and the items themselves (so an edited prompt file is
    not mistaken for the one the stored blocks were measured on).

    Raises:
        ConfigError: ``out`` is a file or unwritable, or holds a sweep with other settings.
    """
    settings = {k: v for k, v in asdict(config).items() if k != "out"}
    settings["items_digest"] = settings_digest([asdict(it) for it in items])
    return OutputDir(config.out, settings, overwrite=overwrite, outputs=OUTPUTS)


def run(config: SweepConfig, *, overwrite: bool = False,
        progress: Callable[[int, int], None] | None = None) -> tuple[SweepResult, dict[str, Path]]:
    """The whole experiment: read the prompts, check everything, load the model, sweep, write the outputs.

    Rerunning with the same settings into the same ``out`` resumes: blocks already in
    ``measurements.jsonl`` are not measured again, and the outputs equal those of an uninterrupted run.

    Args:
        config (SweepConfig): the settings (see ``load_settings(SweepConfig, ...)``).
        overwrite (bool, default False): discard earlier outputs in ``out`` instead of resuming.
        progress (Callable[[int, int], None] | None): (rows done, rows total) after each batch.

    Returns:
        tuple: (SweepResult, {output name: path}).

    Raises:
        ConfigError / DataError: bad prompts, too few items, bad output directory (before the model
            loads); layers out of range for the model (after).
        ModelLoadError: the model cannot be loaded.
    """
    items = load_items(config)
    pos_words = load_pos_words() if "pos" in config.controls else None
    check_inputs(config, items, pos_words)
    out = open_output(config, items, overwrite=overwrite)
    log = MeasurementLog(out)

    from memreason.model import load

    model, tokenizer = load(config.model, device=config.device)
    result = run_sweep(model, tokenizer, items, config, progress, pos_words, log=log)
    return result, write_outputs(result, out.path)


# --------------------------------------------------------------------------------------------------------
# Outputs
# --------------------------------------------------------------------------------------------------------

def write_outputs(result: SweepResult, out_dir: str | os.PathLike) -> dict[str, Path]:
    """Write ``cells.csv``, ``items.csv`` (at the chosen cell), ``summary.json`` and ``heatmap.png`` atomically.

    Returns:
        dict[str, Path]: name -> written path.
    """
    out = Path(out_dir)
    paths = {"cells": out / "cells.csv", "items": out / "items.csv", "summary": out / "summary.json",
             "heatmap": out / "heatmap.png"}
    atomic_write(paths["cells"], csv_text(result.cells))
    atomic_write(paths["items"], csv_text(result.items))
    summary = {"config": result.config, "meta": result.meta, "best": result.best,
               "comparisons": result.comparisons, "own_best": result.own_best, "collateral": result.collateral}
    write_json(paths["summary"], summary, indent=2)
    plot_sweep_heatmap(result.cells, paths["heatmap"], best=(result.best["layer"], result.best["tau"]),
                 title=f"{Path(result.meta['model']).name}: dev mean Δlog p of the answer "
                       f"(tau {result.config['tau_mode']}; ★ chosen cell)")
    return paths


def _grids(cells: list[dict], split: str, metric: str):
    import numpy as np

    rows = [r for r in cells if r["split"] == split]
    conditions = list(dict.fromkeys(r["condition"] for r in rows))
    layers = sorted({int(r["layer"]) for r in rows})
    taus = sorted({float(r["tau"]) for r in rows})
    grids = {}
    for c in conditions:
        grid = np.full((len(layers), len(taus)), np.nan)  # [layer, tau]
        for r in rows:
            if r["condition"] == c:
                grid[layers.index(int(r["layer"])), taus.index(float(r["tau"]))] = float(r[metric])
        grids[c] = grid
    return grids, layers, taus


__all__ = ["CONTROLS", "DEFAULT_CONTROLS", "DEFAULT_TAUS", "MeasurementLog", "SweepConfig", "SweepResult",
           "cell_metrics", "check_inputs", "load_items", "open_output", "run", "run_sweep",
           "summarise", "write_outputs"]
