"""``LoadReport``: what one dataset load kept, dropped and changed, with counts and the first few examples.

Every policy the loaders apply (empty steps dropped, compound tags read, unknown tags dropped, malformed
steps or records skipped, records left without usable steps) writes its count here, so ``memreason data
check`` can print it and ``eval`` / ``train`` can log it. Nothing a load does to a record is silent.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

# How many examples each policy keeps for display (the counts are always complete).
EXAMPLES_KEPT = 5

# Policy names used as keys of ``LoadReport.examples``, with the heading ``details()`` prints for each.
EMPTY_STEP = "empty_step"
COMPOUND_TAG = "compound_tag"
UNKNOWN_TAG = "unknown_tag"
INVALID_STEP = "invalid_step"
SKIPPED_RECORD = "skipped_record"
NO_STEPS = "no_steps"
EMPTIED = "emptied"


def _quote(text: str, limit: int = 70) -> str:
    text = str(text)
    return repr(text if len(text) <= limit else text[:limit - 3] + "...")


def _counts(counter: Counter, fmt: str = "{key} x{n}") -> str:
    return ", ".join(fmt.format(key=key, n=n) for key, n in counter.most_common())


def _tags(counter: Counter) -> str:
    """``[rak] x2, <unreadable> x1``: real tags in brackets, placeholders as they are."""
    return ", ".join((key if key.startswith("<") else f"[{key}]") + f" x{n}" for key, n in counter.most_common())


@dataclass
class LoadReport:
    """What a load kept and dropped.

    Args:
        source (str): the dataset as the user named it.
        read (int): records read from the source (before the split filter).
        loaded (int): records turned into Traces.
        question_only (int): loaded records without any usable step (``no_steps + emptied``): usable for
            evaluation, excluded from training.
        no_steps (int): records whose steps field was empty (``cot_steps: []``) or absent (hub datasets).
        emptied (int): records that had steps, none of them usable (all empty or dropped).
        skipped (Counter): records not loaded (``skip_invalid``), by problem.
        dropped_steps (Counter): steps dropped for an unknown or unreadable tag (``on_unknown_tag="drop"``),
            by tag.
        empty_steps (int): steps dropped because their text is empty (``"[rag]: "``).
        compound_steps (Counter): steps with a compound tag (``"[reason] and [rag]: ..."``), by the kind
            they were read as (``"dropped"`` when the policy drops them).
        invalid_steps (Counter): malformed steps dropped from a kept record (``skip_invalid``), by problem.
        splits (Counter): records read per ``split`` value (``"-"`` for none), before the split filter.
        duplicate_ids (dict): id -> record indexes, for ids given by the data more than once.
        excluded_from_training (int | None): set by ``training_traces``.
        task (str | None), task_origin (str | None): the task answers were checked against, and why.
        compound_tag (str), columns (str | None): the compound-tag reading and column mapping in force.
        examples (dict): policy name -> up to ``EXAMPLES_KEPT`` short descriptions.
    """

    source: str
    read: int = 0
    loaded: int = 0
    question_only: int = 0
    no_steps: int = 0
    emptied: int = 0
    skipped: Counter = field(default_factory=Counter)
    dropped_steps: Counter = field(default_factory=Counter)
    empty_steps: int = 0
    compound_steps: Counter = field(default_factory=Counter)
    invalid_steps: Counter = field(default_factory=Counter)
    splits: Counter = field(default_factory=Counter)
    duplicate_ids: dict = field(default_factory=dict)
    excluded_from_training: int | None = None
    task: str | None = None
    task_origin: str | None = None
    compound_tag: str = "first"
    columns: str | None = None
    examples: dict = field(default_factory=dict)

    def note(self, policy: str, where: str, text: str = "", outcome: str = "") -> None:
        """Keep an example of what ``policy`` did (only the first ``EXAMPLES_KEPT`` per policy)."""
        kept = self.examples.setdefault(policy, [])
        if len(kept) < EXAMPLES_KEPT:
            kept.append(where + (f": {_quote(text)}" if text else "") + (f" -> {outcome}" if outcome else ""))

    def summary(self) -> str:
        """One line: loaded count, then one clause per policy that acted."""
        parts = [f"{self.source}: {self.loaded} records loaded"
                 + (f" (columns: {self.columns})" if self.columns else "")]
        if self.question_only:
            parts.append(f"{self.question_only} without steps")
        if self.skipped:
            parts.append(f"{sum(self.skipped.values())} skipped (" + _counts(self.skipped, "{n} {key}") + ")")
        if self.empty_steps:
            parts.append(f"{self.empty_steps} empty steps dropped")
        if self.compound_steps:
            parts.append(f"{sum(self.compound_steps.values())} compound-tag steps read as {self.compound_tag} ("
                         + _counts(self.compound_steps) + ")")
        if self.dropped_steps:
            parts.append(f"{sum(self.dropped_steps.values())} steps with unknown tags dropped ("
                         + _tags(self.dropped_steps) + ")")
        if self.invalid_steps:
            parts.append(f"{sum(self.invalid_steps.values())} malformed steps dropped")
        if self.excluded_from_training:
            parts.append(f"{self.excluded_from_training} excluded from training")
        return "; ".join(parts)

    def details(self, examples: int = 3) -> list[str]:
        """Lines for ``data check``: each policy with its count and its first ``examples`` cases."""
        sections = [
            (EMPTY_STEP, self.empty_steps, "empty steps dropped (a tag with no text, e.g. '[rag]: ')"),
            (COMPOUND_TAG, sum(self.compound_steps.values()),
             f"compound-tag steps read with --compound-tag {self.compound_tag}"
             + (f" ({_counts(self.compound_steps)})" if self.compound_steps else "")),
            (UNKNOWN_TAG, sum(self.dropped_steps.values()), "steps with unknown or unreadable tags dropped"
             + (f" ({_tags(self.dropped_steps)})" if self.dropped_steps else "")),
            (INVALID_STEP, sum(self.invalid_steps.values()), "malformed steps dropped, record kept (--skip-invalid)"),
            (SKIPPED_RECORD, sum(self.skipped.values()), "records skipped: bad question, answer or split "
             "(--skip-invalid)"),
            (NO_STEPS, self.no_steps, "records with no steps at all (kept for evaluation, not for training)"),
            (EMPTIED, self.emptied, "records left with no usable step (kept for evaluation, not for training)"),
        ]
        lines = []
        for policy, count, heading in sections:
            lines.append(f"  {count:>6}  {heading}")
            for example in self.examples.get(policy, [])[:examples] if count else []:
                lines.append(f"            {example}")
        return lines
