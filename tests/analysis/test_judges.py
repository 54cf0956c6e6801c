"""Tests of memreason.analysis.judges: the LLM judge against a scripted OpenAI-compatible server on
127.0.0.1 (memreason.serve), resumable verdict files, summaries, agreement, and the `inspect errors` /
`inspect decoupling` verbs. The exact judge has its own file (test_exact_judge.py)."""

from __future__ import annotations

import json
import re

import pytest

from judge_fixtures import FACTS, MEMORY_ERROR, REASON_ERROR, make_row, table, with_trace  # noqa: F401 - a fixture
from memreason.analysis import judges as J
from memreason.analysis.exact_judge import ExactJudge
from memreason.errors import ConfigError
from memreason.llm import OpenAIChat, ResponseCache
from memreason.serve import RequestError, ScriptedBackend, Server
from memreason.stats import wilson_ci


# ---------------------------------------------------------------- the LLM judge over HTTP

def _steps_in(request) -> int:
    return len(re.findall(r"^\d+\. ", request.messages[-1]["content"] if request.messages[-1]["role"] == "user"
                          else request.messages[1]["content"], re.MULTILINE))


def _llm(server, tmp_path, **kwargs):
    return J.LLMJudge(OpenAIChat(server.url, "test-key"), "judge-model", cache=ResponseCache(tmp_path / "cache"),
                      sleep=lambda s: None, **kwargs)


def _error_reply(wrong_step: int | None, types: list[str]):
    return json.dumps({"steps": [{"step": i + 1, "type": t, "correct": i != wrong_step} for i, t in enumerate(types)],
                       "explanation": "scripted"})


def test_llm_judge_attributes_the_first_incorrect_step_by_its_label(tmp_path):
    # the judge (blind to labels) calls step 3 a memory step; the trace's own label (reason) decides
    backend = ScriptedBackend([_error_reply(2, ["memory", "memory", "memory"])], model_id="judge-model")
    with Server(backend) as server:
        verdict = _llm(server, tmp_path).attribute_error(REASON_ERROR)
    assert verdict.source == "reason" and verdict.first_faulty == 2
    assert verdict.step_correct == (True, True, False)
    assert verdict.step_types == ("memory", "memory", "memory") and verdict.explanation == "scripted"
    request = backend.requests[0]
    prompt = request.messages[-1]["content"]
    assert "Correct answer: False" in prompt and "Model's answer: True" in prompt
    assert "1. The Boxer Rebellion" in prompt and "[memory]" not in prompt and "reason" not in prompt.split("Steps:")[1]
    assert request.seed == 0 and request.temperature == 0.0


def test_llm_judge_uses_its_own_type_for_unlabelled_steps_and_the_answer_when_no_step_fails(tmp_path):
    row = make_row("u", [("step", "The RAF was formed in 1898."), ("step", "So it fought.")])
    with Server(ScriptedBackend([_error_reply(0, ["memory", "reason"]), _error_reply(None, ["memory", "reason"])],
                                model_id="judge-model")) as server:
        judge = _llm(server, tmp_path)
        first = judge.attribute_error(row)
        second = judge.attribute_error(with_trace(row, question="another question?"))
    assert (first.source, first.first_faulty) == ("memory", 0)
    assert (second.source, second.first_faulty) == ("reason", None)
    assert second.to_dict()["at"] == "answer"


def test_llm_judge_replies_are_cached_by_prompt_model_and_seed(tmp_path):
    backend = ScriptedBackend([_error_reply(2, ["memory", "reason", "memory", "reason", "memory"])],
                              model_id="judge-model")
    with Server(backend) as server:
        _llm(server, tmp_path).attribute_error(MEMORY_ERROR)
        again = _llm(server, tmp_path)
        verdict = again.attribute_error(MEMORY_ERROR)
        assert again.requests == 0 and backend.count == 1 and verdict.source == "memory"
        other_seed = _llm(server, tmp_path, seed=7)
        other_seed.attribute_error(MEMORY_ERROR)
        assert other_seed.requests == 1 and backend.requests[-1].seed == 7
    key_files = list((tmp_path / "cache").rglob("*.json"))
    assert len(key_files) == 2
    assert "test-key" not in "".join(p.read_text() for p in key_files)


def test_llm_judge_reasks_after_an_invalid_reply_and_fails_after_its_attempts(tmp_path):
    good = _error_reply(0, ["memory", "reason", "reason"])
    backend = ScriptedBackend(["not json at all", json.dumps({"steps": []}), good], model_id="judge-model")
    with Server(backend) as server:
        verdict = _llm(server, tmp_path).attribute_error(REASON_ERROR)
        assert verdict.first_faulty == 0 and backend.count == 3
        retry = backend.requests[1].messages
        assert retry[-2] == {"role": "assistant", "content": "not json at all"}
        assert "could not be used: not JSON" in retry[-1]["content"]
        assert backend.requests[2].seed == 2  # attempt k uses seed + k
    with Server(ScriptedBackend(['{"steps": [{"type": "maybe", "correct": true}]}'], model_id="judge-model")) as server:
        record = J.verdict_row(make_row("z", [("memory", "x")]), _llm(server, tmp_path / "b", attempts=2), J.ERRORS)
    assert record["status"] == J.FAILED and "type" in record["reason"]


