"""``memreason <verb>``: one verb per capability, each a thin shell over the library.

Each verb lives in its own module under ``memreason.cli`` and exposes ``register(subparsers)``, which adds
its parser and sets ``func`` (called with the parsed namespace, returns an exit code). Heavy imports
(torch, transformers) happen inside the verb, so ``memreason --help`` is instant.

The CLI alone configures logging, draws progress bars and turns ``MemreasonError`` into one clear line
on stderr with exit code 2.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from memreason.errors import MemreasonError

# Verb modules, in the order --help lists them.
VERB_MODULES = ["demo", "train", "smoke", "data", "eval", "compare", "rebalance", "inject", "annotate", "serve", "inspect", "report",
                "world"]

EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="memreason",
        description="Make an LLM's knowledge recall and its reasoning separate, visible and repairable.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    subparsers = parser.add_subparsers(dest="verb", metavar="<verb>")
    for name in VERB_MODULES:
        importlib.import_module(f"memreason.cli.{name}").register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return EXIT_USER_ERROR
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("httpx", "httpx2", "urllib3", "filelock", "huggingface_hub"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        return int(args.func(args) or 0)
    except MemreasonError as exc:
        print(f"memreason {args.verb}: error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print(f"memreason {args.verb}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
