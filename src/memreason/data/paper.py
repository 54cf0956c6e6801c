"""The step policy: how a record's steps (the paper's ``"[tag]: text"`` strings, or our ``{kind, text}``
objects) become ``Step``s, and what happens to steps that cannot.

The paper's released files (spec disentangle.md §2) hold four quirks that a loader must survive without
losing the question, which evaluation needs even when training cannot use it:

========================  =====================================  ==============================================
quirk                     example                                policy (counted in ``LoadReport``)
========================  =====================================  ==============================================
empty step                ``"[rag]: "``, ``""``                   dropped (``empty_steps``)
compound tag              ``"[reason] and [rag]: ..."``           read by ``compound_tag`` (``compound_steps``)
every step empty          ``["[rag]: ", "[reason]:"]``            record kept without steps (``emptied``)
no steps                  ``cot_steps: []``                       record kept without steps (``no_steps``)
========================  =====================================  ==============================================

Records without usable steps are loaded for evaluation and left out of training by
``loaders.training_traces``, never dropped at load time.

Compound tags. A compound tag joins known tags with ``and``, ``&``, ``/``, ``+`` or ``,``, inside one
bracket (``[reason and rag]``) or across brackets (``[reason] and [rag]``). When every part means the same
kind (``[rag] and [fact]``) the step is simply that kind. A genuinely mixed tag is read by
``compound_tag``:

- ``first`` (default): the kind of the first tag written. The paper's own cleaning keys on the first
  bracketed tag of a step (spec §3.3), and the annotator put the step's main role first;
- ``memory`` / ``reason``: always that kind;
- ``drop``: drop the step (counted).

Two bracketed tags with nothing between them (``[reason] [rag]: ...``) are not a compound but an
unreadable tag, as are the original parser's garbage tags (``[reason] [rag]The question '[reason]: ...``,
bug B5).

Unknown and unreadable tags follow ``on_unknown_tag``: ``"error"`` (default) raises ``DataError``;
``"drop"`` drops the step (counted by tag) and keeps every other step's kind on its own step (no shift, bug
B4; ``[reasoning]`` is reason, never relabelled memory, bug B3). ``skip_invalid`` drops any other malformed
step (a number, an object without ``kind``) and keeps the record.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Literal

from memreason.data.report import COMPOUND_TAG, EMPTY_STEP, INVALID_STEP, UNKNOWN_TAG, LoadReport
from memreason.errors import DataError
from memreason.traces import MEMORY, REASON, Step, UnknownTagError, normalise_kind, parse_tagged_step

OnUnknownTag = Literal["error", "drop"]
CompoundTag = Literal["first", "memory", "reason", "drop"]
ON_UNKNOWN_TAG_CHOICES = ("error", "drop")
UNREADABLE_TAG = "<unreadable>"  # the dropped_steps key of steps without a readable "[tag]:" prefix
COMPOUND_TAG_CHOICES = ("first", "memory", "reason", "drop")

_BRACKET = re.compile(r"\[([^\[\]]*)\]")
_JOIN = r"(?:and|&|/|\+|,)"
# "[reason] and [rag]: text" — two or more bracketed tags joined by a connective, then the colon.
_COMPOUND_STEP = re.compile(rf"^\s*(\[[^\[\]]*\](?:\s*{_JOIN}\s*\[[^\[\]]*\])+)\s*:\s*(.*?)\s*$",
                            re.DOTALL | re.IGNORECASE)
# "reason and rag" inside one bracket
_CONNECTIVE = re.compile(r"\s+and\s+|\s*[&/+,]\s*", re.IGNORECASE)


@dataclass(frozen=True)
class StepPolicy:
    """What the loader does with steps it cannot use as they are (see the module docstring).

    Args:
        on_unknown_tag ("error" | "drop", default "error"): steps whose tag is unknown or unreadable.
        compound_tag ("first" | "memory" | "reason" | "drop", default "first"): reading of mixed compound tags.
        skip_invalid (bool, default False): drop malformed steps (and skip malformed records) instead of raising.

    Raises:
        DataError: a choice outside the allowed values.
    """

    on_unknown_tag: OnUnknownTag = "error"
    compound_tag: CompoundTag = "first"
    skip_invalid: bool = False

    def __post_init__(self):
        if self.on_unknown_tag not in ON_UNKNOWN_TAG_CHOICES:
            raise DataError(f"on_unknown_tag must be 'error' or 'drop', got {self.on_unknown_tag!r}")
        if self.compound_tag not in COMPOUND_TAG_CHOICES:
            raise DataError(f"compound_tag must be one of {', '.join(COMPOUND_TAG_CHOICES)}, "
                            f"got {self.compound_tag!r}")


def split_tagged_step(line: str) -> tuple[list[str], str]:
    """Split a paper step into its raw tags (one, or several for a compound) and its text.

    Raises:
        ValueError: the line does not start with a readable ``[tag]:`` prefix.
    """
    try:
        tag, text = parse_tagged_step(line)
        return [tag], text
    except ValueError:
        match = _COMPOUND_STEP.match(line)
        if not match:
            raise
        return _BRACKET.findall(match.group(1)), match.group(2)


def tag_kinds(tags: list[str]) -> list[str]:
    """The kind of every part of a (possibly compound) tag.

    Raises:
        UnknownTagError: a part is not in the tag table (naming the whole tag when it is one bracket).
    """
    if len(tags) == 1:
        try:
            return [normalise_kind(tags[0])]
        except UnknownTagError:
            parts = [part for part in _CONNECTIVE.split(tags[0].strip()) if part]
            if len(parts) < 2:
                raise
            try:
                return [normalise_kind(part) for part in parts]
            except UnknownTagError:
                raise UnknownTagError(tags[0]) from None
    return [normalise_kind(tag) for tag in tags]


def read_compound(kinds: list[str], compound_tag: CompoundTag) -> str | None:
    """The kind a compound tag's step gets (None: drop it)."""
    if len(set(kinds)) == 1:
        return kinds[0]
    if compound_tag == "first":
        return kinds[0]
    if compound_tag == "drop":
        return None
    return MEMORY if compound_tag == "memory" else REASON


