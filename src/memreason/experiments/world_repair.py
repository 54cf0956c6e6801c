"""The repair benchmark on the synthetic world: does correcting a false memory step fix the answer, and does
anything else — another false fact, regenerating, a paraphrase — do as much?

``run_world_repair(ablation, cfg, out_dir)`` first runs (or, when finished, reuses) the ablation of
``experiments.world_ablation`` in the same directory, then, for each repaired arm (marker arms and plain
CoT by default) and split, takes the wrong answers whose first faulty step is a false recall
(``analysis.world_judge``) that the world can correct (``corrections.WorldSource``) and applies, each to the
same rows:

  ``text``        repair: the faulty step replaced by the true fact (world wording), the model continues;
  ``inject``      repair: the model regenerates from the faulty step with the true fact injected (no text
                  edit; layer and tau chosen on a dev split, below);
  ``wrong_fact``  control: the faulty step replaced by a different false fact of the same relation (another
                  entity of the object's type, seeded per question);
  ``regenerate``  control: the model regenerates from the faulty step, no edit;
  ``paraphrase``  control on right answers: the first true single-relation recall replaced by another
                  wording of the same true fact (its break rate: how fragile is a right answer to any edit?).

Every edit keeps the step's kind label. Fix rate = wrong → right among the rows a method was applied to;
break rate = right → not right (paraphrase). Each repair and the wrong-fact control are compared with
``regenerate`` on the same rows (exact McNemar on the discordant pairs). The **dev split** for the
injection: the arm's validation questions (``run.json`` ``val_ids``: never trained on), then train
questions in file order (seen in training), ``dev_questions`` in all; never a test row. The cell with the
most fixes minus breaks among ``layers x taus`` wins (ties: smaller tau, lower layer), reported beside the
no-injection score.

Step confidence: over every answer, each step the judge reads as a recall is labelled false or true, and
scored by its mean token log-probability (``analysis.selective.auroc_ci``: AUROC of "less confident" for
"false", answers resampled for the CI); and accuracy against coverage when the answers whose least
confident memory step is lowest abstain (``coverage_curve``).

Outputs (``out_dir/repair``): ``repair_config.json``, ``<arm>/dev/`` (dev evaluation), ``<arm>/<split>/
<method>.jsonl`` (revised rows, appended per chunk: a re-run resumes), ``table.csv``, ``summary.json``.
"""

from __future__ import annotations

import dataclasses
import logging
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Literal

from memreason.corrections import WorldSource, memory_candidates, world_fact_text
from memreason.errors import ConfigError
from memreason.interventions.revise import Edit, Injection
from memreason.io import OutputDir, append_jsonl, atomic_write, csv_text, read_json, write_json
from memreason.stats import mcnemar_exact, wilson_ci
from memreason.tasks import CORRECT, UNPARSEABLE
from memreason.traces import MEMORY, Result

logger = logging.getLogger(__name__)

METHODS = {"text": "repair", "inject": "repair", "wrong_fact": "control", "regenerate": "control",
           "paraphrase": "control"}
REPAIRABLE_ARMS = ("tokens", "s0", "random", "plain_cot")


@dataclass(frozen=True)
class WorldRepairConfig:
    """The repair benchmark's knobs (``repair.<key>=...`` on the command line; the rest are the ablation's).

    Args:
        arms (str): comma-separated arms to repair (from tokens, s0, random, plain_cot).
        splits (str, default "test"): evaluated splits to repair (test, test_heldout).
        layers (tuple[int, ...] | None): injection layers to sweep (None: ``repair.default_layers``).
        taus (tuple[float, ...], default (0.2,)): strengths to sweep; tau_mode, encoder: as ``inject``.
        dev_questions (int, default 16): dev questions evaluated per arm for the sweep.
        coverage (tuple[float, ...]): coverage levels of the abstention curve.
        batch_size (int, default 16); bootstrap (int, default 2000): AUROC resamples; seed (int, default 0).
    """

    arms: str = ",".join(REPAIRABLE_ARMS)
    splits: str = "test"
    layers: tuple[int, ...] | None = None
    taus: tuple[float, ...] = (0.2,)
    tau_mode: Literal["absolute", "relative"] = "relative"
    encoder: Literal["unembed", "unembed-centered", "embed", "layer"] = "unembed"
    dev_questions: int = 16
    coverage: tuple[float, ...] = (1.0, 0.9, 0.8, 0.7, 0.6, 0.5)
    batch_size: int = 16
    bootstrap: int = 2000
    seed: int = 0

    def __post_init__(self):
        unknown = [a for a in self.arm_list() if a not in REPAIRABLE_ARMS]
        if unknown or not self.arm_list():
            raise ConfigError(f"repair.arms: {', '.join(unknown) or '(none)'} cannot be repaired; choose from "
                              f"{', '.join(REPAIRABLE_ARMS)} (direct answers have no steps)")
        bad = [s for s in self.split_list() if s not in ("test", "test_heldout")]
        if bad or not self.split_list():
            raise ConfigError(f"repair.splits: {', '.join(bad) or '(none)'}; choose test and/or test_heldout")
        if not self.taus or self.dev_questions < 1 or self.batch_size < 1 or self.bootstrap < 0:
            raise ConfigError("repair: taus must be non-empty, dev_questions and batch_size >= 1, bootstrap >= 0")
        if any(not 0 < c <= 1 for c in self.coverage):
            raise ConfigError(f"repair.coverage levels must be in (0, 1], got {self.coverage}")

    def arm_list(self) -> list[str]:
        return [a.strip() for a in self.arms.split(",") if a.strip()]

    def split_list(self) -> list[str]:
        return [s.strip() for s in self.splits.split(",") if s.strip()]


