"""Talking to a chat model behind an OpenAI-compatible endpoint: the one client, the one retry policy and
the one response cache (used by the annotation agent, ``memreason.data.annotate``, and the LLM judge,
``memreason.analysis.judges``).

* ``resolve_endpoint``: the base URL and API key from the arguments, else ``MEMREASON_API_BASE`` /
  ``OPENAI_BASE_URL`` and ``MEMREASON_API_KEY`` / ``OPENAI_API_KEY``. No base URL means OpenAI's own
  endpoint, which is never sent a placeholder key: ``OpenAIChat`` refuses to start without one.
* ``OpenAIChat``: one chat completion through the official ``openai`` package, with a per-request timeout
  (never a process-wide socket default) and the package's own retries off. Every failure becomes one of
  three kinds: ``TransientError`` (worth a retry: connection lost, timeout, 408, 429, 5xx), ``RequestRefused``
  (any other 4xx: this request will never work) or ``ConfigError`` (wrong key, unknown model: no request will).
* ``RetryPolicy``: exponential backoff with jitter, at least as long as the server's ``Retry-After``, and a
  bound on the total time one request may spend retrying; then ``RetriesExhausted``.
* ``ResponseCache``: replies as JSON files named by the sha256 of the request (messages, model, seed and
  every generation parameter), written atomically (``memreason.io.atomic_write``); a re-run costs nothing.
* ``CachedChat``: the three together for one model, counting requests sent and backoff waits.
* ``parse_json_reply`` / ``InvalidReply``: the JSON value in a reply (never scraped from markdown
  silently: cutting it out of a fence or prose is reported as a repair).

API keys go to the client only: they are never logged, cached, written or shown in a ``repr``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import re
import threading
import time
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import Any, Callable, Protocol, Sequence, TypeVar

from memreason.errors import ConfigError
from memreason.io import atomic_write, to_json

logger = logging.getLogger(__name__)

ENV_BASE_URL = ("MEMREASON_API_BASE", "OPENAI_BASE_URL")
ENV_API_KEY = ("MEMREASON_API_KEY", "OPENAI_API_KEY")
DEFAULT_ENDPOINT = "api.openai.com"
NO_KEY_MESSAGE = (f"no API key for {DEFAULT_ENDPOINT}: set OPENAI_API_KEY or pass --base-url for a local "
                  "endpoint")

# Why a request failed, for the run's report and the one line that tells the user what to fix.
UNREACHABLE = "unreachable"  # no connection, or no reply within the timeout
FAILING = "failing"          # the server answered 408, 429 or 5xx (or an unreadable reply)
REFUSED = "refused"          # any other 4xx: this request will never be served

T = TypeVar("T")


# ---------------------------------------------------------------- failures

class EndpointError(Exception):
    """A request that did not produce a reply. ``cause`` is ``unreachable``, ``failing`` or ``refused``."""

    def __init__(self, message: str, *, cause: str):
        super().__init__(message)
        self.cause = cause


class TransientError(EndpointError):
    """Worth retrying after a wait. ``retry_after``: seconds the server asked to wait (None: not said)."""

    def __init__(self, message: str, *, cause: str = FAILING, retry_after: float | None = None):
        super().__init__(message, cause=cause)
        self.retry_after = retry_after


class RequestRefused(EndpointError):
    """The server refused this one request (a 4xx other than 408/429, auth or unknown model)."""

    def __init__(self, message: str, *, cause: str = REFUSED):
        super().__init__(message, cause=cause)


class ResponseFormatUnsupported(RequestRefused):
    """The server refused the ``response_format`` field."""


class RetriesExhausted(RequestRefused):
    """A transient failure outlasted the retry policy; ``cause`` is the last failure's."""


# ---------------------------------------------------------------- the endpoint and its client

def resolve_endpoint(base_url: str | None = None, api_key: str | None = None) -> tuple[str | None, str | None]:
    """The base URL and key from the arguments, else ``MEMREASON_API_BASE`` / ``OPENAI_BASE_URL`` and
    ``MEMREASON_API_KEY`` / ``OPENAI_API_KEY``. A None base URL means OpenAI's own."""
    if base_url is None:
        base_url = next((os.environ[name] for name in ENV_BASE_URL if os.environ.get(name)), None)
    if api_key is None:
        api_key = next((os.environ[name] for name in ENV_API_KEY if os.environ.get(name)), None)
    return base_url, api_key


def public_url(url: str | None) -> str | None:
    """The URL without user info or query (either may hold a secret), for the record."""
    if not url:
        return url
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(str(url))
    netloc = parts.hostname + (f":{parts.port}" if parts.port else "") if parts.hostname else parts.netloc
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


