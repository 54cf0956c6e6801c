"""The annotation agent: questions with gold answers in, Traces with memory and reason steps out, written
by any OpenAI-compatible chat model.

Two calls per question (spec disentangle.md §3, rebuilt):

1. **Plan.** The model sees the question and its gold answer and returns JSON: steps, each a ``memory``
   step (one fact, with a stand-alone ``query`` asking for it) or a ``reason`` step, plus the answer it
   reached. ``variant="ordered"`` asks for every memory step before the first reason step; ``"free"``
   lets them interleave (the paper's released data is of this kind, §3.5).
2. **Knowledge.** A second call sees only the numbered queries (not the question, not the answer) and
   answers each with a short fact; **that fact becomes the memory step's text**. The original spliced
   these answers into a line its parser threw away, so the second call did nothing (§3.4, bug B2).

Replies are parsed as JSON (never scraped from markdown, B5) and validated; a failing reply is asked
again, with the reason, up to ``attempts`` times, and then the item is **rejected with that reason**,
never kept with empty steps (B12). Transport failures (connection, 408/409/429/5xx) are retried with
exponential backoff; a wrong key or unknown model stops the run with one clear error. Calls run
``concurrency`` at a time in threads; every reply is cached on disk as JSON under
``sha256(messages + model + seed + params)``, so a re-run costs no requests; each call carries a seed
(B13: the original pinned none). Finished items are appended to ``traces.jsonl`` one atomic line each
and skipped on a re-run; ``report.json`` counts accepted, repaired and rejected items with reasons.

What counts as a **repair** (deterministic, recorded per item in ``meta.annotation.repairs``; an item
with any repair is *repaired*, with none *accepted*):

- ``json_extracted``: the JSON object had to be cut out of a code fence or surrounding prose;
- ``tag_alias``: a step kind spelt as an alias (``rag``, ``Reasoning``, ``fact``...) mapped by
  ``memreason.traces.normalise_kind``;
- ``tagged_string_step``: a step given as a ``"[rag]: text"`` string instead of an object;
- ``whitespace``: kept step text with runs of whitespace or line breaks, collapsed to single spaces
  (a memory step's own text is not kept when the knowledge pass replaces it);
- ``empty_step_dropped``: a step with empty text removed (the rest must still pass every check);
- ``answer_format``: the reply's answer written in another form of the gold answer (``yes`` for True,
  ``(B)`` or ``B. library`` for B) and read with the task's own extractor.

Everything else is **rejected** after the retries: not JSON, wrong schema, an unknown step kind, too
few memory or reason steps, too many steps, control tokens in a step, a memory step without a query, an
ordered plan with a memory step after a reason step, an answer that disagrees with the gold answer, a
knowledge reply that misses a query, or a request the server refused. Missing steps are never invented
(a plan without a concluding reason step is not given one).

The API key is passed to the client only: it is never logged, cached or written to any output.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import tempfile
import threading
import time
from collections import Counter
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal, Protocol, Sequence

from memreason.errors import ConfigError, DataError
from memreason.evaluate import _append_rows, read_results
from memreason.tasks import ANSWER_MARKER, Task, get_task
from memreason.traces import MEMORY, REASON, Step, Trace, UnknownTagError, normalise_kind, parse_tagged_step

logger = logging.getLogger(__name__)

# Bump whenever a prompt or schema changes: it is part of the settings digest that guards resumption.
PROMPT_VERSION = 1

TRACES_FILE = "traces.jsonl"
REJECTED_FILE = "rejected.jsonl"
REPORT_FILE = "report.json"
CONFIG_FILE = "annotate_config.json"

ENV_BASE_URL = ("MEMREASON_API_BASE", "OPENAI_BASE_URL")
ENV_API_KEY = ("MEMREASON_API_KEY", "OPENAI_API_KEY")

# ---------------------------------------------------------------- prompts (our own words)

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

_CONTROL_TOKEN = re.compile(r"<(?:prefix|memory|reason|answer)(?:_\d+)?>")
_FENCE = re.compile(r"```(?:json|JSON)?\s*(.*?)```", re.DOTALL)
_YES_NO = {"yes": "True", "no": "False"}


# ---------------------------------------------------------------- settings

@dataclass
class AnnotateConfig:
    """How to annotate. Fields above ``concurrency`` decide the output and are hashed into the settings
    digest (a re-run with other values refuses to mix into the same output directory).

    Args:
        model (str): the model name the endpoint knows.
        task (str): task whose answer space the gold and the reply's answers live in.
        variant ("free" | "ordered", default "free"): ordered = all memory steps first.
        fill_knowledge (bool, default True): run the knowledge call and use its facts as memory text.
        min_memory, min_reason (int, default 1): fewest steps of each kind a trace may have.
        max_steps (int, default 12): most steps a trace may have.
        temperature (float, default 0.7): sampling temperature of every call (retries need variety).
        max_tokens (int, default 1024): reply length cap per call.
        seed (int, default 0): attempt k of a call uses ``seed + k``; part of every cache key.
        response_format ("auto" | "json_schema" | "none", default "auto"): ``auto`` sends a JSON schema
            and, if the server refuses ``response_format``, stops sending it for the rest of the run.
        attempts (int, default 3): tries per call when the reply fails validation.
        concurrency (int, default 4): items in flight at once (threads).
        retries (int, default 4): extra tries per request after a transport failure.
        backoff (float, default 1.0): seconds before the first such retry; doubles each time.
        max_backoff (float, default 30.0): cap on one wait.
        timeout (float, default 120.0): seconds per HTTP request.

    Raises:
        ConfigError: an unknown variant or response format, or a count out of range.
    """

    model: str
    task: str
    variant: Literal["free", "ordered"] = "free"
    fill_knowledge: bool = True
    min_memory: int = 1
    min_reason: int = 1
    max_steps: int = 12
    temperature: float = 0.7
    max_tokens: int = 1024
    seed: int = 0
    response_format: Literal["auto", "json_schema", "none"] = "auto"
    attempts: int = 3
    # ---- not part of the digest: how fast, not what
    concurrency: int = 4
    retries: int = 4
    backoff: float = 1.0
    max_backoff: float = 30.0
    timeout: float = 120.0

    def __post_init__(self):
        if not self.model:
            raise ConfigError("name the model to annotate with (--model)")
        if self.variant not in ORDER_RULES:
            raise ConfigError(f"unknown variant {self.variant!r}; choose free or ordered")
        if self.response_format not in ("auto", "json_schema", "none"):
            raise ConfigError(f"unknown response format {self.response_format!r}; choose auto, json_schema or none")
        for name, low in (("min_memory", 0), ("min_reason", 0), ("max_steps", 1), ("max_tokens", 1),
                          ("attempts", 1), ("concurrency", 1), ("retries", 0)):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ConfigError(f"{name} must be an integer >= {low}, got {value!r}")
        if self.min_memory + self.min_reason > self.max_steps:
            raise ConfigError("min_memory + min_reason exceeds max_steps")
        if not 0 <= self.temperature <= 2:
            raise ConfigError(f"temperature must be in [0, 2], got {self.temperature}")
        get_task(self.task)

    def output_settings(self) -> dict:
        keys = ("model", "task", "variant", "fill_knowledge", "min_memory", "min_reason", "max_steps",
                "temperature", "max_tokens", "seed", "response_format", "attempts")
        return {"prompt_version": PROMPT_VERSION, **{k: getattr(self, k) for k in keys}}

    def digest(self) -> str:
        return hashlib.sha256(json.dumps(self.output_settings(), sort_keys=True).encode()).hexdigest()[:16]


# ---------------------------------------------------------------- the chat endpoint

class TransientError(Exception):
    """A failure worth retrying after a wait (connection lost, timeout, 408/409/429/5xx)."""


class RequestRefused(Exception):
    """The server refused this one request (a 4xx other than auth / unknown model); the item is rejected."""


class ResponseFormatUnsupported(RequestRefused):
    """The server refused the ``response_format`` field."""


class ChatClient(Protocol):
    """One chat completion: returns the reply text. Raises ``TransientError``, ``RequestRefused`` or
    ``ConfigError`` (wrong key, unknown model: nothing else will work either)."""

    def complete(self, messages: list[dict], *, model: str, seed: int, temperature: float, max_tokens: int,
                 response_format: dict | None) -> str: ...


def resolve_endpoint(base_url: str | None = None, api_key: str | None = None) -> tuple[str | None, str | None]:
    """The base URL and key from the arguments, else ``MEMREASON_API_BASE`` / ``OPENAI_BASE_URL`` and
    ``MEMREASON_API_KEY`` / ``OPENAI_API_KEY``. A None base URL means OpenAI's own."""
    if base_url is None:
        base_url = next((os.environ[name] for name in ENV_BASE_URL if os.environ.get(name)), None)
    if api_key is None:
        api_key = next((os.environ[name] for name in ENV_API_KEY if os.environ.get(name)), None)
    return base_url, api_key


