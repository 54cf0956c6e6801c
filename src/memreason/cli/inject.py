"""``memreason inject sweep``: sweep memory injection over layers x tau and report the dev-chosen cell on test.

The cell (layer, tau) is chosen on the dev split by the curated memory's mean Δlog p of the first answer
token, then reported on the test split next to matched controls (another item's memory, random nouns with
the memory's token count, a random direction of the same norm) with paired bootstrap 95% CIs.
Outputs in --out: measurements.jsonl (every item at every cell, written as it is measured), cells.csv
(every condition x layer x tau x split), items.csv (per item at the chosen cell), summary.json and
heatmap.png. Rerunning the same command resumes an interrupted sweep.

Settings come from ``SweepConfig`` (memreason.experiments.injection_sweep), where every default is written:
``--config FILE`` (YAML, e.g. configs/inject/sweep.yaml), then the flags below, then ``key=value``
overrides (``taus=[0.1,0.2] seed=3``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys

EXAMPLES = """examples:
  memreason inject sweep
  memreason inject sweep --config configs/inject/sweep.yaml limit=8 taus=[0.1,0.4]
  memreason inject sweep --prompts my_prompts.csv --layers 0:30:2 --taus 0.05,0.1,0.2,0.4 --out runs/mi
  memreason inject sweep --tau-mode absolute --taus 1,2,3,4 --encoder unembed-centered \
      --controls shuffled,pos,random,answer
