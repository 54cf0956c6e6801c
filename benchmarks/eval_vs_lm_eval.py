"""Questions per second: ``memreason eval`` vs lm-evaluation-harness's Hugging Face backend, same model.

What a user who wants accuracy numbers would otherwise run is lm-eval's ``HFLM.generate_until`` (greedy,
stop strings, prompts sorted by length and batched). This script runs both on the same model object (the
embedded SmolLM2, or a trained run / its plain HF export via ``--model DIR``), the same rendered prompts
(the same token ids: checked), greedy decoding, the same batch size and the same cap on new tokens, in one
process, alternating the two for ``--rounds`` rounds; then, once, the official-style loop of
``eval_throughput.py`` (batch 1, ``max_length`` 700, no stop at the answer line) as a second baseline. It
prints each one's q/s, the ratios and how many predictions agree.

Timed: memreason's whole ``memreason.evaluate.evaluate`` (the loop behind ``memreason eval``: prompts,
generation with per-token log-probabilities, parsing, scoring, step confidences, a JSONL row per question,
the summary) against lm-eval's ``generate_until`` alone (no task, filter or metric code), so lm-eval is
timed doing less than we are.

The stop rule. memreason stops a row when the line after its first ``The answer is:`` is non-empty and
ended by a newline. lm-eval stops on plain substrings of the generated text and then cuts its output
*before* the first one, so "the newline after the answer" has no stop string. ``--until`` chooses:

* ``answer`` (default): the answer line's opening as stop strings: ``"The answer is: True"``, ``... False``
  and their lower/upper-case forms, and the same for ``Yes``/``No``, which untrained chat models write and
  the extractor rejects (letter tasks: each option letter, bare and after ``(``). Wherever the
  task's extractor can read an answer (``True``/``False`` at the start of the line, any case), lm-eval stops
  at or before the point where memreason stops (one or two tokens earlier: the rest of the line and its
  newline), so this favours lm-eval slightly. Because lm-eval removes the stop string, and with it the
  answer, the script keeps each generation's full decoded text (a subclass records what ``tok_decode``
  returned; nothing lm-eval computes changes) and reads the answer from lm-eval's output plus the stop
  string that ended it. An answer line outside that set (``The answer is: maybe``) does not stop lm-eval: it
  generates on to EOS or the cap; the script counts those rows (and rows ended by EOS, which lm-eval's
  decoded text does not show, are counted apart from rows that hit the cap).
* ``cot``: what lm-eval's own chain-of-thought tasks use (``"\\n\\n"``, ``"Question:"``, plus EOS, which
  lm-eval always adds): the answer is read from the first complete answer line of lm-eval's output.
  lm-eval then generates at least one line more than memreason whenever the model goes on after the answer.

Both engines are warmed up on two prompts first (untimed): memreason's one-time table of newline tokens
(~1 s per tokenizer) and lm-eval's first-call costs are left out of both.

Agreement: predictions (the task's strict extractor on the first complete answer line) compared on every
question, unparseable counted as an answer of its own, and how many lm-eval texts are a prefix of (or equal
to) memreason's text, i.e. token-for-token the same greedy decoding up to lm-eval's stop.

    .venv/bin/python benchmarks/eval_vs_lm_eval.py                          # base SmolLM2, 64 questions
    .venv/bin/python benchmarks/eval_vs_lm_eval.py --model runs/demo/export --no-official
    .venv/bin/python benchmarks/eval_vs_lm_eval.py --quick                  # tiny random model, seconds

Needs lm-eval (the ``bench`` extra: ``pip install -c constraints.txt lm-eval``).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import statistics
import tempfile
import time
from pathlib import Path


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None,
                        help="a trained run dir, its plain HF export, or a model dir (default: embedded SmolLM2)")
    parser.add_argument("--n", type=int, default=64, help="questions (default 64)")
    parser.add_argument("--batch-size", type=int, default=16, help="both engines' batch size (default 16)")
    parser.add_argument("--max-new-tokens", type=int, default=256, help="cap on new tokens, both engines")
    parser.add_argument("--max-length", type=int, default=700, help="official-style total length cap")
    parser.add_argument("--shots", type=int, default=1, help="worked examples for a base model (runs get 0)")
    parser.add_argument("--rounds", type=int, default=2, help="alternating rounds of memreason and lm-eval")
    parser.add_argument("--until", choices=["answer", "cot"], default="answer",
                        help="lm-eval's stop strings (see the module docstring)")
    parser.add_argument("--no-official", action="store_true", help="skip the official-style bs-1 loop")
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: tiny random SmolLM2-shaped model, 4 questions, 8 new tokens, 1 round")
    args = parser.parse_args(argv)
    if args.quick:  # the official-style loop then caps new tokens too (its 700 total would take minutes)
        args.n, args.max_new_tokens, args.rounds, args.batch_size = 4, 8, 1, 2
    return args


def load_reasoner(model_arg):
    """``memreason.load`` on a run, a model dir or the default; an export's ``memreason.json`` supplies the
    prompt style and task it was trained with (``memreason.load`` treats an export as a base model and
    would prompt it in chat style)."""
    import torch

    import memreason
    from memreason.tasks import get_task

    device = "cuda" if torch.cuda.is_available() else "cpu"
    mr = memreason.load(model_arg, device=device)
    info = Path(model_arg) / "memreason.json" if model_arg else None
    trained = False
    if info is not None and info.is_file():
        record = json.loads(info.read_text(encoding="utf-8"))
        mr = dataclasses.replace(mr, prompt_style=record["prompt_style"], task=get_task(record["task"]))
        trained = True
    elif model_arg is not None and (Path(model_arg) / "run.json").is_file():
        trained = True
    return mr, trained


def stop_strings(task, mode: str) -> list[str]:
    """lm-eval's ``until`` for ``mode`` (EOS is added by lm-eval itself)."""
    from memreason.errors import ConfigError
    from memreason.tasks import ANSWER_MARKER

    if mode == "cot":
        return ["\n\n", "Question:"]
    if task.answer_type == "boolean":
        # True/False are what the extractor reads; Yes/No are what an untrained chat model writes instead
        # (unparseable either way), and stopping on them too keeps lm-eval from running on to EOS there
        words = [w for a in (*task.answer_space(), "Yes", "No") for w in (a, a.lower(), a.upper())]
        return [f"{ANSWER_MARKER} {w}" for w in words]
    if task.answer_type == "letter":
        return [f"{ANSWER_MARKER} {p}{letter}" for letter in task.answer_space() for p in ("", "(")]
    raise ConfigError(f"task {task.name!r} has free-form answers, which no finite stop list covers; use --until cot")


