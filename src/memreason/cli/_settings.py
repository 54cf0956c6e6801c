"""Settings dataclasses as command lines: ``--config FILE``, dotted overrides, and one flag per field.

A verb's settings dataclass writes every default once. ``add_settings_arguments`` adds ``--config``, the
positional ``key=value`` overrides and a ``--flag`` for chosen fields whose argparse default is
*suppressed*, so a flag the user did not give never overrides the file; ``settings_from_args`` builds the
checked dataclass with ``memreason.config.load_settings`` (file, then flags, then overrides).
"""

from __future__ import annotations

import argparse
import dataclasses
import typing
from typing import Any, Callable, Sequence


def _flag_type(tp) -> Any:
    """What argparse should parse a flag as: bools become switches, everything else text (typed later)."""
    options = [a for a in typing.get_args(tp) if a is not type(None)] if typing.get_origin(tp) is not None else [tp]
    if typing.get_origin(tp) is typing.Literal:
        return str
    return bool if options == [bool] else str


def add_settings_arguments(parser: argparse.ArgumentParser, cls, flags: Sequence[str],
                           help: dict[str, str] | None = None, *, config_file: bool = True) -> None:
    """Add ``--config`` (unless ``config_file`` is False), ``overrides`` and ``--<field>`` flags for ``flags``
    (underscores become dashes).

    Each flag's help ends with the dataclass default, so the default is written in one place only.
    """
    help = help or {}
    defaults = {f.name: f.default for f in dataclasses.fields(cls) if f.default is not dataclasses.MISSING}
    hints = typing.get_type_hints(cls)
    if config_file:
        parser.add_argument("--config", default=None, metavar="FILE",
                            help="YAML settings file (keys as below; `defaults: base.yaml` includes another)")
    for name in flags:
        text = help.get(name, "")
        default = defaults.get(name, None)
        shown = f" (default: {default})" if name in defaults and default not in ("", None) else ""
        dest = f"set_{name}"
        if _flag_type(hints[name]) is bool:
            parser.add_argument(f"--{name.replace('_', '-')}", dest=dest, action="store_const", const="true",
                                default=argparse.SUPPRESS, help=f"{text}{shown}".strip())
        else:
            parser.add_argument(f"--{name.replace('_', '-')}", dest=dest, default=argparse.SUPPRESS,
                                metavar=name.upper(), help=f"{text}{shown}".strip())
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="dotted overrides of the keys above, applied last (e.g. seed=1)")


def settings_from_args(cls, args: argparse.Namespace, *, validate: Callable[[Any], list[str]] | None = None):
    """The checked settings: ``--config`` file, then the flags given, then ``key=value`` overrides.

    Raises:
        ConfigError: every problem found, at once.
    """
    from memreason.config import load_settings

    flags = [f"{key[4:]}={value}" for key, value in vars(args).items() if key.startswith("set_")]
    return load_settings(cls, getattr(args, "config", None), flags + list(getattr(args, "overrides", []) or []),
                         validate=validate)
