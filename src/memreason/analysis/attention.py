"""Attention per step kind: which tokens belong to which span, how much attention each span receives,
and the teacher-forcing driver that measures it on evaluated traces.

**Span bookkeeping.** A teacher-forced sequence is the rendered prompt followed by a result row's ``raw``
text (generated text, markers kept). Prompt and raw text are tokenized *separately* (as ``generate``
did; re-tokenizing the decoded text can split a word differently from the ids the model sampled, which
changes positions but not what the text says) and every token gets exactly one *span kind* from its
characters (``return_offsets_mapping``):

* prompt tokens: ``first`` (position 0, where attention sinks collect), ``question`` (tokens overlapping
  the question's text, its last occurrence in the prompt, so few-shot questions do not count) and
  ``prompt`` (everything else: chat template, instruction, worked examples);
* generated tokens: the raw text is cut into *segments* exactly as ``memreason.model.tokens.parse`` cuts
  it. A *marker run* (markers matching ``<(prefix|memory|reason|answer)(_\\d+)?>`` separated only by
  spaces/tabs) announces a segment, which runs to the next marker run. The run announces ``memory``,
  ``reason`` or ``answer`` (its non-prefix markers); a prefix-only run announces ``answer`` if it is the
  last run and its text holds ``The answer is:``, else an unlabelled ``step``; text before the first run is
  an unlabelled ``step``. Without any marker (plain chain of thought) every line is a segment: ``answer``
  if it holds ``The answer is:``, else ``step``; a blank line belongs to the line before it.
* A generated token that contains any character of a marker run is a **marker token**. Markers belong to
  the kind they announce *and* are their own span kind: a marker token's kind is ``marker_<kind>``
  (``marker_memory``, ``marker_reason``, ``marker_answer``, ``marker_step``), never ``memory`` etc., and
  the tables add ``markers`` = the sum of the four. Other generated tokens take their segment's kind:
  ``memory``, ``reason``, ``step`` or ``answer`` (the answer line's text).

``KEY_KINDS`` is a partition of the positions: the attention a query puts on the key kinds sums to the
query's row total (1 for softmax attention) — ``markers`` is derived and never part of that sum.

**Masses.** For a layer, head, *query group* (``QUERY_GROUPS``: the text tokens of memory steps, reason
steps, unlabelled steps, the answer line, and all marker tokens) and key kind, the mass is the mean over
the group's query positions of the summed attention on keys of that kind. ``uniform`` is the mass a query
would give the kind if it spread its attention evenly over the keys it can see (the kind's share of the
visible tokens); ``enrichment = mass / uniform`` says how much more than its share a span receives. The
tables average over the examples that have the query group (a kind the group cannot see counts as 0, so
the means over ``KEY_KINDS`` still sum to the row total), with a percentile bootstrap CI (resampling
examples, seeded); ``mean_when_seen`` averages only over the examples whose group can see the kind.

The driver (``teacher_force``, ``measure``) needs eager attention: under sdpa, ``output_attentions=True``
returns an empty tuple (ecosystem.md §3.2). It holds one sequence's attention maps at a time.
"""

from __future__ import annotations

import csv
import json
import logging
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

from memreason.errors import ConfigError, DataError
from memreason.tasks import ANSWER_MARKER

logger = logging.getLogger(__name__)

# Every position gets exactly one of these (a partition: masses over them sum to the row total).
KEY_KINDS = ("first", "prompt", "question", "memory", "reason", "step", "answer",
             "marker_memory", "marker_reason", "marker_step", "marker_answer")
MARKER_KINDS = tuple(k for k in KEY_KINDS if k.startswith("marker_"))
# Key kinds in the tables: the partition plus ``markers`` (the sum of the marker_* kinds).
TABLE_KEY_KINDS = KEY_KINDS + ("markers",)
# Which query positions are averaged: text tokens of a segment kind, or all marker tokens.
QUERY_GROUPS = ("memory", "reason", "step", "answer", "markers")
SEGMENT_KINDS = ("memory", "reason", "step", "answer")

_MARKER = re.compile(r"<(prefix|memory|reason|answer)(?:_\d+)?>")
_MARKER_RUN = re.compile(r"(?:[ \t]*<(?:prefix|memory|reason|answer)(?:_\d+)?>)+")

