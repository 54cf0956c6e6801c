"""The one schema every part of memreason speaks: ``Step`` and ``Trace``.

A Trace is a question, an ordered tuple of steps (each either a memory-recall step or a reasoning step)
and an answer. Every input spelling of a step tag is mapped to one canonical kind by ``TAG_TABLE``; the
rest of the code never sees an alias. An unknown tag is an error, never a silent relabel (the original
cleaning turned ``[reasoning]`` into memory, spec disentangle.md §10 B3) and never a silent shift of the
other steps' labels (B4): the kind travels with its step.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Mapping

MEMORY = "memory"
REASON = "reason"
KINDS = (MEMORY, REASON)
# A step whose kind is not known: plain chain-of-thought output, or a model output without a kind marker.
# It is never produced from a data file (unknown tags there are errors).
UNLABELLED = "step"
STEP_KINDS = KINDS + (UNLABELLED,)

# Every accepted spelling (compared lower-cased, whitespace collapsed) → canonical kind.
TAG_TABLE: Mapping[str, str] = {
    "rag": MEMORY,
    "memory": MEMORY,
    "knowledge": MEMORY,
    "factual knowledge": MEMORY,
    "fact": MEMORY,
    "factual": MEMORY,
    "reason": REASON,
    "reasoning": REASON,
}

# "[rag]: text" — the paper's step format. The tag may not contain "]" (the original's greedy regex
# produced tags like "reason] [rag" from such lines).
_TAGGED_STEP = re.compile(r"^\s*\[([^\[\]]*)\]\s*:\s*(.*?)\s*$", re.DOTALL)


class UnknownTagError(ValueError):
    """A step tag that is not in ``TAG_TABLE``."""

    def __init__(self, tag: str):
        self.tag = tag
        known = ", ".join(sorted(TAG_TABLE))
        super().__init__(f"unknown step tag [{tag}] (known tags: {known})")


def normalise_kind(tag: str) -> str:
    """Map a step tag in any accepted spelling to ``"memory"`` or ``"reason"``.

    Raises:
        UnknownTagError: the tag is not in ``TAG_TABLE``.
    """
    key = " ".join(str(tag).split()).lower()
    try:
        return TAG_TABLE[key]
    except KeyError:
        raise UnknownTagError(str(tag)) from None


@dataclass(frozen=True)
class Step:
    """One step of a trace.

    Args:
        kind (str): ``"memory"`` (recall a fact), ``"reason"`` (derive something), or ``"step"`` for a
            step whose kind is unknown (model output without a kind marker). Aliases are not accepted
            here; pass tags through ``normalise_kind`` first.
        text (str): the step's content, without any tag or marker.
    """

    kind: str
    text: str

    def __post_init__(self):
        if self.kind not in STEP_KINDS:
            raise ValueError(f"Step.kind must be one of {STEP_KINDS}, got {self.kind!r} (use normalise_kind for tags)")
        if not isinstance(self.text, str):
            raise TypeError(f"Step.text must be a str, got {type(self.text).__name__}")


@dataclass(frozen=True)
class Trace:
    """A question with its decomposed solution.

    Args:
        question (str): the question as shown to the model (options included for multiple choice).
        steps (tuple[Step, ...]): the memory and reason steps in order; empty for question-only items.
        answer (str | None): the final answer in the task's canonical form (``"True"``, ``"B"``, ...).
        meta (dict): free-form provenance (``id``, ``split``, ``source``, ...); not part of equality.
    """

    question: str
    steps: tuple[Step, ...] = ()
    answer: str | None = None
    meta: dict[str, Any] = field(default_factory=dict, compare=False)

    def __post_init__(self):
        object.__setattr__(self, "steps", tuple(self.steps))

    @property
    def id(self) -> str | None:
        return self.meta.get("id")

    def kinds(self) -> tuple[str, ...]:
        return tuple(step.kind for step in self.steps)

    def count(self, kind: str) -> int:
        return sum(step.kind == kind for step in self.steps)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict; ``Trace.from_dict`` is its inverse."""
        return {"question": self.question, "steps": [{"kind": s.kind, "text": s.text} for s in self.steps],
                "answer": self.answer, "meta": dict(self.meta)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "Trace":
        steps = tuple(Step(s["kind"] if s["kind"] == UNLABELLED else normalise_kind(s["kind"]), s["text"])
                      for s in data.get("steps") or ())
        return cls(question=data["question"], steps=steps, answer=data.get("answer"), meta=dict(data.get("meta") or {}))


def parse_tagged_step(line: str) -> tuple[str, str]:
    """Split a ``"[tag]: text"`` step into its raw tag and text.

    Raises:
        ValueError: the line does not start with a ``[tag]:`` prefix.
    """
    match = _TAGGED_STEP.match(line)
    if not match:
        raise ValueError(f"step does not start with '[tag]:' — {line[:60]!r}")
    return match.group(1), match.group(2)


def format_tagged_step(step: Step) -> str:
    """The paper's step format, ``"[rag]: text"`` for memory and ``"[reason]: text"`` for reason."""
    tag = "rag" if step.kind == MEMORY else "reason"
    return f"[{tag}]: {step.text}"
