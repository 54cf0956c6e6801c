"""Hugging Face sources (data/hub.py): column-mapping presets on local save_to_disk fixtures shaped like the
hub's CommonsenseQA, StrategyQA and TruthfulQA-MC, custom mappings, and a fast failure when the hub is out
of reach."""

import os
import subprocess
import sys
import time

import pytest

from memreason.data.hub import ColumnMapping, detect_preset, parse_columns
from memreason.data.loaders import load_dataset, load_traces, source_task
from memreason.errors import DataError
from memreason.traces import MEMORY, Step

datasets = pytest.importorskip("datasets")


def _csqa_row(i, stem, texts, key):
    return {"id": f"cs{i}", "question": stem, "question_concept": "thing",
            "choices": {"label": list("ABCDE"), "text": texts}, "answerKey": key}


@pytest.fixture(scope="module")
def hub_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("hub")
    datasets.DatasetDict({
        "train": datasets.Dataset.from_list([_csqa_row(0, "Where is bread baked?", ["oven", "river", "cloud", "shoe", "moon"], "A"),
                                             _csqa_row(1, "What do birds build?", ["cars", "nests", "bridges", "songs", "ships"], "B")]),
        "validation": datasets.Dataset.from_list([_csqa_row(2, "What is worn on feet?", ["hat", "glove", "sock", "scarf", "ring"], "C")]),
        "test": datasets.Dataset.from_list([_csqa_row(3, "Where do fish live?", ["desert", "water", "attic", "oven", "car"], "")]),
    }).save_to_disk(str(root / "csqa"))
    datasets.DatasetDict({
        "train": datasets.Dataset.from_list([
            {"qid": "s1", "term": "Kettle", "description": "a pot", "question": "Can a kettle boil water?", "answer": True,
             "facts": ["A kettle heats water.", "Water boils when hot enough."], "decomposition": ["What does a kettle do?", "Is #1 boiling?"]},
            {"qid": "s2", "term": "Moon", "description": "a satellite", "question": "Is the Moon made of cheese?", "answer": False,
             "facts": [], "decomposition": ["What is the Moon made of?"]}]),
        "test": datasets.Dataset.from_list([
            {"qid": "s3", "term": "Ice", "description": "frozen water", "question": "Is ice cold?", "answer": True,
             "facts": ["Ice is frozen water.", "  "], "decomposition": ["Is ice frozen?"]}]),
    }).save_to_disk(str(root / "sqa"))
    tqa_rows = [{"question": f"Which claim {i} holds?",
                 "mc1_targets": {"choices": [f"true {i}", f"false a{i}", f"false b{i}", f"false c{i}"], "labels": [1, 0, 0, 0]},
                 "mc2_targets": {"choices": [f"true {i}"], "labels": [1]}} for i in range(10)]
    datasets.DatasetDict({"validation": datasets.Dataset.from_list(tqa_rows)}).save_to_disk(str(root / "tqa"))
    datasets.Dataset.from_list([{"uid": "q1", "query": "Is water wet?", "label": "True"},
                                {"uid": "q2", "query": "Is sand a liquid?", "label": "False"}]).save_to_disk(str(root / "custom"))
    return root


def test_commonsenseqa_preset_renders_the_paper_question_and_test_reads_validation(hub_dir):
    traces, report = load_dataset(f"hf:{hub_dir / 'csqa'}", split="test", log=False)
    assert report.columns == "commonsenseqa" and report.task == "commonsenseqa" and report.loaded == 1
    assert report.summary().startswith(f"hf:{hub_dir / 'csqa'}: 1 records loaded (columns: commonsenseqa)")
    # the same string the paper's commonsense_qa_test_clean_CC.json holds (loaders strip the trailing space)
    assert traces[0].question == "Question: What is worn on feet? Options: A.hat B.glove C.sock D.scarf E.ring"
    assert traces[0].answer == "C" and traces[0].id == "cs2" and traces[0].meta["split"] == "test"
    train, _ = load_dataset(f"hf:{hub_dir / 'csqa'}", split="train", log=False)
    assert [t.answer for t in train] == ["A", "B"]


def test_strategyqa_preset_makes_facts_memory_steps_and_keeps_decomposition(hub_dir):
    traces, report = load_dataset(f"hf:{hub_dir / 'sqa'}", split="train", log=False)
    assert report.columns == "strategyqa" and [t.answer for t in traces] == ["True", "False"]
    assert traces[0].steps == (Step(MEMORY, "A kettle heats water."), Step(MEMORY, "Water boils when hot enough."))
    assert traces[0].meta["decomposition"] == ["What does a kettle do?", "Is #1 boiling?"] and traces[0].id == "s1"
    assert traces[1].steps == () and report.no_steps == 1
    test, report = load_dataset(f"hf:{hub_dir / 'sqa'}", split="test", log=False)
    assert len(test[0].steps) == 1 and report.empty_steps == 1


def test_truthfulqa_preset_shuffles_with_a_fixed_seed_and_splits_80_20_by_index(hub_dir):
    train, _ = load_dataset(f"hf:{hub_dir / 'tqa'}", split="train", log=False)
    test, report = load_dataset(f"hf:{hub_dir / 'tqa'}", split="test", log=False)
    assert (len(train), len(test)) == (8, 2) and report.task == "truthfulqa"
    assert [t.question.split("?")[0] for t in test] == ["Which claim 8 holds", "Which claim 9 holds"]
    for trace in train + test:
        number = trace.question.split()[2]
        assert f"{trace.answer}. true {number}" in trace.question  # the answer letter labels the true option
    assert len({t.answer for t in train + test}) > 1  # not always A, as the hub's order would make it
    again, _ = load_dataset(f"hf:{hub_dir / 'tqa'}", split="test", log=False)
    assert [t.question for t in again] == [t.question for t in test]


