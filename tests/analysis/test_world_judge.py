"""Tests of memreason.analysis.world_judge: every gold trace checks out, planted false facts, unknown
entities and invalid derivations are caught at the right step with the right error class, and the judge
plugs into judge_rows / summarise_errors like the other judges."""

from __future__ import annotations

import dataclasses

import pytest

from memreason.analysis import judges as J
from memreason.analysis.world_judge import FALSE, INVALID, TRUE, UNKNOWN_ENTITY, VALID, WorldJudge
from memreason.data.world import RELATIONS, SPLITS, WorldConfig, generate_world, write_world
from memreason.traces import MEMORY, REASON, Result, Step


@pytest.fixture(scope="module")
def world():
    return generate_world(WorldConfig(seed=1))


@pytest.fixture(scope="module")
def judge(world, tmp_path_factory):
    directory = tmp_path_factory.mktemp("world")
    write_world(world, directory)
    return WorldJudge.load(directory)


def _first(world, form, hops=2):
    return next(t for t in world.questions["train"] if t.meta["form"] == form and len(t.meta["path"]) == hops)


def _gold(trace) -> Result:
    """A gold Trace as a result row (its own answer as the prediction), for checking gold traces."""
    return Result(trace=trace, gold=trace.answer, outcome="correct")


def _with_steps(row: Result, steps) -> Result:
    return row.replace(trace=dataclasses.replace(row.trace, steps=tuple(steps)))


def _relabel(row: Result, kinds) -> Result:
    return _with_steps(row, (Step(kind, step.text) for kind, step in zip(kinds, row.steps)))


def _wrong(trace, replace: dict[int, str], predicted=None) -> Result:
    """A wrong-answer row built from a gold trace with some step texts replaced."""
    steps = [Step(step.kind, replace.get(index, step.text)) for index, step in enumerate(trace.steps)]
    predicted = predicted or ("No" if trace.answer == "Yes" else "Yes" if trace.answer == "No" else "A")
    return Result(trace=dataclasses.replace(trace, steps=tuple(steps), answer=predicted), gold=trace.answer,
                  outcome="wrong")


def _other(world, name):
    return next(n for n in world.names_of(world.entities[name]) if n != name)


def test_every_gold_trace_in_every_split_checks_out_step_by_step(world, judge):
    for split in SPLITS:
        for trace in world.questions[split]:
            row = _gold(trace)
            checks = judge.check_steps(row)
            assert [c.type for c in checks] == [s.kind for s in trace.steps], trace.question
            assert all(c.ok for c in checks) and judge.answer_follows(row), trace.question
            ids = [c.fact_id for c in checks if c.type == MEMORY]
            assert ids == [l[0] for s, l in zip(trace.steps, trace.meta["step_facts"]) if s.kind == MEMORY]


def test_every_paraphrase_of_every_fact_reads_as_that_true_fact(world, judge):
    for fact in world.facts.values():
        for k in range(len(RELATIONS[fact.relation].templates)):
            check = judge.check_memory(fact.text(k))
            assert (check.status, check.fact_id) == (TRUE, fact.id), fact.text(k)


def test_a_planted_false_fact_is_a_memory_error_at_its_step(world, judge):
    trace = _first(world, "choice")
    fact = world.facts[trace.meta["step_facts"][1][0]]
    wrong = fact.text(0).replace(fact.object, _other(world, fact.object))
    verdict = judge.attribute_error(_wrong(trace, {1: wrong}))
    assert (verdict.source, verdict.first_faulty) == (MEMORY, 1)
    assert judge.check_memory(wrong).status == FALSE
    # the chain step that follows validly from the false fact is not blamed, but it no longer matches the
    # conclusion written in the gold trace, so it is faulty too; only the first faulty step counts
    assert verdict.step_correct[0] is True and verdict.step_correct[1] is False


