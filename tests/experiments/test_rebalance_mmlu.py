"""Tests for memreason.experiments.rebalance_mmlu and its statistics (experiments.rebalance_report).

Tiny random models and the tiny BPE tokenizer from conftest (on it " A" is one token and " B" two, so the
log-likelihood scorer's multi-token path runs; the single-token path is tested with explicit ids).
"""

from __future__ import annotations

import csv
import json
from dataclasses import replace

import pytest
import torch

from memreason.data.mmlu import bundled_sample_path, load_mmlu, select_questions
from memreason.errors import ConfigError
from memreason.experiments import rebalance_mmlu as rbe
from memreason.experiments.rebalance_report import format_report, summarise
from memreason.generate import continuation_logprobs, encode_prompts
from memreason.interventions.attention_rebalance import rebalance
from memreason.stats import mcnemar_exact
from memreason.tasks import get_task

HEADER = ["question", "A", "B", "C", "D", "answer", "subject"]


@pytest.fixture
def tiny_model(tiny_tokenizer):
    # conftest's builder with three layers, not two: with h = L - 1 a 2-layer model's only boosted layer
    # has gain 1, so the method would be a no-op.
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


def _sample(tmp_path, n=6):
    questions = load_mmlu(bundled_sample_path())
    rows = [[q.question, *q.options, q.answer, q.subject] for q in select_questions(questions, n)]
    path = write_csv(tmp_path / "sample.csv", rows)
    return path, load_mmlu(path)


def _run(settings, data, out, model, tokenizer, **changes):
    """``run`` on an already loaded model, reading ``data`` and writing ``out``."""
    return rbe.run(replace(settings, data=str(data), out=str(out), **changes), model=model, tokenizer=tokenizer)


def _count_forwards(model):
    calls = []
    handle = model.register_forward_hook(lambda *args: calls.append(1))
    return calls, handle


# ---------------------------------------------------------------------------------------------------------
# Prompts
# ---------------------------------------------------------------------------------------------------------
def test_prompts_list_the_options_and_end_where_the_answer_is_scored(tiny_tokenizer):
    question = load_mmlu(bundled_sample_path())[0]
    raw = rbe.build_prompt(question, "ll", "raw")
    assert raw.startswith("The following is a multiple choice question about elementary mathematics.")
    assert raw.endswith("\nA. 56\nB. 54\nC. 48\nD. 64\nAnswer:")
    chat = rbe.build_prompt(question, "ll", "chat", tiny_tokenizer)
    assert chat.startswith("<|im_start|>user\n") and chat.endswith("<|im_start|>assistant\nThe answer is:")
    cot = rbe.build_prompt(question, "cot", "raw")
    assert "'The answer is: X', where X is A, B, C or D" in cot and cot.endswith("D. 64\n")


def test_chat_style_without_a_chat_template_is_a_config_error(tiny_tokenizer):
    tiny_tokenizer.chat_template = None
    question = load_mmlu(bundled_sample_path())[0]
    with pytest.raises(ConfigError, match="chat template"):
        rbe.build_prompt(question, "cot", "chat", tiny_tokenizer)


def test_raw_prompts_tokenise_as_the_tokenizer_with_its_special_tokens_would(tiny_tokenizer):
    # Raw prompts used to be tokenised with add_special_tokens=True; rendered text must give the same ids.
    from tokenizers.processors import TemplateProcessing

    question = load_mmlu(bundled_sample_path())[0]
    plain = rbe.build_prompt(question, "ll", "raw", tiny_tokenizer)
    assert encode_prompts(tiny_tokenizer, [plain])[0] == tiny_tokenizer(plain, add_special_tokens=True).input_ids
    bos = tiny_tokenizer.bos_token_id
    tiny_tokenizer._tokenizer.post_processor = TemplateProcessing(single=f"{tiny_tokenizer.bos_token} $A",
                                                                  special_tokens=[(tiny_tokenizer.bos_token, bos)])
    for mode in ("ll", "cot"):
        rendered = rbe.build_prompt(question, mode, "raw", tiny_tokenizer)
        undecorated = rbe.build_prompt(question, mode, "raw")
        ids = encode_prompts(tiny_tokenizer, [rendered])[0]
        assert ids[0] == bos and ids == tiny_tokenizer(undecorated, add_special_tokens=True).input_ids


