"""Tests for memreason.data.mmlu: the MMLU CSV loader, the subject table and the bundled sample."""

from __future__ import annotations

import csv
from collections import Counter

import pytest

from memreason.data import mmlu
from memreason.errors import DataError

HEADER = ["question", "A", "B", "C", "D", "answer", "subject"]
GOOD_ROW = ["What is 2 + 2?", "3", "4", "5", "6", "B", "elementary_mathematics"]


def write_csv(path, rows, header=HEADER):
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        if header:
            writer.writerow(header)
        writer.writerows(rows)
    return path


def test_bundled_sample_has_96_questions_balanced_over_categories_and_gold_letters():
    questions = mmlu.load_mmlu(mmlu.bundled_sample_path())
    assert len(questions) >= 80
    assert Counter(q.category for q in questions) == {c: 24 for c in mmlu.CATEGORIES}
    for category in mmlu.CATEGORIES:
        letters = Counter(q.answer for q in questions if q.category == category)
        assert letters == {"A": 6, "B": 6, "C": 6, "D": 6}


def test_bundled_sample_uses_mmlu_subjects_distinct_options_and_unique_questions():
    questions = mmlu.load_mmlu(mmlu.bundled_sample_path())
    assert all(q.subject in mmlu.SUBJECT_CATEGORIES for q in questions)
    assert all(len(set(q.options)) == 4 for q in questions)
    assert len({q.question for q in questions}) == len(questions)
    assert len({q.subject for q in questions}) >= 40


def test_subject_mapping_covers_the_57_mmlu_subjects_in_the_original_proportions():
    assert len(mmlu.SUBJECT_CATEGORIES) == 57
    assert Counter(mmlu.SUBJECT_CATEGORIES.values()) == {"STEM": 19, "humanities": 13, "social sciences": 12,
                                                        "other": 13}


def test_headerless_mmlu_file_takes_its_subject_from_the_file_name(tmp_path):
    path = write_csv(tmp_path / "high_school_physics_test.csv", [GOOD_ROW[:6], GOOD_ROW[:6]], header=None)
    questions = mmlu.load_mmlu(path)
    assert [q.qid for q in questions] == ["high_school_physics_test:0", "high_school_physics_test:1"]
    assert questions[0].subject == "high_school_physics" and questions[0].category == "STEM"
    assert questions[0].options == ("3", "4", "5", "6") and questions[0].answer == "B"


def test_directory_loads_every_csv_in_name_order(tmp_path):
    write_csv(tmp_path / "virology_test.csv", [GOOD_ROW[:6]], header=None)
    write_csv(tmp_path / "philosophy_test.csv", [GOOD_ROW[:6]], header=None)
    questions = mmlu.load_mmlu(tmp_path)
    assert [(q.subject, q.category) for q in questions] == [("philosophy", "humanities"), ("virology", "other")]


def test_category_column_supplies_the_category_of_a_subject_outside_mmlu(tmp_path):
    path = write_csv(tmp_path / "extra.csv", [GOOD_ROW[:6] + ["cooking", "other"]], header=HEADER + ["category"])
    assert mmlu.load_mmlu(path)[0].category == "other"


@pytest.mark.parametrize("row,header,message,record,field", [
    (GOOD_ROW[:5] + ["E", GOOD_ROW[6]], HEADER, "answer must be one of", 1, "answer"),
    (GOOD_ROW[:5] + ["AB", GOOD_ROW[6]], HEADER, "answer must be one of", 1, "answer"),
    (GOOD_ROW[:3] + ["", *GOOD_ROW[4:]], HEADER, "empty value", 1, "C"),
    (GOOD_ROW[:5], HEADER, "expected 7 columns, found 5", 1, None),
    (GOOD_ROW[:6] + ["cooking"], HEADER, "unknown MMLU subject 'cooking'", 1, "subject"),
    (GOOD_ROW[:6], HEADER[:6], "needs a 'subject' column", None, "subject"),
    (GOOD_ROW[:6] + ["cooking", "snacks"], HEADER + ["category"], "unknown category 'snacks'", 1, "category"),
])
def test_bad_rows_raise_a_data_error_naming_file_row_and_field(tmp_path, row, header, message, record, field):
    good = (GOOD_ROW + ["other"])[: len(header)]
    path = write_csv(tmp_path / "bad.csv", [good, row], header=header)
    with pytest.raises(DataError, match=message) as info:
        mmlu.load_mmlu(path)
    error = info.value
    assert error.file == str(path) and error.record == record
    assert error.field == field
    assert str(path) in str(error)


def test_missing_empty_and_header_only_files_are_data_errors(tmp_path):
    with pytest.raises(DataError, match="file not found"):
        mmlu.load_mmlu(tmp_path / "nope.csv")
    (tmp_path / "empty.csv").write_text("\n", encoding="utf-8")
    with pytest.raises(DataError, match="empty file"):
        mmlu.load_mmlu(tmp_path / "empty.csv")
    with pytest.raises(DataError, match="only a header"):
        mmlu.load_mmlu(write_csv(tmp_path / "header.csv", []))
    (tmp_path / "d").mkdir()
    with pytest.raises(DataError, match="no .csv files"):
        mmlu.load_mmlu(tmp_path / "d")


def test_non_utf8_file_is_a_data_error_naming_the_file(tmp_path):
    path = tmp_path / "latin1.csv"
    path.write_bytes("question,A,B,C,D,answer,subject\nCaf\xe9?,a,b,c,d,A,virology\n".encode("latin-1"))
    with pytest.raises(DataError, match="not UTF-8") as info:
        mmlu.load_mmlu(path)
    assert info.value.file == str(path)


def test_limit_takes_questions_round_robin_over_categories():
    questions = mmlu.load_mmlu(mmlu.bundled_sample_path())
    chosen = mmlu.select_questions(questions, 6)
    assert [q.category for q in chosen] == ["STEM", "humanities", "social sciences", "other", "STEM", "humanities"]
    assert mmlu.select_questions(questions, None) == questions
    assert mmlu.select_questions(questions, 500) == questions


def test_data_hash_changes_with_content_and_covers_every_csv_of_a_directory(tmp_path):
    first = write_csv(tmp_path / "virology_test.csv", [GOOD_ROW[:6]], header=None)
    alone = mmlu.file_sha256(first)
    assert mmlu.file_sha256(tmp_path) == alone  # a directory of that one file hashes the same
    write_csv(tmp_path / "philosophy_test.csv", [GOOD_ROW[:6]], header=None)
    assert mmlu.file_sha256(tmp_path) != alone
    write_csv(first, [GOOD_ROW[:5] + ["C"]], header=None)
    assert mmlu.file_sha256(first) != alone
