"""The HTTP transport: connections, limits, timeouts, error replies, and the ``Server`` object.

Standard library only (``http.server.ThreadingHTTPServer``): fastapi/uvicorn would add a heavy dependency
for a handful of endpoints. What each path does lives in ``memreason.serve.routes``; this module makes
sure no client can hold the server:

- every request must arrive whole (request line, headers, body) within ``read_timeout`` seconds of the
  server starting to wait for it (so an idle keep-alive connection is closed after that long too); a
  body that stops short gets a 408 and the connection is closed;
- bodies need a ``Content-Length`` (a non-negative integer, at most ``max_body_bytes``: 413) and JSON
  bodies may nest at most ``max_json_depth`` levels (400);
- at most ``max_connections`` connections are served at once (more get a 503 and are closed), and at most
  ``max_queue`` generation requests wait or run at once (more get a 503 with ``Retry-After``);
- every reply is JSON, whatever the method or path (404, 405 with ``Allow``, 501 for methods HTTP does not
  know, and the standard library's own 400/414/431 refusals), in OpenAI's error shape; the one exception
  is the trace-editor page at ``/`` (``memreason.serve.page``), served when the server has an editor.

Binds 127.0.0.1 unless told otherwise.
"""

from __future__ import annotations

import hmac
import io
import json
import logging
import math
import re
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable, Iterator

from memreason.errors import ConfigError
from memreason.serve.backend import Backend
from memreason.serve.protocol import MAX_JSON_DEPTH, RequestError, load_json
from memreason.serve.routes import ROUTES, Route, match

logger = logging.getLogger(__name__)

DEFAULT_HOST = "127.0.0.1"
MAX_BODY_BYTES = 4 * 1024 * 1024
_OWNER = "memreason"
_CONTENT_LENGTH = re.compile(r"[0-9]{1,18}")


