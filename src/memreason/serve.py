"""An OpenAI-compatible HTTP server for a base model or a trained run.

Endpoints: ``POST /v1/chat/completions`` (plain JSON, or server-sent events with ``stream: true``),
``GET /v1/models``, ``GET /v1/models/<id>`` and ``GET /health``. Every reply carries, beside the text,
the structured steps parsed from it (``memreason.model.tokens.parse``): ``message.memreason`` (or the
final chunk's ``delta.memreason`` when streaming) is ``{"steps": [{"kind", "text"}], "answer": ...}``.

The server owns HTTP only; what produces the text is a *backend*:

- ``ModelBackend``: a loaded model and tokenizer. The client's messages go through the model's chat
  template (never our task prompt); greedy when the request sets no temperature (OpenAI's default is
  1.0; ours is determinism), seeded sampling when ``temperature > 0``, ``max_tokens`` and ``stop`` honoured. One generation at a time, behind a lock (generation already
  uses every core, and a fast tokenizer must not be used from two threads at once).
- ``ScriptedBackend``: canned replies (a list, or a function of the request) for tests that need exact,
  malformed or slow replies; it counts the requests it serves.

Standard library only (``http.server.ThreadingHTTPServer``): fastapi/uvicorn would add a heavy dependency
for two endpoints. Binds 127.0.0.1 unless told otherwise. Bad requests get OpenAI-style error JSON
(``{"error": {"message", "type", "param", "code"}}``) with 400 (malformed), 401 (wrong key), 404 (unknown
model or path), 413 (body or prompt too long) or 500, and the server keeps serving.
"""

from __future__ import annotations

import hmac
import json
import logging
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable, Protocol, Sequence

from memreason.tasks import Task, answer_line

logger = logging.getLogger(__name__)

DEFAULT_HOST = "127.0.0.1"
MAX_BODY_BYTES = 4 * 1024 * 1024
ROLES = ("system", "developer", "user", "assistant")
_OWNER = "memreason"


class RequestError(Exception):
    """A request the server refuses; becomes an OpenAI-style error reply.

    Args:
        status (int): HTTP status (400, 401, 404, 413, ...).
        message (str): what is wrong and how to fix it.
        param (str | None): the offending request field.
        code (str | None): a machine-readable code (``model_not_found``, ``context_length_exceeded``, ...).
        type (str, default "invalid_request_error").
    """

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 type: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type

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
class Completion:
    """What a backend produced: the text (stop string excluded), token counts and why it ended
    (``"stop"``: EOS or a stop string; ``"length"``: ``max_tokens`` or the context ran out)."""

    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str


class Backend(Protocol):
    """What the server needs from whatever produces text.

    ``prepare`` checks a request against the backend's limits (raising ``RequestError``, e.g. 413 for an
    over-long prompt) before any reply header is sent; ``generate`` produces the completion, calling
    ``on_text`` with each new piece of text when streaming (the pieces concatenate to the final text).
    """

    model_id: str
    task: Task | None

    def prepare(self, request: ChatRequest) -> Any: ...

    def generate(self, prepared: Any, on_text: Callable[[str], None] | None = None) -> Completion: ...


def _find_stop(text: str, stops: Sequence[str]) -> int | None:
    positions = [text.find(s) for s in stops if s]
    positions = [p for p in positions if p >= 0]
    return min(positions) if positions else None


