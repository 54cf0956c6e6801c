"""Hugging Face ``datasets`` sources (``hf:<id or dir>[:config]``) and the column mappings that turn a hub
dataset's own columns into our record fields.

A dataset with our column names (``question``, ``answer``, optionally ``cot_steps`` / ``steps`` / ``id``)
loads as it is. Others load through a ``ColumnMapping``; the built-in presets cover the hub shapes of the
paper's three benchmarks and are picked automatically when a dataset's columns match (``columns="auto"``):

- ``commonsenseqa`` (``tau/commonsense_qa``): ``question`` + ``choices.label`` / ``choices.text`` rendered in
  the paper's file format (``Question: ... Options: A.bank B.library ...``), ``answerKey`` the answer.
  ``--split test`` reads the hub's ``validation`` split: the hub test split has no answers, and the paper
  evaluates on validation (its 1 221-question "test" file, spec disentangle.md §2.2).
- ``strategyqa`` (``ChilleD/StrategyQA``, ``wics/strategy-qa``): boolean ``answer`` -> ``"True"``/``"False"``,
  each of ``facts`` a memory step, ``qid`` the id; ``decomposition`` (sub-questions, not statements) and
  ``term`` go to ``meta``.
- ``truthfulqa-mc`` (``truthfulqa/truthful_qa``, config ``multiple_choice``): ``mc1_targets.choices`` inline
  as ``A. ... B. ...`` after the question, the option labelled 1 in ``mc1_targets.labels`` the answer. The
  hub lists the correct option first, so options are shuffled with a per-question seed (sha256 of the
  question; the paper's shuffle was unseeded, bug B13). The hub has one ``validation`` split of 817; the
  paper's split is by index, the first 80 % train and the rest test (653 / 164), and so is ours.

Reading a hub id needs the hub: ``HF_HUB_OFFLINE`` / ``HF_DATASETS_OFFLINE`` read only the local datasets
cache, and an unreachable hub fails within seconds with one ``DataError`` instead of half a minute of
retries.
"""

from __future__ import annotations

import hashlib
import logging
import os
import random
import re
import socket
import threading
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Iterable, Mapping
from urllib.parse import urlparse

from memreason.errors import DataError

logger = logging.getLogger(__name__)

AUTO = "auto"
NONE = "none"
PROBE_TIMEOUT_S = 3.0
_OFFLINE_VARS = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


