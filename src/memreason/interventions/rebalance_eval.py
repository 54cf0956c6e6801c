"""Evaluation of attention rebalancing on MMLU-format multiple-choice data (spec attention_rebalance.md §8-§9).

This module owns the evaluation, not the mechanism (that is ``attention_rebalance``):

* ``load_mmlu``: MMLU CSV files (header-less ``question,A,B,C,D,answer`` named ``<subject>_<split>.csv``, a
  directory of them, or a file with a header that adds a ``subject`` column, like the bundled sample),
  with each subject mapped to one of four categories. Bad rows raise ``DataError`` naming file, row, field.
* Two ways to answer, the same questions for every condition:
  ``"ll"``: log-likelihood multiple choice. One forward per question scores the continuations " A" ... " D"
  after "Answer:"; the prediction is the most likely letter. Cheap and sensitive to small effects.
  ``"cot"``: zero-shot chain of thought, greedy, capped at ``max_new_tokens``; the answer is read by the
  strict parser of ``memreason.tasks`` (the text after the last "The answer is:"; no fallbacks, so a
  missing answer is "unparseable", never a guess, unlike the original's regex cascade, spec §3.2).
* Conditions: ``baseline`` (stock eager attention), ``mask`` (the method), and the controls ``boost-all``,
  ``random-mask`` (density-matched), ``renormalised`` and ``legacy`` (mask with the original's h = 31).
* Statistics: per-category accuracy with Wilson 95% CIs, per-question flips against the baseline and
  between the method and each control with exact McNemar tests and paired-bootstrap CIs of the difference,
  generated-length statistics (CoT), and mechanism diagnostics (layer-0 mask density against row length and
  per head, share of the added attention mass that lands on the first token).
* Outputs in ``out_dir``: ``per_question.jsonl`` (one row per question and condition, appended as it goes,
  so an interrupted run resumes), ``per_question.csv`` (one row per question) and ``summary.json``. A run
  never mixes with another: rows carry a key of every setting that changes an answer, and a directory holding
  another run's rows is refused (the original silently re-scored old outputs, spec §3.1).
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import json
import logging
import math
import os
import statistics
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterable, Literal, Sequence

from memreason.errors import ConfigError, DataError
from memreason.stats import mcnemar_exact, paired_bootstrap_ci, wilson_ci
from memreason.tasks import ANSWER_MARKER, CORRECT, UNPARSEABLE, Task

logger = logging.getLogger(__name__)

LETTERS = ("A", "B", "C", "D")
CATEGORIES = ("STEM", "humanities", "social sciences", "other")
CONDITIONS = ("baseline", "mask", "boost-all", "random-mask", "renormalised", "legacy")
DEFAULT_CONDITIONS = ("baseline", "mask", "boost-all", "random-mask")
METHOD = "mask"
BASELINE = "baseline"
EVAL_VERSION = 1  # bump when prompts or scoring change; part of every row's run key
BUNDLED_SAMPLE = "mmlu_sample.csv"
# Row-length bins (keys a query row can attend to) of the density-vs-length diagnostic.
LENGTH_BINS = (16, 32, 64, 100, 128, 256, 512, 1024, 2048)

# The four-way grouping of the 57 MMLU subjects used by the original evaluation (spec §3.2: STEM 19,
# humanities 13, social sciences 12, other 13).
_CATEGORY_SUBJECTS = {
    "STEM": (
        "abstract_algebra anatomy astronomy college_biology college_chemistry college_computer_science "
        "college_mathematics college_physics computer_security conceptual_physics electrical_engineering "
        "elementary_mathematics high_school_biology high_school_chemistry high_school_computer_science "
        "high_school_mathematics high_school_physics high_school_statistics machine_learning"),
    "humanities": (
        "formal_logic high_school_european_history high_school_us_history high_school_world_history "
        "international_law jurisprudence logical_fallacies moral_disputes moral_scenarios philosophy "
        "prehistory professional_law world_religions"),
    "social sciences": (
        "econometrics high_school_geography high_school_government_and_politics high_school_macroeconomics "
        "high_school_microeconomics high_school_psychology human_sexuality professional_psychology "
        "public_relations security_studies sociology us_foreign_policy"),
    "other": (
        "business_ethics clinical_knowledge college_medicine global_facts human_aging management marketing "
        "medical_genetics miscellaneous nutrition professional_accounting professional_medicine virology"),
}
SUBJECT_CATEGORIES: dict[str, str] = {subject: category for category, subjects in _CATEGORY_SUBJECTS.items()
                                      for subject in subjects.split()}

# The strict parser. Not registered in memreason.tasks by this module (tasks.py owns the registry).
MMLU_TASK = Task(
    name="mmlu",
    answer_type="letter",
    max_letter="D",
    instruction=("Think it through step by step, then give your final answer on a last line of the form "
                 f"'{ANSWER_MARKER} X', where X is A, B, C or D."),
    description="MMLU (Hendrycks et al. 2021), four options A-D; zero-shot, strict answer-line parsing.",
)


# ---------------------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Question:
    """One multiple-choice question.

    Attributes:
        qid (str): stable id, ``<file stem>:<row>`` (row = 0-based data row).
        subject (str): MMLU subject, e.g. ``high_school_physics``.
        category (str): one of ``CATEGORIES``.
        question (str): the question text.
        options (tuple[str, str, str, str]): option texts for A-D.
        answer (str): the gold letter.
    """

    qid: str
    subject: str
    category: str
    question: str
    options: tuple[str, ...]
    answer: str


def bundled_sample_path() -> Path:
    """Path of the bundled MMLU-style sample (96 questions written by the memreason team)."""
    return Path(__file__).resolve().parents[1] / "data" / "bundled" / BUNDLED_SAMPLE


def category_of(subject: str) -> str | None:
    """The category of an MMLU subject, or None when the subject is unknown."""
    return SUBJECT_CATEGORIES.get(subject.strip().lower().replace(" ", "_"))


def _subject_from_filename(path: Path) -> str:
    stem = path.stem
    for suffix in ("_test", "_dev", "_val", "_validation", "_train"):
        if stem.endswith(suffix):
            return stem[: -len(suffix)]
    return stem


def load_mmlu(path: str | os.PathLike) -> list[Question]:
    """Load MMLU-format questions.

    Accepted inputs:

    * a header-less MMLU file ``<subject>_<split>.csv`` with rows ``question,A,B,C,D,answer``;
    * a CSV with a header naming ``question, A, B, C, D, answer`` and ``subject`` (any order; an optional
      ``category`` column overrides or supplies the category of subjects outside MMLU's 57);
    * a directory: every ``*.csv`` in it, in name order.

    Args:
        path (str | PathLike): file or directory.

    Returns:
        list[Question]: in file order.

    Raises:
        DataError: missing file, empty file, wrong column count, empty field, an answer that is not A-D,
            an unknown subject without a category, or a duplicate question id; the message names the file,
            the 0-based data row and the field.
    """
    path = Path(path)
    if path.is_dir():
        files = sorted(path.glob("*.csv"))
        if not files:
            raise DataError("no .csv files in this directory", file=str(path))
        return [question for file in files for question in _load_file(file)]
    if not path.is_file():
        raise DataError("file not found", file=str(path))
    return _load_file(path)


def _load_file(path: Path) -> list[Question]:
    try:
        with path.open(newline="", encoding="utf-8-sig") as handle:
            rows = list(csv.reader(handle))
    except UnicodeDecodeError as exc:
        raise DataError(f"not UTF-8 text ({exc.reason})", file=str(path)) from None
    except csv.Error as exc:
        raise DataError(f"malformed CSV ({exc})", file=str(path)) from None
    rows = [row for row in rows if any(cell.strip() for cell in row)]
    if not rows:
        raise DataError("empty file", file=str(path))
    header = [cell.strip().lower() for cell in rows[0]]
    if {"question", "a", "b", "c", "d", "answer"} <= set(header):
        columns = {name: header.index(name) for name in header}
        if "subject" not in columns:
            raise DataError("a CSV with a header needs a 'subject' column", file=str(path), field="subject")
        data, width, fixed_subject = rows[1:], len(header), None
    else:
        columns = {"question": 0, "a": 1, "b": 2, "c": 3, "d": 4, "answer": 5}
        data, width, fixed_subject = rows, 6, _subject_from_filename(path)
    questions: list[Question] = []
    seen: set[str] = set()
    for index, row in enumerate(data):
        if len(row) != width:
            raise DataError(f"expected {width} columns, found {len(row)}", file=str(path), record=index)

        def get(name: str, row=row, index=index) -> str:
            value = row[columns[name]].strip()
            if not value:
                field_name = name.upper() if name in ("a", "b", "c", "d") else name
                raise DataError("empty value", file=str(path), record=index, field=field_name)
            return value

        answer = get("answer").upper()
        if answer not in LETTERS:
            raise DataError(f"answer must be one of A, B, C, D, got {row[columns['answer']]!r}", file=str(path),
                            record=index, field="answer")
        subject = fixed_subject or get("subject")
        category = None
        if "category" in columns and row[columns["category"]].strip():
            category = _canonical_category(row[columns["category"]], path, index)
        category = category or category_of(subject)
        if category is None:
            raise DataError(f"unknown MMLU subject {subject!r}; add a 'category' column with one of "
                            f"{', '.join(CATEGORIES)}", file=str(path), record=index, field="subject")
        qid = f"{path.stem}:{index}"
        if qid in seen:  # only possible across files with the same stem in different directories
            raise DataError(f"duplicate question id {qid}", file=str(path), record=index)
        seen.add(qid)
        questions.append(Question(qid=qid, subject=subject, category=category, question=get("question"),
                                  options=tuple(get(letter.lower()) for letter in LETTERS), answer=answer))
    if not questions:
        raise DataError("no questions (only a header)", file=str(path))
    return questions


def _canonical_category(value: str, path: Path, index: int) -> str:
    lowered = value.strip().lower()
    for category in CATEGORIES:
        if lowered == category.lower() or lowered == category.lower().replace(" ", "_"):
            return category
    raise DataError(f"unknown category {value!r}; use one of {', '.join(CATEGORIES)}", file=str(path),
                    record=index, field="category")


def select_questions(questions: Sequence[Question], limit: int | None) -> list[Question]:
    """The first ``limit`` questions taken round-robin across categories (file order within each), so a
    small limit still covers every category; all questions when ``limit`` is None."""
    if limit is None or limit >= len(questions):
        return list(questions)
    queues = {category: [q for q in questions if q.category == category] for category in CATEGORIES}
    chosen: list[Question] = []
    while len(chosen) < limit:
        for category in CATEGORIES:
            if queues[category] and len(chosen) < limit:
                chosen.append(queues[category].pop(0))
    return chosen


# ---------------------------------------------------------------------------------------------------------
# Settings and conditions
# ---------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Condition:
    """One arm of the comparison. ``mode`` None is the baseline (stock eager attention)."""

    name: str
    mode: str | None
    alpha: float = 0.0
    theta: float = 0.01
    depth_h: int | None = None
    seed: int = 0


@dataclass(frozen=True)
class EvalSettings:
    """Everything that decides the answers of a run (and therefore its run key).

    Args:
        mode ("ll" | "cot", default "ll"): log-likelihood scoring or chain-of-thought generation.
        conditions (tuple[str, ...]): names from ``CONDITIONS``; ``baseline`` is added when missing.
        alpha, theta, depth_h, seed: rebalancing settings shared by every non-baseline condition
            (``legacy`` forces depth_h = 31).
        prompt_style ("raw" | "chat" | None): raw text (as the original, and lm-eval's MMLU) or the tokenizer's
            chat template; None = raw for "ll", chat for "cot".
        max_new_tokens (int, default 256): generation cap ("cot").
        batch_size (int, default 8): questions per forward / generate call.
        limit (int | None): evaluate only this many questions (round-robin over categories).
        bootstrap_resamples (int, default 10000): resamples of the paired bootstrap CIs.
    """

    mode: Literal["ll", "cot"] = "ll"
    conditions: tuple[str, ...] = DEFAULT_CONDITIONS
    alpha: float = 0.2
    theta: float = 0.01
    depth_h: int | None = None
    seed: int = 0
    prompt_style: Literal["raw", "chat"] | None = None
    max_new_tokens: int = 256
    batch_size: int = 8
    limit: int | None = None
    bootstrap_resamples: int = 10_000

    def __post_init__(self):
        from memreason.interventions.attention_rebalance import RebalanceConfig

        if self.mode not in ("ll", "cot"):
            raise ConfigError(f"unknown evaluation mode {self.mode!r}; choose ll or cot")
        unknown = [name for name in self.conditions if name not in CONDITIONS]
        if unknown:
            raise ConfigError(f"unknown condition(s) {', '.join(unknown)}; choose from {', '.join(CONDITIONS)}")
        if len(set(self.conditions)) != len(self.conditions):
            raise ConfigError(f"condition listed twice in {', '.join(self.conditions)}")
        if BASELINE not in self.conditions:
            object.__setattr__(self, "conditions", (BASELINE, *self.conditions))
        if self.prompt_style not in (None, "raw", "chat"):
            raise ConfigError(f"unknown prompt style {self.prompt_style!r}; choose raw or chat")
        for name in ("max_new_tokens", "batch_size", "bootstrap_resamples"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        if self.limit is not None and (isinstance(self.limit, bool) or not isinstance(self.limit, int)
                                       or self.limit < 1):
            raise ConfigError(f"limit must be a positive integer, got {self.limit!r}")
        RebalanceConfig(alpha=self.alpha, theta=self.theta, depth_h=self.depth_h, seed=self.seed)  # validates

    @property
    def style(self) -> str:
        return self.prompt_style or ("raw" if self.mode == "ll" else "chat")

    def make_conditions(self) -> list[Condition]:
        from memreason.interventions.attention_rebalance import LEGACY_DEPTH_H

        conditions = []
        for name in self.conditions:
            if name == BASELINE:
                conditions.append(Condition(name, None))
            elif name == "legacy":
                conditions.append(Condition(name, "mask", self.alpha, self.theta, LEGACY_DEPTH_H, self.seed))
            else:
                conditions.append(Condition(name, name, self.alpha, self.theta, self.depth_h, self.seed))
        return conditions


# ---------------------------------------------------------------------------------------------------------
# Prompts
# ---------------------------------------------------------------------------------------------------------
def _subject_words(subject: str) -> str:
    return subject.replace("_", " ")


def _question_block(question: Question) -> str:
    options = "\n".join(f"{letter}. {text}" for letter, text in zip(LETTERS, question.options))
    return f"{question.question}\n{options}"


def build_prompt(question: Question, mode: str, style: str, tokenizer=None) -> str:
    """The prompt text for one question.

    ``ll`` raw: lm-eval's MMLU layout ending in ``"Answer:"`` (the scored continuations are " A" ... " D").
    ``ll`` chat: the question in a user turn, then the assistant's answer line up to ``"The answer is:"``.
    ``cot``: the question plus ``MMLU_TASK.instruction``, as raw text or in a user turn.

    Raises:
        ConfigError: chat style with a tokenizer that has no chat template.
    """
    header = f"The following is a multiple choice question about {_subject_words(question.subject)}."
    if mode == "ll":
        if style == "raw":
            return f"{header}\n\n{_question_block(question)}\nAnswer:"
        content = f"{header}\n\n{_question_block(question)}\n\nAnswer with the letter of the correct option."
        return _chat(tokenizer, content) + ANSWER_MARKER
    content = f"{header} {MMLU_TASK.instruction}\n\n{_question_block(question)}\n"
    return content if style == "raw" else _chat(tokenizer, content)


def _chat(tokenizer, content: str) -> str:
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        raise ConfigError("prompt style 'chat' needs a tokenizer with a chat template; use --prompt-style raw")
    return tokenizer.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                         add_generation_prompt=True)


def encode_prompt(tokenizer, text: str, style: str) -> list[int]:
    """Token ids of a prompt. A chat template already carries its special tokens, so only raw prompts get
    the tokenizer's (a second BOS would shift every position)."""
    return list(tokenizer(text, add_special_tokens=(style == "raw")).input_ids)


def letter_continuations(tokenizer) -> list[list[int]]:
    """Token ids of " A" ... " D" (what follows "Answer:" / "The answer is:")."""
    return [list(tokenizer(f" {letter}", add_special_tokens=False).input_ids) for letter in LETTERS]


# ---------------------------------------------------------------------------------------------------------
# Model plumbing
# ---------------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def _eager(model):
    """Stock eager attention for the baseline (the arithmetic the method modifies), restored afterwards."""
    previous = model.config._attn_implementation
    model.set_attn_implementation("eager")
    try:
        yield None
    finally:
        model.set_attn_implementation(previous)


def _condition_context(model, condition: Condition, diagnostics: bool):
    if condition.mode is None:
        return _eager(model)
    from memreason.interventions.attention_rebalance import rebalance

    return rebalance(model, alpha=condition.alpha, theta=condition.theta, depth_h=condition.depth_h,
                     mode=condition.mode, seed=condition.seed, diagnostics=diagnostics)


def left_pad(sequences: Sequence[Sequence[int]], pad_id: int, device):
    """``[batch, length]`` ids, attention mask and position ids of left-padded sequences."""
    import torch

    length = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), length), dtype=torch.long)
    for row, sequence in enumerate(sequences):
        ids[row, length - len(sequence):] = torch.tensor(list(sequence), dtype=torch.long)
        mask[row, length - len(sequence):] = 1
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    return ids.to(device), mask.to(device), positions.to(device)