class ScriptedBackend:
    """Canned replies, for tests: exact, malformed, failing or slow on purpose. ``stop`` is applied;
    ``max_tokens`` is not (a reply is served whole) and token counts are word counts.

    Args:
        replies: a list of texts served in order (the last one repeats), or a function
            ``reply(request) -> str``; the function may raise ``RequestError`` to make the server answer
            with that HTTP error (e.g. 503 to exercise a client's backoff).
        model_id (str, default "scripted").
        delay (float, default 0): seconds to wait before each reply (to test kills mid-run).
        task (Task | None): extracts ``answer`` in the structured reply.
        supports_response_format (bool, default True): accept ``response_format`` (recorded in
            ``requests``); when False, a request with a JSON response format gets a 400 like
            ``ModelBackend`` gives.

    Attributes:
        requests (list[ChatRequest]): every request served (or refused by the script), in order.
    """

    def __init__(self, replies: Sequence[str] | Callable[[ChatRequest], str], *, model_id: str = "scripted",
                 delay: float = 0.0, task: Task | None = None, supports_response_format: bool = True):
        self.model_id, self.delay, self.task = model_id, delay, task
        self.supports_response_format = supports_response_format
        self._replies = replies
        self._lock = threading.Lock()
        self.requests: list[ChatRequest] = []

    @property
    def count(self) -> int:
        with self._lock:
            return len(self.requests)

    def prepare(self, request: ChatRequest) -> ChatRequest:
        if not self.supports_response_format:
            _refuse_json_format(request)
        return request

    def generate(self, prepared: ChatRequest, on_text: Callable[[str], None] | None = None) -> Completion:
        with self._lock:
            index = len(self.requests)
            self.requests.append(prepared)
        if self.delay:
            time.sleep(self.delay)
        if callable(self._replies):
            text = self._replies(prepared)
        else:
            text = self._replies[min(index, len(self._replies) - 1)]
        finish = "stop"
        cut = _find_stop(text, prepared.stop)
        if cut is not None:
            text = text[:cut]
        if on_text:
            # a few pieces, so streaming clients see more than one chunk
            size = max(1, len(text) // 3)
            for start in range(0, len(text), size):
                on_text(text[start:start + size])
        prompt_words = sum(len(m["content"].split()) for m in prepared.messages)
        return Completion(text, prompt_words, len(text.split()), finish)


def _refuse_json_format(request: ChatRequest) -> None:
    fmt = (request.response_format or {}).get("type", "text")
    if fmt != "text":
        raise RequestError(400, f"response_format {fmt!r} is not supported by this server: it cannot constrain "
                           "generation to JSON. Send no response_format (or type 'text') and validate the reply.",
                           param="response_format", code="unsupported_response_format")


@dataclass
class _Prepared:
    input_ids: Any
    max_new_tokens: int
    request: ChatRequest


class _Collector:
    """A transformers streamer: collects generated ids, cuts at a stop string, and hands ``on_text`` the
    text that can no longer change (held back: a possible stop-string prefix and an unfinished UTF-8
    character, which decodes as U+FFFD until its last byte arrives)."""

    def __init__(self, tokenizer, stops: Sequence[str], on_text: Callable[[str], None] | None):
        self.tokenizer, self.stops, self.on_text = tokenizer, tuple(s for s in stops if s), on_text
        self.hold = max((len(s) for s in self.stops), default=1) - 1
        self.ids: list[int] = []
        self.text, self.sent, self.stopped = "", 0, False
        self._prompt_seen = False

    def put(self, value) -> None:
        if not self._prompt_seen:  # generate() first hands the streamer the prompt
            self._prompt_seen = True
            return
        if self.stopped:
            return
        self.ids.extend(value.reshape(-1).tolist())
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)
        cut = _find_stop(text, self.stops)
        if cut is not None:
            text, self.stopped = text[:cut], True
        self.text = text
        if self.stopped:
            self._emit(len(text))
        else:
            safe = len(text) - self.hold
            while safe > 0 and text[safe - 1] == "\ufffd":
                safe -= 1
            self._emit(safe)

    def end(self) -> None:
        self._emit(len(self.text))

    def _emit(self, upto: int) -> None:
        if self.on_text and upto > self.sent:
            piece, self.sent = self.text[self.sent:upto], upto
            self.on_text(piece)


