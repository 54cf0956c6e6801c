"""Tests of memreason.analysis.exact_judge: fact matching (numbers and negations never match loosely), fact
tables from files and gold traces, and the exact judge on constructed traces with known faulty steps."""

from __future__ import annotations

import json

import pytest

from judge_fixtures import FACTS, MEMORY_ERROR, REASON_ERROR, make_row, table, with_trace  # noqa: F401 - a fixture
from memreason.analysis import exact_judge as E
from memreason.analysis import judges as J
from memreason.errors import ConfigError, DataError


# ---------------------------------------------------------------- matching

def test_normalisation_drops_case_punctuation_and_thousands_separators():
    assert E.normalise_text("La Paz: 3,600 m, ÁBOVE sea-level!") == "la paz 3600 m above sea level"
    assert E.token_overlap("La Paz is about 3600 metres above sea level", FACTS["facts"][2]["text"]) == 1.0


def test_a_wrong_number_or_a_negation_never_matches_however_many_words_agree(table):
    facts = table.facts_for("q1")
    raf = "The Royal Air Force was founded on 1 April 1918."
    assert E.token_overlap("The Royal Air Force was founded in 1898.", raf) >= 0.8  # overlap alone would match
    assert table.match("The Royal Air Force was founded in 1898.", facts, 0.8)[0] is None
    assert table.match("The Royal Air Force wasn't founded on 1 April 1918.", facts, 0.8)[0] is None
    assert table.match("The Royal Air Force was founded in 1918.", facts, 0.8)[0] == "raf"
    assert table.match("The Boxer Rebellion took place in China.", facts, 0.8) == ("boxer", 1.0)


def test_fact_table_match_uses_aliases_and_reports_the_score(table):
    facts = table.facts_for("q1")
    assert table.match("The RAF was formed in 1918", facts, 0.8) == ("raf", 1.0)
    fid, score = table.match("Bananas are yellow.", facts, 0.8)
    assert fid is None and score < 0.8


# ---------------------------------------------------------------- fact tables

def test_fact_table_without_questions_applies_to_every_question(tmp_path):
    path = tmp_path / "world.json"
    path.write_text(json.dumps({"facts": FACTS["facts"]}))
    table = E.FactTable.load(path)
    assert [f.id for f in table.facts_for("anything")] == ["boxer", "raf", "lapaz"]


@pytest.mark.parametrize("data, field", [
    ({"facts": [{"id": "a", "text": "x"}, {"id": "a", "text": "y"}]}, "id"),
    ({"facts": [{"id": "a", "text": " "}]}, "text"),
    ({"facts": [{"id": "a", "text": "x", "aliases": "y"}]}, "aliases"),
    ({"facts": [{"id": "a", "text": "x"}], "questions": {"q": ["b"]}}, "questions"),
    ({"fact": []}, "facts"),
])
def test_bad_fact_tables_are_refused_naming_the_field(tmp_path, data, field):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(data))
    with pytest.raises(DataError, match=f"field '{field}'") as info:
        E.FactTable.load(path)
    assert str(path) in str(info.value)


def test_fact_table_from_gold_traces_keys_each_questions_memory_steps_by_its_id():
    from memreason.traces import Step, Trace

    gold = [Trace("q?", (Step("memory", "Fact one."), Step("reason", "So."), Step("memory", "Fact two.")), "True",
                  meta={"id": "x"})]
    table = E.FactTable.from_traces(gold)
    assert [f.text for f in table.facts_for("x")] == ["Fact one.", "Fact two."]
    assert table.facts_for("y") is None


# ---------------------------------------------------------------- the exact judge

def test_exact_judge_finds_the_first_false_memory_step(table):
    verdict = E.ExactJudge(table).attribute_error(MEMORY_ERROR)
    assert verdict.source == "memory" and verdict.first_faulty == 2
    assert verdict.step_correct == (True, None, False, None, False)
    assert verdict.evidence[0] == ("boxer", 1.0)


def test_exact_judge_blames_reasoning_when_every_memory_step_is_true(table):
    verdict = E.ExactJudge(table).attribute_error(REASON_ERROR)
    assert verdict.source == "reason" and verdict.first_faulty is None
    assert verdict.step_correct == (True, True, None)


def test_exact_judge_does_not_apply_without_labels_steps_or_facts(table):
    judge = E.ExactJudge(table)
    with pytest.raises(J.NotApplicable, match="unlabelled"):
        judge.attribute_error(make_row("q1", [("step", "The RAF was formed in 1918.")]))
    with pytest.raises(J.NotApplicable, match="no steps"):
        judge.attribute_error(make_row("q1", []))
    with pytest.raises(J.NotApplicable, match="no facts"):
        judge.attribute_error(with_trace(REASON_ERROR, id="q9"))


def test_exact_decoupling_flags_a_reason_step_that_only_restates_a_fact(table):
    row = make_row("q1", [("memory", "The RAF was formed in 1918."),
                      ("reason", "The Boxer Rebellion took place in China between 1899 and 1901."),
                      ("reason", "So the RAF came too late to fight in it."),
                      ("memory", "Tea is a drink.")])
    verdict = E.ExactJudge(table).check_decoupling(row)
    assert verdict.decoupled == (True, False, True, False)
    assert verdict.forms == ("fact", "fact", None, None)


def test_exact_judge_threshold_must_be_a_share(table):
    with pytest.raises(ConfigError):
        E.ExactJudge(table, threshold=1.5)




def test_the_judge_config_digest_is_unchanged_so_earlier_verdict_files_still_resume(tmp_path):
    # pinned from the digest the judges wrote before the digest moved to memreason.io.settings_digest
    path = tmp_path / "facts.json"
    path.write_text(json.dumps(FACTS))
    description = E.ExactJudge(E.FactTable.load(path), source="facts.json").describe()
    assert description["facts_digest"] == "0fbec79d517c7ab0"
    assert J.verdict_row(MEMORY_ERROR, E.ExactJudge(E.FactTable.load(path), source="facts.json"),
                         J.ERRORS)["judge_config"] == "572660ff17b951ad"
