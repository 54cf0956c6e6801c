"""Revision of a model's own trace: exactness, batching, the three actions, injection at strength 0."""

import pytest

from conftest import build_tiny_reasoner
from memreason.errors import ConfigError
from memreason.evaluate import EvalSettings, evaluate, read_results
from memreason.interventions.revise import Edit, Injection, revise, revise_batch
from memreason.tasks import get_task

TASK = get_task("strategyqa")


def _results(reasoner, tmp_path):
    model, tokenizer, scheme, traces = reasoner
    settings = EvalSettings(model="tiny", task=TASK.name, source="tiny", split=None, prompt_style="plain",
                            scheme=scheme.to_dict(), max_new_tokens=80)
    evaluate(model, tokenizer, traces, TASK, settings, tmp_path, batch_size=3)
    results = read_results(tmp_path / "results.jsonl")
    assert all(r.steps for r in results), [r.raw for r in results]
    return results


@pytest.fixture(scope="module")
def compact(tiny_reasoner, tmp_path_factory):
    return tiny_reasoner, _results(tiny_reasoner, tmp_path_factory.mktemp("compact"))


def test_revising_a_step_with_its_own_text_reproduces_the_trace_token_for_token(compact):
    (model, tokenizer, scheme, _), results = compact
    for result in results:
        for i, step in enumerate(result.steps):
            again = revise(model, tokenizer, TASK, scheme, result, Edit(i, text=step.text), max_new_tokens=80)
            assert again.token_ids == result.token_ids and again.raw == result.raw
            assert again.predicted == result.predicted and again.outcome == result.outcome


def test_regenerating_from_a_step_with_no_edit_reproduces_the_greedy_trace(compact):
    (model, tokenizer, scheme, _), results = compact
    again = revise_batch(model, tokenizer, TASK, scheme, [(r, Edit(0, "regenerate")) for r in results],
                         max_new_tokens=80)
    assert [r.raw for r in again] == [r.raw for r in results]


def test_an_edit_keeps_every_earlier_step_and_records_its_provenance(compact):
    (model, tokenizer, scheme, _), results = compact
    result = results[0]
    last = len(result.steps) - 1
    edited = revise(model, tokenizer, TASK, scheme, result, Edit(last, text="Ice sinks in water.", kind="memory"),
                    max_new_tokens=80)
    assert edited.steps[:last] == result.steps[:last]
    assert edited.steps[last].text == "Ice sinks in water." and edited.steps[last].kind == "memory"
    assert edited.token_ids[:5] == result.token_ids[:5]
    revision = edited.extra["revision"]
    assert revision["step"] == last and revision["action"] == "replace"
    assert revision["old"] == {"kind": result.steps[last].kind, "text": result.steps[last].text}
    assert revision["new"] == {"kind": "memory", "text": "Ice sinks in water."}
    assert revision["of"]["id"] == result.id and revision["original"]["outcome"] == result.outcome
    assert edited.id == result.id and edited.prompt == result.prompt
    # the edited step is the user's, not the model's: no confidence; earlier steps keep theirs
    assert edited.step_confidence[last] is None
    assert list(edited.step_confidence[:last]) == list(result.step_confidence[:last])


def test_batched_revision_equals_one_row_at_a_time(compact):
    (model, tokenizer, scheme, _), results = compact
    edits = [(r, Edit(0, text="Water is wet.", kind="memory")) for r in results]
    batched = revise_batch(model, tokenizer, TASK, scheme, edits, max_new_tokens=80, batch_size=3)
    single = [revise(model, tokenizer, TASK, scheme, r, e, max_new_tokens=80) for r, e in edits]
    assert [r.token_ids for r in batched] == [r.token_ids for r in single]


def test_delete_removes_the_step_keeps_the_later_ones_and_answers_again(compact):
    (model, tokenizer, scheme, _), results = compact
    result = next(r for r in results if len(r.steps) >= 2)
    deleted = revise(model, tokenizer, TASK, scheme, result, Edit(0, "delete"), max_new_tokens=80)
    assert deleted.steps[:len(result.steps) - 1] == result.steps[1:]
    assert deleted.extra["revision"]["new"] is None