# ---------------------------------------------------------------------------------------------------------
# Log-likelihood scoring
# ---------------------------------------------------------------------------------------------------------
def test_single_token_scores_equal_the_next_token_log_softmax_and_ignore_left_padding(tiny_model):
    contexts = [[5, 9, 14, 20, 33], [7, 8], [40, 41, 42]]
    continuations = [[11], [12], [13], [14]]
    scores, rows = rbe.score_continuations(tiny_model, contexts, continuations, 2)
    assert rows == [0, 1, 2]
    for context, got in zip(contexts, scores):
        with torch.no_grad():
            logprobs = torch.log_softmax(tiny_model(torch.tensor([context])).logits[0, -1], -1)
        torch.testing.assert_close(torch.tensor(got), logprobs[[11, 12, 13, 14]], atol=1e-5, rtol=1e-5)


def test_single_token_fast_path_gives_what_continuation_logprobs_gives(tiny_model):
    # The one-forward fast path is a shortcut for generate.continuation_logprobs, not a second scorer.
    contexts = [[5, 9, 14, 20, 33], [7, 8], [40, 41, 42]]
    continuations = [[11], [12], [13], [14]]
    fast, _ = rbe.score_continuations(tiny_model, contexts, continuations, 2)
    general = continuation_logprobs(tiny_model, [(c, o) for c in contexts for o in continuations], 2)
    assert [v for row in fast for v in row] == pytest.approx(general, abs=1e-5)
    with rebalance(tiny_model, alpha=0.5):
        fast, _ = rbe.score_continuations(tiny_model, contexts, continuations, 2)
        general = continuation_logprobs(tiny_model, [(c, o) for c in contexts for o in continuations], 2)
    assert [v for row in fast for v in row] == pytest.approx(general, abs=1e-5)


