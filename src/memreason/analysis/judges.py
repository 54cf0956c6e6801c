"""Judging generated traces: where a wrong answer first goes wrong (a memory step or a reasoning step),
and whether steps labelled memory state facts and steps labelled reason derive something.

Every judge offers one interface (``Judge``: ``attribute_error(row)`` and ``check_decoupling(row)`` take a
``memreason.traces.Result`` and return a verdict, or raise ``NotApplicable``). This module holds that
interface, the verdicts, the LLM judge, the runner and the summaries; the exact judge (a table of true
facts) is ``memreason.analysis.exact_judge`` and the synthetic world's judge ``memreason.analysis.world_judge``.

``LLMJudge`` asks any OpenAI-compatible chat model (prompts below, in our own words). It is shown the
question, the gold and the predicted answer and the numbered steps **without their labels**, and says for
every step whether it recalls knowledge or draws an inference and whether it is correct (an inference
built on an earlier false fact is still correct if it follows). The first incorrect step is the first
faulty step; its source is the step's label (memory/reason) when the trace has labels, else the judge's
own type; with no incorrect step the final answer line is at fault (a **reasoning** error,
``first_faulty = None``, ``at = "answer"``). Decoupling: the judge says whether each step is a ``fact``
(states knowledge, true or false), an ``inference`` or ``other``; memory→fact and reason→inference are
decoupled. Requests carry a seed (attempt k uses seed + k), are cached on disk keyed by
sha256(messages + model + seed + parameters) (``memreason.llm``), retried with backoff on transport errors
and re-asked (with the reason) when a reply fails validation.

Rows with no steps are not judged (nothing to attribute). ``judge_rows`` writes one verdict per row to a
JSONL file as it goes and skips rows already there (resumable; ``memreason.io``); ``summarise_errors``,
``summarise_decoupling`` and ``agreement`` turn verdict rows into tables with Wilson CIs, percent
agreement and Cohen's kappa. API keys go to the client only, never into a file or a log line.
"""

from __future__ import annotations

import logging
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Protocol, Sequence

from memreason.errors import ConfigError, DataError
from memreason.io import (append_jsonl, atomic_write, drop_torn_tail, read_json, read_jsonl, settings_digest, to_json,
                          write_json)
from memreason.stats import wilson_ci
from memreason.traces import KINDS, MEMORY, REASON, UNLABELLED, Result, Step

logger = logging.getLogger(__name__)

# Bump when a prompt or a reply schema changes: it is part of every verdict's judge_config digest.
PROMPT_VERSION = 1

OK, NOT_APPLICABLE, FAILED = "ok", "not_applicable", "failed"
ERRORS, DECOUPLING = "errors", "decoupling"
FORMS = ("fact", "inference", "other")


class NotApplicable(Exception):
    """This judge cannot judge this row (no steps, unlabelled steps, no facts for the question...)."""


class JudgeFailed(Exception):
    """The judge tried and gave up on this row (invalid replies after every attempt, a refused request)."""


# ---------------------------------------------------------------- verdicts

@dataclass(frozen=True)
class ErrorVerdict:
    """Where a wrong answer first went wrong.

    Args:
        source (str): ``memory`` or ``reason``.
        first_faulty (int | None): 0-based index of the first faulty step in ``row.steps``; None when no
            step was found faulty (LLM judge: the conclusion is at fault; exact judge: a reasoning error
            it cannot locate).
        step_correct (tuple[bool | None, ...]): per step; None where the judge did not check the step.
        step_types (tuple[str | None, ...]): the judge's own memory/reason type per step (None: not judged).
        explanation (str): the judge's reason, in a sentence.
        evidence (tuple): per step, the matched fact id and overlap score (exact judge).
    """

    source: str
    first_faulty: int | None
    step_correct: tuple = ()
    step_types: tuple = ()
    explanation: str = ""
    evidence: tuple = ()

    def to_dict(self) -> dict:
        return {"source": self.source, "first_faulty": self.first_faulty,
                "at": "step" if self.first_faulty is not None else "answer",
                "step_correct": list(self.step_correct), "step_types": list(self.step_types),
                "explanation": self.explanation, "evidence": [list(e) if e else None for e in self.evidence]}


