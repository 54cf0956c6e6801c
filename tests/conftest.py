"""Shared fixtures: seeding, a tiny byte-level BPE tokenizer and tiny random Llama models, and the real
embedded SmolLM2 (loaded once per session, for tests marked ``smollm2``)."""

from __future__ import annotations

import random

import pytest

CORPUS = [
    "Question: Is the Pacific Ocean larger than the Atlantic Ocean?",
    "The Pacific Ocean is the largest ocean on Earth. The answer is: True",
    "Paris is the capital of France. Water boils at 100 degrees Celsius at sea level.",
    "Options: A.bank B.library C.department store D.mall E.new york",
    "Therefore the statement is false. The answer is: False",
    "memory reason answer prefix step fact recall derive compare because so",
]

CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def build_tiny_tokenizer(vocab_size: int = 320):
    """A byte-level BPE tokenizer trained in memory on a few sentences (< 1 s), with chat tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(CORPUS * 4, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                   pad_token="<|im_end|>", unk_token="<|endoftext|>")
    fast.chat_template = CHAT_TEMPLATE
    return fast


def build_tiny_model(vocab_size: int, *, tie: bool = True, seed: int = 0, layers: int = 2, padded_vocab: int = 0):
    """A 2-layer random Llama (hidden 64, 4 heads, 2 KV heads). ``padded_vocab`` extra embedding rows
    mimic Qwen-style matrices larger than the tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab_size + padded_vocab, hidden_size=64, intermediate_size=128,
                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=512, tie_word_embeddings=tie, bos_token_id=1, eos_token_id=2,
                         pad_token_id=2)
    return AutoModelForCausalLM.from_config(config).eval()


@pytest.fixture(autouse=True)
def _seed():
    import torch

    random.seed(0)
    torch.manual_seed(0)


@pytest.fixture
def tiny_tokenizer():
    return build_tiny_tokenizer()


@pytest.fixture
def tiny_model(tiny_tokenizer):
    return build_tiny_model(len(tiny_tokenizer))


@pytest.fixture(scope="session")
def smollm2():
    """The real embedded SmolLM2-135M-Instruct, fp32 on CPU: ``(model, tokenizer)``."""
    from memreason.model import load

    return load(None, dtype="float32", device="cpu")


REASONER_TRACES = [
    ("Is ice lighter than water?", [("memory", "Ice is less dense than water."), ("reason", "Less dense things float.")],
     "True"),
    ("Is Paris in Spain?", [("memory", "Paris is the capital of France."), ("reason", "France is not Spain.")],
     "False"),
    ("Does water boil at 100 degrees?", [("memory", "Water boils at 100 degrees Celsius at sea level."),
                                          ("reason", "So it does at sea level.")], "True"),
]


def build_tiny_reasoner(style: str = "compact", steps: int = 60):
    """A tiny Llama trained in ~2 s to write ``REASONER_TRACES`` in the given token scheme after the plain
    prompt: structured output (markers, steps, an answer line) for tests of parsing, revision and
    confidences. Returns ``(model, tokenizer, scheme, traces)``."""
    import torch

    from memreason.model.tokens import TokenScheme, add_scheme_tokens, format_target
    from memreason.tasks import get_task
    from memreason.traces import Step, Trace

    tokenizer = build_tiny_tokenizer()
    scheme = TokenScheme(style, 3, 4) if style == "paper" else TokenScheme(style)
    model = build_tiny_model(len(tokenizer))
    add_scheme_tokens(model, tokenizer, scheme)
    task = get_task("strategyqa")
    traces = [Trace(q, tuple(Step(k, t) for k, t in s), a, {"id": f"r{i}"})
              for i, (q, s, a) in enumerate(REASONER_TRACES)]
    rows = [tokenizer(task.plain_prompt(t.question) + format_target(t, scheme), add_special_tokens=False)["input_ids"]
            + [tokenizer.eos_token_id] for t in traces]
    width = max(len(r) for r in rows)
    input_ids = torch.tensor([r + [tokenizer.pad_token_id] * (width - len(r)) for r in rows])
    labels = torch.tensor([r + [-100] * (width - len(r)) for r in rows])
    torch.manual_seed(0)
    optimiser = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(steps):
        model(input_ids=input_ids, labels=labels).loss.backward()
        optimiser.step()
        optimiser.zero_grad()
    return model.eval(), tokenizer, scheme, traces


@pytest.fixture(scope="session")
def tiny_reasoner():
    return build_tiny_reasoner()
