"""Training data preparation: the validation split, the random-marker ablation, token ids and labels for
one example, right-padded batches and the seeded length-grouped sampler.

Everything here is a pure function of its inputs and a seed (no model, no Trainer), so a resumed run sees
exactly the examples, order and batches an uninterrupted one would.

Fixes over the original code (spec disentangle.md §4–5, §10): the loss covers exactly the target tokens
(every marker, step, the answer line and EOS, and no prompt token: B7's off-by-one is gone); prompt and
target are tokenised separately and their ids concatenated (no merge across the boundary); EOS is part of
the target before the length check, and an over-long example is dropped and counted instead of being
truncated into one that ends without its answer; padding uses the tokenizer's pad token, never id 0 (B6).
"""

from __future__ import annotations

import math
import random
from dataclasses import replace
from typing import Callable, Sequence

from memreason.errors import DataError
from memreason.traces import Step, Trace

IGNORE_INDEX = -100  # label value the causal-LM loss skips


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
    ``data.objective``). Labels are ``-100`` on every prompt token and equal to the ids on every target
    token (the model shifts them: position ``len(prompt) - 1`` predicts the first target token).

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


def prepare_examples(traces: Sequence[Trace], example: Callable[[Trace], dict | None]) -> tuple[list[dict], int]:
    """``example(trace)`` for every trace, keeping those that fit.

    Returns:
        (rows, number dropped as too long).
    """
    rows = [example(trace) for trace in traces]
    kept = [row for row in rows if row is not None]
    return kept, len(rows) - len(kept)


class ListDataset:
    """A map-style dataset over a list of example dicts (what ``Trainer`` needs)."""

    def __init__(self, rows: list[dict]):
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict:
        return self.rows[index]


class PadCollator:
    """Right-pads a list of examples into ``input_ids`` / ``attention_mask`` / ``labels`` tensors ``[batch, seq]``.

    Why not transformers' ``DataCollatorForSeq2Seq``: for a tokenizer that pads on the right it builds
    exactly these tensors (a test pins that), but it pads on ``tokenizer.padding_side``, a tokenizer-wide
    setting that some checkpoints ship as ``"left"`` and that generation code often flips. Left-padded
    training batches shift the positions of every real token in Llama-style models (positions count from
    the first column, not from the mask) and so change the loss. It also forwards every extra key of a row
    (``n_prompt``) to the model, and it needs the tokenizer, where this needs only the pad id.

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
