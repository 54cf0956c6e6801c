"""``memreason serve``: options checked before the model loads, and a real server process on 127.0.0.1."""

import os
import signal
import subprocess
import sys
import urllib.request

import openai
import pytest

from conftest import build_tiny_model, build_tiny_tokenizer
from memreason.cli import main


@pytest.mark.parametrize("argv,names", [
    (["--port", "70000"], ["port"]),
    (["--max-tokens", "0"], ["max_tokens"]),
    (["--max-tokens", "300", "--max-tokens-limit", "100"], ["max_tokens"]),
    (["--read-timeout", "0", "--max-queue", "-1"], ["read_timeout", "max_queue"]),
    (["--read-timeout", "nan"], ["read_timeout"]),
    (["--max-connections", "0"], ["max_connections"]),
    (["--max-context", "0"], ["--max-context"]),
    (["--inject-tau", "nan"], ["--inject-tau"]),
    (["--inject-layer", "-1"], ["--inject-layer"]),
    (["--results", "no/such/results.jsonl"], ["no/such/results.jsonl"]),
    (["--source", "oracle:x"], ["unknown correction source", "oracle:x"]),
    (["--source", "facts:no/such/facts.txt"], ["no/such/facts.txt"]),
])
def test_bad_options_fail_in_one_line_before_any_model_loads(monkeypatch, capsys, argv, names):
    import memreason.serve

    def no_load(*args, **kwargs):
        raise AssertionError("the model was loaded before the options were checked")

    monkeypatch.setattr(memreason.serve, "load_backend", no_load)
    assert main(["serve", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("memreason serve: error:")
    assert all(name in err for name in names)


def test_serve_process_answers_completions_and_stops_on_ctrl_c(tmp_path):
    tokenizer = build_tiny_tokenizer()
    build_tiny_model(len(tokenizer)).save_pretrained(tmp_path / "tiny")
    tokenizer.save_pretrained(tmp_path / "tiny")
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    process = subprocess.Popen([sys.executable, "-m", "memreason.cli", "serve", "--model", str(tmp_path / "tiny"),
                                "--port", "0", "--device", "cpu", "--dtype", "float32"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        line = process.stdout.readline()
        assert line.startswith("serving 'tiny' at http://127.0.0.1:"), (line, process.stderr.read())
        url = line.split(" at ", 1)[1].split(";", 1)[0]
        client = openai.OpenAI(base_url=url, api_key="unused", max_retries=0, timeout=60)
        reply = client.completions.create(model="tiny", prompt="Question: Is ice lighter than water?\n", max_tokens=3)
        assert reply.usage.completion_tokens == 3 and reply.choices[0].finish_reason == "length"
        page = line.split("trace editor at ", 1)[1].split(";", 1)[0]
        assert page == url.removesuffix("/v1") + "/"
        with urllib.request.urlopen(page, timeout=30) as response:
            assert response.headers["Content-Type"].startswith("text/html")
            assert b"memreason trace editor" in response.read()
        process.send_signal(signal.SIGINT)
        out, _ = process.communicate(timeout=30)
        assert process.returncode == 0 and out.strip() == "stopped"
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
