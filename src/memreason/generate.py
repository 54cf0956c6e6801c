"""Batched generation that stops each row as soon as its answer line is complete.

Prompts are sorted by length and generated in left-padded batches (greedy unless sampling is asked for,
and then seeded). A row stops at EOS or when the text after its first complete ``The answer is:`` line
ends in a newline — the original generated up to 512 more tokens per question after the answer
(spec disentangle.md §10.3). Generated text is decoded with special tokens skipped; the control tokens
are ordinary added tokens, so they stay visible.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable, Sequence

from memreason.tasks import ANSWER_MARKER

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Generation:
    """One generated continuation.

    Args:
        text (str): the generated part only (never the prompt), markers kept.
        n_tokens (int): generated tokens up to and including the stop (EOS or the answer line's newline).
        stopped (str): ``"answer"`` (answer line complete), ``"eos"`` or ``"length"`` (hit max_new_tokens).
    """

    text: str
    n_tokens: int
    stopped: str


def answer_complete(text: str) -> bool:
    """True once the text holds an answer marker followed by a non-empty line that a newline ends.

    Stopping there never cuts an answer: the answer line is whole, and extraction reads only that line.
    """
    position = text.find(ANSWER_MARKER)
    while position >= 0:
        line, newline, _ = text[position + len(ANSWER_MARKER):].partition("\n")
        if not newline:
            return False
        if line.strip():
            return True
        position = text.find(ANSWER_MARKER, position + len(ANSWER_MARKER))
    return False


def truncate_at_answer(text: str) -> str:
    """The text up to the end of its first complete answer line (the whole text if there is none)."""
    position = text.find(ANSWER_MARKER)
    while position >= 0:
        start = position + len(ANSWER_MARKER)
        line, newline, _ = text[start:].partition("\n")
        if not newline:
            return text
        if line.strip():
            return text[:start + len(line)]
        position = text.find(ANSWER_MARKER, start)
    return text


_NEWLINE_IDS: dict[int, frozenset[int]] = {}


def _newline_token_ids(tokenizer) -> frozenset[int]:
    """Ids whose text contains a newline: only after one of these can an answer line become complete."""
    key = id(tokenizer)
    if key not in _NEWLINE_IDS:
        vocab_size = len(tokenizer)
        texts = tokenizer.batch_decode([[i] for i in range(vocab_size)])
        _NEWLINE_IDS[key] = frozenset(i for i, t in enumerate(texts) if "\n" in t)
    return _NEWLINE_IDS[key]


class _RowStopper:
    """A ``StoppingCriteria`` returning one bool per row: EOS or a complete answer line."""

    def __init__(self, tokenizer, prompt_len: int, batch: int, eos_ids: set[int], stop_at_answer: bool):
        import torch

        self.tokenizer, self.prompt_len, self.eos_ids = tokenizer, prompt_len, eos_ids
        self.stop_at_answer = stop_at_answer
        self.newline_ids = _newline_token_ids(tokenizer) if stop_at_answer else frozenset()
        self.done = torch.zeros(batch, dtype=torch.bool)
        self.lengths = [0] * batch
        self.reasons = ["length"] * batch

    def __call__(self, input_ids, scores, **kwargs):
        generated = input_ids.shape[1] - self.prompt_len
        last = input_ids[:, -1].tolist()
        for row, token in enumerate(last):
            if self.done[row]:
                continue
            reason = None
            if token in self.eos_ids:
                reason = "eos"
            elif token in self.newline_ids:
                text = self.tokenizer.decode(input_ids[row, self.prompt_len:], skip_special_tokens=True)
                if answer_complete(text):
                    reason = "answer"
            if reason:
                self.done[row] = True
                self.lengths[row], self.reasons[row] = generated, reason
        return self.done.to(input_ids.device).clone()


def generate_texts(model, tokenizer, prompts: Sequence[str], *, max_new_tokens: int = 256, batch_size: int = 16,
                   stop_at_answer: bool = True, do_sample: bool = False, temperature: float = 1.0,
                   top_p: float = 1.0, seed: int = 0,
                   progress: Callable[[int], None] | None = None) -> list[Generation]:
    """Generate one continuation per prompt, in the prompts' order.

    Args:
        model: a causal LM (plain, PEFT-wrapped or merged).
        tokenizer: its tokenizer; prompts are already rendered text (see ``memreason.prompts``).
        max_new_tokens (int, default 256): hard cap per row.
        batch_size (int, default 16): rows per ``generate`` call (prompts sorted by length first).
        stop_at_answer (bool, default True): stop a row once its answer line is complete.
        do_sample / temperature / top_p / seed: sampling only on request; the seed is set before each batch.
        progress: called with the number of prompts finished after each batch.

    Returns:
        list[Generation]
    """
    import torch
    from transformers import StoppingCriteriaList

    if not prompts:
        return []
    eos = model.generation_config.eos_token_id if model.generation_config.eos_token_id is not None \
        else tokenizer.eos_token_id
    eos_ids = set(eos if isinstance(eos, (list, tuple)) else [eos])
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else next(iter(eos_ids))
    encoded = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    order = sorted(range(len(prompts)), key=lambda i: -len(encoded[i]))
    results: list[Generation | None] = [None] * len(prompts)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(order), batch_size):
            rows = order[start:start + batch_size]
            width = max(len(encoded[i]) for i in rows)
            # left padding: every row's last prompt token sits at the same position
            input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
            attention = torch.zeros((len(rows), width), dtype=torch.long)
            for r, i in enumerate(rows):
                ids = encoded[i]
                input_ids[r, width - len(ids):] = torch.tensor(ids)
                attention[r, width - len(ids):] = 1
            stopper = _RowStopper(tokenizer, width, len(rows), eos_ids, stop_at_answer)
            kwargs = dict(max_new_tokens=max_new_tokens, do_sample=do_sample, pad_token_id=pad_id,
                          eos_token_id=sorted(eos_ids), stopping_criteria=StoppingCriteriaList([stopper]))
            if do_sample:
                torch.manual_seed(seed + start)
                kwargs.update(temperature=temperature, top_p=top_p)
            else:
                kwargs.update(temperature=None, top_p=None, top_k=None)
            with torch.no_grad():
                output = model.generate(input_ids=input_ids.to(device), attention_mask=attention.to(device), **kwargs)
            for r, i in enumerate(rows):
                generated = output[r, width:]
                length = stopper.lengths[r] if stopper.done[r] else generated.shape[0]
                text = tokenizer.decode(generated[:length], skip_special_tokens=True)
                results[i] = Generation(text=text, n_tokens=length, stopped=stopper.reasons[r])
            if progress:
                progress(len(rows))
    finally:
        model.train(was_training)
    return results  # type: ignore[return-value]
