import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from memreason.errors import ConfigError
from memreason.model.tokens import (TokenScheme, add_scheme_tokens, count_markers, format_step, format_target,
                                    has_marker, init_word, parse, spans, step_spans)
from memreason.traces import MEMORY, REASON, UNLABELLED, Step, Trace

# Step texts as a formatted target can carry them: one line, no surrounding whitespace, no marker.
_text = (st.text(alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="\n<>"), max_size=40)
         .map(str.strip))
_labelled_steps = st.lists(st.builds(Step, st.sampled_from([MEMORY, REASON]), _text), max_size=6)
_answers = st.sampled_from(["True", "False", "A", "M", "Paris"])


def _trace(steps, answer="True"):
    return Trace(question="Is it?", steps=tuple(steps), answer=answer)


@pytest.mark.parametrize("scheme", [TokenScheme(), TokenScheme("paper", 1, 1), TokenScheme("paper", 0, 2),
                                    TokenScheme("compact")], ids=["paper-3-4", "paper-1-1", "paper-0-2", "compact"])
@settings(max_examples=60, deadline=None)
@given(steps=_labelled_steps, answer=_answers)
def test_labelled_schemes_round_trip_exactly(scheme, steps, answer):
    trace = _trace(steps, answer)
    assert parse(format_target(trace, scheme), question=trace.question, answer=answer) == trace


@settings(max_examples=60, deadline=None)
@given(steps=st.lists(st.builds(Step, st.sampled_from([MEMORY, REASON]), _text.filter(bool)), max_size=6))
def test_zero_special_tokens_keeps_the_steps_but_not_their_kinds(steps):
    scheme = TokenScheme("paper", 3, 0)
    trace = _trace(steps)
    parsed = parse(format_target(trace, scheme), question=trace.question, answer="True")
    # S=0 (the paper's "0 tokens" ablation): the prefix still delimits steps, but no marker names the kind
    assert [s.text for s in parsed.steps] == [s.text for s in steps]
    assert all(s.kind == UNLABELLED for s in parsed.steps)


@pytest.mark.parametrize("scheme", [TokenScheme("plain"), TokenScheme("paper", 3, 0)], ids=["plain", "paper-3-0"])
@settings(max_examples=60, deadline=None)
@given(steps=st.lists(st.builds(Step, st.just(UNLABELLED), _text.filter(lambda t: t and "The answer is:" not in t)),
                      max_size=6), answer=_answers)
def test_unlabelled_steps_round_trip_exactly_through_schemes_without_kinds(scheme, steps, answer):
    trace = _trace(steps, answer)
    assert parse(format_target(trace, scheme), question=trace.question, answer=answer) == trace


def test_paper_target_has_prefix_and_kind_markers_before_every_line():
    trace = _trace([Step(MEMORY, "Paris is in France."), Step(REASON, "So it is true.")])
    assert format_target(trace, TokenScheme()) == (
        "<prefix_0><prefix_1><prefix_2><memory_0><memory_1><memory_2><memory_3> Paris is in France.\n"
        "<prefix_0><prefix_1><prefix_2><reason_0><reason_1><reason_2><reason_3> So it is true.\n"
        "<prefix_0><prefix_1><prefix_2><answer_0><answer_1><answer_2><answer_3> The answer is: True")


def test_plain_style_writes_one_step_per_line_and_parses_them_unlabelled():
    trace = _trace([Step(MEMORY, "Paris is in France."), Step(REASON, "So it is true.")])
    text = format_target(trace, TokenScheme("plain"))
    assert text == "Paris is in France.\nSo it is true.\nThe answer is: True"
    parsed = parse(text, question=trace.question, answer="True")
    assert parsed.steps == (Step(UNLABELLED, "Paris is in France."), Step(UNLABELLED, "So it is true."))


def test_direct_style_writes_only_the_answer_line():
    trace = _trace([Step(MEMORY, "Paris is in France.")], answer="False")
    text = format_target(trace, TokenScheme("direct"))
    assert text == "The answer is: False"
    assert parse(text, question=trace.question, answer="False") == _trace([], answer="False")


def test_plain_and_direct_schemes_add_no_tokens():
    assert TokenScheme("plain").tokens() == [] and TokenScheme("direct").tokens() == []
    assert len(TokenScheme().tokens()) == 3 + 3 * 4
    assert TokenScheme("compact").tokens() == ["<memory>", "<reason>", "<answer>"]


@pytest.mark.parametrize("kwargs", [{"n_prefix": -1}, {"n_special": -2}, {"style": "fancy"},
                                    {"n_prefix": 0, "n_special": 0}, {"n_special": 1.5}])
def test_impossible_schemes_are_config_errors(kwargs):
    with pytest.raises(ConfigError):
        TokenScheme(**kwargs)


