"""``memreason data check``: validate a dataset and show what it holds before you train or evaluate on it."""

from __future__ import annotations

import argparse
from collections import Counter


def add_dataset_options(parser: argparse.ArgumentParser) -> None:
    """The options every verb that reads a dataset shares."""
    parser.add_argument("--task", default=None, help="task whose answer space the answers must fit "
                        "(strategyqa, commonsenseqa, truthfulqa, freeform); bundled data knows its own")
    parser.add_argument("--split", default=None, help="keep only records of this split (e.g. train, test)")
    parser.add_argument("--skip-invalid", action="store_true",
                        help="skip malformed records and report counts instead of stopping at the first")
    parser.add_argument("--on-unknown-tag", choices=["error", "drop"], default="error",
                        help="what to do with a step whose tag is not a known memory/reason spelling")


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "data", help="validate and summarise a dataset", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n  memreason data check bundled:strategyqa\n"
               "  memreason data check StrategyQA_train_clean.json --task strategyqa --skip-invalid\n"
               "  memreason data check hf:./my_saved_dataset --split test --task commonsenseqa")
    actions = parser.add_subparsers(dest="action", metavar="<action>", required=True)
    check = actions.add_parser("check", help="load a dataset, report errors and statistics")
    check.add_argument("source", help="a .json (paper format) or .jsonl file, bundled:<name>, or hf:<id or dir>[:config]")
    add_dataset_options(check)
    check.set_defaults(func=run_check)


def run_check(args) -> int:
    from memreason.data import load_traces

    traces, report = load_traces(args.source, task=args.task, split=args.split,
                                 on_unknown_tag=args.on_unknown_tag, skip_invalid=args.skip_invalid)
    print(report.summary())
    splits = Counter(t.meta.get("split", "-") for t in traces)
    answers = Counter(t.answer for t in traces)
    memory = sum(t.count("memory") for t in traces)
    reason = sum(t.count("reason") for t in traces)
    with_steps = sum(bool(t.steps) for t in traces) or 1
    print("splits: " + ", ".join(f"{k} {v}" for k, v in sorted(splits.items())))
    print("answers: " + ", ".join(f"{k} {v}" for k, v in sorted(answers.items())[:15]))
    print(f"steps: {memory} memory, {reason} reason ({(memory + reason) / with_steps:.2f} per record with steps)")
    return 0
