"""The one I/O layer: atomic writes, JSONL rows, and resumable output directories.

* ``atomic_write`` / ``write_json``: a file is either its old content or its new content, never half of
  either (write to a temporary file beside it, fsync, rename).
* ``read_jsonl``: rows of a JSONL file. A read never writes: a torn last line (a kill mid-append) is
  skipped with a warning and the file is left byte for byte as it was.
* ``append_jsonl``: one ``write`` per call plus fsync, so a kill loses at most the rows in flight.
* ``drop_torn_tail``: the only place a file is truncated. Only a writer resuming *its own* output calls
  it, just before appending again.
* ``settings_digest`` / ``OutputDir``: an output directory remembers the settings that made its rows;
  resuming with other settings is refused instead of mixing rows of two configurations.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any, Iterable

from memreason.errors import ConfigError, DataError

logger = logging.getLogger(__name__)


def _ensure_parent(path: Path) -> None:
    parent = path.parent
    if parent.exists() and not parent.is_dir():
        raise ConfigError(f"cannot write {path}: {parent} is a file, not a directory")
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except NotADirectoryError:
        raise ConfigError(f"cannot write {path}: a parent of it is a file, not a directory") from None
    except PermissionError:
        raise ConfigError(f"cannot write {path}: permission denied on {parent}") from None


def ensure_dir(path: str | os.PathLike) -> Path:
    """``path`` as an existing, writable directory (created with its parents when missing).

    Raises:
        ConfigError: it is a file, a parent is a file, or it cannot be created or written.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ConfigError(f"output directory {path} is a file; give a directory path")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except (NotADirectoryError, FileExistsError):
        raise ConfigError(f"cannot create output directory {path}: a parent of it is a file") from None
    except PermissionError:
        raise ConfigError(f"cannot create output directory {path}: permission denied") from None
    if not os.access(path, os.W_OK):
        raise ConfigError(f"output directory {path} is not writable")
    return path


def atomic_write(path: str | os.PathLike, data: str | bytes) -> None:
    """Replace ``path`` with ``data`` (text is written as UTF-8) so that readers never see a partial file.

    Raises:
        ConfigError: the path is a directory, under a file, or not writable.
    """
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"cannot write {path}: it is a directory; give a file path")
    _ensure_parent(path)
    payload = data.encode("utf-8") if isinstance(data, str) else data
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except PermissionError:
        raise ConfigError(f"cannot write {path}: permission denied on {path.parent}") from None
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(payload)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _json_default(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.asdict(value)
    if isinstance(value, (Path, set, frozenset, tuple)):
        return str(value) if isinstance(value, Path) else list(value)
    if hasattr(value, "item"):  # numpy / torch scalars
        return value.item()
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def to_json(obj: Any, *, indent: int | None = None) -> str:
    """``json.dumps`` that also writes dataclasses, paths, tuples and numpy/torch scalars."""
    return json.dumps(obj, indent=indent, ensure_ascii=False, default=_json_default)


def write_json(path: str | os.PathLike, obj: Any, *, indent: int = 1) -> None:
    """Atomically write ``obj`` as JSON (see ``to_json`` for what it accepts)."""
    atomic_write(path, to_json(obj, indent=indent) + "\n")


def read_json(path: str | os.PathLike, *, what: str = "JSON file") -> Any:
    """The parsed content of a JSON file.

    Raises:
        DataError: missing, a directory, not UTF-8, or not JSON (with line and column).
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DataError(f"{what} not found: {path}") from None
    except IsADirectoryError:
        raise DataError(f"{path} is a directory; expected a {what}") from None
    except UnicodeDecodeError:
        raise DataError(f"{path} is not UTF-8 text; expected a {what}") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataError(f"{path} is not valid JSON (line {exc.lineno}, column {exc.colno}: {exc.msg})") from None
    except RecursionError:
        raise DataError(f"{path} nests JSON too deeply to be a {what}") from None


def _split_jsonl(path: Path, data: bytes) -> tuple[list[Any], int | None]:
    """Rows of ``data`` and the byte offset of a torn last line (None when the file ends cleanly)."""
    rows: list[Any] = []
    offset = 0
    lines = data.split(b"\n")
    for number, line in enumerate(lines, start=1):
        end = offset + len(line)
        if line.strip():
            try:
                rows.append(json.loads(line.decode("utf-8")))
            except RecursionError:
                raise DataError(f"{path}:{number} nests JSON too deeply") from None
            except UnicodeDecodeError:
                raise DataError(f"{path}:{number} is not UTF-8 text; expected JSON lines") from None
            except json.JSONDecodeError as exc:
                # Only a last line that no newline ends can be an interrupted append.
                if number == len(lines) and not data.endswith(b"\n"):
                    return rows, offset
                raise DataError(f"{path}:{number} is not a JSON line ({exc.msg}, column {exc.colno})") from None
        offset = end + 1
    return rows, None


def read_jsonl(path: str | os.PathLike, *, what: str = "JSONL file") -> list[Any]:
    """Every row of a JSONL file, in file order. Never writes.

    A last line with no newline that is not valid JSON is an interrupted append: it is skipped with a
    warning (the writer that owns the file repairs it on resume). Blank lines are skipped.

    Raises:
        DataError: the file is missing or a directory, a line other than a torn last one is not JSON,
            or the file is not UTF-8 — naming the file and line.
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise DataError(f"{what} not found: {path}") from None
    except IsADirectoryError:
        raise DataError(f"{path} is a directory; expected a {what}") from None
    rows, torn = _split_jsonl(path, data)
    if torn is not None:
        if not rows:
            # nothing but one unfinished line: not a file some run of ours was appending to
            raise DataError(f"{path} holds no complete JSON line; expected a {what}")
        logger.warning("%s: ignoring a torn last line (an interrupted write)", path)
    return rows


def drop_torn_tail(path: str | os.PathLike) -> int:
    """Cut an interrupted last line off a JSONL file this process is about to append to.

    Only the writer of ``path`` may call this, on its own output, when resuming.

    Returns:
        int: the number of bytes removed (0 when the file ends cleanly or does not exist).
    """
    path = Path(path)
    if not path.exists():
        return 0
    data = path.read_bytes()
    _, torn = _split_jsonl(path, data)
    if torn is None:
        return 0
    logger.warning("%s: dropping a torn last line left by an interrupted run", path)
    with open(path, "r+b") as handle:
        handle.truncate(torn)
    return len(data) - torn


def append_jsonl(path: str | os.PathLike, rows: Iterable[Any]) -> None:
    """Append rows to a JSONL file with one ``write`` and an fsync (a kill loses at most this call)."""
    path = Path(path)
    payload = "".join(to_json(row) + "\n" for row in rows).encode("utf-8")
    if not payload:
        return
    _ensure_parent(path)
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, payload)
        os.fsync(fd)
    finally:
        os.close(fd)


