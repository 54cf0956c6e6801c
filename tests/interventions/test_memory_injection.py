"""Tests for memreason.interventions.memory_injection (and the hooks.py / model.layers plumbing it stands on).

Unit tests use tiny random models of each family in the layer table, and of families found by layout
detection (``tests/tiny_families.py``), with a byte-level BPE tokenizer trained here on a few sentences; the
``smollm2`` tests use the real embedded model.
"""

from __future__ import annotations

import logging

import pytest
import torch
from conftest import build_tiny_model
from tiny_families import DETECTED_FAMILIES, TABLE_FAMILIES, build_family
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import BertConfig, BertForMaskedLM, PreTrainedTokenizerFast

from memreason.errors import ConfigError
from memreason.interventions import hooks
from memreason.model.layers import layout
from memreason.interventions.memory_injection import (
    CALIBRATION_TEXTS,
    add_to_attention_output,
    inject,
    layer_encoded_vectors,
    left_padded_batch,
    memory_token_ids,
    memory_vector,
    memory_vectors,
    residual_norms,
)

CORPUS = [
    "The capital of France is Paris.", "The capital of the country where the Eiffel Tower stands is Paris.",
    "The cat sat on the mat.", "A quick brown fox jumps over the lazy dog.", "George Washington fought in the war.",
    "The leader of the United States lives in the White House.", "Tokyo is the capital of Japan.",
    "Mount Fuji is in Japan.", "The weather today is mild.", "cat cat dog dog bird bird",
] * 3

PROMPTS = ["The capital of the country where the Eiffel Tower stands is",
           "The cat sat on the",
           "Mount Fuji is in"]


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="module")
def tokenizer():
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=330, special_tokens=["<pad>", "<eos>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>")


def build(kind: str, vocab: int, **extra):
    """A 3-layer random model (conftest's tiny Llama, or another family's tiny config) that never stops early."""
    if kind == "llama":
        model = build_tiny_model(vocab, layers=3, tie=extra.pop("tie_word_embeddings", True))
    else:
        model = build_family(kind, vocab, layers=3, **extra)
    model.generation_config.pad_token_id = 0
    model.generation_config.eos_token_id = None  # never stop early: compare full-length generations
    return model


FAMILIES = TABLE_FAMILIES


@pytest.fixture(scope="module", params=FAMILIES)
def model(request, tokenizer):
    return build(request.param, len(tokenizer))


@pytest.fixture(scope="module", params=DETECTED_FAMILIES)
def detected(request, tokenizer):
    """A family that is not in the layer table: its layout is found by detection."""
    return build(request.param, len(tokenizer))


@pytest.fixture(scope="module")
def llama(tokenizer):
    return build("llama", len(tokenizer))


def last_logits(model, batch):
    with torch.no_grad():
        return model(**batch).logits[:, -1]


def all_logits(model, batch):
    with torch.no_grad():
        return model(**batch).logits


def single(tokenizer, text):
    return left_padded_batch(tokenizer, [text])


# ------------------------------------------------------------------ exactness of the mechanism

def test_zero_tau_leaves_logits_identical(model, tokenizer):
    batch = left_padded_batch(tokenizer, PROMPTS)
    before = all_logits(model, batch)
    with inject(model, tokenizer, memory="France", layer=1, tau=0.0):
        during = all_logits(model, batch)
    assert torch.equal(before, during)


def test_injection_changes_logits_and_exit_restores_them(model, tokenizer):
    batch = left_padded_batch(tokenizer, PROMPTS)
    count = hooks.hook_count(model)
    before = all_logits(model, batch)
    with inject(model, tokenizer, memory="France", layer=1, tau=4.0):
        assert hooks.hook_count(model) > count
        during = all_logits(model, batch)
    after = all_logits(model, batch)
    assert not torch.allclose(before, during)
    assert torch.equal(before, after)
    assert hooks.hook_count(model) == count


def test_exception_in_block_leaves_no_hook(llama, tokenizer):
    count = hooks.hook_count(llama)
    with pytest.raises(RuntimeError, match="boom"):
        with inject(llama, tokenizer, memory="France", layer=0, tau=1.0):
            raise RuntimeError("boom")
    assert hooks.hook_count(llama) == count