def pad_id_of(tokenizer) -> int:
    """The tokenizer's pad id, else its EOS id.

    Raises:
        ConfigError: the tokenizer has neither.
    """
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad is None:
        raise ConfigError("the tokenizer has neither a pad nor an EOS token")
    return int(pad)


def score_continuations(model, contexts: Sequence[Sequence[int]], continuations: Sequence[Sequence[int]],
                        pad_id: int) -> tuple[list[list[float]], list[int]]:
    """Log-likelihood of every continuation after every context, in one batched pass.

    When each continuation is a single token, one forward of the contexts is enough (the next-token
    distribution at the last position); otherwise each context + continuation pair is run and the
    continuation's token log-probabilities are summed.

    Args:
        model: causal LM.
        contexts (Sequence[Sequence[int]]): one token-id list per question.
        continuations (Sequence[Sequence[int]]): token ids of each option's continuation (shared).
        pad_id (int): padding id.

    Returns:
        tuple[list[list[float]], list[int]]: ``[question][option]`` log-likelihoods, and for each question
        the batch row whose forward carries its diagnostics (the context itself, or its first option).
    """
    import torch

    device = next(model.parameters()).device
    if all(len(c) == 1 for c in continuations):
        ids, mask, positions = left_pad(contexts, pad_id, device)
        with torch.no_grad():
            logits = model(input_ids=ids, attention_mask=mask, position_ids=positions).logits[:, -1]
        logprobs = torch.log_softmax(logits.float(), dim=-1)  # [batch, vocab]
        token_ids = torch.tensor([c[0] for c in continuations], device=device)
        return logprobs[:, token_ids].tolist(), list(range(len(contexts)))
    pairs = [list(context) + list(continuation) for context in contexts for continuation in continuations]
    ids, mask, positions = left_pad(pairs, pad_id, device)
    with torch.no_grad():
        logprobs = torch.log_softmax(model(input_ids=ids, attention_mask=mask, position_ids=positions)
                                     .logits.float(), dim=-1)  # [pairs, length, vocab]
    length = ids.shape[1]
    scores: list[list[float]] = []
    for q in range(len(contexts)):
        row_scores = []
        for o, continuation in enumerate(continuations):
            row = q * len(continuations) + o
            # Continuation token t sits at position length - n + t and is predicted from the one before.
            start = length - len(continuation)
            targets = torch.tensor(continuation, device=device)
            row_scores.append(float(logprobs[row, start - 1: length - 1].gather(-1, targets[:, None]).sum()))
        scores.append(row_scores)
    return scores, [q * len(continuations) for q in range(len(contexts))]


