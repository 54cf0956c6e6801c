"""Tests for memreason.interventions.attention_rebalance (spec attention_rebalance.md §9 A).

Tiny random Llama models with GQA (4 query heads, 2 KV heads) and a large initialiser range, so layer-0
attention is peaked and the 0.01 threshold selects a genuine subset of the pairs (each test that relies on
that asserts it). The reference implementation below is written from the spec's formula, straight from the
weights, without transformers' modelling code.
"""

from __future__ import annotations

import math

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from memreason.errors import ConfigError
from memreason.interventions.attention_rebalance import (
    ATTENTION_NAME,
    LEGACY_DEPTH_H,
    RebalanceConfig,
    layer_gains,
    rebalance,
)

VOCAB = 128


@pytest.fixture(autouse=True)
def _one_intra_op_thread():
    # On a shared 2-core machine, 2 intra-op threads made tiny-model ops ~100x slower than 1 (OpenMP
    # hand-offs under contention: 1.4 s vs 0.004 s for one reference forward) and SmolLM2 forwards ~6x slower.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make_model(layers: int = 3, kv_heads: int = 2, seed: int = 0, attn: str = "sdpa"):
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=kv_heads, initializer_range=0.3,
                         max_position_embeddings=256, bos_token_id=1, eos_token_id=2, pad_token_id=0,
                         attn_implementation=attn)
    return AutoModelForCausalLM.from_config(config).eval()


@pytest.fixture
def model():
    return make_model()


@pytest.fixture
def ids():
    return torch.randint(3, VOCAB, (1, 40), generator=torch.Generator().manual_seed(1))


def stock_eager(model, *args, **kwargs):
    previous = model.config._attn_implementation
    model.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            return model(*args, **kwargs)
    finally:
        model.set_attn_implementation(previous)


# ---------------------------------------------------------------------------------------------------------
# Independent reference: Llama forward from the weights, attention modified exactly as spec §2.3 says.
# ---------------------------------------------------------------------------------------------------------
def reference_logits(model, ids: torch.Tensor, alpha: float, theta: float = 0.01, h: int | None = None,
                     mode: str = "mask") -> torch.Tensor:
    """Logits ``[T, vocab]`` for one sequence ``ids`` ``[T]``, computed in float64."""
    cfg = model.config
    w = {name: tensor.detach().double() for name, tensor in model.state_dict().items()}
    n_heads, n_kv, n_layers = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.num_hidden_layers
    dim = cfg.hidden_size // n_heads
    h = n_layers - 1 if h is None else h
    T = ids.shape[0]

    def rms(x, weight):
        return weight * x / torch.sqrt((x * x).mean(-1, keepdim=True) + cfg.rms_norm_eps)

    inv_freq = 1.0 / (cfg.rope_parameters["rope_theta"] ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
    angles = torch.arange(T, dtype=torch.float64)[:, None] * inv_freq[None]
    cos, sin = torch.cat([angles, angles], -1).cos(), torch.cat([angles, angles], -1).sin()

    def rope(x):  # [T, dim]
        half = dim // 2
        rotated = torch.cat([-x[:, half:], x[:, :half]], -1)
        return x * cos + rotated * sin

    x = w["model.embed_tokens.weight"][ids]
    guide = None
    for layer in range(n_layers):
        p = f"model.layers.{layer}."
        hidden = rms(x, w[p + "input_layernorm.weight"])
        q = (hidden @ w[p + "self_attn.q_proj.weight"].T).view(T, n_heads, dim)
        k = (hidden @ w[p + "self_attn.k_proj.weight"].T).view(T, n_kv, dim)
        v = (hidden @ w[p + "self_attn.v_proj.weight"].T).view(T, n_kv, dim)
        heads = []
        masks = []
        for head in range(n_heads):
            kv = head // (n_heads // n_kv)
            scores = rope(q[:, head]) @ rope(k[:, kv]).T / math.sqrt(dim)
            scores = scores.masked_fill(torch.ones(T, T).triu(1).bool(), float("-inf"))
            probs = torch.softmax(scores, -1)
            if layer == 0:
                masks.append((probs > theta) & ~torch.eye(T, dtype=torch.bool))
            else:
                c = 1 + alpha * (1 - layer / h)
                if mode == "boost-all":
                    probs = c * probs
                else:
                    probs = torch.where(guide[head], c * probs, probs)
            heads.append(probs @ v[:, kv])
        if layer == 0:
            guide = masks
        x = x + torch.cat(heads, -1) @ w[p + "self_attn.o_proj.weight"].T
        hidden = rms(x, w[p + "post_attention_layernorm.weight"])
        gate = hidden @ w[p + "mlp.gate_proj.weight"].T
        x = x + (torch.nn.functional.silu(gate) * (hidden @ w[p + "mlp.up_proj.weight"].T)) @ w[p + "mlp.down_proj.weight"].T
    return rms(x, w["model.norm.weight"]) @ w["lm_head.weight"].T


def layer0_guide(model, ids, theta=0.01):
    """The spec's layer-0 mask from stock eager attention: ``[batch, head, q, k]``."""
    probs0 = stock_eager(model, ids, output_attentions=True).attentions[0]
    T = ids.shape[1]
    return (probs0 > theta) & ~torch.eye(T, dtype=torch.bool) & torch.ones(T, T).tril().bool()


# ---------------------------------------------------------------------------------------------------------
# Exactness
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["mask", "boost-all", "random-mask"])
def test_alpha_zero_gives_logits_bit_identical_to_stock_eager(model, ids, mode):
    expected = stock_eager(model, ids).logits
    with torch.no_grad(), rebalance(model, alpha=0.0, mode=mode):
        got = model(ids).logits
    assert torch.equal(got, expected)


