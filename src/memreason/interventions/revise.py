"""Revision: change one step of a model's own trace and let the model continue from there.

``revise_batch(model, tokenizer, task, scheme, [(result, edit), ...])`` keeps the model's output before
step ``i`` exactly (its own generated token ids, teacher-forced after the same prompt), applies the edit,
and continues greedily to the answer line:

* ``replace``: step ``i`` becomes the given text (its kind kept unless another is given), written as the
  scheme writes steps; the model writes every later step again.
* ``regenerate``: step ``i`` and everything after it are dropped and generated again (no edit: the
  control for "did the edit, or the regeneration, change the answer?").
* ``delete``: step ``i`` is removed, the later steps are kept as written, and the answer is generated
  again (what does the model answer without this step?).

Optionally a memory vector (``Injection``) is added to one layer's attention output while the model
continues: the memory text of the edited step (or any text) encoded by ``interventions.memory_injection``,
injected at every position of the forward passes that continue the trace ("all", the paper's choice).
Strength 0 is an exact no-op.

Token exactness: the kept output is the longest run of the original token ids whose decoded text is a
prefix of the new text; only the changed remainder is tokenised afresh. Revising step ``i`` with its own
text and kind therefore re-feeds the original tokens, and greedy decoding reproduces the original trace.
Rows written before schema 2 have no token ids; their text is re-tokenised (logged once per batch).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Literal, Sequence

from memreason.confidence import step_confidences
from memreason.errors import ConfigError
from memreason.generate import Generation, encode_prompts, generate_ids
from memreason.model.tokens import ANSWER, TokenScheme, count_markers, format_step, parse, spans, step_spans
from memreason.tasks import CORRECT, UNPARSEABLE, WRONG, Task
from memreason.traces import STEP_KINDS, Result, Step, Trace

logger = logging.getLogger(__name__)

Action = Literal["replace", "regenerate", "delete"]
ACTIONS = ("replace", "regenerate", "delete")


@dataclass(frozen=True)
class Edit:
    """What to change in a trace.

    Args:
        step (int): 0-based index into the trace's steps (negative counts from the end).
        action (str, default "replace"): ``replace``, ``regenerate`` or ``delete``.
        text (str | None): the new step text (``replace`` only).
        kind (str | None): the new step kind (``replace`` only; default: the step's own kind).
    """

    step: int
    action: Action = "replace"
    text: str | None = None
    kind: str | None = None

    def __post_init__(self):
        if self.action not in ACTIONS:
            raise ConfigError(f"unknown revision action {self.action!r}; choose one of {', '.join(ACTIONS)}")
        if self.action == "replace":
            if not isinstance(self.text, str) or not self.text.strip():
                raise ConfigError("a replace edit needs the new step text")
        elif self.text is not None or self.kind is not None:
            raise ConfigError(f"a {self.action} edit takes no text or kind")
        if self.kind is not None and self.kind not in STEP_KINDS:
            raise ConfigError(f"step kind must be one of {', '.join(STEP_KINDS)}, got {self.kind!r}")


@dataclass(frozen=True)
class Injection:
    """A memory vector added while the revised trace continues (see ``memory_injection``).

    Args:
        layer (int): 0-based layer whose attention output is edited.
        tau (float): strength (``tau_mode`` absolute or relative, as in ``memory_injection.inject``).
        memory (str | None): the text to encode; None = the text of the edited step (the corrected memory).
        encoder (str, default "unembed"), tau_mode (str, default "relative").
    """

    layer: int
    tau: float
    memory: str | None = None
    encoder: str = "unembed"
    tau_mode: str = "relative"

    def __post_init__(self):
        if isinstance(self.tau, bool) or not isinstance(self.tau, (int, float)) or not math.isfinite(self.tau):
            raise ConfigError(f"injection tau must be a finite number, got {self.tau!r}")


def _new_output_text(result: Result, edit: Edit, scheme: TokenScheme) -> tuple[str, int, Step, Step | None]:
    """The output text to teacher-force, the resolved step index, and the old and new step."""
    raw = result.raw
    located = step_spans(raw)
    if not located:
        raise ConfigError(f"row {result.id!r} has no steps to revise")
    index = edit.step + len(located) if edit.step < 0 else edit.step
    if not 0 <= index < len(located):
        raise ConfigError(f"row {result.id!r} has {len(located)} steps; step {edit.step} does not exist")
    span = located[index]
    old = Step(span.kind, span.body(raw))
    head = raw[:span.start]
    if head and not head.endswith("\n"):
        head += "\n"  # a step always starts a line
    if edit.action == "regenerate":
        return head, index, old, None
    if edit.action == "delete":
        answer = next((s for s in spans(raw) if s.kind == ANSWER), None)
        tail = raw[span.end:answer.start if answer is not None else len(raw)]
        return head + tail, index, old, None
    new = Step(edit.kind or old.kind, edit.text.strip())
    try:
        return head + format_step(new, scheme) + "\n", index, old, new
    except ValueError as exc:
        raise ConfigError(f"cannot write the new step: {exc}") from None


def _forced_ids(tokenizer, original: Sequence[int], text: str, edit_start: int = 0) -> list[int]:
    """Token ids of ``text``: the longest run of ``original`` ids decoding to a prefix of it, then the rest
    tokenised afresh.

    A kept token may only reach into the edited part (from ``edit_start`` on) when it covers the text to
    its end: an old token that merely matches the first characters of a new step (a lone space, the first
    syllable of a name) would give the new text a tokenisation the model never writes.
    """
    kept, decoded = 0, ""
    for k in range(1, len(original) + 1):
        piece = tokenizer.decode(original[:k], skip_special_tokens=True)
        if not text.startswith(piece):
            break
        kept, decoded = k, piece
    while kept and edit_start < len(decoded) < len(text):
        kept -= 1
        decoded = tokenizer.decode(original[:kept], skip_special_tokens=True)
    rest = text[len(decoded):]
    tail = tokenizer(rest, add_special_tokens=False)["input_ids"] if rest else []
    return list(original[:kept]) + list(tail)


def _score(task: Task, gold: str | None, text: str) -> tuple[str | None, str]:
    predicted = task.extract(text)
    if predicted is None:
        return None, UNPARSEABLE
    return predicted, CORRECT if gold is not None and task.is_correct(predicted, gold) else WRONG


def _injection_deltas(model, tokenizer, memories: Sequence[str | None], injection: Injection):
    """``[batch, d_model]`` vectors to add at ``injection.layer`` (zero rows for rows without a memory)."""
    import torch

    from memreason.interventions.memory_injection import memory_vector, residual_norms, scaled_delta

    reference = float(residual_norms(model, tokenizer)[injection.layer]) if injection.tau_mode == "relative" else None
    rows = []
    hidden = model.config.hidden_size
    for memory in memories:
        if not memory:
            rows.append(torch.zeros(hidden))
            continue
        vector = memory_vector(model, tokenizer, memory, encoder=injection.encoder, layer=injection.layer).float()
        rows.append(scaled_delta(vector, float(injection.tau), injection.tau_mode, reference) if injection.tau else
                    torch.zeros(hidden))
    return torch.stack(rows)


def _generate(model, tokenizer, sequences, memories, injection, max_new_tokens, batch_size):
    if injection is None or not any(memories):
        return generate_ids(model, tokenizer, sequences, max_new_tokens=max_new_tokens, batch_size=batch_size,
                            logprobs=True)
    from memreason.interventions.memory_injection import add_to_attention_output

    # One vector per row: each generate call gets exactly the rows of one batch, already in the order
    # generate_ids would put them in (longest first, stable), with rows kept in the batch until it ends
    # (prune=False) so the vectors stay aligned with the rows.
    deltas = _injection_deltas(model, tokenizer, memories, injection)
    order = sorted(range(len(sequences)), key=lambda i: -len(sequences[i]))
    out: list = [None] * len(sequences)
    for start in range(0, len(order), batch_size):
        rows = order[start:start + batch_size]
        with add_to_attention_output(model, {injection.layer: deltas[rows]}, "all"):
            made = generate_ids(model, tokenizer, [sequences[i] for i in rows], max_new_tokens=max_new_tokens,
                                batch_size=len(rows), logprobs=True, prune=False)
        for i, generation in zip(rows, made):
            out[i] = generation
    return out


def revise_batch(model, tokenizer, task: Task, scheme: TokenScheme, items: Sequence[tuple[Result, Edit]], *,
                 max_new_tokens: int = 256, batch_size: int = 16, injection: Injection | None = None,
                 memories: Sequence[str | None] | None = None) -> list[Result]:
    """Apply one edit to each result and let the model continue; the revised rows, in order.

    Args:
        model, tokenizer: the model that wrote the results (eval mode) and its tokenizer.
        task (Task): scores the new answers; scheme (TokenScheme): how a replaced step is written.
        items: ``(result, edit)`` pairs; every result needs its ``prompt``.
        max_new_tokens (int, default 256): the cap on a row's whole output, kept tokens included (the same
            cap as the evaluation that wrote the row, so an unchanged revision stops where the original did).
        batch_size (int, default 16).
        injection (Injection | None): add a memory vector while continuing (see ``Injection``).
        memories: with ``injection``, one text per item to inject instead of ``injection.memory`` (None
            items fall back to it, then to the edited step's text).

    Returns:
        list[Result]: each with the same id and prompt, the new raw text, steps, answer and outcome, and
        ``extra["revision"]``: ``of`` (the original's id and settings digest), ``step``, ``action``, ``old``
        and ``new`` step, the injection used and the original answer and outcome.

    Raises:
        ConfigError: a result without a prompt, a step that does not exist, an edit that cannot be written.
    """
    sequences, plans = [], []
    retokenised = 0
    for result, edit in items:
        if not result.prompt:
            raise ConfigError(f"row {result.id!r} has no prompt (written before results schema 2); "
                              "evaluate again with `memreason eval` to revise it")
        text, index, old, new = _new_output_text(result, edit, scheme)
        original = list(result.token_ids) if result.token_ids is not None else None
        if original is None:
            retokenised += 1
            original = tokenizer(result.raw, add_special_tokens=False)["input_ids"]
        forced = _forced_ids(tokenizer, original, text, step_spans(result.raw)[index].start)
        sequences.append(encode_prompts(tokenizer, [result.prompt])[0] + forced)
        plans.append((result, edit, index, old, new, forced))
    if retokenised:
        logger.warning("%d rows carry no token ids (results schema 1): their text was re-tokenised", retokenised)
    given = list(memories) if memories is not None else [None] * len(plans)
    if len(given) != len(plans):
        raise ConfigError(f"{len(given)} memories for {len(plans)} rows")
    memories = [(mine or injection.memory or (new.text if new is not None else old.text)) if injection else None
                for mine, (_, _, _, old, new, _) in zip(given, plans)]
    budgets = [max(0, max_new_tokens - len(plan[-1])) for plan in plans]
    generations = [Generation("", 0, "length", (), ())] * len(plans)
    todo = [i for i, budget in enumerate(budgets) if budget]
    if todo:
        made = _generate(model, tokenizer, [sequences[i] for i in todo], [memories[i] for i in todo], injection,
                         max(budgets[i] for i in todo), batch_size)
        for i, generation in zip(todo, made):
            # one generate call serves every budget: a row's greedy continuation does not depend on the
            # others, so cutting it at its own budget is what a call with that budget gives
            generations[i] = generation if generation.n_tokens <= budgets[i] else Generation(
                "", budgets[i], "length", generation.ids[:budgets[i]], (generation.logprobs or ())[:budgets[i]])
    return [_revised(tokenizer, task, plan, generation, injection, memory)
            for plan, generation, memory in zip(plans, generations, memories)]


def _revised(tokenizer, task, plan, generation, injection, memory) -> Result:
    result, edit, index, old, new, forced = plan
    ids = forced + list(generation.ids)
    raw = tokenizer.decode(ids, skip_special_tokens=True)
    predicted, outcome = _score(task, result.gold, raw)
    trace = Trace(result.question, parse(raw).steps, predicted, meta={"id": result.id})
    # confidences: generated tokens only (kept and edited text is not the model's choice here); kept
    # steps before the edit carry the original's values, which the same tokens after the same prompt give
    logprobs = [math.nan] * len(forced) + list(generation.logprobs or ())
    computed = step_confidences(tokenizer, raw, ids, logprobs)
    original = list(result.step_confidence or ())
    confidence = tuple(original[j] if j < index and j < len(original)
                       else (None if c is None else c.to_dict()) for j, c in enumerate(computed))
    revision = {"of": {"id": result.id, "config": result.config}, "step": index, "action": edit.action,
                "old": {"kind": old.kind, "text": old.text},
                "new": None if new is None else {"kind": new.kind, "text": new.text},
                "injection": None if injection is None else {"layer": injection.layer, "tau": injection.tau,
                                                            "tau_mode": injection.tau_mode,
                                                            "encoder": injection.encoder, "memory": memory},
                "original": {"predicted": result.predicted, "outcome": result.outcome}}
    return Result(trace=trace, gold=result.gold, outcome=outcome, raw=raw, prompt=result.prompt,
                  n_tokens=len(ids), marker_tokens=count_markers(raw), task=task.name, task_version=task.version,
                  seed=result.seed, config=result.config, token_ids=tuple(ids), step_confidence=confidence,
                  extra={**{k: v for k, v in result.extra.items() if k != "revision"}, "revision": revision})


def revise(model, tokenizer, task: Task, scheme: TokenScheme, result: Result, edit: Edit, **kwargs) -> Result:
    """``revise_batch`` for one result."""
    return revise_batch(model, tokenizer, task, scheme, [(result, edit)], **kwargs)[0]