def _eos_ids(model, tokenizer) -> set[int]:
    ids = set()
    for value in (getattr(model.generation_config, "eos_token_id", None), tokenizer.eos_token_id):
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, (list, tuple)):
            ids.update(int(v) for v in value)
    return ids


def generate_batch(model, tokenizer, prompts: Sequence[Sequence[int]], max_new_tokens: int) -> list[dict]:
    """Greedy generation for a batch of tokenised prompts (left padding).

    Returns:
        list[dict]: per prompt ``text`` (special tokens removed), ``n_generated`` (tokens up to and including
        the first EOS) and ``hit_cap`` (no EOS within ``max_new_tokens``).
    """
    import torch

    device = next(model.parameters()).device
    pad_id = pad_id_of(tokenizer)
    ids, mask, _ = left_pad(prompts, pad_id, device)
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                             temperature=None, top_p=None, top_k=None, pad_token_id=pad_id)
    eos = _eos_ids(model, tokenizer)
    results = []
    for row in out[:, ids.shape[1]:].tolist():
        stop = next((i for i, token in enumerate(row) if token in eos), None)
        kept = row if stop is None else row[: stop + 1]
        results.append({"text": tokenizer.decode(kept, skip_special_tokens=True), "n_generated": len(kept),
                        "hit_cap": stop is None and len(kept) >= max_new_tokens})
    return results