"""


def _default(key: str):
    from memreason.experiments.injection_sweep import SweepConfig

    value = next(f.default for f in dataclasses.fields(SweepConfig) if f.name == key)
    if isinstance(value, tuple):
        return ",".join(str(v) for v in value) if value else "none"
    return "the embedded SmolLM2" if key == "model" and value is None else value


def register(subparsers) -> None:
    parser = subparsers.add_parser("inject", help="memory injection experiments",
                                   description="Memory injection (Sakarvadia et al. 2023) experiments.",
                                   epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    actions = parser.add_subparsers(dest="action", metavar="<action>", required=True)
    sweep = actions.add_parser("sweep", help="layer x tau sweep with dev/test selection and matched controls",
                               description=__doc__, epilog=EXAMPLES,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
    # Every flag defaults to None ("not given"): the defaults live once, on SweepConfig.
    sweep.add_argument("--config", default=None, metavar="FILE", help="YAML file of SweepConfig keys")
    sweep.add_argument("--prompts", help="CSV with explicit_sentence, obscure_sentence, explicit_entity, answer "
                                         "(obscure_entity optional); default: the bundled two-hop set")
    sweep.add_argument("--model", help=f"model dir, .gguf file or hub id (default: {_default('model')})")
    sweep.add_argument("--device", help=f"auto, cpu, cuda, cuda:1, ... (default: {_default('device')})")
    sweep.add_argument("--layers", help="comma list and/or START:STOP[:STEP] ranges, e.g. '0,4,8' or '0:30:3' "
                                        "(default: about 10 evenly spaced layers)")
    sweep.add_argument("--taus", help=f"comma list of strengths (default: {_default('taus')})")
    sweep.add_argument("--tau-mode", choices=("relative", "absolute"),
                       help="relative: |delta| = tau x median residual norm entering the layer; "
                            "absolute: tau x memory vector, the paper's tweak factor "
                            f"(default: {_default('tau_mode')})")
    sweep.add_argument("--positions", help="all (the paper), last, or START:STOP over prompt tokens "
                                           f"(default: {_default('positions')})")
    sweep.add_argument("--encoder", choices=("unembed", "unembed-centered", "embed", "layer"),
                       help=f"memory encoder (default: {_default('encoder')})")
    sweep.add_argument("--controls", help="comma list from shuffled, pos, random, obscure, answer; 'none' for none "
                                          f"(default: {_default('controls')})")
    sweep.add_argument("--dev-fraction", type=float, help="share of items for choosing the cell "
                                                          f"(default: {_default('dev_fraction')})")
    sweep.add_argument("--seed", type=int,
                       help=f"seeds the split, controls and bootstrap (default: {_default('seed')})")
    sweep.add_argument("--batch-size", type=int, help=f"rows per forward (default: {_default('batch_size')})")
    sweep.add_argument("--bootstrap", type=int, help=f"bootstrap resamples (default: {_default('n_bootstrap')})")
    sweep.add_argument("--limit", type=int, help="use only the first N prompts (quick runs)")
    sweep.add_argument("--out", help=f"output directory; reruns resume (default: {_default('out')})")
    sweep.add_argument("--overwrite", action="store_true",
                       help="discard the outputs already in --out instead of resuming them")
    sweep.add_argument("overrides", nargs="*", metavar="key=value",
                       help="SweepConfig overrides, e.g. taus=[0.1,0.2] positions=last control_pos=verb")
    sweep.set_defaults(func=run)


def parse_layers(text: str) -> tuple[int, ...]:
    """'0,4,8' and/or 'START:STOP[:STEP]' pieces → layer indices, in order, without duplicates."""
    from memreason.errors import ConfigError

    layers = []
    for piece in text.split(","):
        piece = piece.strip()
        try:
            if ":" in piece:
                bounds = [int(p) for p in piece.split(":")]
                if len(bounds) not in (2, 3):
                    raise ValueError
                layers.extend(range(*bounds))
            elif piece:
                layers.append(int(piece))
        except ValueError:
            raise ConfigError(f"--layers: cannot read {piece!r}; use e.g. '0,4,8' or '0:30:3'") from None
    if not layers:
        raise ConfigError(f"--layers {text!r} selects no layer")
    return tuple(dict.fromkeys(layers))


def parse_floats(text: str, flag: str) -> tuple[float, ...]:
    from memreason.errors import ConfigError

    try:
        values = tuple(float(p) for p in text.split(",") if p.strip())
    except ValueError:
        raise ConfigError(f"{flag}: expected a comma list of numbers, got {text!r}") from None
    if not values:
        raise ConfigError(f"{flag}: no values in {text!r}")
    return values


def parse_positions(text: str):
    from memreason.errors import ConfigError

    if text in ("all", "last"):
        return text
    try:
        start, stop = text.split(":")
        return (int(start) if start.strip() else None, int(stop) if stop.strip() else None)
    except ValueError:
        raise ConfigError(f"--positions: expected all, last or START:STOP, got {text!r}") from None


def _fmt_ci(ci) -> str:
    return f"[{ci[0]:+.3f}, {ci[1]:+.3f}]"


def print_report(result, paths) -> None:
    """The result table: the chosen cell, its test effect, each control at that cell and at its own best."""
    meta, best = result.meta, result.best
    print(f"model: {meta['model']} ({meta['n_layers']} layers); {meta['n_items']} items: "
          f"{meta['n_dev']} dev / {meta['n_test']} test (seed {meta['seed']})")
    print(f"explicit prompt beats obscure prompt on {100 * meta['explicit_beats_obscure']:.0f}% of items; "
          f"tokenizer adds BOS: {'yes' if meta['tokenizer_adds_bos'] else 'no'}")
    print(f"grid: layers {meta['layers']} x tau {meta['taus']} ({result.config['tau_mode']}), "
          f"positions {result.config['positions']}, encoder {result.config['encoder']}")
    dev, test = best["dev"], best["test"]
    print(f"\nbest dev cell: layer {best['layer']}, tau {best['tau']:g}  "
          f"(dev mean Δlog p {dev['mean_dlogp']:+.3f}, n={dev['n']})")
    print(f"test (n={test['n']}): mean Δlog p {test['mean_dlogp']:+.3f} {_fmt_ci(best['test_ci'])}, "
          f"median Δlog p {test['median_dlogp']:+.3f}, median % change {test['median_pct']:+.1f}, "
          f"legacy mean % change {test['mean_pct']:+.1f}, improved {100 * test['frac_improved']:.0f}%, "
          f"top-1 {100 * test['top1_before']:.0f}%→{100 * test['top1_after']:.0f}%, "
          f"top-5 {100 * test['top5_before']:.0f}%→{100 * test['top5_after']:.0f}%")
    if result.comparisons:
        header = (f"{'condition':<10} {'mean Δlog p':>11} {'95% CI':>18} {'median %':>9} {'mean %':>8} "
                  f"{'improved':>8} {'curated − control [95% CI]':>30} {'sign p':>7}")
        print("\ntest set at the chosen cell:\n" + header)
        print(f"{'curated':<10} {test['mean_dlogp']:>+11.3f} {_fmt_ci(best['test_ci']):>18} "
              f"{test['median_pct']:>+9.1f} {test['mean_pct']:>+8.1f} {100 * test['frac_improved']:>7.0f}%")
        for c in result.comparisons:
            diff = f"{c['diff_mean_dlogp']:+.3f} {_fmt_ci(c['diff_ci'])}"
            print(f"{c['control']:<10} {c['control_mean_dlogp']:>+11.3f} {_fmt_ci(c['control_ci']):>18} "
                  f"{c['control_median_pct']:>+9.1f} {c['control_mean_pct']:>+8.1f} "
                  f"{100 * c['control_frac_improved']:>7.0f}% {diff:>30} {c['sign_test_p']:>7.3f}")
        print("\neach control at its own best dev cell (test set):")
        for c in result.own_best:
            print(f"  {c['control']:<9} layer {c['layer']:>2}, tau {c['tau']:<5g} mean Δlog p "
                  f"{c['test_mean_dlogp']:+.3f} {_fmt_ci(c['test_ci'])}; curated best − this "
                  f"{c['diff_vs_curated_best']:+.3f} {_fmt_ci(c['diff_ci'])}")
    print("\ncollateral KL(edited ‖ clean) on neutral prompts at the chosen cell, mean over tokens:")
    print("  " + ", ".join(f"{c['condition']} {c['mean_kl']:.4f}" for c in result.collateral))
    print("\nwrote " + ", ".join(str(p) for p in paths.values()))


def parse_controls(text: str) -> tuple[str, ...]:
    """'shuffled,random' → ('shuffled', 'random'); 'none' → ()."""
    return () if text.strip() == "none" else tuple(c.strip() for c in text.split(",") if c.strip())


# flag attribute -> (SweepConfig key, parser of the flag's text or None when argparse typed it)
FLAGS = {"prompts": ("prompts", None), "model": ("model", None), "device": ("device", None),
         "layers": ("layers", parse_layers), "taus": ("taus", lambda t: parse_floats(t, "--taus")),
         "tau_mode": ("tau_mode", None), "positions": ("positions", parse_positions), "encoder": ("encoder", None),
         "controls": ("controls", parse_controls), "dev_fraction": ("dev_fraction", None), "seed": ("seed", None),
         "batch_size": ("batch_size", None), "bootstrap": ("n_bootstrap", None), "limit": ("limit", None),
         "out": ("out", None)}


def flag_overrides(args) -> list[str]:
    """The flags that were given, as ``key=value`` overrides (applied after --config, before key=value)."""
    overrides = []
    for attr, (key, parse) in FLAGS.items():
        value = getattr(args, attr, None)
        if value is None:
            continue
        value = parse(value) if parse is not None else value
        text = json.dumps(list(value)) if isinstance(value, (list, tuple)) else str(value)
        overrides.append(f"{key}={text}")
    return overrides


def settings(args):
    """The ``SweepConfig`` that --config, the flags and the overrides describe (all errors at once)."""
    from memreason.config import load_settings
    from memreason.experiments.injection_sweep import SweepConfig

    return load_settings(SweepConfig, args.config, [*flag_overrides(args), *args.overrides])


def run(args) -> int:
    from tqdm import tqdm

    from memreason.experiments.injection_sweep import run as run_sweep

    config = settings(args)  # every setting is checked here, and the inputs in run_sweep, before the model loads
    bars = []  # drawn at the first measured batch, so an input error stays a single line

    def progress(done, total):
        if not bars:
            bars.append(tqdm(total=total, unit="row", desc="inject sweep", file=sys.stderr))
        bars[0].update(done - bars[0].n)

    try:
        result, paths = run_sweep(config, overwrite=args.overwrite, progress=progress)
    finally:
        for bar in bars:
            bar.close()
    print_report(result, paths)
    return 0