def test_exception_inside_hook_leaves_no_hook(llama, tokenizer):
    count = hooks.hook_count(llama)
    two_rows = torch.randn(2, 64)
    with pytest.raises(ConfigError, match="2 per-row vectors for a batch of 3"):
        with add_to_attention_output(llama, {1: two_rows}):
            llama(**left_padded_batch(tokenizer, PROMPTS))
    assert hooks.hook_count(llama) == count


def test_nested_scopes_remove_only_their_own_hooks(llama, tokenizer):
    count = hooks.hook_count(llama)
    with inject(llama, tokenizer, memory="France", layer=0, tau=1.0):
        outer = hooks.hook_count(llama)
        with inject(llama, tokenizer, memory="Japan", layer=2, tau=1.0):
            assert hooks.hook_count(llama) > outer
        assert hooks.hook_count(llama) == outer
    assert hooks.hook_count(llama) == count


def test_nested_injections_add_up(llama, tokenizer):
    batch = left_padded_batch(tokenizer, PROMPTS)
    a, b = torch.randn(64), torch.randn(64)
    with inject(llama, vector=a, layer=1), inject(llama, vector=b, layer=1):
        nested = all_logits(llama, batch)
    with inject(llama, vector=a + b, layer=1):
        summed = all_logits(llama, batch)
    torch.testing.assert_close(nested, summed, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_injection_equals_adding_to_output_projection(kind, tokenizer):
    model = build(kind, len(tokenizer))
    vec = torch.randn(64)
    batch = left_padded_batch(tokenizer, PROMPTS)
    with inject(model, vector=vec, layer=1, tau=2.0):
        ours = all_logits(model, batch)
    with hooks.scoped_hooks() as scope:  # independent: add 2v to o_proj / c_proj output at real tokens
        mask = batch["attention_mask"].bool()
        scope.add_forward_hook(layout(model).attention_output(1),
                               lambda m, a, out: out + 2.0 * vec * mask[..., None])
        reference = all_logits(model, batch)
    assert torch.equal(ours, reference)


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_injection_equals_adding_to_residual_after_attention(kind, tokenizer):
    """Recompute layer L by hand with v added to the residual between attention and MLP, splice the result in
    through an output hook on the whole decoder layer, and compare the final logits."""
    model = build(kind, len(tokenizer))
    layer, vec = 1, torch.randn(64) * 3
    batch = single(tokenizer, PROMPTS[0])
    block = layout(model).layers[layer]
    seen = {}

    def keep_input(module, args, kwargs):
        seen["h"] = args[0] if args else kwargs["hidden_states"]

    def keep_attention(module, args, output):
        seen["attn"] = output[0]

    with hooks.scoped_hooks() as scope, torch.no_grad():
        scope.add_forward_pre_hook(block, keep_input, with_kwargs=True)
        scope.add_forward_hook(layout(model).attention(layer), keep_attention)
        model(**batch)
    with torch.no_grad():
        mid = seen["h"] + seen["attn"] + vec  # residual stream right after attention, plus v
        if kind == "llama":
            out = mid + block.mlp(block.post_attention_layernorm(mid))
        else:
            out = mid + block.mlp(block.ln_2(mid))
    with hooks.scoped_hooks() as scope:
        scope.add_forward_hook(block, lambda m, a, o: out)
        reference = all_logits(model, batch)
    with inject(model, vector=vec, layer=layer):
        ours = all_logits(model, batch)
    torch.testing.assert_close(ours, reference, atol=1e-5, rtol=1e-5)


def test_last_position_edits_only_the_last_prompt_token(llama, tokenizer):
    batch = single(tokenizer, PROMPTS[0])
    before = all_logits(llama, batch)
    with inject(llama, vector=torch.randn(64) * 5, layer=0, positions="last"):
        during = all_logits(llama, batch)
    assert torch.equal(before[:, :-1], during[:, :-1])  # causal: earlier positions never see the last token
    assert not torch.allclose(before[:, -1], during[:, -1])


def test_span_edits_from_its_start(llama, tokenizer):
    batch = single(tokenizer, PROMPTS[0])
    before = all_logits(llama, batch)
    with inject(llama, vector=torch.randn(64) * 5, layer=0, positions=(2, 4)):
        during = all_logits(llama, batch)
    assert torch.equal(before[:, :2], during[:, :2])
    assert not torch.allclose(before[:, 2], during[:, 2])


def test_negative_span_counts_from_prompt_end(llama, tokenizer):
    batch = single(tokenizer, PROMPTS[0])
    vec = torch.randn(64) * 5
    width = batch["input_ids"].shape[1]
    with inject(llama, vector=vec, layer=0, positions=slice(-3, None)):
        negative = all_logits(llama, batch)
    with inject(llama, vector=vec, layer=0, positions=(width - 3, width)):
        positive = all_logits(llama, batch)
    assert torch.equal(negative, positive)


@pytest.mark.parametrize("positions", ["all", "last", (1, 3)])
def test_batched_left_padded_equals_unbatched_per_row(model, tokenizer, positions):
    vec = torch.randn(64) * 3
    with inject(model, vector=vec, layer=1, positions=positions):
        batched = last_logits(model, left_padded_batch(tokenizer, PROMPTS))
        alone = torch.cat([last_logits(model, single(tokenizer, p)) for p in PROMPTS])
    torch.testing.assert_close(batched, alone, atol=1e-5, rtol=1e-5)


def test_per_row_vectors_equal_one_row_at_a_time(llama, tokenizer):
    vecs = torch.randn(3, 64) * 3
    with add_to_attention_output(llama, {1: vecs}):
        batched = last_logits(llama, left_padded_batch(tokenizer, PROMPTS))
    for i, prompt in enumerate(PROMPTS):
        with add_to_attention_output(llama, {1: vecs[i]}):
            alone = last_logits(llama, single(tokenizer, prompt))
        torch.testing.assert_close(batched[i:i + 1], alone, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("positions", ["all", "last", (0, 2)])
def test_generation_with_cache_equals_full_recompute(model, tokenizer, positions):
    batch = left_padded_batch(tokenizer, PROMPTS[:2])
    batch.pop("position_ids")  # generate derives positions from the mask
    kwargs = dict(max_new_tokens=6, do_sample=False, output_scores=True, return_dict_in_generate=True)
    vec = torch.randn(64) * 4
    with torch.no_grad():
        clean = model.generate(**batch, **kwargs)
        with inject(model, vector=vec, layer=1, positions=positions):
            cached = model.generate(**batch, use_cache=True, **kwargs)
            recomputed = model.generate(**batch, use_cache=False, **kwargs)
    assert torch.equal(cached.sequences, recomputed.sequences)
    torch.testing.assert_close(torch.stack(cached.scores), torch.stack(recomputed.scores), atol=1e-4, rtol=1e-4)
    assert not torch.allclose(torch.stack(clean.scores), torch.stack(cached.scores))


def test_all_positions_reach_generated_tokens(llama, tokenizer):
    """'all' edits the decoding steps too; a span over the whole prompt edits the same prompt tokens only."""
    batch = single(tokenizer, PROMPTS[1])
    batch.pop("position_ids")
    kwargs = dict(max_new_tokens=4, do_sample=False, output_scores=True, return_dict_in_generate=True)
    vec = torch.randn(64) * 4
    with torch.no_grad():
        with inject(llama, vector=vec, layer=1, positions="all"):
            every = llama.generate(**batch, **kwargs)
        with inject(llama, vector=vec, layer=1, positions=(0, None)):
            prompt = llama.generate(**batch, **kwargs)
    assert torch.equal(every.scores[0], prompt.scores[0])  # the prefill step is the same edit
    assert not torch.allclose(every.scores[-1], prompt.scores[-1])


def test_peft_wrapped_model_is_hooked_like_its_base(tokenizer):
    from peft import LoraConfig, get_peft_model

    base = build("llama", len(tokenizer))
    batch = left_padded_batch(tokenizer, PROMPTS)
    vec = torch.randn(64) * 3
    with inject(base, vector=vec, layer=2):
        expected = all_logits(base, batch)
    wrapped = get_peft_model(base, LoraConfig(r=2, target_modules=["q_proj", "v_proj", "o_proj"]))
    count = hooks.hook_count(wrapped)
    with inject(wrapped, vector=vec, layer=2):  # LoRA starts as a no-op, so outputs must match the base
        got = all_logits(wrapped, batch)
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-6)
    assert hooks.hook_count(wrapped) == count


# ------------------------------------------------------------------ encoders

def test_memory_tokens_are_a_set_without_leading_space_by_default(tokenizer):
    assert memory_token_ids(tokenizer, " cat cat", leading_space=False) == [tokenizer.convert_tokens_to_ids("Ġcat")]
    first = tokenizer("France", add_special_tokens=False)["input_ids"]
    assert memory_token_ids(tokenizer, "France") == list(dict.fromkeys(first))
    assert memory_token_ids(tokenizer, "France", leading_space=True) != memory_token_ids(tokenizer, "France")


def test_unembed_vector_is_sum_of_distinct_unembedding_rows(llama, tokenizer):
    ids = memory_token_ids(tokenizer, " cat cat dog")
    expected = llama.lm_head.weight[ids].sum(0)
    assert len(ids) == 2
    torch.testing.assert_close(memory_vector(llama, tokenizer, " cat cat dog"), expected)


def test_embed_equals_unembed_for_tied_embeddings(tokenizer):
    tied = build("llama", len(tokenizer), tie_word_embeddings=True)
    untied = build("llama", len(tokenizer), tie_word_embeddings=False)
    assert torch.equal(memory_vector(tied, tokenizer, "France", encoder="embed"),
                       memory_vector(tied, tokenizer, "France", encoder="unembed"))
    assert not torch.equal(memory_vector(untied, tokenizer, "France", encoder="embed"),
                           memory_vector(untied, tokenizer, "France", encoder="unembed"))


@pytest.mark.parametrize("kind,centered", [("llama", False), ("gpt2", True)])
def test_centered_unembed_folds_gain_and_centres_like_transformerlens(kind, centered, tokenizer):
    model = build(kind, len(tokenizer))
    norm = layout(model).final_norm
    with torch.no_grad():
        norm.weight.copy_(torch.rand(64) + 0.5)  # a non-trivial gain, so folding matters
    unembed = model.get_output_embeddings().weight.detach()
    ids = memory_token_ids(tokenizer, "Eiffel Tower")
    processed = norm.weight.detach() * (unembed - unembed.mean(0))  # per vocabulary row, [vocab, d]
    if centered:
        processed = processed - processed.mean(-1, keepdim=True)
    expected = processed[ids].sum(0)
    got = memory_vector(model, tokenizer, "Eiffel Tower", encoder="unembed-centered")
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    assert (abs(float(got.sum())) < 1e-4) == centered


def test_layer_encoder_is_attention_output_at_last_memory_token(llama, tokenizer):
    seen = {}

    def keep(module, args, output):
        seen["a"] = output[0]

    with hooks.scoped_hooks() as scope, torch.no_grad():
        scope.add_forward_hook(layout(llama).attention(2), keep)
        llama(**single(tokenizer, "Eiffel Tower"))
    torch.testing.assert_close(memory_vector(llama, tokenizer, "Eiffel Tower", encoder="layer", layer=2),
                               seen["a"][0, -1], atol=1e-6, rtol=1e-6)
    many = layer_encoded_vectors(llama, tokenizer, ["Eiffel Tower", "cat"], [0, 2])
    assert many.shape == (2, 2, 64)
    torch.testing.assert_close(many[0, 1], seen["a"][0, -1], atol=1e-5, rtol=1e-5)


def test_memory_vectors_batch_matches_one_at_a_time(llama, tokenizer):
    texts = ["France", "Mount Fuji", "cat"]
    for encoder in ("unembed", "unembed-centered", "embed"):
        batch = memory_vectors(llama, tokenizer, texts, encoder=encoder)
        for i, text in enumerate(texts):
            torch.testing.assert_close(batch[i], memory_vector(llama, tokenizer, text, encoder=encoder))


# ------------------------------------------------------------------ relative tau

def test_residual_norms_are_medians_of_layer_inputs(llama, tokenizer):
    batch = left_padded_batch(tokenizer, list(CALIBRATION_TEXTS))
    with torch.no_grad():
        states = llama(**batch, output_hidden_states=True).hidden_states
    real = batch["attention_mask"].bool()
    expected = torch.stack([states[i].norm(dim=-1)[real].median() for i in range(3)])
    torch.testing.assert_close(residual_norms(llama, tokenizer), expected)


def test_relative_tau_sets_the_delta_norm(llama, tokenizer):
    with inject(llama, tokenizer, memory="France", layer=1, tau=0.5, tau_mode="relative") as info:
        reference = float(residual_norms(llama, tokenizer)[1])
        assert info.reference_norm == pytest.approx(reference)
        assert float(info.delta.norm()) == pytest.approx(0.5 * reference, rel=1e-5)
        cosine = torch.nn.functional.cosine_similarity(info.delta, info.vector, dim=0)
        assert float(cosine) == pytest.approx(1.0, abs=1e-5)
    with inject(llama, tokenizer, memory="France", layer=1, tau=2.0, tau_mode="relative", reference_norm=3.0) as info:
        assert float(info.delta.norm()) == pytest.approx(6.0, rel=1e-5)


# ------------------------------------------------------------------ bad input

@pytest.mark.parametrize("kwargs,message", [
    (dict(memory="", layer=0), "non-empty"),
    (dict(memory="   ", layer=0), "non-empty"),
    (dict(memory="France", layer=3), "out of range: this model has 3 layers"),
    (dict(memory="France", layer=-4), "out of range"),
    (dict(memory="France", layer=0, tau=float("nan")), "finite"),
    (dict(memory="France", layer=0, tau_mode="percent"), "tau_mode"),
    (dict(memory="France", layer=0, encoder="bogus"), "unknown encoder"),
    (dict(memory="France", layer=0, positions="first"), "positions"),
    (dict(memory="France", layer=0, positions=slice(0, 4, 2)), "step"),
    (dict(memory="France", vector=torch.zeros(64), layer=0), "exactly one"),
    (dict(layer=0), "exactly one"),
    (dict(vector=torch.zeros(32), layer=0), r"expected \[64\]"),
    (dict(vector=torch.zeros(64), layer=0, tau_mode="relative", reference_norm=1.0), "zero vector"),
])
def test_bad_arguments_raise_clear_errors(llama, tokenizer, kwargs, message):
    count = hooks.hook_count(llama)
    with pytest.raises(ConfigError, match=message):
        with inject(llama, tokenizer, **kwargs):
            pass
    assert hooks.hook_count(llama) == count


def test_memory_text_without_tokenizer_is_refused(llama):
    with pytest.raises(ConfigError, match="needs the tokenizer"):
        with inject(llama, memory="France", layer=0):
            pass


def test_architecture_without_a_decoder_layout_is_refused(tokenizer):
    # Before issue #15 every model type outside the table was refused (OPT included); now only a model with no
    # decoder-only layout is: an encoder such as BERT, whose layers would otherwise be found.
    bert = BertForMaskedLM(BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=1,
                                      num_attention_heads=2, intermediate_size=64)).eval()
    count = hooks.hook_count(bert)
    with pytest.raises(ConfigError, match="'bert'.* is not a decoder-only causal LM"):
        with inject(bert, vector=torch.zeros(32), layer=0):
            pass
    assert hooks.hook_count(bert) == count


