"""The LLM client, the retry policy and the response cache (``memreason.llm``), against the real server."""

import json
import logging
import random
import socket
import time

import openai
import pytest

from memreason.data.annotate_prompts import plan_messages
from memreason.errors import ConfigError
from memreason.llm import (FAILING, REFUSED, UNREACHABLE, CachedChat, OpenAIChat, RequestRefused, ResponseCache,
                           RetriesExhausted, RetryPolicy, TransientError, resolve_endpoint, retry_after_seconds)
from memreason.serve import RequestError, ScriptedBackend, Server
from memreason.traces import Trace

MESSAGES = [{"role": "user", "content": "Is ice lighter than water?"}]


@pytest.fixture
def scripted():
    backend = ScriptedBackend(["a reply"], model_id="m")
    with Server(backend) as server:
        yield backend, server


def _send(client, **kwargs):
    return client.complete(MESSAGES, model="m", seed=0, temperature=0.0, max_tokens=8,
                           response_format=kwargs.get("response_format"))


def _closed_port_url() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}/v1"


# ---------------------------------------------------------------- the endpoint and its client

def test_endpoint_comes_from_arguments_then_environment(monkeypatch):
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    monkeypatch.setenv("MEMREASON_API_BASE", "http://127.0.0.1:9/v1")
    monkeypatch.setenv("MEMREASON_API_KEY", "env-key")
    assert resolve_endpoint() == ("http://127.0.0.1:9/v1", "env-key")
    assert resolve_endpoint("http://x/v1", "k") == ("http://x/v1", "k")
    monkeypatch.delenv("MEMREASON_API_KEY")
    monkeypatch.setenv("OPENAI_API_KEY", "openai-key")
    assert resolve_endpoint()[1] == "openai-key"


def test_openai_client_is_the_one_talking(scripted):
    """Guard: the endpoint client is the official one (``OpenAIChat`` wraps ``openai.OpenAI``)."""
    chat = OpenAIChat(scripted[1].url, "unused")
    assert isinstance(chat._client, openai.OpenAI) and "unused" not in repr(chat)


def test_no_key_for_the_default_endpoint_fails_before_any_client_exists(monkeypatch):
    def no_client(*args, **kwargs):
        raise AssertionError("a client was built, so a request could be sent")

    monkeypatch.setattr(openai, "OpenAI", no_client)
    with pytest.raises(ConfigError, match="set OPENAI_API_KEY or pass --base-url for a local endpoint"):
        OpenAIChat(None, None)
    with pytest.raises(ConfigError, match="set OPENAI_API_KEY"):
        OpenAIChat("", "")


def test_a_local_endpoint_needs_no_key(scripted):
    backend, server = scripted
    assert _send(OpenAIChat(server.url, None)) == "a reply" and backend.count == 1


def test_failures_are_sorted_into_retry_refuse_and_stop(tmp_path):
    statuses = iter([503, 429, 408, 400, 409, 422])

    def reply(request):
        raise RequestError(next(statuses), "scripted failure")

    with Server(ScriptedBackend(reply, model_id="m")) as server:
        chat = OpenAIChat(server.url, None)
        for status in (503, 429, 408):
            with pytest.raises(TransientError) as caught:
                _send(chat)
            assert f"HTTP {status}" in str(caught.value) and caught.value.cause == FAILING
        for status in (400, 409, 422):  # no retry on 4xx other than 408/429
            with pytest.raises(RequestRefused) as refused:
                _send(chat)
            assert not isinstance(refused.value, TransientError) and refused.value.cause == REFUSED
    with Server(ScriptedBackend(["x"], model_id="m"), api_key="right") as locked:
        with pytest.raises(ConfigError, match="refused the API key"):
            _send(OpenAIChat(locked.url, "wrong"))
        with pytest.raises(ConfigError, match="does not serve model 'gpt-9'"):
            OpenAIChat(locked.url, "right").complete(MESSAGES, model="gpt-9", seed=0, temperature=0.0, max_tokens=8,
                                                     response_format=None)


