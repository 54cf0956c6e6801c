"""Tests of memreason.experiments.world_repair and `memreason world repair`: on a tiny world (a tiny random
Llama, seconds per arm) the benchmark runs end to end on the ablation's own arms; every method edits the
located step as documented (the true fact, another false fact of the same relation, a paraphrase of a true
recall), the table and the confidence tables are those of the rows, and a re-run resumes."""

from __future__ import annotations

import csv
import json

import pytest
import torch

from conftest import build_tiny_model, build_tiny_tokenizer
from memreason.analysis.world_judge import FALSE, TRUE
from memreason.cli import main as cli_main
from memreason.corrections import WorldSource
from memreason.data.world import NO, RELATIONS, YES, generate_world
from memreason.errors import ConfigError
from memreason.experiments.world_ablation import load_ablation, run_ablation
from memreason.experiments.world_repair import METHODS, load_world_repair
from memreason.traces import MEMORY, Result, Step, Trace

TINY = ["world.n_people=4", "world.n_cities=3", "world.n_countries=3", "world.n_organisations=3",
        "world.n_train=12", "world.n_test=4", "world.n_heldout=2", "world.mentions=1", "world.max_hops=2",
        "knowledge_steps=2", "knowledge_batch=4", "reason_steps=2", "reason_batch=4", "val_size=2",
        "max_new_tokens=6", "eval_batch=8", "device=cpu", "arms=tokens,plain_cot"]
BENCH = ["repair.arms=tokens,plain_cot", "repair.dev_questions=2", "repair.layers=[0]", "repair.bootstrap=50"]
FALSE_MEAN, TRUE_MEAN = -3.0, -0.5


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _flip(trace: Trace) -> str:
    return {YES: NO, NO: YES}.get(trace.answer) or ("A" if trace.answer != "A" else "B")


def designed_rows(world, reasoner) -> list[Result]:
    """The test split as if the arm had answered it: even questions with their first recall made false (and
    the answer flipped), odd ones as the gold trace; false recalls least confident. (Their text is longer
    than the tiny budget of max_new_tokens=6, so a revision keeps its forced text and generates nothing:
    generation after an edit is tested on a trained tiny model in test_repair.py; here, what each method
    edits, the tables and resumption are.)"""
    from memreason.model.tokens import format_target, parse
    from memreason.prompts import render_prompt

    rows = []
    for k, gold in enumerate(world.questions["test"]):
        steps, predicted, wrong = list(gold.steps), gold.answer, k % 2 == 0
        if wrong:
            fact = world.facts[gold.meta["step_facts"][0][0]]
            other = next(n for n in world.names_of(RELATIONS[fact.relation].object) if n != fact.object)
            steps[0] = Step(MEMORY, RELATIONS[fact.relation].templates[0].format(s=fact.subject, o=other))
            predicted = _flip(gold)
        raw = format_target(Trace(gold.question, tuple(steps), predicted), reasoner.scheme)
        parsed = parse(raw).steps
        confidence = [{"mean": FALSE_MEAN if wrong and i == 0 else TRUE_MEAN if s.kind == MEMORY or i < 2 else -1.0,
                       "min": -5.0, "n_tokens": 3} for i, s in enumerate(parsed)]
        rows.append(Result(trace=Trace(gold.question, parsed, predicted, meta={"id": gold.id}), gold=gold.answer,
                           outcome="wrong" if wrong else "correct", raw=raw, task="freeform",
                           prompt=render_prompt(gold.question, reasoner.task, reasoner.tokenizer, "plain"),
                           token_ids=tuple(reasoner.tokenizer(raw, add_special_tokens=False)["input_ids"]),
                           step_confidence=tuple(confidence)))
    return rows


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    import memreason

    base = tmp_path_factory.mktemp("world-repair")
    tokenizer = build_tiny_tokenizer()
    build_tiny_model(len(tokenizer)).save_pretrained(base / "tiny")
    tokenizer.save_pretrained(base / "tiny")
    overrides = TINY + [f"model={base / 'tiny'}"]
    out = base / "ablate"
    cfg = load_ablation(None, overrides)
    run_ablation(cfg, out, progress=False)
    world = generate_world(cfg.world)
    designed = {}
    for arm in ("tokens", "plain_cot"):
        reasoner = memreason.load(str(out / "arms" / arm / "run"), task="freeform", device="cpu")
        designed[arm] = designed_rows(world, reasoner)
        path = out / "arms" / arm / "test" / "results.jsonl"
        path.write_text("".join(json.dumps(r.to_dict()) + "\n" for r in designed[arm]))
    assert cli_main(["world", "repair", "--out", str(out), "--no-progress", *overrides, *BENCH]) == 0
    return {"out": out, "world": world, "designed": designed, "overrides": overrides,
            "summary": json.loads((out / "repair" / "summary.json").read_text())}


def _rows(out, arm, method):
    from memreason.evaluate import read_results

    return read_results(out / "repair" / arm / "test" / f"{method}.jsonl")


