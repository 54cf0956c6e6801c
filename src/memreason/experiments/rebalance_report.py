"""Summary statistics and the text report of a rebalancing run (``experiments.rebalance_mmlu``).

This module owns what is computed *from* per-question rows, never a model call:

* per-row mechanism diagnostics, accumulated from the ``ForwardRecord``s of
  ``interventions.attention_rebalance`` (layer-0 mask density overall, per head and against row length;
  share of the added attention mass that lands on the first token);
* ``summarise``: per-category accuracy with Wilson 95% CIs, per-question flips against the baseline and
  between the method and each control with exact McNemar tests and paired-bootstrap CIs of the difference
  (``memreason.stats``), generated-length statistics (CoT), and the spec §9 B3 verdict;
* ``format_report``: the plain-text report the CLI prints.
"""

from __future__ import annotations

import math
import statistics
from typing import TYPE_CHECKING, Iterable, Sequence

from memreason.data.mmlu import CATEGORIES
from memreason.stats import mcnemar_exact, paired_bootstrap_ci, wilson_ci
from memreason.tasks import UNPARSEABLE

if TYPE_CHECKING:
    from memreason.experiments.rebalance_mmlu import RebalanceSettings

METHOD = "mask"
BASELINE = "baseline"
# Row-length bins (keys a query row can attend to) of the density-vs-length diagnostic.
LENGTH_BINS = (16, 32, 64, 100, 128, 256, 512, 1024, 2048)


# ---------------------------------------------------------------------------------------------------------
# Per-row diagnostics from the mechanism's ForwardRecords
# ---------------------------------------------------------------------------------------------------------
def _bin_label(row_allowed: int) -> str:
    for edge in LENGTH_BINS:
        if row_allowed <= edge:
            return f"<={edge}"
    return f">{LENGTH_BINS[-1]}"


def _accumulate(acc: dict, record, item: int) -> None:
    """Add one batch item's rows of one forward to the running sums in ``acc``."""
    keys = record.row_keys[item].double()  # [head, q]
    allowed = record.row_allowed[item].double()  # [q]
    heads = keys.shape[0]
    acc["keys"] += float(keys.sum())
    acc["allowed"] += float(allowed.sum()) * heads
    acc["rows"] += int((allowed > 0).sum()) * heads
    per_head = keys.sum(-1).tolist()
    acc["head_keys"] = [a + b for a, b in zip(acc["head_keys"], per_head)] if acc["head_keys"] else per_head
    acc["head_allowed"] += float(allowed.sum())
    for q, n_allowed in enumerate(allowed.tolist()):
        if n_allowed > 0:
            label = _bin_label(int(n_allowed))
            slot = acc["bins"].setdefault(label, [0.0, 0.0])
            slot[0] += float(keys[:, q].sum())
            slot[1] += n_allowed * heads
    if record.first_added.numel():
        acc["first"] += float(record.first_added[:, item].sum())
        acc["added"] += float(record.total_added[:, item].sum())


def _new_acc() -> dict:
    return {"keys": 0.0, "allowed": 0.0, "rows": 0, "head_keys": [], "head_allowed": 0.0, "bins": {},
            "first": 0.0, "added": 0.0}


def _finish_acc(acc: dict) -> dict:
    def ratio(a, b):
        return a / b if b > 0 else None

    return {
        "mask_density": ratio(acc["keys"], acc["allowed"]),
        "keys_per_row": ratio(acc["keys"], acc["rows"]),
        "density_per_head": [ratio(k, acc["head_allowed"]) for k in acc["head_keys"]],
        "first_token_share": ratio(acc["first"], acc["added"]),
        "added_mass": acc["added"],
        "density_bins": acc["bins"],
    }


def row_diagnostics(records: Sequence, item: int) -> dict:
    """Mechanism diagnostics of batch row ``item`` summed over ``records`` (the forwards behind its answer).

    Args:
        records (Sequence[ForwardRecord]): from a ``rebalance(..., diagnostics=True)`` session.
        item (int): the row of the question in those forwards' batches.

    Returns:
        dict: ``mask_density``, ``keys_per_row``, ``density_per_head``, ``first_token_share``, ``added_mass``
        and ``density_bins`` (label -> [selected keys, allowed keys]).
    """
    acc = _new_acc()
    for record in records:
        _accumulate(acc, record, item)
    return _finish_acc(acc)


