"""Where corrections come from, and which step to correct: one interface for every source of a corrected
memory step, and the locators that pick the step.

A ``CorrectionSource`` has a ``name`` and ``correct(result, step) -> Correction | None``: given a
``memreason.traces.Result`` and the index of the step to fix, it returns the corrected step (text and
kind), or None when it has nothing to offer. ``load_source(spec, **options)`` builds one from a spec:

* ``world:DIR`` — the synthetic world (``DIR`` holds ``world.json``, or is an ablation directory with
  ``world/``). Exact: the step is read with the world's wordings (``analysis.world_judge``); a false recall
  ``relation(subject) = object`` is corrected to the true object, in the world's own wording (paraphrase
  0; a composite recall, "The country of the base of X is Y.", keeps its composite wording). A step that is
  true, not a recall, or about a subject the world does not have gets no correction.
* ``gold:SOURCE`` — the gold trace of the same question (by id) from a dataset source
  (``gold:bundled:strategyqa``, an annotated ``.jsonl``). The **rule**: among the gold memory steps that
  the trace does not already state (normalised text), take the one sharing the most content words with
  the faulty step (Jaccard similarity of ``analysis.exact_judge.content_tokens``); ties go to the gold step
  whose position among the gold memory steps is nearest the faulty step's position among the trace's
  memory steps, then to the earlier one. When no candidate shares a word, the position rule alone picks
  (the note says so). No gold trace for the id, or no gold memory step left: no correction.
* ``facts:FILE`` — a user's facts file. Formats: ``.txt``, one fact per line (blank lines and lines
  starting with ``#`` skipped); ``.jsonl``, one object per line ``{"text": ..., "id": ..., "question":
  <question id or list of ids>}`` (``id`` and ``question`` optional; a fact with ``question`` applies to
  those questions only), or one JSON string per line; ``.json``, a ``memreason-facts/1`` table
  (``analysis.exact_judge.FactTable``; aliases count as wordings of their fact). The best-matching fact by
  the same Jaccard rule, among the facts that apply to the question; none sharing a content word with the
  faulty step: no correction (a facts file is not about every question).
* ``text:...`` — the text typed after ``text:``, for whatever step is being corrected.
* ``llm:MODEL[@BASE_URL]`` — a chat model behind an OpenAI-compatible endpoint (``memreason.llm``): shown
  the question and the numbered, labelled steps (the located step flagged), it names the step that states a
  false fact and writes the corrected fact (JSON reply, validated, re-asked with the reason when invalid).
  Replies are cached on disk (``cache_dir``), so a resumed repair sends no request twice. The step it names
  is the step corrected (``Correction.step``), which may differ from the located one.

Locators: ``locate_step(result, judge=None, by=None)`` is the first faulty memory step according to a
judge (``analysis.judges.Judge``: a memory error's ``first_faulty``), or, without a judge, the least
confident memory step (lowest ``step_confidence`` mean; a trace that labels no step offers every step).
``experiments.repair.make_judge`` builds the judge a repair locates with (world, exact, or LLM).
"""

from __future__ import annotations

import json
import logging
import re
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Protocol, Sequence

from memreason.errors import ConfigError, DataError
from memreason.traces import KINDS, MEMORY, STEP_KINDS, Result, Step

logger = logging.getLogger(__name__)

SPECS = ("world:DIR", "gold:SOURCE", "facts:FILE", "text:TEXT", "llm:MODEL[@BASE_URL]")
LOCATORS = ("judge", "confidence")


@dataclass(frozen=True)
class Correction:
    """A corrected step.

    Args:
        step (int): 0-based index of the step it replaces.
        text (str): the corrected step text.
        kind (str, default "memory"): the corrected step's kind.
        source (str): which source wrote it (its spec); note (str): why, in a few words.
    """

    step: int
    text: str
    kind: str = MEMORY
    source: str = ""
    note: str = ""

    def __post_init__(self):
        if self.kind not in STEP_KINDS:
            raise ConfigError(f"correction kind must be one of {', '.join(STEP_KINDS)}, got {self.kind!r}")

    def to_dict(self) -> dict:
        return asdict(self)