class ModelBackend:
    """Serve a loaded causal LM (base model or trained run).

    Args:
        model, tokenizer: as returned by ``memreason.model.load`` or carried by a ``Reasoner``.
        model_id (str): the name clients must send as ``model``.
        task (Task | None): extracts ``answer`` in the structured reply (a run's own task).
        prompt_style (str, default "auto"): ``chat`` renders the client's messages with the chat template;
            ``plain`` (runs trained on the paper's plain prompts) joins the message contents with newlines,
            the last user turn in the run's ``Question: <q>`` form; ``auto`` = chat when the tokenizer
            has a template.
        max_context (int | None): most prompt + generated tokens; default the model's
            ``max_position_embeddings``.
    """

    def __init__(self, model, tokenizer, model_id: str, *, task: Task | None = None, prompt_style: str = "auto",
                 max_context: int | None = None):
        from memreason.prompts import resolve_style

        self.model, self.tokenizer, self.model_id, self.task = model, tokenizer, model_id, task
        self.prompt_style = resolve_style(prompt_style, tokenizer)
        limit = getattr(model.config, "max_position_embeddings", None) or 4096
        self.max_context = min(limit, max_context) if max_context else limit
        eos = model.generation_config.eos_token_id
        if eos is None:
            eos = tokenizer.eos_token_id
        self.eos_ids = sorted(set(eos if isinstance(eos, (list, tuple)) else [eos]))
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eos_ids[0]
        self._lock = threading.Lock()

    @classmethod
    def from_reasoner(cls, reasoner, model_id: str | None = None, **kwargs) -> "ModelBackend":
        """A backend for a ``memreason.load(...)`` result, keeping its task and prompt style."""
        return cls(reasoner.model, reasoner.tokenizer, model_id or reasoner.name, task=reasoner.task,
                   prompt_style=reasoner.prompt_style, **kwargs)

    def render(self, messages: Sequence[dict]) -> str:
        """The prompt text for the client's messages (chat template, or the plain form)."""
        if self.prompt_style == "chat":
            return self.tokenizer.apply_chat_template(list(messages), add_generation_prompt=True, tokenize=False)
        parts = [m["content"].strip() for m in messages]
        if messages and messages[-1]["role"] == "user" and self.task is not None:
            parts[-1] = self.task.plain_prompt(parts[-1]).strip()
        return "\n".join(parts) + "\n"

    def prepare(self, request: ChatRequest) -> _Prepared:
        _refuse_json_format(request)
        with self._lock:
            ids = self.tokenizer(self.render(request.messages), add_special_tokens=False)["input_ids"]
        if len(ids) >= self.max_context:
            raise RequestError(413, f"the prompt has {len(ids)} tokens; this model's context holds "
                               f"{self.max_context} (prompt and reply together); shorten the messages",
                               param="messages", code="context_length_exceeded")
        # the reply is cut where the context ends (finish_reason "length"), as OpenAI-style servers do
        return _Prepared(ids, min(request.max_tokens, self.max_context - len(ids)), request)

    def generate(self, prepared: _Prepared, on_text: Callable[[str], None] | None = None) -> Completion:
        import torch
        from transformers import StoppingCriteria, StoppingCriteriaList

        request = prepared.request
        collector = _Collector(self.tokenizer, request.stop, on_text)

        class _StopString(StoppingCriteria):
            def __call__(self, input_ids, scores, **kwargs):
                return torch.full((input_ids.shape[0],), collector.stopped, dtype=torch.bool, device=input_ids.device)

        kwargs = dict(max_new_tokens=prepared.max_new_tokens, pad_token_id=self.pad_id, eos_token_id=self.eos_ids,
                      streamer=collector, stopping_criteria=StoppingCriteriaList([_StopString()]))
        if request.temperature > 0:
            kwargs.update(do_sample=True, temperature=request.temperature, top_p=request.top_p, top_k=None)
        else:
            kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        device = next(self.model.parameters()).device
        input_ids = torch.tensor([prepared.input_ids], device=device)
        with self._lock:
            if request.temperature > 0:
                torch.manual_seed(request.seed)  # inside the lock: no other request moves the RNG meanwhile
            with torch.no_grad():
                self.model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), **kwargs)
        ended = collector.stopped or (bool(collector.ids) and collector.ids[-1] in self.eos_ids)
        return Completion(collector.text, len(prepared.input_ids), len(collector.ids), "stop" if ended else "length")


def load_backend(run_or_model: str | None = None, *, model_id: str | None = None, task: str | None = None,
                 dtype="auto", device="auto", max_context: int | None = None) -> ModelBackend:
    """Load a trained run or a base model (``memreason.load``) and wrap it for serving.

    Args:
        run_or_model: a run directory, a model dir, a ``.gguf`` file, a hub id, or None (embedded SmolLM2).
        model_id (str | None): the id clients send; default the run/model name (a path's last part).
        task (str | None): overrides the run's task for answer extraction.

    Raises:
        ModelLoadError: the run or model cannot be loaded.
    """
    from pathlib import Path

    import memreason

    reasoner = memreason.load(run_or_model, task=task, dtype=dtype, device=device)
    if model_id is None:
        model_id = Path(str(run_or_model)).name if run_or_model and Path(str(run_or_model)).exists() else reasoner.name
    return ModelBackend.from_reasoner(reasoner, model_id, max_context=max_context)


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


# ---------------------------------------------------------------- request validation

_UNSUPPORTED = {  # field -> value that means "not used"; anything else is refused, never silently ignored
    "tools": None, "functions": None, "logprobs": False, "top_logprobs": None, "logit_bias": None,
    "audio": None, "frequency_penalty": 0, "presence_penalty": 0, "prediction": None,
}


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


