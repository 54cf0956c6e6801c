"""Attention rebalancing (Liao & Vargas 2024, "Extending Token Computation for LLM Reasoning").

This module owns the mechanism only: a registered attention function that reproduces eager attention and,
in every layer l >= 1, multiplies the post-softmax weights of the (query, key) pairs that layer 0 found
salient by ``c_l = 1 + alpha * (1 - l / h)`` (spec attention_rebalance.md §2)::

    with rebalance(model, alpha=0.2) as rb:     # h defaults to the last layer index (29 for SmolLM2)
        out = model.generate(**inputs)          # prefill and every KV-cached decode step are rebalanced
    rb.gains                                    # (1.0, c_1, ..., c_{L-1})

Semantics (spec §2.2, §2.3):

* Layer 0 runs unchanged and defines a boolean mask per query head, ``M = P_0 > theta``, with self-pairs
  removed (key == query position, which is the diagonal at prefill and the new token's own column at a
  decode step). Keys the causal/padding mask hides are never in ``M``.
* Head h of layer 0 guides head h of every later layer (query-head axis, so GQA models work unchanged).
* Padding rows (a query whose own key is hidden: every row of left padding's prefix, the tail rows of
  right padding) are never in ``M`` and never counted by the diagnostics.
* ``mode="mask"``: ``P_l <- where(M, c_l * P_l, P_l)``, no renormalisation (the original's behaviour).
  ``"boost-all"``: ``P_l <- c_l * P_l`` (the original's ``boosting_self`` flag, and what its first public
  commit effectively ran with alpha = 0.5; identical to scaling layer l's attention output by c_l, §2.5).
  ``"random-mask"``: a control that boosts, in every query row, as many keys as ``M`` selects, but at
  pseudo-random positions (seeded; a function of seed, head, query position and key position, so cached
  decoding, full recomputation and left-padded batches pick the same keys). ``"renormalised"``: the mask
  boost followed by dividing each row by its sum (a variant the original never compared, §6.3).
* ``depth_h=None`` uses ``h = L - 1`` so that ``c_{L-1} = 1``; the original's hard-coded 31 (right only for
  32-layer models, §6.2) is available as ``depth_h=LEGACY_DEPTH_H``.

Why a registered attention function and not a hook: the boost acts on the probabilities between the
softmax and the product with V, which no module hook can see (§2.7). The function is registered once with
``transformers.AttentionInterface`` and ``masking_utils.AttentionMaskInterface`` (without the mask
registration an unknown implementation name gets ``attention_mask=None``, i.e. non-causal attention,
ecosystem.md §3.2); nothing in transformers is patched. ``rebalance`` switches the model to it for the
duration of the ``with`` block and restores the previous implementation exactly, also on exception.

The decoder layers, their attention modules and the stack that runs them come from the one layer table,
``memreason.model.layers.layout``. It refuses to run silently wrong: it checks the switch took effect,
counts the layers that ran through it on every forward (another backend, set inside the block or by an
architecture that bypasses the attention interface, raises instead of returning unmodified outputs),
refuses nesting on the same model, attention variants it does not reproduce (logit soft-capping, sink
logits) and caches that drop keys (sliding windows).
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import math
import weakref
from dataclasses import dataclass, field
from typing import Iterator, Literal

import torch
from torch import nn
from transformers.models.llama.modeling_llama import repeat_kv  # eager attention's own GQA expansion

from memreason.errors import ConfigError
from memreason.model.layers import layout

logger = logging.getLogger(__name__)

ATTENTION_NAME = "memreason_rebalance"
MODES = ("mask", "boost-all", "random-mask", "renormalised")
LEGACY_DEPTH_H = 31  # the original's constant: "last layer idx is 31 for LLaMA-7B" (spec §2.1)

Mode = Literal["mask", "boost-all", "random-mask", "renormalised"]

# Attention modules currently rebalanced → their session. Weak keys: a model that is garbage-collected
# inside a block leaves nothing behind.
_SESSIONS: "weakref.WeakKeyDictionary[nn.Module, Rebalancing]" = weakref.WeakKeyDictionary()
# kwargs of other models' eager attention that change the maths; we do not reproduce them, so refuse.
_UNSUPPORTED_KWARGS = ("softcap", "s_aux", "sinks")
_MASK31 = (1 << 31) - 1


@dataclass(frozen=True)
class RebalanceConfig:
    """Settings of one rebalancing run (written into every evaluation output).

    Args:
        alpha (float, default 0.2): boost strength; ``c_l = 1 + alpha * (1 - l / h)``. 0 is an exact no-op
            in every mode but ``"renormalised"`` (where it is a no-op up to rounding).
        theta (float, default 0.01): layer-0 probability above which a pair enters the mask, in [0, 1].
        depth_h (int | None, default None): the ``h`` of the depth schedule; None = last layer index.
            ``LEGACY_DEPTH_H`` (31) reproduces the original code.
        mode (str, default "mask"): one of ``MODES``.
        seed (int, default 0): seed of the ``"random-mask"`` positions (ignored by the other modes).
    """

    alpha: float = 0.2
    theta: float = 0.01
    depth_h: int | None = None
    mode: Mode = "mask"
    seed: int = 0

    def __post_init__(self):
        if self.mode not in MODES:
            raise ConfigError(f"unknown rebalance mode {self.mode!r}; choose one of {', '.join(MODES)}")
        if not isinstance(self.alpha, (int, float)) or not math.isfinite(self.alpha):
            raise ConfigError(f"alpha must be a finite number, got {self.alpha!r}")
        if not isinstance(self.theta, (int, float)) or not 0.0 <= self.theta <= 1.0:
            raise ConfigError(f"theta must be a probability in [0, 1], got {self.theta!r}")
        if self.depth_h is not None and (isinstance(self.depth_h, bool) or not isinstance(self.depth_h, int)
                                         or self.depth_h < 1):
            raise ConfigError(f"depth_h must be a positive integer (or None for the last layer index), "
                              f"got {self.depth_h!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ConfigError(f"seed must be a non-negative integer, got {self.seed!r}")


def layer_gains(num_layers: int, alpha: float, depth_h: int | None = None) -> tuple[float, ...]:
    """The boost factor of every layer: ``1.0`` for layer 0, ``1 + alpha * (1 - l / h)`` for l >= 1.

    Args:
        num_layers (int): L, the number of decoder layers.
        alpha (float): boost strength.
        depth_h (int | None): h; None = ``L - 1``.

    Returns:
        tuple[float, ...]: L gains.

    Raises:
        ConfigError: a gain would be negative (the weights would change sign).
    """
    h = num_layers - 1 if depth_h is None else depth_h
    if h < 1:
        raise ConfigError(f"rebalancing needs at least 2 layers (got {num_layers})")
    gains = (1.0,) + tuple(1.0 + alpha * (1.0 - layer / h) for layer in range(1, num_layers))
    if min(gains) < 0:
        raise ConfigError(f"alpha={alpha} with depth_h={h} gives a negative gain ({min(gains):.3f}) on "
                          f"{num_layers} layers; use a smaller |alpha| or a larger depth_h")
    return gains


@dataclass
class ForwardRecord:
    """Mechanism diagnostics of one model forward (collected when ``diagnostics=True``).

    Attributes:
        past_seen (int): tokens already in the cache before this forward (0 at prefill).
        row_keys (Tensor): ``[batch, head, q_pos]`` number of keys the layer-0 mask (or, in random-mask mode,
            the random mask) selects in each query row.
        row_allowed (Tensor): ``[batch, q_pos]`` number of keys a row may attend to, its own key excluded
            (0 for padding rows); ``row_keys / row_allowed`` is the mask density.
        first_added (Tensor): ``[layer, batch]`` attention mass added on each row's first attendable key
            (the BOS/sink token), summed over heads and rows, for layers 1..L-1.
        total_added (Tensor): ``[layer, batch]`` attention mass added on all keys, same summation.
    """

    past_seen: int
    row_keys: torch.Tensor | None = None
    row_allowed: torch.Tensor | None = None
    first_added: list | torch.Tensor = field(default_factory=list)  # list while the forward runs
    total_added: list | torch.Tensor = field(default_factory=list)

    def finish(self) -> None:
        """Stack the per-layer lists into ``[layer, batch]`` tensors."""
        if isinstance(self.first_added, list):
            self.first_added = torch.stack(self.first_added) if self.first_added else torch.zeros(0)
            self.total_added = torch.stack(self.total_added) if self.total_added else torch.zeros(0)


class Rebalancing:
    """The live state of one ``rebalance(...)`` block; yielded by the context manager.

    Attributes:
        config (RebalanceConfig): the settings.
        num_layers (int): L.
        depth_h (int): the resolved h.
        gains (tuple[float, ...]): c_l for every layer (1.0 for layer 0).
        forwards (int): model forwards run inside the block.
        records (list[ForwardRecord]): one per forward when ``diagnostics=True``, else empty.
    """

    def __init__(self, config: RebalanceConfig, num_layers: int, diagnostics: bool, stack_signature):
        self.config = config
        self.num_layers = num_layers
        self.depth_h = num_layers - 1 if config.depth_h is None else config.depth_h
        self.gains = layer_gains(num_layers, config.alpha, config.depth_h)
        self.diagnostics = diagnostics
        self.forwards = 0
        self.records: list[ForwardRecord] = []
        self._stack_signature = stack_signature
        self._next_layer: int | None = None  # None = outside a model forward
        self._past_seen = 0
        self._mask: torch.Tensor | None = None  # [batch, head, q_pos, k_pos] bool, from layer 0
        self._attendable: torch.Tensor | None = None  # [batch|1, 1, q_pos, k_pos] bool, from the eager mask
        self._key_positions: torch.Tensor | None = None  # [batch, k_pos] token positions (random-mask)
        self._record: ForwardRecord | None = None

    # -- called by the hooks on the decoder stack -------------------------------------------------------
    def _begin_forward(self, module, args, kwargs) -> None:
        bound = self._stack_signature.bind_partial(*args, **kwargs).arguments
        cache = bound.get("past_key_values")
        self._past_seen = int(cache.get_seq_length()) if cache is not None else 0
        self._next_layer = 0
        self._mask = self._attendable = None
        if self._past_seen == 0:
            self._key_positions = None
        self._record = ForwardRecord(past_seen=self._past_seen) if self.diagnostics else None

    def _end_forward(self, module, args, kwargs, output) -> None:
        ran, self._next_layer = self._next_layer, None
        self._mask = self._attendable = None  # free the [B, H, Tq, Tk] mask between forwards
        if ran != self.num_layers:
            raise ConfigError(
                f"only {ran} of {self.num_layers} attention layers ran through memreason's rebalanced attention "
                f"(attention implementation now {_implementation(module)!r}); another attention backend bypassed "
                "it, so the outputs would be silently unmodified. Do not change the attention implementation "
                "inside rebalance(...)")
        self.forwards += 1
        if self._record is not None:
            self._record.finish()
            self.records.append(self._record)
            self._record = None

    # -- called by the attention function --------------------------------------------------------------
    def _step(self, module, probs: torch.Tensor, attention_mask: torch.Tensor | None,
              position_ids: torch.Tensor | None) -> torch.Tensor:
        """Build the mask at layer 0 or apply the boost at a later layer. ``probs``: [batch, head, q, k]."""
        layer = module.layer_idx
        if self._next_layer is None or layer != self._next_layer:
            raise ConfigError(
                f"attention layer {layer} ran out of order (expected {self._next_layer}); rebalancing needs whole "
                "model forwards in layer order (layer 0 builds the mask the later layers use)")
        self._next_layer += 1
        if layer == 0:
            self._build_mask(probs, attention_mask, position_ids)
            return probs
        return self._boost(layer, probs)

    def _build_mask(self, probs, attention_mask, position_ids) -> None:
        batch, heads, q_len, k_len = probs.shape
        past = self._past_seen
        if k_len < past + q_len:
            raise ConfigError(
                f"the cache returned {k_len} keys for {past} cached + {q_len} new tokens; caches that drop keys "
                "(sliding-window layers) are not supported by rebalancing")
        device = probs.device
        if attention_mask is None:
            attendable = torch.ones(1, 1, q_len, k_len, dtype=torch.bool, device=device)
        else:
            # The additive eager mask is 0 where attention is allowed and the dtype's minimum elsewhere.
            attendable = attention_mask > torch.finfo(attention_mask.dtype).min / 2  # [batch|1, 1, q_pos, k_pos]
        # A query's own key sits at cache index past + q: the diagonal at prefill, the last column at a
        # decode step (the original's two special cases), and right for chunked prefill too.
        key_index = torch.arange(k_len, device=device)
        query_index = torch.arange(past, past + q_len, device=device)
        # A row whose own key is hidden is a padding row. Left padding hides every key of such a row anyway;
        # right padding (``generate.continuation_logprobs``) leaves it the real keys before it, so without
        # this its meaningless "attention" would enter the mask, the diagnostics and the added mass.
        own = attendable.gather(-1, query_index[None, None, :, None].expand(attendable.shape[0], 1, q_len, 1))
        attendable = attendable & own  # [batch|1, 1, q_pos, k_pos]
        allowed = attendable & (key_index[None, :] != query_index[:, None])  # [batch|1, 1, q_pos, k_pos]
        self._attendable = attendable
        mode = self.config.mode
        mask = None
        if mode != "boost-all" or self.diagnostics:
            # Padded keys have probability 0 and never pass theta; ``allowed`` also drops padding *rows*,
            # whose uniform "attention" over everything is meaningless.
            mask = (probs > self.config.theta) & allowed  # [batch, head, q_pos, k_pos]
        if mode == "random-mask":
            mask = self._random_mask(mask, allowed, position_ids, past)
        self._mask = mask
        if self._record is not None:
            self._record.row_keys = mask.sum(-1).cpu()  # [batch, head, q_pos]
            self._record.row_allowed = allowed.expand(batch, 1, q_len, k_len)[:, 0].sum(-1).cpu()  # [batch, q_pos]

    def _random_mask(self, mask, allowed, position_ids, past) -> torch.Tensor:
        """As many keys per row as ``mask`` holds, at pseudo-random allowed positions."""
        batch, heads, q_len, k_len = mask.shape
        device = mask.device
        if position_ids is None:
            position_ids = torch.arange(past, past + q_len, device=device)[None]
        query_pos = position_ids.to(device).expand(batch, q_len)  # [batch, q_pos]
        if self._key_positions is None or self._key_positions.shape[1] != past:
            if past:
                logger.debug("random-mask: positions of %d cached keys unknown, using their cache index", past)
            self._key_positions = torch.arange(past, device=device)[None].expand(batch, past)
        self._key_positions = torch.cat([self._key_positions.to(device).expand(batch, -1), query_pos], dim=1)
        key_pos = self._key_positions
        if key_pos.shape[1] < k_len:  # a pre-allocated (static) cache: slots not yet written are masked
            pad = torch.full((batch, k_len - key_pos.shape[1]), -1, dtype=key_pos.dtype, device=device)
            key_pos = torch.cat([key_pos, pad], dim=1)
        score = _hash31(self.config.seed, torch.arange(heads, device=device)[None, :, None, None],
                        query_pos[:, None, :, None], key_pos[:, None, None, :])  # [batch, head, q, k] in [0, 2^31)
        score = score.masked_fill(~allowed, -1)
        order = score.argsort(dim=-1, descending=True, stable=True)
        rank = torch.empty_like(order).scatter_(-1, order, torch.arange(k_len, device=device).expand_as(order))
        return rank < mask.sum(-1, keepdim=True)  # allowed keys rank first, so this stays inside ``allowed``

    def _boost(self, layer: int, probs: torch.Tensor) -> torch.Tensor:
        gain = self.gains[layer]
        mode = self.config.mode
        if mode == "boost-all":
            boosted = probs * gain
        else:
            if self._mask is None:
                raise ConfigError("layer-0 mask missing: layer 0 did not run through rebalanced attention")
            if self._mask.shape != probs.shape:
                raise ConfigError(f"layer {layer} attention {tuple(probs.shape)} does not match the layer-0 mask "
                                  f"{tuple(self._mask.shape)}; layers with different head counts are not supported")
            boosted = torch.where(self._mask, probs * gain, probs)
            if mode == "renormalised":
                boosted = boosted / boosted.sum(dim=-1, keepdim=True)
        if self._record is not None:
            added = (boosted - probs).float() * self._attendable  # [batch, head, q, k]; padding rows excluded
            first = self._attendable.expand_as(probs)[:, 0].float().argmax(-1)  # [batch, q]: first attendable key
            on_first = added.gather(-1, first[:, None, :, None].expand(-1, probs.shape[1], -1, 1))
            self._record.first_added.append(on_first.sum(dim=(1, 2, 3)).cpu())
            self._record.total_added.append(added.sum(dim=(1, 2, 3)).cpu())
        return boosted


def _mix31(x: torch.Tensor) -> torch.Tensor:
    """A 31-bit integer hash (xorshift-multiply rounds); int64 arithmetic that never overflows."""
    x = ((x ^ (x >> 15)) * 0x2C1B3C6D) & _MASK31
    x = ((x ^ (x >> 12)) * 0x297A2D39) & _MASK31
    return x ^ (x >> 15)


def _hash31(seed: int, head, query_pos, key_pos) -> torch.Tensor:
    """Deterministic pseudo-random integers in [0, 2^31) for every (head, query position, key position)."""
    x = _mix31(torch.tensor(seed & _MASK31, dtype=torch.int64, device=head.device))
    x = _mix31(x ^ (head.long() & _MASK31))
    x = _mix31(x ^ (query_pos.long() & _MASK31))
    return _mix31(x ^ (key_pos.long() & _MASK31))


def rebalanced_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                         attention_mask: torch.Tensor | None, scaling: float, dropout: float = 0.0, **kwargs):
    """Eager attention with the rebalancing step; the function registered as ``ATTENTION_NAME``.

    The arithmetic is op for op that of transformers' eager attention (so ``alpha=0`` reproduces it bit for
    bit); the only addition is the call between the softmax and the product with V.

    Args:
        module (nn.Module): the attention module (must be one ``rebalance`` switched; provides ``layer_idx``).
        query (Tensor): ``[batch, head, q_pos, dim]``.
        key, value (Tensor): ``[batch, kv_head, k_pos, dim]`` (cache included).
        attention_mask (Tensor | None): additive ``[batch, 1, q_pos, k_pos]`` mask.
        scaling (float): the softmax scale (``dim ** -0.5`` for Llama).
        dropout (float): attention dropout probability (applied in training mode only).

    Returns:
        tuple[Tensor, Tensor]: the output ``[batch, q_pos, head, dim]`` and the rebalanced weights
        ``[batch, head, q_pos, k_pos]``.

    Raises:
        ConfigError: the module is not inside a ``rebalance`` block, or the model passes options the eager
            maths here does not implement.
    """
    session = _SESSIONS.get(module)
    if session is None:
        raise ConfigError(f"attention implementation {ATTENTION_NAME!r} is only valid inside "
                          "memreason.interventions.attention_rebalance.rebalance(model, ...)")
    unsupported = [name for name in _UNSUPPORTED_KWARGS if kwargs.get(name) is not None]
    if unsupported:
        raise ConfigError(f"this model's attention uses {', '.join(unsupported)}, which rebalanced (eager) "
                          "attention does not implement")
    n_rep = query.shape[1] // key.shape[1]
    key_states = repeat_kv(key, n_rep)  # [batch, head, k_pos, dim]
    value_states = repeat_kv(value, n_rep)

    attn_weights = torch.matmul(query, key_states.transpose(2, 3)) * scaling  # [batch, head, q_pos, k_pos]
    if attention_mask is not None:
        attn_weights = attn_weights + attention_mask
    attn_weights = nn.functional.softmax(attn_weights, dim=-1, dtype=torch.float32).to(query.dtype)
    attn_weights = session._step(module, attn_weights, attention_mask, kwargs.get("position_ids"))
    attn_weights = nn.functional.dropout(attn_weights, p=dropout, training=module.training)
    attn_output = torch.matmul(attn_weights, value_states)  # [batch, head, q_pos, dim]
    attn_output = attn_output.transpose(1, 2).contiguous()  # [batch, q_pos, head, dim]
    return attn_output, attn_weights


def _register() -> None:
    """Register the attention function and its (eager) mask builder; idempotent."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, eager_mask

    AttentionInterface.register(ATTENTION_NAME, rebalanced_attention)
    AttentionMaskInterface.register(ATTENTION_NAME, eager_mask)