BY_HEAD = "attention_by_head.csv"
BY_LAYER = "attention_by_layer.csv"
EXAMPLES = "attention_examples.safetensors"
TOKENS = "attention_tokens.jsonl"
SUMMARY = "attention_summary.json"


# ---------------------------------------------------------------- span bookkeeping (pure)

@dataclass(frozen=True)
class Segment:
    """One segment of generated text: a marker run (possibly empty) and the text it announces.

    Args:
        kind (str): ``memory``, ``reason``, ``step`` or ``answer``.
        start, end (int): character span of the whole segment in the raw text, marker run included.
        marker_end (int): end of the marker run (``start`` when the segment has no markers).
    """

    kind: str
    start: int
    end: int
    marker_end: int


def _run_kind(run: str, is_last: bool, body: str) -> str:
    kinds = {m.group(1) for m in _MARKER.finditer(run)} - {"prefix"}
    if len(kinds) == 1:
        return kinds.pop()
    if not kinds and is_last and ANSWER_MARKER in body:
        return "answer"
    return "step"  # prefix only, or mixed kinds in one run: do not guess (as parse does)


def segment_text(raw: str) -> list[Segment]:
    """Cut generated text into segments (see the module docstring); together they cover ``raw`` exactly.

    Args:
        raw (str): generated text with its markers.

    Returns:
        list[Segment]: in text order, contiguous, from 0 to ``len(raw)``.
    """
    runs = list(_MARKER_RUN.finditer(raw))
    segments: list[Segment] = []
    if not runs:
        position = 0
        for line in raw.splitlines(keepends=True):
            end = position + len(line)
            if not line.strip() and segments:
                previous = segments[-1]
                segments[-1] = Segment(previous.kind, previous.start, end, previous.start)
            else:
                kind = "answer" if ANSWER_MARKER in line else "step"
                segments.append(Segment(kind, position, end, position))
            position = end
        return segments
    if runs[0].start() > 0:
        segments.append(Segment("step", 0, runs[0].start(), 0))
    for i, run in enumerate(runs):
        end = runs[i + 1].start() if i + 1 < len(runs) else len(raw)
        kind = _run_kind(run.group(0), i == len(runs) - 1, raw[run.end():end])
        segments.append(Segment(kind, run.start(), end, run.end()))
    return segments


def char_kinds(raw: str) -> list[str]:
    """The span kind of every character of generated text: ``marker_<kind>`` inside a marker run, else
    the kind of its segment."""
    kinds = [""] * len(raw)
    for segment in segment_text(raw):
        for i in range(segment.start, segment.marker_end):
            kinds[i] = f"marker_{segment.kind}"
        for i in range(segment.marker_end, segment.end):
            kinds[i] = segment.kind
    return kinds


def _token_kind(start: int, end: int, kinds: Sequence[str], fallback: str) -> str:
    """A token's kind from its characters' kinds: a marker (or question) character anywhere in the token
    wins; otherwise the kind of its first character."""
    if not kinds:
        return fallback
    if end <= start:  # a zero-width token: the character it sits on
        return kinds[min(start, len(kinds) - 1)]
    covered = kinds[start:end]
    special = next((k for k in covered if k.startswith("marker_") or k == "question"), None)
    return special or covered[0]


@dataclass(frozen=True)
class TokenSpans:
    """The span kind of every position of one teacher-forced sequence.

    Args:
        input_ids (tuple[int, ...]): prompt ids followed by the generated text's ids.
        kinds (tuple[str, ...]): one of ``KEY_KINDS`` per position.
        n_prompt (int): how many leading positions are the prompt.
        tokens (tuple[str, ...]): each token's text, for plots.
    """

    input_ids: tuple[int, ...]
    kinds: tuple[str, ...]
    n_prompt: int
    tokens: tuple[str, ...] = ()

    def counts(self) -> dict[str, int]:
        """Positions per key kind (every kind listed, zeros included)."""
        return {kind: self.kinds.count(kind) for kind in KEY_KINDS}


