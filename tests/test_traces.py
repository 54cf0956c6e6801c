import pytest
from hypothesis import given
from hypothesis import strategies as st

from memreason.traces import (MEMORY, REASON, TAG_TABLE, Step, Trace, UnknownTagError,
                              normalise_kind, parse_tagged_step)

EXPECTED = {"rag": MEMORY, "memory": MEMORY, "knowledge": MEMORY, "factual knowledge": MEMORY, "fact": MEMORY,
            "factual": MEMORY, "reason": REASON, "reasoning": REASON}


def test_tag_table_is_exactly_the_documented_table():
    assert dict(TAG_TABLE) == EXPECTED


@pytest.mark.parametrize("tag,kind", sorted(EXPECTED.items()))
def test_every_tag_maps_in_any_case(tag, kind):
    assert normalise_kind(tag) == kind
    assert normalise_kind(tag.upper()) == kind
    assert normalise_kind(tag.title()) == kind
    assert normalise_kind(f"  {tag}  ") == kind


@pytest.mark.parametrize("tag", ["rak", "reason] [rag", "", "think", "memories", "reasons"])
def test_unknown_tag_raises_and_names_it(tag):
    with pytest.raises(UnknownTagError) as info:
        normalise_kind(tag)
    assert f"[{tag}]" in str(info.value)


def test_step_rejects_alias_kinds():
    with pytest.raises(ValueError):
        Step("rag", "x")


def test_parse_tagged_step_keeps_text_and_rejects_untagged():
    assert parse_tagged_step("[rag]: Paris is in France.") == ("rag", "Paris is in France.")
    assert parse_tagged_step("[Factual Knowledge] : spaced") == ("Factual Knowledge", "spaced")
    with pytest.raises(ValueError):
        parse_tagged_step("no tag here")
    with pytest.raises(ValueError):
        parse_tagged_step("[reason] [rag]: nested")


texts = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\n\r"), min_size=1).map(str.strip).filter(bool)


@given(kind=st.sampled_from([MEMORY, REASON]), text=texts)
def test_tagged_step_format_parse_round_trip(kind, text):
    tag, parsed = parse_tagged_step(f"[{'rag' if kind == MEMORY else 'reason'}]: {text}")
    assert Step(normalise_kind(tag), parsed) == Step(kind, text)


@given(steps=st.lists(st.builds(Step, st.sampled_from([MEMORY, REASON]), texts), max_size=6),
       question=texts, answer=st.one_of(st.none(), texts))
def test_trace_dict_round_trip(steps, question, answer):
    trace = Trace(question, tuple(steps), answer, meta={"id": "x1"})
    again = Trace.from_dict(trace.to_dict())
    assert again == trace and again.meta == trace.meta


def test_trace_counts_and_kinds():
    trace = Trace("q", [Step(MEMORY, "a"), Step(REASON, "b"), Step(MEMORY, "c")], "True")
    assert trace.kinds() == (MEMORY, REASON, MEMORY)
    assert trace.count(MEMORY) == 2 and trace.count(REASON) == 1
    assert isinstance(trace.steps, tuple)
