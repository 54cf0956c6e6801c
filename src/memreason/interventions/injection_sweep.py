"""The memory-injection experiment: a layer x tau sweep with dev/test selection, matched controls and robust metrics.

The original experiment (spec/memory_injection.md §5) ran two batch-1 forwards per (item, layer, tau), chose
the cell on the items it reported, scored a heavy-tailed mean of per-item ratios and compared against random
words at one cell only, unmatched in norm (§7). This module keeps the measurement and fixes the protocol:

* **Selection on dev, report on test.** Items are split by a seeded shuffle; the cell maximising the mean
  Δlog p of the curated memory on dev is reported on test (§10 B2).
* **Robust metrics first** (§9): mean Δlog p (primary), median % change, the legacy mean of % changes and
  its 99th-percentile-trimmed version, ratio of means, fraction improved, top-1/top-5 hits before and after.
  The target is the first non-whitespace token of " " + answer (§7 item 9, the Llama '▁' bug).
* **Matched controls at every cell** (§10 B4): another item's memory (a derangement), random nouns with the
  memory's token count, a random direction with the memory vector's norm; optionally the obscure entity and
  the answer itself (leakage upper bound). Curated − control differences get paired bootstrap 95% CIs and a
  sign test, both at the curated cell and at each control's own best dev cell.
* **Collateral damage**: KL(edited ‖ clean) of next-token distributions on neutral prompts at the chosen cell.

Speed: one clean forward per group of items caches the residual stream entering every swept layer; each
(item, layer, tau, condition) row then runs only layers L..N-1, with many rows per batch and logits at the
last position only. Rows at other cells ride in the same batch with their own vectors, so nothing is
recomputed per cell. ``benchmarks/injection_sweep.py`` measures this against the one-cell-one-prompt loop.
"""

from __future__ import annotations

import contextlib
import csv
import json
import logging
import math
import os
import random
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path

from memreason.errors import ConfigError, DataError
from memreason.interventions.hooks import body, check_layer, decoder_layers, family, num_layers, scoped_hooks, unwrap
from memreason.interventions.memory_injection import (
    CALIBRATION_TEXTS,
    ENCODERS,
    TAU_MODES,
    add_to_attention_output,
    check_positions,
    layer_encoded_vectors,
    left_padded_batch,
    memory_token_ids,
    memory_vectors,
    residual_norms,
    scaled_delta,
)

logger = logging.getLogger(__name__)

REQUIRED_COLUMNS = ("explicit_sentence", "obscure_sentence", "explicit_entity", "answer")
# The original 100-row file spells two columns differently (spec §3.1); its loader renamed them.
COLUMN_ALIASES = {"explicit_sent": "explicit_sentence", "obscure_sent": "obscure_sentence"}
CURATED = "curated"
CONTROLS = ("shuffled", "pos", "random", "obscure", "answer")
DEFAULT_CONTROLS = ("shuffled", "pos", "random")
DEFAULT_TAUS = (0.05, 0.1, 0.2, 0.4)


# --------------------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class PromptItem:
    """One two-hop item.

    Attributes:
        index (int): 0-based record index in the source file.
        explicit (str): the one-hop prompt that names the bridge entity.
        obscure (str): the two-hop prompt that only describes it (the prompt injection tries to repair).
        memory (str): the bridge entity (``explicit_entity``), injected as the memory.
        obscure_entity (str | None): the description of the bridge entity, when the file has it.
        answer (str): the answer with one leading space, as scored after the prompt.
    """

    index: int
    explicit: str
    obscure: str
    memory: str
    obscure_entity: str | None
    answer: str


def bundled_file(name: str) -> Path:
    """Path of a file shipped in ``memreason/data/bundled``."""
    return Path(str(resources.files("memreason") / "data" / "bundled" / name))


