"""The synthetic knowledge world: invented entities, facts between them, and multi-hop questions whose
gold traces can be checked step by step.

On real datasets nobody can say whether a recalled "fact" is true, nor whether a wrong answer came from
memory or from reasoning. Here every fact is known and fictional (names are built from seeded syllables,
so no pretrained model can know them), and every question's gold ``Trace`` recalls exactly the facts it
needs (memory steps) and derives its answer from them (reason steps), each step linked to its fact ids.

The world (``WorldConfig`` knobs, all seeded by ``seed``):

- entities of four types: person, city, country, organisation;
- five relations, each a total function ``subject → object``: ``born_in`` (person → city), ``works_for``
  (person → organisation), ``mentor`` (person → person), ``based_in`` (organisation → city) and
  ``located_in`` (city → country);
- each fact is rendered in four paraphrases with the object last (so a sentence prefix is a cloze
  probe). The knowledge corpus repeats each fact ``mentions`` times, cycling through paraphrases 0-2;
  paraphrase 3 never enters the corpus and probes recall under unseen wording. Memory steps use
  paraphrase 0;
- questions follow a relation path of ``min_hops``-``max_hops`` relations (every chain whose types fit,
  e.g. mentor → born_in → located_in: "the country of the birthplace of the mentor of X"), in three forms:
  yes/no ("Is C the ... of X?"), multiple choice (three options) and comparison ("Do X and Y have the same
  ...?", two-hop paths only, to keep traces short);
- ``heldout_pairs`` names adjacent relation pairs (``"based_in>located_in"``): every question whose path
  contains such a pair goes to the ``test_heldout`` split and none to training, so that split tests
  composing relations the model has only seen in other combinations.

``write_world(world, dir)`` writes files the existing loaders and judges read (see its docstring).
"""

from __future__ import annotations

import dataclasses
import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from memreason.errors import ConfigError
from memreason.io import atomic_write, ensure_dir
from memreason.traces import MEMORY, REASON, Step, Trace

WORLD_FORMAT = "memreason-world/1"
TYPES = ("person", "city", "country", "organisation")
FORMS = ("yes_no", "choice", "comparison")
SPLITS = ("train", "test", "test_heldout")


@dataclass(frozen=True)
class Relation:
    """A relation between two entity types. ``noun`` names the object in a chain ("the birthplace of X");
    ``templates`` are the paraphrases, each ending with ``{o}.``"""

    name: str
    subject: str
    object: str
    noun: str
    templates: tuple[str, ...]


# Paraphrase 3 of each relation is the unseen-wording probe: it is never written into the corpus.
RELATIONS: dict[str, Relation] = {r.name: r for r in (
    Relation("born_in", "person", "city", "birthplace",
             ("{s} was born in {o}.", "The birthplace of {s} is {o}.", "{s} came into the world in {o}.",
              "The home town of {s} is {o}.")),
    Relation("works_for", "person", "organisation", "employer",
             ("{s} works for {o}.", "The employer of {s} is {o}.", "{s} is on the staff of {o}.",
              "{s} earns a living at {o}.")),
    Relation("mentor", "person", "person", "mentor",
             ("The mentor of {s} is {o}.", "{s} was trained by {o}.", "{s} learned the trade from {o}.",
              "{s} studied under {o}.")),
    Relation("based_in", "organisation", "city", "base",
             ("{s} is based in {o}.", "The headquarters of {s} are in {o}.", "{s} has its main office in {o}.",
              "{s} runs its business from {o}.")),
    Relation("located_in", "city", "country", "country",
             ("{s} is in {o}.", "{s} lies in the country of {o}.", "The city of {s} belongs to {o}.",
              "{s} is a city of {o}.")),
)}
CORPUS_TEMPLATES = 3  # paraphrases 0..2 go into the corpus; 3 is held out for probing
PROBE_TEMPLATE = 3

# Reason-step and question wordings (the judge parses the same strings; see analysis/world_judge.py).
CHAIN_STEP = "So the {chain} of {s} is {o}."
YES_STEP, NO_STEP = "{o} is {c}, so yes.", "{o} is not {c}, so no."
CHOICE_STEP = "{o} is option {letter}."
SAME_STEP, DIFFERENT_STEP = "{o1} and {o2} are the same, so yes.", "{o1} and {o2} differ, so no."
YES, NO = "Yes", "No"

_ONSETS = ("b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z")
_VOWELS = ("a", "e", "i", "o", "u")
_CODAS = ("", "", "n", "r", "l", "s")
_SUFFIX = {"city": ("ford", "holm", "mere", "stad", "wick"), "country": ("ia", "land", "mark", "onia"),
           "organisation": (" Labs", " Works", " Guild", " Foundry", " Trust")}