class OpenAIChat:
    """``ChatClient`` over the official ``openai`` package, for any OpenAI-compatible endpoint.

    The client's own retries are off (``max_retries=0``): the annotator's backoff is the one retry policy,
    so request counts and waits are what the report says.

    Args:
        base_url (str | None): e.g. ``http://127.0.0.1:8000/v1``; None = OpenAI.
        api_key (str | None): sent as a bearer token; a placeholder when None (local servers need none).
        timeout (float, default 120).

    Raises:
        ConfigError: the ``openai`` package is missing.
    """

    def __init__(self, base_url: str | None, api_key: str | None, timeout: float = 120.0):
        try:
            import openai
        except ImportError:
            raise ConfigError("the annotation agent needs the 'openai' package: "
                              "pip install 'memreason[annotate]'") from None
        self._openai = openai
        self.base_url = base_url
        self._client = openai.OpenAI(base_url=base_url, api_key=api_key or "no-key", timeout=timeout, max_retries=0)

    def __repr__(self) -> str:  # never the key
        return f"OpenAIChat(base_url={self.base_url!r})"

    def complete(self, messages, *, model, seed, temperature, max_tokens, response_format):
        openai = self._openai
        kwargs: dict[str, Any] = dict(model=model, messages=messages, seed=seed, temperature=temperature,
                                      max_tokens=max_tokens)
        if response_format is not None:
            kwargs["response_format"] = response_format
        try:
            reply = self._client.chat.completions.create(**kwargs)
        except (openai.APIConnectionError, openai.RateLimitError, openai.InternalServerError) as exc:
            raise TransientError(_describe(exc)) from None
        except (openai.AuthenticationError, openai.PermissionDeniedError) as exc:
            raise ConfigError(f"the endpoint {self.base_url or 'api.openai.com'} refused the API key "
                              f"({_describe(exc)}); set MEMREASON_API_KEY or pass --api-key") from None
        except openai.NotFoundError as exc:
            raise ConfigError(f"the endpoint {self.base_url or 'api.openai.com'} does not serve model {model!r} "
                              f"or has no /chat/completions ({_describe(exc)})") from None
        except openai.APIStatusError as exc:
            if exc.status_code in (408, 409) or exc.status_code >= 500:
                raise TransientError(_describe(exc)) from None
            if response_format is not None and ("response_format" in str(exc) or "json_schema" in str(exc)):
                raise ResponseFormatUnsupported(_describe(exc)) from None
            raise RequestRefused(_describe(exc)) from None
        if not reply.choices:
            raise TransientError("the reply has no choices")
        return reply.choices[0].message.content or ""