# ------------------------------------------------------------------ families found by layout detection (#15)

def test_detected_family_injects_and_restores_exactly(detected, tokenizer):
    batch = left_padded_batch(tokenizer, PROMPTS)
    count = hooks.hook_count(detected)
    before = all_logits(detected, batch)
    with inject(detected, tokenizer, memory="France", layer=1, tau=0.0):
        assert torch.equal(all_logits(detected, batch), before)
    with inject(detected, tokenizer, memory="France", layer=1, tau=4.0):
        during = all_logits(detected, batch)
    assert not torch.allclose(before, during)
    assert torch.equal(all_logits(detected, batch), before)
    assert hooks.hook_count(detected) == count


def test_detected_family_injection_equals_adding_to_output_projection(detected, tokenizer):
    vec = torch.randn(64)
    batch = left_padded_batch(tokenizer, PROMPTS)
    with inject(detected, vector=vec, layer=1, tau=2.0):
        ours = all_logits(detected, batch)
    with hooks.scoped_hooks() as scope:
        mask = batch["attention_mask"].bool()
        scope.add_forward_hook(layout(detected).attention_output(1),
                               lambda m, a, out: out + 2.0 * vec * mask[..., None])
        reference = all_logits(detected, batch)
    assert torch.equal(ours, reference)


