"""Load test of ``memreason serve`` on loopback: a bounded number of concurrent chat requests through the
official ``openai`` client, counting errors and requests per second.

Three passes on the same request mix, in this process, against servers bound to 127.0.0.1 on free ports,
interleaved in rounds so that a noisy machine slows all three alike:

1. ``scripted``: a canned reply, so the rate is the HTTP server's own ceiling (parsing, JSON, threads);
2. ``direct``: the model called in-process, one request after another, no HTTP (the baseline);
3. ``served``: the same model behind the server, ``--concurrency`` clients at once.

The model serialises generation behind a lock, so ``served / direct`` is the cost of HTTP + JSON + SSE per
request (1.0 = free). Every fifth request streams. With ``--faults N``, a fourth pass, ``faulted``, sends the
same requests to the same model behind a second server while N bad clients (slow bodies, half-closed
connections, garbage bytes, silent connections) hammer it: ``faulted / served`` is what they cost the good
clients (1.0 = nothing). The run is bounded by ``--requests`` per pass and ``--time-limit`` seconds in all;
it stops by itself and exits 1 if any good request failed or went unsent.

    python benchmarks/serve_load.py                          # tiny random model, 300 requests per pass
    python benchmarks/serve_load.py --model smollm2 --requests 100 --max-tokens 16
    python benchmarks/serve_load.py --faults 8               # + the pass under bad clients
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor, wait

CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def tiny_model():
    """A 2-layer random Llama with a small byte-level BPE tokenizer (the same shape the tests use)."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import AutoModelForCausalLM, LlamaConfig, PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(["Question: is the ocean larger? The answer is: True"] * 8, trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                        pad_token="<|im_end|>", unk_token="<|endoftext|>")
    tokenizer.chat_template = CHAT_TEMPLATE
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         bos_token_id=1, eos_token_id=2, pad_token_id=2)
    return AutoModelForCausalLM.from_config(config).eval(), tokenizer


def requests_mix(n: int) -> list[tuple[list[dict], bool]]:
    return [([{"role": "user", "content": f"Question {i}: is {i} an even number?"}], i % 5 == 4) for i in range(n)]


class Pass:
    """One pass's tally across rounds."""

    def __init__(self):
        self.ok, self.errors, self.seconds, self.latencies = 0, [], 0.0, []

    def row(self, name: str) -> str:
        rate = self.ok / self.seconds if self.seconds else float("nan")
        p50 = statistics.median(self.latencies) * 1000 if self.latencies else float("nan")
        p95 = statistics.quantiles(self.latencies, n=20)[18] * 1000 if len(self.latencies) >= 20 else float("nan")
        return f"{name:<9} {self.ok:>5} {len(self.errors):>6} {self.seconds:>8.2f} {rate:>8.1f} {p50:>8.1f} {p95:>8.1f}"


def http_round(client, model_id: str, chunk, concurrency: int, max_tokens: int, deadline: float, tally: Pass):
    def one(item):
        messages, stream = item
        if time.perf_counter() > deadline:
            raise TimeoutError("time limit reached before this request was sent")
        start = time.perf_counter()
        if stream:
            for _ in client.chat.completions.create(model=model_id, messages=messages, max_tokens=max_tokens,
                                                    stream=True):
                pass
        else:
            client.chat.completions.create(model=model_id, messages=messages, max_tokens=max_tokens)
        tally.latencies.append(time.perf_counter() - start)

    start = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        futures = [pool.submit(one, item) for item in chunk]
        wait(futures)
    tally.seconds += time.perf_counter() - start
    for future in futures:
        if future.exception() is None:
            tally.ok += 1
        else:
            tally.errors.append(repr(future.exception()))


def direct_round(backend, chunk, max_tokens: int, deadline: float, tally: Pass):
    from memreason.serve import ChatRequest

    def run():
        for messages, _ in chunk:  # the baseline: same requests, no HTTP, one at a time
            if time.perf_counter() > deadline:
                tally.errors.append("time limit reached")
                return
            start = time.perf_counter()
            backend.generate(backend.prepare(ChatRequest(tuple(messages), max_tokens)))
            tally.latencies.append(time.perf_counter() - start)
            tally.ok += 1

    # On a worker thread, as the server's handlers run it: on our shared 2-core CPU, torch's OpenMP team in
    # the main thread ran this tiny model several times slower than a worker thread did.
    start = time.perf_counter()
    with ThreadPoolExecutor(1) as pool:
        pool.submit(run).result()
    tally.seconds += time.perf_counter() - start


