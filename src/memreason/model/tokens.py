"""The memory/reason control-token scheme: which tokens exist, how a Trace becomes target text
(``format``), how generated text becomes a Trace again (``parse``), and how the tokens enter a model.

Styles (``TokenScheme.style``):

- ``"paper"``: before every step, P shared prefix tokens and S tokens of the step's kind; before the answer
  line, the prefix and S answer tokens (Jin et al., P=3, S=4). ``n_special=0`` is the paper's "0 tokens"
  ablation: the same decomposed steps, delimited by the prefix only, with no kind information.
- ``"compact"``: one marker per step, ``<memory>`` / ``<reason>`` / ``<answer>``.
- ``"plain"``: plain chain of thought, one step per line, no markers (steps parse back unlabelled).
- ``"direct"``: the answer line only.

Markers are written back to back (``<prefix_0><prefix_1><memory_0> text``) so each costs exactly one token;
the paper separates them with spaces, which costs a space token per marker in byte-level vocabularies.
New tokens are plain (non-special) added tokens, so decoding with ``skip_special_tokens=True`` keeps them.

The marker grammar lives here and nowhere else. ``spans`` cuts generated text into character spans (a
*marker run* of markers separated only by spaces/tabs announces a span, which runs to the next run; text
with no marker is cut into lines); ``parse`` is built from those spans, and attention analysis colours
tokens by the same spans, so the two can never disagree. ``has_marker`` / ``count_markers`` answer the
other questions the rest of memreason asks about markers.
"""

from __future__ import annotations

import re
import warnings
from dataclasses import asdict, dataclass
from typing import Literal

from memreason.errors import ConfigError
from memreason.tasks import ANSWER_MARKER
from memreason.traces import MEMORY, REASON, UNLABELLED, Step, Trace

Style = Literal["paper", "compact", "plain", "direct"]
STYLES = ("paper", "compact", "plain", "direct")
_GROUPS = ("prefix", MEMORY, REASON, "answer")

# One marker: a group name and, in the paper style, an index (``<memory_2>``; compact: ``<memory>``).
_MARKER = re.compile(r"<(prefix|memory|reason|answer)(?:_(\d+))?>")
# A run of markers announcing one span; spaces/tabs between (and before) markers belong to the run.
_MARKER_RUN = re.compile(r"(?:[ \t]*<(?:prefix|memory|reason|answer)(?:_\d+)?>)+")
ANSWER = "answer"
SPAN_KINDS = (MEMORY, REASON, UNLABELLED, ANSWER)


