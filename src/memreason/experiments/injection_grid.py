"""Measuring the memory-injection grid fast: conditions (curated memory and matched controls), the batched
forward passes, and the per-block measurement log that makes a sweep resumable.

``measure_grid`` scores every (item, layer, tau, condition) of a sweep. Speed: one clean forward per group of
items caches the residual stream entering every swept layer; each (item, tau, condition) row then runs only
layers L..N-1, with many rows per batch and logits at the last position only. Rows at other cells ride in
the same batch with their own vectors, so nothing is recomputed per cell. Where the decoder does not hand
``inputs_embeds`` to its first layer unchanged (GPT-2 and OPT add position embeddings, Gemma scales) or its
layers differ by index (sliding-window ``layer_types``), rows run full forwards instead; both paths give the
same numbers as ``memory_injection.inject`` on one prompt at a time (tested).

Every finished (item group, layer) block can be handed to a ``log`` (``injection_sweep.MeasurementLog``)
and is then never measured again: a killed sweep resumes at the first unfinished block and ends with the
same measurements as an uninterrupted one.

The statistics live in ``experiments.injection_sweep``; this module only measures.
"""

from __future__ import annotations

import contextlib
import logging
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from memreason.data.two_hop import PromptItem, answer_token, load_pos_words
from memreason.errors import ConfigError, DataError
from memreason.interventions.hooks import scoped_hooks
from memreason.interventions.memory_injection import (
    add_to_attention_output,
    check_positions,
    layer_encoded_vectors,
    left_padded_batch,
    memory_token_ids,
    memory_vectors,
    residual_norms,
    scaled_delta,
)
from memreason.model.layers import layout, unwrap

logger = logging.getLogger(__name__)

CURATED = "curated"
CONTROLS = ("shuffled", "pos", "random", "obscure", "answer")


# --------------------------------------------------------------------------------------------------------
# Controls
# --------------------------------------------------------------------------------------------------------

def shuffled_memories(memories: Sequence[str], seed: int) -> list[str]:
    """Give each item another item's memory, never one equal to its own text (a derangement on texts).

    Raises:
        DataError: too many items share one memory for such a shuffle to exist.
    """
    rng = random.Random(seed)
    order = list(range(len(memories)))
    for _ in range(1000):
        rng.shuffle(order)
        if all(memories[j] != memories[i] for i, j in enumerate(order)):
            return [memories[j] for j in order]
    raise DataError("cannot build the shuffled-memory control: more than half of the items share one memory")


def pos_matched_memories(tokenizer, memories: Sequence[str], words: Sequence[str], seed: int,
                         tries: int = 500) -> list[str]:
    """For each memory, random words joined by spaces with the same number of distinct tokens.

    Equal token counts give the multi-hot encoders an equal number of summed rows, so the control's norm is
    close to the memory's (the original's single-word controls were not, spec §2.2(3)).
    """
    rng = random.Random(seed)
    out = []
    for memory in memories:
        target = len(memory_token_ids(tokenizer, memory))
        best, best_gap = None, None
        for _ in range(tries):
            phrase = " ".join(rng.sample(list(words), rng.randint(1, min(target, len(words)))))
            gap = abs(len(memory_token_ids(tokenizer, phrase)) - target)
            if best_gap is None or gap < best_gap:
                best, best_gap = phrase, gap
            if gap == 0:
                break
        if best_gap:
            logger.warning("no random-word control with exactly %d tokens for %r; using %r", target, memory, best)
        out.append(best)
    return out


def check_controls(items: Sequence[PromptItem], config, pos_words: dict) -> None:
    """The controls' demands on the data, checked before any model work.

    Raises:
        ConfigError: the 'obscure' control without obscure entities, or an unknown ``control_pos``.
    """
    if "obscure" in config.controls and any(it.obscure_entity is None for it in items):
        raise ConfigError("the 'obscure' control needs an obscure_entity column with a value in every row")
    if "pos" in config.controls and config.control_pos not in pos_words:
        raise ConfigError(f"no words with pos {config.control_pos!r} in the word list "
                          f"(has {', '.join(sorted(pos_words))})")


