"""How close SmolLM2 training and decoding come to this machine's own matmul peak.

1. **Peak**: square ``torch.mm`` of a few sizes, best of ``--repeats`` each, 2·n³ FLOPs per product; the
   peak is the best rate over sizes (fp32 on a CPU, bf16 on a GPU; torch's default threads).
2. **Training**: optimiser steps of the demo recipe (``demo_step.DemoStep``: LoRA r16 on the MLP + the new
   token rows, batch 4 in the recipe's length-grouped order, the demo's real sequence lengths), one warm-up
   step, then ``--train-steps`` timed. FLOPs are counted on the real (unpadded) tokens, two ways:

   * **6N convention** (the usual MFU definition, as if every weight were trained): 6·N per token plus
     causal attention, 3 × 2·L·d_attn·T(T+1) per sequence of T tokens (forward QKᵀ and AV over the
     T(T+1)/2 causal pairs, ×3 for forward + backward);
   * **LoRA's required work**: 4·N per token (forward + input gradients; frozen weights need no weight
     gradient) + 6·N_lora + the same attention.

   N counts every weight that takes part in a matmul: the linear layers of all blocks and the LM head (the
   tied embedding once, as the head; the embedding lookup is free). A **full fine-tuning** step on the same
   batches (``mode=full``, where the 6N count is exact) is timed as well, unless ``--no-full``.
3. **Decoding**: ``model.generate`` greedy with a KV cache on ``B`` rows of ``--prompt-len`` tokens (bundled
   questions, cut to equal length so there is no padding), exactly ``--new-tokens`` tokens each (EOS is not
   allowed to end a row early), for B = 1, 16, 64. The prefill (``max_new_tokens=1``) is timed separately
   and subtracted; the remaining ``new_tokens - 1`` steps count 2·N + 4·L·d_attn·c FLOPs per row, c being the
   context length at that step.

Goals (#17): training ≥ 50% of the peak, decoding at batch 64 ≥ 40%. The script prints the shares and
whether each goal is met; nothing is rounded in our favour.

    .venv/bin/python benchmarks/machine_limit.py              # SmolLM2, CPU fp32
    .venv/bin/python benchmarks/machine_limit.py --quick      # tiny random model, small GEMMs, seconds
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="base model (default: the embedded SmolLM2-135M)")
    parser.add_argument("--sizes", default="512,1024,2048,3072", help="GEMM sizes n for the peak")
    parser.add_argument("--repeats", type=int, default=5, help="GEMM repeats per size (best counts)")
    parser.add_argument("--train-steps", type=int, default=4, help="timed demo training steps")
    parser.add_argument("--no-full", action="store_true", help="skip the full fine-tuning step")
    parser.add_argument("--batches", default="1,16,64", help="decode batch sizes")
    parser.add_argument("--prompt-len", type=int, default=32, help="decode prompt length (tokens)")
    parser.add_argument("--new-tokens", type=int, default=64, help="decode tokens per row")
    parser.add_argument("--decode-repeats", type=int, default=2, help="decode repeats per batch (best counts)")
    parser.add_argument("--quick", action="store_true", help="tiny random model, small sizes: a smoke run")
    args = parser.parse_args(argv)
    if args.quick:
        args.sizes, args.repeats, args.train_steps = "128,256", 2, 1
        args.batches, args.prompt_len, args.new_tokens, args.decode_repeats = "1,4", 8, 4, 1
    return args


# ---------------------------------------------------------------------------------------------------------
# The peak


def gemm_peak(device: str, dtype, sizes, repeats: int) -> list[tuple[int, float]]:
    """Best FLOP/s of an ``n × n`` by ``n × n`` product for each n: ``[(n, flop_per_s), ...]``."""
    import torch

    from demo_step import sync

    out = []
    for n in sizes:
        a = torch.randn(n, n, device=device, dtype=dtype)
        b = torch.randn(n, n, device=device, dtype=dtype)
        c = torch.empty(n, n, device=device, dtype=dtype)
        torch.mm(a, b, out=c)  # warm-up: thread pool, allocator, kernel choice
        best = float("inf")
        for _ in range(repeats):
            sync(device)
            start = time.perf_counter()
            torch.mm(a, b, out=c)
            sync(device)
            best = min(best, time.perf_counter() - start)
        out.append((n, 2 * n ** 3 / best))
    return out


# ---------------------------------------------------------------------------------------------------------
# FLOP counting


@dataclass(frozen=True)
class Shape:
    """What the FLOP count needs: N (matmul weights, LM head included, tied counted once), layers, d_attn."""

    n_matmul: int
    layers: int
    d_attn: int


def model_shape(model) -> Shape:
    """Count the matmul weights of a plain (not yet PEFT-wrapped) causal LM."""
    import torch

    seen, total = set(), 0
    for module in model.modules():
        if isinstance(module, torch.nn.Linear) and id(module.weight) not in seen:
            seen.add(id(module.weight))
            total += module.weight.numel()
    config = model.config
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return Shape(total, config.num_hidden_layers, config.num_attention_heads * head_dim)


def lora_params(peft_model) -> int:
    """Weights of the LoRA matrices (``lora_A`` / ``lora_B``) in a PEFT model."""
    return sum(p.numel() for name, p in peft_model.named_parameters() if "lora_" in name)


def attention_forward_flops(shape: Shape, length: int) -> int:
    """Causal attention of one sequence, forward: QKᵀ and AV over its T(T+1)/2 pairs, every layer."""
    return 2 * shape.layers * shape.d_attn * length * (length + 1)


def train_flops(shape: Shape, lengths, n_lora: int = 0, convention: str = "6N") -> int:
    """FLOPs of one training step over sequences of the given real lengths.

    ``6N``: 6·N per token (every weight trained); ``lora``: 4·N + 6·N_lora per token. Attention ×3 either way.
    """
    per_token = 6 * shape.n_matmul if convention == "6N" else 4 * shape.n_matmul + 6 * n_lora
    return sum(per_token * t + 3 * attention_forward_flops(shape, t) for t in lengths)


def decode_flops(shape: Shape, batch: int, prompt_len: int, new_tokens: int) -> int:
    """FLOPs of the decode steps after the prefill: tokens 2..new_tokens of each row."""
    return batch * sum(2 * shape.n_matmul + 4 * shape.layers * shape.d_attn * (prompt_len + g)
                       for g in range(1, new_tokens))


# ---------------------------------------------------------------------------------------------------------
# Measurements


def equal_length_prompts(tokenizer, batch: int, length: int):
    """``[batch, length]`` token ids cut from the bundled questions (no padding anywhere)."""
    import torch

    from memreason.data import load_traces

    traces, _ = load_traces("bundled:strategyqa")
    ids = tokenizer("\n".join(f"Question: {t.question}" for t in traces), add_special_tokens=False)["input_ids"]
    while len(ids) < batch * length:
        ids = ids + ids
    return torch.tensor(ids[:batch * length]).view(batch, length)


def measure_decode(model, tokenizer, shape: Shape, batch: int, prompt_len: int, new_tokens: int,
                   repeats: int) -> dict:
    """Greedy KV-cached decoding of exactly ``new_tokens`` per row, best of ``repeats``.

    A stopping criterion that never stops timestamps every step; the clock runs from the first token
    (which the prefill forward produces) to the last, so ``decode_s`` covers the ``new_tokens - 1`` decode
    steps alone and ``prefill_s`` the rest.
    """
    import torch
    from transformers import StoppingCriteria, StoppingCriteriaList

    from demo_step import sync

    class Clock(StoppingCriteria):
        def __init__(self):
            self.times = []

        def __call__(self, input_ids, scores, **kwargs):
            sync(input_ids.device)
            self.times.append(time.perf_counter())
            return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)

    device = next(model.parameters()).device
    ids = equal_length_prompts(tokenizer, batch, prompt_len).to(device)
    mask = torch.ones_like(ids)
    model.eval()
    best = None
    for attempt in range(repeats + 1):  # the first is a warm-up
        clock = Clock()
        sync(device)
        start = time.perf_counter()
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens,
                                 min_new_tokens=new_tokens, do_sample=False, temperature=None, top_p=None,
                                 top_k=None, pad_token_id=tokenizer.pad_token_id or 0,
                                 stopping_criteria=StoppingCriteriaList([clock]))
        if out.shape[1] != prompt_len + new_tokens or len(clock.times) != new_tokens:
            raise RuntimeError(f"generate made {out.shape[1] - prompt_len} tokens, {len(clock.times)} steps; "
                               f"expected {new_tokens}")
        run = (clock.times[0] - start, clock.times[-1] - clock.times[0])
        if attempt and (best is None or run[1] < best[1]):
            best = run
    prefill, decode = best
    flops = decode_flops(shape, batch, prompt_len, new_tokens)
    return {"batch": batch, "prefill_s": prefill, "decode_s": decode, "flops": flops, "flop_s": flops / decode,
            "tokens_s": batch * (new_tokens - 1) / decode}


def measure_training(model, tokenizer, shape: Shape, run_dir: Path, steps: int, mode_override=(),
                     examples: int | None = None, amp=None) -> dict:
    """Time ``steps`` demo-recipe steps after one warm-up: seconds, FLOPs both ways, padding."""
    from demo_step import DemoStep

    step = DemoStep(model, tokenizer, run_dir=run_dir, overrides=mode_override, examples=examples, amp=amp)
    n_lora = lora_params(step.model)
    timed = step.timed_steps(steps, warmup=1)
    seconds = sum(t for t, _ in timed)
    lengths = [int(n) for _, batch in timed for n in batch["attention_mask"].sum(dim=1).tolist()]
    padded = sum(batch["input_ids"].numel() for _, batch in timed)
    return {"mode": step.mode, "seconds": seconds, "steps": steps, "lengths": lengths, "tokens": sum(lengths),
            "padded": padded, "flops_6n": train_flops(shape, lengths, convention="6N"),
            "flops_lora": train_flops(shape, lengths, n_lora, convention="lora"), "n_lora": n_lora,
            "step_s": [round(t, 2) for t, _ in timed]}


def _load(model_arg, quick: bool, device: str, dtype):
    from demo_step import tiny_smollm2_dir
    from memreason.model import load

    if quick:
        model_arg = str(tiny_smollm2_dir(Path(tempfile.gettempdir()) / "memreason-bench-tiny"))
    return load(model_arg, dtype=dtype, device=device)


def report_lines(peak: float, train: list[dict], decode: list[dict], unit: str = "GFLOP/s") -> list[str]:
    """The markdown table of the results (what goes into RESULTS.md)."""
    scale = 1e9 if unit == "GFLOP/s" else 1e12
    lines = [f"| measurement | FLOPs counted | achieved {unit} | share of peak | goal |", "|---|---|---|---|---|",
             f"| matmul peak (square GEMM, best size) | 2n³ | {peak / scale:.1f} | 100% | |"]
    for r in train:
        goal = "≥ 50%"
        label = f"train step, demo recipe ({r['mode']}), {r['steps']} steps, {r['tokens']} tokens"
        rate = r["flops_6n"] / r["seconds"]
        met = "met" if rate / peak >= 0.5 else "not met"
        lines.append(f"| {label} | 6N + attention | {rate / scale:.1f} | {rate / peak:.1%} | {goal}: {met} |")
        if r["mode"] != "full":
            rate = r["flops_lora"] / r["seconds"]
            lines.append(f"| {label} | 4N + 6N_lora + attention (work LoRA needs) | {rate / scale:.1f} | "
                         f"{rate / peak:.1%} | |")
    for d in decode:
        goal = ("≥ 40%: " + ("met" if d["flop_s"] / peak >= 0.4 else "not met")) if d["batch"] == 64 else ""
        lines.append(f"| greedy decode, batch {d['batch']} ({d['tokens_s']:.1f} tok/s) | 2N + attention | "
                     f"{d['flop_s'] / scale:.1f} | {d['flop_s'] / peak:.1%} | {goal} |")
    return lines


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    from demo_step import machine_line

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    print(machine_line(device))
    sizes = [int(s) for s in args.sizes.split(",")]
    gemms = gemm_peak(device, dtype, sizes, args.repeats)
    print(f"GEMM {str(dtype).replace('torch.', '')} (best of {args.repeats}): "
          + ", ".join(f"n={n}: {rate / 1e9:.1f} GFLOP/s" for n, rate in gemms), flush=True)

    examples = 16 if args.quick else None
    train, decode = [], []
    with tempfile.TemporaryDirectory(prefix="memreason-limit-") as tmp:
        model, tokenizer = _load(args.model, args.quick, device, dtype)
        shape = model_shape(model)
        print(f"model: N = {shape.n_matmul / 1e6:.1f} M matmul weights (LM head included), {shape.layers} layers, "
              f"d_attn {shape.d_attn}")
        for batch in (int(b) for b in args.batches.split(",")):
            d = measure_decode(model, tokenizer, shape, batch, args.prompt_len, args.new_tokens, args.decode_repeats)
            decode.append(d)
            print(f"decode batch {batch}: prefill {d['prefill_s']:.2f} s, {args.new_tokens - 1} steps "
                  f"{d['decode_s']:.2f} s, {d['tokens_s']:.1f} tok/s, {d['flop_s'] / 1e9:.1f} GFLOP/s", flush=True)
        for override in [()] + ([] if args.no_full else [("mode=full",)]):
            amp = None
            if override:  # full fine-tuning keeps fp32 master weights (bf16 autocast on a GPU), as the recipe
                model, tokenizer = _load(args.model, args.quick, device, torch.float32)
                amp = torch.bfloat16 if device == "cuda" else None
            r = measure_training(model, tokenizer, shape, Path(tmp) / (override[0] if override else "demo"),
                                 args.train_steps, override, examples, amp)
            train.append(r)
            print(f"train ({r['mode']}): {r['steps']} steps {r['seconds']:.1f} s (per step {r['step_s']}), "
                  f"{r['tokens']} real tokens in {r['padded']} padded, "
                  f"{r['flops_6n'] / r['seconds'] / 1e9:.1f} GFLOP/s (6N)", flush=True)
            del model
    # the peak again at the end: on a machine whose load drifts, the better of the two is the machine's
    again = gemm_peak(device, dtype, sizes, args.repeats)
    peak = max(rate for _, rate in gemms + again)
    print(f"\npeak: {peak / 1e9:.1f} GFLOP/s (best of the GEMMs before, {max(r for _, r in gemms) / 1e9:.1f}, and "
          f"after, {max(r for _, r in again) / 1e9:.1f}); sequence lengths of the timed demo batches: median "
          f"{statistics.median(train[0]['lengths'])}, max {max(train[0]['lengths'])}; decode prompts "
          f"{args.prompt_len} tokens + {args.new_tokens} new")
    lines = report_lines(peak, train, decode)
    for line in lines:
        print(line)
    if any(r["flops_6n"] / r["seconds"] > peak for r in train) or any(d["flop_s"] > peak for d in decode):
        print("WARNING: a share above 100% means the peak was measured low (machine load, or GEMMs too small "
              "for this machine: try larger --sizes); these shares are not meaningful")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
