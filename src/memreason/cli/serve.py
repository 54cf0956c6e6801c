"""``memreason serve``: an OpenAI-compatible HTTP server (``/v1/chat/completions``, ``/v1/completions``,
``/v1/models``) for a trained run or a base model; replies carry the parsed memory/reason steps in a
``memreason`` field beside the text. The same server shows the trace editor at ``/``: ask a question or
open a results row, see its memory/reason steps, edit, delete or correct one and watch the answer change
(JSON endpoints under ``/v1/memreason/``)."""

from __future__ import annotations

import argparse
import os

API_KEY_ENV = "MEMREASON_SERVE_API_KEY"
DEFAULT_LAYER, DEFAULT_TAU = 0, 0.2  # memreason.serve.editor.DEFAULT_INJECTION (kept here: no heavy import)


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
               "trace editor: open http://127.0.0.1:8000/ in a browser, e.g. after\n"
               "  memreason serve --model runs/demo --results runs/demo/eval/results.jsonl \\\n"
               "    --source gold:bundled:strategyqa --source facts:my_facts.txt\n"
               "  curl http://127.0.0.1:8000/v1/memreason/answer -H 'Content-Type: application/json' \\\n"
               "    -d '{\"question\": \"Do fish sleep?\"}'\n"
               f"set ${API_KEY_ENV} (or --api-key) to make clients send that key (Authorization: Bearer ...);\n"
               "the page asks for it.")
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
    parser.add_argument("--api-key", default=None, help=f"require this key from clients (default: ${API_KEY_ENV}; "
                        "the environment keeps it out of the process list)")
    editor = parser.add_argument_group("trace editor (the page at /)")
    editor.add_argument("--results", default=None, metavar="FILE",
                        help="a results.jsonl (from `memreason eval`) whose rows the page lists")
    editor.add_argument("--source", action="append", default=[], metavar="SPEC",
                        help="a correction source for 'mark wrong and correct', repeatable: gold:SOURCE, facts:FILE, "
                             "text:..., llm:MODEL[@URL], world:DIR")
    editor.add_argument("--inject-layer", type=int, default=DEFAULT_LAYER,
                        help=f"layer the inject switch adds the memory at (default {DEFAULT_LAYER}: the cell the "
                             "bundled two-hop sweep chose for SmolLM2; `memreason inject sweep` finds yours)")
    editor.add_argument("--inject-tau", type=float, default=DEFAULT_TAU,
                        help=f"injection strength (default {DEFAULT_TAU})")
    editor.add_argument("--inject-tau-mode", choices=("relative", "absolute"), default="relative",
                        help="relative: tau times the median residual norm at the layer (default); absolute: tau x v")
    editor.add_argument("--inject-encoder", choices=("unembed", "unembed-centered", "embed", "layer"),
                        default="unembed", help="how the memory text becomes a vector (default unembed)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto")
    parser.set_defaults(func=run)


def run(args) -> int:
    from memreason.errors import ConfigError
    from memreason.serve import Editor, Server, check_options, load_backend

    options = dict(default_max_tokens=args.max_tokens, max_tokens_limit=args.max_tokens_limit,
                   read_timeout=args.read_timeout, max_connections=args.max_connections, max_queue=args.max_queue)
    check_options(port=args.port, **options)  # before the model loads, not after
    if args.max_context is not None and args.max_context < 2:
        raise ConfigError(f"--max-context must be at least 2 tokens (got {args.max_context})")
    injection, rows, sources = _editor_inputs(args)  # also before the model loads
    backend = load_backend(args.model, model_id=args.name, task=args.task, dtype=args.dtype, device=args.device,
                           max_context=args.max_context)
    editor = Editor.from_backend(backend, sources=sources, rows=rows, injection=injection,
                                 max_new_tokens=args.max_tokens)
    api_key = args.api_key or os.environ.get(API_KEY_ENV) or None
    server = Server(backend, host=args.host, port=args.port, api_key=api_key, seed=args.seed, editor=editor,
                    **options).bind()
    page = server.url.removesuffix("/v1") + "/"
    print(f"serving '{backend.model_id}' at {server.url}; trace editor at {page}"
          + (" (requests need the API key)" if api_key else "") + "; Ctrl-C stops")
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        print("stopped")
    return 0


def _editor_inputs(args):
    """The injection settings, the --results rows and the --source objects, checked before any model loads."""
    import math

    from memreason.errors import ConfigError
    from memreason.interventions.revise import Injection

    if args.inject_layer < 0:
        raise ConfigError(f"--inject-layer must be 0 or more (got {args.inject_layer})")
    if not math.isfinite(args.inject_tau) or args.inject_tau < 0:
        raise ConfigError(f"--inject-tau must be a non-negative number (got {args.inject_tau})")
    injection = Injection(layer=args.inject_layer, tau=args.inject_tau, tau_mode=args.inject_tau_mode,
                          encoder=args.inject_encoder)
    rows = []
    if args.results:
        from memreason.evaluate import read_results

        rows = read_results(args.results)
    sources = []
    if args.source:
        from memreason.corrections import load_source

        sources = [load_source(spec) for spec in args.source]
    return injection, rows, sources