def token_spans(tokenizer, prompt: str, raw: str, question: str | None = None) -> TokenSpans:
    """Tokenize prompt and generated text separately and give every token its span kind.

    Args:
        tokenizer: a fast tokenizer (offsets are needed).
        prompt (str): the rendered prompt (``memreason.prompts.render_prompt``).
        raw (str): the generated text, markers kept.
        question (str | None): the question text; its last occurrence in the prompt is ``question``.

    Returns:
        TokenSpans

    Raises:
        ConfigError: the tokenizer cannot return offsets (not a fast tokenizer), or the sequence is empty.
    """
    try:
        p = tokenizer(prompt, add_special_tokens=False, return_offsets_mapping=True)
        g = tokenizer(raw, add_special_tokens=False, return_offsets_mapping=True)
    except NotImplementedError:
        raise ConfigError("attention spans need a fast tokenizer (offset mapping); this one has none") from None
    prompt_chars = ["prompt"] * len(prompt)
    if question and question.strip():
        at = prompt.rfind(question.strip())
        if at >= 0:
            for i in range(at, at + len(question.strip())):
                prompt_chars[i] = "question"
        else:
            logger.debug("question text not found in the prompt; its tokens count as 'prompt'")
    kinds = [_token_kind(start, end, prompt_chars, "prompt") for start, end in p["offset_mapping"]]
    raw_chars = char_kinds(raw)
    kinds += [_token_kind(start, end, raw_chars, "step") for start, end in g["offset_mapping"]]
    ids = list(p["input_ids"]) + list(g["input_ids"])
    if not ids:
        raise ConfigError("empty sequence: both the prompt and the generated text are empty")
    kinds[0] = "first"
    tokens = tuple(tokenizer.decode([i]) for i in ids)
    return TokenSpans(tuple(ids), tuple(kinds), len(p["input_ids"]), tokens)


# ---------------------------------------------------------------- masses (pure tensors)

@dataclass(frozen=True)
class SpanMasses:
    """Attention mass of one sequence per layer, head, query group and key kind.

    Args:
        mass: ``[layer, head, query_group, key_kind]`` mean attention of the group's queries on the kind
            (``QUERY_GROUPS`` × ``KEY_KINDS``; 0 where a group has no tokens).
        row_total: ``[layer, head, query_group]`` mean of the queries' summed attention rows.
        uniform: ``[query_group, key_kind]`` the same mean under uniform attention over visible keys.
        n_queries: ``[query_group]`` query positions per group.
    """

    mass: object
    row_total: object
    uniform: object
    n_queries: object


def _kind_onehot(kinds: Sequence[str]):
    import torch

    index = {kind: i for i, kind in enumerate(KEY_KINDS)}
    try:
        ids = torch.tensor([index[k] for k in kinds])
    except KeyError as exc:
        raise ValueError(f"unknown span kind {exc.args[0]!r}; expected one of {KEY_KINDS}") from None
    return torch.nn.functional.one_hot(ids, len(KEY_KINDS)).to(torch.float64)  # [k_pos, key_kind]


def _query_selector(kinds: Sequence[str]):
    """``[q_pos, query_group]`` averaging weights (each column sums to 1 over its group, or is all 0)."""
    import torch

    select = torch.zeros(len(kinds), len(QUERY_GROUPS), dtype=torch.float64)
    for g, group in enumerate(QUERY_GROUPS):
        rows = [i for i, k in enumerate(kinds) if (k.startswith("marker_") if group == "markers" else k == group)]
        if rows:
            select[rows, g] = 1.0 / len(rows)
    return select


