"""The training recipe's settings: ``TrainConfig`` and its sections, their range and cross-field checks,
and the loaders ``load_config`` / ``build_config`` (``memreason.config.load_settings`` underneath).

A recipe is a YAML file whose keys mirror ``TrainConfig`` (sections ``model``, ``data``, ``scheme``, ``lora``,
``optim``, ``eval``); dotted ``key=value`` overrides apply on top (``optim.lr=1e-4 scheme.n_special=0``).

Usage::

    cfg = load_config("configs/demo.yaml", ["optim.epochs=1", "output_dir=runs/try"])
    save_config(cfg, run_dir / "config.yaml")      # the resolved recipe travels with every run
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from memreason.config import _build, _Problems, load_settings, save_settings
from memreason.model.tokens import TokenScheme

Mode = Literal["full", "lora", "tokens", "lora+tokens"]
MODES = ("full", "lora", "tokens", "lora+tokens")
LORA_TARGETS = {
    "mlp": ["gate_proj", "up_proj", "down_proj"],
    "attention": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "all": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
}


@dataclass
class ModelConfig:
    """Which base model, in which precision, on which device.

    Args:
        name_or_path (str | None): ``None`` = the embedded SmolLM2-135M-Instruct; else a local dir, a
            ``.gguf`` file or a hub id (see ``memreason.model.load``).
        dtype (str): ``auto`` (bf16 on a bf16-capable GPU, else fp32), ``float32``, ``bfloat16``, ``float16``.
            For ``mode: full`` a half dtype means fp32 master weights with half-precision autocast.
        device (str): ``auto``, ``cpu``, ``cuda``, ``cuda:1``, ... (under ``accelerate launch``/``torchrun``
            each process takes its own GPU and this is ignored).
    """

    name_or_path: str | None = None
    dtype: str = "auto"
    device: str = "auto"


@dataclass
class DataConfig:
    """What the model is trained on and how the validation split is carved.

    Args:
        source (str): ``bundled:<name>``, a paper-format ``.json`` / our ``.jsonl`` file, or ``hf:<id or dir>``.
        task (str | None): the task deciding prompt and answer scoring; ``None`` only for bundled data,
            which knows its own.
        train_split (str | None): records of this split are the training pool (``None`` = all records).
        val_fraction (float): share of the training pool held out for validation (checkpoint selection).
        val_size (int | None): an exact number of validation examples instead of ``val_fraction``.
        seed (int): seeds the validation split and the random marker allocation.
        marker_allocation ("gold" | "random"): ``random`` shuffles the memory/reason kinds across all
            training steps (same counts, seeded): the paper's Table 2 ablation.
        max_length (int): longest prompt + target + EOS in tokens; longer examples are dropped and
            counted, never truncated (a truncated example would be trained to stop before its answer).
        on_unknown_tag ("error" | "drop"), skip_invalid (bool): passed to the loader.
        objective ("trace" | "text"): ``trace`` trains answers (prompt = question, target = formatted
            trace). ``text`` trains plain language modelling on each record's ``question`` field (no
            prompt, no EOS, loss on every token): the knowledge stage of the synthetic world. Its best
            checkpoint is chosen by validation loss, since there are no answers to generate.
    """

    source: str = "bundled:strategyqa"
    task: str | None = None
    train_split: str | None = "train"
    val_fraction: float = 0.1
    val_size: int | None = None
    seed: int = 0
    marker_allocation: Literal["gold", "random"] = "gold"
    max_length: int = 1024
    on_unknown_tag: Literal["error", "drop"] = "error"
    skip_invalid: bool = False
    objective: Literal["trace", "text"] = "trace"


@dataclass
class LoraSettings:
    """LoRA on the chosen projections of every layer (the paper: r=16, alpha=16, dropout 0.05, MLP)."""

    r: int = 16
    alpha: int = 16
    dropout: float = 0.05
    target: Literal["mlp", "attention", "all"] = "mlp"


@dataclass
class OptimConfig:
    """Optimiser and schedule.

    Args:
        lr (float): peak learning rate (AdamW).
        epochs (float): passes over the training split.
        max_steps (int | None): stop after this many optimiser steps instead (smoke tests, benchmarks).
        batch_size (int): examples per device per forward pass (length-grouped, so padding stays small).
        grad_accum (int): forward passes per optimiser step.
        warmup_steps (float): >= 1: optimiser steps of linear warmup; < 1: a fraction of all steps. Must be
            smaller than the number of steps (the original's 1000-step warmup outlasted its training,
            spec disentangle.md §10 B11).
        weight_decay (float), max_grad_norm (float).
        activation_checkpointing (bool): recompute activations in the backward pass: ~20-30% slower, much
            less memory (long sequences or large models on a small GPU).
        scheduler (str): a transformers schedule name: ``cosine``, ``linear``, ``constant_with_warmup``, ...
    """

    lr: float = 2e-4
    epochs: float = 3.0
    max_steps: int | None = None
    batch_size: int = 8
    grad_accum: int = 1
    warmup_steps: float = 0.05
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    activation_checkpointing: bool = False
    scheduler: Literal["cosine", "linear", "constant", "constant_with_warmup", "cosine_with_restarts",
                       "polynomial"] = "cosine"


@dataclass
class EvalConfig:
    """Validation during training: loss, and accuracy of greedy generations (which picks the best checkpoint).

    Args:
        every_steps (int | None): evaluate and checkpoint every N optimiser steps; ``None`` = every epoch.
        max_new_tokens (int), batch_size (int): generation settings.
        val_limit (int | None): generate for at most this many validation questions (loss uses all).
    """

    every_steps: int | None = None
    max_new_tokens: int = 256
    batch_size: int = 16
    val_limit: int | None = None


@dataclass
class TrainConfig:
    """One training run. See configs/demo.yaml for a commented example.

    Args:
        model, data, scheme, lora, optim, eval: the sections above; ``scheme`` is a ``TokenScheme``
            (``style`` paper | compact | plain | direct, ``n_prefix`` P, ``n_special`` S).
        prompt_style ("auto" | "plain" | "chat"): the paper's ``Question: ...`` prompt or the model's chat
            template; ``auto`` = chat when the tokenizer has a template.
        mode ("full" | "lora" | "tokens" | "lora+tokens"): what is trained. ``lora+tokens`` (the paper):
            LoRA plus the new control-token rows; ``tokens``: the new rows only; ``lora``: LoRA only (new
            rows stay at their initialisation); ``full``: every weight.
        output_dir (str): the run directory (checkpoints, adapter, metrics, curves).
        seed (int): seeds model init of the adapters, dropout and data order.
        save_total_limit (int | None): checkpoints kept for resuming (the best one is always kept).
        logging_steps (int): log the training loss every N optimiser steps.
        report_to (list[str]): experiment trackers transformers logs to (``tensorboard``, ``wandb``,
            ``mlflow``, ``trackio``, ...; ``[all]`` = every installed one); empty = none. TensorBoard
            events go to ``<output_dir>/tensorboard``.
        run_name (str | None): the run's name in those trackers; ``None`` = the output_dir's name.
        trainer_args (dict): further ``transformers.TrainingArguments`` fields passed through as they are
            (e.g. ``{optim: adamw_torch_fused, dataloader_num_workers: 2}``); unknown fields and fields
            memreason sets from its own keys are refused (see ``memreason.train.arguments``).
    """

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    scheme: TokenScheme = field(default_factory=TokenScheme)
    prompt_style: Literal["auto", "plain", "chat"] = "auto"
    mode: Mode = "lora+tokens"
    lora: LoraSettings = field(default_factory=LoraSettings)
    optim: OptimConfig = field(default_factory=OptimConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    output_dir: str = "runs/train"
    seed: int = 0
    save_total_limit: int | None = 2
    logging_steps: int = 5
    report_to: list[str] = field(default_factory=list)
    run_name: str | None = None
    trainer_args: dict = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------------------
# TrainConfig: range and cross-field checks, loading


def _validate(cfg: TrainConfig, check_data: bool = True) -> list[str]:
    """Range and cross-field checks that types alone cannot express; every problem, naming key and fix."""
    d, o, e, lo = cfg.data, cfg.optim, cfg.eval, cfg.lora
    problems = []
    if not 0 <= d.val_fraction < 1:
        problems.append(f"data.val_fraction must be in [0, 1), got {d.val_fraction}")
    if d.val_size is not None and d.val_size < 1:
        problems.append(f"data.val_size must be >= 1 (or null to use data.val_fraction), got {d.val_size}")
    if d.val_size is None and d.val_fraction == 0:
        problems.append("data.val_fraction is 0: checkpoints are chosen on a validation split carved from the "
                        "training data, never on the test split; use e.g. data.val_fraction=0.1")
    if d.max_length < 8:
        problems.append(f"data.max_length must be >= 8 tokens, got {d.max_length}")
    for key, value in (("optim.lr", o.lr), ("optim.epochs", o.epochs)):
        if value <= 0:
            problems.append(f"{key} must be > 0, got {value}")
    for key, value in (("optim.batch_size", o.batch_size), ("optim.grad_accum", o.grad_accum),
                       ("eval.max_new_tokens", e.max_new_tokens), ("eval.batch_size", e.batch_size),
                       ("lora.r", lo.r), ("lora.alpha", lo.alpha), ("logging_steps", cfg.logging_steps)):
        if value < 1:
            problems.append(f"{key} must be >= 1, got {value}")
    for key, value in (("optim.warmup_steps", o.warmup_steps), ("optim.weight_decay", o.weight_decay),
                       ("optim.max_grad_norm", o.max_grad_norm)):
        if value < 0:
            problems.append(f"{key} must be >= 0, got {value}")
    if not 0 <= lo.dropout < 1:
        problems.append(f"lora.dropout must be in [0, 1), got {lo.dropout}")
    if o.max_steps is not None and o.max_steps < 1:
        problems.append(f"optim.max_steps must be >= 1 (or null to train for optim.epochs), got {o.max_steps}")
    if e.every_steps is not None and e.every_steps < 1:
        problems.append(f"eval.every_steps must be >= 1 (or null for every epoch), got {e.every_steps}")
    if e.val_limit is not None and e.val_limit < 1:
        problems.append(f"eval.val_limit must be >= 1 (or null for the whole validation split), got {e.val_limit}")
    if cfg.save_total_limit is not None and cfg.save_total_limit < 1:
        problems.append(f"save_total_limit must be >= 1 (or null to keep every checkpoint), got {cfg.save_total_limit}")
    if not cfg.output_dir.strip():
        problems.append("output_dir must not be empty")
    if cfg.mode in ("tokens", "lora+tokens") and not cfg.scheme.tokens():
        problems.append(f"mode {cfg.mode!r} trains the new control-token rows, but scheme.style "
                        f"{cfg.scheme.style!r} adds no tokens; use mode=lora (or full) for plain/direct ablations")
    if d.marker_allocation == "random" and not cfg.scheme.labels_steps:
        problems.append("data.marker_allocation=random shuffles memory/reason markers, but scheme "
                        f"{cfg.scheme.style!r} (n_special={cfg.scheme.n_special}) writes no kind markers")
    from memreason.train.arguments import check_reporting, check_trainer_args  # lazy: train imports config

    problems.extend(check_reporting(cfg.report_to, cfg.run_name))
    problems.extend(check_trainer_args(cfg.trainer_args))
    if check_data:
        problems.extend(_check_source(d))
    return problems


def _check_source(d: DataConfig) -> list[str]:
    """A missing dataset is a config problem, found before any model loads."""
    from memreason.data import BUNDLED
    from memreason.tasks import get_task

    problems = []
    if d.source.startswith("bundled:"):
        name = d.source.split(":", 1)[1]
        if name not in BUNDLED:
            problems.append(f"data.source: unknown bundled dataset {name!r}; choose one of "
                            + ", ".join(f"bundled:{n}" for n in BUNDLED))
    elif d.source.startswith("hf:"):
        local = d.source[3:].split(":", 1)[0]
        if local.startswith((".", "/", "~")) and not Path(local).expanduser().exists():
            problems.append(f"data.source: dataset directory not found: {local}")
        if d.task is None:
            problems.append("data.task is required for hf: datasets (strategyqa, commonsenseqa, truthfulqa, freeform)")
    else:
        if not Path(d.source).expanduser().is_file():
            problems.append(f"data.source: dataset file not found: {d.source}")
        if d.task is None:
            problems.append("data.task is required for dataset files (strategyqa, commonsenseqa, truthfulqa, freeform)")
    if d.task is not None:
        try:
            get_task(d.task)
        except KeyError as exc:
            problems.append(f"data.task: {exc.args[0]}")
    return problems


def build_config(data: dict | None = None) -> TrainConfig:
    """A validated ``TrainConfig`` from a (possibly partial) nested dict.

    Raises:
        ConfigError: unknown key, wrong type, or a value out of range (all of them).
    """
    cfg = _build(TrainConfig, data or {}, "")
    problems = _Problems(_validate(cfg))
    problems.raise_if_any()
    return cfg


def load_config(path: str | Path | None, overrides: list[str] | tuple[str, ...] = (), *,
                check_data: bool = True) -> TrainConfig:
    """Read a training recipe, apply ``key=value`` overrides, and validate the result.

    Args:
        path: a YAML file, or ``None`` to start from the defaults.
        overrides: dotted assignments such as ``"optim.lr=1e-4"`` or ``"data.val_size=null"``.
        check_data (bool, default True): also check that ``data.source`` exists. Only for validating a
            recipe whose dataset lives elsewhere (the paper recipes name the paper's files).

    Raises:
        ConfigError: every problem found (see ``load_settings``).
    """
    return load_settings(TrainConfig, path, overrides, validate=lambda cfg: _validate(cfg, check_data))


save_config = save_settings