# ---------------------------------------------------------------------------------------------------------
# Diagnostics from the mechanism's ForwardRecords
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


# ---------------------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------------------
def run_key(settings: EvalSettings, model_name: str, data_sha256: str, dtype: str) -> str:
    """A short hash of every setting that changes a per-question result (not limit, batch size or the
    condition list: rows of the same question and condition are comparable across those)."""
    payload = {"eval_version": EVAL_VERSION, "task_version": MMLU_TASK.version, "model": model_name,
               "dtype": dtype, "data": data_sha256, "mode": settings.mode, "style": settings.style,
               "alpha": settings.alpha, "theta": settings.theta, "depth_h": settings.depth_h,
               "seed": settings.seed, "max_new_tokens": settings.max_new_tokens if settings.mode == "cot" else None}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def file_sha256(path: str | os.PathLike) -> str:
    """SHA-256 of a file, or of a directory's ``*.csv`` files (names and contents, in name order)."""
    digest = hashlib.sha256()
    path = Path(path)
    for file in (sorted(path.glob("*.csv")) if path.is_dir() else [path]):
        digest.update(file.name.encode())
        digest.update(file.read_bytes())
    return digest.hexdigest()


def _read_existing(path: Path, key: str, overwrite: bool) -> dict[tuple[str, str], dict]:
    if not path.exists():
        return {}
    if overwrite:
        path.unlink()
        return {}
    rows = {}
    with path.open(encoding="utf-8") as handle:
        for index, line in enumerate(handle):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                # A line cut short by an interruption: keep everything before it, redo the rest.
                logger.warning("%s line %d is incomplete; it will be recomputed", path, index + 1)
                continue
            if row.get("run_key") != key:
                raise ConfigError(f"{path.parent} holds results of a different run (run key {row.get('run_key')}, "
                                  f"this run {key}); pass --overwrite to replace them or choose another --out")
            rows[(row["qid"], row["condition"])] = row
    return rows


