"""The evaluation loop: generate, parse, score, write one JSONL row per question as it goes, summarise.

Rows are appended with one ``write`` per line to ``results.jsonl`` and flushed to disk per batch, so a
killed run loses at most the batch in flight; re-running the same command skips the ids already there
and drops a torn last line. ``summary.json`` holds accuracy with n and a 95% Wilson CI, the unparseable
count, steps per answer and marker overhead, plus the seed and the resolved config. Scoring is strictly
the task registry's (no lenient fallback) on the generated text only.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Sequence

from memreason.errors import ConfigError, DataError
from memreason.generate import generate_texts
from memreason.model.tokens import parse
from memreason.prompts import render_prompt
from memreason.stats import wilson_ci
from memreason.tasks import CORRECT, UNPARSEABLE, WRONG, Task
from memreason.traces import MEMORY, REASON, Trace

logger = logging.getLogger(__name__)

RESULTS = "results.jsonl"
SUMMARY = "summary.json"
CONFIG = "eval_config.json"
_MARKER = re.compile(r"<(?:prefix|memory|reason|answer)(?:_\d+)?>")


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
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:16]


def read_results(path: Path) -> list[dict]:
    """Rows of a results file; a torn last line (a kill mid-write) is cut off the file and ignored.

    Raises:
        DataError: a corrupt line that is not the last one.
    """
    if not path.exists():
        return []
    data = path.read_bytes()
    rows, offset = [], 0
    for number, line in enumerate(data.split(b"\n")):
        end = offset + len(line)
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                if end < len(data) and data[end + 1:].strip():
                    raise DataError(f"corrupt line {number + 1}", file=str(path)) from None
                logger.warning("dropping a torn last line in %s (an interrupted run)", path)
                with open(path, "r+b") as handle:
                    handle.truncate(offset)
                break
        offset = end + 1
    return rows


def _append_rows(path: Path, rows: Iterable[dict]) -> None:
    payload = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows).encode("utf-8")
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, payload)
        os.fsync(fd)
    finally:
        os.close(fd)


def _majority(answers: Sequence[str | None]) -> str | None:
    """The most frequent parsed answer (ties: the one seen first); None if no sample parsed."""
    counts = Counter(a for a in answers if a is not None)
    if not counts:
        return None
    best = max(counts.values())
    return next(a for a in answers if a is not None and counts[a] == best)


def score_row(trace: Trace, texts: Sequence[str], n_tokens: Sequence[int], task: Task, settings: EvalSettings) -> dict:
    """One result row from the generated sample(s) of one question."""
    answers = [task.extract(text) for text in texts]
    predicted = answers[0] if len(texts) == 1 else _majority(answers)
    if predicted is None:
        outcome = UNPARSEABLE
    else:
        outcome = CORRECT if task.is_correct(predicted, trace.answer) else WRONG
    parsed = parse(texts[0], question=trace.question, answer=answers[0])
    row = {
        "id": trace.id, "question": trace.question, "gold": trace.answer, "predicted": predicted,
        "outcome": outcome, "steps": [{"kind": s.kind, "text": s.text} for s in parsed.steps],
        "raw": texts[0], "n_tokens": n_tokens[0], "n_memory": parsed.count(MEMORY),
        "n_reason": parsed.count(REASON), "marker_tokens": len(_MARKER.findall(texts[0])),
        "task": task.name, "task_version": task.version, "seed": settings.seed, "config": settings.digest(),
    }
    if len(texts) > 1:
        row["samples"] = [{"raw": t, "predicted": a} for t, a in zip(texts, answers)]
    return row


def summarise(rows: Sequence[dict], settings: EvalSettings) -> dict:
    """Accuracy with n and 95% Wilson CI, outcome counts, steps per answer and marker overhead."""
    n = len(rows)
    outcomes = Counter(row["outcome"] for row in rows)
    mean = (lambda key: sum(row[key] for row in rows) / n) if n else (lambda key: 0.0)
    low, high = wilson_ci(outcomes[CORRECT], n) if n else (0.0, 1.0)
    return {
        "n": n, "correct": outcomes[CORRECT], "wrong": outcomes[WRONG], "unparseable": outcomes[UNPARSEABLE],
        "accuracy": outcomes[CORRECT] / n if n else 0.0, "ci95": [low, high],
        "mean_memory_steps": mean("n_memory"), "mean_reason_steps": mean("n_reason"),
        "mean_generated_tokens": mean("n_tokens"), "mean_marker_tokens": mean("marker_tokens"),
        "seed": settings.seed, "config": asdict(settings), "config_hash": settings.digest(),
    }


def evaluate(model, tokenizer, traces: Sequence[Trace], task: Task, settings: EvalSettings, out_dir: str | Path,
             *, batch_size: int = 16, overwrite: bool = False, examples: Sequence[Trace] = (),
             progress: Callable[[int], None] | None = None) -> dict:
    """Evaluate ``traces`` and write ``results.jsonl``, ``summary.json`` and ``eval_config.json`` to ``out_dir``.

    Resumes when ``out_dir`` already holds rows made with the same settings. ``examples`` are worked
    examples shown in every prompt (few-shot; record their ids in ``settings.extra``).

    Raises:
        ConfigError: ``out_dir`` holds results made with other settings (pass ``overwrite=True``).
        DataError: duplicate ids in ``traces``, or a question without a gold answer.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ids = [t.id for t in traces]
    if len(set(ids)) != len(ids):
        raise DataError("duplicate question ids; every question needs a unique id to resume safely")
    if any(t.answer is None for t in traces):
        raise DataError("every evaluated question needs a gold answer")
    config_path, results_path = out / CONFIG, out / RESULTS
    if overwrite:
        results_path.unlink(missing_ok=True)
    elif config_path.exists() and results_path.exists():
        previous = json.loads(config_path.read_text()).get("config_hash")
        if previous != settings.digest():
            raise ConfigError(f"{out} holds results made with different settings; "
                              "choose another --out or pass --overwrite")
    config_path.write_text(json.dumps({"config_hash": settings.digest(), **asdict(settings)}, indent=1))
    done = {row["id"] for row in read_results(results_path)}
    todo = [t for t in traces if t.id not in done]
    if done:
        logger.info("resuming: %d of %d questions already done", len(traces) - len(todo), len(traces))
        if progress:
            progress(len(traces) - len(todo))
    sampling = settings.samples > 1
    # Generate in chunks of a few batches, appending each chunk's rows before starting the next.
    chunk = batch_size * 2
    for start in range(0, len(todo), chunk):
        part = todo[start:start + chunk]
        prompts = [render_prompt(t.question, task, tokenizer, settings.prompt_style, examples=examples)
                   for t in part]
        samples = []
        for k in range(settings.samples):
            samples.append(generate_texts(model, tokenizer, prompts, max_new_tokens=settings.max_new_tokens,
                                          batch_size=batch_size, do_sample=sampling,
                                          temperature=settings.temperature, top_p=settings.top_p,
                                          seed=settings.seed + 1000 * k + start))
        rows = [score_row(t, [s[i].text for s in samples], [s[i].n_tokens for s in samples], task, settings)
                for i, t in enumerate(part)]
        _append_rows(results_path, rows)
        if progress:
            progress(len(part))
    rows = read_results(results_path)
    order = {tid: i for i, tid in enumerate(ids)}
    rows = sorted((r for r in rows if r["id"] in order), key=lambda r: order[r["id"]])
    summary = summarise(rows, settings)
    tmp = out / (SUMMARY + ".tmp")
    tmp.write_text(json.dumps(summary, indent=1))
    os.replace(tmp, out / SUMMARY)
    return summary
