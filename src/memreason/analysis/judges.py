"""Judging generated traces: where a wrong answer first goes wrong (a memory step or a reasoning step),
and whether steps labelled memory state facts and steps labelled reason derive something.

Two judges behind one interface (``Judge``: ``attribute_error(row)`` and ``check_decoupling(row)`` take a
``results.jsonl`` row and return a verdict, or raise ``NotApplicable``):

* ``ExactJudge`` checks memory steps against a ``FactTable`` of true facts (a JSON file, or the gold
  memory steps of an annotated dataset). A memory step is **true** when its normalised text equals a
  fact's text or alias, or when at least ``threshold`` (default 0.8) of its content tokens occur in one
  fact or alias (``overlap = |step ∩ fact| / |step|`` over sets of lower-cased word tokens, digits kept,
  thousands separators dropped, a short list of function words removed), provided every number in the
  step occurs in that wording and both carry the same negation words ("not", "no", "never"...); a wrong
  year or a dropped "not" never matches. No stemming, no entailment: "lies" and "lie" differ. The table
  is a *closed world*: a memory step matching none of the question's facts counts as false. Error
  attribution: the first false memory step makes a **memory** error; if every memory step is true the
  error is a **reasoning** error (by elimination: this judge cannot check inferences, so it reports
  ``first_faulty`` only for memory errors, and a memory error even when an earlier reason step was
  already faulty).
  Decoupling: a memory step is decoupled when it matches a fact; a reason step when it matches none (a
  reason step that restates a table fact only recalls). It applies only to rows whose steps are all
  labelled memory/reason and whose question has facts in the table.
* ``LLMJudge`` asks any OpenAI-compatible chat model (prompts below, in our own words). It is shown the
  question, the gold and the predicted answer and the numbered steps **without their labels**, and says for
  every step whether it recalls knowledge or draws an inference and whether it is correct (an inference
  built on an earlier false fact is still correct if it follows). The first incorrect step is the first
  faulty step; its source is the step's label (memory/reason) when the trace has labels, else the judge's
  own type; with no incorrect step the final answer line is at fault (a **reasoning** error,
  ``first_faulty = None``, ``at = "answer"``). Decoupling: the judge says whether each step is a ``fact``
  (states knowledge, true or false), an ``inference`` or ``other``; memory→fact and reason→inference are
  decoupled. Requests carry a seed (attempt k uses seed + k), are cached on disk keyed by
  sha256(messages + model + seed + parameters) (``memreason.data.annotate.ResponseCache``), retried with
  backoff on transport errors and re-asked (with the reason) when a reply fails validation.

Rows with no steps are not judged (nothing to attribute). ``judge_rows`` writes one verdict per row to a
JSONL file as it goes and skips rows already there (resumable); ``summarise_errors``,
``summarise_decoupling`` and ``agreement`` turn verdict rows into tables with Wilson CIs, percent
agreement and Cohen's kappa. API keys go to the client only, never into a file or a log line.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import threading
import time
import unicodedata
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Protocol, Sequence

from memreason.errors import ConfigError, DataError
from memreason.stats import wilson_ci
from memreason.traces import KINDS, MEMORY, REASON, UNLABELLED

logger = logging.getLogger(__name__)

# Bump when a prompt or a reply schema changes: it is part of every verdict's judge_config digest.
PROMPT_VERSION = 1
FACTS_FORMAT = "memreason-facts/1"

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
        first_faulty (int | None): 0-based index of the first faulty step in ``row["steps"]``; None when no
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

    def attribute_error(self, row: dict) -> ErrorVerdict: ...

    def check_decoupling(self, row: dict) -> DecouplingVerdict: ...


def _steps(row: dict) -> list[dict]:
    steps = row.get("steps") or []
    if not steps:
        raise NotApplicable("no steps")
    return steps


# ---------------------------------------------------------------- fact tables and the exact judge

_STOPWORDS = frozenset(
    "a an the is are was were be been being am of in on at to for by with and or as that this these those it "
    "its from has have had do does did which who whom whose".split())


_NEGATIONS = frozenset("not no never nor neither none nothing".split())


def normalise_text(text: str) -> str:
    """Lower case, accents and punctuation removed, thousands separators dropped, "n't" and "cannot"
    spelt out as "not", whitespace collapsed."""
    text = unicodedata.normalize("NFKD", text)
    text = "".join(c for c in text if not unicodedata.combining(c)).lower().replace("\u2019", "'")
    text = re.sub(r"(?<=\d),(?=\d)", "", text)
    text = re.sub(r"n't\b", " not", text).replace("cannot", "can not")
    return " ".join(re.sub(r"[^\w\s]|_", " ", text).split())


def content_tokens(text: str) -> frozenset[str]:
    """The set of normalised word tokens of ``text`` minus function words (negations are kept)."""
    return frozenset(t for t in normalise_text(text).split() if t not in _STOPWORDS)


def token_overlap(step: str, fact: str) -> float:
    """Share of the step's content tokens found in the fact (0 when the step has none)."""
    s = content_tokens(step)
    return len(s & content_tokens(fact)) / len(s) if s else 0.0