class ChatClient(Protocol):
    """One chat completion: returns the reply text. Raises ``TransientError``, ``RequestRefused`` or
    ``ConfigError`` (wrong key, unknown model: nothing else will work either)."""

    def complete(self, messages: list[dict], *, model: str, seed: int, temperature: float, max_tokens: int,
                 response_format: dict | None) -> str: ...


def _describe(exc: Exception) -> str:
    status = getattr(exc, "status_code", None)
    message = getattr(exc, "message", None) or str(exc)
    return f"HTTP {status}: {message}" if status else f"{type(exc).__name__}: {message}"


def retry_after_seconds(headers: Any) -> float | None:
    """The wait a reply's ``retry-after-ms`` or ``Retry-After`` header asks for (seconds, or an HTTP
    date), or None when it asks for none or cannot be read."""
    if headers is None:
        return None
    try:
        value = headers.get("retry-after-ms")
        if value is not None:
            return max(0.0, float(value) / 1000.0)
        value = headers.get("retry-after")
        if value is None:
            return None
        try:
            return max(0.0, float(value))
        except ValueError:
            when = parsedate_to_datetime(value)
            return max(0.0, when.timestamp() - time.time())
    except (TypeError, ValueError, OverflowError):
        return None


class OpenAIChat:
    """``ChatClient`` over the official ``openai`` package, for any OpenAI-compatible endpoint.

    The package's own retries are off (``max_retries=0``): ``RetryPolicy`` is the one retry policy, so
    request counts and waits are what the reports say.

    Args:
        base_url (str | None): e.g. ``http://127.0.0.1:8000/v1``; None = OpenAI.
        api_key (str | None): sent as a bearer token; a placeholder only for an explicit ``base_url``
            (local servers need none).
        timeout (float, default 120): seconds per request (connect and read), per request.

    Raises:
        ConfigError: no key for OpenAI's own endpoint, or the ``openai`` package is missing.
    """

    def __init__(self, base_url: str | None, api_key: str | None, timeout: float = 120.0):
        if not base_url and not api_key:
            raise ConfigError(NO_KEY_MESSAGE)
        if not timeout > 0:
            raise ConfigError(f"timeout must be > 0 seconds, got {timeout}")
        try:
            import openai
        except ImportError:
            raise ConfigError("talking to an LLM endpoint needs the 'openai' package: "
                              "pip install 'memreason[annotate]'") from None
        self._openai = openai
        self.base_url = base_url or None
        self._client = openai.OpenAI(base_url=self.base_url, api_key=api_key or "no-key", timeout=timeout,
                                     max_retries=0)

    def __repr__(self) -> str:  # never the key
        return f"OpenAIChat(base_url={public_url(self.base_url)!r})"

    @property
    def endpoint(self) -> str:
        return public_url(self.base_url) or DEFAULT_ENDPOINT

    def complete(self, messages, *, model, seed, temperature, max_tokens, response_format):
        openai = self._openai
        kwargs: dict[str, Any] = dict(model=model, messages=messages, seed=seed, temperature=temperature,
                                      max_tokens=max_tokens)
        if response_format is not None:
            kwargs["response_format"] = response_format
        try:
            reply = self._client.chat.completions.create(**kwargs)
        except openai.APIConnectionError as exc:  # includes timeouts
            raise TransientError(_describe(exc), cause=UNREACHABLE) from None
        except (openai.AuthenticationError, openai.PermissionDeniedError) as exc:
            raise ConfigError(f"the endpoint {self.endpoint} refused the API key ({_describe(exc)}); "
                              "set MEMREASON_API_KEY or pass --api-key") from None
        except openai.NotFoundError as exc:
            raise ConfigError(f"the endpoint {self.endpoint} does not serve model {model!r} "
                              f"or has no /chat/completions ({_describe(exc)})") from None
        except openai.APIStatusError as exc:
            status = exc.status_code
            if status in (408, 429) or status >= 500:
                raise TransientError(_describe(exc), retry_after=retry_after_seconds(exc.response.headers)) from None
            if response_format is not None and ("response_format" in str(exc) or "json_schema" in str(exc)):
                raise ResponseFormatUnsupported(_describe(exc)) from None
            raise RequestRefused(_describe(exc)) from None
        except openai.APIError as exc:  # a reply the package could not read
            raise TransientError(_describe(exc)) from None
        if not getattr(reply, "choices", None):
            raise TransientError("the reply has no choices")
        return reply.choices[0].message.content or ""


# ---------------------------------------------------------------- the retry policy

