"""``memreason <verb>``: one verb per capability, each a thin shell over the library.

Each verb lives in its own module under ``memreason.cli`` and exposes ``register(subparsers)``, which adds
its parser and sets ``func`` (called with the parsed namespace, returns an exit code). Heavy imports
(torch, transformers) happen inside the verb, so ``memreason --help`` is instant.

The CLI alone configures the console: log records become one readable line each (written through tqdm,
so they never break a progress bar), dependency warnings that are not the user's to act on are filtered
here (never in the library), argument errors and ``MemreasonError`` become one clear line on stderr with
exit code 2, and an unexpected failure becomes one line plus where to find the traceback (``-v``).
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
import warnings

from memreason.errors import MemreasonError

# Verb modules, in the order --help lists them.
VERB_MODULES = ["demo", "train", "smoke", "data", "eval", "compare", "rebalance", "inject", "annotate", "serve", "export", "inspect", "repair", "report",
                "world"]

EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130


EXIT_FAILURE = 1
# Libraries whose warnings and log chatter are not the user's to act on (deprecations, future changes).
_DEPENDENCIES = ("transformers", "peft", "torch", "accelerate", "datasets", "huggingface_hub", "tokenizers",
                 "httpx", "httpx2", "urllib3", "filelock", "matplotlib", "PIL", "gguf", "openai")


class _Parser(argparse.ArgumentParser):
    """An argument parser whose errors are one line naming the verb, the problem and where help is."""

    def error(self, message: str):
        self.exit(EXIT_USER_ERROR, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


class _ConsoleHandler(logging.Handler):
    """One line per log record, through ``tqdm.write`` so an open progress bar is redrawn below it."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            message = record.getMessage()
            if record.levelno >= logging.WARNING:
                message = f"{record.levelname.lower()}: {message}"
            from tqdm import tqdm

            tqdm.write(message, file=sys.stderr)
        except Exception:  # noqa: BLE001 - a log line must never take the command down
            self.handleError(record)


def configure_console(verbose: bool = False) -> None:
    """Readable logging and quiet dependencies for a CLI process (never called by the library)."""
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    root = logging.getLogger()
    # replace an earlier console handler (main called twice in one process), keep any other (e.g. pytest's)
    root.handlers[:] = [h for h in root.handlers if not isinstance(h, _ConsoleHandler)] + [_ConsoleHandler()]
    root.setLevel(logging.DEBUG if verbose else logging.INFO)
    for name in _DEPENDENCIES:
        logging.getLogger(name).setLevel(logging.DEBUG if verbose else logging.ERROR)
    if not verbose:
        for category in (FutureWarning, DeprecationWarning, UserWarning):
            for name in _DEPENDENCIES:
                warnings.filterwarnings("ignore", category=category, module=rf"{name}(\.|$)")
        _no_loading_bars()


def _no_loading_bars() -> None:
    """Hide transformers' own bars ("Loading weights" at every model load) but keep the hub's download bars."""
    from huggingface_hub.utils import are_progress_bars_disabled, enable_progress_bars
    from transformers.utils import logging as transformers_logging

    hub_bars = not are_progress_bars_disabled()
    transformers_logging.disable_progress_bar()  # also turns the hub's off ...
    if hub_bars:
        enable_progress_bars()  # ... so they come back unless the user had disabled them


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="memreason",
        description="Make an LLM's knowledge recall and its reasoning separate, visible and repairable.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    subparsers = parser.add_subparsers(dest="verb", metavar="<verb>", parser_class=_Parser)
    for name in VERB_MODULES:
        importlib.import_module(f"memreason.cli.{name}").register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return EXIT_USER_ERROR
    configure_console(args.verbose)
    try:
        return int(args.func(args) or 0)
    except MemreasonError as exc:
        print(f"memreason {args.verb}: error: {_one_line(exc)}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print(f"memreason {args.verb}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as exc:  # noqa: BLE001 - a bug in memreason: one line, the traceback only with -v
        if args.verbose:
            raise
        print(f"memreason {args.verb}: internal error: {type(exc).__name__}: {_one_line(exc)} "
              "(a bug in memreason; rerun with -v for the traceback and report it)", file=sys.stderr)
        return EXIT_FAILURE


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