def span_masses(attn, kinds: Sequence[str]) -> SpanMasses:
    """Attention mass per query group and key kind.

    Args:
        attn: ``[layer, head, q_pos, k_pos]`` attention weights of one sequence (rows need not sum to 1;
            whatever they sum to is split exactly over the key kinds).
        kinds (Sequence[str]): the span kind of each position (``TokenSpans.kinds``), ``len == q_pos == k_pos``.

    Returns:
        SpanMasses (float64 tensors).

    Raises:
        ValueError: shape and kinds disagree, or an unknown kind.
    """
    import torch

    if attn.dim() != 4 or attn.shape[-1] != attn.shape[-2] or attn.shape[-1] != len(kinds):
        raise ValueError(f"attention of shape {tuple(attn.shape)} does not fit {len(kinds)} positions "
                         "(expected [layer, head, q_pos, k_pos] with q_pos == k_pos == len(kinds))")
    onehot = _kind_onehot(kinds)                          # [k_pos, key_kind]
    select = _query_selector(kinds)                       # [q_pos, query_group]
    a = attn.detach().to("cpu", torch.float64)            # [layer, head, q_pos, k_pos]
    per_query = a @ onehot                                # [layer, head, q_pos, key_kind]
    mass = torch.einsum("lhqk,qg->lhgk", per_query, select)        # [layer, head, query_group, key_kind]
    row_total = torch.einsum("lhq,qg->lhg", a.sum(-1), select)     # [layer, head, query_group]
    # uniform attention: query q sees keys 0..q, each with weight 1/(q+1)
    visible = onehot.cumsum(0) / torch.arange(1, len(kinds) + 1, dtype=torch.float64)[:, None]  # [q_pos, key_kind]
    uniform = select.T @ visible                          # [query_group, key_kind]
    n_queries = (select > 0).sum(0)                       # [query_group]
    return SpanMasses(mass, row_total, uniform, n_queries)


# ---------------------------------------------------------------- teacher forcing (needs a model)

def ensure_eager(model) -> str | None:
    """Switch ``model`` (plain or PEFT-wrapped) to eager attention in place, if it is not already.

    Returns:
        str | None: the implementation it ran before (pass it to ``set_attn_implementation`` to restore).

    Raises:
        ConfigError: the model cannot switch attention implementation.
    """
    base = model.get_base_model() if callable(getattr(model, "get_base_model", None)) else model
    current = getattr(getattr(base, "config", None), "_attn_implementation", None)
    if current == "eager":
        return current
    try:
        base.set_attn_implementation("eager")
    except (AttributeError, ValueError) as exc:
        raise ConfigError(f"attention weights need eager attention, and this model ({type(base).__name__}) "
                          f"cannot switch to it: {exc}; load it with attn_implementation='eager'") from None
    logger.info("switched attention from %s to eager (attention weights are needed)", current)
    return current


@dataclass
class ExampleAttention:
    """What teacher forcing one example gives.

    Args:
        spans (TokenSpans); masses (SpanMasses).
        matrix: ``[q_pos, k_pos]`` the full attention map of the kept (layer, head), else None.
    """

    spans: TokenSpans
    masses: SpanMasses
    matrix: object = None


def teacher_force(model, tokenizer, prompt: str, raw: str, *, question: str | None = None,
                  keep: tuple[int, int] | None = None) -> ExampleAttention:
    """Run prompt + generated text through ``model`` once and measure attention per span kind.

    Args:
        model: a causal LM with eager attention (see ``ensure_eager``).
        tokenizer: its (fast) tokenizer.
        prompt (str), raw (str), question (str | None): as in ``token_spans``.
        keep ((layer, head) | None): also return that head's full ``[q_pos, k_pos]`` map.

    Returns:
        ExampleAttention

    Raises:
        ConfigError: the model returned no attention weights (not eager), or ``keep`` is out of range.
    """
    import torch

    spans = token_spans(tokenizer, prompt, raw, question)
    device = next(model.parameters()).device
    ids = torch.tensor([spans.input_ids], device=device)
    with torch.no_grad():
        output = model(input_ids=ids, attention_mask=torch.ones_like(ids), output_attentions=True, use_cache=False)
    attentions = output.attentions  # layer × [batch=1, head, q_pos, k_pos]
    if not attentions or any(a is None for a in attentions):
        raise ConfigError("the model returned no attention weights; it must run eager attention "
                          "(call memreason.analysis.attention.ensure_eager(model) or load it with "
                          "attn_implementation='eager')")
    matrix = None
    if keep is not None:
        layer, head = keep
        if not (0 <= layer < len(attentions)) or not (0 <= head < attentions[0].shape[1]):
            raise ConfigError(f"layer {layer}, head {head} is out of range: the model has {len(attentions)} "
                              f"layers and {attentions[0].shape[1]} heads")
        matrix = attentions[layer][0, head].detach().to("cpu", torch.float32)  # [q_pos, k_pos]
    per_layer = [span_masses(a[0][None], spans.kinds) for a in attentions]  # each [1, head, group, kind]
    masses = SpanMasses(mass=torch.cat([m.mass for m in per_layer]),
                        row_total=torch.cat([m.row_total for m in per_layer]),
                        uniform=per_layer[0].uniform, n_queries=per_layer[0].n_queries)
    del output, attentions
    return ExampleAttention(spans, masses, matrix)


