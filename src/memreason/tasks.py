"""Task registry: prompt, answer space, strict answer extraction and scoring per benchmark.

Usage::

    from memreason.tasks import get_task
    task = get_task("strategyqa")
    task.extract("... The answer is: false")          # -> "False"
    task.score(generated_text, gold="False")           # -> "correct" | "wrong" | "unparseable"

Extraction reads only the model's *generated* text (never the prompt), takes the text after the last
``ANSWER_MARKER`` up to the end of that line, and accepts nothing else: no "last letter anywhere"
fallback (the original's lenient fallback credited answers that were never given, spec disentangle.md
§5 and §10 B10). A letter must be a whole upper-case token, so "THE" never yields "E" and the article
"a" is not option A.
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass
from typing import Literal

ANSWER_MARKER = "The answer is:"

CORRECT, WRONG, UNPARSEABLE = "correct", "wrong", "unparseable"
OUTCOMES = (CORRECT, WRONG, UNPARSEABLE)

_BOOLEAN = re.compile(r"^[\s\"'*(]*(true|false)(?![A-Za-z])", re.IGNORECASE)
_LETTER = re.compile(r"^[\s\"'*]*\(?([A-Z])(?![A-Za-z])")
# An option label: a capital letter, a dot, then the option text; not inside a word ("U.S." is skipped
# because option letters must run A, B, C, ... in order).
_OPTION = re.compile(r"(?<![A-Za-z])([A-Z])\.\s?(?=\S)")


def answer_line(generated: str) -> str | None:
    """The text after the last answer marker up to the end of its line, or None without a marker."""
    position = generated.rfind(ANSWER_MARKER)
    if position < 0:
        return None
    return generated[position + len(ANSWER_MARKER):].split("\n", 1)[0]


def option_letters(question: str) -> tuple[str, ...]:
    """The option letters of a multiple-choice question, in order: the longest run A, B, C, ... of
    ``X.`` labels (after ``Options:`` when the question has that word)."""
    start = question.find("Options:")
    text = question[start:] if start >= 0 else question
    letters: list[str] = []
    for match in _OPTION.finditer(text):
        if match.group(1) == chr(ord("A") + len(letters)):
            letters.append(match.group(1))
    return tuple(letters)


def _normalise_free(text: str) -> str:
    return " ".join(re.sub(r"[^\w\s]", " ", text.lower()).split())


@dataclass(frozen=True)
class Task:
    """One benchmark's prompt and answer conventions.

    Args:
        name (str): registry key.
        answer_type ("boolean" | "letter" | "free"): what an answer looks like.
        instruction (str): what the model is asked to do (used by chat-style prompts).
        version (int): bumped whenever prompt or scoring changes; written into every result row.
        max_letter (str | None): the last letter a ``letter`` task may use.
        description (str): provenance and deviations from the paper.
    """

    name: str
    answer_type: Literal["boolean", "letter", "free"]
    instruction: str
    version: int = 1
    max_letter: str | None = None
    description: str = ""

    def answer_space(self, question: str | None = None) -> tuple[str, ...] | None:
        """The allowed answers (None for free-form tasks). For letter tasks, the question's own options
        when they can be read from it, else every letter up to ``max_letter``."""
        if self.answer_type == "boolean":
            return ("True", "False")
        if self.answer_type == "letter":
            letters = option_letters(question) if question else ()
            if letters:
                return letters
            return tuple(chr(c) for c in range(ord("A"), ord(self.max_letter or "Z") + 1))
        return None

    def canonical_answer(self, answer, question: str | None = None) -> str:
        """Validate a gold answer and return its canonical form.

        Raises:
            ValueError: the answer is outside the task's answer space.
        """
        if self.answer_type == "boolean":
            if isinstance(answer, bool):
                return "True" if answer else "False"
            if isinstance(answer, str) and answer.strip().lower() in ("true", "false"):
                return answer.strip().capitalize()
            raise ValueError(f"answer must be True or False, got {answer!r}")
        if not isinstance(answer, str) or not answer.strip():
            raise ValueError(f"answer must be a non-empty string, got {answer!r}")
        if self.answer_type == "letter":
            space = self.answer_space(question)
            letter = answer.strip()
            if letter not in space:
                raise ValueError(f"answer {answer!r} is not one of the options {', '.join(space)}")
            return letter
        return answer.strip()

    def extract(self, generated: str) -> str | None:
        """The answer the model gave in its generated text, or None when it gave none that parses."""
        line = answer_line(generated)
        if line is None:
            return None
        if self.answer_type == "boolean":
            match = _BOOLEAN.match(line)
            return match.group(1).capitalize() if match else None
        if self.answer_type == "letter":
            match = _LETTER.match(line)
            if not match or (self.max_letter and match.group(1) > self.max_letter):
                return None
            return match.group(1)
        answer = line.strip().rstrip(".").strip()
        return answer or None

    def is_correct(self, predicted: str | None, gold: str) -> bool:
        if predicted is None:
            return False
        if self.answer_type == "free":
            return _normalise_free(predicted) == _normalise_free(gold)
        return predicted == gold

    def score(self, generated: str, gold: str) -> str:
        """``"correct"``, ``"wrong"`` or ``"unparseable"`` for a generated text against the gold answer."""
        predicted = self.extract(generated)
        if predicted is None:
            return UNPARSEABLE
        return CORRECT if self.is_correct(predicted, gold) else WRONG

    def plain_prompt(self, question: str) -> str:
        """The paper's prompt: ``"Question: <q>\\n"`` (questions that already start with ``Question:``,
        as in the paper's CommonsenseQA files, are not prefixed twice)."""
        text = question.strip()
        if not text.startswith("Question:"):
            text = f"Question: {text}"
        return text + "\n"