def test_every_method_edits_the_located_step_as_documented(bench):
    source = WorldSource(bench["out"] / "world")
    n_wrong = sum(k % 2 == 0 for k in range(len(bench["world"].questions["test"])))
    for arm, designed in bench["designed"].items():
        originals = {r.id: r for r in designed}
        for method in ("text", "wrong_fact", "paraphrase"):
            rows = _rows(bench["out"], arm, method)
            assert len(rows) == (len(designed) - n_wrong if method == "paraphrase" else n_wrong), (arm, method)
            for row in rows:
                revision, original = row.extra["revision"], originals[row.id]
                old = source.claim(revision["old"]["text"])
                new = source.claim(revision["new"]["text"])
                assert revision["step"] == 0 and revision["new"]["kind"] == original.steps[0].kind
                if method == "text":  # the true fact in the world's wording
                    assert old.status == FALSE and new.status == TRUE and new.claim[:2] == old.claim[:2]
                elif method == "wrong_fact":  # another false object of the same relation
                    assert new.status == FALSE and new.claim[:2] == old.claim[:2]
                    truth = source.true_object(*old.claim[:2])
                    assert new.claim[2] not in (old.claim[2], truth)
                else:  # the same true fact in another wording
                    assert old.status == new.status == TRUE and new.fact_id == old.fact_id
                    assert revision["new"]["text"] != revision["old"]["text"]
        for method in ("regenerate", "inject"):
            rows = _rows(bench["out"], arm, method)
            assert [r.extra["revision"]["action"] for r in rows] == ["regenerate"] * n_wrong
        injected = _rows(bench["out"], arm, "inject")[0].extra["revision"]["injection"]
        assert injected["layer"] == 0 and injected["memory"] == _rows(bench["out"], arm, "text")[0].extra[
            "revision"]["new"]["text"]


def test_the_table_and_the_confidence_tables_are_those_of_the_rows(bench):
    summary, out = bench["summary"], bench["out"]
    with open(out / "repair" / "table.csv", newline="") as handle:
        table = list(csv.DictReader(handle))
    assert [(r["arm"], r["method"]) for r in table] == [(a, m) for a in ("tokens", "plain_cot") for m in METHODS]
    for row in summary["rows"]:
        revised = _rows(out, row["arm"], row["method"])
        before = {r.id: r.outcome for r in bench["designed"][row["arm"]]}
        flipped = sum((r.outcome == "correct") != (before[r.id] == "correct") for r in revised)
        assert (row["n"], row["count"]) == (len(revised), flipped)
        assert row["measures"] == ("break" if row["method"] == "paraphrase" else "fix")
        assert (row["vs_regenerate_p"] is None) == (row["method"] in ("regenerate", "paraphrase"))
    n = len(bench["world"].questions["test"])
    for arm, result in summary["arms"].items():
        split = result["splits"]["test"]
        assert split["counts"]["correctable"] == split["counts"]["wrong"] == (n + 1) // 2
        auroc = split["auroc"]["mean"]
        assert auroc["auroc"] == 1.0 and auroc["n_positive"] == (n + 1) // 2 and auroc["n_clusters"] == n
        coverage = {c["coverage"]: c for c in split["coverage"]}
        assert coverage[1.0]["accuracy"] == pytest.approx(n // 2 / n)
        assert coverage[0.5]["answered"] == n // 2 and coverage[0.5]["accuracy"] == 1.0  # the unsure abstain
        assert result["sweep"]["chosen"]["layer"] == 0
        assert (out / "repair" / arm / "dev" / "sweep.json").is_file()


def test_a_rerun_resumes_and_other_benchmark_settings_are_refused(bench, capsys):
    out, overrides = bench["out"], bench["overrides"]
    files = {p: p.stat().st_mtime_ns for p in (out / "repair").glob("*/test/*.jsonl")}
    assert cli_main(["world", "repair", "--out", str(out), "--no-progress", *overrides, *BENCH]) == 0
    printed = capsys.readouterr().out
    assert "step confidence finding false recalls" in printed and "wrong_fact" in printed
    assert {p: p.stat().st_mtime_ns for p in files} == files
    assert json.loads((out / "repair" / "summary.json").read_text())["rows"] == bench["summary"]["rows"]
    assert cli_main(["world", "repair", "--out", str(out), *overrides, *BENCH, "repair.taus=[0.4]"]) == 2
    assert "different settings" in capsys.readouterr().err


def test_benchmark_settings_errors_are_one_clear_line():
    with pytest.raises(ConfigError, match="direct answers have no steps"):
        load_world_repair(None, ["repair.arms=direct"])
    with pytest.raises(ConfigError, match="not among the ablation's arms"):
        load_world_repair(None, ["arms=tokens", "repair.arms=plain_cot"])
    with pytest.raises(ConfigError, match="did you mean"):
        load_world_repair(None, ["repair.tau=0.3"])