class CorrectionSource(Protocol):
    """Where corrections come from. ``name`` is the spec that built it."""

    name: str

    def correct(self, result: Result, step: int) -> Correction | None: ...


def _step(result: Result, step: int) -> Step:
    if not 0 <= step < len(result.steps):
        raise ConfigError(f"row {result.id!r} has {len(result.steps)} steps; step {step} does not exist")
    return result.steps[step]


# ---------------------------------------------------------------- matching a step against candidate facts

def similarity(a: str, b: str) -> float:
    """Jaccard similarity of the content words of two texts (``exact_judge.content_tokens``)."""
    from memreason.analysis.exact_judge import content_tokens

    x, y = content_tokens(a), content_tokens(b)
    return len(x & y) / len(x | y) if x | y else 0.0


def memory_position(result: Result, step: int) -> int:
    """The index of ``step`` among the trace's memory steps (its index among all steps when the trace
    labels none as memory)."""
    memory = [i for i, s in enumerate(result.steps) if s.kind == MEMORY]
    if step in memory:
        return memory.index(step)
    return step if not memory else sum(i < step for i in memory)


def best_match(result: Result, step: int, candidates: Sequence[str], *, by_position: bool
               ) -> tuple[int, str] | None:
    """The candidate that best replaces ``result.steps[step]`` (the rule in the module docstring).

    Args:
        candidates: candidate texts, in their own order (the position rule uses it).
        by_position (bool): when no candidate shares a content word, pick by position alone (True) or give
            up (False).

    Returns:
        (index into candidates, note), or None.
    """
    from memreason.analysis.exact_judge import normalise_text

    stated = {normalise_text(s.text) for s in result.steps}
    open_ = [i for i, text in enumerate(candidates) if normalise_text(text) not in stated]
    if not open_:
        return None
    target = result.steps[step].text
    position = memory_position(result, step)
    scores = {i: similarity(target, candidates[i]) for i in open_}
    best = max(scores.values())
    if best == 0.0 and not by_position:
        return None
    pick = min((i for i in open_ if scores[i] == best), key=lambda i: (abs(i - position), i))
    note = f"shares {best:.2f} of its content words" if best else "no shared content word: picked by position"
    return pick, note


# ---------------------------------------------------------------- sources

def world_fact_text(path: Sequence[str], subject: str, obj: str, template: int = 0) -> str:
    """A recall in the world's wording: ``relation(subject) = obj`` (template ``template``), or a composite
    recall ``"The <chain> of <subject> is <obj>."`` for a path of several relations."""
    from memreason.data.world import RELATIONS, chain_phrase

    if len(path) == 1:
        return RELATIONS[path[0]].templates[template].format(s=subject, o=obj)
    return f"The {chain_phrase(tuple(path))} of {subject} is {obj}."


class WorldSource:
    """``world:DIR``: the true fact a false recall got wrong (see the module docstring).

    Raises:
        DataError: no world file under ``DIR``.
    """

    def __init__(self, directory: str | Path):
        from memreason.analysis.world_judge import WorldJudge

        path = Path(directory)
        if path.is_dir() and not (path / "world.json").is_file() and (path / "world" / "world.json").is_file():
            path = path / "world"
        self.judge = WorldJudge.load(path)
        self.name = f"world:{directory}"

    def describe(self) -> dict:
        return {"source": "world", **self.judge.describe()}

    def claim(self, text: str):
        """The judge's check of a step read as a recall (None when it is none), as ``check_steps`` reads it."""
        from memreason.analysis.world_judge import UNKNOWN_ENTITY

        check = self.judge.check_memory(text)
        if check is None or check.status == UNKNOWN_ENTITY:
            check = self.judge.check_composite(text) or check
        return check

    def true_object(self, path: Sequence[str], subject: str) -> str | None:
        """Where the chain ``path`` leads from ``subject`` in the world (None when it leads nowhere)."""
        current = subject
        for relation in path:
            fact = self.judge.facts.get((relation, current))
            if fact is None:
                return None
            current = fact["object"]
        return current

    def correct(self, result: Result, step: int) -> Correction | None:
        from memreason.analysis.world_judge import TRUE

        check = self.claim(_step(result, step).text)
        if check is None or check.status == TRUE:
            return None
        path, subject, obj = check.claim
        truth = self.true_object(path, subject) if subject in self.judge.entities else None
        if truth is None or truth == obj:
            return None
        return Correction(step, world_fact_text(path, subject, truth), MEMORY, self.name,
                          f"{'>'.join(path)}({subject}) is {truth}, not {obj}")


