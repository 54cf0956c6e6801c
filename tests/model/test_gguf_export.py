"""Tests for memreason.model.gguf_export: the pieces of the GGUF layout, checked against transformers' own
GGUF reader (the round trips of whole exports are in test_export.py)."""

import numpy as np
import pytest
import torch

from conftest import CORPUS, build_tiny_model
from memreason.errors import ConfigError
from memreason.model.gguf_export import (check_gguf_supported, gguf_vocab, llama3_rope_factors, permute_for_gguf,
                                         write_gguf)


def test_q_and_k_permutation_is_what_transformers_undoes():
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    processor = LlamaTensorProcessor(config={"num_attention_heads": 4, "num_key_value_heads": 2})
    q, k = np.random.default_rng(0).standard_normal((2, 64, 64)).astype(np.float32)
    k = k[:32]
    for weight, heads, name in ((q, 4, "blk.0.attn_q.weight"), (k, 2, "blk.0.attn_k.weight")):
        permuted = permute_for_gguf(weight, heads)
        assert not np.array_equal(permuted, weight)
        np.testing.assert_array_equal(processor.process(permuted, name).weights, weight)


def test_llama3_rope_factors_match_transformers_scaled_frequencies():
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    config = LlamaConfig(hidden_size=256, num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=8192,
                         rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                                          "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                          "original_max_position_embeddings": 2048})
    scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](config, "cpu")
    plain = 1.0 / (500000.0 ** (torch.arange(0, 128, 2, dtype=torch.float32) / 128))
    factors = torch.from_numpy(llama3_rope_factors(config))
    assert factors.min() == 1.0 and factors.max() == 8.0  # all three bands occur at head_dim 128
    torch.testing.assert_close(plain / factors, scaled, rtol=1e-5, atol=0)


def test_models_outside_the_llama_architecture_are_refused_with_the_way_out():
    from transformers import LlamaConfig, Qwen2Config

    with pytest.raises(ConfigError, match="llama-architecture models only.*'qwen2'.*without --gguf"):
        check_gguf_supported(Qwen2Config(hidden_size=64, num_attention_heads=4, num_key_value_heads=2))
    with pytest.raises(ConfigError, match="biases"):
        check_gguf_supported(LlamaConfig(attention_bias=True))
    with pytest.raises(ConfigError, match="RoPE scaling 'linear'"):
        check_gguf_supported(LlamaConfig(rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4}))
    check_gguf_supported(LlamaConfig())


def _tokenizer(pre_tokenizer):
    """A small byte-level BPE with the given pre-tokenizer, a chat-style special token and a control token."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizer
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(CORPUS * 4 + ["12345 678 it's we'll\n\n  spaced"], trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|im_end|>",
                                   unk_token="<|endoftext|>")
    fast.add_tokens([AddedToken("<memory>", special=False, normalized=False)])
    return fast


def test_llama3_style_pre_tokenizer_is_named_and_reads_back_identically(tmp_path):
    from tokenizers import Regex, pre_tokenizers
    from transformers import AutoTokenizer
    from transformers.integrations.gguf.gguf_tokenizer_mapping import GGUF_PRE_TOKENIZER_SPLITS

    split = pre_tokenizers.Split(Regex(GGUF_PRE_TOKENIZER_SPLITS["llama-bpe"]), behavior="isolated")
    tokenizer = _tokenizer(pre_tokenizers.Sequence([split, pre_tokenizers.ByteLevel(add_prefix_space=False,
                                                                                      use_regex=False)]))
    model = build_tiny_model(len(tokenizer))
    assert gguf_vocab(tokenizer, len(tokenizer))["pre"] == "llama-bpe"
    write_gguf(model, tokenizer, tmp_path / "m.gguf", "f32", eos=[tokenizer.eos_token_id], name="m")
    back = AutoTokenizer.from_pretrained(tmp_path, gguf_file="m.gguf")
    text = "Question: 12345 apples, it's <memory> we'll\n\n  spaced<|im_end|>"
    assert back(text, add_special_tokens=False)["input_ids"] == tokenizer(text, add_special_tokens=False)["input_ids"]


def test_smollm2_hub_pre_tokenizer_is_named_for_llama_cpp():
    from tokenizers import pre_tokenizers

    tokenizer = _tokenizer(pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                    pre_tokenizers.ByteLevel(add_prefix_space=False)]))
    assert gguf_vocab(tokenizer, len(tokenizer))["pre"] == "smollm"


def test_unknown_tokenizers_are_refused():
    from tokenizers import pre_tokenizers

    with pytest.raises(ConfigError, match="cannot name this tokenizer's pre-tokenizer"):
        gguf_vocab(_tokenizer(pre_tokenizers.Whitespace()), 400)
    tokenizer = _tokenizer(pre_tokenizers.ByteLevel(add_prefix_space=False))
    with pytest.raises(ConfigError, match="tokens but the embedding only"):
        gguf_vocab(tokenizer, len(tokenizer) - 1)


def test_vocabulary_is_padded_to_the_embedding_rows_with_unused_tokens():
    import gguf
    from tokenizers import pre_tokenizers

    tokenizer = _tokenizer(pre_tokenizers.ByteLevel(add_prefix_space=False))
    vocab = gguf_vocab(tokenizer, len(tokenizer) + 3)
    assert len(vocab["tokens"]) == len(tokenizer) + 3
    assert vocab["tokens"][-1] == f"[PAD{len(tokenizer) + 2}]" and vocab["types"][-1] == gguf.TokenType.UNUSED
    memory = tokenizer.convert_tokens_to_ids("<memory>")
    assert vocab["types"][memory] == gguf.TokenType.USER_DEFINED
    assert vocab["types"][tokenizer.eos_token_id] == gguf.TokenType.CONTROL
    assert all(" " in merge for merge in vocab["merges"])
