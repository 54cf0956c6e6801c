"""What the judge tests share (tests/analysis/test_judges.py, test_exact_judge.py): a fact table, result rows
built from (kind, text) steps, and two wrong answers, one with a memory error and one with a reasoning error."""

from __future__ import annotations

import dataclasses
import json

import pytest

from memreason.analysis.exact_judge import FactTable
from memreason.traces import Result, Step, Trace

FACTS = {"format": "memreason-facts/1",
         "facts": [{"id": "boxer", "text": "The Boxer Rebellion took place in China between 1899 and 1901."},
                   {"id": "raf", "text": "The Royal Air Force was founded on 1 April 1918.",
                    "aliases": ["The RAF was formed in 1918."]},
                   {"id": "lapaz", "text": "La Paz lies about 3,600 metres above sea level."}],
         "questions": {"q1": ["boxer", "raf"], "q2": ["lapaz"]}}


def make_row(rid, steps, outcome="wrong", question="Did the RAF fight in the Boxer Rebellion?", gold="False",
             predicted="True") -> Result:
    """A result row with the given (kind, text) steps."""
    trace = Trace(question, tuple(Step(k, t) for k, t in steps), predicted, meta={"id": rid})
    return Result(trace=trace, gold=gold, outcome=outcome)


def with_trace(result: Result, **changes) -> Result:
    """``result`` with some fields of its trace changed (``id`` sets the trace's meta id)."""
    if "id" in changes:
        changes["meta"] = {"id": changes.pop("id")}
    return result.replace(trace=dataclasses.replace(result.trace, **changes))


MEMORY_ERROR = make_row("q1", [("memory", "The Boxer Rebellion took place in China between 1899 and 1901."),
                               ("reason", "So the rebellion was over by 1902."),
                               ("memory", "The Royal Air Force was founded in 1898."),   # false: wrong year
                               ("reason", "So the RAF existed during the rebellion."),
                               ("memory", "The RAF was formed in 1950.")])                # false too, but later
REASON_ERROR = make_row("q1", [("memory", "The Boxer Rebellion took place in China between 1899 and 1901."),
                               ("memory", "The RAF was formed in 1918."),
                               ("reason", "So the RAF fought in it.")])


@pytest.fixture
def table(tmp_path):
    path = tmp_path / "facts.json"
    path.write_text(json.dumps(FACTS))
    return FactTable.load(path)
