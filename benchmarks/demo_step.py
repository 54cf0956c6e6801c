"""One optimiser step of the demo recipe on any causal LM, for the benchmarks that time or profile it.

``DemoStep(model, tokenizer)`` builds what ``memreason train --config configs/demo.yaml`` trains on, from the
recipe's own pieces: the demo config (``memreason.experiments.demo.demo_recipe``), its training split minus
the seeded validation questions, the paper's target format, ``wrap_model`` (LoRA r16 on the MLP + the new
token rows through PEFT), the recipe's ``TrainingArguments`` and ``RecipeTrainer`` (length-grouped batches of
4, AdamW, cosine schedule). ``step()`` runs one optimiser step on the next batch of the epoch, as the
Trainer's loop does it (forward + loss, backward, gradient clipping, optimiser and scheduler step), with
``torch.profiler.record_function`` ranges ``demo.data`` / ``demo.forward`` / ``demo.backward`` /
``demo.optimizer`` so a profile can be split into those parts. It is the recipe's step without the
Trainer's bookkeeping (logging, callbacks, checkpoints, validation), which ``profile_train_step.py``
would otherwise have to subtract.

The model is passed in rather than loaded by path, so the same step runs on SmolLM2, on a tiny random
model (``--quick``) and on an 8B-shaped random Llama built straight on a GPU (``gpu.py``). On a bf16 base
the forward runs under ``torch.autocast`` (the Trainer does the same through accelerate); the trainable
weights are fp32 either way (``wrap_model``).

``tiny_smollm2_dir(path)`` writes a SmolLM2-shaped model with 2 narrow layers and the real SmolLM2
tokenizer: the ``--quick`` modes use it so the real code paths run in seconds.
"""

from __future__ import annotations

import os
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Sequence


def machine_line(device: str = "cpu") -> str:
    """One line saying what the figures ran on: cores, torch threads, load average, device."""
    import torch

    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    where = torch.cuda.get_device_name(0) if device.startswith("cuda") else "CPU"
    return (f"machine: {where}, {os.cpu_count()} cores, torch {torch.__version__} with "
            f"{torch.get_num_threads()} threads, load average {load:.1f} at start")


