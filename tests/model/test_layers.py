"""Tests for memreason.model.layers: the layer table, layout detection on other families' tiny configs (issue
#15), PEFT unwrapping, layer-index checks and the errors for models without a decoder layout."""

from __future__ import annotations

import logging

import pytest
import torch
from conftest import build_tiny_model
from tiny_families import DETECTED_FAMILIES, TABLE_FAMILIES, build_family
from transformers import BartConfig, BartForConditionalGeneration, BertConfig, BertForMaskedLM, LlamaConfig, LlamaModel

from memreason.errors import ConfigError
from memreason.model import layers
from memreason.model.layers import FAMILIES, layout

VOCAB = 96

# Where each detected family keeps its parts, read off transformers' modeling files by hand.
EXPECTED = {
    "gemma": ("model", "layers", "self_attn", "o_proj", "mlp", "norm"),
    "gemma2": ("model", "layers", "self_attn", "o_proj", "mlp", "norm"),
    "phi3": ("model", "layers", "self_attn", "o_proj", "mlp", "norm"),
    "phi": ("model", "layers", "self_attn", "dense", "mlp", "final_layernorm"),
    "olmo2": ("model", "layers", "self_attn", "o_proj", "mlp", "norm"),
    "granite": ("model", "layers", "self_attn", "o_proj", "mlp", "norm"),
    "starcoder2": ("model", "layers", "self_attn", "o_proj", "mlp", "norm"),
    "opt": ("model.decoder", "layers", "self_attn", "out_proj", None, "final_layer_norm"),
    "gpt_neox": ("gpt_neox", "layers", "attention", "dense", "mlp", "final_layer_norm"),
    "gptj": ("transformer", "h", "attn", "out_proj", "mlp", "ln_f"),
}


def test_every_detected_family_has_an_expectation():
    assert set(EXPECTED) == set(DETECTED_FAMILIES)
    assert not set(DETECTED_FAMILIES) & set(FAMILIES)  # else they would not exercise detection


@pytest.mark.parametrize("kind", TABLE_FAMILIES)
def test_table_families_use_their_entry(kind, caplog):
    model = build_family(kind, VOCAB)
    with caplog.at_level(logging.WARNING, logger="memreason.model.layers"):
        lay = layout(model)
    assert not lay.detected and lay.family == FAMILIES[kind] and not caplog.records
    body = model.transformer if kind == "gpt2" else model.model
    assert lay.body is body and lay.layers is (body.h if kind == "gpt2" else body.layers)
    assert lay.num_layers == 2
    assert lay.attention(1) is lay.layers[1].get_submodule(lay.family.attention)
    assert lay.attention_output(0) is (body.h[0].attn.c_proj if kind == "gpt2" else body.layers[0].self_attn.o_proj)
    assert lay.mlp(1) is lay.layers[1].mlp
    assert lay.final_norm is (body.ln_f if kind == "gpt2" else body.norm)
    assert lay.lm_head is model.lm_head and lay.embeddings is model.get_input_embeddings()


@pytest.mark.parametrize("kind", DETECTED_FAMILIES)
def test_detected_families_find_every_part(kind):
    model = build_family(kind, VOCAB)
    lay = layout(model)
    body_path, layers_attr, attention, attention_out, mlp, norm = EXPECTED[kind]
    assert lay.detected
    assert (lay.family.body, lay.family.layers, lay.family.attention, lay.family.attention_out, lay.family.mlp,
            lay.family.norm) == EXPECTED[kind]
    body = model.get_submodule(body_path)
    assert lay.body is body and lay.layers is getattr(body, layers_attr) and lay.num_layers == 2
    for i in range(2):
        assert lay.attention(i) is getattr(lay.layers[i], attention)
        assert "Attention" in type(lay.attention(i)).__name__
        assert lay.attention_output(i) is getattr(lay.attention(i), attention_out)
        assert isinstance(lay.attention_output(i), torch.nn.Linear)
    assert lay.final_norm is getattr(body, norm)
    assert lay.lm_head is model.get_output_embeddings() and lay.embeddings is model.get_input_embeddings()
    if mlp is None:
        with pytest.raises(ConfigError, match="has no MLP module that memreason recognises"):
            lay.mlp(0)
    else:
        assert lay.mlp(0) is getattr(lay.layers[0], mlp)


def test_detection_warns_once_per_model_type(caplog):
    layers._warned.discard("gemma")
    model = build_family("gemma", VOCAB)
    with caplog.at_level(logging.WARNING, logger="memreason.model.layers"):
        layout(model)
        layout(model)
        layout(build_family("gemma", VOCAB, seed=1))
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 1
    assert "model type 'gemma' is not in memreason's layer table" in messages[0]
    assert "model.layers[i] (2), attention .self_attn.o_proj" in messages[0]


def test_peft_wrapped_model_has_its_base_layout():
    from peft import LoraConfig, get_peft_model

    base = build_tiny_model(VOCAB)
    wrapped = get_peft_model(base, LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    lay = layout(wrapped)
    assert lay.model is base and lay.layers is base.model.layers
    assert lay.attention(0) is base.model.layers[0].self_attn  # the module whose q/v carry the adapters


def test_check_layer_accepts_negatives_and_names_the_size():
    lay = layout(build_tiny_model(VOCAB, layers=3))
    assert [lay.check_layer(i) for i in (0, 2, -1, -3)] == [0, 2, 2, 0]
    assert lay.layer(-1) is lay.layers[2]
    for bad, message in ((3, "out of range: this model has 3 layers"), (-4, "out of range"),
                         (True, "must be an int"), (1.0, "must be an int")):
        with pytest.raises(ConfigError, match=message):
            lay.check_layer(bad)


def test_bare_decoder_body_is_refused():
    body = LlamaModel(LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                  num_attention_heads=2))
    with pytest.raises(ConfigError, match="no '.model' decoder stack; pass a causal LM"):
        layout(body)


@pytest.mark.parametrize("build", [
    lambda: BertForMaskedLM(BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                       intermediate_size=64)),
    lambda: BartForConditionalGeneration(BartConfig(vocab_size=VOCAB, d_model=32, encoder_layers=1, decoder_layers=1,
                                                    encoder_attention_heads=2, decoder_attention_heads=2,
                                                    encoder_ffn_dim=64, decoder_ffn_dim=64)),
], ids=["bert-encoder", "bart-encoder-decoder"])
def test_models_without_a_decoder_only_layout_are_refused(build):
    with pytest.raises(ConfigError, match="is not a decoder-only causal LM"):
        layout(build())


def test_a_generative_model_with_no_attention_blocks_is_refused():
    class Toy(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = torch.nn.ModuleList([torch.nn.Linear(4, 4)])

        def get_output_embeddings(self):
            return None

    with pytest.raises(ConfigError, match="cannot find the decoder layers of Toy.*found none"):
        layout(Toy())
