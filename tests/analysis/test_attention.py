"""Tests of memreason.analysis.attention: span kinds of tokens, masses, the teacher-forcing driver, the
prompts rows were given, and the `inspect attention` verb, on tiny models (and one SmolLM2 check). The
grammar that cuts generated text into spans is tested with it, in tests/model/test_tokens.py."""

from __future__ import annotations

import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from attention_fixtures import TRACE, scheme_tokenizer  # noqa: F401 - a fixture
from attention_fixtures import prompt_for as _prompt
from conftest import build_tiny_model, build_tiny_tokenizer
from memreason.analysis import attention as A
from memreason.analysis import attention_tables as T
from memreason.model.tokens import format_target
from memreason.traces import Result

# ---------------------------------------------------------------- token spans

def test_marker_tokens_get_their_own_kind_named_after_the_kind_they_announce(scheme_tokenizer):
    tokenizer, _, scheme = scheme_tokenizer
    raw = format_target(TRACE, scheme)
    spans = A.token_spans(tokenizer, _prompt(tokenizer), raw, TRACE.question)
    generated = list(zip(spans.tokens[spans.n_prompt:], spans.kinds[spans.n_prompt:]))
    markers = [(t, k) for t, k in generated if t.startswith("<") and t.endswith(">")]
    # 4 markers (P=2 + S=2) per step and before the answer line, each one token
    assert [k for _, k in markers] == ["marker_memory"] * 8 + ["marker_reason"] * 4 + ["marker_answer"] * 4
    assert {t for t, k in generated if k.startswith("marker_")} == {t for t, _ in markers}
    # every other generated token takes its segment's kind
    texts = [k for _, k in generated if not k.startswith("marker_")]
    assert set(texts) == {"memory", "reason", "answer"}
    assert spans.counts()["answer"] == len(tokenizer(" The answer is: True", add_special_tokens=False)["input_ids"])


