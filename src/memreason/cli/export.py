"""``memreason export``: write a trained run as a plain Hugging Face checkpoint (and optionally GGUF), so
vLLM, llama.cpp, lm-evaluation-harness or plain transformers can use it without memreason."""

from __future__ import annotations

import argparse

GGUF_TYPES = ("f32", "f16", "q8_0")  # memreason.model.export.GGUF_TYPES (not imported: --help stays instant)
DTYPES = ("float32", "bfloat16", "float16")


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "export", help="write a trained run as a plain Hugging Face checkpoint (+ GGUF)",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n  memreason export runs/demo --out exports/demo\n"
               "  memreason export runs/demo --out exports/demo --gguf --gguf-type q8_0 --overwrite\n"
               "then: AutoModelForCausalLM.from_pretrained('exports/demo'), vllm serve exports/demo,\n"
               "      memreason eval --model exports/demo ...")
    parser.add_argument("run", help="a run directory written by `memreason train`")
    parser.add_argument("--out", required=True, help="the export directory (must be empty, or an earlier export "
                        "with --overwrite)")
    parser.add_argument("--checkpoint", default="best", help="best (default), last, or checkpoint-N")
    parser.add_argument("--gguf", action="store_true", help="also write model-<type>.gguf for llama.cpp "
                        "(llama-architecture models only)")
    parser.add_argument("--gguf-type", choices=GGUF_TYPES, default=None, help="GGUF weight type (default f32; "
                        "only with --gguf)")
    parser.add_argument("--dtype", choices=DTYPES, default="float32",
                        help="dtype of the safetensors weights (default float32: identical to memreason on a CPU)")
    parser.add_argument("--overwrite", action="store_true", help="replace an earlier export in --out")
    parser.set_defaults(func=run)


def run(args) -> int:
    from memreason.errors import ConfigError
    from memreason.model.export import export_run

    if args.gguf_type is not None and not args.gguf:
        raise ConfigError("--gguf-type needs --gguf")
    # export_run checks the run and --out before it loads anything
    result = export_run(args.run, args.out, checkpoint=args.checkpoint, gguf=args.gguf,
                        gguf_type=args.gguf_type or "f32", dtype=args.dtype, overwrite=args.overwrite)
    print(f"exported {args.run} ({args.checkpoint}) to {result.out_dir}")
    for name in result.files:
        size = (result.out_dir / name).stat().st_size
        print(f"  {name:<24} {size / 1e6:10.1f} MB" if size >= 1e5 else f"  {name:<24} {size / 1e3:10.1f} kB")
    print(f"generation stops at token ids {list(result.eos_token_ids)}; see {result.out_dir / 'README.md'}")
    if result.gguf is not None:
        print(f"GGUF: {result.gguf}")
    return 0