def test_an_unknown_entity_is_a_memory_error(world, judge):
    trace = _first(world, "yes_no")
    fact = world.facts[trace.meta["step_facts"][0][0]]
    invented = fact.text(0).replace(fact.object, "Qwerty Zzyx")
    assert judge.check_memory(invented).status == UNKNOWN_ENTITY
    verdict = judge.attribute_error(_wrong(trace, {0: invented}))
    assert (verdict.source, verdict.first_faulty) == (MEMORY, 0)


def test_a_valid_inference_from_a_false_fact_is_not_a_reasoning_error(world, judge):
    trace = _first(world, "choice")
    first, second = (world.facts[l[0]] for l in trace.meta["step_facts"][:2])
    fake = _other(world, second.object)
    row = _wrong(trace, {1: second.text(0).replace(second.object, fake),
                         2: trace.steps[2].text.replace(second.object, fake)})
    checks = judge.check_steps(row)
    assert checks[1].status == FALSE and checks[2].status == VALID


def test_a_planted_invalid_chain_derivation_is_a_reasoning_error(world, judge):
    trace = _first(world, "choice")
    obj = world.facts[trace.meta["step_facts"][1][0]].object
    bad_chain = trace.steps[2].text.replace(obj, _other(world, obj))
    verdict = judge.attribute_error(_wrong(trace, {2: bad_chain}))
    assert (verdict.source, verdict.first_faulty) == (REASON, 2)
    assert "lead to" in verdict.explanation


@pytest.mark.parametrize("form", ["yes_no", "choice", "comparison"])
def test_a_planted_invalid_decision_is_a_reasoning_error(world, judge, form):
    trace = _first(world, form)
    last = trace.steps[-1].text
    flipped = {"yes_no": lambda t: t.replace(", so yes", ", so no") if "so yes" in t else t.replace(", so no", ", so yes"),
               "choice": lambda t: t[:-2] + ("B." if not t.endswith("B.") else "A."),
               "comparison": lambda t: t.replace("are the same, so yes", "differ, so no") if "same" in t
               else t.replace("differ, so no", "are the same, so yes")}[form](last)
    assert flipped != last
    verdict = judge.attribute_error(_wrong(trace, {len(trace.steps) - 1: flipped}))
    assert (verdict.source, verdict.first_faulty) == (REASON, len(trace.steps) - 1)
    assert judge.check_steps(_wrong(trace, {len(trace.steps) - 1: flipped}))[-1].status == INVALID


def test_a_missing_recall_makes_the_chain_unsupported(world, judge):
    trace = _first(world, "yes_no")
    row = _wrong(trace, {})
    row = _with_steps(row, row.steps[:1] + row.steps[2:])  # the second hop is never stated
    verdict = judge.attribute_error(row)
    assert (verdict.source, verdict.first_faulty) == (REASON, 1) and "no earlier step states" in verdict.explanation


def test_sound_steps_with_a_contradicting_answer_line_is_a_reasoning_error_at_the_answer(world, judge):
    trace = _first(world, "yes_no")
    verdict = judge.attribute_error(_wrong(trace, {}))
    assert (verdict.source, verdict.first_faulty) == (REASON, None) and "answer line" in verdict.explanation


def test_step_type_comes_from_content_so_unlabelled_and_mislabelled_steps_are_judged(world, judge):
    trace = _first(world, "choice")
    fact = world.facts[trace.meta["step_facts"][0][0]]
    row = _wrong(trace, {0: fact.text(0).replace(fact.object, _other(world, fact.object))})
    n = len(row.steps)
    row = _relabel(row, ["step"] * n)
    assert judge.attribute_error(row).source == MEMORY
    row = _relabel(row, [REASON] + ["step"] * (n - 1))  # a recall labelled as reasoning
    assert judge.attribute_error(row).source == MEMORY
    decoupling = judge.check_decoupling(row)
    assert decoupling.forms[0] == "fact" and decoupling.decoupled[0] is False and decoupling.decoupled[1] is None


