"""Tests for memreason.interventions.rebalance_eval and the ``memreason rebalance eval`` verb.

Tiny random models and the tiny BPE tokenizer from conftest (on it " A" is one token and " B" two, so the
log-likelihood scorer's multi-token path runs; the single-token path is tested with explicit ids).
"""

from __future__ import annotations

import csv
import json
from collections import Counter

import pytest
import torch

from memreason.cli import main
from memreason.errors import ConfigError, DataError
from memreason.interventions import rebalance_eval as rbe
from memreason.interventions.attention_rebalance import rebalance
from memreason.stats import mcnemar_exact

HEADER = ["question", "A", "B", "C", "D", "answer", "subject"]


@pytest.fixture
def tiny_model(tiny_tokenizer):
    # Three layers, not conftest's two: with h = L - 1 a 2-layer model's only boosted layer has gain 1.
    from conftest import build_tiny_model

    return build_tiny_model(len(tiny_tokenizer), layers=3)


@pytest.fixture(autouse=True)
def _one_intra_op_thread():
    # Tiny-model ops are ~100x slower with 2 contended intra-op threads on the shared 2-core machine.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def write_csv(path, rows, header=HEADER):
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        if header:
            writer.writerow(header)
        writer.writerows(rows)
    return path


GOOD_ROW = ["What is 2 + 2?", "3", "4", "5", "6", "B", "elementary_mathematics"]


# ---------------------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------------------
def test_bundled_sample_has_96_questions_balanced_over_categories_and_gold_letters():
    questions = rbe.load_mmlu(rbe.bundled_sample_path())
    assert len(questions) >= 80
    assert Counter(q.category for q in questions) == {c: 24 for c in rbe.CATEGORIES}
    for category in rbe.CATEGORIES:
        letters = Counter(q.answer for q in questions if q.category == category)
        assert letters == {"A": 6, "B": 6, "C": 6, "D": 6}


def test_bundled_sample_uses_mmlu_subjects_distinct_options_and_unique_questions():
    questions = rbe.load_mmlu(rbe.bundled_sample_path())
    assert all(q.subject in rbe.SUBJECT_CATEGORIES for q in questions)
    assert all(len(set(q.options)) == 4 for q in questions)
    assert len({q.question for q in questions}) == len(questions)
    assert len({q.subject for q in questions}) >= 40


def test_subject_mapping_covers_the_57_mmlu_subjects_in_the_original_proportions():
    assert len(rbe.SUBJECT_CATEGORIES) == 57
    assert Counter(rbe.SUBJECT_CATEGORIES.values()) == {"STEM": 19, "humanities": 13, "social sciences": 12,
                                                       "other": 13}


def test_headerless_mmlu_file_takes_its_subject_from_the_file_name(tmp_path):
    path = write_csv(tmp_path / "high_school_physics_test.csv", [GOOD_ROW[:6], GOOD_ROW[:6]], header=None)
    questions = rbe.load_mmlu(path)
    assert [q.qid for q in questions] == ["high_school_physics_test:0", "high_school_physics_test:1"]
    assert questions[0].subject == "high_school_physics" and questions[0].category == "STEM"
    assert questions[0].options == ("3", "4", "5", "6") and questions[0].answer == "B"


def test_directory_loads_every_csv_in_name_order(tmp_path):
    write_csv(tmp_path / "virology_test.csv", [GOOD_ROW[:6]], header=None)
    write_csv(tmp_path / "philosophy_test.csv", [GOOD_ROW[:6]], header=None)
    questions = rbe.load_mmlu(tmp_path)
    assert [(q.subject, q.category) for q in questions] == [("philosophy", "humanities"), ("virology", "other")]


def test_category_column_supplies_the_category_of_a_subject_outside_mmlu(tmp_path):
    path = write_csv(tmp_path / "extra.csv", [GOOD_ROW[:6] + ["cooking", "other"]], header=HEADER + ["category"])
    assert rbe.load_mmlu(path)[0].category == "other"


