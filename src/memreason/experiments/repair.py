"""Repairing an evaluation: find the faulty memory step of each wrong answer, correct it from a source, and
let the model answer again from there.

``run_repair(settings)`` reads an evaluation (``results.jsonl`` + ``eval_config.json`` from ``memreason
eval``), and for each selected row (wrong answers by default):

1. **locate** the step to correct (``corrections.locate_step``): the first faulty memory step by a judge
   (world, exact or LLM), or the least confident memory step (no judge);
2. **correct** it from a source (``corrections.load_source``: ``world:``, ``gold:``, ``facts:``, ``text:``,
   ``llm:``);
3. **revise** (``interventions.revise``): the output before the step is kept token for token, the step is
   replaced, the model continues greedily to its answer line, optionally with the corrected memory injected
   (a fixed ``layer=..,tau=..``, or the cell a small sweep chooses on a **dev** evaluation, which must
   share no question with the repaired one).

Outputs (``out``): ``repair_config.json`` (the settings and their digest), ``repaired.jsonl`` (one row per
selected row, in the evaluation's order: the repaired ``Result``, or the original one when nothing was
located or corrected, each with ``repair``: status, reason, located step, correction, injection and the
original answer, outcome and text; so both answers are in every row), ``injection_sweep.json`` (the dev
sweep) and ``summary.json``. Rows are appended per chunk (``io.append_jsonl``); a re-run with the same
settings resumes where a killed one stopped (no row lost or written twice).

Summary: fix rate (wrong → right among repaired rows), break rate (right → not right among repaired
rows), new unparseable (parseable → unparseable), each with a Wilson 95% CI; accuracy before and after
over the whole evaluation with CIs, and the paired exact McNemar test of the repaired answers against the
original ones (``evaluate.compare``).
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Literal, Sequence

from memreason.corrections import (Correction, CorrectionSource, GoldSource, LLMSource, WorldSource, describe_source,
                                   load_source)
from memreason.corrections import locate as locate_step_and_reason
from memreason.errors import ConfigError, DataError
from memreason.interventions.revise import Edit, Injection
from memreason.io import OutputDir, append_jsonl, read_json, write_json
from memreason.stats import wilson_ci
from memreason.tasks import CORRECT, UNPARSEABLE, WRONG
from memreason.traces import Result

logger = logging.getLogger(__name__)

REPAIRED = "repaired.jsonl"
SUMMARY = "summary.json"
SWEEP = "injection_sweep.json"
CONFIG = "repair_config.json"
ROW_SETS = {"wrong": (WRONG,), "failed": (WRONG, UNPARSEABLE), "all": (CORRECT, WRONG, UNPARSEABLE)}
# `memreason eval` names the embedded model this way in eval_config.json (memreason.api.load)
EMBEDDED_NAME = "SmolLM2-135M-Instruct"


@dataclass
class RepairSettings:
    """What ``memreason repair`` repairs, with what, and where the outputs go.

    Args:
        results (str): an evaluation directory (``results.jsonl`` and ``eval_config.json``) or its results file.
        model (str | None): the model to continue with; None = the model the evaluation names.
        source (str): where corrections come from (``corrections.load_source`` specs).
        locate (str, default "judge"): ``judge`` (first faulty memory step) or ``confidence`` (least
            confident memory step, no judge).
        judge (str, default "auto"): ``auto`` (the source's own), ``exact``, ``world``, ``llm`` (locate=judge).
        judge_data (str | None): the judge's knowledge (see ``make_judge``); None: the source's.
        rows (str, default "wrong"): which rows to repair: ``wrong``, ``failed`` (wrong + unparseable), ``all``.
        inject (str | None): ``layer=L,tau=T[,tau_mode=relative|absolute][,encoder=NAME]``: inject the
            corrected memory while the model continues.
        choose_injection (bool): choose layer and tau by a sweep on ``dev_results`` instead.
        dev_results (str | None): an evaluation of a dev split (no question shared with ``results``).
        layers (list[int] | None): the sweep's layers (None: ``default_layers``).
        taus (list[float]): the sweep's strengths; tau_mode, encoder: as in ``memory_injection.inject``.
        out (str): output directory. batch_size (int): revisions per generate call.
        max_new_tokens (int | None): cap on a whole output (None: the evaluation's own cap).
        limit (int | None): only the first N selected rows. overwrite (bool): discard earlier outputs.
        device, dtype: as ``memreason.model.load``.
    """

    results: str = ""
    model: str | None = None
    source: str = ""
    locate: Literal["judge", "confidence"] = "judge"
    judge: Literal["auto", "exact", "world", "llm"] = "auto"
    judge_data: str | None = None
    rows: Literal["wrong", "failed", "all"] = "wrong"
    inject: str | None = None
    choose_injection: bool = False
    dev_results: str | None = None
    layers: list[int] | None = None
    taus: list[float] = field(default_factory=lambda: [0.1, 0.4])
    tau_mode: Literal["absolute", "relative"] = "relative"
    encoder: Literal["unembed", "unembed-centered", "embed", "layer"] = "unembed"
    out: str = ""
    batch_size: int = 16
    max_new_tokens: int | None = None
    limit: int | None = None
    overwrite: bool = False
    device: str = "auto"
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"


def check_settings(s: RepairSettings) -> list[str]:
    """Every problem that can be found without loading a model or data."""
    problems = []
    for key in ("results", "source", "out"):
        if not str(getattr(s, key) or "").strip():
            problems.append(f"{key}: required (--{key} ...)")
    if s.inject is not None and s.choose_injection:
        problems.append("give either inject=layer=..,tau=.. or choose_injection, not both")
    if s.choose_injection and not s.dev_results:
        problems.append("choose_injection needs dev_results: an evaluation of a dev split (never the repaired rows)")
    if s.inject is not None:
        try:
            parse_injection(s.inject, s.tau_mode, s.encoder)
        except ConfigError as exc:
            problems.append(str(exc))
    if s.batch_size < 1:
        problems.append(f"batch_size must be >= 1, got {s.batch_size}")
    if s.max_new_tokens is not None and s.max_new_tokens < 1:
        problems.append(f"max_new_tokens must be >= 1, got {s.max_new_tokens}")
    if s.limit is not None and s.limit < 1:
        problems.append(f"limit must be >= 1 (or left out), got {s.limit}")
    if not s.taus:
        problems.append("taus: give at least one strength for the sweep")
    return problems


def parse_injection(text: str, tau_mode: str = "relative", encoder: str = "unembed") -> Injection:
    """``"layer=8,tau=0.3[,tau_mode=absolute][,encoder=embed]"`` as an ``Injection`` (memory: the correction).

    Raises:
        ConfigError: a malformed item, an unknown key, or a missing layer or tau.
    """
    values: dict[str, str] = {"tau_mode": tau_mode, "encoder": encoder}
    for item in filter(None, (part.strip() for part in str(text).split(","))):
        key, sep, value = item.partition("=")
        if not sep or key.strip() not in ("layer", "tau", "tau_mode", "encoder"):
            raise ConfigError(f"inject: {item!r} is not one of layer=, tau=, tau_mode=, encoder= "
                              "(e.g. inject=layer=8,tau=0.3)")
        values[key.strip()] = value.strip()
    if "layer" not in values or "tau" not in values:
        raise ConfigError(f"inject: {text!r} needs both layer= and tau= (e.g. layer=8,tau=0.3)")
    try:
        return Injection(layer=int(values["layer"]), tau=float(values["tau"]), tau_mode=values["tau_mode"],
                         encoder=values["encoder"])
    except ValueError:
        raise ConfigError(f"inject: layer must be an integer and tau a number, got {text!r}") from None


# ---------------------------------------------------------------- reading an evaluation

@dataclass
class Evaluation:
    """An evaluation directory: its rows and the settings that made them (``eval_config.json``)."""

    path: Path
    rows: list[Result]
    config: dict

    @property
    def task(self):
        from memreason.tasks import get_task

        return get_task(self.config["task"])

    @property
    def scheme(self):
        from memreason.model.tokens import TokenScheme

        return TokenScheme(**self.config["scheme"])

    @property
    def model(self) -> str | None:
        name = self.config.get("model")
        return None if name in (None, EMBEDDED_NAME) else name


def read_evaluation(path: str | Path) -> Evaluation:
    """The rows and settings of an evaluation (a directory, or its ``results.jsonl``). Never writes.

    Raises:
        DataError: no results file, no ``eval_config.json`` beside it, or rows written before results
            schema 2 (no prompt kept; evaluate again to repair them).
    """
    from memreason.evaluate import CONFIG as EVAL_CONFIG
    from memreason.evaluate import RESULTS, read_results

    path = Path(path)
    results = path / RESULTS if path.is_dir() else path
    rows = read_results(results)
    config_path = results.parent / EVAL_CONFIG
    if not config_path.is_file():
        raise DataError(f"no {EVAL_CONFIG} beside the results: repair reads the task and token scheme from it "
                        "(write both with `memreason eval`)", file=str(results))
    config = read_json(config_path, what="evaluation settings")
    if not isinstance(config, dict) or "task" not in config or "scheme" not in config:
        raise DataError("not the settings of a `memreason eval` run (no task or scheme)", file=str(config_path))
    stale = sum(not r.prompt for r in rows)
    if stale:
        raise DataError(f"{stale} of {len(rows)} rows keep no prompt (written before results schema 2); "
                        "evaluate again with `memreason eval` to repair them", file=str(results))
    return Evaluation(results.parent, rows, config)


def select_rows(rows: Sequence[Result], which: str, limit: int | None = None) -> list[Result]:
    """The rows a repair looks at (``wrong``, ``failed`` or ``all``), the first ``limit`` of them."""
    wanted = ROW_SETS[which]
    chosen = [r for r in rows if r.outcome in wanted]
    return chosen[:limit] if limit is not None else chosen


# ---------------------------------------------------------------- the judge that locates

def make_judge(kind: str, data: str | None = None, source: CorrectionSource | None = None, *,
               cache_dir: str | Path | None = None):
    """The judge a repair locates faulty steps with.

    Args:
        kind (str): ``auto`` (the source's own judge: world for ``world:``, exact for ``gold:``/``facts:``,
            the LLM judge for ``llm:``), ``exact``, ``world``, ``llm`` or ``none``.
        data (str | None): where the judge's knowledge comes from: ``exact`` a gold source
            (``bundled:strategyqa``, a ``.jsonl``) or a ``memreason-facts/1`` ``.json``; ``world`` a world
            dir; ``llm`` ``MODEL[@BASE_URL]``. None: the source's.
        source: the correction source (its judge is reused when it has one of this kind).
        cache_dir: the LLM judge's reply cache.

    Returns:
        A judge, or None for ``none`` (and for ``auto`` with a ``text:`` source).

    Raises:
        ConfigError: an unknown kind, or a kind whose data neither ``data`` nor the source gives.
    """
    from memreason.analysis.exact_judge import ExactJudge, FactTable
    from memreason.corrections import _LLM_SPEC

    if kind not in ("auto", "exact", "world", "llm", "none"):
        raise ConfigError(f"unknown judge {kind!r}; choose auto, exact, world, llm or none")
    if kind == "none":
        return None
    own = getattr(source, "judge", None)
    if kind == "auto":
        if isinstance(source, LLMSource) and data is None:
            return _llm_judge(source.model, source.base_url, cache_dir)
        if own is None and data is None:
            return None
        kind = "world" if isinstance(source, WorldSource) else "llm" if isinstance(source, LLMSource) else "exact"
    if data is None:
        if kind == "llm" and isinstance(source, LLMSource):
            return _llm_judge(source.model, source.base_url, cache_dir)
        if own is not None and own.name == kind:
            return own
        raise ConfigError(f"the {kind} judge needs its data (judge_data=...): the correction source has none")
    if kind == "world":
        return WorldSource(data).judge
    if kind == "llm":
        match = _LLM_SPEC.match(data)
        return _llm_judge(*(match.group("model", "url") if match else (data, None)), cache_dir)
    if data.endswith(".json") and Path(data).is_file():
        return ExactJudge(FactTable.load(data), source=data)
    return GoldSource(data).judge


def _llm_judge(model: str, base_url: str | None, cache_dir):
    from memreason.analysis.judges import LLMJudge
    from memreason.llm import OpenAIChat, ResponseCache, resolve_endpoint

    base_url, api_key = resolve_endpoint(base_url, None)
    return LLMJudge(OpenAIChat(base_url, api_key), model,
                    cache=ResponseCache(cache_dir) if cache_dir is not None else None)


# ---------------------------------------------------------------- planning and revising

@dataclass(frozen=True)
class Plan:
    """What to do with one row: the located step, the correction, and the edit (None: skip, ``reason`` says why)."""

    row: Result
    located: int | None
    correction: Correction | None
    edit: Edit | None
    reason: str = ""


def plan_row(row: Result, source, judge, locate: str) -> Plan:
    """Locate and correct one row; never raises for a row that cannot be repaired (the plan says why)."""
    from memreason.analysis.exact_judge import normalise_text
    from memreason.model.tokens import has_marker

    step, why = locate_step_and_reason(row, judge, locate)
    if step is None:
        return Plan(row, None, None, None, why)
    correction = source.correct(row, step)
    if correction is None:
        return Plan(row, step, None, None, f"the source has no correction for step {step + 1}")
    if not 0 <= correction.step < len(row.steps):
        return Plan(row, step, correction, None, f"the correction names step {correction.step + 1}, which does not exist")
    if has_marker(correction.text) or not correction.text.strip():
        return Plan(row, step, correction, None, "the correction is empty or holds control tokens")
    if normalise_text(correction.text) == normalise_text(row.steps[correction.step].text):
        return Plan(row, step, correction, None, "the correction restates the step")
    return Plan(row, step, correction, Edit(correction.step, text=correction.text, kind=correction.kind))


def _record(plan: Plan, status: str, locate: str, judge_name: str | None, injection: Injection | None) -> dict:
    row = plan.row
    return {"status": status, "reason": plan.reason, "by": locate, "judge": judge_name, "located": plan.located,
            "correction": plan.correction.to_dict() if plan.correction else None,
            "injection": asdict(injection) if injection is not None and status == "repaired" else None,
            "original": {"predicted": row.predicted, "outcome": row.outcome, "raw": row.raw,
                         "steps": [{"kind": s.kind, "text": s.text} for s in row.steps]}}


def repair_rows(model, tokenizer, task, scheme, plans: Sequence[Plan], *, max_new_tokens: int, batch_size: int,
                injection: Injection | None = None, locate: str = "judge", judge_name: str | None = None
                ) -> list[dict]:
    """Revise every plan that has an edit; one output row per plan, in order (see the module docstring)."""
    from memreason.interventions.revise import revise_batch

    todo = [p for p in plans if p.edit is not None]
    revised = iter(revise_batch(model, tokenizer, task, scheme, [(p.row, p.edit) for p in todo],
                                max_new_tokens=max_new_tokens, batch_size=batch_size, injection=injection)
                   if todo else ())
    out = []
    for plan in plans:
        if plan.edit is None:
            out.append({**plan.row.to_dict(), "repair": _record(plan, "skipped", locate, judge_name, injection)})
        else:
            out.append({**next(revised).to_dict(), "repair": _record(plan, "repaired", locate, judge_name, injection)})
    return out


# ---------------------------------------------------------------- statistics

def _rate(count: int, n: int) -> dict:
    low, high = wilson_ci(count, n) if n else (None, None)
    return {"count": count, "n": n, "rate": count / n if n else None, "ci95": [low, high]}


def summarise_repair(originals: Sequence[Result], repaired: Sequence[Result]) -> dict:
    """Fix, break and new-unparseable rates with Wilson CIs, and the whole evaluation before/after.

    Args:
        originals: every row of the evaluation; repaired: the rows of ``repaired.jsonl``.
    """
    from memreason.evaluate import compare

    done = [r for r in repaired if r.extra["repair"]["status"] == "repaired"]
    before = lambda r: r.extra["repair"]["original"]["outcome"]  # noqa: E731
    was_wrong = [r for r in done if before(r) != CORRECT]
    was_right = [r for r in done if before(r) == CORRECT]
    parseable = [r for r in done if before(r) != UNPARSEABLE]
    by_id = {r.id: r for r in repaired}
    after = [by_id.get(r.id, r) for r in originals]
    paired = compare(originals, after, names=("original", "repaired"))
    n = len(originals)
    accuracy = lambda rows: _rate(sum(r.outcome == CORRECT for r in rows), len(rows))  # noqa: E731
    return {
        "rows": len(repaired), "repaired": len(done),
        "skipped": dict(Counter(r.extra["repair"]["reason"] for r in repaired
                                if r.extra["repair"]["status"] != "repaired")),
        "fix": _rate(sum(r.outcome == CORRECT for r in was_wrong), len(was_wrong)),
        "break": _rate(sum(r.outcome != CORRECT for r in was_right), len(was_right)),
        "new_unparseable": _rate(sum(r.outcome == UNPARSEABLE for r in parseable), len(parseable)),
        "answer_changed": sum(r.predicted != r.extra["repair"]["original"]["predicted"] for r in done),
        "accuracy_before": accuracy(originals), "accuracy_after": accuracy(after), "n": n,
        "mcnemar": {"gained": len(paired.gained), "lost": len(paired.lost), "p": paired.p_mcnemar},
    }


# ---------------------------------------------------------------- choosing the injection on a dev split

def default_layers(n_layers: int) -> list[int]:
    """The first layer, a third and two thirds of the depth (0-based, distinct). Layer 0 is in: the
    two-hop sweep chose it for SmolLM2 (``serve.editor.DEFAULT_INJECTION``, benchmarks/RESULTS.md)."""
    return sorted({0, n_layers // 3, (2 * n_layers) // 3})


def sweep_injection(model, tokenizer, task, scheme, plans: Sequence[Plan], *, layers: Sequence[int],
                    taus: Sequence[float], tau_mode: str, encoder: str, max_new_tokens: int, batch_size: int,
                    memory: Callable[[Plan], str | None] | None = None,
                    edit: Callable[[Plan], Edit] | None = None) -> dict:
    """Repair the dev plans under no injection and under each layer x tau cell; choose the best cell.

    The score of a cell is fixed minus broken rows; the best score wins, ties going to no injection, then
    to the smaller tau, then to the lower layer (the least intervention that does as well).

    Args:
        memory: the text to inject for a plan (default: the correction); edit: the edit to apply (default:
            the plan's own).

    Returns:
        dict: ``cells`` (layer, tau, fixed, broke, n, score; layer None = no injection), ``chosen`` (the
        winning cell's layer and tau, or None for no injection) and ``n`` (dev rows with an edit).
    """
    from memreason.interventions.revise import revise_batch

    todo = [p for p in plans if p.edit is not None]
    pairs = [(p.row, edit(p) if edit else p.edit) for p in todo]
    cells = []
    for layer, tau in [(None, 0.0)] + [(layer, float(tau)) for layer in layers for tau in taus]:
        if not todo:
            break
        if layer is None:
            revised = revise_batch(model, tokenizer, task, scheme, pairs, max_new_tokens=max_new_tokens,
                                   batch_size=batch_size)
        else:
            revised = revise_batch(model, tokenizer, task, scheme, pairs, max_new_tokens=max_new_tokens,
                                   batch_size=batch_size, injection=Injection(layer, tau, None, encoder, tau_mode),
                                   memories=[memory(p) for p in todo] if memory else None)
        fixed = sum(p.row.outcome != CORRECT and r.outcome == CORRECT for p, r in zip(todo, revised))
        broke = sum(p.row.outcome == CORRECT and r.outcome != CORRECT for p, r in zip(todo, revised))
        cells.append({"layer": layer, "tau": tau, "fixed": fixed, "broke": broke, "n": len(todo),
                      "score": fixed - broke})
        logger.info("injection sweep %s: fixed %d, broke %d of %d dev rows",
                    "without injection" if layer is None else f"layer {layer} tau {tau:g}", fixed, broke, len(todo))
    best = min(cells, key=lambda c: (-c["score"], c["layer"] is not None, c["tau"], c["layer"] or 0), default=None)
    chosen = None if best is None or best["layer"] is None else {"layer": best["layer"], "tau": best["tau"]}
    return {"cells": cells, "chosen": chosen, "n": len(todo), "tau_mode": tau_mode, "encoder": encoder}


def dev_evaluation(s: RepairSettings, evaluation: Evaluation) -> Evaluation | None:
    """The dev evaluation the injection is chosen on (None without ``choose_injection``), checked before any
    model is loaded.

    Raises:
        ConfigError: it shares a question with the repaired evaluation, or has another task or scheme.
    """
    if not s.choose_injection:
        return None
    dev = read_evaluation(s.dev_results)
    shared = {r.id for r in dev.rows} & {r.id for r in evaluation.rows}
    if shared:
        raise ConfigError(f"dev_results shares {len(shared)} questions with the repaired evaluation (e.g. "
                          f"{sorted(shared)[0]!r}); choose the injection on a dev split, never on the test rows")
    if dev.config["task"] != evaluation.config["task"] or dev.config["scheme"] != evaluation.config["scheme"]:
        raise ConfigError("dev_results was made with another task or token scheme than the repaired evaluation")
    return dev


def _chosen_injection(s: RepairSettings, reasoner, evaluation: Evaluation, dev: Evaluation | None, source, judge,
                      out: OutputDir) -> tuple[Injection | None, dict | None]:
    """The injection to repair with: the one given, the one a dev sweep chooses (reused when the sweep
    file of these settings exists), or none."""
    from memreason.model.layers import layout

    if s.inject is not None:
        return parse_injection(s.inject, s.tau_mode, s.encoder), None
    if dev is None:
        return None, None
    path = out.file(SWEEP)
    if path.is_file():
        sweep = read_json(path, what="injection sweep")
    else:
        layers = s.layers if s.layers is not None else default_layers(layout(reasoner.model).num_layers)
        plans = [plan_row(r, source, judge, s.locate) for r in select_rows(dev.rows, s.rows)]
        sweep = sweep_injection(reasoner.model, reasoner.tokenizer, evaluation.task, evaluation.scheme, plans,
                                layers=layers, taus=s.taus, tau_mode=s.tau_mode, encoder=s.encoder,
                                max_new_tokens=_cap(s, evaluation), batch_size=s.batch_size)
        sweep["dev_results"] = str(dev.path)
        write_json(path, sweep)
    chosen = sweep.get("chosen")
    if chosen is None:
        logger.info("the dev sweep chose no injection (no cell beat text revision alone on %d rows)", sweep["n"])
        return None, sweep
    return Injection(chosen["layer"], chosen["tau"], None, s.encoder, s.tau_mode), sweep


def _cap(s: RepairSettings, evaluation: Evaluation) -> int:
    return s.max_new_tokens or int(evaluation.config.get("max_new_tokens") or 256)


# ---------------------------------------------------------------- the job

def _digest_settings(s: RepairSettings, evaluation: Evaluation, source, judge) -> dict:
    """What decides the repaired rows (paths resolved; output-only options left out)."""
    kept = {k: v for k, v in asdict(s).items() if k not in ("out", "overwrite", "batch_size", "device")}
    kept.update(results=str(evaluation.path.resolve()), evaluation=evaluation.config.get("config_hash"),
                source=describe_source(source), judge=judge.describe() if judge is not None else None,
                max_new_tokens=_cap(s, evaluation))
    return kept


def run_repair(settings: RepairSettings, *, progress: Callable[[int], None] | None = None,
               on_start: Callable[[int], None] | None = None, reasoner=None) -> dict:
    """Repair the selected rows of an evaluation (resumable) and write the summary.

    Args:
        settings (RepairSettings).
        progress: called with the number of rows finished after each chunk; on_start: with the total.
        reasoner: an already loaded ``memreason.api.Reasoner`` to use instead of loading ``settings.model``.

    Returns:
        dict: what ``summary.json`` holds (``summarise_repair`` plus the settings, the injection and the
        dev sweep).

    Raises:
        ConfigError: bad settings, no judge to locate with, an output directory of other settings.
        DataError: unreadable results or data; ModelLoadError: the model cannot be loaded.
    """
    problems = check_settings(settings)
    if problems:
        raise ConfigError("; ".join(problems))
    evaluation = read_evaluation(settings.results)
    rows = select_rows(evaluation.rows, settings.rows, settings.limit)
    out_path = Path(settings.out)
    options = {"cache_dir": out_path / "llm_cache"} if settings.source.startswith("llm:") else {}
    source = load_source(settings.source, **options)
    judge = None
    if settings.locate == "judge":
        judge = make_judge(settings.judge, settings.judge_data, source, cache_dir=out_path / "llm_cache")
        if judge is None:
            raise ConfigError(f"locating by judge needs a judge, and the source {settings.source!r} brings none: "
                              "give judge=exact|world|llm with judge_data=..., or locate=confidence")
    dev = dev_evaluation(settings, evaluation)
    out = OutputDir(out_path, _digest_settings(settings, evaluation, source, judge), overwrite=settings.overwrite,
                    config_name=CONFIG, outputs=(REPAIRED, SUMMARY, SWEEP))
    if reasoner is None:
        import memreason

        reasoner = memreason.load(settings.model or evaluation.model, task=evaluation.config["task"],
                                  dtype=settings.dtype, device=settings.device)
    injection, sweep = _chosen_injection(settings, reasoner, evaluation, dev, source, judge, out)
    done = {row.get("id") for row in out.resume_rows(REPAIRED)}
    todo = [r for r in rows if r.id not in done]
    if on_start:
        on_start(len(rows))
    if progress and done:
        progress(len(rows) - len(todo))
    chunk = settings.batch_size * 2
    for start in range(0, len(todo), chunk):
        plans = [plan_row(r, source, judge, settings.locate) for r in todo[start:start + chunk]]
        append_jsonl(out.file(REPAIRED), repair_rows(
            reasoner.model, reasoner.tokenizer, evaluation.task, evaluation.scheme, plans,
            max_new_tokens=_cap(settings, evaluation), batch_size=settings.batch_size, injection=injection,
            locate=settings.locate, judge_name=getattr(judge, "name", None)))
        if progress:
            progress(len(plans))
    return write_summary(out, evaluation, injection, sweep)


def write_summary(out: OutputDir, evaluation: Evaluation, injection: Injection | None, sweep: dict | None) -> dict:
    """Summarise ``repaired.jsonl`` against the evaluation and write ``summary.json``."""
    from memreason.evaluate import read_results

    repaired = read_results(out.file(REPAIRED)) if out.file(REPAIRED).exists() else []
    summary = {**summarise_repair(evaluation.rows, repaired), "injection": asdict(injection) if injection else None,
               "sweep": sweep, "settings_digest": out.digest, "results": str(evaluation.path)}
    write_json(out.file(SUMMARY), summary)
    return summary


def before_after(repaired: Sequence[Result]) -> Result | None:
    """A repaired row worth showing: a fixed one first, else one whose answer changed, else any repaired."""
    done = [r for r in repaired if r.extra.get("repair", {}).get("status") == "repaired"]
    fixed = [r for r in done if r.outcome == CORRECT and r.extra["repair"]["original"]["outcome"] != CORRECT]
    changed = [r for r in done if r.predicted != r.extra["repair"]["original"]["predicted"]]
    return next(iter(fixed or changed or done), None)


__all__ = ["Evaluation", "Plan", "RepairSettings", "before_after", "check_settings", "default_layers",
           "dev_evaluation", "make_judge", "parse_injection", "plan_row", "read_evaluation", "repair_rows", "run_repair", "select_rows",
           "summarise_repair", "sweep_injection", "write_summary"]