def _describe(exc: Exception) -> str:
    status = getattr(exc, "status_code", None)
    message = getattr(exc, "message", None) or str(exc)
    return f"HTTP {status}: {message}" if status else f"{type(exc).__name__}: {message}"


# ---------------------------------------------------------------- cache

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

    def _path(self, key: str) -> Path:
        return self.directory / key[:2] / f"{key}.json"

    def get(self, key: str) -> str | None:
        try:
            record = json.loads(self._path(key).read_text(encoding="utf-8"))
        except FileNotFoundError:
            return None
        except (OSError, json.JSONDecodeError):
            logger.warning("ignoring an unreadable cache entry %s", self._path(key))
            return None
        with self._lock:
            self.hits += 1
        return record["content"]

    def put(self, key: str, record: dict) -> None:
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=path.parent)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as handle:
                json.dump(record, handle, ensure_ascii=False)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise


# ---------------------------------------------------------------- validation

class InvalidReply(Exception):
    """A reply that fails validation. ``category`` is short and countable; the message has the details."""

    def __init__(self, category: str, detail: str = ""):
        super().__init__(f"{category}: {detail}" if detail else category)
        self.category = category


def parse_json_reply(raw: str, repairs: list[str]) -> Any:
    """The JSON value in a reply; cutting it out of a code fence or surrounding prose is a repair.

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


def validate_plan(raw: str, trace: Trace, task: Task, config: AnnotateConfig) -> Plan:
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
        if not text.strip():
            repairs.append("empty_step_dropped")
            continue
        # a memory step's own text is replaced by the knowledge pass: tidying it repairs nothing kept
        replaced = kind == MEMORY and config.fill_knowledge
        text = _clean_text(text, [] if replaced else repairs)
        if _CONTROL_TOKEN.search(text) or _CONTROL_TOKEN.search(query):
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
    for fact in facts.values():
        if _CONTROL_TOKEN.search(fact):
            raise InvalidReply("control token in step", "a fact")
    return [facts[i] for i in range(1, n + 1)], repairs


# ---------------------------------------------------------------- the agent

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


@dataclass
class ItemResult:
    """One item's outcome: ``status`` is accepted / repaired / rejected; ``trace`` is None if rejected."""

    id: str
    status: str
    trace: Trace | None = None
    repairs: list[str] = field(default_factory=list)
    reason: str | None = None
    category: str | None = None
    attempts: dict = field(default_factory=dict)