class GoldSource:
    """``gold:SOURCE``: the best-matching memory step of the question's gold trace (rule: module docstring).

    Raises:
        DataError, ConfigError: the source cannot be loaded.
    """

    def __init__(self, source: str):
        from memreason.analysis.exact_judge import ExactJudge, FactTable
        from memreason.data import load_traces

        traces, _ = load_traces(source, on_unknown_tag="drop", skip_invalid=True)
        self.gold = {t.id: t for t in traces}
        self.name = f"gold:{source}"
        self.judge = ExactJudge(FactTable.from_traces(traces), source=self.name)

    def describe(self) -> dict:
        return {"source": "gold", "data": self.name, "facts_digest": self.judge.describe()["facts_digest"]}

    def correct(self, result: Result, step: int) -> Correction | None:
        _step(result, step)
        trace = self.gold.get(result.id)
        if trace is None:
            return None
        memory = [s.text for s in trace.steps if s.kind == MEMORY]
        picked = best_match(result, step, memory, by_position=True)
        if picked is None:
            return None
        index, note = picked
        return Correction(step, memory[index], MEMORY, self.name, f"gold memory step {index + 1}: {note}")


def _facts_from_file(path: Path) -> list[tuple[str, tuple[str, ...] | None]]:
    """``(text, question ids or None)`` per fact wording of a facts file (formats: module docstring)."""
    from memreason.analysis.exact_judge import FactTable

    if not path.is_file():
        raise DataError("facts file not found", file=str(path))
    if path.suffix == ".json":
        table = FactTable.load(path)
        owners: dict[str, list[str]] = {}
        for qid, ids in (table.questions or {}).items():
            for fid in ids:
                owners.setdefault(fid, []).append(qid)
        return [(wording, tuple(owners[f.id]) if table.questions is not None else None)
                for f in table.facts.values() for wording in (f.text, *f.aliases)]
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        raise DataError("not UTF-8 text", file=str(path)) from None
    facts = []
    for number, line in enumerate(lines, start=1):
        if not line.strip() or (path.suffix != ".jsonl" and line.lstrip().startswith("#")):
            continue
        if path.suffix != ".jsonl":
            facts.append((line.strip(), None))
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"line {number} is not JSON ({exc.msg})", file=str(path)) from None
        if isinstance(item, str):
            item = {"text": item}
        text = item.get("text") if isinstance(item, dict) else None
        if not isinstance(text, str) or not text.strip():
            raise DataError(f"line {number}: a fact needs a non-empty \"text\"", file=str(path), field="text")
        question = item.get("question")
        questions = None if question is None else tuple(question) if isinstance(question, list) else (str(question),)
        facts.append((text.strip(), questions))
    if not facts:
        raise DataError("the facts file holds no facts", file=str(path))
    return facts


class FactsSource:
    """``facts:FILE``: the best-matching fact of a user's facts file (formats and rule: module docstring).

    Raises:
        DataError: missing, unreadable or empty file, or a malformed line (naming it).
    """

    def __init__(self, path: str | Path):
        from memreason.analysis.exact_judge import ExactJudge, Fact, FactTable

        self.path = Path(path)
        self.facts = _facts_from_file(self.path)
        self.name = f"facts:{path}"
        table = {f"f{i}": Fact(f"f{i}", text) for i, (text, _) in enumerate(self.facts)}
        scoped = any(q is not None for _, q in self.facts)
        questions = None
        if scoped:
            questions = {}
            for i, (_, owners) in enumerate(self.facts):
                for qid in owners or ():
                    questions.setdefault(qid, []).append(f"f{i}")
            questions = {q: tuple(ids) for q, ids in questions.items()}
        self.judge = ExactJudge(FactTable(table, questions), source=self.name)

    def describe(self) -> dict:
        return {"source": "facts", "file": str(self.path), "facts": [text for text, _ in self.facts]}

    def correct(self, result: Result, step: int) -> Correction | None:
        _step(result, step)
        candidates = [text for text, owners in self.facts if owners is None or result.id in owners]
        picked = best_match(result, step, candidates, by_position=False)
        if picked is None:
            return None
        index, note = picked
        return Correction(step, candidates[index], MEMORY, self.name, note)


