"""Validation of the trace editor's request bodies (``memreason.serve.editor_protocol``): typed requests
out, and a 400 naming the field for everything else."""

import pytest

from memreason.interventions.revise import Edit
from memreason.serve import RequestError
from memreason.serve.editor_protocol import parse_answer, parse_open, parse_repair, parse_result, parse_revise
from memreason.tasks import get_task
from memreason.traces import Result, Step, Trace

TASK = get_task("strategyqa")
RAW = "<memory> Ice is less dense than water.\n<reason> Less dense things float.\n<answer> The answer is: True"
ROW = Result(trace=Trace("Is ice lighter than water?", (Step("memory", "Ice is less dense than water."),
                                                         Step("reason", "Less dense things float.")), "True",
                         meta={"id": "r0"}),
             gold="True", outcome="correct", raw=RAW, prompt="Question: Is ice lighter than water?\n",
             token_ids=(5, 6, 7)).to_dict()


def revise(**body):
    return parse_revise({"result": ROW, **body}, max_tokens_limit=100, labels_steps=True)


def test_a_valid_revise_body_becomes_an_edit():
    request = revise(step=1, text="  Ice floats. ", kind="memory", inject=True, max_tokens=50)
    assert request.edit == Edit(1, "replace", text="Ice floats.", kind="memory")
    assert request.inject is True and request.max_tokens == 50
    assert request.result.raw == RAW and request.result.token_ids == (5, 6, 7)
    assert revise(step=-1, action="delete").edit == Edit(-1, "delete")


def test_answer_and_repair_bodies_are_typed_and_gold_is_canonical():
    request = parse_answer({"question": "Is ice lighter than water?", "gold": "true", "id": "q1"}, task=TASK,
                           max_tokens_limit=100)
    assert (request.question, request.gold, request.id, request.max_tokens) == (
        "Is ice lighter than water?", "True", "q1", None)
    repair = parse_repair({"result": ROW, "source": "gold", "step": 0}, max_tokens_limit=100)
    assert (repair.source, repair.step, repair.inject) == ("gold", 0, False)
    assert parse_repair({"result": ROW, "source": "gold"}, max_tokens_limit=100).step is None


@pytest.mark.parametrize("body,param", [
    ({"step": 0}, "text"),                                   # replace without text
    ({"step": 0, "text": "  "}, "text"),
    ({"step": 0, "text": "a <memory> b"}, "text"),           # control tokens belong to the scheme
    ({"step": 2, "text": "x"}, "step"),                      # two steps: 0 and 1
    ({"step": -3, "text": "x"}, "step"),
    ({"step": "0", "text": "x"}, "step"),
    ({"step": True, "text": "x"}, "step"),
    ({"text": "x"}, "step"),
    ({"step": 0, "text": "x", "kind": "fact"}, "kind"),
    ({"step": 0, "text": "x", "kind": "step"}, "kind"),      # this scheme labels every step
    ({"step": 0, "action": "rewrite"}, "action"),
    ({"step": 0, "action": "delete", "text": "x"}, "text"),
    ({"step": 0, "action": "regenerate", "kind": "memory"}, "kind"),
    ({"step": 0, "text": "x", "inject": "yes"}, "inject"),
    ({"step": 0, "text": "x", "max_tokens": 0}, "max_tokens"),
    ({"step": 0, "text": "x", "max_tokens": 101}, "max_tokens"),
    ({"step": 0, "text": "x", "injcet": True}, "injcet"),     # a misspelt field is refused, not ignored
])
def test_bad_revise_bodies_name_the_field(body, param):
    with pytest.raises(RequestError) as caught:
        revise(**body)
    assert caught.value.status == 400 and caught.value.param == param and caught.value.message


@pytest.mark.parametrize("row,param", [
    ("not a row", "result"),
    ({**ROW, "prompt": None}, "result.prompt"),
    ({**ROW, "raw": 5}, "result.raw"),
    ({**ROW, "token_ids": [1, -2]}, "result.token_ids"),
    ({**ROW, "token_ids": [1, True]}, "result.token_ids"),
    ({**ROW, "step_confidence": [1, 2]}, "result.step_confidence"),
    ({**ROW, "steps": [{"kind": "wizard", "text": "x"}]}, "result"),
    ({**ROW, "schema": "memreason-result/9"}, "result"),
    ({k: v for k, v in ROW.items() if k != "outcome"}, "result"),
])
def test_bad_rows_name_the_field(row, param):
    with pytest.raises(RequestError) as caught:
        parse_result(row)
    assert caught.value.status == 400 and caught.value.param == param


def test_a_row_without_a_prompt_opens_but_cannot_be_revised():
    legacy = {**ROW, "prompt": None, "schema": "memreason-result/1"}
    assert parse_open({"result": legacy}).prompt is None
    with pytest.raises(RequestError):
        parse_repair({"result": legacy, "source": "gold"}, max_tokens_limit=100)


@pytest.mark.parametrize("body,param", [
    ({}, "question"),
    ({"question": ""}, "question"),
    ({"question": 5}, "question"),
    ({"question": "x" * 20_001}, "question"),
    ({"question": "Is it?", "gold": "maybe"}, "gold"),
    ({"question": "Is it?", "id": ""}, "id"),
    ({"question": "Is it?", "max_tokens": 1.5}, "max_tokens"),
    ({"question": "Is it?", "model": "tiny"}, "model"),
])
def test_bad_answer_bodies_name_the_field(body, param):
    with pytest.raises(RequestError) as caught:
        parse_answer(body, task=TASK, max_tokens_limit=100)
    assert caught.value.status == 400 and caught.value.param == param


def test_non_object_bodies_and_missing_sources_are_refused():
    for body in ([], "x", None):
        with pytest.raises(RequestError, match="JSON object"):
            parse_answer(body, task=TASK, max_tokens_limit=100)
    with pytest.raises(RequestError) as caught:
        parse_repair({"result": ROW}, max_tokens_limit=100)
    assert caught.value.param == "source"