def test_multi_token_scores_sum_the_continuation_token_log_probabilities(tiny_model):
    contexts = [[5, 9, 14], [7, 8, 30, 31, 32]]
    continuations = [[11, 12], [13], [14, 15, 16], [17]]
    scores, rows = rbe.score_continuations(tiny_model, contexts, continuations, 2)
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
    settings = rbe.RebalanceSettings(conditions=("baseline", "mask"), bootstrap_resamples=500)
    summary = summarise(_rows("baseline", base, categories) + _rows("mask", method, categories),
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
    assert "baseline" in format_report(summary) and "+20.0" in format_report(summary)


def test_summary_compares_the_method_with_every_control_as_well_as_the_baseline():
    categories = ["STEM"] * 4
    names = ["baseline", "mask", "boost-all", "random-mask"]
    rows = [r for name in names for r in _rows(name, [1, 0, 1, 0], categories)]
    summary = summarise(rows, names, rbe.RebalanceSettings(bootstrap_resamples=100))
    pairs = [(c["first"], c["second"]) for c in summary["comparisons"]]
    assert pairs == [("baseline", "mask"), ("baseline", "boost-all"), ("baseline", "random-mask"),
                     ("boost-all", "mask"), ("random-mask", "mask")]


def test_verdict_requires_the_method_to_beat_baseline_and_both_controls():
    n = 40
    categories = ["STEM"] * n
    names = ["baseline", "mask", "boost-all", "random-mask"]
    weak = [1] * 5 + [0] * (n - 5)
    strong = [1] * 25 + [0] * (n - 25)
    settings = rbe.RebalanceSettings(bootstrap_resamples=500)
    rows = (_rows("baseline", weak, categories) + _rows("mask", strong, categories)
            + _rows("boost-all", weak, categories) + _rows("random-mask", weak, categories))
    assert summarise(rows, names, settings)["verdict"]["mask_matters"] is True
    rows = [r for r in rows if r["condition"] != "boost-all"] + _rows("boost-all", strong, categories)
    verdict = summarise(rows, names, settings)["verdict"]
    assert verdict["mask_matters"] is False and "mask vs boost-all: +0.0 points" in verdict["reason"]
    partial = summarise([r for r in rows if r["condition"] in ("baseline", "mask")], ["baseline", "mask"],
                        settings)
    assert partial["verdict"]["mask_matters"] is None


# ---------------------------------------------------------------------------------------------------------
# Settings
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs,match", [
    ({"mode": "mc"}, "unknown evaluation mode"),
    ({"conditions": ("mask", "inverse")}, "unknown condition"),
    ({"conditions": ("mask", "mask")}, "listed twice"),
    ({"batch_size": 0}, "batch_size"),
    ({"limit": 0}, "limit"),
    ({"theta": 2.0}, "theta"),
    ({"seed": -1}, "seed"),
    ({"depth_h": 0}, "depth_h"),
    ({"max_new_tokens": -5}, "max_new_tokens"),
    ({"device": ""}, "device"),
])
def test_bad_settings_are_config_errors(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        rbe.RebalanceSettings(**kwargs)


def test_every_bad_setting_is_reported_at_once():
    with pytest.raises(ConfigError) as info:
        rbe.RebalanceSettings(mode="mc", batch_size=0, limit=-3, theta=2.0)
    message = str(info.value)
    for part in ("unknown evaluation mode", "batch_size", "limit", "theta"):
        assert part in message


def test_conditions_may_be_given_as_one_comma_separated_string():
    assert rbe.RebalanceSettings(conditions=("mask, boost-all",)).conditions == ("baseline", "mask", "boost-all")


def test_baseline_is_always_part_of_the_run_and_legacy_uses_h_31():
    settings = rbe.RebalanceSettings(conditions=("mask", "legacy"))
    conditions = settings.make_conditions()
    assert [c.name for c in conditions] == ["baseline", "mask", "legacy"]
    assert conditions[0].mode is None and conditions[2].mode == "mask" and conditions[2].depth_h == 31


@pytest.mark.parametrize("changes,match", [
    ({"data": "no/such/file.csv"}, "data: no such file"),
    ({"model": "./no-such-model"}, "model: no such file"),
    ({"model": "missing.gguf"}, "model: no such file"),
    ({"dtype": "float8"}, "dtype"),
    ({"device": "gpu"}, "device: 'gpu' is not a device"),
])
def test_environment_problems_are_found_before_anything_loads(tmp_path, changes, match):
    settings = rbe.RebalanceSettings(**changes)
    assert any(match in problem for problem in rbe.check(settings))
    with pytest.raises(ConfigError, match=match):
        rbe.run(settings, model="not loaded: run must fail before touching it")


def test_an_out_path_that_is_a_file_is_found_before_anything_loads(tmp_path):
    (tmp_path / "file").write_text("x")
    assert rbe.check(rbe.RebalanceSettings(out=str(tmp_path / "file"))) == [f"out: {tmp_path / 'file'} is a file; "
                                                                            "give a directory"]
    assert rbe.check(rbe.RebalanceSettings(out=str(tmp_path), data=str(bundled_sample_path()))) == []


def test_the_run_key_is_the_settings_digest_of_what_changes_an_answer():
    from memreason.io import settings_digest

    settings = rbe.RebalanceSettings()
    key = rbe.run_key(settings, "m", "sha", "float32")
    assert key == settings_digest(rbe.run_identity(settings, "m", "sha", "float32"))
    same = replace(settings, limit=3, batch_size=2, conditions=("baseline",), bootstrap_resamples=5, out="elsewhere")
    assert rbe.run_key(same, "m", "sha", "float32") == key
    for changed in (replace(settings, alpha=0.3), replace(settings, mode="cot"), replace(settings, seed=1)):
        assert rbe.run_key(changed, "m", "sha", "float32") != key
    assert rbe.run_key(settings, "m", "sha", "bfloat16") != key


# ---------------------------------------------------------------------------------------------------------
# Runs
# ---------------------------------------------------------------------------------------------------------
def test_ll_run_writes_outputs_and_a_rerun_resumes_without_model_calls(tmp_path, tiny_model, tiny_tokenizer):
    data, questions = _sample(tmp_path)
    settings = rbe.RebalanceSettings(batch_size=4, bootstrap_resamples=200)
    out = tmp_path / "out"
    summary = _run(settings, data, out, tiny_model, tiny_tokenizer)
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
    assert json.loads((out / "run_key.json").read_text())["run_key"] == summary["run"]["run_key"] == row["run_key"]

    calls, handle = _count_forwards(tiny_model)
    try:
        again = _run(settings, data, out, tiny_model, tiny_tokenizer)
    finally:
        handle.remove()
    assert calls == [] and again == summary


def test_interrupted_run_recomputes_only_the_missing_rows(tmp_path, tiny_model, tiny_tokenizer):
    data, questions = _sample(tmp_path)
    settings = rbe.RebalanceSettings(conditions=("baseline", "mask"), batch_size=6, bootstrap_resamples=200)
    out = tmp_path / "out"
    complete = _run(settings, data, out, tiny_model, tiny_tokenizer)
    jsonl = out / "per_question.jsonl"
    lines = jsonl.read_text().splitlines(keepends=True)
    jsonl.write_text("".join(lines[:6]) + lines[6][:40])  # baseline done, then a line cut short
    calls, handle = _count_forwards(tiny_model)
    try:
        resumed = _run(settings, data, out, tiny_model, tiny_tokenizer)
    finally:
        handle.remove()
    assert len(calls) == 1  # one batch of the mask condition
    assert resumed["conditions"] == complete["conditions"]
    rows = [json.loads(line) for line in jsonl.read_text().splitlines()]  # the torn line was repaired
    assert len(rows) == 12 and len({(r["qid"], r["condition"]) for r in rows}) == 12
    assert jsonl.read_text().startswith("".join(lines[:6]))


def test_an_out_dir_of_another_run_is_refused_unless_overwrite(tmp_path, tiny_model, tiny_tokenizer):
    data, questions = _sample(tmp_path, n=4)
    out = tmp_path / "out"
    first = rbe.RebalanceSettings(conditions=("baseline", "mask"), bootstrap_resamples=100)
    _run(first, data, out, tiny_model, tiny_tokenizer)
    other = rbe.RebalanceSettings(conditions=("baseline", "mask"), alpha=0.5, bootstrap_resamples=100)
    with pytest.raises(ConfigError, match="different run"):
        _run(other, data, out, tiny_model, tiny_tokenizer)
    summary = _run(other, data, out, tiny_model, tiny_tokenizer, overwrite=True)
    assert summary["conditions"]["mask"]["params"]["alpha"] == 0.5
    rows = [json.loads(line) for line in (out / "per_question.jsonl").read_text().splitlines()]
    assert {row["params"]["alpha"] for row in rows if row["condition"] == "mask"} == {0.5}


def test_an_out_dir_written_before_run_key_json_existed_is_still_checked(tmp_path, tiny_model, tiny_tokenizer):
    data, questions = _sample(tmp_path, n=4)
    out = tmp_path / "out"
    first = rbe.RebalanceSettings(conditions=("baseline", "mask"), bootstrap_resamples=100)
    _run(first, data, out, tiny_model, tiny_tokenizer)
    (out / "run_key.json").unlink()
    with pytest.raises(ConfigError, match="different run"):
        _run(first, data, out, tiny_model, tiny_tokenizer, alpha=0.5)
    calls, handle = _count_forwards(tiny_model)
    try:
        _run(first, data, out, tiny_model, tiny_tokenizer)  # its own rows are resumed, not recomputed
    finally:
        handle.remove()
    assert calls == []


def test_ll_diagnostics_of_a_padded_batch_match_the_question_run_alone(tmp_path, tiny_model, tiny_tokenizer):
    _, questions = _sample(tmp_path, n=3)
    settings = rbe.RebalanceSettings(conditions=("mask",), batch_size=3)
    condition = settings.make_conditions()[1]
    rows = []
    rbe.evaluate_condition(tiny_model, tiny_tokenizer, questions, condition, settings, rows.extend)
    lengths = [row["prompt_tokens"] for row in rows]
    assert len(set(lengths)) > 1, "the batch must need padding"
    for question, row in zip(questions, rows):
        ids = encode_prompts(tiny_tokenizer, [rbe.build_prompt(question, "ll", "raw", tiny_tokenizer)])[0]
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
        settings = rbe.RebalanceSettings(conditions=("baseline", "random-mask"), batch_size=batch_size, alpha=2.0)
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


def test_cot_diagnostics_of_a_padded_batch_match_the_question_run_alone(tmp_path, tiny_model, tiny_tokenizer):
    # generate_texts reorders a batch longest first; each question must still read its own batch rows.
    _, questions = _sample(tmp_path, n=3)
    results = {}
    for batch_size in (1, 3):
        settings = rbe.RebalanceSettings(mode="cot", prompt_style="raw", conditions=("mask",), max_new_tokens=5,
                                         batch_size=batch_size)
        rows = []
        rbe.evaluate_condition(tiny_model, tiny_tokenizer, questions, settings.make_conditions()[1], settings,
                               rows.extend)
        results[batch_size] = rows
    lengths = [row["prompt_tokens"] for row in results[3]]
    assert len(set(lengths)) == 3 and lengths != sorted(lengths, reverse=True), "the batch must be reordered"
    for alone, batched in zip(results[1], results[3]):
        assert (batched["qid"], batched["text"], batched["n_generated"]) == (alone["qid"], alone["text"],
                                                                              alone["n_generated"])
        for key in ("mask_density", "keys_per_row", "added_mass"):
            assert batched["diagnostics"][key] == pytest.approx(alone["diagnostics"][key], rel=1e-4)


def test_baseline_runs_stock_eager_attention_and_restores_the_models_own(tmp_path, tiny_model, tiny_tokenizer):
    _, questions = _sample(tmp_path, n=2)
    seen = []
    attention = tiny_model.model.layers[0].self_attn
    handle = attention.register_forward_pre_hook(lambda module, args: seen.append(module.config._attn_implementation))
    try:
        settings = rbe.RebalanceSettings(conditions=("baseline", "mask"))
        for condition in settings.make_conditions():
            rbe.evaluate_condition(tiny_model, tiny_tokenizer, questions, condition, settings, lambda rows: None)
    finally:
        handle.remove()
    assert seen == ["eager", "memreason_rebalance"]
    assert tiny_model.config._attn_implementation == "sdpa"


def test_cot_run_generates_within_the_cap_and_scores_with_the_strict_parser(tmp_path, tiny_model, tiny_tokenizer):
    data, questions = _sample(tmp_path, n=4)
    settings = rbe.RebalanceSettings(mode="cot", conditions=("baseline", "mask"), max_new_tokens=6, batch_size=4,
                                     prompt_style="raw", bootstrap_resamples=100)
    summary = _run(settings, data, tmp_path / "out", tiny_model, tiny_tokenizer)
    rows = [json.loads(line) for line in (tmp_path / "out" / "per_question.jsonl").read_text().splitlines()]
    assert len(rows) == 8
    for row in rows:
        assert 1 <= row["n_generated"] <= 6
        assert row["outcome"] == ("unparseable" if get_task("mmlu").extract(row["text"]) is None else row["outcome"])
        assert row["correct"] == (row["outcome"] == "correct")
    baseline = summary["conditions"]["baseline"]
    assert baseline["length"]["max"] <= 6 and 0 <= baseline["parse_rate"] <= 1
    assert summary["conditions"]["mask"]["diagnostics"]["mean_mask_density"] is not None
    assert "length_diff" in summary["comparisons"][0]
    assert "generation: parse rate" in format_report(summary)


def test_generated_length_stops_at_the_first_eos():
    class FakeTokenizer:
        pad_token_id, eos_token_id = 0, 2

        def __call__(self, text, add_special_tokens):
            return {"input_ids": [int(t) for t in text.split()]}

        def decode(self, ids, skip_special_tokens):
            return " ".join(str(int(i)) for i in ids if not (skip_special_tokens and int(i) == 2))

    class FakeModel(torch.nn.Module):
        """Scripted greedy output per row: row 0 writes 5 6 EOS, row 1 writes 5 6 7 8 (to the cap)."""

        script = [[5, 6, 2, 0], [5, 6, 7, 8]]

        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.zeros(1))
            self.generation_config = type("G", (), {"eos_token_id": [2]})()
            self.step, self.alive = 0, [0, 1]

        def forward(self, input_ids, **kwargs):
            # the decoder drops a row from the batch once it has written EOS
            if input_ids.shape[0] < len(self.alive):
                self.alive = [r for r in self.alive if self.script[r][self.step - 1] != 2]
            logits = torch.full((input_ids.shape[0], input_ids.shape[1], 10), -1.0)
            for b, row in enumerate(self.alive):
                logits[b, -1, self.script[row][self.step]] = 1.0
            self.step += 1
            return type("Out", (), {"logits": logits})()

    results, rows = rbe._generate(FakeModel(), FakeTokenizer(), ["9 9", "9"], [[9, 9], [9]], max_new_tokens=4)
    assert results == [{"text": "5 6", "n_generated": 3, "hit_cap": False},
                       {"text": "5 6 7 8", "n_generated": 4, "hit_cap": True}]
    assert rows == [0, 1]


