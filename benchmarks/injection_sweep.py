"""Benchmark: the batched injection sweep vs a one-cell-one-prompt loop like the original, in one process.

The original experiment (spec/memory_injection.md §5.1) evaluates each (layer, tau, item) with two batch-1
forwards: a plain one for p_before and a hooked one for p_after, full logits each time. memreason's sweep
runs one clean forward per group of items, caches the residual stream entering each swept layer, resumes
every (item, tau, condition) row from there with its own vector, many rows per batch, and computes logits at
the last position only.

Both sides score the same prompts, layers and taus on the same model with the curated memory (no controls),
and the script checks that they measure the same mean Δlog p per cell before printing the ratio. The timed
sweep is ``measure_grid`` (the residual-norm calibration, explicit-prompt baselines and vector encoding
included, none of which the loop does); the full ``run_sweep`` (plus statistics and collateral KL on neutral
prompts, a fixed cost per run) is timed and printed too.

Run:  .venv/bin/python benchmarks/injection_sweep.py [--items 16] [--layers 3,9,15,21] [--taus 0.05,0.1,0.2,0.4]
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np
import torch

from memreason.data.two_hop import answer_token, load_prompts
from memreason.experiments.injection_grid import measure_grid, split_items
from memreason.experiments.injection_sweep import SweepConfig, run_sweep, summarise
from memreason.interventions.memory_injection import inject, left_padded_batch, residual_norms
from memreason.model import load


def loop_like_the_original(model, tokenizer, items, layers, taus, norms):
    """Two batch-1 forwards per (layer, tau, item), full logits; returns {(layer, tau): [Δlog p per item]}."""
    out = {}
    with torch.no_grad():
        for layer in layers:
            for tau in taus:
                deltas = []
                for it in items:
                    batch = left_padded_batch(tokenizer, [it.obscure])
                    target = answer_token(tokenizer, it.answer)
                    before = model(**batch).logits[0, -1].log_softmax(-1)[target]
                    with inject(model, tokenizer, memory=it.memory, layer=layer, tau=tau, tau_mode="relative",
                                reference_norm=float(norms[layer])):
                        after = model(**batch).logits[0, -1].log_softmax(-1)[target]
                    deltas.append(float(after - before))
                out[(layer, tau)] = deltas
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="default: embedded SmolLM2-135M-Instruct")
    parser.add_argument("--items", type=int, default=16)
    parser.add_argument("--layers", default="3,9,15,21")
    parser.add_argument("--taus", default="0.05,0.1,0.2,0.4")
    parser.add_argument("--batch-size", type=int, default=64)
    args = parser.parse_args()

    model, tokenizer = load(args.model, device="cpu", dtype="float32")
    items = load_prompts()[:args.items]
    layers = tuple(int(x) for x in args.layers.split(","))
    taus = tuple(float(x) for x in args.taus.split(","))
    config = SweepConfig(layers=layers, taus=taus, controls=(), batch_size=args.batch_size, n_bootstrap=1000)
    norms = residual_norms(model, tokenizer, config.neutral_prompts)
    evaluations = len(layers) * len(taus) * len(items)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, load average {os.getloadavg()[0]:.1f}; "
          f"{len(items)} prompts x {len(layers)} layers x {len(taus)} taus = {evaluations} cell-prompt evaluations")

    # ours, baseline, ours: the machine is shared, so bracket the slow baseline with two sweep runs.
    ours_times = []
    start = time.perf_counter()
    grid = measure_grid(model, tokenizer, items, config)
    ours_times.append(time.perf_counter() - start)
    start = time.perf_counter()
    reference = loop_like_the_original(model, tokenizer, items, layers, taus, norms)
    loop_time = time.perf_counter() - start
    start = time.perf_counter()
    run_sweep(model, tokenizer, items, config)
    full_time = time.perf_counter() - start
    start = time.perf_counter()
    measure_grid(model, tokenizer, items, config)
    ours_times.append(time.perf_counter() - start)
    result = summarise(model, tokenizer, items, config, grid)

    split = split_items(len(items), config.dev_fraction, config.seed)
    worst = 0.0
    for (layer, tau), deltas in reference.items():
        for s in ("dev", "test"):
            expected = np.mean([d for d, x in zip(deltas, split) if x == s])
            cell = next(r for r in result.cells if (r["layer"], r["tau"], r["split"]) == (layer, tau, s))
            worst = max(worst, abs(cell["mean_dlogp"] - expected))
    ours = float(np.mean(ours_times))
    print(f"loop like the original: {loop_time:8.1f} s  {evaluations / loop_time:8.2f} cell-prompts/s")
    print(f"memreason measure_grid: {ours:8.1f} s  {evaluations / ours:8.2f} cell-prompts/s "
          f"(runs: {', '.join(f'{t:.1f}' for t in ours_times)} s)")
    print(f"memreason run_sweep:    {full_time:8.1f} s  (grid + statistics + collateral KL)")
    print(f"speed-up: {loop_time / ours:.1f}x (grid), {loop_time / full_time:.1f}x (whole run_sweep); "
          f"max |Δ mean Δlog p| between the two over all cells: {worst:.2e}; "
          f"load average now {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
