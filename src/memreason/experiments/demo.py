"""The end-to-end demo on the embedded SmolLM2-135M: train, evaluate base, trained and plain CoT, compare,
and repair the trained model's wrong answers.

1. fine-tunes the model with memory/reason control tokens (LoRA + new token rows) on the bundled
   StrategyQA-style train split, choosing the checkpoint on a validation split carved from it;
2. evaluates the untrained model (one worked example in the prompt: the paper's one-shot CoT baseline)
   and the trained run on the bundled held-out test split, greedily;
3. trains a plain chain-of-thought arm with the same recipe and budget, the same steps without markers
   (``configs/ablations/demo_plain_cot.yaml``: the paper's fair baseline), and evaluates it the same way;
4. compares them question by question (exact McNemar) and picks answers worth showing;
5. repairs the trained model's wrong answers whose memory step contradicts the gold trace: the exact judge
   (the gold memory steps as its fact table) locates the first memory step matching no gold fact, the gold
   source (``corrections.GoldSource``) replaces it by the best-matching gold memory step, and the model
   answers again from there (``experiments.repair``); fix rate with its Wilson 95% CI.

Re-running resumes: finished training runs, evaluations and repairs are reused.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Callable

from memreason.evaluate import RESULTS, Comparison, EvalJob, compare, read_results, run_job
from memreason.traces import MEMORY, REASON, Result

# The demo recipe ships inside the package, so the demo runs from an installed wheel as from a checkout.
DEMO_RECIPE = "demo.yaml"
PLAIN_COT_RECIPE = "ablations/demo_plain_cot.yaml"
GOLD_SOURCE = "gold:bundled:strategyqa"


def demo_recipe(name: str = DEMO_RECIPE) -> Path:
    """A packaged demo training recipe (``memreason/recipes/demo.yaml`` by default)."""
    return Path(str(resources.files("memreason") / "recipes" / name))


@dataclass
class DemoSettings:
    """What ``memreason demo`` runs.

    Args:
        out (str): where the run and the evaluations go.
        config (str | None): the training recipe (None: the packaged demo recipe).
        limit (int | None): evaluate only the first N test questions.
        batch_size (int): evaluation batch size.
        max_new_tokens (int): evaluation generation cap.
        skip_plain_cot (bool): leave out the plain chain-of-thought arm (about 3.5 of the demo's minutes).
        skip_repair (bool): leave out the repair of the trained model's wrong answers.
    """

    out: str = "runs/demo"
    config: str | None = None
    limit: int | None = None
    batch_size: int = 16
    max_new_tokens: int = 192
    skip_plain_cot: bool = False
    skip_repair: bool = False


@dataclass
class DemoOutcome:
    """What the demo measured: the summaries, the paired comparisons, the rows, the repair and the timings.

    ``plain``, ``plain_dir``, ``plain_comparison`` (trained vs plain CoT) are None when the arm was skipped;
    ``repair`` (the repair summary), ``repair_dir`` and ``repair_example`` (a before/after row) when the
    repair was.
    """

    run_dir: Path
    base: dict
    trained: dict
    base_dir: Path
    trained_dir: Path
    comparison: Comparison
    examples: list[Result]
    seconds: float
    train_seconds: float
    plain: dict | None = None
    plain_dir: Path | None = None
    plain_comparison: Comparison | None = None
    repair: dict | None = None
    repair_dir: Path | None = None
    repair_example: Result | None = None


def pick_examples(rows: list[Result], k: int = 3) -> list[Result]:
    """Answers worth showing: parsed, with both memory and reason steps, correct ones first.

    Among those, traces whose steps are distinct and whole sentences come first: a 135M model sometimes
    repeats a step or emits a stray marker mid-sentence, and the table already counts those answers.
    Ties keep the file's order, so the choice is deterministic.
    """
    def rank(row: Result) -> tuple:
        texts = [step.text for step in row.steps]
        well_formed = len(set(texts)) == len(texts) and all(len(t.split()) >= 3 for t in texts)
        return row.outcome != "correct", not well_formed

    shown = [r for r in rows if r.trace.count(MEMORY) and r.trace.count(REASON) and r.predicted is not None]
    shown.sort(key=rank)
    rest = [r for r in rows if r not in shown]
    return (shown + rest)[:k]


def run_demo(settings: DemoSettings, *, announce: Callable[[str], None] = lambda line: None,
             progress: Callable[[str], tuple[Callable[[int], None], Callable[[int], None]]] | None = None
             ) -> DemoOutcome:
    """Train (or reuse) the demo runs, evaluate base, trained and plain CoT, compare, and repair.

    Args:
        settings (DemoSettings).
        announce: called with one line as each stage starts.
        progress: called with a stage name; returns ``(on_start(total), update(n))`` for a progress bar.

    Raises:
        ConfigError: the recipe is missing or invalid; DataError / ModelLoadError as the stages raise them.
    """
    from memreason.train.config import load_config
    from memreason.train import main as train_main

    start = time.perf_counter()
    out = Path(settings.out)
    stages = 3 + 2 * (not settings.skip_plain_cot) + (not settings.skip_repair)
    step = iter(range(1, stages + 1))
    say = lambda line: announce(f"[{next(step)}/{stages}] {line}")  # noqa: E731
    cfg = load_config(settings.config or demo_recipe(), [f"output_dir={out / 'run'}"])
    say(f"training SmolLM2-135M with memory/reason tokens → {out / 'run'}")
    run_dir = Path(train_main(cfg, resume=True))
    trained_at = time.perf_counter()
    jobs = {"base": EvalJob(model=None, out=str(out / "eval-base"), shots=1),
            "trained": EvalJob(model=str(run_dir), out=str(out / "eval-trained"))}
    say("evaluating the base model (one-shot CoT prompt) on the held-out questions")
    summaries = {"base": _evaluate(jobs["base"], "base", settings, progress)}
    say("evaluating the trained run on the same questions")
    summaries["trained"] = _evaluate(jobs["trained"], "trained", settings, progress)
    base_rows = read_results(Path(jobs["base"].out) / RESULTS)
    trained_rows = read_results(Path(jobs["trained"].out) / RESULTS)
    outcome = DemoOutcome(run_dir=run_dir, base=summaries["base"], trained=summaries["trained"],
                          base_dir=Path(jobs["base"].out), trained_dir=Path(jobs["trained"].out),
                          comparison=compare(base_rows, trained_rows, names=("base", "trained")),
                          examples=pick_examples(trained_rows), seconds=0.0, train_seconds=trained_at - start)
    if not settings.skip_plain_cot:
        plain_cfg = load_config(demo_recipe(PLAIN_COT_RECIPE), [f"output_dir={out / 'plain-cot-run'}"])
        say(f"training the plain chain-of-thought arm (same recipe and budget, no markers) → {out / 'plain-cot-run'}")
        plain_run = Path(train_main(plain_cfg, resume=True))
        say("evaluating the plain chain-of-thought arm on the same questions")
        job = EvalJob(model=str(plain_run), out=str(out / "eval-plain-cot"))
        outcome.plain, outcome.plain_dir = _evaluate(job, "plain CoT", settings, progress), Path(job.out)
        outcome.plain_comparison = compare(read_results(outcome.plain_dir / RESULTS), trained_rows,
                                           names=("plain CoT", "trained"))
    if not settings.skip_repair:
        say("repairing the trained run's wrong answers whose memory step contradicts the gold trace")
        _repair(outcome, settings, out, progress)
    outcome.seconds = time.perf_counter() - start
    return outcome


def _evaluate(job: EvalJob, name: str, settings: DemoSettings, progress) -> dict:
    job.limit, job.batch_size, job.max_new_tokens = settings.limit, settings.batch_size, settings.max_new_tokens
    on_start, update = progress(name) if progress else (None, None)
    return run_job(job, progress=update, on_start=on_start)


def _repair(outcome: DemoOutcome, settings: DemoSettings, out: Path, progress) -> None:
    """Repair the trained run's wrong answers from the gold traces (exact judge, gold source)."""
    from memreason.experiments.repair import REPAIRED, RepairSettings, before_after, run_repair

    repair = RepairSettings(results=str(outcome.trained_dir), model=str(outcome.run_dir), source=GOLD_SOURCE,
                            locate="judge", judge="exact", out=str(out / "repair"), batch_size=settings.batch_size)
    on_start, update = progress("repair") if progress else (None, None)
    outcome.repair = run_repair(repair, progress=update, on_start=on_start)
    outcome.repair_dir = Path(repair.out)
    rows = outcome.repair_dir / REPAIRED
    outcome.repair_example = before_after(read_results(rows)) if rows.exists() else None
