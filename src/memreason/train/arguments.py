"""What reaches ``transformers.TrainingArguments``: memreason's own settings, experiment tracking
(``report_to`` / ``run_name``) and the validated ``trainer_args:`` pass-through.

``trainer_args`` hands any other ``TrainingArguments`` field to the Trainer as it is (``optim``,
``adam_beta2``, ``dataloader_num_workers``, ``torch_compile``, ``deepspeed``, ...). Two kinds of key are
refused, each with one line saying why: names ``TrainingArguments`` does not have (with the closest
match), and the fields memreason sets itself from its own config keys (``learning_rate`` is
``optim.lr``), whose pass-through would silently fight the recipe. ``config.py`` calls
``check_trainer_args`` and ``check_reporting`` while validating a ``TrainConfig``, so every such problem is
reported before a model loads.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import types
import typing
from pathlib import Path
from typing import Any, Union

from memreason.errors import ConfigError

# TrainingArguments fields memreason sets (or that would break a run directory), and what to do instead.
SET_BY_MEMREASON = {
    "output_dir": "checkpoints go to <output_dir>/checkpoints; set output_dir",
    "per_device_train_batch_size": "set optim.batch_size",
    "per_device_eval_batch_size": "set eval.batch_size",
    "gradient_accumulation_steps": "set optim.grad_accum",
    "learning_rate": "set optim.lr",
    "num_train_epochs": "set optim.epochs",
    "max_steps": "set optim.max_steps",
    "lr_scheduler_type": "set optim.scheduler",
    "warmup_steps": "set optim.warmup_steps",
    "weight_decay": "set optim.weight_decay",
    "max_grad_norm": "set optim.max_grad_norm",
    "activation_checkpointing": "set optim.activation_checkpointing",
    "activation_checkpointing_kwargs": "set optim.activation_checkpointing (memreason uses use_reentrant=False)",
    "gradient_checkpointing": "set optim.activation_checkpointing",
    "gradient_checkpointing_kwargs": "set optim.activation_checkpointing (memreason uses use_reentrant=False)",
    "eval_strategy": "set eval.every_steps (evaluation and checkpoints go together, so every checkpoint "
                     "has the validation score best/ is chosen by)",
    "eval_steps": "set eval.every_steps",
    "save_strategy": "set eval.every_steps (a checkpoint is saved at every evaluation)",
    "save_steps": "set eval.every_steps",
    "save_total_limit": "set save_total_limit",
    "metric_for_best_model": "best/ is chosen by validation accuracy (data.objective=trace) or loss (text)",
    "greater_is_better": "best/ is chosen by validation accuracy (data.objective=trace) or loss (text)",
    "load_best_model_at_end": "best/ and last/ are both exported; training ends on the last weights",
    "logging_strategy": "set logging_steps",
    "logging_steps": "set logging_steps",
    "logging_first_step": "memreason always logs the first step",
    "seed": "set seed",
    "data_seed": "set seed",
    "use_cpu": "set model.device",
    "bf16": "set model.dtype",
    "fp16": "set model.dtype",
    "disable_tqdm": "use --no-progress",
    "report_to": "set report_to",
    "run_name": "set run_name",
    "remove_unused_columns": "memreason's collator needs every column of its rows",
    "prediction_loss_only": "validation accuracy comes from generation (eval.*); evaluation computes the loss only",
    "dataloader_pin_memory": "memreason pins memory exactly when training on CUDA",
    "ddp_find_unused_parameters": "every trainable parameter gets a gradient; searching for unused ones "
                                  "only slows DDP down",
    "resume_from_checkpoint": "use --resume",
    "save_only_model": "--resume needs the optimizer, scheduler and RNG state in every checkpoint",
    "train_sampling_strategy": "memreason's seeded length-grouped sampler orders the batches (exact resume)",
    "length_column_name": "memreason's seeded length-grouped sampler orders the batches (exact resume)",
    "do_train": "Trainer ignores it (only example scripts read it)",
    "do_eval": "Trainer ignores it (only example scripts read it)",
    "do_predict": "Trainer ignores it (only example scripts read it)",
    "local_rank": "torchrun / accelerate launch set it",
}

# report_to name -> the package it needs (what `pip install` takes)
_TRACKER_PACKAGES = {
    "tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow", "comet_ml": "comet-ml",
    "neptune": "neptune", "trackio": "trackio", "codecarbon": "codecarbon", "clearml": "clearml",
    "dagshub": "dagshub", "dvclive": "dvclive", "swanlab": "swanlab", "azure_ml": "azureml-core",
}


def _fields() -> dict[str, Any]:
    from transformers import TrainingArguments

    hints = typing.get_type_hints(TrainingArguments)
    return {f.name: hints.get(f.name, Any) for f in dataclasses.fields(TrainingArguments) if f.init}


def _scalar_types(tp) -> list[type]:
    """The plain scalar types (bool, int, float, str) an annotation accepts; [] = anything else too."""
    options = typing.get_args(tp) if typing.get_origin(tp) in (Union, types.UnionType) else (tp,)
    plain = [o for o in options if o in (bool, int, float, str)]
    others = [o for o in options if o not in (bool, int, float, str, type(None))]
    return [] if others else plain


def _coerce(key: str, value: Any, tp) -> Any:
    """``value`` as the type of field ``key``; strings (command-line overrides) are parsed.

    Raises:
        ConfigError: a value that the field's plain type cannot hold.
    """
    kinds = _scalar_types(tp)
    if not kinds or value is None:
        return value  # enums, dicts, lists, unions with them: TrainingArguments checks those itself
    if isinstance(value, str) and str not in kinds:
        import yaml

        try:
            value = yaml.safe_load(value)
        except yaml.YAMLError:
            pass
    for kind in kinds:
        if kind is bool and isinstance(value, bool):
            return value
        if kind is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        if kind is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if kind is float and isinstance(value, str):  # YAML reads 1e-8 as a string
            try:
                return float(value)
            except ValueError:
                pass
        if kind is str and isinstance(value, str):
            return value
    wanted = " or ".join(k.__name__ for k in kinds)
    raise ConfigError(f"trainer_args.{key}: expected {wanted}, got {value!r}")


def check_trainer_args(trainer_args: dict) -> list[str]:
    """Every problem with a ``trainer_args:`` mapping (empty when it can be passed through).

    Unknown ``TrainingArguments`` keys are named with the closest match; keys memreason sets itself are
    refused with the config key to use instead; values are checked against the field's plain type.
    """
    if not trainer_args:
        return []
    known = _fields()
    problems = []
    unknown = [key for key in trainer_args if key not in known]
    for key in unknown:
        close = difflib.get_close_matches(str(key), list(known), n=1)
        hint = f" (did you mean {close[0]}?)" if close else ""
        problems.append(f"trainer_args.{key}: not a transformers TrainingArguments field{hint}")
    for key in trainer_args:
        if key in SET_BY_MEMREASON:
            problems.append(f"trainer_args.{key}: memreason sets it: {SET_BY_MEMREASON[key]}")
        elif key in known:
            try:
                _coerce(key, trainer_args[key], known[key])
            except ConfigError as exc:
                problems.append(str(exc))
    return problems


def check_reporting(report_to: list[str], run_name: str | None) -> list[str]:
    """Every problem with ``report_to`` / ``run_name``: unknown trackers, trackers whose package is missing."""
    problems = []
    if run_name is not None and not run_name.strip():
        problems.append("run_name must not be empty (null = the output_dir's name)")
    if not report_to:
        return problems
    from transformers.integrations.integration_utils import (INTEGRATION_TO_CALLBACK,
                                                             get_available_reporting_integrations)

    names = list(report_to)
    if ("none" in names or "all" in names) and len(names) > 1:
        problems.append(f"report_to: 'none' and 'all' stand alone, got {names}")
    available = set(get_available_reporting_integrations())
    for name in names:
        if name in ("none", "all"):
            continue
        if name not in INTEGRATION_TO_CALLBACK:
            close = difflib.get_close_matches(name, list(INTEGRATION_TO_CALLBACK), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            problems.append(f"report_to: unknown tracker {name!r}{hint}; transformers supports "
                            + ", ".join(sorted(INTEGRATION_TO_CALLBACK)))
        elif name in _TRACKER_PACKAGES and name not in available:
            problems.append(f"report_to: {name!r} needs the {_TRACKER_PACKAGES[name]} package "
                            f"(pip install {_TRACKER_PACKAGES[name]})")
    return problems


def training_arguments(cfg, run_dir: Path, *, progress: bool):
    """The ``TrainingArguments`` of a run: memreason's settings, then ``trainer_args`` on top.

    Args:
        cfg (TrainConfig): a validated config.
        run_dir (Path): the run directory (checkpoints go to ``run_dir/checkpoints``).
        progress (bool): show the progress bar.

    Raises:
        ConfigError: ``TrainingArguments`` refuses a ``trainer_args`` value (e.g. an unknown optimizer).
    """
    import torch
    from transformers import TrainingArguments

    from memreason.model.loading import resolve_device, resolve_dtype

    o, e = cfg.optim, cfg.eval
    report_to, run_name, trainer_args = list(cfg.report_to), cfg.run_name, dict(cfg.trainer_args)
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    device = "cuda" if distributed and torch.cuda.is_available() else resolve_device(cfg.model.device)
    dtype = resolve_dtype(cfg.model.dtype, device)
    strategy = "steps" if e.every_steps else "epoch"
    warmup = int(o.warmup_steps) if o.warmup_steps >= 1 else o.warmup_steps
    ours = dict(
        output_dir=str(run_dir / "checkpoints"),
        per_device_train_batch_size=o.batch_size, per_device_eval_batch_size=e.batch_size,
        gradient_accumulation_steps=o.grad_accum, learning_rate=o.lr, num_train_epochs=o.epochs,
        max_steps=o.max_steps or -1,
        lr_scheduler_type=o.scheduler, warmup_steps=warmup, weight_decay=o.weight_decay,
        max_grad_norm=o.max_grad_norm, activation_checkpointing=o.activation_checkpointing,
        activation_checkpointing_kwargs={"use_reentrant": False} if o.activation_checkpointing else None,
        eval_strategy=strategy, save_strategy=strategy, eval_steps=e.every_steps, save_steps=e.every_steps,
        metric_for_best_model="val_accuracy" if cfg.data.objective == "trace" else "eval_loss",
        greater_is_better=cfg.data.objective == "trace", load_best_model_at_end=False,
        save_total_limit=cfg.save_total_limit,
        logging_strategy="steps", logging_steps=cfg.logging_steps, logging_first_step=True,
        seed=cfg.seed, data_seed=cfg.seed, use_cpu=device == "cpu",
        bf16=dtype == torch.bfloat16, fp16=dtype == torch.float16,
        disable_tqdm=not progress, report_to=report_to or "none",
        run_name=run_name or Path(cfg.output_dir).name, remove_unused_columns=False,
        dataloader_pin_memory=device.startswith("cuda"), prediction_loss_only=True,
        ddp_find_unused_parameters=False,
    )
    known = _fields() if trainer_args else {}
    extra = {key: _coerce(key, value, known[key]) for key, value in trainer_args.items()}
    try:
        return TrainingArguments(**ours, **extra)
    except (ValueError, TypeError) as exc:
        keys = ", ".join(f"trainer_args.{k}" for k in extra) or "the training settings"
        raise ConfigError(f"TrainingArguments refused {keys}: {str(exc).splitlines()[0]}") from None
