"""The annotation agent, end to end against the real server (scripted and tiny-model backends)."""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import openai
import pytest

from memreason.data.annotate import AnnotateConfig, AnnotationReport, annotate
from memreason.data.annotate_checks import InvalidReply, validate_facts, validate_plan
from memreason.data.annotate_prompts import KNOWLEDGE_SYSTEM, PLAN_SCHEMA, PLAN_SYSTEM
from memreason.data import load_traces, require_steps
from memreason.errors import ConfigError
from memreason.io import read_jsonl
from memreason.serve import ModelBackend, RequestError, ScriptedBackend, Server
from memreason.tasks import get_task
from memreason.traces import MEMORY, REASON, Step, Trace

TASK = get_task("strategyqa")
REPO = Path(__file__).resolve().parents[2]


def _plan(*steps, answer="True"):
    return json.dumps({"steps": [{"kind": k, "query": q, "text": t} for k, q, t in steps], "answer": answer})


GOOD = _plan(("memory", "How dense is ice?", "Ice is less dense than water."),
             ("memory", "What floats?", "Things less dense than water float."),
             ("reason", "", "So ice floats on water."))

# question -> the plan replies, by attempt (the last one repeats)
PLANS = {
    "good": [GOOD],
    "fenced": ["Here you go:\n```json\n" + json.dumps({"steps": [
        {"kind": "rag", "query": "How dense is ice?", "text": "Ice is  less dense\nthan water."},
        {"kind": "Reasoning", "query": "", "text": "So it\n  floats."}], "answer": "True"}) + "\n```"],
    "notjson": ["I think the answer is yes, because ice floats."],
    "schema-then-good": ['{"thoughts": "ice floats"}', GOOD],
    "all-empty": [_plan(("memory", "q?", ""), ("reason", "", "   "))],
    "one-empty": [_plan(("memory", "How dense is ice?", "Ice is less dense than water."), ("memory", "q?", " "),
                        ("reason", "", "So it floats."))],
    "wrong-answer": [_plan(("memory", "q?", "A fact."), ("reason", "", "So no."), answer="False")],
    "yes": [_plan(("memory", "q?", "A fact."), ("reason", "", "So yes."), answer="yes")],
    "interleaved": [_plan(("memory", "q1?", "Fact one."), ("reason", "", "A step."), ("memory", "q2?", "Fact two."),
                          ("reason", "", "So yes."))],
    "facts-missing-once": [_plan(("memory", "Missing once?", "A fact."), ("reason", "", "So yes."))],
}


def _fact(query):
    return f"FACT[{query}]"


def responder(request):
    """The scripted model: plans by question, facts by numbered query."""
    system, user = request.messages[0]["content"], request.messages[1]["content"]
    attempt = sum(m["role"] == "assistant" for m in request.messages)
    if system == PLAN_SYSTEM:
        question = re.search(r"^Question: (.*)$", user, re.M).group(1)
        replies = PLANS[question]
        return replies[min(attempt, len(replies) - 1)]
    assert system == KNOWLEDGE_SYSTEM
    queries = re.findall(r"^(\d+)\. (.*)$", user, re.M)
    facts = [{"id": int(i), "fact": _fact(q)} for i, q in queries]
    if "Missing once?" in user and attempt == 0:
        facts = []
    return json.dumps({"facts": facts})


def _items(*questions, answer="True"):
    return [Trace(q, (), answer, {"id": f"id-{q}", "source": "test"}) for q in questions]


@pytest.fixture
def scripted():
    backend = ScriptedBackend(responder, model_id="annotator")
    server = Server(backend).start()
    try:
        yield backend, server
    finally:
        server.shutdown()


def _config(**changes):
    return AnnotateConfig(**{"model": "annotator", "task": "strategyqa", "concurrency": 2, "backoff": 0.01,
                             **changes})


def _rows(path):
    return read_jsonl(path)  # a line torn by a kill is skipped, never an error


