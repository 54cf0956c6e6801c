"""Tiny random causal LMs of the transformers families the interventions are tested on, built from each
family's own Config class with 2-4 layers and small dims (a companion of ``conftest.build_tiny_model``, which
builds Llama only). Import with ``from tiny_families import build_family``."""

from __future__ import annotations

# In the layer table of memreason.model.layers: tested with their table entry.
TABLE_FAMILIES = ["llama", "mistral", "qwen2", "qwen3", "gpt2"]
# Not in the table: found by layout detection. Chosen to cover every way a layout can differ: Gemma scales
# its embeddings, Gemma-2 soft-caps logits and alternates sliding-window layers, Phi-3 and OLMo-2 are plain
# Llama shapes under other names (OLMo-2 norms the attention output), Phi runs attention and MLP in
# parallel with a LayerNorm, OPT nests its body (model.decoder) and adds learned positions, GPT-NeoX and
# GPT-J use transformer-style names.
DETECTED_FAMILIES = ["gemma", "gemma2", "phi3", "phi", "olmo2", "granite", "starcoder2", "opt", "gpt_neox", "gptj"]

_DIMS = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
             n_embd=64, n_head=4, ffn_dim=128, word_embed_proj_dim=64, n_positions=128,
             max_position_embeddings=128, rotary_dim=16, pad_token_id=0, bos_token_id=1, eos_token_id=2)


def build_family(model_type: str, vocab_size: int, *, layers: int = 2, seed: int = 0, **extra):
    """A seeded random ``AutoModelForCausalLM`` of ``model_type`` in eval mode.

    Args:
        model_type (str): a ``config.model_type`` transformers knows (``"gemma"``, ``"opt"``, ...).
        vocab_size (int): rows of the embedding (the tokenizer's length).
        layers (int, default 2): decoder layers.
        seed (int, default 0): torch seed for the weights.
        **extra: further config attributes (``tie_word_embeddings=False``, ...).
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(model_type)
    for key, value in {**_DIMS, "vocab_size": vocab_size, "num_hidden_layers": layers, "n_layer": layers,
                       **extra}.items():
        if hasattr(config, key):
            try:
                setattr(config, key, value)
            except AttributeError:  # a derived, read-only property in this family's config
                pass
    if getattr(config, "layer_types", None) is not None and len(config.layer_types) != layers:
        config.layer_types = [config.layer_types[i % len(config.layer_types)] for i in range(layers)]
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config).eval()