class Annotator:
    """Annotate one item at a time (thread-safe: items may run concurrently).

    Args:
        config (AnnotateConfig).
        client (ChatClient): the endpoint.
        cache (ResponseCache | None): replies already paid for.
        sleep (callable, default time.sleep): the backoff wait (tests pass a recorder).
    """

    def __init__(self, config: AnnotateConfig, client: ChatClient, cache: ResponseCache | None = None,
                 sleep: Callable[[float], None] = time.sleep):
        self.config, self.client, self.cache, self.sleep = config, client, cache, sleep
        self.task = get_task(config.task)
        self.requests = 0
        self.waits: list[float] = []
        self._send_format = config.response_format != "none"
        self.format_fallback = False
        self._lock = threading.Lock()

    # -- one request: cache, then the endpoint with backoff
    def ask(self, messages: list[dict], seed: int, schema_name: str, schema: dict) -> str:
        """The reply to ``messages`` (from the cache when this exact request was made before).

        Raises:
            RequestRefused: the server refused the request, or it kept failing after the retries.
            ConfigError: wrong key or unknown model.
        """
        config = self.config
        # The key holds the configured response-format mode, not what was sent, so that a run that fell
        # back from a refused schema finds its replies again without asking the server first.
        params = {"temperature": config.temperature, "max_tokens": config.max_tokens,
                  "response_format": config.response_format, "schema": schema}
        key = ResponseCache.key(messages, config.model, seed, params)
        if self.cache is not None:
            cached = self.cache.get(key)
            if cached is not None:
                return cached
        content = self._request(messages, seed, schema_name, schema)
        if self.cache is not None:
            self.cache.put(key, {"content": content, "model": config.model, "seed": seed, "params": params,
                                 "messages": messages, "created": time.time()})
        return content

    def _request(self, messages: list[dict], seed: int, schema_name: str, schema: dict) -> str:
        config = self.config
        failures = 0
        while True:
            fmt = None
            if self._send_format:
                fmt = {"type": "json_schema", "json_schema": {"name": schema_name, "schema": schema, "strict": True}}
            with self._lock:
                self.requests += 1
            try:
                return self.client.complete(messages, model=config.model, seed=seed, temperature=config.temperature,
                                            max_tokens=config.max_tokens, response_format=fmt)
            except ResponseFormatUnsupported as exc:
                if config.response_format != "auto":
                    raise RequestRefused(f"{exc} (run with --response-format auto or none)") from None
                with self._lock:
                    if self._send_format:
                        logger.warning("the endpoint refuses response_format; sending none from now on "
                                       "(replies are still validated)")
                    self._send_format, self.format_fallback = False, True
            except TransientError as exc:
                if failures >= config.retries:
                    raise RequestRefused(f"still failing after {failures + 1} tries: {exc}") from None
                delay = min(config.max_backoff, config.backoff * 2 ** failures)
                failures += 1
                logger.info("request failed (%s); retry %d/%d in %.1f s", exc, failures, config.retries, delay)
                with self._lock:
                    self.waits.append(delay)
                self.sleep(delay)

    # -- one call with validation and re-asking
    def _call(self, base: list[dict], schema_name: str, schema: dict, check: Callable[[str], Any]) -> tuple[Any, int]:
        messages, history = base, []
        for attempt in range(self.config.attempts):
            raw = self.ask(messages, self.config.seed + attempt, schema_name, schema)
            try:
                return check(raw), attempt + 1
            except InvalidReply as exc:
                history.append(exc)
                # the retry shows the model its reply and what was wrong with it
                messages = base + [{"role": "assistant", "content": raw[:4000]},
                                   {"role": "user", "content": RETRY_PROMPT.format(reason=exc)}]
        raise history[-1]

    def annotate(self, trace: Trace) -> ItemResult:
        """Annotate one question (its ``answer`` is the gold answer).

        Raises:
            ConfigError: wrong key or unknown model (stops the run).
        """
        item = ItemResult(id=trace.id, status="rejected")
        stage = "plan"
        try:
            plan, item.attempts["plan"] = self._call(
                plan_messages(trace, self.config.variant), "plan", PLAN_SCHEMA,
                lambda raw: validate_plan(raw, trace, self.task, self.config))
            steps, repairs = list(plan.steps), list(plan.repairs)
            if self.config.fill_knowledge and plan.queries:
                stage = "knowledge"
                (facts, fact_repairs), item.attempts["knowledge"] = self._call(
                    knowledge_messages(plan.queries), "facts", KNOWLEDGE_SCHEMA,
                    lambda raw: validate_facts(raw, len(plan.queries)))
                repairs += fact_repairs
                memory_facts = iter(facts)
                steps = [Step(MEMORY, next(memory_facts)) if s.kind == MEMORY else s for s in steps]
        except InvalidReply as exc:
            item.category = f"{stage}: {exc.category}"
            item.reason = f"{stage}: {exc} (after {self.config.attempts} attempts)"
            return item
        except RequestRefused as exc:
            item.category = f"{stage}: request failed"
            item.reason = f"{stage}: request failed: {exc}"
            return item
        item.repairs = sorted(set(repairs))
        item.status = "repaired" if repairs else "accepted"
        meta = dict(trace.meta)
        meta["annotation"] = {"status": item.status, "repairs": item.repairs, "attempts": item.attempts,
                              "queries": plan.queries, "model": self.config.model, "variant": self.config.variant,
                              "seed": self.config.seed, "prompt_version": PROMPT_VERSION,
                              "knowledge_filled": bool(self.config.fill_knowledge and plan.queries)}
        item.trace = Trace(question=trace.question, steps=tuple(steps), answer=trace.answer, meta=meta)
        return item


