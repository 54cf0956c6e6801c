"""The HTTP transport (``memreason.serve.http``): binding, keys, JSON errors for every method and path, and the
limits that keep a client from holding the server: read timeouts, body size, JSON depth, bounded
connections and queue; and a bounded load-and-fault run on 127.0.0.1."""

import http.client
import json
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest
from serve_fixtures import (MESSAGES, client, parse_reply, raw, raw_bytes, server, tiny_backend,  # noqa: F401
                            tiny_dir)

from memreason.errors import ConfigError
from memreason.serve import RequestError, ScriptedBackend, Server


def test_server_binds_loopback_on_a_free_port_by_default(server):
    assert server.host == "127.0.0.1" and server.port > 0
    assert server.url == f"http://127.0.0.1:{server.port}/v1"


def test_oversized_body_and_unknown_path_are_refused(tiny_backend):
    with Server(tiny_backend, max_body_bytes=1000) as server:
        status, payload = raw(server, "POST", "/v1/chat/completions",
                              {"model": "tiny", "messages": [{"role": "user", "content": "x" * 2000}]})
        assert status == 413 and payload["error"]["code"] == "request_too_large"
        # /v1/completions is served now (tests/serve/test_routes.py); an unknown POST path is still a 404
        assert raw(server, "POST", "/v1/embeddings", {"model": "tiny"})[0] == 404
        assert raw(server, "GET", "/v1/nothing")[0] == 404
        assert raw(server, "GET", "/health") == (200, {"status": "ok"})


def test_api_key_is_required_when_the_server_has_one():
    with Server(ScriptedBackend(["ok"]), api_key="s3cret") as server:
        wrong = openai.OpenAI(base_url=server.url, api_key="guess", max_retries=0)
        with pytest.raises(openai.AuthenticationError):
            wrong.chat.completions.create(model="scripted", messages=MESSAGES)
        right = openai.OpenAI(base_url=server.url, api_key="s3cret", max_retries=0)
        assert right.chat.completions.create(model="scripted", messages=MESSAGES).choices[0].message.content == "ok"
        assert raw(server, "GET", "/v1/nothing")[0] == 401  # paths are not revealed without the key
        assert right.completions.create(model="scripted", prompt="x").choices[0].text == "ok"


def test_scripted_errors_reach_the_client_with_their_status():
    def reply(request):
        raise RequestError(503, "overloaded", type="server_error")

    with Server(ScriptedBackend(reply)) as server:
        client = openai.OpenAI(base_url=server.url, api_key="unused", max_retries=0)
        with pytest.raises(openai.InternalServerError):
            client.chat.completions.create(model="scripted", messages=MESSAGES)
        assert server.stats == {"completions": 0, "errors": 1}


def test_a_backend_bug_is_a_json_500_and_the_server_keeps_serving():
    calls = []

    def reply(request):
        calls.append(1)
        if len(calls) == 1:
            raise ValueError("a bug")
        return "fine"

    with Server(ScriptedBackend(reply)) as server:
        status, payload = raw(server, "POST", "/v1/chat/completions", {"model": "scripted", "messages": MESSAGES})
        assert status == 500 and payload["error"]["type"] == "server_error"
        assert raw(server, "POST", "/v1/chat/completions", {"model": "scripted", "messages": MESSAGES})[0] == 200


def test_client_leaving_mid_stream_does_not_stop_the_server(server, client):
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    body = json.dumps({"model": "tiny", "messages": MESSAGES, "max_tokens": 200, "stream": True})
    connection.request("POST", "/v1/chat/completions", body=body, headers={"Content-Type": "application/json"})
    response = connection.getresponse()
    assert response.status == 200 and response.read1(10)
    connection.close()
    assert client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=2).usage.completion_tokens == 2


def test_fifty_concurrent_requests_all_succeed(tiny_backend):
    with Server(tiny_backend) as server:
        client = openai.OpenAI(base_url=server.url, api_key="unused", max_retries=0, timeout=60)

        def one(i):
            messages = [{"role": "user", "content": f"Question {i}: is {i} even?"}]
            return client.chat.completions.create(model="tiny", messages=messages, max_tokens=3).usage.completion_tokens

        with ThreadPoolExecutor(4) as pool:
            tokens = list(pool.map(one, range(50)))
        assert tokens == [3] * 50
        assert server.stats == {"completions": 50, "errors": 0}


def test_bad_server_options_are_refused_all_at_once():
    with pytest.raises(ConfigError) as caught:
        Server(ScriptedBackend(["x"]), port=70000, read_timeout=float("nan"), max_queue=0)
    assert "port" in str(caught.value) and "read_timeout" in str(caught.value) and "max_queue" in str(caught.value)


