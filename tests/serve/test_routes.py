"""The endpoints (``memreason.serve.routes``), driven by the official ``openai`` client on a loopback port:
models, chat completions and plain-prompt completions; the trace editor's JSON endpoints and page (raw
HTTP); and the routing table itself."""

import openai
import pytest
from serve_fixtures import (ICE, MESSAGES, client, editor_server, facts_file, raw, reference_greedy,  # noqa: F401
                            reference_greedy_ids, server, tiny_backend, tiny_dir, tiny_editor)

from memreason.serve import ROUTES, RequestError, Route, ScriptedBackend, Server
from memreason.serve.routes import match
from memreason.tasks import get_task

PROMPT = "Question: Is the Pacific Ocean larger than the Atlantic Ocean?\n"


# ---------------------------------------------------------------- routing table

def test_routing_table_finds_exact_and_prefix_routes():
    route, tail = match(ROUTES, "GET", "/v1/models/tiny")
    assert route.path == "/v1/models/" and tail == "tiny"
    route, tail = match(ROUTES, "POST", "/v1/completions")
    assert route.body and tail == ""
    assert match(ROUTES, "GET", "/v1/models")[0].path == "/v1/models"


def test_routing_table_says_404_for_unknown_paths_and_405_with_allow_for_wrong_methods():
    with pytest.raises(RequestError) as caught:
        match(ROUTES, "GET", "/v1/embeddings")
    assert caught.value.status == 404
    with pytest.raises(RequestError) as caught:
        match(ROUTES, "DELETE", "/v1/chat/completions")
    assert caught.value.status == 405 and caught.value.headers == {"Allow": "POST"}


def test_a_new_json_endpoint_is_one_function_and_one_route(tiny_backend):
    def echo_length(exchange, payload):
        return {"keys": sorted(payload), "model": exchange.app.backend.model_id}

    with Server(tiny_backend, routes=(*ROUTES, Route("POST", "/v1/memreason/echo", echo_length, body=True))) as s:
        assert raw(s, "POST", "/v1/memreason/echo", {"b": 1, "a": 2}) == (200, {"keys": ["a", "b"], "model": "tiny"})
        status, payload = raw(s, "POST", "/v1/memreason/echo", b"[1, 2")
        assert status == 400 and payload["error"]["message"].startswith("the request body is not valid JSON")


# ---------------------------------------------------------------- models

def test_models_endpoint_lists_the_served_model(client):
    assert [m.id for m in client.models.list().data] == ["tiny"]
    assert client.models.retrieve("tiny").owned_by == "memreason"


# ---------------------------------------------------------------- chat completions

def test_reply_is_the_models_greedy_continuation_of_the_chat_template(client, tiny_backend):
    reply = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=6)
    prompt_tokens, expected = reference_greedy(tiny_backend, MESSAGES, 6)
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
    got, payload = raw(server, "POST", "/v1/chat/completions", body)
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


# ---------------------------------------------------------------- completions (plain prompts)

def test_completion_is_the_models_greedy_continuation_of_the_prompt_as_sent(client, tiny_backend):
    reply = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=6)
    ids = tiny_backend.tokenizer(PROMPT, add_special_tokens=False)["input_ids"]  # no chat template, no BOS
    prompt_tokens, expected = reference_greedy_ids(tiny_backend, ids, 6)
    assert reply.object == "text_completion" and reply.model == "tiny"
    assert reply.choices[0].text == expected and reply.choices[0].index == 0
    assert reply.choices[0].finish_reason == "length" and reply.choices[0].logprobs is None
    assert reply.usage.prompt_tokens == prompt_tokens and reply.usage.completion_tokens == 6


def test_a_list_of_prompts_gives_what_each_prompt_gives_alone_in_order(client):
    prompts = [PROMPT, "Question: Is ice lighter than water?\n", "Paris is the capital of"]
    alone = [client.completions.create(model="tiny", prompt=p, max_tokens=5).choices[0].text for p in prompts]
    together = client.completions.create(model="tiny", prompt=prompts, max_tokens=5)
    assert [c.index for c in together.choices] == [0, 1, 2]
    assert [c.text for c in together.choices] == alone
    assert together.usage.completion_tokens == 15


