"""Dataset loaders: everything becomes a list of ``Trace``, and one validated load that ``data check``,
``eval`` and ``train`` all run.

Sources:

- the paper's JSON files: a JSON list of ``{question, answer, cot_steps: ["[rag]: ...", ...], split}``;
- our JSONL: one ``Trace.to_dict()`` per line (``{question, steps: [{kind, text}], answer, meta}``);
- Hugging Face ``datasets``: ``hf:<id or local dir>[:config]``, through a column mapping when the
  dataset's columns are not ours (``data.hub``);
- the bundled data: ``bundled:strategyqa``, ``bundled:commonsenseqa``, ``bundled:truthfulqa``.

Steps that cannot be used as they are (empty, compound tags, unknown tags) follow the step policy of
``data.paper``; a record with a valid question and answer is kept for evaluation whatever its steps look
like, and ``training_traces`` leaves the ones without usable steps out of training. Malformed input raises
one ``DataError`` naming file, record index and field. With ``skip_invalid=True`` a bad record is skipped
(and a bad step dropped) instead, and counted in the returned ``LoadReport``.

``load_dataset`` is the load with every check a verb needs (default task, at least one record, unique ids,
gold answers, usable steps for training); ``data check`` prints what it did, ``eval`` and ``train`` log it.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections import Counter
from pathlib import Path
from typing import Any, Iterable

from memreason.data.hub import AUTO, PRESETS, ColumnMapping, column_names, detect_preset, hf_rows, open_dataset, \
    parse_columns
from memreason.data.paper import COMPOUND_TAG_CHOICES, ON_UNKNOWN_TAG_CHOICES, CompoundTag, OnUnknownTag, \
    StepPolicy, read_steps
from memreason.data.report import EMPTIED, NO_STEPS, SKIPPED_RECORD, LoadReport
from memreason.errors import ConfigError, DataError
from memreason.tasks import Task, get_task
from memreason.traces import Trace

logger = logging.getLogger(__name__)

BUNDLED_DIR = Path(__file__).parent / "bundled"
BUNDLED = {"strategyqa": "strategyqa.json", "commonsenseqa": "commonsenseqa.json", "truthfulqa": "truthfulqa.json"}
# The task `eval` assumes for a base model when neither --task nor the data names one (memreason.api.load).
DEFAULT_TASK = "strategyqa"
# Where ``LoadReport.task`` came from.
FROM_FLAG, FROM_DATA, FROM_DEFAULT = "--task", "the data's own", "default: what eval assumes for a base model"

__all__ = ["BUNDLED", "COMPOUND_TAG_CHOICES", "DEFAULT_TASK", "ON_UNKNOWN_TAG_CHOICES", "PRESETS", "ColumnMapping",
           "LoadReport", "StepPolicy", "check_traces", "load_dataset", "load_traces", "record_to_trace",
           "require_steps", "source_task", "training_traces", "write_jsonl"]


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


def _answer(record: dict, question: str, task: Task | None, where: dict) -> str:
    if "answer" not in record:
        raise DataError("missing field", field="answer", **where)
    answer = record["answer"]
    if task is not None:
        try:
            return task.canonical_answer(answer, question)
        except ValueError as exc:
            raise DataError(f"{exc} (task {task.name})", field="answer", **where) from None
    if isinstance(answer, bool):
        return "True" if answer else "False"
    if not isinstance(answer, str) or not answer.strip():
        raise DataError(f"expected a non-empty string, got {answer!r}", field="answer", **where)
    return answer


def record_to_trace(record: Any, *, task: Task | None, source: str, index: int, policy: StepPolicy,
                    report: LoadReport, seen_ids: Counter, steps_optional: bool = False) -> Trace:
    """Validate one raw record (paper JSON or our JSONL shape) and turn it into a Trace.

    Question, answer and split are checked before the steps, so a record that is skipped adds nothing to
    the step counts. ``steps_optional`` lets records without any steps field load as question-only items
    (hub datasets such as StrategyQA carry no decomposition); files must say ``cot_steps: []`` explicitly.

    Raises:
        DataError: naming ``source``, ``index`` and the offending field.
    """
    where = {"file": source, "record": index}
    if not isinstance(record, dict):
        raise DataError(f"expected an object, got {type(record).__name__}", **where)
    question = _require_str(record, "question", where).strip()
    answer = _answer(record, question, task, where)
    meta = dict(record.get("meta") or {})
    if "split" in record:
        if not isinstance(record["split"], str):
            raise DataError(f"expected a string, got {type(record['split']).__name__}", field="split", **where)
        meta["split"] = record["split"]
    key = "steps" if "steps" in record else "cot_steps" if "cot_steps" in record else None
    if key is None and not steps_optional:
        if not policy.skip_invalid:
            raise DataError("missing field (need 'cot_steps' or 'steps'; use [] for question-only items)",
                            field="cot_steps", **where)
        report.invalid_steps["missing cot_steps"] += 1
    steps = read_steps(record, key, where, policy, report) if key else ()
    if not steps:
        had_steps = key is not None and isinstance(record[key], list) and len(record[key]) > 0
        report.emptied += had_steps
        report.no_steps += not had_steps
        report.note(EMPTIED if had_steps else NO_STEPS, f"record {index}", question)
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
            except RecursionError:
                raise DataError("nests JSON too deeply", file=str(path), record=i) from None
            except json.JSONDecodeError as exc:
                raise DataError(f"not valid JSON (line {i + 1}, column {exc.colno}): {exc.msg}",
                                file=str(path), record=i) from None
        return
    try:
        data = json.loads(text)
    except RecursionError:
        raise DataError("nests JSON too deeply to be a dataset", file=str(path)) from None
    except json.JSONDecodeError as exc:
        raise DataError(f"not valid JSON (line {exc.lineno}, column {exc.colno}): {exc.msg}", file=str(path)) from None
    if not isinstance(data, list):
        raise DataError(f"expected a JSON list of records, got {type(data).__name__}", file=str(path))
    yield from enumerate(data)


def _task(task: str | Task | None) -> Task | None:
    if task is None or isinstance(task, Task):
        return task
    try:
        return get_task(task)
    except KeyError as exc:
        raise ConfigError(exc.args[0]) from None


def source_task(source: str | Path, columns: Any = AUTO) -> str | None:
    """The task a source names itself: a bundled dataset's name, or the column preset's task of an ``hf:``
    source (given, or detected from a local dataset's columns). None when the source does not say."""
    source = str(source)
    if source.startswith("bundled:"):
        name = source.split(":", 1)[1]
        return name if name in BUNDLED else None
    if source.startswith("hf:"):
        mapping = parse_columns(columns)
        if mapping == AUTO:
            spec = source[3:]
            if not Path(spec.partition(":")[0]).expanduser().is_dir():
                return None  # a hub id: not opened just to ask
            mapping = detect_preset(column_names(open_dataset(spec)))
        return mapping.task if isinstance(mapping, ColumnMapping) else None
    return None


def _load(source: str | Path, task: str | Task | None, split: str | None, policy: StepPolicy,
          columns: Any, default_task: str | None = None) -> tuple[list[Trace], LoadReport]:
    task_obj, origin = _task(task), FROM_FLAG if task is not None else None
    source = str(source)
    mapping, own = None, None
    if source.startswith("bundled:"):
        name = source.split(":", 1)[1]
        if name not in BUNDLED:
            raise DataError(f"unknown bundled dataset {name!r}; choose one of {', '.join(BUNDLED)}")
        records, label, own = _read_records(BUNDLED_DIR / BUNDLED[name]), f"bundled:{name}", name
    elif source.startswith("hf:"):
        records, mapping = hf_rows(source[3:], split, columns)
        label, own = source, mapping.task if mapping is not None else None
    else:
        if columns not in (None, AUTO):
            raise DataError("a column mapping (--columns) applies to hf: datasets only", file=source)
        records, label = _read_records(Path(source).expanduser()), source
    if task_obj is None and (own or default_task):
        task_obj = _task(own or default_task)
        origin = FROM_DATA if own else FROM_DEFAULT
    report = LoadReport(source=label, compound_tag=policy.compound_tag, task=task_obj.name if task_obj else None,
                        task_origin=origin, columns=mapping.name if mapping else None)
    traces, seen, first_record = [], Counter(), {}
    for index, record in records:
        report.read += 1
        where = {"file": label, "record": index}
        try:
            if mapping is not None:
                record = mapping.to_record(record, index, where)
                if split is not None:
                    record["split"] = split
            if isinstance(record, dict):
                report.splits[record["split"] if isinstance(record.get("split"), str) else "-"] += 1
            if split is not None and isinstance(record, dict) and record.get("split", split) != split:
                continue
            trace = record_to_trace(record, task=task_obj, source=label, index=index, policy=policy,
                                    report=report, seen_ids=seen, steps_optional=source.startswith("hf:"))
        except DataError as exc:
            if exc.field == "answer" and origin == FROM_DEFAULT:
                exc = DataError(f"{exc.problem}; {task_obj.name} is the default task, as in eval: pass --task if "
                                "the data belongs to another", file=exc.file, record=exc.record, field=exc.field)
            if not policy.skip_invalid:
                raise exc from None
            report.skipped[exc.problem if exc.field is None else f"{exc.field}: {exc.problem}"[:80]] += 1
            report.note(SKIPPED_RECORD, f"record {index}", exc.problem, exc.field or "")
            continue
        if trace.id in first_record:
            report.duplicate_ids.setdefault(trace.id, [first_record[trace.id]]).append(index)
        else:
            first_record[trace.id] = index
        traces.append(trace)
    report.question_only = report.no_steps + report.emptied
    report.loaded = len(traces)
    return traces, report


def load_traces(source: str | Path, *, task: str | Task | None = None, split: str | None = None,
                on_unknown_tag: OnUnknownTag = "error", skip_invalid: bool = False,
                compound_tag: CompoundTag = "first", columns: Any = AUTO) -> tuple[list[Trace], LoadReport]:
    """Load a dataset into Traces (no dataset-level checks; verbs use ``load_dataset``).

    Args:
        source: a ``.json`` / ``.jsonl`` path, ``bundled:<name>``, or ``hf:<id or dir>[:config]``.
        task: validate answers against this task's answer space (and canonicalise them); bundled data and
            hub presets bring their own when None.
        split: keep only records whose ``split`` equals this (records without a split are kept); for
            ``hf:`` sources, the dataset split.
        on_unknown_tag: ``"error"`` (default) or ``"drop"`` steps whose tag is unknown or unreadable.
        skip_invalid: skip malformed records, and drop malformed steps, counted in the report, instead of raising.
        compound_tag: how a mixed compound tag is read (``data.paper``): first (default), memory, reason, drop.
        columns: column mapping for ``hf:`` sources (``data.hub.parse_columns``); default auto-detect.

    Returns:
        (traces, report)

    Raises:
        DataError: unreadable source, or a malformed record when ``skip_invalid`` is False.
        ConfigError: an unknown task name.
    """
    traces, report = _load(source, task, split, StepPolicy(on_unknown_tag, compound_tag, skip_invalid), columns)
    (logger.warning if report.skipped or report.dropped_steps else logger.debug)(report.summary())
    return traces, report


def check_traces(traces: list[Trace], report: LoadReport, *, split: str | None = None) -> None:
    """The dataset-level checks every verb needs before it spends time on a model.

    Raises:
        DataError: no records (an empty file, ``[]``, no record of ``split``, or every record skipped),
            an id given to two records, or a record without a gold answer.
    """
    if not traces:
        if report.read == 0:
            problem = "0 records loaded: the source holds no records"
        elif report.skipped:
            problem = (f"0 records loaded: all {sum(report.skipped.values())} records"
                       + (f" of split {split!r}" if split is not None else "") + " were skipped as invalid")
        else:
            present = ", ".join(f"{name} {n}" for name, n in sorted(report.splits.items()))
            problem = f"0 records loaded: none of the {report.read} records is in split {split!r} (splits: {present})"
        raise DataError(problem, file=report.source)
    if report.duplicate_ids:
        tid, where = next(iter(report.duplicate_ids.items()))
        raise DataError(f"id {tid!r} is given to records {', '.join(map(str, where))} "
                        f"({len(report.duplicate_ids)} duplicated ids in all); every question needs a unique id "
                        "(evaluation resumes by id)", file=report.source, record=where[1], field="id")
    ids = Counter(t.id for t in traces)
    twice = [tid for tid, n in ids.items() if n > 1]
    if twice:
        raise DataError(f"id {twice[0]!r} is given to {ids[twice[0]]} records; every question needs a unique id",
                        file=report.source, field="id")
    missing = [i for i, t in enumerate(traces) if t.answer is None]
    if missing:
        raise DataError(f"{len(missing)} records have no gold answer", file=report.source, record=missing[0],
                        field="answer")


def training_traces(traces: list[Trace], report: LoadReport | None = None) -> list[Trace]:
    """The traces training can use: those with at least one usable step. The others stay valid for
    evaluation; their count goes into ``report.excluded_from_training``.

    Raises:
        DataError: no trace has a usable step.
    """
    usable = [t for t in traces if t.steps]
    excluded = len(traces) - len(usable)
    source = report.source if report is not None else "dataset"
    if report is not None:
        report.excluded_from_training = excluded
    if not usable:
        raise DataError(f"none of the {len(traces)} records has a usable step, so there is nothing to train on "
                        "(they are fine for evaluation; annotate them with `memreason annotate`)", file=source)
    if excluded:
        logger.info("%s: %d of %d records have no usable steps and are left out of training (kept for evaluation)",
                    source, excluded, len(traces))
    return usable


def load_dataset(source: str | Path, *, task: str | Task | None = None, split: str | None = None,
                 needs_steps: bool = False, on_unknown_tag: OnUnknownTag = "error", skip_invalid: bool = False,
                 compound_tag: CompoundTag = "first", columns: Any = AUTO,
                 log: bool = True) -> tuple[list[Trace], LoadReport]:
    """The one validated load: what ``data check`` runs is what ``eval`` and ``train`` run.

    Args:
        source, split, on_unknown_tag, skip_invalid, compound_tag, columns: as in ``load_traces``.
        task: the task answers must fit; None: the data's own task (bundled name, hub preset),
            else ``DEFAULT_TASK``, as ``eval`` assumes.
        needs_steps (bool): training with steps: return only ``training_traces`` (the rest are counted).
        log (bool): log the report's summary (``data check`` prints it instead).

    Returns:
        (traces, report) with ``report.task`` / ``report.task_origin`` set.

    Raises:
        DataError: as ``load_traces`` and ``check_traces``; ``training_traces`` when ``needs_steps``.
        ConfigError: an unknown task name.
    """
    policy = StepPolicy(on_unknown_tag, compound_tag, skip_invalid)
    traces, report = _load(source, task, split, policy, columns, default_task=DEFAULT_TASK)
    check_traces(traces, report, split=split)
    if needs_steps:
        traces = training_traces(traces, report)
    if log:
        (logger.warning if report.skipped else logger.info)(report.summary())
    return traces, report


def require_steps(traces: list[Trace], source: str = "dataset") -> list[Trace]:
    """Refuse question-only items, with a count (strict; ``training_traces`` leaves them out instead).

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