# ---------------------------------------------------------------------------------------------------------
# The real model
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.smollm2
def test_smollm2_baseline_matches_sdpa_scores_and_the_method_moves_them(smollm2):
    model, tokenizer = smollm2
    questions = select_questions(load_mmlu(bundled_sample_path()), 8)
    settings = rbe.RebalanceSettings(conditions=("baseline", "mask"), batch_size=8)
    rows = []
    for condition in settings.make_conditions():
        rbe.evaluate_condition(model, tokenizer, questions, condition, settings, rows.extend)
    contexts = encode_prompts(tokenizer, [rbe.build_prompt(q, "ll", "raw", tokenizer) for q in questions])
    from memreason.generate import pad_id

    sdpa_scores, _ = rbe.score_continuations(model, contexts, rbe.letter_continuations(tokenizer), pad_id(tokenizer))
    baseline, method = rows[:8], rows[8:]
    for row, scores in zip(baseline, sdpa_scores):
        assert list(row["logprobs"].values()) == pytest.approx(scores, abs=2e-3)
    moved = max(abs(b["logprobs"][k] - m["logprobs"][k]) for b, m in zip(baseline, method) for k in "ABCD")
    assert moved > 1e-2
    density = [m["diagnostics"]["mask_density"] for m in method]
    assert all(0 < d < 1 for d in density)
    assert model.config._attn_implementation == "sdpa"
