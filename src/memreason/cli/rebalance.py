"""``memreason rebalance eval``: does attention rebalancing (Liao & Vargas 2024) change MMLU accuracy?

Runs the baseline (stock eager attention), the method (layer-0-guided boost) and its controls (boost-all,
a density-matched random mask; optionally renormalised and legacy h = 31) on the same questions, and prints
per-category accuracy with Wilson 95% CIs, paired flips with exact McNemar tests, and mechanism diagnostics.
With no arguments it scores the bundled 96-question sample by log-likelihood with the embedded SmolLM2
(a couple of minutes on a laptop CPU). Outputs go to --out: per_question.jsonl / .csv and summary.json;
an interrupted run resumes when started again with the same settings.
"""

from __future__ import annotations

import argparse

EXAMPLES = """examples:
  memreason rebalance eval
  memreason rebalance eval --mode cot --limit 20 --max-new-tokens 192
  memreason rebalance eval --data mmlu/test --conditions baseline,mask,boost-all,random-mask,legacy
  memreason rebalance eval --alpha 0.5 --conditions baseline,boost-all   # the original's first public code
  memreason rebalance eval --model ./Llama-3.1-8B-Instruct --device cuda --out runs/rb-llama"""


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "rebalance", help="attention rebalancing (Liao & Vargas): evaluate it against controls",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EXAMPLES)
    actions = parser.add_subparsers(dest="action", metavar="<action>", required=True)
    ev = actions.add_parser("eval", help="baseline vs method vs controls on MMLU-format data",
                            description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                            epilog=EXAMPLES)
    ev.add_argument("--data", default=None,
                    help="MMLU CSV file or directory of <subject>_test.csv files (default: the bundled sample)")
    ev.add_argument("--model", default=None, help="model dir, .gguf file or hub id (default: embedded SmolLM2)")
    ev.add_argument("--mode", choices=["ll", "cot"], default="ll",
                    help="ll: log-likelihood of the letters (cheap); cot: greedy chain of thought + strict parse")
    ev.add_argument("--conditions", default="baseline,mask,boost-all,random-mask",
                    help="comma-separated, from baseline, mask, boost-all, random-mask, renormalised, legacy "
                         "(default: %(default)s)")
    ev.add_argument("--alpha", type=float, default=0.2, help="boost strength (default: %(default)s)")
    ev.add_argument("--theta", type=float, default=0.01, help="layer-0 probability threshold (default: %(default)s)")
    ev.add_argument("--depth-h", type=_positive_int, default=None,
                    help="h of the gain 1 + alpha*(1 - l/h); default: last layer index (31 = the original's constant)")
    ev.add_argument("--seed", type=int, default=0, help="seed of the random-mask control and the bootstrap")
    ev.add_argument("--prompt-style", choices=["raw", "chat"], default=None,
                    help="raw text or the chat template (default: raw for ll, chat for cot)")
    ev.add_argument("--limit", type=_positive_int, default=None,
                    help="evaluate only N questions, taken round-robin over the four categories")
    ev.add_argument("--max-new-tokens", type=_positive_int, default=256, help="cot generation cap (default: %(default)s)")
    ev.add_argument("--batch-size", type=_positive_int, default=8, help="questions per forward (default: %(default)s)")
    ev.add_argument("--bootstrap", type=_positive_int, default=10_000,
                    help="paired bootstrap resamples (default: %(default)s)")
    ev.add_argument("--out", default=None,
                    help="output directory (default: memreason-runs/rebalance-<mode>-<run key>)")
    ev.add_argument("--overwrite", action="store_true", help="replace results of a different run in --out")
    ev.add_argument("--dtype", default="auto", help="auto, float32, bfloat16 or float16 (default: %(default)s)")
    ev.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ... (default: %(default)s)")
    ev.set_defaults(func=run_eval)


def run_eval(args) -> int:
    from pathlib import Path

    from tqdm import tqdm

    from memreason.interventions import rebalance_eval as rbe
    from memreason.model import load

    conditions = tuple(name.strip() for name in args.conditions.split(",") if name.strip())
    settings = rbe.EvalSettings(mode=args.mode, conditions=conditions, alpha=args.alpha, theta=args.theta,
                                depth_h=args.depth_h, seed=args.seed, prompt_style=args.prompt_style,
                                max_new_tokens=args.max_new_tokens, batch_size=args.batch_size, limit=args.limit,
                                bootstrap_resamples=args.bootstrap)
    data = Path(args.data) if args.data else rbe.bundled_sample_path()
    questions = rbe.load_mmlu(data)  # before the model: bad data fails in a second, not after loading
    if args.mode == "cot" and args.limit is None and len(questions) > 200:
        print(f"note: chain-of-thought on all {len(questions)} questions x {len(settings.conditions)} conditions; "
              "use --limit for a quick look")

    model, tokenizer = load(args.model, dtype=args.dtype, device=args.device)
    dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
    model_name = args.model or model.config.name_or_path
    key = rbe.run_key(settings, model_name, rbe.file_sha256(data), dtype)
    out = Path(args.out) if args.out else Path("memreason-runs") / f"rebalance-{args.mode}-{key[:8]}"
    total = len(rbe.select_questions(questions, settings.limit)) * len(settings.conditions)
    print(f"model: {model_name} ({model.config.num_hidden_layers} layers, {dtype}, {model.device}); "
          f"data: {data} ({len(questions)} questions); out: {out}")
    with tqdm(total=total, unit="q", desc=f"rebalance eval ({args.mode})") as bar:
        summary = rbe.run_eval(model, tokenizer, questions, settings, out, model_name=model_name, data_path=data,
                               dtype=dtype, overwrite=args.overwrite, progress=bar.update)
    print()
    print(rbe.format_table(summary))
    print()
    print(f"wrote {out / 'summary.json'}, {out / 'per_question.csv'}, {out / 'per_question.jsonl'}")
    return 0