# ---------------------------------------------------------------- the run

@dataclass
class AnnotationReport:
    """What a run did. ``accepted`` / ``repaired`` count every trace in the output file (earlier runs'
    included) and ``repairs`` their repairs by kind; ``rejected`` the items rejected in this run,
    by ``rejections`` category and in ``rejected_items`` with their reasons; ``requests`` were sent to the
    endpoint, ``cache_hits`` were answered from the cache."""

    total: int = 0
    skipped: int = 0
    accepted: int = 0
    repaired: int = 0
    rejected: int = 0
    repairs: Counter = field(default_factory=Counter)
    rejections: Counter = field(default_factory=Counter)
    rejected_items: list = field(default_factory=list)
    requests: int = 0
    cache_hits: int = 0
    backoff_waits: int = 0
    response_format_fallback: bool = False
    seconds: float = 0.0
    settings: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        data = asdict(self)
        data["repairs"], data["rejections"] = dict(self.repairs), dict(self.rejections)
        return data

    def summary(self) -> str:
        lines = [f"{self.total} items: {self.accepted} accepted, {self.repaired} repaired, {self.rejected} rejected"
                 + (f" ({self.skipped} done in earlier runs)" if self.skipped else ""),
                 f"{self.requests} requests sent, {self.cache_hits} answered from the cache, "
                 f"{self.backoff_waits} backoff waits, {self.seconds:.1f} s"]
        if self.repairs:
            lines.append("repairs: " + ", ".join(f"{k} x{v}" for k, v in self.repairs.most_common()))
        if self.rejections:
            lines.append("rejections: " + ", ".join(f"{k} x{v}" for k, v in self.rejections.most_common()))
        if self.response_format_fallback:
            lines.append("the endpoint refused response_format: replies were requested without a schema")
        return "\n".join(lines)


