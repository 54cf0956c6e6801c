import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from memreason.generate import _RowStopper, answer_complete, generate_texts
from memreason.tasks import ANSWER_MARKER, get_task


def truncate_at_answer(text: str) -> str:
    """Test oracle: the text up to the end of its first complete answer line (all of it if none)."""
    position = text.find(ANSWER_MARKER)
    while position >= 0:
        start = position + len(ANSWER_MARKER)
        line, newline, _ = text[start:].partition("\n")
        if not newline:
            return text
        if line.strip():
            return text[:start + len(line)]
        position = text.find(ANSWER_MARKER, start)
    return text

PROMPTS = ["Question: Is ice lighter than water?\n", "Question: Paris?\n", "Options: A.bank B.library\n",
           "The capital of France is", "memory reason answer"]


def test_batched_and_unbatched_greedy_generation_agree(tiny_model, tiny_tokenizer):
    batched = generate_texts(tiny_model, tiny_tokenizer, PROMPTS, max_new_tokens=12, batch_size=5)
    single = generate_texts(tiny_model, tiny_tokenizer, PROMPTS, max_new_tokens=12, batch_size=1)
    assert [g.text for g in batched] == [g.text for g in single]
    assert [g.n_tokens for g in batched] == [g.n_tokens for g in single]
    assert all(g.n_tokens <= 12 for g in batched)


def test_results_come_back_in_prompt_order(tiny_model, tiny_tokenizer):
    together = generate_texts(tiny_model, tiny_tokenizer, PROMPTS, max_new_tokens=6, batch_size=2)
    one_by_one = [generate_texts(tiny_model, tiny_tokenizer, [p], max_new_tokens=6)[0] for p in PROMPTS]
    assert [g.text for g in together] == [g.text for g in one_by_one]


def test_sampling_is_seeded(tiny_model, tiny_tokenizer):
    first = generate_texts(tiny_model, tiny_tokenizer, PROMPTS, max_new_tokens=8, do_sample=True, seed=3)
    again = generate_texts(tiny_model, tiny_tokenizer, PROMPTS, max_new_tokens=8, do_sample=True, seed=3)
    assert [g.text for g in first] == [g.text for g in again]


answer_lines = st.sampled_from(["The answer is: True", "The answer is: False", "The answer is: B.library",
                                "The answer is:", "The answer is: THE", "The answer is: (C)"])
chunks = st.one_of(st.text(alphabet="ab \nTF.:", max_size=12), answer_lines)


@settings(max_examples=300)
@given(parts=st.lists(chunks, max_size=8))
def test_stopping_at_the_first_complete_answer_line_never_cuts_the_answer(parts):
    text = "".join(parts)
    task = get_task("strategyqa")
    letters = get_task("commonsenseqa")
    stop = next((i for i in range(len(text) + 1) if answer_complete(text[:i])), None)
    if stop is None:
        assert truncate_at_answer(text) == text
        return
    kept = text[:stop]
    assert kept.endswith("\n")
    # the answer line is whole: extraction from what we kept equals extraction from the full line
    full_line = truncate_at_answer(text)
    assert kept.rstrip("\n") == full_line
    assert task.extract(kept) == task.extract(full_line) == task.extract(full_line + "\nmore text")
    assert letters.extract(kept) == letters.extract(full_line)
    assert task.extract(kept) is not None or letters.extract(kept) is not None or kept.strip() != ""


def test_row_stopper_stops_only_after_the_answer_line_ends(tiny_tokenizer):
    prompt = tiny_tokenizer("Question: x?\n", add_special_tokens=False)["input_ids"]
    text = "Paris is in France.\nThe answer is: True\nextra"
    ids = tiny_tokenizer(text, add_special_tokens=False)["input_ids"]
    stopper = _RowStopper(tiny_tokenizer, len(prompt), 1, {tiny_tokenizer.eos_token_id}, stop_at_answer=True)
    stopped_at = None
    for n in range(1, len(ids) + 1):
        done = stopper(torch.tensor([prompt + ids[:n]]), None)
        if done[0] and stopped_at is None:
            stopped_at = n
    assert stopped_at is not None
    generated = tiny_tokenizer.decode(ids[:stopped_at])
    assert generated.rstrip("\n") == "Paris is in France.\nThe answer is: True"
    assert stopper.lengths[0] == stopped_at and stopper.reasons[0] == "answer"


def test_row_stopper_reports_eos(tiny_tokenizer):
    eos = tiny_tokenizer.eos_token_id
    stopper = _RowStopper(tiny_tokenizer, 1, 2, {eos}, stop_at_answer=True)
    done = stopper(torch.tensor([[5, eos], [5, 6]]), None)
    assert done.tolist() == [True, False] and stopper.reasons[0] == "eos" and stopper.lengths[0] == 1


def _hf_generate(model, tokenizer, batch, max_new_tokens, stop):
    """The reference: transformers' generate() with the same stop rule and log-prob recorder."""
    from transformers import LogitsProcessorList, StoppingCriteriaList

    from memreason.generate import _TokenLogprobs

    width = batch["input_ids"].shape[1]
    stopper = _RowStopper(tokenizer, width, batch["input_ids"].shape[0], stop, stop_at_answer=True)
    recorder = _TokenLogprobs()
    with torch.no_grad():
        output = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=0,
                                eos_token_id=sorted(stop), stopping_criteria=StoppingCriteriaList([stopper]),
                                logits_processor=LogitsProcessorList([recorder]), temperature=None, top_p=None,
                                top_k=None)
    logprobs = recorder.finish(output)
    rows = []
    for r in range(output.shape[0]):
        length = stopper.lengths[r] if stopper.done[r] else output.shape[1] - width
        rows.append((output[r, width:width + length].tolist(), stopper.reasons[r], logprobs[r][:length]))
    return rows


def test_pruned_greedy_decoding_equals_generate_while_rows_stop_at_different_steps(tiny_model, tiny_tokenizer):
    from memreason.generate import _greedy_pruned, encode_prompts, left_pad

    batch = left_pad(encode_prompts(tiny_tokenizer, PROMPTS), 0)
    free = _hf_generate(tiny_model, tiny_tokenizer, batch, 16, {-1})
    # stop on tokens two rows emit mid-way, so rows leave the batch at different steps and others run to the cap
    stop = {free[0][0][3], free[2][0][9]}
    want = _hf_generate(tiny_model, tiny_tokenizer, batch, 16, stop)
    with torch.no_grad():
        got = _greedy_pruned(tiny_model, tiny_tokenizer, batch, 16, stop, True, logprobs=True)
    assert [g[:2] for g in got] == [w[:2] for w in want]
    assert len({len(g[0]) for g in got}) >= 2 and {"eos", "length"} <= {g[1] for g in got}
    for (_, _, ours), (_, _, theirs) in zip(got, want):
        assert torch.allclose(torch.tensor(ours), torch.tensor(theirs), atol=1e-5)


def test_a_generation_config_that_processes_logits_decodes_through_generate(tiny_model, tiny_tokenizer, monkeypatch):
    import memreason.generate as generate

    monkeypatch.setattr(tiny_model.generation_config, "repetition_penalty", 1.3)
    monkeypatch.setattr(generate, "_greedy_pruned", None)  # would raise if called
    out = generate_texts(tiny_model, tiny_tokenizer, PROMPTS[:2], max_new_tokens=4)
    assert len(out) == 2 and all(g.n_tokens <= 4 for g in out)
