"""The annotation agent: questions with gold answers in, Traces with memory and reason steps out, written
by any OpenAI-compatible chat model.

Two calls per question (spec disentangle.md §3, rebuilt; prompts in ``data.annotate_prompts``):

1. **Plan.** The model sees the question and its gold answer and returns JSON: steps, each a ``memory``
   step (one fact, with a stand-alone ``query`` asking for it) or a ``reason`` step, plus the answer it
   reached. ``variant="ordered"`` asks for every memory step before the first reason step; ``"free"``
   lets them interleave (the paper's released data is of this kind, §3.5).
2. **Knowledge.** A second call sees only the numbered queries (not the question, not the answer) and
   answers each with a short fact; **that fact becomes the memory step's text**. The original spliced
   these answers into a line its parser threw away, so the second call did nothing (§3.4, bug B2).

Replies are parsed as JSON (never scraped from markdown, B5) and validated (``data.annotate_checks``: what
is repaired and what is rejected); a failing reply is asked again, with the reason, up to ``attempts``
times, and then the item is **rejected with that reason**, never kept with empty steps (B12).

Talking to the endpoint is ``memreason.llm``: transport failures (connection, timeout, 408/429/5xx) are
retried with jittered exponential backoff that honours ``Retry-After``; a wrong key or unknown model stops
the run with one clear error; with no API key and no base URL nothing is sent at all. Every reply is cached
on disk under ``sha256(messages + model + seed + params)``, so a re-run costs no requests; each call
carries a seed (B13: the original pinned none).

Output (``memreason.io``): finished items are appended to ``traces.jsonl`` one line each (one write and an
fsync) and skipped on a re-run; a line torn by a kill is dropped on resume, so a killed run loses or
duplicates no item. ``annotate_config.json`` holds the settings digest (a re-run with other settings is
refused), ``rejected.jsonl`` this run's rejections with reasons, ``report.json`` the counts.

A run **failed** (``AnnotationReport.failure``) when it annotated none of the items it tried and at least
one of them failed at the endpoint (unreachable, failing after every retry, or refusing the request):
the CLI then exits 1 with one line saying what to fix. Rejections of the model's replies alone are results.

The API key is passed to the client only: it is never logged, cached or written to any output.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal, Sequence

from memreason.data.annotate_checks import InvalidReply, validate_facts, validate_plan
from memreason.data.annotate_prompts import (KNOWLEDGE_SCHEMA, ORDER_RULES, PLAN_SCHEMA, PROMPT_VERSION,
                                             knowledge_messages, plan_messages, retry_messages)
from memreason.errors import ConfigError, DataError
from memreason.io import OutputDir, append_jsonl, atomic_write, read_jsonl, settings_digest, write_json
from memreason.llm import (DEFAULT_ENDPOINT, FAILING, REFUSED, UNREACHABLE, CachedChat, ChatClient, OpenAIChat,
                           RequestRefused, ResponseCache, ResponseFormatUnsupported, RetryPolicy, resolve_endpoint)
from memreason.tasks import get_task, task_names
from memreason.traces import MEMORY, Step, Trace

logger = logging.getLogger(__name__)

TRACES_FILE = "traces.jsonl"
REJECTED_FILE = "rejected.jsonl"
REPORT_FILE = "report.json"
CONFIG_FILE = "annotate_config.json"

# What to fix when nothing was annotated because of the endpoint, by the cause of the failures.
FIXES = {
    UNREACHABLE: "start the server, or fix --base-url (or raise --timeout for a slow one)",
    FAILING: "the server kept failing after every retry; try again later, lower --concurrency or raise --retries",
    REFUSED: "the server refused the requests; the reasons are in rejected.jsonl (e.g. a prompt longer than the "
             "model's context)",
}


# ---------------------------------------------------------------- settings

@dataclass
class AnnotateConfig:
    """How to annotate. Fields above ``concurrency`` decide the output and are hashed into the settings
    digest (a re-run with other values refuses to mix into the same output directory).

    Args:
        model (str): the model name the endpoint knows (required).
        task (str): task whose answer space the gold and the reply's answers live in (required).
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
        retries, backoff, max_backoff, jitter, max_retry_time: the ``memreason.llm.RetryPolicy`` of every
            request (defaults 4 retries, 1 s doubling to at most 30 s, jitter 0.5, 300 s in all).
        timeout (float, default 120.0): seconds per HTTP request.

    Raises:
        ConfigError: every problem at once (unknown task, a count out of range, ...).
    """

    model: str = ""
    task: str | None = None
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
    jitter: float = 0.5
    max_retry_time: float = 300.0
    timeout: float = 120.0

    def __post_init__(self):
        problems = self.problems()
        if len(problems) == 1:
            raise ConfigError(problems[0])
        if problems:
            raise ConfigError(f"{len(problems)} config errors: " + "; ".join(problems))

    def problems(self) -> list[str]:
        """Every problem with these settings, one line each (empty when fine)."""
        out = []
        if not self.model:
            out.append("name the model to annotate with (--model)")
        if self.task is None:
            out.append("pass --task (strategyqa, commonsenseqa, truthfulqa or freeform): the reply's answer is "
                       "checked against the gold answer in that task's answer space")
        elif self.task not in task_names():
            out.append(f"unknown task {self.task!r}; choose one of {', '.join(task_names())}")
        if self.variant not in ORDER_RULES:
            out.append(f"unknown variant {self.variant!r}; choose free or ordered")
        if self.response_format not in ("auto", "json_schema", "none"):
            out.append(f"unknown response format {self.response_format!r}; choose auto, json_schema or none")
        for name, low in (("min_memory", 0), ("min_reason", 0), ("max_steps", 1), ("max_tokens", 1),
                          ("attempts", 1), ("concurrency", 1)):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                out.append(f"{name} must be an integer >= {low}, got {value!r}")
        if all(isinstance(getattr(self, k), int) for k in ("min_memory", "min_reason", "max_steps")) \
                and self.min_memory + self.min_reason > self.max_steps:
            out.append("min_memory + min_reason exceeds max_steps")
        if not 0 <= self.temperature <= 2:
            out.append(f"temperature must be in [0, 2], got {self.temperature}")
        if not self.timeout > 0:
            out.append(f"timeout must be > 0 seconds, got {self.timeout}")
        try:
            self.retry_policy()
        except ConfigError as exc:
            out.append(str(exc))
        return out

    def retry_policy(self) -> RetryPolicy:
        return RetryPolicy(retries=self.retries, backoff=self.backoff, max_backoff=self.max_backoff,
                           jitter=self.jitter, max_retry_time=self.max_retry_time)

    def output_settings(self) -> dict:
        keys = ("model", "task", "variant", "fill_knowledge", "min_memory", "min_reason", "max_steps",
                "temperature", "max_tokens", "seed", "response_format", "attempts")
        return {"prompt_version": PROMPT_VERSION, **{k: getattr(self, k) for k in keys}}

    def digest(self) -> str:
        return settings_digest(self.output_settings())


@dataclass
class AnnotateJob(AnnotateConfig):
    """What ``memreason annotate`` annotates and where it goes: ``AnnotateConfig`` plus its inputs and
    outputs (none of these is part of the digest).

    Args:
        data (str): questions with gold answers: ``.json`` (paper format), ``.jsonl``, ``bundled:<name>``
            or ``hf:<id or dir>[:config]`` (required); bundled data names its own task.
        split (str | None): keep only records of this split; limit (int | None): only the first N items.
        skip_invalid, on_unknown_tag: passed to the dataset loader.
        out (str): output directory (required); cache_dir (str | None): reply cache (``<out>/cache``).
        base_url (str | None): the endpoint (else ``$MEMREASON_API_BASE``, ``$OPENAI_BASE_URL``, OpenAI).
            The API key is never a setting: it comes from the environment (or ``--api-key``).
        overwrite (bool): discard traces already in ``out`` (the cache is kept).
    """

    data: str = ""
    split: str | None = None
    limit: int | None = None
    skip_invalid: bool = False
    on_unknown_tag: Literal["error", "drop"] = "error"
    out: str = ""
    cache_dir: str | None = None
    base_url: str | None = None
    overwrite: bool = False

    def __post_init__(self):
        if self.task is None and self.data.startswith("bundled:"):
            self.task = self.data.split(":", 1)[1]
        super().__post_init__()

    def problems(self) -> list[str]:
        out = super().problems()
        if not self.data:
            out.append("give the questions to annotate (--data FILE, bundled:<name> or hf:<id>)")
        if not self.out.strip():
            out.append("give an output directory (--out DIR)")
        elif Path(self.out).exists() and not Path(self.out).is_dir():
            out.append(f"out: {self.out} is a file; give a directory")
        if self.limit is not None and self.limit < 1:
            out.append(f"limit must be >= 1 (or left out for every item), got {self.limit}")
        return out


# ---------------------------------------------------------------- the agent

@dataclass
class ItemResult:
    """One item's outcome: ``status`` is accepted / repaired / rejected; ``trace`` is None if rejected;
    ``cause`` says why a request failed (``memreason.llm``: unreachable / failing / refused), else None."""

    id: str
    status: str
    trace: Trace | None = None
    repairs: list[str] = field(default_factory=list)
    reason: str | None = None
    category: str | None = None
    attempts: dict = field(default_factory=dict)
    cause: str | None = None


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
        self.config = config
        self.task = get_task(config.task)
        self.chat = CachedChat(client, config.model, temperature=config.temperature, max_tokens=config.max_tokens,
                               retry=config.retry_policy(), cache=cache, sleep=sleep)
        self._send_format = config.response_format != "none"
        self.format_fallback = False
        self._lock = threading.Lock()

    @property
    def requests(self) -> int:
        return self.chat.requests

    @property
    def waits(self) -> list[float]:
        return self.chat.waits

    def ask(self, messages: list[dict], seed: int, schema_name: str, schema: dict) -> str:
        """The reply to ``messages`` (from the cache when this exact request was made before).

        Raises:
            RequestRefused: the server refused the request, or it kept failing after the retries.
            ConfigError: wrong key or unknown model.
        """
        mode = self.config.response_format
        # The key holds the configured response-format mode, not what was sent, so that a run that fell
        # back from a refused schema finds its replies again without asking the server first.
        key_params = {"response_format": mode, "schema": schema}
        fmt = None
        if self._send_format:
            fmt = {"type": "json_schema", "json_schema": {"name": schema_name, "schema": schema, "strict": True}}
        try:
            return self.chat.complete(messages, seed=seed, response_format=fmt, key_params=key_params)
        except ResponseFormatUnsupported as exc:
            if mode != "auto":
                raise RequestRefused(f"{exc} (run with --response-format auto or none)") from None
            with self._lock:
                if self._send_format:
                    logger.warning("the endpoint refuses response_format; sending none from now on "
                                   "(replies are still validated)")
                self._send_format, self.format_fallback = False, True
        return self.chat.complete(messages, seed=seed, response_format=None, key_params=key_params)

    def _call(self, base: list[dict], schema_name: str, schema: dict, check: Callable[[str], Any]) -> tuple[Any, int]:
        """One call, validated, asked again with the reason up to ``attempts`` times."""
        messages, history = base, []
        for attempt in range(self.config.attempts):
            raw = self.ask(messages, self.config.seed + attempt, schema_name, schema)
            try:
                return check(raw), attempt + 1
            except InvalidReply as exc:
                history.append(exc)
                messages = retry_messages(base, raw, exc)
        raise history[-1]

    def annotate(self, trace: Trace) -> ItemResult:
        """Annotate one question (its ``answer`` is the gold answer).

        Raises:
            ConfigError: wrong key or unknown model (stops the run).
        """
        config = self.config
        item = ItemResult(id=trace.id, status="rejected")
        stage = "plan"
        try:
            plan, item.attempts["plan"] = self._call(
                plan_messages(trace, config.variant), "plan", PLAN_SCHEMA,
                lambda raw: validate_plan(raw, trace, self.task, config))
            steps, repairs = list(plan.steps), list(plan.repairs)
            if config.fill_knowledge and plan.queries:
                stage = "knowledge"
                (facts, fact_repairs), item.attempts["knowledge"] = self._call(
                    knowledge_messages(plan.queries), "facts", KNOWLEDGE_SCHEMA,
                    lambda raw: validate_facts(raw, len(plan.queries)))
                repairs += fact_repairs
                memory_facts = iter(facts)
                steps = [Step(MEMORY, next(memory_facts)) if s.kind == MEMORY else s for s in steps]
        except InvalidReply as exc:
            item.category = f"{stage}: {exc.category}"
            item.reason = f"{stage}: {exc} (after {config.attempts} attempts)"
            return item
        except RequestRefused as exc:
            item.category = f"{stage}: request failed"
            item.reason = f"{stage}: request failed: {exc}"
            item.cause = exc.cause
            return item
        item.repairs = sorted(set(repairs))
        item.status = "repaired" if repairs else "accepted"
        meta = dict(trace.meta)
        meta["annotation"] = {"status": item.status, "repairs": item.repairs, "attempts": item.attempts,
                              "queries": plan.queries, "model": config.model, "variant": config.variant,
                              "seed": config.seed, "prompt_version": PROMPT_VERSION,
                              "knowledge_filled": bool(config.fill_knowledge and plan.queries)}
        item.trace = Trace(question=trace.question, steps=tuple(steps), answer=trace.answer, meta=meta)
        return item


# ---------------------------------------------------------------- the run

@dataclass
class AnnotationReport:
    """What a run did. ``accepted`` / ``repaired`` count every trace in the output file (earlier runs'
    included) and ``repairs`` their repairs by kind; ``written`` the traces this run added; ``rejected``
    the items rejected in this run, by ``rejections`` category and in ``rejected_items`` with their
    reasons, ``failures`` those that failed at the endpoint by cause; ``requests`` were sent to the
    endpoint (``endpoint``, without secrets), ``cache_hits`` were answered from the cache."""

    total: int = 0
    skipped: int = 0
    accepted: int = 0
    repaired: int = 0
    rejected: int = 0
    written: int = 0
    repairs: Counter = field(default_factory=Counter)
    rejections: Counter = field(default_factory=Counter)
    failures: Counter = field(default_factory=Counter)
    rejected_items: list = field(default_factory=list)
    requests: int = 0
    cache_hits: int = 0
    backoff_waits: int = 0
    response_format_fallback: bool = False
    seconds: float = 0.0
    endpoint: str | None = None
    settings: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        data = asdict(self)
        for name in ("repairs", "rejections", "failures"):
            data[name] = dict(getattr(self, name))
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

    def failure(self) -> str | None:
        """One line saying what to fix when this run annotated none of the items it tried and at least
        one failed at the endpoint; None otherwise (the run did what it could)."""
        if self.written or not self.failures:
            return None
        cause, count = self.failures.most_common(1)[0]
        example = next((row["reason"] for row in self.rejected_items if row.get("cause") == cause), "")
        example = " ".join(str(example).split())
        where = self.endpoint or DEFAULT_ENDPOINT
        tried = self.total - self.skipped
        return f"no item annotated: {count} of {tried} failed at {where} ({example}); {FIXES[cause]}"


def _check_items(traces: Sequence[Trace], task) -> None:
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


def annotate(traces: Sequence[Trace], out_dir: str | Path, config: AnnotateConfig, *,
             client: ChatClient | None = None, base_url: str | None = None, api_key: str | None = None,
             cache_dir: str | Path | None = None, overwrite: bool = False,
             progress: Callable[[int], None] | None = None,
             sleep: Callable[[float], None] = time.sleep) -> AnnotationReport:
    """Annotate ``traces`` (questions with gold answers) into ``out_dir``.

    Writes ``traces.jsonl`` (one ``Trace.to_dict()`` per finished item, appended as it finishes),
    ``rejected.jsonl`` (this run's rejections with reasons), ``report.json`` and ``annotate_config.json``.
    A re-run with the same settings skips finished ids (after dropping a line torn by a kill); rejected
    items are tried again (their replies come from the cache unless the settings give them new attempts).

    Args:
        traces: items with unique ids and gold answers (their existing steps are ignored).
        out_dir: output directory.
        config (AnnotateConfig).
        client: a ``ChatClient``; default ``memreason.llm.OpenAIChat`` on ``base_url`` / ``api_key`` (or
            the environment), created before anything is written.
        cache_dir: reply cache (default ``<out_dir>/cache``).
        overwrite (bool): discard earlier output in ``out_dir`` (the cache is kept).
        progress: called with the number of items just finished (the CLI's progress bar).
        sleep: the backoff wait.

    Returns:
        AnnotationReport (also written to ``report.json``).

    Raises:
        DataError: duplicate ids, or an item without a gold answer the task accepts.
        ConfigError: no API key and no base URL; ``out_dir`` holds output made with other settings; wrong
            key or unknown model.
    """
    start = time.perf_counter()
    _check_items(traces, get_task(config.task))
    if client is None:
        client = OpenAIChat(*resolve_endpoint(base_url, api_key), timeout=config.timeout)
    out = OutputDir(out_dir, config.output_settings(), overwrite=overwrite, config_name=CONFIG_FILE,
                    digest_key="digest", outputs=(TRACES_FILE,))
    traces_path, rejected_path = out.file(TRACES_FILE), out.file(REJECTED_FILE)
    atomic_write(rejected_path, "")  # this run's rejections only: earlier ones are retried below
    done = {row.get("meta", {}).get("id") for row in out.resume_rows(TRACES_FILE) if isinstance(row, dict)}
    traces_path.touch()
    cache = ResponseCache(cache_dir if cache_dir is not None else out.path / "cache")
    annotator = Annotator(config, client, cache, sleep=sleep)

    todo = [t for t in traces if t.id not in done]
    report = AnnotationReport(total=len(traces), skipped=len(traces) - len(todo), settings=config.output_settings(),
                              endpoint=getattr(client, "endpoint", None))
    if report.skipped:
        logger.info("resuming: %d of %d items already annotated", report.skipped, len(traces))
        if progress:
            progress(report.skipped)
    _run_items(annotator, todo, config.concurrency, lambda item: _record(item, traces_path, rejected_path, report,
                                                                         progress))
    wanted = {t.id for t in traces}
    annotations = [row["meta"]["annotation"] for row in read_jsonl(traces_path)
                   if isinstance(row, dict) and row.get("meta", {}).get("id") in wanted]
    statuses = Counter(a["status"] for a in annotations)
    report.accepted, report.repaired = statuses["accepted"], statuses["repaired"]
    report.repairs = Counter(repair for a in annotations for repair in a["repairs"])
    report.requests, report.cache_hits = annotator.requests, cache.hits
    report.backoff_waits, report.response_format_fallback = len(annotator.waits), annotator.format_fallback
    report.seconds = time.perf_counter() - start
    write_json(out.file(REPORT_FILE), report.to_dict())
    return report


def _run_items(annotator: Annotator, todo: Sequence[Trace], concurrency: int,
               record: Callable[[ItemResult], None]) -> None:
    """Annotate ``todo`` on ``concurrency`` threads, recording each item as it finishes (in the caller's
    thread, so rows are appended one at a time)."""
    # Bounded in flight (2 x concurrency), so an interrupt leaves little queued work and memory stays flat.
    pending: set = set()
    with ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="annotate") as pool:
        try:
            for trace in todo:
                pending.add(pool.submit(annotator.annotate, trace))
                if len(pending) >= 2 * concurrency:
                    finished, pending = wait(pending, return_when=FIRST_COMPLETED)
                    for future in finished:
                        record(future.result())  # re-raises ConfigError: the run stops
            while pending:
                finished, pending = wait(pending, return_when=FIRST_COMPLETED)
                for future in finished:
                    record(future.result())
        except BaseException:
            for future in pending:
                future.cancel()
            raise


def _record(item: ItemResult, traces_path: Path, rejected_path: Path, report: AnnotationReport,
            progress: Callable[[int], None] | None) -> None:
    if item.trace is not None:
        append_jsonl(traces_path, [item.trace.to_dict()])
        report.written += 1
    else:
        report.rejected += 1
        report.rejections[item.category] += 1
        row = {"id": item.id, "category": item.category, "reason": item.reason}
        if item.cause is not None:
            row["cause"] = item.cause
            report.failures[item.cause] += 1
        report.rejected_items.append(row)
        append_jsonl(rejected_path, [row])
        logger.debug("rejected %s: %s", item.id, item.reason)
    if progress:
        progress(1)


def run_job(job: AnnotateJob, *, api_key: str | None = None, progress: Callable[[int], None] | None = None,
            on_start: Callable[[Any, int], None] | None = None,
            sleep: Callable[[float], None] = time.sleep) -> AnnotationReport:
    """Load ``job.data`` and annotate it into ``job.out`` (what ``memreason annotate`` runs).

    The endpoint is checked first (no API key and no base URL fails before anything is loaded or sent).

    Args:
        job (AnnotateJob); api_key (str | None): else from the environment.
        progress: as in ``annotate``; on_start: called with the dataset's ``LoadReport`` and the number
            of items about to be annotated.

    Raises:
        ConfigError, DataError: as ``annotate`` and ``memreason.data.load_traces``; no items to annotate.
    """
    from memreason.data import load_traces

    client = OpenAIChat(*resolve_endpoint(job.base_url, api_key), timeout=job.timeout)
    traces, load_report = load_traces(job.data, task=job.task, split=job.split, on_unknown_tag=job.on_unknown_tag,
                                      skip_invalid=job.skip_invalid)
    if job.limit is not None:
        traces = traces[:job.limit]
    if not traces:
        raise ConfigError(f"no items in {job.data}" + (f" (split {job.split})" if job.split else ""))
    if on_start:
        on_start(load_report, len(traces))
    return annotate(traces, job.out, job, client=client, cache_dir=job.cache_dir, overwrite=job.overwrite,
                    progress=progress, sleep=sleep)


__all__ = ["AnnotateConfig", "AnnotateJob", "AnnotationReport", "Annotator", "ItemResult", "annotate", "run_job"]