def load_prompts(path: str | os.PathLike | None = None) -> list[PromptItem]:
    """Read prompts in the original CSV format (spec §3): explicit/obscure sentence, entities, answer.

    Extra columns (an unnamed index, ``fact1``/``fact2``) are ignored; ``explicit_sent``/``obscure_sent`` are
    accepted as the 100-row file spells them. A leading space is added to every answer, as the original
    loader did, so the scored token is the answer's in-sentence form.

    Args:
        path (str | PathLike | None): the CSV file; None = the bundled two-hop set.

    Returns:
        list[PromptItem]: one per row.

    Raises:
        DataError: missing file, missing columns, or an empty required field (naming file, record, field).
    """
    path = Path(path) if path is not None else bundled_file("two_hop.csv")
    if not path.is_file():
        raise DataError("file not found", file=str(path))
    with path.open(newline="", encoding="utf-8-sig") as handle:  # -sig: tolerate a spreadsheet's BOM
        reader = csv.DictReader(handle)
        header = [COLUMN_ALIASES.get(h.strip(), h.strip()) for h in (reader.fieldnames or [])]
        missing = [c for c in REQUIRED_COLUMNS if c not in header]
        if missing:
            raise DataError(f"missing column(s) {', '.join(missing)}; the file needs "
                            f"{', '.join(REQUIRED_COLUMNS)} (obscure_entity optional)", file=str(path))
        reader.fieldnames = header
        items = []
        for i, row in enumerate(reader):
            values = {k: (v or "").strip() for k, v in row.items() if k is not None}
            for column in REQUIRED_COLUMNS:
                if not values.get(column):
                    raise DataError("empty value", file=str(path), record=i, field=column)
            items.append(PromptItem(index=i, explicit=values["explicit_sentence"],
                                    obscure=values["obscure_sentence"], memory=values["explicit_entity"],
                                    obscure_entity=values.get("obscure_entity") or None,
                                    answer=" " + values["answer"]))
    if not items:
        raise DataError("no rows", file=str(path))
    return items