@pytest.mark.parametrize("row,header,message,record,field", [
    (GOOD_ROW[:5] + ["E", GOOD_ROW[6]], HEADER, "answer must be one of", 1, "answer"),
    (GOOD_ROW[:5] + ["AB", GOOD_ROW[6]], HEADER, "answer must be one of", 1, "answer"),
    (GOOD_ROW[:3] + ["", *GOOD_ROW[4:]], HEADER, "empty value", 1, "C"),
    (GOOD_ROW[:5], HEADER, "expected 7 columns, found 5", 1, None),
    (GOOD_ROW[:6] + ["cooking"], HEADER, "unknown MMLU subject 'cooking'", 1, "subject"),
    (GOOD_ROW[:6], HEADER[:6], "needs a 'subject' column", None, "subject"),
    (GOOD_ROW[:6] + ["cooking", "snacks"], HEADER + ["category"], "unknown category 'snacks'", 1, "category"),
])
def test_bad_rows_raise_a_data_error_naming_file_row_and_field(tmp_path, row, header, message, record, field):
    good = (GOOD_ROW + ["other"])[: len(header)]
    path = write_csv(tmp_path / "bad.csv", [good, row], header=header)
    with pytest.raises(DataError, match=message) as info:
        rbe.load_mmlu(path)
    error = info.value
    assert error.file == str(path) and error.record == record
    assert error.field == field
    assert str(path) in str(error)


def test_missing_empty_and_header_only_files_are_data_errors(tmp_path):
    with pytest.raises(DataError, match="file not found"):
        rbe.load_mmlu(tmp_path / "nope.csv")
    (tmp_path / "empty.csv").write_text("\n", encoding="utf-8")
    with pytest.raises(DataError, match="empty file"):
        rbe.load_mmlu(tmp_path / "empty.csv")
    with pytest.raises(DataError, match="only a header"):
        rbe.load_mmlu(write_csv(tmp_path / "header.csv", []))
    (tmp_path / "d").mkdir()
    with pytest.raises(DataError, match="no .csv files"):
        rbe.load_mmlu(tmp_path / "d")


def test_limit_takes_questions_round_robin_over_categories():
    questions = rbe.load_mmlu(rbe.bundled_sample_path())
    chosen = rbe.select_questions(questions, 6)
    assert [q.category for q in chosen] == ["STEM", "humanities", "social sciences", "other", "STEM", "humanities"]
    assert rbe.select_questions(questions, None) == questions
    assert rbe.select_questions(questions, 500) == questions


# ---------------------------------------------------------------------------------------------------------
# Prompts and the strict parser
# ---------------------------------------------------------------------------------------------------------
def test_prompts_list_the_options_and_end_where_the_answer_is_scored(tiny_tokenizer):
    question = rbe.load_mmlu(rbe.bundled_sample_path())[0]
    raw = rbe.build_prompt(question, "ll", "raw")
    assert raw.startswith("The following is a multiple choice question about elementary mathematics.")
    assert raw.endswith("\nA. 56\nB. 54\nC. 48\nD. 64\nAnswer:")
    chat = rbe.build_prompt(question, "ll", "chat", tiny_tokenizer)
    assert chat.startswith("<|im_start|>user\n") and chat.endswith("<|im_start|>assistant\nThe answer is:")
    cot = rbe.build_prompt(question, "cot", "raw")
    assert "'The answer is: X', where X is A, B, C or D" in cot and cot.endswith("D. 64\n")


def test_chat_style_without_a_chat_template_is_a_config_error(tiny_tokenizer):
    tiny_tokenizer.chat_template = None
    question = rbe.load_mmlu(rbe.bundled_sample_path())[0]
    with pytest.raises(ConfigError, match="chat template"):
        rbe.build_prompt(question, "cot", "chat", tiny_tokenizer)