def load_world_repair(path: str | Path | None = None, overrides=()):
    """The ablation's settings (a YAML file + overrides) and the benchmark's (``repair.<key>=...`` overrides).

    Raises:
        ConfigError: every bad key or value of either.
    """
    from memreason.config import load_settings
    from memreason.experiments.world_ablation import load_ablation

    own = [item[len("repair."):] for item in overrides if item.startswith("repair.")]
    rest = [item for item in overrides if not item.startswith("repair.")]
    ablation = load_ablation(path, rest)
    cfg = load_settings(WorldRepairConfig, None, own)
    missing = [a for a in cfg.arm_list() if a not in [arm.name for arm in ablation.arm_list()]]
    if missing:
        raise ConfigError(f"repair.arms: {', '.join(missing)} not among the ablation's arms ({ablation.arms})")
    return ablation, cfg


# ---------------------------------------------------------------- planning the edits of one row

@dataclass(frozen=True)
class Item:
    """One row and the edits of every method that applies to it (``memory``: what ``inject`` injects)."""

    row: Result
    step: int
    edits: dict
    memory: str | None = None


def _other_false(world, path, subject: str, truth: str, said: str, key: str) -> str | None:
    """A different false object of the chain's type (neither the truth nor what the model said), seeded."""
    from memreason.data.world import RELATIONS

    kind = RELATIONS[path[-1]].object
    options = sorted(n for n, t in world.entities.items() if t == kind and n not in (truth, said, subject))
    return random.Random(key).choice(options) if options else None


def plan_wrong(row: Result, source: WorldSource, world, seed: int) -> Item | None:
    """The four edits of a wrong answer whose first faulty step is a correctable false recall (else None)."""
    from memreason.analysis.judges import NotApplicable

    try:
        verdict = source.judge.attribute_error(row)
    except NotApplicable:
        return None
    step = verdict.first_faulty
    if verdict.source != MEMORY or step is None:
        return None
    correction = source.correct(row, step)
    if correction is None:
        return None
    path, subject, said = source.claim(row.steps[step].text).claim
    truth = source.true_object(path, subject)
    other = _other_false(world, path, subject, truth, said, f"{seed}:{row.id}")
    edits = {"text": Edit(step, text=correction.text), "inject": Edit(step, "regenerate"),
             "regenerate": Edit(step, "regenerate")}
    if other is not None:
        edits["wrong_fact"] = Edit(step, text=world_fact_text(path, subject, other))
    return Item(row, step, edits, correction.text)


def plan_right(row: Result, source: WorldSource) -> Item | None:
    """The paraphrase edit of a right answer: its first true single-relation recall in another wording."""
    from memreason.analysis.judges import NotApplicable
    from memreason.analysis.world_judge import TRUE

    try:
        checks = source.judge.check_steps(row)
    except NotApplicable:
        return None
    for step, check in enumerate(checks):
        if check.status != TRUE or check.claim is None or len(check.claim[0]) != 1:
            continue
        path, subject, obj = check.claim
        for template in (1, 2):  # another wording than the step's own
            text = world_fact_text(path, subject, obj, template)
            if text != " ".join(row.steps[step].text.split()):
                return Item(row, step, {"paraphrase": Edit(step, text=text)})
    return None