def test_token_id_prompts_equal_their_text(client, tiny_backend):
    ids = tiny_backend.tokenizer(PROMPT, add_special_tokens=False)["input_ids"]
    by_text = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=5).choices[0].text
    by_ids = client.completions.create(model="tiny", prompt=[ids, ids], max_tokens=5)
    assert [c.text for c in by_ids.choices] == [by_text, by_text]
    with pytest.raises(openai.BadRequestError, match="outside this model's vocabulary"):
        client.completions.create(model="tiny", prompt=[10 ** 6], max_tokens=5)


def test_completion_stop_and_sampling_match_the_chat_rules(client):
    full = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=16, temperature=1.0,
                                     seed=1).choices[0].text
    assert client.completions.create(model="tiny", prompt=PROMPT, max_tokens=16, temperature=1.0,
                                     seed=1).choices[0].text == full
    stop = full[4:6]
    reply = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=16, temperature=1.0, seed=1,
                                      stop=[stop])
    assert reply.choices[0].text == full[:full.find(stop)] and reply.choices[0].finish_reason == "stop"


def test_streamed_completions_equal_the_plain_ones(client):
    prompts = [PROMPT, "Paris is the capital of"]
    plain = client.completions.create(model="tiny", prompt=prompts, max_tokens=12)
    chunks = list(client.completions.create(model="tiny", prompt=prompts, max_tokens=12, stream=True,
                                            stream_options={"include_usage": True}))
    for index, choice in enumerate(plain.choices):
        pieces = [c.choices[0] for c in chunks if c.choices and c.choices[0].index == index]
        assert "".join(p.text for p in pieces) == choice.text
        assert [p.finish_reason for p in pieces if p.finish_reason] == [choice.finish_reason]
        assert pieces[-1].model_extra["memreason"] == choice.model_extra["memreason"]
    assert chunks[-1].usage.completion_tokens == plain.usage.completion_tokens


def test_completion_carries_the_parsed_steps_and_answer():
    text = "<memory> Ice is less dense than water.\n<reason> So it floats.\nThe answer is: True\n"
    with Server(ScriptedBackend([text], task=get_task("strategyqa"))) as server:
        client = openai.OpenAI(base_url=server.url, api_key="unused", max_retries=0)
        choice = client.completions.create(model="scripted", prompt=PROMPT, stop=["\n\n"]).choices[0]
    assert choice.text == text
    assert choice.model_extra["memreason"]["answer"] == "True"
    assert [s["kind"] for s in choice.model_extra["memreason"]["steps"]] == ["memory", "reason"]


@pytest.mark.parametrize("fields,param,message", [
    ({"logprobs": 1}, "logprobs", "logprobs are not supported"),
    ({"echo": True}, "echo", "echo is not supported"),
    ({"best_of": 3}, "best_of", "best_of"),
    ({"prompt": ""}, "prompt", "a prompt is empty"),
    ({"prompt": [PROMPT, 7]}, "prompt", "'prompt' must be"),
    ({"prompt": None}, "prompt", "'prompt' must be"),
    ({"stop": ["x"] * 17}, "stop", "up to 16"),
    ({"max_tokens": 10 ** 6}, "max_tokens", "max_tokens must be"),
])
def test_completion_fields_it_cannot_honour_get_a_clear_400(client, fields, param, message):
    with pytest.raises(openai.BadRequestError) as caught:
        client.completions.create(**{"model": "tiny", "prompt": PROMPT, **fields})
    assert caught.value.body["param"] == param and message in caught.value.body["message"]


