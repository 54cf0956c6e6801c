"""The sparse trainable-token forward equals PEFT's: outputs and gradients, tied and untied heads, every mode
that trains token rows; merged layers and the saved adapter are untouched."""

import pytest
import torch

from conftest import build_tiny_model
from memreason.train.recipe import wrap_model
from memreason.train.sparse_tokens import dense_token_rows, sparse_token_rows

VOCAB, NEW = 96, [90, 91, 92, 95]


def _wrapped(mode, tie):
    model = build_tiny_model(VOCAB, tie=tie)
    peft_model = wrap_model(model, mode, NEW, lora_r=4, lora_alpha=4, lora_dropout=0.0, lora_target="mlp")
    peft_model.train()
    with torch.no_grad():  # trained rows that differ from the base rows, and a LoRA that is not zero
        for name, parameter in peft_model.named_parameters():
            if parameter.requires_grad:
                parameter.add_(torch.randn_like(parameter) * 0.1)
    return peft_model


def _step(model, ids):
    model.zero_grad(set_to_none=True)
    out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return out.logits.detach(), out.loss.detach(), grads


@pytest.mark.parametrize("mode", ["lora+tokens", "tokens"])
@pytest.mark.parametrize("tie", [True, False])
def test_sparse_forward_gives_peft_outputs_and_gradients(mode, tie):
    model = _wrapped(mode, tie)
    ids = torch.tensor([[5, 90, 7, 91, 95, 3, 92, 8], [90, 90, 4, 6, 95, 2, 1, 91]])
    dense = _step(model, ids)
    assert sparse_token_rows(model) == 2  # embedding and head (a tied head shares the rows)
    sparse = _step(model, ids)
    assert torch.allclose(sparse[0], dense[0], atol=1e-6) and torch.allclose(sparse[1], dense[1], atol=1e-7)
    assert sparse[2].keys() == dense[2].keys() and any("trainable_tokens" in n for n in dense[2])
    for name in dense[2]:
        assert torch.allclose(sparse[2][name], dense[2][name], atol=1e-6), name
    # the frozen matrices get no gradient and stay as they were
    assert all(p.grad is None for p in model.parameters() if not p.requires_grad)
    assert dense_token_rows(model) >= 1
    again = _step(model, ids)
    assert torch.equal(again[0], dense[0])


def test_the_embedding_rows_are_exact_and_merging_is_untouched():
    model = _wrapped("lora+tokens", True)
    ids = torch.tensor([[5, 90, 7, 91, 95, 3]])
    embed = model.get_input_embeddings()
    dense = embed(ids)
    assert sparse_token_rows(model) >= 1
    assert torch.equal(embed(ids), dense)  # a lookup and a select: bit for bit
    model.eval()
    with torch.no_grad():
        unmerged = model(input_ids=ids).logits
        merged = model.merge_and_unload()(input_ids=ids).logits
    assert torch.allclose(unmerged, merged, atol=1e-5)