def _implementation(module) -> str | None:
    config = getattr(module, "config", None)
    return getattr(config, "_attn_implementation", None)


def _attention_modules(model: nn.Module) -> tuple[list[nn.Module], nn.Module]:
    """The attention modules (layer 0 first) and the decoder stack that runs them, from the layer table
    ``memreason.model.layers``.

    Raises:
        ConfigError: the layer table finds no decoder layers, or their ``layer_idx`` are not 0..L-1.
    """
    try:
        lay = layout(model)
    except ConfigError as exc:
        raise ConfigError(f"no attention modules found in {type(model).__name__} ({exc}); rebalancing supports "
                          "decoder-only transformers models (Llama, Qwen2, Mistral, ...)") from None
    attention = [lay.attention(index) for index in range(lay.num_layers)]
    indices = [getattr(module, "layer_idx", None) for module in attention]
    if indices != list(range(len(attention))):
        # The attention function tells layers apart by ``layer_idx`` (layer 0 builds the mask).
        raise ConfigError(f"attention layer indices {indices} are not 0..{len(attention) - 1}; rebalancing needs "
                          "decoder layers whose attention knows its layer index")
    return attention, lay.body


def _activation_checkpointing(model: nn.Module) -> bool:
    # transformers 5.x renamed is_gradient_checkpointing (deprecated) to is_activation_checkpointing.
    if hasattr(type(model), "is_activation_checkpointing"):
        return bool(model.is_activation_checkpointing)
    return bool(getattr(model, "is_gradient_checkpointing", False))