def test_knowledge_answers_become_the_memory_steps_text(scripted, tmp_path):
    backend, server = scripted
    report = annotate(_items("good"), tmp_path, _config(), base_url=server.url)
    (row,) = _rows(tmp_path / "traces.jsonl")
    trace = Trace.from_dict(row)
    assert trace.steps == (Step(MEMORY, _fact("How dense is ice?")), Step(MEMORY, _fact("What floats?")),
                           Step(REASON, "So ice floats on water."))
    assert trace.answer == "True" and trace.id == "id-good"
    assert row["meta"]["annotation"]["queries"] == ["How dense is ice?", "What floats?"]
    assert (report.accepted, report.repaired, report.rejected, report.requests) == (1, 0, 0, 2)
    loaded, _ = load_traces(tmp_path / "traces.jsonl", task="strategyqa")  # ready for training as it is
    assert require_steps(loaded) == [trace]
    # the knowledge call sees the queries only, never the question or its gold answer
    knowledge = [r for r in backend.requests if r.messages[0]["content"] == KNOWLEDGE_SYSTEM]
    assert "good" not in knowledge[0].messages[1]["content"].split() and "Correct answer" not in \
        knowledge[0].messages[1]["content"]


def test_without_the_knowledge_pass_memory_steps_keep_the_plans_text(scripted, tmp_path):
    backend, server = scripted
    annotate(_items("good"), tmp_path, _config(fill_knowledge=False), base_url=server.url)
    trace = Trace.from_dict(_rows(tmp_path / "traces.jsonl")[0])
    assert trace.steps[0] == Step(MEMORY, "Ice is less dense than water.") and backend.count == 1


def test_malformed_replies_are_repaired_or_rejected_with_a_reason(scripted, tmp_path):
    backend, server = scripted
    questions = ["good", "fenced", "notjson", "schema-then-good", "all-empty", "one-empty", "wrong-answer", "yes",
                 "facts-missing-once"]
    report = annotate(_items(*questions), tmp_path, _config(), base_url=server.url)
    rows = {row["meta"]["id"]: row for row in _rows(tmp_path / "traces.jsonl")}
    status = {i[3:]: row["meta"]["annotation"]["status"] for i, row in rows.items()}
    assert status == {"good": "accepted", "schema-then-good": "accepted", "facts-missing-once": "accepted",
                      "fenced": "repaired", "one-empty": "repaired", "yes": "repaired"}
    assert set(rows["id-fenced"]["meta"]["annotation"]["repairs"]) == {"json_extracted", "tag_alias", "whitespace"}
    assert [s["kind"] for s in rows["id-fenced"]["steps"]] == [MEMORY, REASON]
    assert rows["id-one-empty"]["meta"]["annotation"]["repairs"] == ["empty_step_dropped"]
    assert len(rows["id-one-empty"]["steps"]) == 2
    assert rows["id-yes"]["meta"]["annotation"]["repairs"] == ["answer_format"]
    assert rows["id-schema-then-good"]["meta"]["annotation"]["attempts"] == {"plan": 2, "knowledge": 1}
    assert rows["id-facts-missing-once"]["meta"]["annotation"]["attempts"] == {"plan": 1, "knowledge": 2}
    rejected = {row["id"][3:]: row for row in _rows(tmp_path / "rejected.jsonl")}
    assert {k: v["category"] for k, v in rejected.items()} == {
        "notjson": "plan: not JSON", "all-empty": "plan: too few memory steps",
        "wrong-answer": "plan: answer disagrees with gold"}
    assert "after 3 attempts" in rejected["notjson"]["reason"]
    assert (report.accepted, report.repaired, report.rejected) == (3, 3, 3)
    assert dict(report.rejections) == {v["category"]: 1 for v in rejected.values()}
    saved = json.loads((tmp_path / "report.json").read_text())
    assert saved["rejected"] == 3 and saved["repairs"]["json_extracted"] == 1
    # a retry tells the model what was wrong with its reply
    retry = next(r for r in backend.requests if "notjson" in r.messages[1]["content"] and len(r.messages) == 4)
    assert "not JSON" in retry.messages[3]["content"] and retry.seed == 1


