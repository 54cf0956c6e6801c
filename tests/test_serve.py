"""The OpenAI-compatible server, driven by the official ``openai`` client on a loopback port."""

import http.client
import json
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest

from conftest import build_tiny_model, build_tiny_tokenizer
from memreason.serve import ChatRequest, ModelBackend, RequestError, ScriptedBackend, Server, parse_request
from memreason.tasks import get_task

MESSAGES = [{"role": "system", "content": "Answer briefly."},
            {"role": "user", "content": "Is the Pacific Ocean larger than the Atlantic Ocean?"}]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    """A tiny random Llama and its chat-template tokenizer, saved like any model directory."""
    path = tmp_path_factory.mktemp("tiny-model")
    tokenizer = build_tiny_tokenizer()
    build_tiny_model(len(tokenizer)).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def tiny_backend(tiny_dir):
    from memreason.model import load

    model, tokenizer = load(str(tiny_dir), dtype="float32", device="cpu")
    return ModelBackend(model, tokenizer, "tiny", task=get_task("strategyqa"))


@pytest.fixture(scope="module")
def server(tiny_backend):
    server = Server(tiny_backend).start()
    try:
        yield server
    finally:
        server.shutdown()


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=server.url, api_key="unused", max_retries=0, timeout=60)


def _raw(server, method, path, body=None, headers=None):
    """One raw HTTP exchange (for bodies the openai client cannot send): (status, parsed JSON)."""
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    try:
        data = body if isinstance(body, (bytes, type(None))) else json.dumps(body).encode()
        connection.request(method, path, body=data, headers={"Content-Type": "application/json", **(headers or {})})
        response = connection.getresponse()
        return response.status, json.loads(response.read() or b"null")
    finally:
        connection.close()


def _reference_greedy(backend, messages, n):
    """What the model itself produces, greedily, for the chat-templated messages."""
    import torch

    prompt = backend.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    ids = backend.tokenizer(prompt, add_special_tokens=False, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        out = backend.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False,
                                     pad_token_id=backend.pad_id, temperature=None, top_p=None, top_k=None)
    return ids.shape[1], backend.tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


def test_server_binds_loopback_on_a_free_port_by_default(server):
    assert server.host == "127.0.0.1" and server.port > 0
    assert server.url == f"http://127.0.0.1:{server.port}/v1"


def test_models_endpoint_lists_the_served_model(client):
    assert [m.id for m in client.models.list().data] == ["tiny"]
    assert client.models.retrieve("tiny").owned_by == "memreason"


def test_reply_is_the_models_greedy_continuation_of_the_chat_template(client, tiny_backend):
    reply = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=6)
    prompt_tokens, expected = _reference_greedy(tiny_backend, MESSAGES, 6)
    assert reply.choices[0].message.content == expected
    assert reply.usage.prompt_tokens == prompt_tokens
    assert reply.object == "chat.completion" and reply.model == "tiny"


def test_max_tokens_is_honoured(client):
    reply = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=3)
    assert reply.usage.completion_tokens == 3 and reply.choices[0].finish_reason == "length"


def test_streamed_reply_equals_the_plain_reply(client):
    # a stop string that never comes: its length of text is held back until the end, and must still arrive
    options = dict(model="tiny", messages=MESSAGES, max_tokens=24, temperature=1.0, seed=3, stop=["~~~"])
    plain = client.chat.completions.create(**options)
    stream = client.chat.completions.create(**options, stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == plain.choices[0].message.content and len(text) > 0
    finals = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finals) == 1 and finals[0].choices[0].finish_reason == plain.choices[0].finish_reason
    assert finals[0].choices[0].delta.model_extra["memreason"] == plain.choices[0].message.model_extra["memreason"]
    assert chunks[-1].usage.completion_tokens == plain.usage.completion_tokens
    assert sum(1 for c in chunks if c.choices and c.choices[0].delta.content) > 1  # really streamed


def test_sampling_is_seeded(client):
    def sample(seed):
        return client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=10, temperature=1.0,
                                              seed=seed).choices[0].message.content

    first = sample(1)
    assert sample(1) == first
    assert any(sample(seed) != first for seed in (2, 3, 4))


def test_stop_string_ends_the_reply_before_it(client):
    full = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=16, temperature=1.0,
                                          seed=1).choices[0].message.content
    stop = full[4:6]
    reply = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=16, temperature=1.0, seed=1,
                                           stop=[stop])
    assert reply.choices[0].message.content == full[:full.find(stop)]
    assert reply.choices[0].finish_reason == "stop"
    streamed = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=16, temperature=1.0, seed=1,
                                              stop=stop, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == full[:full.find(stop)]


def test_reply_carries_the_parsed_memory_and_reason_steps():
    text = "<memory> Ice is less dense than water.\n<reason> Less dense things float.\n<answer> The answer is: True"
    with Server(ScriptedBackend([text], model_id="scripted", task=get_task("strategyqa"))) as server:
        client = openai.OpenAI(base_url=server.url, api_key="unused", max_retries=0)
        message = client.chat.completions.create(model="scripted", messages=MESSAGES).choices[0].message
    assert message.content == text
    assert message.model_extra["memreason"] == {
        "steps": [{"kind": "memory", "text": "Ice is less dense than water."},
                  {"kind": "reason", "text": "Less dense things float."}],
        "answer": "True"}


