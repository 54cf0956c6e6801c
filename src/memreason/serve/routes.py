"""The endpoints and the routing table: which method and path runs which function.

An endpoint is ``endpoint(exchange, payload) -> dict | None``: ``payload`` is the decoded JSON body
(``None`` for routes without one), a returned dict is sent as a 200 JSON reply, and ``None`` means the
endpoint replied itself (a stream, or a page). A ``RequestError`` it raises becomes an OpenAI-style error
reply. Adding a JSON endpoint is one function and one ``Route`` line::

    def answer(exchange, payload):
        return {"trace": ...}

    ROUTES = (*ROUTES, Route("POST", "/v1/memreason/answer", answer, body=True))

``exchange`` (the HTTP handler, ``memreason.serve.http``) offers ``app`` (the ``Server``: backend,
limits, counters, ``slot()``), ``path_tail`` (what a prefix route matched after its prefix),
``send_json(status, payload)`` and ``events()`` (a server-sent-event stream).

Endpoints: ``GET /health``, ``GET /v1/models``, ``GET /v1/models/<id>``, ``POST /v1/chat/completions``
and ``POST /v1/completions`` (plain prompts, continued as sent: the paper's format, and what
lm-evaluation-harness's ``local-completions`` model sends).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any, Callable

from memreason.serve.protocol import (Completion, RequestError, chat_body, chat_chunk, completion_body,
                                      completion_chunk, new_id, parse_completion_request, parse_request, question_of,
                                      structured, text_choice, usage)

logger = logging.getLogger(__name__)

Endpoint = Callable[[Any, Any], "dict | None"]


@dataclass(frozen=True)
class Route:
    """One line of the routing table.

    Args:
        method (str): ``GET``, ``POST``, ...
        path (str): the exact path, or with ``prefix=True`` a prefix such as ``/v1/models/`` (the rest of
            the path reaches the endpoint as ``exchange.path_tail``).
        endpoint (Endpoint): the function that answers.
        prefix (bool, default False): match paths that start with ``path`` (and are longer).
        body (bool, default False): the request carries a JSON body (read, size- and depth-limited).
        auth (bool, default True): needs the server's API key when it has one.
    """

    method: str
    path: str
    endpoint: Endpoint
    prefix: bool = False
    body: bool = False
    auth: bool = True

    def matches(self, path: str) -> bool:
        return path.startswith(self.path) and len(path) > len(self.path) if self.prefix else path == self.path


def match(routes: tuple[Route, ...], method: str, path: str) -> tuple[Route, str]:
    """The route for a request and the path tail it leaves.

    Raises:
        RequestError: 404 when no route has this path, 405 (with ``Allow``) when none has this method.
    """
    candidates = [route for route in routes if route.matches(path)]
    if not candidates:
        raise RequestError(404, f"no such endpoint: {method} {path}", code="not_found")
    for route in candidates:
        if route.method == method:
            return route, path[len(route.path):] if route.prefix else ""
    allowed = ", ".join(sorted({route.method for route in candidates}))
    raise RequestError(405, f"{method} is not allowed on {path}; use {allowed}", code="method_not_allowed",
                       headers={"Allow": allowed})


# ---------------------------------------------------------------- endpoints

def health(exchange, payload) -> dict:
    return {"status": "ok"}


def list_models(exchange, payload) -> dict:
    return {"object": "list", "data": [exchange.app.model_card()]}


def get_model(exchange, payload) -> dict:
    app = exchange.app
    if exchange.path_tail != app.backend.model_id:
        raise RequestError(404, f"The model '{exchange.path_tail}' does not exist", code="model_not_found")
    return app.model_card()


def _generate(app, prepared, on_text=None) -> Completion:
    try:
        return app.backend.generate(prepared, on_text=on_text) if on_text else app.backend.generate(prepared)
    except RequestError:
        raise
    except (BrokenPipeError, ConnectionResetError, TimeoutError):
        raise  # the client went away mid-stream: the stream reports it, not as a server error
    except Exception:  # a backend bug must not take the server down
        logger.exception("generation failed")
        raise RequestError(500, "generation failed on the server", type="server_error") from None


def _limits(app) -> dict:
    return dict(model_id=app.backend.model_id, default_max_tokens=app.default_max_tokens,
                max_tokens_limit=app.max_tokens_limit, default_seed=app.seed)


def chat_completions(exchange, payload) -> dict | None:
    app = exchange.app
    request, stream, options = parse_request(payload, **_limits(app))
    with app.slot():
        prepared = app.backend.prepare(request)
        if stream:
            _stream_chat(exchange, request, prepared, options)
            return None
        completion = _generate(app, prepared)
    app.count()
    return chat_body(completion, request, model_id=app.backend.model_id, fingerprint=app.fingerprint,
                     task=app.backend.task)


def _stream_chat(exchange, request, prepared, options: dict) -> None:
    app = exchange.app
    ids = dict(id_=new_id(), created=int(time.time()), model_id=app.backend.model_id, fingerprint=app.fingerprint)
    with exchange.events() as send:
        send(chat_chunk(**ids, delta={"role": "assistant", "content": ""}))
        completion = _generate(app, prepared, on_text=lambda text: send(chat_chunk(**ids, delta={"content": text})))
        final = {"memreason": structured(completion.text, question_of(request), app.backend.task)}
        send(chat_chunk(**ids, delta=final, finish=completion.finish_reason))
        if options.get("include_usage"):
            send(chat_chunk(**ids, delta=None, usage_=usage([completion])))


def completions(exchange, payload) -> dict | None:
    """``/v1/completions``: each prompt continued as sent, one after another (so a list of prompts gives
    exactly what the same prompts sent one by one give)."""
    app = exchange.app
    requests, stream, options = parse_completion_request(payload, **_limits(app))
    with app.slot():
        prepared = [app.backend.prepare(request) for request in requests]  # refuse before generating any
        if stream:
            _stream_completions(exchange, requests, prepared, options)
            return None
        results = [_generate(app, item) for item in prepared]
    app.count()
    return completion_body(results, requests, model_id=app.backend.model_id, fingerprint=app.fingerprint,
                           task=app.backend.task)


def _stream_completions(exchange, requests, prepared, options: dict) -> None:
    app = exchange.app
    ids = dict(id_=new_id("cmpl"), created=int(time.time()), model_id=app.backend.model_id,
               fingerprint=app.fingerprint)
    with exchange.events() as send:
        results = []
        for index, (request, item) in enumerate(zip(requests, prepared)):
            def piece(text, index=index):
                send(completion_chunk(**ids, choices=[text_choice(index, text, None)]))

            completion = _generate(app, item, on_text=piece)
            results.append(completion)
            final = structured(completion.text, question_of(request), app.backend.task)
            send(completion_chunk(**ids, choices=[text_choice(index, "", completion.finish_reason, final)]))
        if options.get("include_usage"):
            send(completion_chunk(**ids, choices=[], usage_=usage(results)))


ROUTES: tuple[Route, ...] = (
    Route("GET", "/health", health),
    Route("GET", "/v1/models", list_models),
    Route("GET", "/v1/models/", get_model, prefix=True),
    Route("POST", "/v1/chat/completions", chat_completions, body=True),
    Route("POST", "/v1/completions", completions, body=True),
)