def test_a_refused_connection_is_unreachable():
    with pytest.raises(TransientError) as caught:
        _send(OpenAIChat(_closed_port_url(), None, timeout=5))
    assert caught.value.cause == UNREACHABLE


def test_timeout_is_per_request_and_leaves_process_state_alone():
    before = socket.getdefaulttimeout()
    backend = ScriptedBackend(["late"], model_id="m", delay=1.5)
    with Server(backend) as server:
        chat = OpenAIChat(server.url, None, timeout=0.3)
        start = time.perf_counter()
        with pytest.raises(TransientError) as caught:
            _send(chat)
        assert time.perf_counter() - start < 1.4 and caught.value.cause == UNREACHABLE
        assert socket.getdefaulttimeout() == before
        time.sleep(1.3)  # let the slow reply finish before the server shuts down


def test_retry_after_header_is_read_in_each_form():
    assert retry_after_seconds({"retry-after": "3"}) == 3.0
    assert retry_after_seconds({"retry-after-ms": "250", "retry-after": "9"}) == 0.25
    assert retry_after_seconds({"retry-after": "soon"}) is None and retry_after_seconds({}) is None
    in_a_minute = time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime(time.time() + 60))
    assert 55 <= retry_after_seconds({"retry-after": in_a_minute}) <= 61
    assert retry_after_seconds({"retry-after": "-4"}) == 0.0


# ---------------------------------------------------------------- the retry policy

class _Failing:
    """``send`` for a policy: raises the scripted errors, then returns "ok"."""

    def __init__(self, *errors):
        self.errors, self.calls = list(errors), 0

    def __call__(self):
        self.calls += 1
        if self.errors:
            raise self.errors.pop(0)
        return "ok"


def test_backoff_doubles_up_to_its_cap_without_jitter():
    waits = []
    policy = RetryPolicy(retries=5, backoff=0.5, max_backoff=3.0, jitter=0)
    send = _Failing(*[TransientError("busy")] * 5)
    assert policy.call(send, sleep=waits.append) == "ok"
    assert waits == [0.5, 1.0, 2.0, 3.0, 3.0] and send.calls == 6


def test_jitter_shortens_each_wait_by_at_most_its_share():
    policy = RetryPolicy(backoff=1.0, max_backoff=30.0, jitter=0.5)
    rng = random.Random(0)
    for failures in range(5):
        waits = [policy.delay(failures, rng=rng) for _ in range(200)]
        full = 2.0 ** failures
        assert all(full * 0.5 <= w <= full for w in waits)
        assert max(waits) - min(waits) > 0.3 * full  # spread, so clients that failed together part ways


def test_retry_after_is_honoured_over_a_shorter_backoff():
    waits = []
    send = _Failing(TransientError("slow down", retry_after=7.0), TransientError("busy"))
    assert RetryPolicy(backoff=1.0, jitter=0).call(send, sleep=waits.append) == "ok"
    assert waits == [7.0, 2.0]


def test_retry_after_from_the_server_reaches_the_policy():
    replies = iter([RequestError(429, "rate limited", headers={"Retry-After": "4"})])

    def reply(request):
        error = next(replies, None)
        if error:
            raise error
        return "fine"

    waits = []
    with Server(ScriptedBackend(reply, model_id="m")) as server:
        chat = CachedChat(OpenAIChat(server.url, None), "m", retry=RetryPolicy(backoff=0.1, jitter=0),
                          sleep=waits.append)
        assert chat.complete(MESSAGES, seed=0) == "fine"
    assert waits == [4.0] and chat.requests == 2 and chat.waits == [4.0]


def test_total_retry_time_is_bounded():
    now = [0.0]
    waits = []

    def sleep(seconds):
        waits.append(seconds)
        now[0] += seconds

    policy = RetryPolicy(retries=100, backoff=1.0, max_backoff=8.0, jitter=0, max_retry_time=20.0)
    with pytest.raises(RetriesExhausted, match="20 s limit") as caught:
        policy.call(_Failing(*[TransientError("down", cause=UNREACHABLE)] * 100), sleep=sleep, clock=lambda: now[0])
    assert waits == [1.0, 2.0, 4.0, 8.0] and sum(waits) <= 20.0  # the next 8 s would pass 20 s
    assert caught.value.cause == UNREACHABLE and "down" in str(caught.value)
    with pytest.raises(RetriesExhausted, match="limit"):  # a Retry-After past the limit is not waited for
        policy.call(_Failing(TransientError("later", retry_after=3600)), sleep=sleep, clock=lambda: now[0])


