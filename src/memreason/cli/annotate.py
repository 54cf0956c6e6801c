"""``memreason annotate``: turn questions with gold answers into memory/reason traces with any
OpenAI-compatible chat model (the annotation agent, ``memreason.data.annotate``)."""

from __future__ import annotations

import argparse

from memreason.cli.data import add_dataset_options


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "annotate", help="write memory/reason steps for a dataset with an LLM endpoint", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n"
               "  export MEMREASON_API_KEY=...   # or OPENAI_API_KEY; never pass keys on a shared machine's command line\n"
               "  memreason annotate --data bundled:strategyqa --split train --model gpt-4o --out data/sqa-gpt4o\n"
               "  memreason serve --model ./my-model --port 8000 &\n"
               "  memreason annotate --data questions.jsonl --task freeform --base-url http://127.0.0.1:8000/v1 "
               "--model my-model --variant ordered --out data/mine\n"
               "re-running the same command resumes: finished items are skipped and cached replies cost nothing.\n"
               "outputs: traces.jsonl (one Trace per line), rejected.jsonl, report.json, cache/")
    parser.add_argument("--data", required=True, help="questions with gold answers: .json (paper format), .jsonl, "
                        "bundled:<name> or hf:<id or dir>[:config]; records without steps are fine")
    add_dataset_options(parser)
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--model", required=True, help="model name at the endpoint (e.g. gpt-4o)")
    parser.add_argument("--base-url", default=None, help="OpenAI-compatible base URL (default: $MEMREASON_API_BASE, "
                        "$OPENAI_BASE_URL, else OpenAI)")
    parser.add_argument("--api-key", default=None, help="API key (default: $MEMREASON_API_KEY or $OPENAI_API_KEY; "
                        "prefer the environment: command lines are visible to other users)")
    parser.add_argument("--variant", choices=["free", "ordered"], default="free",
                        help="ordered: all memory steps before the first reason step (default: free)")
    parser.add_argument("--no-knowledge", action="store_true",
                        help="skip the knowledge call; memory steps keep the planner's own text")
    parser.add_argument("--min-memory", type=int, default=1, help="fewest memory steps per trace (default 1)")
    parser.add_argument("--min-reason", type=int, default=1, help="fewest reason steps per trace (default 1)")
    parser.add_argument("--max-steps", type=int, default=12)
    parser.add_argument("--temperature", type=float, default=0.7)
    parser.add_argument("--max-tokens", type=int, default=1024, help="reply length cap per call")
    parser.add_argument("--seed", type=int, default=0, help="attempt k of each call uses seed + k")
    parser.add_argument("--response-format", choices=["auto", "json_schema", "none"], default="auto",
                        help="auto: send a JSON schema, drop it if the endpoint refuses it (default)")
    parser.add_argument("--attempts", type=int, default=3, help="tries per call when a reply fails validation")
    parser.add_argument("--concurrency", type=int, default=4, help="items in flight at once")
    parser.add_argument("--retries", type=int, default=4, help="retries per request after a transport failure")
    parser.add_argument("--backoff", type=float, default=1.0, help="first backoff wait in seconds (doubles)")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds per request")
    parser.add_argument("--limit", type=int, default=None, help="annotate only the first N items")
    parser.add_argument("--cache-dir", default=None, help="reply cache (default: <out>/cache)")
    parser.add_argument("--overwrite", action="store_true", help="discard traces already in --out (keeps the cache)")
    parser.set_defaults(func=run)


def run(args) -> int:
    import logging

    from tqdm import tqdm

    from memreason.data import load_traces
    from memreason.data.annotate import AnnotateConfig, annotate
    from memreason.errors import ConfigError

    task = args.task
    if task is None and args.data.startswith("bundled:"):
        task = args.data.split(":", 1)[1]
    if task is None:
        raise ConfigError("pass --task (strategyqa, commonsenseqa, truthfulqa or freeform): the reply's answer is "
                          "checked against the gold answer in that task's answer space")
    config = AnnotateConfig(model=args.model, task=task, variant=args.variant, fill_knowledge=not args.no_knowledge,
                            min_memory=args.min_memory, min_reason=args.min_reason, max_steps=args.max_steps,
                            temperature=args.temperature, max_tokens=args.max_tokens, seed=args.seed,
                            response_format=args.response_format, attempts=args.attempts,
                            concurrency=args.concurrency, retries=args.retries, backoff=args.backoff,
                            timeout=args.timeout)
    traces, load_report = load_traces(args.data, task=task, split=args.split, on_unknown_tag=args.on_unknown_tag,
                                      skip_invalid=args.skip_invalid)
    if args.limit is not None:
        traces = traces[:args.limit]
    if not traces:
        raise ConfigError(f"no items in {args.data}" + (f" (split {args.split})" if args.split else ""))
    print(load_report.summary())
    # one INFO line per HTTP request from the openai client's transport would bury the progress bar
    for noisy in ("httpx2", "httpx", "openai"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, logging.getLogger().level))
    with tqdm(total=len(traces), desc="annotate", unit="item") as bar:
        report = annotate(traces, args.out, config, base_url=args.base_url, api_key=args.api_key,
                          cache_dir=args.cache_dir, overwrite=args.overwrite, progress=bar.update)
    print(report.summary())
    for row in report.rejected_items[:10]:
        print(f"  rejected {row['id']}: {row['reason']}")
    if len(report.rejected_items) > 10:
        print(f"  ... {len(report.rejected_items) - 10} more in {args.out}/rejected.jsonl")
    print(f"traces: {args.out}/traces.jsonl\nreport: {args.out}/report.json")
    return 0
