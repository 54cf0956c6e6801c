"""Tests of memreason.train.data: examples and labels, batches, the validation split, ablations, the sampler."""

import pytest
import torch

from memreason.errors import DataError
from memreason.train.data import (IGNORE_INDEX, LengthGroupedSampler, PadCollator, allocate_markers_randomly,
                                  encode, prepare_example, split_validation)
from train_fixtures import make_traces as _traces
from train_fixtures import one_thread  # noqa: F401  (autouse fixture)

# --- examples and labels ----------------------------------------------------------------------------


def test_labels_are_exactly_the_target_tokens_and_eos(tiny_tokenizer):
    prompt, target = "Question: Is Paris the capital of France?\n", "<x> Paris is the capital. The answer is: True"
    row = prepare_example(tiny_tokenizer, prompt, target, max_length=512)
    prompt_ids, target_ids = encode(tiny_tokenizer, prompt), encode(tiny_tokenizer, target)
    eos = tiny_tokenizer.eos_token_id
    assert row["input_ids"] == prompt_ids + target_ids + [eos]
    assert row["labels"] == [IGNORE_INDEX] * len(prompt_ids) + target_ids + [eos]
    assert row["n_prompt"] == len(prompt_ids)


def test_prompt_and_target_are_tokenised_separately(tiny_tokenizer):
    # "Pari" + "s is ..." would merge into the corpus word "Paris" if the strings were joined first
    prompt, target = "Question: Pari", "s is the capital of France."
    joined = encode(tiny_tokenizer, prompt + target)
    row = prepare_example(tiny_tokenizer, prompt, target, max_length=512)
    assert row["input_ids"][:-1] == encode(tiny_tokenizer, prompt) + encode(tiny_tokenizer, target)
    assert row["input_ids"][:-1] != joined  # the boundary merge the original's x + y tokenisation suffered


def test_eos_counts_towards_the_length_and_long_examples_are_dropped_not_truncated(tiny_tokenizer):
    prompt, target = "Question: Is it?\n", "The answer is: True"
    n = len(encode(tiny_tokenizer, prompt)) + len(encode(tiny_tokenizer, target)) + 1
    assert prepare_example(tiny_tokenizer, prompt, target, max_length=n) is not None
    assert prepare_example(tiny_tokenizer, prompt, target, max_length=n - 1) is None


def test_model_loss_is_the_mean_nll_of_the_target_tokens_only(tiny_tokenizer, tiny_model):
    rows = [prepare_example(tiny_tokenizer, "Question: Is Paris in France?\n", "Paris is in France.", 512),
            prepare_example(tiny_tokenizer, "Question: Is the Pacific Ocean larger than the Atlantic Ocean?\n",
                            "The Pacific Ocean is the largest ocean on Earth. The answer is: True", 512)]
    batch = PadCollator(tiny_tokenizer.pad_token_id)(rows)
    with torch.no_grad():
        out = tiny_model(**batch)
        logits = tiny_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    log_probs = torch.log_softmax(logits.float(), dim=-1)  # [batch, seq, vocab]
    nll = []
    for i, row in enumerate(rows):
        for j in range(row["n_prompt"], len(row["input_ids"])):  # every target token, EOS included
            nll.append(-log_probs[i, j - 1, row["input_ids"][j]])  # position j-1 predicts token j
    assert len(nll) == sum(len(r["input_ids"]) - r["n_prompt"] for r in rows)
    assert out.loss.item() == pytest.approx(torch.stack(nll).mean().item(), rel=1e-5)


def test_collator_right_pads_with_the_pad_token_and_masks_padding():
    rows = [{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [8], "labels": [8]}]
    batch = PadCollator(pad_id=3)(rows)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 3, 3]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert PadCollator(pad_id=3, pad_to=5)(rows)["input_ids"].shape == (2, 5)


