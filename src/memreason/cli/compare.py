"""``memreason compare A B``: per-question flips between two evaluations and an exact McNemar test."""

from __future__ import annotations

import argparse


def _non_negative(value: str) -> int:
    try:
        number = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {value!r}") from None
    if number < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {number}")
    return number


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "compare", help="compare two evaluation results question by question", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n  memreason compare results/base results/demo\n"
               "  memreason compare a/results.jsonl b/results.jsonl --show 10")
    parser.add_argument("a", help="results directory or results.jsonl (the baseline)")
    parser.add_argument("b", help="results directory or results.jsonl (the method)")
    parser.add_argument("--show", type=_non_negative, default=5, help="list up to N flipped questions each way")
    parser.set_defaults(func=run)


def results_path(value: str):
    """``value`` itself, or the results.jsonl inside it when it is a directory.

    Raises:
        DataError: neither is a file.
    """
    from pathlib import Path

    from memreason.errors import DataError
    from memreason.evaluate import RESULTS

    path = Path(value)
    if path.is_dir():
        path = path / RESULTS
    if not path.is_file():
        raise DataError("no results file here (expected a directory from `memreason eval` or a results.jsonl)",
                        file=str(path))
    return path


def run(args) -> int:
    from memreason.evaluate import compare, read_results

    path_a, path_b = results_path(args.a), results_path(args.b)
    result = compare(read_results(path_a), read_results(path_b), names=(str(path_a), str(path_b)))
    print(f"{result.n} questions in both; accuracy A {result.acc_a:.3f} → B {result.acc_b:.3f}")
    if result.only_a or result.only_b:
        print(f"not compared: {result.only_a} questions only in A, {result.only_b} only in B")
    print(f"B right where A wrong: {len(result.gained)}; A right where B wrong: {len(result.lost)}; "
          f"exact McNemar p = {result.p_mcnemar:.3f}")
    for label, rows in (("gained", result.gained), ("lost", result.lost)):
        for row in rows[:args.show]:
            print(f"  {label}: {row.question[:90]}")
    return 0
