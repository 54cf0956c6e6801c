"""How cost grows, for planning a larger run: evaluation q/s against batch size, sweep time against grid size.

Left panel: ``memreason.evaluate.evaluate`` (the ``memreason eval`` loop: generation stopped at the answer
line, parsing, scoring, JSONL rows) on the same ``--n`` bundled questions at each batch size, on one model;
the baseline is batch size 1 and every other batch size is printed as its ratio to it.

Right panel: ``measure_grid`` (the batched, resumed injection sweep behind ``memreason inject sweep``,
curated memory, no controls) on growing grids of prompts × layers × taus, timed; the baseline, the
one-cell-one-prompt loop like the original (``injection_sweep.loop_like_the_original``, two batch-1 forwards
per cell-prompt), is timed on the smallest grid only and drawn as the straight line it is (its cost is
linear in cells by construction: dashed, labelled as extrapolated). A user reads off the cost of a grid:
seconds ≈ the curve at (prompts × layers × taus); each control condition adds about as much again as the
curated memory (one more row per cell-prompt).

Writes ``benchmarks/scaling.png`` (``--out``) with matplotlib's object API (``Figure`` + ``FigureCanvasAgg``:
no pyplot, no backend switch) and prints the measured points.

    .venv/bin/python benchmarks/scaling.py                          # base SmolLM2, 1-shot prompts
    .venv/bin/python benchmarks/scaling.py --model runs/demo/run    # the trained demo run
    .venv/bin/python benchmarks/scaling.py --quick --out /tmp/scaling.png
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

DEFAULT_GRIDS = "8x2x2,8x4x4,16x4x4,16x10x4,32x10x4"


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="run dir or model for the evaluation panel "
                                                      "(default: embedded SmolLM2, 1-shot)")
    parser.add_argument("--n", type=int, default=32, help="questions evaluated at every batch size")
    parser.add_argument("--batch-sizes", default="1,2,4,8,16,32")
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--grids", default=DEFAULT_GRIDS,
                        help="sweep grids as PROMPTSxLAYERSxTAUS, comma separated (layers evenly spaced)")
    parser.add_argument("--out", default=str(Path(__file__).with_name("scaling.png")))
    parser.add_argument("--quick", action="store_true", help="tiny random model, small sizes: a smoke run")
    args = parser.parse_args(argv)
    if args.quick:
        args.n, args.batch_sizes, args.max_new_tokens, args.grids = 4, "1,4", 8, "4x1x1,4x2x2"
    return args


def eval_curve(mr, questions, examples, batch_sizes, max_new_tokens, tmp: Path) -> list[tuple[int, float]]:
    """q/s of ``evaluate`` at each batch size on the same questions: ``[(batch, q_per_s), ...]``."""
    from memreason.evaluate import EvalSettings, evaluate

    from demo_step import sync

    settings = EvalSettings(model=mr.name, task=mr.task.name, source="bundled:strategyqa", split=None,
                            prompt_style=mr.prompt_style, scheme=mr.scheme.to_dict(), max_new_tokens=max_new_tokens)
    points = []
    evaluate(mr.model, mr.tokenizer, questions[:2], mr.task, settings, tmp / "warmup", batch_size=2,
             overwrite=True, examples=examples)  # untimed: the one-time newline-token table
    for batch in batch_sizes:
        sync(mr.model.device)
        start = time.perf_counter()
        evaluate(mr.model, mr.tokenizer, questions, mr.task, settings, tmp / f"bs{batch}", batch_size=batch,
                 overwrite=True, examples=examples)
        sync(mr.model.device)
        points.append((batch, len(questions) / (time.perf_counter() - start)))
        print(f"eval batch {batch}: {points[-1][1]:.3f} q/s", flush=True)
    return points


def parse_grids(text: str) -> list[tuple[int, int, int]]:
    return [tuple(int(x) for x in g.split("x")) for g in text.split(",")]  # type: ignore[misc]


def spaced_layers(n_layers: int, k: int) -> tuple[int, ...]:
    """``k`` layers spread evenly over ``0 .. n_layers - 1`` (3, 9, 15, 21 style for k=4 of 30)."""
    step = n_layers / k
    return tuple(sorted({int(step * i + step / 2) for i in range(k)}))


def sweep_curve(model, tokenizer, grids, taus_all=(0.05, 0.1, 0.2, 0.4)):
    """Seconds of ``measure_grid`` per grid, and the loop's seconds per cell-prompt on the first grid."""
    from injection_sweep import loop_like_the_original
    from memreason.data.two_hop import load_prompts
    from memreason.experiments.injection_grid import measure_grid
    from memreason.experiments.injection_sweep import SweepConfig
    from memreason.interventions.memory_injection import residual_norms

    items_all = load_prompts()
    points = []
    loop_rate = None
    for prompts, n_layers, n_taus in grids:
        items = items_all[:prompts]
        layers = spaced_layers(model.config.num_hidden_layers, n_layers)
        taus = tuple(taus_all[:n_taus]) if n_taus <= len(taus_all) else tuple(0.05 * (i + 1) for i in range(n_taus))
        config = SweepConfig(layers=layers, taus=taus, controls=(), batch_size=64, n_bootstrap=100)
        cells = len(items) * len(layers) * len(taus)
        if loop_rate is None:  # the baseline, on the smallest grid only
            norms = residual_norms(model, tokenizer, config.neutral_prompts)
            start = time.perf_counter()
            loop_like_the_original(model, tokenizer, items, layers, taus, norms)
            loop_rate = (time.perf_counter() - start) / cells
            print(f"loop like the original on {cells} cell-prompts: {loop_rate * cells:.1f} s", flush=True)
        start = time.perf_counter()
        measure_grid(model, tokenizer, items, config)
        seconds = time.perf_counter() - start
        points.append((cells, seconds))
        print(f"sweep {prompts} prompts x {len(layers)} layers x {len(taus)} taus = {cells} cell-prompts: "
              f"{seconds:.1f} s (loop, extrapolated: {loop_rate * cells:.1f} s, {loop_rate * cells / seconds:.1f}x)",
              flush=True)
    return points, loop_rate


