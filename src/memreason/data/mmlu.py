"""MMLU-format multiple-choice data: the loader, the subject → category table and the bundled sample.

This module owns reading questions, nothing about answering them (the task conventions are
``memreason.tasks.get_task("mmlu")``; the rebalancing experiment is ``memreason.experiments.rebalance_mmlu``):

* ``load_mmlu``: MMLU CSV files (header-less ``question,A,B,C,D,answer`` named ``<subject>_<split>.csv``, a
  directory of them, or a file with a header that adds a ``subject`` column, like the bundled sample),
  with each subject mapped to one of four categories. Bad rows raise ``DataError`` naming file, row, field.
* ``select_questions``: a category-balanced subset (round-robin), so a small limit still covers every category.
* ``file_sha256``: the identity of the data a run read (a file, or a directory's ``*.csv`` files).
* ``bundled_sample_path``: 96 MMLU-style questions written by the memreason team, 24 per category.
"""

from __future__ import annotations

import csv
import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from memreason.errors import DataError

LETTERS = ("A", "B", "C", "D")
CATEGORIES = ("STEM", "humanities", "social sciences", "other")
BUNDLED_SAMPLE = "mmlu_sample.csv"

# The four-way grouping of the 57 MMLU subjects used by the original evaluation (spec attention_rebalance.md
# §3.2: STEM 19, humanities 13, social sciences 12, other 13).
_CATEGORY_SUBJECTS = {
    "STEM": (
        "abstract_algebra anatomy astronomy college_biology college_chemistry college_computer_science "
        "college_mathematics college_physics computer_security conceptual_physics electrical_engineering "
        "elementary_mathematics high_school_biology high_school_chemistry high_school_computer_science "
        "high_school_mathematics high_school_physics high_school_statistics machine_learning"),
    "humanities": (
        "formal_logic high_school_european_history high_school_us_history high_school_world_history "
        "international_law jurisprudence logical_fallacies moral_disputes moral_scenarios philosophy "
        "prehistory professional_law world_religions"),
    "social sciences": (
        "econometrics high_school_geography high_school_government_and_politics high_school_macroeconomics "
        "high_school_microeconomics high_school_psychology human_sexuality professional_psychology "
        "public_relations security_studies sociology us_foreign_policy"),
    "other": (
        "business_ethics clinical_knowledge college_medicine global_facts human_aging management marketing "
        "medical_genetics miscellaneous nutrition professional_accounting professional_medicine virology"),
}
SUBJECT_CATEGORIES: dict[str, str] = {subject: category for category, subjects in _CATEGORY_SUBJECTS.items()
                                      for subject in subjects.split()}


@dataclass(frozen=True)
class Question:
    """One multiple-choice question.

    Attributes:
        qid (str): stable id, ``<file stem>:<row>`` (row = 0-based data row).
        subject (str): MMLU subject, e.g. ``high_school_physics``.
        category (str): one of ``CATEGORIES``.
        question (str): the question text.
        options (tuple[str, str, str, str]): option texts for A-D.
        answer (str): the gold letter.
    """

    qid: str
    subject: str
    category: str
    question: str
    options: tuple[str, ...]
    answer: str


def bundled_sample_path() -> Path:
    """Path of the bundled MMLU-style sample (96 questions written by the memreason team)."""
    return Path(__file__).resolve().parent / "bundled" / BUNDLED_SAMPLE


def category_of(subject: str) -> str | None:
    """The category of an MMLU subject, or None when the subject is unknown."""
    return SUBJECT_CATEGORIES.get(subject.strip().lower().replace(" ", "_"))


def _subject_from_filename(path: Path) -> str:
    stem = path.stem
    for suffix in ("_test", "_dev", "_val", "_validation", "_train"):
        if stem.endswith(suffix):
            return stem[: -len(suffix)]
    return stem


def load_mmlu(path: str | os.PathLike) -> list[Question]:
    """Load MMLU-format questions.

    Accepted inputs:

    * a header-less MMLU file ``<subject>_<split>.csv`` with rows ``question,A,B,C,D,answer``;
    * a CSV with a header naming ``question, A, B, C, D, answer`` and ``subject`` (any order; an optional
      ``category`` column overrides or supplies the category of subjects outside MMLU's 57);
    * a directory: every ``*.csv`` in it, in name order.

    Args:
        path (str | PathLike): file or directory.

    Returns:
        list[Question]: in file order.

    Raises:
        DataError: missing file, empty file, wrong column count, empty field, an answer that is not A-D,
            an unknown subject without a category, or a duplicate question id; the message names the file,
            the 0-based data row and the field.
    """
    path = Path(path)
    if path.is_dir():
        files = sorted(path.glob("*.csv"))
        if not files:
            raise DataError("no .csv files in this directory", file=str(path))
        return [question for file in files for question in _load_file(file)]
    if not path.is_file():
        raise DataError("file not found", file=str(path))
    return _load_file(path)