def test_llm_judge_retries_transport_errors_with_backoff(tmp_path):
    calls = []

    def flaky(request):
        calls.append(request)
        if len(calls) < 3:
            raise RequestError(503, "busy")
        return _error_reply(None, ["memory", "memory", "reason"])

    waits = []
    with Server(ScriptedBackend(flaky, model_id="judge-model")) as server:
        # jitter 0: the exact doubling sequence (memreason.llm.RetryPolicy shortens waits at random otherwise)
        judge = J.LLMJudge(OpenAIChat(server.url, None), "judge-model", sleep=waits.append, backoff=0.5, jitter=0.0)
        assert judge.attribute_error(REASON_ERROR).source == "reason"
    assert waits == [0.5, 1.0] and judge.requests == 3


def test_llm_decoupling_checks_form_against_the_label(tmp_path):
    row = make_row("d", [("memory", "The RAF was formed in 1918."), ("memory", "So it was too late."),
                     ("reason", "So the answer is no."), ("step", "Anyway.")])
    reply = json.dumps({"steps": [{"step": 1, "form": "fact"}, {"step": 2, "form": "inference"},
                                  {"step": 3, "form": "inference"}, {"step": 4, "form": "other"}]})
    backend = ScriptedBackend([reply], model_id="judge-model")
    with Server(backend) as server:
        verdict = _llm(server, tmp_path).check_decoupling(row)
    assert verdict.decoupled == (True, False, True, None)
    assert "judge what the step does, not whether it is true" in backend.requests[0].messages[-1]["content"]


# ---------------------------------------------------------------- running, summaries, agreement

def test_judge_rows_resumes_and_refuses_to_mix_configurations(table, tmp_path):
    rows = [MEMORY_ERROR, make_row("q2", [("memory", "La Paz is 3,600 metres above sea level.")], question="pasta?"),
            make_row("q3", [("reason", "x")])]
    out = tmp_path / "errors_exact.jsonl"
    first = J.judge_rows(rows, ExactJudge(table), J.ERRORS, out)
    assert [r["status"] for r in first] == ["ok", "ok", "not_applicable"]
    assert [r.get("source") for r in first] == ["memory", "reason", None]

    class Counting(ExactJudge):
        calls = 0

        def attribute_error(self, row):
            Counting.calls += 1
            return super().attribute_error(row)

    again = J.judge_rows(rows, Counting(table), J.ERRORS, out)
    assert Counting.calls == 0 and again == first
    with pytest.raises(ConfigError, match="another exact judge configuration"):
        J.judge_rows(rows, ExactJudge(table, threshold=0.5), J.ERRORS, out)
    assert len(J.judge_rows(rows, ExactJudge(table, threshold=0.5), J.ERRORS, out, overwrite=True)) == 3


def test_select_rows_takes_wrong_answers_for_errors_and_everything_for_decoupling():
    rows = [make_row("1", [], outcome="correct"), make_row("2", [], outcome="wrong"),
            make_row("3", [], outcome="unparseable")]
    assert [r.id for r in J.select_rows(rows, J.ERRORS)] == ["2"]
    assert [r.id for r in J.select_rows(rows, J.ERRORS, include_unparseable=True)] == ["2", "3"]
    assert len(J.select_rows(rows, J.DECOUPLING)) == 3


def test_error_summary_counts_sources_with_wilson_intervals():
    verdicts = ([{"status": "ok", "source": "memory", "first_faulty": 0}] * 3 +
                [{"status": "ok", "source": "reason", "first_faulty": None}] * 7 +
                [{"status": "not_applicable"}, {"status": "failed"}])
    summary = J.summarise_errors(verdicts)
    assert summary["n"] == 10 and summary["memory"]["share"] == 0.3 and summary["at_answer"] == 7
    assert summary["memory"]["ci95"] == list(wilson_ci(3, 10))
    assert summary["status"] == {"ok": 10, "not_applicable": 1, "failed": 1}


def test_decoupling_summary_counts_steps_by_label():
    verdicts = [{"status": "ok", "kinds": ["memory", "reason", "step"], "decoupled": [True, False, None],
                 "forms": ["fact", "fact", "inference"]},
                {"status": "ok", "kinds": ["memory"], "decoupled": [True], "forms": ["fact"]}]
    summary = J.summarise_decoupling(verdicts)
    assert summary["memory"]["n_steps"] == 2 and summary["memory"]["share"] == 1.0
    assert summary["reason"]["share"] == 0.0 and summary["unlabelled_steps"] == 1
    assert summary["forms"]["step"] == {"inference": 1}


def test_cohen_kappa_matches_a_hand_computed_value_and_is_undefined_for_one_shared_label():
    # 50 items: both memory 20, both reason 15, first memory / second reason 10, the reverse 5
    first = ["memory"] * 20 + ["reason"] * 15 + ["memory"] * 10 + ["reason"] * 5
    second = ["memory"] * 20 + ["reason"] * 15 + ["reason"] * 10 + ["memory"] * 5
    p_o, p_e = 35 / 50, (30 / 50) * (25 / 50) + (20 / 50) * (25 / 50)
    assert J.cohen_kappa(first, second) == pytest.approx((p_o - p_e) / (1 - p_e))
    assert J.cohen_kappa(["reason"] * 4, ["reason"] * 4) is None
    assert J.cohen_kappa(["memory", "reason"], ["reason", "memory"]) == pytest.approx(-1.0)