# ---------------------------------------------------------------- running the methods

def _run_method(reasoner, task, scheme, items: list[Item], method: str, path: Path, *, max_new_tokens: int,
                batch_size: int, injection: Injection | None) -> list[Result]:
    """Apply one method to the items that have it, appending revised rows to ``path`` per chunk (resumes)."""
    from memreason.evaluate import read_results
    from memreason.interventions.revise import revise_batch
    from memreason.io import drop_torn_tail

    chosen = [i for i in items if method in i.edits]
    drop_torn_tail(path)
    done = {r.id for r in read_results(path)} if path.exists() else set()
    todo = [i for i in chosen if i.row.id not in done]
    chunk = batch_size * 2
    for start in range(0, len(todo), chunk):
        part = todo[start:start + chunk]
        revised = revise_batch(reasoner.model, reasoner.tokenizer, task, scheme,
                               [(i.row, i.edits[method]) for i in part], max_new_tokens=max_new_tokens,
                               batch_size=batch_size, injection=injection if method == "inject" else None,
                               memories=[i.memory for i in part] if method == "inject" else None)
        append_jsonl(path, [{**r.to_dict(), "bench": {"method": method, "step": i.step}}
                            for i, r in zip(part, revised)])
    order = {i.row.id: k for k, i in enumerate(chosen)}
    rows = [r for r in read_results(path) if r.id in order] if path.exists() else []
    return sorted(rows, key=lambda r: order[r.id])


def method_row(items: list[Item], revised: list[Result], control: list[Result] | None) -> dict:
    """Counts, rate and CI of one method; the paired McNemar test against ``control`` on the same rows."""
    before = {i.row.id: i.row for i in items}
    was_right = [r for r in revised if before[r.id].outcome == CORRECT]
    changed = [r for r in revised if (r.outcome == CORRECT) != (before[r.id].outcome == CORRECT)]
    n = len(revised)
    low, high = wilson_ci(len(changed), n) if n else (None, None)
    row = {"n": n, "count": len(changed), "rate": len(changed) / n if n else None, "ci95_low": low,
           "ci95_high": high, "measures": "break" if was_right else "fix",
           "new_unparseable": sum(r.outcome == UNPARSEABLE and before[r.id].outcome != UNPARSEABLE for r in revised),
           "vs_regenerate_p": None, "vs_regenerate": None}
    if control is not None:
        other = {r.id: r.outcome == CORRECT for r in control}
        shared = [r for r in revised if r.id in other]
        b = sum(other[r.id] and r.outcome != CORRECT for r in shared)
        c = sum(r.outcome == CORRECT and not other[r.id] for r in shared)
        row["vs_regenerate_p"], row["vs_regenerate"] = mcnemar_exact(b, c), {"only_method": c, "only_regenerate": b}
    return row


# ---------------------------------------------------------------- step confidence

def confidence_tables(rows: list[Result], judge, levels, n_resamples: int, seed: int) -> dict:
    """AUROC (mean and min log-probability) of step confidence for false recalls, and the coverage curve."""
    from memreason.analysis.judges import NotApplicable
    from memreason.analysis.selective import auroc_ci, coverage_curve

    clusters = {"mean": [], "min": []}
    for row in rows:
        if not row.steps or row.step_confidence is None:
            continue
        try:
            checks = judge.check_steps(row)
        except NotApplicable:
            continue
        for key in clusters:
            clusters[key].append([(-c[key], not check.ok) for check, c in zip(checks, row.step_confidence)
                                  if check.type == MEMORY and c is not None])
    answer_confidence = []
    for row in rows:
        values = [row.step_confidence[i]["mean"] for i in memory_candidates(row)
                  if row.step_confidence and i < len(row.step_confidence) and row.step_confidence[i] is not None]
        answer_confidence.append(min(values) if values else None)
    return {"auroc": {key: auroc_ci([c for c in cs if c], n_resamples=n_resamples, seed=seed)
                      for key, cs in clusters.items()},
            "coverage": coverage_curve(answer_confidence, [r.outcome == CORRECT for r in rows], levels)}


# ---------------------------------------------------------------- one arm