@pytest.mark.parametrize("body,status,param", [
    (b"{not json", 400, None),
    ({"model": "tiny"}, 400, "messages"),
    ({"model": "tiny", "messages": []}, 400, "messages"),
    ({"model": "tiny", "messages": [{"role": "wizard", "content": "hi"}]}, 400, "messages[0].role"),
    ({"model": "tiny", "messages": [{"role": "user", "content": 5}]}, 400, "messages[0].content"),
    ({"model": "tiny", "messages": MESSAGES, "max_tokens": 0}, 400, "max_tokens"),
    ({"model": "tiny", "messages": MESSAGES, "temperature": 9}, 400, "temperature"),
    ({"model": "tiny", "messages": MESSAGES, "n": 2}, 400, "n"),
    ({"model": "tiny", "messages": MESSAGES, "tools": [{"type": "function"}]}, 400, "tools"),
    ({"model": "tiny", "messages": MESSAGES, "response_format": {"type": "json_object"}}, 400, "response_format"),
    ({"messages": MESSAGES}, 400, "model"),
    ({"model": "gpt-9", "messages": MESSAGES}, 404, "model"),
    ({"model": "tiny", "messages": [{"role": "user", "content": "ocean " * 2000}]}, 413, "messages"),
])
def test_bad_requests_get_openai_style_errors_and_the_server_keeps_serving(server, client, body, status, param):
    got, payload = _raw(server, "POST", "/v1/chat/completions", body)
    assert got == status
    assert set(payload["error"]) == {"message", "type", "param", "code"} and payload["error"]["message"]
    assert payload["error"]["param"] == param
    assert client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=2).choices[0].finish_reason


def test_unknown_model_and_long_prompt_raise_the_clients_own_errors(client):
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-9", messages=MESSAGES)
    with pytest.raises(openai.APIStatusError) as caught:
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "ocean " * 2000}])
    assert caught.value.status_code == 413
    assert caught.value.body["code"] == "context_length_exceeded"


def test_oversized_body_and_unknown_path_are_refused(tiny_backend):
    with Server(tiny_backend, max_body_bytes=1000) as server:
        status, payload = _raw(server, "POST", "/v1/chat/completions",
                               {"model": "tiny", "messages": [{"role": "user", "content": "x" * 2000}]})
        assert status == 413 and payload["error"]["code"] == "request_too_large"
        assert _raw(server, "POST", "/v1/completions", {"model": "tiny"})[0] == 404
        assert _raw(server, "GET", "/v1/nothing")[0] == 404
        assert _raw(server, "GET", "/health") == (200, {"status": "ok"})


def test_api_key_is_required_when_the_server_has_one():
    with Server(ScriptedBackend(["ok"]), api_key="s3cret") as server:
        wrong = openai.OpenAI(base_url=server.url, api_key="guess", max_retries=0)
        with pytest.raises(openai.AuthenticationError):
            wrong.chat.completions.create(model="scripted", messages=MESSAGES)
        right = openai.OpenAI(base_url=server.url, api_key="s3cret", max_retries=0)
        assert right.chat.completions.create(model="scripted", messages=MESSAGES).choices[0].message.content == "ok"


def test_scripted_errors_reach_the_client_with_their_status():
    def reply(request):
        raise RequestError(503, "overloaded", type="server_error")

    with Server(ScriptedBackend(reply)) as server:
        client = openai.OpenAI(base_url=server.url, api_key="unused", max_retries=0)
        with pytest.raises(openai.InternalServerError):
            client.chat.completions.create(model="scripted", messages=MESSAGES)
        assert server.stats == {"completions": 0, "errors": 1}


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


def test_plain_style_run_sees_the_question_form(tiny_backend):
    backend = ModelBackend(tiny_backend.model, tiny_backend.tokenizer, "tiny", task=get_task("strategyqa"),
                           prompt_style="plain")
    assert backend.render([{"role": "user", "content": "Is ice lighter than water?"}]) == \
        "Question: Is ice lighter than water?\n"


def test_request_defaults_are_greedy_and_bounded():
    request, stream, _ = parse_request({"model": "m", "messages": [{"role": "developer", "content": "x"}]},
                                       model_id="m", default_max_tokens=7, max_tokens_limit=10, default_seed=5)
    assert request == ChatRequest(({"role": "system", "content": "x"},), max_tokens=7, temperature=0.0, seed=5)
    assert stream is False
    with pytest.raises(RequestError) as caught:
        parse_request({"model": "m", "messages": MESSAGES, "max_tokens": 11}, model_id="m", default_max_tokens=7,
                      max_tokens_limit=10, default_seed=5)
    assert caught.value.status == 400


def test_load_backend_serves_a_saved_model_directory(tiny_dir):
    from memreason.serve import load_backend

    backend = load_backend(str(tiny_dir), dtype="float32", device="cpu")
    assert backend.model_id == tiny_dir.name and backend.prompt_style == "chat"
    with Server(backend) as server:
        client = openai.OpenAI(base_url=server.url, api_key="unused", max_retries=0)
        reply = client.chat.completions.create(model=backend.model_id, messages=MESSAGES, max_tokens=2)
    assert reply.usage.completion_tokens == 2


@pytest.mark.smollm2
def test_smollm2_serves_greedy_chat_and_streams_the_same_text(smollm2):
    model, tokenizer = smollm2
    backend = ModelBackend(model, tokenizer, "SmolLM2-135M-Instruct")
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    with Server(backend) as server:
        client = openai.OpenAI(base_url=server.url, api_key="unused", max_retries=0, timeout=120)
        plain = client.chat.completions.create(model="SmolLM2-135M-Instruct", messages=messages, max_tokens=16)
        streamed = client.chat.completions.create(model="SmolLM2-135M-Instruct", messages=messages, max_tokens=16,
                                                  stream=True)
        text = "".join(c.choices[0].delta.content or "" for c in streamed if c.choices)
    _, expected = _reference_greedy(backend, messages, 16)
    content = plain.choices[0].message.content
    assert content == expected
    assert "Paris" in content
    assert text == content
    assert plain.choices[0].message.model_extra["memreason"]["steps"]
