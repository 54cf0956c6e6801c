"""Shared plumbing for interventions: where a model keeps its layers, and hooks that cannot outlive their scope.

Two things live here and nothing else:

* **Layer access.** ``decoder_layers``, ``attention_module``, ``final_norm`` and ``body`` find modules by
  position in the module tree of the supported families (Llama/SmolLM2/Mistral, Qwen2/Qwen3, GPT-2), on a
  plain model or one wrapped by PEFT. Sizes come from the model, never from constants.
* **Scoped hooks.** ``scoped_hooks()`` is a context manager that hands out a ``HookScope``; every handle
  registered through it is removed in ``finally``, so an exception inside the block (or inside a hook)
  leaves no hook behind. Scopes nest: an inner scope removes only its own handles. PyTorch hooks are global
  state on the module (the footgun TransformerLens documents in ``HookedRootModule``), hence the scope.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from memreason.errors import ConfigError

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Family:
    """Where one architecture family keeps its modules, as attribute names on the causal-LM wrapper.

    Attributes:
        name (str): family name used in messages.
        body (str): attribute of the causal LM holding the decoder stack (``model`` / ``transformer``).
        layers (str): attribute of the body holding the ``ModuleList`` of decoder layers.
        attention (str): attribute of a decoder layer holding its self-attention block.
        attention_out (str): attribute of the attention block holding its output projection.
        norm (str): attribute of the body holding the final norm.
        adds_positions (bool): True when the body adds absolute position embeddings to ``inputs_embeds``
            (GPT-2), so a cached residual cannot be fed back in as ``inputs_embeds``.
    """

    name: str
    body: str
    layers: str
    attention: str
    attention_out: str
    norm: str
    adds_positions: bool = False


_LLAMA_LIKE = dict(body="model", layers="layers", attention="self_attn", attention_out="o_proj", norm="norm")

# Keyed by ``config.model_type``. Each entry is exercised by a tiny-model test; add a family only with one.
FAMILIES: dict[str, Family] = {
    "llama": Family("llama", **_LLAMA_LIKE),
    "mistral": Family("mistral", **_LLAMA_LIKE),
    "qwen2": Family("qwen2", **_LLAMA_LIKE),
    "qwen3": Family("qwen3", **_LLAMA_LIKE),
    "gpt2": Family("gpt2", body="transformer", layers="h", attention="attn", attention_out="c_proj",
                   norm="ln_f", adds_positions=True),
}


def unwrap(model):
    """Return the underlying ``*ForCausalLM`` of a PEFT-wrapped model, or the model itself.

    PEFT's ``PeftModel.get_base_model()`` returns the causal LM whose submodules carry the adapters, so hooks
    registered on its layers fire whether the caller runs the wrapper or the base model.
    """
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def family(model) -> Family:
    """The ``Family`` of a (possibly PEFT-wrapped) causal LM.

    Raises:
        ConfigError: the architecture is not one memreason knows how to hook.
    """
    base = unwrap(model)
    model_type = getattr(getattr(base, "config", None), "model_type", None)
    fam = FAMILIES.get(model_type)
    if fam is None:
        raise ConfigError(
            f"unsupported architecture {model_type!r} ({type(base).__name__}); interventions support "
            f"{', '.join(sorted(FAMILIES))}")
    if not hasattr(base, fam.body):
        raise ConfigError(f"{type(base).__name__} has no '.{fam.body}' decoder stack; pass a causal LM "
                          f"(e.g. AutoModelForCausalLM), not a bare {fam.name} body")
    return fam


def body(model):
    """The decoder stack (``LlamaModel``, ``GPT2Model``, ...) that embeds tokens and runs the layers."""
    return getattr(unwrap(model), family(model).body)


def decoder_layers(model):
    """The ``ModuleList`` of decoder layers, index 0 nearest the embeddings."""
    return getattr(body(model), family(model).layers)


def num_layers(model) -> int:
    """Number of decoder layers."""
    return len(decoder_layers(model))


def check_layer(model, layer: int) -> int:
    """Validate a 0-based layer index (negative counts from the end) and return it as non-negative.

    Raises:
        ConfigError: not an int, or outside ``[-n_layers, n_layers)``.
    """
    n = num_layers(model)
    if isinstance(layer, bool) or not isinstance(layer, int):
        raise ConfigError(f"layer must be an int, got {layer!r}")
    if not -n <= layer < n:
        raise ConfigError(f"layer {layer} is out of range: this model has {n} layers (0..{n - 1})")
    return layer % n


def attention_module(model, layer: int):
    """The self-attention block of ``layer``; its forward returns ``(attn_output [batch, pos, d], weights)``."""
    return getattr(decoder_layers(model)[check_layer(model, layer)], family(model).attention)


def attention_output_projection(model, layer: int):
    """The output projection inside ``layer``'s attention (``o_proj`` / ``c_proj``); input = concatenated heads."""
    return getattr(attention_module(model, layer), family(model).attention_out)


def final_norm(model):
    """The norm applied to the residual stream before the unembedding (``norm`` / ``ln_f``)."""
    return getattr(body(model), family(model).norm)


class HookScope:
    """Registers hooks and remembers every handle so that ``remove()`` detaches exactly these hooks.

    Obtain one from ``scoped_hooks()`` rather than building it directly; the context manager guarantees
    ``remove()`` runs.
    """

    def __init__(self) -> None:
        self._handles: list = []

    def add_forward_hook(self, module, hook: Callable, *, with_kwargs: bool = False):
        """``module.register_forward_hook(hook, with_kwargs=...)``, remembered for removal."""
        handle = module.register_forward_hook(hook, with_kwargs=with_kwargs)
        self._handles.append(handle)
        return handle

    def add_forward_pre_hook(self, module, hook: Callable, *, with_kwargs: bool = False):
        """``module.register_forward_pre_hook(hook, with_kwargs=...)``, remembered for removal."""
        handle = module.register_forward_pre_hook(hook, with_kwargs=with_kwargs)
        self._handles.append(handle)
        return handle

    def __len__(self) -> int:
        return len(self._handles)

    def remove(self) -> None:
        """Detach every hook this scope registered (idempotent)."""
        while self._handles:
            self._handles.pop().remove()


@contextlib.contextmanager
def scoped_hooks() -> Iterator[HookScope]:
    """A ``HookScope`` whose hooks are removed when the block exits, normally or by an exception.

    Example::

        with scoped_hooks() as scope:
            scope.add_forward_hook(attention_module(model, 3), my_hook)
            model(**batch)
        # no hook left on the model here
    """
    scope = HookScope()
    try:
        yield scope
    finally:
        scope.remove()


def hook_count(model) -> int:
    """Number of forward and forward-pre hooks attached anywhere in ``model`` (for leak checks)."""
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())
