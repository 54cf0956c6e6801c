"""Tests of memreason.analysis.cloze: recall@1 of a world's facts by ranking candidate objects after a
sentence prefix (the ranking, the chance level, the per-relation counts), scored by a tiny random model
and by a scorer that knows the answers."""

from __future__ import annotations

import pytest

import memreason.analysis.cloze as cloze
from conftest import build_tiny_model, build_tiny_tokenizer
from memreason.data.world import World, WorldConfig, generate_world


@pytest.fixture(scope="module")
def world():
    full = generate_world(WorldConfig(seed=1))
    return World(full.config, full.entities, dict(list(full.facts.items())[:12]))


def test_recall_on_a_tiny_model_is_seeded_and_counts_every_fact(world):
    tokenizer = build_tiny_tokenizer()
    model = build_tiny_model(len(tokenizer))
    result = cloze.cloze_recall(model, tokenizer, world, template=3, distractors=2, seed=0)
    assert result["n"] == 12 and sum(r["n"] for r in result["by_relation"].values()) == 12
    assert result["recall"] == result["correct"] / 12
    assert result["ci95"][0] <= result["recall"] <= result["ci95"][1]
    assert result["chance"] == pytest.approx(1 / 3)  # two distractors beside the true object
    assert cloze.cloze_recall(model, tokenizer, world, template=3, distractors=2, seed=0) == result


@pytest.mark.parametrize("knows, recall", [(True, 1.0), (False, 0.0)])
def test_a_fact_is_recalled_exactly_when_its_true_object_scores_highest(world, monkeypatch, knows, recall):
    tokenizer = build_tiny_tokenizer()
    truth = {fact.prefix(0): f" {fact.object}." for fact in world.facts.values()}
    assert len(truth) == len(world.facts)

    def scores(model, pairs, pad, batch_size):
        # +1 for the true object of the prefix, -1 for a distractor (or the reverse)
        decode = tokenizer.decode
        return [1.0 if (truth[decode(p)] == decode(c)) == knows else -1.0 for p, c in pairs]

    monkeypatch.setattr(cloze, "continuation_logprobs", scores)
    result = cloze.cloze_recall(None, tokenizer, world, template=0, distractors=3)
    assert result["recall"] == recall and result["n"] == 12