def test_collator_builds_what_data_collator_for_seq2seq_builds_and_ignores_the_tokenizer_padding_side(
        tiny_tokenizer):
    from transformers import DataCollatorForSeq2Seq

    rows = [prepare_example(tiny_tokenizer, "Question: Is Paris in France?\n", "Paris is in France.", 512),
            prepare_example(tiny_tokenizer, "Question: Is the Pacific larger?\n",
                            "The Pacific Ocean is the largest ocean on Earth. The answer is: True", 512)]
    features = [{"input_ids": r["input_ids"], "labels": r["labels"]} for r in rows]
    ours = PadCollator(tiny_tokenizer.pad_token_id, multiple_of=8)(rows)
    assert tiny_tokenizer.padding_side == "right"
    upstream = DataCollatorForSeq2Seq(tiny_tokenizer, padding=True, pad_to_multiple_of=8)(features)
    assert set(upstream) == set(ours)
    assert all(torch.equal(ours[key], upstream[key]) for key in ours)
    tiny_tokenizer.padding_side = "left"  # a tokenizer-wide setting: upstream follows it, training must not
    flipped = DataCollatorForSeq2Seq(tiny_tokenizer, padding=True, pad_to_multiple_of=8)(features)
    assert not torch.equal(flipped["input_ids"], ours["input_ids"])
    again = PadCollator(tiny_tokenizer.pad_token_id, multiple_of=8)(rows)
    assert all(torch.equal(ours[key], again[key]) for key in ours)


# --- data: validation split, ablations, batching -------------------------------------------------------


def test_validation_split_is_seeded_disjoint_and_keeps_file_order():
    traces = _traces(40)
    train, val = split_validation(traces, fraction=0.1, size=None, seed=3)
    assert len(val) == 4 and len(train) == 36
    assert {t.question for t in train}.isdisjoint({t.question for t in val})
    assert split_validation(traces, fraction=0.1, size=None, seed=3) == (train, val)
    assert split_validation(traces, fraction=0.1, size=None, seed=4)[1] != val
    assert val == [t for t in traces if t in val]
    with pytest.raises(DataError, match="cannot hold out"):
        split_validation(traces[:3], fraction=0.1, size=3, seed=0)


def test_random_marker_allocation_shuffles_kinds_but_keeps_counts_texts_and_is_seeded():
    traces = _traces(30)
    shuffled = allocate_markers_randomly(traces, seed=1)
    kinds = [s.kind for t in traces for s in t.steps]
    new_kinds = [s.kind for t in shuffled for s in t.steps]
    assert sorted(kinds) == sorted(new_kinds) and kinds != new_kinds
    assert [s.text for t in traces for s in t.steps] == [s.text for t in shuffled for s in t.steps]
    assert [t.answer for t in shuffled] == [t.answer for t in traces]
    assert allocate_markers_randomly(traces, seed=1) == shuffled
    assert allocate_markers_randomly(traces, seed=2) != shuffled


def test_length_grouped_sampler_depends_only_on_seed_and_epoch_and_cuts_padding():
    lengths = [(i * 37) % 100 + 5 for i in range(64)]
    sampler = LengthGroupedSampler(lengths, batch_size=4, seed=0)
    first = list(sampler)
    assert sorted(first) == list(range(64))
    assert list(LengthGroupedSampler(lengths, batch_size=4, seed=0)) == first
    sampler.set_epoch(1)
    assert list(sampler) != first

    def padding(order):
        batches = [order[k:k + 4] for k in range(0, len(order), 4)]
        return sum(max(lengths[i] for i in b) * len(b) - sum(lengths[i] for i in b) for b in batches)

    random_order = torch.randperm(64, generator=torch.Generator().manual_seed(0)).tolist()
    assert padding(first) < padding(random_order) / 3


def test_a_short_final_batch_stays_last_so_batch_boundaries_never_shift():
    sampler = LengthGroupedSampler(list(range(10)), batch_size=4, seed=5)
    batches = sampler.batches()
    assert [len(b) for b in batches] == [4, 4, 2]