def test_theta_one_selects_nothing_so_mask_mode_is_bit_identical_to_stock_eager(model, ids):
    expected = stock_eager(model, ids).logits
    with torch.no_grad(), rebalance(model, alpha=0.5, theta=1.0):
        got = model(ids).logits
    assert torch.equal(got, expected)


def test_alpha_zero_renormalised_matches_stock_eager_up_to_rounding(model, ids):
    expected = stock_eager(model, ids).logits
    with torch.no_grad(), rebalance(model, alpha=0.0, mode="renormalised"):
        got = model(ids).logits
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("kv_heads", [2, 4], ids=["gqa", "mha"])
@pytest.mark.parametrize("mode", ["mask", "boost-all"])
def test_matches_reference_implementation_at_prefill_and_ten_greedy_decode_steps(kv_heads, mode):
    model = make_model(layers=3, kv_heads=kv_heads)
    prompt = torch.randint(3, VOCAB, (1, 30), generator=torch.Generator().manual_seed(2))
    assert 0.05 < layer0_guide(model, prompt).float().sum() / (30 * 29 / 2) < 0.95, "mask must be a real subset"
    with torch.no_grad(), rebalance(model, alpha=0.5, mode=mode):
        prefill = model(prompt).logits[0]
        out = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=10, do_sample=False,
                             output_logits=True, return_dict_in_generate=True, pad_token_id=0)
    expected_prefill = reference_logits(model, prompt[0], alpha=0.5, mode=mode)
    torch.testing.assert_close(prefill.double(), expected_prefill, atol=2e-4, rtol=1e-4)
    # The method must actually change something, or this comparison proves nothing.
    assert (reference_logits(model, prompt[0], alpha=0.0) - expected_prefill).abs().max() > 1e-2
    sequence = out.sequences[0]
    assert len(out.logits) == 10
    for step, step_logits in enumerate(out.logits):
        expected = reference_logits(model, sequence[: 30 + step], alpha=0.5, mode=mode)[-1]
        torch.testing.assert_close(step_logits[0].double(), expected, atol=2e-4, rtol=1e-4)
        assert int(expected.argmax()) == int(sequence[30 + step])