def _atomic_write(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}-", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as handle:
            handle.write(text)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def evaluate_condition(model, tokenizer, questions: Sequence[Question], condition: Condition,
                       settings: EvalSettings, emit: Callable[[list[dict]], None],
                       progress: Callable[[int], None] | None = None) -> None:
    """Answer ``questions`` under one condition, handing each batch's rows to ``emit``.

    Rows hold the prediction and correctness, log-likelihoods ("ll") or the generated text, its length and
    the strict parse ("cot"), and mechanism diagnostics for rebalanced conditions.
    """
    style = settings.style
    pad_id = pad_id_of(tokenizer)
    continuations = letter_continuations(tokenizer) if settings.mode == "ll" else None
    diagnostics = condition.mode is not None
    for start in range(0, len(questions), settings.batch_size):
        batch = questions[start: start + settings.batch_size]
        prompts = [encode_prompt(tokenizer, build_prompt(q, settings.mode, style, tokenizer), style) for q in batch]
        with _condition_context(model, condition, diagnostics) as session:
            if settings.mode == "ll":
                scores, diag_rows = score_continuations(model, prompts, continuations, pad_id)
                answers = None
            else:
                answers = generate_batch(model, tokenizer, prompts, settings.max_new_tokens)
                diag_rows = list(range(len(batch)))
        rows = []
        for item, question in enumerate(batch):
            row = {"qid": question.qid, "subject": question.subject, "category": question.category,
                   "gold": question.answer, "condition": condition.name, "params": asdict(condition),
                   "prompt_tokens": len(prompts[item])}
            if answers is None:
                logprobs = scores[item]
                best = max(range(len(LETTERS)), key=lambda i: logprobs[i])
                norm = math.log(sum(math.exp(v - logprobs[best]) for v in logprobs)) + logprobs[best]
                row.update(predicted=LETTERS[best], correct=LETTERS[best] == question.answer,
                           logprobs=dict(zip(LETTERS, logprobs)),
                           p_gold=math.exp(logprobs[LETTERS.index(question.answer)] - norm))
            else:
                answer = answers[item]
                predicted = MMLU_TASK.extract(answer["text"])
                outcome = MMLU_TASK.score(answer["text"], question.answer)
                row.update(predicted=predicted, correct=outcome == CORRECT, outcome=outcome, **answer)
            if session is not None:
                acc = _new_acc()
                records = session.records if answers is None else session.records[: max(
                    1, answers[item]["n_generated"])]
                for record in records:
                    _accumulate(acc, record, diag_rows[item])
                row["diagnostics"] = _finish_acc(acc)
            rows.append(row)
        emit(rows)
        if progress is not None:
            progress(len(batch))