@pytest.mark.parametrize("text,expected", [
    ("A is wrong because ... B fits.\nThe answer is: B", "B"),
    ("The answer is: A\nOn reflection... The answer is: C. Paris", "C"),  # the last answer line counts
    ("Option A looks right. Answer: A", None),  # no marker: unparseable, never guessed
    ("The answer is: E", None),  # outside A-D
    ("The answer is: a", None),  # the article, not option A
    ("The answer is D.", None),
])
def test_strict_parser_reads_only_the_last_answer_line(text, expected):
    assert rbe.MMLU_TASK.extract(text) == expected


# ---------------------------------------------------------------------------------------------------------
# Log-likelihood scoring
# ---------------------------------------------------------------------------------------------------------
def test_single_token_scores_equal_the_next_token_log_softmax_and_ignore_left_padding(tiny_model):
    contexts = [[5, 9, 14, 20, 33], [7, 8], [40, 41, 42]]
    continuations = [[11], [12], [13], [14]]
    scores, rows = rbe.score_continuations(tiny_model, contexts, continuations, pad_id=2)
    assert rows == [0, 1, 2]
    for context, got in zip(contexts, scores):
        with torch.no_grad():
            logprobs = torch.log_softmax(tiny_model(torch.tensor([context])).logits[0, -1], -1)
        torch.testing.assert_close(torch.tensor(got), logprobs[[11, 12, 13, 14]], atol=1e-5, rtol=1e-5)


def test_multi_token_scores_sum_the_continuation_token_log_probabilities(tiny_model):
    contexts = [[5, 9, 14], [7, 8, 30, 31, 32]]
    continuations = [[11, 12], [13], [14, 15, 16], [17]]
    scores, rows = rbe.score_continuations(tiny_model, contexts, continuations, pad_id=2)
    assert rows == [0, 4]
    for context, got in zip(contexts, scores):
        for continuation, value in zip(continuations, got):
            with torch.no_grad():
                logprobs = torch.log_softmax(tiny_model(torch.tensor([context + continuation])).logits[0], -1)
            expected = sum(float(logprobs[len(context) - 1 + t, token]) for t, token in enumerate(continuation))
            assert value == pytest.approx(expected, abs=1e-4)


# ---------------------------------------------------------------------------------------------------------
# Statistics
# ---------------------------------------------------------------------------------------------------------
def _rows(name, correct, categories):
    return [{"qid": f"q{i:02d}", "category": cat, "condition": name, "correct": bool(c), "params": {"name": name},
             "p_gold": 0.25, "prompt_tokens": 50} for i, (c, cat) in enumerate(zip(correct, categories))]


def test_summary_counts_accuracy_flips_and_mcnemar_exactly():
    categories = ["STEM"] * 5 + ["other"] * 5
    base = [1, 0, 0, 1, 0, 1, 0, 0, 0, 1]
    method = [1, 1, 1, 1, 0, 1, 1, 0, 0, 0]
    settings = rbe.EvalSettings(conditions=("baseline", "mask"), bootstrap_resamples=500)
    summary = rbe.summarise(_rows("baseline", base, categories) + _rows("mask", method, categories),
                            ["baseline", "mask"], settings)
    assert summary["conditions"]["baseline"]["overall"]["accuracy"] == 0.4
    assert summary["conditions"]["mask"]["overall"]["accuracy"] == 0.6
    assert summary["conditions"]["mask"]["categories"]["STEM"]["correct"] == 4
    comparison = summary["comparisons"][0]
    assert (comparison["first"], comparison["second"]) == ("baseline", "mask")
    assert comparison["only_second_correct"] == 3 and comparison["only_first_correct"] == 1
    assert comparison["mcnemar_p"] == mcnemar_exact(1, 3) == 0.625
    assert comparison["flips"] == {"lost": ["q09"], "gained": ["q01", "q02", "q06"]}
    assert comparison["accuracy_diff"] == pytest.approx(0.2)
    assert comparison["categories"]["STEM"]["only_second_correct"] == 2
    assert "baseline" in rbe.format_table(summary) and "+20.0" in rbe.format_table(summary)