def test_reference_implementation_matches_stock_eager_at_alpha_zero(model, ids):
    # Guards the reference itself: with no boost it must be plain Llama.
    torch.testing.assert_close(reference_logits(model, ids[0], alpha=0.0), stock_eager(model, ids).logits[0].double(),
                               atol=2e-4, rtol=1e-4)


@pytest.mark.parametrize("mode", ["mask", "random-mask", "renormalised", "boost-all"])
def test_cached_decoding_equals_full_recompute(model, ids, mode):
    with torch.no_grad(), rebalance(model, alpha=0.5, mode=mode):
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=False,
                             output_logits=True, return_dict_in_generate=True, pad_token_id=0)
        full = model(out.sequences[:, :-1], use_cache=False).logits[0]
    for step, step_logits in enumerate(out.logits):
        torch.testing.assert_close(step_logits[0], full[39 + step], atol=1e-4, rtol=1e-5)


def test_chunked_prefill_with_a_cache_equals_one_pass(model, ids):
    from transformers import DynamicCache

    with torch.no_grad(), rebalance(model, alpha=0.5):
        whole = model(ids).logits
        cache = DynamicCache(config=model.config)
        first = model(ids[:, :25], past_key_values=cache, use_cache=True).logits
        second = model(ids[:, 25:], past_key_values=cache, use_cache=True).logits
    torch.testing.assert_close(torch.cat([first, second], 1), whole, atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("mode", ["mask", "random-mask"])
def test_left_padded_batch_gives_each_sequence_its_unpadded_logits(model, mode):
    gen = torch.Generator().manual_seed(3)
    long, short = torch.randint(3, VOCAB, (1, 30), generator=gen), torch.randint(3, VOCAB, (1, 22), generator=gen)
    batch = torch.cat([long, torch.cat([torch.zeros(1, 8, dtype=torch.long), short], 1)])
    mask = torch.cat([torch.ones(1, 30), torch.cat([torch.zeros(1, 8), torch.ones(1, 22)], 1)]).long()
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad(), rebalance(model, alpha=0.5, mode=mode):
        batched = model(batch, attention_mask=mask, position_ids=positions).logits
        alone_long, alone_short = model(long).logits, model(short).logits
    torch.testing.assert_close(batched[0], alone_long[0], atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(batched[1, 8:], alone_short[0], atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("mode", ["mask", "random-mask"])
def test_right_padding_rows_are_left_out_of_the_mask_and_the_diagnostics(model, mode):
    # continuation_logprobs pads on the right: a padding row may see every real key before it, but it is
    # not a query, so it must not enter the mask, the density or the added mass.
    gen = torch.Generator().manual_seed(3)
    long, short = torch.randint(3, VOCAB, (1, 30), generator=gen), torch.randint(3, VOCAB, (1, 22), generator=gen)
    batch = torch.cat([long, torch.cat([short, torch.zeros(1, 8, dtype=torch.long)], 1)])
    mask = torch.cat([torch.ones(1, 30), torch.cat([torch.ones(1, 22), torch.zeros(1, 8)], 1)]).long()
    with torch.no_grad(), rebalance(model, alpha=0.5, mode=mode, diagnostics=True) as rb:
        batched = model(batch, attention_mask=mask).logits
        model(short)
    padded, alone = rb.records
    assert padded.row_allowed[1, 22:].sum() == 0 and padded.row_keys[1, :, 22:].sum() == 0
    assert torch.equal(padded.row_allowed[1, :22], alone.row_allowed[0])
    assert torch.equal(padded.row_keys[1, :, :22], alone.row_keys[0])
    assert alone.total_added[:, 0].sum() > 0
    torch.testing.assert_close(padded.total_added[:, 1], alone.total_added[:, 0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(padded.first_added[:, 1], alone.first_added[:, 0], atol=1e-5, rtol=1e-5)
    with torch.no_grad(), rebalance(model, alpha=0.5, mode=mode):
        torch.testing.assert_close(batched[1, :22], model(short).logits[0], atol=1e-4, rtol=1e-5)


def test_boost_all_equals_scaling_each_layers_attention_output(model, ids):
    gains = layer_gains(3, 0.5)
    handles = [model.model.layers[layer].self_attn.o_proj.register_forward_hook(
        lambda module, args, output, gain=gains[layer]: output * gain) for layer in range(3)]
    try:
        scaled = stock_eager(model, ids).logits
    finally:
        for handle in handles:
            handle.remove()
    with torch.no_grad(), rebalance(model, alpha=0.5, mode="boost-all"):
        boosted = model(ids).logits
    assert (scaled - stock_eager(model, ids).logits).abs().max() > 1e-2
    torch.testing.assert_close(boosted, scaled, atol=1e-4, rtol=1e-5)


# ---------------------------------------------------------------------------------------------------------
# Mask semantics, on a 2-layer model: layer 1's pre-boost probabilities are the stock ones, because layer 0
# is never modified, so layer 1's returned weights can be checked entry by entry.
# ---------------------------------------------------------------------------------------------------------
def test_layer1_weights_are_boosted_exactly_where_layer0_of_the_same_query_head_selected(ids):
    model = make_model(layers=2, kv_heads=2)
    stock = stock_eager(model, ids, output_attentions=True).attentions
    guide = layer0_guide(model, ids)
    with torch.no_grad(), rebalance(model, alpha=0.5):
        got = model(ids, output_attentions=True).attentions
    gain = 1 + 0.5 * (1 - 1 / 1)  # h = L - 1 = 1, so layer 1 is the last layer: gain 1
    assert gain == 1.0 and torch.equal(got[1], stock[1])
    with torch.no_grad(), rebalance(model, alpha=0.5, depth_h=4) as rb:
        got = model(ids, output_attentions=True).attentions
    gain = rb.gains[1]
    assert gain == pytest.approx(1 + 0.5 * (1 - 1 / 4))
    assert torch.equal(got[0], stock[0])  # layer 0 unchanged
    assert torch.equal(got[1][guide], (stock[1] * gain)[guide])  # masked entries multiplied by exactly c_1
    assert torch.equal(got[1][~guide], stock[1][~guide])  # everything else untouched
    # Per query head: heads 0 and 1 share a KV head but have different masks, and each used its own.
    assert not torch.equal(guide[0, 0], guide[0, 1])
    # Rows sum to 1 + (c - 1) * m_i, m_i = stock mass on the masked keys (no renormalisation).
    mass = (stock[1] * guide).sum(-1)
    torch.testing.assert_close(got[1].sum(-1), 1 + (gain - 1) * mass, atol=1e-5, rtol=1e-5)
    assert 0.05 < guide.float().sum() / (40 * 39 / 2 * 4) < 0.95


def test_self_pairs_are_never_boosted_at_prefill(ids):
    model = make_model(layers=2)
    stock1 = stock_eager(model, ids, output_attentions=True).attentions[1]
    with torch.no_grad(), rebalance(model, alpha=0.5, depth_h=4):
        got = model(ids, output_attentions=True).attentions[1]
    diagonal = torch.eye(40, dtype=torch.bool).expand_as(got)
    assert torch.equal(got[diagonal], stock1[diagonal])
    assert (got[~diagonal] != stock1[~diagonal]).any()


def test_decode_steps_boost_the_layer0_row_of_the_new_token_but_not_its_own_column(ids):
    # 2 layers: layer 1's inputs are the stock ones, so a decode step's layer-1 row must equal the stock
    # full-pass row, boosted where the full pass's layer-0 row selected (own column excluded).
    model = make_model(layers=2)
    with torch.no_grad(), rebalance(model, alpha=0.5, depth_h=4, diagnostics=True) as rb:
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, do_sample=False,
                             output_attentions=True, return_dict_in_generate=True, pad_token_id=0)
    sequence = out.sequences[:, :-1]
    stock1 = stock_eager(model, sequence, output_attentions=True).attentions[1]
    guide = layer0_guide(model, sequence)  # [1, head, T, T]
    gain = rb.gains[1]
    for step in range(1, 4):
        row = 40 + step - 1
        got = out.attentions[step][1][0, :, 0]  # [head, k]: layer 1 at this decode step
        assert got.shape[-1] == row + 1
        expected = torch.where(guide[0, :, row, : row + 1], stock1[0, :, row, : row + 1] * gain,
                               stock1[0, :, row, : row + 1])
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(got[:, -1], stock1[0, :, row, row], atol=1e-6, rtol=1e-5)  # own column
        record = rb.records[step]
        assert record.past_seen == row
        assert torch.equal(record.row_keys[0, :, 0], guide[0, :, row].sum(-1))
        assert int(record.row_allowed[0, 0]) == row  # every earlier key, not itself


def test_random_mask_boosts_as_many_keys_per_row_as_the_layer0_mask_but_elsewhere(ids):
    model = make_model(layers=2)
    stock = stock_eager(model, ids, output_attentions=True).attentions[1]
    guide = layer0_guide(model, ids)
    with torch.no_grad(), rebalance(model, alpha=0.5, depth_h=4, mode="random-mask", seed=7):
        got = model(ids, output_attentions=True).attentions[1]
    boosted = got != stock
    causal_off_diagonal = torch.ones(40, 40).tril(-1).bool()
    assert torch.equal(boosted.sum(-1), guide.sum(-1))  # density matched row by row
    assert not (boosted & ~causal_off_diagonal).any()  # only attendable, non-self keys
    assert (boosted != guide).float().mean() > 0.05  # and not the layer-0 selection
    with torch.no_grad(), rebalance(model, alpha=0.5, depth_h=4, mode="random-mask", seed=7):
        again = model(ids, output_attentions=True).attentions[1]
    with torch.no_grad(), rebalance(model, alpha=0.5, depth_h=4, mode="random-mask", seed=8):
        other_seed = model(ids, output_attentions=True).attentions[1]
    assert torch.equal(again, got) and not torch.equal(other_seed, got)


def test_renormalised_rows_sum_to_one(ids):
    model = make_model(layers=3)
    with torch.no_grad(), rebalance(model, alpha=0.5, mode="renormalised"):
        attentions = model(ids, output_attentions=True).attentions
    for layer in (1, 2):
        torch.testing.assert_close(attentions[layer].sum(-1), torch.ones(1, 4, 40), atol=1e-5, rtol=0)
    with torch.no_grad(), rebalance(model, alpha=0.5, mode="mask"):
        unnormalised = model(ids, output_attentions=True).attentions
    assert unnormalised[1].sum(-1).max() > 1.01


def test_diagnostics_report_layer0_density_and_first_token_share(ids):
    model = make_model(layers=2)
    stock = stock_eager(model, ids, output_attentions=True).attentions
    guide = layer0_guide(model, ids)
    with torch.no_grad(), rebalance(model, alpha=0.5, depth_h=4, diagnostics=True) as rb:
        model(ids)
    assert rb.forwards == 1 and len(rb.records) == 1
    record = rb.records[0]
    assert torch.equal(record.row_keys, guide.sum(-1))
    assert torch.equal(record.row_allowed[0], torch.arange(40))  # row i may attend to i earlier keys
    added = (rb.gains[1] - 1) * stock[1] * guide
    assert record.first_added.shape == (1, 1) and record.total_added.shape == (1, 1)
    torch.testing.assert_close(record.first_added[0, 0], added[..., 0].sum(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(record.total_added[0, 0], added.sum(), atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------------------------
# Depth schedule and settings
# ---------------------------------------------------------------------------------------------------------
def test_default_depth_is_the_last_layer_index_and_legacy_31_is_explicit():
    smol = layer_gains(30, 0.2)
    assert smol[0] == 1.0 and smol[-1] == 1.0
    assert smol[1] == pytest.approx(1.193, abs=5e-4) and smol[15] == pytest.approx(1.097, abs=5e-4)  # spec §4
    legacy_13b = layer_gains(40, 0.2, LEGACY_DEPTH_H)
    assert legacy_13b[31] == pytest.approx(1.0) and legacy_13b[39] == pytest.approx(0.948, abs=5e-4)  # spec §2.2
    assert layer_gains(32, 0.2, 31) == layer_gains(32, 0.2)
    assert layer_gains(32, 0.2)[1] == pytest.approx(1.194, abs=5e-4)


def test_session_reports_gains_for_the_models_depth(model):
    with rebalance(model, alpha=0.2) as rb:
        assert rb.num_layers == 3 and rb.depth_h == 2
        assert rb.gains == pytest.approx((1.0, 1.1, 1.0))


@pytest.mark.parametrize("kwargs,match", [
    ({"mode": "inverse"}, "unknown rebalance mode"),
    ({"theta": 1.5}, "theta"),
    ({"depth_h": 0}, "depth_h"),
    ({"alpha": float("nan")}, "alpha"),
    ({"alpha": -3.0}, "negative gain"),
])
def test_bad_settings_are_refused_before_touching_the_model(model, kwargs, match):
    with pytest.raises(ConfigError, match=match):
        with rebalance(model, **kwargs):
            pass
    assert model.config._attn_implementation == "sdpa"


def test_config_is_a_frozen_record_of_the_settings():
    config = RebalanceConfig(alpha=0.1, mode="boost-all")
    assert (config.alpha, config.theta, config.depth_h, config.mode, config.seed) == (0.1, 0.01, None, "boost-all", 0)
    with pytest.raises(Exception):
        config.alpha = 0.3


# ---------------------------------------------------------------------------------------------------------
# Scope: restore, nesting, refusals
# ---------------------------------------------------------------------------------------------------------
def _hook_count(model):
    return sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules())


@pytest.mark.parametrize("start", ["sdpa", "eager"])
def test_previous_attention_implementation_and_hooks_are_restored_on_exit(ids, start):
    model = make_model(attn=start)
    assert model.config._attn_implementation == start
    hooks = _hook_count(model)
    with torch.no_grad(), rebalance(model, alpha=0.2):
        assert model.config._attn_implementation == ATTENTION_NAME
        assert _hook_count(model) == hooks + 2
        model(ids)
    assert model.config._attn_implementation == start
    assert _hook_count(model) == hooks
    stock = model(ids).logits  # runs on the restored implementation without our function
    assert torch.isfinite(stock).all()


def test_previous_attention_implementation_is_restored_when_the_block_raises(model, ids):
    hooks = _hook_count(model)
    with pytest.raises(RuntimeError, match="boom"):
        with torch.no_grad(), rebalance(model, alpha=0.2):
            model(ids)
            raise RuntimeError("boom")
    assert model.config._attn_implementation == "sdpa" and _hook_count(model) == hooks
    # and the model is usable in a new block afterwards
    expected = stock_eager(model, ids).logits
    with torch.no_grad(), rebalance(model, alpha=0.0):
        assert torch.equal(model(ids).logits, expected)


def test_nested_rebalance_on_the_same_model_is_refused_and_the_outer_block_survives(model, ids):
    with torch.no_grad(), rebalance(model, alpha=0.5) as outer:
        before = model(ids).logits
        with pytest.raises(ConfigError, match="nested"):
            with rebalance(model, alpha=0.1):
                pass
        assert model.config._attn_implementation == ATTENTION_NAME
        assert torch.equal(model(ids).logits, before)
        assert outer.forwards == 2
    assert model.config._attn_implementation == "sdpa"


def test_two_models_can_be_rebalanced_independently(ids):
    first, second = make_model(seed=0), make_model(seed=1)
    with torch.no_grad(), rebalance(first, alpha=0.5), rebalance(second, alpha=0.0):
        a, b = first(ids).logits, second(ids).logits
    assert torch.equal(b, stock_eager(second, ids).logits)
    assert not torch.equal(a, stock_eager(first, ids).logits)


def test_switching_backend_inside_the_block_raises_instead_of_returning_unmodified_outputs(model, ids):
    with torch.no_grad(), rebalance(model, alpha=0.5):
        model.set_attn_implementation("sdpa")
        with pytest.raises(ConfigError, match="bypassed"):
            model(ids)
    assert model.config._attn_implementation == "sdpa"


def test_registered_function_refuses_to_run_outside_a_block(model, ids):
    with rebalance(model, alpha=0.5):
        pass
    model.config._attn_implementation_internal = ATTENTION_NAME  # what a user might do by hand
    with pytest.raises(ConfigError, match="only valid inside"):
        with torch.no_grad():
            model(ids)


def test_model_that_ignores_the_switch_is_refused_and_left_as_it_was(model, ids, monkeypatch):
    # What transformers does for a model whose attention bypasses the interface: it only logs a warning.
    monkeypatch.setattr(model, "set_attn_implementation", lambda name: None)
    with pytest.raises(ConfigError, match="did not switch"):
        with rebalance(model, alpha=0.5):
            pass
    assert model.config._attn_implementation == "sdpa" and _hook_count(model) == 0


def test_attention_variants_it_does_not_reproduce_are_refused(model):
    from memreason.interventions.attention_rebalance import rebalanced_attention

    attention = model.model.layers[0].self_attn
    q = torch.zeros(1, 4, 3, 16)
    kv = torch.zeros(1, 2, 3, 16)
    with rebalance(model, alpha=0.5):
        with pytest.raises(ConfigError, match="softcap"):
            rebalanced_attention(attention, q, kv, kv, None, scaling=0.25, softcap=30.0)


def test_caches_that_drop_keys_are_refused():
    from transformers import MistralConfig

    torch.manual_seed(0)
    config = MistralConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                           num_attention_heads=4, num_key_value_heads=2, sliding_window=8)
    mistral = AutoModelForCausalLM.from_config(config).eval()
    prompt = torch.randint(3, VOCAB, (1, 20))
    with torch.no_grad(), rebalance(mistral, alpha=0.5):
        mistral(prompt[:, :6])  # within the window: fine
        with pytest.raises(ConfigError, match="caches that drop keys"):
            mistral.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=2, do_sample=False,
                             pad_token_id=0)
    assert mistral.config._attn_implementation == "sdpa"


def test_model_that_cannot_switch_attention_is_refused():
    class NotHF(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = torch.nn.ModuleList([torch.nn.Module(), torch.nn.Module()])
            for index, layer in enumerate(self.layers):
                layer.self_attn = torch.nn.Linear(2, 2)
                layer.self_attn.layer_idx = index

    with pytest.raises(ConfigError, match="cannot switch"):
        with rebalance(NotHF()):
            pass
    with pytest.raises(ConfigError, match="no attention modules"):
        with rebalance(torch.nn.Linear(2, 2)):
            pass


# ---------------------------------------------------------------------------------------------------------
# The real model
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.smollm2
def test_smollm2_alpha_zero_is_exact_and_mask_density_falls_with_length(smollm2):
    model, tokenizer = smollm2
    text = ("The following is a multiple choice question about astronomy. Which planet is closest to the Sun? "
            "A. Venus B. Mercury C. Mars D. Earth. Answer: B. ") * 12
    ids = tokenizer(text, return_tensors="pt").input_ids[:, :400]
    short = ids[:, :40]
    expected = stock_eager(model, short).logits
    with torch.no_grad(), rebalance(model, alpha=0.0):
        assert torch.equal(model(short).logits, expected)
    with torch.no_grad(), rebalance(model, alpha=0.2, diagnostics=True) as rb:
        changed = model(short).logits
        model(ids)
    assert rb.gains[29] == 1.0 and rb.gains[1] == pytest.approx(1 + 0.2 * 28 / 29)
    assert (changed - expected).abs().max() > 1e-3
    record = rb.records[1]
    keys, allowed = record.row_keys.sum(1)[0].float() / 9, record.row_allowed[0].float()  # mean over 9 heads
    density_short = keys[1:40].sum() / allowed[1:40].sum()
    density_long = keys[300:].sum() / allowed[300:].sum()
    assert density_long < density_short
    assert keys[300:].max() <= 99  # at most 99 keys can exceed 1% (spec §2.2.4)
    assert model.config._attn_implementation == "sdpa"