@dataclass(frozen=True)
class ColumnMapping:
    """Which columns of a hub dataset hold our record's fields. Dotted names reach into struct columns
    (``choices.text``).

    Args:
        name (str): preset name, or ``"custom"``.
        question (str): the question column.
        answer (str | None): the answer column (a letter, a string or a boolean); unused with ``choice_correct``.
        id (str | None): the id column (default: a stable hash of the question).
        cot_steps (str | None): a column of paper-format ``"[tag]: text"`` steps.
        steps (str | None): a column of our ``{kind, text}`` steps.
        memory_steps (str | None): a column of fact strings, each read as a memory step.
        choice_texts (str | None): the options' texts; rendered into the question after the stem.
        choice_labels (str | None): the options' labels (default A, B, C, ...).
        choice_correct (str | None): 0/1 flags parallel to ``choice_texts``; the option flagged 1 is the answer.
        options_format ("csqa" | "inline"): ``Options: A.x B.y`` (CommonsenseQA files) or ``A. x B. y`` (TruthfulQA).
        question_prefix (str): put before the stem (``"Question: "`` as in the paper's CommonsenseQA files).
        shuffle_options (bool): shuffle options with a per-question seed (labels become A, B, ...).
        meta (tuple[str, ...]): columns copied into ``meta`` when present.
        task (str | None): the task these records belong to.
        split_aliases (tuple): (requested split, hub split) pairs.
        index_splits (tuple): (requested split, start fraction, end fraction) over ``source_split``'s rows.
        source_split (str | None): the hub split ``index_splits`` cut.
        detect (tuple[str, ...]): columns whose presence selects this preset under ``columns="auto"``.
    """

    name: str = "custom"
    question: str = "question"
    answer: str | None = "answer"
    id: str | None = None
    cot_steps: str | None = None
    steps: str | None = None
    memory_steps: str | None = None
    choice_texts: str | None = None
    choice_labels: str | None = None
    choice_correct: str | None = None
    options_format: str = "inline"
    question_prefix: str = ""
    shuffle_options: bool = False
    meta: tuple[str, ...] = ()
    task: str | None = None
    split_aliases: tuple[tuple[str, str], ...] = ()
    index_splits: tuple[tuple[str, float, float], ...] = ()
    source_split: str | None = None
    detect: tuple[str, ...] = ()

    def hub_split(self, split: str | None) -> str | None:
        if split is not None and split in {name for name, _, _ in self.index_splits}:
            return self.source_split
        return dict(self.split_aliases).get(split, split)

    def row_range(self, split: str | None, n: int) -> range:
        """The rows of the hub split that make up ``split`` (all of them unless ``index_splits`` cut it)."""
        for name, start, end in self.index_splits:
            if name == split:
                return range(int(start * n), int(end * n))
        return range(n)

    def to_record(self, row: Mapping[str, Any], index: int, where: dict) -> dict:
        """One hub row as a record in our field names (validated later by ``record_to_trace``).

        Raises:
            DataError: a mapped column is missing or has the wrong shape.
        """
        question = _get(row, self.question, where)
        record: dict[str, Any] = {}
        if self.choice_texts:
            question, record["answer"] = self._options(row, question, where)
        else:
            record["answer"] = _get(row, self.answer, where) if self.answer else None
        record["question"] = question
        if self.cot_steps:
            record["cot_steps"] = _get(row, self.cot_steps, where)
        elif self.steps:
            record["steps"] = _get(row, self.steps, where)
        elif self.memory_steps:
            facts = _get(row, self.memory_steps, where)
            facts = [facts] if isinstance(facts, str) else facts
            if not isinstance(facts, list):
                raise DataError(f"expected a list of strings, got {type(facts).__name__}", field=self.memory_steps,
                                **where)
            record["steps"] = [{"kind": "memory", "text": fact} for fact in facts]
        if self.id:
            record["id"] = _get(row, self.id, where)
        meta = {key: row[key] for key in self.meta if key in row}
        if meta:
            record["meta"] = meta
        return record

    def _options(self, row, stem, where) -> tuple[str, str | None]:
        texts = _get(row, self.choice_texts, where)
        if not isinstance(texts, list) or not texts or not all(isinstance(t, str) for t in texts):
            raise DataError("expected a non-empty list of option strings", field=self.choice_texts, **where)
        labels = _get(row, self.choice_labels, where) if self.choice_labels else None
        answer = _get(row, self.answer, where) if self.answer and not self.choice_correct else None
        order = list(range(len(texts)))
        if self.choice_correct:
            flags = _get(row, self.choice_correct, where)
            if not isinstance(flags, list) or len(flags) != len(texts) or flags.count(1) != 1:
                raise DataError("expected one 1 among 0/1 flags, one per option", field=self.choice_correct, **where)
            correct = flags.index(1)
        if self.shuffle_options:
            seed = int(hashlib.sha256(str(stem).encode("utf-8")).hexdigest()[:16], 16)
            random.Random(seed).shuffle(order)
        if labels is None or self.shuffle_options:
            labels = [chr(ord("A") + i) for i in range(len(texts))]
        elif not isinstance(labels, list) or len(labels) != len(texts):
            raise DataError("expected one label per option", field=self.choice_labels, **where)
        if self.choice_correct:
            answer = labels[order.index(correct)]
        sep = "" if self.options_format == "csqa" else " "
        options = " ".join(f"{label}.{sep}{texts[i]}" for label, i in zip(labels, order))
        lead = " Options: " if self.options_format == "csqa" else " "
        return f"{self.question_prefix}{str(stem).strip()}{lead}{options} ", answer


PRESETS: dict[str, ColumnMapping] = {
    "commonsenseqa": ColumnMapping(
        name="commonsenseqa", answer="answerKey", id="id", choice_texts="choices.text",
        choice_labels="choices.label", options_format="csqa", question_prefix="Question: ",
        meta=("question_concept",), task="commonsenseqa", split_aliases=(("test", "validation"),),
        detect=("question", "choices", "answerKey")),
    "strategyqa": ColumnMapping(
        name="strategyqa", id="qid", memory_steps="facts", meta=("term", "decomposition"), task="strategyqa",
        detect=("question", "answer", "facts", "decomposition")),
    "truthfulqa-mc": ColumnMapping(
        name="truthfulqa-mc", answer=None, choice_texts="mc1_targets.choices", choice_correct="mc1_targets.labels",
        shuffle_options=True, task="truthfulqa", index_splits=(("train", 0.0, 0.8), ("test", 0.8, 1.0)),
        source_split="validation", detect=("question", "mc1_targets")),
}
_SIMPLE_FIELDS = ("question", "answer", "id", "cot_steps", "steps", "memory_steps", "choice_texts", "choice_labels",
                  "choice_correct")