def test_summary_compares_the_method_with_every_control_as_well_as_the_baseline():
    categories = ["STEM"] * 4
    names = ["baseline", "mask", "boost-all", "random-mask"]
    rows = [r for name in names for r in _rows(name, [1, 0, 1, 0], categories)]
    summary = rbe.summarise(rows, names, rbe.EvalSettings(bootstrap_resamples=100))
    pairs = [(c["first"], c["second"]) for c in summary["comparisons"]]
    assert pairs == [("baseline", "mask"), ("baseline", "boost-all"), ("baseline", "random-mask"),
                     ("boost-all", "mask"), ("random-mask", "mask")]


def test_verdict_requires_the_method_to_beat_baseline_and_both_controls():
    n = 40
    categories = ["STEM"] * n
    names = ["baseline", "mask", "boost-all", "random-mask"]
    weak = [1] * 5 + [0] * (n - 5)
    strong = [1] * 25 + [0] * (n - 25)
    settings = rbe.EvalSettings(bootstrap_resamples=500)
    rows = (_rows("baseline", weak, categories) + _rows("mask", strong, categories)
            + _rows("boost-all", weak, categories) + _rows("random-mask", weak, categories))
    assert rbe.summarise(rows, names, settings)["verdict"]["mask_matters"] is True
    rows = [r for r in rows if r["condition"] != "boost-all"] + _rows("boost-all", strong, categories)
    verdict = rbe.summarise(rows, names, settings)["verdict"]
    assert verdict["mask_matters"] is False and "mask vs boost-all: +0.0 points" in verdict["reason"]
    partial = rbe.summarise([r for r in rows if r["condition"] in ("baseline", "mask")], ["baseline", "mask"],
                            settings)
    assert partial["verdict"]["mask_matters"] is None