def rebuild_prompts(rows: Sequence[dict], eval_config: dict | None, tokenizer, *, prompt_style: str | None = None,
                    data: str | None = None) -> list[str]:
    """The prompts ``memreason eval`` showed for ``rows``: same task, style and worked examples.

    Args:
        rows: result rows (``question`` and ``task`` are used).
        eval_config (dict | None): ``eval_config.json`` beside the results (style, source, shots); None
            for results without one (then no worked examples, and ``prompt_style`` or ``auto``).
        tokenizer: the model's tokenizer (chat template).
        prompt_style (str | None): overrides the recorded style.
        data (str | None): overrides the dataset source the worked examples are read from.

    Raises:
        DataError: a worked example recorded in the config is not in the source's train split.
    """
    from memreason.prompts import render_prompt
    from memreason.tasks import get_task

    config = eval_config or {}
    style = prompt_style or config.get("prompt_style") or "auto"
    shot_ids = list((config.get("extra") or {}).get("shots") or [])
    examples = []
    if shot_ids:
        from memreason.data import load_traces

        source = data or config.get("source")
        if not source:
            raise DataError(f"the evaluation showed worked examples {shot_ids} but records no dataset; "
                            "pass it with --data")
        pool, _ = load_traces(source, task=config.get("task"), split="train", on_unknown_tag="drop",
                              skip_invalid=True)
        by_id = {t.id: t for t in pool}
        missing = [i for i in shot_ids if i not in by_id]
        if missing:
            raise DataError(f"worked examples {missing} used by the evaluation are not in its train split; "
                            "pass the dataset they came from with --data", file=str(source))
        examples = [by_id[i] for i in shot_ids]
    prompts = []
    for row in rows:
        task = get_task(row.get("task") or config.get("task") or "strategyqa")
        prompts.append(render_prompt(row["question"], task, tokenizer, style, examples=examples))
    return prompts


# ---------------------------------------------------------------- collecting and aggregating

@dataclass
class AttentionResult:
    """Per-example masses of many examples (the input of every table).

    Args:
        ids (list[str]): example ids, in order.
        mass: ``[example, layer, head, query_group, table_key_kind]`` numpy float64 (``TABLE_KEY_KINDS``).
        uniform: ``[example, query_group, table_key_kind]`` the uniform-attention baseline.
        n_queries: ``[example, query_group]`` query positions per group.
        token_counts (list[dict]): per example: id, outcome, n_prompt, n_generated and positions per kind.
        meta (dict): model, results file, settings.
    """

    ids: list
    mass: object
    uniform: object
    n_queries: object
    token_counts: list = field(default_factory=list)
    meta: dict = field(default_factory=dict)

    @property
    def n_layers(self) -> int:
        return int(self.mass.shape[1])

    @property
    def n_heads(self) -> int:
        return int(self.mass.shape[2])

    @property
    def has_group(self):
        """``[example, query_group]`` bool: the example has tokens of the group."""
        return self.n_queries > 0

    @property
    def sees_kind(self):
        """``[example, query_group, table_key_kind]`` bool: the group's queries can see keys of the kind."""
        return self.has_group[:, :, None] & (self.uniform > 0)


def _with_markers(array, axis: int):
    """Append the ``markers`` column (sum of the marker_* kinds) along ``axis``."""
    import numpy as np

    columns = [KEY_KINDS.index(k) for k in MARKER_KINDS]
    total = np.take(array, columns, axis=axis).sum(axis=axis, keepdims=True)
    return np.concatenate([array, total], axis=axis)


