"""The trace editor's model work (``memreason.serve.editor``) on the tiny reasoner: an answer is the row
`memreason eval` writes, a revision is ``revise_batch``'s, the inject switch injects instead of editing,
repairs take the source's correction, and what cannot be done is one clear HTTP-shaped error."""

import pytest
from serve_fixtures import ICE, FakeSource, tiny_editor

from memreason.errors import ConfigError
from memreason.evaluate import EvalSettings, evaluate, read_results
from memreason.interventions.revise import Edit, Injection, revise_batch
from memreason.serve import RequestError
from memreason.tasks import get_task

TASK = get_task("strategyqa")


@pytest.fixture(scope="module")
def editor(tiny_reasoner):
    return tiny_editor(tiny_reasoner, sources=[FakeSource("fake", {0: "Ice floats on water."}),
                                               FakeSource("down", {}, error="connection refused")])[1]


@pytest.fixture(scope="module")
def answered(editor):
    return editor.answer(ICE, gold="True")


def test_an_answer_is_the_row_memreason_eval_writes_for_the_question(tiny_reasoner, editor, answered, tmp_path):
    model, tokenizer, scheme, traces = tiny_reasoner
    settings = EvalSettings(model="tiny", task=TASK.name, source="tiny", split=None, prompt_style="plain",
                            scheme=scheme.to_dict(), max_new_tokens=80)
    evaluate(model, tokenizer, [traces[0]], TASK, settings, tmp_path, batch_size=1)
    expected = read_results(tmp_path / "results.jsonl")[0]
    assert traces[0].question == ICE
    assert (answered.prompt, answered.raw, answered.token_ids) == (expected.prompt, expected.raw, expected.token_ids)
    assert answered.step_confidence == expected.step_confidence and answered.step_confidence[0]["n_tokens"] > 0
    assert (answered.predicted, answered.gold, answered.outcome) == ("True", "True", "correct")
    assert [s.kind for s in answered.steps] == ["memory", "reason"]
    assert answered.id.startswith("ask-") and editor.answer(ICE).id == answered.id


def test_a_revision_is_revise_batchs_with_its_provenance(tiny_reasoner, editor, answered):
    model, tokenizer, scheme, _ = tiny_reasoner
    edit = Edit(0, text="Paris is the capital of France.", kind="memory")
    revised = editor.revise(answered, edit)
    expected = revise_batch(model, tokenizer, TASK, scheme, [(answered, edit)], max_new_tokens=80)[0]
    assert revised.token_ids == expected.token_ids and revised.raw == expected.raw
    assert revised.steps[0].text == "Paris is the capital of France."
    assert revised.extra["revision"]["old"] == {"kind": "memory", "text": "Ice is less dense than water."}
    assert revised.extra["revision"]["injection"] is None


def test_the_inject_switch_regenerates_the_step_with_the_memory_injected_instead_of_editing(tiny_reasoner, answered):
    model, tokenizer, scheme, _ = tiny_reasoner
    text = "Paris is the capital of France."
    _, strong = tiny_editor(tiny_reasoner, injection=Injection(layer=1, tau=50.0, tau_mode="absolute"))
    injected = strong.revise(answered, Edit(0, text=text, kind="memory"), inject=True)
    expected = revise_batch(model, tokenizer, TASK, scheme, [(answered, Edit(0, "regenerate"))], max_new_tokens=80,
                            injection=Injection(layer=1, tau=50.0, tau_mode="absolute", memory=text))[0]
    assert injected.token_ids == expected.token_ids
    assert injected.extra["revision"]["action"] == "regenerate"
    assert injected.extra["revision"]["injection"]["memory"] == text
    assert text not in injected.raw and injected.raw != answered.raw  # the vector changed it, not the text
    _, zero = tiny_editor(tiny_reasoner, injection=Injection(layer=1, tau=0.0, tau_mode="absolute"))
    assert zero.revise(answered, Edit(0, text=text), inject=True).raw == answered.raw  # strength 0: greedy again


def test_a_deleted_step_cannot_be_injected(editor, answered):
    with pytest.raises(RequestError) as caught:
        editor.revise(answered, Edit(0, "delete"), inject=True)
    assert caught.value.status == 400 and caught.value.param == "inject"


def test_repair_without_a_step_corrects_the_least_confident_memory_step_the_source_can(tiny_reasoner, answered):
    source = FakeSource("fake", {0: "Ice floats on water.", 2: "Ice is frozen water."})
    # three memory steps; the source can correct 0 and 2; step 2 is the least confident
    confidences = ({"mean": -0.5, "min": -1, "n_tokens": 3}, {"mean": -3.0, "min": -4, "n_tokens": 3},
                   {"mean": -2.0, "min": -3, "n_tokens": 3})
    raw = "<memory> A.\n<memory> B.\n<memory> C.\n<answer> The answer is: True"
    from memreason.model.tokens import parse

    row = answered.replace(raw=raw, token_ids=None, step_confidence=confidences,
                      trace=parse(raw, question=ICE, answer="True"))
    _, editor = tiny_editor(tiny_reasoner, sources=[source])
    correction, revised = editor.repair(row, "fake")
    assert source.asked == [1, 2] and correction.step == 2 and correction.text == "Ice is frozen water."
    assert revised.steps[:2] == row.steps[:2] and revised.steps[2].text == "Ice is frozen water."
    assert revised.extra["revision"]["step"] == 2


def test_repair_with_a_step_asks_only_for_it_and_says_422_when_the_source_has_nothing(editor, answered):
    correction, revised = editor.repair(answered, "fake", step=0)
    assert correction.text == "Ice floats on water." and revised.steps[0].text == "Ice floats on water."
    with pytest.raises(RequestError) as caught:
        editor.repair(answered, "fake", step=1)
    assert caught.value.status == 422 and caught.value.code == "no_correction" and caught.value.param == "step"


@pytest.mark.parametrize("source,status,code,param", [
    ("nope", 400, None, "source"),
    ("down", 502, "source_failed", None),
])
def test_a_missing_or_failing_source_is_one_clear_error(editor, answered, source, status, code, param):
    with pytest.raises(RequestError) as caught:
        editor.repair(answered, source, step=0)
    assert (caught.value.status, caught.value.code, caught.value.param) == (status, code, param)
    assert source in caught.value.message


def test_a_row_from_another_model_or_past_the_context_is_refused(tiny_reasoner, editor, answered):
    foreign = answered.replace(token_ids=answered.token_ids[:-1] + (10 ** 6,))
    with pytest.raises(RequestError) as caught:
        editor.revise(foreign, Edit(0, "regenerate"))
    assert caught.value.status == 400 and caught.value.param == "result.token_ids"
    _, short = tiny_editor(tiny_reasoner, max_context=40)
    with pytest.raises(RequestError) as caught:
        short.revise(answered, Edit(0, "regenerate"))
    assert caught.value.status == 413 and caught.value.code == "context_length_exceeded"


def test_bad_editor_settings_fail_at_start(tiny_reasoner):
    with pytest.raises(ConfigError, match="layers 0 to 1"):
        tiny_editor(tiny_reasoner, injection=Injection(layer=2, tau=0.2))
    with pytest.raises(ConfigError, match="both named 'x'"):
        tiny_editor(tiny_reasoner, sources=[FakeSource("x", {}), FakeSource("x", {})])
