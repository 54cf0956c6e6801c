"""Cloze probes: does a model know a world's facts, measured directly, before any reasoning training.

For every fact, the model reads a sentence prefix (``"Kode Fa was born in"``) and the true object and
``distractors`` other entities of its type (seeded) are scored as its continuation by the summed
log-probability of ``" <name>."`` (``memreason.generate.continuation_logprobs``). Recall@1 is the share of
facts whose true object scores highest; chance is ``1 / number of candidates``. A few distractors instead
of every entity keep the probe cheap on a CPU. Ranking instead of free generation means a model that has
not learnt the sentence format is not scored as ignorant, and nothing is parsed.

Prefixes come from one paraphrase per call: a corpus paraphrase (the wording the model was trained on)
or the held-out one (``PROBE_TEMPLATE``, never in the corpus), so the two numbers separate remembering a
sentence from knowing a fact.
"""

from __future__ import annotations

import random

from memreason.data.world import RELATIONS, World
from memreason.generate import continuation_logprobs, encode_prompts, pad_id
from memreason.stats import wilson_ci


def cloze_recall(model, tokenizer, world: World, template: int, *, distractors: int = 3, seed: int = 0,
                 batch_size: int = 32) -> dict:
    """Recall@1 of every fact of ``world`` by ranking candidate objects after a paraphrase prefix.

    Args:
        model, tokenizer: a causal LM (eval mode) and its tokenizer.
        world (World): the facts to probe.
        template (int): which paraphrase gives the prefix (0-2: in the corpus; 3: held out).
        distractors (int, default 3): wrong candidates per fact (fewer when the type has fewer entities).
        seed (int, default 0): picks the distractors (the same for every model, so recalls compare).
        batch_size (int, default 32).

    Returns:
        dict: ``n``, ``correct``, ``recall`` and its ``ci95``, ``chance`` (mean 1/candidates), ``template``,
        and ``by_relation`` {relation: {n, correct, recall}}.
    """
    rng = random.Random(seed)
    pairs, spans, facts = [], [], []
    for fact in world.facts.values():
        others = [n for n in world.names_of(RELATIONS[fact.relation].object) if n not in (fact.subject, fact.object)]
        candidates = sorted(rng.sample(others, min(distractors, len(others))) + [fact.object])
        start = len(pairs)
        pairs += [(fact.prefix(template), f" {name}.") for name in candidates]
        spans.append((start, candidates))
        facts.append(fact)
    # prefix and continuation tokenised separately and their ids joined, as training does
    encoded = list(zip(encode_prompts(tokenizer, [p for p, _ in pairs]),
                       encode_prompts(tokenizer, [c for _, c in pairs])))
    scores = continuation_logprobs(model, encoded, pad_id(tokenizer), batch_size)
    by_relation: dict[str, dict] = {}
    correct, chance = 0, 0.0
    for fact, (start, candidates) in zip(facts, spans):
        best = max(range(len(candidates)), key=lambda k: scores[start + k])
        hit = candidates[best] == fact.object
        correct += hit
        chance += 1 / len(candidates)
        entry = by_relation.setdefault(fact.relation, {"n": 0, "correct": 0})
        entry["n"] += 1
        entry["correct"] += hit
    for entry in by_relation.values():
        entry["recall"] = entry["correct"] / entry["n"]
    n = len(facts)
    low, high = wilson_ci(correct, n)
    return {"template": template, "n": n, "correct": correct, "recall": correct / n, "ci95": [low, high],
            "chance": chance / n, "by_relation": by_relation}