def test_a_port_in_use_is_one_clear_error():
    with Server(ScriptedBackend(["x"])) as first:
        with pytest.raises(ConfigError, match=f"cannot listen on 127.0.0.1:{first.port}"):
            Server(ScriptedBackend(["x"]), port=first.port).start()


# ---------------------------------------------------------------- JSON for every method and path

@pytest.fixture(scope="module")
def scripted():
    with Server(ScriptedBackend(["The answer is: True"]), read_timeout=1.0) as server:
        yield server


@pytest.mark.parametrize("method,path,status", [
    ("PUT", "/v1/chat/completions", 405), ("DELETE", "/v1/chat/completions", 405),
    ("PATCH", "/v1/completions", 405), ("GET", "/v1/chat/completions", 405), ("OPTIONS", "/health", 405),
    ("POST", "/v1/models", 405), ("PUT", "/nothing", 404), ("DELETE", "/v1/models/scripted", 405), ("GET", "/v1/models/nope", 404),
    ("GET", "/", 404), ("FROB", "/health", 501),
])
def test_every_method_and_path_gets_a_json_reply(scripted, method, path, status):
    got, payload = raw(scripted, method, path, {"model": "scripted"})
    assert got == status
    assert set(payload["error"]) == {"message", "type", "param", "code"} and payload["error"]["message"]


def test_405_names_the_allowed_method_and_head_gets_no_body(scripted):
    reply, _ = raw_bytes(scripted, b"PUT /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{}")
    status, headers, payload = parse_reply(reply)
    assert status == 405 and headers["allow"] == "POST" and payload["error"]["code"] == "method_not_allowed"
    head, _ = raw_bytes(scripted, b"HEAD /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 405") and head.endswith(b"\r\n\r\n")


@pytest.mark.parametrize("data", [
    b"\x00\xff\xfe garbage \x01\r\n\r\n",
    b"GET /health HTTP/9.9\r\n\r\n",
    b"POST /v1/chat/completions HTTP/1.1\r\n" + b"X-Long: " + b"a" * 70000 + b"\r\n\r\n",
    b"GET /" + b"a" * 70000 + b" HTTP/1.1\r\n\r\n",
])
def test_garbage_gets_a_json_error_not_html(scripted, data):
    reply, _ = raw_bytes(scripted, data)
    status, headers, payload = parse_reply(reply)
    assert 400 <= status < 600 and headers["content-type"] == "application/json"
    assert payload["error"]["message"]


# ---------------------------------------------------------------- read timeouts and body limits

@pytest.mark.parametrize("length,status", [("-1", 400), ("abc", 400), ("1e3", 400), ("5, 7", 400)])
def test_a_bad_content_length_is_refused_at_once(scripted, length, status):
    reply, seconds = raw_bytes(scripted, b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: "
                               + length.encode() + b"\r\n\r\n{}")
    got, headers, payload = parse_reply(reply)
    assert got == status and "Content-Length" in payload["error"]["message"] and headers["connection"] == "close"
    assert seconds < 0.9  # answered, not timed out


def test_a_body_that_stops_short_gets_408_within_the_read_timeout(scripted):
    request = b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n" + b'{"model": '
    reply, seconds = raw_bytes(scripted, request)
    status, _, payload = parse_reply(reply)
    assert status == 408 and payload["error"]["code"] == "request_timeout"
    assert 0.9 < seconds < 3


def test_a_half_closed_short_body_is_answered_at_once(scripted):
    request = b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n" + b'{"model": '
    reply, seconds = raw_bytes(scripted, request, half_close=True)
    status, _, payload = parse_reply(reply)
    assert status == 400 and "ended after 10 of the 100 bytes" in payload["error"]["message"] and seconds < 0.9


def test_silent_and_trickling_clients_are_cut_off_at_the_deadline(scripted):
    silent, seconds = raw_bytes(scripted, b"")
    assert silent == b"" and 0.9 < seconds < 3
    start = time.monotonic()
    with socket.create_connection(("127.0.0.1", scripted.port), timeout=10) as sock:
        sent = 0
        try:  # one byte every 0.2 s: each read is quick, the whole request is not
            for byte in b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 100:
                sock.send(bytes([byte]))
                sent += 1
                time.sleep(0.2)
        except (BrokenPipeError, ConnectionResetError):
            pass
    assert time.monotonic() - start < 3 and sent < 20


def test_a_200k_deep_json_body_is_a_400_not_a_crash(scripted):
    status, payload = raw(scripted, "POST", "/v1/chat/completions", b"[" * 200_000 + b"]" * 200_000)
    assert status == 400 and payload["error"]["code"] == "json_too_deep"
    deep = {"model": "scripted", "messages": MESSAGES, "response_format": {"type": "text"}}
    for _ in range(70):
        deep = {"x": deep}
    assert raw(scripted, "POST", "/v1/chat/completions", deep)[1]["error"]["code"] == "json_too_deep"
    assert raw(scripted, "POST", "/v1/chat/completions", {"model": "scripted", "messages": MESSAGES})[0] == 200


