"""The exact judge: memory steps checked against a table of true facts, no model involved.

``ExactJudge`` implements the ``Judge`` interface of ``memreason.analysis.judges`` (``attribute_error(row)``,
``check_decoupling(row)`` on ``Result`` rows). It checks memory steps against a ``FactTable`` of true facts
(a JSON file, or the gold memory steps of an annotated dataset). A memory step is **true** when its
normalised text equals a fact's text or alias, or when at least ``threshold`` (default 0.8) of its content
tokens occur in one fact or alias (``overlap = |step ∩ fact| / |step|`` over sets of lower-cased word
tokens, digits kept, thousands separators dropped, a short list of function words removed), provided every
number in the step occurs in that wording and both carry the same negation words ("not", "no", "never"...);
a wrong year or a dropped "not" never matches. No stemming, no entailment: "lies" and "lie" differ. The
table is a *closed world*: a memory step matching none of the question's facts counts as false.

Error attribution: the first false memory step makes a **memory** error; if every memory step is true the
error is a **reasoning** error (by elimination: this judge cannot check inferences, so it reports
``first_faulty`` only for memory errors, and a memory error even when an earlier reason step was already
faulty). Decoupling: a memory step is decoupled when it matches a fact; a reason step when it matches none
(a reason step that restates a table fact only recalls). It applies only to rows whose steps are all
labelled memory/reason and whose question has facts in the table.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from memreason.analysis.judges import DecouplingVerdict, ErrorVerdict, NotApplicable, judged_steps
from memreason.errors import ConfigError, DataError
from memreason.io import read_json, settings_digest
from memreason.traces import KINDS, MEMORY, REASON, Result, Step

FACTS_FORMAT = "memreason-facts/1"


# ---------------------------------------------------------------- matching a step against a fact

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


# ---------------------------------------------------------------- fact tables

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
        data = read_json(path, what="fact table")
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


# ---------------------------------------------------------------- the judge

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
        return {"judge": "exact", "threshold": self.threshold, "facts": self.source,
                "facts_digest": settings_digest(self.facts.to_dict())}

    def _matches(self, row: Result) -> tuple[tuple[Step, ...], list[tuple[str | None, float]]]:
        steps = judged_steps(row)
        unlabelled = sum(step.kind not in KINDS for step in steps)
        if unlabelled:
            raise NotApplicable(f"{unlabelled} unlabelled step(s): the exact judge needs memory/reason labels")
        facts = self.facts.facts_for(row.id)
        if not facts:
            raise NotApplicable("no facts for this question in the fact table")
        return steps, [self.facts.match(step.text, facts, self.threshold) for step in steps]

    def attribute_error(self, row: Result) -> ErrorVerdict:
        steps, matches = self._matches(row)
        correct = tuple((fid is not None) if step.kind == MEMORY else None for step, (fid, _) in zip(steps, matches))
        first = next((i for i, ok in enumerate(correct) if ok is False), None)
        evidence = tuple((fid, round(score, 3)) if step.kind == MEMORY else None
                         for step, (fid, score) in zip(steps, matches))
        if first is not None:
            explanation = f"memory step {first + 1} matches no fact (best overlap {matches[first][1]:.2f})"
        else:
            explanation = "every memory step matches a fact, so the error lies in the reasoning"
        return ErrorVerdict(MEMORY if first is not None else REASON, first, correct, (None,) * len(steps),
                            explanation, evidence)

    def check_decoupling(self, row: Result) -> DecouplingVerdict:
        steps, matches = self._matches(row)
        forms = tuple("fact" if fid is not None else None for fid, _ in matches)
        decoupled = tuple((fid is not None) if step.kind == MEMORY else (fid is None)
                          for step, (fid, _) in zip(steps, matches))
        evidence = tuple((fid, round(score, 3)) for fid, score in matches)
        return DecouplingVerdict(forms, decoupled, evidence)
