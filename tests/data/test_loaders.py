import json
import subprocess
import sys

import pytest

from memreason.data import load_traces, require_steps, write_jsonl
from memreason.errors import DataError
from memreason.traces import MEMORY, REASON, Step, Trace

GOOD = {"question": "Is ice lighter than water?", "answer": "True",
        "cot_steps": ["[rag]: Ice is less dense than liquid water.", "[reason]: Less dense things float, so True."],
        "split": "train"}
CSQA_Q = "Question: Where do you keep milk? Options: A.fridge B.oven C.garden D.car E.roof "


def _write(tmp_path, content, name="data.json"):
    path = tmp_path / name
    path.write_text(content if isinstance(content, str) else json.dumps(content), encoding="utf-8")
    return path


def _with(**changes):
    record = dict(GOOD)
    for key, value in changes.items():
        if value is KeyError:
            record.pop(key)
        else:
            record[key] = value
    return record


# (id, file content, task, expected field or None, fragment of the message)
MALFORMED = [
    ("not-json", "{not json", "strategyqa", None, "not valid JSON"),
    ("truncated", '[{"question": "x"', "strategyqa", None, "not valid JSON"),
    ("top-level-object", {"question": "x"}, "strategyqa", None, "expected a JSON list"),
    ("record-not-object", ["just a string"], "strategyqa", None, "expected an object"),
    ("record-null", [None], "strategyqa", None, "expected an object"),
    ("missing-question", [_with(question=KeyError)], "strategyqa", "question", "missing field"),
    ("question-number", [_with(question=42)], "strategyqa", "question", "expected a string"),
    ("question-empty", [_with(question="   ")], "strategyqa", "question", "empty string"),
    ("missing-answer", [_with(answer=KeyError)], "strategyqa", "answer", "missing field"),
    ("answer-yes", [_with(answer="Yes")], "strategyqa", "answer", "True or False"),
    ("answer-number", [_with(answer=1)], "strategyqa", "answer", "True or False"),
    ("answer-null", [_with(answer=None)], "strategyqa", "answer", "True or False"),
    ("missing-steps", [_with(cot_steps=KeyError)], "strategyqa", "cot_steps", "missing field"),
    ("steps-string", [_with(cot_steps="[rag]: x")], "strategyqa", "cot_steps", "expected a list"),
    ("step-number", [_with(cot_steps=["[rag]: ok", 7])], "strategyqa", "cot_steps[1]", "expected a string"),
    ("step-untagged", [_with(cot_steps=["Ice floats."])], "strategyqa", "cot_steps[0]", "[tag]:"),
    ("step-unknown-tag", [_with(cot_steps=["[rag]: a", "[think]: b"])], "strategyqa", "cot_steps[1]", "unknown step tag [think]"),
    ("step-garbage-tag", [_with(cot_steps=["[reason] [rag]: b"])], "strategyqa", "cot_steps[0]", "[tag]:"),
    ("step-compound-unknown-part", [_with(cot_steps=["[reason] and [plan]: b"])], "strategyqa", "cot_steps[0]", "unknown step tag [plan]"),
    ("step-compound-one-bracket-unknown", [_with(cot_steps=["[think and plan]: b"])], "strategyqa", "cot_steps[0]", "unknown step tag [think and plan]"),
    ("steps-null", [_with(cot_steps=None)], "strategyqa", "cot_steps", "expected a list"),
    ("split-number", [_with(split=3)], "strategyqa", "split", "expected a string"),
    ("csqa-letter-outside", [{"question": CSQA_Q, "answer": "F", "cot_steps": []}], "commonsenseqa", "answer", "not one of the options"),
    ("csqa-lowercase", [{"question": CSQA_Q, "answer": "a", "cot_steps": []}], "commonsenseqa", "answer", "not one of the options"),
    ("csqa-word-answer", [{"question": CSQA_Q, "answer": "fridge", "cot_steps": []}], "commonsenseqa", "answer", "not one of the options"),
    ("tqa-letter-beyond-options", [{"question": "Is it? A. yes B. no ", "answer": "C", "cot_steps": []}], "truthfulqa", "answer", "not one of the options"),
    ("free-empty-answer", [_with(answer="")], "freeform", "answer", "non-empty string"),
    ("jsonl-steps-not-objects", None, "strategyqa", "steps[0]", "'kind' and 'text'"),
    ("jsonl-unknown-kind", None, "strategyqa", "steps[0]", "unknown step tag [plan]"),
    ("jsonl-bad-line", None, "strategyqa", None, "not valid JSON (line 2"),
]
JSONL = {
    "jsonl-steps-not-objects": json.dumps({"question": "q?", "answer": "True", "steps": ["[rag]: x"]}) + "\n",
    "jsonl-unknown-kind": json.dumps({"question": "q?", "answer": "True", "steps": [{"kind": "plan", "text": "x"}]}) + "\n",
    "jsonl-bad-line": json.dumps({"question": "q?", "answer": "True", "steps": []}) + "\n{oops\n",
}