def test_completion_errors_are_openai_shaped(server, client):
    assert raw(server, "POST", "/v1/completions", {"model": "tiny"})[1]["error"]["param"] == "prompt"
    status, payload = raw(server, "POST", "/v1/completions", {"model": "gpt-9", "prompt": "x"})
    assert status == 404 and payload["error"]["code"] == "model_not_found"
    status, payload = raw(server, "POST", "/v1/completions", {"model": "tiny", "prompt": "ocean " * 2000})
    assert status == 413 and payload["error"]["code"] == "context_length_exceeded"
    assert payload["error"]["param"] == "prompt"
    assert client.completions.create(model="tiny", prompt=PROMPT, max_tokens=2).usage.completion_tokens == 2


def test_lm_evaluation_harness_local_completions_gets_the_same_text(server, client, tiny_dir):
    """lm-eval's own client (when installed; it is not a dependency): text and tokenized requests alike."""
    pytest.importorskip("lm_eval.models.openai_completions")
    pytest.importorskip("tenacity")  # lm-eval's [api] extra
    from lm_eval.api.instance import Instance
    from lm_eval.models.openai_completions import LocalCompletionsAPI

    prompts = [PROMPT, "Paris is the capital of"]
    expected = [client.completions.create(model="tiny", prompt=p, max_tokens=8, stop=["\n\n"]).choices[0].text
                for p in prompts]
    for options in (dict(tokenizer_backend=None, tokenized_requests=False),
                    dict(tokenizer_backend="huggingface", tokenizer=str(tiny_dir), tokenized_requests=True)):
        lm = LocalCompletionsAPI(base_url=f"{server.url}/completions", model="tiny", max_gen_toks=8, **options)
        requests = [Instance(request_type="generate_until", doc={}, idx=i,
                             arguments=(p, {"until": ["\n\n"], "max_gen_toks": 8})) for i, p in enumerate(prompts)]
        assert lm.generate_until(requests) == expected


# ---------------------------------------------------------------- the trace editor's endpoints

def test_editor_answer_revise_and_repair_over_http_equal_the_editor_in_process(editor_server, facts_file):
    from memreason.interventions.revise import Edit
    from memreason.traces import Result

    editor = editor_server.editor
    status, row = raw(editor_server, "POST", "/v1/memreason/answer", {"question": ICE, "gold": "True"})
    assert status == 200 and row == editor.answer(ICE, gold="True").to_dict()
    assert row["steps"][0] == {"kind": "memory", "text": "Ice is less dense than water."}
    body = {"result": row, "step": 0, "text": "Paris is the capital of France.", "kind": "memory"}
    status, revised = raw(editor_server, "POST", "/v1/memreason/revise", body)
    expected = editor.revise(Result.from_dict(row), Edit(0, text="Paris is the capital of France.", kind="memory"))
    assert status == 200 and revised == expected.to_dict()
    assert revised["revision"]["new"] == {"kind": "memory", "text": "Paris is the capital of France."}
    status, repaired = raw(editor_server, "POST", "/v1/memreason/repair", {"result": row, "source": "fake"})
    assert status == 200 and repaired["correction"] == {"step": 0, "text": "Ice floats on water.", "kind": "memory",
                                                        "source": "fake", "note": "from the fake source"}
    assert repaired["result"]["steps"][0]["text"] == "Ice floats on water."
    facts = f"facts:{facts_file}"
    listing = {"sources": [{"name": facts}, {"name": "fake"}]}  # in the order given
    assert raw(editor_server, "GET", "/v1/memreason/sources") == (200, listing)
    # the real facts:FILE source: the fact sharing the most content words with the memory step
    status, repaired = raw(editor_server, "POST", "/v1/memreason/repair", {"result": row, "source": facts, "step": 0})
    assert status == 200 and repaired["correction"]["text"] == "Ice floats on water."
    assert repaired["correction"]["source"] == facts
    assert repaired["result"]["steps"][0]["text"] == "Ice floats on water."
    status, payload = raw(editor_server, "POST", "/v1/memreason/repair", {"result": row, "source": facts, "step": 1})
    assert status == 422 and payload["error"]["code"] == "no_correction"  # no fact shares a word with step 1