def collect(examples: Sequence[tuple[dict, ExampleAttention]], meta: dict | None = None) -> AttentionResult:
    """Stack per-example measurements (result row, ExampleAttention) into an ``AttentionResult``."""
    import numpy as np

    if not examples:
        raise ConfigError("no examples to collect")
    mass = np.stack([_with_markers(e.masses.mass.numpy(), -1) for _, e in examples])
    uniform = np.stack([_with_markers(e.masses.uniform.numpy(), -1) for _, e in examples])
    n_queries = np.stack([e.masses.n_queries.numpy() for _, e in examples])
    counts = []
    for row, e in examples:
        counts.append({"id": row.get("id"), "outcome": row.get("outcome"), "n_prompt": e.spans.n_prompt,
                       "n_generated": len(e.spans.kinds) - e.spans.n_prompt, **e.spans.counts()})
    return AttentionResult([row.get("id") for row, _ in examples], mass, uniform, n_queries, counts,
                           dict(meta or {}))


def measure(model, tokenizer, rows: Sequence[dict], prompts: Sequence[str], *,
            progress: Callable[[int], None] | None = None, meta: dict | None = None) -> AttentionResult:
    """Teacher-force every row (its prompt + ``raw``) and collect the masses.

    Raises:
        ConfigError: no rows, or the model gives no attention weights.
    """
    if len(rows) != len(prompts):
        raise ValueError(f"{len(rows)} rows but {len(prompts)} prompts")
    examples = []
    for row, prompt in zip(rows, prompts):
        examples.append((row, teacher_force(model, tokenizer, prompt, row.get("raw") or "",
                                            question=row.get("question"))))
        if progress:
            progress(1)
    return collect(examples, meta)


def bootstrap_mean_ci(values, valid, *, confidence: float = 0.95, n_resamples: int = 1000, seed: int = 0):
    """Mean over examples of each column, with a percentile bootstrap CI (examples resampled).

    Args:
        values: ``[example, column]`` numbers.
        valid: ``[example, column]`` bool; only valid entries count.
        confidence (float, default 0.95); n_resamples (int, default 1000); seed (int, default 0).

    Returns:
        (mean, low, high, n): arrays ``[column]``; NaN where a column has no valid entry.
    """
    import numpy as np

    values = np.asarray(values, dtype=np.float64)
    valid = np.asarray(valid, dtype=bool)
    n_examples, n_columns = values.shape
    n = valid.sum(0)
    x = np.where(valid, values, 0.0)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = x.sum(0) / n
    low, high = np.full(n_columns, np.nan), np.full(n_columns, np.nan)
    if n_examples == 0:
        return mean, low, high, n
    rng = np.random.default_rng(seed)
    # How often each example is drawn in each resample: resampled means become two matrix products.
    # [resample, example]
    weights = rng.multinomial(n_examples, np.full(n_examples, 1.0 / n_examples), size=n_resamples)
    tail = (1.0 - confidence) / 2.0
    chunk = max(1, 4_000_000 // n_resamples)
    for start in range(0, n_columns, chunk):
        cols = slice(start, start + chunk)
        with np.errstate(invalid="ignore", divide="ignore"):
            means = (weights @ x[:, cols]) / (weights @ valid[:, cols].astype(np.float64))  # [resample, column]
        ok = n[cols] > 0
        if ok.any():
            block = means[:, ok]
            # a resample that drew no valid entry for a column has no mean there: ignore it
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)
                low[cols][ok] = np.nanquantile(block, tail, axis=0)
                high[cols][ok] = np.nanquantile(block, 1.0 - tail, axis=0)
    return mean, low, high, n


