"""Tests of memreason.api.Reasoner on a tiny trained Llama: answers keep what revision needs, revise /
regenerate / delete return the type given, an own-text revision gives the trace back token for token, and
answering with the trace's own memory injected at strength 0 is the plain answer."""

from __future__ import annotations

import json

import pytest

from memreason.api import Reasoner
from memreason.interventions.revise import Injection
from memreason.prompts import render_prompt
from memreason.tasks import get_task
from memreason.traces import Result, Step, Trace

TASK = get_task("strategyqa")


@pytest.fixture(scope="module")
def mr(tiny_reasoner):
    model, tokenizer, scheme, traces = tiny_reasoner
    return Reasoner(model, tokenizer, TASK, scheme, "plain", "tiny", max_new_tokens=80), traces


@pytest.fixture(scope="module")
def answered(mr):
    reasoner, traces = mr
    return reasoner.answer_batch([t.question for t in traces])


def test_answers_keep_prompt_token_ids_and_step_confidences(mr, answered):
    reasoner, traces = mr
    for trace, gold in zip(answered, traces):
        meta = trace.meta
        assert meta["prompt"] == render_prompt(gold.question, TASK, reasoner.tokenizer, "plain")
        assert reasoner.tokenizer.decode(meta["token_ids"], skip_special_tokens=True) == meta["raw"]
        assert meta["n_tokens"] == len(meta["token_ids"]) and meta["stopped"] in ("eos", "answer", "length")
        assert len(meta["step_confidence"]) == len(trace.steps) and trace.steps
        assert all(c is None or c["min"] <= c["mean"] <= 0 for c in meta["step_confidence"])
        json.dumps(meta)  # JSON-ready, as the trace editor sends it
    assert reasoner.answer(traces[0].question).meta["raw"] == answered[0].meta["raw"]


def test_revising_a_trace_returns_a_trace_and_its_own_text_gives_it_back(mr, answered):
    reasoner, _ = mr
    trace = answered[0]
    same = reasoner.revise(trace, 1, trace.steps[1].text)
    assert isinstance(same, Trace) and same.steps == trace.steps and same.answer == trace.answer
    assert same.meta["token_ids"] == trace.meta["token_ids"]
    assert same.meta["revision"]["step"] == 1 and same.meta["revision"]["action"] == "replace"
    edited = reasoner.revise(trace, 1, "Ice sinks in water.", kind="memory")
    assert edited.steps[0] == trace.steps[0] and edited.steps[1] == Step("memory", "Ice sinks in water.")
    assert edited.meta["revision"]["old"] == {"kind": trace.steps[1].kind, "text": trace.steps[1].text}
    assert reasoner.regenerate(trace, 1).meta["raw"] == trace.meta["raw"]
    deleted = reasoner.delete(trace, 0)
    assert deleted.steps[0] == trace.steps[1] and deleted.meta["revision"]["action"] == "delete"


def test_a_result_row_is_revised_into_a_result_row(mr, answered):
    reasoner, traces = mr
    result = reasoner.as_result(answered[1])
    assert isinstance(result, Result) and result.prompt == answered[1].meta["prompt"]
    batch = reasoner.revise_batch([(result, e) for e in
                                   (reasoner_edit("regenerate", 0), reasoner_edit("replace", 0, "Paris is in France."))])
    assert all(isinstance(r, Result) for r in batch)
    assert batch[0].raw == result.raw and batch[1].steps[0].text == "Paris is in France."
    assert batch[1].extra["revision"]["of"]["id"] == result.id


def reasoner_edit(action, step, text=None):
    from memreason.interventions.revise import Edit

    return Edit(step, action, text=text)


def test_answering_with_the_own_memory_injected_at_strength_zero_is_the_plain_answer(mr, answered):
    reasoner, traces = mr
    questions = [t.question for t in traces]
    zero = reasoner.answer_batch(questions, inject=Injection(layer=1, tau=0.0, tau_mode="absolute"))
    assert [t.meta["raw"] for t in zero] == [t.meta["raw"] for t in answered]
    assert [t.meta["token_ids"] for t in zero] == [t.meta["token_ids"] for t in answered]
    first = [next(s.text for s in t.steps if s.kind == "memory") for t in answered]
    assert [t.meta["revision"]["injection"]["memory"] for t in zero] == first
    strong = reasoner.answer_batch(questions, inject=Injection(layer=1, tau=50.0, tau_mode="absolute"))
    assert [t.meta["raw"] for t in strong] != [t.meta["raw"] for t in answered]
    for before, after in zip(answered, strong):  # the memory step's line is kept; only what follows changes
        line = before.meta["raw"].split("\n")[0] + "\n"
        assert after.meta["raw"].startswith(line) and line.startswith("<memory>")


def test_a_gold_trace_without_generated_text_is_revised_as_if_the_model_wrote_it(mr):
    reasoner, traces = mr
    gold = Trace(traces[2].question, traces[2].steps, traces[2].answer, meta={"id": "g", "gold": "True"})
    revised = reasoner.revise(gold, 0, gold.steps[0].text)
    assert revised.steps[0] == gold.steps[0] and revised.meta["outcome"] in ("correct", "wrong", "unparseable")
    assert revised.meta["prompt"] == render_prompt(gold.question, TASK, reasoner.tokenizer, "plain")
    assert revised.meta["id"] == "g" and revised.meta["gold"] == "True"