def draw(path: Path, eval_points, sweep_points, loop_rate: float, title: str) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 4.4))
    FigureCanvasAgg(fig)
    left, right = fig.subplots(1, 2)
    batches, rates = zip(*eval_points)
    left.plot(batches, rates, "o-", color="tab:blue", label="memreason eval")
    left.axhline(rates[0], color="tab:gray", linestyle=":", label="batch 1 (baseline)")
    left.set_ylim(bottom=0)
    left.set_xscale("log", base=2)
    left.set_xticks(batches, [str(b) for b in batches])
    left.set_xlabel("batch size")
    left.set_ylabel("questions / s")
    left.set_title("evaluation throughput")
    left.legend(fontsize=8)
    cells, seconds = zip(*sweep_points)
    right.plot(cells, seconds, "o-", color="tab:green", label="memreason sweep (measure_grid)")
    right.plot(cells, [loop_rate * c for c in cells], "--", color="tab:red",
               label=f"loop like the original\n(measured at {cells[0]}, linear)")
    right.set_xscale("log")
    right.set_yscale("log")
    right.set_xlabel("cell-prompts (prompts x layers x taus)")
    right.set_ylabel("seconds")
    right.set_title("injection sweep time")
    right.legend(fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    from demo_step import machine_line, tiny_smollm2_dir
    from eval_throughput import benchmark_prompts
    from eval_vs_lm_eval import load_reasoner
    from memreason.model import load

    tiny = str(tiny_smollm2_dir(Path(tempfile.gettempdir()) / "memreason-bench-tiny")) if args.quick else None
    mr, trained = load_reasoner(tiny or args.model)
    questions, _, examples = benchmark_prompts(mr, args.n, 0 if trained else 1)
    device = str(mr.model.device)
    line = machine_line(device)
    print(line)
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    with tempfile.TemporaryDirectory(prefix="memreason-scaling-") as tmp:
        eval_points = eval_curve(mr, questions, examples, batch_sizes, args.max_new_tokens, Path(tmp))
    del mr
    model, tokenizer = load(tiny or None, dtype="float32", device="cuda" if torch.cuda.is_available() else "cpu")
    sweep_points, loop_rate = sweep_curve(model, tokenizer, parse_grids(args.grids))
    name = Path(args.model).name if args.model else "SmolLM2-135M base"
    title = (f"{'tiny random model (--quick)' if args.quick else name}: eval on {args.n} bundled questions; "
             f"sweep on SmolLM2{' (tiny)' if args.quick else ''}, bundled two-hop prompts\n{line}")
    draw(Path(args.out), eval_points, sweep_points, loop_rate, title)
    print(f"\nwrote {args.out}")
    print("| eval batch size | q/s | vs batch 1 |\n|---|---|---|")
    for batch, rate in eval_points:
        print(f"| {batch} | {rate:.3f} | {rate / eval_points[0][1]:.2f}x |")
    print("| sweep cell-prompts | seconds | cell-prompts/s | loop (extrapolated) / sweep |\n|---|---|---|---|")
    for cells, seconds in sweep_points:
        print(f"| {cells} | {seconds:.1f} | {cells / seconds:.1f} | {loop_rate * cells / seconds:.1f}x |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
