"""``memreason eval``: batched, resumable evaluation of a trained run or a base model on a dataset."""

from __future__ import annotations

import argparse

from memreason.cli._settings import add_settings_arguments, settings_from_args

FLAGS = ("model", "data", "task", "split", "out", "batch_size", "max_new_tokens", "samples", "temperature", "top_p",
         "seed", "limit", "shots", "prompt_style", "overwrite", "device", "dtype", "skip_invalid", "on_unknown_tag", "compound_tag", "columns")
HELP = {
    "model": "a run directory from `memreason train`, a model dir, a .gguf file or a hub id "
             "(none: the embedded SmolLM2, untrained)",
    "data": "dataset source: bundled:<name>, a .json/.jsonl file or hf:<id or dir>",
    "task": "strategyqa, commonsenseqa, truthfulqa, mmlu or freeform (default: the run's or the data's own)",
    "out": "output directory (results.jsonl, summary.json); required",
    "samples": "k sampled answers with majority vote (1: greedy)",
    "temperature": "only with samples > 1", "top_p": "only with samples > 1",
    "limit": "evaluate only the first N questions",
    "shots": "worked examples from the train split shown in every prompt (for untrained models)",
    "prompt_style": "auto, plain or chat (none: the run's own style)",
    "overwrite": "discard results already in --out",
    "skip_invalid": "skip malformed records and report counts", "on_unknown_tag": "error or drop",
    "compound_tag": "how a compound step tag such as [reason] and [rag] is read: first, memory, reason or drop",
    "columns": "hub column mapping: a preset (commonsenseqa, strategyqa, truthfulqa-mc) or key=column pairs",
}


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "eval", help="evaluate a trained run or a base model on a dataset", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n  memreason eval --model runs/demo/run --data bundled:strategyqa --split test --out results/demo\n"
               "  memreason eval --data bundled:truthfulqa --split test --shots 1 --out results/base-tqa\n"
               "  memreason eval --config configs/eval/strategyqa.yaml --out results/x max_new_tokens=128\n"
               "  memreason eval --model meta-llama/Llama-3.1-8B-Instruct --data StrategyQA_test.json "
               "--task strategyqa --batch-size 64 --out results/llama\n"
               "re-running the same command resumes: finished questions are skipped.")
    add_settings_arguments(parser, _job_class(), FLAGS, HELP)
    parser.set_defaults(func=run)


def _job_class():
    from memreason.evaluate import EvalJob

    return EvalJob


def run(args) -> int:
    from pathlib import Path

    from tqdm import tqdm

    from memreason.cli._render import SUMMARY_HEADERS, format_table, summary_row
    from memreason.evaluate import RESULTS, SUMMARY, check_job, run_job

    job = settings_from_args(_job_class(), args, validate=check_job)
    bars = []  # the bar opens once the questions are loaded, so an early error is the only line printed

    def start(total: int) -> None:
        bars.append(tqdm(total=total, desc="eval", unit="q"))

    try:
        summary = run_job(job, progress=lambda n: bars[-1].update(n), on_start=start)
    finally:
        for bar in bars:
            bar.close()
    out = Path(job.out)
    print(format_table(SUMMARY_HEADERS, [summary_row(summary["config"]["model"], summary)]))
    print(f"results: {out / RESULTS}\nsummary: {out / SUMMARY}")
    return 0