def test_ordered_variant_rejects_a_memory_step_after_reasoning(scripted, tmp_path):
    backend, server = scripted
    free = annotate(_items("interleaved"), tmp_path / "free", _config(variant="free"), base_url=server.url)
    ordered = annotate(_items("interleaved"), tmp_path / "ordered", _config(variant="ordered"), base_url=server.url)
    assert (free.accepted, ordered.rejected) == (1, 1)
    assert dict(ordered.rejections) == {"plan: memory step after a reason step": 1}
    prompts = {r.messages[1]["content"] for r in backend.requests if r.messages[0]["content"] == PLAN_SYSTEM}
    assert any("before the first reason step" in p for p in prompts)
    assert any("may alternate" in p for p in prompts)


def test_rerun_costs_no_requests_and_cache_serves_a_fresh_output(scripted, tmp_path):
    backend, server = scripted
    items = _items("good", "fenced", "notjson")
    annotate(items, tmp_path / "a", _config(), base_url=server.url, cache_dir=tmp_path / "cache")
    served = backend.count
    first = (tmp_path / "a" / "traces.jsonl").read_text()
    again = annotate(items, tmp_path / "a", _config(), base_url=server.url, cache_dir=tmp_path / "cache")
    assert backend.count == served and again.skipped == 2 and again.rejected == 1 and again.requests == 0
    assert (tmp_path / "a" / "traces.jsonl").read_text() == first
    fresh = annotate(items, tmp_path / "b", _config(), base_url=server.url, cache_dir=tmp_path / "cache")
    assert backend.count == served and fresh.requests == 0 and fresh.cache_hits > 0
    assert sorted(_rows(tmp_path / "b" / "traces.jsonl"), key=str) == sorted(_rows(tmp_path / "a" / "traces.jsonl"),
                                                                             key=str)
    cached = list((tmp_path / "cache").rglob("*.json"))
    assert cached and all(json.loads(p.read_text())["content"] is not None for p in cached)


def test_other_settings_refuse_to_mix_into_the_same_output(scripted, tmp_path):
    _, server = scripted
    annotate(_items("good"), tmp_path, _config(), base_url=server.url)
    with pytest.raises(ConfigError, match="different settings"):
        annotate(_items("good"), tmp_path, _config(variant="ordered"), base_url=server.url)


def test_kill_mid_run_then_resume_never_reasks_finished_items(tmp_path):
    questions = ["good", "fenced", "one-empty", "yes", "schema-then-good", "facts-missing-once"]
    data = tmp_path / "items.jsonl"
    data.write_text("".join(json.dumps({"question": q, "answer": "True", "id": q, "steps": []}) + "\n"
                            for q in questions))
    backend = ScriptedBackend(responder, model_id="annotator", delay=0.15)
    out = tmp_path / "out"
    with Server(backend) as server:
        command = [sys.executable, "-m", "memreason.cli", "annotate", "--data", str(data), "--task", "strategyqa",
                   "--out", str(out), "--model", "annotator", "--base-url", server.url, "--concurrency", "1"]
        env = {**os.environ, "MEMREASON_API_KEY": "unused"}
        process = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            deadline = time.time() + 60
            while time.time() < deadline and len(_rows(out / "traces.jsonl") if (out / "traces.jsonl").exists()
                                                 else []) < 2:
                assert process.poll() is None, process.stderr.read().decode()
                time.sleep(0.05)
        finally:
            process.send_signal(signal.SIGKILL)
            process.wait(timeout=30)
            process.stderr.close()
        finished = {row["meta"]["id"] for row in _rows(out / "traces.jsonl")}
        assert 2 <= len(finished) < len(questions)
        served_before = backend.count
        backend.delay = 0
        items = [Trace(q, (), "True", {"id": q}) for q in questions]
        report = annotate(items, out, _config(concurrency=1), base_url=server.url)
        resumed = backend.requests[served_before:]
        asked = {q for r in resumed for q in questions if f"Question: {q}\n" in r.messages[1]["content"]}
        assert not asked & finished  # finished items were never asked again
        assert asked and report.skipped == len(finished)
        assert len(resumed) == report.requests
        ids = [row["meta"]["id"] for row in _rows(out / "traces.jsonl")]
        assert sorted(ids) == sorted(questions)  # each exactly once
        count = backend.count
        assert annotate(items, out, _config(), base_url=server.url).requests == 0 and backend.count == count
        # the killed-and-resumed output is the output of a run that was never interrupted
        annotate(items, tmp_path / "reference", _config(concurrency=1), base_url=server.url)
    assert _content(out / "traces.jsonl") == _content(tmp_path / "reference" / "traces.jsonl")


