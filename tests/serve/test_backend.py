"""The backends (``memreason.serve.backend``): prompt rendering, pad/EOS ids, limits, scripted replies, loading."""

import openai
import pytest
from serve_fixtures import MESSAGES, reference_greedy, tiny_backend, tiny_dir  # noqa: F401

from memreason.generate import eos_ids, pad_id
from memreason.serve import ChatRequest, CompletionRequest, ModelBackend, RequestError, ScriptedBackend, Server
from memreason.tasks import get_task


def test_plain_style_run_sees_the_question_form(tiny_backend):
    backend = ModelBackend(tiny_backend.model, tiny_backend.tokenizer, "tiny", task=get_task("strategyqa"),
                           prompt_style="plain")
    assert backend.render([{"role": "user", "content": "Is ice lighter than water?"}]) == \
        "Question: Is ice lighter than water?\n"


def test_pad_and_eos_come_from_the_shared_generation_policy(tiny_backend):
    assert tiny_backend.eos_ids == eos_ids(tiny_backend.model, tiny_backend.tokenizer)
    assert tiny_backend.pad_id == pad_id(tiny_backend.tokenizer, tiny_backend.eos_ids)
    assert tiny_backend.tokenizer.convert_tokens_to_ids("<|im_end|>") in tiny_backend.eos_ids


def test_a_completion_prompt_is_continued_as_sent_in_every_prompt_style(tiny_backend):
    plain = ModelBackend(tiny_backend.model, tiny_backend.tokenizer, "tiny", prompt_style="plain")
    prompt = "Question: Is ice lighter than water?\n"
    expected = tiny_backend.tokenizer(prompt, add_special_tokens=False)["input_ids"]
    for backend in (tiny_backend, plain):
        assert backend.prepare(CompletionRequest(prompt, max_tokens=4)).input_ids == expected
        assert backend.prepare(CompletionRequest(tuple(expected), max_tokens=4)).input_ids == expected


def test_max_tokens_is_cut_where_the_context_ends(tiny_backend):
    backend = ModelBackend(tiny_backend.model, tiny_backend.tokenizer, "tiny", max_context=40)
    prepared = backend.prepare(CompletionRequest(tuple(range(30)), max_tokens=100))
    assert prepared.max_new_tokens == 10
    completion = backend.generate(prepared)
    assert completion.prompt_tokens == 30 and completion.completion_tokens <= 10
    with pytest.raises(RequestError) as caught:
        backend.prepare(CompletionRequest(tuple(range(40)), max_tokens=1))
    assert caught.value.status == 413 and caught.value.param == "prompt"


def test_scripted_backend_serves_in_order_applies_stop_and_counts():
    backend = ScriptedBackend(["first. rest", "second"])
    pieces = []
    one = backend.generate(backend.prepare(ChatRequest(tuple(MESSAGES), 5, stop=(".",))), on_text=pieces.append)
    two = backend.generate(backend.prepare(CompletionRequest("a b c", 5)))
    three = backend.generate(backend.prepare(CompletionRequest((1, 2), 5)))
    assert (one.text, two.text, three.text) == ("first", "second", "second")
    assert "".join(pieces) == "first" and len(pieces) > 1
    assert (one.prompt_tokens, two.prompt_tokens, three.prompt_tokens) == (11, 3, 2)
    assert backend.count == 3 and isinstance(backend.requests[1], CompletionRequest)


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
    _, expected = reference_greedy(backend, messages, 16)
    content = plain.choices[0].message.content
    assert content == expected
    assert "Paris" in content
    assert text == content
    assert plain.choices[0].message.model_extra["memreason"]["steps"]


@pytest.mark.smollm2
def test_smollm2_completes_a_plain_prompt_like_generate_does(smollm2):
    from serve_fixtures import reference_greedy_ids

    model, tokenizer = smollm2
    backend = ModelBackend(model, tokenizer, "SmolLM2-135M-Instruct")
    prompt = "The capital of France is"
    with Server(backend) as server:
        client = openai.OpenAI(base_url=server.url, api_key="unused", max_retries=0, timeout=120)
        reply = client.completions.create(model="SmolLM2-135M-Instruct", prompt=prompt, max_tokens=8)
    _, expected = reference_greedy_ids(backend, tokenizer(prompt, add_special_tokens=False)["input_ids"], 8)
    assert reply.choices[0].text == expected
    assert "Paris" in reply.choices[0].text