def make_lm_eval(model, tokenizer, batch_size: int):
    """An lm-eval HFLM over the given model object that also keeps every generation's full decoded text."""
    from lm_eval.models.huggingface import HFLM

    class RecordingHFLM(HFLM):
        """HFLM plus a record of each generation's text before lm-eval cuts it at the stop string."""

        raw: dict = {}
        _last = ("", False)

        def tok_decode(self, tokens, skip_special_tokens: bool = True):
            text = super().tok_decode(tokens, skip_special_tokens=skip_special_tokens)
            ids = tokens if isinstance(tokens, list) else [tokens]
            self._last = (text, self.eot_token_id in ids)  # the text, and whether the row reached EOS
            return text

    class Hook:  # lm-eval calls add_partial(kind, (context, gen_kwargs), output) right after decoding a row
        def __init__(self, lm):
            self.lm = lm

        def add_partial(self, attr, req, res):
            self.lm.raw[req[0]] = self.lm._last

    lm = RecordingHFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, add_bos_token=False,
                       device=str(model.device))
    lm.raw = {}
    lm.set_cache_hook(Hook(lm))
    return lm


def run_lm_eval(lm, prompts, until, max_new_tokens: int) -> tuple[list[str], list[tuple[str, bool]], float]:
    """``generate_until`` on ``prompts``: (lm-eval's outputs, per row (full decoded text, reached EOS), seconds)."""
    from lm_eval.api.instance import Instance

    from demo_step import sync

    gen = {"until": list(until), "max_gen_toks": max_new_tokens, "do_sample": False}
    requests = [Instance("generate_until", {}, (p, dict(gen)), i) for i, p in enumerate(prompts)]
    lm.raw = {}
    sync(lm.device)
    start = time.perf_counter()
    outputs = lm.generate_until(requests, disable_tqdm=True)
    sync(lm.device)
    seconds = time.perf_counter() - start
    return outputs, [lm.raw[p] for p in prompts], seconds


