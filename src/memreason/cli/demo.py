"""``memreason demo``: the end-to-end demo on the embedded SmolLM2-135M.

Trains the model with memory/reason control tokens on the bundled StrategyQA-style train split
(checkpoint chosen on a validation split carved from it), evaluates the untrained model (one-shot CoT) and
the trained run on the held-out test split, greedily, and prints the comparison with 95% CIs, an exact
McNemar test and three answers with their memory and reason steps told apart.

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
    add_settings_arguments(parser, _settings_class(), ("out", "limit", "batch_size"),
                           {"out": "where the run and the evaluations go",
                            "limit": "evaluate only the first N test questions",
                            "batch_size": "evaluation batch size"}, config_file=False)
    parser.set_defaults(func=run)


def _bars():
    from tqdm import tqdm

    def progress(name: str):
        bar = tqdm(total=0, desc=name, unit="q")

        def start(total: int) -> None:
            bar.total = total
            bar.refresh()

        def update(n: int) -> None:
            bar.update(n)
            if bar.total and bar.n >= bar.total:
                bar.close()
        return start, update
    return progress


def run(args) -> int:
    from pathlib import Path

    from memreason.cli._render import SUMMARY_HEADERS, format_result, format_table, summary_row
    from memreason.evaluate import RESULTS
    from memreason.experiments.demo import run_demo

    outcome = run_demo(settings_from_args(_settings_class(), args), announce=print, progress=_bars())
    paired = outcome.comparison
    print()
    print(format_table(SUMMARY_HEADERS, [summary_row("base SmolLM2, 1-shot CoT", outcome.base),
                                         summary_row("memory/reason tokens (ours)", outcome.trained)]))
    print(f"\ntrained right where base wrong: {len(paired.gained)}; base right where trained wrong: "
          f"{len(paired.lost)}; exact McNemar p = {paired.p_mcnemar:.3f} (n = {paired.n})")
    print("\nThree answers from the trained model (every answer is in the trained results file):\n")
    for row in outcome.examples:
        print(format_result(row) + "\n")
    print(f"wall time {outcome.seconds / 60:.1f} min (training {outcome.train_seconds / 60:.1f} min)")
    print(f"outputs: run {outcome.run_dir}\n         base results {outcome.base_dir / RESULTS}\n"
          f"         trained results {outcome.trained_dir / RESULTS}\n"
          f"         training curves {Path(outcome.run_dir) / 'curves.png'}")
    return 0