def csv_text(rows: list[dict]) -> str:
    """Rows (dicts with the same keys) as CSV text with a header, for ``atomic_write``."""
    import csv
    import io as _io

    buffer = _io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(rows[0]) if rows else [], lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


def settings_digest(settings: Any) -> str:
    """A short stable hash of settings (a dataclass or JSON-ready value): 16 hex digits of SHA-256."""
    if dataclasses.is_dataclass(settings) and not isinstance(settings, type):
        settings = dataclasses.asdict(settings)
    blob = json.dumps(settings, sort_keys=True, default=_json_default)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:16]


class OutputDir:
    """A resumable output directory whose rows were all made with one set of settings.

    ``settings`` are written to ``config_name`` with their digest. Opening a directory that holds another
    digest is refused (pass ``overwrite=True`` to start again, which removes the listed ``outputs``).

    Args:
        path: the directory (created if missing).
        settings: a dataclass or JSON-ready mapping; what decides the content of the rows.
        overwrite (bool, default False): discard earlier outputs instead of resuming.
        config_name (str, default "config.json"): the file that records the settings.
        digest_key (str, default "config_hash"): the key of the digest inside that file.
        outputs (tuple[str, ...]): files that ``overwrite`` removes.

    Raises:
        ConfigError: the path is a file, not writable, or holds outputs made with other settings.
    """

    def __init__(self, path: str | os.PathLike, settings: Any, *, overwrite: bool = False,
                 config_name: str = "config.json", digest_key: str = "config_hash",
                 outputs: tuple[str, ...] = ()):
        self.path = ensure_dir(path)
        self.settings = dataclasses.asdict(settings) if dataclasses.is_dataclass(settings) else settings
        self.digest = settings_digest(self.settings)
        self.config_path = self.path / config_name
        if overwrite:
            for name in outputs:
                (self.path / name).unlink(missing_ok=True)
        elif self.config_path.exists() and any((self.path / name).exists() for name in outputs or (config_name,)):
            previous = self._previous(digest_key)
            if settings_digest(previous) != self.digest:
                changed = sorted(k for k in set(previous) | set(self.settings)
                                 if previous.get(k) != json.loads(to_json(self.settings)).get(k))
                detail = f" ({', '.join(changed)} differ)" if changed and len(changed) <= 8 else ""
                raise ConfigError(f"{self.path} holds results made with different settings{detail}; use the same "
                                  "settings to resume, choose another output directory or pass --overwrite")
        write_json(self.config_path, {digest_key: self.digest, **self.settings})

    def _previous(self, digest_key: str) -> dict:
        """The settings recorded by an earlier run (a file without a digest key is the settings alone)."""
        try:
            data = json.loads(self.config_path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError, OSError):
            return {}
        if not isinstance(data, dict):
            return {}
        return {k: v for k, v in data.items() if k != digest_key}

    def file(self, name: str) -> Path:
        return self.path / name

    def resume_rows(self, name: str) -> list[Any]:
        """The rows already in ``name`` (after repairing an interrupted last line of our own output)."""
        path = self.file(name)
        if not path.exists():
            return []
        drop_torn_tail(path)
        return read_jsonl(path)
