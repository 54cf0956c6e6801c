"""Decode tokens per second with attention rebalancing vs stock eager attention, same model, same prompts.

Rebalancing needs the attention probabilities, so its fair baseline is the stock eager path (SDPA is shown
for reference). Each condition runs the same greedy KV-cached decode loop (prefill untimed, then a fixed
number of single-token steps with no EOS stop, so every condition decodes exactly the same number of
tokens). Every condition runs on the same prompt batch back to back (a block, order rotated per block),
ratios are taken within blocks and their median is reported, for wall-clock time and for process CPU time
(on a shared CPU the latter is far less disturbed by other people's jobs; use --threads 1 with it).
Goal: rebalancing costs at most 30% of eager decode throughput.

    python benchmarks/rebalance_overhead.py                        # embedded SmolLM2, 4 prompts, 64 tokens
    python benchmarks/rebalance_overhead.py --batch-size 4 --new-tokens 128 --threads 2
    python benchmarks/rebalance_overhead.py --model ./Llama-3.1-8B-Instruct --device cuda --dtype bfloat16
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="model dir / .gguf / hub id (default: embedded SmolLM2)")
    parser.add_argument("--prompts", type=int, default=4, help="prompts from the bundled MMLU sample (default 4)")
    parser.add_argument("--batch-size", type=int, default=1, help="prompts decoded together (default 1)")
    parser.add_argument("--new-tokens", type=int, default=64, help="decode steps per prompt batch (default 64)")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved repeats per condition (default 3)")
    parser.add_argument("--modes", default="mask,random-mask", help="rebalance modes to time (default mask,random-mask)")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto")
    args = parser.parse_args()

    import torch
    from transformers import DynamicCache

    from memreason.data.mmlu import bundled_sample_path, load_mmlu, select_questions
    from memreason.experiments.rebalance_mmlu import build_prompt
    from memreason.generate import encode_prompts, left_pad, pad_id
    from memreason.interventions.attention_rebalance import rebalance
    from memreason.model import load

    if args.threads:
        torch.set_num_threads(args.threads)
    model, tokenizer = load(args.model, dtype=args.dtype, device=args.device)
    device = next(model.parameters()).device
    questions = select_questions(load_mmlu(bundled_sample_path()), args.prompts)
    prompts = encode_prompts(tokenizer, [build_prompt(q, "cot", "raw", tokenizer) for q in questions])
    batches = [prompts[i: i + args.batch_size] for i in range(0, len(prompts), args.batch_size)]
    pad = pad_id(tokenizer)
    stock = model.config._attn_implementation

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    def decode(batch, new_tokens):
        """Greedy decode; returns (wall seconds, process CPU seconds) of the decode steps, and the ids."""
        padded = left_pad(batch, pad, device)
        ids, mask, positions = padded["input_ids"], padded["attention_mask"], padded["position_ids"]
        cache = DynamicCache(config=model.config)
        with torch.inference_mode():
            out = model(input_ids=ids, attention_mask=mask, position_ids=positions, past_key_values=cache,
                        use_cache=True)
            token = out.logits[:, -1].argmax(-1, keepdim=True)
            generated = [token]
            sync()
            wall, cpu = time.perf_counter(), time.process_time()
            for _ in range(new_tokens - 1):
                mask = torch.cat([mask, torch.ones_like(token)], 1)
                positions = positions[:, -1:] + 1
                out = model(input_ids=token, attention_mask=mask, position_ids=positions, past_key_values=cache,
                            use_cache=True)
                token = out.logits[:, -1].argmax(-1, keepdim=True)
                generated.append(token)
            sync()
        return time.perf_counter() - wall, time.process_time() - cpu, torch.cat(generated, 1)

    @contextlib.contextmanager
    def implementation(name):
        model.set_attn_implementation(name)
        try:
            yield
        finally:
            model.set_attn_implementation(stock)

    conditions = {"eager": lambda: implementation("eager"), "sdpa": lambda: implementation("sdpa")}
    for mode in [m.strip() for m in args.modes.split(",") if m.strip()]:
        conditions[f"rebalance {mode}"] = lambda mode=mode: rebalance(model, alpha=0.2, mode=mode)

    # Sanity check before timing: at alpha = 0 the rebalanced loop must reproduce eager token for token.
    with implementation("eager"):
        eager_ids = decode(batches[0], 8)[2]
    with rebalance(model, alpha=0.0):
        zero_ids = decode(batches[0], 8)[2]
    if not torch.equal(eager_ids, zero_ids):
        sys.exit("alpha=0 rebalancing did not reproduce eager decoding; refusing to time a broken path")

    for name, context in conditions.items():  # warm-up
        with context():
            decode(batches[0], 4)
    names = list(conditions)
    # One block = every condition on the same prompt batch, back to back (order rotated per block), so the
    # conditions of a block share the machine's load; ratios are taken within blocks.
    wall_rate: dict[str, list[float]] = {name: [] for name in names}
    cpu_rate: dict[str, list[float]] = {name: [] for name in names}
    block = 0
    for _ in range(args.repeats):
        for batch in batches:
            order = names[block % len(names):] + names[: block % len(names)]
            block += 1
            for name in order:
                with conditions[name]():
                    wall, cpu, ids = decode(batch, args.new_tokens)
                tokens = ids.shape[0] * (args.new_tokens - 1)
                wall_rate[name].append(tokens / wall)
                cpu_rate[name].append(tokens / cpu)

    def ratio(rates, name):
        return statistics.median(r / e for r, e in zip(rates[name], rates["eager"]))

    print(f"model {model.config.name_or_path} ({model.config.num_hidden_layers} layers), {device}, "
          f"{next(model.parameters()).dtype}, threads {torch.get_num_threads()}; {len(prompts)} prompts "
          f"(mean {statistics.fmean(len(p) for p in prompts):.0f} tokens), batch {args.batch_size}, "
          f"{args.new_tokens} new tokens, {args.repeats} repeats = {block} blocks")
    print("decode tokens/s: median over blocks of wall-clock and of process-CPU-time rates; 'vs eager' is the median"
          " of within-block ratios")
    print(f"{'condition':<24}{'wall tok/s':>12}{'vs eager':>10}{'cpu tok/s':>12}{'vs eager':>10}{'overhead':>10}")
    for name in names:
        cpu_ratio = ratio(cpu_rate, name)
        print(f"{name:<24}{statistics.median(wall_rate[name]):>12.1f}{ratio(wall_rate, name):>10.3f}"
              f"{statistics.median(cpu_rate[name]):>12.1f}{cpu_ratio:>10.3f}{1 - cpu_ratio:>+10.1%}")
    rebalanced = [n for n in names if n.startswith("rebalance")]
    worst_wall = 1 - min(ratio(wall_rate, n) for n in rebalanced)
    worst_cpu = 1 - min(ratio(cpu_rate, n) for n in rebalanced)
    print(f"goal: rebalancing costs <= 30% of eager decode throughput -> worst overhead {worst_wall:+.1%} (wall), "
          f"{worst_cpu:+.1%} (CPU time): {'met' if max(worst_wall, worst_cpu) <= 0.30 else 'NOT met'}")


if __name__ == "__main__":
    main()