def _get(row: Mapping[str, Any], path: str, where: dict) -> Any:
    value: Any = row
    for part in path.split("."):
        if not isinstance(value, Mapping) or part not in value:
            have = ", ".join(sorted(row)) if isinstance(row, Mapping) else type(row).__name__
            raise DataError(f"no column {path!r} (the dataset has: {have}); pass --columns to map yours",
                            field=path, **where)
        value = value[part]
    return value


def parse_columns(spec: str | ColumnMapping | Mapping[str, str] | None) -> ColumnMapping | str | None:
    """Read a column-mapping choice.

    Args:
        spec: ``None`` / ``"auto"`` (a preset when the columns match one), ``"none"`` (our names as they
            are), a preset name, ``key=column`` pairs (``question=stem,answer=label``), a preset followed by
            pairs (``commonsenseqa,id=uid``), a dict of pairs, or a ``ColumnMapping``.

    Returns:
        ``AUTO``, ``None`` (our names) or a ``ColumnMapping``.

    Raises:
        DataError: unknown preset or field.
    """
    if spec is None or spec == AUTO:
        return AUTO
    if isinstance(spec, ColumnMapping):
        return spec
    if spec == NONE:
        return None
    base, pairs = ColumnMapping(), {}
    if isinstance(spec, Mapping):
        pairs = dict(spec)
    else:
        for i, item in enumerate(part.strip() for part in str(spec).split(",")):
            if "=" in item:
                key, _, value = item.partition("=")
                pairs[key.strip()] = value.strip() or None
            elif i == 0 and item in PRESETS:
                base = PRESETS[item]
            else:
                raise DataError(f"unknown column preset or pair {item!r}; use auto, none, {', '.join(PRESETS)}, "
                                f"or key=column with key one of {', '.join(_SIMPLE_FIELDS)}")
    unknown = sorted(set(pairs) - set(_SIMPLE_FIELDS))
    if unknown:
        raise DataError(f"unknown column mapping key(s) {', '.join(unknown)}; use {', '.join(_SIMPLE_FIELDS)}")
    if not pairs:
        return base
    return replace(base, name=f"{base.name}+custom" if base.name != "custom" else "custom", detect=(), **pairs)


def detect_preset(columns: Iterable[str]) -> ColumnMapping | None:
    """The preset whose ``detect`` columns are all present (None for datasets with our own step columns)."""
    have = set(columns)
    if have & {"cot_steps", "steps"}:
        return None
    for preset in PRESETS.values():
        if set(preset.detect) <= have:
            return preset
    return None


def _first_line(exc: Exception, limit: int = 160) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0][:limit] if lines else ""


def _offline_var() -> str | None:
    for var in _OFFLINE_VARS:
        if os.environ.get(var, "").strip().upper() in ("1", "ON", "YES", "TRUE"):
            return var
    return None