def sync(device) -> None:
    """Wait for queued GPU work, so a timer reads the work and not its launch."""
    import torch

    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def tiny_smollm2_dir(path: str | Path, *, layers: int = 2, hidden: int = 64) -> Path:
    """Write a random SmolLM2-shaped model (real tokenizer and vocabulary, ``layers`` layers of width
    ``hidden``) to ``path`` and return it; seeded, so every call writes the same weights."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

    from memreason.model.loading import resolve_checkpoint

    path = Path(path)
    if (path / "config.json").is_file():
        return path
    source = resolve_checkpoint(None)  # the cached plain copy of the embedded SmolLM2
    tokenizer = AutoTokenizer.from_pretrained(source)
    real = LlamaConfig.from_pretrained(source)
    config = LlamaConfig(vocab_size=real.vocab_size, hidden_size=hidden, intermediate_size=2 * hidden,
                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=2048, tie_word_embeddings=True, bos_token_id=real.bos_token_id,
                         eos_token_id=real.eos_token_id, pad_token_id=real.pad_token_id)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.generation_config.eos_token_id = real.eos_token_id
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


class DemoStep:
    """The demo recipe's training data, PEFT wrapping, optimiser and step, on the given model.

    Args:
        model: a causal LM (fp32, or bf16 on a GPU); it is wrapped in place by PEFT.
        tokenizer: its tokenizer; the scheme's control tokens are added to it.
        run_dir (str | Path): where the Trainer may write (nothing is saved by ``step``).
        overrides (Sequence[str]): dotted ``key=value`` overrides of the demo recipe (e.g. ``mode=full``).
        examples (int | None): keep only the first N training examples (``--quick``).
        amp: the autocast dtype (default: the model's own when it is bf16/fp16, else none); give
            ``torch.bfloat16`` for an fp32 model trained with bf16 autocast (``mode=full`` on a GPU keeps fp32
            master weights, as the recipe does).
        sparse_tokens (bool, default True): the recipe's exact sparse forward for the token rows; False keeps
            PEFT's per-forward rebuild of the whole matrix (what ``profile_train_step.py`` dissects).

    Attributes:
        cfg: the resolved demo ``TrainConfig``; model: the PEFT-wrapped model; trainer: the RecipeTrainer;
        rows: the tokenised training examples; mode, batch_size: from the recipe.
    """

    def __init__(self, model, tokenizer, *, run_dir: str | Path, overrides: Sequence[str] = (),
                 examples: int | None = None, amp=None, sparse_tokens: bool = True):
        import torch

        from memreason.data import load_traces
        from memreason.experiments.demo import demo_recipe
        from memreason.model.tokens import add_scheme_tokens, format_target
        from memreason.prompts import render_prompt
        from memreason.tasks import get_task
        from memreason.train import (ListDataset, PadCollator, RecipeTrainer, load_config, prepare_example,
                                     split_validation, wrap_model)
        from memreason.train.arguments import training_arguments

        device = str(next(model.parameters()).device)
        overrides = [f"output_dir={run_dir}", f"model.device={'cuda' if device.startswith('cuda') else 'cpu'}",
                     *overrides]
        self.cfg = cfg = load_config(demo_recipe(), overrides)
        task = get_task(cfg.data.task or cfg.data.source.split(":", 1)[1])
        pool, _ = load_traces(cfg.data.source, task=task, split=cfg.data.train_split)
        train, val = split_validation(pool, fraction=cfg.data.val_fraction, size=cfg.data.val_size,
                                      seed=cfg.data.seed)
        token_ids = add_scheme_tokens(model, tokenizer, cfg.scheme)

        def tokenised(traces):
            rows = [prepare_example(tokenizer, render_prompt(t.question, task, tokenizer, cfg.prompt_style),
                                    format_target(t, cfg.scheme), cfg.data.max_length) for t in traces]
            return [r for r in rows if r is not None]

        self.rows = tokenised(train)[:examples]
        val_rows = tokenised(val)  # the Trainer wants an eval set with step-wise evaluation; never run here
        self.token_ids = token_ids
        self.mode, self.batch_size = cfg.mode, cfg.optim.batch_size
        weights = next(model.parameters()).dtype
        self.amp_dtype = amp or (weights if weights in (torch.bfloat16, torch.float16) else None)
        self.amp = self.amp_dtype is not None
        self.device = device
        torch.manual_seed(cfg.seed)
        self.model = wrap_model(model, cfg.mode, token_ids, cfg.lora.r, cfg.lora.alpha, cfg.lora.dropout,
                                cfg.lora.target)
        if sparse_tokens:  # as the recipe trains (memreason.train.sparse_tokens); False = PEFT's own rebuild
            from memreason.train.sparse_tokens import sparse_token_rows

            sparse_token_rows(self.model)
        self.model.config.use_cache = False
        args = training_arguments(cfg, Path(run_dir), progress=False)
        self.trainer = RecipeTrainer(
            model=self.model, args=args, train_dataset=ListDataset(self.rows), eval_dataset=ListDataset(val_rows),
            data_collator=PadCollator(tokenizer.pad_token_id, multiple_of=8 if device.startswith("cuda") else None),
            processing_class=tokenizer, sampler_seed=cfg.seed)
        steps = max(1, len(self.rows) // self.batch_size)
        self.trainer.create_optimizer_and_scheduler(num_training_steps=steps)
        self._batches = None
        self.last_batch = None

    def batches(self):
        """The epoch's collated batches, in the recipe's (seeded, length-grouped) order, endlessly."""
        while True:
            yield from self.trainer.get_train_dataloader()

    def step(self) -> float:
        """One optimiser step on the next batch; returns its loss. ``self.last_batch`` holds the batch."""
        import torch
        from torch.profiler import record_function

        if self._batches is None:
            self._batches = self.batches()
        trainer, model = self.trainer, self.model
        model.train()
        with record_function("demo.data"):
            batch = trainer._prepare_inputs(next(self._batches))
        self.last_batch = batch
        autocast = torch.autocast(self.device.split(":")[0], dtype=self.amp_dtype) if self.amp else nullcontext()
        with record_function("demo.forward"), autocast:
            loss = trainer.compute_loss(model, batch)
        with record_function("demo.backward"):
            loss.backward()
        with record_function("demo.optimizer"):
            if trainer.args.max_grad_norm:
                torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad],
                                               trainer.args.max_grad_norm)
            trainer.optimizer.step()
            trainer.lr_scheduler.step()
            trainer.optimizer.zero_grad(set_to_none=True)
        return float(loss.detach())

    def timed_steps(self, n: int, warmup: int = 1) -> list[tuple[float, dict]]:
        """``warmup`` untimed steps, then ``n`` timed ones: ``[(seconds, batch), ...]``."""
        for _ in range(warmup):
            self.step()
        sync(self.device)
        out = []
        for _ in range(n):
            start = time.perf_counter()
            self.step()
            sync(self.device)
            out.append((time.perf_counter() - start, self.last_batch))
        return out
