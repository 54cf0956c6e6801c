"""Attention per step kind in one sequence: which tokens belong to which span, how much attention each
span receives, and the teacher-forcing driver that measures it on an evaluated trace.

**Span bookkeeping.** A teacher-forced sequence is the rendered prompt followed by a result row's ``raw``
text (generated text, markers kept). Prompt and raw text are tokenized *separately* (as ``generate``
did; re-tokenizing the decoded text can split a word differently from the ids the model sampled, which
changes positions but not what the text says) and every token gets exactly one *span kind* from its
characters (``return_offsets_mapping``):

* prompt tokens: ``first`` (position 0, where attention sinks collect), ``question`` (tokens overlapping
  the question's text, its last occurrence in the prompt, so few-shot questions do not count) and
  ``prompt`` (everything else: chat template, instruction, worked examples);
* generated tokens: the raw text is cut into spans by ``memreason.model.tokens.spans``, the function
  ``parse`` is built from (the marker grammar lives there alone): a *marker run* announces a ``memory``,
  ``reason``, ``answer`` or unlabelled ``step`` span that runs to the next run; text without markers is
  cut into lines.
* A generated token that contains any character of a marker run is a **marker token**. Markers belong to
  the kind they announce *and* are their own span kind: a marker token's kind is ``marker_<kind>``
  (``marker_memory``, ``marker_reason``, ``marker_answer``, ``marker_step``), never ``memory`` etc., and
  the tables add ``markers`` = the sum of the four. Other generated tokens take their span's kind:
  ``memory``, ``reason``, ``step`` or ``answer`` (the answer line's text).

``KEY_KINDS`` is a partition of the positions: the attention a query puts on the key kinds sums to the
query's row total (1 for softmax attention) — ``markers`` is derived and never part of that sum.

**Masses.** For a layer, head, *query group* (``QUERY_GROUPS``: the text tokens of memory steps, reason
steps, unlabelled steps, the answer line, and all marker tokens) and key kind, the mass is the mean over
the group's query positions of the summed attention on keys of that kind. ``uniform`` is the mass a query
would give the kind if it spread its attention evenly over the keys it can see (the kind's share of the
visible tokens); ``enrichment = mass / uniform`` says how much more than its share a span receives.
``memreason.analysis.attention_tables`` averages the masses of many examples into tables.

The driver (``teacher_force``) needs eager attention: under sdpa, ``output_attentions=True``
returns an empty tuple (ecosystem.md §3.2). It holds one sequence's attention maps at a time.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Sequence

from memreason.errors import ConfigError, DataError
from memreason.model.tokens import spans as text_spans
from memreason.traces import Result

logger = logging.getLogger(__name__)

# Every position gets exactly one of these (a partition: masses over them sum to the row total).
KEY_KINDS = ("first", "prompt", "question", "memory", "reason", "step", "answer",
             "marker_memory", "marker_reason", "marker_step", "marker_answer")
MARKER_KINDS = tuple(k for k in KEY_KINDS if k.startswith("marker_"))
# Key kinds in the tables: the partition plus ``markers`` (the sum of the marker_* kinds).
TABLE_KEY_KINDS = KEY_KINDS + ("markers",)
# Which query positions are averaged: text tokens of a span kind, or all marker tokens.
QUERY_GROUPS = ("memory", "reason", "step", "answer", "markers")


# ---------------------------------------------------------------- span bookkeeping (pure)

def char_kinds(raw: str) -> list[str]:
    """The span kind of every character of generated text: ``marker_<kind>`` inside a marker run, else
    the kind of its span (``memreason.model.tokens.spans``)."""
    kinds = [""] * len(raw)
    for span in text_spans(raw):
        kinds[span.start:span.marker_end] = [f"marker_{span.kind}"] * (span.marker_end - span.start)
        kinds[span.marker_end:span.end] = [span.kind] * (span.end - span.marker_end)
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


# ---------------------------------------------------------------- prompts and token tables

def row_prompts(rows: Sequence[Result], eval_config: dict | None, tokenizer, *, prompt_style: str | None = None,
                data: str | None = None) -> list[str]:
    """The prompt each row was given: the one it recorded (``Result.prompt``), else a rebuilt one.

    Rows written before results schema 2 (``prompt`` None) did not keep their prompt. Only for them is it
    rebuilt, the way ``memreason eval`` rendered it (same task, style and worked examples, from
    ``eval_config.json`` and the dataset): a fallback that reads data backwards and trusts the prompt code
    to be unchanged since, kept so that results files written before schema 2 can still be inspected.

    Args:
        rows: result rows.
        eval_config (dict | None): ``eval_config.json`` beside the results (style, source, shots); None
            for results without one (then no worked examples, and ``prompt_style`` or ``auto``).
        tokenizer: the model's tokenizer (chat template), for rebuilt prompts.
        prompt_style (str | None), data (str | None): override the recorded style and the dataset the
            worked examples are read from; used for rebuilt prompts only.

    Raises:
        DataError: a worked example recorded in the config is not in the source's train split.
    """
    legacy = [row for row in rows if row.prompt is None]
    if not legacy:
        return [row.prompt for row in rows]
    logger.warning("%d of %d rows record no prompt (results schema 1); rebuilding them from eval_config.json",
                   len(legacy), len(rows))
    rebuilt = iter(_rebuild_prompts(legacy, eval_config, tokenizer, prompt_style=prompt_style, data=data))
    return [row.prompt if row.prompt is not None else next(rebuilt) for row in rows]


def _rebuild_prompts(rows: Sequence[Result], eval_config: dict | None, tokenizer, *, prompt_style: str | None = None,
                     data: str | None = None) -> list[str]:
    """The prompts ``memreason eval`` showed for legacy ``rows`` (see ``row_prompts``).

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
    return [render_prompt(row.question, get_task(row.task or config.get("task") or "strategyqa"), tokenizer, style,
                          examples=examples) for row in rows]


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