def test_refusals_and_config_errors_are_never_retried():
    waits = []
    for error in (RequestRefused("HTTP 400: bad"), ConfigError("wrong key")):
        send = _Failing(error)
        with pytest.raises(type(error)):
            RetryPolicy().call(send, sleep=waits.append)
        assert send.calls == 1
    assert waits == []


def test_retries_run_out_with_the_last_cause():
    send = _Failing(*[TransientError("HTTP 503: overloaded")] * 3)
    with pytest.raises(RetriesExhausted, match="still failing after 3 tries: HTTP 503") as caught:
        RetryPolicy(retries=2, jitter=0).call(send, sleep=lambda s: None)
    assert caught.value.cause == FAILING and isinstance(caught.value, RequestRefused)


def test_policy_refuses_impossible_settings():
    for bad in ({"retries": -1}, {"jitter": 1.5}, {"backoff": -1}, {"max_retry_time": 0}):
        with pytest.raises(ConfigError):
            RetryPolicy(**bad)


# ---------------------------------------------------------------- the response cache

def test_cache_key_changes_with_prompt_model_seed_and_params():
    base = dict(messages=plan_messages(Trace("q", (), "True"), "free"), model="m", seed=0, params={"t": 0.7})
    key = ResponseCache.key(**base)
    assert len(key) == 64 and ResponseCache.key(**base) == key
    for change in ({"model": "n"}, {"seed": 1}, {"params": {"t": 0.8}},
                   {"messages": plan_messages(Trace("q", (), "True"), "ordered")}):
        assert ResponseCache.key(**{**base, **change}) != key


def test_cache_key_is_the_one_caches_were_written_under():
    # computed with memreason.data.annotate.ResponseCache.key before the client moved to memreason.llm:
    # caches written then are still found
    messages = [{"role": "system", "content": "s"}, {"role": "user", "content": "Is ice lighter than water? é"}]
    params = {"temperature": 0.7, "max_tokens": 1024, "response_format": "auto", "schema": {"type": "object"}}
    assert ResponseCache.key(messages, "m", 3, params) == \
        "f0e610711548dafadbdbe2e96c056efd38712be1b9e44519e4ef8a1d06f94d6d"


def test_cache_round_trips_as_json_and_skips_unreadable_entries(tmp_path, caplog):
    cache = ResponseCache(tmp_path)
    key = ResponseCache.key(MESSAGES, "m", 0, {})
    assert cache.get(key) is None and cache.hits == 0
    cache.put(key, {"content": "stored", "model": "m"})
    assert cache.get(key) == "stored" and cache.hits == 1
    assert json.loads(cache.path(key).read_text())["content"] == "stored"
    assert [p.name for p in tmp_path.rglob("*") if p.is_file()] == [f"{key}.json"]  # no temporary left
    cache.path(key).write_text('{"content": "tor')
    with caplog.at_level(logging.WARNING):
        assert cache.get(key) is None
    assert "unreadable cache entry" in caplog.text and cache.hits == 1


def test_cached_chat_sends_each_request_once(scripted, tmp_path):
    backend, server = scripted
    cache = ResponseCache(tmp_path)
    chat = CachedChat(OpenAIChat(server.url, "k"), "m", cache=cache)
    assert chat.complete(MESSAGES, seed=0) == "a reply"
    again = CachedChat(OpenAIChat(server.url, "k"), "m", cache=cache)
    assert again.complete(MESSAGES, seed=0) == "a reply" and again.requests == 0 and backend.count == 1
    again.complete(MESSAGES, seed=1)
    again.complete(MESSAGES, seed=1, key_params={"schema": 1})
    assert again.requests == 2 and backend.count == 3 and backend.requests[-1].seed == 1