# ---------------------------------------------------------------------------------------------------------
# Statistics
# ---------------------------------------------------------------------------------------------------------
def _accuracy(correct: Sequence[bool]) -> dict:
    n, k = len(correct), sum(bool(c) for c in correct)
    lower, upper = wilson_ci(k, n)
    return {"n": n, "correct": k, "accuracy": k / n, "ci95": [lower, upper]}


def _length_stats(lengths: Sequence[int], hit_cap: Sequence[bool]) -> dict:
    ordered = sorted(lengths)
    return {"mean": statistics.fmean(ordered), "median": statistics.median(ordered),
            "p90": ordered[min(len(ordered) - 1, math.ceil(0.9 * len(ordered)) - 1)], "max": ordered[-1],
            "hit_cap_rate": sum(hit_cap) / len(hit_cap)}


def _compare(first: list[dict], second: list[dict], settings: RebalanceSettings, categories: Iterable[str]) -> dict:
    """Paired comparison ``second`` vs ``first`` (rows aligned by question)."""
    def block(a_rows, b_rows):
        a = [int(r["correct"]) for r in a_rows]
        b = [int(r["correct"]) for r in b_rows]
        only_a = sum(1 for x, y in zip(a, b) if x and not y)
        only_b = sum(1 for x, y in zip(a, b) if y and not x)
        diff, lower, upper = paired_bootstrap_ci(a, b, n_resamples=settings.bootstrap_resamples, seed=settings.seed)
        return {"n": len(a), "only_first_correct": only_a, "only_second_correct": only_b,
                "mcnemar_p": mcnemar_exact(only_a, only_b), "accuracy_diff": diff, "diff_ci95": [lower, upper]}

    result = block(first, second)
    result["flips"] = {"lost": [a["qid"] for a, b in zip(first, second) if a["correct"] and not b["correct"]],
                       "gained": [a["qid"] for a, b in zip(first, second) if b["correct"] and not a["correct"]]}
    result["categories"] = {}
    for category in categories:
        pairs = [(a, b) for a, b in zip(first, second) if a["category"] == category]
        if pairs:
            result["categories"][category] = block([a for a, _ in pairs], [b for _, b in pairs])
    if settings.mode == "cot":
        diff, lower, upper = paired_bootstrap_ci([r["n_generated"] for r in first], [r["n_generated"] for r in second],
                                                 n_resamples=settings.bootstrap_resamples, seed=settings.seed)
        result["length_diff"] = {"mean": diff, "ci95": [lower, upper]}
    return result


def _diagnostics_summary(rows: list[dict]) -> dict | None:
    rows = [r for r in rows if r.get("diagnostics")]
    if not rows:
        return None
    acc = _new_acc()
    by_length: dict[str, list[float]] = {}
    for row in rows:
        d = row["diagnostics"]
        for label, (keys, allowed) in d["density_bins"].items():
            slot = acc["bins"].setdefault(label, [0.0, 0.0])
            slot[0] += keys
            slot[1] += allowed
        if d["mask_density"] is not None:
            label = "<100 tokens" if row["prompt_tokens"] < 100 else ("100-300 tokens" if row["prompt_tokens"] <= 300
                                                                      else ">300 tokens")
            by_length.setdefault(label, []).append(d["mask_density"])
    densities = [r["diagnostics"]["mask_density"] for r in rows if r["diagnostics"]["mask_density"] is not None]
    shares = [r["diagnostics"]["first_token_share"] for r in rows
              if r["diagnostics"]["first_token_share"] is not None]
    heads = [r["diagnostics"]["density_per_head"] for r in rows if r["diagnostics"]["density_per_head"]]
    keys_per_row = [r["diagnostics"]["keys_per_row"] for r in rows if r["diagnostics"]["keys_per_row"] is not None]
    order = [f"<={edge}" for edge in LENGTH_BINS] + [f">{LENGTH_BINS[-1]}"]
    return {
        "mean_mask_density": statistics.fmean(densities) if densities else None,
        "mask_density_by_prompt_length": {label: {"n": len(v), "mean": statistics.fmean(v)}
                                          for label, v in sorted(by_length.items())},
        "mask_density_by_row_length": {label: acc["bins"][label][0] / acc["bins"][label][1]
                                       for label in order if label in acc["bins"] and acc["bins"][label][1] > 0},
        "mask_density_per_head": ([statistics.fmean(h[i] for h in heads if h[i] is not None)
                                   for i in range(len(heads[0]))] if heads else []),
        "mean_keys_per_row": statistics.fmean(keys_per_row) if keys_per_row else None,
        "first_token_share_of_added_mass": statistics.fmean(shares) if shares else None,
    }


