"""The one layer-access table: where a causal LM keeps its decoder layers, attention, MLP, norms and heads.

Every intervention (hooks, memory injection, attention rebalancing) and every experiment finds modules
through ``layout(model)``, never by its own name search. A ``Layout`` names modules by position in the
module tree (``model.layers.3.self_attn``), the way TransformerLens names hook points, and takes sizes from
the model, never from constants.

* **Known families** (``FAMILIES``, keyed by ``config.model_type``): Llama/SmolLM2, Mistral, Qwen2, Qwen3,
  GPT-2. Each entry is exercised by a tiny-model test; add a family only with one.
* **Any other Llama-shaped decoder** (Gemma, Phi-3, OPT, OLMo, Granite, ...) is *detected*: the one
  ``ModuleList`` whose every entry holds an attention child (``self_attn`` / ``attn`` / ``self_attention`` /
  ``attention``) is the layer stack, its owner the body; the attention output projection, MLP and final
  norm are looked up among their usual names. A warning is logged once per model type, because a detected
  layout has not been checked by a test of ours: what "the attention output" means depends on the
  architecture (Gemma-2/3 and OLMo-2 normalise it again before the residual add; Phi-1/2, GPT-NeoX and
  Cohere run attention and MLP in parallel).

PEFT-wrapped models are unwrapped (``PeftModel.get_base_model()``), so hooks registered on the layers fire
whether the caller runs the wrapper or the base model.

Example::

    from memreason.model.layers import layout

    lay = layout(model)
    lay.num_layers                 # 30 for SmolLM2-135M
    lay.attention(8)               # model.model.layers[8].self_attn
    lay.attention_output(8)        # ... .self_attn.o_proj (input = concatenated heads)
    lay.final_norm, lay.lm_head, lay.embeddings
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from memreason.errors import ConfigError

logger = logging.getLogger(__name__)

ATTENTION_NAMES = ("self_attn", "attn", "self_attention", "attention")
ATTENTION_OUT_NAMES = ("o_proj", "c_proj", "out_proj", "dense", "o")
MLP_NAMES = ("mlp", "feed_forward", "ffn")
NORM_NAMES = ("norm", "ln_f", "final_layer_norm", "final_layernorm", "norm_f")


@dataclass(frozen=True)
class Family:
    """Where one architecture family keeps its modules, as attribute names.

    Attributes:
        name (str): family name used in messages (the ``model_type``).
        body (str): dotted path from the causal LM to the decoder stack (``model``, ``transformer``,
            ``model.decoder``).
        layers (str): attribute of the body holding the ``ModuleList`` of decoder layers.
        attention (str): attribute of a decoder layer holding its self-attention block.
        attention_out (str | None): attribute of the attention block holding its output projection.
        mlp (str | None): attribute of a decoder layer holding its MLP (None: the layer has no MLP module,
            e.g. OPT's ``fc1``/``fc2`` sit on the layer itself).
        norm (str | None): attribute of the body holding the final norm.
    """

    name: str
    body: str
    layers: str
    attention: str
    attention_out: str | None
    mlp: str | None
    norm: str | None


_LLAMA_LIKE = dict(body="model", layers="layers", attention="self_attn", attention_out="o_proj", mlp="mlp",
                   norm="norm")

# Keyed by ``config.model_type``. Each entry is exercised by a tiny-model test; add a family only with one.
FAMILIES: dict[str, Family] = {
    "llama": Family("llama", **_LLAMA_LIKE),
    "mistral": Family("mistral", **_LLAMA_LIKE),
    "qwen2": Family("qwen2", **_LLAMA_LIKE),
    "qwen3": Family("qwen3", **_LLAMA_LIKE),
    "gpt2": Family("gpt2", body="transformer", layers="h", attention="attn", attention_out="c_proj", mlp="mlp",
                   norm="ln_f"),
}

_warned: set[str] = set()  # model types whose detected layout was already announced


def unwrap(model):
    """Return the underlying ``*ForCausalLM`` of a PEFT-wrapped model, or the model itself."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


@dataclass(frozen=True)
class Layout:
    """Where one model keeps its parts. Obtain it from ``layout(model)``; it is a view, not a copy.

    Attributes:
        model: the (unwrapped) causal LM.
        family (Family): the attribute names in use.
        detected (bool): True when the family was found by searching the module tree rather than in
            ``FAMILIES``.
    """

    model: object
    family: Family
    detected: bool = False

    @property
    def body(self):
        """The decoder stack (``LlamaModel``, ``GPT2Model``, ...) that embeds tokens and runs the layers."""
        return self.model.get_submodule(self.family.body)

    @property
    def layers(self):
        """The ``ModuleList`` of decoder layers, index 0 nearest the embeddings."""
        return getattr(self.body, self.family.layers)

    @property
    def num_layers(self) -> int:
        """Number of decoder layers."""
        return len(self.layers)

    def check_layer(self, layer: int) -> int:
        """Validate a 0-based layer index (negative counts from the end) and return it as non-negative.

        Raises:
            ConfigError: not an int, or outside ``[-n_layers, n_layers)``.
        """
        n = self.num_layers
        if isinstance(layer, bool) or not isinstance(layer, int):
            raise ConfigError(f"layer must be an int, got {layer!r}")
        if not -n <= layer < n:
            raise ConfigError(f"layer {layer} is out of range: this model has {n} layers (0..{n - 1})")
        return layer % n

    def layer(self, index: int):
        """Decoder layer ``index`` (validated by ``check_layer``)."""
        return self.layers[self.check_layer(index)]

    def attention(self, index: int):
        """The self-attention block of layer ``index``; its forward returns ``(attn_output [batch, pos, d], ...)``."""
        return getattr(self.layer(index), self.family.attention)

    def attention_output(self, index: int):
        """The output projection inside layer ``index``'s attention (``o_proj`` / ``c_proj`` / ``out_proj``).

        Its input is the concatenation of the heads' outputs ``[batch, pos, n_heads * head_dim]``.

        Raises:
            ConfigError: this architecture's attention has no output projection memreason recognises.
        """
        return self._child(self.attention(index), self.family.attention_out, "attention output projection")

    def mlp(self, index: int):
        """The MLP block of layer ``index``.

        Raises:
            ConfigError: this architecture's layers have no MLP module memreason recognises.
        """
        return self._child(self.layer(index), self.family.mlp, "MLP module")

    @property
    def final_norm(self):
        """The norm applied to the residual stream before the unembedding (``norm`` / ``ln_f``).

        Raises:
            ConfigError: this architecture has no final norm memreason recognises.
        """
        return self._child(self.body, self.family.norm, "final norm")

    @property
    def lm_head(self):
        """The unembedding (``get_output_embeddings()``); ``.weight`` is ``[vocab, d_model]``."""
        return self.model.get_output_embeddings()

    @property
    def embeddings(self):
        """The input token embedding (``get_input_embeddings()``); ``.weight`` is ``[vocab, d_model]``."""
        return self.model.get_input_embeddings()

    def _child(self, parent, name: str | None, what: str):
        module = getattr(parent, name, None) if name else None
        if module is None:
            raise ConfigError(f"{type(self.model).__name__} has no {what} that memreason recognises "
                              f"(looked for {name or 'none of the usual names'})")
        return module

    def describe(self) -> str:
        """One line naming the module paths, e.g. ``model.layers[i].self_attn.o_proj``, for logs."""
        f = self.family
        return (f"layers {f.body}.{f.layers}[i] ({self.num_layers}), attention .{f.attention}"
                f".{f.attention_out or '?'}, mlp .{f.mlp or '?'}, final norm {f.body}.{f.norm or '?'}")


def layout(model) -> Layout:
    """The ``Layout`` of a (possibly PEFT-wrapped) causal LM.

    Model types in ``FAMILIES`` use their entry; any other decoder is searched for a Llama-shaped layer
    stack (see the module docstring), with a warning logged once per model type.

    Raises:
        ConfigError: the model is a bare decoder body (no LM head around it), or no single layer stack
            with attention blocks can be found.
    """
    base = unwrap(model)
    model_type = getattr(getattr(base, "config", None), "model_type", None)
    fam = FAMILIES.get(model_type)
    if fam is not None:
        try:
            base.get_submodule(fam.body)
        except AttributeError:
            raise ConfigError(f"{type(base).__name__} has no '.{fam.body}' decoder stack; pass a causal LM "
                              f"(e.g. AutoModelForCausalLM), not a bare {fam.name} body") from None
        return Layout(base, fam)
    fam = detect_family(base)
    if model_type not in _warned:
        _warned.add(model_type)
        lay = Layout(base, fam, detected=True)
        logger.warning("model type %r is not in memreason's layer table; using the layout found in its module "
                       "tree (%s). Check that the attention output is what you mean to edit.",
                       model_type, lay.describe())
    return Layout(base, fam, detected=True)


def detect_family(base) -> Family:
    """Search ``base``'s module tree for a decoder-layer stack and name its parts.

    Args:
        base: an unwrapped causal LM.

    Returns:
        Family: named after ``config.model_type`` (or the class name).

    Raises:
        ConfigError: an encoder(-decoder) or other non-generative model, no layer stack or more than one,
            or a bare body without an LM head.
    """
    import torch

    config = getattr(base, "config", None)
    name = getattr(config, "model_type", None) or type(base).__name__
    can_generate = getattr(base, "can_generate", None)
    if getattr(config, "is_encoder_decoder", False) or (callable(can_generate) and not can_generate()):
        raise ConfigError(f"{type(base).__name__} (model type {name!r}) is not a decoder-only causal LM; "
                          "interventions support decoder-only causal LMs (AutoModelForCausalLM)")
    stacks = []
    for path, module in base.named_modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) > 0 and all(
                _first_child(layer, ATTENTION_NAMES) is not None for layer in module):
            stacks.append(path)
    if len(stacks) != 1:
        found = f"found {len(stacks)} ({', '.join(stacks)})" if stacks else "found none"
        raise ConfigError(f"cannot find the decoder layers of {type(base).__name__} (model type {name!r}): "
                          f"need exactly one list of layers with a {'/'.join(ATTENTION_NAMES)} block, {found}; "
                          f"interventions support decoder-only causal LMs")
    body_path, _, layers_attr = stacks[0].rpartition(".")
    if not body_path or base.get_output_embeddings() is None:
        raise ConfigError(f"{type(base).__name__} has no LM head around its decoder stack; pass a causal LM "
                          "(e.g. AutoModelForCausalLM), not a bare decoder body")
    body = base.get_submodule(body_path)
    first = getattr(body, layers_attr)[0]
    attention = _first_child(first, ATTENTION_NAMES)
    return Family(name=name, body=body_path, layers=layers_attr, attention=attention,
                  attention_out=_first_child(getattr(first, attention), ATTENTION_OUT_NAMES),
                  mlp=_first_child(first, MLP_NAMES), norm=_first_child(body, NORM_NAMES))


def _first_child(module, names) -> str | None:
    children = dict(module.named_children())
    return next((n for n in names if n in children), None)
