"""The end-to-end demo on the embedded SmolLM2-135M: train, evaluate base and trained, compare.

1. fine-tunes the model with memory/reason control tokens (LoRA + new token rows) on the bundled
   StrategyQA-style train split, choosing the checkpoint on a validation split carved from it;
2. evaluates the untrained model (one worked example in the prompt: the paper's one-shot CoT baseline)
   and the trained run on the bundled held-out test split, greedily;
3. compares them question by question (exact McNemar) and picks answers worth showing.

Re-running resumes: a finished training run and finished evaluations are reused.
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


def demo_recipe() -> Path:
    """The packaged demo training recipe (``memreason/recipes/demo.yaml``)."""
    return Path(str(resources.files("memreason") / "recipes" / DEMO_RECIPE))


@dataclass
class DemoSettings:
    """What ``memreason demo`` runs.

    Args:
        out (str): where the run and the evaluations go.
        config (str | None): the training recipe (None: the packaged demo recipe).
        limit (int | None): evaluate only the first N test questions.
        batch_size (int): evaluation batch size.
        max_new_tokens (int): evaluation generation cap.
    """

    out: str = "runs/demo"
    config: str | None = None
    limit: int | None = None
    batch_size: int = 16
    max_new_tokens: int = 192


@dataclass
class DemoOutcome:
    """What the demo measured: both summaries, the paired comparison, the rows and the timings."""

    run_dir: Path
    base: dict
    trained: dict
    base_dir: Path
    trained_dir: Path
    comparison: Comparison
    examples: list[Result]
    seconds: float
    train_seconds: float


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
    """Train (or reuse) the demo run, evaluate base and trained model, and compare them.

    Args:
        settings (DemoSettings).
        announce: called with one line as each stage starts.
        progress: called with a stage name; returns ``(on_start(total), update(n))`` for a progress bar.

    Raises:
        ConfigError: the recipe is missing or invalid; DataError / ModelLoadError as the stages raise them.
    """
    from memreason.config import load_config
    from memreason.train import main as train_main

    start = time.perf_counter()
    out = Path(settings.out)
    recipe = settings.config or demo_recipe()
    cfg = load_config(recipe, [f"output_dir={out / 'run'}"])
    announce(f"[1/3] training SmolLM2-135M with memory/reason tokens → {out / 'run'}")
    run_dir = Path(train_main(cfg, resume=True))
    trained_at = time.perf_counter()
    jobs = {"base": EvalJob(model=None, out=str(out / "eval-base"), shots=1),
            "trained": EvalJob(model=str(run_dir), out=str(out / "eval-trained"))}
    announce("[2/3] evaluating the base model (one-shot CoT prompt) on the held-out questions")
    summaries = {}
    for name, job in jobs.items():
        if name == "trained":
            announce("[3/3] evaluating the trained run on the same questions")
        job.limit, job.batch_size, job.max_new_tokens = settings.limit, settings.batch_size, settings.max_new_tokens
        on_start, update = progress(name) if progress else (None, None)
        summaries[name] = run_job(job, progress=update, on_start=on_start)
    base_rows = read_results(Path(jobs["base"].out) / RESULTS)
    trained_rows = read_results(Path(jobs["trained"].out) / RESULTS)
    return DemoOutcome(run_dir=run_dir, base=summaries["base"], trained=summaries["trained"],
                       base_dir=Path(jobs["base"].out), trained_dir=Path(jobs["trained"].out),
                       comparison=compare(base_rows, trained_rows, names=("base", "trained")),
                       examples=pick_examples(trained_rows), seconds=time.perf_counter() - start,
                       train_seconds=trained_at - start)