@dataclass(frozen=True)
class DecouplingVerdict:
    """Whether each step does what its label says.

    Args:
        forms (tuple[str | None, ...]): per step ``fact`` / ``inference`` / ``other`` (None: not judged).
        decoupled (tuple[bool | None, ...]): per step: memory→fact, reason→inference; None for unlabelled
            or unjudged steps.
        evidence (tuple): per step, the matched fact id and overlap score (exact judge).
    """

    forms: tuple
    decoupled: tuple
    evidence: tuple = ()

    def to_dict(self) -> dict:
        return {"forms": list(self.forms), "decoupled": list(self.decoupled),
                "evidence": [list(e) if e else None for e in self.evidence]}


class Judge(Protocol):
    """What every judge offers. ``name`` names its output files; ``describe()`` is everything that decides
    its verdicts (hashed into each verdict row, so a resumed run never mixes two configurations)."""

    name: str

    def describe(self) -> dict: ...

    def attribute_error(self, row: Result) -> ErrorVerdict: ...

    def check_decoupling(self, row: Result) -> DecouplingVerdict: ...


def judged_steps(row: Result) -> tuple[Step, ...]:
    """The steps a judge looks at.

    Raises:
        NotApplicable: the row has no steps (nothing to attribute).
    """
    if not row.steps:
        raise NotApplicable("no steps")
    return row.steps


# ---------------------------------------------------------------- the LLM judge (prompts in our own words)

JUDGE_SYSTEM = "You check worked solutions one step at a time, carefully and fairly. You reply with JSON only."

ERROR_PROMPT = """\
A model answered the question below by writing numbered steps and then a final answer. Its final answer \
is wrong. Check every step in order.

For each step decide two things.
- "type": "memory" if the step recalls knowledge (a fact, a definition, a date, a property of something), \
"reason" if it draws an inference from the question or from earlier steps (a comparison, a calculation, a \
deduction, a conclusion).
- "correct": for a memory step, whether the recalled knowledge is true; for a reason step, whether it \
follows from the question and the steps before it. A step that reasons validly from an earlier false fact \
is still correct: only the first mistake matters.

Question: {question}
Correct answer: {gold}
Model's answer: {predicted}

Steps:
{steps}

Reply with one JSON object and nothing else, with one entry per step in order:
{{"steps": [{{"step": 1, "type": "memory", "correct": true}}], "explanation": "one sentence on the first \
mistake"}}"""

DECOUPLING_PROMPT = """\
Below are the steps a model wrote while answering a question. Classify what each step does.
- "fact": it states a piece of knowledge (a definition, a date, a property of something, a general \
truth) without deriving it from the question or from earlier steps. A false statement of knowledge is \
still a "fact": judge what the step does, not whether it is true.
- "inference": it derives something from the question or from earlier steps (a comparison, a \
calculation, a deduction, a conclusion).
- "other": neither (it restates the question, or says nothing).

Question: {question}

Steps:
{steps}

Reply with one JSON object and nothing else, with one entry per step in order:
{{"steps": [{{"step": 1, "form": "fact"}}]}}"""

RETRY_PROMPT = "That reply could not be used: {reason}. Reply again with only the JSON object, as asked above."

_TYPE_WORDS = {"memory": MEMORY, "knowledge": MEMORY, "fact": MEMORY, "recall": MEMORY, "reason": REASON,
               "reasoning": REASON, "inference": REASON}


def _numbered(steps: Sequence[Step]) -> str:
    return "\n".join(f"{i}. {' '.join(step.text.split())}" for i, step in enumerate(steps, 1))


def error_messages(row: Result) -> list[dict]:
    """The chat messages that ask for an error attribution of one row."""
    predicted = row.predicted
    prompt = ERROR_PROMPT.format(question=row.question, gold=row.gold,
                                 predicted=predicted if predicted is not None else "(no readable answer)",
                                 steps=_numbered(judged_steps(row)))
    return [{"role": "system", "content": JUDGE_SYSTEM}, {"role": "user", "content": prompt}]


def decoupling_messages(row: Result) -> list[dict]:
    """The chat messages that ask what each step of one row does."""
    prompt = DECOUPLING_PROMPT.format(question=row.question, steps=_numbered(judged_steps(row)))
    return [{"role": "system", "content": JUDGE_SYSTEM}, {"role": "user", "content": prompt}]


