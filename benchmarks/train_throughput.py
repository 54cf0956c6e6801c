"""Training throughput: our recipe's batching vs the original's, same model, data and process.

Both arms train SmolLM2-135M (LoRA r=16 on the MLP + the 15 new token rows, the paper's lora+tokens mode)
on the same bundled StrategyQA-style examples in the paper's target format, for the same number of
optimiser steps with the same effective batch of 16 examples and the same learning rate:

- official-style: batch size 1, gradient accumulation 16, every example padded to the maximum length
  (the issue's baseline; ``--official-padding none`` feeds each example unpadded, which is what the
  original's collator does at batch size 1, spec disentangle.md §4.3/§10.3);
- ours: length-grouped batches of 8 padded only to their longest row, gradient accumulation 2, and the
  exact sparse forward for the new token rows (``memreason.train``: ``data.LengthGroupedSampler``,
  ``trainer.RecipeTrainer``, ``sparse_tokens``; ``--peft-token-path`` leaves PEFT's rebuild in).

Throughput counts target tokens (the tokens the loss is computed on) per second of training. Quality is
checked on the same held-out examples afterwards: the two arms should reach about the same loss ("equal
loss"), since they see the same number of examples with the same effective batch. Peak memory is the
process's peak resident set (CPU; reset between arms through /proc/self/clear_refs) or the peak CUDA
allocation (GPU).

    .venv/bin/python benchmarks/train_throughput.py                # 64 examples = 4 optimiser steps per arm, 3 repeats
    .venv/bin/python benchmarks/train_throughput.py --batch-size 16 --repeats 5
    .venv/bin/python benchmarks/train_throughput.py --official-padding none   # bs 1 without padding
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path


def _status_mb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _peak_reset(device: str) -> float:
    """Start a peak-memory measurement; returns the memory in use now (MB)."""
    import gc

    import torch

    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated() / 2**20
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)  # hand freed memory back, so RSS is what is live
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM (peak RSS) to the current RSS, Linux >= 4.0
    except OSError:
        pass
    return _status_mb("VmRSS")


def _peak_mb(device: str) -> float:
    import torch

    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return _status_mb("VmHWM")


def _held_out_loss(model, rows, collator, device) -> float:
    import torch

    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(rows), 8):
            batch = {k: v.to(device) for k, v in collator(rows[start:start + 8]).items()}
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            shift = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(),
                                                      batch["labels"][:, 1:].flatten(), reduction="sum",
                                                      ignore_index=-100)
            total += shift.item()
            count += int((batch["labels"][:, 1:] != -100).sum())
    return total / count


def run_arm(name, base_state, make_model, train_rows, eval_rows, *, batch_size, grad_accum, pad_to, group,
            sparse, lr, seed, device, out_dir):
    """Train one arm from the same initial weights; return its measurements."""
    import torch
    from transformers import TrainingArguments, set_seed

    from memreason.train import ListDataset, PadCollator
    from memreason.train.trainer import RecipeTrainer

    set_seed(seed)
    model = make_model()
    model.load_state_dict(base_state)  # identical starting point for both arms
    if sparse:  # what the recipe does after wrapping: train.sparse_tokens (exact, tested against PEFT's path)
        from memreason.train.sparse_tokens import sparse_token_rows

        sparse_token_rows(model)
    collator = PadCollator(make_model.pad_id, pad_to=pad_to)
    args = TrainingArguments(
        output_dir=str(out_dir / name), per_device_train_batch_size=batch_size,
        gradient_accumulation_steps=grad_accum, learning_rate=lr, num_train_epochs=1, lr_scheduler_type="constant",
        warmup_steps=0, max_grad_norm=1.0, eval_strategy="no", save_strategy="no", logging_steps=1,
        report_to="none", disable_tqdm=True, remove_unused_columns=False, seed=seed, use_cpu=device == "cpu",
        bf16=device == "cuda", dataloader_pin_memory=False)
    trainer = RecipeTrainer(model=model, args=args, train_dataset=ListDataset(train_rows), data_collator=collator,
                            sampler_seed=seed, group_by_length=group)
    start_mb = _peak_reset(device)
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    trainer.train()
    if device == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    peak = _peak_mb(device) - start_mb  # memory this arm's training added on top of what was loaded
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    target_tokens = sum(sum(label != -100 for label in row["labels"]) for row in train_rows)
    padded_tokens = sum(collator([row])["input_ids"].numel() for row in train_rows) if pad_to else None
    held_out = _held_out_loss(model, eval_rows, PadCollator(make_model.pad_id), device)
    return {"name": name, "seconds": seconds, "target_tokens": target_tokens, "tps": target_tokens / seconds,
            "steps": trainer.state.global_step, "train_loss": sum(losses) / len(losses), "held_out_loss": held_out,
            "peak_mb": peak, "padded_tokens": padded_tokens}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="base model (default: the embedded SmolLM2-135M)")
    parser.add_argument("--examples", type=int, default=64, help="training examples per arm (16 per optimiser step)")
    parser.add_argument("--eval-examples", type=int, default=24)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--repeats", type=int, default=3, help="runs per arm, alternating order; medians reported")
    parser.add_argument("--batch-size", type=int, default=8, help="our per-step batch (accumulation fills up to 16)")
    parser.add_argument("--order", choices=["official-first", "ours-first"], default="official-first")
    parser.add_argument("--official-padding", choices=["max", "none"], default="max",
                        help="pad the official-style rows to the longest example (max, the issue's baseline) or "
                             "not at all (none: what the original's collator does at batch size 1)")
    parser.add_argument("--out", default="/tmp/memreason-train-throughput")
    parser.add_argument("--peft-token-path", action="store_true",
                        help="ours without the sparse token-row forward (PEFT's rebuild, as before)")
    args = parser.parse_args()

    import torch

    from memreason.data import load_traces
    from memreason.model import load
    from memreason.model.tokens import TokenScheme, add_scheme_tokens, format_target
    from memreason.prompts import render_prompt
    from memreason.tasks import get_task
    from memreason.train import prepare_example, wrap_model

    if args.threads:
        torch.set_num_threads(args.threads)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    scheme, task = TokenScheme(), get_task("strategyqa")
    base, tokenizer = load(args.model, dtype="float32", device=device)
    ids = add_scheme_tokens(base, tokenizer, scheme)

    traces, _ = load_traces("bundled:strategyqa", split="train")
    rows = [prepare_example(tokenizer, render_prompt(t.question, task, tokenizer, "plain"),
                            format_target(t, scheme), 4096) for t in traces]
    need = args.examples + args.eval_examples
    if len(rows) < need:
        raise SystemExit(f"only {len(rows)} examples available; lower --examples/--eval-examples")
    train_rows, eval_rows = rows[:args.examples], rows[args.examples:need]
    max_len = max(len(r["input_ids"]) for r in train_rows)

    def make_model():
        import copy

        return wrap_model(copy.deepcopy(base), "lora+tokens", ids, 16, 16, 0.05, "mlp")

    make_model.pad_id = tokenizer.pad_token_id
    torch.manual_seed(0)
    initial = make_model().state_dict()

    padded = args.official_padding == "max"
    arms = {
        f"official-style (bs 1 x accum 16, {'padded to max length' if padded else 'unpadded'})":
            dict(batch_size=1, grad_accum=16, pad_to=max_len if padded else None, group=False, sparse=False),
        f"memreason (length-grouped bs {args.batch_size} x accum {16 // args.batch_size})":
            dict(batch_size=args.batch_size, grad_accum=16 // args.batch_size, pad_to=None, group=True,
                 sparse=not args.peft_token_path),
    }
    if 16 % args.batch_size:
        raise SystemExit("--batch-size must divide 16 (the effective batch of both arms)")
    names = list(arms) if args.order == "official-first" else list(arms)[::-1]
    runs: dict[str, list[dict]] = {name: [] for name in arms}
    for repeat in range(args.repeats):
        # alternate the order: on a shared machine, load changes over minutes
        for name in (names if repeat % 2 == 0 else names[::-1]):
            r = run_arm(name, initial, make_model, train_rows, eval_rows, lr=args.lr, seed=0,
                        device=device, out_dir=Path(args.out), **arms[name])
            runs[name].append(r)
            print(f"[{repeat + 1}/{args.repeats}] {name}: {r['steps']} steps, {r['seconds']:.1f} s, "
                  f"{r['tps']:.1f} target tok/s, train loss {r['train_loss']:.4f}, held-out loss "
                  f"{r['held_out_loss']:.4f}, peak +{r['peak_mb']:.0f} MB", flush=True)

    def median(rows):  # the run with the median throughput stands for the arm
        return sorted(rows, key=lambda r: r["tps"])[len(rows) // 2]

    official, ours = (median(runs[n]) for n in arms)
    print(f"\nmodel {args.model or 'SmolLM2-135M-Instruct'} on {device} ({torch.get_num_threads()} threads), "
          f"{args.examples} examples, {official['target_tokens']} target tokens, max length {max_len}")
    all_ours = ", ".join(f"{r['tps']:.1f}" for r in runs[list(arms)[1]])
    all_official = ", ".join(f"{r['tps']:.1f}" for r in runs[list(arms)[0]])
    print(f"throughput ratio (ours / official-style, medians of {args.repeats}): {ours['tps'] / official['tps']:.2f}x "
          f"(all runs, target tok/s: ours {all_ours}; official-style {all_official})")
    print(f"held-out loss: ours {ours['held_out_loss']:.4f} vs official-style {official['held_out_loss']:.4f} "
          f"(difference {ours['held_out_loss'] - official['held_out_loss']:+.4f})")
    print(f"peak memory added by training: ours {ours['peak_mb']:.0f} MB vs official-style {official['peak_mb']:.0f} MB"
          f" ({'CUDA allocated' if device == 'cuda' else 'peak RSS above the RSS at the start of the arm'})")
    if official["padded_tokens"]:
        print(f"official-style padding: {official['padded_tokens']} tokens fed for "
              f"{sum(len(r['input_ids']) for r in train_rows)} real ones "
              f"({1 - sum(len(r['input_ids']) for r in train_rows) / official['padded_tokens']:.0%} padding)")
    if not math.isfinite(ours["held_out_loss"]):
        raise SystemExit("ours diverged")


if __name__ == "__main__":
    main()