@dataclass(frozen=True)
class RetryPolicy:
    """When to try a failed request again.

    Retry ``k`` (0-based) waits ``min(max_backoff, backoff * 2**k)``, shortened by a random share of up to
    ``jitter`` (so clients that failed together do not retry together), and never less than the server's
    ``Retry-After``. Only ``TransientError`` is retried; a wait that would end more than ``max_retry_time``
    seconds after the first try is not started.

    Args:
        retries (int, default 4): extra tries after the first.
        backoff (float, default 1.0): seconds before the first retry.
        max_backoff (float, default 30.0): cap on one computed wait (a longer Retry-After is honoured).
        jitter (float, default 0.5): in [0, 1]; 0 gives the exact doubling sequence.
        max_retry_time (float, default 300.0): seconds one request may spend failing and waiting.

    Raises:
        ConfigError: a value out of range.
    """

    retries: int = 4
    backoff: float = 1.0
    max_backoff: float = 30.0
    jitter: float = 0.5
    max_retry_time: float = 300.0

    def __post_init__(self):
        problems = self.problems()
        if problems:
            raise ConfigError("; ".join(problems))

    def problems(self) -> list[str]:
        out = []
        if not isinstance(self.retries, int) or isinstance(self.retries, bool) or self.retries < 0:
            out.append(f"retries must be an integer >= 0, got {self.retries!r}")
        for name in ("backoff", "max_backoff"):
            if not getattr(self, name) >= 0:
                out.append(f"{name} must be >= 0 seconds, got {getattr(self, name)}")
        if not 0 <= self.jitter <= 1:
            out.append(f"jitter must be in [0, 1], got {self.jitter}")
        if not self.max_retry_time > 0:
            out.append(f"max_retry_time must be > 0 seconds, got {self.max_retry_time}")
        return out

    def delay(self, failures: int, retry_after: float | None = None, rng: Any = random) -> float:
        """The wait before retry number ``failures + 1`` (``rng.random()`` draws the jitter)."""
        wait = min(self.max_backoff, self.backoff * 2.0 ** min(failures, 64))
        wait *= 1.0 - self.jitter * rng.random()
        return max(wait, retry_after) if retry_after is not None else wait

    def call(self, send: Callable[[], T], *, sleep: Callable[[float], None] = time.sleep,
             clock: Callable[[], float] = time.monotonic, rng: Any = random,
             on_wait: Callable[[float], None] | None = None) -> T:
        """``send()``, tried again after each ``TransientError`` as the policy allows.

        Raises:
            RetriesExhausted: the retries or the time ran out (the message holds the last failure).
            RequestRefused, ConfigError: from ``send``, at once.
        """
        start, failures = clock(), 0
        while True:
            try:
                return send()
            except TransientError as exc:
                tries = failures + 1
                if failures >= self.retries:
                    raise RetriesExhausted(f"still failing after {tries} tries: {exc}", cause=exc.cause) from None
                wait = self.delay(failures, exc.retry_after, rng)
                elapsed = clock() - start
                if elapsed + wait > self.max_retry_time:
                    raise RetriesExhausted(
                        f"still failing after {tries} tries in {elapsed:.1f} s: {exc} (the next wait, {wait:.1f} s, "
                        f"would pass the {self.max_retry_time:g} s limit)", cause=exc.cause) from None
                failures += 1
                logger.info("request failed (%s); retry %d/%d in %.1f s", exc, failures, self.retries, wait)
                if on_wait is not None:
                    on_wait(wait)
                sleep(wait)


# ---------------------------------------------------------------- the response cache

class ResponseCache:
    """Replies on disk, one JSON file per request key (``<dir>/<key[:2]>/<key>.json``), written atomically.

    Args:
        directory (str | Path): where the files go (created on first write).
    """

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        self.hits = 0
        self._lock = threading.Lock()

    @staticmethod
    def key(messages: Sequence[dict], model: str, seed: int, params: dict) -> str:
        """sha256 of the request: messages, model, seed and every generation parameter."""
        blob = json.dumps({"messages": list(messages), "model": model, "seed": seed, "params": params},
                          sort_keys=True, ensure_ascii=False)
        return hashlib.sha256(blob.encode("utf-8")).hexdigest()

    def path(self, key: str) -> Path:
        return self.directory / key[:2] / f"{key}.json"

    def get(self, key: str) -> str | None:
        """The cached reply text, or None (an unreadable entry is ignored with a warning, and replaced
        when the request is made again)."""
        path = self.path(key)
        try:
            content = json.loads(path.read_text(encoding="utf-8"))["content"]
        except FileNotFoundError:
            return None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError):
            content = None
        if not isinstance(content, str):
            logger.warning("ignoring an unreadable cache entry %s", path)
            return None
        with self._lock:
            self.hits += 1
        return content

    def put(self, key: str, record: dict) -> None:
        """Store ``record`` (its ``content`` is the reply text) under ``key``."""
        atomic_write(self.path(key), to_json(record))