_REGISTRY: dict[str, Task] = {}


def register_task(task: Task) -> Task:
    """Add a task to the registry.

    Raises:
        ValueError: the name is taken by a different task.
    """
    existing = _REGISTRY.get(task.name)
    if existing is not None and existing != task:
        raise ValueError(f"task name {task.name!r} is already registered")
    _REGISTRY[task.name] = task
    return task


def get_task(name: str) -> Task:
    """Look a task up by name.

    Raises:
        KeyError: unknown name; the message suggests close names and lists all tasks.
    """
    try:
        return _REGISTRY[name]
    except KeyError:
        close = difflib.get_close_matches(name, list(_REGISTRY), n=3)
        hint = f" Did you mean: {', '.join(close)}?" if close else ""
        raise KeyError(f"unknown task {name!r}.{hint} Available: {', '.join(sorted(_REGISTRY))}") from None


def task_names() -> list[str]:
    return sorted(_REGISTRY)


_STEPWISE = ("Work through it step by step: recall each fact you need, then reason from those facts. "
             f"End with one line of the form '{ANSWER_MARKER} X'")

register_task(Task(
    name="strategyqa",
    answer_type="boolean",
    instruction=f"Decide whether the statement in the question is True or False. {_STEPWISE}, where X is True or False.",
    description="Implicit multi-hop yes/no questions (Geva et al. 2021), answered True/False as in the paper.",
))
register_task(Task(
    name="commonsenseqa",
    answer_type="letter",
    max_letter="E",
    instruction=f"Choose the best option for the question. {_STEPWISE}, where X is the option's letter.",
    description="Five-option commonsense questions (Talmor et al. 2019); options A-E inline after 'Options:'.",
))
register_task(Task(
    name="truthfulqa",
    answer_type="letter",
    max_letter="M",
    instruction=f"Choose the one true option. {_STEPWISE}, where X is the option's letter.",
    description="TruthfulQA MC1 framed as lettered multiple choice with options inline (up to 13, A-M).",
))
register_task(Task(
    name="mmlu",
    answer_type="letter",
    max_letter="D",
    instruction=("Think it through step by step, then give your final answer on a last line of the form "
                 f"'{ANSWER_MARKER} X', where X is A, B, C or D."),
    description=("MMLU (Hendrycks et al. 2021), four options A-D, zero-shot (data: memreason.data.mmlu). "
                 "Strict answer-line parsing instead of the rebalancing paper's regex cascade with fuzzy "
                 "fallback and manual checking (spec attention_rebalance.md §3.2)."),
))
register_task(Task(
    name="freeform",
    answer_type="free",
    instruction=f"Answer the question. {_STEPWISE}, where X is a short answer.",
    description="Any question with a short free-text answer, compared after lower-casing and removing punctuation.",
))