class TextSource:
    """``text:...``: the given text, for whichever step is corrected."""

    def __init__(self, text: str, kind: str = MEMORY):
        if not text.strip():
            raise ConfigError("text: give the corrected step after 'text:' (e.g. text:Paris is in France.)")
        self.text, self.kind = text.strip(), kind
        self.name = f"text:{self.text}"

    def describe(self) -> dict:
        return {"source": "text", "text": self.text, "kind": self.kind}

    def correct(self, result: Result, step: int) -> Correction | None:
        _step(result, step)
        return Correction(step, self.text, self.kind, self.name, "typed by the user")


# ---------------------------------------------------------------- the LLM source

LLM_PROMPT_VERSION = 1
LLM_SYSTEM = "You check the facts in worked solutions and correct the false ones. You reply with JSON only."
LLM_PROMPT = """\
A model answered the question below in numbered steps. Steps labelled [memory] recall knowledge; steps \
labelled [reason] draw inferences. An automatic check flagged step {flagged} as the most likely mistake.

Question: {question}

Steps:
{steps}

Which step states a false fact? Write that fact correctly, as one short sentence that can replace the step \
(state the fact only, no reasoning). Reply with one JSON object and nothing else:
{{"step": <the step's number>, "fact": "<the corrected fact>"}}
If no step states a false fact, reply {{"step": null, "fact": null}}."""
LLM_RETRY = "That reply could not be used: {reason}. Reply again with only the JSON object, as asked above."


class InvalidCorrection(Exception):
    """A reply that fails validation; the message says why (and is sent back to the model)."""


def parse_llm_reply(raw: str, n_steps: int) -> tuple[int | None, str | None]:
    """``(0-based step, fact)`` from a reply (``(None, None)``: no false fact).

    Raises:
        InvalidCorrection: not JSON, no step/fact, a step out of range, an empty fact or one with markers.
    """
    from memreason.llm import InvalidReply, parse_json_reply
    from memreason.model.tokens import has_marker

    try:
        value = parse_json_reply(raw, [])
    except InvalidReply as exc:
        raise InvalidCorrection(str(exc)) from None
    if not isinstance(value, dict) or "step" not in value or "fact" not in value:
        raise InvalidCorrection('the reply must be an object with "step" and "fact"')
    step, fact = value["step"], value["fact"]
    if step is None:
        return None, None
    if isinstance(step, bool) or not isinstance(step, int) or not 1 <= step <= n_steps:
        raise InvalidCorrection(f'"step" must be a step number from 1 to {n_steps} (or null), got {step!r}')
    if not isinstance(fact, str) or not fact.strip():
        raise InvalidCorrection('"fact" must be the corrected fact as a non-empty string')
    if has_marker(fact):
        raise InvalidCorrection('"fact" must be plain text, without <...> markers')
    return step - 1, " ".join(fact.split())


