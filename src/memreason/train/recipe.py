"""The fine-tuning recipe: train a causal LM to write memory/reason-labelled steps (Jin et al., ACL 2025).

Read it top to bottom, like torchtune's ``lora_finetune_single_device``: ``TrainRecipe.setup`` checks the
run directory, loads the data (a seeded validation split carved from the training split: checkpoints are
chosen there, never on test), loads the model, adds the control tokens, tokenises every example, wraps the
model with PEFT (LoRA and/or trainable token rows, or full fine-tuning) and builds the Trainer;
``TrainRecipe.train`` trains (resuming from the last checkpoint when asked); ``TrainRecipe.finish``
exports the best and the last weights and marks the run complete. ``main(cfg)`` wires these together. The
recipe runs unchanged under ``accelerate launch`` / ``torchrun``.

Run directory (``cfg.output_dir``)::

    run.json              RunInfo (memreason.model.runs): base model, task, prompt style, scheme, mode,
                          token ids, status (training | complete | failed | interrupted), best / last
    config.yaml           the resolved TrainConfig
    scheme.json           the TokenScheme
    tokenizer/            the tokenizer with the added tokens
    best/  last/          the best (by validation accuracy) and the final weights: adapter (safetensors),
                          tokenizer, checkpoint.json; peft.AutoPeftModelForCausalLM opens either
    checkpoints/          Trainer checkpoints for --resume (optimizer/scheduler/RNG state inside, see below)
    metrics.jsonl         every logged value (train loss, val loss, val accuracy, ...), one JSON object a line
    val_generations.jsonl the validation generations of every evaluation, scored
    curves.png            training loss, validation loss and validation accuracy against steps
    tensorboard/          TensorBoard events, with ``report_to: [tensorboard]``

Trainer checkpoints hold the optimizer, scheduler and RNG states that transformers writes with
``torch.save``; they exist only under ``checkpoints/`` for resuming and transformers reads them back with
``torch.load(weights_only=True)``. Everything a trained run is used through (``best/``, ``last/``,
tokenizer, JSON, YAML) is safetensors or text.

Failure and resume: an exception or Ctrl-C during training marks ``run.json`` ``failed`` / ``interrupted``
with the error. A run that stopped before its first checkpoint can simply be started again; one with
checkpoints continues with ``--resume`` from its last complete checkpoint (a checkpoint a kill cut short
is removed first) and ends at the same weights as an uninterrupted run.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import time
from dataclasses import replace
from pathlib import Path
from typing import Sequence

from memreason.config import config_to_dict
from memreason.train.config import LORA_TARGETS, TrainConfig, load_config, save_config
from memreason.errors import ConfigError, DataError, ModelLoadError
from memreason.model.runs import RunInfo, SavedWeights, adapter_base_name
from memreason.model.tokens import format_target
from memreason.train.data import (ListDataset, PadCollator, allocate_markers_randomly, prepare_example,
                                  prepare_examples, split_validation)
from memreason.traces import Trace
from memreason.train.sparse_tokens import sparse_token_rows

logger = logging.getLogger(__name__)

# Files of a checkpoint that make up the trained weights (the rest is optimizer/scheduler/RNG state).
WEIGHT_FILES = ("adapter_model.safetensors", "adapter_config.json", "model.safetensors",
                "model.safetensors.index.json", "config.json", "generation_config.json")
# Config keys a resumed run may change: they decide where logs go, not what is trained.
RESUMABLE_CHANGES = ("report_to", "run_name")


def wrap_model(model, mode: str, token_ids: list[int], lora_r: int, lora_alpha: int, lora_dropout: float,
               lora_target: str):
    """Make exactly the parameters of ``mode`` trainable.

    ``lora+tokens`` (the paper) and ``tokens`` train the new rows through PEFT's trainable tokens: the rows
    are stored as absolute values ``[n_tokens, hidden]`` and written into the (frozen) matrix with
    ``index_copy`` at every forward, so every original row stays bit-identical. A tied model gets one set of
    rows shared by embedding and output head; an untied one gets separate input and output rows (a list of
    ids would wrap only the input embedding, and the model could not learn to *emit* the markers,
    ecosystem.md §1.2).

    Returns:
        the model to train (a ``PeftModel`` for every mode but ``full``).

    Raises:
        ConfigError: the mode's target modules do not exist in this architecture.
    """
    import torch
    from peft import LoraConfig, TrainableTokensConfig, get_peft_model

    if mode == "full":
        for parameter in model.parameters():
            parameter.requires_grad_(True)
        return model
    output = model.get_output_embeddings()
    tied = output is None or output.weight is model.get_input_embeddings().weight
    names = {module: name for name, module in model.named_modules()}
    embed = names[model.get_input_embeddings()]
    head = None if tied else names[output]
    if mode == "tokens":
        config = TrainableTokensConfig(token_indices=list(token_ids),
                                       target_modules=[embed] if tied else [embed, head])
    else:
        trainable_tokens = None
        if mode == "lora+tokens":
            trainable_tokens = list(token_ids) if tied else {embed: list(token_ids), head: list(token_ids)}
        config = LoraConfig(r=lora_r, lora_alpha=lora_alpha, lora_dropout=lora_dropout, bias="none",
                            target_modules=LORA_TARGETS[lora_target], task_type="CAUSAL_LM",
                            trainable_token_indices=trainable_tokens)
    try:
        peft_model = get_peft_model(model, config)
    except ValueError as exc:  # e.g. no module named gate_proj in this architecture
        raise ConfigError(f"cannot apply mode {mode!r} to this model: {exc}") from None
    # Trainable weights live in fp32 even on a half-precision base (autocast does the half-precision math);
    # fp16 gradient scaling refuses half-precision gradients.
    for parameter in peft_model.parameters():
        if parameter.requires_grad and parameter.dtype in (torch.float16, torch.bfloat16):
            parameter.data = parameter.data.float()
    return peft_model


class TrainRecipe:
    """One training run, set up from a ``TrainConfig``.

    Args:
        cfg (TrainConfig): the validated configuration.
        progress (bool, default True): show transformers' progress bar.
    """

    def __init__(self, cfg: TrainConfig, *, progress: bool = True):
        self.cfg, self.progress = cfg, progress
        self.run_dir = Path(cfg.output_dir)
        self.trainer = None
        self.resume_from: Path | None = None
        self.info: RunInfo | None = None

    # -- setup ------------------------------------------------------------------------------------------

    def setup(self, resume: bool = False) -> None:
        """Check the run directory, load data and model, tokenise, wrap the model and build the Trainer.

        Raises:
            ConfigError: the run directory holds a different or unfinished run (see ``main``), or the
                schedule is inconsistent.
            DataError: the dataset cannot be used for training.
            ModelLoadError: the base model cannot be loaded.
        """
        from accelerate import PartialState
        from transformers import set_seed

        from memreason.model import load
        from memreason.model.tokens import add_scheme_tokens
        from memreason.prompts import resolve_style
        from memreason.tasks import get_task
        from memreason.train.arguments import training_arguments

        cfg = self.cfg
        # also starts the distributed state under torchrun / accelerate
        self.args = training_arguments(cfg, self.run_dir, progress=self.progress)
        if resume and self.args.should_save:
            _drop_torn_checkpoints(self.run_dir / "checkpoints")
        PartialState().wait_for_everyone()
        self.resume_from = self._check_run_dir(resume)
        PartialState().wait_for_everyone()  # every process checks the directory before the first one writes
        self.task = get_task(cfg.data.task or cfg.data.source.split(":", 1)[1])
        train_traces, val_traces = self._load_traces()

        set_seed(cfg.seed)
        train_dtype, amp = self._precision()
        # each process loads onto its own device (cuda:<local rank> under torchrun), never all onto one
        model, tokenizer = load(cfg.model.name_or_path, dtype=train_dtype, device=str(self.args.device))
        self.prompt_style = resolve_style(cfg.prompt_style, tokenizer)
        token_ids = add_scheme_tokens(model, tokenizer, cfg.scheme)
        self.tokenizer, self.token_ids = tokenizer, token_ids

        train_rows, dropped_train = prepare_examples(train_traces, self._example)
        val_rows, dropped_val = prepare_examples(val_traces, self._example)
        if dropped_train or dropped_val:
            logger.warning("dropped %d training and %d validation examples longer than data.max_length=%d tokens "
                           "(never truncated: that would cut the answer off)", dropped_train, dropped_val,
                           cfg.data.max_length)
        if not train_rows:
            raise DataError(f"every training example is longer than data.max_length={cfg.data.max_length} tokens",
                            file=cfg.data.source)
        self._check_schedule(len(train_rows))
        # the text objective has no answers to generate: validation is the loss alone
        val_items = [] if cfg.data.objective == "text" else val_traces[:cfg.eval.val_limit or None]

        set_seed(cfg.seed)  # LoRA's random A matrices start from the same state whatever loading consumed
        model = wrap_model(model, cfg.mode, token_ids, cfg.lora.r, cfg.lora.alpha, cfg.lora.dropout, cfg.lora.target)
        sparse_token_rows(model)  # the same values without rebuilding [vocab, hidden] every forward (exact)
        model.config.use_cache = False  # no KV cache during training forwards (generation turns it on per call)
        base_model = self._base_model_name()
        if hasattr(model, "peft_config"):  # what PEFT's auto classes load the adapter onto
            for adapter in model.peft_config.values():
                adapter.base_model_name_or_path = adapter_base_name(base_model)

        self.trainer = self._build_trainer(model, train_rows, val_rows, val_items)
        self.info = RunInfo(
            base_model=base_model, task=self.task.name, prompt_style=self.prompt_style, scheme=cfg.scheme,
            mode=cfg.mode, token_ids=tuple(token_ids), status="training", task_version=self.task.version,
            vocab_size=len(tokenizer), seed=cfg.seed, dtype=str(train_dtype).replace("torch.", ""), amp=amp,
            world_size=self.args.world_size,
            data={"source": cfg.data.source, "n_train": len(train_rows), "n_val": len(val_rows),
                  "n_val_generated": len(val_items), "dropped_too_long": {"train": dropped_train, "val": dropped_val},
                  "val_ids": [t.id for t in val_traces], "marker_allocation": cfg.data.marker_allocation},
            trainable_parameters=sum(p.numel() for p in model.parameters() if p.requires_grad),
            versions=_versions())
        if self.args.should_save:
            self._write_run_files()
        logger.info("training %s in mode %s on %d examples (validation %d, %d generated); %d trainable parameters",
                    base_model, cfg.mode, len(train_rows), len(val_rows), len(val_items),
                    self.info.trainable_parameters)

    def _example(self, trace: Trace) -> dict | None:
        from memreason.prompts import render_prompt

        d = self.cfg.data
        if d.objective == "text":
            # plain text: no prompt, every token a target, and no EOS (a model taught to stop after every
            # sentence stops before it answers: measured on the synthetic world)
            return prepare_example(self.tokenizer, "", trace.question, d.max_length, eos=False)
        prompt = render_prompt(trace.question, self.task, self.tokenizer, self.prompt_style)
        return prepare_example(self.tokenizer, prompt, format_target(trace, self.cfg.scheme), d.max_length)

    def _build_trainer(self, model, train_rows: list[dict], val_rows: list[dict], val_items: list[Trace]):
        from memreason.prompts import render_prompt
        from memreason.train.trainer import MetricsWriter, RecipeTrainer, ValidationAccuracy

        cfg = self.cfg
        callbacks = [MetricsWriter(self.run_dir / "metrics.jsonl")]
        validation = None
        if cfg.data.objective == "trace":
            prompts = [render_prompt(t.question, self.task, self.tokenizer, self.prompt_style) for t in val_items]
            validation = ValidationAccuracy(val_items, prompts, self.task, cfg.scheme,
                                            max_new_tokens=cfg.eval.max_new_tokens, batch_size=cfg.eval.batch_size,
                                            out_path=self.run_dir / "val_generations.jsonl")
            callbacks.insert(0, validation)
        multiple_of = 8 if self.args.device.type == "cuda" else None
        trainer = RecipeTrainer(
            model=model, args=self.args, train_dataset=ListDataset(train_rows), eval_dataset=ListDataset(val_rows),
            data_collator=PadCollator(self.tokenizer.pad_token_id, multiple_of=multiple_of),
            processing_class=self.tokenizer, callbacks=callbacks, sampler_seed=cfg.seed,
            tensorboard_dir=self.run_dir / "tensorboard")
        if validation is not None:
            validation.trainer = trainer
        return trainer

    def _base_model_name(self) -> str:
        from memreason.model.loading import DEFAULT_MODEL

        base_model = self.cfg.model.name_or_path or DEFAULT_MODEL
        if Path(base_model).expanduser().exists():
            base_model = str(Path(base_model).expanduser().resolve())
        return base_model

    def _check_same_config(self) -> None:
        """Refuse to resume a run with a config that trains something else."""
        saved = self.run_dir / "config.yaml"
        if not saved.is_file():
            return
        previous, current = config_to_dict(load_config(saved)), config_to_dict(self.cfg)
        changed = [key for key in _diff(previous, current) if key.split(".")[0] not in RESUMABLE_CHANGES]
        if changed:
            raise ConfigError(f"cannot resume {self.run_dir}: the config differs from the saved one in "
                              f"{', '.join(changed)}; resume with the same recipe or choose another output_dir")

    def _check_run_dir(self, resume: bool) -> Path | None:
        """Decide between a fresh run and a resumed one; refuse to mix two different runs in one directory.

        Returns:
            the checkpoint to resume from, or None to start from step 0.
        """
        checkpoints = self.run_dir / "checkpoints"
        if not resume:
            if any(checkpoints.glob("checkpoint-*")):
                raise ConfigError(f"{self.run_dir} already holds a run; pass --resume to continue it, or choose "
                                  "another output_dir")
            previous = _previous_status(self.run_dir)
            if previous is None:
                return None
            status, error = previous
            if status in ("failed", "interrupted"):
                logger.info("%s: the previous attempt stopped before its first checkpoint (%s: %s); starting "
                            "again", self.run_dir, status, error)
                return None
            raise ConfigError(f"{self.run_dir} already holds a run; pass --resume to continue it, or choose "
                              "another output_dir")
        self._check_same_config()
        latest = _last_checkpoint(checkpoints)
        if latest is None:
            logger.info("no checkpoint in %s; starting from the beginning", self.run_dir)
        else:
            logger.info("resuming from %s", latest)
        return latest

    def _load_traces(self) -> tuple[list[Trace], list[Trace]]:
        from memreason.data import load_traces, require_steps

        d = self.cfg.data
        pool, report = load_traces(d.source, task=self.task, split=d.train_split, on_unknown_tag=d.on_unknown_tag,
                                   skip_invalid=d.skip_invalid)
        if not pool:
            raise DataError(f"no records of split {d.train_split!r}", file=d.source)
        if self.cfg.scheme.style != "direct" and d.objective == "trace":
            require_steps(pool, report.source)
        train, val = split_validation(pool, fraction=d.val_fraction, size=d.val_size, seed=d.seed)
        if d.marker_allocation == "random":
            train = allocate_markers_randomly(train, seed=d.seed)
        return train, val

    def _precision(self):
        """(dtype to load the base model in, autocast dtype name or None)."""
        import torch

        from memreason.model.loading import resolve_device, resolve_dtype

        device = "cpu" if self.args.use_cpu else resolve_device("auto")
        dtype = resolve_dtype(self.cfg.model.dtype, device)
        if dtype == torch.float32:
            return dtype, None
        amp = "bf16" if dtype == torch.bfloat16 else "fp16"
        # full fine-tuning keeps fp32 master weights; adapters are fp32 anyway (see wrap_model)
        return (torch.float32 if self.cfg.mode == "full" else dtype), amp

    def _check_schedule(self, n_train: int) -> None:
        """Warmup must end before training does (the original's never did, B11)."""
        o, world = self.cfg.optim, max(1, self.args.world_size)
        batches = math.ceil(n_train / (o.batch_size * world))
        total = o.max_steps or math.ceil(o.epochs * max(1, batches // o.grad_accum))
        self.total_steps = total
        if o.warmup_steps >= 1 and o.warmup_steps >= total:
            raise ConfigError(f"optim.warmup_steps={int(o.warmup_steps)} but training has only {total} optimiser "
                              "steps, so the learning rate would never reach optim.lr; lower warmup_steps "
                              "(e.g. optim.warmup_steps=0.05 for 5%)")

    def _write_run_files(self) -> None:
        from memreason.io import write_json

        self.run_dir.mkdir(parents=True, exist_ok=True)
        save_config(self.cfg, self.run_dir / "config.yaml")
        write_json(self.run_dir / "scheme.json", self.cfg.scheme.to_dict(), indent=2)
        self.tokenizer.save_pretrained(self.run_dir / "tokenizer")
        if self.resume_from is not None:
            step = json.loads((self.resume_from / "trainer_state.json").read_text())["global_step"]
            _truncate_jsonl(self.run_dir / "metrics.jsonl", step)
            _truncate_jsonl(self.run_dir / "val_generations.jsonl", step)
        else:  # a fresh start: drop logs left by a run that died before its first checkpoint
            for name in ("metrics.jsonl", "val_generations.jsonl"):
                (self.run_dir / name).unlink(missing_ok=True)
        self.info.to_json(self.run_dir)

    # -- train ------------------------------------------------------------------------------------------

    def train(self, callbacks: Sequence = ()) -> Path:
        """Train (resuming when ``setup`` found a checkpoint), then ``finish``. Returns the run directory.

        An exception or Ctrl-C marks ``run.json`` failed / interrupted (with the error) and is re-raised.
        """
        for callback in callbacks:
            self.trainer.add_callback(callback)
        start = time.perf_counter()
        try:
            self.trainer.train(resume_from_checkpoint=str(self.resume_from) if self.resume_from else None)
            self.info = replace(self.info, train_seconds=round(time.perf_counter() - start, 1))
            return self.finish()
        except BaseException as exc:
            self._mark_stopped(exc)
            raise

    def _mark_stopped(self, exc: BaseException) -> None:
        """Record in run.json that training stopped, and why, so the next run knows what it finds."""
        if not self.trainer.args.should_save or not (self.run_dir / "run.json").is_file():
            return
        status = "interrupted" if isinstance(exc, KeyboardInterrupt) else "failed"
        error = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}".rstrip(": ")
        self.info = replace(self.info, status=status, error=error, global_step=self.trainer.state.global_step)
        try:
            self.info.to_json(self.run_dir)
        except Exception as write_error:  # never hide the original error behind a second one
            logger.warning("could not mark %s as %s: %s", self.run_dir, status, write_error)

    def finish(self) -> Path:
        """Copy the best and last checkpoints' weights and the tokenizer to ``best/`` and ``last/``, draw
        the curves, and mark the run complete (main process only)."""
        from memreason.io import write_json

        state = self.trainer.state
        if not self.trainer.args.should_save:
            return self.run_dir
        last = _last_checkpoint(self.run_dir / "checkpoints")
        best = Path(state.best_model_checkpoint) if state.best_model_checkpoint else last
        exported = {}
        for name, checkpoint in (("best", best), ("last", last)):
            target = self.run_dir / name
            shutil.rmtree(target, ignore_errors=True)
            target.mkdir(parents=True)
            for file in WEIGHT_FILES:
                if (checkpoint / file).is_file():
                    shutil.copy2(checkpoint / file, target / file)
            self.tokenizer.save_pretrained(target)
            exported[name] = _saved_weights(checkpoint.name, state.log_history)
            write_json(target / "checkpoint.json", exported[name].to_dict(), indent=2)
        self.info = replace(self.info, status="complete", error=None, global_step=state.global_step, **exported)
        self.info.to_json(self.run_dir)
        try:
            from memreason.analysis.plots import plot_training_curves
            from memreason.io import read_jsonl

            plot_training_curves(read_jsonl(self.run_dir / "metrics.jsonl"), self.run_dir / "curves.png")
        except Exception as exc:  # a plotting problem must never lose a finished run
            logger.warning("could not draw curves.png: %s", exc)
        accuracy = self.info.best.val_accuracy
        logger.info("run complete: %s (best %s, val accuracy %s)", self.run_dir, self.info.best.checkpoint,
                    "n/a" if accuracy is None else f"{accuracy:.3f}")
        return self.run_dir


# ---------------------------------------------------------------------------------------------------------
# Run-directory helpers


def _previous_status(run_dir: Path) -> tuple[str, str | None] | None:
    """(status, error) of the run.json in ``run_dir``; None when there is none. An unreadable run.json
    counts as a run in progress (never overwritten without --resume)."""
    if not (run_dir / "run.json").is_file():
        return None
    try:
        info = RunInfo.from_json(run_dir)
    except ModelLoadError:
        return "training", None
    return info.status, info.error


def _drop_torn_checkpoints(directory: Path) -> None:
    """Remove checkpoints a kill cut short (no readable trainer_state.json, which transformers writes
    last). Only a resuming run calls this, on its own checkpoints."""
    for path in sorted(directory.glob("checkpoint-*")):
        state = path / "trainer_state.json"
        try:
            json.loads(state.read_text(encoding="utf-8"))
            continue
        except (OSError, ValueError):
            pass
        logger.warning("removing %s: a kill interrupted its save (no complete trainer_state.json)", path)
        shutil.rmtree(path, ignore_errors=True)


def _last_checkpoint(directory: Path) -> Path | None:
    from transformers.trainer_utils import get_last_checkpoint

    if not directory.is_dir():
        return None
    last = get_last_checkpoint(str(directory))
    return Path(last) if last else None


def _saved_weights(checkpoint: str, log_history: list[dict]) -> SavedWeights:
    """The checkpoint and the validation metrics logged at its step (accuracy, answer/format rates, loss)."""
    step = int(checkpoint.split("-")[-1])
    metrics = {}
    for entry in log_history:
        if entry.get("step") == step:
            for key in ("eval_val_accuracy", "eval_val_answer_rate", "eval_val_format_rate", "eval_loss"):
                if key in entry:
                    metrics["val_loss" if key == "eval_loss" else key.replace("eval_", "")] = entry[key]
    return SavedWeights(checkpoint=checkpoint, step=step, **metrics)


def _truncate_jsonl(path: Path, max_step: int) -> None:
    """Drop rows logged after ``max_step`` (a resumed run logs those steps again), and a torn last line."""
    from memreason.io import atomic_write, drop_torn_tail, read_jsonl, to_json

    if not path.is_file():
        return
    drop_torn_tail(path)
    keep = [row for row in read_jsonl(path) if row.get("step", 0) <= max_step]
    atomic_write(path, "".join(to_json(row) + "\n" for row in keep))


def _diff(a: dict, b: dict, prefix: str = "") -> list[str]:
    keys = []
    for key in sorted(set(a) | set(b)):
        if isinstance(a.get(key), dict) and isinstance(b.get(key), dict):
            keys += _diff(a[key], b[key], f"{prefix}{key}.")
        elif a.get(key) != b.get(key):
            keys.append(f"{prefix}{key}")
    return keys


def _versions() -> dict:
    import peft
    import torch
    import transformers

    from memreason import __version__ as memreason_version

    return {"memreason": memreason_version, "torch": torch.__version__, "transformers": transformers.__version__,
            "peft": peft.__version__}


def main(cfg: TrainConfig, resume: bool = False, progress: bool = True) -> Path:
    """Train one run from a config and return its directory.

    Args:
        cfg (TrainConfig): e.g. from ``load_config("configs/demo.yaml", ["optim.epochs=1"])``.
        resume (bool, default False): continue from the run directory's last checkpoint (start fresh when
            it has none); a run that is already complete is returned as it is.
        progress (bool, default True): show the progress bar.

    Returns:
        Path: the run directory (``cfg.output_dir``).

    Raises:
        ConfigError: bad config, or an output_dir holding another run (without ``resume``) or a run with a
            different config (with ``resume``).
        DataError, ModelLoadError: unusable dataset or base model.
    """
    run_dir = Path(cfg.output_dir)
    if resume and (_previous_status(run_dir) or ("",))[0] == "complete":
        TrainRecipe(cfg)._check_same_config()  # a different config is still an error
        logger.info("%s is already complete; nothing to do", cfg.output_dir)
        return run_dir
    recipe = TrainRecipe(cfg, progress=progress)
    recipe.setup(resume=resume)
    return recipe.train()