def _hub_address() -> tuple[str, int, str]:
    """(host, port, what) the hub is reached through: the https proxy when one is set, else HF_ENDPOINT."""
    proxy = os.environ.get("HTTPS_PROXY") or os.environ.get("https_proxy") or os.environ.get("ALL_PROXY")
    url = urlparse(proxy or os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    port = url.port or (443 if url.scheme == "https" else 80)
    return url.hostname or "", port, ("proxy " if proxy else "") + f"{url.hostname}:{port}"


def hub_reachable(timeout: float = PROBE_TIMEOUT_S) -> tuple[bool, str]:
    """Whether a TCP connection to the hub opens within ``timeout`` seconds (name lookup included)."""
    host, port, what = _hub_address()
    outcome: list[bool] = []

    def probe():
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            outcome.append(True)
        except OSError:
            outcome.append(False)

    # a thread, because a stuck name lookup ignores the socket timeout
    worker = threading.Thread(target=probe, daemon=True)
    worker.start()
    worker.join(timeout)
    return bool(outcome and outcome[0]), what


def _open_remote(datasets, name: str, config: str, spec: str):
    var = _offline_var()
    if var is None:
        ok, what = hub_reachable()
        if not ok:
            raise DataError(f"the Hugging Face hub is not reachable ({what}); on a machine with access run "
                            f"datasets.load_dataset({name!r}).save_to_disk(DIR) and pass hf:DIR, or set "
                            "HF_HUB_OFFLINE=1 to read the local datasets cache", file=spec)
    try:
        return datasets.load_dataset(name, config or None)
    except Exception as exc:  # datasets raises many types (network, missing config, missing cache, ...)
        hint = (f"{var} is set and it is not in the local datasets cache" if var
                else "check the dataset id and config")
        raise DataError(f"could not load the Hugging Face dataset: {hint} "
                        f"({type(exc).__name__}: {_first_line(exc)})",
                        file=spec) from None


def open_dataset(spec: str):
    """The ``datasets`` object (a ``Dataset`` or ``DatasetDict``) an ``hf:`` source names.

    Raises:
        DataError: no ``datasets`` package, a local path that is not a dataset, an unreachable hub.
    """
    try:
        import datasets
    except ImportError:
        raise DataError("reading 'hf:' datasets needs the 'datasets' package: pip install datasets") from None
    name, _, config = spec.partition(":")
    local = Path(name).expanduser()
    if local.is_dir():
        try:
            if (local / "dataset_info.json").is_file() or (local / "dataset_dict.json").is_file():  # save_to_disk
                return datasets.load_from_disk(str(local))
            return datasets.load_dataset(str(local), config or None)
        except Exception as exc:
            raise DataError(f"could not read the dataset directory ({type(exc).__name__}: {_first_line(exc)})",
                            file=spec) from None
    if local.exists():
        raise DataError("an hf: source is a dataset directory or hub id; pass a .json / .jsonl file without 'hf:'",
                        file=spec)
    if name.startswith((".", "/", "~")) or not _HUB_ID.match(name):
        raise DataError("directory not found (and not a hub id like owner/name)", file=spec)
    return _open_remote(datasets, name, config, spec)


def column_names(obj) -> list[str]:
    names = obj.column_names
    if isinstance(names, dict):  # DatasetDict: split -> columns
        names = next(iter(names.values()), [])
    return list(names)


def hf_rows(spec: str, split: str | None, columns: Any = AUTO) -> tuple[Iterable[tuple[int, Any]], ColumnMapping | None]:
    """The rows of an ``hf:`` source's split and the mapping that turns each into a record.

    A ``DatasetDict`` needs a split unless it has only one (or a ``train`` split, read by default).

    Returns:
        ((row index, row) pairs, mapping or None when the columns are ours)

    Raises:
        DataError: as ``open_dataset``; an unknown split.
    """
    import datasets

    obj = open_dataset(spec)
    mapping = parse_columns(columns)
    if mapping == AUTO:
        mapping = detect_preset(column_names(obj))
        if mapping is not None:
            logger.debug("%s: columns match the %s preset", spec, mapping.name)
    if mapping is None:
        have = column_names(obj)
        missing = [name for name in ("question", "answer") if name not in have]
        if missing:
            raise DataError(f"no column {missing[0]!r} (the dataset has: {', '.join(sorted(have))}) and no preset "
                            f"matches; pass --columns (e.g. question=COLUMN,answer=COLUMN) or one of "
                            f"{', '.join(PRESETS)}", file=spec)
    wanted = mapping.hub_split(split) if mapping else split
    if isinstance(obj, datasets.DatasetDict):
        available = list(obj)
        if wanted is None or (wanted not in obj and len(obj) == 1 and mapping and mapping.index_splits):
            wanted = available[0] if len(available) == 1 else "train" if "train" in obj else None
        if wanted not in obj:
            raise DataError(f"choose a split with --split: {', '.join(available)}" if wanted is None else
                            f"no split {wanted!r}; choose one of {', '.join(available)}", file=spec)
        obj = obj[wanted]
    rows = mapping.row_range(split, len(obj)) if mapping else range(len(obj))
    logger.debug("%s: %d of %d rows (split %s)", spec, len(rows), len(obj), wanted)

    def iterate():
        for index in rows:
            yield index, obj[index]

    return iterate(), mapping