class LLMSource:
    """``llm:MODEL[@BASE_URL]``: a chat model names the false step and writes the corrected fact.

    Args:
        model (str): the model name the endpoint knows; base_url (str | None): the endpoint (None: the
            environment's, see ``memreason.llm.resolve_endpoint``).
        api_key (str | None): default from the environment (never written anywhere).
        cache_dir (str | Path | None): reply cache (``memreason.llm.ResponseCache``); None: no cache.
        seed (int, default 0): attempt k uses seed + k; attempts (int, default 3): tries when a reply fails
            validation; retries (int, default 4): transport retries per request.
        client: a ``ChatClient`` to use instead of ``OpenAIChat`` (tests); sleep: the backoff wait.

    Raises:
        ConfigError: no model name, or no key for OpenAI's own endpoint.
    """

    def __init__(self, model: str, base_url: str | None = None, *, api_key: str | None = None,
                 cache_dir: str | Path | None = None, seed: int = 0, attempts: int = 3, retries: int = 4,
                 max_tokens: int = 256, client=None, sleep: Callable[[float], None] = time.sleep):
        from memreason.llm import CachedChat, OpenAIChat, ResponseCache, RetryPolicy, public_url, resolve_endpoint

        if not model:
            raise ConfigError("llm: name the model, e.g. llm:gpt-4o-mini or llm:my-model@http://127.0.0.1:8000/v1")
        if attempts < 1:
            raise ConfigError(f"attempts must be >= 1, got {attempts}")
        self.model, self.seed, self.attempts = model, seed, attempts
        base_url, api_key = resolve_endpoint(base_url, api_key)
        self.base_url = base_url
        client = client if client is not None else OpenAIChat(base_url, api_key)
        self.chat = CachedChat(client, model, temperature=0.0, max_tokens=max_tokens,
                               retry=RetryPolicy(retries=retries), sleep=sleep,
                               cache=ResponseCache(cache_dir) if cache_dir is not None else None)
        # the URL without user info or query: either may hold a secret, and the name goes into outputs
        self.name = f"llm:{model}" + (f"@{public_url(base_url)}" if base_url else "")

    def describe(self) -> dict:
        from memreason.llm import public_url

        return {"source": "llm", "model": self.model, "endpoint": public_url(self.base_url), "seed": self.seed,
                "attempts": self.attempts, "prompt_version": LLM_PROMPT_VERSION}

    def messages(self, result: Result, step: int) -> list[dict]:
        """The chat messages that ask for a correction of one row."""
        lines = "\n".join(f"{i}. [{s.kind}] {' '.join(s.text.split())}" for i, s in enumerate(result.steps, 1))
        prompt = LLM_PROMPT.format(flagged=step + 1, question=result.question, steps=lines)
        return [{"role": "system", "content": LLM_SYSTEM}, {"role": "user", "content": prompt}]

    def correct(self, result: Result, step: int) -> Correction | None:
        from memreason.llm import RequestRefused

        _step(result, step)
        messages = self.messages(result, step)
        history, reason = messages, ""
        for attempt in range(self.attempts):
            try:
                raw = self.chat.complete(history, seed=self.seed + attempt)
            except RequestRefused as exc:  # RetriesExhausted included: this row gets no correction
                logger.warning("row %s: the correction request failed: %s", result.id, exc)
                return None
            try:
                named, fact = parse_llm_reply(raw, len(result.steps))
            except InvalidCorrection as exc:
                reason = str(exc)
                history = messages + [{"role": "assistant", "content": raw[:4000]},
                                      {"role": "user", "content": LLM_RETRY.format(reason=reason)}]
                continue
            if named is None:
                return None
            note = f"the model named step {named + 1}" + ("" if named == step else f" (located: step {step + 1})")
            return Correction(named, fact, MEMORY, self.name, note)
        logger.warning("row %s: no valid correction after %d attempts (last: %s)", result.id, self.attempts, reason)
        return None


# ---------------------------------------------------------------- building sources

_LLM_SPEC = re.compile(r"^(?P<model>.+?)@(?P<url>https?://.+)$")