def condition_vectors(model, tokenizer, items: Sequence[PromptItem], config, layers: Sequence[int],
                      pos_words: dict | None = None):
    """The memory texts and vectors of the curated condition and each configured control.

    Returns:
        tuple: ({condition: [text per item]} for text-based conditions, {condition: ``[n_items, n_layers, d]``}
        in the order curated, then ``CONTROLS`` order). Vectors differ across layers only for the
        ``"layer"`` encoder. The random direction has, per item and layer, the curated vector's norm.

    Raises:
        ConfigError: the 'obscure' control without obscure entities, or an unknown ``control_pos``.
    """
    import torch

    device = next(unwrap(model).parameters()).device
    if "pos" in config.controls and pos_words is None:
        pos_words = load_pos_words()
    check_controls(items, config, pos_words or {})
    texts = {CURATED: [it.memory for it in items]}
    if "shuffled" in config.controls:
        texts["shuffled"] = shuffled_memories(texts[CURATED], config.seed + 1)
    if "pos" in config.controls:
        texts["pos"] = pos_matched_memories(tokenizer, texts[CURATED], pos_words[config.control_pos],
                                            config.seed + 2)
    if "obscure" in config.controls:
        texts["obscure"] = [it.obscure_entity for it in items]
    if "answer" in config.controls:
        texts["answer"] = [it.answer.strip() for it in items]

    def encode(memories):
        if config.encoder == "layer":
            return layer_encoded_vectors(model, tokenizer, memories, layers).to(device)
        return memory_vectors(model, tokenizer, memories, encoder=config.encoder)[:, None, :].expand(
            -1, len(layers), -1)

    vectors = {name: encode(memories) for name, memories in texts.items()}
    if "random" in config.controls:
        gen = torch.Generator().manual_seed(config.seed + 3)
        noise = torch.randn(vectors[CURATED].shape, generator=gen).to(device)
        vectors["random"] = noise / noise.norm(dim=-1, keepdim=True) * vectors[CURATED].norm(dim=-1, keepdim=True)
    return texts, {c: vectors[c] for c in [CURATED, *CONTROLS] if c in vectors}


# --------------------------------------------------------------------------------------------------------
# Forward passes
# --------------------------------------------------------------------------------------------------------

class _Stop(Exception):
    """Raised by the probe hook to end a forward as soon as the first layer's input is seen."""


def can_resume(model) -> bool:
    """Whether cached residuals can be fed back at layer L as ``inputs_embeds``.

    True when the body hands ``inputs_embeds`` to its first layer unchanged (no absolute position
    embeddings, no embedding scale: checked by a probe forward that stops at layer 0) and treats every
    layer alike (no per-index ``layer_types``).
    """
    import torch

    layer_types = getattr(unwrap(model).config, "layer_types", None)
    if len(set(layer_types or ["uniform"])) > 1:
        return False
    lay = layout(model)
    weight = lay.embeddings.weight  # [vocab, d_embed]
    probe = torch.randn(1, 2, weight.shape[1], generator=torch.Generator().manual_seed(0))
    probe = probe.to(device=weight.device, dtype=weight.dtype)
    seen = {}

    def stop(module, args, kwargs):
        seen["h"] = args[0] if args else kwargs["hidden_states"]
        raise _Stop

    with torch.no_grad(), scoped_hooks() as scope:
        scope.add_forward_pre_hook(lay.layers[0], stop, with_kwargs=True)
        mask = torch.ones(1, 2, dtype=torch.long, device=weight.device)
        with contextlib.suppress(_Stop):
            lay.body(inputs_embeds=probe, attention_mask=mask, position_ids=mask.cumsum(-1) - 1, use_cache=False)
    return "h" in seen and seen["h"].shape == probe.shape and bool(torch.equal(seen["h"], probe))