def summarise(rows: list[dict], names: Sequence[str], settings: RebalanceSettings,
              run_info: dict | None = None) -> dict:
    """Accuracy per condition and category with Wilson CIs, paired comparisons, lengths and diagnostics.

    Args:
        rows (list[dict]): per-question rows of every condition (each question present in every condition).
        names (Sequence[str]): condition names, baseline first.
        settings (RebalanceSettings): for the mode, the bootstrap size and seed.
        run_info (dict | None): copied into the summary as ``run``.

    Returns:
        dict: ``{"run", "conditions": {name: {...}}, "comparisons": [...]}``.
    """
    by_condition = {name: sorted((r for r in rows if r["condition"] == name), key=lambda r: r["qid"])
                    for name in names}
    qids = [r["qid"] for r in by_condition[names[0]]]
    for name in names:
        if [r["qid"] for r in by_condition[name]] != qids:
            raise ValueError(f"condition {name} does not cover the same questions as {names[0]}")
    present = [c for c in CATEGORIES if any(r["category"] == c for r in by_condition[names[0]])]
    conditions = {}
    for name in names:
        condition_rows = by_condition[name]
        entry = {"params": condition_rows[0]["params"] if condition_rows else None,
                 "overall": _accuracy([r["correct"] for r in condition_rows]),
                 "categories": {c: _accuracy([r["correct"] for r in condition_rows if r["category"] == c])
                                for c in present}}
        if settings.mode == "cot":
            entry["parse_rate"] = sum(r["outcome"] != UNPARSEABLE for r in condition_rows) / len(condition_rows)
            entry["length"] = _length_stats([r["n_generated"] for r in condition_rows],
                                            [r["hit_cap"] for r in condition_rows])
        else:
            entry["mean_p_gold"] = statistics.fmean(r["p_gold"] for r in condition_rows)
        entry["diagnostics"] = _diagnostics_summary(condition_rows)
        conditions[name] = entry
    pairs = [(BASELINE, name) for name in names if name != BASELINE]
    if METHOD in names:
        pairs += [(name, METHOD) for name in names if name not in (BASELINE, METHOD)]
    comparisons = []
    for first, second in pairs:
        comparison = {"first": first, "second": second}
        comparison.update(_compare(by_condition[first], by_condition[second], settings, present))
        comparisons.append(comparison)
    return {"run": run_info or {}, "conditions": conditions, "comparisons": comparisons,
            "verdict": _verdict(comparisons, names)}


def _verdict(comparisons: list[dict], names: Sequence[str]) -> dict:
    """Spec §9 B3: the layer-0 mask matters only if the method beats the baseline *and* both controls
    (boost-all, random mask) with a paired CI above 0 and McNemar p < 0.05; otherwise any effect is an
    attention-gain effect. (Stability of the sign across alpha needs several runs and is not judged here.)"""
    needed = [BASELINE, "boost-all", "random-mask"]
    if METHOD not in names or any(name not in names for name in needed):
        return {"mask_matters": None, "reason": "needs the conditions baseline, mask, boost-all and random-mask"}
    failing = []
    for first in needed:
        comp = next(c for c in comparisons if c["first"] == first and c["second"] == METHOD)
        if not (comp["diff_ci95"][0] > 0 and comp["mcnemar_p"] < 0.05):
            failing.append(f"mask vs {first}: {100 * comp['accuracy_diff']:+.1f} points, "
                           f"CI [{100 * comp['diff_ci95'][0]:+.1f}, {100 * comp['diff_ci95'][1]:+.1f}], "
                           f"p = {comp['mcnemar_p']:.3g}")
    if failing:
        return {"mask_matters": False, "reason": "not shown: " + "; ".join(failing)}
    return {"mask_matters": True, "reason": "mask beats baseline, boost-all and random-mask (CI > 0, p < 0.05)"}


