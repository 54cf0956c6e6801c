"""Two-hop prompt sets for memory injection: the original CSV format, the word lists of the random-word
control, and the scored answer token.

The memory-injection experiment (spec/memory_injection.md §3) reads one row per two-hop item: an explicit
one-hop prompt that names the bridge entity, an obscure two-hop prompt that only describes it, the bridge
entity itself (the memory to inject) and the answer. ``load_prompts`` reads that format (the bundled
``two_hop.csv`` by default); ``load_pos_words`` reads a ``word,pos`` list (the bundled ``pos_words.csv``);
``answer_token`` picks the token that is scored.
"""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from memreason.errors import DataError

REQUIRED_COLUMNS = ("explicit_sentence", "obscure_sentence", "explicit_entity", "answer")
# The original 100-row file spells two columns differently (spec §3.1); its loader renamed them.
COLUMN_ALIASES = {"explicit_sent": "explicit_sentence", "obscure_sent": "obscure_sentence"}


@dataclass(frozen=True)
class PromptItem:
    """One two-hop item.

    Attributes:
        index (int): 0-based record index in the source file.
        explicit (str): the one-hop prompt that names the bridge entity.
        obscure (str): the two-hop prompt that only describes it (the prompt injection tries to repair).
        memory (str): the bridge entity (``explicit_entity``), injected as the memory.
        obscure_entity (str | None): the description of the bridge entity, when the file has it.
        answer (str): the answer with one leading space, as scored after the prompt.
    """

    index: int
    explicit: str
    obscure: str
    memory: str
    obscure_entity: str | None
    answer: str


def bundled_file(name: str) -> Path:
    """Path of a file shipped in ``memreason/data/bundled``."""
    return Path(str(resources.files("memreason") / "data" / "bundled" / name))


def _open_csv(path: Path, encoding: str):
    """Open a CSV file for reading, or raise the one line that says what is wrong with the path."""
    if path.is_dir():
        raise DataError("is a directory; give a CSV file", file=str(path))
    if not path.is_file():
        raise DataError("file not found", file=str(path))
    return path.open(newline="", encoding=encoding)


def load_prompts(path: str | os.PathLike | None = None) -> list[PromptItem]:
    """Read prompts in the original CSV format (spec §3): explicit/obscure sentence, entities, answer.

    Extra columns (an unnamed index, ``fact1``/``fact2``) are ignored; ``explicit_sent``/``obscure_sent`` are
    accepted as the 100-row file spells them. A leading space is added to every answer, as the original
    loader did, so the scored token is the answer's in-sentence form.

    Args:
        path (str | PathLike | None): the CSV file; None = the bundled two-hop set.

    Returns:
        list[PromptItem]: one per row.

    Raises:
        DataError: missing file, a directory, not UTF-8 or not CSV, missing columns, or an empty required
            field (naming file, record, field).
    """
    path = Path(path) if path is not None else bundled_file("two_hop.csv")
    try:
        with _open_csv(path, "utf-8-sig") as handle:  # -sig: tolerate a spreadsheet's BOM
            return _read_prompts(path, csv.DictReader(handle))
    except UnicodeDecodeError:
        raise DataError("not UTF-8 text; expected a CSV file", file=str(path)) from None
    except csv.Error as exc:
        raise DataError(f"not a readable CSV file ({exc})", file=str(path)) from None


def _read_prompts(path: Path, reader: csv.DictReader) -> list[PromptItem]:
    header = [COLUMN_ALIASES.get(h.strip(), h.strip()) for h in (reader.fieldnames or [])]
    missing = [c for c in REQUIRED_COLUMNS if c not in header]
    if missing:
        raise DataError(f"missing column(s) {', '.join(missing)}; the file needs "
                        f"{', '.join(REQUIRED_COLUMNS)} (obscure_entity optional)", file=str(path))
    reader.fieldnames = header
    items = []
    for i, row in enumerate(reader):
        values = {k: (v or "").strip() for k, v in row.items() if k is not None}
        for column in REQUIRED_COLUMNS:
            if not values.get(column):
                raise DataError("empty value", file=str(path), record=i, field=column)
        items.append(PromptItem(index=i, explicit=values["explicit_sentence"],
                                obscure=values["obscure_sentence"], memory=values["explicit_entity"],
                                obscure_entity=values.get("obscure_entity") or None,
                                answer=" " + values["answer"]))
    if not items:
        raise DataError("no rows", file=str(path))
    return items


def load_pos_words(path: str | os.PathLike | None = None) -> dict[str, list[str]]:
    """Read a ``word,pos`` CSV (default: the bundled list) into ``{pos: [words]}``.

    Raises:
        DataError: missing file, a directory, not UTF-8, or missing columns.
    """
    path = Path(path) if path is not None else bundled_file("pos_words.csv")
    words: dict[str, list[str]] = {}
    try:
        with _open_csv(path, "utf-8") as handle:
            reader = csv.DictReader(handle)
            if not {"word", "pos"} <= set(reader.fieldnames or []):
                raise DataError("missing column(s): needs word,pos", file=str(path))
            for row in reader:
                if row["word"].strip():
                    words.setdefault(row["pos"].strip(), []).append(row["word"].strip())
    except UnicodeDecodeError:
        raise DataError("not UTF-8 text; expected a CSV file", file=str(path)) from None
    return words


def answer_token(tokenizer, answer: str) -> int:
    """The scored target: the first token of ``answer`` (with its leading space) that is not whitespace only.

    SentencePiece tokenizers split " Dutch" into ['▁', '▁Dutch']; scoring the bare '▁' invalidated the
    original Llama-2 results (spec §7 item 9).

    Raises:
        DataError: the answer has no non-whitespace token.
    """
    for token in tokenizer(answer, add_special_tokens=False)["input_ids"]:
        if tokenizer.decode([token]).strip():
            return int(token)
    raise DataError(f"answer {answer!r} has no non-whitespace token")