class InvalidJudgement(Exception):
    """A reply that fails validation; the message says why (and is sent back to the model)."""


def _reply_steps(raw: str, n: int) -> tuple[list[dict], dict]:
    from memreason.llm import InvalidReply, parse_json_reply

    try:
        value = parse_json_reply(raw, [])
    except InvalidReply as exc:
        raise InvalidJudgement(str(exc)) from None
    if not isinstance(value, dict) or not isinstance(value.get("steps"), list):
        raise InvalidJudgement('the reply must be an object with a "steps" list')
    steps = value["steps"]
    if len(steps) != n:
        raise InvalidJudgement(f"there are {n} steps but the reply has {len(steps)} entries")
    if not all(isinstance(s, dict) for s in steps):
        raise InvalidJudgement("every entry of steps must be an object")
    return steps, value


def parse_error_reply(raw: str, row: Result) -> ErrorVerdict:
    """Validate an error-attribution reply and turn it into a verdict.

    Raises:
        InvalidJudgement: not JSON, wrong number of steps, unknown type, non-boolean ``correct``.
    """
    steps = judged_steps(row)
    entries, value = _reply_steps(raw, len(steps))
    types, correct = [], []
    for i, entry in enumerate(entries, 1):
        kind = _TYPE_WORDS.get(str(entry.get("type", "")).strip().lower())
        if kind is None:
            raise InvalidJudgement(f'step {i}: "type" must be "memory" or "reason", got {entry.get("type")!r}')
        if not isinstance(entry.get("correct"), bool):
            raise InvalidJudgement(f'step {i}: "correct" must be true or false, got {entry.get("correct")!r}')
        types.append(kind)
        correct.append(entry["correct"])
    first = next((i for i, ok in enumerate(correct) if not ok), None)
    if first is None:
        source = REASON  # every step holds, yet the answer is wrong: the conclusion does not follow
    else:
        label = steps[first].kind
        source = label if label in KINDS else types[first]
    explanation = value.get("explanation")
    return ErrorVerdict(source, first, tuple(correct), tuple(types),
                        explanation if isinstance(explanation, str) else "")


def parse_decoupling_reply(raw: str, row: Result) -> DecouplingVerdict:
    """Validate a decoupling reply and turn it into a verdict.

    Raises:
        InvalidJudgement: not JSON, wrong number of steps, unknown form.
    """
    steps = judged_steps(row)
    entries, _ = _reply_steps(raw, len(steps))
    forms = []
    for i, entry in enumerate(entries, 1):
        form = str(entry.get("form", "")).strip().lower()
        if form not in FORMS:
            raise InvalidJudgement(f'step {i}: "form" must be one of {", ".join(FORMS)}, got {entry.get("form")!r}')
        forms.append(form)
    decoupled = tuple(None if step.kind not in KINDS else
                      (form == "fact" if step.kind == MEMORY else form == "inference")
                      for step, form in zip(steps, forms))
    return DecouplingVerdict(tuple(forms), decoupled)