def _configs(model: nn.Module) -> list:
    """Every distinct config object in the model whose attention implementation may change."""
    seen: dict[int, object] = {}
    pending = [getattr(module, "config", None) for module in model.modules()]
    while pending:
        config = pending.pop()
        if config is None or id(config) in seen or not hasattr(config, "_attn_implementation_internal"):
            continue
        seen[id(config)] = config
        pending.extend(getattr(config, key, None) for key in getattr(config, "sub_configs", {}) or {})
    return list(seen.values())


@contextlib.contextmanager
def rebalance(model: nn.Module, alpha: float = 0.2, theta: float = 0.01, depth_h: int | None = None,
              mode: Mode = "mask", *, seed: int = 0, diagnostics: bool = False) -> Iterator[Rebalancing]:
    """Run ``model`` with rebalanced attention inside the block (spec attention_rebalance.md §2).

    Works with plain forwards and with ``generate`` (prefill and every KV-cached decode step); batched,
    left-padded inputs give each sequence the result it gets alone.

    Args:
        model (PreTrainedModel): a decoder-only transformers model whose attention uses the attention
            interface (Llama, Qwen2, Mistral, SmolLM2, ...).
        alpha (float, default 0.2): boost strength.
        theta (float, default 0.01): layer-0 probability threshold of the mask.
        depth_h (int | None, default None): h of the schedule ``1 + alpha * (1 - l / h)``; None = last layer
            index (``LEGACY_DEPTH_H`` = 31 reproduces the original).
        mode (str, default "mask"): ``"mask"``, ``"boost-all"``, ``"random-mask"`` or ``"renormalised"``.
        seed (int, default 0): seed of the random-mask control.
        diagnostics (bool, default False): record a ``ForwardRecord`` per forward (costs a few reductions).

    Yields:
        Rebalancing: the session (gains, forward count, diagnostics).

    Raises:
        ConfigError: bad settings; a model that cannot switch its attention implementation; a model that is
            already inside ``rebalance`` (nesting is refused: the outer block's mask and gains would be
            ambiguous); gradient checkpointing in training mode (recomputed layers would run out of order).
    """
    config = RebalanceConfig(alpha=alpha, theta=theta, depth_h=depth_h, mode=mode, seed=seed)
    try:
        attention, stack = _attention_modules(model)
    except ConfigError as exc:
        if hasattr(model, "set_attn_implementation"):
            raise
        raise ConfigError(f"{type(model).__name__} cannot switch its attention implementation (not a "
                          f"transformers PreTrainedModel), and {exc}") from None
    if any(module in _SESSIONS for module in attention) or _implementation(attention[0]) == ATTENTION_NAME:
        raise ConfigError("this model is already inside rebalance(...); nested rebalancing is not supported, "
                          "exit the outer block first")
    if model.training and _activation_checkpointing(model):
        raise ConfigError("rebalancing does not support gradient checkpointing in training mode")
    if not hasattr(model, "set_attn_implementation"):
        raise ConfigError(f"{type(model).__name__} cannot switch its attention implementation "
                          "(not a transformers PreTrainedModel)")
    session = Rebalancing(config, len(attention), diagnostics, inspect.signature(stack.forward))
    if session.depth_h < session.num_layers - 1:
        logger.warning("depth_h=%d < last layer index %d: layers %d..%d get gains below 1 (attenuated), as the "
                       "original's hard-coded 31 did on 40-layer models", session.depth_h, session.num_layers - 1,
                       session.depth_h + 1, session.num_layers - 1)
    _register()

    configs = _configs(model)
    previous = [(cfg, cfg._attn_implementation_internal) for cfg in configs]
    handles = []
    try:
        model.set_attn_implementation(ATTENTION_NAME)
        not_switched = [module for module in attention if _implementation(module) != ATTENTION_NAME]
        if not_switched:
            raise ConfigError(f"{type(model).__name__} did not switch to rebalanced attention (layer "
                              f"{not_switched[0].layer_idx} still uses {_implementation(not_switched[0])!r}); its "
                              "attention does not go through transformers' AttentionInterface")
        for module in attention:
            _SESSIONS[module] = session
        handles.append(stack.register_forward_pre_hook(session._begin_forward, with_kwargs=True))
        handles.append(stack.register_forward_hook(session._end_forward, with_kwargs=True))
        logger.debug("rebalancing %d layers: mode=%s alpha=%s theta=%s h=%d", session.num_layers, mode, alpha,
                     theta, session.depth_h)
        yield session
    finally:
        for handle in handles:
            handle.remove()
        for module in attention:
            if _SESSIONS.get(module) is session:
                del _SESSIONS[module]
        # Restore the recorded values directly: set_attn_implementation would re-validate (and could
        # re-resolve, e.g. a kernel name) instead of giving back exactly what the model had.
        for cfg, implementation in previous:
            cfg._attn_implementation_internal = implementation
