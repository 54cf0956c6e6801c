"""``memreason report``: one self-contained HTML page about an evaluation (summary with CIs, judge verdicts,
attention figures, and every example with its memory and reason steps coloured, filterable by outcome
and text). Open it in any browser; nothing is fetched from the network. The results file and everything read
beside it stay byte for byte as they were; only the page is written."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "report", help="write a self-contained HTML report of an evaluation", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n  memreason report --results results/demo/results.jsonl\n"
               "  memreason report --results results/demo/results.jsonl --inspect results/demo/inspect "
               "--out demo.html --title 'SmolLM2 on StrategyQA'\n"
               "  xdg-open results/demo/report.html\n"
               "judge verdicts and attention figures appear when `memreason inspect` wrote them (default: inspect/ "
               "beside the results).")
    parser.add_argument("--results", required=True, help="results.jsonl written by `memreason eval`")
    parser.add_argument("--inspect", default=None, help="directory written by `memreason inspect` "
                        "(default: inspect/ beside the results)")
    parser.add_argument("--out", default=None, help="the HTML file (default: report.html beside the results)")
    parser.add_argument("--title", default=None)
    parser.set_defaults(func=run)


def run(args) -> int:
    from memreason.analysis.report import report_from_files, write_report
    from memreason.cli._paths import check_writable
    from memreason.errors import ConfigError

    results = Path(args.results)
    out = check_writable(Path(args.out) if args.out else results.parent / "report.html", directory=False)
    if out.exists() and results.exists() and out.samefile(results):
        raise ConfigError(f"--out {out} is the results file; a report never overwrites what it reads")
    page = report_from_files(results, inspect_dir=args.inspect, title=args.title)
    write_report(page, out)
    print(f"report: {out} ({len(page) // 1024} KiB); open it in a browser")
    return 0
