"""Tests of memreason.train.trainer: validation generation with merged token rows, and readable log lines."""

import pytest
import torch

from conftest import build_tiny_model
from memreason.model.tokens import TokenScheme, add_scheme_tokens
from memreason.train import wrap_model
from memreason.train.trainer import ValidationAccuracy, format_log, token_rows_merged
from train_fixtures import QUESTIONS
from train_fixtures import one_thread  # noqa: F401  (autouse fixture)


def _as_if_trained(tokenizer, tie: bool):
    """A lora+tokens PEFT model whose LoRA factors and new token rows have moved away from their start."""
    model = build_tiny_model(len(tokenizer), tie=tie)
    ids = add_scheme_tokens(model, tokenizer, TokenScheme())
    peft_model = wrap_model(model, "lora+tokens", ids, 4, 8, 0.0, "all")
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for parameter in peft_model.parameters():
            if parameter.requires_grad:
                parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.5)
    return peft_model.eval()


def _prompts():  # control tokens in the prompt, so the new input rows are read too
    return [f"Question: {q}\n<prefix_0><memory_0>" for q, *_ in QUESTIONS]


class _Counting:
    """Counts PEFT's per-forward rebuilds of the embedding / head matrix."""

    def __init__(self, monkeypatch):
        from peft.tuners.trainable_tokens.layer import TrainableTokensLayer

        self.calls, original = 0, TrainableTokensLayer.get_merged_weights

        def counted(layer, *args, **kwargs):
            self.calls += 1
            return original(layer, *args, **kwargs)

        monkeypatch.setattr(TrainableTokensLayer, "get_merged_weights", counted)


@pytest.mark.parametrize("tie", [True, False], ids=["tied", "untied"])
def test_merged_token_rows_generate_the_same_tokens_without_rebuilding_and_restore_every_weight(
        tiny_tokenizer, monkeypatch, tie):
    from memreason.generate import generate_texts

    model = _as_if_trained(tiny_tokenizer, tie)
    before = {key: value.clone() for key, value in model.state_dict().items()}
    ids = tiny_tokenizer(_prompts()[0], return_tensors="pt")["input_ids"]
    counter = _Counting(monkeypatch)
    with torch.no_grad():
        unmerged_logits = model(ids).logits
    plain = generate_texts(model, tiny_tokenizer, _prompts(), max_new_tokens=12)
    assert counter.calls > 0
    counter.calls = 0
    with token_rows_merged(model):
        with torch.no_grad():
            merged_logits = model(ids).logits
        merged = generate_texts(model, tiny_tokenizer, _prompts(), max_new_tokens=12)
    assert counter.calls == 0  # no [vocab, hidden] copy per forward
    assert merged == plain and torch.equal(merged_logits, unmerged_logits)  # exact, not close
    after = model.state_dict()
    assert after.keys() == before.keys()
    assert all(torch.equal(after[key], before[key]) for key in before)  # base rows restored bit for bit
    with torch.no_grad():
        assert torch.equal(model(ids).logits, unmerged_logits)  # and the unmerged forward is back


def test_validation_generates_with_the_token_rows_merged(tiny_tokenizer, monkeypatch):
    from types import SimpleNamespace

    from memreason.generate import generate_texts
    from memreason.tasks import get_task
    from memreason.traces import Trace

    model = _as_if_trained(tiny_tokenizer, tie=True)
    expected = generate_texts(model, tiny_tokenizer, _prompts(), max_new_tokens=8)
    items = [Trace(q, (), a) for q, *_, a in QUESTIONS]
    callback = ValidationAccuracy(items, _prompts(), get_task("strategyqa"), TokenScheme(), max_new_tokens=8,
                                  batch_size=2, out_path=None)
    callback.trainer = SimpleNamespace(is_fsdp_enabled=False, is_deepspeed_enabled=False)
    counter = _Counting(monkeypatch)
    assert callback._generate(model, tiny_tokenizer, SimpleNamespace(world_size=1)) == expected
    assert counter.calls == 0


def test_a_model_without_token_rows_is_left_as_it_is(tiny_tokenizer, tiny_model):
    before = {key: value.clone() for key, value in tiny_model.state_dict().items()}
    with token_rows_merged(tiny_model) as same:
        assert same is tiny_model
    assert all(torch.equal(value, before[key]) for key, value in tiny_model.state_dict().items())


def test_log_events_become_one_readable_line_each():
    assert format_log({"loss": 2.4781, "grad_norm": 0.8412, "learning_rate": 0.0019, "epoch": 0.5}, 12, 24) \
        == "step 12/24  loss 2.478  grad-norm 0.841  lr 1.9e-3"
    assert format_log({"eval_loss": 2.1, "eval_runtime": 3.2, "eval_samples_per_second": 7.5, "epoch": 0.5},
                      12, 24) == "step 12/24  val-loss 2.1"
    assert format_log({"eval_val_accuracy": 0.625, "eval_val_answer_rate": 1.0, "eval_val_format_rate": 0.95,
                       "eval_val_n": 24}, 12, 24) \
        == "step 12/24  val-accuracy 0.625  answer-rate 1.000  format-rate 0.950  n 24"
    assert format_log({"train_runtime": 173.24, "train_samples_per_second": 0.5, "total_flos": 1e12,
                       "train_loss": 2.30149, "epoch": 1.0}, 24, 24) == "step 24/24  done  mean-loss 2.301  seconds 173.2"
    assert format_log({"num_input_tokens_seen": 4096}, 3, 24) == "step 3/24  num-input-tokens-seen 4096"
