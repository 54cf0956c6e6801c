"""The Trainer and its callbacks: what ``transformers.Trainer`` does differently for memreason.

* ``RecipeTrainer``: the seeded length-grouped sampler, small adapter checkpoints, and console output
  as readable log lines instead of printed dicts.
* ``ValidationAccuracy``: at each evaluation, greedy generations for the validation questions, scored;
  their accuracy picks the best checkpoint.
* ``MetricsWriter``: every log to ``metrics.jsonl``; ``LogLines``: every log as one line through logging.
* ``token_rows_merged``: generate without PEFT rebuilding the embedding matrix on every forward.

This module imports transformers at the top; ``memreason.train`` imports it lazily, so ``memreason
--help`` never pays for it.
"""

from __future__ import annotations

import logging
import os
from contextlib import contextmanager
from pathlib import Path

from transformers import Trainer, TrainerCallback
from transformers.trainer_callback import PrinterCallback, ProgressCallback

from memreason.model.tokens import TokenScheme
from memreason.train.data import LengthGroupedSampler
from memreason.traces import MEMORY, REASON, Trace

# The console voice of training: one line per log event (the CLI decides where it goes).
logger = logging.getLogger("memreason.train")


class BarOnlyProgress(ProgressCallback):
    """transformers' progress bar without its ``on_log``, which writes each log as a raw dict
    (``{'loss': '2.478', 'grad_norm': ...}``) between bar updates (``LogLines`` reports logs instead), and
    without the nested validation bar."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        return None

    def on_prediction_step(self, args, state, control, eval_dataloader=None, **kwargs):
        # a second bar under the training bar for the validation loss (usually one batch): its cursor-up
        # escapes garble logs and non-terminal output; the validation lines say what it measured
        return None


class RecipeTrainer(Trainer):
    """``Trainer`` with our seeded length-grouped sampler, small adapter checkpoints and readable logs.

    Overrides: ``_get_train_sampler`` (see ``LengthGroupedSampler``) and ``_save``: PEFT's default
    ``save_embedding_layers="auto"`` writes the whole embedding and head (hundreds of MB) whenever the
    vocabulary grew; trainable-token rows are absolute values, so the adapter alone is enough
    (ecosystem.md §1.3). No ``training_args.bin`` pickle is written for adapter checkpoints either.
    The console callbacks that print log dicts (``PrinterCallback``, ``ProgressCallback.on_log``) are
    replaced by ``BarOnlyProgress`` (when the bar is on) and ``LogLines``.

    Args:
        sampler_seed (int, default 0): seeds the batch order (with the epoch).
        group_by_length (bool, default True): length-grouped batches; False = one example per batch
            position in seeded random order (the official-style baseline in benchmarks/).
        tensorboard_dir (Path | None): where ``report_to: [tensorboard]`` writes its events (transformers'
            default is a dated folder under ``output_dir``, here the checkpoints folder); the
            ``TENSORBOARD_LOGGING_DIR`` environment variable still wins.
    """

    def __init__(self, *args, sampler_seed: int = 0, group_by_length: bool = True,
                 tensorboard_dir: Path | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.sampler_seed, self.group_by_length = sampler_seed, group_by_length
        self.remove_callback(PrinterCallback)
        self.remove_callback(ProgressCallback)
        if not self.args.disable_tqdm:
            self.add_callback(BarOnlyProgress())
        self.add_callback(LogLines())
        if tensorboard_dir is not None:
            from transformers.integrations import TensorBoardCallback

            for callback in self.callback_handler.callbacks:
                # read in on_train_begin; None means "use the default"
                if isinstance(callback, TensorBoardCallback) and callback.logging_dir is None:
                    callback.logging_dir = str(tensorboard_dir)

    def _get_train_sampler(self, train_dataset=None):
        dataset = train_dataset if train_dataset is not None else self.train_dataset
        lengths = [len(row["input_ids"]) for row in dataset.rows]
        batch = self.args.per_device_train_batch_size if self.group_by_length else 1
        return LengthGroupedSampler(lengths, batch, seed=self.sampler_seed)

    def _save(self, output_dir=None, state_dict=None):
        from peft import PeftModel

        output_dir = output_dir if output_dir is not None else self.args.output_dir
        model = self.accelerator.unwrap_model(self.model, keep_torch_compile=False)
        if not isinstance(model, PeftModel):
            return super()._save(output_dir, state_dict)
        if self.args.should_save:
            os.makedirs(output_dir, exist_ok=True)
            model.save_pretrained(output_dir, state_dict=state_dict, save_embedding_layers=False,
                                  safe_serialization=True)
            if self.processing_class is not None:
                self.processing_class.save_pretrained(output_dir)


# ---------------------------------------------------------------------------------------------------------
# Log lines


def _number(value, fmt: str | None = None) -> str:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    if fmt is not None:
        return format(value, fmt)
    if isinstance(value, int):
        return str(value)
    if value != 0 and abs(value) < 1e-2:
        mantissa, exponent = f"{value:.1e}".split("e")
        return f"{mantissa}e{int(exponent)}"  # 1.9e-3, not 1.9e-03
    return f"{value:.4g}"


# log key -> (label, number format or None for _number's default), in display order; keys not listed are
# shown with a label derived from their name
_LABELS = {
    "loss": ("loss", None), "grad_norm": ("grad-norm", ".3g"), "learning_rate": ("lr", None),
    "eval_loss": ("val-loss", None), "eval_val_accuracy": ("val-accuracy", ".3f"),
    "eval_val_answer_rate": ("answer-rate", ".3f"), "eval_val_format_rate": ("format-rate", ".3f"),
    "eval_val_n": ("n", None), "train_loss": ("mean-loss", None), "train_runtime": ("seconds", ".1f"),
}
_HIDDEN = {"epoch", "step", "total_flos", "eval_runtime"}


def format_log(logs: dict, step: int, max_steps: int) -> str:
    """One readable line for one Trainer log event, e.g. ``step 12/24  loss 2.478  lr 1.9e-3  grad-norm 0.84``.

    Throughput counters (``*_per_second``), FLOPs and the evaluation runtime are left out.
    """
    keys = [k for k in _LABELS if k in logs]
    keys += [k for k in logs if k not in _LABELS and k not in _HIDDEN and not k.endswith("_per_second")]
    parts = [f"step {step}/{max_steps}"]
    if "train_runtime" in logs:
        parts.append("done")
    for key in keys:
        label, fmt = _LABELS.get(key) or (key.replace("eval_", "val-").replace("_", "-"), None)
        parts.append(f"{label} {_number(logs[key], fmt)}")
    return "  ".join(parts)


class LogLines(TrainerCallback):
    """Every log event as one line on the ``memreason.train`` logger (main process only)."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero and logs:
            logger.info(format_log(logs, state.global_step, state.max_steps))


