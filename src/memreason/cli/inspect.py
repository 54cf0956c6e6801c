"""``memreason inspect``: look inside evaluated traces.

* ``attention``: teacher-force each generated trace (eager attention) and measure, per layer and head,
  the attention that answer-line, reason-step, memory-step and marker tokens put on memory steps, reason
  steps, markers, the question, the rest of the prompt and the first token; tables with bootstrap CIs
  over examples, a layer × span-kind heatmap, and a token heatmap for a chosen example, layer and head.
* ``errors``: for each wrong answer, is the first faulty step a memory step or a reasoning step? An LLM
  judge (any OpenAI-compatible endpoint) and/or an exact judge (a fact table or gold memory steps);
  shares with 95% CIs, per-example verdicts, and the judges' agreement (percent, Cohen's kappa).
* ``decoupling``: does each memory step state a fact and each reason step derive something?

Outputs go to --out (default: inspect/ beside the results), where `memreason report` finds them. Inputs are
only read: the results file and everything beside it stay byte for byte as they were.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

_EPILOG = """examples:
  memreason eval --model runs/demo/run --data bundled:strategyqa --split test --out results/demo
  memreason inspect attention --results results/demo/results.jsonl --run runs/demo/run
  memreason inspect attention --results results/demo/results.jsonl --example 4045bcd38bc0 --layer 3 --head 5
  export MEMREASON_API_KEY=...   # or OPENAI_API_KEY
  memreason inspect errors --results results/demo/results.jsonl --judge llm --model gpt-4o-mini
  memreason inspect errors --results results/demo/results.jsonl --judge exact --gold-data bundled:strategyqa
  memreason inspect decoupling --results results/demo/results.jsonl --judge llm --judge exact --facts facts.json \\
      --model my-model --base-url http://127.0.0.1:8000/v1
  memreason inspect errors --results runs/world/arms/tokens/test/results.jsonl --judge world --world runs/world/world
  memreason report --results results/demo/results.jsonl