class LLMJudge:
    """A judge behind any OpenAI-compatible chat endpoint.

    Args:
        client: a ``memreason.llm.ChatClient`` (``memreason.llm.OpenAIChat(base_url, api_key)``, or a fake).
        model (str): the model name the endpoint knows.
        seed (int, default 0): attempt k of a request uses ``seed + k``.
        temperature (float, default 0.0); max_tokens (int, default 1024).
        attempts (int, default 3): tries per row when a reply fails validation.
        retries (int, default 4): extra tries per request after a transport failure; backoff (float,
            default 1.0) seconds before the first, doubling up to ``max_backoff`` (default 30), each wait
            shortened by a random share of up to ``jitter`` (default 0.5): ``memreason.llm.RetryPolicy``.
        cache (memreason.llm.ResponseCache | None): replies on disk (a re-run costs no requests).
        sleep (callable, default time.sleep): the backoff wait (tests pass a recorder).
        name (str, default "llm"): names the output files.

    Raises:
        ConfigError: no model name, or a count out of range.
    """

    def __init__(self, client, model: str, *, seed: int = 0, temperature: float = 0.0, max_tokens: int = 1024,
                 attempts: int = 3, retries: int = 4, backoff: float = 1.0, max_backoff: float = 30.0,
                 jitter: float = 0.5, cache=None, sleep: Callable[[float], None] = time.sleep, name: str = "llm"):
        from memreason.llm import CachedChat, RetryPolicy

        if not model:
            raise ConfigError("name the judge model (--model)")
        if attempts < 1 or retries < 0 or max_tokens < 1:
            raise ConfigError("attempts and max_tokens must be >= 1 and retries >= 0")
        self.client, self.model, self.seed, self.temperature = client, model, seed, temperature
        self.max_tokens, self.attempts, self.retries = max_tokens, attempts, retries
        self.backoff, self.max_backoff, self.cache, self.sleep, self.name = backoff, max_backoff, cache, sleep, name
        retry = RetryPolicy(retries=retries, backoff=backoff, max_backoff=max_backoff, jitter=jitter)
        self.chat = CachedChat(client, model, temperature=temperature, max_tokens=max_tokens, retry=retry, cache=cache,
                               sleep=sleep)

    @property
    def requests(self) -> int:
        """Requests sent to the endpoint (cache hits excluded)."""
        return self.chat.requests

    def describe(self) -> dict:
        return {"judge": "llm", "model": self.model, "seed": self.seed, "temperature": self.temperature,
                "max_tokens": self.max_tokens, "attempts": self.attempts, "prompt_version": PROMPT_VERSION}

    def ask(self, messages: list[dict], seed: int) -> str:
        """The reply to ``messages`` (from the cache when this exact request was made before).

        Raises:
            JudgeFailed: the server refused the request or kept failing after the retries.
            ConfigError: wrong key or unknown model (nothing else would work either).
        """
        from memreason.llm import RequestRefused, RetriesExhausted

        try:
            return self.chat.complete(messages, seed=seed)
        except RetriesExhausted as exc:
            raise JudgeFailed(str(exc)) from None
        except RequestRefused as exc:
            raise JudgeFailed(f"request refused: {exc}") from None

    def _judge(self, messages: list[dict], parse: Callable[[str], Any]):
        history = messages
        reason = ""
        for attempt in range(self.attempts):
            raw = self.ask(history, self.seed + attempt)
            try:
                return parse(raw)
            except InvalidJudgement as exc:
                reason = str(exc)
                history = messages + [{"role": "assistant", "content": raw[:4000]},
                                      {"role": "user", "content": RETRY_PROMPT.format(reason=reason)}]
        raise JudgeFailed(f"no valid reply after {self.attempts} attempts (last: {reason})")

    def attribute_error(self, row: dict) -> ErrorVerdict:
        return self._judge(error_messages(row), lambda raw: parse_error_reply(raw, row))

    def check_decoupling(self, row: dict) -> DecouplingVerdict:
        return self._judge(decoupling_messages(row), lambda raw: parse_decoupling_reply(raw, row))


# ---------------------------------------------------------------- running a judge over result rows

def select_rows(rows: Sequence[Result], check: str, *, include_unparseable: bool = False) -> list[Result]:
    """The rows a check looks at: wrong answers (and unparseable ones on request) for ``errors``, every
    row for ``decoupling``."""
    if check == DECOUPLING:
        return list(rows)
    if check != ERRORS:
        raise ConfigError(f"unknown check {check!r}; choose {ERRORS} or {DECOUPLING}")
    wanted = {"wrong", "unparseable"} if include_unparseable else {"wrong"}
    return [row for row in rows if row.outcome in wanted]


def verdict_row(row: Result, judge: Judge, check: str, digest: str | None = None) -> dict:
    """Judge one row; never raises for a row the judge cannot or will not judge (``status`` says so)."""
    record = {"id": row.id, "judge": judge.name, "judge_config": digest or settings_digest(judge.describe()),
              "outcome": row.outcome, "kinds": [s.kind for s in row.steps]}
    try:
        verdict = judge.attribute_error(row) if check == ERRORS else judge.check_decoupling(row)
    except NotApplicable as exc:
        return {**record, "status": NOT_APPLICABLE, "reason": str(exc)}
    except JudgeFailed as exc:
        return {**record, "status": FAILED, "reason": str(exc)}
    return {**record, "status": OK, **verdict.to_dict()}