# ---------------------------------------------------------------- client + policy + cache

class CachedChat:
    """One model at one endpoint: a request is answered from the cache, else sent (retried by ``retry``)
    and cached. Thread-safe: calls may run concurrently.

    Args:
        client (ChatClient); model (str): the model name the endpoint knows.
        temperature (float, default 0); max_tokens (int, default 1024): sent with every request, part of
            every cache key.
        retry (RetryPolicy, default RetryPolicy()); cache (ResponseCache | None).
        sleep, clock: the backoff wait and the time (tests pass a recorder and a fake clock).

    Attributes:
        requests (int): requests sent to the endpoint, retries included (cache hits are not).
        waits (list[float]): every backoff wait, in seconds.
    """

    def __init__(self, client: ChatClient, model: str, *, temperature: float = 0.0, max_tokens: int = 1024,
                 retry: RetryPolicy | None = None, cache: ResponseCache | None = None,
                 sleep: Callable[[float], None] = time.sleep, clock: Callable[[], float] = time.monotonic):
        self.client, self.model, self.temperature, self.max_tokens = client, model, temperature, max_tokens
        self.retry = retry if retry is not None else RetryPolicy()
        self.cache, self.sleep, self.clock = cache, sleep, clock
        self.requests = 0
        self.waits: list[float] = []
        self._lock = threading.Lock()

    def complete(self, messages: list[dict], *, seed: int, response_format: dict | None = None,
                 key_params: dict | None = None) -> str:
        """The reply to ``messages``.

        Args:
            seed (int): sent with the request and part of the cache key.
            response_format (dict | None): sent as is (not part of the key: pass what decides it in
                ``key_params``, so a run that stopped sending a refused format finds its replies again).
            key_params (dict | None): more request parameters for the cache key.

        Raises:
            RequestRefused (``RetriesExhausted`` when retries ran out), ConfigError: see ``OpenAIChat``.
        """
        params = {"temperature": self.temperature, "max_tokens": self.max_tokens, **(key_params or {})}
        key = ResponseCache.key(messages, self.model, seed, params)
        if self.cache is not None:
            cached = self.cache.get(key)
            if cached is not None:
                return cached

        def send() -> str:
            with self._lock:
                self.requests += 1
            return self.client.complete(messages, model=self.model, seed=seed, temperature=self.temperature,
                                        max_tokens=self.max_tokens, response_format=response_format)

        content = self.retry.call(send, sleep=self.sleep, clock=self.clock, on_wait=self._waited)
        if self.cache is not None:
            self.cache.put(key, {"content": content, "model": self.model, "seed": seed, "params": params,
                                 "messages": messages, "created": time.time()})
        return content

    def _waited(self, seconds: float) -> None:
        with self._lock:
            self.waits.append(seconds)


# ---------------------------------------------------------------- JSON replies

class InvalidReply(Exception):
    """A reply that fails validation. ``category`` is short and countable; the message has the details."""

    def __init__(self, category: str, detail: str = ""):
        super().__init__(f"{category}: {detail}" if detail else category)
        self.category = category


_FENCE = re.compile(r"```(?:json|JSON)?\s*(.*?)```", re.DOTALL)


def parse_json_reply(raw: str, repairs: list[str]) -> Any:
    """The JSON value in a reply; cutting it out of a code fence or surrounding prose is a repair
    (``json_extracted`` is appended to ``repairs``).

    Raises:
        InvalidReply: ``not JSON``.
    """
    text = raw.strip()
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        pass
    candidates = [m.group(1) for m in _FENCE.finditer(text)]
    start, end = text.find("{"), text.rfind("}")
    if 0 <= start < end:
        candidates.append(text[start:end + 1])
    for candidate in candidates:
        try:
            value = json.loads(candidate)
        except json.JSONDecodeError:
            continue
        repairs.append("json_extracted")
        return value
    raise InvalidReply("not JSON", repr(text[:80]))


__all__ = ["CachedChat", "ChatClient", "EndpointError", "FAILING", "InvalidReply", "OpenAIChat", "REFUSED",
           "RequestRefused", "ResponseCache", "ResponseFormatUnsupported", "RetriesExhausted", "RetryPolicy",
           "TransientError", "UNREACHABLE", "parse_json_reply", "public_url", "resolve_endpoint",
           "retry_after_seconds"]
