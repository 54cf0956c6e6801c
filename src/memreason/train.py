"""The fine-tuning recipe: train a causal LM to write memory/reason-labelled steps (Jin et al., ACL 2025).

Read it top to bottom, like a torchtune recipe:

1. ``TrainRecipe.setup`` loads the training split, carves a seeded validation split from it (checkpoints
   are chosen there, never on test), adds the control tokens to model and tokenizer, tokenises every example
   and wraps the model for the chosen mode (PEFT LoRA and/or trainable token rows, or full fine-tuning).
2. ``TrainRecipe.train`` runs ``transformers.Trainer`` with our collator and a length-grouped sampler; at
   every evaluation a callback generates greedy answers for the validation questions and reports their
   accuracy, which picks the best checkpoint.
3. ``TrainRecipe.finish`` copies the best and the last adapter out of the checkpoints, draws the curves and
   marks the run complete.

``main(cfg)`` wires these together. The recipe runs unchanged under ``accelerate launch`` / ``torchrun``.

Fixes over the original code (spec disentangle.md §4–5, §10): the loss covers exactly the target tokens
(every marker, step, the answer line and EOS, and no prompt token: B7's off-by-one is gone); prompt and
target are tokenised separately and their ids concatenated (no merge across the boundary); EOS is part of
the target before the length check, and an over-long example is dropped and counted instead of being
truncated into one that ends without its answer; padding uses the tokenizer's pad token, never id 0 (B6);
new tokens get ids from ``len(tokenizer)`` (B1, padded vocabularies); the new rows are trained through PEFT
(``trainable_token_indices``) and saved as a few kilobytes of safetensors, not pickled modules; warmup
must end before training does (B11); validation-split selection with greedy, batched generation (§10.2).

Run directory (``cfg.output_dir``)::

    run.json              what load_run needs: base model, task, prompt style, scheme, mode, token ids, best step
    config.yaml           the resolved TrainConfig
    scheme.json           the TokenScheme
    tokenizer/            the tokenizer with the added tokens
    best/  last/          adapter (safetensors) of the best (by validation accuracy) and the final checkpoint
    checkpoints/          Trainer checkpoints for --resume (optimizer/scheduler/RNG state inside, see below)
    metrics.jsonl         every logged value (train loss, val loss, val accuracy, ...), one JSON object a line
    val_generations.jsonl the validation generations of every evaluation, scored
    curves.png            training loss, validation loss and validation accuracy against steps

Trainer checkpoints hold the optimizer, scheduler and RNG states that transformers writes with
``torch.save``; they exist only under ``checkpoints/`` for resuming and transformers reads them back with
``torch.load(weights_only=True)``. Everything a trained run is used through (``best/``, ``last/``,
tokenizer, JSON, YAML) is safetensors or text.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import shutil
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Sequence

from memreason.config import (LORA_TARGETS, TrainConfig, build_config, config_to_dict, load_config,
                              save_config)
from memreason.errors import ConfigError, DataError
from memreason.model.tokens import TokenScheme, format_target
from memreason.traces import MEMORY, REASON, Step, Trace

__all__ = ["TrainConfig", "TrainRecipe", "build_config", "load_config", "main", "prepare_example",
           "split_validation", "allocate_markers_randomly"]

logger = logging.getLogger(__name__)

RUN_FORMAT = "memreason-run/1"
IGNORE_INDEX = -100  # label value the causal-LM loss skips
# Files of a checkpoint that make up the trained weights (the rest is optimizer/scheduler/RNG state).
WEIGHT_FILES = ("adapter_model.safetensors", "adapter_config.json", "model.safetensors",
                "model.safetensors.index.json", "config.json", "generation_config.json")


# ---------------------------------------------------------------------------------------------------------
# Data: split, ablations, tokenisation


def split_validation(traces: Sequence[Trace], *, fraction: float, size: int | None, seed: int
                     ) -> tuple[list[Trace], list[Trace]]:
    """Carve a seeded validation split out of the training pool.

    Args:
        traces: the training pool, in file order.
        fraction (float): share held out when ``size`` is None (at least one example).
        size (int | None): exact number held out.
        seed (int): the split depends only on this and the pool.

    Returns:
        (train, val), each in file order.

    Raises:
        DataError: the pool is too small to leave both parts non-empty.
    """
    n_val = size if size is not None else max(1, round(len(traces) * fraction))
    if n_val >= len(traces):
        raise DataError(f"the training pool has {len(traces)} examples; cannot hold out {n_val} for validation "
                        "and still train (lower data.val_fraction / data.val_size)")
    order = list(range(len(traces)))
    random.Random(seed).shuffle(order)
    held = set(order[:n_val])
    return ([t for i, t in enumerate(traces) if i not in held], [t for i, t in enumerate(traces) if i in held])


def allocate_markers_randomly(traces: Sequence[Trace], seed: int) -> list[Trace]:
    """The paper's Table 2 control: shuffle the memory/reason kinds across all steps of all traces.

    The number of memory and reason steps stays the same and every step keeps its text; only which step
    carries which marker is random (seeded).
    """
    kinds = [step.kind for trace in traces for step in trace.steps]
    random.Random(seed).shuffle(kinds)
    out, k = [], 0
    for trace in traces:
        steps = []
        for step in trace.steps:
            steps.append(Step(kinds[k], step.text))
            k += 1
        out.append(replace(trace, steps=tuple(steps), meta=dict(trace.meta)))
    return out


def encode(tokenizer, text: str) -> list[int]:
    """Token ids of ``text`` with no special tokens added: the way ``memreason.generate`` encodes prompts,
    so training and generation see the same prompt ids."""
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def prepare_example(tokenizer, prompt: str, target: str, max_length: int, eos: bool = True) -> dict | None:
    """Token ids and labels for one example, or None when it does not fit in ``max_length``.

    Prompt and target are tokenised separately and the ids concatenated, so no token straddles the
    boundary; EOS ends the target before the length check (``eos=False``: plain text, see
    ``data.objective``). Labels are ``-100`` on every prompt token and
    equal to the ids on every target token (the model shifts them: position ``len(prompt) - 1`` predicts
    the first target token).

    Returns:
        ``{"input_ids": [...], "labels": [...], "n_prompt": int}`` or None.
    """
    prompt_ids = encode(tokenizer, prompt)
    target_ids = encode(tokenizer, target) + ([tokenizer.eos_token_id] if eos else [])
    if len(prompt_ids) + len(target_ids) > max_length:
        return None
    return {"input_ids": prompt_ids + target_ids,
            "labels": [IGNORE_INDEX] * len(prompt_ids) + target_ids,
            "n_prompt": len(prompt_ids)}


class ListDataset:
    """A map-style dataset over a list of example dicts (what ``Trainer`` needs)."""

    def __init__(self, rows: list[dict]):
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict:
        return self.rows[index]


class PadCollator:
    """Right-pads a list of examples into ``input_ids`` / ``attention_mask`` / ``labels`` tensors.

    Args:
        pad_id (int): the tokenizer's pad token (never a hard-coded 0: in Llama-3 that is ``!``, B6).
        pad_to (int | None): pad every batch to this length instead of its longest row (only the
            official-style baseline in benchmarks/ uses this).
        multiple_of (int | None): round the padded length up (tensor-core friendly on GPUs).
    """

    def __init__(self, pad_id: int, pad_to: int | None = None, multiple_of: int | None = None):
        self.pad_id, self.pad_to, self.multiple_of = pad_id, pad_to, multiple_of

    def __call__(self, rows: list[dict]) -> dict:
        import torch

        width = self.pad_to or max(len(r["input_ids"]) for r in rows)
        if self.multiple_of:
            width = math.ceil(width / self.multiple_of) * self.multiple_of
        input_ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)  # [batch, seq]
        labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)   # [batch, seq]
        attention = torch.zeros((len(rows), width), dtype=torch.long)              # [batch, seq]
        for i, row in enumerate(rows):
            n = len(row["input_ids"])
            input_ids[i, :n] = torch.tensor(row["input_ids"])
            labels[i, :n] = torch.tensor(row["labels"])
            attention[i, :n] = 1
        return {"input_ids": input_ids, "attention_mask": attention, "labels": labels}


class LengthGroupedSampler:
    """Indices in batches of similar length, in an order that depends only on ``(seed, epoch)``.

    Each epoch: a seeded permutation, cut into groups of ``group_batches`` batches; each group is sorted by
    length and cut into batches; the batches are shuffled (a short final batch stays last so that batch
    boundaries never shift). Compared with one example per step padded to the maximum length (the
    original), this removes most padding and lets a batch share one forward pass.

    transformers' own ``LengthGroupedSampler`` draws from the global RNG, so a run resumed mid-epoch would
    see a different order than an uninterrupted one; this one is a pure function of seed and epoch
    (``Trainer`` calls ``set_epoch``), which makes resumed runs end at the same weights.
    """

    def __init__(self, lengths: Sequence[int], batch_size: int, seed: int, group_batches: int = 8):
        self.lengths, self.batch_size, self.seed = list(lengths), batch_size, seed
        self.group = batch_size * group_batches
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.lengths)

    def batches(self) -> list[list[int]]:
        import torch

        generator = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        order = torch.randperm(len(self.lengths), generator=generator).tolist()
        batches = []
        for start in range(0, len(order), self.group):
            group = sorted(order[start:start + self.group], key=lambda i: -self.lengths[i])
            batches += [group[k:k + self.batch_size] for k in range(0, len(group), self.batch_size)]
        tail = [batches.pop()] if batches and len(batches[-1]) < self.batch_size else []
        shuffled = [batches[i] for i in torch.randperm(len(batches), generator=generator).tolist()]
        return shuffled + tail

    def __iter__(self):
        for batch in self.batches():
            yield from batch


# ---------------------------------------------------------------------------------------------------------
# Model: which parameters train


def _module_name(model, module) -> str:
    return next(name for name, m in model.named_modules() if m is module)


def _is_tied(model) -> bool:
    output = model.get_output_embeddings()
    return output is None or output.weight is model.get_input_embeddings().weight


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
    """
    from peft import LoraConfig, TrainableTokensConfig, get_peft_model

    if mode == "full":
        for parameter in model.parameters():
            parameter.requires_grad_(True)
        return model
    tied = _is_tied(model)
    embed = _module_name(model, model.get_input_embeddings())
    head = None if tied else _module_name(model, model.get_output_embeddings())
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
    import torch

    # Trainable weights live in fp32 even on a half-precision base (autocast does the half-precision math);
    # fp16 gradient scaling refuses half-precision gradients.
    for parameter in peft_model.parameters():
        if parameter.requires_grad and parameter.dtype in (torch.float16, torch.bfloat16):
            parameter.data = parameter.data.float()
    return peft_model


