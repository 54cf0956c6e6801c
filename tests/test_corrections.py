"""Tests of memreason.corrections: every source (world, gold, facts file in three formats, typed text, an LLM
behind a scripted OpenAI-compatible endpoint) gives the documented correction, and the locators pick the
first faulty memory step (judge) or the least confident one (no judge). No model is loaded here."""

from __future__ import annotations

import json

import pytest

from memreason.corrections import (Correction, FactsSource, GoldSource, LLMSource, TextSource, WorldSource,
                                   best_match, least_confident_step, load_source, locate_step)
from memreason.errors import ConfigError, DataError
from memreason.experiments.repair import make_judge
from memreason.traces import Result, Step, Trace


def row(rid, steps, *, question="Is a pot of boiling water hot enough to melt lead?", confidence=None,
        predicted="True", gold="False") -> Result:
    trace = Trace(question, tuple(Step(k, t) for k, t in steps), predicted, meta={"id": rid})
    return Result(trace=trace, gold=gold, outcome="wrong", step_confidence=confidence)


LEAD = row("lead", [("memory", "Water boils at 100 degrees Celsius at sea level."),
                    ("memory", "Lead melts at about 30 degrees Celsius."),
                    ("reason", "100 is above 30, so the water melts lead.")])
GOLD = [{"id": "lead", "question": LEAD.question, "answer": "False",
         "steps": [{"kind": "memory", "text": "Water boils at 100 degrees Celsius at sea level."},
                   {"kind": "memory", "text": "Lead melts at about 327 degrees Celsius."},
                   {"kind": "reason", "text": "100 degrees is far below 327 degrees, so it cannot melt lead."}]}]


@pytest.fixture
def gold_file(tmp_path):
    path = tmp_path / "gold.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in GOLD))
    return path


def test_gold_source_picks_the_best_matching_gold_memory_step_the_trace_does_not_state(gold_file):
    source = load_source(f"gold:{gold_file}")
    assert isinstance(source, GoldSource) and source.name == f"gold:{gold_file}"
    correction = source.correct(LEAD, 1)
    # the boiling fact is stated already; the lead fact is the one left, and it shares most words
    assert correction == Correction(1, "Lead melts at about 327 degrees Celsius.", "memory", f"gold:{gold_file}",
                                    correction.note)
    assert "gold memory step 2" in correction.note
    assert source.correct(row("other", [("memory", "x y z")]), 0) is None  # no gold trace
    # a gold step restated word for word is not offered again
    stated = row("lead", [("memory", "Lead melts at about 327 degrees Celsius."),
                          ("memory", "Water boils at 100 degrees Celsius at sea level.")])
    assert source.correct(stated, 0) is None


def test_gold_source_falls_back_to_the_position_rule_when_no_word_is_shared(gold_file):
    source = GoldSource(str(gold_file))
    junk = row("lead", [("memory", "Cats purr."), ("memory", "Dogs bark loudly.")])
    first, second = source.correct(junk, 0), source.correct(junk, 1)
    assert first.text.startswith("Water boils") and second.text.startswith("Lead melts")
    assert "by position" in first.note


def test_best_match_breaks_ties_by_position_and_gives_up_without_a_shared_word():
    trace = row("t", [("memory", "alpha beta"), ("memory", "gamma delta")])
    # both candidates share one of two words with step 1: the one at its position wins
    assert best_match(trace, 1, ["gamma one", "gamma two"], by_position=True)[0] == 1
    assert best_match(trace, 0, ["omega"], by_position=False) is None


