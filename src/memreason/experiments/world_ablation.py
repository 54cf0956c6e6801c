"""The synthetic-world ablation: does labelling steps as memory or reason help, when every step can be checked?

Settings: ``AblateConfig`` (YAML + dotted overrides through ``memreason.config.load_settings``; the world's
knobs are the ``world:`` section). One call of ``run_ablation(cfg, out_dir)`` runs every stage, each reused when a previous call finished it:

1. **world**: ``generate_world(cfg.world)`` written to ``world/`` (questions, knowledge corpus, world.json);
2. **knowledge**: full fine-tuning of the base model on the corpus sentences (``data.objective: text``),
   then the best weights and the tokenizer are assembled into ``knowledge/model/``, a plain model directory
   every arm starts from. Cloze recall (``analysis.cloze``) is measured on the base model and on this one,
   with a corpus paraphrase and with the held-out one, before any reasoning training;
3. **reasoning**, per arm: LoRA fine-tuning of ``knowledge/model`` on the train questions' gold traces,
   same seed, same optimiser steps, batch size and learning rate for every arm:

   ``tokens``    paper scheme, P=3 prefix + S=4 kind tokens per step, LoRA + new token rows (the method);
   ``s0``        the same traces and prefix tokens with S=0 (no kind information);
   ``random``    S=4, but memory/reason markers shuffled across the training steps (seeded);
   ``plain_cot`` the same steps as plain lines, no markers (LoRA only);
   ``direct``    the answer line only (LoRA only);

4. **evaluation**: greedy answers on ``test`` (new questions over the same facts) and ``test_heldout``
   (relation pairs no training question composes), scored strictly, then every wrong answer is attributed
   by ``WorldJudge`` to its first faulty step (memory or reasoning).

Outputs (``out_dir``): ``ablate_config.json``, ``world/``, ``knowledge/``, ``cloze.json``,
``arms/<arm>/run`` (training run), ``arms/<arm>/<split>/`` (results.jsonl, summary.json, errors_world.jsonl),
``ablation.csv`` (one row per arm and split), ``summary.json`` (everything, plus stage timings).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from memreason.data.world import PROBE_TEMPLATE, WorldConfig, generate_world, write_world
from memreason.errors import ConfigError
from memreason.io import OutputDir, atomic_write, csv_text, read_json, write_json
from memreason.model.tokens import TokenScheme

logger = logging.getLogger(__name__)

TASK = "freeform"  # answers are Yes / No / an option letter, compared after normalisation
EVAL_SPLITS = ("test", "test_heldout")


@dataclass(frozen=True)
class Arm:
    """One row of the ablation: how the gold traces are written and what is trained."""

    name: str
    scheme: TokenScheme
    mode: str
    marker_allocation: str = "gold"


ARMS: dict[str, Arm] = {a.name: a for a in (
    Arm("tokens", TokenScheme("paper", 3, 4), "lora+tokens"),
    Arm("s0", TokenScheme("paper", 3, 0), "lora+tokens"),
    Arm("random", TokenScheme("paper", 3, 4), "lora+tokens", "random"),
    Arm("plain_cot", TokenScheme("plain"), "lora"),
    Arm("direct", TokenScheme("direct"), "lora"),
)}


@dataclass(frozen=True)
class AblateConfig:
    """Everything an ablation run depends on. The defaults took 40 min on one thread of a shared 2-core CPU
    with SmolLM2-135M (benchmarks/RESULTS.md); fewer reasoning steps left the marker arms unparseable.

    Args:
        world (WorldConfig): the world's knobs (``world.<key>=...`` on the command line).
        model (str | None, default None): the base model; None = the embedded SmolLM2-135M-Instruct.
        arms (str): comma-separated arms to run, from ``tokens, s0, random, plain_cot, direct``.
        knowledge_steps (int, default 48), knowledge_lr (float, default 3e-4), knowledge_batch (int, 16):
            the knowledge stage (full fine-tuning on the corpus; 48 x 16 = three passes over it).
        reason_steps (int, default 20), reason_lr (float, default 2e-3), reason_batch (int, default 8):
            the reasoning stage, identical for every arm (20 x 8 = 1.1 passes over the train questions).
            A constant learning rate after warmup: with cosine decay, 16 steps did not teach the paper's
            markers on SmolLM2 (measured), with a constant rate they did.
        val_size (int, default 8): questions carved from the train split for validation (reported; each
            arm keeps one checkpoint, the last, so nothing is selected, least of all on a test split).
        max_new_tokens (int, default 160), eval_batch (int, default 16): greedy generation.
        seed (int, default 0): seeds training, validation split and random markers (the world has its own).
        device (str, default "auto").
    """

    world: WorldConfig = field(default_factory=WorldConfig)
    model: str | None = None
    arms: str = ",".join(ARMS)
    knowledge_steps: int = 48
    knowledge_lr: float = 3e-4
    knowledge_batch: int = 16
    reason_steps: int = 20
    reason_lr: float = 2e-3
    reason_batch: int = 8
    val_size: int = 8
    max_new_tokens: int = 160
    eval_batch: int = 16
    seed: int = 0
    device: str = "auto"

    def __post_init__(self):
        for name in ("knowledge_steps", "knowledge_batch", "reason_steps", "reason_batch", "val_size",
                     "max_new_tokens", "eval_batch"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("knowledge_lr", "reason_lr"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be > 0, got {getattr(self, name)}")
        self.arm_list()

    def arm_list(self) -> list[Arm]:
        names = [a.strip() for a in self.arms.split(",") if a.strip()]
        unknown = [a for a in names if a not in ARMS]
        if unknown or not names:
            raise ConfigError(f"arms: unknown arm(s) {', '.join(unknown) or '(none given)'}; choose from {', '.join(ARMS)}")
        return [ARMS[a] for a in names]

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def load_ablation(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> AblateConfig:
    """The ablation settings from a YAML file and ``key=value`` overrides (``reason_steps=10``,
    ``world.n_people=12``, ``model=null``).

    Raises:
        ConfigError: every malformed override, unknown key (with a close-match hint) and bad value.
    """
    from memreason.config import load_settings

    return load_settings(AblateConfig, path, overrides)


# ---------------------------------------------------------------------------------------------------------
# stages


def knowledge_config(cfg: AblateConfig, world_dir: Path, run_dir: Path, n_sentences: int):
    """The knowledge stage's TrainConfig: full fine-tuning, plain LM loss on the corpus sentences."""
    from memreason.train.config import build_config

    return build_config({
        "model": {"name_or_path": cfg.model, "device": cfg.device},
        # a few sentences held out only to watch the loss; the facts recur in other paraphrases
        "data": {"source": str(world_dir / "corpus.jsonl"), "task": TASK, "val_size": min(16, max(1, n_sentences // 20)),
                 "seed": cfg.seed, "max_length": 64, "objective": "text"},
        "scheme": {"style": "direct"}, "prompt_style": "plain", "mode": "full",
        "optim": {"lr": cfg.knowledge_lr, "max_steps": cfg.knowledge_steps, "batch_size": cfg.knowledge_batch,
                  "warmup_steps": 0.1, "scheduler": "cosine"},
        "eval": {"every_steps": cfg.knowledge_steps},  # one checkpoint, at the end
        "output_dir": str(run_dir), "seed": cfg.seed, "save_total_limit": 1, "logging_steps": 10,
    })


def arm_config(cfg: AblateConfig, arm: Arm, world_dir: Path, base_model: Path, run_dir: Path):
    """An arm's TrainConfig: only the scheme, the mode and the marker allocation differ between arms."""
    from memreason.train.config import build_config

    return build_config({
        "model": {"name_or_path": str(base_model), "device": cfg.device},
        "data": {"source": str(world_dir / "questions.jsonl"), "task": TASK, "train_split": "train",
                 "val_size": cfg.val_size, "seed": cfg.seed, "marker_allocation": arm.marker_allocation,
                 "max_length": 384},
        "scheme": arm.scheme.to_dict(), "prompt_style": "plain", "mode": arm.mode,
        "optim": {"lr": cfg.reason_lr, "max_steps": cfg.reason_steps, "batch_size": cfg.reason_batch,
                  "warmup_steps": 0.1, "scheduler": "constant_with_warmup"},
        # one evaluation and checkpoint at the end: every arm is compared at the same step
        "eval": {"every_steps": cfg.reason_steps, "max_new_tokens": cfg.max_new_tokens, "batch_size": cfg.eval_batch},
        "output_dir": str(run_dir), "seed": cfg.seed, "save_total_limit": 1, "logging_steps": 5,
    })


def assemble_model(run_dir: Path, target: Path) -> Path:
    """Copy a full fine-tuning run's best weights and its tokenizer into one model directory (atomically)."""
    if (target / "config.json").is_file():
        return target
    tmp = target.with_name(f".{target.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for source in (run_dir / "best", run_dir / "tokenizer"):
        for file in source.iterdir():
            if file.is_file() and file.name != "checkpoint.json":
                shutil.copy2(file, tmp / file.name)
    os.replace(tmp, target)
    return target


def _cloze(model_name, world, device: str) -> dict:
    from memreason.analysis.cloze import cloze_recall
    from memreason.model import load

    model, tokenizer = load(model_name, dtype="float32", device=device)
    return {"corpus_wording": cloze_recall(model, tokenizer, world, template=0),
            "heldout_wording": cloze_recall(model, tokenizer, world, template=PROBE_TEMPLATE)}


def _evaluate_arm(cfg: AblateConfig, run_dir: Path, questions: Path, arm_dir: Path,
                  progress: Callable[[str, int], None] | None) -> dict[str, dict]:
    import memreason
    from memreason.data import load_traces
    from memreason.evaluate import EvalSettings, evaluate, read_results

    splits = {split: load_traces(questions, task=TASK, split=split)[0] for split in EVAL_SPLITS}
    summaries, reasoner = {}, None
    for split, traces in splits.items():
        out = arm_dir / split
        if not traces:
            continue
        summary_path = out / "summary.json"
        if summary_path.is_file() and len(read_results(out / "results.jsonl")) >= len(traces):
            summaries[split] = read_json(summary_path)
            continue
        if reasoner is None:
            reasoner = memreason.load(str(run_dir), task=TASK, device=cfg.device, max_new_tokens=cfg.max_new_tokens)
        settings = EvalSettings(model=str(run_dir), task=TASK, source=str(questions), split=split,
                                prompt_style=reasoner.prompt_style, scheme=reasoner.scheme.to_dict(),
                                max_new_tokens=cfg.max_new_tokens, seed=cfg.seed)
        report = (lambda k, s=split: progress(s, k)) if progress else None
        summaries[split] = evaluate(reasoner.model, reasoner.tokenizer, traces, reasoner.task, settings, out,
                                    batch_size=cfg.eval_batch, progress=report)
    return summaries


def judge_split(judge, split_dir: Path) -> dict:
    """Attribute every wrong answer of one evaluated split with the world judge; rates over all questions.

    Returns:
        dict: ``n``, ``correct``, ``memory_errors``, ``reason_errors``, ``unjudged`` (wrong answers the judge
        cannot attribute: no steps, or an unreadable unlabelled step), ``unparseable``, and
        ``memory_steps`` / ``true_memory_steps`` over every answer (steps that state a relation, by content).
    """
    from memreason.analysis.judges import ERRORS, OK, judge_rows, select_rows
    from memreason.evaluate import read_results

    rows = read_results(split_dir / "results.jsonl")
    # verdicts are cheap and derived: recomputed on every call, so a changed judge never leaves stale ones
    verdicts = judge_rows(select_rows(rows, ERRORS), judge, ERRORS, split_dir / "errors_world.jsonl", overwrite=True)
    ok = [v for v in verdicts if v["status"] == OK]
    memory_steps = true_steps = 0
    for row in rows:
        if row.steps:
            checks = judge.check_steps(row)
            memory_steps += sum(c.type == "memory" for c in checks)
            true_steps += sum(c.type == "memory" and c.ok for c in checks)
    return {"n": len(rows), "correct": sum(r.outcome == "correct" for r in rows),
            "memory_errors": sum(v["source"] == "memory" for v in ok),
            "reason_errors": sum(v["source"] == "reason" for v in ok),
            "unjudged": len(verdicts) - len(ok), "unparseable": sum(r.outcome == "unparseable" for r in rows),
            "memory_steps": memory_steps, "true_memory_steps": true_steps}


def table_rows(results: dict[str, dict[str, dict]]) -> list[dict]:
    """One flat row per arm and split (what ``ablation.csv`` holds): rates are shares of all questions."""
    from memreason.stats import wilson_ci

    rows = []
    for arm, splits in results.items():
        for split, r in splits.items():
            n = r["n"]
            low, high = wilson_ci(r["correct"], n)
            rows.append({"arm": arm, "split": split, "n": n, "accuracy": r["correct"] / n, "ci95_low": low,
                         "ci95_high": high, "memory_error_rate": r["memory_errors"] / n,
                         "reason_error_rate": r["reason_errors"] / n, "unparseable_rate": r["unparseable"] / n,
                         "unjudged_rate": r["unjudged"] / n,
                         "true_memory_step_share": (r["true_memory_steps"] / r["memory_steps"]
                                                    if r["memory_steps"] else None)})
    return rows


def run_ablation(cfg: AblateConfig, out_dir: str | Path, *, progress: bool = True,
                 on_stage: Callable[[str], None] | None = None,
                 on_eval: Callable[[str, int], None] | None = None) -> dict:
    """Run (or resume) the whole ablation and write its table.

    Args:
        cfg (AblateConfig); out_dir: where everything goes (see the module docstring).
        progress (bool, default True): training progress bars.
        on_stage: called with a one-line description as each stage starts (the CLI prints it).
        on_eval: called with (split, questions finished) during evaluation.

    Returns:
        dict: what ``summary.json`` holds: ``config``, ``world`` sizes, ``cloze``, ``rows`` (the table),
        ``timings`` (seconds per stage actually run, accumulated over resumed calls).

    Raises:
        ConfigError: ``out_dir`` holds an ablation with another config, or a bad config.
        DataError, ModelLoadError: as raised by training and evaluation.
    """
    from memreason.analysis.world_judge import WorldJudge
    from memreason.train import main as train_main

    say = on_stage or (lambda message: logger.info(message))
    # A re-run resumes only the same ablation; a different config in the same directory is refused.
    out = OutputDir(out_dir, cfg, config_name="ablate_config.json").path
    timings_path = out / "timings.json"
    timings: dict[str, float] = read_json(timings_path) if timings_path.is_file() else {}

    def timed(stage: str, start: float) -> None:
        timings[stage] = round(timings.get(stage, 0.0) + time.perf_counter() - start, 1)
        write_json(timings_path, timings)

    world = generate_world(cfg.world)
    world_dir = out / "world"
    if not (world_dir / "world.json").is_file():
        write_world(world, world_dir)
    sizes = {"entities": len(world.entities), "facts": len(world.facts), "corpus_sentences": len(world.corpus()),
             **{split: len(world.questions[split]) for split in world.questions}}
    say(f"world: {sizes['entities']} entities, {sizes['facts']} facts, {sizes['corpus_sentences']} corpus sentences, "
        f"questions {sizes['train']} train / {sizes['test']} test / {sizes['test_heldout']} held-out compositions")

    cloze_path = out / "cloze.json"
    cloze = read_json(cloze_path) if cloze_path.is_file() else {}
    if "base" not in cloze:
        say("cloze recall of the base model")
        start = time.perf_counter()
        cloze["base"] = _cloze(cfg.model, world, cfg.device)
        write_json(cloze_path, cloze)
        timed("cloze", start)

    knowledge_run = out / "knowledge" / "run"
    say(f"knowledge stage: full fine-tuning on the corpus for {cfg.knowledge_steps} steps → {knowledge_run}")
    start = time.perf_counter()
    train_main(knowledge_config(cfg, world_dir, knowledge_run, sizes["corpus_sentences"]), resume=True,
               progress=progress)
    knowledge_model = assemble_model(knowledge_run, out / "knowledge" / "model").resolve()
    timed("knowledge", start)
    if "knowledge" not in cloze:
        say("cloze recall after the knowledge stage")
        start = time.perf_counter()
        cloze["knowledge"] = _cloze(str(knowledge_model), world, cfg.device)
        write_json(cloze_path, cloze)
        timed("cloze", start)

    judge = WorldJudge.load(world_dir)
    results: dict[str, dict[str, dict]] = {}
    for arm in cfg.arm_list():
        arm_dir = out / "arms" / arm.name
        say(f"arm {arm.name}: reasoning stage ({cfg.reason_steps} steps), then evaluation")
        start = time.perf_counter()
        run_dir = train_main(arm_config(cfg, arm, world_dir, knowledge_model, arm_dir / "run"), resume=True,
                             progress=progress)
        timed(f"train:{arm.name}", start)
        start = time.perf_counter()
        _evaluate_arm(cfg, Path(run_dir), world_dir / "questions.jsonl", arm_dir, on_eval)
        results[arm.name] = {split: judge_split(judge, arm_dir / split) for split in EVAL_SPLITS
                             if (arm_dir / split / "results.jsonl").is_file()}
        timed(f"eval:{arm.name}", start)

    rows = table_rows(results)
    if rows:
        atomic_write(out / "ablation.csv", csv_text(rows))
    summary = {"config": cfg.to_dict(), "world": sizes, "cloze": cloze, "rows": rows, "counts": results,
               "timings": timings, "total_seconds": round(sum(timings.values()), 1)}
    write_json(out / "summary.json", summary)
    return summary
