"""The exact judge of the synthetic world: every step of a generated trace is checked against the world.

``WorldJudge`` implements the ``Judge`` interface of ``analysis.judges`` (``attribute_error(row)``,
``check_decoupling(row)`` on ``memreason.traces.Result`` rows), so it plugs into ``judge_rows`` and the
summaries.

Each step is read with the world's own wordings (``data/world.py``), which also gives the step's type by
its content, whatever its label says:

* a **memory** step is any paraphrase of a relation, ``"<subject> was born in <object>."`` ...; it is a
  ``true`` fact when the world holds it, a ``false`` fact when both names are entities of the world but
  the world holds another object (or the names have the wrong types), and ``unknown_entity`` when a name
  is not an entity of the world;
* a **reason** step is re-derived. A chain step ``"So the <chain> of <X> is <Y>."`` is valid when following
  the chain from X through the facts *stated in the steps before it* (true or not: a valid inference
  from a false recall is still valid) reaches Y, and the chain is the question's. A decision step (``"Y
  is C, so yes."``, ``"Y is option B."``, ``"Y and Z differ, so no."``) is valid when it uses the
  conclusions of the chain steps before it and decides correctly against the question's candidate or
  options;
* a step stating a whole chain without deriving it (``"The <chain> of <X> is <Y>."``, no ``"So"``) is a
  **memory** step too: a composite recall, true when the chain leads from X to Y in the world. Models write
  these on compositions they were not trained on, instead of recalling each hop;
* a step matching no wording cannot be checked: it is faulty, and its source is its label (an unlabelled
  one makes the row not judgeable).

The first faulty step decides the error class (memory or reason). When no step is faulty, the answer
line is checked against the last decision step; an answer that does not follow (or no decision step) is a
reasoning error at the answer (``first_faulty = None``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from memreason.analysis.judges import DecouplingVerdict, ErrorVerdict, NotApplicable, judged_steps
from memreason.data.world import NO, RELATIONS, WORLD_FORMAT, YES
from memreason.errors import DataError
from memreason.io import read_json, settings_digest
from memreason.traces import MEMORY, REASON, Result

TRUE, FALSE, UNKNOWN_ENTITY, UNPARSED = "true", "false", "unknown_entity", "unparsed"
VALID, INVALID = "valid", "invalid"


def _template_regex(template: str) -> re.Pattern:
    body = re.escape(template.rstrip(".")).replace(r"\{s\}", r"(?P<s>.+?)").replace(r"\{o\}", r"(?P<o>.+?)")
    return re.compile(rf"^{body}\.?$")


_MEMORY_PATTERNS = [(name, _template_regex(t)) for name, r in RELATIONS.items() for t in r.templates]
_NOUNS = {r.noun: name for name, r in RELATIONS.items()}
_CHAIN = re.compile(r"^So the (?P<mid>.+) is (?P<o>.+?)\.?$")
_COMPOSITE = re.compile(r"^The (?P<mid>.+) is (?P<o>.+?)\.?$")
_YES_NO = re.compile(r"^(?P<o>.+?) is (?P<neg>not )?(?P<c>.+), so (?P<ans>yes|no)\.?$", re.IGNORECASE)
_CHOICE = re.compile(r"^(?P<o>.+?) is option (?P<letter>[A-Z])\.?$")
_SAME = re.compile(r"^(?P<o1>.+?) and (?P<o2>.+?) (?P<rel>are the same, so yes|differ, so no)\.?$", re.IGNORECASE)


@dataclass(frozen=True)
class StepCheck:
    """What the judge found in one step.

    Args:
        type (str | None): ``memory`` or ``reason`` by content; None when no wording matched.
        status (str): memory: ``true`` / ``false`` / ``unknown_entity``; reason: ``valid`` / ``invalid``;
            ``unparsed`` when no wording matched.
        detail (str): why, in a few words.
        fact_id (str | None): the world fact a true memory step states.
        claim (tuple | None): ``(path, subject, object)`` a memory step states, true or not (``path`` has one
            relation for a fact, several for a composite recall).
        decision (str | None): the answer a valid decision step decides (``Yes``, ``No``, ``B``).
    """

    type: str | None
    status: str
    detail: str = ""
    fact_id: str | None = None
    claim: tuple[tuple[str, ...], str, str] | None = None
    decision: str | None = None

    @property
    def ok(self) -> bool:
        return self.status in (TRUE, VALID)


def _clean(text: str) -> str:
    return " ".join(text.split()).strip()


class WorldJudge:
    """Checks generated traces against a world written by ``write_world``.

    Args:
        world (dict): the parsed ``world.json``.
        name (str, default "world"); source (str): where the world came from (for the record).
    """

    def __init__(self, world: dict, *, name: str = "world", source: str = ""):
        self.world, self.name, self.source = world, name, source
        self.entities: dict[str, str] = world["entities"]
        self.facts = {(f["relation"], f["subject"]): f for f in world["facts"]}
        self.questions: dict[str, dict] = world["questions"]

    @classmethod
    def load(cls, path: str | Path) -> "WorldJudge":
        """Read ``world.json`` (or a directory holding it).

        Raises:
            DataError: missing or unreadable file, or not a world file.
        """
        path = Path(path)
        if path.is_dir():
            path = path / "world.json"
        if not path.exists():
            raise DataError("world file not found (write one with `memreason world generate`)", file=str(path))
        data = read_json(path, what="world file")
        if not isinstance(data, dict) or data.get("format") != WORLD_FORMAT:
            raise DataError(f"not a world file (expected format {WORLD_FORMAT!r})", file=str(path), field="format")
        return cls(data, source=str(path))

    def describe(self) -> dict:
        return {"judge": "world", "world": self.source, "world_digest": settings_digest(self.world)}

    # -- single steps -----------------------------------------------------------------------------------

    def check_memory(self, text: str) -> StepCheck | None:
        """The verdict on a memory step, or None when it is no relation's wording."""
        text = _clean(text)
        found = [(relation, m.group("s"), m.group("o")) for relation, pattern in _MEMORY_PATTERNS
                 if (m := pattern.match(text))]
        if not found:
            return None
        # several wordings can match one sentence; trust the reading whose names are entities
        found.sort(key=lambda x: -((x[1] in self.entities) + (x[2] in self.entities)))
        relation, subject, obj = found[0]
        claim = ((relation,), subject, obj)
        unknown = [n for n in (subject, obj) if n not in self.entities]
        if unknown:
            return StepCheck(MEMORY, UNKNOWN_ENTITY, f"{unknown[0]!r} is not an entity of the world", claim=claim)
        fact = self.facts.get((relation, subject))
        if fact is not None and fact["object"] == obj:
            return StepCheck(MEMORY, TRUE, f"{relation}({subject}) = {obj}", fact["id"], claim)
        truth = fact["object"] if fact else "nothing (wrong entity type)"
        return StepCheck(MEMORY, FALSE, f"{relation}({subject}) is {truth}, not {obj}", claim=claim)

    def check_composite(self, text: str) -> StepCheck | None:
        """The verdict on a composite recall (a whole chain stated as one fact), or None when it is not one."""
        parsed = _parse_chain(_COMPOSITE.match(_clean(text)))
        if parsed is None:
            return None
        path, subject, obj = parsed
        claim = (path, subject, obj)
        unknown = [n for n in (subject, obj) if n not in self.entities]
        if unknown:
            return StepCheck(MEMORY, UNKNOWN_ENTITY, f"{unknown[0]!r} is not an entity of the world", claim=claim)
        current = subject
        for relation in path:
            fact = self.facts.get((relation, current))
            if fact is None:
                return StepCheck(MEMORY, FALSE, f"{relation}({current}) does not exist (wrong entity type)", claim=claim)
            current = fact["object"]
        if current != obj:
            return StepCheck(MEMORY, FALSE, f"composite recall: the chain leads to {current}, not {obj}", claim=claim)
        return StepCheck(MEMORY, TRUE, f"composite recall: {subject} → {obj}", claim=claim)

    def check_steps(self, row: Result) -> list[StepCheck]:
        """Check every step of a result row in order (see the module docstring).

        Raises:
            NotApplicable: the row's question is not in this world.
        """
        meta = self.questions.get(row.id)
        if meta is None:
            raise NotApplicable("the question is not in this world")
        stated: dict[tuple, str] = {}     # (path, subject) -> object, as the memory steps say
        concluded: dict[str, str] = {}    # subject -> chain conclusion, as the steps say
        checks = []
        for step in row.steps:
            text = _clean(step.text)
            memory = self.check_memory(text)
            if memory is None or memory.status == UNKNOWN_ENTITY:
                # "The birthplace of the mentor of X is Y." reads as a born_in fact about an unknown entity
                # "the mentor of X"; it is a composite recall when the chain parses
                memory = self.check_composite(text) or memory
            if memory is not None:
                path, subject, obj = memory.claim
                stated[(path, subject)] = obj
                checks.append(memory)
                continue
            checks.append(self._check_reason(text, meta, stated, concluded))
        return checks

    def _check_reason(self, text: str, meta: dict, stated: dict, concluded: dict) -> StepCheck:
        path, subjects, form = tuple(meta["path"]), meta["subjects"], meta["form"]
        if (m := _CHAIN.match(text)) and " of " in m.group("mid"):
            parsed = _parse_chain(m, min_hops=1)
            if parsed is None:
                return StepCheck(REASON, INVALID, f"unknown relation in chain {m.group('mid')!r}")
            chain, subject, obj = parsed
            if chain != path or subject not in subjects:
                return StepCheck(REASON, INVALID, "derives a different chain or subject than the question asks")
            concluded[subject] = obj
            current, i = subject, 0
            while i < len(chain):  # hop by stated facts, or by a stated composite recall of several hops
                j = next((j for j in range(len(chain), i, -1) if (chain[i:j], current) in stated), None)
                if j is None:
                    return StepCheck(REASON, INVALID, f"no earlier step states {chain[i]}({current})")
                current, i = stated[(chain[i:j], current)], j
            if current != obj:
                return StepCheck(REASON, INVALID, f"the stated facts lead to {current}, not {obj}")
            return StepCheck(REASON, VALID, f"follows: {subject} → {current}")
        if form == "comparison" and (m := _SAME.match(text)):
            if [m.group("o1"), m.group("o2")] != [concluded.get(s) for s in subjects]:
                return StepCheck(REASON, INVALID, "compares something other than the two chain conclusions")
            same = m.group("rel").lower().startswith("are the same")
            if same != (m.group("o1") == m.group("o2")):
                return StepCheck(REASON, INVALID, "the comparison is decided wrongly")
            return StepCheck(REASON, VALID, "decides the comparison", decision=YES if same else NO)
        if form == "choice" and (m := _CHOICE.match(text)):
            options, letter = meta["options"], m.group("letter")
            if m.group("o") != concluded.get(subjects[0]):
                return StepCheck(REASON, INVALID, "picks an option for something other than the chain conclusion")
            index = ord(letter) - ord("A")
            if index >= len(options) or options[index] != m.group("o"):
                return StepCheck(REASON, INVALID, f"option {letter} is not {m.group('o')}")
            return StepCheck(REASON, VALID, "picks the option", decision=letter)
        if form == "yes_no" and (m := _YES_NO.match(text)):
            if m.group("o") != concluded.get(subjects[0]) or m.group("c") != meta["candidate"]:
                return StepCheck(REASON, INVALID, "compares something other than the chain conclusion and the candidate")
            equal = m.group("o") == m.group("c")
            yes = m.group("ans").lower() == "yes"
            if equal != (m.group("neg") is None) or yes != equal:
                return StepCheck(REASON, INVALID, "the yes/no decision does not follow")
            return StepCheck(REASON, VALID, "decides yes/no", decision=YES if yes else NO)
        return StepCheck(None, UNPARSED, "matches no wording of the world")

    # -- the Judge interface ----------------------------------------------------------------------------

    def attribute_error(self, row: Result) -> ErrorVerdict:
        """Where a wrong answer first went wrong (see the module docstring).

        Raises:
            NotApplicable: no steps, a question not in the world, or an unchecked unlabelled step first.
        """
        steps = judged_steps(row)
        checks = self.check_steps(row)
        correct = tuple(c.ok for c in checks)
        types = tuple(c.type for c in checks)
        evidence = tuple((c.fact_id, 1.0) if c.fact_id else None for c in checks)
        first = next((i for i, c in enumerate(checks) if not c.ok), None)
        if first is not None:
            source = checks[first].type or steps[first].kind
            if source not in (MEMORY, REASON):
                raise NotApplicable(f"step {first + 1} matches no wording and has no memory/reason label")
            explanation = f"step {first + 1} ({source}, {checks[first].status}): {checks[first].detail}"
            return ErrorVerdict(source, first, correct, types, explanation, evidence)
        decided = _decision(checks)
        if decided is None:
            explanation = "every step checks out, but none decides the answer"
        elif decided != row.predicted:
            explanation = f"the steps decide {decided}, but the answer line says {row.predicted}"
        else:
            explanation = "every step checks out and the answer follows; the steps answer another question"
        return ErrorVerdict(REASON, None, correct, types, explanation, evidence)

    def answer_follows(self, row: Result) -> bool:
        """Whether every step checks out and the answer line states what the last decision step decided
        (true of every gold trace)."""
        checks = self.check_steps(row)
        decided = _decision(checks)
        return all(c.ok for c in checks) and decided is not None and decided == row.predicted

    def check_decoupling(self, row: Result) -> DecouplingVerdict:
        """Whether memory-labelled steps state facts (true or false) and reason-labelled steps derive.

        Raises:
            NotApplicable: no steps, or a question not in the world.
        """
        steps = judged_steps(row)
        checks = self.check_steps(row)
        forms = tuple({MEMORY: "fact", REASON: "inference"}.get(c.type, "other") for c in checks)
        decoupled = tuple(None if s.kind not in (MEMORY, REASON) else (c.type == s.kind) for s, c in zip(steps, checks))
        return DecouplingVerdict(forms, decoupled, tuple((c.fact_id, 1.0) if c.fact_id else None for c in checks))


def _parse_chain(match: re.Match | None, min_hops: int = 2) -> tuple[tuple[str, ...], str, str] | None:
    """``(path, subject, object)`` from a match with groups ``mid`` ("country of the base of X") and ``o``;
    None when a noun is not a relation's or the chain is shorter than ``min_hops``."""
    if match is None or " of " not in match.group("mid"):
        return None
    *nouns, last = match.group("mid").split(" of the ")
    noun, _, subject = last.partition(" of ")
    nouns.append(noun)
    if any(n not in _NOUNS for n in nouns) or len(nouns) < min_hops:
        return None
    return tuple(_NOUNS[n] for n in reversed(nouns)), subject, match.group("o")


def _decision(checks: list[StepCheck]) -> str | None:
    """What the last decision step decided (None without one)."""
    return next((c.decision for c in reversed(checks) if c.decision is not None), None)