# ---------------------------------------------------------------------------------------------------------
# Callbacks: validation accuracy, metrics file


def trainer_classes():
    """transformers' Trainer classes, imported lazily (``memreason --help`` must not import torch)."""
    from transformers import Trainer, TrainerCallback

    class RecipeTrainer(Trainer):
        """``Trainer`` with our seeded length-grouped sampler and small adapter checkpoints.

        Two overrides only. ``_get_train_sampler``: see ``LengthGroupedSampler``. ``_save``: PEFT's default
        ``save_embedding_layers="auto"`` writes the whole embedding and head (hundreds of MB) whenever the
        vocabulary grew; trainable-token rows are absolute values, so the adapter alone is enough
        (ecosystem.md §1.3). No ``training_args.bin`` pickle is written for adapter checkpoints either.
        """

        def __init__(self, *args, sampler_seed: int = 0, group_by_length: bool = True, **kwargs):
            super().__init__(*args, **kwargs)
            self.sampler_seed, self.group_by_length = sampler_seed, group_by_length

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

    class ValidationAccuracy(TrainerCallback):
        """At each evaluation, generate greedy answers for the validation questions and score them.

        Writes ``eval_val_accuracy`` (which picks the best checkpoint), ``eval_val_answer_rate`` (a valid
        answer line) and ``eval_val_format_rate`` (a valid answer line and steps that parse with the kinds
        the scheme writes) into the evaluation metrics *and* logs them: ``Trainer.evaluate`` logs before it
        calls ``on_evaluate``, so editing ``metrics`` alone would never reach the log (ecosystem.md §2.2).
        Under DDP each process generates a share of the questions and the texts are gathered.
        """

        def __init__(self, items: list[Trace], prompts: list[str], task, scheme: TokenScheme, *,
                     max_new_tokens: int, batch_size: int, out_path: Path | None):
            self.items, self.prompts, self.task, self.scheme = items, prompts, task, scheme
            self.max_new_tokens, self.batch_size, self.out_path = max_new_tokens, batch_size, out_path
            self.trainer = None  # set after the Trainer exists; used for trainer.log

        def _generate(self, model, tokenizer, args) -> list:
            from memreason.generate import generate_texts

            if args.world_size <= 1 or self.trainer.is_fsdp_enabled:
                # FSDP: every rank must run the same forward passes, so every rank generates everything.
                return generate_texts(model, tokenizer, self.prompts, max_new_tokens=self.max_new_tokens,
                                      batch_size=self.batch_size, stop_at_answer=True)
            from accelerate import PartialState
            from accelerate.utils import gather_object

            state = PartialState()
            indices = list(range(len(self.prompts)))
            with state.split_between_processes(indices) as mine:
                texts = generate_texts(model, tokenizer, [self.prompts[i] for i in mine],
                                       max_new_tokens=self.max_new_tokens, batch_size=self.batch_size,
                                       stop_at_answer=True)
                pairs = list(zip(mine, texts))
            gathered = dict(gather_object(pairs))
            return [gathered[i] for i in indices]

        def on_evaluate(self, args, state, control, model=None, processing_class=None, metrics=None, **kwargs):
            from memreason.model.tokens import parse

            generations = self._generate(model, processing_class, args)
            correct = answered = formatted = 0
            rows = []
            for trace, generation in zip(self.items, generations):
                predicted = self.task.extract(generation.text)
                outcome = self.task.score(generation.text, trace.answer)
                parsed = parse(generation.text, question=trace.question, answer=predicted)
                ok = predicted is not None and _format_ok(parsed, self.scheme)
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
                with open(self.out_path, "a", encoding="utf-8") as handle:
                    for row in rows:
                        handle.write(json.dumps(row, ensure_ascii=False) + "\n")
            self.trainer.log(values)

    class MetricsWriter(TrainerCallback):
        """Appends every log (train loss, learning rate, val loss, val accuracy, ...) to ``metrics.jsonl``."""

        def __init__(self, path: Path):
            self.path = path

        def on_log(self, args, state, control, logs=None, **kwargs):
            if state.is_world_process_zero and logs:
                row = {"step": state.global_step, "epoch": state.epoch, **logs}
                with open(self.path, "a", encoding="utf-8") as handle:
                    handle.write(json.dumps(row) + "\n")

    return RecipeTrainer, ValidationAccuracy, MetricsWriter


