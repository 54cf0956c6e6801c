"""Fixtures and helpers shared by the tests of ``memreason.serve`` (imported by name into each test module:
a ``conftest.py`` here would shadow ``tests/conftest.py`` for ``from conftest import ...``)."""

import http.client
import json
import socket
import time
from dataclasses import dataclass

import openai
import pytest

from conftest import build_tiny_model, build_tiny_tokenizer
from memreason.serve import ModelBackend, Server
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


def raw(server, method, path, body=None, headers=None):
    """One raw HTTP exchange (for bodies the openai client cannot send): (status, parsed JSON)."""
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    try:
        data = body if isinstance(body, (bytes, type(None))) else json.dumps(body).encode()
        connection.request(method, path, body=data, headers={"Content-Type": "application/json", **(headers or {})})
        response = connection.getresponse()
        return response.status, json.loads(response.read() or b"null")
    finally:
        connection.close()


def raw_bytes(server, data: bytes, *, half_close: bool = False, timeout: float = 10) -> tuple[bytes, float]:
    """Send bytes on a fresh connection (optionally shutting our side for writing), read until the server
    closes; returns (everything it sent, seconds until it closed)."""
    start = time.monotonic()
    with socket.create_connection(("127.0.0.1", server.port), timeout=timeout) as sock:
        if data:
            sock.sendall(data)
        if half_close:
            sock.shutdown(socket.SHUT_WR)
        chunks = []
        try:
            while True:
                chunk = sock.recv(65536)
                if not chunk:
                    break
                chunks.append(chunk)
        except ConnectionResetError:
            pass
    return b"".join(chunks), time.monotonic() - start


def parse_reply(data: bytes) -> tuple[int, dict, dict]:
    """(status, headers (lower-case names), JSON body) of one raw HTTP/1.1 reply with a Content-Length."""
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {k.strip().lower(): v.strip() for k, v in (line.split(":", 1) for line in lines[1:])}
    return status, headers, json.loads(body[:int(headers["content-length"])])


def reference_greedy_ids(backend, ids, n):
    """What the model itself produces, greedily, after the prompt ids: (prompt length, text)."""
    import torch

    ids = torch.tensor([ids])
    with torch.no_grad():
        out = backend.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False,
                                     pad_token_id=backend.pad_id, temperature=None, top_p=None, top_k=None)
    return ids.shape[1], backend.tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


def reference_greedy(backend, messages, n):
    """What the model itself produces, greedily, for the chat-templated messages."""
    prompt = backend.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return reference_greedy_ids(backend, backend.tokenizer(prompt, add_special_tokens=False)["input_ids"], n)


# ---------------------------------------------------------------- the trace editor on the tiny reasoner

ICE = "Is ice lighter than water?"


@dataclass(frozen=True)
class FakeCorrection:
    """The fields of ``memreason.corrections.Correction``."""

    step: int
    text: str
    kind: str = "memory"
    source: str = ""
    note: str = ""


class FakeSource:
    """A correction source (the ``CorrectionSource`` protocol): ``fix`` maps a step index to its corrected
    text; other steps get no correction. ``error`` makes it fail like an unreachable LLM endpoint."""

    def __init__(self, name: str, fix: dict[int, str], *, error: str | None = None):
        self.name, self.fix, self.error = name, fix, error
        self.asked: list[int] = []

    def correct(self, result, step):
        from memreason.errors import MemreasonError

        self.asked.append(step)
        if self.error:
            raise MemreasonError(self.error)
        if step not in self.fix:
            return None
        return FakeCorrection(step, self.fix[step], "memory", self.name, "from the fake source")


def tiny_editor(reasoner, **kwargs):
    """An ``Editor`` (and its chat backend) on the tiny compact-scheme reasoner, as `memreason serve` builds it."""
    from memreason.serve import Editor

    model, tokenizer, scheme, _ = reasoner
    backend = ModelBackend(model, tokenizer, "tiny", task=get_task("strategyqa"), prompt_style="plain", scheme=scheme)
    kwargs.setdefault("max_new_tokens", 80)
    return backend, Editor.from_backend(backend, **kwargs)


FACTS = ("Ice floats on water.", "Paris is the capital of France.")


@pytest.fixture(scope="module")
def facts_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("facts") / "facts.txt"
    path.write_text("# our facts\n" + "\n".join(FACTS) + "\n", encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def editor_server(tiny_reasoner, facts_file):
    """A server with the tiny reasoner's editor and two sources: the real ``facts:FILE`` source
    (``memreason.corrections.load_source``) over ``FACTS``, and a fake one that corrects step 0."""
    from memreason.corrections import load_source

    sources = [load_source(f"facts:{facts_file}"), FakeSource("fake", {0: "Ice floats on water."})]
    backend, editor = tiny_editor(tiny_reasoner, sources=sources)
    with Server(backend, editor=editor) as server:
        yield server