def lm_eval_answer_texts(outputs, raws, until, mode: str) -> tuple[list[str], dict]:
    """The text each lm-eval prediction is read from, and how the rows ended (``{"stop": k, "eos": k, "cap": k}``).

    ``answer`` mode: lm-eval's output plus the stop string that ended it (found in the full text, where it
    starts right after the output); ``cot`` mode: lm-eval's output as it is.
    """
    texts, ends = [], {"stop": 0, "eos": 0, "cap": 0}
    for output, (raw, eos) in zip(outputs, raws):
        fired = [s for s in until if raw.startswith(output + s)]
        texts.append(output + fired[0] if mode == "answer" and fired else output)
        ends["stop" if fired else "eos" if eos else "cap"] += 1
    return texts, ends


def run_memreason(mr, questions, settings, examples, batch_size: int, out_dir: Path):
    """``memreason.evaluate.evaluate`` into a fresh directory: (Result rows in question order, seconds)."""
    from memreason.evaluate import RESULTS, evaluate, read_results

    from demo_step import sync

    sync(mr.model.device)
    start = time.perf_counter()
    evaluate(mr.model, mr.tokenizer, questions, mr.task, settings, out_dir, batch_size=batch_size,
             overwrite=True, examples=examples)
    sync(mr.model.device)
    seconds = time.perf_counter() - start
    by_id = {r.id: r for r in read_results(out_dir / RESULTS)}
    return [by_id[q.id] for q in questions], seconds


def agreement(ours, theirs) -> str:
    """``k/n`` identical predictions (None = unparseable counts as an answer) and ``both answered`` split."""
    same = sum(a == b for a, b in zip(ours, theirs))
    both = [(a, b) for a, b in zip(ours, theirs) if a is not None and b is not None]
    return f"{same}/{len(ours)} (where both answered: {sum(a == b for a, b in both)}/{len(both)})"


def alternate(mr, lm, questions, prompts, settings, examples, until, args):
    """Warm both engines up, then ``args.rounds`` rounds of each, order alternating; returns the last
    round's outputs of each and every round's seconds."""
    ours_s, theirs_s = [], []
    with tempfile.TemporaryDirectory(prefix="memreason-eval-bench-") as tmp:
        # warm-up, untimed: memreason's one-time table of newline tokens, both engines' first calls
        run_memreason(mr, questions[:2], dataclasses.replace(settings, max_new_tokens=4), examples, 2,
                      Path(tmp) / "warmup")
        run_lm_eval(lm, prompts[:2], until, 4)
        for r in range(args.rounds):
            order = ("memreason", "lm-eval") if r % 2 == 0 else ("lm-eval", "memreason")
            for arm in order:  # alternate: on a shared machine the load drifts over minutes
                if arm == "memreason":
                    rows, seconds = run_memreason(mr, questions, settings, examples, args.batch_size,
                                                  Path(tmp) / f"round{r}")
                    ours_s.append(seconds)
                else:
                    outputs, raws, seconds = run_lm_eval(lm, prompts, until, args.max_new_tokens)
                    theirs_s.append(seconds)
                print(f"[round {r + 1}/{args.rounds}] {arm}: {seconds:.1f} s ({len(prompts) / seconds:.3f} q/s)",
                      flush=True)
    return rows, ours_s, outputs, raws, theirs_s


def official_baseline(mr, prompts, ours_pred, ours_seconds: float, args) -> tuple[float | None, str]:
    """The official-style bs-1 loop once: (seconds, its report line); (None, "") with ``--no-official``."""
    from eval_throughput import cut_at_answer, official_style_loop

    if args.no_official:
        return None, ""
    start = time.perf_counter()
    official = official_style_loop(mr.model, mr.tokenizer, prompts, args.max_length,
                                   max_new_tokens=args.max_new_tokens if args.quick else None)
    seconds = time.perf_counter() - start
    predicted = [mr.task.extract(cut_at_answer(t)) for t in official]
    cap = f"{args.max_new_tokens} new tokens (--quick)" if args.quick else f"max_length {args.max_length}"
    return seconds, (f"official-style (batch 1, {cap}, no answer stop): {len(prompts) / seconds:.3f} q/s "
                     f"({seconds:.1f} s); memreason / official-style {seconds / ours_seconds:.2f}x; same prediction "
                     f"as memreason: {agreement(ours_pred, predicted)}")


