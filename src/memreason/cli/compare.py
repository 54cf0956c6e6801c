"""``memreason compare A B``: per-question flips between two evaluations and an exact McNemar test."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "compare", help="compare two evaluation results question by question", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n  memreason compare results/base results/demo\n"
               "  memreason compare a/results.jsonl b/results.jsonl --show 10")
    parser.add_argument("a", help="results directory or results.jsonl (the baseline)")
    parser.add_argument("b", help="results directory or results.jsonl (the method)")
    parser.add_argument("--show", type=int, default=5, help="list up to N flipped questions each way")
    parser.set_defaults(func=run)


def _results_path(value: str) -> Path:
    from memreason.errors import DataError

    path = Path(value)
    if path.is_dir():
        path = path / "results.jsonl"
    if not path.is_file():
        raise DataError("no results file here (expected a directory from `memreason eval` or a results.jsonl)",
                        file=str(path))
    return path


def compare_results(rows_a: list[dict], rows_b: list[dict]) -> dict:
    """Paired comparison on the questions both evaluated: accuracies, flips both ways, McNemar p."""
    from memreason.stats import mcnemar_exact

    b_by_id = {row["id"]: row for row in rows_b}
    shared = [(row, b_by_id[row["id"]]) for row in rows_a if row["id"] in b_by_id]
    right = lambda row: row["outcome"] == "correct"  # noqa: E731
    gained = [b for a, b in shared if not right(a) and right(b)]
    lost = [b for a, b in shared if right(a) and not right(b)]
    return {"n": len(shared), "acc_a": sum(right(a) for a, _ in shared) / max(1, len(shared)),
            "acc_b": sum(right(b) for _, b in shared) / max(1, len(shared)),
            "gained": gained, "lost": lost, "p_mcnemar": mcnemar_exact(len(lost), len(gained))}


def run(args) -> int:
    from memreason.evaluate import read_results

    path_a, path_b = _results_path(args.a), _results_path(args.b)
    result = compare_results(read_results(path_a), read_results(path_b))
    print(f"{result['n']} questions in both; accuracy A {result['acc_a']:.3f} → B {result['acc_b']:.3f}")
    print(f"B right where A wrong: {len(result['gained'])}; A right where B wrong: {len(result['lost'])}; "
          f"exact McNemar p = {result['p_mcnemar']:.3f}")
    for label, rows in (("gained", result["gained"]), ("lost", result["lost"])):
        for row in rows[:args.show]:
            print(f"  {label}: {row['question'][:90]}")
    return 0
