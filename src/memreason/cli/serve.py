"""``memreason serve``: an OpenAI-compatible HTTP server (``/v1/chat/completions``, ``/v1/completions``,
``/v1/models``) for a trained run or a base model; replies carry the parsed memory/reason steps in a
``memreason`` field beside the text."""

from __future__ import annotations

import argparse
import os

API_KEY_ENV = "MEMREASON_SERVE_API_KEY"


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "serve", help="serve a run or model over an OpenAI-compatible HTTP API", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n  memreason serve                       # the embedded SmolLM2 on 127.0.0.1:8000\n"
               "  memreason serve --model runs/demo --port 8001\n"
               "  curl http://127.0.0.1:8000/v1/chat/completions -H 'Content-Type: application/json' \\\n"
               "    -d '{\"model\": \"SmolLM2-135M-Instruct\", \"messages\": [{\"role\": \"user\", \"content\": \"Hi\"}]}'\n"
               "  curl http://127.0.0.1:8000/v1/completions -H 'Content-Type: application/json' \\\n"
               "    -d '{\"model\": \"SmolLM2-135M-Instruct\", \"prompt\": \"Question: Do fish sleep?\\n\"}'\n"
               "  lm_eval --model local-completions --tasks gsm8k \\\n"
               "    --model_args model=demo,base_url=http://127.0.0.1:8000/v1/completions,tokenizer_backend=None,"
               "tokenized_requests=False\n"
               "python: openai.OpenAI(base_url='http://127.0.0.1:8000/v1', api_key='-').chat.completions.create(...)\n"
               "generation is greedy unless the request sets temperature > 0 (then seeded by the request's seed);\n"
               "/v1/completions continues the prompt as sent (no chat template) and refuses logprobs and echo.\n"
               f"set ${API_KEY_ENV} to make clients send that key (Authorization: Bearer ...).")
    parser.add_argument("--model", default=None, help="a run directory from `memreason train`, a model dir, a .gguf "
                        "file or a hub id (default: the embedded SmolLM2)")
    parser.add_argument("--name", default=None, help="the model id clients send (default: the run/model name)")
    parser.add_argument("--task", default=None, help="task used to read the answer into the memreason field "
                        "(default: the run's own)")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1; anything else "
                        "exposes the model to the network)")
    parser.add_argument("--port", type=int, default=8000, help="port (0 picks a free one)")
    parser.add_argument("--max-tokens", type=int, default=256, help="reply length when a request sets none")
    parser.add_argument("--max-tokens-limit", type=int, default=4096, help="larger max_tokens are refused")
    parser.add_argument("--max-context", type=int, default=None,
                        help="prompt + reply token cap (default: the model's context length)")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed for requests that send none")
    parser.add_argument("--read-timeout", type=float, default=10.0,
                        help="seconds a client has to send a whole request; also the idle keep-alive limit "
                             "(default 10)")
    parser.add_argument("--max-connections", type=int, default=64,
                        help="connections served at once; more get a 503 (default 64)")
    parser.add_argument("--max-queue", type=int, default=32,
                        help="generation requests waiting or running at once; more get a 503 (default 32)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto")
    parser.set_defaults(func=run)


def run(args) -> int:
    from memreason.errors import ConfigError
    from memreason.serve import Server, check_options, load_backend

    options = dict(default_max_tokens=args.max_tokens, max_tokens_limit=args.max_tokens_limit,
                   read_timeout=args.read_timeout, max_connections=args.max_connections, max_queue=args.max_queue)
    check_options(port=args.port, **options)  # before the model loads, not after
    if args.max_context is not None and args.max_context < 2:
        raise ConfigError(f"--max-context must be at least 2 tokens (got {args.max_context})")
    backend = load_backend(args.model, model_id=args.name, task=args.task, dtype=args.dtype, device=args.device,
                           max_context=args.max_context)
    api_key = os.environ.get(API_KEY_ENV) or None
    server = Server(backend, host=args.host, port=args.port, api_key=api_key, seed=args.seed, **options).bind()
    print(f"serving '{backend.model_id}' at {server.url}"
          + (f" (requests need the key in ${API_KEY_ENV})" if api_key else "") + "; Ctrl-C stops")
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        print("stopped")
    return 0
