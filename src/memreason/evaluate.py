"""Evaluation: generate, parse, score and write one ``Result`` row per question as it goes; compare two.

* ``EvalJob``: the settings of ``memreason eval`` (what to evaluate, on what, where); built from YAML,
  flags and dotted overrides by ``memreason.config.load_settings``. ``run_job`` loads model and data and
  calls ``evaluate``.
* ``EvalSettings``: what decides the content of a row; its digest guards resumption.
* ``evaluate``: the resumable loop. Rows are appended to ``results.jsonl`` per chunk (a killed run loses at
  most the chunk in flight); re-running skips ids already there. ``summary.json`` holds accuracy with n
  and a 95% Wilson CI, the unparseable count, steps per answer and marker overhead, the seed and the
  resolved settings. Scoring is strictly the task registry's, on the generated text only.
* ``read_results``: a results file as ``Result`` objects (never writes).
* ``compare``: the paired comparison of two evaluations (flips both ways, exact McNemar).
* ``few_shot_examples``: seeded worked examples from the train split, for untrained models.
"""

from __future__ import annotations

import logging
import random
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Literal, Sequence

from memreason.confidence import step_confidences
from memreason.errors import ConfigError, DataError
from memreason.generate import generate_texts
from memreason.io import OutputDir, append_jsonl, read_jsonl, write_json
from memreason.model.tokens import count_markers, parse
from memreason.prompts import render_prompt
from memreason.stats import mcnemar_exact, wilson_ci
from memreason.tasks import CORRECT, UNPARSEABLE, WRONG, Task
from memreason.traces import MEMORY, REASON, Result, ResultFormatError, Trace

logger = logging.getLogger(__name__)

RESULTS = "results.jsonl"
SUMMARY = "summary.json"
CONFIG = "eval_config.json"


@dataclass
class EvalSettings:
    """Everything that decides what a result row contains; its hash guards resumption.

    Args:
        model (str): the evaluated model or run (for the record).
        task (str): task name.
        source (str): dataset source; split (str | None): the evaluated split.
        prompt_style (str): resolved prompt style; scheme (dict): the token scheme used to parse outputs.
        max_new_tokens (int); samples (int, default 1): k samples with majority vote when > 1.
        temperature, top_p: used only when sampling; seed (int, default 0).
    """

    model: str
    task: str
    source: str
    split: str | None
    prompt_style: str
    scheme: dict
    max_new_tokens: int = 256
    samples: int = 1
    temperature: float = 0.7
    top_p: float = 0.95
    seed: int = 0
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.samples < 1:
            raise ConfigError(f"samples must be >= 1, got {self.samples}")
        if self.max_new_tokens < 1:
            raise ConfigError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")

    def digest(self) -> str:
        from memreason.io import settings_digest

        return settings_digest(self)


def read_results(path: str | Path) -> list[Result]:
    """The rows of a results file as ``Result`` objects, in file order. Never writes.

    Raises:
        DataError: missing file, a line that is not JSON (except a torn last line, which is skipped), or a
            row that is not a memreason result (naming the file, line and schema version).
    """
    rows = read_jsonl(path, what="results file")
    results = []
    for number, row in enumerate(rows, start=1):
        try:
            results.append(Result.from_dict(row))
        except ResultFormatError as exc:
            raise DataError(f"row {number}: {exc}", file=str(path)) from None
    return results


def _majority(answers: Sequence[str | None]) -> str | None:
    """The most frequent parsed answer (ties: the one seen first); None if no sample parsed."""
    counts = Counter(a for a in answers if a is not None)
    if not counts:
        return None
    best = max(counts.values())
    return next(a for a in answers if a is not None and counts[a] == best)


def score_row(trace: Trace, texts: Sequence[str], n_tokens: Sequence[int], task: Task, settings: EvalSettings,
              prompt: str | None = None, token_ids: Sequence[int] | None = None,
              step_confidence: Sequence | None = None) -> Result:
    """One Result from the generated sample(s) of one question (ids and confidences: of the first)."""
    answers = [task.extract(text) for text in texts]
    predicted = answers[0] if len(texts) == 1 else _majority(answers)
    if predicted is None:
        outcome = UNPARSEABLE
    else:
        outcome = CORRECT if task.is_correct(predicted, trace.answer) else WRONG
    parsed = parse(texts[0], question=trace.question, answer=predicted)
    samples = tuple({"raw": t, "predicted": a} for t, a in zip(texts, answers)) if len(texts) > 1 else None
    return Result(trace=Trace(trace.question, parsed.steps, predicted, meta={"id": trace.id}), gold=trace.answer,
                  outcome=outcome, raw=texts[0], prompt=prompt, n_tokens=n_tokens[0],
                  marker_tokens=count_markers(texts[0]), task=task.name, task_version=task.version,
                  seed=settings.seed, config=settings.digest(), samples=samples,
                  token_ids=tuple(token_ids) if token_ids is not None else None,
                  step_confidence=tuple(None if c is None else c.to_dict() for c in step_confidence)
                  if step_confidence is not None else None)


