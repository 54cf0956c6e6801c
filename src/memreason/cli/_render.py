"""Terminal rendering shared by verbs: result tables and traces with memory and reason steps told apart
(colour on a terminal, ``[memory]`` / ``[reason]`` tags otherwise)."""

from __future__ import annotations

import sys

_COLOURS = {"memory": "\033[34m", "reason": "\033[32m", "step": "\033[33m"}
_RESET = "\033[0m"


def _use_colour() -> bool:
    return sys.stdout.isatty()


def format_table(headers: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(x)) for x in column) for column in zip(headers, *rows)]
    line = lambda cells: "  ".join(str(c).ljust(w) for c, w in zip(cells, widths)).rstrip()  # noqa: E731
    return "\n".join([line(headers), line(["-" * w for w in widths])] + [line(r) for r in rows])


def summary_row(name: str, summary: dict) -> list[str]:
    low, high = summary["ci95"]
    return [name, str(summary["n"]), f"{summary['accuracy']:.3f}", f"[{low:.3f}, {high:.3f}]",
            str(summary["unparseable"]), f"{summary['mean_memory_steps']:.2f}", f"{summary['mean_reason_steps']:.2f}",
            f"{summary['mean_generated_tokens']:.1f}", f"{summary['mean_marker_tokens']:.1f}"]


SUMMARY_HEADERS = ["model", "n", "accuracy", "95% CI", "unparseable", "memory/ans", "reason/ans", "tokens/ans",
                   "marker tok/ans"]


def format_steps(steps, indent: str = "  ") -> str:
    """Steps (``memreason.traces.Step``) one per line, tagged or coloured by kind."""
    colour = _use_colour()
    lines = []
    for step in steps:
        kind = step.kind
        label = f"[{kind}]".ljust(9)
        text = f"{label} {step.text}"
        lines.append(indent + (f"{_COLOURS.get(kind, '')}{text}{_RESET}" if colour else text))
    return "\n".join(lines) if lines else indent + "(no steps)"


def format_result(result) -> str:
    """A ``Result``: question, steps, predicted and gold answer with the outcome."""
    head = f"Q: {result.question}"
    tail = f"  → predicted {result.predicted!s}, gold {result.gold} ({result.outcome})"
    return "\n".join([head, format_steps(result.steps), tail])