def _content(path):
    """Each row's id, steps, answer and annotation record, sorted (row order follows finishing order)."""
    return sorted(json.dumps([r["meta"]["id"], r["steps"], r["answer"], r["meta"]["annotation"]], sort_keys=True)
                  for r in _rows(path))


def test_a_line_torn_by_a_kill_is_dropped_and_its_item_annotated_again(scripted, tmp_path):
    backend, server = scripted
    items = _items("good", "fenced", "yes")
    annotate(items, tmp_path, _config(), base_url=server.url)
    path = tmp_path / "traces.jsonl"
    complete = path.read_bytes()
    lines = complete.splitlines(keepends=True)
    path.write_bytes(b"".join(lines[:2]) + lines[2][:len(lines[2]) // 2])  # killed in the middle of an append
    served = backend.count
    report = annotate(items, tmp_path, _config(), base_url=server.url)
    assert report.skipped == 2 and report.requests == 0 and backend.count == served  # the cache answers
    assert sorted(path.read_bytes().splitlines()) == sorted(complete.splitlines())  # nothing lost, nothing twice
    assert (report.accepted, report.repaired) == (1, 2)


def test_transport_failures_back_off_exponentially_then_succeed(tmp_path):
    calls = []

    def flaky(request):
        calls.append(request)
        if len(calls) <= 2:
            raise RequestError(503, "overloaded", type="server_error")
        return responder(request)

    waits = []
    with Server(ScriptedBackend(flaky, model_id="annotator")) as server:
        report = annotate(_items("good"), tmp_path, _config(backoff=0.5, retries=3, jitter=0), base_url=server.url,
                          sleep=waits.append)
    assert waits == [0.5, 1.0]
    assert (report.accepted, report.requests, report.backoff_waits) == (1, 4, 2)


def test_retries_run_out_and_the_item_is_rejected_with_the_cause(tmp_path):
    def down(request):
        raise RequestError(503, "overloaded", type="server_error")

    waits = []
    with Server(ScriptedBackend(down, model_id="annotator")) as server:
        report = annotate(_items("good"), tmp_path, _config(backoff=1.0, retries=2, max_backoff=1.5, jitter=0),
                          base_url=server.url, sleep=waits.append)
    assert waits == [1.0, 1.5]  # capped
    assert report.rejected == 1 and dict(report.rejections) == {"plan: request failed": 1}
    assert "503" in report.rejected_items[0]["reason"]
    assert report.failures == {"failing": 1} and "kept failing after every retry" in report.failure()


def test_unknown_model_or_wrong_key_stops_the_run(scripted, tmp_path):
    _, server = scripted
    with pytest.raises(ConfigError, match="does not serve model 'gpt-9'"):
        annotate(_items("good"), tmp_path / "a", _config(model="gpt-9"), base_url=server.url)
    with Server(ScriptedBackend(responder, model_id="annotator"), api_key="right") as locked:
        with pytest.raises(ConfigError, match="refused the API key"):
            annotate(_items("good"), tmp_path / "b", _config(), base_url=locked.url, api_key="wrong")


def test_json_schema_is_sent_when_the_server_takes_it(scripted, tmp_path):
    backend, server = scripted
    annotate(_items("good"), tmp_path, _config(), base_url=server.url)
    plan_request = backend.requests[0]
    assert plan_request.response_format["type"] == "json_schema"
    assert plan_request.response_format["json_schema"]["schema"] == PLAN_SCHEMA


def test_server_without_response_format_falls_back_and_still_validates(tmp_path):
    backend = ScriptedBackend(responder, model_id="annotator", supports_response_format=False)
    with Server(backend) as server:
        report = annotate(_items("good", "fenced"), tmp_path, _config(concurrency=1), base_url=server.url)
    assert report.response_format_fallback and (report.accepted, report.repaired) == (1, 1)
    assert report.requests == 5  # one refused request, then two calls per item
    with Server(ScriptedBackend(responder, model_id="annotator", supports_response_format=False)) as server:
        strict = annotate(_items("good"), tmp_path / "strict", _config(response_format="json_schema"),
                          base_url=server.url)
    assert dict(strict.rejections) == {"plan: request failed": 1}


def test_against_the_tiny_model_server_gibberish_is_rejected_not_kept(tmp_path):
    from conftest import build_tiny_model, build_tiny_tokenizer

    tokenizer = build_tiny_tokenizer()
    model = build_tiny_model(len(tokenizer))
    items = _items("Is ice lighter than water?", "Do fish sleep?")
    config = _config(model="tiny", max_tokens=8, attempts=2, concurrency=1)
    # 512 positions: the plan prompt (~1100 tokens in this 320-token vocabulary) does not fit -> 413
    with Server(ModelBackend(model, tokenizer, "tiny")) as server:
        short = annotate(items, tmp_path / "short", config, base_url=server.url)
    assert dict(short.rejections) == {"plan: request failed": 2}
    assert "HTTP 413" in short.rejected_items[0]["reason"] and "context" in short.rejected_items[0]["reason"]
    model.config.max_position_embeddings = 4096  # rotary positions: the random model runs at any length
    with Server(ModelBackend(model, tokenizer, "tiny")) as server:
        report = annotate(items, tmp_path / "long", config, base_url=server.url)
        assert server.stats == {"completions": 4, "errors": 1}  # the one refused response_format
    assert report.rejected == 2 and report.response_format_fallback
    assert dict(report.rejections) == {"plan: not JSON": 2}
    assert report.requests == 1 + 2 * 2
    assert (tmp_path / "long" / "traces.jsonl").read_text() == ""


def test_api_key_is_never_written_or_logged(tmp_path, caplog):
    secret = "sk-test-SECRET-4d1e"
    caplog.set_level("DEBUG")
    with Server(ScriptedBackend(responder, model_id="annotator"), api_key=secret) as server:
        report = annotate(_items("good", "notjson"), tmp_path, _config(), base_url=server.url, api_key=secret)
    assert report.accepted == 1
    for path in tmp_path.rglob("*"):
        if path.is_file():
            assert secret not in path.read_text(), path
    assert secret not in caplog.text


@pytest.mark.parametrize("reply,category", [
    ("", "not JSON"),
    ('["a list"]', "wrong schema"),
    ('{"steps": [{"kind": "memory"}], "answer": "True"}', "wrong schema"),
    (_plan(("opinion", "", "I feel so."), ("reason", "", "So yes.")), "unknown step kind"),
    (_plan(("reason", "", "So yes.")), "too few memory steps"),
    (_plan(("memory", "q?", "A fact.")), "too few reason steps"),
    (_plan(("memory", "", "A fact."), ("reason", "", "So yes.")), "memory step without query"),
    (_plan(("memory", "q?", "<memory_0> A fact."), ("reason", "", "So yes.")), "control token in step"),
    (_plan(("memory", "q?", "A fact."), ("reason", "", "The answer is: True")), "answer line inside the steps"),
    (_plan(("memory", "q?", "A fact."), ("reason", "", "So."), answer="maybe"), "answer not in the answer space"),
    (_plan(*[("memory", "q?", "A fact.")] * 12, ("reason", "", "So.")), "too many steps"),
])
def test_validate_plan_rejects_with_a_countable_category(reply, category):
    with pytest.raises(InvalidReply) as caught:
        validate_plan(reply, Trace("q", (), "True"), TASK, _config())
    assert caught.value.category == category


def test_whitespace_is_a_repair_only_in_text_that_is_kept():
    reply = _plan(("memory", "How dense is ice?", "Ice  is light."), ("reason", "", "So it floats."))
    assert validate_plan(reply, Trace("q", (), "True"), TASK, _config()).repairs == []
    plan = validate_plan(reply, Trace("q", (), "True"), TASK, _config(fill_knowledge=False))
    assert plan.repairs == ["whitespace"] and plan.steps[0] == Step(MEMORY, "Ice is light.")


def test_paper_style_string_steps_are_a_repair():
    reply = json.dumps({"steps": ["[rag]: Ice is light.", "[reason]: So it floats."], "answer": "True"})
    plan = validate_plan(reply, Trace("q", (), "True"), TASK, _config(fill_knowledge=False))
    assert plan.steps == [Step(MEMORY, "Ice is light."), Step(REASON, "So it floats.")]
    assert sorted(set(plan.repairs)) == ["tag_alias", "tagged_string_step"]
    with pytest.raises(InvalidReply, match="without query"):  # the knowledge pass needs each fact's query
        validate_plan(reply, Trace("q", (), "True"), TASK, _config())


def test_validate_plan_checks_letters_with_the_task():
    question = "Where do you keep milk? Options: A.fridge B.oven C.garden D.car E.roof"
    trace, task = Trace(question, (), "A"), get_task("commonsenseqa")
    config = _config(task="commonsenseqa")
    plan = validate_plan(_plan(("memory", "q?", "Milk is kept cold."), ("reason", "", "So A."), answer="(A) fridge"),
                         trace, task, config)
    assert plan.repairs == ["answer_format"]
    with pytest.raises(InvalidReply, match="disagrees"):
        validate_plan(_plan(("memory", "q?", "f."), ("reason", "", "So B."), answer="B"), trace, task, config)


def test_validate_facts_needs_one_fact_per_query():
    assert validate_facts('{"facts": [{"id": 2, "fact": "b"}, {"id": 1, "fact": "a"}]}', 2) == (["a", "b"], [])
    for reply in ('{"facts": [{"id": 1, "fact": "a"}]}', '{"facts": [{"id": 1, "fact": "a"}, {"id": 3, "fact": "c"}]}',
                  '{"facts": [{"id": 1, "fact": "a"}, {"id": 2, "fact": " "}]}', '{"answers": []}'):
        with pytest.raises(InvalidReply):
            validate_facts(reply, 2)


def test_config_refuses_impossible_settings():
    for bad in ({"variant": "sideways"}, {"attempts": 0}, {"response_format": "xml"}, {"task": "nope"},
                {"min_memory": 7, "min_reason": 7}):
        with pytest.raises((ConfigError, KeyError)):
            _config(**bad)


def test_cli_annotates_a_bundled_split_and_prints_the_report(scripted, tmp_path, capsys, monkeypatch):
    from memreason.cli import main

    backend, server = scripted
    monkeypatch.setenv("MEMREASON_API_BASE", server.url)
    code = main(["annotate", "--data", str(_paper_file(tmp_path)), "--task", "strategyqa", "--model", "annotator",
                 "--out", str(tmp_path / "out"), "--limit", "2"])
    out = capsys.readouterr().out
    assert code == 0 and "2 items: 1 accepted, 1 repaired, 0 rejected" in out
    assert len(_rows(tmp_path / "out" / "traces.jsonl")) == 2 and backend.count == 4


def test_cli_without_a_task_for_a_file_is_one_clear_error(tmp_path, capsys):
    from memreason.cli import main

    code = main(["annotate", "--data", str(_paper_file(tmp_path)), "--model", "m", "--out", str(tmp_path / "o")])
    assert code == 2 and "pass --task" in capsys.readouterr().err


def _paper_file(tmp_path):
    path = tmp_path / "paper.json"
    path.write_text(json.dumps([{"question": q, "answer": "True", "cot_steps": [], "split": "train"}
                                for q in ("good", "fenced", "notjson")]))
    return path


# ---------------------------------------------------------------- when a run has failed (exit 1)

def test_a_run_fails_only_when_nothing_was_annotated_and_the_endpoint_is_why():
    reason = "plan: request failed: still failing after 5 tries: APIConnectionError: Connection error."
    unreachable = {"id": "a", "category": "plan: request failed", "reason": reason, "cause": "unreachable"}
    report = AnnotationReport(total=3, rejected=3, failures=Counter(unreachable=2, refused=1),
                              rejected_items=[unreachable], endpoint="http://127.0.0.1:9/v1")
    assert report.failure() == (f"no item annotated: 2 of 3 failed at http://127.0.0.1:9/v1 ({reason}); start the "
                                "server, or fix --base-url (or raise --timeout for a slow one)")
    assert AnnotationReport(total=3, rejected=2, written=1, failures=Counter(unreachable=2)).failure() is None
    assert AnnotationReport(total=3, rejected=3, rejections=Counter({"plan: not JSON": 3})).failure() is None
    assert AnnotationReport(total=3, skipped=3, accepted=3).failure() is None  # nothing left to try


def _closed_port_url() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}/v1"


def test_cli_exits_1_with_one_line_when_no_item_reaches_the_endpoint(tmp_path, capsys):
    from memreason.cli import main

    url = _closed_port_url()
    code = main(["annotate", "--data", str(_paper_file(tmp_path)), "--task", "strategyqa", "--model", "m",
                 "--out", str(tmp_path / "out"), "--base-url", url, "--retries", "0"])
    captured = capsys.readouterr()
    assert code == 1 and "3 items: 0 accepted, 0 repaired, 3 rejected" in captured.out
    errors = [line for line in captured.err.splitlines() if "error" in line]
    assert errors == [captured.err.strip().splitlines()[-1]] and "Traceback" not in captured.err
    assert errors[0].startswith(f"memreason annotate: error: no item annotated: 3 of 3 failed at {url} (")
    assert errors[0].endswith("start the server, or fix --base-url (or raise --timeout for a slow one)")
    rejected = _rows(tmp_path / "out" / "rejected.jsonl")
    assert [row["cause"] for row in rejected] == ["unreachable"] * 3


def _no_endpoint(monkeypatch):
    for name in ("MEMREASON_API_BASE", "OPENAI_BASE_URL", "MEMREASON_API_KEY", "OPENAI_API_KEY"):
        monkeypatch.delenv(name, raising=False)

    def no_client(*args, **kwargs):
        raise AssertionError("a client was built, so a request could be sent")

    monkeypatch.setattr(openai, "OpenAI", no_client)


def test_without_a_key_or_base_url_nothing_is_sent_or_written(tmp_path, monkeypatch):
    _no_endpoint(monkeypatch)
    with pytest.raises(ConfigError, match="set OPENAI_API_KEY or pass --base-url for a local endpoint"):
        annotate(_items("good"), tmp_path / "out", _config())
    assert not (tmp_path / "out").exists()


def test_cli_without_a_key_or_base_url_fails_before_loading_anything(tmp_path, capsys, monkeypatch):
    from memreason.cli import main

    _no_endpoint(monkeypatch)
    start = time.perf_counter()
    code = main(["annotate", "--data", str(tmp_path / "missing.json"), "--task", "strategyqa", "--model", "gpt-4o",
                 "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and time.perf_counter() - start < 5
    assert "set OPENAI_API_KEY or pass --base-url for a local endpoint" in err  # not "missing.json not found"
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------- settings from a file

def test_cli_reads_a_config_file_then_flags_then_overrides(scripted, tmp_path, capsys):
    from memreason.cli import main

    backend, server = scripted
    config = tmp_path / "annotate.yaml"
    config.write_text(f"model: annotator\ntask: strategyqa\nvariant: ordered\nbase_url: {server.url}\nseed: 5\n"
                      "concurrency: 1\n")
    code = main(["annotate", "--config", str(config), "--data", str(_paper_file(tmp_path)), "--out",
                 str(tmp_path / "out"), "--seed", "7", "--no-knowledge", "limit=1"])
    assert code == 0, capsys.readouterr().err
    saved = json.loads((tmp_path / "out" / "annotate_config.json").read_text())
    assert (saved["variant"], saved["seed"], saved["fill_knowledge"], saved["model"]) == ("ordered", 7, False,
                                                                                         "annotator")
    assert backend.count == 1 and backend.requests[0].seed == 7  # one item, no knowledge call
    capsys.readouterr()
    bad = main(["annotate", "--config", str(config), "--data", "x.json", "--out", str(tmp_path / "o2"),
                "varient=free", "attempts=zero"])
    err = capsys.readouterr().err
    assert bad == 2 and len(err.strip().splitlines()) == 1
    assert "'varient' (did you mean variant?)" in err and "attempts: expected an integer" in err