# ---------------------------------------------------------------- bounded concurrency

def test_a_full_queue_gets_a_clear_503_and_the_queued_requests_still_finish():
    release = threading.Event()
    backend = ScriptedBackend(lambda request: "done" if release.wait(10) else "timeout")
    with Server(backend, max_queue=2) as server:
        client = openai.OpenAI(base_url=server.url, api_key="unused", max_retries=0, timeout=30)
        with ThreadPoolExecutor(2) as pool:
            waiting = [pool.submit(client.chat.completions.create, model="scripted", messages=MESSAGES)
                       for _ in range(2)]
            deadline = time.monotonic() + 10
            while backend.count < 2 and time.monotonic() < deadline:
                time.sleep(0.01)
            status, payload = raw(server, "POST", "/v1/completions", {"model": "scripted", "prompt": "x"})
            assert status == 503 and payload["error"]["code"] == "server_busy"
            assert "2 requests are already waiting or generating" in payload["error"]["message"]
            release.set()
            assert [f.result().choices[0].message.content for f in waiting] == ["done", "done"]
        assert raw(server, "POST", "/v1/completions", {"model": "scripted", "prompt": "x"})[0] == 200


def test_connections_over_the_limit_get_a_503_and_are_closed():
    with Server(ScriptedBackend(["ok"]), max_connections=2, read_timeout=2.0) as server:
        idle = [socket.create_connection(("127.0.0.1", server.port)) for _ in range(2)]
        try:
            deadline = time.monotonic() + 5
            while server._httpd._active < 2 and time.monotonic() < deadline:
                time.sleep(0.01)
            reply, seconds = raw_bytes(server, b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
            status, headers, payload = parse_reply(reply)
            assert status == 503 and payload["error"]["code"] == "server_busy" and seconds < 1
            assert headers["retry-after"] == "1"
        finally:
            for sock in idle:
                sock.close()
        deadline = time.monotonic() + 5
        while server._httpd._active > 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert raw(server, "GET", "/health") == (200, {"status": "ok"})


# ---------------------------------------------------------------- load and faults together

FAULTS = {
    "slow body": (b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{", False),
    "half-closed": (b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 50\r\n\r\n{", True),
    "garbage": (bytes(range(256)) * 4 + b"\r\n\r\n", False),
    "negative length": (b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n\r\n", False),
    "silent": (b"", False),
    "partial headers": (b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Le", False),
    "deep json": (b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 20000\r\n\r\n"
                  + b"[" * 10000 + b"]" * 10000, False),
    "wrong method": (b"DELETE /v1/completions HTTP/1.1\r\nHost: x\r\n\r\n", True),
}


def test_well_formed_requests_keep_being_answered_under_load_and_faults():
    """Eight kinds of bad client, two of each at a time for about 3 s, while four good clients keep asking:
    every good request is answered correctly and quickly, and afterwards no connection is left held."""
    backend = ScriptedBackend(lambda r: f"echo {len(getattr(r, 'messages', ()))}", model_id="scripted")
    stop = threading.Event()
    with Server(backend, read_timeout=1.0, max_connections=48) as server:
        def fault(kind):
            data, half = FAULTS[kind]
            served = 0
            while not stop.is_set():
                try:
                    raw_bytes(server, data, half_close=half, timeout=5)
                except OSError:
                    pass
                served += 1
            return served

        def good(i):
            client = openai.OpenAI(base_url=server.url, api_key="unused", max_retries=0, timeout=10)
            results = []
            while not stop.is_set():
                start = time.monotonic()
                if len(results) % 2:
                    text = client.completions.create(model="scripted", prompt=f"p{i}").choices[0].text
                    results.append((text == "echo 0", time.monotonic() - start))
                else:
                    reply = client.chat.completions.create(model="scripted", messages=MESSAGES)
                    results.append((reply.choices[0].message.content == "echo 2", time.monotonic() - start))
            return results

        with ThreadPoolExecutor(2 * len(FAULTS) + 4) as pool:
            faults = [pool.submit(fault, kind) for kind in FAULTS for _ in range(2)]
            goods = [pool.submit(good, i) for i in range(4)]
            time.sleep(3)
            stop.set()
            results = [r for g in goods for r in g.result()]
            assert all(f.result() >= 1 for f in faults)
        assert len(results) > 40 and all(ok for ok, _ in results)
        assert max(seconds for _, seconds in results) < 2.0  # never stuck behind a bad client
        deadline = time.monotonic() + 3
        while server._httpd._active > 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert server._httpd._active == 0  # every bad connection was let go