@pytest.mark.parametrize("suffix", [".txt", ".jsonl", ".json"])
def test_a_facts_file_in_every_format_gives_the_best_matching_fact(tmp_path, suffix):
    facts = ["Water boils at 100 degrees Celsius at sea level.", "Lead melts at about 327 degrees Celsius.",
             "Paris is the capital of France."]
    path = tmp_path / f"facts{suffix}"
    if suffix == ".txt":
        path.write_text("# my facts\n\n" + "\n".join(facts) + "\n")
    elif suffix == ".jsonl":
        path.write_text(json.dumps(facts[0]) + "\n" + "".join(json.dumps({"text": f}) + "\n" for f in facts[1:]))
    else:
        path.write_text(json.dumps({"format": "memreason-facts/1",
                                    "facts": [{"id": f"f{i}", "text": f} for i, f in enumerate(facts)]}))
    source = load_source(f"facts:{path}")
    assert isinstance(source, FactsSource)
    assert source.correct(LEAD, 1).text == "Lead melts at about 327 degrees Celsius."
    # a step about nothing in the file gets no correction
    assert source.correct(row("x", [("memory", "Cats purr softly.")]), 0) is None
    # the file's facts also make an exact judge: the false lead step is the first faulty memory step
    assert locate_step(LEAD, make_judge("auto", None, source)) == 1


def test_jsonl_facts_can_belong_to_questions_and_bad_lines_name_the_line(tmp_path):
    path = tmp_path / "facts.jsonl"
    path.write_text(json.dumps({"text": "Lead melts at about 327 degrees Celsius.", "question": "lead"}) + "\n")
    source = FactsSource(path)
    assert source.correct(LEAD, 1).text.startswith("Lead melts")
    assert source.correct(row("other", [(s.kind, s.text) for s in LEAD.steps]), 1) is None
    path.write_text('{"text": "ok"}\n{"id": 3}\n')
    with pytest.raises(DataError, match="line 2"):
        FactsSource(path)
    with pytest.raises(DataError, match="not found"):
        load_source(f"facts:{tmp_path / 'missing.txt'}")


def test_text_source_corrects_any_step_with_the_typed_text():
    source = load_source("text:Lead melts at 327 degrees Celsius.")
    assert isinstance(source, TextSource)
    assert source.correct(LEAD, 1) == Correction(1, "Lead melts at 327 degrees Celsius.", "memory",
                                                 "text:Lead melts at 327 degrees Celsius.", "typed by the user")
    with pytest.raises(ConfigError, match="step 5 does not exist"):
        source.correct(LEAD, 5)


@pytest.fixture(scope="module")
def world_dir(tmp_path_factory):
    from memreason.data.world import WorldConfig, generate_world, write_world

    world = generate_world(WorldConfig(seed=2, n_people=6, n_cities=3, n_countries=3, n_organisations=3,
                                       n_train=10, n_test=4, n_heldout=2))
    directory = tmp_path_factory.mktemp("ablation") / "world"
    write_world(world, directory)
    return world, directory


def test_world_source_corrects_a_false_recall_to_the_true_fact_in_the_world_wording(world_dir):
    from memreason.data.world import RELATIONS

    world, directory = world_dir
    source = load_source(f"world:{directory.parent}")  # an ablation directory holding world/
    assert isinstance(source, WorldSource)
    fact = next(f for f in world.facts.values() if f.relation == "born_in")
    wrong_city = next(c for c in world.names_of("city") if c != fact.object)
    trace = row("w", [("memory", fact.text(2).replace(fact.object, wrong_city)),   # a corpus paraphrase
                      ("reason", f"So the birthplace of {fact.subject} is {wrong_city}.")])
    correction = source.correct(trace, 0)
    assert correction.text == RELATIONS["born_in"].templates[0].format(s=fact.subject, o=fact.object)
    assert correction.note == f"born_in({fact.subject}) is {fact.object}, not {wrong_city}"
    assert source.correct(trace, 1) is None                                       # a reason step
    assert source.correct(row("w", [("memory", fact.text())]), 0) is None        # already true
    # a composite recall keeps its composite wording
    work = next(f for f in world.facts.values() if f.relation == "works_for")
    base = world.lookup("based_in", work.object)
    composite = row("c", [("memory", f"The base of the employer of {work.subject} is {wrong_city}.")])
    if base.object != wrong_city:
        assert source.correct(composite, 0).text == f"The base of the employer of {work.subject} is {base.object}."