def _arm_rows(reasoner, ablation, arm_dir: Path, split: str, questions: Path, bench_dir: Path) -> list[Result]:
    """The arm's evaluated rows of a split; evaluated again (into the benchmark's directory) when the
    ablation's rows predate results schema 2 (no prompt or token ids to revise from)."""
    from memreason.data import load_traces
    from memreason.evaluate import read_results

    rows = read_results(arm_dir / split / "results.jsonl")
    if all(r.prompt and r.token_ids is not None for r in rows):
        return rows
    logger.warning("%s/%s: rows without prompt or token ids; evaluating them again", arm_dir.name, split)
    traces = load_traces(questions, task="freeform", split=split)[0]
    return _evaluate(reasoner, ablation, traces, questions, split, bench_dir / f"{split}-eval")


def _evaluate(reasoner, ablation, traces, questions: Path, split: str, out: Path) -> list[Result]:
    from memreason.evaluate import EvalSettings, evaluate, read_results

    settings = EvalSettings(model=reasoner.name, task=reasoner.task.name, source=str(questions), split=split,
                            prompt_style=reasoner.prompt_style, scheme=reasoner.scheme.to_dict(),
                            max_new_tokens=ablation.max_new_tokens, seed=ablation.seed)
    evaluate(reasoner.model, reasoner.tokenizer, traces, reasoner.task, settings, out, batch_size=ablation.eval_batch)
    order = {t.id: k for k, t in enumerate(traces)}
    return sorted((r for r in read_results(out / "results.jsonl") if r.id in order), key=lambda r: order[r.id])


def dev_traces(run_dir: Path, questions: Path, n: int) -> list:
    """The dev questions: the run's validation questions, then train questions in file order (``n`` in all)."""
    from memreason.data import load_traces

    train = load_traces(questions, task="freeform", split="train")[0]
    info = read_json(run_dir / "run.json", what="run file")
    val_ids = list((info.get("data") or {}).get("val_ids") or [])
    by_id = {t.id: t for t in train}
    ordered = [by_id[i] for i in val_ids if i in by_id] + [t for t in train if t.id not in set(val_ids)]
    return ordered[:n]


