"""Checks on ``--out`` paths that verbs run before any work, so a mistake costs one line, not a finished
computation (``report`` and ``inspect``; a candidate for ``memreason.io``)."""

from __future__ import annotations

import os
from pathlib import Path

from memreason.errors import ConfigError


def check_writable(path: str | os.PathLike, *, directory: bool) -> Path:
    """Refuse an output path that cannot be written, creating nothing.

    Args:
        path: the output file (``directory=False``) or output directory (``directory=True``).
        directory (bool): which of the two ``path`` must be.

    Returns:
        Path: ``path``.

    Raises:
        ConfigError: a file where a directory is wanted or the reverse, a path under a file, or a
            directory that is not writable.
    """
    path = Path(path)
    if directory and path.exists() and not path.is_dir():
        raise ConfigError(f"--out {path} is a file; give a directory")
    if not directory and path.is_dir():
        raise ConfigError(f"--out {path} is a directory; give a file path")
    # the nearest existing directory is where the first file or directory will be created
    ancestor = path if directory else path.parent
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise ConfigError(f"cannot write --out {path}: {ancestor} is a file, not a directory")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise ConfigError(f"cannot write --out {path}: {ancestor} is not writable")
    return path