def load_source(spec: str, **options: Any) -> CorrectionSource:
    """A correction source from its spec (``world:DIR``, ``gold:SOURCE``, ``facts:FILE``, ``text:TEXT``,
    ``llm:MODEL[@BASE_URL]``; see the module docstring).

    Args:
        spec (str): the spec.
        **options: passed to the source: ``text`` takes ``kind``; ``llm`` takes ``api_key``, ``cache_dir``,
            ``seed``, ``attempts``, ``retries``, ``max_tokens``, ``client``, ``sleep``. The others take none.

    Raises:
        ConfigError: an unknown spec or an option the source does not take; DataError: unreadable data.
    """
    kind, sep, rest = str(spec).partition(":")
    if not sep or kind not in ("world", "gold", "facts", "text", "llm") or not rest.strip():
        raise ConfigError(f"unknown correction source {spec!r}; give one of {', '.join(SPECS)}")
    allowed = {"text": {"kind"}, "llm": {"api_key", "cache_dir", "seed", "attempts", "retries", "max_tokens",
                                         "client", "sleep"}}.get(kind, set())
    unknown = sorted(set(options) - allowed)
    if unknown:
        raise ConfigError(f"the {kind} source takes no option {', '.join(unknown)}"
                          + (f" (it takes {', '.join(sorted(allowed))})" if allowed else ""))
    if kind == "world":
        return WorldSource(rest)
    if kind == "gold":
        return GoldSource(rest)
    if kind == "facts":
        return FactsSource(rest)
    if kind == "text":
        return TextSource(rest, **options)
    match = _LLM_SPEC.match(rest)
    model, url = (match.group("model"), match.group("url")) if match else (rest, None)
    return LLMSource(model, url, **options)


def describe_source(source: CorrectionSource) -> dict:
    """What decides a source's corrections (for settings digests): its ``describe()``, else its name."""
    describe = getattr(source, "describe", None)
    return describe() if callable(describe) else {"source": source.name}


# ---------------------------------------------------------------- which step to correct

def memory_candidates(result: Result) -> list[int]:
    """The steps a locator may pick: memory-labelled steps; every step when the trace labels none
    memory/reason (plain chain of thought, S=0 markers)."""
    labelled = [i for i, s in enumerate(result.steps) if s.kind in KINDS]
    if labelled:
        return [i for i in labelled if result.steps[i].kind == MEMORY]
    return list(range(len(result.steps)))


def least_confident_step(result: Result) -> int | None:
    """The memory step with the lowest mean token log-probability (ties: the earlier); None when no
    candidate step has a recorded confidence."""
    confidences = list(result.step_confidence or ())
    scored = [(confidences[i]["mean"], i) for i in memory_candidates(result)
              if i < len(confidences) and confidences[i] is not None]
    return min(scored)[1] if scored else None


def locate_step(result: Result, judge=None, by: str | None = None) -> int | None:
    """The step to correct: the first faulty memory step by ``judge``, or the least confident memory step.

    Args:
        result (Result): the row.
        judge: an ``analysis.judges.Judge``; needed for ``by="judge"``.
        by (str | None): ``"judge"`` or ``"confidence"``; None: judge when one is given, else confidence.

    Returns:
        int | None: the step index; None when the judge finds no faulty memory step (a reasoning error, or
        a row it cannot judge) or no memory step has a confidence (``locate`` says which).

    Raises:
        ConfigError: an unknown ``by``, or ``by="judge"`` without a judge.
    """
    return locate(result, judge, by)[0]


def locate(result: Result, judge=None, by: str | None = None) -> tuple[int | None, str]:
    """``locate_step`` with the reason when no step is located (a short category, the same for every row
    it applies to; the empty string when a step is located)."""
    from memreason.analysis.judges import JudgeFailed, NotApplicable

    by = by or ("judge" if judge is not None else "confidence")
    if by not in LOCATORS:
        raise ConfigError(f"unknown locator {by!r}; choose one of {', '.join(LOCATORS)}")
    if by == "confidence":
        step = least_confident_step(result)
        return step, "" if step is not None else "no memory step has a recorded confidence"
    if judge is None:
        raise ConfigError("locating by judge needs a judge (or locate by confidence)")
    if not result.steps:
        return None, "no steps"
    try:
        verdict = judge.attribute_error(result)
    except NotApplicable as exc:
        logger.debug("row %s: not judged (%s)", result.id, exc)
        return None, "the judge cannot judge it (unlabelled steps, or nothing known about the question)"
    except JudgeFailed as exc:
        logger.warning("row %s: the judge failed (%s)", result.id, exc)
        return None, "the judge failed on it"
    if verdict.source != MEMORY or verdict.first_faulty is None:
        return None, "the judge finds a reasoning error, no faulty memory step"
    return verdict.first_faulty, ""