def choose_cell(reasoner, ablation, cfg: WorldRepairConfig, source: WorldSource, world, run_dir: Path,
                questions: Path, bench_dir: Path) -> dict:
    """The injection cell for ``inject``, chosen on the dev questions (the rule in the module docstring)."""
    from memreason.experiments.repair import Plan, default_layers, sweep_injection
    from memreason.model.layers import layout

    path = bench_dir / "dev" / "sweep.json"
    if path.is_file():
        return read_json(path, what="injection sweep")
    rows = _evaluate(reasoner, ablation, dev_traces(run_dir, questions, cfg.dev_questions), questions, "dev",
                     bench_dir / "dev")
    items = [item for r in rows if r.outcome != CORRECT for item in [plan_wrong(r, source, world, cfg.seed)] if item]
    plans = [Plan(i.row, i.step, None, i.edits["inject"]) for i in items]
    memories = {id(p): i.memory for p, i in zip(plans, items)}
    layers = list(cfg.layers) if cfg.layers is not None else default_layers(layout(reasoner.model).num_layers)
    sweep = sweep_injection(reasoner.model, reasoner.tokenizer, reasoner.task, reasoner.scheme, plans,
                            layers=layers, taus=cfg.taus, tau_mode=cfg.tau_mode, encoder=cfg.encoder,
                            max_new_tokens=ablation.max_new_tokens, batch_size=cfg.batch_size,
                            memory=lambda p: memories[id(p)])
    cells = [c for c in sweep["cells"] if c["layer"] is not None]
    # the method is injection: the best injected cell, even when regeneration alone does as well on dev
    best = min(cells, key=lambda c: (-c["score"], c["tau"], c["layer"]), default=None)
    sweep["chosen"] = {"layer": best["layer"], "tau": best["tau"]} if best else \
        {"layer": layers[len(layers) // 2], "tau": float(cfg.taus[0])}
    sweep["dev_questions"], sweep["dev_wrong"] = len(rows), sum(r.outcome != CORRECT for r in rows)
    write_json(path, sweep)
    return sweep


def bench_arm(arm: str, ablation, cfg: WorldRepairConfig, out: Path, source: WorldSource, world,
              say: Callable[[str], None]) -> dict:
    """Every method on every split of one arm; the arm's table rows, counts, confidence tables and sweep."""
    import memreason

    arm_dir, bench_dir = out / "arms" / arm, out / "repair" / arm
    questions = out / "world" / "questions.jsonl"
    reasoner = memreason.load(str(arm_dir / "run"), task="freeform", device=ablation.device,
                              max_new_tokens=ablation.max_new_tokens)
    say(f"repair {arm}: choosing the injection on {cfg.dev_questions} dev questions")
    sweep = choose_cell(reasoner, ablation, cfg, source, world, arm_dir / "run", questions, bench_dir)
    injection = Injection(sweep["chosen"]["layer"], sweep["chosen"]["tau"], None, cfg.encoder, cfg.tau_mode)
    result = {"sweep": sweep, "splits": {}}
    for split in cfg.split_list():
        if not (arm_dir / split / "results.jsonl").is_file():
            continue
        rows = _arm_rows(reasoner, ablation, arm_dir, split, questions, bench_dir)
        wrong = [r for r in rows if r.outcome != CORRECT]
        items = [i for r in wrong for i in [plan_wrong(r, source, world, cfg.seed)] if i]
        right = [i for r in rows if r.outcome == CORRECT for i in [plan_right(r, source)] if i]
        say(f"repair {arm}/{split}: {len(items)} of {len(wrong)} wrong answers have a correctable false recall; "
            f"{len(right)} right answers to paraphrase")
        revised = {}
        for method in METHODS:
            revised[method] = _run_method(reasoner, reasoner.task, reasoner.scheme,
                                          right if method == "paraphrase" else items, method,
                                          bench_dir / split / f"{method}.jsonl", max_new_tokens=ablation.max_new_tokens,
                                          batch_size=cfg.batch_size, injection=injection)
        methods = {}
        for method in METHODS:
            control = revised["regenerate"] if method in ("text", "inject", "wrong_fact") else None
            methods[method] = {"kind": METHODS[method], **method_row(right if method == "paraphrase" else items,
                                                                     revised[method], control)}
        result["splits"][split] = {
            "counts": {"n": len(rows), "wrong": len(wrong), "correctable": len(items), "right": len(rows) - len(wrong),
                       "paraphrasable": len(right)},
            "methods": methods,
            **confidence_tables(rows, source.judge, cfg.coverage, cfg.bootstrap, cfg.seed)}
    return result


# ---------------------------------------------------------------- the benchmark

def table_rows(arms: dict) -> list[dict]:
    """One flat row per arm, split and method (what ``table.csv`` holds)."""
    rows = []
    for arm, result in arms.items():
        for split, entry in result["splits"].items():
            for method, m in entry["methods"].items():
                rows.append({"arm": arm, "split": split, "method": method, "kind": m["kind"], "measures": m["measures"],
                             "n": m["n"], "count": m["count"], "rate": m["rate"], "ci95_low": m["ci95_low"],
                             "ci95_high": m["ci95_high"], "new_unparseable": m["new_unparseable"],
                             "vs_regenerate_p": m["vs_regenerate_p"]})
    return rows


def run_world_repair(ablation, cfg: WorldRepairConfig, out_dir: str | Path, *, progress: bool = True,
                     on_stage: Callable[[str], None] | None = None) -> dict:
    """Run (or reuse) the ablation in ``out_dir``, then the repair benchmark on its arms (resumable).

    Returns:
        dict: what ``repair/summary.json`` holds: ``config``, ``arms`` (per arm: dev sweep, and per split the
        counts, methods, ``auroc`` and ``coverage``), ``rows`` (the table), ``seconds`` (the benchmark in this
        call, the ablation excluded) and ``ablation_seconds`` (running or reusing the ablation).

    Raises:
        ConfigError: the directory holds an ablation or a benchmark of other settings, or bad settings.
    """
    from memreason.data.world import generate_world
    from memreason.experiments.world_ablation import run_ablation

    say = on_stage or (lambda message: logger.info(message))
    start = time.perf_counter()
    out = Path(out_dir)
    run_ablation(ablation, out, progress=progress, on_stage=on_stage)
    ablation_seconds, start = time.perf_counter() - start, time.perf_counter()
    bench = OutputDir(out / "repair", {"ablation": ablation.to_dict(), "repair": dataclasses.asdict(cfg)},
                      config_name="repair_config.json", outputs=("table.csv", "summary.json"))
    source = WorldSource(out / "world")
    world = generate_world(ablation.world)
    arms = {arm: bench_arm(arm, ablation, cfg, out, source, world, say) for arm in cfg.arm_list()}
    rows = table_rows(arms)
    if rows:
        atomic_write(bench.file("table.csv"), csv_text(rows))
    summary = {"config": dataclasses.asdict(cfg), "arms": arms, "rows": rows,
               "seconds": round(time.perf_counter() - start, 1), "ablation_seconds": round(ablation_seconds, 1)}
    write_json(bench.file("summary.json"), summary)
    return summary