def summarise(results: Sequence[Result], settings: EvalSettings) -> dict:
    """Accuracy with n and 95% Wilson CI, outcome counts, steps per answer and marker overhead."""
    n = len(results)
    outcomes = Counter(r.outcome for r in results)
    mean = (lambda values: sum(values) / n) if n else (lambda values: 0.0)
    low, high = wilson_ci(outcomes[CORRECT], n) if n else (0.0, 1.0)
    return {
        "n": n, "correct": outcomes[CORRECT], "wrong": outcomes[WRONG], "unparseable": outcomes[UNPARSEABLE],
        "accuracy": outcomes[CORRECT] / n if n else 0.0, "ci95": [low, high],
        "mean_memory_steps": mean([r.trace.count(MEMORY) for r in results]),
        "mean_reason_steps": mean([r.trace.count(REASON) for r in results]),
        "mean_generated_tokens": mean([r.n_tokens for r in results]),
        "mean_marker_tokens": mean([r.marker_tokens for r in results]),
        "seed": settings.seed, "config": asdict(settings), "config_hash": settings.digest(),
    }


def evaluate(model, tokenizer, traces: Sequence[Trace], task: Task, settings: EvalSettings, out_dir: str | Path,
             *, batch_size: int = 16, overwrite: bool = False, examples: Sequence[Trace] = (),
             progress: Callable[[int], None] | None = None) -> dict:
    """Evaluate ``traces`` and write ``results.jsonl``, ``summary.json`` and ``eval_config.json`` to ``out_dir``.

    Resumes when ``out_dir`` already holds rows made with the same settings. ``examples`` are worked
    examples shown in every prompt (few-shot; record their ids in ``settings.extra``).

    Raises:
        ConfigError: ``out_dir`` holds results made with other settings (pass ``overwrite=True``), or is
            not a writable directory.
        DataError: duplicate ids in ``traces``, or a question without a gold answer.
    """
    ids = [t.id for t in traces]
    if len(set(ids)) != len(ids):
        raise DataError("duplicate question ids; every question needs a unique id to resume safely")
    if any(t.answer is None for t in traces):
        raise DataError("every evaluated question needs a gold answer")
    out = OutputDir(out_dir, settings, overwrite=overwrite, config_name=CONFIG, outputs=(RESULTS,))
    done = {row.get("id") for row in out.resume_rows(RESULTS)}
    todo = [t for t in traces if t.id not in done]
    if done:
        logger.info("resuming: %d of %d questions already done", len(traces) - len(todo), len(traces))
        if progress:
            progress(len(traces) - len(todo))
    context = _context_length(model)
    if context:
        # a token is at least one character for these tokenizers' inputs, rarely more than ~16 of them:
        # refuse a question that cannot fit before spending time tokenising it
        for trace in todo:
            if len(trace.question) > 16 * context:
                raise DataError(f"question {trace.id!r} is {len(trace.question):,} characters, far beyond the model's "
                                f"{context:,}-token context; shorten or drop it")
    sampling = settings.samples > 1
    # Generate in chunks of a few batches, appending each chunk's rows before starting the next.
    chunk = batch_size * 2
    for start in range(0, len(todo), chunk):
        part = todo[start:start + chunk]
        prompts = [render_prompt(t.question, task, tokenizer, settings.prompt_style, examples=examples)
                   for t in part]
        if context:
            _check_lengths(tokenizer, part, prompts, context, settings.max_new_tokens)
        samples = []
        for k in range(settings.samples):
            samples.append(generate_texts(model, tokenizer, prompts, max_new_tokens=settings.max_new_tokens,
                                          batch_size=batch_size, do_sample=sampling,
                                          temperature=settings.temperature, top_p=settings.top_p,
                                          seed=settings.seed + 1000 * k + start, logprobs=k == 0))
        rows = []
        for i, t in enumerate(part):
            first = samples[0][i]
            confidence = step_confidences(tokenizer, first.text, first.ids, first.logprobs)
            rows.append(score_row(t, [s[i].text for s in samples], [s[i].n_tokens for s in samples], task, settings,
                                  prompt=prompts[i], token_ids=first.ids, step_confidence=confidence))
        append_jsonl(out.file(RESULTS), [r.to_dict() for r in rows])
        if progress:
            progress(len(part))
    order = {tid: i for i, tid in enumerate(ids)}
    results = sorted((r for r in read_results(out.file(RESULTS)) if r.id in order), key=lambda r: order[r.id])
    summary = summarise(results, settings)
    write_json(out.file(SUMMARY), summary)
    return summary