def _format_ok(trace: Trace, scheme: TokenScheme) -> bool:
    """Whether a parsed generation has the shape the scheme trains: steps (unless ``direct``), and for
    schemes that label steps, every step labelled memory or reason."""
    if scheme.style == "direct":
        return True
    if not trace.steps:
        return False
    if scheme.labels_steps:
        return all(step.kind in (MEMORY, REASON) for step in trace.steps)
    return True


# ---------------------------------------------------------------------------------------------------------
# The recipe


def _write_json(path: Path, data: Any) -> None:
    """Write JSON atomically (a crash never leaves half a file)."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def _truncate_jsonl(path: Path, max_step: int) -> None:
    """Drop rows logged after ``max_step`` (a resumed run logs those steps again)."""
    if not path.is_file():
        return
    keep = [line for line in path.read_text(encoding="utf-8").splitlines()
            if line.strip() and json.loads(line).get("step", 0) <= max_step]
    path.write_text("".join(line + "\n" for line in keep), encoding="utf-8")


def _versions() -> dict:
    import peft
    import torch
    import transformers

    from memreason import __version__ as memreason_version

    return {"memreason": memreason_version, "torch": torch.__version__, "transformers": transformers.__version__,
            "peft": peft.__version__}


def _latest_checkpoint(directory: Path) -> Path | None:
    checkpoints = [p for p in directory.glob("checkpoint-*") if p.name.split("-")[-1].isdigit()
                   and (p / "trainer_state.json").is_file()]
    return max(checkpoints, key=lambda p: int(p.name.split("-")[-1])) if checkpoints else None


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
        self.info: dict = {}

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
        from memreason.model.loading import DEFAULT_MODEL
        from memreason.model.tokens import add_scheme_tokens
        from memreason.prompts import render_prompt, resolve_style
        from memreason.tasks import get_task

        cfg = self.cfg
        self.args = self._training_arguments()  # also starts the distributed state under torchrun/accelerate
        self.resume_from = self._check_run_dir(resume)
        PartialState().wait_for_everyone()  # every process checks the directory before the first one writes
        task_name = cfg.data.task or cfg.data.source.split(":", 1)[1]
        self.task = get_task(task_name)

        train_traces, val_traces = self._load_traces()

        set_seed(cfg.seed)
        train_dtype, amp = self._precision()
        # each process loads onto its own device (cuda:<local rank> under torchrun), never all onto one
        model, tokenizer = load(cfg.model.name_or_path, dtype=train_dtype, device=str(self.args.device))
        prompt_style = resolve_style(cfg.prompt_style, tokenizer)
        token_ids = add_scheme_tokens(model, tokenizer, cfg.scheme)

        text_objective = cfg.data.objective == "text"

        def rows_for(traces):
            rows, dropped = [], 0
            for trace in traces:
                if text_objective:
                    # plain text: no prompt, every token a target, and no EOS (a model taught to stop after
                    # every sentence stops before it answers: measured on the synthetic world)
                    row = prepare_example(tokenizer, "", trace.question, cfg.data.max_length, eos=False)
                else:
                    prompt = render_prompt(trace.question, self.task, tokenizer, prompt_style)
                    row = prepare_example(tokenizer, prompt, format_target(trace, cfg.scheme), cfg.data.max_length)
                if row is None:
                    dropped += 1
                else:
                    rows.append(row)
            return rows, dropped

        train_rows, dropped_train = rows_for(train_traces)
        val_rows, dropped_val = rows_for(val_traces)
        if dropped_train or dropped_val:
            logger.warning("dropped %d training and %d validation examples longer than data.max_length=%d tokens "
                           "(never truncated: that would cut the answer off)", dropped_train, dropped_val,
                           cfg.data.max_length)
        if not train_rows:
            raise DataError(f"every training example is longer than data.max_length={cfg.data.max_length} tokens",
                            file=cfg.data.source)
        self._check_schedule(len(train_rows))
        # the text objective has no answers to generate: validation is the loss alone
        val_items = [] if text_objective else val_traces[:cfg.eval.val_limit] if cfg.eval.val_limit else val_traces
        val_prompts = [render_prompt(t.question, self.task, tokenizer, prompt_style) for t in val_items]

        set_seed(cfg.seed)  # LoRA's random A matrices start from the same state whatever loading consumed
        model = wrap_model(model, cfg.mode, token_ids, cfg.lora.r, cfg.lora.alpha, cfg.lora.dropout, cfg.lora.target)
        model.config.use_cache = False  # no KV cache during training forwards (generation turns it on per call)

        RecipeTrainer, ValidationAccuracy, MetricsWriter = trainer_classes()
        self.val_callback = ValidationAccuracy(val_items, val_prompts, self.task, cfg.scheme,
                                               max_new_tokens=cfg.eval.max_new_tokens,
                                               batch_size=cfg.eval.batch_size,
                                               out_path=self.run_dir / "val_generations.jsonl")
        multiple_of = 8 if self.args.device.type == "cuda" else None
        self.trainer = RecipeTrainer(
            model=model, args=self.args, train_dataset=ListDataset(train_rows), eval_dataset=ListDataset(val_rows),
            data_collator=PadCollator(tokenizer.pad_token_id, multiple_of=multiple_of), processing_class=tokenizer,
            callbacks=([] if text_objective else [self.val_callback]) + [MetricsWriter(self.run_dir / "metrics.jsonl")],
            sampler_seed=cfg.seed)
        self.val_callback.trainer = self.trainer
        self.tokenizer, self.token_ids = tokenizer, token_ids

        base_model = cfg.model.name_or_path or DEFAULT_MODEL
        if Path(base_model).expanduser().exists():
            base_model = str(Path(base_model).expanduser().resolve())
        self.info = {
            "format": RUN_FORMAT, "status": "training", "base_model": base_model, "task": self.task.name,
            "task_version": self.task.version, "prompt_style": prompt_style, "scheme": cfg.scheme.to_dict(),
            "mode": cfg.mode, "tokens": cfg.scheme.tokens(), "token_ids": list(token_ids),
            "vocab_size": len(tokenizer), "seed": cfg.seed, "dtype": str(train_dtype).replace("torch.", ""),
            "amp": amp, "world_size": self.args.world_size,
            "data": {"source": cfg.data.source, "n_train": len(train_rows), "n_val": len(val_rows),
                     "n_val_generated": len(val_items), "dropped_too_long": {"train": dropped_train, "val": dropped_val},
                     "val_ids": [t.id for t in val_traces], "marker_allocation": cfg.data.marker_allocation},
            "trainable_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad),
            "versions": _versions(), "best": None, "last": None,
        }
        if self.args.should_save:
            self._write_run_files()
        logger.info("training %s in mode %s on %d examples (validation %d, %d generated); %d trainable parameters",
                    base_model, cfg.mode, len(train_rows), len(val_rows), len(val_items),
                    self.info["trainable_parameters"])

    def _check_run_dir(self, resume: bool) -> Path | None:
        """Decide between a fresh run and a resumed one; refuse to mix two different runs in one directory."""
        run_json = self.run_dir / "run.json"
        latest = _latest_checkpoint(self.run_dir / "checkpoints")
        saved_config = self.run_dir / "config.yaml"
        if not resume:
            if run_json.is_file() or latest is not None:
                raise ConfigError(f"{self.run_dir} already holds a run; pass --resume to continue it, or choose "
                                  "another output_dir")
            return None
        if saved_config.is_file():
            previous = config_to_dict(load_config(saved_config))
            current = config_to_dict(self.cfg)
            changed = _diff(previous, current)
            if changed:
                raise ConfigError(f"cannot resume {self.run_dir}: the config differs from the saved one in "
                                  f"{', '.join(changed)}; resume with the same recipe or choose another output_dir")
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

    def _training_arguments(self):
        import torch
        from transformers import TrainingArguments

        from memreason.model.loading import resolve_device, resolve_dtype

        cfg, o, e = self.cfg, self.cfg.optim, self.cfg.eval
        distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
        device = "cuda" if distributed and torch.cuda.is_available() else resolve_device(cfg.model.device)
        dtype = resolve_dtype(cfg.model.dtype, device)
        strategy = "steps" if e.every_steps else "epoch"
        warmup = int(o.warmup_steps) if o.warmup_steps >= 1 else o.warmup_steps
        return TrainingArguments(
            output_dir=str(self.run_dir / "checkpoints"),
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
            disable_tqdm=not self.progress, report_to="none", remove_unused_columns=False,
            dataloader_pin_memory=device.startswith("cuda"), prediction_loss_only=True,
            ddp_find_unused_parameters=False,
        )

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
        self.run_dir.mkdir(parents=True, exist_ok=True)
        save_config(self.cfg, self.run_dir / "config.yaml")
        _write_json(self.run_dir / "scheme.json", self.cfg.scheme.to_dict())
        self.tokenizer.save_pretrained(self.run_dir / "tokenizer")
        if self.resume_from is not None:
            step = json.loads((self.resume_from / "trainer_state.json").read_text())["global_step"]
            _truncate_jsonl(self.run_dir / "metrics.jsonl", step)
            _truncate_jsonl(self.run_dir / "val_generations.jsonl", step)
        else:  # a fresh start: drop logs left by a run that died before its first checkpoint
            for name in ("metrics.jsonl", "val_generations.jsonl"):
                (self.run_dir / name).unlink(missing_ok=True)
        _write_json(self.run_dir / "run.json", self.info)

    # -- train ------------------------------------------------------------------------------------------

    def train(self, callbacks: Sequence = ()) -> Path:
        """Train (resuming when ``setup`` found a checkpoint), then ``finish``. Returns the run directory."""
        for callback in callbacks:
            self.trainer.add_callback(callback)
        start = time.perf_counter()
        self.trainer.train(resume_from_checkpoint=str(self.resume_from) if self.resume_from else None)
        self.info["train_seconds"] = round(time.perf_counter() - start, 1)
        return self.finish()

    def finish(self) -> Path:
        """Copy the best and last checkpoints' weights to ``best/`` and ``last/``, draw the curves, and mark
        the run complete (main process only)."""
        state = self.trainer.state
        if not self.trainer.args.should_save:
            return self.run_dir
        last = _latest_checkpoint(self.run_dir / "checkpoints")
        best = Path(state.best_model_checkpoint) if state.best_model_checkpoint else last
        for name, checkpoint in (("best", best), ("last", last)):
            target = self.run_dir / name
            shutil.rmtree(target, ignore_errors=True)
            target.mkdir(parents=True)
            for file in WEIGHT_FILES:
                if (checkpoint / file).is_file():
                    shutil.copy2(checkpoint / file, target / file)
            step = int(checkpoint.name.split("-")[-1])
            entry = {"checkpoint": checkpoint.name, "step": step,
                     **_eval_metrics_at(state.log_history, step)}
            _write_json(target / "checkpoint.json", entry)
            self.info[name] = entry
        self.info["status"] = "complete"
        self.info["global_step"] = state.global_step
        _write_json(self.run_dir / "run.json", self.info)
        try:
            plot_curves(self.run_dir / "metrics.jsonl", self.run_dir / "curves.png")
        except Exception as exc:  # a plotting problem must never lose a finished run
            logger.warning("could not draw curves.png: %s", exc)
        logger.info("run complete: %s (best %s, val accuracy %s)", self.run_dir, self.info["best"]["checkpoint"],
                    self.info["best"].get("val_accuracy"))
        return self.run_dir


def _eval_metrics_at(log_history: list[dict], step: int) -> dict:
    """The validation metrics logged at ``step`` (accuracy, answer/format rates, loss)."""
    out = {}
    for entry in log_history:
        if entry.get("step") == step:
            for key in ("eval_val_accuracy", "eval_val_answer_rate", "eval_val_format_rate", "eval_loss"):
                if key in entry:
                    out["val_loss" if key == "eval_loss" else key.replace("eval_", "")] = entry[key]
    return out


def _diff(a: dict, b: dict, prefix: str = "") -> list[str]:
    keys = []
    for key in sorted(set(a) | set(b)):
        if isinstance(a.get(key), dict) and isinstance(b.get(key), dict):
            keys += _diff(a[key], b[key], f"{prefix}{key}.")
        elif a.get(key) != b.get(key):
            keys.append(f"{prefix}{key}")
    return keys


def plot_curves(metrics_path: Path, png_path: Path) -> None:
    """Training loss, validation loss and validation accuracy against optimiser steps, from ``metrics.jsonl``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in Path(metrics_path).read_text(encoding="utf-8").splitlines() if line.strip()]
    train = [(r["step"], r["loss"]) for r in rows if "loss" in r]
    val_loss = [(r["step"], r["eval_loss"]) for r in rows if "eval_loss" in r]
    val_acc = [(r["step"], r["eval_val_accuracy"]) for r in rows if "eval_val_accuracy" in r]
    val_fmt = [(r["step"], r["eval_val_format_rate"]) for r in rows if "eval_val_format_rate" in r]
    fig, loss_axis = plt.subplots(figsize=(7, 4))
    if train:
        loss_axis.plot(*zip(*train), label="train loss", color="tab:blue")
    if val_loss:
        loss_axis.plot(*zip(*val_loss), "o-", label="val loss", color="tab:orange")
    loss_axis.set_xlabel("optimiser step")
    loss_axis.set_ylabel("loss (target tokens)")
    acc_axis = loss_axis.twinx()
    if val_acc:
        acc_axis.plot(*zip(*val_acc), "s-", label="val accuracy", color="tab:green")
    if val_fmt:
        acc_axis.plot(*zip(*val_fmt), "^:", label="val format rate", color="tab:gray")
    acc_axis.set_ylim(0, 1.02)
    acc_axis.set_ylabel("validation (greedy generations)")
    handles = loss_axis.get_legend_handles_labels()[0] + acc_axis.get_legend_handles_labels()[0]
    labels = loss_axis.get_legend_handles_labels()[1] + acc_axis.get_legend_handles_labels()[1]
    loss_axis.legend(handles, labels, loc="center right", fontsize=8)
    fig.tight_layout()
    fig.savefig(png_path, dpi=120)
    plt.close(fig)


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
    run_json = Path(cfg.output_dir) / "run.json"
    if resume and run_json.is_file() and json.loads(run_json.read_text()).get("status") == "complete":
        TrainRecipe(cfg)._check_run_dir(resume=True)  # a different config is still an error
        logger.info("%s is already complete; nothing to do", cfg.output_dir)
        return Path(cfg.output_dir)
    recipe = TrainRecipe(cfg, progress=progress)
    recipe.setup(resume=resume)
    return recipe.train()
