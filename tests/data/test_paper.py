"""The step policy (data/paper.py) on the paper's three file shapes: fixtures of our own words that hold
every quirk of the released files (spec disentangle.md §2), and full-size files built from templates."""

import json
from pathlib import Path

import pytest

from memreason.data.loaders import load_dataset, load_traces, training_traces
from memreason.data.paper import StepPolicy, read_compound, split_tagged_step, tag_kinds
from memreason.errors import DataError
from memreason.traces import MEMORY, REASON, Step, UnknownTagError

FIXTURES = Path(__file__).parent / "fixtures"

# file, task, expected counts. Every train-shape file holds: a plain record, an empty step ("[rag]: "),
# a compound tag ("[reason] and [rag]: ..."), a record whose steps are all empty, a record with
# cot_steps [] and two more plain records.
QUIRKS = {"loaded": 7, "empty_steps": 3, "compound_steps": {"reason": 1}, "emptied": 1, "no_steps": 1,
          "question_only": 2, "training": 5}
FILES = [
    ("strategyqa_train.json", "strategyqa", {**QUIRKS, "memory": 6, "reason": 5}),
    ("commonsenseqa_train.json", "commonsenseqa", {**QUIRKS, "memory": 5, "reason": 5}),
    ("truthfulqa_train.json", "truthfulqa", {**QUIRKS, "memory": 4, "reason": 5}),
    # StrategyQA_test_clean.json's shape: annotated, two compound steps, one record with cot_steps []
    ("strategyqa_test.json", "strategyqa", {"loaded": 5, "empty_steps": 0, "compound_steps": {"reason": 2},
                                            "emptied": 0, "no_steps": 1, "question_only": 1, "training": 4,
                                            "memory": 3, "reason": 4}),
    # the CommonsenseQA / TruthfulQA test files: no annotation at all
    ("commonsenseqa_test.json", "commonsenseqa", {"loaded": 4, "empty_steps": 0, "compound_steps": {}, "emptied": 0,
                                                  "no_steps": 4, "question_only": 4, "training": 0,
                                                  "memory": 0, "reason": 0}),
    ("truthfulqa_test.json", "truthfulqa", {"loaded": 4, "empty_steps": 0, "compound_steps": {}, "emptied": 0,
                                            "no_steps": 4, "question_only": 4, "training": 0, "memory": 0,
                                            "reason": 0}),
]


@pytest.mark.parametrize("name,task,expected", FILES, ids=[f[0] for f in FILES])
def test_paper_file_shapes_load_every_question_with_counted_policies(name, task, expected):
    traces, report = load_dataset(FIXTURES / name, task=task, log=False)
    assert len(traces) == report.loaded == report.read == expected["loaded"]
    assert report.empty_steps == expected["empty_steps"]
    assert dict(report.compound_steps) == expected["compound_steps"]
    assert (report.emptied, report.no_steps, report.question_only) == (
        expected["emptied"], expected["no_steps"], expected["question_only"])
    assert sum(t.count(MEMORY) for t in traces) == expected["memory"]
    assert sum(t.count(REASON) for t in traces) == expected["reason"]
    assert not report.skipped and not report.dropped_steps
    assert all(step.text for t in traces for step in t.steps)
    if expected["training"]:
        assert len(training_traces(traces, report)) == expected["training"]
        assert report.excluded_from_training == expected["loaded"] - expected["training"]
    else:
        with pytest.raises(DataError, match="nothing to train on"):
            training_traces(traces, report)


def test_compound_tag_keeps_its_text_and_reads_as_first_tag():
    traces, _ = load_dataset(FIXTURES / "strategyqa_test.json", task="strategyqa", log=False)
    assert traces[1].steps == (
        Step(MEMORY, "A violin is a string instrument played with a bow."),
        Step(REASON, "Bowing strings is not blowing, and wind instruments are the blown ones, so False."))