def _table(values, result: AttentionResult, index_names: list[str], index_values: list[tuple],
           seed: int) -> list[dict]:
    """Rows of a long table from ``values[example, *index, group, kind]``.

    ``mean`` (with its CI and ``n``) averages over the examples that have the query group, a kind the
    group cannot see counting as 0, so the means over ``KEY_KINDS`` sum to the row total;
    ``mean_when_seen`` / ``n_seen`` average only over examples whose group can see the kind.
    """
    import numpy as np

    n_examples = values.shape[0]
    flat = values.reshape(n_examples, -1)
    # presence and the baseline depend only on (group, kind): repeat them over the leading index
    lead = int(np.prod(values.shape[1:-2])) if values.ndim > 3 else 1
    has_group = np.broadcast_to(result.has_group[:, :, None], result.uniform.shape)
    flat_group = np.tile(has_group.reshape(n_examples, -1), (1, lead))
    flat_seen = np.tile(result.sees_kind.reshape(n_examples, -1), (1, lead))
    flat_uniform = np.tile(np.where(has_group, result.uniform, 0.0).reshape(n_examples, -1), (1, lead))
    mean, low, high, n = bootstrap_mean_ci(flat, flat_group, seed=seed)
    n_seen = flat_seen.sum(0)
    with np.errstate(invalid="ignore", divide="ignore"):
        uniform_mean = flat_uniform.sum(0) / n
        mean_seen = np.where(flat_seen, flat, 0.0).sum(0) / n_seen
    rows = []
    cells = [(g, k) for g in QUERY_GROUPS for k in TABLE_KEY_KINDS]
    for column in range(flat.shape[1]):
        if n[column] == 0:
            continue
        lead_index, cell = divmod(column, len(cells))
        group, kind = cells[cell]
        row = dict(zip(index_names, index_values[lead_index]))
        enrichment = mean[column] / uniform_mean[column] if uniform_mean[column] > 0 else float("nan")
        row.update(query=group, key=kind, n=int(n[column]), mean=float(mean[column]), ci_low=float(low[column]),
                   ci_high=float(high[column]), uniform=float(uniform_mean[column]), enrichment=float(enrichment),
                   n_seen=int(n_seen[column]), mean_when_seen=float(mean_seen[column]))
        rows.append(row)
    return rows


def head_table(result: AttentionResult, seed: int = 0) -> list[dict]:
    """One row per (layer, head, query group, key kind) for every query group present in some example:
    ``mean`` attention mass with a 95% bootstrap CI over the ``n`` examples that have the group, the
    uniform baseline, ``enrichment = mean / uniform``, and ``mean_when_seen`` over the ``n_seen`` examples
    whose group can see the kind."""
    index = [(layer, head) for layer in range(result.n_layers) for head in range(result.n_heads)]
    return _table(result.mass, result, ["layer", "head"], index, seed)


def layer_table(result: AttentionResult, seed: int = 0) -> list[dict]:
    """Like ``head_table`` with each example's masses averaged over heads first."""
    index = [(layer,) for layer in range(result.n_layers)]
    return _table(result.mass.mean(axis=2), result, ["layer"], index, seed)


def overall_table(result: AttentionResult, seed: int = 0) -> list[dict]:
    """Like ``layer_table`` with each example's masses averaged over layers and heads."""
    return _table(result.mass.mean(axis=(1, 2)), result, [], [()], seed)


# ---------------------------------------------------------------- files

def write_table(rows: Sequence[dict], path: str | Path) -> Path:
    """Write rows (dicts with the same keys) as CSV; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]) if rows else ["query", "key"])
        writer.writeheader()
        writer.writerows(rows)
    return path


def read_table(path: str | Path) -> list[dict]:
    """Read a CSV written by ``write_table``; numeric fields come back as int or float.

    Raises:
        DataError: the file is missing.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError("table not found", file=str(path))
    rows = []
    with open(path, newline="", encoding="utf-8") as handle:
        for row in csv.DictReader(handle):
            for key, value in row.items():
                try:
                    row[key] = int(value)
                except ValueError:
                    try:
                        row[key] = float(value)
                    except ValueError:
                        pass
            rows.append(row)
    return rows


