"""What the annotation agent asks: the plan and knowledge prompts (our own words), their reply schemas,
and the messages of each call. ``PROMPT_VERSION`` is part of the settings digest that guards resumption:
bump it whenever a prompt or a schema changes."""

from __future__ import annotations

from typing import Sequence

from memreason.traces import MEMORY, REASON, Trace

PROMPT_VERSION = 1

PLAN_SYSTEM = (
    "You prepare training data for a language model that must keep two activities apart: recalling "
    "facts it knows, and reasoning with them. You reply with JSON only."
)

PLAN_PROMPT = """\
Show how to get from the question below to its correct answer, as a short list of steps.

There are two kinds of step.
- "memory": one piece of general knowledge the solution needs, true whatever the question is: a \
definition, a date, a quantity, a property of a thing, a scientific or historical fact. Give it a \
"query": that fact asked as a self-contained question someone could look up without seeing this \
question. Its "text" states the fact.
- "reason": one inference drawn from the question or from earlier steps: a comparison, a calculation, \
a deduction, ruling an option out. Its "query" is the empty string.

Rules:
- One fact or one inference per step, in one or two plain sentences.
- Use as few steps as the solution needs, with at least one memory step and at least one reason step.
- {order_rule}
- The last step draws the conclusion that gives the answer.
- Do not put the final answer line in the steps; put the answer in "answer", written exactly as the \
correct answer below.

Question: {question}
Correct answer: {answer}

Reply with one JSON object and nothing else, shaped like this:
{{"steps": [{{"kind": "memory", "query": "...", "text": "..."}}, {{"kind": "reason", "query": "", \
"text": "..."}}], "answer": "..."}}"""

ORDER_RULES = {
    "ordered": "Write every memory step before the first reason step: gather the facts first, then reason "
               "with them.",
    "free": "Place each step where the solution needs it; memory and reason steps may alternate.",
}

KNOWLEDGE_SYSTEM = (
    "You are a careful reference work. You answer factual questions with short, well-established "
    "statements. You reply with JSON only."
)

KNOWLEDGE_PROMPT = """\
Answer each numbered question with one or two sentences of well-established fact. Write each answer \
as a statement that stands on its own: name its subject, and do not start with "Yes" or "No". If a \
question has no settled answer, state the closest fact that is settled.

{queries}

Reply with one JSON object and nothing else, with one entry per question in the same order:
{{"facts": [{{"id": 1, "fact": "..."}}]}}"""

RETRY_PROMPT = (
    "That reply could not be used: {reason}. Reply again with only the JSON object, following every rule "
    "above."
)

PLAN_SCHEMA: dict = {
    "type": "object",
    "properties": {
        "steps": {
            "type": "array",
            "items": {
                "type": "object",
                "properties": {
                    "kind": {"type": "string", "enum": [MEMORY, REASON]},
                    "query": {"type": "string"},
                    "text": {"type": "string"},
                },
                "required": ["kind", "query", "text"],
                "additionalProperties": False,
            },
        },
        "answer": {"type": "string"},
    },
    "required": ["steps", "answer"],
    "additionalProperties": False,
}

KNOWLEDGE_SCHEMA: dict = {
    "type": "object",
    "properties": {
        "facts": {
            "type": "array",
            "items": {
                "type": "object",
                "properties": {"id": {"type": "integer"}, "fact": {"type": "string"}},
                "required": ["id", "fact"],
                "additionalProperties": False,
            },
        },
    },
    "required": ["facts"],
    "additionalProperties": False,
}


def plan_messages(trace: Trace, variant: str) -> list[dict]:
    """The plan call's messages for one question (gold answer included: the plan explains it)."""
    prompt = PLAN_PROMPT.format(order_rule=ORDER_RULES[variant], question=trace.question.strip(),
                                answer=trace.answer)
    return [{"role": "system", "content": PLAN_SYSTEM}, {"role": "user", "content": prompt}]


def knowledge_messages(queries: Sequence[str]) -> list[dict]:
    """The knowledge call's messages: the numbered queries only, never the question or its answer."""
    numbered = "\n".join(f"{i}. {q}" for i, q in enumerate(queries, 1))
    return [{"role": "system", "content": KNOWLEDGE_SYSTEM},
            {"role": "user", "content": KNOWLEDGE_PROMPT.format(queries=numbered)}]


def retry_messages(base: list[dict], raw: str, reason: Exception) -> list[dict]:
    """A call's messages asked again: the model sees its reply and what was wrong with it."""
    return base + [{"role": "assistant", "content": raw[:4000]},
                   {"role": "user", "content": RETRY_PROMPT.format(reason=reason)}]


__all__ = ["KNOWLEDGE_PROMPT", "KNOWLEDGE_SCHEMA", "KNOWLEDGE_SYSTEM", "ORDER_RULES", "PLAN_PROMPT", "PLAN_SCHEMA",
           "PLAN_SYSTEM", "PROMPT_VERSION", "RETRY_PROMPT", "knowledge_messages", "plan_messages", "retry_messages"]
