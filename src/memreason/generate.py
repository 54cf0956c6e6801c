"""Generation plumbing, written once: token ids, padding, batched generation, continuation scoring.

* ``eos_ids`` / ``pad_id``: which ids end a generation and which one pads (every caller uses these).
* ``encode_prompts``: the one BOS policy — prompts are rendered text (``memreason.prompts`` adds whatever
  BOS/chat framing the model needs), so tokenising never adds special tokens again.
* ``left_pad``: a batch padded on the left, so every row's last real token sits at index -1.
* ``generate_texts``: batched generation that stops each row as soon as its answer line is complete.
* ``continuation_logprobs``: summed log-probability of continuations after contexts (right padded).

Prompts are sorted by length and generated in left-padded batches (greedy unless sampling is asked for,
and then seeded through ``generate``). Greedy batches drop each finished row from the batch and its KV cache,
so a batch costs what its rows still writing cost, not its longest row times its size. A row stops at EOS
or when the text after its first complete ``The answer is:`` line
ends in a newline — the original generated up to 512 more tokens per question after the answer
(spec disentangle.md §10.3). Generated text is decoded with special tokens skipped; the control tokens
are ordinary added tokens, so they stay visible.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable, Sequence

from memreason.errors import ConfigError
from memreason.tasks import ANSWER_MARKER

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Generation:
    """One generated continuation.

    Args:
        text (str): the generated part only (never the prompt), markers kept.
        n_tokens (int): generated tokens up to and including the stop (EOS or the answer line's newline).
        stopped (str): ``"answer"`` (answer line complete), ``"eos"`` or ``"length"`` (hit max_new_tokens).
        ids (tuple[int, ...]): the generated token ids (``n_tokens`` of them).
        logprobs (tuple[float, ...] | None): each generated token's log-probability under the model's own
            (unprocessed) next-token distribution, from the generation's forward passes; None unless asked.
    """

    text: str
    n_tokens: int
    stopped: str
    ids: tuple[int, ...] = ()
    logprobs: tuple[float, ...] | None = None


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


def eos_ids(model, tokenizer) -> list[int]:
    """Every id that ends a generation: the model's generation config's EOS ids, then the tokenizer's.

    Raises:
        ConfigError: neither names an EOS token.
    """
    ids: list[int] = []
    for value in (getattr(getattr(model, "generation_config", None), "eos_token_id", None), tokenizer.eos_token_id):
        for token in (value if isinstance(value, (list, tuple)) else [value]):
            if token is not None and int(token) not in ids:
                ids.append(int(token))
    if not ids:
        raise ConfigError("neither the model's generation config nor the tokenizer names an EOS token")
    return ids


def pad_id(tokenizer, eos: Sequence[int] = ()) -> int:
    """The tokenizer's pad id, else the first EOS id (padding is masked, so any id would do).

    Raises:
        ConfigError: no pad token and no EOS id to pad with.
    """
    if tokenizer.pad_token_id is not None:
        return int(tokenizer.pad_token_id)
    fallback = list(eos) or ([tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else [])
    if not fallback:
        raise ConfigError("the tokenizer has neither a pad nor an EOS token to pad batches with")
    return int(fallback[0])


def encode_prompts(tokenizer, texts: Sequence[str]) -> list[list[int]]:
    """Token ids of rendered prompts; no special tokens are added (the prompt already holds them)."""
    return [tokenizer(text, add_special_tokens=False)["input_ids"] for text in texts]


def left_pad(sequences: Sequence[Sequence[int]], pad: int, device=None) -> dict:
    """A left-padded batch: ``input_ids``, ``attention_mask`` and ``position_ids``, each ``[batch, width]``.

    Position ids count real tokens only (0 at each row's first real token), which absolute-position models
    (GPT-2) need and which makes a padded row compute what it computes alone.
    """
    import torch

    width = max(len(s) for s in sequences)
    input_ids = torch.full((len(sequences), width), pad, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, sequence in enumerate(sequences):
        if len(sequence):
            input_ids[row, width - len(sequence):] = torch.tensor(list(sequence), dtype=torch.long)
            attention_mask[row, width - len(sequence):] = 1
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    return {"input_ids": input_ids.to(device), "attention_mask": attention_mask.to(device),
            "position_ids": position_ids.to(device)}


def continuation_logprobs(model, pairs: Sequence[tuple[Sequence[int], Sequence[int]]], pad: int,
                          batch_size: int = 32) -> list[float]:
    """Summed log-probability of each continuation given its context, as token ids.

    Context and continuation are tokenised separately and their ids joined (as training does); rows are
    right padded, so the positions read are the same in every row.

    Args:
        model: a causal LM in eval mode.
        pairs: ``(context_ids, continuation_ids)``; the context must be non-empty.
        pad (int): the pad id (see ``pad_id``).
        batch_size (int, default 32).

    Returns:
        list[float]: one summed log-probability per pair.
    """
    import torch

    device = next(model.parameters()).device
    scores: list[float] = []
    with torch.no_grad():
        for start in range(0, len(pairs), batch_size):
            chunk = [(list(p), list(c)) for p, c in pairs[start:start + batch_size]]
            width = max(len(p) + len(c) for p, c in chunk)
            ids = torch.full((len(chunk), width), pad, dtype=torch.long)       # [batch, seq]
            mask = torch.zeros((len(chunk), width), dtype=torch.long)          # [batch, seq]
            for row, (p, c) in enumerate(chunk):
                ids[row, :len(p) + len(c)] = torch.tensor(p + c)
                mask[row, :len(p) + len(c)] = 1
            logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits  # [batch, seq, vocab]
            for row, (p, c) in enumerate(chunk):
                # position t predicts token t + 1; normalise only the positions that score the continuation
                logprobs = torch.log_softmax(logits[row, len(p) - 1:len(p) + len(c) - 1].float(), dim=-1)
                targets = torch.tensor(c, device=logprobs.device)
                scores.append(float(logprobs[torch.arange(len(c), device=logprobs.device), targets].sum()))
    return scores


def _newline_token_ids(tokenizer) -> frozenset[int]:
    """Ids whose text contains a newline: only after one of these can an answer line become complete.

    Cached on the tokenizer object itself (a cache keyed by ``id()`` could hand a new tokenizer the ids
    of a freed one).
    """
    cached = getattr(tokenizer, "_memreason_newline_ids", None)
    if cached is None or cached[0] != len(tokenizer):
        texts = tokenizer.batch_decode([[i] for i in range(len(tokenizer))])
        cached = (len(tokenizer), frozenset(i for i, t in enumerate(texts) if "\n" in t))
        try:
            tokenizer._memreason_newline_ids = cached
        except AttributeError:  # a tokenizer that refuses attributes: recompute each time
            pass
    return cached[1]


def _stop_reason(tokenizer, generated, token: int, eos: set[int], newline_ids: frozenset[int]) -> str | None:
    """Why a row stops after ``token`` (the last of ``generated``): ``"eos"``, ``"answer"`` or None."""
    if token in eos:
        return "eos"
    if token in newline_ids and answer_complete(tokenizer.decode(generated, skip_special_tokens=True)):
        return "answer"
    return None


class _RowStopper:
    """A ``StoppingCriteria`` returning one bool per row: EOS or a complete answer line (the sampling path)."""

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
            reason = _stop_reason(self.tokenizer, input_ids[row, self.prompt_len:], token, self.eos_ids,
                                  self.newline_ids)
            if reason:
                self.done[row] = True
                self.lengths[row], self.reasons[row] = generated, reason
        return self.done.to(input_ids.device).clone()


class _TokenLogprobs:
    """A logits processor that records the log-probability of each chosen token, changing nothing.

    At step t it sees the raw next-token scores; the token chosen from them is known one step later (the
    last id of the next call's ``input_ids``, or of the output after the last step), so only one step's
    distribution is ever held: ``[batch, vocab]``.
    """

    def __init__(self):
        self.pending = None
        self.steps: list = []

    def _take(self, chosen) -> None:
        if self.pending is not None:
            self.steps.append(self.pending.gather(-1, chosen[:, None].to(self.pending.device))[:, 0].cpu())
            self.pending = None

    def __call__(self, input_ids, scores):
        import torch

        if self.steps or self.pending is not None:
            self._take(input_ids[:, -1])
        self.pending = torch.log_softmax(scores.float(), dim=-1)  # [batch, vocab]
        return scores

    def finish(self, output) -> list[list[float]]:
        """Per row, the log-probability of every generated token."""
        import torch

        self._take(output[:, -1])
        if not self.steps:
            return [[] for _ in range(output.shape[0])]
        return torch.stack(self.steps, dim=1).tolist()  # [batch, steps]


# generation_config settings that change greedy decoding; a model that sets one decodes through generate()
_PROCESSING = {"repetition_penalty": 1.0, "no_repeat_ngram_size": 0, "encoder_no_repeat_ngram_size": 0,
               "bad_words_ids": None, "suppress_tokens": None, "begin_suppress_tokens": None, "sequence_bias": None,
               "forced_bos_token_id": None, "forced_eos_token_id": None, "min_length": 0, "min_new_tokens": None,
               "renormalize_logits": False, "exponential_decay_length_penalty": None}


def _plain_greedy(model) -> bool:
    """Whether greedy decoding of this model is argmax of its raw logits (no processor from its generation_config)."""
    config = getattr(model, "generation_config", None)
    return config is None or all(getattr(config, k, v) in (v, None) for k, v in _PROCESSING.items())


def _greedy_pruned(model, tokenizer, batch: dict, max_new_tokens: int, stop: set[int], stop_at_answer: bool,
                   logprobs: bool) -> list[tuple[list[int], str, list[float] | None]]:
    """Greedy decoding of one left-padded batch that drops each row from the batch (and its KV cache) as soon as
    it stops, so the rows still writing stop paying for the finished ones.

    The same tokens as ``generate(do_sample=False)`` with the same stop rule (the same forward per row, fewer
    rows in it), and each chosen token's log-probability from the same logits. Returns, per row in batch
    order, its generated ids (the stop token included), why it stopped, and the log-probabilities.
    """
    import inspect

    import torch
    from transformers import DynamicCache

    newline_ids = _newline_token_ids(tokenizer) if stop_at_answer else frozenset()
    input_ids, mask = batch["input_ids"], batch["attention_mask"]
    n = input_ids.shape[0]
    tokens: list[list[int]] = [[] for _ in range(n)]
    scores: list[list[float]] = [[] for _ in range(n)]
    reasons = ["length"] * n
    alive = list(range(n))  # batch row -> original row
    positions = (mask.long().cumsum(-1) - 1).clamp(min=0)
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    keep_last = {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(base.forward).parameters else {}
    cache = DynamicCache(config=getattr(base, "config", None))
    out = model(input_ids=input_ids, attention_mask=mask, position_ids=positions, past_key_values=cache,
                use_cache=True, **keep_last)
    position = positions[:, -1:]
    for _ in range(max_new_tokens):
        logits = out.logits[:, -1].float()
        chosen = logits.argmax(-1)
        chosen_lp = torch.log_softmax(logits, -1).gather(-1, chosen[:, None])[:, 0].tolist() if logprobs else None
        keep = []
        for b, token in enumerate(chosen.tolist()):
            row = alive[b]
            tokens[row].append(token)
            if chosen_lp is not None:
                scores[row].append(chosen_lp[b])
            reason = _stop_reason(tokenizer, tokens[row], token, stop, newline_ids)
            if reason:
                reasons[row] = reason
            else:
                keep.append(b)
        if not keep or len(tokens[alive[keep[0]]]) >= max_new_tokens:
            break
        if len(keep) < len(alive):
            index = torch.tensor(keep, device=chosen.device)
            cache.batch_select_indices(index)
            chosen, mask, position = chosen[index], mask[index], position[index]
            alive = [alive[b] for b in keep]
        mask = torch.cat([mask, mask.new_ones((mask.shape[0], 1))], dim=1)
        position = position + 1
        out = model(input_ids=chosen[:, None], attention_mask=mask, position_ids=position, past_key_values=cache,
                    use_cache=True)
    return [(tokens[r], reasons[r], scores[r] if logprobs else None) for r in range(n)]


def _generate_batch(model, tokenizer, batch: dict, max_new_tokens: int, stop: set[int], stop_at_answer: bool,
                    logprobs: bool, pad: int, do_sample: bool, temperature: float, top_p: float
                    ) -> list[tuple[list[int], str, list[float] | None]]:
    """One left-padded batch through transformers' ``generate`` (sampling, or greedy with a logits processor
    from the model's generation_config); the same per-row results as ``_greedy_pruned``."""
    from transformers import LogitsProcessorList, StoppingCriteriaList

    width = batch["input_ids"].shape[1]
    stopper = _RowStopper(tokenizer, width, batch["input_ids"].shape[0], stop, stop_at_answer)
    recorder = _TokenLogprobs() if logprobs else None
    kwargs = dict(max_new_tokens=max_new_tokens, do_sample=do_sample, pad_token_id=pad,
                  eos_token_id=sorted(stop), stopping_criteria=StoppingCriteriaList([stopper]))
    if recorder is not None:
        kwargs["logits_processor"] = LogitsProcessorList([recorder])
    if do_sample:
        kwargs.update(temperature=temperature, top_p=top_p)
    else:
        kwargs.update(temperature=None, top_p=None, top_k=None)
    output = model.generate(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], **kwargs)
    token_logprobs = recorder.finish(output) if recorder is not None else None
    rows = []
    for r in range(output.shape[0]):
        generated = output[r, width:]
        length = stopper.lengths[r] if stopper.done[r] else generated.shape[0]
        rows.append((generated[:length].tolist(), stopper.reasons[r],
                     token_logprobs[r][:length] if token_logprobs else None))
    return rows


def generate_texts(model, tokenizer, prompts: Sequence[str], **kwargs) -> list[Generation]:
    """Generate one continuation per rendered prompt, in the prompts' order (see ``generate_ids``)."""
    return generate_ids(model, tokenizer, encode_prompts(tokenizer, prompts), **kwargs)


def generate_ids(model, tokenizer, sequences: Sequence[Sequence[int]], *, max_new_tokens: int = 256,
                 batch_size: int = 16, stop_at_answer: bool = True, do_sample: bool = False,
                 temperature: float = 1.0, top_p: float = 1.0, seed: int = 0, logprobs: bool = False,
                 prune: bool = True, progress: Callable[[int], None] | None = None) -> list[Generation]:
    """Generate one continuation per token-id prompt, in the given order.

    Args:
        model: a causal LM (plain, PEFT-wrapped or merged).
        tokenizer: its tokenizer.
        sequences: prompt token ids (a rendered prompt, possibly followed by teacher-forced output).
        max_new_tokens (int, default 256): hard cap per row.
        batch_size (int, default 16): rows per ``generate`` call (prompts sorted by length first).
        stop_at_answer (bool, default True): stop a row once its answer line is complete.
        do_sample / temperature / top_p / seed: sampling only on request; the seed is set before each batch.
        logprobs (bool, default False): also record each generated token's log-probability.
        prune (bool, default True): greedy batches drop finished rows as they go; False keeps every row in
            the batch to the end (for hooks that hold one vector per batch row). The tokens are the same.
        progress: called with the number of prompts finished after each batch.

    Returns:
        list[Generation]
    """
    import torch

    if not sequences:
        return []
    stop_ids = set(eos_ids(model, tokenizer))
    pad = pad_id(tokenizer, sorted(stop_ids))
    encoded = [list(s) for s in sequences]
    order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i]))
    results: list[Generation | None] = [None] * len(encoded)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(order), batch_size):
            rows = order[start:start + batch_size]
            batch = left_pad([encoded[i] for i in rows], pad, device)
            with torch.no_grad():
                if prune and not do_sample and _plain_greedy(model):
                    decoded = _greedy_pruned(model, tokenizer, batch, max_new_tokens, stop_ids, stop_at_answer,
                                             logprobs)
                else:
                    if do_sample:
                        torch.manual_seed(seed + start)
                    decoded = _generate_batch(model, tokenizer, batch, max_new_tokens, stop_ids, stop_at_answer,
                                              logprobs, pad, do_sample, temperature, top_p)
            for i, (ids, reason, scores) in zip(rows, decoded):
                results[i] = Generation(text=tokenizer.decode(ids, skip_special_tokens=True), n_tokens=len(ids),
                                        stopped=reason, ids=tuple(ids),
                                        logprobs=tuple(scores) if scores is not None else None)
            if progress:
                progress(len(rows))
    finally:
        model.train(was_training)
    return results  # type: ignore[return-value]