def test_truthfulqa_split_at_full_size_is_the_papers_653_164(tmp_path):
    rows = [{"question": f"Claim {i}?", "mc1_targets": {"choices": ["yes", "no"], "labels": [0, 1]}} for i in range(817)]
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "tqa817"))
    sizes = [load_dataset(f"hf:{tmp_path / 'tqa817'}", split=s, log=False)[1].loaded for s in ("train", "test")]
    assert sizes == [653, 164]


def test_custom_column_mapping_and_preset_overrides(hub_dir):
    traces, report = load_dataset(f"hf:{hub_dir / 'custom'}", columns="question=query,answer=label,id=uid", log=False)
    assert [(t.question, t.answer, t.id) for t in traces] == [("Is water wet?", "True", "q1"), ("Is sand a liquid?", "False", "q2")]
    assert report.columns == "custom" and report.task == "strategyqa"
    mapping = parse_columns("commonsenseqa,id=question_concept")
    assert isinstance(mapping, ColumnMapping) and mapping.id == "question_concept" and mapping.choice_texts == "choices.text"
    traces, _ = load_traces(f"hf:{hub_dir / 'csqa'}", split="train", columns=mapping)
    assert [t.id for t in traces] == ["thing", "thing"]  # both rows share the concept: load_dataset refuses it
    with pytest.raises(DataError, match="id 'thing' is given to records 0, 1"):
        load_dataset(f"hf:{hub_dir / 'csqa'}", split="train", columns=mapping, log=False)


def test_missing_mapped_column_names_the_columns_there_are(hub_dir):
    with pytest.raises(DataError, match=r"no column 'question' \(the dataset has: label, query, uid\)"):
        load_traces(f"hf:{hub_dir / 'custom'}", task="strategyqa")
    with pytest.raises(DataError, match=r"record 0, field 'stem': no column 'stem' \(the dataset has: label, query, uid\)"):
        load_traces(f"hf:{hub_dir / 'custom'}", task="strategyqa", columns="question=stem,answer=label")


@pytest.mark.parametrize("spec,message", [("nosuchpreset", "unknown column preset"), ("question=q,colour=x", "unknown column mapping key")])
def test_bad_column_specs_are_refused(spec, message):
    with pytest.raises(DataError, match=message):
        parse_columns(spec)


def test_columns_only_apply_to_hf_sources(tmp_path):
    path = tmp_path / "d.json"
    path.write_text('[{"question": "q?", "answer": "True", "cot_steps": []}]', encoding="utf-8")
    with pytest.raises(DataError, match="applies to hf: datasets only"):
        load_traces(path, columns="strategyqa")


def test_presets_are_detected_by_their_columns_and_ours_are_left_alone():
    assert detect_preset(["id", "question", "question_concept", "choices", "answerKey"]).name == "commonsenseqa"
    assert detect_preset(["qid", "question", "answer", "facts", "decomposition"]).name == "strategyqa"
    assert detect_preset(["question", "mc1_targets", "mc2_targets"]).name == "truthfulqa-mc"
    assert detect_preset(["question", "answer"]) is None
    assert detect_preset(["question", "answer", "facts", "decomposition", "cot_steps"]) is None
    assert parse_columns("none") is None


def test_source_task_comes_from_bundled_names_and_detected_presets(hub_dir):
    assert source_task("bundled:truthfulqa") == "truthfulqa"
    assert source_task(f"hf:{hub_dir / 'csqa'}") == "commonsenseqa"
    assert source_task(f"hf:{hub_dir / 'custom'}") is None
    assert source_task("hf:someone/remote", columns="truthfulqa-mc") == "truthfulqa"
    assert source_task("hf:someone/remote") is None and source_task("data.json") is None


def test_dataset_dict_split_must_exist(hub_dir):
    with pytest.raises(DataError, match="no split 'dev'; choose one of train, validation, test"):
        load_traces(f"hf:{hub_dir / 'csqa'}", split="dev")


def test_missing_local_directory_is_not_sent_to_the_hub(tmp_path):
    with pytest.raises(DataError, match="directory not found"):
        load_traces(f"hf:{tmp_path / 'absent'}")


def test_unreachable_hub_fails_within_seconds_with_one_error(monkeypatch):
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "HTTPS_PROXY", "https_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # the discard port: nothing listens there
    start = time.monotonic()
    with pytest.raises(DataError, match=r"hub is not reachable \(127.0.0.1:9\).*save_to_disk"):
        load_traces("hf:someone/some_dataset")
    assert time.monotonic() - start < 5


def test_offline_mode_cli_fails_fast_in_one_line(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    start = time.monotonic()
    result = subprocess.run([sys.executable, "-m", "memreason.cli", "data", "check", "hf:someone/some_dataset"],
                            capture_output=True, text=True, timeout=60, env=env)
    elapsed = time.monotonic() - start
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2 and len(lines) == 1, result.stderr
    assert "HF_HUB_OFFLINE is set and it is not in the local datasets cache" in lines[0]
    assert elapsed < 20  # python start + datasets import; the old path took 25-30 s of retries