def _context_length(model) -> int | None:
    config = getattr(model, "config", None)
    value = getattr(config, "max_position_embeddings", None)
    return int(value) if isinstance(value, int) and value > 0 else None


def _check_lengths(tokenizer, traces: Sequence[Trace], prompts: Sequence[str], context: int, max_new_tokens: int):
    """Every prompt plus its generation budget fits the model's context (else one clear DataError)."""
    from memreason.generate import encode_prompts

    for trace, ids in zip(traces, encode_prompts(tokenizer, prompts)):
        if len(ids) + max_new_tokens > context:
            raise DataError(f"question {trace.id!r}: its prompt is {len(ids):,} tokens; with max_new_tokens "
                            f"{max_new_tokens} it exceeds the model's {context:,}-token context")


# ---------------------------------------------------------------------------------------------------------
# Comparing two evaluations


@dataclass(frozen=True)
class Comparison:
    """A paired comparison of evaluations A (the baseline) and B on the questions both answered.

    Args:
        n (int): questions in both; only_a, only_b (int): questions in one evaluation only (not compared).
        acc_a, acc_b (float): accuracies on the shared questions.
        gained (tuple[Result, ...]): B's rows right where A was wrong; lost: A right, B wrong.
        p_mcnemar (float): exact two-sided McNemar p-value on the discordant pairs.
    """

    n: int
    only_a: int
    only_b: int
    acc_a: float
    acc_b: float
    gained: tuple[Result, ...]
    lost: tuple[Result, ...]
    p_mcnemar: float


def _by_id(results: Sequence[Result], name: str) -> dict[str, Result]:
    missing = sum(r.id is None for r in results)
    if missing:
        raise DataError(f"{missing} rows of {name} have no question id; only rows written by "
                        "`memreason eval` (which carry ids) can be compared")
    by_id: dict[str, Result] = {}
    for result in results:
        if result.id in by_id:
            raise DataError(f"question id {result.id!r} appears twice in {name}")
        by_id[result.id] = result
    return by_id


def compare(a: Sequence[Result], b: Sequence[Result], *, names: tuple[str, str] = ("A", "B")) -> Comparison:
    """Pair two evaluations by question id and test whether B's accuracy differs from A's.

    Raises:
        DataError: rows without ids, duplicate ids, or no question in common.
    """
    a_by_id, b_by_id = _by_id(a, names[0]), _by_id(b, names[1])
    shared = [(row, b_by_id[qid]) for qid, row in a_by_id.items() if qid in b_by_id]
    if not shared:
        raise DataError(f"{names[0]} and {names[1]} have no question in common ({len(a_by_id)} and {len(b_by_id)} "
                        "questions); compare evaluations of the same dataset and split")
    right = lambda result: result.outcome == CORRECT  # noqa: E731
    gained = tuple(y for x, y in shared if not right(x) and right(y))
    lost = tuple(y for x, y in shared if right(x) and not right(y))
    return Comparison(n=len(shared), only_a=len(a_by_id) - len(shared), only_b=len(b_by_id) - len(shared),
                      acc_a=sum(right(x) for x, _ in shared) / len(shared),
                      acc_b=sum(right(y) for _, y in shared) / len(shared),
                      gained=gained, lost=lost, p_mcnemar=mcnemar_exact(len(lost), len(gained)))


# ---------------------------------------------------------------------------------------------------------
# The `memreason eval` job


@dataclass
class EvalJob:
    """What ``memreason eval`` evaluates, on what, and where its outputs go.

    Args:
        model (str | None): a run directory from ``memreason train``, a model dir, a .gguf file or a hub id
            (None: the embedded SmolLM2, untrained).
        data (str): dataset source; task (str | None): overrides the run's (or bundled data's) task.
        split (str | None): the evaluated split; limit (int | None): only the first N questions.
        out (str): output directory (results.jsonl, summary.json, eval_config.json).
        batch_size, max_new_tokens: generation; samples (int): k sampled answers with majority vote
            (1: greedy); temperature, top_p: only when sampling; seed (int).
        shots (int): worked examples from the train split shown in every prompt (for untrained models).
        prompt_style: None = the run's own style (auto for base models).
        overwrite (bool): discard results already in ``out``; device, dtype: as ``memreason.model.load``.
        skip_invalid, on_unknown_tag, compound_tag, columns: passed to the dataset loader (see
            ``memreason data check``: what it validates is what this job validates).
    """

    model: str | None = None
    data: str = "bundled:strategyqa"
    task: str | None = None
    split: str | None = "test"
    out: str = ""
    batch_size: int = 16
    max_new_tokens: int = 256
    samples: int = 1
    temperature: float = 0.7
    top_p: float = 0.95
    seed: int = 0
    limit: int | None = None
    shots: int = 0
    prompt_style: Literal["auto", "plain", "chat"] | None = None
    overwrite: bool = False
    device: str = "auto"
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    skip_invalid: bool = False
    on_unknown_tag: Literal["error", "drop"] = "error"
    compound_tag: Literal["first", "memory", "reason", "drop"] = "first"
    columns: str | None = None