@dataclass(frozen=True)
class WorldConfig:
    """The knobs of a world. The defaults make the ablation fit a CPU budget (see ``world_ablate``).

    Args:
        seed (int, default 0): every random choice of the world depends on it and nothing else.
        n_people, n_cities, n_countries, n_organisations (int): world size.
        mentions (int, default 3): how often each fact appears in the knowledge corpus (cycling through
            three paraphrases).
        min_hops, max_hops (int, default 2, 3): relations per question path.
        n_train, n_test, n_heldout (int): questions per split (fewer when the world has fewer).
        heldout_pairs (str, default "based_in>located_in"): comma-separated adjacent relation pairs
            ``a>b`` whose composition never appears in training questions; empty for none.

    Raises:
        ConfigError: a value out of range or an unknown relation in ``heldout_pairs``.
    """

    seed: int = 0
    n_people: int = 24
    n_cities: int = 8
    n_countries: int = 4
    n_organisations: int = 6
    mentions: int = 3
    min_hops: int = 2
    max_hops: int = 3
    n_train: int = 150
    n_test: int = 40
    n_heldout: int = 30
    heldout_pairs: str = "based_in>located_in"

    def __post_init__(self):
        for name in ("n_people", "n_cities", "n_countries", "n_organisations"):
            if getattr(self, name) < 3:
                raise ConfigError(f"world.{name} must be >= 3 (multiple choice needs three options), "
                                  f"got {getattr(self, name)}")
        if self.n_people > 400:
            raise ConfigError(f"world.n_people must be <= 400 (unique syllable names), got {self.n_people}")
        if self.mentions < 1:
            raise ConfigError(f"world.mentions must be >= 1, got {self.mentions}")
        if not 2 <= self.min_hops <= self.max_hops <= 3:
            raise ConfigError(f"world hops must satisfy 2 <= min_hops <= max_hops <= 3, got "
                              f"{self.min_hops}..{self.max_hops}")
        for name in ("n_train", "n_test", "n_heldout"):
            if getattr(self, name) < 0:
                raise ConfigError(f"world.{name} must be >= 0, got {getattr(self, name)}")
        if self.n_train < 1:
            raise ConfigError("world.n_train must be >= 1")
        self.pairs()  # validates the names

    def pairs(self) -> frozenset[tuple[str, str]]:
        """The held-out relation pairs as ``(first, second)`` tuples."""
        out = set()
        for item in filter(None, (p.strip() for p in self.heldout_pairs.split(","))):
            first, sep, second = item.partition(">")
            if not sep or first.strip() not in RELATIONS or second.strip() not in RELATIONS:
                raise ConfigError(f"world.heldout_pairs: {item!r} is not 'relation>relation' with relations "
                                  f"from {', '.join(RELATIONS)}")
            out.add((first.strip(), second.strip()))
        return frozenset(out)


@dataclass(frozen=True)
class Fact:
    """One true statement ``relation(subject) = object``; ``id`` is stable for a seed."""

    id: str
    relation: str
    subject: str
    object: str

    def text(self, template: int = 0) -> str:
        return RELATIONS[self.relation].templates[template].format(s=self.subject, o=self.object)

    def prefix(self, template: int = 0) -> str:
        """The sentence up to (not including) the object: a cloze probe."""
        return RELATIONS[self.relation].templates[template].split("{o}")[0].format(s=self.subject).rstrip()


@dataclass
class World:
    """Entities (name → type), facts (by id), and questions per split (gold Traces)."""

    config: WorldConfig
    entities: dict[str, str]
    facts: dict[str, Fact]
    questions: dict[str, list[Trace]] = field(default_factory=dict)

    def lookup(self, relation: str, subject: str) -> Fact | None:
        return self._index.get((relation, subject))

    def __post_init__(self):
        self._index = {(f.relation, f.subject): f for f in self.facts.values()}

    def names_of(self, kind: str) -> list[str]:
        return sorted(n for n, t in self.entities.items() if t == kind)

    def corpus(self) -> list[str]:
        """The knowledge corpus: each fact ``mentions`` times, cycling through the corpus paraphrases, in a
        seeded order."""
        sentences = [fact.text(k % CORPUS_TEMPLATES) for fact in self.facts.values()
                     for k in range(self.config.mentions)]
        random.Random(self.config.seed + 1).shuffle(sentences)
        return sentences


def chain_phrase(path: tuple[str, ...]) -> str:
    """``("mentor", "born_in")`` → ``"birthplace of the mentor"`` (the last relation is named first)."""
    return " of the ".join(RELATIONS[r].noun for r in reversed(path))


