import json
import os
import signal
import subprocess
import sys
import time

import pytest

from memreason.errors import ConfigError, DataError
from memreason.evaluate import EvalSettings, evaluate, read_results, score_row, summarise
from memreason.tasks import get_task
from memreason.traces import Trace

TASK = get_task("strategyqa")


def _settings(**changes):
    base = dict(model="tiny", task="strategyqa", source="test", split="test", prompt_style="plain",
                scheme={"style": "plain"}, max_new_tokens=6)
    return EvalSettings(**{**base, **changes})


def _traces(n):
    return [Trace(f"Is thing {i} true?", (), "True" if i % 2 else "False", {"id": f"q{i}"}) for i in range(n)]


@pytest.mark.parametrize("text,predicted,outcome", [
    ("<memory> Ice floats.\n<reason> So yes.\n<answer> The answer is: True", "True", "correct"),
    ("The answer is: false", "False", "wrong"),
    ("I think it is True", None, "unparseable"),          # no marker: no lenient fallback
    ("The answer is: Truthfully", None, "unparseable"),
])
def test_score_row_uses_the_task_registry_strictly(text, predicted, outcome):
    row = score_row(Trace("q?", (), "True", {"id": "a"}), [text], [5], TASK, _settings())
    assert (row.predicted, row.outcome) == (predicted, outcome)


def test_score_row_parses_steps_and_counts_markers():
    text = "<memory> Ice is less dense than water.\n<reason> Less dense floats.\n<answer> The answer is: True"
    row = score_row(Trace("q?", (), "True", {"id": "a"}), [text], [17], TASK, _settings()).to_dict()
    assert row["steps"] == [{"kind": "memory", "text": "Ice is less dense than water."},
                            {"kind": "reason", "text": "Less dense floats."}]
    assert (row["n_memory"], row["n_reason"], row["marker_tokens"]) == (1, 1, 3)


def test_majority_vote_over_samples():
    texts = ["The answer is: False", "The answer is: True", "junk", "The answer is: True"]
    row = score_row(Trace("q?", (), "True", {"id": "a"}), texts, [1, 1, 1, 1], TASK, _settings(samples=4))
    assert row.predicted == "True" and row.outcome == "correct" and len(row.samples) == 4


def test_summary_has_n_ci_and_unparseable():
    rows = [score_row(Trace("q", (), "True", {"id": str(i)}), [t], [3], TASK, _settings())
            for i, t in enumerate(["The answer is: True", "The answer is: False", "nothing", "The answer is: True"])]
    summary = summarise(rows, _settings())
    assert (summary["n"], summary["correct"], summary["wrong"], summary["unparseable"]) == (4, 2, 1, 1)
    low, high = summary["ci95"]
    assert low < 0.5 < high and summary["seed"] == 0


def _line(qid):
    return json.dumps({"id": qid, "question": "q?", "outcome": "correct", "steps": []})


def test_reading_skips_a_torn_last_line_without_touching_the_file_and_earlier_corruption_is_an_error(tmp_path):
    path = tmp_path / "results.jsonl"
    path.write_text(f'{_line("a")}\n{_line("b")}\n{{"id": "c", "que')
    before = path.read_bytes()
    assert [r.id for r in read_results(path)] == ["a", "b"]
    assert path.read_bytes() == before                      # a read never writes
    path.write_text(f'{_line("a")}\n{{broken\n{_line("c")}\n')
    with pytest.raises(DataError, match="results.jsonl:2 is not a JSON line"):
        read_results(path)


def test_rows_that_are_not_results_fail_naming_the_row_and_an_unknown_schema_names_itself(tmp_path):
    path = tmp_path / "notes.jsonl"
    path.write_text('{"note": "hello"}\n')
    with pytest.raises(DataError, match="row 1: not a memreason results row: missing id, question, outcome"):
        read_results(path)
    path.write_text(json.dumps({"schema": "memreason-result/9", "id": "a", "question": "q", "outcome": "x"}) + "\n")
    with pytest.raises(DataError, match="memreason-result/9"):
        read_results(path)