def compatible(step: str, fact: str) -> bool:
    """Whether a step can restate a fact at all: every number in the step occurs in the fact, and both
    are negated by the same words (so "founded in 1898" never matches "founded in 1918", nor "was not
    founded" "was founded", however many other words they share)."""
    s, f = content_tokens(step), content_tokens(fact)
    numbers = {t for t in s if any(c.isdigit() for c in t)}
    return numbers <= f and (s & _NEGATIONS) == (f & _NEGATIONS)


@dataclass(frozen=True)
class Fact:
    """One true statement. ``aliases`` are other wordings of it."""

    id: str
    text: str
    aliases: tuple[str, ...] = ()


@dataclass
class FactTable:
    """True facts, globally or per question.

    File format (JSON)::

        {"format": "memreason-facts/1",
         "facts": [{"id": "lapaz-altitude", "text": "La Paz lies about 3,600 m above sea level.",
                    "aliases": ["La Paz is at an altitude of about 3,600 metres."]}],
         "questions": {"4045bcd38bc0": ["lapaz-altitude"]}}

    ``aliases`` is optional. ``questions`` is optional: without it every fact applies to every question;
    with it, a question's facts are the listed ones and a question not listed is not judged.

    Args:
        facts (dict[str, Fact]): by id.
        questions (dict[str, tuple[str, ...]] | None): fact ids per question id.
    """

    facts: dict[str, Fact]
    questions: dict[str, tuple[str, ...]] | None = None

    def facts_for(self, question_id: str | None) -> list[Fact] | None:
        """The facts that apply to a question, or None when the table says nothing about it."""
        if self.questions is None:
            return list(self.facts.values()) or None
        ids = self.questions.get(question_id) if question_id is not None else None
        return [self.facts[i] for i in ids] if ids else None

    def match(self, text: str, facts: Sequence[Fact], threshold: float) -> tuple[str | None, float]:
        """The best-matching fact's id (None below ``threshold``) and its score (1.0 for an exact match)."""
        norm = normalise_text(text)
        best_id, best = None, 0.0
        for fact in facts:
            for wording in (fact.text, *fact.aliases):
                if norm and norm == normalise_text(wording):
                    score = 1.0
                else:
                    score = token_overlap(text, wording) if compatible(text, wording) else 0.0
                if score > best:
                    best_id, best = fact.id, score
        return (best_id if best >= threshold else None), best

    @classmethod
    def load(cls, path: str | Path) -> "FactTable":
        """Read a fact table file (format above).

        Raises:
            DataError: unreadable file, wrong format, a fact without id or text, a duplicate id, or a
                question listing an unknown fact.
        """
        path = Path(path)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise DataError("fact table not found", file=str(path)) from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise DataError(f"not a JSON fact table: {exc}", file=str(path)) from None
        if not isinstance(data, dict) or not isinstance(data.get("facts"), list):
            raise DataError('expected an object with a "facts" list', file=str(path), field="facts")
        if data.get("format", FACTS_FORMAT) != FACTS_FORMAT:
            raise DataError(f"unknown format {data.get('format')!r} (expected {FACTS_FORMAT!r})", file=str(path),
                            field="format")
        facts: dict[str, Fact] = {}
        for index, item in enumerate(data["facts"]):
            where = dict(file=str(path), record=index)
            if not isinstance(item, dict):
                raise DataError("a fact must be an object with id and text", **where)
            fid, text, aliases = item.get("id"), item.get("text"), item.get("aliases", [])
            if not isinstance(fid, str) or not fid:
                raise DataError("missing or non-string id", field="id", **where)
            if not isinstance(text, str) or not text.strip():
                raise DataError("missing or empty text", field="text", **where)
            if not isinstance(aliases, list) or not all(isinstance(a, str) for a in aliases):
                raise DataError("aliases must be a list of strings", field="aliases", **where)
            if fid in facts:
                raise DataError(f"duplicate fact id {fid!r}", field="id", **where)
            facts[fid] = Fact(fid, text, tuple(aliases))
        questions = data.get("questions")
        if questions is not None:
            if not isinstance(questions, dict):
                raise DataError("questions must map question ids to lists of fact ids", file=str(path),
                                field="questions")
            for qid, ids in questions.items():
                if not isinstance(ids, list) or any(i not in facts for i in ids):
                    unknown = [i for i in ids if i not in facts] if isinstance(ids, list) else ids
                    raise DataError(f"question {qid!r} lists unknown fact ids {unknown}", file=str(path),
                                    field="questions")
            questions = {qid: tuple(ids) for qid, ids in questions.items()}
        return cls(facts, questions)

    @classmethod
    def from_traces(cls, traces) -> "FactTable":
        """A per-question table from annotated traces: each question's gold memory steps are its facts.

        Raises:
            DataError: a trace without an id (results are matched to gold traces by id).
        """
        facts: dict[str, Fact] = {}
        questions: dict[str, tuple[str, ...]] = {}
        for index, trace in enumerate(traces):
            if not trace.id:
                raise DataError("a gold trace has no id", record=index, field="id")
            ids = []
            for k, step in enumerate(trace.steps):
                if step.kind == MEMORY:
                    fid = f"{trace.id}:{k}"
                    facts[fid] = Fact(fid, step.text)
                    ids.append(fid)
            questions[trace.id] = tuple(ids)
        return cls(facts, questions)

    def to_dict(self) -> dict:
        data: dict[str, Any] = {"format": FACTS_FORMAT, "facts": [
            {"id": f.id, "text": f.text, **({"aliases": list(f.aliases)} if f.aliases else {})}
            for f in self.facts.values()]}
        if self.questions is not None:
            data["questions"] = {q: list(ids) for q, ids in self.questions.items()}
        return data


