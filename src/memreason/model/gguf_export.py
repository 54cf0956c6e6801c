"""Writing a merged Llama model and its tokenizer as one GGUF file (``write_gguf``), for llama.cpp.

The layout is what llama.cpp and transformers' GGUF loader read back (``transformers/modeling_gguf_pytorch_utils.py``,
``integrations/ggml.py``, ``integrations/gguf/gguf_tokenizer_mapping.py``): architecture ``llama``; tensors named by
``gguf.get_tensor_name_map``; ``q_proj``/``k_proj`` rows permuted into llama.cpp's rotary order (transformers
undoes it on load); ``output.weight`` omitted for tied embeddings (its absence is how both readers detect
tying); a byte-level BPE vocabulary (``tokenizer.ggml.model = gpt2``) with the control tokens marked
USER_DEFINED (llama.cpp matches them whole in text, transformers re-adds them as non-special tokens) and
special added tokens CONTROL; norms always F32; Llama 3.1 RoPE scaling as ``rope_freqs.weight``.
"""

from __future__ import annotations

import json
import logging
import math

from memreason.errors import ConfigError

logger = logging.getLogger(__name__)

GGUF_TYPES = ("f32", "f16", "q8_0")


def gguf_filename(gguf_type: str) -> str:
    """The GGUF file's name inside an export, e.g. ``model-q8_0.gguf``."""
    return f"model-{gguf_type}.gguf"


def check_gguf_supported(config) -> None:
    """Refuse models that the GGUF ``llama`` architecture (as llama.cpp and transformers read it) cannot hold.

    Raises:
        ConfigError: not a Llama model, biases, a non-SiLU MLP, or a RoPE scaling other than ``llama3``.
    """
    model_type = getattr(config, "model_type", None)
    if model_type != "llama":
        raise ConfigError(f"GGUF export supports llama-architecture models only (SmolLM2, Llama 2/3); this model "
                          f"is {model_type!r}. Export without --gguf and convert the checkpoint with llama.cpp's "
                          "convert_hf_to_gguf.py")
    problems = []
    if getattr(config, "attention_bias", False) or getattr(config, "mlp_bias", False):
        problems.append("attention/MLP biases")
    if getattr(config, "hidden_act", "silu") != "silu":
        problems.append(f"activation {config.hidden_act!r}")
    rope_type = _rope_parameters(config).get("rope_type", "default")
    if rope_type not in ("default", "llama3"):
        problems.append(f"RoPE scaling {rope_type!r}")
    if problems:
        raise ConfigError(f"GGUF export cannot write {', '.join(problems)}; export without --gguf")


def _rope_parameters(config) -> dict:
    params = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    params = dict(params)
    if "rope_theta" not in params and getattr(config, "rope_theta", None) is not None:
        params["rope_theta"] = config.rope_theta
    return params


def llama3_rope_factors(config):
    """Per-frequency divisors of Llama 3.1's RoPE scaling, as llama.cpp reads them from ``rope_freqs.weight``.

    Frequencies whose wavelength is short compared with the original context keep their value (factor 1),
    long ones are divided by ``factor``, and the band between is interpolated smoothly.

    Returns:
        numpy.ndarray: float32 ``[head_dim // 2]``.
    """
    import numpy as np

    rope = _rope_parameters(config)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    base = float(rope.get("rope_theta", 10000.0))
    factor = float(rope.get("factor", 8.0))
    low, high = float(rope.get("low_freq_factor", 1.0)), float(rope.get("high_freq_factor", 4.0))
    original = float(rope.get("original_max_position_embeddings", 8192))
    factors = []
    for i in range(0, head_dim, 2):
        wavelength = 2 * math.pi * base ** (i / head_dim)
        if wavelength < original / high:
            factors.append(1.0)
        elif wavelength > original / low:
            factors.append(factor)
        else:
            smooth = (original / wavelength - low) / (high - low)
            factors.append(1.0 / ((1 - smooth) / factor + smooth))
    return np.asarray(factors, dtype=np.float32)