def judge_rows(rows: Sequence[Result], judge: Judge, check: str, out_path: str | Path, *, concurrency: int = 1,
               overwrite: bool = False, progress: Callable[[int], None] | None = None) -> list[dict]:
    """Judge ``rows`` and append one verdict per row to ``out_path`` (JSONL) as each finishes.

    Rows whose id is already in the file are skipped (a re-run resumes; failed rows are retried).

    Args:
        rows: result rows (already selected, see ``select_rows``); ids must be unique.
        judge (Judge); check (str): ``errors`` or ``decoupling``.
        out_path: the verdict file; concurrency (int, default 1): rows judged at once (threads).
        overwrite (bool, default False): discard the verdicts already there.
        progress: called with the number of rows finished.

    Returns:
        list[dict]: one verdict row per input row, in input order.

    Raises:
        ConfigError: the file holds verdicts of another judge configuration (pass ``overwrite``), a bad
            check or concurrency; or the judge's endpoint refuses the key or the model.
        DataError: duplicate row ids, or ``out_path`` holds something other than verdicts.
    """
    if check not in (ERRORS, DECOUPLING):
        raise ConfigError(f"unknown check {check!r}; choose {ERRORS} or {DECOUPLING}")
    if concurrency < 1:
        raise ConfigError(f"concurrency must be >= 1, got {concurrency}")
    ids = [row.id for row in rows]
    if len(set(ids)) != len(ids):
        raise DataError("duplicate ids in the result rows; verdicts are keyed by id")
    out_path = Path(out_path)
    digest = settings_digest(judge.describe())
    if overwrite:
        out_path.unlink(missing_ok=True)
    # the verdict file is this function's own output: repair an interrupted append before resuming it
    drop_torn_tail(out_path)
    previous = read_verdicts(out_path) if out_path.exists() else []
    foreign = {r.get("judge_config") for r in previous} - {digest}
    if foreign:
        raise ConfigError(f"{out_path} holds verdicts from another {judge.name} judge configuration; "
                          "pass --overwrite or choose another --out")
    done = {r["id"]: r for r in previous if r.get("status") != FAILED}
    if any(r.get("status") == FAILED for r in previous):  # failed rows are judged again: drop their verdicts
        atomic_write(out_path, "".join(to_json(r) + "\n" for r in previous if r.get("status") != FAILED))
    todo = [row for row in rows if row.id not in done]
    if done and progress:
        progress(len(rows) - len(todo))
    results = dict(done)
    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        futures = [pool.submit(verdict_row, row, judge, check, digest) for row in todo]
        try:
            for future in as_completed(futures):
                record = future.result()
                append_jsonl(out_path, [record])
                results[record["id"]] = record
                if progress:
                    progress(1)
        except BaseException:
            for future in futures:
                future.cancel()
            raise
    return [results[i] for i in ids]


# ---------------------------------------------------------------- summaries

def _share(count: int, n: int) -> dict:
    low, high = wilson_ci(count, n) if n else (None, None)
    return {"count": count, "share": count / n if n else None, "ci95": [low, high]}


def _status_counts(verdicts: Sequence[dict]) -> dict:
    return {status: sum(v.get("status") == status for v in verdicts) for status in (OK, NOT_APPLICABLE, FAILED)}


def summarise_errors(verdicts: Sequence[dict]) -> dict:
    """Share of memory vs reasoning errors among the judged rows, with 95% Wilson CIs.

    Returns:
        dict: ``n`` (judged), ``memory`` / ``reason`` (count, share, ci95), ``at_answer`` (no faulty step
        found), and ``status`` counts (ok / not_applicable / failed).
    """
    ok = [v for v in verdicts if v.get("status") == OK]
    n = len(ok)
    return {"n": n, "memory": _share(sum(v["source"] == MEMORY for v in ok), n),
            "reason": _share(sum(v["source"] == REASON for v in ok), n),
            "at_answer": sum(v.get("first_faulty") is None for v in ok), "status": _status_counts(verdicts)}


