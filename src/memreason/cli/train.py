"""``memreason train``: fine-tune a model with memory/reason control tokens from a YAML recipe.

The recipe (configs/*.yaml) sets model, data, token scheme, fine-tuning mode, LoRA, optimiser and
validation; ``key=value`` overrides change any of it. The run directory (``output_dir``) receives the
adapter, the tokenizer with the added tokens, the resolved config, metrics.jsonl and curves.png; the best
checkpoint is chosen by accuracy on a validation split carved from the training data.
Multi-GPU: ``accelerate launch -m memreason.cli train --config ...`` (see configs/accelerate/).
"""

from __future__ import annotations

import argparse

EPILOG = """examples:
  memreason train --config configs/demo.yaml
  memreason train --config configs/demo.yaml optim.epochs=2 output_dir=runs/demo-2ep
  memreason train --config configs/demo.yaml scheme.n_special=0 output_dir=runs/demo-s0      # the S=0 ablation
  memreason train --config configs/paper/llama31_8b_strategyqa.yaml --resume
  accelerate launch --config_file configs/accelerate/ddp.yaml -m memreason.cli train --config configs/demo.yaml
"""


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "train", help="fine-tune with memory/reason control tokens (LoRA + new token rows)",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG)
    parser.add_argument("--config", default=None, help="YAML recipe (default: built-in defaults, i.e. SmolLM2 on "
                        "bundled:strategyqa)")
    parser.add_argument("--resume", action="store_true",
                        help="continue the run in output_dir from its last checkpoint (a finished run is kept as is)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="config overrides, e.g. optim.lr=1e-4 scheme.style=compact data.val_fraction=0.2")
    parser.set_defaults(func=run)


def run(args) -> int:
    import json
    import os

    from memreason.train import load_config, main

    cfg = load_config(args.config, args.overrides)
    run_dir = main(cfg, resume=args.resume, progress=not args.no_progress)
    if int(os.environ.get("RANK", "0")) != 0:  # under torchrun / accelerate only the first process reports
        return 0
    info_path = run_dir / "run.json"
    if info_path.is_file():
        info = json.loads(info_path.read_text())
        best = info.get("best") or {}
        if best:
            print(f"best checkpoint: {best.get('checkpoint')} (step {best.get('step')}): validation accuracy "
                  f"{best.get('val_accuracy', float('nan')):.3f}, format rate {best.get('val_format_rate', float('nan')):.3f} "
                  f"(n = {info['data']['n_val_generated']})")
    print(f"run: {run_dir}")
    return 0
