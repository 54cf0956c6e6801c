"""Request validation for the trace editor's endpoints (``/v1/memreason/*``): JSON in, typed requests out.

Pure functions of JSON-shaped data, like ``protocol``: each raises ``RequestError`` (400, OpenAI's error
shape) naming the offending field (``param``: ``question``, ``result.prompt``, ``step``, ``text``, ...).
Unlike the OpenAI endpoints, these are memreason's own, so an unknown field is refused rather than
ignored: a misspelt ``injcet`` must not quietly revise without injecting.

Bodies (every field but the first of each is optional):

- answer: ``{question, gold, id, max_tokens}``
- open: ``{result}`` (a ``Result.to_dict()`` row, e.g. one line of ``results.jsonl``)
- revise: ``{result, step, action ("replace" | "regenerate" | "delete"; default "replace"), text, kind,
  inject, max_tokens}`` (``text`` only, and required, for ``replace``)
- repair: ``{result, source, step, inject, max_tokens}``
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from memreason.errors import ConfigError
from memreason.interventions.revise import ACTIONS, Edit
from memreason.serve.protocol import RequestError
from memreason.tasks import Task
from memreason.traces import STEP_KINDS, UNLABELLED, Result, ResultFormatError

MAX_QUESTION_CHARS = 20_000
MAX_ID_CHARS = 200


@dataclass(frozen=True)
class AnswerRequest:
    question: str
    gold: str | None = None
    id: str | None = None
    max_tokens: int | None = None


@dataclass(frozen=True)
class ReviseRequest:
    result: Result
    edit: Edit
    inject: bool = False
    max_tokens: int | None = None


@dataclass(frozen=True)
class RepairRequest:
    result: Result
    source: str
    step: int | None = None
    inject: bool = False
    max_tokens: int | None = None


def _object(body: Any, allowed: tuple[str, ...], required: tuple[str, ...]) -> dict:
    if not isinstance(body, dict):
        raise RequestError(400, "the request body must be a JSON object")
    unknown = sorted(set(body) - set(allowed))
    if unknown:
        raise RequestError(400, f"unknown field {unknown[0]!r}; this endpoint takes {', '.join(allowed)}",
                           param=unknown[0], code="unknown_parameter")
    for name in required:
        if body.get(name) is None:
            raise RequestError(400, f"missing '{name}'", param=name)
    return body


def _int(body: dict, name: str, *, low: int | None = None, high: int | None = None) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool):
        raise RequestError(400, f"{name} must be an integer", param=name)
    if (low is not None and value < low) or (high is not None and value > high):
        raise RequestError(400, f"{name} must be from {low} to {high} (got {value})", param=name)
    return value


def _bool(body: dict, name: str) -> bool:
    value = body.get(name, False)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise RequestError(400, f"{name} must be true or false", param=name)
    return value


def _text(body: dict, name: str, limit: int) -> str | None:
    value = body.get(name)
    if value is None:
        return None
    if not isinstance(value, str) or not value.strip():
        raise RequestError(400, f"{name} must be a non-empty string", param=name)
    if len(value) > limit:
        raise RequestError(400, f"{name} has {len(value):,} characters; at most {limit:,} are accepted", param=name)
    return value


def parse_result(value: Any, *, revisable: bool = True) -> Result:
    """A results row sent by a client, as a ``Result``.

    Args:
        value: the ``result`` field (a ``Result.to_dict()`` object).
        revisable (bool, default True): also require what a revision needs (the prompt).

    Raises:
        RequestError: 400 naming ``result`` or the bad ``result.<field>``.
    """
    if not isinstance(value, dict):
        raise RequestError(400, "result must be a results row (an object, as one line of results.jsonl)",
                           param="result")
    for name, types in (("question", (str,)), ("raw", (str,)), ("prompt", (str,)), ("token_ids", (list,)),
                        ("step_confidence", (list,)), ("steps", (list,))):
        if value.get(name) is not None and not isinstance(value[name], types):
            raise RequestError(400, f"result.{name} must be a {types[0].__name__}", param=f"result.{name}")
    ids = value.get("token_ids") or []
    if not all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in ids):
        raise RequestError(400, "result.token_ids must be non-negative integers", param="result.token_ids")
    if not all(c is None or isinstance(c, dict) for c in value.get("step_confidence") or []):
        raise RequestError(400, "result.step_confidence must hold an object or null per step",
                           param="result.step_confidence")
    try:
        result = Result.from_dict(value)
    except (ResultFormatError, TypeError, ValueError) as exc:
        raise RequestError(400, f"result is not a memreason results row: {exc}", param="result") from None
    if revisable and not result.prompt:
        raise RequestError(400, "result has no prompt (rows written before results schema 2 cannot be revised; "
                           "evaluate again with `memreason eval`)", param="result.prompt")
    return result


def _step_index(body: dict, result: Result, *, required: bool) -> int | None:
    from memreason.model.tokens import step_spans

    step = _int(body, "step")
    if step is None:
        if required:
            raise RequestError(400, "missing 'step' (0-based index of the step)", param="step")
        return None
    n = len(step_spans(result.raw))
    if not -n <= step < n:
        raise RequestError(400, f"the row has {n} steps; step {step} does not exist (steps count from 0)",
                           param="step")
    return step


def parse_answer(body: Any, *, task: Task, max_tokens_limit: int) -> AnswerRequest:
    """Validate a ``/v1/memreason/answer`` body (``gold`` is checked against the task's answer space)."""
    body = _object(body, ("question", "gold", "id", "max_tokens"), ("question",))
    question = _text(body, "question", MAX_QUESTION_CHARS)
    gold = body.get("gold")
    if gold is not None:
        try:
            gold = task.canonical_answer(gold, question)
        except ValueError as exc:
            raise RequestError(400, f"gold: {exc}", param="gold") from None
    return AnswerRequest(question, gold, _text(body, "id", MAX_ID_CHARS),
                         _int(body, "max_tokens", low=1, high=max_tokens_limit))


def parse_open(body: Any) -> Result:
    """Validate a ``/v1/memreason/open`` body: any results row (a row without a prompt opens, read-only)."""
    body = _object(body, ("result",), ("result",))
    return parse_result(body["result"], revisable=False)


def parse_revise(body: Any, *, max_tokens_limit: int, labels_steps: bool) -> ReviseRequest:
    """Validate a ``/v1/memreason/revise`` body.

    Args:
        labels_steps (bool): the served scheme writes kinds (then a replaced step needs one: not ``step``).
    """
    from memreason.model.tokens import has_marker

    body = _object(body, ("result", "step", "action", "text", "kind", "inject", "max_tokens"), ("result",))
    result = parse_result(body["result"])
    step = _step_index(body, result, required=True)
    action = body.get("action") or "replace"
    if action not in ACTIONS:
        raise RequestError(400, f"action must be one of {', '.join(ACTIONS)} (got {action!r})", param="action")
    text, kind = body.get("text"), body.get("kind")
    if action == "replace":
        if not isinstance(text, str) or not text.strip():
            raise RequestError(400, "a replace needs 'text': the new step text", param="text")
        if has_marker(text):
            raise RequestError(400, "text must not contain control tokens such as <memory> or <reason>",
                               param="text")
        if kind is not None and kind not in STEP_KINDS:
            raise RequestError(400, f"kind must be one of {', '.join(STEP_KINDS)} (got {kind!r})", param="kind")
        if kind == UNLABELLED and labels_steps:
            raise RequestError(400, "this model labels every step: kind must be memory or reason", param="kind")
    else:
        for name, value in (("text", text), ("kind", kind)):
            if value is not None:
                raise RequestError(400, f"a {action} takes no '{name}'", param=name)
    try:
        edit = Edit(step, action, text=text.strip() if action == "replace" else None, kind=kind)
    except ConfigError as exc:  # unreachable after the checks above, kept as the last word on an Edit
        raise RequestError(400, str(exc)) from None
    return ReviseRequest(result, edit, _bool(body, "inject"), _int(body, "max_tokens", low=1, high=max_tokens_limit))


def parse_repair(body: Any, *, max_tokens_limit: int) -> RepairRequest:
    """Validate a ``/v1/memreason/repair`` body (``source``: the name of a configured source)."""
    body = _object(body, ("result", "source", "step", "inject", "max_tokens"), ("result", "source"))
    result = parse_result(body["result"])
    source = body["source"]
    if not isinstance(source, str) or not source:
        raise RequestError(400, "source must be the name of a configured correction source", param="source")
    return RepairRequest(result, source, _step_index(body, result, required=False), _bool(body, "inject"),
                         _int(body, "max_tokens", low=1, high=max_tokens_limit))
