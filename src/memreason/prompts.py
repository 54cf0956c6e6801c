"""Prompt rendering: what the model sees before it answers, in the paper's plain style or the model's
chat template. Training and generation both go through here, so they never disagree."""

from __future__ import annotations

from typing import Literal, Sequence

from memreason.errors import ConfigError
from memreason.tasks import ANSWER_MARKER, Task
from memreason.traces import Trace

PromptStyle = Literal["plain", "chat"]
PROMPT_STYLES = ("plain", "chat")


def resolve_style(style: str, tokenizer) -> str:
    """``"auto"`` → ``"chat"`` when the tokenizer has a chat template, else ``"plain"``.

    Raises:
        ConfigError: unknown style, or ``"chat"`` for a tokenizer without a chat template.
    """
    if style == "auto":
        return "chat" if getattr(tokenizer, "chat_template", None) else "plain"
    if style not in PROMPT_STYLES:
        raise ConfigError(f"unknown prompt style {style!r}; choose auto, plain or chat")
    if style == "chat" and not getattr(tokenizer, "chat_template", None):
        raise ConfigError("prompt style 'chat' needs a tokenizer with a chat template; use 'plain'")
    return style


def render_example(trace: Trace) -> str:
    """A worked example in plain chain-of-thought form: question, one step per line, answer line."""
    lines = [trace.question.strip() if trace.question.startswith("Question:") else f"Question: {trace.question.strip()}"]
    lines += [step.text for step in trace.steps]
    lines.append(f"{ANSWER_MARKER} {trace.answer}")
    return "\n".join(lines)


def render_prompt(question: str, task: Task, tokenizer, style: str = "auto", examples: Sequence[Trace] = ()) -> str:
    """The prompt text for one question.

    ``plain`` is the paper's ``"Question: <q>\\n"`` with no instruction; ``chat`` puts the task's
    instruction and the question in one user turn and opens the assistant turn. ``examples`` (few-shot
    worked examples, for untrained models) go before the question in either style.
    """
    style = resolve_style(style, tokenizer)
    shots = "".join(render_example(example) + "\n\n" for example in examples)
    if style == "plain":
        return shots + task.plain_prompt(question)
    if shots:
        shots = "Examples:\n\n" + shots
    content = f"{task.instruction}\n\n{shots}{task.plain_prompt(question).strip()}"
    messages = [{"role": "user", "content": content}]
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
