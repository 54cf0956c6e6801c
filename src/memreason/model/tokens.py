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

_MARKER = re.compile(r"<(prefix|memory|reason|answer)(?:_(\d+))?>")
_MARKER_RUN = re.compile(r"(?:[ \t]*<(?:prefix|memory|reason|answer)(?:_\d+)?>)+")


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
    lines = []
    if scheme.style != "direct":
        for step in trace.steps:
            if _MARKER.search(step.text):
                raise ValueError(f"step text contains a control token: {step.text[:60]!r}")
            if step.kind == UNLABELLED and scheme.labels_steps:
                raise ValueError("a step without a kind cannot be formatted with a scheme that labels steps")
            text = " ".join(step.text.split("\n"))
            marker = scheme.marker(step.kind) if step.kind != UNLABELLED else scheme.marker("prefix")
            lines.append(f"{marker} {text}" if marker else text)
    answer_marker = scheme.marker("answer")
    answer = f"{ANSWER_MARKER} {trace.answer}"
    lines.append(f"{answer_marker} {answer}" if answer_marker else answer)
    return "\n".join(lines)


def _kind_of(markers: str) -> str | None:
    """The kind named by a run of markers: ``memory``, ``reason``, ``answer`` or None (prefix only)."""
    kinds = {m.group(1) for m in _MARKER.finditer(markers)} - {"prefix"}
    if len(kinds) == 1:
        return kinds.pop()
    return None if not kinds else UNLABELLED  # mixed kinds in one run: do not guess


def parse(text: str, *, question: str = "", answer: str | None = None) -> Trace:
    """Split generated text into a Trace (the inverse of ``format_target``).

    Text before the first marker, and every segment without a kind marker, becomes an unlabelled step.
    The answer segment (or the last line holding ``The answer is:``) is not a step. ``answer`` is the
    already extracted answer (see ``Task.extract``); parsing never guesses one.
    """
    steps: list[Step] = []
    runs = list(_MARKER_RUN.finditer(text))
    if not runs:
        # plain / direct: one step per line; the answer line is not a step
        for line in text.split("\n"):
            line = line.strip()
            if line and ANSWER_MARKER not in line:
                steps.append(Step(UNLABELLED, line))
        return Trace(question=question, steps=tuple(steps), answer=answer)
    head = text[:runs[0].start()].strip()
    if head:
        steps.append(Step(UNLABELLED, head))
    for i, run in enumerate(runs):
        end = runs[i + 1].start() if i + 1 < len(runs) else len(text)
        body = text[run.end():end].strip()
        kind = _kind_of(run.group(0))
        if kind == "answer" or (kind is None and ANSWER_MARKER in body and i == len(runs) - 1):
            continue
        if body or kind in (MEMORY, REASON):
            steps.append(Step(kind if kind in (MEMORY, REASON) else UNLABELLED, body))
    return Trace(question=question, steps=tuple(steps), answer=answer)


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