def test_injection_at_strength_zero_is_exactly_no_injection(compact):
    (model, tokenizer, scheme, _), results = compact
    edits = [(r, Edit(0, text="Paris is in France.", kind="memory")) for r in results]
    plain = revise_batch(model, tokenizer, TASK, scheme, edits, max_new_tokens=80)
    zero = revise_batch(model, tokenizer, TASK, scheme, edits, max_new_tokens=80,
                        injection=Injection(layer=1, tau=0.0, tau_mode="absolute"))
    assert [r.token_ids for r in zero] == [r.token_ids for r in plain]
    assert zero[0].extra["revision"]["injection"]["memory"] == "Paris is in France."
    strong = revise_batch(model, tokenizer, TASK, scheme, edits, max_new_tokens=80,
                          injection=Injection(layer=1, tau=50.0, tau_mode="absolute"))
    assert [r.token_ids for r in strong] != [r.token_ids for r in plain]


def test_bad_edits_are_one_clear_error(compact):
    (model, tokenizer, scheme, _), results = compact
    with pytest.raises(ConfigError, match="step 9 does not exist"):
        revise(model, tokenizer, TASK, scheme, results[0], Edit(9, text="x"))
    with pytest.raises(ConfigError, match="needs the new step text"):
        Edit(0, text=" ")
    with pytest.raises(ConfigError, match="takes no text"):
        Edit(0, "regenerate", text="x")
    with pytest.raises(ConfigError, match="control token"):
        revise(model, tokenizer, TASK, scheme, results[0], Edit(0, text="a <memory> b"))
    legacy = results[0].replace(prompt=None)
    with pytest.raises(ConfigError, match="no prompt"):
        revise(model, tokenizer, TASK, scheme, legacy, Edit(0, text="x"))


@pytest.mark.parametrize("style", ["paper", "plain"])
def test_every_token_scheme_revises_exactly(style, tmp_path):
    reasoner = build_tiny_reasoner(style)
    model, tokenizer, scheme, _ = reasoner
    results = _results(reasoner, tmp_path)
    result = results[0]
    again = revise(model, tokenizer, TASK, scheme, result, Edit(0, text=result.steps[0].text), max_new_tokens=80)
    assert again.raw == result.raw
    edited = revise(model, tokenizer, TASK, scheme, result, Edit(0, text="Rocks are heavy."), max_new_tokens=80)
    assert edited.steps[0].text == "Rocks are heavy."


def test_a_replaced_step_that_shares_its_first_characters_with_the_old_one_is_tokenised_afresh(compact):
    from memreason.model.tokens import format_step
    from memreason.traces import Step

    (model, tokenizer, scheme, _), results = compact
    result = results[0]
    new = Step(result.steps[0].kind, result.steps[0].text.split()[0] + " is heavy.")  # same first word
    edited = revise(model, tokenizer, TASK, scheme, result, Edit(0, text=new.text), max_new_tokens=80)
    fresh = tokenizer(format_step(new, scheme) + "\n", add_special_tokens=False)["input_ids"]
    assert list(edited.token_ids[:len(fresh)]) == fresh


def test_batched_injection_with_one_memory_per_row_equals_one_row_at_a_time(compact):
    (model, tokenizer, scheme, _), results = compact
    edits = [(r, Edit(0, text="Water is wet.", kind="memory")) for r in results]
    memories = [f"{name} is in France." for name in ("Paris", "Lyon", "Nice", "Lille", "Brest")][:len(edits)]
    injection = Injection(layer=1, tau=3.0, tau_mode="absolute")
    batched = revise_batch(model, tokenizer, TASK, scheme, edits, max_new_tokens=80, batch_size=2,
                           injection=injection, memories=memories)
    single = [revise_batch(model, tokenizer, TASK, scheme, [(r, e)], max_new_tokens=80, batch_size=1,
                           injection=injection, memories=[m])[0] for (r, e), m in zip(edits, memories)]
    assert [r.token_ids for r in batched] == [r.token_ids for r in single]
    assert [r.extra["revision"]["injection"]["memory"] for r in batched] == memories
    plain = revise_batch(model, tokenizer, TASK, scheme, edits, max_new_tokens=80)
    assert [r.token_ids for r in batched] != [r.token_ids for r in plain]  # the vectors did something
