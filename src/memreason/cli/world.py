"""``memreason world``: the synthetic knowledge world, where every memory step can be verified.

``generate`` writes a seeded world (knowledge corpus, multi-hop questions with gold traces, world.json for
the exact judge). ``ablate`` runs the whole ablation on it: a knowledge stage (facts into the weights,
cloze recall before and after), then memory/reason tokens vs S=0 vs random markers vs plain CoT vs direct
answers, same seed and budget, with accuracy, 95% CIs and memory/reasoning error rates from the exact
judge. Re-running ``ablate`` with the same settings resumes: finished stages, arms and answers are reused.
``repair`` runs (or reuses) the same ablation, then the repair benchmark on its arms: the false recall of
each wrong answer corrected by text or by injection, against matched controls (another false fact,
regeneration with no edit, a paraphrase of a true recall in right answers), and how well the model's own
step confidence finds its false recalls (AUROC) and what abstaining buys (accuracy against coverage).
"""

from __future__ import annotations

import argparse

EPILOG = """examples:
  memreason world generate --out runs/world-data
  memreason world generate --out runs/world-big n_people=60 mentions=5 heldout_pairs=mentor>born_in
  memreason world ablate --out runs/world
  memreason world ablate --out runs/world-small world.n_people=12 reason_steps=20 arms=tokens,direct
  memreason world ablate --config configs/world/ablate.yaml --out runs/world
  memreason world repair --config configs/world/ablate.yaml --out runs/world
  memreason world repair --out runs/world-small world.n_people=12 repair.arms=tokens,plain_cot repair.taus=[0.2,0.5]
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
    repair = actions.add_parser("repair", help="repair benchmark on the ablation's arms (runs the ablation first "
                                "when it is not finished)", epilog=EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    repair.add_argument("--out", default="runs/world", help="the ablation's output directory (default runs/world); "
                        "the benchmark goes to OUT/repair; re-runs resume")
    repair.add_argument("--config", default=None, metavar="FILE", help="the ablation's YAML settings")
    repair.add_argument("--no-progress", action="store_true", help="no training progress bars")
    repair.add_argument("overrides", nargs="*", metavar="key=value",
                        help="ablation keys as for ablate, and repair.<key>=... for the benchmark (arms, splits, "
                             "layers, taus, tau_mode, encoder, dev_questions, coverage, batch_size, bootstrap, seed; "
                             "see memreason.experiments.world_repair.WorldRepairConfig)")
    repair.set_defaults(func=run_repair)


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


def _ci(low, high) -> str:
    return "—" if low is None else f"[{low:.3f}, {high:.3f}]"


def format_repair(summary: dict) -> str:
    """The repair benchmark's tables, as printed by ``world repair``."""
    from memreason.cli._render import format_table

    headers = ["arm", "split", "method", "kind", "measures", "n", "rate", "95% CI", "new unparseable", "p vs regen"]
    rows = [[r["arm"], r["split"], r["method"], r["kind"], r["measures"], str(r["n"]),
             f"{r['count']}/{r['n']}" + (f" = {r['rate']:.3f}" if r["rate"] is not None else ""),
             _ci(r["ci95_low"], r["ci95_high"]), str(r["new_unparseable"]),
             "—" if r["vs_regenerate_p"] is None else f"{r['vs_regenerate_p']:.3f}"] for r in summary["rows"]]
    lines = [format_table(headers, rows), ""]
    confidence_rows, coverage_rows = [], []
    for arm, result in summary["arms"].items():
        sweep = result["sweep"]
        chosen = sweep["chosen"]
        lines.append(f"{arm}: injection layer {chosen['layer']}, tau {chosen['tau']} (chosen on {sweep['n']} dev "
                     f"rows of {sweep.get('dev_questions', '?')} dev questions)")
        for split, entry in result["splits"].items():
            for key, a in entry["auroc"].items():
                confidence_rows.append([arm, split, key, _fmt(a["auroc"]), _ci(*a["ci95"]), str(a["n_positive"]),
                                        str(a["n_negative"])])
            coverage_rows.append([arm, split] + [
                "—" if c["accuracy"] is None else f"{c['accuracy']:.2f} ({c['answered']})" for c in entry["coverage"]])
    levels = next((entry["coverage"] for result in summary["arms"].values() for entry in result["splits"].values()), [])
    lines += ["", "step confidence finding false recalls (AUROC of low confidence for false; answers resampled):",
              format_table(["arm", "split", "log-prob", "AUROC", "95% CI", "false recalls", "true recalls"],
                           confidence_rows),
              "", "accuracy (answered) when the answers whose least confident memory step is lowest abstain:",
              format_table(["arm", "split"] + [f"cover {c['coverage']:.0%}" for c in levels], coverage_rows)]
    return "\n".join(lines)


def run_repair(args) -> int:
    from pathlib import Path

    from memreason.experiments.world_repair import load_world_repair, run_world_repair

    ablation, cfg = load_world_repair(args.config, args.overrides)
    summary = run_world_repair(ablation, cfg, args.out, progress=not args.no_progress,
                               on_stage=lambda message: print(f"→ {message}", flush=True))
    print()
    print(format_repair(summary))
    print(f"\nwall time of the benchmark in this call {summary['seconds'] / 60:.1f} min")
    print(f"table: {Path(args.out) / 'repair' / 'table.csv'}\nsummary: {Path(args.out) / 'repair' / 'summary.json'}")
    return 0
