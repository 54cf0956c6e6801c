"""``memreason repair``: correct the faulty memory step of each wrong answer of an evaluation and let the
model answer again from there.

Each wrong answer's step to correct is located by a judge (the first faulty memory step) or, without one,
as the least confident memory step; the correction comes from a source (``world:DIR``, ``gold:SOURCE``,
``facts:FILE``, ``text:TEXT``, ``llm:MODEL[@BASE_URL]``); the model keeps its output before the step token
for token and continues greedily, optionally with the corrected memory injected (``--inject`` or a sweep on
a dev evaluation, ``--choose-injection --dev-results DIR``). Repaired rows go beside the originals
(``repaired.jsonl``, both answers per row); the summary gives fix and break rates with 95% CIs and the
paired exact McNemar test against the original answers. Re-running the same command resumes.
"""

from __future__ import annotations

import argparse

from memreason.cli._settings import add_settings_arguments, settings_from_args

FLAGS = ("results", "model", "source", "locate", "judge", "judge_data", "rows", "inject", "choose_injection",
         "dev_results", "out", "batch_size", "max_new_tokens", "limit", "overwrite", "device", "dtype")
HELP = {
    "results": "the evaluation to repair: a `memreason eval` output directory (or its results.jsonl); required",
    "model": "the run or model to continue with (default: the one the evaluation names)",
    "source": "where corrections come from: world:DIR, gold:SOURCE (e.g. gold:bundled:strategyqa), facts:FILE, "
              "text:TEXT or llm:MODEL[@BASE_URL]; required",
    "locate": "judge (the first faulty memory step) or confidence (the least confident memory step, no judge)",
    "judge": "auto (the source's own), exact, world or llm",
    "judge_data": "the judge's knowledge: a gold source or facts .json (exact), a world dir (world), MODEL@URL (llm)",
    "rows": "which answers to repair: wrong, failed (wrong and unparseable) or all",
    "inject": "inject the corrected memory while the model continues: layer=L,tau=T[,tau_mode=...][,encoder=...]",
    "choose_injection": "choose layer and tau by a sweep on --dev-results (never on the repaired rows)",
    "dev_results": "an evaluation of a dev split, for --choose-injection",
    "out": "output directory (repaired.jsonl, summary.json); required",
    "max_new_tokens": "cap on a whole output (default: the evaluation's)",
    "limit": "repair only the first N selected answers",
    "overwrite": "discard repaired rows already in --out",
}
EPILOG = """examples:
  memreason repair --results results/demo --source gold:bundled:strategyqa --out results/demo-repair
  memreason repair --results runs/world/arms/tokens/test --source world:runs/world --out runs/world/fix
  memreason repair --results results/x --source facts:my_facts.txt --locate confidence --out results/x-fix
  memreason repair --results results/x --source llm:gpt-4o-mini --out results/x-llm
  memreason repair --results results/x --source gold:bundled:strategyqa --choose-injection \\
      --dev-results results/x-dev --out results/x-inject taus=[0.1,0.4] layers=[8,16]
re-running the same command resumes: finished answers are skipped."""


def _settings_class():
    from memreason.experiments.repair import RepairSettings

    return RepairSettings


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "repair", help="correct the faulty memory step of wrong answers and answer again", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG)
    add_settings_arguments(parser, _settings_class(), FLAGS, HELP)
    parser.set_defaults(func=run)


def _rate(entry: dict) -> str:
    if not entry["n"]:
        return "0/0"
    low, high = entry["ci95"]
    return f"{entry['count']}/{entry['n']} = {entry['rate']:.3f} [{low:.3f}, {high:.3f}]"


def format_summary(summary: dict) -> str:
    """The repair summary as printed by ``memreason repair`` (and the demo)."""
    before, after = summary["accuracy_before"], summary["accuracy_after"]
    paired = summary["mcnemar"]
    lines = [f"repaired {summary['repaired']} of {summary['rows']} answers"
             + (f" (skipped: {'; '.join(f'{k} ({v})' for k, v in summary['skipped'].items())})"
                if summary["skipped"] else ""),
             f"fix rate (wrong → right):       {_rate(summary['fix'])}",
             f"break rate (right → not right): {_rate(summary['break'])}",
             f"new unparseable:                {_rate(summary['new_unparseable'])}",
             f"accuracy {before['rate'] or 0:.3f} → {after['rate'] or 0:.3f} (n = {summary['n']}); exact McNemar "
             f"p = {paired['p']:.3f} ({paired['gained']} gained, {paired['lost']} lost)"]
    if summary.get("injection"):
        inj = summary["injection"]
        lines.append(f"injection: layer {inj['layer']}, tau {inj['tau']} ({inj['tau_mode']}, {inj['encoder']})")
    elif summary.get("sweep") is not None:
        lines.append(f"injection: none (the dev sweep over {summary['sweep']['n']} rows chose none)")
    return "\n".join(lines)


def format_pair(row) -> str:
    """One repaired row: the original steps and answer, the correction, the repaired steps and answer."""
    from memreason.cli._render import format_steps
    from memreason.traces import Step

    repair = row.extra["repair"]
    original = repair["original"]
    correction = repair["correction"]
    before = [Step(s["kind"], s["text"]) for s in original["steps"]]
    return "\n".join([f"Q: {row.question}", "before:", format_steps(before),
                      f"  → {original['predicted']} ({original['outcome']})",
                      f"correction of step {correction['step'] + 1} ({correction['source']}): {correction['text']}",
                      "after:", format_steps(row.steps), f"  → {row.predicted} ({row.outcome}; gold {row.gold})"])


def run(args) -> int:
    from pathlib import Path

    from tqdm import tqdm

    from memreason.evaluate import read_results
    from memreason.experiments.repair import REPAIRED, SUMMARY, before_after, check_settings, run_repair

    settings = settings_from_args(_settings_class(), args, validate=check_settings)
    bar = tqdm(total=0, desc="repair", unit="q")

    def start(total: int) -> None:
        bar.total = total
        bar.refresh()

    try:
        summary = run_repair(settings, progress=bar.update, on_start=start)
    finally:
        bar.close()
    out = Path(settings.out)
    print(format_summary(summary))
    shown = before_after(read_results(out / REPAIRED)) if (out / REPAIRED).exists() else None
    if shown is not None:
        print("\n" + format_pair(shown))
    print(f"\nrepaired results: {out / REPAIRED}\nsummary: {out / SUMMARY}")
    return 0
