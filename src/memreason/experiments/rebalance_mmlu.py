"""Does attention rebalancing change MMLU answers? Baseline vs method vs controls (spec attention_rebalance.md §8-9).

This module owns the experiment: its settings (``RebalanceSettings``, the one dataclass ``memreason rebalance
eval`` reads from flags, ``--config`` files and ``key=value`` overrides), the prompts, how each condition
answers, the run directory and ``run()``. The mechanism is ``interventions.attention_rebalance``, the data
``data.mmlu``, the statistics and the printed report ``experiments.rebalance_report``.

* Two ways to answer, the same questions for every condition:
  ``"ll"``: log-likelihood multiple choice. One forward per question scores the continuations " A" ... " D"
  after "Answer:"; the prediction is the most likely letter. Cheap and sensitive to small effects.
  ``"cot"``: zero-shot chain of thought, greedy, capped at ``max_new_tokens``; the answer is read by the
  strict parser of the ``mmlu`` task (the text after the last "The answer is:"; no fallbacks, so a missing
  answer is "unparseable", never a guess, unlike the original's regex cascade, spec §3.2).
* Conditions: ``baseline`` (stock eager attention), ``mask`` (the method), and the controls ``boost-all``,
  ``random-mask`` (density-matched), ``renormalised`` and ``legacy`` (mask with the original's h = 31).
* Outputs in ``out``: ``per_question.jsonl`` (one row per question and condition, appended batch by batch,
  so an interrupted run resumes), ``per_question.csv`` (one row per question), ``summary.json`` and
  ``run_key.json``. A run never mixes with another: every row carries the run key (a digest of every setting
  that changes an answer), and a directory holding another run's rows is refused (the original silently
  re-scored old outputs, spec §3.1).
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import logging
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Literal, Sequence

from memreason.data.mmlu import (LETTERS, Question, bundled_sample_path, file_sha256, load_mmlu,
                                 select_questions)
from memreason.errors import ConfigError
from memreason.experiments.rebalance_report import BASELINE, row_diagnostics, summarise
from memreason.generate import continuation_logprobs, encode_prompts, generate_texts, left_pad, pad_id
from memreason.io import OutputDir, append_jsonl, atomic_write, read_jsonl, settings_digest, write_json
from memreason.tasks import ANSWER_MARKER, CORRECT, get_task

logger = logging.getLogger(__name__)

CONDITIONS = ("baseline", "mask", "boost-all", "random-mask", "renormalised", "legacy")
DEFAULT_CONDITIONS = ("baseline", "mask", "boost-all", "random-mask")
EVAL_VERSION = 1  # bump when prompts or scoring change; part of every row's run key
ROWS, TABLE, SUMMARY, RUN_FILE = "per_question.jsonl", "per_question.csv", "summary.json", "run_key.json"
DEFAULT_OUT_ROOT = "memreason-runs"


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
class RebalanceSettings:
    """Everything ``memreason rebalance eval`` does; every default is written here once.

    Args:
        data (str | None): MMLU CSV file or directory of ``<subject>_test.csv`` files; None = the bundled
            96-question sample.
        model (str | None): model dir, ``.gguf`` file or hub id; None = the embedded SmolLM2.
        dtype (str, default "auto"): auto, float32, bfloat16 or float16.
        device (str, default "auto"): auto, cpu, cuda, cuda:1, ...
        out (str | None): output directory; None = ``memreason-runs/rebalance-<mode>-<run key>``.
        overwrite (bool, default False): replace another run's results in ``out`` instead of refusing.
        mode ("ll" | "cot", default "ll"): log-likelihood scoring or chain-of-thought generation.
        conditions (tuple[str, ...]): names from ``CONDITIONS`` (an item may be a comma-separated list);
            ``baseline`` is added when missing.
        alpha, theta, depth_h, seed: rebalancing settings shared by every non-baseline condition
            (``legacy`` forces depth_h = 31); the seed also seeds the random mask and the bootstrap.
        prompt_style ("raw" | "chat" | None): raw text (as the original, and lm-eval's MMLU) or the tokenizer's
            chat template; None = raw for "ll", chat for "cot".
        max_new_tokens (int, default 256): generation cap ("cot").
        batch_size (int, default 8): questions per forward / generate call.
        limit (int | None): evaluate only this many questions (round-robin over categories).
        bootstrap_resamples (int, default 10000): resamples of the paired bootstrap CIs.

    Raises:
        ConfigError: every bad value at once.
    """

    data: str | None = None
    model: str | None = None
    dtype: str = "auto"
    device: str = "auto"
    out: str | None = None
    overwrite: bool = False
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

        names = tuple(name.strip() for item in self.conditions for name in str(item).split(",") if name.strip())
        problems = []
        if self.mode not in ("ll", "cot"):
            problems.append(f"unknown evaluation mode {self.mode!r}; choose ll or cot")
        unknown = [name for name in names if name not in CONDITIONS]
        if unknown:
            problems.append(f"unknown condition(s) {', '.join(unknown)}; choose from {', '.join(CONDITIONS)}")
        if len(set(names)) != len(names):
            problems.append(f"condition listed twice in {', '.join(names)}")
        object.__setattr__(self, "conditions", names if BASELINE in names else (BASELINE, *names))
        if self.prompt_style not in (None, "raw", "chat"):
            problems.append(f"unknown prompt style {self.prompt_style!r}; choose raw or chat")
        for name in ("max_new_tokens", "batch_size", "bootstrap_resamples"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                problems.append(f"{name} must be a positive integer, got {value!r}")
        if self.limit is not None and (isinstance(self.limit, bool) or not isinstance(self.limit, int)
                                       or self.limit < 1):
            problems.append(f"limit must be a positive integer, got {self.limit!r}")
        for name in ("dtype", "device"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name).strip():
                problems.append(f"{name} must be a non-empty string, got {getattr(self, name)!r}")
        try:
            RebalanceConfig(alpha=self.alpha, theta=self.theta, depth_h=self.depth_h, seed=self.seed)
        except ConfigError as exc:
            problems.append(str(exc))
        if problems:
            raise ConfigError("; ".join(problems))

    @property
    def style(self) -> str:
        """The prompt style in use: ``prompt_style``, else raw for "ll" and chat for "cot"."""
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


def check(settings: RebalanceSettings) -> list[str]:
    """Every problem with ``settings`` that needs the file system or the machine (not the model) to see.

    ``run`` calls it before loading anything; the CLI's one-line error lists them all.
    """
    import torch

    from memreason.errors import ModelLoadError
    from memreason.model.loading import resolve_dtype

    problems = []
    if settings.data is not None and not Path(settings.data).expanduser().exists():
        problems.append(f"data: no such file or directory: {settings.data}")
    if settings.model is not None:
        path = Path(settings.model).expanduser()
        # A hub id is "name" or "org/name"; a .gguf file or a name that starts like a path must exist here.
        if not path.exists() and (path.suffix == ".gguf" or settings.model.startswith((".", "/", "~"))):
            problems.append(f"model: no such file or directory: {settings.model}")
    if settings.out is not None and Path(settings.out).expanduser().exists() \
            and not Path(settings.out).expanduser().is_dir():
        problems.append(f"out: {settings.out} is a file; give a directory")
    try:
        resolve_dtype(settings.dtype, "cpu")
    except ModelLoadError as exc:
        problems.append(f"dtype: {exc}")
    device = settings.device.strip()
    if device != "auto":
        try:
            torch.device(device)
        except (RuntimeError, ValueError):
            problems.append(f"device: {device!r} is not a device; use auto, cpu, cuda, cuda:1, ...")
        else:
            if device.startswith("cuda") and not torch.cuda.is_available():
                problems.append(f"device {device!r}: no CUDA device on this machine; use --device cpu or auto")
    return problems


# ---------------------------------------------------------------------------------------------------------
# Prompts
# ---------------------------------------------------------------------------------------------------------
def _question_block(question: Question) -> str:
    options = "\n".join(f"{letter}. {text}" for letter, text in zip(LETTERS, question.options))
    return f"{question.question}\n{options}"


def build_prompt(question: Question, mode: str, style: str, tokenizer=None) -> str:
    """The rendered prompt text for one question (tokenise it with ``generate.encode_prompts``).

    ``ll`` raw: lm-eval's MMLU layout ending in ``"Answer:"`` (the scored continuations are " A" ... " D").
    ``ll`` chat: the question in a user turn, then the assistant's answer line up to ``"The answer is:"``.
    ``cot``: the question plus the ``mmlu`` task's instruction, as raw text or in a user turn.

    Args:
        tokenizer: needed for chat style; for raw style, a raw prompt starts with the BOS text the tokenizer
            would add on its own (None: no BOS). A chat template carries its own special tokens.

    Raises:
        ConfigError: chat style with a tokenizer that has no chat template.
    """
    header = f"The following is a multiple choice question about {question.subject.replace('_', ' ')}."
    if mode == "ll":
        if style == "raw":
            return f"{_bos_text(tokenizer)}{header}\n\n{_question_block(question)}\nAnswer:"
        content = f"{header}\n\n{_question_block(question)}\n\nAnswer with the letter of the correct option."
        return _chat(tokenizer, content) + ANSWER_MARKER
    content = f"{header} {get_task('mmlu').instruction}\n\n{_question_block(question)}\n"
    return _bos_text(tokenizer) + content if style == "raw" else _chat(tokenizer, content)


def _bos_text(tokenizer) -> str:
    """The BOS token's text when tokenising with special tokens would put it first (Llama-3, Mistral), else
    ``""`` (SmolLM2, GPT-2). Raw prompts were scored with that BOS before prompts became rendered text."""
    if tokenizer is None or tokenizer.bos_token_id is None or not tokenizer.bos_token:
        return ""
    with_special = tokenizer("x", add_special_tokens=True)["input_ids"]
    plain = tokenizer("x", add_special_tokens=False)["input_ids"]
    return tokenizer.bos_token if with_special[:1] == [tokenizer.bos_token_id] != plain[:1] else ""


def _chat(tokenizer, content: str) -> str:
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        raise ConfigError("prompt style 'chat' needs a tokenizer with a chat template; use --prompt-style raw")
    return tokenizer.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                         add_generation_prompt=True)


def letter_continuations(tokenizer) -> list[list[int]]:
    """Token ids of " A" ... " D" (what follows "Answer:" / "The answer is:")."""
    return [list(tokenizer(f" {letter}", add_special_tokens=False).input_ids) for letter in LETTERS]


# ---------------------------------------------------------------------------------------------------------
# Answering
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


def score_continuations(model, contexts: Sequence[Sequence[int]], continuations: Sequence[Sequence[int]],
                        pad: int) -> tuple[list[list[float]], list[int]]:
    """Log-likelihood of every continuation after every context, in one model forward.

    When each continuation is a single token, one forward of the left-padded contexts is enough (the
    next-token distribution at the last position; a test pins it to ``continuation_logprobs``); otherwise
    ``generate.continuation_logprobs`` scores every context + continuation pair in one batch.

    Args:
        model: causal LM.
        contexts (Sequence[Sequence[int]]): one token-id list per question.
        continuations (Sequence[Sequence[int]]): token ids of each option's continuation (shared).
        pad (int): padding id.

    Returns:
        tuple[list[list[float]], list[int]]: ``[question][option]`` log-likelihoods, and for each question
        the batch row whose forward carries its diagnostics (the context itself, or its first option).
    """
    import torch

    if all(len(c) == 1 for c in continuations):
        batch = left_pad(contexts, pad, next(model.parameters()).device)
        with torch.no_grad():
            logits = model(**batch).logits[:, -1]  # [batch, vocab]
        logprobs = torch.log_softmax(logits.float(), dim=-1)
        token_ids = torch.tensor([c[0] for c in continuations], device=logprobs.device)
        return logprobs[:, token_ids].tolist(), list(range(len(contexts)))
    pairs = [(context, continuation) for context in contexts for continuation in continuations]
    # One batch for all pairs: the diagnostics read the one forward's records by batch row.
    flat = continuation_logprobs(model, pairs, pad, batch_size=len(pairs))
    n = len(continuations)
    return [flat[q * n:(q + 1) * n] for q in range(len(contexts))], [q * n for q in range(len(contexts))]


def _generate(model, tokenizer, texts: list[str], prompts: list[list[int]], max_new_tokens: int):
    """Greedy generations of one batch, in prompt order, and each prompt's row in that batch.

    ``generate_texts`` runs prompts longest first; handing it the batch in that order makes batch row r
    prompt r of the order, which the diagnostics need to read their rows of each forward.
    """
    order = sorted(range(len(texts)), key=lambda i: -len(prompts[i]))
    generations = generate_texts(model, tokenizer, [texts[i] for i in order], max_new_tokens=max_new_tokens,
                                 batch_size=len(texts), stop_at_answer=False)
    answers: list[dict] = [{}] * len(texts)
    rows = [0] * len(texts)
    for row, (index, generation) in enumerate(zip(order, generations)):
        answers[index] = {"text": generation.text, "n_generated": generation.n_tokens,
                          "hit_cap": generation.stopped == "length" and generation.n_tokens >= max_new_tokens}
        rows[index] = row
    return answers, rows


def evaluate_condition(model, tokenizer, questions: Sequence[Question], condition: Condition,
                       settings: RebalanceSettings, emit: Callable[[list[dict]], None],
                       progress: Callable[[int], None] | None = None) -> None:
    """Answer ``questions`` under one condition, handing each batch's rows to ``emit``.

    Rows hold the prediction and correctness, log-likelihoods ("ll") or the generated text, its length and
    the strict parse ("cot"), and mechanism diagnostics for rebalanced conditions.
    """
    task = get_task("mmlu")
    style = settings.style
    pad = pad_id(tokenizer)
    continuations = letter_continuations(tokenizer) if settings.mode == "ll" else None
    diagnostics = condition.mode is not None
    for start in range(0, len(questions), settings.batch_size):
        batch = questions[start: start + settings.batch_size]
        texts = [build_prompt(q, settings.mode, style, tokenizer) for q in batch]
        prompts = encode_prompts(tokenizer, texts)
        with _condition_context(model, condition, diagnostics) as session:
            if settings.mode == "ll":
                scores, diag_rows = score_continuations(model, prompts, continuations, pad)
                answers = None
            else:
                answers, diag_rows = _generate(model, tokenizer, texts, prompts, settings.max_new_tokens)
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
                outcome = task.score(answer["text"], question.answer)
                row.update(predicted=task.extract(answer["text"]), correct=outcome == CORRECT, outcome=outcome,
                           **answer)
            if session is not None:
                # The forwards behind this answer: the one scoring forward, or prefill + one per new token.
                records = session.records if answers is None else session.records[: max(
                    1, answers[item]["n_generated"])]
                row["diagnostics"] = row_diagnostics(records, diag_rows[item])
            rows.append(row)
        emit(rows)
        if progress is not None:
            progress(len(batch))


# ---------------------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------------------
def run_identity(settings: RebalanceSettings, model_name: str, data_sha256: str, dtype: str) -> dict:
    """Every setting that changes a per-question result (not limit, batch size or the condition list: rows
    of the same question and condition are comparable across those); its digest is the run key."""
    return {"eval_version": EVAL_VERSION, "task_version": get_task("mmlu").version, "model": model_name,
            "dtype": dtype, "data": data_sha256, "mode": settings.mode, "style": settings.style,
            "alpha": settings.alpha, "theta": settings.theta, "depth_h": settings.depth_h,
            "seed": settings.seed, "max_new_tokens": settings.max_new_tokens if settings.mode == "cot" else None}


def run_key(settings: RebalanceSettings, model_name: str, data_sha256: str, dtype: str) -> str:
    """The run key: ``settings_digest`` of ``run_identity``."""
    return settings_digest(run_identity(settings, model_name, data_sha256, dtype))


def _check_rows(rows: list, key: str, conditions: Sequence[Condition], out: Path) -> None:
    """Refuse rows of another run. Rows carry their run key, so this also guards directories written
    before ``run_key.json`` existed."""
    params = {condition.name: asdict(condition) for condition in conditions}
    for row in rows:
        if not isinstance(row, dict) or row.get("run_key") != key:
            found = row.get("run_key") if isinstance(row, dict) else None
            raise ConfigError(f"{out} holds results of a different run (run key {found}, this run {key}); pass "
                              "--overwrite to replace them or choose another --out")
        expected = params.get(row.get("condition"))
        if expected is not None and row.get("params") != expected:
            raise ConfigError(f"{out} holds '{row['condition']}' rows made with other settings ({row['params']}); "
                              "pass --overwrite or choose another --out")


def _resume(out: Path, identity: dict, conditions: Sequence[Condition], overwrite: bool) -> dict:
    """Open ``out`` for this run: the rows already there by (qid, condition), after refusing another run's.

    Raises:
        ConfigError: ``out`` holds another run's rows (or is unusable) and ``overwrite`` is False.
    """
    key, jsonl = settings_digest(identity), out / ROWS
    if not overwrite and jsonl.is_file():
        _check_rows(read_jsonl(jsonl), key, conditions, out)  # a read; OutputDir below repairs a torn tail
    output = OutputDir(out, identity, overwrite=overwrite, config_name=RUN_FILE, digest_key="run_key",
                       outputs=(ROWS, TABLE, SUMMARY))
    done = {(row["qid"], row["condition"]): row for row in output.resume_rows(ROWS)}
    if done:
        logger.info("resuming: %d question/condition results already in %s", len(done), jsonl)
    return done


def run(settings: RebalanceSettings, *, model=None, tokenizer=None, progress: Callable[[int], None] | None = None,
        on_start: Callable[[dict], None] | None = None) -> dict:
    """Run every condition on the same questions, write the outputs and return the summary.

    Order: every settings problem (``check``), then the data, then the model, so a mistake fails in a
    second, not after loading weights.

    Args:
        settings (RebalanceSettings): the run.
        model, tokenizer: an already loaded causal LM (any attention implementation; restored afterwards);
            None = load ``settings.model``. ``settings.model`` (or the model's ``name_or_path``) names it.
        progress (callable | None): called with the number of questions finished (resumed ones included).
        on_start (callable | None): called once the model is loaded with a dict: ``model``, ``layers``,
            ``dtype``, ``device``, ``data``, ``n_questions``, ``n_chosen``, ``out``, ``total``
            (questions x conditions).

    Returns:
        dict: the summary (also written to ``summary.json``).

    Raises:
        ConfigError: bad settings, or ``out`` holds another run's results and ``overwrite`` is False.
        DataError: bad data (file, row and field named). ModelLoadError: the model cannot be loaded.
    """
    import torch
    import transformers

    from memreason import __version__

    problems = check(settings)
    if problems:
        raise ConfigError("; ".join(problems))
    data = Path(settings.data) if settings.data else bundled_sample_path()
    questions = load_mmlu(data)
    if model is None:
        from memreason.model import load

        model, tokenizer = load(settings.model, dtype=settings.dtype, device=settings.device)
    dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
    model_name = settings.model or model.config.name_or_path
    identity = run_identity(settings, model_name, file_sha256(data), dtype)
    key = settings_digest(identity)
    out = Path(settings.out) if settings.out else Path(DEFAULT_OUT_ROOT) / f"rebalance-{settings.mode}-{key[:8]}"
    chosen = select_questions(questions, settings.limit)
    conditions = settings.make_conditions()
    if on_start is not None:
        on_start({"model": model_name, "layers": model.config.num_hidden_layers, "dtype": dtype,
                  "device": str(model.device), "data": str(data), "n_questions": len(questions),
                  "n_chosen": len(chosen), "out": str(out), "total": len(chosen) * len(conditions)})

    jsonl = out / ROWS
    done = _resume(out, identity, conditions, settings.overwrite)

    def emit(rows: list[dict]) -> None:
        for row in rows:
            row["run_key"] = key
            done[(row["qid"], row["condition"])] = row
        append_jsonl(jsonl, rows)

    for condition in conditions:
        todo = [q for q in chosen if (q.qid, condition.name) not in done]
        if progress is not None and len(todo) < len(chosen):
            progress(len(chosen) - len(todo))
        if todo:
            evaluate_condition(model, tokenizer, todo, condition, settings, emit, progress)

    rows = [done[(q.qid, c.name)] for q in chosen for c in conditions]
    run_info = {"model": model_name, "dtype": dtype, "data": str(data), "data_sha256": identity["data"],
                "run_key": key, "n_questions": len(chosen), "settings": asdict(settings),
                "prompt_style": settings.style, "conditions": [asdict(c) for c in conditions],
                "eval_version": EVAL_VERSION, "memreason": __version__, "torch": torch.__version__,
                "transformers": transformers.__version__}
    # Round-trip through JSON so the returned summary is exactly what summary.json holds (tuples → lists).
    summary = json.loads(json.dumps(summarise(rows, [c.name for c in conditions], settings, run_info)))
    atomic_write(out / TABLE, _wide_csv(rows, chosen, [c.name for c in conditions], settings.mode))
    write_json(out / SUMMARY, summary, indent=2)
    return summary


def _wide_csv(rows: list[dict], questions: Sequence[Question], names: Sequence[str], mode: str) -> str:
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