re-running a judge resumes: judged rows are skipped and cached replies cost nothing."""


def register(subparsers) -> None:
    parser = subparsers.add_parser("inspect", help="attention per step kind, error attribution, decoupling",
                                   description=__doc__, epilog=_EPILOG,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
    actions = parser.add_subparsers(dest="action", metavar="<action>", required=True)

    attention = actions.add_parser("attention", help="attention mass per layer, head and span kind",
                                   epilog=_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    _common(attention)
    attention.add_argument("--run", default=None, help="the run directory or model that generated the results "
                           "(default: the model recorded in eval_config.json beside them)")
    attention.add_argument("--prompt-style", choices=["auto", "plain", "chat"], default=None,
                           help="results written before schema 2 only (they kept no prompt, so it is rebuilt): "
                           "default: the style recorded in eval_config.json")
    attention.add_argument("--data", default=None, help="results written before schema 2 only: dataset the "
                           "evaluation's worked examples came from (default: the source in eval_config.json)")
    attention.add_argument("--example", default=None, help="also draw a token heatmap for this example id")
    attention.add_argument("--layer", type=int, default=0, help="layer of the token heatmap (negative counts "
                           "from the end; default 0)")
    attention.add_argument("--head", type=int, default=0, help="head of the token heatmap (default 0)")
    attention.add_argument("--seed", type=int, default=0, help="bootstrap seed (default 0)")
    attention.add_argument("--device", default="auto")
    attention.add_argument("--dtype", default="float32", help="default float32: attention weights in full precision")
    attention.set_defaults(func=run_attention)

    for name, helptext in (("errors", "memory vs reasoning error attribution of wrong answers"),
                           ("decoupling", "do memory steps state facts and reason steps derive?")):
        action = actions.add_parser(name, help=helptext, epilog=_EPILOG,
                                    formatter_class=argparse.RawDescriptionHelpFormatter)
        _common(action)
        action.add_argument("--judge", action="append", choices=["llm", "exact", "world"], required=True,
                            help="repeat for both; with two judges their agreement is reported")
        action.add_argument("--model", default=None, help="LLM judge: model name at the endpoint")
        action.add_argument("--base-url", default=None, help="LLM judge: OpenAI-compatible base URL (default: "
                            "$MEMREASON_API_BASE, $OPENAI_BASE_URL, else OpenAI)")
        action.add_argument("--api-key", default=None, help="LLM judge: API key (default: $MEMREASON_API_KEY or "
                            "$OPENAI_API_KEY; prefer the environment)")
        action.add_argument("--seed", type=int, default=0, help="LLM judge: attempt k uses seed + k (default 0)")
        action.add_argument("--temperature", type=float, default=0.0)
        action.add_argument("--max-tokens", type=int, default=1024)
        action.add_argument("--attempts", type=int, default=3, help="tries per row when a reply fails validation")
        action.add_argument("--retries", type=int, default=4, help="retries per request after a transport failure")
        action.add_argument("--timeout", type=float, default=120.0, help="seconds per request")
        action.add_argument("--concurrency", type=int, default=4, help="rows judged at once")
        action.add_argument("--cache-dir", default=None, help="reply cache (default: <out>/judge-cache)")
        action.add_argument("--facts", default=None, help="exact judge: a fact table (JSON, format memreason-facts/1)")
        action.add_argument("--gold-data", default=None, help="exact judge: annotated dataset whose gold memory "
                            "steps are the facts of each question (matched by id), e.g. bundled:strategyqa")
        action.add_argument("--gold-split", default=None, help="split of --gold-data (default: the results' split)")
        action.add_argument("--threshold", type=float, default=0.8, help="exact judge: token overlap that matches")
        action.add_argument("--world", default=None, help="world judge: a synthetic world directory (or its "
                            "world.json) from `memreason world generate` / `world ablate`")
        if name == "errors":
            action.add_argument("--include-unparseable", action="store_true",
                                help="also judge answers that could not be read (default: wrong answers only)")
        action.add_argument("--overwrite", action="store_true", help="discard verdicts already in --out")
        action.set_defaults(func=run_judges, check=name)


def _common(parser) -> None:
    parser.add_argument("--results", required=True, help="results.jsonl written by `memreason eval`")
    parser.add_argument("--out", default=None, help="output directory (default: inspect/ beside the results)")
    parser.add_argument("--limit", type=int, default=None, help="only the first N result rows")


def _rows_and_config(args):
    """The result rows (``Result``), ``eval_config.json`` beside them (or None) and the checked output
    directory; nothing is written."""
    from memreason.cli._paths import check_writable
    from memreason.errors import DataError
    from memreason.evaluate import read_results
    from memreason.io import read_json

    results = Path(args.results)
    out = check_writable(Path(args.out) if args.out else results.parent / "inspect", directory=True)
    if not results.exists():
        raise DataError("results file not found", file=str(results))
    rows = read_results(results)
    if args.limit is not None:
        rows = rows[:args.limit]
    if not rows:
        raise DataError("no result rows", file=str(results))
    config_path = results.parent / "eval_config.json"
    config = read_json(config_path, what="eval_config.json") if config_path.is_file() else None
    if config is not None and not isinstance(config, dict):
        raise DataError("expected a JSON object (the settings of `memreason eval`)", file=str(config_path))
    return rows, config, out


# ---------------------------------------------------------------- attention

def _load_model(args, config):
    from memreason.analysis.attention import ensure_eager
    from memreason.errors import ConfigError
    from memreason.model import load
    from memreason.model.runs import is_run_dir, load_run

    name = args.run or (config or {}).get("model")
    if not name:
        raise ConfigError("no eval_config.json beside the results names the model; pass --run")
    if is_run_dir(name):
        model, tokenizer, info = load_run(name, dtype=args.dtype, device=args.device)
        ensure_eager(model)
        return model, tokenizer, str(name), info.prompt_style
    model, tokenizer = load(name, dtype=args.dtype, device=args.device, attn_implementation="eager")
    return model, tokenizer, str(name), None


def run_attention(args) -> int:
    from tqdm import tqdm

    from memreason.analysis import attention, attention_tables
    from memreason.analysis.plots import plot_layer_heatmap, plot_token_heatmap
    from memreason.cli._render import format_table
    from memreason.errors import ConfigError
    from memreason.io import atomic_write, read_json

    rows, config, out = _rows_and_config(args)
    index = None
    if args.example is not None:
        index = next((i for i, r in enumerate(rows) if str(r.id) == args.example), None)
        if index is None:
            raise ConfigError(f"no example with id {args.example!r} in {args.results}")
    if all(row.prompt is not None for row in rows) and (args.prompt_style or args.data):
        raise ConfigError("--prompt-style and --data rebuild the prompts of results written before schema 2; "
                          "these rows recorded the exact prompt they were given: leave the options out")
    model, tokenizer, name, run_style = _load_model(args, config)
    style = args.prompt_style or (None if config else run_style)
    prompts = attention.row_prompts(rows, config, tokenizer, prompt_style=style, data=args.data)
    meta = {"model": name, "results": str(args.results), "prompt_style": style or (config or {}).get("prompt_style")}
    with tqdm(total=len(rows), desc="attention", unit="ex") as bar:
        result = attention_tables.measure(model, tokenizer, rows, prompts, progress=bar.update, meta=meta)
    paths = attention_tables.save(result, out, seed=args.seed)
    layer_rows = attention_tables.read_table(paths["by_layer"])
    figure = plot_layer_heatmap(layer_rows, out / "attention_layers.png",
                                title=f"{Path(name).name}: attention by layer and span kind "
                                      f"({len(rows)} examples, mean over heads)")
    print(f"teacher-forced {len(rows)} examples through {name} "
          f"({result.n_layers} layers × {result.n_heads} heads)")
    summary = read_json(paths["summary"])
    table = [[r["query"], r["key"], f"{r['mean']:.3f}", f"[{r['ci_low']:.3f}, {r['ci_high']:.3f}]",
              f"{r['uniform']:.3f}", f"{r['enrichment']:.2f}", f"{r['n_seen']}/{r['n']}"]
             for r in summary["overall"] if r["query"] in ("answer", "reason", "step") and r["n_seen"] > 0]
    print("attention of answer-line / reason / unlabelled-step tokens on each span kind (mean over layers, heads "
          "and examples; enrichment = mass / uniform share of visible tokens; n = examples that see the kind / "
          "that have the query tokens):")
    print(format_table(["queries", "keys", "mass", "95% CI", "uniform", "enrichment", "n"], table))
    written = [paths["by_head"], paths["by_layer"], paths["examples"], paths["summary"], figure]
    if index is not None:
        example_row = rows[index]
        layer = args.layer % result.n_layers if -result.n_layers <= args.layer < result.n_layers else args.layer
        measured = attention.teacher_force(model, tokenizer, prompts[index], example_row.raw,
                                           question=example_row.question, keep=(layer, args.head))
        table = attention.token_table(measured, layer=layer, head=args.head, example_id=args.example)
        stem = f"attention_example_{args.example}_L{layer}_H{args.head}"
        atomic_write(out / f"{stem}.json", json.dumps(table))
        written += [out / f"{stem}.json", plot_token_heatmap(table, out / f"{stem}.png")]
    print("wrote:\n" + "\n".join(f"  {p}" for p in written))
    return 0


# ---------------------------------------------------------------- judges

def _judges(args, out: Path, config: dict | None):
    from memreason.analysis.exact_judge import ExactJudge, FactTable
    from memreason.analysis.judges import LLMJudge
    from memreason.errors import ConfigError

    judges = []
    for kind in dict.fromkeys(args.judge):  # each judge once, in the order given
        if kind == "llm":
            from memreason.llm import OpenAIChat, ResponseCache, resolve_endpoint

            if not args.model:
                raise ConfigError("the LLM judge needs --model (the model name at the endpoint)")
            base_url, api_key = resolve_endpoint(args.base_url, args.api_key)
            cache = ResponseCache(args.cache_dir or out / "judge-cache")
            judges.append(LLMJudge(OpenAIChat(base_url, api_key, timeout=args.timeout), args.model, seed=args.seed,
                                   temperature=args.temperature, max_tokens=args.max_tokens, attempts=args.attempts,
                                   retries=args.retries, cache=cache))
        elif kind == "world":
            from memreason.analysis.world_judge import WorldJudge

            if not args.world:
                raise ConfigError("the world judge needs --world (a directory written by `memreason world generate`)")
            judges.append(WorldJudge.load(args.world))
        else:
            if bool(args.facts) == bool(args.gold_data):
                raise ConfigError("the exact judge needs exactly one of --facts (a fact table) or --gold-data "
                                  "(an annotated dataset)")
            if args.facts:
                facts, source = FactTable.load(args.facts), str(args.facts)
            else:
                from memreason.data import load_traces

                split = args.gold_split or (config or {}).get("split")
                traces, _ = load_traces(args.gold_data, task=(config or {}).get("task"), split=split,
                                        on_unknown_tag="drop", skip_invalid=True)
                facts, source = FactTable.from_traces(traces), f"{args.gold_data} ({split or 'all splits'})"
            judges.append(ExactJudge(facts, threshold=args.threshold, source=source))
    return judges


def run_judges(args) -> int:
    from tqdm import tqdm

    from memreason.analysis.judges import judge_rows, select_rows, write_summary
    from memreason.cli._render import format_table

    rows, config, out = _rows_and_config(args)
    out.mkdir(parents=True, exist_ok=True)
    selected = select_rows(rows, args.check, include_unparseable=getattr(args, "include_unparseable", False))
    what = "wrong answers" if args.check == "errors" else "rows"
    print(f"{len(selected)} {what} of {len(rows)} to judge")
    judges = _judges(args, out, config)
    for judge in judges:
        with tqdm(total=len(selected), desc=f"{args.check}: {judge.name}", unit="row") as bar:
            judge_rows(selected, judge, args.check, out / f"{args.check}_{judge.name}.jsonl",
                       concurrency=args.concurrency, overwrite=args.overwrite, progress=bar.update)
        if getattr(judge, "requests", None) is not None:
            print(f"{judge.name}: {judge.requests} requests sent (the rest came from the cache)")
    summary = write_summary(out, args.check, {j.name: j.describe() for j in judges})
    pct = lambda s: "—" if s is None else f"{100 * s:.1f}%"  # noqa: E731
    ci = lambda c: "—" if not c or c[0] is None else f"[{100 * c[0]:.1f}, {100 * c[1]:.1f}]"  # noqa: E731
    table = []
    for name, entry in summary["judges"].items():
        s, status = entry["summary"], entry["summary"]["status"]
        if args.check == "errors":
            table.append([name, str(s["n"]), pct(s["memory"]["share"]), ci(s["memory"]["ci95"]),
                          pct(s["reason"]["share"]), ci(s["reason"]["ci95"]), str(status["not_applicable"]),
                          str(status["failed"])])
        else:
            table.append([name, str(s["memory"]["n_steps"]), pct(s["memory"]["share"]), ci(s["memory"]["ci95"]),
                          str(s["reason"]["n_steps"]), pct(s["reason"]["share"]), ci(s["reason"]["ci95"]),
                          str(s["unlabelled_steps"]), str(status["not_applicable"]), str(status["failed"])])
    if args.check == "errors":
        headers = ["judge", "judged", "memory errors", "95% CI", "reasoning errors", "95% CI", "not applicable",
                   "failed"]
    else:
        headers = ["judge", "memory steps", "state a fact", "95% CI", "reason steps", "derive", "95% CI",
                   "unlabelled steps", "not applicable", "failed"]
    print(format_table(headers, table))
    for pair, agree in summary["agreement"].items():
        kappa = "undefined" if agree["kappa"] is None else f"{agree['kappa']:.2f}"
        print(f"agreement {pair}: n={agree['n']}, {pct(agree['agreement']['share'])} agree, Cohen's kappa {kappa}")
    print(f"summary: {out / (args.check + '_summary.json')}")
    return 0