def test_detected_family_batched_left_padded_equals_unbatched(detected, tokenizer):
    vec = torch.randn(64) * 3
    with inject(detected, vector=vec, layer=1, positions="last"):
        batched = last_logits(detected, left_padded_batch(tokenizer, PROMPTS))
        alone = torch.cat([last_logits(detected, single(tokenizer, p)) for p in PROMPTS])
    torch.testing.assert_close(batched, alone, atol=1e-5, rtol=1e-5)


def test_detection_is_announced_with_a_warning(tokenizer, caplog):
    from memreason.model import layers

    layers._warned.discard("phi3")
    model = build("phi3", len(tokenizer))
    with caplog.at_level(logging.WARNING, logger="memreason.model.layers"):
        with inject(model, vector=torch.zeros(64), layer=0):
            pass
    assert any("'phi3' is not in memreason's layer table" in r.getMessage() for r in caplog.records)


def test_cached_decoding_without_its_prompt_is_refused_for_prompt_positions(llama, tokenizer):
    batch = single(tokenizer, PROMPTS[1])
    with torch.no_grad():
        cache = llama(**batch, use_cache=True).past_key_values
        step = torch.tensor([[5]])
        mask = torch.ones(1, batch["input_ids"].shape[1] + 1, dtype=torch.long)
        with pytest.raises(ConfigError, match="start generation inside it"):
            with inject(llama, vector=torch.randn(64), layer=0, positions="last"):
                llama(input_ids=step, attention_mask=mask, past_key_values=cache)