class MetricsWriter(TrainerCallback):
    """Appends every log (train loss, learning rate, val loss, val accuracy, ...) to ``metrics.jsonl``."""

    def __init__(self, path: Path):
        self.path = path

    def on_log(self, args, state, control, logs=None, **kwargs):
        from memreason.io import append_jsonl

        if state.is_world_process_zero and logs:
            append_jsonl(self.path, [{"step": state.global_step, "epoch": state.epoch, **logs}])


# ---------------------------------------------------------------------------------------------------------
# Validation accuracy


@contextmanager
def token_rows_merged(model):
    """Write the trained token rows into the (frozen) embedding and head for the duration, then restore them.

    Unmerged, PEFT's ``TrainableTokensLayer`` builds ``base.weight.index_copy(rows)`` (a whole
    ``[vocab, hidden]`` copy) on every forward, twice for a tied head: on a small model that dominates
    each decode step. Merged, the forward reads the matrix directly. This is exact, not approximate: the
    merged matrix holds the same values the unmerged forward builds, and ``unmerge`` writes PEFT's stored
    original rows back, so every base weight is bit-identical afterwards (LoRA is left unmerged for that
    reason: subtracting a merged LoRA product back out is not exact). No second copy of the model is made.
    A model without trainable-token layers is left as it is.
    """
    from peft.tuners.trainable_tokens.layer import TrainableTokensLayer

    merged = []
    try:
        for module in model.modules():
            if isinstance(module, TrainableTokensLayer) and not module.merged and not module.disable_adapters:
                module.merge()
                merged.append(module)
        yield model
    finally:
        for module in reversed(merged):
            module.unmerge()