def save(result: AttentionResult, out_dir: str | Path, seed: int = 0) -> dict[str, Path]:
    """Write the per-example tensors (safetensors), the token counts (JSONL), the three tables (CSV)
    and a summary (JSON) to ``out_dir``; returns what was written, by name."""
    import numpy as np
    import torch
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {}
    tensors = {"mass": torch.from_numpy(np.ascontiguousarray(result.mass)),
               "uniform": torch.from_numpy(np.ascontiguousarray(result.uniform)),
               "n_queries": torch.from_numpy(np.ascontiguousarray(result.n_queries).astype(np.int64))}
    metadata = {"ids": json.dumps(result.ids), "query_groups": json.dumps(QUERY_GROUPS),
                "key_kinds": json.dumps(TABLE_KEY_KINDS),
                "layout": "mass [example, layer, head, query_group, key_kind]; "
                          "uniform [example, query_group, key_kind]; "
                          "n_queries [example, query_group]"}
    paths["examples"] = out / EXAMPLES
    save_file(tensors, str(paths["examples"]), metadata=metadata)
    paths["tokens"] = out / TOKENS
    paths["tokens"].write_text("".join(json.dumps(row) + "\n" for row in result.token_counts), encoding="utf-8")
    paths["by_head"] = write_table(head_table(result, seed), out / BY_HEAD)
    by_layer = layer_table(result, seed)
    paths["by_layer"] = write_table(by_layer, out / BY_LAYER)
    overall = overall_table(result, seed)
    summary = {"n_examples": len(result.ids), "n_layers": result.n_layers, "n_heads": result.n_heads,
               "query_groups": list(QUERY_GROUPS), "key_kinds": list(TABLE_KEY_KINDS), "bootstrap_seed": seed,
               "overall": overall, **result.meta}
    paths["summary"] = out / SUMMARY
    paths["summary"].write_text(json.dumps(summary, indent=1), encoding="utf-8")
    return paths


def load(out_dir: str | Path) -> AttentionResult:
    """Read back what ``save`` wrote (no model needed).

    Raises:
        DataError: the directory holds no attention measurements.
    """
    import numpy as np
    from safetensors import safe_open

    out = Path(out_dir)
    path = out / EXAMPLES
    if not path.is_file():
        raise DataError("no attention measurements here; run `memreason inspect attention` first", file=str(path))
    with safe_open(str(path), framework="np") as handle:
        metadata = handle.metadata() or {}
        missing = {"mass", "uniform", "n_queries"} - set(handle.keys())
        if missing or json.loads(metadata.get("key_kinds", "[]")) != list(TABLE_KEY_KINDS):
            raise DataError("written by another version of memreason (tensors or span kinds differ); "
                            "re-run `memreason inspect attention`", file=str(path))
        mass, uniform = handle.get_tensor("mass"), handle.get_tensor("uniform")
        n_queries = handle.get_tensor("n_queries")
    counts = []
    if (out / TOKENS).is_file():
        counts = [json.loads(line) for line in (out / TOKENS).read_text(encoding="utf-8").splitlines() if line]
    meta = json.loads((out / SUMMARY).read_text(encoding="utf-8")) if (out / SUMMARY).is_file() else {}
    return AttentionResult(json.loads(metadata.get("ids", "[]")), np.asarray(mass), np.asarray(uniform),
                           np.asarray(n_queries),
                           counts, meta)


def token_table(example: ExampleAttention, *, layer: int, head: int, example_id: str | None = None) -> dict:
    """A JSON-ready table of one head's attention over the generated tokens, for a token heatmap.

    Queries are the generated tokens; keys are the generated tokens plus three summed columns for the
    prompt side (``first``, ``prompt``, ``question``), so each row still sums to its row total.

    Raises:
        ValueError: ``example`` kept no attention map.
    """
    if example.matrix is None:
        raise ValueError("this example kept no attention map; teacher_force(..., keep=(layer, head))")
    m = example.matrix.double()  # [q_pos, k_pos]
    spans, start = example.spans, example.spans.n_prompt
    prompt_kinds = spans.kinds[:start]
    columns = []
    for kind in ("first", "prompt", "question"):
        keys = [i for i, k in enumerate(prompt_kinds) if k == kind]
        columns.append(m[start:, keys].sum(-1) if keys else m[start:, :0].sum(-1))  # [q]
    import torch

    values = torch.cat([torch.stack(columns, -1), m[start:, start:]], -1)  # [q, 3 + k_generated]
    generated = list(spans.tokens[start:])
    return {"id": example_id, "layer": layer, "head": head,
            "query_tokens": generated, "query_kinds": list(spans.kinds[start:]),
            "key_tokens": ["[first]", "[prompt]", "[question]"] + generated,
            "key_kinds": ["first", "prompt", "question"] + list(spans.kinds[start:]),
            "values": [[round(float(v), 6) for v in row] for row in values]}