def test_agreement_joins_the_rows_both_judges_judged():
    a = [{"id": 1, "status": "ok", "source": "memory"}, {"id": 2, "status": "ok", "source": "reason"},
         {"id": 3, "status": "ok", "source": "reason"}, {"id": 4, "status": "not_applicable"}]
    b = [{"id": 1, "status": "ok", "source": "memory"}, {"id": 2, "status": "ok", "source": "memory"},
         {"id": 4, "status": "ok", "source": "memory"}]
    result = J.agreement(a, b)
    assert result["n"] == 2 and result["agreement"]["share"] == 0.5
    assert result["confusion"]["reason"]["memory"] == 1 and result["kappa"] == pytest.approx(0.0)


# ---------------------------------------------------------------- the CLI verbs

def test_inspect_errors_cli_runs_both_judges_and_reports_their_agreement(tmp_path, capsys, monkeypatch):
    from memreason.cli import main

    facts = tmp_path / "facts.json"
    facts.write_text(json.dumps(FACTS))
    rows = [MEMORY_ERROR, make_row("q2", [("memory", "La Paz lies about 3,600 metres above sea level."),
                                          ("reason", "So water boils hotter there.")]),
            make_row("q3", [("memory", "x")], outcome="correct")]
    results = tmp_path / "eval" / "results.jsonl"
    results.parent.mkdir()
    results.write_text("".join(json.dumps(r.to_dict()) + "\n" for r in rows))

    def reply(request):  # memory error for q1 (step 3), reasoning error for q2 (step 2)
        n = _steps_in(request)
        wrong = 2 if n == 5 else 1
        return _error_reply(wrong, ["memory" if i % 2 == 0 else "reason" for i in range(n)])

    backend = ScriptedBackend(reply, model_id="judge-model")
    monkeypatch.setenv("MEMREASON_API_KEY", "secret-key-123")
    with Server(backend) as server:
        code = main(["inspect", "errors", "--results", str(results), "--judge", "exact", "--judge", "llm",
                     "--facts", str(facts), "--model", "judge-model", "--base-url", server.url])
    assert code == 0
    out = tmp_path / "eval" / "inspect"
    summary = json.loads((out / "errors_summary.json").read_text())
    assert summary["judges"]["exact"]["summary"]["memory"]["count"] == 1
    assert summary["judges"]["llm"]["summary"]["n"] == 2
    assert summary["agreement"]["exact vs llm"]["n"] == 2
    assert summary["agreement"]["exact vs llm"]["agreement"]["share"] == 1.0
    assert summary["judges"]["llm"]["config"]["model"] == "judge-model"
    printed = capsys.readouterr().out
    assert "2 wrong answers of 3" in printed and "agreement exact vs llm" in printed
    files = "".join(p.read_text() for p in out.rglob("*") if p.is_file())
    assert "secret-key-123" not in files


def test_inspect_decoupling_cli_needs_facts_for_the_exact_judge(tmp_path, capsys):
    from memreason.cli import main

    results = tmp_path / "results.jsonl"
    results.write_text(json.dumps(MEMORY_ERROR.to_dict()) + "\n")
    assert main(["inspect", "decoupling", "--results", str(results), "--judge", "exact"]) == 2
    assert "--facts" in capsys.readouterr().err
    assert main(["inspect", "decoupling", "--results", str(results), "--judge", "exact", "--gold-data",
                 "bundled:strategyqa", "--gold-split", "test"]) == 0
    summary = json.loads((tmp_path / "inspect" / "decoupling_summary.json").read_text())
    # q1 is not a bundled StrategyQA id: the exact judge has no facts for it
    assert summary["judges"]["exact"]["summary"]["status"]["not_applicable"] == 1


def test_write_summary_covers_judges_run_earlier_and_keeps_their_config(tmp_path):
    verdict = {"status": "ok", "source": "memory", "first_faulty": 0}
    (tmp_path / "errors_exact.jsonl").write_text(json.dumps({"id": 1, **verdict}) + "\n")
    first = J.write_summary(tmp_path, J.ERRORS, {"exact": {"judge": "exact", "threshold": 0.8}})
    assert list(first["judges"]) == ["exact"] and first["agreement"] == {}
    (tmp_path / "errors_llm.jsonl").write_text(json.dumps({"id": 1, **verdict, "source": "reason"}) + "\n")
    second = J.write_summary(tmp_path, J.ERRORS, {"llm": {"judge": "llm", "model": "m"}})
    assert second["judges"]["exact"]["config"] == {"judge": "exact", "threshold": 0.8}
    assert second["agreement"]["exact vs llm"]["agreement"]["share"] == 0.0
    assert json.loads((tmp_path / "errors_summary.json").read_text()) == second
