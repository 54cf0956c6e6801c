"""``memreason demo``: the end-to-end demo on the embedded SmolLM2-135M.

Trains the model with memory/reason control tokens on the bundled StrategyQA-style train split
(checkpoint chosen on a validation split carved from it), evaluates the untrained model (one-shot CoT) and
the trained run on the held-out test split, greedily, trains and evaluates a plain chain-of-thought arm with
the same budget (the paper's fair baseline), and prints the comparison with 95% CIs, exact McNemar tests and
three answers with their memory and reason steps told apart. Then it repairs the trained run's wrong answers
whose memory step contradicts the gold trace (corrected from the gold trace, the model answers again) and
prints one before/after pair and the fix rate with its 95% CI.

A 135M-parameter model knows little, so expect modest accuracy: the numbers are printed as they are.
Re-running resumes: a finished training run and finished evaluations are reused.
"""

from __future__ import annotations

import argparse

from memreason.cli._settings import add_settings_arguments, settings_from_args


def _settings_class():
    from memreason.experiments.demo import DemoSettings

    return DemoSettings


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "demo", help="train SmolLM2 with memory/reason tokens and compare it with the base model",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n  memreason demo\n  memreason demo --out runs/demo2 --limit 10")
    parser.add_argument("--config", dest="set_config", default=argparse.SUPPRESS, metavar="FILE",
                        help="training recipe (default: the packaged demo recipe, the same as configs/demo.yaml)")
    add_settings_arguments(parser, _settings_class(), ("out", "limit", "batch_size", "skip_plain_cot", "skip_repair"),
                           {"out": "where the run and the evaluations go",
                            "limit": "evaluate only the first N test questions",
                            "batch_size": "evaluation batch size",
                            "skip_plain_cot": "leave out the plain chain-of-thought arm (saves about 3.5 minutes)",
                            "skip_repair": "leave out the repair of the trained run's wrong answers"},
                           config_file=False)
    parser.set_defaults(func=run)


def _bars():
    from tqdm import tqdm

    def progress(name: str):
        bars = []  # opened once the number of questions is known, after the model has loaded

        def start(total: int) -> None:
            bars.append(tqdm(total=total, desc=name, unit="q"))

        def update(n: int) -> None:
            bars[-1].update(n)
            if bars[-1].n >= bars[-1].total:
                bars[-1].close()
        return start, update
    return progress


def run(args) -> int:
    from pathlib import Path

    from memreason.cli._render import SUMMARY_HEADERS, format_result, format_table, summary_row
    from memreason.evaluate import RESULTS
    from memreason.experiments.demo import run_demo

    outcome = run_demo(settings_from_args(_settings_class(), args), announce=print, progress=_bars())
    paired = outcome.comparison
    rows = [summary_row("base SmolLM2, 1-shot CoT", outcome.base),
            summary_row("memory/reason tokens (ours)", outcome.trained)]
    if outcome.plain is not None:
        rows.append(summary_row("plain CoT, same budget", outcome.plain))
    print()
    print(format_table(SUMMARY_HEADERS, rows))
    print(f"\ntrained right where base wrong: {len(paired.gained)}; base right where trained wrong: "
          f"{len(paired.lost)}; exact McNemar p = {paired.p_mcnemar:.3f} (n = {paired.n})")
    if outcome.plain_comparison is not None:
        plain = outcome.plain_comparison
        print(f"trained right where plain CoT wrong: {len(plain.gained)}; plain CoT right where trained wrong: "
              f"{len(plain.lost)}; exact McNemar p = {plain.p_mcnemar:.3f} (n = {plain.n})")
    print("\nThree answers from the trained model (every answer is in the trained results file):\n")
    for row in outcome.examples:
        print(format_result(row) + "\n")
    if outcome.repair is not None:
        _print_repair(outcome)
    print(f"wall time {outcome.seconds / 60:.1f} min (training {outcome.train_seconds / 60:.1f} min)")
    print(f"outputs: run {outcome.run_dir}\n         base results {outcome.base_dir / RESULTS}\n"
          f"         trained results {outcome.trained_dir / RESULTS}\n"
          + (f"         plain CoT results {outcome.plain_dir / RESULTS}\n" if outcome.plain_dir else "")
          + (f"         repaired results {outcome.repair_dir / 'repaired.jsonl'}\n" if outcome.repair_dir else "")
          + f"         training curves {Path(outcome.run_dir) / 'curves.png'}")
    return 0


def _print_repair(outcome) -> None:
    from memreason.cli.repair import format_pair

    summary, fix = outcome.repair, outcome.repair["fix"]
    rate = (f"{fix['count']}/{fix['n']} = {fix['rate']:.3f}, 95% CI [{fix['ci95'][0]:.3f}, {fix['ci95'][1]:.3f}]"
            if fix["n"] else "no answer could be repaired")
    print(f"Repair: {summary['repaired']} of {summary['rows']} wrong answers had a memory step contradicting the "
          f"gold trace; corrected from the gold trace, {rate} became right "
          f"(accuracy {summary['accuracy_before']['rate']:.3f} → {summary['accuracy_after']['rate']:.3f}, "
          f"exact McNemar p = {summary['mcnemar']['p']:.3f})")
    if outcome.repair_example is not None:
        print("\nOne repaired answer, before and after:\n" + format_pair(outcome.repair_example))
    print()
