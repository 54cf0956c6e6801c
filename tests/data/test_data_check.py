"""``memreason data check`` (cli/data.py) and the one validated load behind it (``loaders.load_dataset``):
what it prints on each paper file shape, and that it refuses what ``eval`` and ``train`` refuse."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from memreason.cli import main
from memreason.data import loaders
from memreason.data.loaders import DEFAULT_TASK, load_dataset
from memreason.errors import ConfigError, DataError

FIXTURES = Path(__file__).parent / "fixtures"
GOOD = {"question": "Is ice lighter than water?", "answer": "True",
        "cot_steps": ["[rag]: Ice is less dense than liquid water.", "[reason]: So it floats: True."], "split": "train"}


def _write(tmp_path, records, name="d.json"):
    path = tmp_path / name
    path.write_text(records if isinstance(records, str) else json.dumps(records), encoding="utf-8")
    return path


def _check(capsys, *argv):
    code = main(["data", "check", *map(str, argv)])
    out, err = capsys.readouterr()
    return code, out, err


# what `data check` prints on each fixture shape (the closing report quotes these lines)
SUMMARIES = [
    ("strategyqa_train.json", "strategyqa", "7 records loaded; 2 without steps; 3 empty steps dropped; "
     "1 compound-tag steps read as first (reason x1)", "usable: 7 for evaluation; 5 for training (2 without usable steps left out)"),
    ("strategyqa_test.json", "strategyqa", "5 records loaded; 1 without steps; 2 compound-tag steps read as first (reason x2)",
     "usable: 5 for evaluation; 4 for training (1 without usable steps left out)"),
    ("commonsenseqa_train.json", "commonsenseqa", "7 records loaded; 2 without steps; 3 empty steps dropped; "
     "1 compound-tag steps read as first (reason x1)", "usable: 7 for evaluation; 5 for training (2 without usable steps left out)"),
    ("commonsenseqa_test.json", "commonsenseqa", "4 records loaded; 4 without steps",
     "usable: 4 for evaluation; 0 for training (4 without usable steps left out)"),
    ("truthfulqa_train.json", "truthfulqa", "7 records loaded; 2 without steps; 3 empty steps dropped; "
     "1 compound-tag steps read as first (reason x1)", "usable: 7 for evaluation; 5 for training (2 without usable steps left out)"),
    ("truthfulqa_test.json", "truthfulqa", "4 records loaded; 4 without steps",
     "usable: 4 for evaluation; 0 for training (4 without usable steps left out)"),
]


@pytest.mark.parametrize("name,task,summary,usable", SUMMARIES, ids=[s[0] for s in SUMMARIES])
def test_data_check_prints_policy_counts_for_each_paper_shape(capsys, name, task, summary, usable):
    code, out, _ = _check(capsys, FIXTURES / name, "--task", task)
    lines = out.splitlines()
    assert code == 0
    assert lines[0] == f"{FIXTURES / name}: {summary}"
    assert lines[1] == f"task: {task} (--task)"
    assert usable in lines


def test_data_check_shows_the_first_examples_of_each_policy(capsys):
    code, out, _ = _check(capsys, FIXTURES / "strategyqa_train.json", "--examples", "2")
    assert code == 0
    assert "     3  empty steps dropped (a tag with no text, e.g. '[rag]: ')" in out
    assert "            record 1 cot_steps[1]: '[rag]: '" in out
    assert "            record 3 cot_steps[0]: '[rag]: '" in out
    assert "record 3 cot_steps[1]" not in out  # only --examples 2 of the three
    assert ("            record 2 cot_steps[1]: '[reason] and [rag]: Forty-two kilometres is more than ten "
            "kilometre...' -> reason") in out  # long steps are cut at 70 characters
    assert "            record 4: 'Could a house cat outrun a cheetah?'" in out
    assert "            record 3: 'Would a snowman last a week in a summer desert?'" in out


def test_data_check_compound_tag_option_reaches_the_loader(capsys):
    code, out, _ = _check(capsys, FIXTURES / "strategyqa_test.json", "--compound-tag", "drop")
    assert code == 0
    assert out.splitlines()[0].endswith("2 compound-tag steps read as drop (dropped x2)")
    assert "usable: 5 for evaluation; 3 for training (2 without usable steps left out)" in out


def test_data_check_without_task_applies_evals_default_task(capsys, tmp_path):
    code, out, _ = _check(capsys, FIXTURES / "strategyqa_test.json")
    assert code == 0 and f"task: {DEFAULT_TASK} (default: what eval assumes for a base model" in out
    # answers eval would reject are rejected here too, with the way out
    code, _, err = _check(capsys, FIXTURES / "commonsenseqa_test.json")
    assert code == 2
    assert "record 0, field 'answer': answer must be True or False, got 'A' (task strategyqa); strategyqa is the " \
           "default task, as in eval: pass --task" in err
    # bundled data and hub presets bring their own task
    code, out, _ = _check(capsys, "bundled:commonsenseqa")
    assert code == 0 and "task: commonsenseqa (the data's own" in out


@pytest.mark.parametrize("records,argv,message", [
    ("[]", (), "0 records loaded: the source holds no records"),
    ([GOOD], ("--split", "test"), "0 records loaded: none of the 1 records is in split 'test' (splits: train 1)"),
    ([dict(GOOD, answer="Yes")], ("--skip-invalid",), "0 records loaded: all 1 records were skipped as invalid"),
    ([dict(GOOD, id="q1"), dict(GOOD, id="q1", question="Is fire hot?")], (),
     "record 1, field 'id': id 'q1' is given to records 0, 1"),
    ([{"question": "Is fire hot?", "cot_steps": []}], (), "record 0, field 'answer': missing field"),
    ([dict(GOOD, answer=None)], (), "answer must be True or False, got None (task strategyqa)"),
    ([dict(GOOD, cot_steps=[])], ("--for", "train"), "nothing to train on"),
    ([GOOD], ("--task", "nosuchtask"), "unknown task 'nosuchtask'"),
    ([GOOD], ("--columns", "strategyqa"), "applies to hf: datasets only"),
])
def test_data_check_refuses_what_eval_and_train_refuse(capsys, tmp_path, records, argv, message):
    path = _write(tmp_path, records)
    code, out, err = _check(capsys, path, *argv)
    assert code == 2 and out == ""
    assert message in err and len(err.strip().splitlines()) == 1


def test_load_dataset_raises_the_same_errors_data_check_prints(tmp_path):
    with pytest.raises(DataError, match="0 records loaded"):
        load_dataset(_write(tmp_path, "[]"))
    with pytest.raises(DataError, match="id 'q1' is given to records 0, 1"):
        load_dataset(_write(tmp_path, [dict(GOOD, id="q1"), dict(GOOD, id="q1", question="Other?")]))
    with pytest.raises(ConfigError, match="unknown task"):
        load_dataset(_write(tmp_path, [GOOD]), task="strategyqa2")
    traces, report = load_dataset(_write(tmp_path, [GOOD, dict(GOOD, question="Q2?", cot_steps=[])]), needs_steps=True)
    assert len(traces) == 1 and report.excluded_from_training == 1 and report.loaded == 2


def test_data_check_calls_the_shared_load(monkeypatch, capsys):
    calls = []
    real = loaders.load_dataset

    def spy(source, **kwargs):
        calls.append((source, kwargs))
        return real(source, **kwargs)

    monkeypatch.setattr(loaders, "load_dataset", spy)
    code, _, _ = _check(capsys, FIXTURES / "strategyqa_test.json", "--split", "test", "--for", "train",
                        "--on-unknown-tag", "drop", "--compound-tag", "memory")
    assert code == 0
    assert calls == [(str(FIXTURES / "strategyqa_test.json"),
                      {"task": None, "split": "test", "on_unknown_tag": "drop", "skip_invalid": False,
                       "compound_tag": "memory", "columns": None, "needs_steps": True, "log": False})]


def test_raw_file_error_is_one_line_in_a_subprocess():
    result = subprocess.run([sys.executable, "-m", "memreason.cli", "data", "check",
                             str(FIXTURES / "strategyqa_train_raw.json")], capture_output=True, text=True, timeout=60)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2 and len(lines) == 1 and "Traceback" not in result.stderr
    assert "unknown step tag [rak]" in lines[0] and "--on-unknown-tag=drop" in lines[0]


def test_load_dataset_logs_its_summary_for_eval_and_train(caplog):
    with caplog.at_level("INFO", logger="memreason.data.loaders"):
        load_dataset(FIXTURES / "strategyqa_train.json", needs_steps=True)
    messages = [r.getMessage() for r in caplog.records]
    assert any("7 records loaded; 2 without steps; 3 empty steps dropped" in m and "2 excluded from training" in m
               for m in messages)