def test_unreadable_unlabelled_steps_and_foreign_questions_are_not_applicable(world, judge):
    trace = _first(world, "choice")
    row = _wrong(trace, {0: "I think about it."})
    kinds = [step.kind for step in row.steps]
    row = _relabel(row, ["step"] + kinds[1:])
    with pytest.raises(J.NotApplicable):
        judge.attribute_error(row)
    row = _relabel(row, [MEMORY] + kinds[1:])  # labelled: the unreadable memory step is the memory error
    assert judge.attribute_error(row).source == MEMORY
    with pytest.raises(J.NotApplicable):
        judge.attribute_error(row.replace(trace=dataclasses.replace(row.trace, meta={"id": "not-in-this-world"})))


def test_the_world_judge_runs_through_judge_rows_and_summaries(world, judge, tmp_path):
    trace = _first(world, "choice")
    fact = world.facts[trace.meta["step_facts"][0][0]]
    rows = [_wrong(trace, {0: fact.text(0).replace(fact.object, _other(world, fact.object))}),
            _with_steps(_wrong(_first(world, "yes_no"), {}), ())]
    verdicts = J.judge_rows(rows, judge, J.ERRORS, tmp_path / "errors_world.jsonl")
    summary = J.summarise_errors(verdicts)
    assert summary["n"] == 1 and summary["memory"]["count"] == 1
    assert summary["status"] == {"ok": 1, "not_applicable": 1, "failed": 0}


def test_inspect_errors_cli_runs_the_world_judge_beside_the_generic_exact_judge(world, tmp_path, capsys):
    import json

    from memreason.cli import main

    write_world(world, tmp_path / "world")
    choice = _first(world, "choice")
    fact = world.facts[choice.meta["step_facts"][0][0]]
    memory_error = _wrong(choice, {0: fact.text(0).replace(fact.object, _other(world, fact.object))})
    reason_error = _wrong(_first(world, "yes_no"), {})
    results = tmp_path / "eval" / "results.jsonl"
    results.parent.mkdir()
    results.write_text("".join(json.dumps(r.to_dict()) + "\n" for r in (memory_error, reason_error)))
    assert main(["inspect", "errors", "--results", str(results), "--judge", "world"]) == 2
    assert "--world" in capsys.readouterr().err
    assert main(["inspect", "errors", "--results", str(results), "--judge", "world", "--world",
                 str(tmp_path / "world"), "--judge", "exact", "--facts", str(tmp_path / "world" / "facts.json")]) == 0
    summary = json.loads((tmp_path / "eval" / "inspect" / "errors_summary.json").read_text())
    world_summary = summary["judges"]["world"]["summary"]
    assert (world_summary["memory"]["count"], world_summary["reason"]["count"]) == (1, 1)
    # the generic exact judge reads the same world's fact table and agrees on both rows
    assert summary["agreement"]["exact vs world"]["agreement"]["share"] == 1.0


def test_a_chain_stated_as_one_recall_is_a_composite_memory_step_judged_against_the_world(world, judge):
    trace = _first(world, "choice")
    subject, path = trace.meta["subjects"][0], trace.meta["path"]
    truth = world.facts[trace.meta["step_facts"][len(path) - 1][0]].object
    chain = trace.steps[len(path)].text[len("So "):]                      # "the <chain> of X is Y."
    composite = chain[0].upper() + chain[1:]
    assert judge.check_composite(composite).status == TRUE
    false = composite.replace(truth, _other(world, truth))
    assert judge.check_composite(false).status == FALSE
    # unlabelled, it is still judged: a memory error, where it used to be unreadable
    row = _wrong(trace, {0: false})
    row = _relabel(row, ["step"] * len(row.steps))
    assert (judge.attribute_error(row).source, judge.attribute_error(row).first_faulty) == (MEMORY, 0)
    # a chain step may build on a stated composite recall instead of the single hops
    row = _with_steps(_gold(trace), (Step(MEMORY, composite),) + trace.steps[len(path):])
    assert judge.answer_follows(row)
    assert subject in composite