# ------------------------------------------------------------------ the real model

@pytest.fixture(scope="module")
def smollm2():
    from memreason.model import load

    return load(device="cpu", dtype="float32")


@pytest.mark.smollm2
def test_smollm2_zero_tau_is_identity_and_bridge_memory_raises_answer(smollm2):
    model, tok = smollm2
    batch = left_padded_batch(tok, ["The capital of the country where the Eiffel Tower stands is"])
    paris = tok(" Paris", add_special_tokens=False)["input_ids"][0]
    base = last_logits(model, batch)
    with inject(model, tok, memory="France", layer=8, tau=0.0):
        assert torch.equal(last_logits(model, batch), base)
    with inject(model, tok, memory="France", layer=8, tau=0.25, tau_mode="relative") as info:
        edited = last_logits(model, batch)
    assert float(info.delta.norm()) == pytest.approx(0.25 * info.reference_norm, rel=1e-5)
    # Measured when this test was written (fp32 CPU): log p(" Paris") rises by 0.38 nats, from -0.99.
    gain = float(edited.log_softmax(-1)[0, paris] - base.log_softmax(-1)[0, paris])
    assert gain == pytest.approx(0.38, abs=0.05)


@pytest.mark.smollm2
def test_smollm2_generation_with_cache_equals_recompute(smollm2):
    model, tok = smollm2
    batch = left_padded_batch(tok, ["The Eiffel Tower is in the city of", "Mount Fuji is the tallest"])
    batch.pop("position_ids")
    kwargs = dict(max_new_tokens=4, do_sample=False, pad_token_id=tok.pad_token_id)
    with torch.no_grad(), inject(model, tok, memory="Japan", layer=10, tau=0.4, tau_mode="relative"):
        cached = model.generate(**batch, use_cache=True, **kwargs)
        recomputed = model.generate(**batch, use_cache=False, **kwargs)
    assert torch.equal(cached, recomputed)
