"""Dataset loaders: everything becomes a list of ``Trace``.

Sources:

- the paper's JSON files: a JSON list of ``{question, answer, cot_steps: ["[rag]: ...", ...], split}``;
- our JSONL: one ``Trace.to_dict()`` per line (``{question, steps: [{kind, text}], answer, meta}``);
- Hugging Face ``datasets``: ``hf:<id or local dir>[:config]`` with the paper's column names;
- the bundled data: ``bundled:strategyqa``, ``bundled:commonsenseqa``, ``bundled:truthfulqa``.

Malformed input raises one ``DataError`` naming file, record index and field. With ``skip_invalid=True``
the bad record is skipped instead and counted in the returned ``LoadReport`` by reason.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Literal

from memreason.errors import DataError
from memreason.tasks import Task, get_task
from memreason.traces import Step, Trace, UnknownTagError, normalise_kind, parse_tagged_step

logger = logging.getLogger(__name__)

BUNDLED_DIR = Path(__file__).parent / "bundled"
BUNDLED = {"strategyqa": "strategyqa.json", "commonsenseqa": "commonsenseqa.json", "truthfulqa": "truthfulqa.json"}

OnUnknownTag = Literal["error", "drop"]


@dataclass
class LoadReport:
    """What a load kept and dropped: ``loaded`` records, ``skipped`` by reason, ``dropped_steps`` by tag,
    and ``question_only`` records (no steps: usable for evaluation, not for training)."""

    source: str
    loaded: int = 0
    question_only: int = 0
    skipped: Counter = field(default_factory=Counter)
    dropped_steps: Counter = field(default_factory=Counter)

    def summary(self) -> str:
        parts = [f"{self.source}: {self.loaded} records loaded"]
        if self.question_only:
            parts.append(f"{self.question_only} without steps")
        if self.skipped:
            parts.append(f"{sum(self.skipped.values())} skipped ("
                         + ", ".join(f"{n} {reason}" for reason, n in self.skipped.most_common()) + ")")
        if self.dropped_steps:
            parts.append(f"{sum(self.dropped_steps.values())} steps with unknown tags dropped ("
                         + ", ".join(f"[{tag}] x{n}" for tag, n in self.dropped_steps.most_common()) + ")")
        return "; ".join(parts)


def _stable_id(question: str, seen: Counter) -> str:
    base = hashlib.sha1(question.encode("utf-8")).hexdigest()[:12]
    seen[base] += 1
    return base if seen[base] == 1 else f"{base}-{seen[base]}"


def _require_str(record: dict, key: str, where: dict, *, allow_empty: bool = False) -> str:
    if key not in record:
        raise DataError("missing field", field=key, **where)
    value = record[key]
    if not isinstance(value, str):
        raise DataError(f"expected a string, got {type(value).__name__}", field=key, **where)
    if not allow_empty and not value.strip():
        raise DataError("empty string", field=key, **where)
    return value


def _steps_from_tagged(lines: Any, where: dict, on_unknown_tag: OnUnknownTag, report: LoadReport) -> tuple[Step, ...]:
    if not isinstance(lines, list):
        raise DataError(f"expected a list of '[tag]: text' strings, got {type(lines).__name__}",
                        field="cot_steps", **where)
    steps = []
    for i, line in enumerate(lines):
        name = f"cot_steps[{i}]"
        if not isinstance(line, str):
            raise DataError(f"expected a string, got {type(line).__name__}", field=name, **where)
        try:
            tag, text = parse_tagged_step(line)
        except ValueError as exc:
            raise DataError(str(exc), field=name, **where) from None
        try:
            kind = normalise_kind(tag)
        except UnknownTagError as exc:
            if on_unknown_tag == "drop":
                report.dropped_steps[tag] += 1
                continue
            raise DataError(f"{exc}; pass --on-unknown-tag=drop to drop such steps", field=name, **where) from None
        if not text:
            raise DataError("empty step text", field=name, **where)
        steps.append(Step(kind, text))
    return tuple(steps)


def _steps_from_dicts(items: Any, where: dict, on_unknown_tag: OnUnknownTag, report: LoadReport) -> tuple[Step, ...]:
    if not isinstance(items, list):
        raise DataError(f"expected a list of {{kind, text}} objects, got {type(items).__name__}", field="steps", **where)
    steps = []
    for i, item in enumerate(items):
        name = f"steps[{i}]"
        if not isinstance(item, dict) or not isinstance(item.get("kind"), str) or not isinstance(item.get("text"), str):
            raise DataError("expected an object with string fields 'kind' and 'text'", field=name, **where)
        try:
            kind = normalise_kind(item["kind"])
        except UnknownTagError as exc:
            if on_unknown_tag == "drop":
                report.dropped_steps[item["kind"]] += 1
                continue
            raise DataError(f"{exc}; pass --on-unknown-tag=drop to drop such steps", field=name, **where) from None
        if not item["text"].strip():
            raise DataError("empty step text", field=name, **where)
        steps.append(Step(kind, item["text"].strip()))
    return tuple(steps)


def record_to_trace(record: Any, *, task: Task | None, source: str, index: int, on_unknown_tag: OnUnknownTag,
                    report: LoadReport, seen_ids: Counter, steps_optional: bool = False) -> Trace:
    """Validate one raw record (paper JSON or our JSONL shape) and turn it into a Trace.

    ``steps_optional`` lets records without any steps field load as question-only items (Hugging Face
    datasets such as StrategyQA carry no decomposition); files must say ``cot_steps: []`` explicitly.

    Raises:
        DataError: naming ``source``, ``index`` and the offending field.
    """
    where = {"file": source, "record": index}
    if not isinstance(record, dict):
        raise DataError(f"expected an object, got {type(record).__name__}", **where)
    question = _require_str(record, "question", where).strip()
    if "steps" in record:
        steps = _steps_from_dicts(record["steps"], where, on_unknown_tag, report)
    elif "cot_steps" in record:
        steps = _steps_from_tagged(record["cot_steps"], where, on_unknown_tag, report)
    elif steps_optional:
        steps = ()
    else:
        raise DataError("missing field (need 'cot_steps' or 'steps'; use [] for question-only items)",
                        field="cot_steps", **where)
    if "answer" not in record:
        raise DataError("missing field", field="answer", **where)
    answer = record["answer"]
    if task is not None:
        try:
            answer = task.canonical_answer(answer, question)
        except ValueError as exc:
            raise DataError(f"{exc} (task {task.name})", field="answer", **where) from None
    elif isinstance(answer, bool):
        answer = "True" if answer else "False"
    elif not isinstance(answer, str) or not answer.strip():
        raise DataError(f"expected a non-empty string, got {answer!r}", field="answer", **where)
    meta = dict(record.get("meta") or {})
    if "split" in record:
        if not isinstance(record["split"], str):
            raise DataError(f"expected a string, got {type(record['split']).__name__}", field="split", **where)
        meta["split"] = record["split"]
    if "id" in record:
        meta["id"] = str(record["id"])
    meta.setdefault("id", _stable_id(question, seen_ids))
    meta.setdefault("source", source)
    return Trace(question=question, steps=steps, answer=answer, meta=meta)


def _read_records(path: Path) -> Iterable[tuple[int, Any]]:
    """Yield ``(index, record)``; JSON files hold one list, JSONL files one object per line."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DataError("file not found", file=str(path)) from None
    except (IsADirectoryError, UnicodeDecodeError) as exc:
        raise DataError(f"cannot read as text: {exc}", file=str(path)) from None
    if path.suffix == ".jsonl":
        for i, line in enumerate(text.splitlines()):
            if not line.strip():
                continue
            try:
                yield i, json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"not valid JSON (line {i + 1}, column {exc.colno}): {exc.msg}",
                                file=str(path), record=i) from None
        return
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataError(f"not valid JSON (line {exc.lineno}, column {exc.colno}): {exc.msg}", file=str(path)) from None
    if not isinstance(data, list):
        raise DataError(f"expected a JSON list of records, got {type(data).__name__}", file=str(path))
    yield from enumerate(data)


