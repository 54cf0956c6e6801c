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

The trace editor (when the server has an ``editor``; bodies validated by ``editor_protocol``, model work
through the same bounded queue as chat requests):

- ``GET /``: the page. ``GET /v1/memreason/info``: model, task, scheme, injection settings, sources.
- ``GET /v1/memreason/sources``: ``{"sources": [{"name"}]}``, the correction sources set at start.
- ``GET /v1/memreason/rows`` (summaries) and ``GET /v1/memreason/rows/<i>`` (a row) of ``--results``.
- ``POST /v1/memreason/open {result}``: a row checked and normalised (``Result.to_dict()``).
- ``POST /v1/memreason/answer {question, gold?, id?, max_tokens?}``: a ``Result`` row.
- ``POST /v1/memreason/revise {result, step, action?, text?, kind?, inject?, max_tokens?}``: the revised
  row, ``extra["revision"]`` saying what changed (``memreason.interventions.revise``).
- ``POST /v1/memreason/repair {result, source, step?, inject?, max_tokens?}``: ``{correction, result}``.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any, Callable

from memreason.serve.editor import correction_dict
from memreason.serve.editor_protocol import parse_answer, parse_open, parse_repair, parse_revise
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


# ---------------------------------------------------------------- the trace editor (page and /v1/memreason/*)

def _editor(exchange):
    editor = exchange.app.editor
    if editor is None:
        raise RequestError(404, "this server has no trace editor (start it with `memreason serve`, which adds one "
                           "for the served model)", code="not_found")
    return editor


def editor_page(exchange, payload) -> None:
    from memreason.serve.page import page

    _editor(exchange)
    data, headers = page()
    exchange.send_body(200, data, "text/html; charset=utf-8", headers)


def editor_info(exchange, payload) -> dict:
    return _editor(exchange).info()


def editor_sources(exchange, payload) -> dict:
    editor = _editor(exchange)
    return {"sources": [{"name": name} for name in editor.sources]}  # in --source order


def editor_rows(exchange, payload) -> dict:
    return {"rows": _editor(exchange).row_summaries()}


def editor_row(exchange, payload) -> dict:
    editor = _editor(exchange)
    tail = exchange.path_tail
    if not tail.isdigit() or int(tail) >= len(editor.rows):
        raise RequestError(404, f"no row {tail!r}: the results file has rows 0 to {len(editor.rows) - 1}",
                           code="not_found")
    return editor.rows[int(tail)].to_dict()


def editor_open(exchange, payload) -> dict:
    _editor(exchange)
    return parse_open(payload).to_dict()


def editor_answer(exchange, payload) -> dict:
    """``{question, gold?, id?, max_tokens?}`` → a Result row (prompt, token ids, step confidences)."""
    editor, app = _editor(exchange), exchange.app
    request = parse_answer(payload, task=editor.task, max_tokens_limit=app.max_tokens_limit)
    with app.slot():
        result = editor.answer(request.question, gold=request.gold, row_id=request.id,
                               max_new_tokens=request.max_tokens)
    app.count()
    return result.to_dict()


def editor_revise(exchange, payload) -> dict:
    """``{result, step, action, text?, kind?, inject?, max_tokens?}`` → the revised Result row."""
    editor, app = _editor(exchange), exchange.app
    request = parse_revise(payload, max_tokens_limit=app.max_tokens_limit, labels_steps=editor.scheme.labels_steps)
    with app.slot():
        result = editor.revise(request.result, request.edit, inject=request.inject,
                               max_new_tokens=request.max_tokens)
    app.count()
    return result.to_dict()


def editor_repair(exchange, payload) -> dict:
    """``{result, source, step?, inject?, max_tokens?}`` → ``{correction, result}``."""
    editor, app = _editor(exchange), exchange.app
    request = parse_repair(payload, max_tokens_limit=app.max_tokens_limit)
    with app.slot():
        correction, result = editor.repair(request.result, request.source, step=request.step,
                                           inject=request.inject, max_new_tokens=request.max_tokens)
    app.count()
    return {"correction": correction_dict(correction), "result": result.to_dict()}


ROUTES: tuple[Route, ...] = (
    Route("GET", "/health", health),
    Route("GET", "/v1/models", list_models),
    Route("GET", "/v1/models/", get_model, prefix=True),
    Route("POST", "/v1/chat/completions", chat_completions, body=True),
    Route("POST", "/v1/completions", completions, body=True),
    Route("GET", "/", editor_page, auth=False),  # the page holds no data; it asks for the key itself
    Route("GET", "/v1/memreason/info", editor_info),
    Route("GET", "/v1/memreason/sources", editor_sources),
    Route("GET", "/v1/memreason/rows", editor_rows),
    Route("GET", "/v1/memreason/rows/", editor_row, prefix=True),
    Route("POST", "/v1/memreason/open", editor_open, body=True),
    Route("POST", "/v1/memreason/answer", editor_answer, body=True),
    Route("POST", "/v1/memreason/revise", editor_revise, body=True),
    Route("POST", "/v1/memreason/repair", editor_repair, body=True),
)
