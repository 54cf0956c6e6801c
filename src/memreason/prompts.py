"""Prompt rendering: what the model sees before it answers, in the paper's plain style or the model's
chat template. Training and generation both go through here, so they never disagree."""

from __future__ import annotations

from typing import Literal

from memreason.errors import ConfigError
from memreason.tasks import Task

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


def render_prompt(question: str, task: Task, tokenizer, style: str = "auto") -> str:
    """The prompt text for one question.

    ``plain`` is the paper's ``"Question: <q>\\n"`` with no instruction; ``chat`` puts the task's
    instruction and the question in one user turn and opens the assistant turn.
    """
    style = resolve_style(style, tokenizer)
    if style == "plain":
        return task.plain_prompt(question)
    messages = [{"role": "user", "content": f"{task.instruction}\n\n{task.plain_prompt(question).strip()}"}]
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