def check_job(job: EvalJob) -> list[str]:
    """Every problem with an ``EvalJob`` that can be found without loading a model."""
    from memreason.tasks import task_names

    problems = []
    if not job.out.strip():
        problems.append("out: give an output directory (--out DIR)")
    elif Path(job.out).exists() and not Path(job.out).is_dir():
        problems.append(f"out: {job.out} is a file; give a directory")
    for key in ("batch_size", "max_new_tokens", "samples"):
        if getattr(job, key) < 1:
            problems.append(f"{key} must be >= 1, got {getattr(job, key)}")
    if job.limit is not None and job.limit < 1:
        problems.append(f"limit must be >= 1 (or left out for every question), got {job.limit}")
    if job.shots < 0:
        problems.append(f"shots must be >= 0, got {job.shots}")
    if job.temperature <= 0:
        problems.append(f"temperature must be > 0, got {job.temperature}")
    if not 0 < job.top_p <= 1:
        problems.append(f"top_p must be in (0, 1], got {job.top_p}")
    if job.task is not None and job.task not in task_names():
        problems.append(f"task: unknown task {job.task!r}; choose one of {', '.join(task_names())}")
    if job.columns is not None:
        from memreason.data.hub import parse_columns

        try:
            parse_columns(job.columns)
        except DataError as exc:
            problems.append(f"columns: {exc}")
    if job.device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            problems.append(f"device {job.device!r}: no CUDA device on this machine; use --device cpu or auto")
    return problems


def few_shot_examples(source: str, task: Task, shots: int, seed: int, **loader) -> list[Trace]:
    """``shots`` worked examples with steps from the train split of ``source``, drawn with ``seed``.

    Raises:
        ConfigError: the train split has fewer examples with steps.
    """
    from memreason.data import load_traces

    if not shots:
        return []
    pool, _ = load_traces(source, task=task, split="train", on_unknown_tag="drop", skip_invalid=True, **loader)
    pool = [t for t in pool if t.steps]
    if len(pool) < shots:
        raise ConfigError(f"--shots {shots} needs that many train-split examples with steps in {source}")
    return random.Random(seed).sample(pool, shots)


def run_job(job: EvalJob, *, progress: Callable[[int], None] | None = None,
            on_start: Callable[[int], None] | None = None) -> dict:
    """Load the model and the questions of ``job``, evaluate, and return the summary.

    ``on_start`` is called with the number of questions once they are loaded (for a progress bar).

    Raises:
        ConfigError, DataError, ModelLoadError: bad settings, data or model, each with one clear line.
    """
    import memreason
    from memreason.data import load_dataset, source_task

    problems = check_job(job)
    if problems:
        raise ConfigError("; ".join(problems))
    columns = job.columns if job.columns is not None else "auto"
    reasoner = memreason.load(job.model, task=job.task or source_task(job.data, columns), dtype=job.dtype,
                              device=job.device, max_new_tokens=job.max_new_tokens)
    task = reasoner.task
    loader = dict(compound_tag=job.compound_tag, columns=columns)
    traces, _ = load_dataset(job.data, task=task, split=job.split, on_unknown_tag=job.on_unknown_tag,
                             skip_invalid=job.skip_invalid, **loader)
    if job.limit is not None:
        traces = traces[:job.limit]
    examples = few_shot_examples(job.data, task, job.shots, job.seed, **loader)
    from memreason.prompts import resolve_style

    style = resolve_style(job.prompt_style or reasoner.prompt_style, reasoner.tokenizer)
    settings = EvalSettings(model=reasoner.name, task=task.name, source=job.data, split=job.split,
                            prompt_style=style, scheme=reasoner.scheme.to_dict(), max_new_tokens=job.max_new_tokens,
                            samples=job.samples, temperature=job.temperature, top_p=job.top_p, seed=job.seed,
                            extra={"shots": [t.id for t in examples], "limit": job.limit})
    if on_start:
        on_start(len(traces))
    return evaluate(reasoner.model, reasoner.tokenizer, traces, task, settings, job.out,
                    batch_size=job.batch_size, overwrite=job.overwrite, examples=examples, progress=progress)
