"""The one schema every part of memreason speaks: ``Step``, ``Trace`` and ``Result``.

A Trace is a question, an ordered tuple of steps (each either a memory-recall step or a reasoning step)
and an answer. Every input spelling of a step tag is mapped to one canonical kind by ``TAG_TABLE``; the
rest of the code never sees an alias. An unknown tag is an error, never a silent relabel (the original
cleaning turned ``[reasoning]`` into memory, spec disentangle.md §10 B3) and never a silent shift of the
other steps' labels (B4): the kind travels with its step.

A Result is one evaluated question: the predicted Trace (parsed from the model's text), the prompt it was
given, the gold answer, the outcome and the token counts. It is the row of ``results.jsonl`` and what every
later stage (compare, judges, report, repair) reads; ``to_dict``/``from_dict`` carry a schema version, and
rows written before the version existed still load.
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


RESULT_SCHEMA = "memreason-result/2"
# Rows written before the schema field existed (no prompt kept) are version 1.
_LEGACY_SCHEMA = "memreason-result/1"
_RESULT_REQUIRED = ("id", "question", "outcome")
# Keys derived from other fields on writing (for pandas users), never read back.
_DERIVED = ("n_memory", "n_reason")
_RESULT_FIELDS = ("schema", "id", "question", "gold", "predicted", "outcome", "steps", "raw", "prompt", "n_tokens",
                  "marker_tokens", "task", "task_version", "seed", "config", "samples", "token_ids",
                  "step_confidence") + _DERIVED


class ResultFormatError(ValueError):
    """A results row that is not a memreason result (the caller adds the file and line)."""


@dataclass(frozen=True)
class Result:
    """One evaluated question.

    Args:
        trace (Trace): what the model produced: the question, the parsed steps, the predicted answer and
            ``meta["id"]``.
        gold (str | None): the reference answer.
        outcome (str): ``correct``, ``wrong`` or ``unparseable`` (``memreason.tasks``).
        raw (str): the generated text, markers kept (never the prompt).
        prompt (str | None): the exact prompt the model was given (None in rows written before schema 2).
        n_tokens (int): generated tokens; marker_tokens (int): control markers among them.
        task (str | None), task_version (int | None), seed (int | None), config (str | None): how the row
            was made (``config`` is the settings digest).
        samples (tuple[dict, ...] | None): per-sample ``raw``/``predicted`` when several were drawn.
        token_ids (tuple[int, ...] | None): the generated token ids of ``raw`` (revision teacher-forces
            exactly these); None in rows written before schema 2.
        step_confidence (tuple[dict | None, ...] | None): per step, the model's own ``mean``/``min`` token
            log-probability and ``n_tokens`` (``memreason.confidence``); None when not recorded.
        extra (dict): any other keys of the row (repair provenance, confidences, ...), kept on a round trip.
    """

    trace: Trace
    gold: str | None
    outcome: str
    raw: str = ""
    prompt: str | None = None
    n_tokens: int = 0
    marker_tokens: int = 0
    task: str | None = None
    task_version: int | None = None
    seed: int | None = None
    config: str | None = None
    samples: tuple[dict, ...] | None = None
    token_ids: tuple[int, ...] | None = None
    step_confidence: tuple[dict | None, ...] | None = None
    extra: dict[str, Any] = field(default_factory=dict, compare=False)

    @property
    def id(self) -> str | None:
        return self.trace.id

    @property
    def question(self) -> str:
        return self.trace.question

    @property
    def predicted(self) -> str | None:
        return self.trace.answer

    @property
    def steps(self) -> tuple[Step, ...]:
        return self.trace.steps

    def to_dict(self) -> dict[str, Any]:
        """The JSONL row; ``Result.from_dict`` is its inverse."""
        row = {"schema": RESULT_SCHEMA, "id": self.id, "question": self.question, "gold": self.gold,
               "predicted": self.predicted, "outcome": self.outcome,
               "steps": [{"kind": s.kind, "text": s.text} for s in self.steps], "raw": self.raw,
               "prompt": self.prompt, "n_tokens": self.n_tokens, "n_memory": self.trace.count(MEMORY),
               "n_reason": self.trace.count(REASON), "marker_tokens": self.marker_tokens, "task": self.task,
               "task_version": self.task_version, "seed": self.seed, "config": self.config}
        if self.samples is not None:
            row["samples"] = [dict(s) for s in self.samples]
        if self.step_confidence is not None:
            row["step_confidence"] = [None if c is None else dict(c) for c in self.step_confidence]
        if self.token_ids is not None:
            row["token_ids"] = list(self.token_ids)
        row.update(self.extra)
        return row

    @classmethod
    def from_dict(cls, row: Any) -> "Result":
        """A Result from a row of any schema version this memreason reads.

        Raises:
            ResultFormatError: not a mapping, an unknown schema version, a missing field or a bad step.
        """
        if not isinstance(row, Mapping):
            raise ResultFormatError(f"expected a JSON object per line, got {type(row).__name__}")
        schema = row.get("schema", _LEGACY_SCHEMA)
        if schema not in (RESULT_SCHEMA, _LEGACY_SCHEMA):
            raise ResultFormatError(f"results schema {schema!r} is not one this memreason reads "
                                    f"({_LEGACY_SCHEMA}, {RESULT_SCHEMA}); upgrade memreason")
        missing = [key for key in _RESULT_REQUIRED if key not in row]
        if missing:
            raise ResultFormatError(f"not a memreason results row: missing {', '.join(missing)}")
        for key, types in (("question", str), ("outcome", str), ("raw", (str, type(None))),
                           ("prompt", (str, type(None))), ("n_tokens", (int, type(None))),
                           ("marker_tokens", (int, type(None))), ("steps", (list, type(None))),
                           ("token_ids", (list, type(None))), ("step_confidence", (list, type(None))),
                           ("samples", (list, type(None)))):
            if key in row and (not isinstance(row[key], types) or isinstance(row[key], bool)):
                raise ResultFormatError(f"field {key!r} of row {row.get('id')!r} has the wrong type "
                                        f"({type(row[key]).__name__})")
        try:
            steps = tuple(Step(s["kind"], s["text"]) for s in row.get("steps") or ())
            trace = Trace(question=row["question"], steps=steps, answer=row.get("predicted"), meta={"id": row["id"]})
        except (KeyError, TypeError, ValueError) as exc:
            raise ResultFormatError(f"malformed steps in row {row.get('id')!r}: {exc}") from None
        samples, token_ids, confidence = row.get("samples"), row.get("token_ids"), row.get("step_confidence")
        return cls(trace=trace, gold=row.get("gold"), outcome=row["outcome"], raw=row.get("raw") or "",
                   prompt=row.get("prompt"), n_tokens=int(row.get("n_tokens") or 0),
                   marker_tokens=int(row.get("marker_tokens") or 0), task=row.get("task"),
                   task_version=row.get("task_version"), seed=row.get("seed"), config=row.get("config"),
                   samples=tuple(samples) if samples is not None else None,
                   token_ids=tuple(int(t) for t in token_ids) if token_ids is not None else None,
                   step_confidence=tuple(confidence) if confidence is not None else None,
                   extra={k: v for k, v in row.items() if k not in _RESULT_FIELDS})

    def replace(self, **changes) -> "Result":
        """A copy with some fields changed (``dataclasses.replace``)."""
        import dataclasses

        return dataclasses.replace(self, **changes)


def parse_tagged_step(line: str) -> tuple[str, str]:
    """Split a ``"[tag]: text"`` step into its raw tag and text.

    Raises:
        ValueError: the line does not start with a ``[tag]:`` prefix.
    """
    match = _TAGGED_STEP.match(line)
    if not match:
        raise ValueError(f"step does not start with '[tag]:' — {line[:60]!r}")
    return match.group(1), match.group(2)
