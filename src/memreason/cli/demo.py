"""``memreason demo``: the end-to-end demo on the embedded SmolLM2-135M.

1. fine-tunes the model with memory/reason control tokens (LoRA + new token rows) on the bundled
   StrategyQA-style train split, choosing the checkpoint on a validation split carved from it;
2. evaluates the untrained model (one worked example in the prompt: the paper's one-shot CoT baseline)
   and the trained run on the bundled held-out test split, greedily;
3. prints the comparison with 95% CIs and an exact McNemar test, and three answers with their memory and
   reason steps told apart.

A 135M-parameter model knows little, so expect modest accuracy: the numbers are printed as they are.
Re-running resumes: a finished training run and finished evaluations are reused.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

DEMO_CONFIG = Path(__file__).resolve().parents[3] / "configs" / "demo.yaml"


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "demo", help="train SmolLM2 with memory/reason tokens and compare it with the base model",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n  memreason demo\n  memreason demo --out runs/demo2 --limit 10")
    parser.add_argument("--out", default="runs/demo", help="where the run and the evaluations go (default runs/demo)")
    parser.add_argument("--config", default=str(DEMO_CONFIG), help="training recipe (default configs/demo.yaml)")
    parser.add_argument("--limit", type=int, default=None, help="evaluate only the first N test questions")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.set_defaults(func=run)


def _eval_args(model, out, limit, batch_size, shots):
    return argparse.Namespace(model=model, data="bundled:strategyqa", task=None, split="test", skip_invalid=False,
                              on_unknown_tag="error", out=str(out), batch_size=batch_size, max_new_tokens=192,
                              samples=1, temperature=0.7, top_p=0.95, seed=0, limit=limit, shots=shots,
                              prompt_style=None, overwrite=False, device="auto", dtype="auto")


def _pick_examples(rows: list[dict], k: int = 3) -> list[dict]:
    """Answers worth showing: parsed, with both memory and reason steps, correct ones first.

    Among those, traces whose steps are distinct and whole sentences come first: a 135M model sometimes
    repeats a step or emits a stray marker mid-sentence, and the table already counts those answers.
    Ties keep the file's order, so the choice is deterministic.
    """
    def rank(row: dict) -> tuple:
        texts = [step["text"] for step in row["steps"]]
        well_formed = len(set(texts)) == len(texts) and all(len(t.split()) >= 3 for t in texts)
        return row["outcome"] != "correct", not well_formed

    shown = [r for r in rows if r["n_memory"] and r["n_reason"] and r["predicted"] is not None]
    shown.sort(key=rank)
    rest = [r for r in rows if r not in shown]
    return (shown + rest)[:k]


def run(args) -> int:
    from memreason.cli._render import SUMMARY_HEADERS, format_row, format_table, summary_row
    from memreason.cli.compare import compare_results
    from memreason.cli.eval import run_eval
    from memreason.errors import ConfigError
    from memreason.evaluate import read_results
    from memreason.train import load_config, main as train_main

    start = time.perf_counter()
    out = Path(args.out)
    if not Path(args.config).is_file():
        raise ConfigError(f"demo recipe not found at {args.config}; run from a memreason checkout or pass --config")
    cfg = load_config(args.config, [f"output_dir={out / 'run'}"])
    print(f"[1/3] training SmolLM2-135M with memory/reason tokens → {out / 'run'}")
    run_dir = train_main(cfg, resume=True)
    trained_at = time.perf_counter()
    print(f"[2/3] evaluating the base model (one-shot CoT prompt) on the held-out questions")
    base, base_dir = run_eval(_eval_args(None, out / "eval-base", args.limit, args.batch_size, shots=1), "base")
    print(f"[3/3] evaluating the trained run on the same questions")
    trained, trained_dir = run_eval(_eval_args(str(run_dir), out / "eval-trained", args.limit, args.batch_size, 0),
                                    "trained")
    base_rows, trained_rows = read_results(base_dir / "results.jsonl"), read_results(trained_dir / "results.jsonl")
    paired = compare_results(base_rows, trained_rows)

    print()
    print(format_table(SUMMARY_HEADERS, [summary_row("base SmolLM2, 1-shot CoT", base),
                                         summary_row("memory/reason tokens (ours)", trained)]))
    print(f"\ntrained right where base wrong: {len(paired['gained'])}; base right where trained wrong: "
          f"{len(paired['lost'])}; exact McNemar p = {paired['p_mcnemar']:.3f} (n = {paired['n']})")
    print("\nThree answers from the trained model (every answer is in the trained results file):\n")
    for row in _pick_examples(trained_rows):
        print(format_row(row) + "\n")
    minutes = (time.perf_counter() - start) / 60
    print(f"wall time {minutes:.1f} min (training {(trained_at - start) / 60:.1f} min)")
    print(f"outputs: run {run_dir}\n         base results {base_dir / 'results.jsonl'}\n"
          f"         trained results {trained_dir / 'results.jsonl'}\n"
          f"         training curves {Path(run_dir) / 'curves.png'}")
    return 0