# ---------------------------------------------------------------- the LLM source over HTTP

def test_llm_source_names_the_step_writes_the_fact_and_is_cached(tmp_path):
    from memreason.serve import ScriptedBackend, Server

    replies = ["not json at all", json.dumps({"step": 2, "fact": "Lead melts at about 327 degrees Celsius."})]
    backend = ScriptedBackend(replies, model_id="fixer")
    with Server(backend) as server:
        source = load_source(f"llm:fixer@{server.url}", api_key="s3cret", cache_dir=tmp_path / "cache",
                             sleep=lambda s: None)
        assert isinstance(source, LLMSource) and source.name == f"llm:fixer@{server.url}"
        correction = source.correct(LEAD, 0)
        assert correction.step == 1 and correction.text == "Lead melts at about 327 degrees Celsius."
        assert correction.note == "the model named step 2 (located: step 1)"
        assert backend.count == 2  # the invalid reply was re-asked with the reason
        assert "could not be used" in backend.requests[1].messages[-1]["content"]
        prompt = backend.requests[0].messages[-1]["content"]
        assert "flagged step 1" in prompt and "2. [memory] Lead melts at about 30 degrees Celsius." in prompt
        again = LLMSource("fixer", server.url, api_key="s3cret", cache_dir=tmp_path / "cache")
        assert again.correct(LEAD, 0) == correction and backend.count == 2  # from the cache
    assert "s3cret" not in json.dumps(source.describe()) + source.name


def test_llm_source_says_no_correction_when_the_model_finds_no_false_fact(tmp_path):
    from memreason.serve import ScriptedBackend, Server

    with Server(ScriptedBackend([json.dumps({"step": None, "fact": None})], model_id="m")) as server:
        assert load_source(f"llm:m@{server.url}", api_key="k").correct(LEAD, 1) is None


def test_unknown_specs_and_options_are_one_clear_error():
    with pytest.raises(ConfigError, match="unknown correction source 'wiki:x'"):
        load_source("wiki:x")
    with pytest.raises(ConfigError, match="takes no option cache_dir"):
        load_source("text:x", cache_dir="y")
    with pytest.raises(ConfigError, match="unknown correction source"):
        load_source("gold:")


# ---------------------------------------------------------------- locators

def test_locating_by_confidence_picks_the_least_confident_memory_step():
    confidence = [{"mean": -0.5, "min": -1, "n_tokens": 3}, {"mean": -2.0, "min": -3, "n_tokens": 3},
                  {"mean": -9.0, "min": -9, "n_tokens": 3}]
    assert locate_step(LEAD.replace(step_confidence=tuple(confidence))) == 1  # the reason step is not a candidate
    plain = row("p", [("step", "a b"), ("step", "c d"), ("step", "e f")], confidence=tuple(confidence))
    assert least_confident_step(plain) == 2  # unlabelled traces offer every step
    assert locate_step(LEAD, by="confidence") is None  # no confidences recorded


def test_locating_by_judge_is_the_first_faulty_memory_step_and_none_for_reasoning_errors(gold_file):
    judge = make_judge("exact", str(gold_file))
    assert locate_step(LEAD, judge) == 1
    sound = row("lead", [(s["kind"], s["text"]) for s in GOLD[0]["steps"]])
    assert locate_step(sound, judge) is None  # every memory step holds: a reasoning error
    assert locate_step(row("nobody", [("memory", "x")]), judge) is None  # not judged
    with pytest.raises(ConfigError, match="needs a judge"):
        locate_step(LEAD, by="judge")
    assert make_judge("auto", None, load_source("text:x")) is None
    with pytest.raises(ConfigError, match="needs its data"):
        make_judge("world", None, load_source("text:x"))