def format_ok(trace: Trace, scheme: TokenScheme) -> bool:
    """Whether a parsed generation has the shape the scheme trains: steps (unless ``direct``), and for
    schemes that label steps, every step labelled memory or reason."""
    if scheme.style == "direct":
        return True
    if not trace.steps:
        return False
    if scheme.labels_steps:
        return all(step.kind in (MEMORY, REASON) for step in trace.steps)
    return True


class ValidationAccuracy(TrainerCallback):
    """At each evaluation, generate greedy answers for the validation questions and score them.

    Writes ``eval_val_accuracy`` (which picks the best checkpoint), ``eval_val_answer_rate`` (a valid
    answer line) and ``eval_val_format_rate`` (a valid answer line and steps that parse with the kinds
    the scheme writes) into the evaluation metrics *and* logs them: ``Trainer.evaluate`` logs before it
    calls ``on_evaluate``, so editing ``metrics`` alone would never reach the log (ecosystem.md §2.2).
    Generation runs with the token rows merged (``token_rows_merged``; same texts, no per-forward
    matrix rebuild). Under DDP each process generates a share of the questions and the texts are gathered.

    Args:
        items: the validation traces to generate for; prompts: their rendered prompts.
        task: scores the answers; scheme: what a well-formed generation looks like.
        max_new_tokens (int), batch_size (int): generation settings.
        out_path (Path | None): ``val_generations.jsonl``, one scored row per generation.
    """

    def __init__(self, items: list[Trace], prompts: list[str], task, scheme: TokenScheme, *,
                 max_new_tokens: int, batch_size: int, out_path: Path | None):
        self.items, self.prompts, self.task, self.scheme = items, prompts, task, scheme
        self.max_new_tokens, self.batch_size, self.out_path = max_new_tokens, batch_size, out_path
        self.trainer = None  # set after the Trainer exists; used for trainer.log

    def _generate_all(self, model, tokenizer, prompts: list[str]) -> list:
        from memreason.generate import generate_texts

        return generate_texts(model, tokenizer, prompts, max_new_tokens=self.max_new_tokens,
                              batch_size=self.batch_size, stop_at_answer=True)

    def _generate(self, model, tokenizer, args) -> list:
        sharded = self.trainer.is_fsdp_enabled or self.trainer.is_deepspeed_enabled
        if sharded:  # weights are sharded: no in-place merge; every rank runs the same forwards
            return self._generate_all(model, tokenizer, self.prompts)
        with token_rows_merged(model):
            if args.world_size <= 1:
                return self._generate_all(model, tokenizer, self.prompts)
            from accelerate import PartialState
            from accelerate.utils import gather_object

            state = PartialState()
            indices = list(range(len(self.prompts)))
            with state.split_between_processes(indices) as mine:
                texts = self._generate_all(model, tokenizer, [self.prompts[i] for i in mine])
                pairs = list(zip(mine, texts))
            gathered = dict(gather_object(pairs))
            return [gathered[i] for i in indices]

    def on_evaluate(self, args, state, control, model=None, processing_class=None, metrics=None, **kwargs):
        from memreason.io import append_jsonl
        from memreason.model.tokens import parse

        generations = self._generate(model, processing_class, args)
        correct = answered = formatted = 0
        rows = []
        for trace, generation in zip(self.items, generations):
            predicted = self.task.extract(generation.text)
            outcome = self.task.score(generation.text, trace.answer)
            parsed = parse(generation.text, question=trace.question, answer=predicted)
            ok = predicted is not None and format_ok(parsed, self.scheme)
            correct += outcome == "correct"
            answered += predicted is not None
            formatted += ok
            rows.append({"step": state.global_step, "id": trace.id, "gold": trace.answer,
                         "predicted": predicted, "outcome": outcome, "format_ok": ok,
                         "n_tokens": generation.n_tokens, "stopped": generation.stopped,
                         "text": generation.text})
        n = max(1, len(self.items))
        values = {"eval_val_accuracy": correct / n, "eval_val_answer_rate": answered / n,
                  "eval_val_format_rate": formatted / n, "eval_val_n": len(self.items)}
        if metrics is not None:
            metrics.update(values)
        if state.is_world_process_zero and self.out_path is not None:
            append_jsonl(self.out_path, rows)
        self.trainer.log(values)
