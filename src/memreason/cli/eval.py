"""``memreason eval``: batched, resumable evaluation of a trained run or a base model on a dataset."""

from __future__ import annotations

import argparse
from pathlib import Path

from memreason.cli.data import add_dataset_options


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "eval", help="evaluate a trained run or a base model on a dataset", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n  memreason eval --model runs/demo --data bundled:strategyqa --split test --out results/demo\n"
               "  memreason eval --data bundled:truthfulqa --split test --shots 1 --out results/base-tqa\n"
               "  memreason eval --model meta-llama/Llama-3.1-8B-Instruct --data StrategyQA_test.json "
               "--task strategyqa --batch-size 64 --out results/llama\n"
               "re-running the same command resumes: finished questions are skipped.")
    parser.add_argument("--model", default=None, help="a run directory from `memreason train`, a model dir, "
                        "a .gguf file or a hub id (default: the embedded SmolLM2, untrained)")
    parser.add_argument("--data", default="bundled:strategyqa", help="dataset source (default: bundled:strategyqa)")
    add_dataset_options(parser)
    parser.add_argument("--out", required=True, help="output directory (results.jsonl, summary.json)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--samples", type=int, default=1, help="k sampled answers with majority vote (default 1: greedy)")
    parser.add_argument("--temperature", type=float, default=0.7, help="only with --samples > 1")
    parser.add_argument("--top-p", type=float, default=0.95, help="only with --samples > 1")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--limit", type=int, default=None, help="evaluate only the first N questions")
    parser.add_argument("--shots", type=int, default=0,
                        help="worked examples from the train split shown in every prompt (for untrained models)")
    parser.add_argument("--prompt-style", choices=["auto", "plain", "chat"], default=None,
                        help="default: the run's own style; auto (chat template if any) for base models")
    parser.add_argument("--overwrite", action="store_true", help="discard results already in --out")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto")
    parser.set_defaults(func=run, split="test")


def run_eval(args, progress_desc: str = "eval"):
    """Shared by `eval` and `demo`: returns (summary, out_dir)."""
    import random

    from tqdm import tqdm

    import memreason
    from memreason.data import load_traces
    from memreason.errors import ConfigError
    from memreason.evaluate import EvalSettings, evaluate
    from memreason.prompts import resolve_style

    reasoner = memreason.load(args.model, task=args.task, dtype=args.dtype, device=args.device,
                              max_new_tokens=args.max_new_tokens)
    task = reasoner.task
    traces, _ = load_traces(args.data, task=task, split=args.split, on_unknown_tag=args.on_unknown_tag,
                            skip_invalid=args.skip_invalid)
    if args.limit is not None:
        traces = traces[:args.limit]
    if not traces:
        raise ConfigError(f"no questions in {args.data} (split {args.split})")
    examples = []
    if args.shots:
        pool, _ = load_traces(args.data, task=task, split="train", on_unknown_tag="drop", skip_invalid=True)
        pool = [t for t in pool if t.steps]
        if len(pool) < args.shots:
            raise ConfigError(f"--shots {args.shots} needs that many train-split examples with steps in {args.data}")
        examples = random.Random(args.seed).sample(pool, args.shots)
    style = resolve_style(args.prompt_style or reasoner.prompt_style, reasoner.tokenizer)
    settings = EvalSettings(model=reasoner.name, task=task.name, source=args.data, split=args.split,
                            prompt_style=style, scheme=reasoner.scheme.to_dict(), max_new_tokens=args.max_new_tokens,
                            samples=args.samples, temperature=args.temperature, top_p=args.top_p, seed=args.seed,
                            extra={"shots": [t.id for t in examples], "limit": args.limit})
    with tqdm(total=len(traces), desc=progress_desc, unit="q") as bar:
        summary = evaluate(reasoner.model, reasoner.tokenizer, traces, task, settings, args.out,
                           batch_size=args.batch_size, overwrite=args.overwrite, examples=examples,
                           progress=bar.update)
    return summary, Path(args.out)


def run(args) -> int:
    from memreason.cli._render import SUMMARY_HEADERS, format_table, summary_row

    summary, out = run_eval(args)
    print(format_table(SUMMARY_HEADERS, [summary_row(summary["config"]["model"], summary)]))
    print(f"results: {out / 'results.jsonl'}\nsummary: {out / 'summary.json'}")
    return 0
