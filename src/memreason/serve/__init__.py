"""An OpenAI-compatible HTTP server for a base model or a trained run.

Endpoints: ``POST /v1/chat/completions`` and ``POST /v1/completions`` (plain JSON, or server-sent events
with ``stream: true``), ``GET /v1/models``, ``GET /v1/models/<id>`` and ``GET /health``. Every reply
carries, beside the text, the structured steps parsed from it: ``message.memreason`` (chat),
``choices[i].memreason`` (completions), or the final chunk's when streaming, is
``{"steps": [{"kind", "text"}], "answer": ...}``.

With an ``Editor`` (``memreason serve`` always adds one) the server also shows the trace editor at ``/``
and answers its JSON endpoints under ``/v1/memreason/`` (answer, open, revise, repair, sources, rows,
info; listed in ``routes``).

    from memreason.serve import Server, load_backend
    with Server(load_backend("runs/demo")) as server:      # 127.0.0.1, a free port
        openai.OpenAI(base_url=server.url, api_key="-").chat.completions.create(...)

One concept per module:

- ``protocol``: request validation (``parse_request``, ``parse_completion_request``), the typed requests
  backends see, response shapes, ``RequestError`` (OpenAI-style error JSON);
- ``backend``: what produces the text (``ModelBackend``, ``ScriptedBackend`` for tests, ``load_backend``);
- ``routes``: the routing table and the endpoints (add a JSON endpoint there);
- ``http``: connections, timeouts, size/depth/concurrency limits, ``Server``;
- ``editor``: the trace editor's model work (answer, revise, repair; ``Editor``);
  ``editor_protocol``: validation of its request bodies; ``page``: the page (``page.html``) and its headers.
"""

from memreason.serve.backend import Backend, ModelBackend, ScriptedBackend, load_backend
from memreason.serve.editor import DEFAULT_INJECTION, Editor
from memreason.serve.http import DEFAULT_HOST, MAX_BODY_BYTES, Server, check_options, serve
from memreason.serve.protocol import (ChatRequest, Completion, CompletionRequest, RequestError,
                                      parse_completion_request, parse_request, structured)
from memreason.serve.routes import ROUTES, Route

__all__ = ["Backend", "ChatRequest", "Completion", "CompletionRequest", "DEFAULT_HOST", "DEFAULT_INJECTION", "Editor",
           "MAX_BODY_BYTES",
           "ModelBackend", "ROUTES", "RequestError", "Route", "ScriptedBackend", "Server", "check_options",
           "load_backend", "parse_completion_request", "parse_request", "serve", "structured"]