def parse_request(body: Any, *, model_id: str, default_max_tokens: int, max_tokens_limit: int,
                  default_seed: int) -> tuple[ChatRequest, bool, dict]:
    """Validate a ``/v1/chat/completions`` body.

    Returns:
        (request, stream, stream_options)

    Raises:
        RequestError: 400 for a malformed field (naming it), 404 for an unknown model.
    """
    if not isinstance(body, dict):
        raise RequestError(400, "the request body must be a JSON object")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise RequestError(400, "missing 'model'", param="model")
    if model != model_id:
        raise RequestError(404, f"The model '{model}' does not exist; this server serves '{model_id}'",
                           param="model", code="model_not_found")
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
    for name, unused in _UNSUPPORTED.items():
        value = body.get(name)
        if value is not None and value != unused and value != [] and value != {}:
            raise RequestError(400, f"'{name}' is not supported by this server", param=name,
                               code="unsupported_parameter")
    if body.get("n", 1) not in (1, None):
        raise RequestError(400, "only n=1 is supported", param="n", code="unsupported_parameter")
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    if max_tokens is None:
        max_tokens = default_max_tokens
    if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or not 1 <= max_tokens <= max_tokens_limit:
        raise RequestError(400, f"max_tokens must be an integer from 1 to {max_tokens_limit}", param="max_tokens")
    temperature = body.get("temperature")
    # greedy unless asked (OpenAI's own default is 1.0; memreason's is determinism, DESIGN.md)
    temperature = 0.0 if temperature is None else temperature
    if not isinstance(temperature, (int, float)) or isinstance(temperature, bool) or not 0 <= temperature <= 2:
        raise RequestError(400, "temperature must be a number from 0 to 2", param="temperature")
    top_p = body.get("top_p")
    top_p = 1.0 if top_p is None else top_p
    if not isinstance(top_p, (int, float)) or isinstance(top_p, bool) or not 0 < top_p <= 1:
        raise RequestError(400, "top_p must be a number in (0, 1]", param="top_p")
    seed = body.get("seed")
    seed = default_seed if seed is None else seed
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise RequestError(400, "seed must be an integer", param="seed")
    stop = body.get("stop")
    stop = [] if stop is None else [stop] if isinstance(stop, str) else stop
    if not isinstance(stop, list) or len(stop) > 4 or not all(isinstance(s, str) and s for s in stop):
        raise RequestError(400, "stop must be a non-empty string or a list of up to 4 of them", param="stop")
    response_format = body.get("response_format")
    if response_format is not None and (not isinstance(response_format, dict) or "type" not in response_format):
        raise RequestError(400, "response_format must be an object with a 'type'", param="response_format")
    stream = body.get("stream") or False
    if not isinstance(stream, bool):
        raise RequestError(400, "stream must be true or false", param="stream")
    stream_options = body.get("stream_options") or {}
    if not isinstance(stream_options, dict):
        raise RequestError(400, "stream_options must be an object", param="stream_options")
    request = ChatRequest(tuple(clean), max_tokens, float(temperature), float(top_p), seed, tuple(stop),
                          response_format)
    return request, stream, stream_options


# ---------------------------------------------------------------- HTTP