def run_eval(model, tokenizer, questions: Sequence[Question], settings: EvalSettings, out_dir: str | os.PathLike,
             *, model_name: str, data_path: str | os.PathLike, dtype: str = "float32", overwrite: bool = False,
             progress: Callable[[int], None] | None = None) -> dict:
    """Run every condition on the same questions, write the outputs and return the summary.

    Args:
        model, tokenizer: the causal LM (any attention implementation; it is restored afterwards).
        questions (Sequence[Question]): the full question list (``settings.limit`` selects from it).
        settings (EvalSettings): the run's settings.
        out_dir (str | PathLike): output directory (created).
        model_name (str): recorded in the outputs and the run key.
        data_path (str | PathLike): the data file or directory (hashed into the run key).
        dtype (str): the model's dtype, recorded in the run key.
        overwrite (bool): replace another run's rows in ``out_dir`` instead of refusing.
        progress (callable | None): called with the number of questions finished per batch.

    Returns:
        dict: the summary (also written to ``summary.json``).

    Raises:
        ConfigError: ``out_dir`` holds another run's results and ``overwrite`` is False.
    """
    import torch
    import transformers

    from memreason import __version__

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    chosen = select_questions(questions, settings.limit)
    key = run_key(settings, model_name, file_sha256(data_path), dtype)
    jsonl = out / "per_question.jsonl"
    done = _read_existing(jsonl, key, overwrite)
    conditions = settings.make_conditions()
    for condition in conditions:
        previous = next((row["params"] for (qid, name), row in done.items() if name == condition.name), None)
        if previous is not None and previous != asdict(condition):
            raise ConfigError(f"{out} holds '{condition.name}' rows made with other settings ({previous}); pass "
                              "--overwrite or choose another --out")
    if done:
        logger.info("resuming: %d question/condition results already in %s", len(done), jsonl)
    with jsonl.open("a", encoding="utf-8") as handle:
        def emit(rows: list[dict]) -> None:
            for row in rows:
                row["run_key"] = key
                done[(row["qid"], row["condition"])] = row
                handle.write(json.dumps(row, ensure_ascii=False) + "\n")
            handle.flush()
            os.fsync(handle.fileno())

        for condition in conditions:
            todo = [q for q in chosen if (q.qid, condition.name) not in done]
            if progress is not None and len(todo) < len(chosen):
                progress(len(chosen) - len(todo))
            if todo:
                evaluate_condition(model, tokenizer, todo, condition, settings, emit, progress)

    rows = [done[(q.qid, c.name)] for q in chosen for c in conditions]
    run_info = {"model": model_name, "dtype": dtype, "data": str(data_path), "data_sha256": file_sha256(data_path),
                "run_key": key, "n_questions": len(chosen), "settings": asdict(settings),
                "prompt_style": settings.style, "conditions": [asdict(c) for c in conditions],
                "eval_version": EVAL_VERSION, "memreason": __version__, "torch": torch.__version__,
                "transformers": transformers.__version__}
    # Round-trip through JSON so the returned summary is exactly what summary.json holds (tuples → lists).
    summary = json.loads(json.dumps(summarise(rows, [c.name for c in conditions], settings, run_info)))
    _atomic_write(out / "per_question.csv", _wide_csv(rows, chosen, [c.name for c in conditions], settings.mode))
    _atomic_write(out / "summary.json", json.dumps(summary, indent=2, ensure_ascii=False) + "\n")
    return summary