@dataclass(frozen=True)
class TokenScheme:
    """Which control tokens mark the steps of a trace.

    Args:
        style ("paper" | "compact" | "plain" | "direct", default "paper"): see the module docstring.
        n_prefix (int, default 3): P, shared prefix tokens before every step (paper style only).
        n_special (int, default 4): S, kind tokens per step (paper style only; 0 = no kind information).

    Raises:
        ConfigError: unknown style, negative counts, or a paper scheme with no tokens at all.
    """

    style: Style = "paper"
    n_prefix: int = 3
    n_special: int = 4

    def __post_init__(self):
        if self.style not in STYLES:
            raise ConfigError(f"unknown token scheme style {self.style!r}; choose one of {', '.join(STYLES)}")
        for name in ("n_prefix", "n_special"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ConfigError(f"token scheme {name} must be an integer >= 0, got {value!r}")
        if self.style == "paper" and self.n_prefix + self.n_special == 0:
            raise ConfigError("a paper scheme with n_prefix=0 and n_special=0 has no markers; use style 'plain'")
        if self.style != "paper" and (self.n_prefix, self.n_special) != (3, 4):
            warnings.warn(f"n_prefix/n_special are ignored by the {self.style!r} style", stacklevel=3)

    @property
    def labels_steps(self) -> bool:
        """Whether formatted steps carry their kind (so parse can recover it)."""
        return self.style == "compact" or (self.style == "paper" and self.n_special > 0)

    def group(self, name: str) -> list[str]:
        """The marker tokens of one group (``prefix``, ``memory``, ``reason``, ``answer``), in order."""
        if self.style == "compact":
            return [] if name == "prefix" else [f"<{name}>"]
        if self.style != "paper":
            return []
        count = self.n_prefix if name == "prefix" else self.n_special
        return [f"<{name}_{i}>" for i in range(count)]

    def tokens(self) -> list[str]:
        """Every new token the scheme needs (empty for plain and direct)."""
        return [token for name in _GROUPS for token in self.group(name)]

    def marker(self, kind: str) -> str:
        """The marker text written before a step of ``kind`` (``"answer"`` for the answer line, ``"prefix"``
        for the prefix alone)."""
        return "".join(self.group("prefix") + ([] if kind == "prefix" else self.group(kind)))

    def to_dict(self) -> dict:
        return asdict(self)


def init_word(token: str) -> str:
    """The word whose embedding initialises a new token's row: its group name (``<memory_2>`` → memory)."""
    match = _MARKER.fullmatch(token)
    if not match:
        raise ValueError(f"{token!r} is not a control token")
    return match.group(1)


def format_target(trace: Trace, scheme: TokenScheme) -> str:
    """The text a model is trained to produce for ``trace`` (no EOS; the tokenizer step appends it).

    Raises:
        ValueError: the trace has no answer, or a step contains a control token.
    """
    if trace.answer is None:
        raise ValueError("cannot format a trace without an answer")
    lines = [format_step(step, scheme) for step in trace.steps] if scheme.style != "direct" else []
    answer_marker = scheme.marker("answer")
    answer = f"{ANSWER_MARKER} {trace.answer}"
    lines.append(f"{answer_marker} {answer}" if answer_marker else answer)
    return "\n".join(lines)


def format_step(step: Step, scheme: TokenScheme) -> str:
    """One step as ``format_target`` writes it (its markers, then its text on one line; no newline).

    Raises:
        ValueError: the step text contains a control token, or an unlabelled step in a labelling scheme.
    """
    if has_marker(step.text):
        raise ValueError(f"step text contains a control token: {step.text[:60]!r}")
    if step.kind == UNLABELLED and scheme.labels_steps:
        raise ValueError("a step without a kind cannot be formatted with a scheme that labels steps")
    text = " ".join(step.text.split("\n"))
    marker = scheme.marker(step.kind) if step.kind != UNLABELLED else scheme.marker("prefix")
    return f"{marker} {text}" if marker else text


def has_marker(text: str) -> bool:
    """Whether ``text`` holds a control marker of any scheme (``<memory>``, ``<reason_3>``, ...)."""
    return _MARKER.search(text) is not None


def count_markers(text: str) -> int:
    """How many control markers ``text`` holds (each costs one token in every scheme)."""
    return len(_MARKER.findall(text))


@dataclass(frozen=True)
class Span:
    """One span of generated text: a marker run (possibly empty) and the text it announces.

    Args:
        kind (str): ``memory``, ``reason``, ``step`` (unlabelled) or ``answer`` (the answer line).
        start (int), end (int): the span's characters, ``text[start:end]``, marker run included.
        marker_end (int): where the marker run ends and the span's body begins (``start`` without markers).
    """

    kind: str
    start: int
    end: int
    marker_end: int

    def body(self, text: str) -> str:
        """The span's text without its markers and surrounding whitespace."""
        return text[self.marker_end:self.end].strip()


def _run_kind(run: str, is_last: bool, body: str) -> str:
    """The kind a marker run announces: its one non-prefix group; a prefix-only run is the answer when it
    is the last run and its text holds the answer phrase; anything else (prefix only, or mixed kinds in
    one run) is an unlabelled step: we do not guess."""
    kinds = {m.group(1) for m in _MARKER.finditer(run)} - {"prefix"}
    if len(kinds) == 1:
        return kinds.pop()
    if not kinds and is_last and ANSWER_MARKER in body:
        return ANSWER
    return UNLABELLED


def _line_spans(text: str) -> list[Span]:
    """Spans of text without markers: one per line (``\\n`` ends a line and belongs to it); a blank line
    joins the span before it; a line holding the answer phrase is the answer."""
    result: list[Span] = []
    position = 0
    for line in text.split("\n"):
        end = min(position + len(line) + 1, len(text))  # the newline, except after the last line
        if not line.strip() and result:
            previous = result[-1]
            result[-1] = Span(previous.kind, previous.start, end, previous.start)
        elif end > position:
            result.append(Span(ANSWER if ANSWER_MARKER in line else UNLABELLED, position, end, position))
        position = end
    return result


def spans(text: str) -> list[Span]:
    """Cut generated text into spans (the module docstring gives the grammar).

    Text before the first marker run is an unlabelled span; each run starts a span that ends where the
    next run starts. The spans are contiguous and cover ``text`` exactly, from 0 to ``len(text)``.

    Args:
        text (str): generated text with its markers (``Result.raw``).

    Returns:
        list[Span]: in text order (empty for empty text).
    """
    runs = list(_MARKER_RUN.finditer(text))
    if not runs:
        return _line_spans(text)
    result: list[Span] = []
    if runs[0].start() > 0:
        result.append(Span(UNLABELLED, 0, runs[0].start(), 0))
    for i, run in enumerate(runs):
        end = runs[i + 1].start() if i + 1 < len(runs) else len(text)
        result.append(Span(_run_kind(run.group(0), i == len(runs) - 1, text[run.end():end]), run.start(), end,
                           run.end()))
    return result


def parse(text: str, *, question: str = "", answer: str | None = None) -> Trace:
    """Split generated text into a Trace (the inverse of ``format_target``), one step per ``spans`` span.

    The answer span is not a step; a memory or reason span is a step even when its text is empty (the
    model announced one); an unlabelled span is a step only when it holds text. ``answer`` is the already
    extracted answer (see ``Task.extract``); parsing never guesses one.
    """
    steps = tuple(Step(span.kind, span.body(text)) for span in step_spans(text))
    return Trace(question=question, steps=steps, answer=answer)


def step_spans(text: str) -> list[Span]:
    """The spans ``parse`` turns into steps, in order: ``step_spans(text)[i]`` is where step ``i`` of
    ``parse(text)`` lies in ``text`` (revision and step confidences locate steps through this)."""
    return [span for span in spans(text)
            if span.kind in (MEMORY, REASON) or (span.kind == UNLABELLED and span.body(text))]


def add_scheme_tokens(model, tokenizer, scheme: TokenScheme) -> list[int]:
    """Add the scheme's tokens to ``tokenizer`` and give each a row in ``model``'s embeddings.

    New ids start at ``len(tokenizer)``, not at the embedding matrix's row count: models whose matrix is
    padded beyond the tokenizer (Qwen-style) already have rows there, and those are the rows we must
    initialise and train (the original code trained rows past the matrix that no id ever used, spec
    disentangle.md §10 B1). The matrix grows only when the tokenizer outgrows it. Each new row (input and,
    if untied, output) is set to the mean embedding of its group word's pieces (``" memory"`` → ...).

    Returns:
        list[int]: the ids of the scheme's tokens, in ``scheme.tokens()`` order.
    """
    import torch
    from tokenizers import AddedToken

    tokens = scheme.tokens()
    if not tokens:
        return []
    missing = [t for t in tokens if t not in tokenizer.get_vocab()]
    tokenizer.add_tokens([AddedToken(t, special=False, normalized=False) for t in missing])
    ids = tokenizer.convert_tokens_to_ids(tokens)
    rows = model.get_input_embeddings().weight.shape[0]
    if len(tokenizer) > rows:
        model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    new = {tid for tid, tok in zip(ids, tokens) if tok in missing}
    inputs = model.get_input_embeddings().weight
    output_layer = model.get_output_embeddings()
    outputs = None if output_layer is None or output_layer.weight is inputs else output_layer.weight
    with torch.no_grad():
        for tid, token in zip(ids, tokens):
            if tid not in new:
                continue
            pieces = tokenizer(" " + init_word(token), add_special_tokens=False)["input_ids"]
            inputs[tid] = inputs[pieces].mean(dim=0)
            if outputs is not None:
                outputs[tid] = outputs[pieces].mean(dim=0)
    return ids
