"""``memreason annotate``: turn questions with gold answers into memory/reason traces with any
OpenAI-compatible chat model (the annotation agent, ``memreason.data.annotate``).

Settings come from ``--config FILE`` (keys of ``AnnotateJob``), then the flags given, then ``key=value``
overrides. Exit codes: 0 when the run did what it could (rejected replies are results), 1 when it annotated
none of the items it tried and the endpoint is why (one line says what to fix), 2 for a usage error."""

from __future__ import annotations

import argparse
import sys

from memreason.cli._settings import add_settings_arguments, settings_from_args

EXIT_ENDPOINT_FAILED = 1

FLAGS = ("data", "task", "split", "out", "model", "base_url", "variant", "min_memory", "min_reason", "max_steps",
         "temperature", "max_tokens", "seed", "response_format", "attempts", "concurrency", "retries", "backoff",
         "timeout", "limit", "cache_dir", "overwrite", "skip_invalid", "on_unknown_tag")
HELP = {
    "data": "questions with gold answers: .json (paper format), .jsonl, bundled:<name> or hf:<id or dir>[:config]; "
            "records without steps are fine (required)",
    "task": "strategyqa, commonsenseqa, truthfulqa or freeform: the answer space replies are checked in; "
            "bundled data knows its own",
    "split": "keep only records of this split (e.g. train)",
    "out": "output directory (required)",
    "model": "model name at the endpoint, e.g. gpt-4o (required)",
    "base_url": "OpenAI-compatible base URL (else $MEMREASON_API_BASE, $OPENAI_BASE_URL, else OpenAI)",
    "variant": "free, or ordered: all memory steps before the first reason step",
    "min_memory": "fewest memory steps per trace", "min_reason": "fewest reason steps per trace",
    "max_tokens": "reply length cap per call", "seed": "attempt k of each call uses seed + k",
    "response_format": "auto: send a JSON schema, drop it if the endpoint refuses it; json_schema; none",
    "attempts": "tries per call when a reply fails validation", "concurrency": "items in flight at once",
    "retries": "retries per request after a transport failure",
    "backoff": "first backoff wait in seconds (doubles, with jitter)", "timeout": "seconds per request",
    "limit": "annotate only the first N items", "cache_dir": "reply cache (None: <out>/cache)",
    "overwrite": "discard traces already in --out (keeps the cache)",
    "skip_invalid": "skip malformed records and report counts instead of stopping at the first",
    "on_unknown_tag": "error or drop a step whose tag is not a known memory/reason spelling",
}


def register(subparsers) -> None:
    from memreason.data.annotate import AnnotateJob

    parser = subparsers.add_parser(
        "annotate", help="write memory/reason steps for a dataset with an LLM endpoint", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n"
               "  export OPENAI_API_KEY=...   # or MEMREASON_API_KEY; keep keys off shared command lines\n"
               "  memreason annotate --data bundled:strategyqa --split train --model gpt-4o --out data/sqa-gpt4o\n"
               "  memreason serve --model ./my-model --port 8000 &\n"
               "  memreason annotate --data questions.jsonl --task freeform --base-url http://127.0.0.1:8000/v1 "
               "--model my-model --variant ordered --out data/mine\n"
               "  memreason annotate --config annotate.yaml --out data/try concurrency=8 max_retry_time=60\n"
               "re-running the same command resumes: finished items are skipped and cached replies cost nothing.\n"
               "outputs: traces.jsonl (one Trace per line), rejected.jsonl, report.json, annotate_config.json, cache/")
    add_settings_arguments(parser, AnnotateJob, FLAGS, HELP)
    parser.add_argument("--no-knowledge", dest="set_fill_knowledge", action="store_const", const="false",
                        default=argparse.SUPPRESS,
                        help="skip the knowledge call; memory steps keep the planner's own text")
    parser.add_argument("--api-key", default=None, help="API key (default: $MEMREASON_API_KEY or $OPENAI_API_KEY; "
                        "prefer the environment: command lines are visible to other users); never a setting")
    parser.set_defaults(func=run)


def run(args) -> int:
    import logging

    from tqdm import tqdm

    from memreason.data.annotate import REJECTED_FILE, REPORT_FILE, TRACES_FILE, AnnotateJob, run_job

    job = settings_from_args(AnnotateJob, args)
    # one INFO line per HTTP request from the openai client's transport would bury the progress bar
    for noisy in ("httpx2", "httpx", "openai"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, logging.getLogger().level))
    bars = []  # drawn once the data is loaded, so an early error is the only line on stderr

    def start(load_report, total: int) -> None:
        print(load_report.summary())
        bars.append(tqdm(total=total, desc="annotate", unit="item"))

    try:
        report = run_job(job, api_key=args.api_key, progress=lambda n: bars[0].update(n), on_start=start)
    finally:
        for bar in bars:
            bar.close()
    print(report.summary())
    for row in report.rejected_items[:10]:
        print(f"  rejected {row['id']}: {row['reason']}")
    if len(report.rejected_items) > 10:
        print(f"  ... {len(report.rejected_items) - 10} more in {job.out}/{REJECTED_FILE}")
    print(f"traces: {job.out}/{TRACES_FILE}\nreport: {job.out}/{REPORT_FILE}")
    failure = report.failure()
    if failure:
        print(f"memreason annotate: error: {failure}", file=sys.stderr)
        return EXIT_ENDPOINT_FAILED
    return 0