@contextlib.contextmanager
def layers_from(model, start: int):
    """Temporarily give the body only layers ``start..N-1``.

    Why a swap: the body then builds masks and rotary embeddings itself, exactly as in a full forward; the
    alternative, a hand-written layer loop per architecture, would duplicate that code. Restored in finally.
    """
    import torch

    lay = layout(model)
    stack, attr = lay.body, lay.family.layers
    full = getattr(stack, attr)
    setattr(stack, attr, torch.nn.ModuleList(list(full)[start:]))
    try:
        yield
    finally:
        setattr(stack, attr, full)


def _logits_last(model, **inputs):
    """Next-token logits at the last position, ``[rows, vocab]`` float32, through the model's own head.

    The causal LM's forward (not ``lm_head`` alone) applies whatever the architecture does after the
    decoder (Gemma-2's logit soft-capping, Cohere's and Granite's logit scales); ``logits_to_keep=1``
    keeps the head to the last position.
    """
    import torch

    with torch.no_grad():
        return unwrap(model)(**inputs, use_cache=False, logits_to_keep=1).logits[:, -1].float()


def clean_pass(model, batch, layers: Sequence[int]):
    """A clean forward that also returns the residual stream entering each layer in ``layers``.

    Returns:
        tuple: (logits ``[rows, vocab]``, {layer: ``[rows, pos, d]``}).
    """
    import torch

    captured = {}

    def keep(layer):
        def hook(module, args, kwargs):
            captured[layer] = (args[0] if args else kwargs["hidden_states"]).detach()
        return hook

    with torch.no_grad(), scoped_hooks() as scope:
        for layer in set(layers):
            scope.add_forward_pre_hook(layout(model).layers[layer], keep(layer), with_kwargs=True)
        logits = _logits_last(model, **batch)
    return logits, captured


def edited_pass(model, layer: int, deltas, positions, batch, resume_from=None):
    """Logits with per-row ``deltas`` ``[rows, d]`` added at ``layer``; from cached residuals when given."""
    import torch

    with torch.no_grad(), add_to_attention_output(model, {layer: deltas}, positions):
        if resume_from is None:
            return _logits_last(model, **batch)
        with layers_from(model, layer):
            return _logits_last(model, inputs_embeds=resume_from, attention_mask=batch["attention_mask"],
                                position_ids=batch["position_ids"])


def item_target(tokenizer, item: PromptItem) -> int:
    """``answer_token`` of an item, with the item's record index in the error."""
    try:
        return answer_token(tokenizer, item.answer)
    except DataError as exc:
        raise DataError(exc.problem, record=item.index, field="answer") from None


def score(logits, targets):
    """(log p of each row's target, rank of the target: number of tokens with a strictly higher logit)."""
    target_logits = logits.gather(1, targets[:, None])
    logp = logits.log_softmax(-1).gather(1, targets[:, None])[:, 0]
    rank = (logits > target_logits).sum(-1)
    return logp.detach().cpu().numpy(), rank.cpu().numpy()


# --------------------------------------------------------------------------------------------------------
# The grid
# --------------------------------------------------------------------------------------------------------

@dataclass
class GridMeasurements:
    """Raw per-item measurements of a sweep, before any statistics.

    Attributes:
        layers (tuple[int, ...]), taus (tuple[float, ...]), conditions (list[str]): the grid axes.
        split (list[str]): "dev"/"test" per item.
        texts (dict[str, list[str]]): memory text per item for text-based conditions.
        deltas (dict[str, Tensor]): per condition, the added vectors ``[n_items, n_layers, n_taus, d]``.
        targets (Tensor): ``[n_items]`` scored token ids.
        logp_before, rank_before, logp_explicit: ``[n_items]`` arrays (obscure prompt clean; explicit prompt).
        logp_after, rank_after (dict[str, ndarray]): per condition, ``[n_items, n_layers, n_taus]``.
        positions: normalised positions. bos (bool), resumable (bool): how the run went.
    """

    layers: tuple
    taus: tuple
    conditions: list
    split: list
    texts: dict
    deltas: dict
    targets: object
    logp_before: object
    rank_before: object
    logp_explicit: object
    logp_after: dict
    rank_after: dict
    positions: object
    bos: bool
    resumable: bool


