"""Tests of memreason.data.world: determinism per seed, the shape of the world and its questions, held-out
compositions kept out of training, the files it writes, and clear config errors."""

from __future__ import annotations

import json

import pytest

from memreason.data import load_traces
from memreason.data.world import (FORMS, RELATIONS, SPLITS, WorldConfig, chain_phrase, generate_world, paths,
                                  write_world)
from memreason.errors import ConfigError
from memreason.traces import MEMORY, REASON


@pytest.fixture(scope="module")
def world():
    return generate_world(WorldConfig())


def _files(world, directory):
    write_world(world, directory)
    return {p.name: p.read_bytes() for p in directory.iterdir()}


def test_the_same_seed_writes_byte_identical_files_and_another_seed_does_not(tmp_path):
    first = _files(generate_world(WorldConfig(seed=3)), tmp_path / "a")
    again = _files(generate_world(WorldConfig(seed=3)), tmp_path / "b")
    other = _files(generate_world(WorldConfig(seed=4)), tmp_path / "c")
    assert first == again
    assert first["world.json"] != other["world.json"] and first["questions.jsonl"] != other["questions.jsonl"]


def test_every_relation_is_a_total_function_between_the_declared_types(world):
    for relation in RELATIONS.values():
        subjects = world.names_of(relation.subject)
        facts = [f for f in world.facts.values() if f.relation == relation.name]
        assert sorted(f.subject for f in facts) == subjects
        assert all(world.entities[f.object] == relation.object and f.object != f.subject for f in facts)
    names = list(world.entities)
    assert not any(a != b and a in b for a in names for b in names), "a name inside another breaks parsing"


def test_default_world_has_the_documented_size_and_all_forms_and_hops(world):
    assert 80 <= len(world.facts) <= 120
    assert {s: len(world.questions[s]) for s in SPLITS} == {"train": 150, "test": 40, "test_heldout": 30}
    train = world.questions["train"]
    assert {t.meta["form"] for t in train} == set(FORMS)
    assert {len(t.meta["path"]) for t in train} == {2, 3}
    ids = [t.id for s in SPLITS for t in world.questions[s]]
    assert len(set(ids)) == len(ids)


def test_gold_traces_recall_exactly_the_needed_facts_and_link_every_step(world):
    for trace in world.questions["train"] + world.questions["test_heldout"]:
        links = trace.meta["step_facts"]
        assert len(links) == len(trace.steps)
        memory = [(s, l) for s, l in zip(trace.steps, links) if s.kind == MEMORY]
        hops = len(trace.meta["path"]) * len(trace.meta["subjects"])
        assert len(memory) == hops
        for step, link in memory:
            assert len(link) == 1 and step.text == world.facts[link[0]].text(0)
        assert trace.steps[-1].kind == REASON and trace.meta["fact_ids"] == sorted({f for l in links for f in l})


def test_heldout_pairs_never_appear_in_training_questions_and_all_heldout_questions_use_one(world):
    pairs = WorldConfig().pairs()
    assert pairs == {("based_in", "located_in")}

    def composes(trace):
        path = trace.meta["path"]
        return any(pair in pairs for pair in zip(path, path[1:]))

    assert not any(composes(t) for t in world.questions["train"] + world.questions["test"])
    assert world.questions["test_heldout"] and all(composes(t) for t in world.questions["test_heldout"])
    # each relation of the held-out pair is still trained, in other compositions
    trained = {r for t in world.questions["train"] for r in t.meta["path"]}
    assert {"based_in", "located_in"} <= trained


def test_knowledge_corpus_repeats_each_fact_and_never_uses_the_probe_wording(world):
    corpus = world.corpus()
    assert len(corpus) == len(world.facts) * world.config.mentions
    probes = {f.text(3) for f in world.facts.values()}
    assert not probes & set(corpus)
    fact = next(iter(world.facts.values()))
    assert fact.text(1).startswith(fact.prefix(1)) and fact.text(1) == f"{fact.prefix(1)} {fact.object}."


def test_written_files_load_with_the_existing_loaders(world, tmp_path):
    files = write_world(world, tmp_path)
    for split in SPLITS:
        traces, _ = load_traces(files["questions"], task="freeform", split=split)
        assert [t.id for t in traces] == [t.id for t in world.questions[split]]
        assert [t.steps for t in traces] == [t.steps for t in world.questions[split]]
    corpus, _ = load_traces(files["corpus"], task="freeform", split="train")
    assert [t.question for t in corpus] == world.corpus() and not any(t.steps for t in corpus)
    table = json.loads(files["facts"].read_text())
    assert table["format"] == "memreason-facts/1" and len(table["facts"]) == len(world.facts)


def test_paths_follow_the_types_and_chains_read_as_english():
    for path in paths(2, 3):
        assert all(RELATIONS[a].object == RELATIONS[b].subject for a, b in zip(path, path[1:]))
    assert chain_phrase(("mentor", "born_in", "located_in")) == "country of the birthplace of the mentor"
    assert all(len(p) == 2 for p in paths(2, 2))


@pytest.mark.parametrize("overrides, message", [
    ({"n_people": "2"}, "n_people must be >= 3"),
    ({"max_hops": "4"}, "min_hops <= max_hops <= 3"),
    ({"heldout_pairs": "based_in>capital"}, "heldout_pairs"),
    ({"n_peple": "10"}, "did you mean n_people"),
    ({"mentions": "many"}, "mentions: expected an integer"),
])
def test_bad_world_config_is_one_clear_config_error(overrides, message):
    from memreason.config import load_settings

    with pytest.raises(ConfigError, match=message):
        load_settings(WorldConfig, None, [f"{k}={v}" for k, v in overrides.items()])