def summarise_decoupling(verdicts: Sequence[dict]) -> dict:
    """Share of memory steps that state a fact and of reason steps that derive something (95% Wilson CIs),
    plus what the judge called the steps of each label (``forms``), unlabelled steps included."""
    ok = [v for v in verdicts if v.get("status") == OK]
    out: dict[str, Any] = {"n_rows": len(ok), "status": _status_counts(verdicts), "forms": {}}
    for label in (MEMORY, REASON):
        flags = [d for v in ok for k, d in zip(v["kinds"], v["decoupled"]) if k == label and d is not None]
        out[label] = {"n_steps": len(flags), **_share(sum(flags), len(flags))}
    for label in (MEMORY, REASON, UNLABELLED):
        forms = [f for v in ok for k, f in zip(v["kinds"], v["forms"]) if k == label and f is not None]
        if forms:
            out["forms"][label] = {form: forms.count(form) for form in sorted(set(forms))}
    out["unlabelled_steps"] = sum(k == UNLABELLED for v in ok for k in v["kinds"])
    return out


def cohen_kappa(first: Sequence[str], second: Sequence[str]) -> float | None:
    """Cohen's kappa of two raters' labels on the same items; None when undefined (no items, or both
    raters used one and the same label throughout, so chance agreement is 1)."""
    if len(first) != len(second):
        raise ValueError(f"rater label lists differ in length: {len(first)} vs {len(second)}")
    n = len(first)
    if n == 0:
        return None
    observed = sum(a == b for a, b in zip(first, second)) / n
    labels = set(first) | set(second)
    expected = sum((list(first).count(label) / n) * (list(second).count(label) / n) for label in labels)
    if expected >= 1.0:
        return None
    return (observed - expected) / (1.0 - expected)


def agreement(first: Sequence[dict], second: Sequence[dict]) -> dict:
    """Agreement of two judges' error sources on the rows both judged: n, percent agreement (with a
    Wilson CI), Cohen's kappa and the confusion counts ``{first_source: {second_source: count}}``."""
    a = {v["id"]: v["source"] for v in first if v.get("status") == OK}
    b = {v["id"]: v["source"] for v in second if v.get("status") == OK}
    both = [i for i in a if i in b]
    x, y = [a[i] for i in both], [b[i] for i in both]
    confusion = {s: {t: sum(p == s and q == t for p, q in zip(x, y)) for t in KINDS} for s in KINDS}
    agree = sum(p == q for p, q in zip(x, y))
    return {"n": len(both), "agreement": _share(agree, len(both)), "kappa": cohen_kappa(x, y), "confusion": confusion}


def read_verdicts(path: str | Path) -> list[dict]:
    """The verdict rows of a ``<check>_<judge>.jsonl`` file (``memreason.io.read_jsonl``: never writes).

    Raises:
        DataError: missing, not JSON lines, or a row that is not a verdict (naming the file and row).
    """
    rows = read_jsonl(path, what="verdict file")
    for number, row in enumerate(rows, start=1):
        if not isinstance(row, dict) or "status" not in row:
            raise DataError(f"row {number} is not a judge verdict (expected an object with a status)",
                            file=str(path))
    return rows


def write_summary(out_dir: str | Path, check: str, described: dict[str, dict] | None = None) -> dict:
    """Summarise every ``<check>_<judge>.jsonl`` verdict file in ``out_dir`` (judges run earlier
    included) into ``<check>_summary.json``, with the agreement of every pair of judges for ``errors``.

    Args:
        out_dir: the inspect directory; check (str): ``errors`` or ``decoupling``.
        described (dict | None): ``judge.describe()`` of the judges just run, by name; judges run before
            keep the description the previous summary recorded.

    Returns:
        dict: what was written (``check``, ``judges`` {name: config, file, summary}, ``agreement``).
    """
    from itertools import combinations

    out = Path(out_dir)
    path = out / f"{check}_summary.json"
    previous = read_json(path, what="judge summary").get("judges", {}) if path.is_file() else {}
    verdicts = {file.stem[len(check) + 1:]: read_verdicts(file) for file in sorted(out.glob(f"{check}_*.jsonl"))}
    summarise = summarise_errors if check == ERRORS else summarise_decoupling
    judges = {}
    for name, items in verdicts.items():
        config = (described or {}).get(name) or (previous.get(name) or {}).get("config")
        judges[name] = {"config": config, "file": f"{check}_{name}.jsonl", "summary": summarise(items)}
    summary: dict[str, Any] = {"check": check, "judges": judges, "agreement": {}}
    if check == ERRORS:
        for a, b in combinations(sorted(verdicts), 2):
            summary["agreement"][f"{a} vs {b}"] = agreement(verdicts[a], verdicts[b])
    write_json(path, summary)
    return summary