class ExactJudge:
    """Judges memory steps against a ``FactTable`` (see the module docstring for the rules).

    Args:
        facts (FactTable); threshold (float, default 0.8): the smallest token overlap that matches.
        name (str, default "exact"); source (str): where the facts came from (for the record).

    Raises:
        ConfigError: threshold outside (0, 1].
    """

    def __init__(self, facts: FactTable, *, threshold: float = 0.8, name: str = "exact", source: str = ""):
        if not 0.0 < threshold <= 1.0:
            raise ConfigError(f"the match threshold must be in (0, 1], got {threshold}")
        self.facts, self.threshold, self.name, self.source = facts, threshold, name, source

    def describe(self) -> dict:
        digest = hashlib.sha256(json.dumps(self.facts.to_dict(), sort_keys=True).encode()).hexdigest()[:16]
        return {"judge": "exact", "threshold": self.threshold, "facts": self.source, "facts_digest": digest}

    def _matches(self, row: dict) -> tuple[list[dict], list[tuple[str | None, float]]]:
        steps = _steps(row)
        unlabelled = sum(step.get("kind") not in KINDS for step in steps)
        if unlabelled:
            raise NotApplicable(f"{unlabelled} unlabelled step(s): the exact judge needs memory/reason labels")
        facts = self.facts.facts_for(row.get("id"))
        if not facts:
            raise NotApplicable("no facts for this question in the fact table")
        return steps, [self.facts.match(step.get("text", ""), facts, self.threshold) for step in steps]

    def attribute_error(self, row: dict) -> ErrorVerdict:
        steps, matches = self._matches(row)
        correct = tuple((fid is not None) if step["kind"] == MEMORY else None for step, (fid, _) in zip(steps, matches))
        first = next((i for i, ok in enumerate(correct) if ok is False), None)
        evidence = tuple((fid, round(score, 3)) if step["kind"] == MEMORY else None
                         for step, (fid, score) in zip(steps, matches))
        if first is not None:
            explanation = f"memory step {first + 1} matches no fact (best overlap {matches[first][1]:.2f})"
        else:
            explanation = "every memory step matches a fact, so the error lies in the reasoning"
        return ErrorVerdict(MEMORY if first is not None else REASON, first, correct, (None,) * len(steps),
                            explanation, evidence)

    def check_decoupling(self, row: dict) -> DecouplingVerdict:
        steps, matches = self._matches(row)
        forms = tuple("fact" if fid is not None else None for fid, _ in matches)
        decoupled = tuple((fid is not None) if step["kind"] == MEMORY else (fid is None)
                          for step, (fid, _) in zip(steps, matches))
        evidence = tuple((fid, round(score, 3)) for fid, score in matches)
        return DecouplingVerdict(forms, decoupled, evidence)


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