def main(argv=None) -> int:
    args = parse_args(argv)
    if importlib.util.find_spec("lm_eval") is None:
        print("eval_vs_lm_eval.py needs lm-eval: pip install -c constraints.txt lm-eval (the 'bench' extra)")
        return 2
    import torch

    from demo_step import machine_line, tiny_smollm2_dir
    from eval_throughput import benchmark_prompts, cut_at_answer
    from memreason.evaluate import EvalSettings
    from memreason.generate import answer_complete, encode_prompts

    torch.manual_seed(0)
    tiny = Path(tempfile.gettempdir()) / "memreason-bench-tiny"
    mr, trained = load_reasoner(str(tiny_smollm2_dir(tiny)) if args.quick else args.model)
    questions, prompts, examples = benchmark_prompts(mr, args.n, 0 if trained else args.shots)
    settings = EvalSettings(model=mr.name, task=mr.task.name, source="bundled:strategyqa", split=None,
                            prompt_style=mr.prompt_style, scheme=mr.scheme.to_dict(),
                            max_new_tokens=args.max_new_tokens, extra={"shots": [t.id for t in examples]})
    until = stop_strings(mr.task, args.until)
    lm = make_lm_eval(mr.model, mr.tokenizer, args.batch_size)
    same_ids = sum(lm.tok_encode(p) == ids for p, ids in zip(prompts, encode_prompts(mr.tokenizer, prompts)))
    n = len(prompts)
    print(machine_line(str(mr.model.device)))
    print(f"model: {mr.name} ({'trained' if trained else 'base'}, prompt style {mr.prompt_style}, "
          f"{len(examples)} shot(s)); {n} questions; batch {args.batch_size}; max new tokens "
          f"{args.max_new_tokens}; lm-eval until={until!r} + EOS; prompts with identical token ids in both: "
          f"{same_ids}/{n}")

    rows, ours_s, outputs, raws, theirs_s = alternate(mr, lm, questions, prompts, settings, examples, until, args)
    ours_med, theirs_med = statistics.median(ours_s), statistics.median(theirs_s)
    texts, ends = lm_eval_answer_texts(outputs, raws, until, args.until)
    ours_pred = [row.predicted for row in rows]
    lm_pred = [mr.task.extract(cut_at_answer(t)) for t in texts]
    prefix = sum(row.raw.startswith(t) for row, t in zip(rows, texts))
    # rows memreason stopped at a complete answer line, and how many of those lines lm-eval's stops match
    answered = [row for row in rows if answer_complete(row.raw)]
    capped = sum(row.n_tokens >= args.max_new_tokens and not answer_complete(row.raw) for row in rows)
    covered = sum(any(s in cut_at_answer(row.raw) for s in until) for row in answered)
    official_s, official_line = official_baseline(mr, prompts, ours_pred, ours_med, args)

    print(f"memreason eval: {n / ours_med:.3f} q/s (median of {len(ours_s)}: "
          f"{', '.join(f'{s:.1f}' for s in ours_s)} s; {sum(r.n_tokens for r in rows)} tokens generated; rows "
          f"ended at the answer line {len(answered)}, by EOS {n - len(answered) - capped}, at the cap {capped})")
    print(f"lm-eval HFLM generate_until: {n / theirs_med:.3f} q/s (median of {len(theirs_s)}: "
          f"{', '.join(f'{s:.1f}' for s in theirs_s)} s; rows ended by a stop string {ends['stop']}, "
          f"by EOS {ends['eos']}, at the cap {ends['cap']})")
    print(f"memreason / lm-eval: {theirs_med / ours_med:.2f}x")
    print(f"same prediction, lm-eval vs memreason: {agreement(ours_pred, lm_pred)}; lm-eval text a prefix of "
          f"memreason's: {prefix}/{n}; memreason answer lines lm-eval's stop strings match: "
          f"{covered}/{len(answered)}")
    if official_line:
        print(official_line)
    name = Path(args.model).name if args.model else ("tiny random (--quick)" if args.quick else "base SmolLM2")
    official_cells = f"{n / official_s:.3f} | {official_s / ours_med:.2f}x" if official_s else "— | —"
    print("\nRESULTS.md row: | model | until | n | memreason q/s | lm-eval q/s | memreason/lm-eval | "
          "official q/s | memreason/official | same prediction (lm-eval) |")
    print(f"| {name} | {args.until} | {n} | {n / ours_med:.3f} | {n / theirs_med:.3f} | {theirs_med / ours_med:.2f}x"
          f" | {official_cells} | {sum(a == b for a, b in zip(ours_pred, lm_pred))}/{n} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
