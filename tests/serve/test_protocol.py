"""Request validation and JSON decoding (``memreason.serve.protocol``), without a socket."""

import pytest
from serve_fixtures import MESSAGES

from memreason.serve import ChatRequest, CompletionRequest, RequestError, parse_completion_request, parse_request
from memreason.serve.protocol import MAX_JSON_DEPTH, load_json

LIMITS = dict(model_id="m", default_max_tokens=7, max_tokens_limit=10, default_seed=5)


def test_request_defaults_are_greedy_and_bounded():
    request, stream, _ = parse_request({"model": "m", "messages": [{"role": "developer", "content": "x"}]},
                                       model_id="m", default_max_tokens=7, max_tokens_limit=10, default_seed=5)
    assert request == ChatRequest(({"role": "system", "content": "x"},), max_tokens=7, temperature=0.0, seed=5)
    assert stream is False
    with pytest.raises(RequestError) as caught:
        parse_request({"model": "m", "messages": MESSAGES, "max_tokens": 11}, model_id="m", default_max_tokens=7,
                      max_tokens_limit=10, default_seed=5)
    assert caught.value.status == 400


def test_completion_request_defaults_are_greedy_and_one_request_per_prompt():
    requests, stream, options = parse_completion_request({"model": "m", "prompt": "Question: x\n"}, **LIMITS)
    assert requests == [CompletionRequest("Question: x\n", max_tokens=7, temperature=0.0, seed=5)]
    assert stream is False and options == {}
    requests, _, _ = parse_completion_request({"model": "m", "prompt": ["a", [5, 6]], "stop": "\n", "max_tokens": 3,
                                               "temperature": 0.5, "seed": 9, "echo": False, "logprobs": None},
                                              **LIMITS)
    assert requests == [CompletionRequest("a", 3, 0.5, 1.0, 9, ("\n",)), CompletionRequest((5, 6), 3, 0.5, 1.0, 9, ("\n",))]
    assert parse_completion_request({"model": "m", "prompt": [1, 2, 3]}, **LIMITS)[0][0].prompt == (1, 2, 3)


@pytest.mark.parametrize("fields,status,param", [
    ({"model": "other"}, 404, "model"),
    ({"prompt": []}, 400, "prompt"),
    ({"prompt": [[]]}, 400, "prompt"),
    ({"prompt": [-1]}, 400, "prompt"),
    ({"prompt": [True]}, 400, "prompt"),
    ({"prompt": {"text": "x"}}, 400, "prompt"),
    ({"prompt": ["x"] * 65}, 400, "prompt"),
    ({"logprobs": 0}, 400, "logprobs"),
    ({"echo": 1}, 400, "echo"),
    ({"n": 2}, 400, "n"),
    ({"suffix": "end"}, 400, "suffix"),
    ({"presence_penalty": 0.5}, 400, "presence_penalty"),
    ({"temperature": -1}, 400, "temperature"),
    ({"stream": "yes"}, 400, "stream"),
])
def test_completion_request_refusals_name_the_field(fields, status, param):
    with pytest.raises(RequestError) as caught:
        parse_completion_request({"model": "m", "prompt": "x", **fields}, **LIMITS)
    assert caught.value.status == status and caught.value.param == param


def test_json_nested_past_the_limit_is_refused_without_recursion():
    for body in (b"[" * 200_000 + b"]" * 200_000, b'{"a":' * 200_000 + b"1" + b"}" * 200_000):
        with pytest.raises(RequestError) as caught:
            load_json(body)
        assert caught.value.status == 400 and caught.value.code == "json_too_deep"
    at_limit = b"[" * MAX_JSON_DEPTH + b"]" * MAX_JSON_DEPTH
    assert load_json(at_limit) is not None
    with pytest.raises(RequestError, match=f"deeper than {MAX_JSON_DEPTH} levels"):
        load_json(b"[" + at_limit + b"]")


@pytest.mark.parametrize("body", [b"", b"{not json", b"\xff\xfe{}", b'{"a": 1} trailing'])
def test_bodies_that_are_not_json_are_a_400(body):
    with pytest.raises(RequestError) as caught:
        load_json(body)
    assert caught.value.status == 400 and "not valid JSON" in caught.value.message
