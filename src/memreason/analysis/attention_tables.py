"""Attention masses of many examples, as tables: the mean mass each query group puts on each span kind
per layer and head, with bootstrap CIs, and the files ``memreason inspect attention`` writes.

``measure`` teacher-forces result rows (``memreason.analysis.attention.teacher_force``) and ``collect``s
their masses into an ``AttentionResult``. The tables average over the examples that have the query group
(a kind the group cannot see counts as 0, so the means over ``KEY_KINDS`` still sum to the row total),
with a 95% percentile bootstrap CI (``memreason.stats.bootstrap_column_means``, resampling examples, seeded);
``enrichment = mean / uniform`` compares with the span's share of the visible tokens, and
``mean_when_seen`` averages only over the examples whose group can see the kind. ``save`` / ``load`` write
and read the per-example tensors (safetensors), token counts (JSONL), tables (CSV) and a summary (JSON);
nothing here needs a model once the masses are measured.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass, field
from io import StringIO
from pathlib import Path
from typing import Callable, Sequence

from memreason.analysis.attention import (KEY_KINDS, MARKER_KINDS, QUERY_GROUPS, TABLE_KEY_KINDS, ExampleAttention,
                                          teacher_force)
from memreason.errors import ConfigError, DataError
from memreason.io import atomic_write, read_json, read_jsonl, write_json
from memreason.stats import bootstrap_column_means
from memreason.traces import Result

BY_HEAD = "attention_by_head.csv"
BY_LAYER = "attention_by_layer.csv"
EXAMPLES = "attention_examples.safetensors"
TOKENS = "attention_tokens.jsonl"
SUMMARY = "attention_summary.json"


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


def collect(examples: Sequence[tuple[Result, ExampleAttention]], meta: dict | None = None) -> AttentionResult:
    """Stack per-example measurements (result row, ExampleAttention) into an ``AttentionResult``."""
    import numpy as np

    if not examples:
        raise ConfigError("no examples to collect")
    mass = np.stack([_with_markers(e.masses.mass.numpy(), -1) for _, e in examples])
    uniform = np.stack([_with_markers(e.masses.uniform.numpy(), -1) for _, e in examples])
    n_queries = np.stack([e.masses.n_queries.numpy() for _, e in examples])
    counts = []
    for row, e in examples:
        counts.append({"id": row.id, "outcome": row.outcome, "n_prompt": e.spans.n_prompt,
                       "n_generated": len(e.spans.kinds) - e.spans.n_prompt, **e.spans.counts()})
    return AttentionResult([row.id for row, _ in examples], mass, uniform, n_queries, counts, dict(meta or {}))


def measure(model, tokenizer, rows: Sequence[Result], prompts: Sequence[str], *,
            progress: Callable[[int], None] | None = None, meta: dict | None = None) -> AttentionResult:
    """Teacher-force every row (its prompt, see ``row_prompts``, + ``raw``) and collect the masses.

    Raises:
        ConfigError: no rows, or the model gives no attention weights.
    """
    if len(rows) != len(prompts):
        raise ValueError(f"{len(rows)} rows but {len(prompts)} prompts")
    examples = []
    for row, prompt in zip(rows, prompts):
        examples.append((row, teacher_force(model, tokenizer, prompt, row.raw, question=row.question)))
        if progress:
            progress(1)
    return collect(examples, meta)


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
    mean, low, high, n = bootstrap_column_means(flat, flat_group, seed=seed)
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
    """Write rows (dicts with the same keys) as CSV, atomically; returns the path."""
    buffer = StringIO(newline="")
    writer = csv.DictWriter(buffer, fieldnames=list(rows[0]) if rows else ["query", "key"])
    writer.writeheader()
    writer.writerows(rows)
    atomic_write(path, buffer.getvalue())
    return Path(path)


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
    from safetensors.torch import save as safetensors_bytes

    out = Path(out_dir)
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
    atomic_write(paths["examples"], safetensors_bytes(tensors, metadata=metadata))
    paths["tokens"] = out / TOKENS
    atomic_write(paths["tokens"], "".join(json.dumps(row) + "\n" for row in result.token_counts))
    paths["by_head"] = write_table(head_table(result, seed), out / BY_HEAD)
    by_layer = layer_table(result, seed)
    paths["by_layer"] = write_table(by_layer, out / BY_LAYER)
    overall = overall_table(result, seed)
    summary = {"n_examples": len(result.ids), "n_layers": result.n_layers, "n_heads": result.n_heads,
               "query_groups": list(QUERY_GROUPS), "key_kinds": list(TABLE_KEY_KINDS), "bootstrap_seed": seed,
               "overall": overall, **result.meta}
    paths["summary"] = out / SUMMARY
    write_json(paths["summary"], summary)
    return paths


def load(out_dir: str | Path) -> AttentionResult:
    """Read back what ``save`` wrote (no model needed).

    Raises:
        DataError: the directory holds no attention measurements, or a file there is not what ``save`` wrote.
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
    counts = read_jsonl(out / TOKENS) if (out / TOKENS).is_file() else []
    meta = read_json(out / SUMMARY) if (out / SUMMARY).is_file() else {}
    return AttentionResult(json.loads(metadata.get("ids", "[]")), np.asarray(mass), np.asarray(uniform),
                           np.asarray(n_queries), counts, meta)
