"""``memreason world``: the synthetic knowledge world, where every memory step can be verified.

``generate`` writes a seeded world (knowledge corpus, multi-hop questions with gold traces, world.json for
the exact judge). ``ablate`` runs the whole ablation on it: a knowledge stage (facts into the weights,
cloze recall before and after), then memory/reason tokens vs S=0 vs random markers vs plain CoT vs direct
answers, same seed and budget, with accuracy, 95% CIs and memory/reasoning error rates from the exact
judge. Re-running ``ablate`` with the same settings resumes: finished stages, arms and answers are reused.
"""

from __future__ import annotations

import argparse

EPILOG = """examples:
  memreason world generate --out runs/world-data
  memreason world generate --out runs/world-big n_people=60 mentions=5 heldout_pairs=mentor>born_in
  memreason world ablate --out runs/world
  memreason world ablate --out runs/world-small world.n_people=12 reason_steps=20 arms=tokens,direct
  memreason world ablate --config configs/world/ablate.yaml --out runs/world
"""


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "world", help="synthetic knowledge world: generate it, or run the memory/reason ablation on it",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG)
    actions = parser.add_subparsers(dest="action", metavar="<action>", required=True)
    generate = actions.add_parser("generate", help="write a seeded world to a directory", epilog=EPILOG,
                                  formatter_class=argparse.RawDescriptionHelpFormatter)
    generate.add_argument("--out", required=True, help="directory for world.json, questions.jsonl, corpus.jsonl, facts.json")
    generate.add_argument("--config", default=None, metavar="FILE", help="YAML file of world knobs")
    generate.add_argument("overrides", nargs="*", metavar="key=value",
                          help="world knobs, e.g. seed=1 n_people=40 mentions=5 min_hops=2 max_hops=3 "
                               "heldout_pairs=based_in>located_in")
    generate.set_defaults(func=run_generate)
    ablate = actions.add_parser("ablate", help="knowledge stage, five reasoning arms, exact error attribution",
                                epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    ablate.add_argument("--out", default="runs/world", help="output directory (default runs/world); re-runs resume")
    ablate.add_argument("--config", default=None, metavar="FILE",
                        help="YAML settings (keys of AblateConfig; `world:` section; `defaults:` includes)")
    ablate.add_argument("--no-progress", action="store_true", help="no training progress bars")
    ablate.add_argument("overrides", nargs="*", metavar="key=value",
                        help="e.g. reason_steps=40 knowledge_steps=120 arms=tokens,s0 model=path/to/model "
                             "world.n_people=24 (see memreason.experiments.world_ablation.AblateConfig)")
    ablate.set_defaults(func=run_ablate)


def run_generate(args) -> int:
    from memreason.config import load_settings
    from memreason.data.world import WorldConfig, generate_world, write_world

    world = generate_world(load_settings(WorldConfig, args.config, args.overrides))
    paths = write_world(world, args.out)
    print(f"{len(world.entities)} entities, {len(world.facts)} facts, {len(world.corpus())} corpus sentences; "
          + ", ".join(f"{len(v)} {k}" for k, v in world.questions.items()) + " questions")
    for name, path in paths.items():
        print(f"{name}: {path}")
    return 0


def _fmt(value, digits: int = 3) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


def format_ablation(summary: dict) -> str:
    """The ablation table and the cloze recall lines, as printed by ``world ablate``."""
    from memreason.cli._render import format_table

    lines = []
    for stage, probes in summary["cloze"].items():
        parts = [f"{name.replace('_', ' ')} {p['recall']:.3f} [{p['ci95'][0]:.3f}, {p['ci95'][1]:.3f}]"
                 for name, p in probes.items()]
        chance = next(iter(probes.values()))["chance"]
        lines.append(f"cloze recall@1, {stage} model (n = {next(iter(probes.values()))['n']} facts, chance "
                     f"{chance:.3f}): " + "; ".join(parts))
    headers = ["arm", "split", "n", "accuracy", "95% CI", "memory err", "reason err", "unparseable",
               "unjudged", "true mem steps"]
    rows = [[r["arm"], r["split"], str(r["n"]), _fmt(r["accuracy"]), f"[{r['ci95_low']:.3f}, {r['ci95_high']:.3f}]",
             _fmt(r["memory_error_rate"]), _fmt(r["reason_error_rate"]), _fmt(r["unparseable_rate"]),
             _fmt(r["unjudged_rate"]), _fmt(r["true_memory_step_share"])] for r in summary["rows"]]
    return "\n".join(lines) + "\n\n" + format_table(headers, rows)


def run_ablate(args) -> int:
    import time
    from pathlib import Path

    from tqdm import tqdm

    from memreason.experiments.world_ablation import load_ablation, run_ablation

    cfg = load_ablation(args.config, args.overrides)
    start = time.perf_counter()
    bars: dict[str, tqdm] = {}

    def close_bars() -> None:
        for bar in bars.values():
            bar.close()
        bars.clear()

    def on_stage(message: str) -> None:
        close_bars()
        print(f"→ {message}", flush=True)

    def on_eval(split: str, count: int) -> None:
        if split not in bars:
            close_bars()
            bars[split] = tqdm(desc=f"eval {split}", unit="q")
        bars[split].update(count)

    try:
        summary = run_ablation(cfg, args.out, progress=not args.no_progress, on_stage=on_stage, on_eval=on_eval)
    finally:
        close_bars()
    print()
    print(format_ablation(summary))
    minutes = (time.perf_counter() - start) / 60
    print(f"\nwall time of this call {minutes:.1f} min; all stages, resumed calls included: "
          f"{summary['total_seconds'] / 60:.1f} min")
    print(f"table: {Path(args.out) / 'ablation.csv'}\nsummary: {Path(args.out) / 'summary.json'}")
    return 0