def annotate(traces: Sequence[Trace], out_dir: str | Path, config: AnnotateConfig, *,
             client: ChatClient | None = None, base_url: str | None = None, api_key: str | None = None,
             cache_dir: str | Path | None = None, overwrite: bool = False,
             progress: Callable[[int], None] | None = None,
             sleep: Callable[[float], None] = time.sleep) -> AnnotationReport:
    """Annotate ``traces`` (questions with gold answers) into ``out_dir``.

    Writes ``traces.jsonl`` (one ``Trace.to_dict()`` per finished item, appended as it finishes),
    ``rejected.jsonl`` (this run's rejections with reasons), ``report.json`` and ``annotate_config.json``.
    A re-run with the same settings skips finished ids; rejected items are tried again (their replies
    come from the cache unless the settings give them new attempts).

    Args:
        traces: items with unique ids and gold answers (their existing steps are ignored).
        out_dir: output directory.
        config (AnnotateConfig).
        client: a ``ChatClient``; default ``OpenAIChat`` on ``base_url`` / ``api_key`` (or the environment).
        cache_dir: reply cache (default ``<out_dir>/cache``).
        overwrite (bool): discard earlier output in ``out_dir`` (the cache is kept).
        progress: called with the number of items just finished (the CLI's progress bar).
        sleep: the backoff wait.

    Returns:
        AnnotationReport (also written to ``report.json``).

    Raises:
        DataError: duplicate ids, or an item without a gold answer the task accepts.
        ConfigError: ``out_dir`` holds output made with other settings; wrong key or unknown model.
    """
    start = time.perf_counter()
    task = get_task(config.task)
    ids = [t.id for t in traces]
    if any(i is None for i in ids) or len(set(ids)) != len(ids):
        raise DataError("every item needs a unique id (meta['id']) so that a re-run can skip finished ones")
    for index, trace in enumerate(traces):
        if trace.answer is None:
            raise DataError("no gold answer to annotate against", file=str(trace.meta.get("source")),
                            record=index, field="answer")
        try:
            task.canonical_answer(trace.answer, trace.question)
        except ValueError as exc:
            raise DataError(f"{exc} (task {task.name})", file=str(trace.meta.get("source")), record=index,
                            field="answer") from None
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    traces_path, rejected_path, config_path = out / TRACES_FILE, out / REJECTED_FILE, out / CONFIG_FILE
    if overwrite:
        traces_path.unlink(missing_ok=True)
    elif config_path.exists() and traces_path.exists():
        previous = json.loads(config_path.read_text(encoding="utf-8")).get("digest")
        if previous != config.digest():
            raise ConfigError(f"{out} holds traces annotated with different settings; choose another --out or "
                              "pass --overwrite")
    if client is None:
        base_url, api_key = resolve_endpoint(base_url, api_key)
        client = OpenAIChat(base_url, api_key, timeout=config.timeout)
    _write_json(config_path, {"digest": config.digest(), **config.output_settings(),
                              "base_url": _public_url(getattr(client, "base_url", None))})
    rejected_path.write_text("")  # this run's rejections only: earlier ones are retried below
    traces_path.touch()
    cache = ResponseCache(cache_dir if cache_dir is not None else out / "cache")
    annotator = Annotator(config, client, cache, sleep=sleep)

    done = {row.get("meta", {}).get("id") for row in read_results(traces_path)}
    todo = [t for t in traces if t.id not in done]
    report = AnnotationReport(total=len(traces), skipped=len(traces) - len(todo), settings=config.output_settings())
    if report.skipped:
        logger.info("resuming: %d of %d items already annotated", report.skipped, len(traces))
        if progress:
            progress(report.skipped)

    # Bounded in flight (2 x concurrency), so an interrupt leaves little queued work and memory stays flat.
    pending, queue = set(), iter(todo)
    with ThreadPoolExecutor(max_workers=config.concurrency, thread_name_prefix="annotate") as pool:
        try:
            for trace in queue:
                pending.add(pool.submit(annotator.annotate, trace))
                if len(pending) >= 2 * config.concurrency:
                    finished, pending = wait(pending, return_when=FIRST_COMPLETED)
                    _record(finished, traces_path, rejected_path, report, progress)
            while pending:
                finished, pending = wait(pending, return_when=FIRST_COMPLETED)
                _record(finished, traces_path, rejected_path, report, progress)
        except BaseException:
            for future in pending:
                future.cancel()
            raise
    rows = read_results(traces_path)
    wanted = set(ids)
    annotations = [row["meta"]["annotation"] for row in rows if row.get("meta", {}).get("id") in wanted]
    statuses = Counter(a["status"] for a in annotations)
    report.accepted, report.repaired = statuses["accepted"], statuses["repaired"]
    report.repairs = Counter(repair for a in annotations for repair in a["repairs"])
    report.requests, report.cache_hits = annotator.requests, cache.hits
    report.backoff_waits, report.response_format_fallback = len(annotator.waits), annotator.format_fallback
    report.seconds = time.perf_counter() - start
    _write_json(out / REPORT_FILE, report.to_dict())
    return report