def split_items(n_items: int, dev_fraction: float, seed: int) -> list[str]:
    """Seeded dev/test assignment: shuffle indices, the first round(n * dev_fraction) are "dev"."""
    order = list(range(n_items))
    random.Random(seed).shuffle(order)
    split = ["test"] * n_items
    for i in order[:round(n_items * dev_fraction)]:
        split[i] = "dev"
    return split


def default_layers(n_layers: int, count: int = 10) -> tuple[int, ...]:
    """About ``count`` evenly spaced layers from 0 (every layer when the model has at most ``count``)."""
    import math

    stride = max(1, math.ceil(n_layers / count))
    return tuple(range(0, n_layers, stride))


def check_split(n_items: int, dev_fraction: float) -> int:
    """The number of dev items; refuses a split with fewer than 2 items on either side.

    Raises:
        ConfigError: too few items.
    """
    n_dev = round(n_items * dev_fraction)
    if n_dev < 2 or n_items - n_dev < 2:
        raise ConfigError(f"{n_items} items give {n_dev} dev / {n_items - n_dev} test; need at least 2 in each")
    return n_dev


def measure_grid(model, tokenizer, items: Sequence[PromptItem], config,
                 progress: Callable[[int, int], None] | None = None,
                 pos_words: dict | None = None, log=None) -> GridMeasurements:
    """Score every (item, layer, tau, condition) of the grid.

    One clean forward per group of items gives p_before and caches the residual stream entering each swept
    layer; each row then resumes from its layer with its own vector (full forwards where the architecture
    does not allow resuming, see ``can_resume``).

    Args:
        model, tokenizer: the model under test.
        items (Sequence[PromptItem]): at least 4 items (2 per split).
        config (injection_sweep.SweepConfig): the grid and its batching.
        progress (Callable[[int, int], None] | None): called with (rows done, rows total) after each batch.
        pos_words (dict | None): ``{pos: words}`` for the random-word control; None = the bundled list.
        log (MeasurementLog | None): finished blocks to reuse, and where to record new ones.

    Raises:
        ConfigError: layers out of range, too few items for the split, a control the data cannot support.
        DataError: an answer without a scorable token.
    """
    import numpy as np
    import torch

    n_items = len(items)
    n_dev = check_split(n_items, config.dev_fraction)
    lay = layout(model)
    layers = tuple(config.layers) if config.layers is not None else default_layers(lay.num_layers)
    layers = tuple(dict.fromkeys(lay.check_layer(layer) for layer in layers))
    taus = tuple(float(t) for t in config.taus)
    positions = check_positions(config.positions)
    device = next(unwrap(model).parameters()).device

    split = split_items(n_items, config.dev_fraction, config.seed)
    targets = torch.tensor([item_target(tokenizer, it) for it in items], device=device)
    texts, vectors = condition_vectors(model, tokenizer, items, config, layers, pos_words)
    conditions = list(vectors)

    ref_norm = residual_norms(model, tokenizer, config.neutral_prompts) if config.tau_mode == "relative" else None
    deltas = {c: torch.stack([torch.stack([scaled_delta(vectors[c][:, g], tau, config.tau_mode,
                                                        None if ref_norm is None else float(ref_norm[layer]))
                                           for tau in taus], 1)
                              for g, layer in enumerate(layers)], 1)
              for c in conditions}  # each [n_items, n_layers_swept, n_taus, d]

    resumable = can_resume(model)
    bos = tokenizer.bos_token_id is not None and tokenizer("x")["input_ids"][:1] == [tokenizer.bos_token_id]
    logger.info("%d items (%d dev / %d test), %d layers x %d taus x %d conditions; %s; tokenizer %s BOS",
                n_items, n_dev, n_items - n_dev, len(layers), len(taus), len(conditions),
                "resuming from cached residuals" if resumable else "full forwards", "adds" if bos else "adds no")

    shape = (n_items, len(layers), len(taus))
    grid = GridMeasurements(
        layers=layers, taus=taus, conditions=conditions, split=split, texts=texts, deltas=deltas, targets=targets,
        logp_before=np.zeros(n_items), rank_before=np.zeros(n_items, dtype=np.int64),
        logp_explicit=np.zeros(n_items), logp_after={c: np.zeros(shape) for c in conditions},
        rank_after={c: np.zeros(shape, dtype=np.int64) for c in conditions},
        positions=positions, bos=bool(bos), resumable=bool(resumable))
    _measure_groups(model, tokenizer, items, config, grid, progress, log)
    return grid


