"""The model's own confidence in each step: token log-probabilities gathered per step.

Generation records each chosen token's log-probability in the same forward passes that produce it
(``generate_ids(..., logprobs=True)``). Here every token is placed in the text by its character offset,
and the tokens of a step's body (its markers excluded: choosing the kind is not stating the fact) give the
step's mean and minimum log-probability. ``repair`` can then correct the least confident memory step
without a judge.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

from memreason.model.tokens import step_spans


@dataclass(frozen=True)
class StepConfidence:
    """Mean and minimum log-probability of a step's body tokens (``n_tokens`` of them)."""

    mean: float
    min: float
    n_tokens: int

    def to_dict(self) -> dict:
        return {"mean": self.mean, "min": self.min, "n_tokens": self.n_tokens}

    @classmethod
    def from_dict(cls, data: dict | None) -> "StepConfidence | None":
        return None if data is None else cls(float(data["mean"]), float(data["min"]), int(data["n_tokens"]))


def token_offsets(tokenizer, ids: Sequence[int]) -> list[int]:
    """Where each token starts in ``tokenizer.decode(ids, skip_special_tokens=True)``.

    Decoding prefixes (rather than single tokens) keeps multi-byte characters split across tokens right.
    """
    offsets, previous = [], 0
    for k in range(1, len(ids) + 1):
        offsets.append(previous)
        previous = len(tokenizer.decode(ids[:k], skip_special_tokens=True))
    return offsets


def step_confidences(tokenizer, text: str, ids: Sequence[int], logprobs: Sequence[float]
                     ) -> list[StepConfidence | None]:
    """One confidence per step of ``parse(text)`` (None for a step with no body token).

    Args:
        tokenizer: decodes ``ids`` to ``text``.
        text (str): the generated text (``Result.raw``).
        ids, logprobs: the generated tokens and their log-probabilities, aligned.
    """
    offsets = token_offsets(tokenizer, ids)
    confidences = []
    for span in step_spans(text):
        body_start = span.marker_end
        # NaN marks a token the model did not choose (teacher-forced text): not part of its confidence
        values = [lp for start, lp in zip(offsets, logprobs) if body_start <= start < span.end and not math.isnan(lp)]
        confidences.append(StepConfidence(sum(values) / len(values), min(values), len(values)) if values else None)
    return confidences