def _record(finished, traces_path: Path, rejected_path: Path, report: AnnotationReport,
            progress: Callable[[int], None] | None) -> None:
    for future in finished:
        item: ItemResult = future.result()  # re-raises ConfigError: the run stops
        if item.trace is not None:
            _append_rows(traces_path, [item.trace.to_dict()])
        else:
            report.rejected += 1
            report.rejections[item.category] += 1
            row = {"id": item.id, "category": item.category, "reason": item.reason}
            report.rejected_items.append(row)
            _append_rows(rejected_path, [row])
            logger.debug("rejected %s: %s", item.id, item.reason)
        if progress:
            progress(1)


def _public_url(url: str | None) -> str | None:
    """The URL without user info or query (either may hold a secret), for the record."""
    if not url:
        return url
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(str(url))
    return urlunsplit((parts.scheme, parts.hostname + (f":{parts.port}" if parts.port else "") if parts.hostname
                       else parts.netloc, parts.path, "", ""))


def _write_json(path: Path, data: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1, ensure_ascii=False), encoding="utf-8")
    os.replace(tmp, path)


__all__ = ["AnnotateConfig", "AnnotationReport", "Annotator", "InvalidReply", "ItemResult", "OpenAIChat",
           "ResponseCache", "annotate", "knowledge_messages", "plan_messages", "resolve_endpoint",
           "validate_facts", "validate_plan"]
