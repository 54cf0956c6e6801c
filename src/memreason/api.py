"""The inference API: ``mr = memreason.load(run_or_model)``; ``mr.answer("Did ...?")`` returns a Trace, and
``mr.revise(trace, step=i, text=...)`` corrects one of its steps and lets the model answer again.

A trained run (a directory written by ``memreason train``) brings its token scheme, prompt style and
task; a base model (``None`` for the embedded SmolLM2, a local dir or a hub id) is prompted with the
task's instruction in its chat template and its answer parsed as plain, unlabelled steps.

Traces from ``answer`` keep what revision needs in ``meta`` (JSON-ready): ``raw`` (the generated text),
``n_tokens``, ``stopped``, ``prompt`` (the exact prompt), ``token_ids`` (the generated ids) and
``step_confidence`` (per step, the mean/min token log-probability, ``memreason.confidence``). ``revise``,
``regenerate``, ``delete`` and ``revise_batch`` take such a Trace or a ``Result`` (a row of
``results.jsonl``) and return the same type: a Trace whose ``meta`` also holds ``revision`` (which step,
old and new text, the original answer), or a Result with ``extra["revision"]``. A Trace without ``raw``
(a gold trace from a data file) is revised as if the model had written it: its steps formatted in the
run's scheme after the rendered prompt.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence, Union

from memreason.errors import ConfigError
from memreason.interventions.revise import Edit, Injection
from memreason.model.tokens import TokenScheme, format_step, parse
from memreason.prompts import render_prompt
from memreason.tasks import ANSWER_MARKER, Task, get_task
from memreason.traces import KINDS, MEMORY, Result, Trace

logger = logging.getLogger(__name__)

TraceOrResult = Union[Trace, Result]
# meta keys that describe a generated trace (everything else in meta is carried through untouched)
_GENERATED = ("raw", "n_tokens", "stopped", "prompt", "token_ids", "step_confidence", "revision", "outcome")


@dataclass
class Reasoner:
    """A model ready to answer questions with memory/reason-labelled steps, and to revise its own traces.

    Args:
        model, tokenizer: the loaded model (eval mode) and its tokenizer.
        task (Task): decides the prompt's instruction and how the answer is extracted.
        scheme (TokenScheme): the run's control-token scheme (``plain`` for base models).
        prompt_style (str): ``plain``, ``chat`` or ``auto``.
        name (str): what was loaded, for the record.
        max_new_tokens (int, default 256): the cap on one answer (a revised answer's kept tokens included).
    """

    model: object
    tokenizer: object
    task: Task
    scheme: TokenScheme
    prompt_style: str
    name: str
    max_new_tokens: int = 256

    # -- answering -----------------------------------------------------------------------------------

    def answer(self, question: str, *, inject: Injection | None = None) -> Trace:
        """Answer one question greedily (see ``answer_batch``)."""
        return self.answer_batch([question], inject=inject)[0]

    def answer_batch(self, questions: Sequence[str], batch_size: int = 16, *,
                     inject: Injection | None = None) -> list[Trace]:
        """Answer many questions in left-padded greedy batches, in the given order.

        Args:
            questions: the questions.
            batch_size (int, default 16).
            inject (Injection | None): inject each trace's own first memory step while the model writes the
                steps after it: the model answers, then continues again from the end of that step with the
                step's text encoded and added at ``inject.layer`` (``inject.memory`` overrides the text). The
                first memory-labelled step; in a trace that labels no step (plain CoT), its first step. A
                trace with no step is returned as answered.

        Returns:
            list[Trace]: ``meta`` as in the module docstring.
        """
        from memreason.confidence import step_confidences
        from memreason.generate import generate_texts

        prompts = [render_prompt(q, self.task, self.tokenizer, self.prompt_style) for q in questions]
        generations = generate_texts(self.model, self.tokenizer, prompts, max_new_tokens=self.max_new_tokens,
                                     batch_size=batch_size, logprobs=True)
        traces = []
        for question, prompt, generation in zip(questions, prompts, generations):
            trace = parse(generation.text, question=question, answer=self.task.extract(generation.text))
            confidence = step_confidences(self.tokenizer, generation.text, generation.ids, generation.logprobs)
            trace.meta.update(raw=generation.text, n_tokens=generation.n_tokens, stopped=generation.stopped,
                              prompt=prompt, token_ids=list(generation.ids),
                              step_confidence=[None if c is None else c.to_dict() for c in confidence])
            traces.append(trace)
        if inject is None:
            return traces
        todo = [(i, t) for i, t in enumerate(traces) if t.steps and t.steps[_first_memory(t)].text.strip()]
        if not todo:
            logger.warning("no trace has a memory step with text, so no memory was injected")
            return traces
        # re-feed the memory step exactly (its own text) and continue with the injection in force
        edits = [(t, Edit(_first_memory(t), text=t.steps[_first_memory(t)].text)) for _, t in todo]
        for (i, _), revised in zip(todo, self.revise_batch(edits, inject=inject, batch_size=batch_size)):
            traces[i] = revised
        return traces

    # -- revising ------------------------------------------------------------------------------------

    def revise(self, trace_or_result: TraceOrResult, step: int, text: str, kind: str | None = None, *,
               inject: Injection | None = None) -> TraceOrResult:
        """Replace step ``step`` by ``text`` and let the model continue to its answer.

        The output before the step is kept token for token; the step keeps its kind unless ``kind`` is
        given; every later step is written again by the model (greedy). ``inject`` adds a memory vector
        while it continues (``inject.memory=None``: the new step's text).

        Returns:
            the revised Trace or Result (the type given).

        Raises:
            ConfigError: a step that does not exist, empty text, text with control tokens.
        """
        return self.revise_batch([(trace_or_result, Edit(step, text=text, kind=kind))], inject=inject)[0]

    def regenerate(self, trace_or_result: TraceOrResult, step: int, *,
                   inject: Injection | None = None) -> TraceOrResult:
        """Drop step ``step`` and everything after it and let the model write them again (no edit)."""
        return self.revise_batch([(trace_or_result, Edit(step, "regenerate"))], inject=inject)[0]

    def delete(self, trace_or_result: TraceOrResult, step: int) -> TraceOrResult:
        """Remove step ``step``, keep the later steps as written, and let the model answer again."""
        return self.revise_batch([(trace_or_result, Edit(step, "delete"))])[0]

    def revise_batch(self, items: Sequence[tuple[TraceOrResult, Edit]], *, inject: Injection | None = None,
                     batch_size: int = 16) -> list[TraceOrResult]:
        """Apply one ``Edit`` to each trace or result, in batches; the revised items in order, each of the
        type given (``interventions.revise.revise_batch`` does the work)."""
        from memreason.interventions.revise import revise_batch

        pairs = [(self.as_result(item), edit) for item, edit in items]
        revised = revise_batch(self.model, self.tokenizer, self.task, self.scheme, pairs,
                               max_new_tokens=self.max_new_tokens, batch_size=batch_size, injection=inject)
        return [new if isinstance(item, Result) else _as_trace(item, new) for (item, _), new in zip(items, revised)]

    def as_result(self, item: TraceOrResult) -> Result:
        """A Trace as the Result row revision works on (a Result is returned as it is).

        A Trace from ``answer`` carries its prompt, ids and confidences in ``meta``; a Trace without
        ``raw`` is formatted in this reasoner's scheme after its rendered prompt (the gold answer, if any,
        in ``meta["gold"]``).
        """
        if isinstance(item, Result):
            return item
        meta = item.meta
        raw = meta.get("raw")
        if raw is None:
            try:
                lines = [format_step(s, self.scheme) for s in item.steps]
            except ValueError as exc:
                raise ConfigError(f"cannot write trace {item.id!r} in the {self.scheme.style} scheme: {exc}") from None
            if item.answer is not None:
                marker = self.scheme.marker("answer")
                lines.append(f"{marker} {ANSWER_MARKER} {item.answer}" if marker else f"{ANSWER_MARKER} {item.answer}")
            raw = "\n".join(lines) + "\n"
        prompt = meta.get("prompt") or render_prompt(item.question, self.task, self.tokenizer, self.prompt_style)
        ids = meta.get("token_ids")
        if ids is None:
            ids = self.tokenizer(raw, add_special_tokens=False)["input_ids"]
        confidence = meta.get("step_confidence")
        trace = Trace(item.question, item.steps, item.answer, meta={"id": item.id})
        gold = meta.get("gold")
        outcome = meta.get("outcome") or ("correct" if gold is not None and item.answer is not None
                                          and self.task.is_correct(item.answer, gold) else "wrong")
        return Result(trace=trace, gold=gold, outcome=outcome, raw=raw, prompt=prompt,
                      n_tokens=int(meta.get("n_tokens") or len(ids)), task=self.task.name,
                      task_version=self.task.version, token_ids=tuple(int(i) for i in ids),
                      step_confidence=tuple(confidence) if confidence is not None else None)


def _first_memory(trace: Trace) -> int:
    """The first memory-labelled step; the first step when the trace labels none memory/reason."""
    if any(s.kind in KINDS for s in trace.steps):
        return next((i for i, s in enumerate(trace.steps) if s.kind == MEMORY), 0)
    return 0


def _as_trace(original: Trace, revised: Result) -> Trace:
    """A revised Result as a Trace like ``original`` (its other meta keys kept)."""
    meta = {k: v for k, v in original.meta.items() if k not in _GENERATED}
    meta.update(raw=revised.raw, n_tokens=revised.n_tokens, prompt=revised.prompt,
                token_ids=list(revised.token_ids or ()),
                step_confidence=list(revised.step_confidence) if revised.step_confidence is not None else None,
                revision=revised.extra.get("revision"))
    if "gold" in original.meta:
        meta["outcome"] = revised.outcome
    return Trace(original.question, revised.steps, revised.predicted, meta=meta)


def load(run_or_model: str | Path | None = None, *, task: str | None = None, dtype="auto", device="auto",
         max_new_tokens: int = 256) -> Reasoner:
    """Load a trained run or a base model for answering questions.

    Args:
        run_or_model: a run directory from ``memreason train``; or ``None`` / a model dir / a hub id.
        task (str | None): overrides the run's task (default for base models: ``strategyqa``).
        dtype, device: as in ``memreason.model.load``.
        max_new_tokens (int, default 256).

    Raises:
        ModelLoadError: the run or model cannot be loaded.
    """
    from memreason.model import load as load_model
    from memreason.model.runs import is_run_dir, load_run

    if run_or_model is not None and is_run_dir(run_or_model):
        model, tokenizer, info = load_run(run_or_model, dtype=dtype, device=device, merge=True)
        return Reasoner(model, tokenizer, get_task(task or info.task), info.scheme, info.prompt_style,
                        name=str(run_or_model), max_new_tokens=max_new_tokens)
    model, tokenizer = load_model(run_or_model, dtype=dtype, device=device)
    return Reasoner(model, tokenizer, get_task(task or "strategyqa"), TokenScheme("plain"), "auto",
                    name=str(run_or_model or "SmolLM2-135M-Instruct"), max_new_tokens=max_new_tokens)
