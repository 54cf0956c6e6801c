"""What the attention tests share (tests/analysis/test_attention.py, test_attention_tables.py, test_plots.py):
a three-step trace, the chat prompt it is asked with, a tiny model whose tokenizer has paper-scheme markers
as single tokens, and the collected masses of three such rows."""

from __future__ import annotations

import pytest

from conftest import build_tiny_model, build_tiny_tokenizer
from memreason.model.tokens import TokenScheme, add_scheme_tokens, format_target
from memreason.traces import MEMORY, REASON, Result, Step, Trace

TRACE = Trace("Is the Pacific Ocean larger than the Atlantic Ocean?",
              (Step(MEMORY, "The Pacific Ocean is the largest ocean on Earth."),
               Step(MEMORY, "The Atlantic Ocean is the second largest."),
               Step(REASON, "So the Pacific is larger than the Atlantic.")), "True")


def prompt_for(tokenizer, question=TRACE.question):
    return tokenizer.apply_chat_template([{"role": "user", "content": f"Question: {question}"}],
                                         add_generation_prompt=True, tokenize=False)


@pytest.fixture
def scheme_tokenizer():
    """Tiny tokenizer and model with paper-scheme tokens (P=2, S=2) added as single tokens."""
    tokenizer = build_tiny_tokenizer()
    model = build_tiny_model(len(tokenizer))
    scheme = TokenScheme("paper", n_prefix=2, n_special=2)
    add_scheme_tokens(model, tokenizer, scheme)
    model.set_attn_implementation("eager")
    return tokenizer, model, scheme


def collected(scheme_tokenizer, n=3):
    """``AttentionResult`` of n teacher-forced rows: one memory step, two memory steps, the reason step only."""
    from memreason.analysis import attention, attention_tables

    tokenizer, model, scheme = scheme_tokenizer
    examples = []
    for i in range(n):
        trace = Trace(TRACE.question, TRACE.steps[:i + 1] if i < 2 else TRACE.steps[2:], "True")
        raw = format_target(trace, scheme)
        row = Result.from_dict({"id": f"q{i}", "question": trace.question, "raw": raw, "outcome": "correct"})
        examples.append((row, attention.teacher_force(model, tokenizer, prompt_for(tokenizer), raw,
                                                      question=trace.question)))
    return attention_tables.collect(examples, {"model": "tiny"})