def test_prompt_tokens_are_first_question_or_prompt_and_only_the_last_question_counts(tiny_tokenizer):
    question = "Is the Pacific Ocean larger?"
    prompt = f"Question: {question}\nTrue\n\nQuestion: {question}\n"
    spans = A.token_spans(tiny_tokenizer, prompt, "The answer is: True", question)
    prompt_kinds = spans.kinds[:spans.n_prompt]
    assert prompt_kinds[0] == "first"
    question_positions = [i for i, k in enumerate(prompt_kinds) if k == "question"]
    assert question_positions == list(range(question_positions[0], question_positions[-1] + 1))
    assert "".join(spans.tokens[i] for i in question_positions).strip() == question
    second = prompt.rfind(question)
    offsets = tiny_tokenizer(prompt, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    assert offsets[question_positions[0]][1] > second  # the tokens are those of the second occurrence


def test_untrained_tokenizer_pieces_of_a_marker_all_count_as_marker(tiny_tokenizer):
    raw = "<memory> The Pacific Ocean.\nThe answer is: True"
    spans = A.token_spans(tiny_tokenizer, "Question: q\n", raw)
    generated = spans.kinds[spans.n_prompt:]
    pieces = tiny_tokenizer("<memory>", add_special_tokens=False)["input_ids"]
    assert len(pieces) > 1
    assert list(generated[:len(pieces)]) == ["marker_memory"] * len(pieces)
    assert "marker_memory" not in generated[len(pieces):]


# ---------------------------------------------------------------- masses

KINDS_5 = ["first", "question", "marker_memory", "memory", "answer"]


def test_span_masses_match_a_hand_computed_example():
    attn = torch.zeros(1, 1, 5, 5)
    attn[0, 0, 3] = torch.tensor([0.5, 0.1, 0.2, 0.2, 0.0])   # the memory token
    attn[0, 0, 4] = torch.tensor([0.4, 0.1, 0.1, 0.3, 0.1])   # the answer token
    m = A.span_masses(attn, KINDS_5)
    g, k = A.QUERY_GROUPS.index, A.KEY_KINDS.index
    assert m.mass[0, 0, g("answer"), k("memory")].item() == pytest.approx(0.3)
    assert m.mass[0, 0, g("answer"), k("marker_memory")].item() == pytest.approx(0.1)
    assert m.mass[0, 0, g("memory"), k("first")].item() == pytest.approx(0.5)
    # markers as queries: the marker token's own (empty) row
    assert m.mass[0, 0, g("markers")].sum().item() == 0.0
    assert m.n_queries.tolist() == [1, 0, 0, 1, 1]
    # uniform baseline of the answer token: it sees 5 keys, one of each kind
    assert m.uniform[g("answer"), k("memory")].item() == pytest.approx(0.2)
    assert m.uniform[g("memory"), k("answer")].item() == 0.0  # the answer comes after the memory token


@settings(max_examples=25, deadline=None)
@given(st.integers(min_value=0, max_value=10_000))
def test_masses_over_kinds_sum_to_the_row_total_for_any_weights(seed):
    generator = torch.Generator().manual_seed(seed)
    n = 12
    kinds = [A.KEY_KINDS[i] for i in torch.randint(0, len(A.KEY_KINDS), (n,), generator=generator).tolist()]
    attn = torch.rand(2, 3, n, n, generator=generator) * 3  # not normalised on purpose
    m = A.span_masses(attn, kinds)
    assert torch.allclose(m.mass.sum(-1), m.row_total, atol=1e-9)
    present = m.n_queries > 0
    assert torch.allclose(m.uniform.sum(-1)[present], torch.ones(int(present.sum()), dtype=torch.float64))


def test_span_masses_reject_a_shape_that_does_not_fit_the_kinds():
    with pytest.raises(ValueError, match="does not fit"):
        A.span_masses(torch.zeros(1, 1, 4, 4), KINDS_5)
    with pytest.raises(ValueError, match="unknown span kind"):
        A.span_masses(torch.zeros(1, 1, 5, 5), KINDS_5[:4] + ["nonsense"])


# ---------------------------------------------------------------- teacher forcing

def test_teacher_force_masses_sum_to_one_per_query_on_a_tiny_model(scheme_tokenizer):
    tokenizer, model, scheme = scheme_tokenizer
    example = A.teacher_force(model, tokenizer, _prompt(tokenizer), format_target(TRACE, scheme),
                              question=TRACE.question, keep=(1, 2))
    layers, heads = model.config.num_hidden_layers, model.config.num_attention_heads
    assert example.masses.mass.shape == (layers, heads, len(A.QUERY_GROUPS), len(A.KEY_KINDS))
    present = example.masses.n_queries > 0
    assert present.tolist() == [True, True, False, True, True]  # memory, reason, (no step), answer, markers
    totals = example.masses.mass.sum(-1)[:, :, present]
    assert torch.allclose(totals, torch.ones_like(totals), atol=1e-5)
    assert example.matrix.shape == (len(example.spans.kinds),) * 2
    table = A.token_table(example, layer=1, head=2)
    row_sums = torch.tensor(table["values"]).sum(-1)
    assert torch.allclose(row_sums, torch.ones_like(row_sums), atol=1e-4)
    assert len(table["key_tokens"]) == 3 + len(table["query_tokens"])


def test_teacher_force_refuses_a_model_without_attention_weights(tiny_tokenizer):
    from transformers import AutoModelForCausalLM

    config = build_tiny_model(len(tiny_tokenizer)).config
    model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").eval()
    with pytest.raises(Exception, match="eager"):
        A.teacher_force(model, tiny_tokenizer, "Question: q\n", "The answer is: True")
    assert A.ensure_eager(model) == "sdpa"
    example = A.teacher_force(model, tiny_tokenizer, "Question: q\n", "The answer is: True")
    assert example.masses.n_queries[A.QUERY_GROUPS.index("answer")] > 0


def _legacy_row(question, task="strategyqa", rid="x"):
    """A row as results schema 1 wrote it: no prompt recorded."""
    return Result.from_dict({"id": rid, "question": question, "outcome": "correct", "task": task})


def test_legacy_rows_get_the_evaluations_worked_examples_and_style_rebuilt(tiny_tokenizer):
    from memreason.data import load_traces
    from memreason.errors import DataError

    shot = load_traces("bundled:strategyqa", task="strategyqa", split="train")[0][3]
    config = {"task": "strategyqa", "source": "bundled:strategyqa", "prompt_style": "plain",
              "extra": {"shots": [shot.id]}}
    row = _legacy_row("Is the Pacific Ocean larger?")
    assert row.prompt is None
    prompt = A.row_prompts([row], config, tiny_tokenizer)[0]
    assert prompt.startswith(f"Question: {shot.question}") and prompt.rstrip().endswith(row.question)
    chat = A.row_prompts([row], config, tiny_tokenizer, prompt_style="chat")[0]
    assert chat.startswith("<|im_start|>user") and shot.question in chat
    with pytest.raises(DataError, match="not in its train split"):
        A.row_prompts([row], {**config, "extra": {"shots": ["no-such-id"]}}, tiny_tokenizer)


def test_recorded_prompts_are_used_as_they_are_and_only_legacy_rows_are_rebuilt(tiny_tokenizer):
    recorded = Result.from_dict({"id": "a", "question": "Q one?", "outcome": "wrong", "prompt": "EXACT PROMPT\n"})
    # a config whose worked examples cannot be found: reading it would fail, so it is never read
    broken = {"task": "strategyqa", "source": "bundled:strategyqa", "extra": {"shots": ["no-such-id"]}}
    assert A.row_prompts([recorded], broken, tiny_tokenizer) == ["EXACT PROMPT\n"]
    legacy = _legacy_row("Q two?", rid="b")
    mixed = A.row_prompts([recorded, legacy], {"prompt_style": "plain"}, tiny_tokenizer)
    assert mixed[0] == "EXACT PROMPT\n" and mixed[1].rstrip().endswith("Q two?")


# ---------------------------------------------------------------- the CLI verb

def test_inspect_attention_cli_writes_tables_and_figures(tmp_path, capsys):
    from memreason.cli import main

    tokenizer = build_tiny_tokenizer()
    build_tiny_model(len(tokenizer)).save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    rows = [{"id": "a", "question": "Is the Pacific Ocean larger?", "outcome": "correct", "task": "strategyqa",
             "raw": "The Pacific Ocean is the largest.\nThe answer is: True\n", "steps": []},
            {"id": "b", "question": "Does water boil at 100 degrees?", "outcome": "wrong", "task": "strategyqa",
             "raw": "The answer is: False\n", "steps": []}]
    results = tmp_path / "eval" / "results.jsonl"
    results.parent.mkdir()
    results.write_text("".join(json.dumps(r) + "\n" for r in rows))
    code = main(["inspect", "attention", "--results", str(results), "--run", str(tmp_path / "model"),
                 "--example", "a", "--layer", "-1", "--head", "3", "--device", "cpu"])
    assert code == 0
    out = tmp_path / "eval" / "inspect"
    for name in ("attention_by_head.csv", "attention_by_layer.csv", "attention_examples.safetensors",
                 "attention_layers.png", "attention_example_a_L1_H3.png", "attention_example_a_L1_H3.json"):
        assert (out / name).is_file(), name
    head_rows = T.read_table(out / "attention_by_head.csv")
    assert {r["head"] for r in head_rows} == {0, 1, 2, 3}
    assert "answer" in capsys.readouterr().out
    assert main(["inspect", "attention", "--results", str(results), "--run", str(tmp_path / "model"),
                 "--example", "nope"]) == 2


@pytest.mark.smollm2
def test_smollm2_answer_tokens_spread_all_their_attention_over_the_spans(smollm2):
    model, tokenizer = smollm2
    previous = A.ensure_eager(model)
    try:
        prompt = _prompt(tokenizer, "Is the Pacific Ocean larger than the Atlantic?")
        example = A.teacher_force(model, tokenizer, prompt, "The Pacific is the largest ocean.\nThe answer is: True\n",
                                  question="Is the Pacific Ocean larger than the Atlantic?")
    finally:
        model.set_attn_implementation(previous)
    mass = example.masses.mass  # [layer, head, group, kind]
    assert mass.shape[:2] == (30, 9)
    answer = A.QUERY_GROUPS.index("answer")
    assert torch.allclose(mass[:, :, answer].sum(-1), torch.ones(30, 9, dtype=torch.float64), atol=1e-4)
    # SmolLM2 parks much of its attention on the first token (an attention sink) in later layers
    assert mass[15:, :, answer, A.KEY_KINDS.index("first")].mean() > 0.2


def test_inspect_attention_refuses_prompt_options_for_rows_that_recorded_their_prompt(tmp_path, capsys):
    from memreason.cli import main

    row = Result.from_dict({"id": "a", "question": "Q?", "outcome": "correct", "prompt": "Question: Q?\n",
                            "raw": "The answer is: True\n"})
    results = tmp_path / "results.jsonl"
    results.write_text(json.dumps(row.to_dict()) + "\n")
    for option in (["--prompt-style", "chat"], ["--data", "bundled:strategyqa"]):
        # refused before any model is loaded (there is none at --run)
        assert main(["inspect", "attention", "--results", str(results), "--run", str(tmp_path / "none"),
                     *option]) == 2
        assert "recorded the exact prompt" in capsys.readouterr().err
