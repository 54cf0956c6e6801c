"""``memreason rebalance eval``: does attention rebalancing (Liao & Vargas 2024) change MMLU accuracy?

Runs the baseline (stock eager attention), the method (layer-0-guided boost) and its controls (boost-all,
a density-matched random mask; optionally renormalised and legacy h = 31) on the same questions, and prints
per-category accuracy with Wilson 95% CIs, paired flips with exact McNemar tests, and mechanism diagnostics.
With no arguments it scores the bundled 96-question sample by log-likelihood with the embedded SmolLM2
(a couple of minutes on a laptop CPU). Outputs go to --out: per_question.jsonl / .csv and summary.json;
an interrupted run resumes when started again with the same settings.

Settings come from memreason.experiments.rebalance_mmlu.RebalanceSettings: a --config YAML file, then the
flags below, then key=value overrides; every problem is reported before the model loads.
"""

from __future__ import annotations

import argparse

from memreason.cli._settings import add_settings_arguments, settings_from_args

EXAMPLES = """examples:
  memreason rebalance eval
  memreason rebalance eval --mode cot --limit 20 --max-new-tokens 192
  memreason rebalance eval --data mmlu/test --conditions baseline,mask,boost-all,random-mask,legacy
  memreason rebalance eval --alpha 0.5 --conditions baseline,boost-all   # the original's first public code
  memreason rebalance eval --config configs/rebalance/mmlu.yaml limit=16 theta=0.02
  memreason rebalance eval --model ./Llama-3.1-8B-Instruct --device cuda --out runs/rb-llama"""

FLAGS = ("data", "model", "mode", "conditions", "alpha", "theta", "depth_h", "seed", "prompt_style", "limit",
         "max_new_tokens", "batch_size", "out", "overwrite", "dtype", "device")
HELP = {
    "data": "MMLU CSV file or directory of <subject>_test.csv files (none: the bundled sample)",
    "model": "model dir, .gguf file or hub id (none: embedded SmolLM2)",
    "mode": "ll: log-likelihood of the letters (cheap); cot: greedy chain of thought + strict parse",
    "conditions": "comma-separated, from baseline, mask, boost-all, random-mask, renormalised, legacy",
    "alpha": "boost strength", "theta": "layer-0 probability threshold",
    "depth_h": "h of the gain 1 + alpha*(1 - l/h); none: last layer index (31 = the original's constant)",
    "seed": "seed of the random-mask control and the bootstrap",
    "prompt_style": "raw text or the chat template (none: raw for ll, chat for cot)",
    "limit": "evaluate only N questions, taken round-robin over the four categories",
    "max_new_tokens": "cot generation cap", "batch_size": "questions per forward",
    "out": "output directory (none: memreason-runs/rebalance-<mode>-<run key>)",
    "overwrite": "replace results of a different run in --out",
    "dtype": "auto, float32, bfloat16 or float16", "device": "auto, cpu, cuda, cuda:1, ...",
}


def _settings_class():
    from memreason.experiments.rebalance_mmlu import RebalanceSettings

    return RebalanceSettings


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "rebalance", help="attention rebalancing (Liao & Vargas): evaluate it against controls",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EXAMPLES)
    actions = parser.add_subparsers(dest="action", metavar="<action>", required=True)
    ev = actions.add_parser("eval", help="baseline vs method vs controls on MMLU-format data",
                            description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                            epilog=EXAMPLES)
    cls = _settings_class()
    add_settings_arguments(ev, cls, FLAGS, HELP)
    # The flag keeps its old short name; the field is bootstrap_resamples.
    default = cls.__dataclass_fields__["bootstrap_resamples"].default
    ev.add_argument("--bootstrap", dest="set_bootstrap_resamples", default=argparse.SUPPRESS, metavar="N",
                    help=f"paired bootstrap resamples (default: {default})")
    ev.set_defaults(func=run_eval)


def run_eval(args) -> int:
    from pathlib import Path

    from tqdm import tqdm

    from memreason.experiments import rebalance_mmlu
    from memreason.experiments.rebalance_report import format_report

    settings = settings_from_args(_settings_class(), args)
    state: dict = {}

    def start(plan: dict) -> None:
        if settings.mode == "cot" and settings.limit is None and plan["n_questions"] > 200:
            print(f"note: chain-of-thought on all {plan['n_questions']} questions x {len(settings.conditions)} "
                  "conditions; use --limit for a quick look")
        print(f"model: {plan['model']} ({plan['layers']} layers, {plan['dtype']}, {plan['device']}); "
              f"data: {plan['data']} ({plan['n_questions']} questions); out: {plan['out']}")
        state["out"] = plan["out"]
        state["bar"] = tqdm(total=plan["total"], unit="q", desc=f"rebalance eval ({settings.mode})")

    try:
        summary = rebalance_mmlu.run(settings, progress=lambda n: state["bar"].update(n), on_start=start)
    finally:
        if "bar" in state:
            state["bar"].close()
    out = Path(state["out"])
    print()
    print(format_report(summary))
    print()
    print(f"wrote {out / rebalance_mmlu.SUMMARY}, {out / rebalance_mmlu.TABLE}, {out / rebalance_mmlu.ROWS}")
    return 0