def test_counts_given_to_a_style_that_ignores_them_warn():
    with pytest.warns(UserWarning, match="ignored"):
        TokenScheme("compact", n_special=2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        TokenScheme("compact")


def test_format_refuses_marker_text_inside_a_step_and_traces_without_answer():
    with pytest.raises(ValueError, match="control token"):
        format_target(_trace([Step(MEMORY, "see <memory_0> here")]), TokenScheme())
    with pytest.raises(ValueError, match="without an answer"):
        format_target(Trace("q", (Step(MEMORY, "x"),), None), TokenScheme())


def test_generated_text_without_markers_before_the_first_run_becomes_an_unlabelled_step():
    text = "Let me think.<prefix_0><prefix_1><prefix_2><memory_0><memory_1><memory_2><memory_3> Fact.\n" \
           "<prefix_0><prefix_1><prefix_2><answer_0><answer_1><answer_2><answer_3> The answer is: True"
    parsed = parse(text, answer="True")
    assert parsed.steps == (Step(UNLABELLED, "Let me think."), Step(MEMORY, "Fact."))


# --- spans: the grammar parse is built from ----------------------------------------------------------

# Generated text as a model may write it: markers of every scheme, broken markers, answer lines, blank lines.
_pieces = st.sampled_from(["<memory>", "<reason>", "<answer>", "<prefix_0>", "<memory_1>", "<reason_0>", "<answer_2>",
                           " ", "\t", "\n", "\n\n", "The answer is: True", "a fact", "x y", "<memo", ">", "  \n",
                           "\r\n", "é"])
_generated = st.lists(_pieces, max_size=20).map("".join)


@settings(max_examples=200, deadline=None)
@given(text=_generated)
def test_spans_are_contiguous_and_cover_the_text_exactly(text):
    cut = spans(text)
    assert (cut[0].start if cut else 0) == 0
    assert all(a.end == b.start for a, b in zip(cut, cut[1:]))
    assert (cut[-1].end if cut else 0) == len(text)
    assert all(s.start <= s.marker_end <= s.end for s in cut)
    assert "".join(text[s.start:s.end] for s in cut) == text


@settings(max_examples=200, deadline=None)
@given(text=_generated)
def test_parse_is_one_step_per_span_that_is_not_the_answer(text):
    cut = [s for s in spans(text) if s.kind != "answer" and (s.kind in (MEMORY, REASON) or s.body(text))]
    assert parse(text).steps == tuple(Step(s.kind, s.body(text)) for s in cut)
    assert step_spans(text) == cut  # where each parsed step lies in the text


def test_format_target_is_its_steps_formatted_one_per_line_then_the_answer():
    trace = _trace([Step(MEMORY, "Paris is in France."), Step(REASON, "So\nit is true.")])
    scheme = TokenScheme("compact")
    lines = format_target(trace, scheme).split("\n")
    assert lines[:2] == [format_step(step, scheme) for step in trace.steps]
    assert lines[1] == "<reason> So it is true." and lines[2] == "<answer> The answer is: True"


@settings(max_examples=40, deadline=None)
@given(kinds=st.lists(st.sampled_from([MEMORY, REASON]), min_size=0, max_size=5),
       style=st.sampled_from([("paper", 3, 4), ("paper", 1, 1), ("compact", 3, 4)]))
def test_span_kinds_of_a_formatted_trace_are_its_step_kinds_then_the_answer(kinds, style):
    trace = Trace("q?", tuple(Step(k, f"step number {i} text.") for i, k in enumerate(kinds)), "True")
    raw = format_target(trace, TokenScheme(*style))
    cut = spans(raw)
    assert sum(s.end - s.start for s in cut) == len(raw)
    assert [s.kind for s in cut if s.kind != "answer"] == [s.kind for s in parse(raw).steps] == kinds
    assert cut[-1].kind == "answer"


def test_spans_of_a_paper_trace_follow_its_markers():
    trace = Trace("q?", (Step(MEMORY, "A fact."), Step(MEMORY, "Another."), Step(REASON, "So.")), "True")
    raw = format_target(trace, TokenScheme("paper", 2, 2))
    cut = spans(raw)
    assert [s.kind for s in cut] == ["memory", "memory", "reason", "answer"]
    assert cut[0].start == 0 and cut[-1].end == len(raw)
    assert all(a.end == b.start for a, b in zip(cut, cut[1:]))
    assert raw[cut[0].start:cut[0].marker_end] == "<prefix_0><prefix_1><memory_0><memory_1>"
    assert cut[0].body(raw) == "A fact."


def test_plain_text_spans_are_lines_and_blank_lines_join_the_line_before():
    raw = "False.\n\nThe answer is: True.\n"
    assert [(s.kind, raw[s.start:s.end]) for s in spans(raw)] == [("step", "False.\n\n"),
                                                                  ("answer", "The answer is: True.\n")]
    assert spans("") == []


def test_prefix_only_last_run_with_the_answer_phrase_is_the_answer():
    raw = "<prefix_0> a fact\n<prefix_0> The answer is: True"
    assert [s.kind for s in spans(raw)] == ["step", "answer"]
    assert parse(raw).steps == (Step(UNLABELLED, "a fact"),)


def test_a_run_that_mixes_kinds_is_an_unlabelled_step():
    raw = "<memory_0><reason_0> odd\n<answer_0> The answer is: True"
    assert [s.kind for s in spans(raw)] == ["step", "answer"]


def test_an_announced_empty_memory_step_is_kept_but_an_empty_unlabelled_one_is_not():
    assert parse("<memory> \n<prefix_0>\n<answer> The answer is: A").steps == (Step(MEMORY, ""),)


def test_has_marker_and_count_markers_see_every_scheme_s_markers():
    text = "<prefix_0><prefix_1><memory_0> x <reason> y <answer_3>"
    assert has_marker(text) and count_markers(text) == 5
    assert not has_marker("a <memo> b <memory_x>") and count_markers("plain text") == 0


def test_init_word_is_the_group_name():
    assert init_word("<memory_2>") == "memory" and init_word("<prefix_0>") == "prefix"
    assert init_word("<answer>") == "answer"
    with pytest.raises(ValueError):
        init_word("memory")


# --- tokens in a model --------------------------------------------------------------------------------


def _group_mean(matrix, tokenizer, word):
    pieces = tokenizer(" " + word, add_special_tokens=False)["input_ids"]
    return matrix[pieces].mean(dim=0)


def test_new_tokens_get_ids_from_len_tokenizer_and_rows_from_their_group_word(tiny_tokenizer):
    from conftest import build_tiny_model

    model = build_tiny_model(len(tiny_tokenizer), tie=False)
    before_in = model.get_input_embeddings().weight.detach().clone()
    before_out = model.get_output_embeddings().weight.detach().clone()
    n0, scheme = len(tiny_tokenizer), TokenScheme()
    ids = add_scheme_tokens(model, tiny_tokenizer, scheme)
    assert ids == list(range(n0, n0 + 15))
    assert model.get_input_embeddings().weight.shape[0] == n0 + 15
    inputs, outputs = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    for token, tid in zip(scheme.tokens(), ids):
        word = init_word(token)
        assert torch.equal(inputs[tid], _group_mean(before_in, tiny_tokenizer, word))
        assert torch.equal(outputs[tid], _group_mean(before_out, tiny_tokenizer, word))
    assert torch.equal(inputs[:n0], before_in) and torch.equal(outputs[:n0], before_out)


def test_padded_vocabulary_uses_the_padding_rows_without_growing(tiny_tokenizer):
    from conftest import build_tiny_model

    n0 = len(tiny_tokenizer)
    model = build_tiny_model(n0, padded_vocab=32)
    before = model.get_input_embeddings().weight.detach().clone()
    ids = add_scheme_tokens(model, tiny_tokenizer, TokenScheme())
    weight = model.get_input_embeddings().weight
    # the original code gave these tokens ids past the matrix (B1); they must be the first padding rows
    assert ids == list(range(n0, n0 + 15))
    assert weight.shape[0] == n0 + 32
    assert torch.equal(weight[ids[3]], _group_mean(before, tiny_tokenizer, "memory"))
    assert torch.equal(weight[n0 + 15:], before[n0 + 15:])  # unused padding rows untouched
    assert torch.equal(weight[:n0], before[:n0])


def test_tied_model_stays_tied_after_adding_tokens(tiny_tokenizer, tiny_model):
    add_scheme_tokens(tiny_model, tiny_tokenizer, TokenScheme())
    assert tiny_model.get_output_embeddings().weight is tiny_model.get_input_embeddings().weight


def test_every_marker_is_one_token_and_decoding_restores_the_target(tiny_tokenizer, tiny_model):
    scheme = TokenScheme()
    ids = add_scheme_tokens(tiny_model, tiny_tokenizer, scheme)
    trace = _trace([Step(MEMORY, "Paris is the capital of France."), Step(REASON, "So the answer is true.")])
    target = format_target(trace, scheme)
    encoded = tiny_tokenizer(target, add_special_tokens=False)["input_ids"]
    assert sum(i in ids for i in encoded) == 3 * 7  # P + S markers per line, one token each
    decoded = tiny_tokenizer.decode(encoded, skip_special_tokens=True)  # what generation does
    assert decoded == target
    assert parse(decoded, question=trace.question, answer="True") == trace


def test_adding_the_tokens_twice_changes_nothing(tiny_tokenizer, tiny_model):
    first = add_scheme_tokens(tiny_model, tiny_tokenizer, TokenScheme())
    weight = tiny_model.get_input_embeddings().weight.detach().clone()
    assert add_scheme_tokens(tiny_model, tiny_tokenizer, TokenScheme()) == first
    assert torch.equal(tiny_model.get_input_embeddings().weight, weight)