def permute_for_gguf(weight, n_heads: int):
    """Reorder a ``q_proj``/``k_proj`` weight ``[n_heads * head_dim, d]`` from Hugging Face's rotary layout
    (first half / second half of each head) into llama.cpp's (interleaved pairs); transformers' GGUF loader
    applies the inverse (``LlamaTensorProcessor``)."""
    rows = weight.shape[0]
    return weight.reshape(n_heads, 2, rows // n_heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def _is_gpt2_byte_level(part: dict) -> bool:
    return part.get("type") == "ByteLevel" and part.get("use_regex", True) and not part.get("add_prefix_space")


def _pre_tokenizer_name(pre: dict | None) -> str:
    """llama.cpp's ``tokenizer.ggml.pre`` for a byte-level pre-tokenizer, from its tokenizer.json entry."""
    if pre and _is_gpt2_byte_level(pre):
        return "gpt2"  # the GPT-2 split regex, which is also transformers' default when it rebuilds the tokenizer
    parts = (pre or {}).get("pretokenizers") or []
    if (len(parts) == 2 and parts[0].get("type") == "Digits" and parts[0].get("individual_digits")
            and _is_gpt2_byte_level(parts[1])):
        # SmolLM2's hub tokenizer. llama.cpp splits digits the same way; transformers' GGUF loader does not
        # know "smollm" and rebuilds plain GPT-2 splitting, so numbers tokenize differently when read back there.
        logger.warning("GGUF: transformers' gguf_file= loader does not split digits like this tokenizer; "
                       "llama.cpp does (pre-tokenizer 'smollm')")
        return "smollm"
    if (len(parts) == 2 and parts[0].get("type") == "Split" and parts[1].get("type") == "ByteLevel"
            and not parts[1].get("use_regex", True) and not parts[1].get("add_prefix_space")):
        pattern = (parts[0].get("pattern") or {}).get("Regex")
        try:
            from transformers.integrations.gguf.gguf_tokenizer_mapping import GGUF_PRE_TOKENIZER_SPLITS
        except ImportError:
            GGUF_PRE_TOKENIZER_SPLITS = {}
        names = [name for name, split in GGUF_PRE_TOKENIZER_SPLITS.items() if split == pattern]
        for preferred in ("llama-bpe", "qwen2", "gpt-4o"):  # llama.cpp's own names for these splits
            if preferred in names:
                return preferred
        if names:
            return names[0]
    raise ConfigError(f"GGUF export cannot name this tokenizer's pre-tokenizer ({json.dumps(pre)[:120]}); "
                      "export without --gguf and convert with llama.cpp's convert_hf_to_gguf.py")


def gguf_vocab(tokenizer, n_rows: int) -> dict:
    """The GGUF tokenizer fields of a byte-level BPE tokenizer, padded to the embedding's ``n_rows``.

    Returns:
        dict: ``tokens``, ``types`` (gguf.TokenType ints), ``merges`` ("a b" strings), ``pre``.

    Raises:
        ConfigError: not a byte-level BPE tokenizer, or more tokens than embedding rows.
    """
    import gguf

    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    model, decoder = spec.get("model") or {}, spec.get("decoder") or {}
    if model.get("type") != "BPE" or decoder.get("type") != "ByteLevel" or spec.get("normalizer") \
            or model.get("byte_fallback") or model.get("continuing_subword_prefix"):
        raise ConfigError("GGUF export supports byte-level BPE tokenizers only (SmolLM2, Llama 3); export "
                          "without --gguf and convert with llama.cpp's convert_hf_to_gguf.py")
    pre = _pre_tokenizer_name(spec.get("pre_tokenizer"))
    if len(tokenizer) > n_rows:
        raise ConfigError(f"the tokenizer has {len(tokenizer)} tokens but the embedding only {n_rows} rows")
    by_id = {index: token for token, index in tokenizer.get_vocab().items()}
    added = tokenizer.added_tokens_decoder
    tokens, types = [], []
    for index in range(n_rows):
        if index in added:
            tokens.append(added[index].content)
            types.append(gguf.TokenType.CONTROL if added[index].special else gguf.TokenType.USER_DEFINED)
        elif index in by_id:
            tokens.append(by_id[index])
            types.append(gguf.TokenType.NORMAL)
        else:  # rows past the tokenizer (padded matrices) still need a vocabulary entry in GGUF
            tokens.append(f"[PAD{index}]")
            types.append(gguf.TokenType.UNUSED)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges") or []]
    return {"tokens": tokens, "types": [int(t) for t in types], "merges": merges, "pre": pre}


def _adds_special(tokenizer) -> tuple[bool, bool]:
    """Whether plain ``tokenizer(text)`` adds BOS / EOS (llama.cpp's add_bos_token / add_eos_token)."""
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    full = tokenizer("a")["input_ids"]
    adds_bos = len(full) > len(plain) and full[0] == tokenizer.bos_token_id
    adds_eos = len(full) > len(plain) and full[-1] == tokenizer.eos_token_id
    return adds_bos, adds_eos


def write_gguf(model, tokenizer, path, gguf_type: str, *, eos: list[int], name: str) -> None:
    """Write ``model`` and ``tokenizer`` as one llama-architecture GGUF file.

    Args:
        model: a merged Llama model (any float dtype; tensors are converted one by one).
        tokenizer: its byte-level BPE tokenizer, control tokens included.
        path (Path): the ``.gguf`` file to write.
        gguf_type ("f32" | "f16" | "q8_0"): weight type of matrices; 1-D tensors stay F32, and a matrix
            whose rows are not a multiple of Q8_0's block (32) falls back to F16.
        eos (list[int]): memreason's EOS ids; GGUF holds one (the tokenizer's EOS when it is among them).
        name (str): ``general.name``.

    Raises:
        ConfigError: the model or tokenizer cannot be written as llama GGUF.
    """
    import gguf

    if gguf_type not in GGUF_TYPES:
        raise ConfigError(f"unknown GGUF type {gguf_type!r}; choose one of {', '.join(GGUF_TYPES)}")
    check_gguf_supported(model.config)
    rows = model.get_input_embeddings().weight.shape[0]
    vocab = gguf_vocab(tokenizer, rows)
    writer = gguf.GGUFWriter(str(path), arch="llama")
    writer.add_name(name)
    file_type = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                 "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[gguf_type]
    writer.add_file_type(int(file_type))
    if gguf_type == "q8_0":
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    _add_hyperparameters(writer, model.config, rows)
    _add_tokenizer(writer, tokenizer, vocab, eos)
    _add_tensors(writer, model, gguf_type)
    try:
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
    finally:
        writer.close()


def _add_hyperparameters(writer, config, rows: int) -> None:
    """The ``llama.*`` keys: what transformers maps back to a LlamaConfig (integrations/ggml.py)."""
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_dimension_count(head_dim)  # read back as head_dim
    writer.add_rope_freq_base(float(_rope_parameters(config).get("rope_theta", 10000.0)))
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    writer.add_vocab_size(rows)
    if head_dim != config.hidden_size // heads:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)


def _add_tokenizer(writer, tokenizer, vocab: dict, eos: list[int]) -> None:
    """The ``tokenizer.*`` keys: vocabulary with token types, merges, special ids, BOS policy, chat template."""
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(vocab["pre"])
    writer.add_token_list(vocab["tokens"])
    writer.add_token_types(vocab["types"])
    writer.add_token_merges(vocab["merges"])
    if tokenizer.bos_token_id is not None:
        writer.add_bos_token_id(tokenizer.bos_token_id)
    writer.add_eos_token_id(tokenizer.eos_token_id if tokenizer.eos_token_id in eos else eos[0])
    if tokenizer.unk_token_id is not None:
        writer.add_unk_token_id(tokenizer.unk_token_id)
    if tokenizer.pad_token_id is not None:
        writer.add_pad_token_id(tokenizer.pad_token_id)
    adds_bos, adds_eos = _adds_special(tokenizer)
    writer.add_add_bos_token(adds_bos)
    writer.add_add_eos_token(adds_eos)
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):
        template = [{"name": key, "template": value} for key, value in template.items()]
    if template:
        writer.add_chat_template(template)