def _numbered(steps: Sequence[dict]) -> str:
    return "\n".join(f"{i}. {' '.join(str(step.get('text', '')).split())}" for i, step in enumerate(steps, 1))


def error_messages(row: dict) -> list[dict]:
    """The chat messages that ask for an error attribution of one row."""
    predicted = row.get("predicted")
    prompt = ERROR_PROMPT.format(question=row.get("question", ""), gold=row.get("gold"),
                                 predicted=predicted if predicted is not None else "(no readable answer)",
                                 steps=_numbered(_steps(row)))
    return [{"role": "system", "content": JUDGE_SYSTEM}, {"role": "user", "content": prompt}]


def decoupling_messages(row: dict) -> list[dict]:
    """The chat messages that ask what each step of one row does."""
    prompt = DECOUPLING_PROMPT.format(question=row.get("question", ""), steps=_numbered(_steps(row)))
    return [{"role": "system", "content": JUDGE_SYSTEM}, {"role": "user", "content": prompt}]


class InvalidJudgement(Exception):
    """A reply that fails validation; the message says why (and is sent back to the model)."""


def _reply_steps(raw: str, n: int) -> tuple[list[dict], dict]:
    from memreason.data.annotate import InvalidReply, parse_json_reply

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


def parse_error_reply(raw: str, row: dict) -> ErrorVerdict:
    """Validate an error-attribution reply and turn it into a verdict.

    Raises:
        InvalidJudgement: not JSON, wrong number of steps, unknown type, non-boolean ``correct``.
    """
    steps = _steps(row)
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
        label = steps[first].get("kind")
        source = label if label in KINDS else types[first]
    explanation = value.get("explanation")
    return ErrorVerdict(source, first, tuple(correct), tuple(types),
                        explanation if isinstance(explanation, str) else "")


def parse_decoupling_reply(raw: str, row: dict) -> DecouplingVerdict:
    """Validate a decoupling reply and turn it into a verdict.

    Raises:
        InvalidJudgement: not JSON, wrong number of steps, unknown form.
    """
    steps = _steps(row)
    entries, _ = _reply_steps(raw, len(steps))
    forms = []
    for i, entry in enumerate(entries, 1):
        form = str(entry.get("form", "")).strip().lower()
        if form not in FORMS:
            raise InvalidJudgement(f'step {i}: "form" must be one of {", ".join(FORMS)}, got {entry.get("form")!r}')
        forms.append(form)
    decoupled = tuple(None if step.get("kind") not in KINDS else
                      (form == "fact" if step["kind"] == MEMORY else form == "inference")
                      for step, form in zip(steps, forms))
    return DecouplingVerdict(tuple(forms), decoupled)