@pytest.mark.parametrize("choice,kinds,counts", [
    ("first", [REASON, REASON], {"reason": 2}),
    ("memory", [MEMORY, MEMORY], {"memory": 2}),
    ("reason", [REASON, REASON], {"reason": 2}),
    ("drop", [], {"dropped": 2}),
])
def test_compound_tag_choice_decides_the_kind_and_is_counted(choice, kinds, counts):
    traces, report = load_dataset(FIXTURES / "strategyqa_test.json", task="strategyqa", compound_tag=choice, log=False)
    compound = [traces[1].steps[1:], traces[3].steps]
    assert [s.kind for part in compound for s in part] == kinds
    assert dict(report.compound_steps) == counts and report.compound_tag == choice
    # dropping the only step of record 3 leaves it question-only, still loaded for evaluation
    assert report.loaded == 5 and report.emptied == (1 if choice == "drop" else 0)


def test_raw_file_unknown_tags_are_an_error_by_default_and_dropped_on_request():
    with pytest.raises(DataError, match=r"record 2, field 'cot_steps\[0\]': unknown step tag \[rak\]"):
        load_dataset(FIXTURES / "strategyqa_train_raw.json", log=False)
    traces, report = load_dataset(FIXTURES / "strategyqa_train_raw.json", on_unknown_tag="drop", log=False)
    assert report.loaded == 6 and report.no_steps == 1
    assert report.dropped_steps == {"rak": 1, "<unreadable>": 1}
    # synonyms map to their own kind (no [reasoning] -> memory relabel, bug B3); kinds stay on their steps (B4)
    assert traces[0].kinds() == (MEMORY, REASON) and traces[1].kinds() == (MEMORY, MEMORY, REASON)
    assert traces[2].steps == (Step(REASON, "Empty space has no medium, so False."),)
    assert traces[3].kinds() == (MEMORY, REASON)


@pytest.mark.parametrize("line,tags,text", [
    ("[reason] and [rag]: both", ["reason", "rag"], "both"),
    ("[Reason] AND [rag] : both", ["Reason", "rag"], "both"),
    ("[rag] & [reason]: x", ["rag", "reason"], "x"),
    ("[rag]/[reason]: x", ["rag", "reason"], "x"),
    ("[reason and rag]: x", ["reason and rag"], "x"),
    ("[rag]: ", ["rag"], ""),
])
def test_split_tagged_step_reads_single_and_compound_prefixes(line, tags, text):
    assert split_tagged_step(line) == (tags, text)


@pytest.mark.parametrize("line", ["[reason] [rag]: two tags, no connective", "no tag at all",
                                  "[reason] [rag]The question '[reason]: garbage"])
def test_unreadable_prefixes_are_rejected(line):
    with pytest.raises(ValueError, match=r"\[tag\]:"):
        split_tagged_step(line)


def test_tag_kinds_and_compound_readings():
    assert tag_kinds(["reason and rag"]) == [REASON, MEMORY]
    assert tag_kinds(["rag", "Factual Knowledge"]) == [MEMORY, MEMORY]
    with pytest.raises(UnknownTagError, match=r"\[think and rag\]"):
        tag_kinds(["think and rag"])
    assert read_compound([MEMORY, MEMORY], "reason") == MEMORY  # not mixed: no choice to make
    assert read_compound([MEMORY, REASON], "first") == MEMORY
    assert read_compound([MEMORY, REASON], "reason") == REASON
    assert read_compound([REASON, MEMORY], "memory") == MEMORY
    assert read_compound([REASON, MEMORY], "drop") is None


def test_step_policy_rejects_unknown_choices():
    with pytest.raises(DataError, match="compound_tag must be one of first, memory, reason, drop"):
        StepPolicy(compound_tag="last")
    with pytest.raises(DataError, match="on_unknown_tag"):
        StepPolicy(on_unknown_tag="ignore")


def test_skip_invalid_drops_bad_steps_but_keeps_the_question(tmp_path):
    records = [{"question": "Is rain wet?", "answer": "True", "cot_steps": ["[rag]: Rain is water.", 7, "no tag"]},
               {"question": "Is fire cold?", "answer": "False", "cot_steps": "[rag]: not a list"},
               {"question": "Is snow hot?", "answer": "False"},
               {"question": "Is ice dry?", "answer": "maybe", "cot_steps": ["[rag]: counted nowhere: skipped"]}]
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(records), encoding="utf-8")
    traces, report = load_traces(path, task="strategyqa", skip_invalid=True)
    assert [t.question for t in traces] == ["Is rain wet?", "Is fire cold?", "Is snow hot?"]
    assert traces[0].steps == (Step(MEMORY, "Rain is water."),)
    assert sum(report.invalid_steps.values()) == 4 and report.question_only == 2
    assert sum(report.skipped.values()) == 1 and report.empty_steps == 0