def _add_tensors(writer, model, gguf_type: str) -> None:
    """Every weight under its GGUF name, Q/K rows permuted, in the requested type (1-D tensors F32)."""
    import gguf
    import numpy as np
    from gguf.quants import quantize

    config = model.config
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config.num_hidden_layers)
    output = model.get_output_embeddings()
    tied = output is not None and output.weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
    if _rope_parameters(config).get("rope_type") == "llama3":
        writer.add_tensor(gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight", llama3_rope_factors(config))
    for key, tensor in model.state_dict().items():
        if key == "lm_head.weight" and tied:
            continue  # no output.weight: both readers then tie the head to token_embd
        gguf_name = names.get_name(key, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            raise ConfigError(f"GGUF export has no llama tensor name for {key!r}; export without --gguf")
        array = tensor.detach().to("cpu").float().numpy()  # [out_features, in_features] for matrices
        if key.endswith("self_attn.q_proj.weight"):
            array = permute_for_gguf(array, config.num_attention_heads)
        elif key.endswith("self_attn.k_proj.weight"):
            array = permute_for_gguf(array, config.num_key_value_heads)
        if array.ndim == 1 or gguf_type == "f32":
            writer.add_tensor(gguf_name, np.ascontiguousarray(array, dtype=np.float32))
        elif gguf_type == "q8_0" and array.shape[-1] % 32 == 0:
            qtype = gguf.GGMLQuantizationType.Q8_0
            writer.add_tensor(gguf_name, quantize(np.ascontiguousarray(array), qtype), raw_dtype=qtype)
        else:
            writer.add_tensor(gguf_name, np.ascontiguousarray(array, dtype=np.float16))
