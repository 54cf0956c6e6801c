"""Validation of the annotation agent's replies: what is repaired, deterministically, and what is rejected.

A **repair** (recorded per item; an item with any repair is *repaired*, with none *accepted*):

- ``json_extracted``: the JSON object had to be cut out of a code fence or surrounding prose;
- ``tag_alias``: a step kind spelt as an alias (``rag``, ``Reasoning``, ``fact``...) mapped by
  ``memreason.traces.normalise_kind``;
- ``tagged_string_step``: a step given as a ``"[rag]: text"`` string instead of an object;
- ``whitespace``: kept step text with runs of whitespace or line breaks, collapsed to single spaces
  (a memory step's own text is not kept when the knowledge pass replaces it);
- ``empty_step_dropped``: a step with empty text removed (the rest must still pass every check);
- ``answer_format``: the reply's answer written in another form of the gold answer (``yes`` for True,
  ``(B)`` or ``B. library`` for B) and read with the task's own extractor.

Everything else raises ``InvalidReply`` with a short countable ``category``: not JSON, wrong schema, an
unknown step kind, too few memory or reason steps, too many steps, control tokens in a step (the marker
grammar of ``memreason.model.tokens``), a memory step without a query, an ordered plan with a memory step
after a reason step, an answer that disagrees with the gold answer, a knowledge reply that misses a query.
Missing steps are never invented (a plan without a concluding reason step is not given one).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from memreason.llm import InvalidReply, parse_json_reply
from memreason.model.tokens import count_markers
from memreason.tasks import ANSWER_MARKER, Task
from memreason.traces import MEMORY, REASON, Step, Trace, UnknownTagError, normalise_kind, parse_tagged_step

if TYPE_CHECKING:
    from memreason.data.annotate import AnnotateConfig

_YES_NO = {"yes": "True", "no": "False"}


def _clean_text(text: str, repairs: list[str]) -> str:
    collapsed = " ".join(text.split())
    if collapsed != text.strip():
        repairs.append("whitespace")
    return collapsed


def _gold_consistent(answer: Any, trace: Trace, task: Task, repairs: list[str]) -> None:
    if not isinstance(answer, (str, bool)) or (isinstance(answer, str) and not answer.strip()):
        raise InvalidReply("wrong schema", "'answer' must be a non-empty string")
    try:
        given = task.canonical_answer(answer, trace.question)
    except ValueError:
        text = str(answer).strip()
        given = _YES_NO.get(text.lower().rstrip(".")) if task.answer_type == "boolean" else None
        if given is None:
            given = task.extract(f"{ANSWER_MARKER} {text}\n")
        if given is None:
            raise InvalidReply("answer not in the answer space", repr(text[:40])) from None
        repairs.append("answer_format")
    if not task.is_correct(given, trace.answer):
        raise InvalidReply("answer disagrees with gold", f"{given!r} vs {trace.answer!r}")


@dataclass
class Plan:
    """A validated plan: the steps, the fact query of each memory step (same order), and the repairs."""

    steps: list[Step]
    queries: list[str]
    repairs: list[str]


def _plan_step(i: int, item: Any, repairs: list[str]) -> tuple[str, str, str]:
    """(kind, text, query) of one reply step, repairs noted."""
    query = ""
    if isinstance(item, str):
        try:
            tag, text = parse_tagged_step(item)
        except ValueError:
            raise InvalidReply("wrong schema", f"steps[{i}] is a string without a '[kind]:' tag") from None
        repairs.append("tagged_string_step")
    elif isinstance(item, dict) and isinstance(item.get("kind"), str) and isinstance(item.get("text"), str):
        tag, text = item["kind"], item["text"]
        query = item.get("query") if isinstance(item.get("query"), str) else ""
    else:
        raise InvalidReply("wrong schema", f"steps[{i}] needs string fields 'kind' and 'text'")
    try:
        kind = normalise_kind(tag)
    except UnknownTagError:
        raise InvalidReply("unknown step kind", repr(tag[:30])) from None
    if kind != tag:
        repairs.append("tag_alias")
    return kind, text, query


def validate_plan(raw: str, trace: Trace, task: Task, config: "AnnotateConfig") -> Plan:
    """Check (and deterministically repair) a plan reply; see the module docstring for the rules.

    Raises:
        InvalidReply: the reply cannot be used.
    """
    repairs: list[str] = []
    value = parse_json_reply(raw, repairs)
    if not isinstance(value, dict) or not isinstance(value.get("steps"), list):
        raise InvalidReply("wrong schema", "expected an object with a 'steps' list")
    steps, queries = [], []
    for i, item in enumerate(value["steps"]):
        kind, text, query = _plan_step(i, item, repairs)
        if not text.strip():
            repairs.append("empty_step_dropped")
            continue
        # a memory step's own text is replaced by the knowledge pass: tidying it repairs nothing kept
        replaced = kind == MEMORY and config.fill_knowledge
        text = _clean_text(text, [] if replaced else repairs)
        if count_markers(text) or count_markers(query):
            raise InvalidReply("control token in step", f"steps[{i}]")
        if ANSWER_MARKER in text:
            raise InvalidReply("answer line inside the steps", f"steps[{i}]")
        if kind == MEMORY:
            query = " ".join(query.split())
            if config.fill_knowledge and not query:
                raise InvalidReply("memory step without query", f"steps[{i}]")
            queries.append(query)
        steps.append(Step(kind, text))
    memory = sum(s.kind == MEMORY for s in steps)
    reason = len(steps) - memory
    if memory < config.min_memory:
        raise InvalidReply("too few memory steps", f"{memory} < {config.min_memory}")
    if reason < config.min_reason:
        raise InvalidReply("too few reason steps", f"{reason} < {config.min_reason}")
    if len(steps) > config.max_steps:
        raise InvalidReply("too many steps", f"{len(steps)} > {config.max_steps}")
    if config.variant == "ordered":
        kinds = [s.kind for s in steps]
        if REASON in kinds and MEMORY in kinds[kinds.index(REASON):]:
            raise InvalidReply("memory step after a reason step", "the ordered variant needs facts first")
    _gold_consistent(value.get("answer"), trace, task, repairs)
    return Plan(steps, queries, repairs)


def validate_facts(raw: str, n: int) -> tuple[list[str], list[str]]:
    """Check a knowledge reply for ``n`` numbered queries.

    Returns:
        (facts in query order, repairs)

    Raises:
        InvalidReply: not JSON, wrong schema, or a query left without a fact.
    """
    repairs: list[str] = []
    value = parse_json_reply(raw, repairs)
    if not isinstance(value, dict) or not isinstance(value.get("facts"), list):
        raise InvalidReply("wrong schema", "expected an object with a 'facts' list")
    facts: dict[int, str] = {}
    for i, item in enumerate(value["facts"]):
        if not isinstance(item, dict) or not isinstance(item.get("fact"), str) \
                or not isinstance(item.get("id"), int) or isinstance(item.get("id"), bool):
            raise InvalidReply("wrong schema", f"facts[{i}] needs an integer 'id' and a string 'fact'")
        if not 1 <= item["id"] <= n:
            raise InvalidReply("wrong schema", f"facts[{i}] has id {item['id']}; ids run from 1 to {n}")
        if item["fact"].strip():
            facts.setdefault(item["id"], _clean_text(item["fact"], repairs))
    missing = [i for i in range(1, n + 1) if i not in facts]
    if missing:
        raise InvalidReply("missing facts", f"no fact for queries {missing}")
    if any(count_markers(fact) for fact in facts.values()):
        raise InvalidReply("control token in step", "a fact")
    return [facts[i] for i in range(1, n + 1)], repairs


__all__ = ["InvalidReply", "Plan", "validate_facts", "validate_plan"]