def paths(min_hops: int, max_hops: int) -> list[tuple[str, ...]]:
    """Every chain of relations whose types fit, in a fixed order."""
    out, frontier = [], [(r,) for r in RELATIONS]
    for hops in range(2, max_hops + 1):
        frontier = [p + (r,) for p in frontier for r in RELATIONS
                    if RELATIONS[p[-1]].object == RELATIONS[r].subject]
        if hops >= min_hops:
            out += frontier
    return out


def _names(rng: random.Random, count: int, kind: str, taken: set[str]) -> list[str]:
    out = []
    while len(out) < count:
        stem = "".join(rng.choice(seq) for seq in (_ONSETS, _VOWELS, _CODAS, _ONSETS, _VOWELS))
        if kind == "person":
            name = f"{stem.capitalize()} " + "".join(rng.choice(s) for s in (_ONSETS, _VOWELS, _CODAS)).capitalize()
        else:
            name = stem.capitalize() + rng.choice(_SUFFIX[kind])
        # a name must never contain another (the judge reads names out of sentences)
        if any(name in other or other in name for other in taken):
            continue
        taken.add(name)
        out.append(name)
    return out


def _follow(world: World, subject: str, path: tuple[str, ...]) -> list[Fact]:
    facts, current = [], subject
    for relation in path:
        fact = world.lookup(relation, current)
        facts.append(fact)
        current = fact.object
    return facts


def _chain_steps(world: World, subject: str, path: tuple[str, ...]) -> tuple[list[Step], list[list[str]], str]:
    """Memory steps for each hop and the chain conclusion; per-step fact ids; the answer entity."""
    facts = _follow(world, subject, path)
    steps = [Step(MEMORY, f.text()) for f in facts]
    steps.append(Step(REASON, CHAIN_STEP.format(chain=chain_phrase(path), s=subject, o=facts[-1].object)))
    return steps, [[f.id] for f in facts] + [[f.id for f in facts]], facts[-1].object


def _question(world: World, rng: random.Random, path: tuple[str, ...], form: str, subjects: tuple[str, ...]) -> Trace:
    chain = chain_phrase(path)
    target_type = RELATIONS[path[-1]].object
    steps, links, objects = [], [], []
    for subject in subjects:
        s, l, o = _chain_steps(world, subject, path)
        steps += s
        links += l
        objects.append(o)
    used = sorted({fid for step_links in links for fid in step_links})
    meta: dict[str, Any] = {"form": form, "path": list(path), "subjects": list(subjects)}
    if form == "yes_no":
        truth = rng.random() < 0.5
        candidate = objects[0] if truth else rng.choice([n for n in world.names_of(target_type) if n != objects[0]])
        question = f"Is {candidate} the {chain} of {subjects[0]}?"
        decide = (YES_STEP if truth else NO_STEP).format(o=objects[0], c=candidate)
        answer, meta["candidate"] = (YES if truth else NO), candidate
    elif form == "choice":
        options = rng.sample([n for n in world.names_of(target_type) if n != objects[0]], 2) + [objects[0]]
        rng.shuffle(options)
        letter = "ABC"[options.index(objects[0])]
        question = (f"What is the {chain} of {subjects[0]}? Options: "
                    + " ".join(f"{'ABC'[i]}. {o}" for i, o in enumerate(options)))
        decide = CHOICE_STEP.format(o=objects[0], letter=letter)
        answer, meta["options"] = letter, options
    else:
        question = f"Do {subjects[0]} and {subjects[1]} have the same {chain}?"
        same = objects[0] == objects[1]
        decide = (SAME_STEP if same else DIFFERENT_STEP).format(o1=objects[0], o2=objects[1])
        answer = YES if same else NO
    steps.append(Step(REASON, decide))
    links.append(used)
    meta["step_facts"] = links
    meta["fact_ids"] = used
    return Trace(question=question, steps=tuple(steps), answer=answer, meta=meta)