BAD_CLIENTS = (  # (bytes sent, then shut our side for writing?)
    (b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{", False),  # slow body
    (b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 50\r\n\r\n{", True),  # half-closed
    (bytes(range(256)) * 4 + b"\r\n\r\n", False),  # garbage
    (b"", False),  # silent
)


def bad_client(port: int, index: int, stop: threading.Event, sent: list) -> None:
    """One bad client, cycling through the kinds until ``stop``; counts its connections in ``sent``."""
    kind = index
    while not stop.is_set():
        data, half_close = BAD_CLIENTS[kind % len(BAD_CLIENTS)]
        kind += 1
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
                sock.sendall(data)
                if half_close:
                    sock.shutdown(socket.SHUT_WR)
                while sock.recv(65536):
                    pass
        except OSError:
            pass
        sent.append(1)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny", help="'tiny' (random 2-layer Llama), 'smollm2' (embedded "
                        "default) or a run/model directory")
    parser.add_argument("--requests", type=int, default=300, help="requests per pass (default 300)")
    parser.add_argument("--round", type=int, default=50, help="requests per pass per round (default 50)")
    parser.add_argument("--concurrency", type=int, default=8, help="client threads (default 8)")
    parser.add_argument("--max-tokens", type=int, default=8)
    parser.add_argument("--time-limit", type=float, default=600, help="seconds for the whole run (default 600)")
    parser.add_argument("--faults", type=int, default=0, help="bad clients during a fourth pass (default 0: none)")
    parser.add_argument("--read-timeout", type=float, default=1.0,
                        help="the faulted server's read timeout, seconds (default 1)")
    args = parser.parse_args()
    deadline = time.perf_counter() + args.time_limit

    import openai

    from memreason.serve import ModelBackend, ScriptedBackend, Server, load_backend

    if args.model == "tiny":
        model, tokenizer = tiny_model()
        backend = ModelBackend(model, tokenizer, "tiny")
    else:
        backend = load_backend(None if args.model == "smollm2" else args.model, device="cpu", dtype="float32")
    mix = requests_mix(args.requests)
    print(f"model {backend.model_id}: {args.requests} requests per pass in rounds of {args.round}, "
          f"{args.concurrency} clients, max_tokens {args.max_tokens}, every 5th streamed; 127.0.0.1 only; "
          f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    tallies = {"scripted": Pass(), "direct": Pass(), "served": Pass()}
    if args.faults:
        tallies["faulted"] = Pass()
    # Rounds interleave the passes, so a noisy neighbour slows all of them alike.
    stop, bad_sent = threading.Event(), []
    with Server(ScriptedBackend(["The answer is: True"], model_id=backend.model_id)) as scripted, \
            Server(backend) as served, Server(backend, read_timeout=args.read_timeout) as faulted:
        clients = {name: openai.OpenAI(base_url=server.url, api_key="unused", max_retries=0, timeout=120)
                   for name, server in (("scripted", scripted), ("served", served), ("faulted", faulted))}
        bad = [threading.Thread(target=bad_client, args=(faulted.port, i, stop, bad_sent), daemon=True)
               for i in range(args.faults)]
        for thread in bad:
            thread.start()
        try:
            for start in range(0, len(mix), args.round):
                chunk = mix[start:start + args.round]
                http_round(clients["scripted"], backend.model_id, chunk, args.concurrency, args.max_tokens,
                           deadline, tallies["scripted"])
                direct_round(backend, chunk, args.max_tokens, deadline, tallies["direct"])
                http_round(clients["served"], backend.model_id, chunk, args.concurrency, args.max_tokens, deadline,
                           tallies["served"])
                if args.faults:
                    http_round(clients["faulted"], backend.model_id, chunk, args.concurrency, args.max_tokens,
                               deadline, tallies["faulted"])
        finally:
            stop.set()
            for thread in bad:
                thread.join(timeout=args.read_timeout + 35)
        # the bad clients' refusals are expected; only the good clients' count
        server_errors = scripted.stats["errors"] + served.stats["errors"]

    print(f"{'pass':<9} {'ok':>5} {'errors':>6} {'seconds':>8} {'req/s':>8} {'p50 ms':>8} {'p95 ms':>8}")
    for name, tally in tallies.items():
        print(tally.row(name))
    ratio = (tallies["served"].ok / tallies["served"].seconds) / (tallies["direct"].ok / tallies["direct"].seconds)
    print(f"served / direct = {ratio:.2f} (1.0 = the server adds nothing per request; > 1 happens on a loaded CPU, "
          "where more runnable threads get a larger share)")
    if args.faults:
        cost = (tallies["faulted"].ok / tallies["faulted"].seconds) / (tallies["served"].ok / tallies["served"].seconds)
        print(f"faulted / served = {cost:.2f} with {args.faults} bad clients ({len(bad_sent)} bad connections; "
              "1.0 = they cost the good clients nothing)")
    # a request that failed, went unsent, or that a server counted as refused
    failed = sum(args.requests - tally.ok for tally in tallies.values()) + server_errors
    for name, tally in tallies.items():
        for error in tally.errors[:3]:
            print(f"  {name}: {error}")
    print(f"errors: {failed}; load average now {os.getloadavg()[0]:.1f}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