def format_report(summary: dict) -> str:
    """A plain-text report of a summary: accuracy table, paired comparisons, lengths and diagnostics."""
    conditions = summary["conditions"]
    names = list(conditions)
    categories = list(next(iter(conditions.values()))["categories"])
    mode = summary.get("run", {}).get("settings", {}).get("mode", "ll")

    def pct(value):
        return "   -  " if value is None else f"{100 * value:5.1f}"

    def cell(acc):
        return f"{pct(acc['accuracy'])} [{pct(acc['ci95'][0]).strip()}, {pct(acc['ci95'][1]).strip()}]"

    width = 22
    header = f"{'condition':<13}" + "".join(f"{label[:width]:>{width + 2}}" for label in ["overall", *categories])
    lines = [f"accuracy % [Wilson 95% CI], n = {conditions[names[0]]['overall']['n']} questions "
             f"({'log-likelihood' if mode == 'll' else 'chain of thought'})", header]
    for name in names:
        entry = conditions[name]
        row = f"{name:<13}{cell(entry['overall']):>{width + 2}}"
        row += "".join(f"{cell(entry['categories'][c]):>{width + 2}}" for c in categories)
        lines.append(row)
    lines.append("category n: " + ", ".join(f"{c} {conditions[names[0]]['categories'][c]['n']}" for c in categories))
    lines.append("")
    lines.append("paired comparisons (second - first, accuracy points; bootstrap 95% CI; exact McNemar):")
    for comp in summary["comparisons"]:
        lo, hi = comp["diff_ci95"]
        text = (f"  {comp['second']:>12} vs {comp['first']:<12} {100 * comp['accuracy_diff']:+5.1f} "
                f"[{100 * lo:+.1f}, {100 * hi:+.1f}]  gained {comp['only_second_correct']:>3}, "
                f"lost {comp['only_first_correct']:>3}, p = {comp['mcnemar_p']:.3g}")
        if "length_diff" in comp:
            text += f"; length {comp['length_diff']['mean']:+.1f} tokens"
        lines.append(text)
    if mode == "cot":
        lines.append("")
        lines.append("generation: parse rate, mean / median / p90 generated tokens, share at the cap")
        for name in names:
            entry = conditions[name]
            length = entry["length"]
            lines.append(f"  {name:<13} {pct(entry['parse_rate'])}%  {length['mean']:.1f} / {length['median']:.0f} / "
                         f"{length['p90']}  {pct(length['hit_cap_rate'])}%")
    else:
        lines.append("")
        lines.append("mean probability of the gold letter (renormalised over A-D): " + ", ".join(
            f"{name} {conditions[name]['mean_p_gold']:.3f}" for name in names))
    diag_lines = []
    for name in names:
        d = conditions[name]["diagnostics"]
        if not d:
            continue
        by_row = ", ".join(f"{label} {pct(v).strip()}" for label, v in d["mask_density_by_row_length"].items())
        share = d["first_token_share_of_added_mass"]
        keys = "-" if d["mean_keys_per_row"] is None else f"{d['mean_keys_per_row']:.1f}"
        diag_lines.append(f"  {name:<13} density {pct(d['mean_mask_density']).strip()}% (keys/row {keys}); "
                          f"first-token share of added mass {pct(share).strip()}%")
        diag_lines.append(f"  {'':<13} density % by keys per row: {by_row}")
    if diag_lines:
        lines.append("")
        lines.append("mechanism diagnostics (layer-0 mask, self excluded; boost-all boosts every pair):")
        lines.extend(diag_lines)
    verdict = summary.get("verdict") or {}
    if verdict.get("mask_matters") is not None:
        lines.append("")
        lines.append(f"does the layer-0 mask matter (spec §9 B3)? {'yes' if verdict['mask_matters'] else 'no'}: "
                     f"{verdict['reason']}")
    return "\n".join(lines)