def generate_world(config: WorldConfig | None = None) -> World:
    """Build a world and its questions; the same config gives the same world, byte for byte.

    Returns:
        World: with ``questions`` keyed by split (``train``, ``test``, ``test_heldout``); question ids are
        ``w<seed>-q<index>`` and each Trace's ``meta`` holds ``form``, ``path``, ``subjects``,
        ``step_facts`` (fact ids per step) and ``fact_ids``.
    """
    config = config or WorldConfig()
    rng = random.Random(config.seed)
    taken: set[str] = set()
    entities: dict[str, str] = {}
    counts = {"person": config.n_people, "city": config.n_cities, "country": config.n_countries,
              "organisation": config.n_organisations}
    for kind in TYPES:
        for name in _names(rng, counts[kind], kind, taken):
            entities[name] = kind
    by_type = {kind: [n for n, t in entities.items() if t == kind] for kind in TYPES}
    facts: dict[str, Fact] = {}
    for relation in RELATIONS.values():
        objects = by_type[relation.object]
        for subject in by_type[relation.subject]:
            choices = [o for o in objects if o != subject]  # nobody mentors themselves
            # every object is used at least once where possible (so every city has a country, ...)
            obj = choices[len(facts) % len(choices)] if relation.name == "located_in" else rng.choice(choices)
            fid = f"f{len(facts):03d}"
            facts[fid] = Fact(fid, relation.name, subject, obj)
    world = World(config, entities, facts)

    heldout = config.pairs()
    items = []  # (path, form, subjects)
    for path in paths(config.min_hops, config.max_hops):
        subjects = by_type[RELATIONS[path[0]].subject]
        for subject in subjects:
            items.append((path, "yes_no", (subject,)))
            items.append((path, "choice", (subject,)))
        if len(path) == 2:
            others = list(subjects)
            for subject in subjects:
                items.append((path, "comparison", (subject, rng.choice([o for o in others if o != subject]))))
    rng.shuffle(items)
    pools: dict[str, list] = {"train": [], "test_heldout": []}
    for item in items:
        is_heldout = any(pair in heldout for pair in zip(item[0], item[0][1:]))
        pools["test_heldout" if is_heldout else "train"].append(item)
    chosen = {"train": pools["train"][:config.n_train],
              "test": pools["train"][config.n_train:config.n_train + config.n_test],
              "test_heldout": pools["test_heldout"][:config.n_heldout]}
    index = 0
    for split in SPLITS:
        traces = []
        for path, form, subjects in chosen[split]:
            trace = _question(world, rng, path, form, subjects)
            trace.meta.update(id=f"w{config.seed}-q{index:04d}", split=split)
            traces.append(trace)
            index += 1
        world.questions[split] = traces
    return world


def write_world(world: World, directory: str | Path) -> dict[str, Path]:
    """Write a world as files the rest of memreason reads.

    Files:
        ``world.json``: config, entities, facts (id, relation, subject, object, text), and per question id
            its split, form, path, subjects, options/candidate and fact ids (what ``WorldJudge`` reads);
        ``questions.jsonl``: every question as our JSONL (``Trace.to_dict()`` with ``split``), for
            ``memreason train`` / ``eval`` with ``--task freeform``;
        ``corpus.jsonl``: the knowledge corpus, one sentence per record (``question`` = the sentence,
            ``answer`` = its fact's object, ``meta.fact_id``), for training with ``data.objective=text``;
        ``facts.json``: a ``memreason-facts/1`` table (paraphrases as aliases, facts per question) for the
            generic ``ExactJudge`` of ``memreason inspect``.

    Returns:
        dict[str, Path]: the written paths by short name.
    """
    out = ensure_dir(directory)
    paths_out = {name: out / file for name, file in (("world", "world.json"), ("questions", "questions.jsonl"),
                                                     ("corpus", "corpus.jsonl"), ("facts", "facts.json"))}
    questions = {t.id: {k: v for k, v in t.meta.items() if k not in ("id", "step_facts")}
                 for split in SPLITS for t in world.questions.get(split, [])}
    data = {"format": WORLD_FORMAT, "config": dataclasses.asdict(world.config), "entities": world.entities,
            "facts": [{**dataclasses.asdict(f), "text": f.text()} for f in world.facts.values()],
            "questions": questions}
    atomic_write(paths_out["world"], json.dumps(data, indent=1, ensure_ascii=False) + "\n")
    lines = []
    for split in SPLITS:
        for trace in world.questions.get(split, []):
            record = trace.to_dict()
            record["split"] = split
            lines.append(json.dumps(record, ensure_ascii=False))
    atomic_write(paths_out["questions"], "\n".join(lines) + "\n")
    by_text = {f.text(k): f for f in world.facts.values() for k in range(CORPUS_TEMPLATES)}
    corpus = [json.dumps({"question": s, "steps": [], "answer": by_text[s].object, "split": "train",
                          "meta": {"fact_id": by_text[s].id}}, ensure_ascii=False) for s in world.corpus()]
    atomic_write(paths_out["corpus"], "\n".join(corpus) + "\n")
    table = {"format": "memreason-facts/1",
             "facts": [{"id": f.id, "text": f.text(), "aliases": [f.text(k) for k in range(1, len(RELATIONS[f.relation].templates))]}
                       for f in world.facts.values()],
             "questions": {qid: q["fact_ids"] for qid, q in questions.items()}}
    atomic_write(paths_out["facts"], json.dumps(table, indent=1, ensure_ascii=False) + "\n")
    return paths_out