@pytest.mark.parametrize("path,body,status,param", [
    ("/v1/memreason/answer", {"question": ""}, 400, "question"),
    ("/v1/memreason/answer", {"question": "x", "gold": "perhaps"}, 400, "gold"),
    ("/v1/memreason/revise", {"result": {"id": "x"}, "step": 0, "text": "y"}, 400, "result"),
    ("/v1/memreason/revise", {"step": 0}, 400, "result"),
    ("/v1/memreason/repair", {"result": None, "source": "fake"}, 400, "result"),
    ("/v1/memreason/open", {"row": {}}, 400, "row"),
    ("/v1/memreason/answer", b"[1,", 400, None),
])
def test_editor_requests_are_validated_with_openai_shaped_errors(editor_server, path, body, status, param):
    got, payload = raw(editor_server, "POST", path, body)
    assert got == status and payload["error"]["param"] == param and payload["error"]["message"]


def test_editor_model_work_waits_in_the_bounded_queue_like_chat(tiny_reasoner):
    backend, editor = tiny_editor(tiny_reasoner)
    with Server(backend, editor=editor, max_queue=1) as server:
        with server.slot():  # the one place is taken
            status, payload = raw(server, "POST", "/v1/memreason/answer", {"question": ICE})
            assert status == 503 and payload["error"]["code"] == "server_busy"
            assert raw(server, "GET", "/v1/memreason/info")[0] == 200  # no model work: not queued
        assert raw(server, "POST", "/v1/memreason/answer", {"question": ICE})[0] == 200


def test_rows_of_a_results_file_are_listed_and_opened(tiny_reasoner):
    backend, editor = tiny_editor(tiny_reasoner)
    row = editor.answer(ICE, gold="True")
    backend, editor = tiny_editor(tiny_reasoner, rows=[row])
    with Server(backend, editor=editor) as server:
        status, listing = raw(server, "GET", "/v1/memreason/rows")
        assert status == 200 and listing["rows"] == [{"index": 0, "id": row.id, "question": ICE, "predicted": "True",
                                                      "gold": "True", "outcome": "correct", "steps": 2}]
        assert raw(server, "GET", "/v1/memreason/rows/0") == (200, row.to_dict())
        assert raw(server, "GET", "/v1/memreason/rows/1")[0] == 404
        assert raw(server, "POST", "/v1/memreason/open", {"result": row.to_dict()}) == (200, row.to_dict())
        assert raw(server, "GET", "/v1/memreason/info")[1]["rows"] == 1


def test_the_page_is_served_without_the_key_and_the_endpoints_need_it(tiny_reasoner):
    import base64
    import hashlib
    import http.client
    import re

    backend, editor = tiny_editor(tiny_reasoner)
    with Server(backend, editor=editor, api_key="sesame") as server:
        assert raw(server, "GET", "/v1/memreason/info")[0] == 401
        assert raw(server, "GET", "/v1/memreason/info", headers={"Authorization": "Bearer sesame"})[0] == 200
        connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
        connection.request("GET", "/")
        reply = connection.getresponse()
        page = reply.read().decode()
        connection.close()
    assert reply.status == 200 and reply.getheader("Content-Type") == "text/html; charset=utf-8"
    script = re.search(r"<script>(.*?)</script>", page, re.DOTALL).group(1)
    digest = base64.b64encode(hashlib.sha256(script.encode()).digest()).decode()
    policy = reply.getheader("Content-Security-Policy")
    assert f"script-src 'sha256-{digest}'" in policy and "default-src 'none'" in policy
    assert "connect-src 'self'" in policy and reply.getheader("X-Content-Type-Options") == "nosniff"


def test_a_server_without_an_editor_has_no_page_and_no_editor_endpoints():
    with Server(ScriptedBackend(["x"])) as server:
        for method, path in (("GET", "/"), ("GET", "/v1/memreason/info"), ("POST", "/v1/memreason/answer")):
            status, payload = raw(server, method, path, {"question": "x"} if method == "POST" else None)
            assert status == 404 and "no trace editor" in payload["error"]["message"]
