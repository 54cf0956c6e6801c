"""Memory injection (Sakarvadia et al. 2023): add a vector encoding a "memory" text to one layer's attention output.

The mechanism (spec/memory_injection.md §2): turn the memory text (e.g. the bridge entity ``"France"`` of a
two-hop prompt) into a d_model vector v, and add tau * v to the output of the attention block of layer L,
i.e. to the residual stream right after attention. The original adds v to TransformerLens' ``hook_result``
of head 0, which is the same thing as a layer-level addition (spec §2.1); here it is a forward hook on the
attention module (``self_attn`` / ``attn``), whose first output is the post-``o_proj`` block output.

This module owns:

* encoders from memory text to vector (``memory_vector``, ``memory_vectors``): ``"unembed"`` (sum of the
  raw unembedding rows of the memory's distinct tokens), ``"unembed-centered"`` (the paper's vector: rows
  with the final-norm gain folded in and centred over the vocabulary, as TransformerLens processes GPT-2;
  spec §2.2(5)), ``"embed"`` (input-embedding rows) and ``"layer"`` (the same layer's attention output at
  the memory's last token, when the model reads the memory text);
* the reference residual-stream norm that makes tau relative (``residual_norms``);
* the hooks: ``add_to_attention_output`` (per-layer, optionally per-row vectors; used by the sweep) and
  ``inject`` (the user-facing context manager);
* ``left_padded_batch``: raw texts as the model reads them here (the tokenizer's default special tokens),
  padded by ``memreason.generate``.

Modules are found through ``memreason.model.layers.layout``; hooks are scoped by ``interventions.hooks``.
What "the attention output" is depends on the architecture: on Gemma-2/3 and OLMo-2 a norm follows it
before the residual add, so there the addition is not a plain residual-stream edit.

Positions are token indices *within each row's prompt*, computed from the attention mask, so they are right
under left padding and during ``generate`` with a KV cache. ``"all"`` injects at every real token, generated
ones included (the paper's choice); ``"last"`` and spans address prompt tokens only. A forward whose rows
extend the previous prompts token for token (``generate(use_cache=False)`` recomputing from scratch) keeps
the same prompt positions, which makes cached generation and full recomputation agree exactly.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

from memreason.errors import ConfigError
from memreason.interventions.hooks import scoped_hooks
from memreason.model.layers import layout, unwrap

logger = logging.getLogger(__name__)

ENCODERS = ("unembed", "unembed-centered", "embed", "layer")
TAU_MODES = ("absolute", "relative")

# Neutral sentences, our own words: the default calibration set for relative tau and the default prompts
# for collateral-damage measurements. Nothing in them is about the entities of the bundled prompt set.
CALIBRATION_TEXTS = (
    "The weather today is mild, with a light breeze in the afternoon.",
    "She opened the window and let the fresh air into the small room.",
    "A good recipe lists every ingredient before describing the steps.",
    "The train was late again, so we waited on the platform for a while.",
    "Children often learn new words faster than adults do.",
    "He wrote a short note and left it on the kitchen table.",
    "The meeting has been moved to Thursday morning at ten.",
    "Most plants need water, light and a little patience to grow.",
    "Our neighbour keeps a small garden full of tomatoes and beans.",
    "The library closes early on Sundays during the summer.",
    "After dinner they went for a slow walk around the block.",
    "A sharp pencil and a clean sheet of paper are all you need.",
    "The old bridge was repaired last year and looks new now.",
    "Please remember to turn off the lights when you leave.",
    "The music grew louder as the band reached the final song.",
    "It took three tries before the cake came out of the oven right.",
)


# --------------------------------------------------------------------------------------------------------
# Tokenisation helpers
# --------------------------------------------------------------------------------------------------------

def memory_token_ids(tokenizer, memory: str, *, leading_space: bool = False) -> list[int]:
    """Distinct token ids of a memory text, in first-occurrence order (the paper's multi-hot set).

    The memory is tokenised without special tokens and, by default, without a leading space, so the first
    word takes its sentence-initial form ("France", not " France") as in the original (spec §2.2(1)).

    Args:
        tokenizer: the model's tokenizer.
        memory (str): the memory text.
        leading_space (bool, default False): prepend a space before tokenising.

    Returns:
        list[int]: distinct ids; repeated tokens count once (spec §2.2(2)).

    Raises:
        ConfigError: the memory is empty or whitespace only, or tokenises to nothing.
    """
    if not isinstance(memory, str) or not memory.strip():
        raise ConfigError(f"memory text must be a non-empty string, got {memory!r}")
    text = " " + memory if leading_space else memory
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if not ids:
        raise ConfigError(f"memory {memory!r} tokenises to no tokens")
    return list(dict.fromkeys(int(i) for i in ids))


def left_padded_batch(tokenizer, texts: Sequence[str], device=None):
    """Tokenise ``texts`` with the tokenizer's default special tokens and pad them on the left.

    Default special tokens, not ``generate.encode_prompts``' ``add_special_tokens=False``: these texts are
    raw sentences (two-hop prompts, memories, calibration text), not prompts already rendered with their
    BOS/chat framing, so the model should see them as the tokenizer frames plain text (a BOS for Llama-3,
    nothing for SmolLM2 or GPT-2), as the original experiment did. Padding is ``generate.left_pad`` with
    ``generate.pad_id``: every row's last real token sits at index -1, where next-token logits are read,
    and position ids count real tokens only, so a padded row computes what it computes alone.

    Args:
        tokenizer: the model's tokenizer (needs a pad token id, or an EOS id to pad with).
        texts (Sequence[str]): the prompts.
        device: where to put the tensors.

    Returns:
        dict: ``input_ids``, ``attention_mask``, ``position_ids``, each ``[batch, pos]`` long tensors.

    Raises:
        ConfigError: the tokenizer has neither a pad nor an EOS token.
    """
    from memreason.generate import left_pad, pad_id

    pad = pad_id(tokenizer)
    return left_pad([tokenizer(t)["input_ids"] for t in texts], pad, device)


def _model_device(model):
    return next(unwrap(model).parameters()).device


# --------------------------------------------------------------------------------------------------------
# Encoders
# --------------------------------------------------------------------------------------------------------

def memory_vector(model, tokenizer, memory: str, *, encoder: str = "unembed", layer: int | None = None,
                  leading_space: bool = False, center: bool | None = None):
    """Encode one memory text as a d_model vector.

    Args:
        model: a supported causal LM (see ``memreason.model.layers``), possibly PEFT-wrapped.
        tokenizer: its tokenizer.
        memory (str): the memory text.
        encoder (str, default "unembed"): one of ``ENCODERS``:
            ``"unembed"``: v = sum of ``lm_head.weight`` rows of the distinct memory tokens (raw weights; what
            the original code used for Llama models).
            ``"unembed-centered"``: v = sum over the same tokens of c(gamma * (U[t] - mean_v U[v])), with gamma
            the final-norm gain and c centring over d_model; this is TransformerLens' processed W_U, i.e. the
            paper's GPT-2 vector (spec §2.2(5)).
            ``"embed"``: sum of input-embedding rows.
            ``"layer"``: the attention output of ``layer`` at the memory's last token when the model reads the
            memory text (with the tokenizer's default special tokens).
        layer (int | None): required for ``"layer"``, ignored otherwise.
        leading_space (bool, default False): tokenise the memory as " " + memory.
        center (bool | None): for ``"unembed-centered"``, whether to centre over d_model; None = only when
            the final norm is a LayerNorm (which removes the mean anyway; RMSNorm does not).

    Returns:
        torch.Tensor: ``[d_model]`` float32 on the model's device.

    Raises:
        ConfigError: unknown encoder, empty memory, ``"layer"`` without a layer or with one out of range.
    """
    return memory_vectors(model, tokenizer, [memory], encoder=encoder, layer=layer,
                          leading_space=leading_space, center=center)[0]


def memory_vectors(model, tokenizer, memories: Sequence[str], *, encoder: str = "unembed",
                   layer: int | None = None, leading_space: bool = False, center: bool | None = None):
    """Encode several memory texts at once; same arguments as ``memory_vector``.

    Returns:
        torch.Tensor: ``[n_memories, d_model]`` float32 on the model's device.
    """
    import torch

    if encoder not in ENCODERS:
        raise ConfigError(f"unknown encoder {encoder!r}; choose one of {', '.join(ENCODERS)}")
    if encoder == "layer":
        if layer is None:
            raise ConfigError("encoder 'layer' needs the layer whose attention output encodes the memory")
        return layer_encoded_vectors(model, tokenizer, memories, [layer])[:, 0]
    token_sets = [memory_token_ids(tokenizer, m, leading_space=leading_space) for m in memories]
    base = unwrap(model)
    with torch.no_grad():
        if encoder == "embed":
            table = base.get_input_embeddings().weight  # [vocab, d]
        else:
            table = base.get_output_embeddings().weight  # [vocab, d]
        rows = torch.stack([table[ids].float().sum(0) for ids in token_sets])  # [n, d]
        if encoder == "unembed-centered":
            rows = _fold_and_center(model, table, rows, torch.tensor([len(s) for s in token_sets]), center)
    return rows.to(_model_device(model))


def _fold_and_center(model, table, sums, counts, center):
    """TransformerLens' W_U processing applied to sums of k raw rows: sum_t c(g * (U[t] - mean_v U)).

    c is linear, so the per-token sum equals c(g * (sum_t U[t] - k * mean_v U)); one vocabulary mean
    serves every memory.
    """
    import torch

    norm = layout(model).final_norm
    gain = getattr(norm, "weight", None)
    gain = torch.ones(sums.shape[-1]) if gain is None else gain.detach().float().cpu()
    if center is None:
        center = isinstance(norm, torch.nn.LayerNorm)
    vocab_mean = table.float().mean(0).cpu()  # [d]
    out = gain * (sums.cpu() - counts[:, None].float() * vocab_mean)
    if center:
        out = out - out.mean(-1, keepdim=True)
    return out


def layer_encoded_vectors(model, tokenizer, memories: Sequence[str], layers: Sequence[int]):
    """The ``"layer"`` encoder for many memories and layers in one forward pass.

    Args:
        model: a supported causal LM.
        tokenizer: its tokenizer.
        memories (Sequence[str]): memory texts (each read with the tokenizer's default special tokens).
        layers (Sequence[int]): layers whose attention output to take.

    Returns:
        torch.Tensor: ``[n_memories, n_layers, d_model]`` float32, attention output at each memory's last token.
    """
    import torch

    for m in memories:
        memory_token_ids(tokenizer, m)  # same validation as the other encoders
    layers = [layout(model).check_layer(layer) for layer in layers]
    batch = left_padded_batch(tokenizer, list(memories), _model_device(model))
    captured: dict[int, torch.Tensor] = {}

    def capture(layer):
        def hook(module, args, output):
            out = output[0] if isinstance(output, tuple) else output  # [batch, pos, d]
            captured[layer] = out[:, -1].detach().float()  # left padding: -1 is the last real token
        return hook

    with torch.no_grad(), scoped_hooks() as scope:
        for layer in set(layers):
            scope.add_forward_hook(layout(model).attention(layer), capture(layer))
        layout(model).body(**batch)
    return torch.stack([captured[layer] for layer in layers], dim=1)


def residual_norms(model, tokenizer, texts: Sequence[str] = CALIBRATION_TEXTS):
    """Typical norm of the residual stream entering each layer: the median per-token L2 norm over ``texts``.

    A median rather than a mean because the first token of a sequence often carries a residual many times
    larger than the others (an attention sink), which would dominate a mean.

    Args:
        model: a supported causal LM.
        tokenizer: its tokenizer.
        texts (Sequence[str], default CALIBRATION_TEXTS): calibration prompts.

    Returns:
        torch.Tensor: ``[n_layers]`` float32 on the CPU.
    """
    import torch

    if not texts:
        raise ConfigError("residual_norms needs at least one calibration text")
    batch = left_padded_batch(tokenizer, list(texts), _model_device(model))
    real = batch["attention_mask"].bool()  # [batch, pos]
    norms: dict[int, torch.Tensor] = {}

    def capture(layer):
        def hook(module, args, kwargs):
            hidden = args[0] if args else kwargs["hidden_states"]  # [batch, pos, d]
            norms[layer] = hidden.detach().float().norm(dim=-1)[real].median().cpu()
        return hook

    lay = layout(model)
    with torch.no_grad(), scoped_hooks() as scope:
        for layer, module in enumerate(lay.layers):
            scope.add_forward_pre_hook(module, capture(layer), with_kwargs=True)
        lay.body(**batch)
    return torch.stack([norms[layer] for layer in range(lay.num_layers)])


# --------------------------------------------------------------------------------------------------------
# Positions
# --------------------------------------------------------------------------------------------------------

def check_positions(positions):
    """Validate and normalise a positions argument.

    Args:
        positions: ``"all"``, ``"last"``, a ``slice`` with step None, or a ``(start, stop)`` pair of ints or
            None; slice bounds index the prompt's tokens, negatives counting from the prompt's end.

    Returns:
        ``"all"``, ``"last"`` or a ``(start, stop)`` tuple.

    Raises:
        ConfigError: anything else.
    """
    if positions in ("all", "last"):
        return positions
    if isinstance(positions, slice):
        if positions.step not in (None, 1):
            raise ConfigError(f"positions slice must not have a step, got {positions}")
        positions = (positions.start, positions.stop)
    if (isinstance(positions, tuple) and len(positions) == 2
            and all(p is None or (isinstance(p, int) and not isinstance(p, bool)) for p in positions)):
        return positions
    raise ConfigError(f"positions must be 'all', 'last', a slice or a (start, stop) pair, got {positions!r}")


class _PositionTracker:
    """Works out, before each forward, which positions of each row receive the vector.

    A forward pre-hook on the decoder body reads ``input_ids``/``inputs_embeds``, the 2-D attention mask and
    the cache length. Token index within a row = number of real tokens before it (left padding aware).
    The prompt of each row is fixed by the first forward without a cache; later forwards are either cached
    decoding steps or recomputations whose rows start with those prompts, and both keep the prompt lengths.
    """

    def __init__(self, positions):
        self.positions = positions
        self.prompt_ids: list | None = None  # per row, the prompt's real token ids
        self.prompt_len = None  # [batch] long
        self.select = None  # [batch, pos] bool for the forward in progress

    def _extends_prompts(self, rows) -> bool:
        if self.prompt_ids is None or rows is None or len(rows) != len(self.prompt_ids):
            return False
        return all(len(r) >= len(p) and r[:len(p)] == p for r, p in zip(rows, self.prompt_ids))

    def pre_hook(self, module, args, kwargs):
        import torch

        input_ids = kwargs.get("input_ids", args[0] if args else None)
        embeds = kwargs.get("inputs_embeds")
        ref = input_ids if input_ids is not None else embeds
        batch, width = ref.shape[0], ref.shape[1]
        device = ref.device
        cache = kwargs.get("past_key_values")
        past = int(cache.get_seq_length()) if cache is not None and hasattr(cache, "get_seq_length") else 0
        mask = kwargs.get("attention_mask")
        if mask is not None and mask.dim() == 2 and mask.shape[1] == past + width:
            full_index = mask.long().cumsum(-1) - 1  # [batch, past + pos]
            index, real = full_index[:, -width:], mask[:, -width:].bool()
        else:
            # No 2-D mask (or a custom 4-D one): every position is a real token.
            index = (torch.arange(width, device=device) + past).expand(batch, width)
            real = torch.ones(batch, width, dtype=torch.bool, device=device)

        if past == 0:
            rows = None
            if input_ids is not None:
                rows = [input_ids[b][real[b]].tolist() for b in range(batch)]
            if not self._extends_prompts(rows):
                self.prompt_ids = rows
                self.prompt_len = real.sum(-1)
        elif self.prompt_len is None or self.prompt_len.shape[0] != batch:
            if self.positions != "all":
                raise ConfigError(
                    f"positions={self.positions!r} are prompt positions, but this forward continues a cache "
                    "whose prompt was not run inside the injection context; start generation inside it")
        self.select = self._select(index, real)

    def _select(self, index, real):
        import torch

        if self.positions == "all":
            return real
        length = self.prompt_len.to(index.device)[:, None]  # [batch, 1]
        if self.positions == "last":
            return real & (index == length - 1)
        start, stop = self.positions

        def bound(value, default):  # a slice bound per row; negatives count from the prompt's end
            if value is None:
                return default
            return value + length if value < 0 else torch.full_like(length, value)

        start = bound(start, torch.zeros_like(length)).clamp(min=0)
        stop = bound(stop, length).minimum(length)  # spans address prompt tokens only
        return real & (index >= start) & (index < stop)


@contextlib.contextmanager
def add_to_attention_output(model, deltas: Mapping[int, object], positions="all") -> Iterator[None]:
    """Add fixed vectors to the attention-block output of some layers while the block runs.

    This is the mechanism under ``inject`` and the batched sweep. Rows that should not be edited at a layer
    can carry a zero vector there: adding 0.0 leaves every float unchanged, so batching cells is exact.

    Args:
        model: a supported causal LM, possibly PEFT-wrapped.
        deltas (Mapping[int, Tensor]): layer -> vector to add, ``[d_model]`` (every row) or
            ``[batch, d_model]`` (one per row; the forward's batch size must match).
        positions: see ``check_positions``.

    Raises:
        ConfigError: bad layer or positions, a vector of the wrong width or batch size.
    """
    positions = check_positions(positions)
    lay = layout(model)
    hidden = unwrap(model).config.hidden_size
    checked = {}
    for layer, delta in deltas.items():
        if delta.dim() not in (1, 2) or delta.shape[-1] != hidden:
            raise ConfigError(f"vector for layer {layer} has shape {tuple(delta.shape)}; expected "
                              f"[{hidden}] or [batch, {hidden}]")
        checked[lay.check_layer(layer)] = delta
    tracker = _PositionTracker(positions)

    def make_hook(delta):
        def hook(module, args, output):
            out = output[0] if isinstance(output, tuple) else output  # [batch, pos, d]
            select = tracker.select
            if select is None or select.shape != out.shape[:2]:
                raise ConfigError("injection hook ran outside a forward of the hooked model's decoder")
            if delta.dim() == 2 and delta.shape[0] != out.shape[0]:
                raise ConfigError(f"{delta.shape[0]} per-row vectors for a batch of {out.shape[0]} rows")
            vec = delta.to(device=out.device, dtype=out.dtype)
            vec = vec[:, None, :] if vec.dim() == 2 else vec[None, None, :]  # [batch|1, 1, d]
            edited = out + vec * select[..., None].to(out.dtype)
            return (edited, *output[1:]) if isinstance(output, tuple) else edited
        return hook

    with scoped_hooks() as scope:
        scope.add_forward_pre_hook(lay.body, tracker.pre_hook, with_kwargs=True)
        for layer, delta in checked.items():
            scope.add_forward_hook(lay.attention(layer), make_hook(delta))
        yield


# --------------------------------------------------------------------------------------------------------
# The user-facing context manager
# --------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Injection:
    """What an ``inject`` block adds, for logging and inspection.

    Attributes:
        layer (int): 0-based layer whose attention output is edited.
        vector: ``[d_model]`` the encoded memory (before scaling).
        delta: ``[d_model]`` what is actually added at each selected position.
        tau (float): the strength as given.
        tau_mode (str): ``"absolute"`` (delta = tau * v) or ``"relative"`` (‖delta‖ = tau * reference_norm).
        reference_norm (float | None): residual norm at ``layer`` used by relative mode.
        positions: normalised positions (see ``check_positions``).
        memory (str | None): the memory text, when one was given.
    """

    layer: int
    vector: object
    delta: object
    tau: float
    tau_mode: str
    reference_norm: float | None
    positions: object
    memory: str | None


def scaled_delta(vector, tau: float, tau_mode: str, reference_norm: float | None = None):
    """tau * v (absolute) or tau * reference_norm * v / ‖v‖ (relative). Works row-wise on ``[..., d]``.

    Raises:
        ConfigError: unknown mode, or relative mode with a zero vector or no reference norm.
    """
    if tau_mode == "absolute":
        return vector * tau
    if tau_mode != "relative":
        raise ConfigError(f"unknown tau_mode {tau_mode!r}; choose one of {', '.join(TAU_MODES)}")
    if reference_norm is None:
        raise ConfigError("relative tau needs a reference residual norm")
    norm = vector.norm(dim=-1, keepdim=True)
    if bool((norm == 0).any()):
        raise ConfigError("relative tau cannot scale a zero vector")
    return vector / norm * (tau * reference_norm)


@contextlib.contextmanager
def inject(model, tokenizer=None, *, layer: int, memory: str | None = None, vector=None, tau: float = 1.0,
           tau_mode: str = "absolute", positions="all", encoder: str = "unembed",
           reference_norm: float | None = None, leading_space: bool = False) -> Iterator[Injection]:
    """Add a memory vector to the attention output of ``layer`` for every forward inside the block.

    Works for single forwards, left-padded batches and ``generate`` with or without a KV cache; the hooks are
    removed on exit, also when the block raises.

    Example::

        with inject(model, tokenizer, memory="France", layer=8, tau=0.5, tau_mode="relative"):
            out = model.generate(**batch, max_new_tokens=5)

    Args:
        model: a causal LM whose layout ``memreason.model.layers`` knows (Llama/SmolLM2, Mistral, Qwen2/3,
            GPT-2) or detects (other Llama-shaped decoders, with a warning), possibly PEFT-wrapped.
        tokenizer: needed to encode ``memory`` and for relative tau without ``reference_norm``.
        layer (int): 0-based layer (negative counts from the end).
        memory (str | None): memory text; give exactly one of ``memory`` and ``vector``.
        vector (Tensor | None): a precomputed ``[d_model]`` vector.
        tau (float, default 1.0): strength; 0 is an exact no-op.
        tau_mode (str, default "absolute"): ``"absolute"`` adds tau * v (the paper's tweak factor);
            ``"relative"`` adds a vector of norm tau * (median residual norm entering ``layer``) along v.
        positions (default "all"): ``"all"``, ``"last"`` or a span of prompt tokens (see ``check_positions``).
            The prompt of each row is set by the first forward without a cache inside the block; a later
            forward whose rows start with those prompts (a recomputation during generation) keeps them.
        encoder (str, default "unembed"): how ``memory`` becomes a vector (see ``memory_vector``).
        reference_norm (float | None): residual norm for relative mode; None = measured on
            ``CALIBRATION_TEXTS``.
        leading_space (bool, default False): tokenise the memory as " " + memory.

    Yields:
        Injection: the layer, vector and delta in force.

    Raises:
        ConfigError: bad layer, positions, tau, tau_mode or encoder; empty memory; both or neither of
            memory and vector; unsupported architecture.
    """
    import torch

    layer = layout(model).check_layer(layer)
    positions = check_positions(positions)
    if isinstance(tau, bool) or not isinstance(tau, (int, float)) or not math.isfinite(tau):
        raise ConfigError(f"tau must be a finite number, got {tau!r}")
    if tau_mode not in TAU_MODES:
        raise ConfigError(f"unknown tau_mode {tau_mode!r}; choose one of {', '.join(TAU_MODES)}")
    if (memory is None) == (vector is None):
        raise ConfigError("give exactly one of memory= (a text) and vector= (a precomputed tensor)")
    if memory is not None:
        if tokenizer is None:
            raise ConfigError("encoding a memory text needs the tokenizer: inject(model, tokenizer, memory=...)")
        vector = memory_vector(model, tokenizer, memory, encoder=encoder, layer=layer,
                               leading_space=leading_space)
    else:
        vector = torch.as_tensor(vector)
        if vector.dim() != 1:
            raise ConfigError(f"vector must be 1-D [d_model], got shape {tuple(vector.shape)}")
    if tau_mode == "relative" and reference_norm is None:
        if tokenizer is None:
            raise ConfigError("relative tau needs reference_norm= or a tokenizer to measure it")
        reference_norm = float(residual_norms(model, tokenizer)[layer])
    delta = scaled_delta(vector.float(), float(tau), tau_mode, reference_norm)
    info = Injection(layer=layer, vector=vector, delta=delta, tau=float(tau), tau_mode=tau_mode,
                     reference_norm=reference_norm, positions=positions, memory=memory)
    logger.debug("injecting %s at layer %d: |delta| = %.3f, positions %s", memory or "a vector", layer,
                 float(delta.norm()), positions)
    with add_to_attention_output(model, {layer: delta}, positions):
        yield info