def test_dict_steps_follow_the_same_policy(tmp_path):
    path = tmp_path / "ours.jsonl"
    row = {"question": "Is a bat a mammal?", "answer": "True",
           "steps": [{"kind": "memory", "text": "Bats feed their young milk."}, {"kind": "reason", "text": "  "},
                     {"kind": "reason and memory", "text": "Milk-fed animals are mammals, so True."}]}
    path.write_text(json.dumps(row) + "\n", encoding="utf-8")
    traces, report = load_traces(path, task="strategyqa")
    assert traces[0].kinds() == (MEMORY, REASON) and report.empty_steps == 1 and report.compound_steps == {"reason": 1}


# Full-size files in each released shape, with the quirk counts the spec measured (§2.2): what a file of
# that shape and size gives. The text is ours; only the structure and the counts follow the spec.
def _records(n, split, *, question, answer, steps):
    return [{"question": question(i), "answer": answer(i), "cot_steps": steps(i), "split": split} for i in range(n)]


def _csqa_q(i):
    return f"Question: Which item number {i} is the odd one? Options: A.one B.two C.three D.four E.five "


def _tqa_q(i):
    return f"Which statement {i} is true? A. first B. second C. third "


FULL_SIZE = [
    # StrategyQA_train_clean.json: 1 603 records, 19 with an empty-content step
    ("strategyqa_train", "strategyqa", _records(
        1603, "train", question=lambda i: f"Is claim number {i} true?", answer=lambda i: "True" if i % 2 else "False",
        steps=lambda i: ["[rag]: A fact.", "[rag]: " if i < 19 else "[rag]: Another fact.", "[reason]: So."]),
     {"loaded": 1603, "empty_steps": 19, "question_only": 0, "compound": 0, "training": 1603}),
    # StrategyQA_test_clean.json: 687 records, 2 compound-tag steps, 1 record with cot_steps [] (the
    # original loader skipped it and evaluated 686)
    ("strategyqa_test", "strategyqa", _records(
        687, "test", question=lambda i: f"Is test claim {i} true?", answer=lambda i: "True" if i % 2 else "False",
        steps=lambda i: [] if i == 100 else ["[rag]: A fact.", "[reason] and [rag]: So." if i in (5, 6) else "[reason]: So."]),
     {"loaded": 687, "empty_steps": 0, "question_only": 1, "compound": 2, "training": 686}),
    # truthful_qa_train_clean_CC.json: 632 annotated records
    ("truthfulqa_train", "truthfulqa", _records(
        632, "train", question=_tqa_q, answer=lambda i: "ABC"[i % 3], steps=lambda i: ["[reason]: Think.", "[rag]: Fact."]),
     {"loaded": 632, "empty_steps": 0, "question_only": 0, "compound": 0, "training": 632}),
    # truthful_qa_test_clean_CC.json and commonsense_qa_test_clean_CC.json: no annotation
    ("truthfulqa_test", "truthfulqa", _records(164, "test", question=_tqa_q, answer=lambda i: "ABC"[i % 3],
                                               steps=lambda i: []),
     {"loaded": 164, "empty_steps": 0, "question_only": 164, "compound": 0, "training": 0}),
    ("commonsenseqa_test", "commonsenseqa", _records(1221, "test", question=_csqa_q, answer=lambda i: "ABCDE"[i % 5],
                                                     steps=lambda i: []),
     {"loaded": 1221, "empty_steps": 0, "question_only": 1221, "compound": 0, "training": 0}),
]


@pytest.mark.parametrize("name,task,records,expected", FULL_SIZE, ids=[f[0] for f in FULL_SIZE])
def test_full_size_files_of_each_shape_keep_every_record(tmp_path, name, task, records, expected):
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps(records), encoding="utf-8")
    traces, report = load_dataset(path, task=task, log=False)
    assert report.loaded == len(traces) == expected["loaded"]
    assert report.empty_steps == expected["empty_steps"] and report.question_only == expected["question_only"]
    assert sum(report.compound_steps.values()) == expected["compound"]
    assert sum(bool(t.steps) for t in traces) == expected["training"]
    assert len({t.id for t in traces}) == len(traces)
