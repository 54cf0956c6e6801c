"""``memreason train``: fine-tune a model with memory/reason control tokens from a YAML recipe.

The recipe (configs/*.yaml) sets model, data, token scheme, fine-tuning mode, LoRA, optimiser and
validation; ``key=value`` overrides change any of it. The run directory (``output_dir``) receives the
adapter, the tokenizer with the added tokens, the resolved config, metrics.jsonl and curves.png; the best
checkpoint is chosen by accuracy on a validation split carved from the training data. Training logs one
line per log event (``step 12/24  loss 2.478  lr 1.9e-3  grad-norm 0.84``) above the progress bar, and to
TensorBoard / W&B / ... with ``report_to=[tensorboard]``. A run stopped by an error or Ctrl-C is marked so
in run.json: rerun it (nothing was checkpointed yet) or continue it with ``--resume``.
Multi-GPU: ``accelerate launch -m memreason.cli train --config ...`` (see configs/accelerate/).
"""

from __future__ import annotations

import argparse

EPILOG = """examples:
  memreason train --config configs/demo.yaml
  memreason train --config configs/demo.yaml optim.epochs=2 output_dir=runs/demo-2ep
  memreason train --config configs/demo.yaml scheme.n_special=0 output_dir=runs/demo-s0      # the S=0 ablation
  memreason train --config configs/paper/llama31_8b_strategyqa.yaml --resume
  memreason train --config configs/demo.yaml report_to=[tensorboard] trainer_args.optim=adamw_torch_fused
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
    import math
    import os

    from memreason.model.runs import RunInfo, is_run_dir
    from memreason.train import load_config, main

    cfg = load_config(args.config, args.overrides)
    # memreason.cli's console handler writes each log line through tqdm, above the progress bar
    run_dir = main(cfg, resume=args.resume, progress=not args.no_progress)
    if int(os.environ.get("RANK", "0")) != 0:  # under torchrun / accelerate only the first process reports
        return 0
    if is_run_dir(run_dir):
        info = RunInfo.from_json(run_dir)
        best = info.best
        if best:
            def rate(value):
                return math.nan if value is None else value

            print(f"best checkpoint: {best.checkpoint} (step {best.step}): validation accuracy "
                  f"{rate(best.val_accuracy):.3f}, format rate {rate(best.val_format_rate):.3f} "
                  f"(n = {info.data['n_val_generated']})")
    print(f"run: {run_dir}")
    return 0