def test_a_results_row_written_before_the_schema_version_still_loads(tmp_path):
    legacy = {"id": "q1", "question": "Is ice cold?", "gold": "True", "predicted": "True", "outcome": "correct",
              "steps": [{"kind": "memory", "text": "Ice is frozen water."}, {"kind": "reason", "text": "So yes."}],
              "raw": "<memory> Ice is frozen water.\n<reason> So yes.\nThe answer is: True", "n_tokens": 14,
              "n_memory": 1, "n_reason": 1, "marker_tokens": 2, "task": "strategyqa", "task_version": 1,
              "seed": 0, "config": "abc"}
    path = tmp_path / "results.jsonl"
    path.write_text(json.dumps(legacy) + "\n")
    (result,) = read_results(path)
    assert result.prompt is None and result.trace.count("memory") == 1 and result.predicted == "True"
    again = result.to_dict()
    assert again["schema"] == "memreason-result/2"
    assert {k: again[k] for k in legacy} == legacy


def test_evaluate_resumes_without_duplicates_and_refuses_other_settings(tmp_path, tiny_model, tiny_tokenizer):
    traces = _traces(5)
    evaluate(tiny_model, tiny_tokenizer, traces[:3], TASK, _settings(), tmp_path, batch_size=2)
    summary = evaluate(tiny_model, tiny_tokenizer, traces, TASK, _settings(), tmp_path, batch_size=2)
    ids = [r.id for r in read_results(tmp_path / "results.jsonl")]
    assert sorted(ids) == [f"q{i}" for i in range(5)] and summary["n"] == 5
    with pytest.raises(ConfigError, match="different settings"):
        evaluate(tiny_model, tiny_tokenizer, traces, TASK, _settings(seed=1), tmp_path)
    again = evaluate(tiny_model, tiny_tokenizer, traces, TASK, _settings(seed=1), tmp_path, overwrite=True)
    assert again["n"] == 5


def test_evaluate_rejects_duplicate_ids(tmp_path, tiny_model, tiny_tokenizer):
    traces = _traces(2) + _traces(1)
    with pytest.raises(DataError, match="duplicate"):
        evaluate(tiny_model, tiny_tokenizer, traces, TASK, _settings(), tmp_path)


def _eval_command(model_dir, data, out):
    return [sys.executable, "-m", "memreason.cli", "eval", "--model", str(model_dir), "--data", str(data),
            "--task", "strategyqa", "--split", "test", "--out", str(out), "--batch-size", "2",
            "--max-new-tokens", "24", "--prompt-style", "plain", "--device", "cpu"]


