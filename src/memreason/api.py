"""The inference API: ``mr = memreason.load(run_or_model)``; ``mr.answer("Did ...?")`` returns a Trace.

A trained run (a directory written by ``memreason train``) brings its token scheme, prompt style and
task; a base model (``None`` for the embedded SmolLM2, a local dir or a hub id) is prompted with the
task's instruction in its chat template and its answer parsed as plain, unlabelled steps.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from memreason.generate import generate_texts
from memreason.model.tokens import TokenScheme, parse
from memreason.prompts import render_prompt
from memreason.tasks import Task, get_task
from memreason.traces import Trace


@dataclass
class Reasoner:
    """A model ready to answer questions with memory/reason-labelled steps.

    Args:
        model, tokenizer: the loaded model (eval mode) and its tokenizer.
        task (Task): decides the prompt's instruction and how the answer is extracted.
        scheme (TokenScheme): the run's control-token scheme (``plain`` for base models).
        prompt_style (str): ``plain`` or ``chat``.
        name (str): what was loaded, for the record.
        max_new_tokens (int, default 256).
    """

    model: object
    tokenizer: object
    task: Task
    scheme: TokenScheme
    prompt_style: str
    name: str
    max_new_tokens: int = 256

    def answer(self, question: str) -> Trace:
        """Answer one question greedily; the Trace's ``meta`` carries the raw text and token count."""
        return self.answer_batch([question])[0]

    def answer_batch(self, questions: Sequence[str], batch_size: int = 16) -> list[Trace]:
        """Answer many questions in left-padded greedy batches, in the given order."""
        prompts = [render_prompt(q, self.task, self.tokenizer, self.prompt_style) for q in questions]
        generations = generate_texts(self.model, self.tokenizer, prompts, max_new_tokens=self.max_new_tokens,
                                     batch_size=batch_size)
        traces = []
        for question, generation in zip(questions, generations):
            trace = parse(generation.text, question=question, answer=self.task.extract(generation.text))
            trace.meta.update(raw=generation.text, n_tokens=generation.n_tokens, stopped=generation.stopped)
            traces.append(trace)
        return traces


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