def _malformed_file(tmp_path, case_id, content):
    if case_id in JSONL:
        return _write(tmp_path, JSONL[case_id], "data.jsonl")
    return _write(tmp_path, content)


def test_there_are_at_least_25_malformed_cases():
    assert len({case[0] for case in MALFORMED}) >= 25


@pytest.mark.parametrize("case_id,content,task,field,message", MALFORMED, ids=[c[0] for c in MALFORMED])
def test_malformed_input_raises_data_error_naming_file_record_field(tmp_path, case_id, content, task, field, message):
    path = _malformed_file(tmp_path, case_id, content)
    with pytest.raises(DataError) as info:
        load_traces(path, task=task)
    error = info.value
    assert str(path) in str(error)
    assert message in str(error)
    assert error.field == field
    if field is not None:
        assert error.record == 0 and "record 0" in str(error)


@pytest.mark.parametrize("case_id,content,task,field,message",
                         [c for c in MALFORMED if c[0] in ("not-json", "answer-yes", "step-unknown-tag", "jsonl-bad-line")],
                         ids=["not-json", "answer-yes", "step-unknown-tag", "jsonl-bad-line"])
def test_cli_reports_malformed_input_in_one_line_with_nonzero_exit(tmp_path, case_id, content, task, field, message):
    path = _malformed_file(tmp_path, case_id, content)
    result = subprocess.run([sys.executable, "-m", "memreason.cli", "data", "check", str(path), "--task", task],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and message in lines[0] and str(path) in lines[0]


def test_missing_file_is_one_clear_error(tmp_path):
    with pytest.raises(DataError, match="file not found"):
        load_traces(tmp_path / "nope.json")


def test_skip_invalid_skips_and_counts(tmp_path):
    records = [GOOD, _with(answer="Yes"), _with(question=KeyError), _with(answer="False"), _with(answer="maybe")]
    traces, report = load_traces(_write(tmp_path, records), task="strategyqa", skip_invalid=True)
    assert [t.answer for t in traces] == ["True", "False"]
    assert report.loaded == 2 and sum(report.skipped.values()) == 3
    assert "3 skipped" in report.summary()


def test_unknown_tag_drop_keeps_each_kind_on_its_own_step(tmp_path):
    record = _with(cot_steps=["[rag]: fact one", "[plan]: junk", "[reasoning]: derive", "[Factual Knowledge]: fact two"])
    traces, report = load_traces(_write(tmp_path, [record]), task="strategyqa", on_unknown_tag="drop")
    # no shift of labels onto other steps (the original's bug B4), no relabel of [reasoning] (B3)
    assert traces[0].steps == (Step(MEMORY, "fact one"), Step(REASON, "derive"), Step(MEMORY, "fact two"))
    assert report.dropped_steps == {"plan": 1}


def test_empty_step_text_is_dropped_and_counted_not_an_error(tmp_path):
    # was the "step-empty-text" malformed case; issue 15: the paper's files hold such steps, so they are
    # dropped by policy (counted) and the question stays loadable
    record = _with(cot_steps=["[rag]:   ", "[reason]: Less dense things float, so True."])
    traces, report = load_traces(_write(tmp_path, [record, _with(cot_steps=["[rag]:   "])]), task="strategyqa")
    assert traces[0].steps == (Step(REASON, "Less dense things float, so True."),)
    assert traces[1].steps == () and report.empty_steps == 2 and report.emptied == 1 and report.question_only == 1
    assert "2 empty steps dropped" in report.summary()


def test_empty_cot_steps_load_as_question_only_and_are_refused_for_training(tmp_path):
    traces, report = load_traces(_write(tmp_path, [GOOD, _with(cot_steps=[])]), task="strategyqa")
    assert traces[1].steps == () and report.question_only == 1
    with pytest.raises(DataError, match="1 of 2 records have no steps"):
        require_steps(traces, "data.json")
    assert require_steps(traces[:1]) == traces[:1]


def test_split_filter_and_stable_ids(tmp_path):
    path = _write(tmp_path, [GOOD, _with(split="test", question="Is fire cold?", answer="False")])
    train, _ = load_traces(path, task="strategyqa", split="train")
    test, _ = load_traces(path, task="strategyqa", split="test")
    assert [t.question for t in train] == [GOOD["question"]] and len(test) == 1
    again, _ = load_traces(path, task="strategyqa", split="train")
    assert train[0].id == again[0].id and train[0].id != test[0].id


def test_jsonl_round_trip(tmp_path):
    traces, _ = load_traces(_write(tmp_path, [GOOD]), task="strategyqa")
    out = tmp_path / "out.jsonl"
    write_jsonl(traces, out)
    again, _ = load_traces(out, task="strategyqa")
    assert again == traces and again[0].id == traces[0].id


def test_paper_csqa_and_truthfulqa_shapes_load(tmp_path):
    csqa = [{"question": CSQA_Q, "answer": "A", "cot_steps": ["[rag]: Milk spoils when warm.", "[reason]: So A."],
             "split": "train"}]
    tqa = [{"question": "Can bats see? A. No, bats are blind. B. Yes, bats can see. C. Only at noon. D. d E. e "
                        "F. f G. g H. h I. i J. j K. k L. l M. m ", "answer": "M", "cot_steps": [], "split": "test"}]
    assert load_traces(_write(tmp_path, csqa, "c.json"), task="commonsenseqa")[0][0].answer == "A"
    assert load_traces(_write(tmp_path, tqa, "t.json"), task="truthfulqa")[0][0].answer == "M"


def test_hugging_face_dataset_from_local_disk(tmp_path):
    datasets = pytest.importorskip("datasets")
    ds = datasets.Dataset.from_list([{"question": "Do fish sleep?", "answer": True},
                                     {"question": "Is lava cold?", "answer": False}])
    ds.save_to_disk(str(tmp_path / "hfds"))
    traces, report = load_traces(f"hf:{tmp_path / 'hfds'}", task="strategyqa")
    assert [t.answer for t in traces] == ["True", "False"] and report.question_only == 2


@pytest.mark.parametrize("name,minimum", [("strategyqa", 120), ("commonsenseqa", 30), ("truthfulqa", 30)])
def test_bundled_data_is_valid_and_large_enough(name, minimum):
    traces, report = load_traces(f"bundled:{name}")
    assert report.loaded == len(traces) >= minimum and not report.skipped
    splits = {t.meta["split"] for t in traces}
    assert splits == {"train", "test"}
    train = {t.question for t in traces if t.meta["split"] == "train"}
    assert not train & {t.question for t in traces if t.meta["split"] == "test"}
    for trace in traces:
        assert trace.count(MEMORY) >= 1 and trace.count(REASON) >= 1, trace.question


def test_trace_objects_compare_on_content():
    assert Trace("q", (Step(MEMORY, "a"),), "True", {"id": "1"}) == Trace("q", (Step(MEMORY, "a"),), "True", {"id": "2"})