def test_kill_9_during_eval_then_rerun_gives_exactly_one_row_per_id(tmp_path, tiny_model, tiny_tokenizer):
    model_dir = tmp_path / "model"
    tiny_model.save_pretrained(model_dir)
    tiny_tokenizer.save_pretrained(model_dir)
    n = 12
    data = tmp_path / "data.json"
    data.write_text(json.dumps([{"question": f"Is thing number {i} true?", "answer": "True", "cot_steps": [],
                                 "split": "test"} for i in range(n)]))
    out = tmp_path / "out"
    results = out / "results.jsonl"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    rows = lambda: results.read_text().count("\n") if results.exists() else 0  # noqa: E731
    kills = 0
    # kill before any row is written, after the first chunk, and later on
    for should_kill in (lambda started: time.time() - started > 0.5, lambda _: rows() >= 4, lambda _: rows() >= 8):
        proc = subprocess.Popen(_eval_command(model_dir, data, out), env=env, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        started = time.time()
        while proc.poll() is None and time.time() - started < 120:
            if should_kill(started):
                os.kill(proc.pid, signal.SIGKILL)
                kills += 1
                break
            time.sleep(0.02)
        proc.wait()
    assert kills >= 1
    final = subprocess.run(_eval_command(model_dir, data, out), env=env, capture_output=True, text=True, timeout=300)
    assert final.returncode == 0, final.stderr[-2000:]
    ids = [json.loads(line)["id"] for line in results.read_text().splitlines()]
    assert len(ids) == n and len(set(ids)) == n
    summary = json.loads((out / "summary.json").read_text())
    assert summary["n"] == n


@pytest.mark.smollm2
def test_smollm2_eval_writes_rows_and_summary(tmp_path, smollm2):
    model, tokenizer = smollm2
    from memreason.data import load_traces

    traces, _ = load_traces("bundled:strategyqa", split="test")
    settings = _settings(model="smollm2", prompt_style="chat", max_new_tokens=48)
    summary = evaluate(model, tokenizer, traces[:4], TASK, settings, tmp_path, batch_size=4)
    rows = read_results(tmp_path / "results.jsonl")
    assert summary["n"] == 4 == len(rows)
    assert all(r.outcome in ("correct", "wrong", "unparseable") and r.raw for r in rows)
    assert all("<|im_start|>" not in r.raw and "Question:" not in r.raw[:9] for r in rows)
    assert all(r.prompt and r.prompt.endswith("<|im_start|>assistant\n") for r in rows)


def _result(qid, outcome):
    from memreason.traces import Result
    return Result.from_dict({"id": qid, "question": f"{qid}?", "outcome": outcome})


def test_compare_pairs_by_id_counts_flips_and_says_what_it_could_not_pair():
    from memreason.evaluate import compare

    a = [_result("1", "correct"), _result("2", "wrong"), _result("3", "wrong"), _result("4", "correct")]
    b = [_result("2", "correct"), _result("3", "correct"), _result("4", "unparseable"), _result("5", "correct")]
    result = compare(a, b)
    assert (result.n, result.only_a, result.only_b) == (3, 1, 1)
    assert [r.id for r in result.gained] == ["2", "3"] and [r.id for r in result.lost] == ["4"]
    assert result.acc_a == pytest.approx(1 / 3) and result.acc_b == pytest.approx(2 / 3)
    assert result.p_mcnemar == pytest.approx(1.0)


def test_compare_refuses_disjoint_evaluations_rows_without_ids_and_duplicate_ids():
    from memreason.evaluate import compare
    from memreason.traces import Result

    with pytest.raises(DataError, match="no question in common"):
        compare([_result("1", "correct")], [_result("2", "correct")])
    anonymous = Result.from_dict({"id": None, "question": "q", "outcome": "correct"})
    with pytest.raises(DataError, match="have no question id"):
        compare([anonymous], [_result("1", "correct")])
    with pytest.raises(DataError, match="appears twice"):
        compare([_result("1", "correct"), _result("1", "wrong")], [_result("1", "correct")])


def test_rows_keep_prompt_token_ids_and_step_confidences_equal_to_a_separate_scoring_pass(tmp_path, tiny_reasoner):
    import torch

    from memreason.confidence import token_offsets
    from memreason.generate import encode_prompts
    from memreason.model.tokens import step_spans
    from memreason.prompts import render_prompt

    tiny_model, tiny_tokenizer, scheme, traces = tiny_reasoner
    evaluate(tiny_model, tiny_tokenizer, traces, TASK, _settings(max_new_tokens=80, scheme=scheme.to_dict()),
             tmp_path, batch_size=3)
    checked = 0
    for result, trace in zip(read_results(tmp_path / "results.jsonl"), traces):
        assert result.prompt == render_prompt(trace.question, TASK, tiny_tokenizer, "plain")
        assert tiny_tokenizer.decode(list(result.token_ids), skip_special_tokens=True) == result.raw
        assert len(result.step_confidence) == len(result.steps)
        prompt_ids = encode_prompts(tiny_tokenizer, [result.prompt])[0]
        ids = torch.tensor([prompt_ids + list(result.token_ids)])
        with torch.no_grad():
            logprobs = torch.log_softmax(tiny_model(ids).logits[0].float(), dim=-1)
        scored = [logprobs[len(prompt_ids) - 1 + j, t].item() for j, t in enumerate(result.token_ids)]
        offsets = token_offsets(tiny_tokenizer, list(result.token_ids))
        for span, confidence in zip(step_spans(result.raw), result.step_confidence):
            values = [lp for start, lp in zip(offsets, scored) if span.marker_end <= start < span.end]
            if confidence is None:
                assert not values
                continue
            assert confidence["n_tokens"] == len(values)
            assert confidence["mean"] == pytest.approx(sum(values) / len(values), abs=1e-4)
            assert confidence["min"] == pytest.approx(min(values), abs=1e-4)
            checked += 1
    assert checked >= 1


def test_a_question_longer_than_the_context_is_one_clear_error_before_any_generation(tmp_path, tiny_model,
                                                                                       tiny_tokenizer):
    huge = [Trace("Is it? " * 20_000, (), "True", {"id": "big"})]
    with pytest.raises(DataError, match="'big' is 140,000 characters"):
        evaluate(tiny_model, tiny_tokenizer, huge, TASK, _settings(), tmp_path)
    long = [Trace("word " * 600, (), "True", {"id": "long"})]
    with pytest.raises(DataError, match="exceeds the model's 512-token context"):
        evaluate(tiny_model, tiny_tokenizer, long, TASK, _settings(), tmp_path / "b")
