"""``memreason data check``: validate a dataset and show what it holds before you train or evaluate on it.

It runs the same load and checks as ``eval`` and ``train`` (``memreason.data.loaders.load_dataset``): the
same default task, the same step policy, the same refusal of empty sources and duplicate ids. Then it
prints what each policy did to the data, with counts and the first examples.
"""

from __future__ import annotations

import argparse
from collections import Counter

from memreason.data.paper import COMPOUND_TAG_CHOICES, ON_UNKNOWN_TAG_CHOICES


def add_dataset_options(parser: argparse.ArgumentParser) -> None:
    """The options every verb that reads a dataset shares."""
    parser.add_argument("--task", default=None, help="task whose answer space the answers must fit "
                        "(strategyqa, commonsenseqa, truthfulqa, freeform); bundled data and hub presets know "
                        "their own, anything else defaults to strategyqa")
    parser.add_argument("--split", default=None, help="keep only records of this split (e.g. train, test)")
    parser.add_argument("--skip-invalid", action="store_true",
                        help="skip malformed records and drop malformed steps, reporting counts, instead of "
                             "stopping at the first")
    parser.add_argument("--on-unknown-tag", choices=ON_UNKNOWN_TAG_CHOICES, default="error",
                        help="what to do with a step whose tag is not a known memory/reason spelling")
    parser.add_argument("--compound-tag", choices=COMPOUND_TAG_CHOICES, default="first",
                        help="how a step tagged '[reason] and [rag]: ...' is read: as its first tag (default), "
                             "always memory, always reason, or dropped")
    parser.add_argument("--columns", default=None, metavar="MAPPING",
                        help="hf: datasets only: auto (default: a preset when the columns match), none, "
                             "commonsenseqa, strategyqa, truthfulqa-mc, or key=column pairs "
                             "(question=stem,answer=label), optionally after a preset (commonsenseqa,id=uid)")


def loader_options(args: argparse.Namespace) -> dict:
    """The ``load_dataset`` keyword arguments the shared dataset options set (for every verb)."""
    return {"task": args.task, "split": args.split, "on_unknown_tag": args.on_unknown_tag,
            "skip_invalid": args.skip_invalid, "compound_tag": getattr(args, "compound_tag", "first"),
            "columns": getattr(args, "columns", None)}


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "data", help="validate and summarise a dataset", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n  memreason data check bundled:strategyqa\n"
               "  memreason data check StrategyQA_test_clean.json --task strategyqa\n"
               "  memreason data check StrategyQA_train.json --on-unknown-tag drop --for train\n"
               "  memreason data check hf:./my_saved_dataset --split test --task commonsenseqa\n"
               "  memreason data check hf:./truthful_qa_mc --split test    # truthfulqa-mc preset, detected")
    actions = parser.add_subparsers(dest="action", metavar="<action>", required=True)
    check = actions.add_parser("check", help="load a dataset, report errors, policies and statistics")
    check.add_argument("source", help="a .json (paper format) or .jsonl file, bundled:<name>, or hf:<id or dir>[:config]")
    add_dataset_options(check)
    check.add_argument("--for", dest="purpose", choices=["eval", "train"], default="eval",
                       help="run the checks of this verb: train also needs records with usable steps (default eval)")
    check.add_argument("--examples", type=int, default=3, help="examples shown per policy (default 3)")
    check.set_defaults(func=run_check)


def run_check(args) -> int:
    from memreason.data.loaders import FROM_DEFAULT, load_dataset
    from memreason.errors import ConfigError

    if args.examples < 0:
        raise ConfigError(f"--examples must be 0 or more, got {args.examples}")
    traces, report = load_dataset(args.source, **loader_options(args), needs_steps=args.purpose == "train", log=False)
    print(report.summary())
    print(f"task: {report.task} ({report.task_origin}"
          + ("; a trained run brings its own task: pass --task to check against it" if report.task_origin
             == FROM_DEFAULT else "") + ")")
    print(f"policies ({report.read} records read):")
    for line in report.details(examples=args.examples):
        print(line)
    splits = Counter(t.meta.get("split", "-") for t in traces)
    answers = Counter(t.answer for t in traces)
    memory = sum(t.count("memory") for t in traces)
    reason = sum(t.count("reason") for t in traces)
    with_steps = sum(bool(t.steps) for t in traces)
    print("splits: " + ", ".join(f"{k} {v}" for k, v in sorted(splits.items())))
    print("answers: " + ", ".join(f"{k} {v}" for k, v in sorted(answers.items())[:15]))
    print(f"steps: {memory} memory, {reason} reason ({(memory + reason) / (with_steps or 1):.2f} per record with steps)")
    excluded = report.excluded_from_training if args.purpose == "train" else report.question_only
    usable = len(traces) if args.purpose == "train" else with_steps
    print(f"usable: {report.loaded} for evaluation; {usable} for training"
          + (f" ({excluded} without usable steps left out)" if excluded else ""))
    return 0
