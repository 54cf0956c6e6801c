"""Questions per second of memreason's evaluation loop vs an official-style loop, same model, same prompts.

memreason: prompts sorted by length, left-padded greedy batches, each row stopped at its answer line.
Official style (spec disentangle.md §6): batch size 1, greedy here (the original sampled), generation up
to max_length=700 total tokens with no stop at the answer line (EOS still stops it).

Both loops run in this process on the same questions; the script prints both rates, the ratio, and
whether the two give the same prediction on every question where both produced an answer.

    python benchmarks/eval_throughput.py                      # base SmolLM2, 64 bundled questions
    python benchmarks/eval_throughput.py --model runs/demo/run --n 64
"""

from __future__ import annotations

import argparse
import time


def benchmark_prompts(mr, n: int, shots: int):
    """The benchmark's questions and prompts: the first ``n`` bundled StrategyQA-style questions that are not
    among the ``shots`` worked examples (drawn with seed 0 from the train split; give base models 1, trained
    runs 0).

    Returns:
        (questions, prompts, shots): Traces, rendered prompt texts, the worked examples used.
    """
    import random

    from memreason.data import load_traces
    from memreason.prompts import render_prompt

    traces, _ = load_traces("bundled:strategyqa")
    pool = [t for t in traces if t.meta["split"] == "train"]
    examples = random.Random(0).sample(pool, shots) if shots else []
    questions = [t for t in traces if t not in examples][:n]
    prompts = [render_prompt(t.question, mr.task, mr.tokenizer, mr.prompt_style, examples=examples)
               for t in questions]
    return questions, prompts, examples


def official_style_loop(model, tokenizer, prompts, max_length: int, max_new_tokens: int | None = None) -> list[str]:
    """The official-style loop: one prompt at a time, greedy, up to ``max_length`` total tokens, no stop at
    the answer line (EOS still stops). Returns each generated continuation's text.

    ``max_new_tokens`` (instead of ``max_length``): cap the new tokens per prompt, for a batch-1 loop doing
    exactly the work of a batched one (random-weight models never write an answer line)."""
    import torch

    texts = []
    cap = {"max_new_tokens": max_new_tokens} if max_new_tokens else {"max_length": max_length}
    for prompt in prompts:
        ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False).to(model.device)
        with torch.no_grad():
            out = model.generate(**ids, **cap, do_sample=False, pad_token_id=tokenizer.pad_token_id)
        texts.append(tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True))
    return texts


def cut_at_answer(text: str) -> str:
    """``text`` up to and including its first complete answer line (what memreason's generation keeps);
    the whole text when no answer line is complete."""
    from memreason.tasks import ANSWER_MARKER

    position = text.find(ANSWER_MARKER)
    while position >= 0:
        start = position + len(ANSWER_MARKER)
        line, newline, _ = text[start:].partition("\n")
        if not newline:
            return text
        if line.strip():
            return text[:start + len(line) + 1]
        position = text.find(ANSWER_MARKER, start)
    return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="run dir or model (default: embedded SmolLM2)")
    parser.add_argument("--n", type=int, default=64, help="number of questions (default 64)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=256, help="memreason's cap per answer")
    parser.add_argument("--max-length", type=int, default=700, help="official-style total length cap")
    parser.add_argument("--shots", type=int, default=1, help="worked examples in the prompt (base models)")
    args = parser.parse_args()

    import torch

    import memreason
    from memreason.generate import generate_texts

    torch.manual_seed(0)
    mr = memreason.load(args.model, device="cpu" if not torch.cuda.is_available() else "auto")
    _, prompts, _ = benchmark_prompts(mr, args.n, args.shots if args.model is None else 0)

    start = time.perf_counter()
    ours = generate_texts(mr.model, mr.tokenizer, prompts, max_new_tokens=args.max_new_tokens,
                          batch_size=args.batch_size)
    ours_s = time.perf_counter() - start

    start = time.perf_counter()
    theirs = official_style_loop(mr.model, mr.tokenizer, prompts, args.max_length)
    theirs_s = time.perf_counter() - start

    ours_pred = [mr.task.extract(g.text) for g in ours]
    # the official loop scores the whole continuation; read the first answer line, as ours stops there
    theirs_pred = [mr.task.extract(cut_at_answer(t)) for t in theirs]
    both = [(a, b) for a, b in zip(ours_pred, theirs_pred) if a is not None and b is not None]
    agree = sum(a == b for a, b in both)
    n = len(prompts)
    print(f"model: {mr.name}; {n} questions; device {mr.model.device}; torch threads {torch.get_num_threads()}")
    print(f"memreason (batch {args.batch_size}, stop at answer): {n / ours_s:.3f} q/s "
          f"({ours_s:.1f} s, {sum(g.n_tokens for g in ours)} tokens generated)")
    print(f"official-style (batch 1, max_length {args.max_length}): {n / theirs_s:.3f} q/s ({theirs_s:.1f} s)")
    print(f"speed-up: {theirs_s / ours_s:.2f}x")
    print(f"same prediction where both answered: {agree}/{len(both)}")


if __name__ == "__main__":
    main()