def _hf_records(spec: str, split: str | None) -> Iterable[tuple[int, Any]]:
    try:
        import datasets
    except ImportError:
        raise DataError("reading 'hf:' datasets needs the 'datasets' package: pip install datasets") from None
    name, _, config = spec.partition(":")
    local = Path(name).expanduser()
    try:
        if (local / "dataset_info.json").is_file() or (local / "dataset_dict.json").is_file():  # save_to_disk
            ds = datasets.load_from_disk(str(local))
            if isinstance(ds, datasets.DatasetDict):
                if split is None or split not in ds:
                    raise DataError(f"choose a split with --split: {', '.join(ds)}", file=spec)
                ds = ds[split]
        else:
            ds = datasets.load_dataset(name, config or None, split=split or "train")
    except DataError:
        raise
    except Exception as exc:  # datasets raises many types (network, missing config, ...)
        raise DataError(f"could not load the Hugging Face dataset ({exc}); no dataset hub access? "
                        "save it locally and pass its directory", file=spec) from None
    yield from enumerate(ds)


def load_traces(source: str | Path, *, task: str | Task | None = None, split: str | None = None,
                on_unknown_tag: OnUnknownTag = "error", skip_invalid: bool = False) -> tuple[list[Trace], LoadReport]:
    """Load a dataset into Traces.

    Args:
        source: a ``.json`` / ``.jsonl`` path, ``bundled:<name>``, or ``hf:<id or dir>[:config]``.
        task: validate answers against this task's answer space (and canonicalise them).
        split: keep only records whose ``split`` equals this (records without a split are kept).
        on_unknown_tag: ``"error"`` (default) or ``"drop"`` steps whose tag is not in the tag table.
        skip_invalid: skip malformed records (counted in the report) instead of raising.

    Returns:
        (traces, report)

    Raises:
        DataError: unreadable source, or a malformed record when ``skip_invalid`` is False.
    """
    if on_unknown_tag not in ("error", "drop"):
        raise DataError(f"on_unknown_tag must be 'error' or 'drop', got {on_unknown_tag!r}")
    task_obj = get_task(task) if isinstance(task, str) else task
    source = str(source)
    if source.startswith("bundled:"):
        name = source.split(":", 1)[1]
        if name not in BUNDLED:
            raise DataError(f"unknown bundled dataset {name!r}; choose one of {', '.join(BUNDLED)}")
        path = BUNDLED_DIR / BUNDLED[name]
        records, label = _read_records(path), f"bundled:{name}"
        if task_obj is None:
            task_obj = get_task(name)
    elif source.startswith("hf:"):
        records, label = _hf_records(source[3:], split), source
    else:
        records, label = _read_records(Path(source).expanduser()), source
    report = LoadReport(source=label)
    traces, seen = [], Counter()
    for index, record in records:
        if split is not None and isinstance(record, dict) and record.get("split", split) != split:
            continue
        try:
            trace = record_to_trace(record, task=task_obj, source=label, index=index,
                                    on_unknown_tag=on_unknown_tag, report=report, seen_ids=seen,
                                    steps_optional=source.startswith("hf:"))
        except DataError as exc:
            if not skip_invalid:
                raise
            report.skipped[exc.problem if exc.field is None else f"{exc.field}: {exc.problem}"[:80]] += 1
            continue
        traces.append(trace)
        report.question_only += not trace.steps
    report.loaded = len(traces)
    (logger.warning if report.skipped or report.dropped_steps else logger.debug)(report.summary())
    return traces, report


def require_steps(traces: list[Trace], source: str = "dataset") -> list[Trace]:
    """Refuse question-only items for training, with a count.

    Raises:
        DataError: some traces have no steps.
    """
    missing = sum(not t.steps for t in traces)
    if missing:
        raise DataError(f"{missing} of {len(traces)} records have no steps (empty cot_steps) and cannot be "
                        "used for training; they are fine for evaluation", file=source)
    return traces


def write_jsonl(traces: Iterable[Trace], path: str | Path) -> None:
    """Write traces in our JSONL format (one ``Trace.to_dict()`` per line)."""
    with open(path, "w", encoding="utf-8") as handle:
        for trace in traces:
            handle.write(json.dumps(trace.to_dict(), ensure_ascii=False) + "\n")
