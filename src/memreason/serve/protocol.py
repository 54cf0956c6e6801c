"""The OpenAI wire protocol as memreason speaks it: request validation and response shapes.

Everything here is a pure function of JSON-shaped data: no sockets, no model. ``parse_request`` and
``parse_completion_request`` turn a client's body into a typed request (or raise ``RequestError`` naming
the field); the ``*_body`` / ``*_chunk`` functions build the replies; ``structured`` is the ``memreason``
field every reply carries beside the text (the steps parsed by ``memreason.model.tokens.parse`` and the
answer). Errors are OpenAI-shaped: ``{"error": {"message", "type", "param", "code"}}``.

Defaults differ from OpenAI's in one deliberate way: a request without ``temperature`` is greedy (OpenAI's
default is 1.0; memreason's is determinism, DESIGN.md). A field we cannot honour (tools, logprobs, echo,
penalties, n > 1, ...) is refused with a 400, never silently ignored.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass
from typing import Any

from memreason.tasks import Task, answer_line

ROLES = ("system", "developer", "user", "assistant")
MAX_JSON_DEPTH = 64  # a chat body with a JSON schema in response_format nests about 10 deep
MAX_STOPS = 4  # OpenAI's limit on chat stop strings
MAX_COMPLETION_STOPS = 16  # lm-evaluation-harness sends a task's whole `until` list, often more than 4
MAX_PROMPTS = 64  # prompts in one /v1/completions request


class RequestError(Exception):
    """A request the server refuses; becomes an OpenAI-style error reply.

    Args:
        status (int): HTTP status (400, 401, 404, 405, 408, 413, 503, ...).
        message (str): what is wrong and how to fix it.
        param (str | None): the offending request field.
        code (str | None): a machine-readable code (``model_not_found``, ``context_length_exceeded``, ...).
        type (str, default "invalid_request_error").
        headers (dict[str, str] | None): extra reply headers (``Allow`` for 405, ``Retry-After`` for 503).
    """

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 type: str = "invalid_request_error", headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type
        self.headers = dict(headers or {})

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


@dataclass(frozen=True)
class ChatRequest:
    """A validated chat-completion request, as backends see it.

    Args:
        messages (tuple[dict, ...]): ``{"role", "content"}`` with string content.
        max_tokens (int): most tokens to generate.
        temperature (float): 0 = greedy; > 0 = sampling seeded with ``seed``.
        top_p (float): nucleus mass when sampling.
        seed (int): the sampling seed (the request's, else the server's).
        stop (tuple[str, ...]): generation ends before the first of these strings.
        response_format (dict | None): as sent by the client; only backends that support it get one.
    """

    messages: tuple[dict, ...]
    max_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0
    stop: tuple[str, ...] = ()
    response_format: dict | None = None


@dataclass(frozen=True)
class CompletionRequest:
    """One prompt of a validated ``/v1/completions`` request: the model continues ``prompt`` as it is
    (no chat template, no added BOS), the paper's plain format.

    Args:
        prompt (str | tuple[int, ...]): the text, or token ids (lm-evaluation-harness's tokenized requests).
        max_tokens, temperature, top_p, seed, stop: as in ``ChatRequest``.
    """

    prompt: str | tuple[int, ...]
    max_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0
    stop: tuple[str, ...] = ()


@dataclass(frozen=True)
class Completion:
    """What a backend produced: the text (stop string excluded), token counts and why it ended
    (``"stop"``: EOS or a stop string; ``"length"``: ``max_tokens`` or the context ran out)."""

    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str


# ---------------------------------------------------------------- JSON

def load_json(body: bytes, max_depth: int = MAX_JSON_DEPTH) -> Any:
    """Decode a request body, refusing bodies nested deeper than ``max_depth``.

    Raises:
        RequestError: 400 for invalid UTF-8 / JSON, or nesting deeper than ``max_depth``.
    """
    too_deep = RequestError(400, f"the request body nests JSON deeper than {max_depth} levels; flatten it",
                            code="json_too_deep")
    try:
        payload = json.loads(body)
    except RecursionError:  # the decoder's own guard, far below a 200k-deep body's depth
        raise too_deep from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise RequestError(400, f"the request body is not valid JSON: {exc}") from None
    if _depth_exceeds(payload, max_depth):
        raise too_deep
    return payload


def _depth_exceeds(value: Any, max_depth: int) -> bool:
    """Iterative (no recursion), so a deep value cannot exhaust the stack here either."""
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, (dict, list)):
            if depth > max_depth:
                return True
            stack.extend((child, depth + 1) for child in (item.values() if isinstance(item, dict) else item))
    return False


# ---------------------------------------------------------------- request validation

_UNSUPPORTED = {  # field -> value that means "not used"; anything else is refused, never silently ignored
    "tools": None, "functions": None, "logprobs": False, "top_logprobs": None, "logit_bias": None,
    "audio": None, "frequency_penalty": 0, "presence_penalty": 0, "prediction": None,
}
_UNSUPPORTED_COMPLETION = {
    "logit_bias": None, "frequency_penalty": 0, "presence_penalty": 0, "suffix": None,
}


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _require_model(body: Any, model_id: str) -> None:
    if not isinstance(body, dict):
        raise RequestError(400, "the request body must be a JSON object")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise RequestError(400, "missing 'model'", param="model")
    if model != model_id:
        raise RequestError(404, f"The model '{model}' does not exist; this server serves '{model_id}'",
                           param="model", code="model_not_found")


def _refuse_unsupported(body: dict, unsupported: dict) -> None:
    for name, unused in unsupported.items():
        value = body.get(name)
        if value is not None and value != unused and value != [] and value != {}:
            raise RequestError(400, f"'{name}' is not supported by this server", param=name,
                               code="unsupported_parameter")
    if body.get("n", 1) not in (1, None):
        raise RequestError(400, "only n=1 is supported", param="n", code="unsupported_parameter")


def _sampling(body: dict, *, default_max_tokens: int, max_tokens_limit: int, default_seed: int,
              max_stops: int) -> dict:
    """The generation fields both endpoints share: max_tokens, temperature, top_p, seed, stop."""
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    if max_tokens is None:
        max_tokens = default_max_tokens
    if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or not 1 <= max_tokens <= max_tokens_limit:
        raise RequestError(400, f"max_tokens must be an integer from 1 to {max_tokens_limit}", param="max_tokens")
    temperature = body.get("temperature")
    # greedy unless asked (OpenAI's own default is 1.0; memreason's is determinism, DESIGN.md)
    temperature = 0.0 if temperature is None else temperature
    if not _is_number(temperature) or not 0 <= temperature <= 2:
        raise RequestError(400, "temperature must be a number from 0 to 2", param="temperature")
    top_p = body.get("top_p")
    top_p = 1.0 if top_p is None else top_p
    if not _is_number(top_p) or not 0 < top_p <= 1:
        raise RequestError(400, "top_p must be a number in (0, 1]", param="top_p")
    seed = body.get("seed")
    seed = default_seed if seed is None else seed
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise RequestError(400, "seed must be an integer", param="seed")
    stop = body.get("stop")
    stop = [] if stop is None else [stop] if isinstance(stop, str) else stop
    if not isinstance(stop, list) or len(stop) > max_stops or not all(isinstance(s, str) and s for s in stop):
        raise RequestError(400, f"stop must be a non-empty string or a list of up to {max_stops} of them",
                           param="stop")
    return dict(max_tokens=max_tokens, temperature=float(temperature), top_p=float(top_p), seed=seed,
                stop=tuple(stop))


def _stream_fields(body: dict) -> tuple[bool, dict]:
    stream = body.get("stream") or False
    if not isinstance(stream, bool):
        raise RequestError(400, "stream must be true or false", param="stream")
    stream_options = body.get("stream_options") or {}
    if not isinstance(stream_options, dict):
        raise RequestError(400, "stream_options must be an object", param="stream_options")
    return stream, stream_options


def _content_text(content: Any, index: int) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # [{"type": "text", "text": ...}, ...]
        texts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise RequestError(400, "only text content parts are supported", param=f"messages[{index}].content")
            texts.append(part["text"])
        return "".join(texts)
    raise RequestError(400, "message content must be a string or a list of text parts",
                       param=f"messages[{index}].content")


def _messages(body: dict) -> tuple[dict, ...]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise RequestError(400, "'messages' must be a non-empty list of {role, content} objects", param="messages")
    clean = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise RequestError(400, "each message must be an object", param=f"messages[{i}]")
        role = message.get("role")
        if role not in ROLES:
            raise RequestError(400, f"unsupported role {role!r}; use one of {', '.join(ROLES)}",
                               param=f"messages[{i}].role")
        clean.append({"role": "system" if role == "developer" else role,
                      "content": _content_text(message.get("content"), i)})
    return tuple(clean)


def parse_request(body: Any, *, model_id: str, default_max_tokens: int, max_tokens_limit: int,
                  default_seed: int) -> tuple[ChatRequest, bool, dict]:
    """Validate a ``/v1/chat/completions`` body.

    Returns:
        (request, stream, stream_options)

    Raises:
        RequestError: 400 for a malformed field (naming it), 404 for an unknown model.
    """
    _require_model(body, model_id)
    messages = _messages(body)
    _refuse_unsupported(body, _UNSUPPORTED)
    sampling = _sampling(body, default_max_tokens=default_max_tokens, max_tokens_limit=max_tokens_limit,
                         default_seed=default_seed, max_stops=MAX_STOPS)
    response_format = body.get("response_format")
    if response_format is not None and (not isinstance(response_format, dict) or "type" not in response_format):
        raise RequestError(400, "response_format must be an object with a 'type'", param="response_format")
    stream, stream_options = _stream_fields(body)
    return ChatRequest(messages, response_format=response_format, **sampling), stream, stream_options


def _prompts(body: dict) -> list[str | tuple[int, ...]]:
    """The ``prompt`` field: a string, a list of strings, a list of token ids, or a list of id lists."""
    prompt = body.get("prompt")
    hint = "'prompt' must be a non-empty string, a list of them, or token ids"

    def token_ids(value) -> bool:
        return isinstance(value, list) and bool(value) and all(
            isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in value)

    if isinstance(prompt, str):
        prompts = [prompt]
    elif token_ids(prompt):
        prompts = [tuple(prompt)]
    elif isinstance(prompt, list) and prompt:
        prompts = [p if isinstance(p, str) else tuple(p) if token_ids(p) else None for p in prompt]
        if any(p is None for p in prompts):
            raise RequestError(400, hint, param="prompt")
    else:
        raise RequestError(400, hint, param="prompt")
    if any(p == "" for p in prompts):
        raise RequestError(400, "a prompt is empty; send the text the model should continue", param="prompt")
    if len(prompts) > MAX_PROMPTS:
        raise RequestError(400, f"at most {MAX_PROMPTS} prompts per request (got {len(prompts)})", param="prompt")
    return prompts


def parse_completion_request(body: Any, *, model_id: str, default_max_tokens: int, max_tokens_limit: int,
                             default_seed: int) -> tuple[list[CompletionRequest], bool, dict]:
    """Validate a ``/v1/completions`` body (one request per prompt, all with the same settings).

    ``echo`` must be false and ``logprobs`` absent: this server returns generated text only. That rules out
    lm-evaluation-harness's log-likelihood (multiple-choice) tasks over HTTP; its ``generate_until`` tasks
    work, and ``memreason eval`` scores log-likelihoods locally.

    Returns:
        (requests, stream, stream_options)

    Raises:
        RequestError: 400 for a malformed or unsupported field (naming it), 404 for an unknown model.
    """
    _require_model(body, model_id)
    prompts = _prompts(body)
    if body.get("logprobs") is not None:
        raise RequestError(400, "logprobs are not supported by this server: it returns generated text only "
                           "(score log-likelihoods with `memreason eval`, or use generate_until tasks)",
                           param="logprobs", code="unsupported_parameter")
    if body.get("echo") not in (None, False):
        raise RequestError(400, "echo is not supported: the reply holds the generated text only; the prompt is "
                           "yours already", param="echo", code="unsupported_parameter")
    if body.get("best_of") not in (None, 1):
        raise RequestError(400, "only best_of=1 is supported", param="best_of", code="unsupported_parameter")
    _refuse_unsupported(body, _UNSUPPORTED_COMPLETION)
    sampling = _sampling(body, default_max_tokens=default_max_tokens, max_tokens_limit=max_tokens_limit,
                         default_seed=default_seed, max_stops=MAX_COMPLETION_STOPS)
    stream, stream_options = _stream_fields(body)
    return [CompletionRequest(prompt, **sampling) for prompt in prompts], stream, stream_options


def question_of(request: ChatRequest | CompletionRequest) -> str:
    """The question a reply answers, for its structured trace: the last user turn, or the plain prompt."""
    if isinstance(request, CompletionRequest):
        return request.prompt if isinstance(request.prompt, str) else ""
    users = [m["content"] for m in request.messages if m["role"] == "user"]
    return users[-1] if users else ""


# ---------------------------------------------------------------- replies

def structured(text: str, question: str, task: Task | None) -> dict:
    """The ``memreason`` field of a reply: the text's steps (memory / reason / unlabelled) and its answer."""
    from memreason.model.tokens import parse

    if task is not None:
        answer = task.extract(text)
    else:
        line = answer_line(text)
        answer = (line.strip() or None) if line is not None else None
    trace = parse(text, question=question, answer=answer)
    return {"steps": [{"kind": s.kind, "text": s.text} for s in trace.steps], "answer": answer}


def usage(completions: list[Completion]) -> dict:
    prompt = sum(c.prompt_tokens for c in completions)
    generated = sum(c.completion_tokens for c in completions)
    return {"prompt_tokens": prompt, "completion_tokens": generated, "total_tokens": prompt + generated}


def new_id(prefix: str = "chatcmpl") -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def _envelope(object_: str, id_: str, created: int, model_id: str, fingerprint: str, choices: list) -> dict:
    return {"id": id_, "object": object_, "created": created, "model": model_id,
            "system_fingerprint": fingerprint, "choices": choices}


def chat_body(completion: Completion, request: ChatRequest, *, model_id: str, fingerprint: str,
              task: Task | None) -> dict:
    """A whole ``chat.completion`` reply."""
    message = {"role": "assistant", "content": completion.text,
               "memreason": structured(completion.text, question_of(request), task)}
    choice = {"index": 0, "message": message, "finish_reason": completion.finish_reason, "logprobs": None}
    body = _envelope("chat.completion", new_id(), int(time.time()), model_id, fingerprint, [choice])
    body["usage"] = usage([completion])
    return body


def chat_chunk(id_: str, created: int, *, model_id: str, fingerprint: str, delta: dict | None,
               finish: str | None = None, usage_: dict | None = None) -> dict:
    """One ``chat.completion.chunk`` event (``delta=None``: the usage-only chunk with no choices)."""
    choices = [] if delta is None else [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}]
    body = _envelope("chat.completion.chunk", id_, created, model_id, fingerprint, choices)
    if usage_ is not None:
        body["usage"] = usage_
    return body


def text_choice(index: int, text: str, finish: str | None, memreason: dict | None = None) -> dict:
    """One choice of a ``text_completion`` reply or chunk (``memreason`` only once the text is whole)."""
    choice = {"index": index, "text": text, "finish_reason": finish, "logprobs": None}
    if memreason is not None:
        choice["memreason"] = memreason
    return choice


def completion_body(completions: list[Completion], requests: list[CompletionRequest], *, model_id: str,
                    fingerprint: str, task: Task | None) -> dict:
    """A whole ``text_completion`` reply: one choice per prompt, in the prompts' order."""
    choices = [text_choice(i, c.text, c.finish_reason, structured(c.text, question_of(r), task))
               for i, (c, r) in enumerate(zip(completions, requests))]
    body = _envelope("text_completion", new_id("cmpl"), int(time.time()), model_id, fingerprint, choices)
    body["usage"] = usage(completions)
    return body


def completion_chunk(id_: str, created: int, *, model_id: str, fingerprint: str, choices: list,
                     usage_: dict | None = None) -> dict:
    """One streamed ``text_completion`` event."""
    body = _envelope("text_completion", id_, created, model_id, fingerprint, choices)
    if usage_ is not None:
        body["usage"] = usage_
    return body