class _StepReader:
    """Turns one record's steps into Steps under a policy, counting into the report."""

    def __init__(self, where: dict, policy: StepPolicy, report: LoadReport):
        self.where, self.policy, self.report = where, policy, report
        self.label = f"record {where.get('record')}"

    def invalid(self, problem: str, name: str, raw: Any = "") -> None:
        """Raise, or (skip_invalid) count the malformed step and go on without it."""
        if not self.policy.skip_invalid:
            raise DataError(problem, field=name, **self.where)
        self.report.invalid_steps[problem.split(" — ")[0][:60]] += 1
        self.report.note(INVALID_STEP, f"{self.label} {name}", str(raw), problem[:60])

    def unknown(self, tag: str, problem: str, name: str, raw: str) -> None:
        if self.policy.on_unknown_tag == "drop":
            self.report.dropped_steps[tag] += 1
            self.report.note(UNKNOWN_TAG, f"{self.label} {name}", raw)
            return
        self.invalid(f"{problem}; pass --on-unknown-tag=drop to drop such steps", name, raw)

    def kind(self, tags: list[str], name: str, raw: str) -> str | None:
        try:
            kinds = tag_kinds(tags)
        except UnknownTagError as exc:
            self.unknown(exc.tag, str(exc), name, raw)
            return None
        if len(kinds) == 1:
            return kinds[0]
        kind = read_compound(kinds, self.policy.compound_tag)
        self.report.compound_steps[kind or "dropped"] += 1
        self.report.note(COMPOUND_TAG, f"{self.label} {name}", raw, kind or "dropped")
        return kind

    def empty(self, name: str, raw: str) -> None:
        self.report.empty_steps += 1
        self.report.note(EMPTY_STEP, f"{self.label} {name}", raw or "''")

    def tagged(self, lines: Any) -> tuple[Step, ...]:
        if not isinstance(lines, list):
            self.invalid(f"expected a list of '[tag]: text' strings, got {type(lines).__name__}", "cot_steps", lines)
            return ()
        steps = []
        for i, line in enumerate(lines):
            name = f"cot_steps[{i}]"
            if not isinstance(line, str):
                self.invalid(f"expected a string, got {type(line).__name__}", name, line)
                continue
            if not line.strip():
                self.empty(name, line)
                continue
            try:
                tags, text = split_tagged_step(line)
            except ValueError as exc:
                self.unknown(UNREADABLE_TAG, str(exc), name, line)
                continue
            kind = self.kind(tags, name, line)
            if kind is None:
                continue
            if not text:
                self.empty(name, line)
                continue
            steps.append(Step(kind, text))
        return tuple(steps)

    def objects(self, items: Any) -> tuple[Step, ...]:
        if not isinstance(items, list):
            self.invalid(f"expected a list of {{kind, text}} objects, got {type(items).__name__}", "steps", items)
            return ()
        steps = []
        for i, item in enumerate(items):
            name = f"steps[{i}]"
            if not isinstance(item, dict) or not isinstance(item.get("kind"), str) or not isinstance(item.get("text"), str):
                self.invalid("expected an object with string fields 'kind' and 'text'", name, item)
                continue
            kind = self.kind([item["kind"]], name, f"{item['kind']}: {item['text']}")
            if kind is None:
                continue
            if not item["text"].strip():
                self.empty(name, f"{item['kind']}: {item['text']}")
                continue
            steps.append(Step(kind, item["text"].strip()))
        return tuple(steps)


def read_steps(record: dict, key: str, where: dict, policy: StepPolicy, report: LoadReport) -> tuple[Step, ...]:
    """The usable steps of ``record[key]`` (``key`` is ``"cot_steps"`` or ``"steps"``) under ``policy``.

    Raises:
        DataError: a step the policy does not drop, naming the file, record and step.
    """
    reader = _StepReader(where, policy, report)
    return reader.tagged(record[key]) if key == "cot_steps" else reader.objects(record[key])