def _measure_groups(model, tokenizer, items, config, grid: GridMeasurements, progress, log) -> None:
    """Fill ``grid`` group by group and layer by layer, reusing and recording blocks through ``log``."""
    import torch

    layers, taus, conditions, deltas = grid.layers, grid.taus, grid.conditions, grid.deltas
    device = grid.targets.device
    # Group items of similar length so padding stays small; each group fills about one batch per layer.
    per_item_rows = len(taus) * len(conditions)
    group_size = max(1, config.batch_size // per_item_rows)
    by_length = sorted(range(len(items)), key=lambda i: len(tokenizer(items[i].obscure)["input_ids"]))
    total, done = len(items) * len(layers) * per_item_rows, 0
    for start in range(0, len(items), group_size):
        group = by_length[start:start + group_size]
        # Rows = (item, tau, condition) of this group, in that order; chunked to batch_size.
        rows = [(gi, t, c) for gi in range(len(group)) for t in range(len(taus)) for c in conditions]
        stored = {layer: log.get(("edit", start, layer)) if log is not None else None for layer in layers}
        clean = log.get(("clean", start)) if log is not None else None
        if clean is not None:
            for i, lb, rb, le in clean:
                grid.logp_before[i], grid.rank_before[i], grid.logp_explicit[i] = lb, rb, le
        if clean is None or any(v is None for v in stored.values()):
            batch = left_padded_batch(tokenizer, [items[i].obscure for i in group], device)
            logits, residuals = clean_pass(model, batch, layers if grid.resumable else ())
        if clean is None:
            grid.logp_before[group], grid.rank_before[group] = score(logits, grid.targets[group])
            explicit = left_padded_batch(tokenizer, [items[i].explicit for i in group], device)
            grid.logp_explicit[group] = score(clean_pass(model, explicit, ())[0], grid.targets[group])[0]
            if log is not None:
                log.put(("clean", start), [[i, float(grid.logp_before[i]), int(grid.rank_before[i]),
                                            float(grid.logp_explicit[i])] for i in group])

        for g, layer in enumerate(layers):
            if stored[layer] is not None:
                for i, t, c, lp, rk in stored[layer]:
                    grid.logp_after[c][i, g, t], grid.rank_after[c][i, g, t] = lp, rk
                done += len(rows)
                if progress is not None:
                    progress(done, total)
                continue
            block = []
            for chunk_start in range(0, len(rows), config.batch_size):
                chunk = rows[chunk_start:chunk_start + config.batch_size]
                pick = torch.tensor([gi for gi, _, _ in chunk], device=device)
                sub = {k: v[pick] for k, v in batch.items()}
                row_deltas = torch.stack([deltas[c][group[gi], g, t] for gi, t, c in chunk])
                cached = residuals[layer][pick] if grid.resumable else None
                logits = edited_pass(model, layer, row_deltas, grid.positions, sub, resume_from=cached)
                lp, rk = score(logits, grid.targets[[group[gi] for gi, _, _ in chunk]])
                for k, (gi, t, c) in enumerate(chunk):
                    grid.logp_after[c][group[gi], g, t], grid.rank_after[c][group[gi], g, t] = lp[k], rk[k]
                    block.append([group[gi], t, c, float(lp[k]), int(rk[k])])
                done += len(chunk)
                if progress is not None:
                    progress(done, total)
            if log is not None:
                log.put(("edit", start, layer), block)