class LLMJudge:
    """A judge behind any OpenAI-compatible chat endpoint.

    Args:
        client: a ``memreason.data.annotate.ChatClient`` (``OpenAIChat(base_url, api_key)``, or a fake).
        model (str): the model name the endpoint knows.
        seed (int, default 0): attempt k of a request uses ``seed + k``.
        temperature (float, default 0.0); max_tokens (int, default 1024).
        attempts (int, default 3): tries per row when a reply fails validation.
        retries (int, default 4): extra tries per request after a transport failure; backoff (float,
            default 1.0) seconds before the first, doubling up to ``max_backoff`` (default 30).
        cache (ResponseCache | None): replies on disk (a re-run costs no requests).
        sleep (callable, default time.sleep): the backoff wait (tests pass a recorder).
        name (str, default "llm"): names the output files.

    Raises:
        ConfigError: no model name, or a count out of range.
    """

    def __init__(self, client, model: str, *, seed: int = 0, temperature: float = 0.0, max_tokens: int = 1024,
                 attempts: int = 3, retries: int = 4, backoff: float = 1.0, max_backoff: float = 30.0,
                 cache=None, sleep: Callable[[float], None] = time.sleep, name: str = "llm"):
        if not model:
            raise ConfigError("name the judge model (--model)")
        if attempts < 1 or retries < 0 or max_tokens < 1:
            raise ConfigError("attempts and max_tokens must be >= 1 and retries >= 0")
        self.client, self.model, self.seed, self.temperature = client, model, seed, temperature
        self.max_tokens, self.attempts, self.retries = max_tokens, attempts, retries
        self.backoff, self.max_backoff, self.cache, self.sleep, self.name = backoff, max_backoff, cache, sleep, name
        self.requests = 0  # requests sent to the endpoint (cache hits excluded)
        self._lock = threading.Lock()

    def describe(self) -> dict:
        return {"judge": "llm", "model": self.model, "seed": self.seed, "temperature": self.temperature,
                "max_tokens": self.max_tokens, "attempts": self.attempts, "prompt_version": PROMPT_VERSION}

    def ask(self, messages: list[dict], seed: int) -> str:
        """The reply to ``messages`` (from the cache when this exact request was made before).

        Raises:
            JudgeFailed: the server refused the request or kept failing after the retries.
            ConfigError: wrong key or unknown model (nothing else would work either).
        """
        from memreason.data.annotate import RequestRefused, ResponseCache, TransientError

        params = {"temperature": self.temperature, "max_tokens": self.max_tokens}
        key = ResponseCache.key(messages, self.model, seed, params)
        if self.cache is not None:
            cached = self.cache.get(key)
            if cached is not None:
                return cached
        failures = 0
        while True:
            with self._lock:
                self.requests += 1
            try:
                content = self.client.complete(messages, model=self.model, seed=seed, temperature=self.temperature,
                                               max_tokens=self.max_tokens, response_format=None)
                break
            except RequestRefused as exc:
                raise JudgeFailed(f"request refused: {exc}") from None
            except TransientError as exc:
                if failures >= self.retries:
                    raise JudgeFailed(f"still failing after {failures + 1} tries: {exc}") from None
                delay = min(self.max_backoff, self.backoff * 2 ** failures)
                failures += 1
                logger.info("judge request failed (%s); retry %d/%d in %.1f s", exc, failures, self.retries, delay)
                self.sleep(delay)
        if self.cache is not None:
            self.cache.put(key, {"content": content, "model": self.model, "seed": seed, "params": params,
                                 "messages": messages, "created": time.time()})
        return content

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

def _digest(description: dict) -> str:
    return hashlib.sha256(json.dumps(description, sort_keys=True).encode()).hexdigest()[:16]