@pytest.mark.parametrize("kwargs,match", [
    ({"mode": "mc"}, "unknown evaluation mode"),
    ({"conditions": ("mask", "inverse")}, "unknown condition"),
    ({"conditions": ("mask", "mask")}, "listed twice"),
    ({"batch_size": 0}, "batch_size"),
    ({"limit": 0}, "limit"),
    ({"theta": 2.0}, "theta"),
])
def test_bad_settings_are_config_errors(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        rbe.EvalSettings(**kwargs)


def test_baseline_is_always_part_of_the_run_and_legacy_uses_h_31():
    settings = rbe.EvalSettings(conditions=("mask", "legacy"))
    conditions = settings.make_conditions()
    assert [c.name for c in conditions] == ["baseline", "mask", "legacy"]
    assert conditions[0].mode is None and conditions[2].mode == "mask" and conditions[2].depth_h == 31


# ---------------------------------------------------------------------------------------------------------
# Runs
# ---------------------------------------------------------------------------------------------------------
def _sample(tmp_path, n=6):
    questions = rbe.load_mmlu(rbe.bundled_sample_path())
    rows = [[q.question, *q.options, q.answer, q.subject] for q in rbe.select_questions(questions, n)]
    path = write_csv(tmp_path / "sample.csv", rows)
    return path, rbe.load_mmlu(path)


def _count_forwards(model):
    calls = []
    handle = model.register_forward_hook(lambda *args: calls.append(1))
    return calls, handle


def test_ll_run_writes_outputs_and_a_rerun_resumes_without_model_calls(tmp_path, tiny_model, tiny_tokenizer):
    data, questions = _sample(tmp_path)
    settings = rbe.EvalSettings(batch_size=4, bootstrap_resamples=200)
    out = tmp_path / "out"
    summary = rbe.run_eval(tiny_model, tiny_tokenizer, questions, settings, out, model_name="tiny", data_path=data)
    assert tiny_model.config._attn_implementation == "sdpa"  # restored after every condition
    assert list(summary["conditions"]) == ["baseline", "mask", "boost-all", "random-mask"]
    assert summary["run"]["n_questions"] == 6 and summary["run"]["settings"]["alpha"] == 0.2
    lines = (out / "per_question.jsonl").read_text().splitlines()
    assert len(lines) == 6 * 4
    row = json.loads(lines[-1])
    assert row["condition"] == "random-mask" and set(row["logprobs"]) == {"A", "B", "C", "D"}
    assert 0 < row["diagnostics"]["mask_density"] <= 1
    by_condition = {}
    for line in lines:
        parsed = json.loads(line)
        by_condition.setdefault(parsed["condition"], []).append(parsed["logprobs"]["A"])
    assert by_condition["mask"] != pytest.approx(by_condition["baseline"], abs=1e-4)  # the method acted
    assert json.loads(lines[0])["condition"] == "baseline" and "diagnostics" not in json.loads(lines[0])
    with (out / "per_question.csv").open() as handle:
        table = list(csv.DictReader(handle))
    assert len(table) == 6 and {"predicted_mask", "correct_random-mask", "p_gold_baseline"} <= set(table[0])
    assert json.loads((out / "summary.json").read_text()) == summary

    calls, handle = _count_forwards(tiny_model)
    try:
        again = rbe.run_eval(tiny_model, tiny_tokenizer, questions, settings, out, model_name="tiny", data_path=data)
    finally:
        handle.remove()
    assert calls == [] and again == summary


def test_interrupted_run_recomputes_only_the_missing_rows(tmp_path, tiny_model, tiny_tokenizer):
    data, questions = _sample(tmp_path)
    settings = rbe.EvalSettings(conditions=("baseline", "mask"), batch_size=6, bootstrap_resamples=200)
    out = tmp_path / "out"
    complete = rbe.run_eval(tiny_model, tiny_tokenizer, questions, settings, out, model_name="tiny", data_path=data)
    jsonl = out / "per_question.jsonl"
    lines = jsonl.read_text().splitlines(keepends=True)
    jsonl.write_text("".join(lines[:6]) + lines[6][:40])  # baseline done, then a line cut short
    calls, handle = _count_forwards(tiny_model)
    try:
        resumed = rbe.run_eval(tiny_model, tiny_tokenizer, questions, settings, out, model_name="tiny", data_path=data)
    finally:
        handle.remove()
    assert len(calls) == 1  # one batch of the mask condition
    assert resumed["conditions"] == complete["conditions"]


def test_an_out_dir_of_another_run_is_refused_unless_overwrite(tmp_path, tiny_model, tiny_tokenizer):
    data, questions = _sample(tmp_path, n=4)
    out = tmp_path / "out"
    first = rbe.EvalSettings(conditions=("baseline", "mask"), bootstrap_resamples=100)
    rbe.run_eval(tiny_model, tiny_tokenizer, questions, first, out, model_name="tiny", data_path=data)
    other = rbe.EvalSettings(conditions=("baseline", "mask"), alpha=0.5, bootstrap_resamples=100)
    with pytest.raises(ConfigError, match="different run"):
        rbe.run_eval(tiny_model, tiny_tokenizer, questions, other, out, model_name="tiny", data_path=data)
    summary = rbe.run_eval(tiny_model, tiny_tokenizer, questions, other, out, model_name="tiny", data_path=data,
                           overwrite=True)
    assert summary["conditions"]["mask"]["params"]["alpha"] == 0.5
    rows = [json.loads(line) for line in (out / "per_question.jsonl").read_text().splitlines()]
    assert {row["params"]["alpha"] for row in rows if row["condition"] == "mask"} == {0.5}


def test_ll_diagnostics_of_a_padded_batch_match_the_question_run_alone(tmp_path, tiny_model, tiny_tokenizer):
    _, questions = _sample(tmp_path, n=3)
    settings = rbe.EvalSettings(conditions=("mask",), batch_size=3)
    condition = settings.make_conditions()[1]
    rows = []
    rbe.evaluate_condition(tiny_model, tiny_tokenizer, questions, condition, settings, rows.extend)
    lengths = [row["prompt_tokens"] for row in rows]
    assert len(set(lengths)) > 1, "the batch must need padding"
    for question, row in zip(questions, rows):
        ids = rbe.encode_prompt(tiny_tokenizer, rbe.build_prompt(question, "ll", "raw"), "raw")
        # " A" is two tokens here, so the scored (and diagnosed) sequence is the prompt plus " A".
        ids += rbe.letter_continuations(tiny_tokenizer)[0]
        with torch.no_grad(), rebalance(tiny_model, alpha=0.2, diagnostics=True) as rb:
            tiny_model(torch.tensor([ids]))
        record = rb.records[0]
        expected = float(record.row_keys.sum()) / (float(record.row_allowed.sum()) * record.row_keys.shape[1])
        assert row["diagnostics"]["mask_density"] == pytest.approx(expected, abs=1e-9)


def test_random_mask_results_do_not_depend_on_the_batch_size(tmp_path, tiny_model, tiny_tokenizer):
    # The random positions are keyed on token positions, so left padding must not move them.
    _, questions = _sample(tmp_path, n=3)
    results = {}
    for batch_size in (1, 3):
        settings = rbe.EvalSettings(conditions=("baseline", "random-mask"), batch_size=batch_size, alpha=2.0)
        rows = []
        rbe.evaluate_condition(tiny_model, tiny_tokenizer, questions, settings.make_conditions()[1], settings,
                               rows.extend)
        results[batch_size] = rows
    assert len({row["prompt_tokens"] for row in results[3]}) > 1, "the batch must need padding"
    for alone, batched in zip(results[1], results[3]):
        assert list(batched["logprobs"].values()) == pytest.approx(list(alone["logprobs"].values()), abs=1e-4)
        for key in ("mask_density", "first_token_share", "added_mass"):
            assert batched["diagnostics"][key] == pytest.approx(alone["diagnostics"][key], rel=1e-4)
        assert alone["diagnostics"]["added_mass"] > 0


def test_baseline_runs_stock_eager_attention_and_restores_the_models_own(tmp_path, tiny_model, tiny_tokenizer):
    _, questions = _sample(tmp_path, n=2)
    seen = []
    attention = tiny_model.model.layers[0].self_attn
    handle = attention.register_forward_pre_hook(lambda module, args: seen.append(module.config._attn_implementation))
    try:
        settings = rbe.EvalSettings(conditions=("baseline", "mask"))
        for condition in settings.make_conditions():
            rbe.evaluate_condition(tiny_model, tiny_tokenizer, questions, condition, settings, lambda rows: None)
    finally:
        handle.remove()
    assert seen == ["eager", "memreason_rebalance"]
    assert tiny_model.config._attn_implementation == "sdpa"


def test_cot_run_generates_within_the_cap_and_scores_with_the_strict_parser(tmp_path, tiny_model, tiny_tokenizer):
    data, questions = _sample(tmp_path, n=4)
    settings = rbe.EvalSettings(mode="cot", conditions=("baseline", "mask"), max_new_tokens=6, batch_size=4,
                                prompt_style="raw", bootstrap_resamples=100)
    summary = rbe.run_eval(tiny_model, tiny_tokenizer, questions, settings, tmp_path / "out", model_name="tiny",
                           data_path=data)
    rows = [json.loads(line) for line in (tmp_path / "out" / "per_question.jsonl").read_text().splitlines()]
    assert len(rows) == 8
    for row in rows:
        assert 1 <= row["n_generated"] <= 6
        assert row["outcome"] == ("unparseable" if rbe.MMLU_TASK.extract(row["text"]) is None else row["outcome"])
        assert row["correct"] == (row["outcome"] == "correct")
    baseline = summary["conditions"]["baseline"]
    assert baseline["length"]["max"] <= 6 and 0 <= baseline["parse_rate"] <= 1
    assert summary["conditions"]["mask"]["diagnostics"]["mean_mask_density"] is not None
    assert "length_diff" in summary["comparisons"][0]
    assert "generation: parse rate" in rbe.format_table(summary)


def test_generated_length_stops_at_the_first_eos():
    class FakeTokenizer:
        pad_token_id, eos_token_id = 0, 2

        def decode(self, ids, skip_special_tokens):
            return " ".join(str(i) for i in ids if not (skip_special_tokens and i == 2))

    class FakeModel(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.zeros(1))
            self.generation_config = type("G", (), {"eos_token_id": [2]})()

        def generate(self, input_ids, attention_mask, max_new_tokens, **kwargs):
            new = torch.tensor([[5, 6, 2, 0], [5, 6, 7, 8]])
            return torch.cat([input_ids, new], 1)

    results = rbe.generate_batch(FakeModel(), FakeTokenizer(), [[9, 9], [9]], max_new_tokens=4)
    assert results == [{"text": "5 6", "n_generated": 3, "hit_cap": False},
                       {"text": "5 6 7 8", "n_generated": 4, "hit_cap": True}]


# ---------------------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------------------
def test_cli_runs_an_evaluation_and_prints_the_table(tmp_path, tiny_model, tiny_tokenizer, capsys):
    tiny_model.save_pretrained(tmp_path / "tiny")
    tiny_tokenizer.save_pretrained(tmp_path / "tiny")
    data, _ = _sample(tmp_path, n=4)
    code = main(["rebalance", "eval", "--model", str(tmp_path / "tiny"), "--data", str(data), "--out",
                 str(tmp_path / "out"), "--batch-size", "2", "--bootstrap", "100", "--device", "cpu",
                 "--conditions", "baseline,mask,random-mask"])
    printed = capsys.readouterr().out
    assert code == 0
    assert "accuracy % [Wilson 95% CI], n = 4 questions (log-likelihood)" in printed
    assert "random-mask vs baseline" in printed and "mask vs random-mask" in printed
    assert (tmp_path / "out" / "summary.json").is_file()


def test_cli_reports_bad_data_in_one_line_with_exit_code_2(tmp_path, capsys):
    path = write_csv(tmp_path / "bad.csv", [GOOD_ROW[:5] + ["Z", GOOD_ROW[6]]])
    code = main(["rebalance", "eval", "--data", str(path), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert err == f"memreason rebalance: error: {path}, record 0, field 'answer': answer must be one of A, B, C, D, got 'Z'"


def test_cli_rejects_an_unknown_condition_before_loading_a_model(tmp_path, capsys):
    code = main(["rebalance", "eval", "--conditions", "baseline,inverse", "--model", str(tmp_path / "missing")])
    assert code == 2 and "unknown condition(s) inverse" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------------
# The real model
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.smollm2
def test_smollm2_baseline_matches_sdpa_scores_and_the_method_moves_them(smollm2):
    model, tokenizer = smollm2
    questions = rbe.select_questions(rbe.load_mmlu(rbe.bundled_sample_path()), 8)
    settings = rbe.EvalSettings(conditions=("baseline", "mask"), batch_size=8)
    rows = []
    for condition in settings.make_conditions():
        rbe.evaluate_condition(model, tokenizer, questions, condition, settings, rows.extend)
    contexts = [rbe.encode_prompt(tokenizer, rbe.build_prompt(q, "ll", "raw"), "raw") for q in questions]
    sdpa_scores, _ = rbe.score_continuations(model, contexts, rbe.letter_continuations(tokenizer),
                                             rbe.pad_id_of(tokenizer))
    baseline, method = rows[:8], rows[8:]
    for row, scores in zip(baseline, sdpa_scores):
        assert list(row["logprobs"].values()) == pytest.approx(scores, abs=2e-3)
    moved = max(abs(b["logprobs"][k] - m["logprobs"][k]) for b, m in zip(baseline, method) for k in "ABCD")
    assert moved > 1e-2
    density = [m["diagnostics"]["mask_density"] for m in method]
    assert all(0 < d < 1 for d in density)
    assert model.config._attn_implementation == "sdpa"