class _DeadlineReader(io.RawIOBase):
    """Socket reads that fail with ``TimeoutError`` once ``deadline`` (``time.monotonic()``) has passed:
    a per-read timeout alone lets a client that sends one byte every few seconds hold a thread forever."""

    def __init__(self, sock):
        self.sock, self.deadline = sock, None

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        if self.deadline is not None:
            remaining = self.deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError("the client did not send its request in time")
            self.sock.settimeout(remaining)
        return self.sock.recv_into(buffer)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive: a client's requests reuse one connection
    server: "_HTTPServer"

    # -- connection
    def setup(self) -> None:
        super().setup()
        self.rfile.close()  # replaced: an open socket file would keep the socket alive after close()
        self._reader = _DeadlineReader(self.connection)
        self.rfile = io.BufferedReader(self._reader)

    def handle_one_request(self) -> None:
        self._reader.deadline = time.monotonic() + self.server.app.read_timeout
        self._replied = False
        super().handle_one_request()

    def log_message(self, format, *args):  # noqa: A002 - signature fixed by BaseHTTPRequestHandler
        logger.debug("%s %s", self.address_string(), format % args)

    @property
    def app(self) -> "Server":
        return self.server.app

    # -- replies
    def _writing(self) -> None:
        """From here on the socket is written: reads are over, sends get ``write_timeout``."""
        self._reader.deadline = None
        self.connection.settimeout(self.app.write_timeout)

    def send_json(self, status: int, payload: dict, headers: dict[str, str] | None = None) -> None:
        """Send one JSON reply (headers only for HEAD)."""
        self.send_body(status, json.dumps(payload, ensure_ascii=False).encode("utf-8"), "application/json", headers)

    def send_body(self, status: int, data: bytes, content_type: str, headers: dict[str, str] | None = None) -> None:
        """Send one whole reply of any type (the editor page; headers only for HEAD)."""
        self._writing()
        self._replied = True
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    def send_request_error(self, error: RequestError) -> None:
        self.app.count(error=True)
        self.send_json(error.status, error.body(), error.headers)

    def send_error(self, code, message=None, explain=None) -> None:
        """The standard library's own refusals (malformed request line, headers too long, unknown
        method), as JSON like every other reply."""
        self.close_connection = True
        if getattr(self, "request_version", "HTTP/0.9") == "HTTP/0.9":
            self.request_version = self.protocol_version  # an unparsable line: still reply with a status line
        try:
            phrase = HTTPStatus(code).phrase
        except ValueError:
            phrase = "error"
        text = message or phrase
        self.send_request_error(RequestError(code, f"{text}: {explain}" if explain else text,
                                             code=phrase.lower().replace(" ", "_")))

    def _chunk(self, data: bytes) -> None:
        self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
        self.wfile.flush()

    @contextmanager
    def events(self) -> Iterator[Callable[[dict], None]]:
        """A server-sent-event stream: yields ``send(event_dict)``; ends with ``[DONE]``. A client that
        leaves ends it quietly; any other failure is reported in-band (headers are already sent), as
        OpenAI's streams do."""
        self._writing()
        self._replied = True
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()

        def send(event: dict) -> None:
            self._chunk(b"data: " + json.dumps(event, ensure_ascii=False).encode("utf-8") + b"\n\n")

        try:
            yield send
            self._chunk(b"data: [DONE]\n\n")
            self.wfile.write(b"0\r\n\r\n")
            self.app.count()
        except (BrokenPipeError, ConnectionResetError, TimeoutError):
            logger.info("client went away mid-stream")  # generation stopped with the failed write
            self.close_connection = True
        except Exception as exc:
            logger.exception("generation failed mid-stream")
            error = exc if isinstance(exc, RequestError) else RequestError(500, "generation failed on the server",
                                                                           type="server_error")
            self.app.count(error=True)
            try:
                self._chunk(b"data: " + json.dumps(error.body()).encode("utf-8") + b"\n\n")
                self.wfile.write(b"0\r\n\r\n")
            except OSError:
                pass
            self.close_connection = True

    # -- requests
    def _declares_body(self) -> bool:
        length = self.headers.get("Content-Length")
        return "Transfer-Encoding" in self.headers or (length is not None and length.strip() != "0")

    def _read_body(self) -> bytes:
        """The whole body, within the request's deadline. The caller has set ``close_connection``: an
        unread or half-read body would be taken for the next request; it is cleared once the body is in."""
        if "Transfer-Encoding" in self.headers:
            raise RequestError(411, "chunked (Transfer-Encoding) request bodies are not supported; "
                               "send Content-Length")
        values = self.headers.get_all("Content-Length") or []
        if not values:
            raise RequestError(411, "a Content-Length header is required")
        text = values[0].strip()
        if len({v.strip() for v in values}) > 1 or not _CONTENT_LENGTH.fullmatch(text):
            raise RequestError(400, f"Content-Length must be one non-negative whole number of bytes, got "
                               f"{', '.join(repr(v) for v in values)}")
        length = int(text)
        if length > self.app.max_body_bytes:
            raise RequestError(413, f"the request body has {length} bytes; this server accepts at most "
                               f"{self.app.max_body_bytes}", code="request_too_large")
        try:
            data = self.rfile.read(length)
        except TimeoutError:
            raise RequestError(408, f"the request body did not arrive within {self.app.read_timeout:g} s",
                               code="request_timeout") from None
        if len(data) < length:
            raise RequestError(400, f"the request body ended after {len(data)} of the {length} bytes its "
                               "Content-Length announced")
        return data

    def _dispatch(self) -> None:
        app = self.app
        keep_alive = not self.close_connection
        if self._declares_body():
            self.close_connection = True
        try:
            path = self.path.split("?", 1)[0].rstrip("/") or "/"
            try:
                route, self.path_tail = match(app.routes, self.command, path)
            except RequestError:
                app.authorise(self.headers.get("Authorization"))  # say nothing about paths to strangers
                raise
            body = self._read_body() if route.body else None
            if route.body:
                self.close_connection = not keep_alive
            self._writing()
            if route.auth:
                app.authorise(self.headers.get("Authorization"))
            payload = load_json(body, app.max_json_depth) if route.body else None
            result = route.endpoint(self, payload)
            if result is not None:
                self.send_json(200, result)
        except RequestError as error:
            if not self._replied:
                self.send_request_error(error)
        except (ConnectionError, TimeoutError):
            raise  # the client is gone: nothing to reply to (handle_error logs it quietly)
        except Exception:
            logger.exception("error while answering %s %s", self.command, self.path)
            self.close_connection = True
            if not self._replied:
                self.send_request_error(RequestError(500, "the server failed on this request",
                                                     type="server_error"))

    do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = do_HEAD = do_OPTIONS = _dispatch  # noqa: N815


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 64  # the listen backlog; the default 5 drops bursts of new connections
    app: "Server"

    def __init__(self, *args, **kwargs):
        self._active = 0
        self._active_lock = threading.Lock()
        super().__init__(*args, **kwargs)

    def process_request(self, request, client_address) -> None:
        with self._active_lock:
            full = self._active >= self.app.max_connections
            if not full:
                self._active += 1
        if full:
            self._refuse(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._release()
            raise

    def process_request_thread(self, request, client_address) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._release()

    def _release(self) -> None:
        with self._active_lock:
            self._active -= 1

    def _refuse(self, request) -> None:
        """A 503 on the accepting thread, without blocking it: what the client has sent so far is
        drained (closing over unread bytes would reset the connection), the short reply written."""
        error = RequestError(503, f"the server is at its limit of {self.app.max_connections} open connections; "
                             "retry shortly", type="server_error", code="server_busy")
        body = json.dumps(error.body()).encode("utf-8")
        reply = (b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nRetry-After: 1\r\n"
                 b"Connection: close\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
        self.app.count(error=True)
        try:
            request.setblocking(False)
            try:
                request.recv(65536)
            except BlockingIOError:
                pass
            request.send(reply)
        except OSError:
            pass
        self.shutdown_request(request)

    def handle_error(self, request, client_address) -> None:
        # socketserver prints tracebacks to stderr; a client closing its keep-alive connection is routine
        error = sys.exc_info()[1]
        if isinstance(error, (ConnectionError, TimeoutError)):
            logger.debug("connection from %s ended: %r", client_address, error)
        else:
            logger.exception("error while serving %s", client_address)


def check_options(*, port: int = 0, default_max_tokens: int = 256, max_tokens_limit: int = 4096,
                  max_body_bytes: int = MAX_BODY_BYTES, read_timeout: float = 10.0, write_timeout: float = 30.0,
                  max_connections: int = 64, max_queue: int = 32, max_json_depth: int = MAX_JSON_DEPTH) -> None:
    """Refuse server options that cannot work, all at once, before any model is loaded.

    Raises:
        ConfigError: one line listing every bad option.
    """
    problems = []
    if not 0 <= port <= 65535:
        problems.append(f"port must be from 0 to 65535 (got {port})")
    for name, value in (("max_tokens_limit", max_tokens_limit), ("max_body_bytes", max_body_bytes),
                        ("max_connections", max_connections), ("max_queue", max_queue),
                        ("max_json_depth", max_json_depth)):
        if value < 1:
            problems.append(f"{name} must be at least 1 (got {value})")
    if not 1 <= default_max_tokens <= max(max_tokens_limit, 1):
        problems.append(f"default max_tokens must be from 1 to max_tokens_limit {max_tokens_limit} "
                        f"(got {default_max_tokens})")
    for name, value in (("read_timeout", read_timeout), ("write_timeout", write_timeout)):
        if not (math.isfinite(value) and value > 0):
            problems.append(f"{name} must be a positive number of seconds (got {value})")
    if problems:
        raise ConfigError("bad server options: " + "; ".join(problems))


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
        read_timeout (float, default 10): seconds a client has to send a whole request (and the longest an
            idle keep-alive connection stays open; above httpx's 5 s keep-alive expiry, so the openai
            client never reuses a connection the server is closing).
        write_timeout (float, default 30): seconds one send may block on a client that does not read.
        max_connections (int, default 64): connections served at once; more get a 503.
        max_queue (int, default 32): generation requests waiting or running at once; more get a 503.
        max_json_depth (int, default 64): deeper JSON bodies get a 400.
        routes (tuple[Route, ...]): the routing table (``memreason.serve.routes.ROUTES``).
        editor (Editor | None): the trace editor behind ``/`` and ``/v1/memreason/*``
            (``memreason.serve.editor``); without one those paths answer 404.

    Use as a context manager (``with Server(backend) as server: ...``) or ``start()`` / ``shutdown()``;
    ``serve_forever()`` blocks (for the CLI). ``stats`` counts served replies and refused requests.

    Raises:
        ConfigError: an option that cannot work (see ``check_options``).
    """

    backend: Backend
    host: str = DEFAULT_HOST
    port: int = 0
    api_key: str | None = field(default=None, repr=False)
    default_max_tokens: int = 256
    max_tokens_limit: int = 4096
    max_body_bytes: int = MAX_BODY_BYTES
    seed: int = 0
    read_timeout: float = 10.0
    write_timeout: float = 30.0
    max_connections: int = 64
    max_queue: int = 32
    max_json_depth: int = MAX_JSON_DEPTH
    routes: tuple[Route, ...] = ROUTES
    editor: Any = None

    def __post_init__(self):
        from memreason import __version__

        check_options(port=self.port, default_max_tokens=self.default_max_tokens,
                      max_tokens_limit=self.max_tokens_limit, max_body_bytes=self.max_body_bytes,
                      read_timeout=self.read_timeout, write_timeout=self.write_timeout,
                      max_connections=self.max_connections, max_queue=self.max_queue,
                      max_json_depth=self.max_json_depth)
        self.fingerprint = f"memreason-{__version__}"
        self.stats = {"completions": 0, "errors": 0}
        self._stats_lock = threading.Lock()
        self._slots = threading.BoundedSemaphore(self.max_queue)
        self._httpd: _HTTPServer | None = None
        self._thread: threading.Thread | None = None

    def count(self, error: bool = False) -> None:
        with self._stats_lock:
            self.stats["errors" if error else "completions"] += 1

    @contextmanager
    def slot(self) -> Iterator[None]:
        """Hold one of ``max_queue`` generation places for a request, or refuse it with a 503."""
        if not self._slots.acquire(blocking=False):
            raise RequestError(503, f"the server is busy: {self.max_queue} requests are already waiting or "
                               "generating; retry shortly", type="server_error", code="server_busy",
                               headers={"Retry-After": "1"})
        try:
            yield
        finally:
            self._slots.release()

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
            try:
                self._httpd = _HTTPServer((self.host, self.port), _Handler)
            except OSError as exc:  # the socket is closed already (socketserver does it)
                raise ConfigError(f"cannot listen on {self.host}:{self.port}: {exc.strerror or exc}; choose "
                                  "another port or host") from None
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