def _read_rows(path: Path) -> list[list[str]]:
    try:
        with path.open(newline="", encoding="utf-8-sig") as handle:
            rows = list(csv.reader(handle))
    except UnicodeDecodeError as exc:
        raise DataError(f"not UTF-8 text ({exc.reason})", file=str(path)) from None
    except csv.Error as exc:
        raise DataError(f"malformed CSV ({exc})", file=str(path)) from None
    rows = [row for row in rows if any(cell.strip() for cell in row)]
    if not rows:
        raise DataError("empty file", file=str(path))
    return rows


def _load_file(path: Path) -> list[Question]:
    rows = _read_rows(path)
    header = [cell.strip().lower() for cell in rows[0]]
    if {"question", "a", "b", "c", "d", "answer"} <= set(header):
        columns = {name: header.index(name) for name in header}
        if "subject" not in columns:
            raise DataError("a CSV with a header needs a 'subject' column", file=str(path), field="subject")
        data, width, fixed_subject = rows[1:], len(header), None
    else:
        columns = {"question": 0, "a": 1, "b": 2, "c": 3, "d": 4, "answer": 5}
        data, width, fixed_subject = rows, 6, _subject_from_filename(path)
    questions: list[Question] = []
    seen: set[str] = set()
    for index, row in enumerate(data):
        if len(row) != width:
            raise DataError(f"expected {width} columns, found {len(row)}", file=str(path), record=index)

        def get(name: str, row=row, index=index) -> str:
            value = row[columns[name]].strip()
            if not value:
                field_name = name.upper() if name in ("a", "b", "c", "d") else name
                raise DataError("empty value", file=str(path), record=index, field=field_name)
            return value

        answer = get("answer").upper()
        if answer not in LETTERS:
            raise DataError(f"answer must be one of A, B, C, D, got {row[columns['answer']]!r}", file=str(path),
                            record=index, field="answer")
        subject = fixed_subject or get("subject")
        category = None
        if "category" in columns and row[columns["category"]].strip():
            category = _canonical_category(row[columns["category"]], path, index)
        category = category or category_of(subject)
        if category is None:
            raise DataError(f"unknown MMLU subject {subject!r}; add a 'category' column with one of "
                            f"{', '.join(CATEGORIES)}", file=str(path), record=index, field="subject")
        qid = f"{path.stem}:{index}"
        if qid in seen:  # only possible across files with the same stem in different directories
            raise DataError(f"duplicate question id {qid}", file=str(path), record=index)
        seen.add(qid)
        questions.append(Question(qid=qid, subject=subject, category=category, question=get("question"),
                                  options=tuple(get(letter.lower()) for letter in LETTERS), answer=answer))
    if not questions:
        raise DataError("no questions (only a header)", file=str(path))
    return questions


def _canonical_category(value: str, path: Path, index: int) -> str:
    lowered = value.strip().lower()
    for category in CATEGORIES:
        if lowered == category.lower() or lowered == category.lower().replace(" ", "_"):
            return category
    raise DataError(f"unknown category {value!r}; use one of {', '.join(CATEGORIES)}", file=str(path),
                    record=index, field="category")


def select_questions(questions: Sequence[Question], limit: int | None) -> list[Question]:
    """The first ``limit`` questions taken round-robin across categories (file order within each), so a
    small limit still covers every category; all questions when ``limit`` is None."""
    if limit is None or limit >= len(questions):
        return list(questions)
    queues = {category: [q for q in questions if q.category == category] for category in CATEGORIES}
    chosen: list[Question] = []
    while len(chosen) < limit:
        for category in CATEGORIES:
            if queues[category] and len(chosen) < limit:
                chosen.append(queues[category].pop(0))
    return chosen


def file_sha256(path: str | os.PathLike) -> str:
    """SHA-256 of a file, or of a directory's ``*.csv`` files (names and contents, in name order)."""
    digest = hashlib.sha256()
    path = Path(path)
    for file in (sorted(path.glob("*.csv")) if path.is_dir() else [path]):
        digest.update(file.name.encode())
        digest.update(file.read_bytes())
    return digest.hexdigest()
