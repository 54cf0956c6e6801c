"""User-facing error types.

Library code raises these with a message that says what is wrong and how to fix it; only the CLI turns
them into one printed line and a non-zero exit code. Anything else that escapes is a bug in memreason.
"""

from __future__ import annotations


class MemreasonError(Exception):
    """Base class of every error a user can cause and fix (bad input, bad config, missing files)."""


class ConfigError(MemreasonError):
    """A configuration value is unknown, has the wrong type or is out of range."""


class ModelLoadError(MemreasonError):
    """A model or tokenizer could not be loaded (missing path, no hub access, corrupt checkpoint)."""


class DataError(MemreasonError):
    """A dataset record is malformed. The message names the file, the record index and the field.

    Args:
        problem (str): what is wrong, e.g. ``"missing field"``.
        file (str | None): the file (or dataset name) the record came from.
        record (int | None): 0-based index of the record in that file.
        field (str | None): the offending field.
    """

    def __init__(self, problem: str, *, file: str | None = None, record: int | None = None,
                 field: str | None = None):
        self.problem, self.file, self.record, self.field = problem, file, record, field
        where = []
        if file is not None:
            where.append(str(file))
        if record is not None:
            where.append(f"record {record}")
        if field is not None:
            where.append(f"field '{field}'")
        super().__init__(f"{', '.join(where)}: {problem}" if where else problem)