def load_pos_words(path: str | os.PathLike | None = None) -> dict[str, list[str]]:
    """Read a ``word,pos`` CSV (default: the bundled list) into ``{pos: [words]}``.

    Raises:
        DataError: missing file or columns.
    """
    path = Path(path) if path is not None else bundled_file("pos_words.csv")
    if not path.is_file():
        raise DataError("file not found", file=str(path))
    words: dict[str, list[str]] = {}
    with path.open(newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        if not {"word", "pos"} <= set(reader.fieldnames or []):
            raise DataError("missing column(s): needs word,pos", file=str(path))
        for row in reader:
            if row["word"].strip():
                words.setdefault(row["pos"].strip(), []).append(row["word"].strip())
    return words


def answer_token(tokenizer, answer: str) -> int:
    """The scored target: the first token of ``answer`` (with its leading space) that is not whitespace only.

    SentencePiece tokenizers split " Dutch" into ['▁', '▁Dutch']; scoring the bare '▁' invalidated the
    original Llama-2 results (spec §7 item 9).

    Raises:
        DataError: the answer has no non-whitespace token.
    """
    for token in tokenizer(answer, add_special_tokens=False)["input_ids"]:
        if tokenizer.decode([token]).strip():
            return int(token)
    raise DataError(f"answer {answer!r} has no non-whitespace token")


# --------------------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------------------

def default_layers(n_layers: int, count: int = 10) -> tuple[int, ...]:
    """About ``count`` evenly spaced layers from 0 (every layer when the model has at most ``count``)."""
    stride = max(1, math.ceil(n_layers / count))
    return tuple(range(0, n_layers, stride))


@dataclass(frozen=True)
class SweepConfig:
    """What to sweep and how to judge it.

    Attributes:
        layers (tuple[int, ...] | None): layers to sweep; None = ``default_layers`` of the model.
        taus (tuple[float, ...]): strengths; with ``tau_mode="relative"`` a fraction of the residual norm.
        tau_mode (str): ``"relative"`` (the delta's norm is tau x the median residual norm entering the
            layer, measured on ``neutral_prompts``; comparable across layers and models) or ``"absolute"``
            (tau x v, the paper's tweak factor).
        positions: ``"all"`` (the paper), ``"last"`` or a ``(start, stop)`` span of prompt tokens.
        encoder (str): memory encoder (see ``memory_injection.memory_vector``).
        controls (tuple[str, ...]): subset of ``CONTROLS``.
        dev_fraction (float): share of items used to choose the cell.
        seed (int): seeds the split, the controls and the bootstrap.
        batch_size (int): rows per forward.
        n_bootstrap (int): bootstrap resamples for CIs.
        control_pos (str): part of speech of the random-word control (a ``pos`` value of the word list).
        neutral_prompts (tuple[str, ...]): calibration and collateral-damage prompts.
    """

    layers: tuple[int, ...] | None = None
    taus: tuple[float, ...] = DEFAULT_TAUS
    tau_mode: str = "relative"
    positions: object = "all"
    encoder: str = "unembed"
    controls: tuple[str, ...] = DEFAULT_CONTROLS
    dev_fraction: float = 0.5
    seed: int = 0
    batch_size: int = 64
    n_bootstrap: int = 10_000
    control_pos: str = "noun"
    neutral_prompts: tuple[str, ...] = field(default=CALIBRATION_TEXTS)

    def __post_init__(self):
        problems = []
        if not self.taus or any(not isinstance(t, (int, float)) or not math.isfinite(t) or t < 0
                                for t in self.taus):
            problems.append(f"taus must be non-negative finite numbers, got {self.taus!r}")
        if self.layers is not None and not self.layers:
            problems.append("layers must not be empty")
        if self.tau_mode not in TAU_MODES:
            problems.append(f"tau_mode must be one of {', '.join(TAU_MODES)}, got {self.tau_mode!r}")
        if self.encoder not in ENCODERS:
            problems.append(f"encoder must be one of {', '.join(ENCODERS)}, got {self.encoder!r}")
        unknown = [c for c in self.controls if c not in CONTROLS]
        if unknown:
            problems.append(f"unknown control(s) {', '.join(unknown)}; choose from {', '.join(CONTROLS)}")
        if len(set(self.controls)) != len(self.controls):
            problems.append("controls are listed more than once")
        if not 0 < self.dev_fraction < 1:
            problems.append(f"dev_fraction must be between 0 and 1, got {self.dev_fraction}")
        if self.batch_size < 1 or self.n_bootstrap < 1:
            problems.append("batch_size and n_bootstrap must be positive")
        if not self.neutral_prompts:
            problems.append("neutral_prompts must not be empty")
        try:
            check_positions(self.positions)
        except ConfigError as exc:
            problems.append(str(exc))
        if problems:
            raise ConfigError("; ".join(problems))


# --------------------------------------------------------------------------------------------------------
# Statistics (pure functions on numpy arrays)
# --------------------------------------------------------------------------------------------------------

def cell_metrics(logp_before, logp_after, rank_before, rank_after) -> dict:
    """Per-cell statistics of §9 from per-item next-token log-probabilities and ranks (0 = top-1).

    Returns:
        dict: ``n``, ``mean_dlogp`` (primary), ``median_dlogp``, ``median_pct``, ``mean_pct`` (legacy mean of
        per-item % changes), ``trimmed_mean_pct`` (values at or above the 99th percentile dropped, as the
        original's unused ``reject_outliers``), ``ratio_of_means_pct``, ``frac_improved``, ``top1_before``,
        ``top1_after``, ``top5_before``, ``top5_after``, ``mean_p_before``, ``mean_p_after``.
    """
    import numpy as np

    lb, la = np.asarray(logp_before, dtype=np.float64), np.asarray(logp_after, dtype=np.float64)
    rb, ra = np.asarray(rank_before), np.asarray(rank_after)
    pb, pa = np.exp(lb), np.exp(la)
    dlogp = la - lb
    pct = 100.0 * np.expm1(dlogp)  # = 100 (p_after - p_before) / p_before, without cancellation
    trimmed = pct[pct < np.percentile(pct, 99)] if len(pct) > 1 else pct
    return {
        "n": int(len(lb)),
        "mean_dlogp": float(dlogp.mean()),
        "median_dlogp": float(np.median(dlogp)),
        "median_pct": float(np.median(pct)),
        "mean_pct": float(pct.mean()),
        "trimmed_mean_pct": float(trimmed.mean()) if len(trimmed) else float("nan"),
        "ratio_of_means_pct": float(100.0 * (pa.mean() / pb.mean() - 1.0)),
        "frac_improved": float((la > lb).mean()),
        "top1_before": float((rb == 0).mean()),
        "top1_after": float((ra == 0).mean()),
        "top5_before": float((rb < 5).mean()),
        "top5_after": float((ra < 5).mean()),
        "mean_p_before": float(pb.mean()),
        "mean_p_after": float(pa.mean()),
    }


def bootstrap_ci(values, n_resamples: int = 10_000, seed: int = 0, level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap CI of the mean of ``values`` (paired differences give a paired CI).

    Returns:
        tuple[float, float]: (low, high).
    """
    import numpy as np

    values = np.asarray(values, dtype=np.float64)
    rng = np.random.default_rng(seed)
    means = np.empty(n_resamples)
    for start in range(0, n_resamples, 1000):  # chunks keep memory flat for large n
        stop = min(n_resamples, start + 1000)
        picks = rng.integers(0, len(values), size=(stop - start, len(values)))
        means[start:stop] = values[picks].mean(1)
    alpha = (1.0 - level) / 2
    return float(np.quantile(means, alpha)), float(np.quantile(means, 1 - alpha))


def sign_test_p(differences) -> float:
    """Two-sided exact sign test of median zero; ties are dropped. 1.0 when every difference is zero."""
    pos = sum(1 for d in differences if d > 0)
    neg = sum(1 for d in differences if d < 0)
    n = pos + neg
    if n == 0:
        return 1.0
    k = min(pos, neg)
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2 ** n
    return float(min(1.0, 2 * tail))


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


# --------------------------------------------------------------------------------------------------------
# Forward passes
# --------------------------------------------------------------------------------------------------------

def _can_resume(model) -> bool:
    """Whether cached residuals can be fed back at layer L: the body must pass ``inputs_embeds`` straight to
    the layers (no absolute position embeddings) and treat every layer alike (no per-index layer types)."""
    fam = family(model)
    layer_types = getattr(unwrap(model).config, "layer_types", None)
    return not fam.adds_positions and len(set(layer_types or ["uniform"])) <= 1


@contextlib.contextmanager
def _layers_from(model, start: int):
    """Temporarily give the body only layers ``start..N-1``.

    Why a swap: the body then builds masks and rotary embeddings itself, exactly as in a full forward; the
    alternative, a hand-written layer loop per architecture, would duplicate that code. Restored in finally.
    """
    import torch

    stack = body(model)
    attr = family(model).layers
    full = getattr(stack, attr)
    setattr(stack, attr, torch.nn.ModuleList(list(full)[start:]))
    try:
        yield
    finally:
        setattr(stack, attr, full)


def _logits_last(model, hidden):
    """Next-token logits from the body's final hidden state at the last position: ``[rows, vocab]`` float32."""
    import torch

    with torch.no_grad():
        return unwrap(model).get_output_embeddings()(hidden[:, -1]).float()


def _clean_pass(model, batch, layers: Sequence[int]):
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
            scope.add_forward_pre_hook(decoder_layers(model)[layer], keep(layer), with_kwargs=True)
        hidden = body(model)(**batch, use_cache=False).last_hidden_state
    return _logits_last(model, hidden), captured


def _edited_pass(model, layer: int, deltas, positions, batch, resume_from=None):
    """Logits with per-row ``deltas`` ``[rows, d]`` added at ``layer``; from cached residuals when given."""
    import torch

    with torch.no_grad(), add_to_attention_output(model, {layer: deltas}, positions):
        if resume_from is None:
            hidden = body(model)(**batch, use_cache=False).last_hidden_state
        else:
            with _layers_from(model, layer):
                hidden = body(model)(inputs_embeds=resume_from, attention_mask=batch["attention_mask"],
                                     position_ids=batch["position_ids"], use_cache=False).last_hidden_state
    return _logits_last(model, hidden)


def _item_target(tokenizer, item: PromptItem) -> int:
    try:
        return answer_token(tokenizer, item.answer)
    except DataError as exc:
        raise DataError(exc.problem, record=item.index, field="answer") from None


def _score(logits, targets):
    """(log p of each row's target, rank of the target: number of tokens with a strictly higher logit)."""
    import torch

    target_logits = logits.gather(1, targets[:, None])
    logp = logits.log_softmax(-1).gather(1, targets[:, None])[:, 0]
    rank = (logits > target_logits).sum(-1)
    return logp.detach().cpu().numpy(), rank.cpu().numpy()


# --------------------------------------------------------------------------------------------------------
# The sweep
# --------------------------------------------------------------------------------------------------------

@dataclass
class SweepResult:
    """Everything a sweep measured. ``cells`` and ``items`` are lists of flat dicts (CSV rows)."""

    config: dict
    meta: dict
    cells: list[dict]
    items: list[dict]
    best: dict
    comparisons: list[dict]
    own_best: list[dict]
    collateral: list[dict]


def split_items(n_items: int, dev_fraction: float, seed: int) -> list[str]:
    """Seeded dev/test assignment: shuffle indices, the first round(n * dev_fraction) are "dev"."""
    order = list(range(n_items))
    random.Random(seed).shuffle(order)
    split = ["test"] * n_items
    for i in order[:round(n_items * dev_fraction)]:
        split[i] = "dev"
    return split


def condition_vectors(model, tokenizer, items: Sequence[PromptItem], config: SweepConfig, layers: Sequence[int],
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
    if "obscure" in config.controls and any(it.obscure_entity is None for it in items):
        raise ConfigError("the 'obscure' control needs an obscure_entity column with a value in every row")
    texts = {CURATED: [it.memory for it in items]}
    if "shuffled" in config.controls:
        texts["shuffled"] = shuffled_memories(texts[CURATED], config.seed + 1)
    if "pos" in config.controls:
        pos_words = pos_words if pos_words is not None else load_pos_words()
        if config.control_pos not in pos_words:
            raise ConfigError(f"no words with pos {config.control_pos!r} in the word list "
                              f"(has {', '.join(sorted(pos_words))})")
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


def run_sweep(model, tokenizer, items: Sequence[PromptItem], config: SweepConfig | None = None,
              progress: Callable[[int, int], None] | None = None, pos_words: dict | None = None) -> SweepResult:
    """Sweep layers x taus over ``items`` with the curated memory and the configured controls, and judge it.

    ``measure_grid`` followed by ``summarise``.

    Args:
        model: a supported causal LM (see ``hooks.FAMILIES``).
        tokenizer: its tokenizer.
        items (Sequence[PromptItem]): at least 4 items (2 per split).
        config (SweepConfig | None): what to sweep; None = ``SweepConfig()``.
        progress (Callable[[int, int], None] | None): called with (rows done, rows total) after each batch.
        pos_words (dict | None): ``{pos: words}`` for the random-word control; None = the bundled list.

    Returns:
        SweepResult: cell table (every condition x layer x tau x split), per-item rows at the chosen cell,
        the chosen cell, test-set comparisons with CIs, and collateral KL.

    Raises:
        ConfigError: layers out of range, too few items for the split, a control the data cannot support.
        DataError: an answer without a scorable token.
    """
    config = config if config is not None else SweepConfig()
    grid = measure_grid(model, tokenizer, items, config, progress, pos_words)
    return summarise(model, tokenizer, items, config, grid)


def measure_grid(model, tokenizer, items: Sequence[PromptItem], config: SweepConfig,
                 progress: Callable[[int, int], None] | None = None,
                 pos_words: dict | None = None) -> GridMeasurements:
    """Score every (item, layer, tau, condition) of the grid; same arguments as ``run_sweep``.

    One clean forward per group of items gives p_before and caches the residual stream entering each swept
    layer; each row then resumes from its layer with its own vector (full forwards where the architecture
    does not allow resuming, e.g. GPT-2's absolute positions).
    """
    import numpy as np
    import torch

    n_items = len(items)
    n_dev = round(n_items * config.dev_fraction)
    if n_dev < 2 or n_items - n_dev < 2:
        raise ConfigError(f"{n_items} items give {n_dev} dev / {n_items - n_dev} test; need at least 2 in each")
    layers = tuple(config.layers) if config.layers is not None else default_layers(num_layers(model))
    layers = tuple(dict.fromkeys(check_layer(model, layer) for layer in layers))
    taus = tuple(float(t) for t in config.taus)
    positions = check_positions(config.positions)
    device = next(unwrap(model).parameters()).device

    split = split_items(n_items, config.dev_fraction, config.seed)
    targets = torch.tensor([_item_target(tokenizer, it) for it in items], device=device)
    texts, vectors = condition_vectors(model, tokenizer, items, config, layers, pos_words)
    conditions = list(vectors)

    ref_norm = residual_norms(model, tokenizer, config.neutral_prompts) if config.tau_mode == "relative" else None
    deltas = {c: torch.stack([torch.stack([scaled_delta(vectors[c][:, g], tau, config.tau_mode,
                                                        None if ref_norm is None else float(ref_norm[layer]))
                                           for tau in taus], 1)
                              for g, layer in enumerate(layers)], 1)
              for c in conditions}  # each [n_items, n_layers_swept, n_taus, d]

    resumable = _can_resume(model)
    bos = tokenizer.bos_token_id is not None and tokenizer("x")["input_ids"][:1] == [tokenizer.bos_token_id]
    logger.info("%d items (%d dev / %d test), %d layers x %d taus x %d conditions; %s; tokenizer %s BOS",
                n_items, n_dev, n_items - n_dev, len(layers), len(taus), len(conditions),
                "resuming from cached residuals" if resumable else "full forwards", "adds" if bos else "adds no")

    shape = (n_items, len(layers), len(taus))
    logp_after = {c: np.zeros(shape) for c in conditions}
    rank_after = {c: np.zeros(shape, dtype=np.int64) for c in conditions}
    logp_before, rank_before = np.zeros(n_items), np.zeros(n_items, dtype=np.int64)
    logp_explicit = np.zeros(n_items)

    # Group items of similar length so padding stays small; each group fills about one batch per layer.
    per_item_rows = len(taus) * len(conditions)
    group_size = max(1, config.batch_size // per_item_rows)
    by_length = sorted(range(n_items), key=lambda i: len(tokenizer(items[i].obscure)["input_ids"]))
    total, done = n_items * len(layers) * per_item_rows, 0
    for start in range(0, n_items, group_size):
        group = by_length[start:start + group_size]
        batch = left_padded_batch(tokenizer, [items[i].obscure for i in group], device)
        logits, residuals = _clean_pass(model, batch, layers if resumable else ())
        logp_before[group], rank_before[group] = _score(logits, targets[group])
        explicit = left_padded_batch(tokenizer, [items[i].explicit for i in group], device)
        logp_explicit[group] = _score(_clean_pass(model, explicit, ())[0], targets[group])[0]

        # Rows = (item, tau, condition) of this group, in that order; chunked to batch_size.
        rows = [(gi, t, c) for gi in range(len(group)) for t in range(len(taus)) for c in conditions]
        for g, layer in enumerate(layers):
            for chunk_start in range(0, len(rows), config.batch_size):
                chunk = rows[chunk_start:chunk_start + config.batch_size]
                pick = torch.tensor([gi for gi, _, _ in chunk], device=device)
                sub = {k: v[pick] for k, v in batch.items()}
                row_deltas = torch.stack([deltas[c][group[gi], g, t] for gi, t, c in chunk])
                cached = residuals[layer][pick] if resumable else None
                logits = _edited_pass(model, layer, row_deltas, positions, sub, resume_from=cached)
                lp, rk = _score(logits, targets[[group[gi] for gi, _, _ in chunk]])
                for k, (gi, t, c) in enumerate(chunk):
                    logp_after[c][group[gi], g, t], rank_after[c][group[gi], g, t] = lp[k], rk[k]
                done += len(chunk)
                if progress is not None:
                    progress(done, total)

    return GridMeasurements(layers=layers, taus=taus, conditions=conditions, split=split, texts=texts,
                            deltas=deltas, targets=targets, logp_before=logp_before, rank_before=rank_before,
                            logp_explicit=logp_explicit, logp_after=logp_after, rank_after=rank_after,
                            positions=positions, bos=bool(bos), resumable=bool(resumable))


def summarise(model, tokenizer, items: Sequence[PromptItem], config: SweepConfig,
              grid: GridMeasurements) -> SweepResult:
    """Statistics of a measured grid: cell table, dev-chosen cell, test comparisons with CIs, collateral KL.

    Needs the model only for the collateral-damage forwards on the neutral prompts.
    """
    import numpy as np

    layers, taus, conditions = grid.layers, grid.taus, grid.conditions
    lb, rb, la, ra = grid.logp_before, grid.rank_before, grid.logp_after, grid.rank_after
    masks = {s: np.array([x == s for x in grid.split]) for s in ("dev", "test")}
    cells = []
    for c in conditions:
        for g, layer in enumerate(layers):
            for t, tau in enumerate(taus):
                for s, m in masks.items():
                    cells.append({"condition": c, "layer": layer, "tau": tau, "split": s,
                                  **cell_metrics(lb[m], la[c][m, g, t], rb[m], ra[c][m, g, t])})

    def cell(condition, split, g, t):
        return next(r for r in cells if (r["condition"], r["split"], r["layer"], r["tau"])
                    == (condition, split, layers[g], taus[t]))

    def best_cell(condition):
        dev = [r for r in cells if r["condition"] == condition and r["split"] == "dev"]
        top = max(dev, key=lambda r: r["mean_dlogp"])  # first maximum: deterministic on ties
        return layers.index(top["layer"]), taus.index(top["tau"])

    g, t = best_cell(CURATED)
    test = masks["test"]
    seed, n_boot = config.seed + 4, config.n_bootstrap
    curated_test = la[CURATED][test, g, t] - lb[test]
    best = {"layer": layers[g], "tau": taus[t], "tau_mode": config.tau_mode,
            "dev": cell(CURATED, "dev", g, t), "test": cell(CURATED, "test", g, t),
            "test_ci": bootstrap_ci(curated_test, n_boot, seed)}

    comparisons, own_best = [], []
    for c in conditions[1:]:
        control_test = la[c][test, g, t] - lb[test]
        diff = curated_test - control_test
        comparisons.append({"control": c, "layer": layers[g], "tau": taus[t],
                            **{f"control_{k}": v for k, v in cell(c, "test", g, t).items()
                               if k not in ("condition", "layer", "tau", "split")},
                            "control_ci": bootstrap_ci(control_test, n_boot, seed),
                            "diff_mean_dlogp": float(diff.mean()), "diff_ci": bootstrap_ci(diff, n_boot, seed),
                            "sign_test_p": sign_test_p(diff)})
        cg, ct = best_cell(c)
        own_test = la[c][test, cg, ct] - lb[test]
        own_best.append({"control": c, "layer": layers[cg], "tau": taus[ct],
                         "test_mean_dlogp": float(own_test.mean()), "test_ci": bootstrap_ci(own_test, n_boot, seed),
                         "diff_vs_curated_best": float((curated_test - own_test).mean()),
                         "diff_ci": bootstrap_ci(curated_test - own_test, n_boot, seed)})

    collateral = _collateral_kl(model, tokenizer, config, grid, g, t, test)

    item_rows = []
    for i, it in enumerate(items):
        row = {"index": it.index, "split": grid.split[i], "obscure_sentence": it.obscure,
               "answer": it.answer.strip(), "target_token": tokenizer.decode([int(grid.targets[i])]),
               "memory": it.memory, "p_explicit": math.exp(grid.logp_explicit[i]), "p_before": math.exp(lb[i]),
               "rank_before": int(rb[i])}
        for c in conditions:
            if c in grid.texts and c != CURATED:
                row[f"{c}_memory"] = grid.texts[c][i]
            row[f"p_after_{c}"] = math.exp(la[c][i, g, t])
            row[f"rank_after_{c}"] = int(ra[c][i, g, t])
        item_rows.append(row)

    meta = {
        "model": getattr(unwrap(model).config, "name_or_path", "") or type(unwrap(model)).__name__,
        "n_layers": num_layers(model), "layers": list(layers), "taus": list(taus), "conditions": conditions,
        "n_items": len(items), "n_dev": int(masks["dev"].sum()), "n_test": int(test.sum()),
        "explicit_beats_obscure": float((grid.logp_explicit > lb).mean()),
        "multi_token_answers": sum(len(tokenizer(it.answer, add_special_tokens=False)["input_ids"]) > 1
                                   for it in items),
        "digit_answers": sum(it.answer.strip()[:1].isdigit() for it in items),
        "tokenizer_adds_bos": grid.bos, "resumed_from_cache": grid.resumable, "seed": config.seed,
    }
    config_dict = {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(config).items()}
    config_dict["layers"] = list(layers)
    return SweepResult(config=config_dict, meta=meta, cells=cells, items=item_rows, best=best,
                       comparisons=comparisons, own_best=own_best, collateral=collateral)


def _collateral_kl(model, tokenizer, config, grid: GridMeasurements, g, t, test, per_prompt=4):
    """Mean KL(edited ‖ clean) over the real positions of neutral prompts, each edited with the vectors of up
    to ``per_prompt`` test items, for every condition at the chosen cell (g, t)."""
    import numpy as np
    import torch

    device = next(unwrap(model).parameters()).device
    test_items = [int(i) for i in np.flatnonzero(test)][:per_prompt]
    prompts = [p for p in config.neutral_prompts for _ in test_items]
    head = unwrap(model).get_output_embeddings()
    kls = {c: [] for c in grid.conditions}
    # Full-vocabulary distributions at every position are large ([rows, pos, vocab]): go in small chunks,
    # with one clean pass per chunk shared by every condition.
    for start in range(0, len(prompts), 16):
        batch = left_padded_batch(tokenizer, prompts[start:start + 16], device)
        real = batch["attention_mask"].bool()
        with torch.no_grad():
            clean = head(body(model)(**batch, use_cache=False).last_hidden_state).float().log_softmax(-1)
            for c in grid.conditions:
                row_deltas = torch.stack([grid.deltas[c][test_items[(start + k) % len(test_items)], g, t]
                                          for k in range(real.shape[0])])
                with add_to_attention_output(model, {grid.layers[g]: row_deltas}, grid.positions):
                    edited = head(body(model)(**batch, use_cache=False).last_hidden_state).float().log_softmax(-1)
                kls[c].append((edited.exp() * (edited - clean)).sum(-1)[real])  # [real tokens]
    out = []
    for c in grid.conditions:
        kl = torch.cat(kls[c])
        out.append({"condition": c, "layer": grid.layers[g], "tau": grid.taus[t], "mean_kl": float(kl.mean()),
                    "max_kl": float(kl.max()), "n_prompts": len(config.neutral_prompts),
                    "n_memories": len(test_items)})
    return out


# --------------------------------------------------------------------------------------------------------
# Outputs
# --------------------------------------------------------------------------------------------------------

def _atomic_write(path: Path, write: Callable) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}-", dir=path.parent)
    try:
        with os.fdopen(fd, "w", newline="", encoding="utf-8") as handle:
            write(handle)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _write_csv(path: Path, rows: list[dict]) -> None:
    columns = list(dict.fromkeys(k for r in rows for k in r))

    def write(handle):
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)

    _atomic_write(path, write)


def write_outputs(result: SweepResult, out_dir: str | os.PathLike) -> dict[str, Path]:
    """Write ``cells.csv``, ``items.csv`` (at the chosen cell), ``summary.json`` and ``heatmap.png``.

    Returns:
        dict[str, Path]: name -> written path.
    """
    out = Path(out_dir)
    paths = {"cells": out / "cells.csv", "items": out / "items.csv", "summary": out / "summary.json",
             "heatmap": out / "heatmap.png"}
    _write_csv(paths["cells"], result.cells)
    _write_csv(paths["items"], result.items)
    summary = {"config": result.config, "meta": result.meta, "best": result.best,
               "comparisons": result.comparisons, "own_best": result.own_best, "collateral": result.collateral}
    _atomic_write(paths["summary"], lambda h: json.dump(summary, h, indent=2, default=_json_default))
    plot_heatmap(result.cells, paths["heatmap"], best=(result.best["layer"], result.best["tau"]),
                 title=f"{Path(result.meta['model']).name}: dev mean Δlog p of the answer "
                       f"(tau {result.config['tau_mode']}; ★ chosen cell)")
    return paths


def _json_default(value):
    if isinstance(value, tuple):
        return list(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def plot_heatmap(cells: list[dict], path: str | os.PathLike, split: str = "dev", metric: str = "mean_dlogp",
                 best: tuple[int, float] | None = None, title: str | None = None) -> Path:
    """Layer x tau heatmaps of ``metric`` on ``split``, one panel per condition, on one diverging scale.

    Args:
        cells (list[dict]): the sweep's cell table (``SweepResult.cells`` or ``cells.csv`` rows).
        path: the PNG to write.
        split (str, default "dev"): which split to show (the one the cell was chosen on).
        metric (str, default "mean_dlogp"): a column of the cell table.
        best (tuple[int, float] | None): (layer, tau) to mark.
        title (str | None): figure title.

    Returns:
        Path: the written file.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.colors
    import matplotlib.pyplot as plt
    import numpy as np

    rows = [r for r in cells if r["split"] == split]
    conditions = list(dict.fromkeys(r["condition"] for r in rows))
    layers = sorted({int(r["layer"]) for r in rows})
    taus = sorted({float(r["tau"]) for r in rows})
    grids = {}
    for c in conditions:
        grid = np.full((len(layers), len(taus)), np.nan)
        for r in rows:
            if r["condition"] == c:
                grid[layers.index(int(r["layer"])), taus.index(float(r["tau"]))] = float(r[metric])
        grids[c] = grid
    # Zero is white; the two sides get their own ranges, negatives clipped at the 5th percentile: destroyed
    # cells (Δlog p of -10 or worse) would otherwise wash out the small positive effects that matter.
    values = np.concatenate([g[np.isfinite(g)] for g in grids.values()])
    low = min(float(np.percentile(values, 5)) if values.size else -1.0, -1e-3)
    high = max(float(values.max()) if values.size else 1.0, 1e-3)
    scale = matplotlib.colors.TwoSlopeNorm(vcenter=0.0, vmin=low, vmax=high)
    fig, axes = plt.subplots(1, len(conditions), figsize=(2.2 + 2.0 * len(conditions), 0.28 * len(layers) + 2),
                             squeeze=False, sharey=True)
    for ax, c in zip(axes[0], conditions):
        image = ax.imshow(grids[c], cmap="RdBu", norm=scale, aspect="auto", origin="lower")
        ax.set_title(c)
        ax.set_xticks(range(len(taus)), [f"{t:g}" for t in taus], rotation=45)
        ax.set_yticks(range(len(layers)), [str(layer) for layer in layers])
        ax.set_xlabel("tau")
        if best is not None and best[0] in layers and best[1] in taus:
            ax.scatter([taus.index(best[1])], [layers.index(best[0])], marker="*", s=120, c="gold",
                       edgecolors="black")
    axes[0][0].set_ylabel("layer")
    bar = fig.colorbar(image, ax=axes[0].tolist(), shrink=0.8, label=f"{metric} ({split}; clipped)")
    bar.set_ticks([*np.linspace(low, 0, 4), *np.linspace(0, high, 3)[1:]])
    if title:
        fig.suptitle(title, y=1.0 + 0.3 / fig.get_figheight())
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path