def select_rows(rows: Sequence[dict], check: str, *, include_unparseable: bool = False) -> list[dict]:
    """The rows a check looks at: wrong answers (and unparseable ones on request) for ``errors``, every
    row for ``decoupling``."""
    if check == DECOUPLING:
        return list(rows)
    if check != ERRORS:
        raise ConfigError(f"unknown check {check!r}; choose {ERRORS} or {DECOUPLING}")
    wanted = {"wrong", "unparseable"} if include_unparseable else {"wrong"}
    return [row for row in rows if row.get("outcome") in wanted]


def verdict_row(row: dict, judge: Judge, check: str, digest: str | None = None) -> dict:
    """Judge one row; never raises for a row the judge cannot or will not judge (``status`` says so)."""
    record = {"id": row.get("id"), "judge": judge.name, "judge_config": digest or _digest(judge.describe()),
              "outcome": row.get("outcome"), "kinds": [s.get("kind") for s in row.get("steps") or []]}
    try:
        verdict = judge.attribute_error(row) if check == ERRORS else judge.check_decoupling(row)
    except NotApplicable as exc:
        return {**record, "status": NOT_APPLICABLE, "reason": str(exc)}
    except JudgeFailed as exc:
        return {**record, "status": FAILED, "reason": str(exc)}
    return {**record, "status": OK, **verdict.to_dict()}


def judge_rows(rows: Sequence[dict], judge: Judge, check: str, out_path: str | Path, *, concurrency: int = 1,
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
        DataError: duplicate row ids.
    """
    from memreason.evaluate import _append_rows, read_results

    if check not in (ERRORS, DECOUPLING):
        raise ConfigError(f"unknown check {check!r}; choose {ERRORS} or {DECOUPLING}")
    if concurrency < 1:
        raise ConfigError(f"concurrency must be >= 1, got {concurrency}")
    ids = [row.get("id") for row in rows]
    if len(set(ids)) != len(ids):
        raise DataError("duplicate ids in the result rows; verdicts are keyed by id")
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    digest = _digest(judge.describe())
    if overwrite:
        out_path.unlink(missing_ok=True)
    previous = read_results(out_path)
    foreign = {r.get("judge_config") for r in previous} - {digest}
    if foreign:
        raise ConfigError(f"{out_path} holds verdicts from another {judge.name} judge configuration; "
                          "pass --overwrite or choose another --out")
    done = {r["id"]: r for r in previous if r.get("status") != FAILED}
    if any(r.get("status") == FAILED for r in previous):
        kept = [r for r in previous if r.get("status") != FAILED]
        tmp = out_path.with_suffix(".tmp")
        tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in kept), encoding="utf-8")
        tmp.replace(out_path)
    todo = [row for row in rows if row.get("id") not in done]
    if done and progress:
        progress(len(rows) - len(todo))
    results = dict(done)
    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        futures = [pool.submit(verdict_row, row, judge, check, digest) for row in todo]
        try:
            for future in as_completed(futures):
                record = future.result()
                _append_rows(out_path, [record])
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
    previous = json.loads(path.read_text(encoding="utf-8")).get("judges", {}) if path.is_file() else {}
    verdicts = {}
    for file in sorted(out.glob(f"{check}_*.jsonl")):
        lines = file.read_text(encoding="utf-8").splitlines()
        verdicts[file.stem[len(check) + 1:]] = [json.loads(line) for line in lines if line.strip()]
    summarise = summarise_errors if check == ERRORS else summarise_decoupling
    judges = {}
    for name, items in verdicts.items():
        config = (described or {}).get(name) or (previous.get(name) or {}).get("config")
        judges[name] = {"config": config, "file": f"{check}_{name}.jsonl", "summary": summarise(items)}
    summary: dict[str, Any] = {"check": check, "judges": judges, "agreement": {}}
    if check == ERRORS:
        for a, b in combinations(sorted(verdicts), 2):
            summary["agreement"][f"{a} vs {b}"] = agreement(verdicts[a], verdicts[b])
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(summary, indent=1), encoding="utf-8")
    tmp.replace(path)
    return summary