def _wide_csv(rows: list[dict], questions: Sequence[Question], names: Sequence[str], mode: str) -> str:
    import io

    index = {(row["qid"], row["condition"]): row for row in rows}
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    per_condition = ["predicted", "correct"] + (["p_gold"] if mode == "ll" else ["outcome", "n_generated"])
    writer.writerow(["qid", "subject", "category", "gold"] + [f"{field}_{name}" for name in names
                                                              for field in per_condition])
    for question in questions:
        cells = [question.qid, question.subject, question.category, question.answer]
        for name in names:
            row = index[(question.qid, name)]
            cells += [row.get(field_) if field_ != "correct" else int(row["correct"]) for field_ in per_condition]
        writer.writerow(["" if cell is None else cell for cell in cells])
    return buffer.getvalue()


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


def _compare(first: list[dict], second: list[dict], settings: EvalSettings, categories: Iterable[str]) -> dict:
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


def summarise(rows: list[dict], names: Sequence[str], settings: EvalSettings, run_info: dict | None = None) -> dict:
    """Accuracy per condition and category with Wilson CIs, paired comparisons, lengths and diagnostics.

    Args:
        rows (list[dict]): per-question rows of every condition (each question present in every condition).
        names (Sequence[str]): condition names, baseline first.
        settings (EvalSettings): for the mode, the bootstrap size and seed.
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


def format_table(summary: dict) -> str:
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
    lines.append(f"category n: " + ", ".join(f"{c} {conditions[names[0]]['categories'][c]['n']}" for c in categories))
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