class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive: a client's requests reuse one connection
    server: "_HTTPServer"

    def log_message(self, format, *args):  # noqa: A002 - signature fixed by BaseHTTPRequestHandler
        logger.debug("%s %s", self.address_string(), format % args)

    # -- replies
    def _send_json(self, status: int, payload: dict) -> None:
        data = json.dumps(payload, ensure_ascii=False).encode("utf-8")
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(data)

    def _send_error(self, error: RequestError) -> None:
        self.server.app.count(error=True)
        self._send_json(error.status, error.body())

    def _chunk(self, data: bytes) -> None:
        self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
        self.wfile.flush()

    # -- routing
    def do_GET(self):  # noqa: N802 - name fixed by BaseHTTPRequestHandler
        app = self.server.app
        try:
            app.authorise(self.headers.get("Authorization"))
            path = self.path.split("?", 1)[0].rstrip("/")
            if path == "/health":
                self._send_json(200, {"status": "ok"})
            elif path == "/v1/models":
                self._send_json(200, {"object": "list", "data": [app.model_card()]})
            elif path.startswith("/v1/models/"):
                if path[len("/v1/models/"):] != app.backend.model_id:
                    raise RequestError(404, f"The model '{path[len('/v1/models/'):]}' does not exist",
                                       code="model_not_found")
                self._send_json(200, app.model_card())
            else:
                raise RequestError(404, f"no such endpoint: GET {path}", code="not_found")
        except RequestError as error:
            self._send_error(error)

    def do_POST(self):  # noqa: N802
        app = self.server.app
        try:
            body = self._read_body()
            app.authorise(self.headers.get("Authorization"))
            path = self.path.split("?", 1)[0].rstrip("/")
            if path != "/v1/chat/completions":
                raise RequestError(404, f"no such endpoint: POST {path}", code="not_found")
            try:
                payload = json.loads(body)
            except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                raise RequestError(400, f"the request body is not valid JSON: {exc}") from None
            request, stream, options = parse_request(
                payload, model_id=app.backend.model_id, default_max_tokens=app.default_max_tokens,
                max_tokens_limit=app.max_tokens_limit, default_seed=app.seed)
            prepared = app.backend.prepare(request)
        except RequestError as error:
            self._send_error(error)
            return
        if stream:
            self._stream(request, prepared, options)
        else:
            self._complete(request, prepared)

    def _read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            self.close_connection = True
            raise RequestError(411, "chunked request bodies are not supported; send Content-Length")
        try:
            length = int(self.headers.get("Content-Length", ""))
        except ValueError:
            self.close_connection = True
            raise RequestError(411, "a Content-Length header is required") from None
        if length > self.server.app.max_body_bytes:
            self.close_connection = True  # the unread body would be taken for the next request
            raise RequestError(413, f"the request body has {length} bytes; this server accepts at most "
                               f"{self.server.app.max_body_bytes}", code="request_too_large")
        return self.rfile.read(length)

    def _complete(self, request: ChatRequest, prepared) -> None:
        app = self.server.app
        try:
            completion = app.backend.generate(prepared)
        except RequestError as error:
            self._send_error(error)
            return
        except Exception:  # a backend bug must not take the server down
            logger.exception("generation failed")
            self._send_error(RequestError(500, "generation failed on the server", type="server_error"))
            return
        message = {"role": "assistant", "content": completion.text,
                   "memreason": structured(completion.text, _question(request), app.backend.task)}
        app.count()
        self._send_json(200, {
            "id": _new_id(), "object": "chat.completion", "created": int(time.time()), "model": app.backend.model_id,
            "system_fingerprint": app.fingerprint,
            "choices": [{"index": 0, "message": message, "finish_reason": completion.finish_reason, "logprobs": None}],
            "usage": _usage(completion),
        })

    def _stream(self, request: ChatRequest, prepared, options: dict) -> None:
        app = self.server.app
        completion_id, created = _new_id(), int(time.time())

        def chunk(delta: dict | None, finish: str | None = None, usage: dict | None = None) -> bytes:
            payload = {"id": completion_id, "object": "chat.completion.chunk", "created": created,
                       "model": app.backend.model_id, "system_fingerprint": app.fingerprint,
                       "choices": [] if delta is None else [{"index": 0, "delta": delta, "finish_reason": finish,
                                                             "logprobs": None}]}
            if usage is not None:
                payload["usage"] = usage
            return b"data: " + json.dumps(payload, ensure_ascii=False).encode("utf-8") + b"\n\n"

        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        try:
            self._chunk(chunk({"role": "assistant", "content": ""}))
            completion = app.backend.generate(prepared, on_text=lambda text: self._chunk(chunk({"content": text})))
            final = {"memreason": structured(completion.text, _question(request), app.backend.task)}
            self._chunk(chunk(final, completion.finish_reason))
            if options.get("include_usage"):
                self._chunk(chunk(None, usage=_usage(completion)))
            self._chunk(b"data: [DONE]\n\n")
            self.wfile.write(b"0\r\n\r\n")
            app.count()
        except (BrokenPipeError, ConnectionResetError):
            logger.info("client went away mid-stream")  # generation stopped with the failed write
            self.close_connection = True
        except Exception as exc:  # headers are sent: report in-band, as OpenAI's streams do
            logger.exception("generation failed mid-stream")
            error = exc if isinstance(exc, RequestError) else RequestError(500, "generation failed on the server",
                                                                           type="server_error")
            app.count(error=True)
            try:
                self._chunk(b"data: " + json.dumps(error.body()).encode("utf-8") + b"\n\n")
                self.wfile.write(b"0\r\n\r\n")
            except OSError:
                pass
            self.close_connection = True


