"""The trace editor's model work: answer a question as a ``Result``, revise one step, repair one from a
correction source. The page (``page.html``) and the ``/v1/memreason/*`` endpoints (``routes``) call this;
it knows nothing of HTTP beyond raising ``RequestError`` for what a request cannot have (as backends do).

``Editor`` holds the served model, its task, token scheme and prompt style (those of a trained run, or a
base model's), the correction sources configured at server start, the rows of a results file opened with
``--results``, and the memory-injection settings the page's "inject" switch uses. Every use of the model
and tokenizer holds ``lock``, the one the chat backend holds too (``ModelBackend.lock``), so the editor
and ``/v1/chat/completions`` never run the model at once.

Revisions are ``memreason.interventions.revise``'s, unchanged: the model's own tokens up to the step are
teacher-forced and it continues greedily. With ``inject=True`` the step's text is *not* edited: the model
regenerates from that step while the corrected memory text is added to one layer's attention output
(``Injection``), so the repair comes from the vector alone.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import threading
import time
from typing import Any, Sequence

from memreason.errors import ConfigError, MemreasonError
from memreason.interventions.revise import Edit, Injection, revise_batch
from memreason.serve.protocol import RequestError
from memreason.tasks import Task, get_task
from memreason.traces import Result

logger = logging.getLogger(__name__)

# The cell `memreason inject sweep` chose for SmolLM2-135M on the bundled two-hop set (benchmarks/RESULTS.md):
# layer 0, a fifth of the median residual norm entering it. Sweep your own model to choose better.
DEFAULT_INJECTION = Injection(layer=0, tau=0.2, tau_mode="relative", encoder="unembed")


def correction_dict(correction: Any) -> dict:
    """A ``Correction`` as JSON: ``{step, text, kind, source, note}``."""
    return {name: getattr(correction, name, None) for name in ("step", "text", "kind", "source", "note")}


class Editor:
    """The model behind the trace-editor page.

    Args:
        model, tokenizer: the served model (eval mode) and its tokenizer.
        task (Task): prompts questions and reads answers (a row's own task scores its revision).
        scheme (TokenScheme): how the model writes steps (a revised step is written the same way).
        prompt_style (str): ``plain`` or ``chat`` (resolved), as ``memreason.prompts.render_prompt`` takes it.
        name (str): the model's name, for the settings digest of answered rows.
        sources (Sequence[CorrectionSource]): correction sources (``memreason.corrections``), by ``.name``.
        rows (Sequence[Result]): rows of a results file the page can open.
        injection (Injection): layer / tau / encoder of the inject switch (its ``memory`` is ignored).
        max_new_tokens (int, default 256): output cap when a request sets none (for a revision, the kept
            tokens count against it, as in ``revise_batch``).
        max_context (int | None): most prompt + output tokens; default the model's context length.
        lock (threading.Lock | None): held around every use of the model (default: a new one).

    Raises:
        ConfigError: two sources with one name, or an injection layer the model does not have.
    """

    def __init__(self, model, tokenizer, task: Task, scheme, prompt_style: str, *, name: str = "model",
                 sources: Sequence[Any] = (), rows: Sequence[Result] = (), injection: Injection = DEFAULT_INJECTION,
                 max_new_tokens: int = 256, max_context: int | None = None, lock: threading.Lock | None = None):
        from memreason.model.layers import layout

        self.model, self.tokenizer, self.task, self.scheme = model, tokenizer, task, scheme
        self.prompt_style, self.name, self.max_new_tokens = prompt_style, name, max_new_tokens
        self.rows = list(rows)
        self.lock = lock or threading.Lock()
        limit = getattr(model.config, "max_position_embeddings", None) or 4096
        self.max_context = min(limit, max_context) if max_context else limit
        self.sources: dict[str, Any] = {}
        for source in sources:
            if source.name in self.sources:
                raise ConfigError(f"two correction sources are both named {source.name!r}; give each --source once")
            self.sources[source.name] = source
        layers = layout(model).num_layers
        if not 0 <= injection.layer < layers:
            raise ConfigError(f"injection layer {injection.layer} does not exist: this model has layers 0 to "
                              f"{layers - 1}")
        self.injection = dataclasses.replace(injection, memory=None)

    @classmethod
    def from_backend(cls, backend, **kwargs) -> "Editor":
        """An editor on a ``ModelBackend``'s model, sharing its lock, task, scheme and prompt style."""
        kwargs.setdefault("max_context", backend.max_context)
        return cls(backend.model, backend.tokenizer, backend.task or get_task("strategyqa"), backend.scheme,
                   backend.prompt_style, name=backend.model_id, lock=backend.lock, **kwargs)

    # ------------------------------------------------------------ what the page shows first

    def info(self) -> dict:
        """The model, task, scheme, injection settings, sources and row count, for the page."""
        injection = self.injection
        return {"model": self.name, "task": self.task.name, "answer_type": self.task.answer_type,
                "scheme": self.scheme.to_dict(), "labels_steps": self.scheme.labels_steps,
                "prompt_style": self.prompt_style, "max_tokens": self.max_new_tokens,
                "injection": {"layer": injection.layer, "tau": injection.tau, "tau_mode": injection.tau_mode,
                              "encoder": injection.encoder},
                "sources": list(self.sources), "rows": len(self.rows)}

    def row_summaries(self) -> list[dict]:
        return [{"index": i, "id": r.id, "question": r.question, "predicted": r.predicted, "gold": r.gold,
                 "outcome": r.outcome, "steps": len(r.steps)} for i, r in enumerate(self.rows)]

    # ------------------------------------------------------------ model work

    def _check_context(self, prompt: str, max_new_tokens: int, what: str) -> None:
        from memreason.generate import encode_prompts

        with self.lock:
            n = len(encode_prompts(self.tokenizer, [prompt])[0])
        if n + max_new_tokens > self.max_context:
            raise RequestError(413, f"the {what} has {n} tokens and up to {max_new_tokens} more may be generated; "
                               f"this model's context holds {self.max_context}; shorten it or lower max_tokens",
                               param="max_tokens" if n < self.max_context else what,
                               code="context_length_exceeded")

    def answer(self, question: str, *, gold: str | None = None, row_id: str | None = None,
               max_new_tokens: int | None = None) -> Result:
        """Answer one question greedily, as ``memreason eval`` would: the Result keeps the prompt, the
        generated token ids and each step's confidence, so it can be revised.

        Args:
            question (str); gold (str | None): the reference answer in canonical form (scores the row; without
                it the outcome only says whether an answer parsed: ``wrong`` or ``unparseable``).
            row_id (str | None): the row id (default: ``ask-`` and a hash of the question).
            max_new_tokens (int | None): default the editor's.

        Raises:
            RequestError: 413 when the prompt and ``max_new_tokens`` do not fit the context.
        """
        from memreason.confidence import step_confidences
        from memreason.evaluate import EvalSettings, score_row
        from memreason.generate import generate_texts
        from memreason.prompts import render_prompt
        from memreason.traces import Trace

        cap = max_new_tokens or self.max_new_tokens
        settings = EvalSettings(model=self.name, task=self.task.name, source="serve", split=None,
                                prompt_style=self.prompt_style, scheme=self.scheme.to_dict(), max_new_tokens=cap)
        with self.lock:
            prompt = render_prompt(question, self.task, self.tokenizer, self.prompt_style)
        self._check_context(prompt, cap, "question")
        start = time.perf_counter()
        with self.lock:
            generation = generate_texts(self.model, self.tokenizer, [prompt], max_new_tokens=cap, batch_size=1,
                                        logprobs=True)[0]
            confidence = step_confidences(self.tokenizer, generation.text, generation.ids, generation.logprobs)
        logger.info("answered in %.2f s (%d tokens)", time.perf_counter() - start, generation.n_tokens)
        row_id = row_id or "ask-" + hashlib.sha256(question.encode("utf-8")).hexdigest()[:12]
        trace = Trace(question, (), gold, meta={"id": row_id})
        return score_row(trace, [generation.text], [generation.n_tokens], self.task, settings, prompt=prompt,
                         token_ids=generation.ids, step_confidence=confidence)

    def task_of(self, result: Result) -> Task:
        """The task that scores a row: its own when it names one, else the served model's."""
        if not result.task or result.task == self.task.name:
            return self.task
        try:
            return get_task(result.task)
        except KeyError as exc:
            raise RequestError(400, f"the row's task is unknown: {exc.args[0]}", param="result.task") from None

    def revise(self, result: Result, edit: Edit, *, inject: bool = False,
               max_new_tokens: int | None = None) -> Result:
        """Apply one edit and let the model continue (``revise_batch``).

        With ``inject``, a ``replace`` edit does not change the text: the model regenerates from the step
        while the new text is injected as a memory vector (a ``regenerate`` edit injects the step's own
        text); ``delete`` cannot inject.

        Raises:
            RequestError: 400 for an edit that cannot be applied (naming the field), 413 past the context.
        """
        cap = max_new_tokens or self.max_new_tokens
        vocab = len(self.tokenizer)
        if result.token_ids and max(result.token_ids) >= vocab:
            raise RequestError(400, f"token id {max(result.token_ids)} is outside this model's vocabulary "
                               f"(0..{vocab - 1}): the row was written by another model", param="result.token_ids")
        injection = None
        if inject:
            if edit.action == "delete":
                raise RequestError(400, "a deleted step has no memory to inject; send inject: false or another "
                                   "action", param="inject")
            injection = dataclasses.replace(self.injection, memory=edit.text)
            edit = Edit(edit.step, "regenerate")
        task = self.task_of(result)
        self._check_context(result.prompt or "", cap, "result.prompt")
        start = time.perf_counter()
        try:
            with self.lock:
                revised = revise_batch(self.model, self.tokenizer, task, self.scheme, [(result, edit)],
                                       max_new_tokens=cap, batch_size=1, injection=injection)[0]
        except ConfigError as exc:
            raise RequestError(400, str(exc), param=_param_of(str(exc))) from None
        logger.info("revised step %d (%s%s) in %.2f s", edit.step, edit.action, ", injected" if inject else "",
                    time.perf_counter() - start)
        return revised

    def correct(self, result: Result, source_name: str, step: int | None = None) -> Any:
        """The correction a source offers for ``step``, or None when it has none. Without a step, the steps
        are tried from the least confident memory step on (``_repair_order``); the first correction wins.

        Raises:
            RequestError: 400 for a source that is not configured or a step that does not exist.
        """
        source = self.sources.get(source_name)
        if source is None:
            known = ", ".join(self.sources) or "none (start the server with --source SPEC)"
            raise RequestError(400, f"no correction source named {source_name!r}; configured: {known}",
                               param="source")
        n = len(result.steps)
        if step is not None:
            if not -n <= step < n:
                raise RequestError(400, f"the row has {n} steps; step {step} does not exist", param="step")
            return _ask(source, result, step % n)
        for index in _repair_order(result):
            correction = _ask(source, result, index)
            if correction is not None:
                return correction
        return None

    def repair(self, result: Result, source_name: str, *, step: int | None = None, inject: bool = False,
               max_new_tokens: int | None = None) -> tuple[Any, Result]:
        """Ask a source for a correction and revise the trace with it (the step the correction names).

        Raises:
            RequestError: 400 as in ``correct``/``revise``; 422 when the source has no correction.
        """
        correction = self.correct(result, source_name, step)
        if correction is None:
            where = f"step {step}" if step is not None else "any step of this trace"
            raise RequestError(422, f"the source {source_name!r} has no correction for {where}",
                               param="step" if step is not None else "source", code="no_correction")
        try:
            edit = Edit(int(correction.step), "replace", text=correction.text, kind=correction.kind)
        except ConfigError as exc:
            raise RequestError(422, f"the source {source_name!r} gave an unusable correction: {exc}",
                               param="source", code="no_correction") from None
        return correction, self.revise(result, edit, inject=inject, max_new_tokens=max_new_tokens)


def _ask(source, result: Result, step: int) -> Any:
    try:
        return source.correct(result, step)
    except MemreasonError as exc:  # e.g. an LLM endpoint that is down: the source's failure, not the request's
        raise RequestError(502, f"the correction source {source.name!r} failed: {exc}", type="server_error",
                           code="source_failed") from None


def _repair_order(result: Result) -> list[int]:
    """The steps a repair without a step tries, in order: the locator's candidates (memory steps; every
    step of a trace that labels none, ``corrections.memory_candidates``) from the least confident (mean
    token log-probability, as ``corrections.least_confident_step``; unknown last), then the other steps."""
    from memreason.corrections import memory_candidates

    confidence = list(result.step_confidence or ())

    def mean(i: int) -> float:
        c = confidence[i] if i < len(confidence) else None
        return float(c["mean"]) if isinstance(c, dict) and c.get("mean") is not None else float("inf")

    first = sorted(memory_candidates(result), key=lambda i: (mean(i), i))
    return first + [i for i in range(len(result.steps)) if i not in first]


def _param_of(message: str) -> str | None:
    """The request field a revision error is about (messages from ``revise``/``tokens``)."""
    if "control token" in message or "needs the new step text" in message:
        return "text"
    if "step kind" in message or "without a kind" in message:
        return "kind"
    if "does not exist" in message or "no steps" in message:
        return "step"
    if "no prompt" in message:
        return "result.prompt"
    return None
