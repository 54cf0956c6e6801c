import json
import os

import pytest

from memreason.errors import ConfigError, DataError
from memreason.io import (OutputDir, append_jsonl, atomic_write, drop_torn_tail, read_json, read_jsonl,
                          settings_digest, write_json)


def test_atomic_write_replaces_the_file_and_leaves_no_temporary_file(tmp_path):
    path = tmp_path / "a" / "b.json"
    write_json(path, {"x": 1})
    atomic_write(path, "new")
    assert path.read_text() == "new" and os.listdir(path.parent) == ["b.json"]


def test_atomic_write_refuses_a_directory_and_a_path_under_a_file_with_one_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="is a directory"):
        atomic_write(tmp_path, "x")
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError, match="is a file, not a directory"):
        atomic_write(tmp_path / "file" / "out.json", "x")


@pytest.mark.parametrize("content", [b"", b"one line of notes\n", b"not json", b'{"a": 1}\n{"b": ', b"\xff\xfe\x00",
                                     b'{"a": 1}\n[1, 2]\n', b'{"a"\n{"b": 2}\n'])
def test_read_jsonl_never_changes_the_file_it_reads(tmp_path, content):
    path = tmp_path / "f.jsonl"
    path.write_bytes(content)
    try:
        read_jsonl(path)
    except DataError:
        pass
    assert path.read_bytes() == content


def test_read_jsonl_skips_only_a_torn_last_line_and_names_the_line_of_other_corruption(tmp_path):
    path = tmp_path / "f.jsonl"
    path.write_text('{"a": 1}\n\n{"b": 2}\n{"c": ')
    assert read_jsonl(path) == [{"a": 1}, {"b": 2}]
    path.write_text('{"a": 1}\nnot json\n')  # ends with a newline: not an interrupted append
    with pytest.raises(DataError, match=r"f.jsonl:2 is not a JSON line"):
        read_jsonl(path)
    path.write_bytes(b'{"a": 1}\n\xff\n')
    with pytest.raises(DataError, match="f.jsonl:2 is not UTF-8"):
        read_jsonl(path)
    with pytest.raises(DataError, match="not found"):
        read_jsonl(tmp_path / "missing.jsonl")
    with pytest.raises(DataError, match="is a directory"):
        read_jsonl(tmp_path)


def test_drop_torn_tail_cuts_exactly_the_interrupted_line_and_append_continues(tmp_path):
    path = tmp_path / "rows.jsonl"
    append_jsonl(path, [{"i": 0}, {"i": 1}])
    clean = path.read_bytes()
    assert drop_torn_tail(path) == 0 and path.read_bytes() == clean
    with open(path, "ab") as handle:
        handle.write(b'{"i": 2, "te')
    assert drop_torn_tail(path) == len(b'{"i": 2, "te') and path.read_bytes() == clean
    append_jsonl(path, [{"i": 2}])
    assert read_jsonl(path) == [{"i": 0}, {"i": 1}, {"i": 2}]


def test_output_dir_resumes_with_the_same_settings_and_refuses_others(tmp_path):
    first = OutputDir(tmp_path / "out", {"seed": 0}, outputs=("rows.jsonl",))
    append_jsonl(first.file("rows.jsonl"), [{"id": "a"}])
    again = OutputDir(tmp_path / "out", {"seed": 0}, outputs=("rows.jsonl",))
    assert again.resume_rows("rows.jsonl") == [{"id": "a"}]
    assert read_json(again.config_path)["config_hash"] == settings_digest({"seed": 0})
    with pytest.raises(ConfigError, match="different settings"):
        OutputDir(tmp_path / "out", {"seed": 1}, outputs=("rows.jsonl",))
    fresh = OutputDir(tmp_path / "out", {"seed": 1}, overwrite=True, outputs=("rows.jsonl",))
    assert fresh.resume_rows("rows.jsonl") == []
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError, match="is a file"):
        OutputDir(tmp_path / "file", {})


def test_settings_digest_is_stable_and_order_independent():
    assert settings_digest({"a": 1, "b": [1, 2]}) == settings_digest({"b": [1, 2], "a": 1})
    assert settings_digest({"a": 1}) != settings_digest({"a": 2})
    # the digest is the one earlier versions wrote (sorted JSON, SHA-256, 16 hex digits)
    import hashlib
    assert settings_digest({"a": 1}) == hashlib.sha256(json.dumps({"a": 1}, sort_keys=True).encode()).hexdigest()[:16]