def _question(request: ChatRequest) -> str:
    users = [m["content"] for m in request.messages if m["role"] == "user"]
    return users[-1] if users else ""


def _usage(completion: Completion) -> dict:
    return {"prompt_tokens": completion.prompt_tokens, "completion_tokens": completion.completion_tokens,
            "total_tokens": completion.prompt_tokens + completion.completion_tokens}


def _new_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex}"


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    app: "Server"

    def handle_error(self, request, client_address) -> None:
        # socketserver prints tracebacks to stderr; a client closing its keep-alive connection is routine
        error = sys.exc_info()[1]
        if isinstance(error, (ConnectionError, TimeoutError)):
            logger.debug("connection from %s ended: %r", client_address, error)
        else:
            logger.exception("error while serving %s", client_address)


@dataclass
class Server:
    """The HTTP server around one backend.

    Args:
        backend (Backend): what produces the text.
        host (str, default "127.0.0.1"): the address to bind; anything else exposes the model to the network.
        port (int, default 0): 0 picks a free port (read ``port`` / ``url`` after ``start``).
        api_key (str | None): when set, requests must send ``Authorization: Bearer <key>``.
        default_max_tokens (int, default 256): ``max_tokens`` when the request gives none.
        max_tokens_limit (int, default 4096): larger ``max_tokens`` are refused (400).
        max_body_bytes (int, default 4 MiB): larger bodies are refused (413).
        seed (int, default 0): sampling seed for requests that send none.

    Use as a context manager (``with Server(backend) as server: ...``) or ``start()`` / ``shutdown()``;
    ``serve_forever()`` blocks (for the CLI). ``stats`` counts served replies and refused requests.
    """

    backend: Backend
    host: str = DEFAULT_HOST
    port: int = 0
    api_key: str | None = field(default=None, repr=False)
    default_max_tokens: int = 256
    max_tokens_limit: int = 4096
    max_body_bytes: int = MAX_BODY_BYTES
    seed: int = 0

    def __post_init__(self):
        from memreason import __version__

        self.fingerprint = f"memreason-{__version__}"
        self.stats = {"completions": 0, "errors": 0}
        self._stats_lock = threading.Lock()
        self._httpd: _HTTPServer | None = None
        self._thread: threading.Thread | None = None

    def count(self, error: bool = False) -> None:
        with self._stats_lock:
            self.stats["errors" if error else "completions"] += 1

    def authorise(self, header: str | None) -> None:
        if self.api_key is None:
            return
        sent = (header or "").removeprefix("Bearer ").strip()
        if not hmac.compare_digest(sent.encode(), self.api_key.encode()):
            raise RequestError(401, "missing or wrong API key (send 'Authorization: Bearer <key>')",
                               type="authentication_error", code="invalid_api_key")

    def model_card(self) -> dict:
        return {"id": self.backend.model_id, "object": "model", "created": 0, "owned_by": _OWNER}

    def bind(self) -> "Server":
        """Bind the socket (so ``port`` is known) without serving yet."""
        if self._httpd is None:
            self._httpd = _HTTPServer((self.host, self.port), _Handler)
            self._httpd.app = self
            self.port = self._httpd.server_address[1]
            if self.host not in ("127.0.0.1", "localhost", "::1"):
                logger.warning("serving on %s: anyone who can reach this address can use the model", self.host)
        return self

    @property
    def url(self) -> str:
        """The OpenAI base URL, e.g. ``http://127.0.0.1:8000/v1``."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/v1"

    def start(self) -> "Server":
        """Serve in a background thread."""
        self.bind()
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="memreason-serve", daemon=True)
        self._thread.start()
        return self

    def serve_forever(self) -> None:
        self.bind()
        try:
            self._httpd.serve_forever()
        finally:
            self._httpd.server_close()

    def shutdown(self) -> None:
        """Stop serving and close the socket (idempotent)."""
        if self._httpd is None:
            return
        if self._thread is not None:
            self._httpd.shutdown()
            self._thread.join(timeout=10)
            self._thread = None
        self._httpd.server_close()
        self._httpd = None

    def __enter__(self) -> "Server":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.shutdown()


def serve(backend: Backend, **kwargs) -> Server:
    """Start a server for ``backend`` in a background thread; see ``Server`` for the options."""
    return Server(backend, **kwargs).start()


__all__ = ["Backend", "ChatRequest", "Completion", "ModelBackend", "RequestError", "ScriptedBackend", "Server",
           "load_backend", "parse_request", "serve", "structured"]
