"""Shared by the tests under tests/train/: tiny models saved as local model dirs, a small trace dataset
and the config every tiny run starts from. (Not a conftest.py: test folders here have no __init__.py, so
a second conftest module would clash with tests/conftest.py.)"""

import json

import pytest
import torch

from conftest import build_tiny_model, build_tiny_tokenizer
from memreason.model.tokens import TokenScheme
from memreason.traces import MEMORY, REASON, Step, Trace
from memreason.train import load_config

QUESTIONS = [
    ("Is the Pacific Ocean larger than the Atlantic Ocean?", "The Pacific Ocean is the largest ocean on Earth.",
     "So the statement is true.", "True"),
    ("Is Paris the capital of France?", "Paris is the capital of France.", "So the statement is true.", "True"),
    ("Does water boil at 50 degrees Celsius at sea level?", "Water boils at 100 degrees Celsius at sea level.",
     "Therefore the statement is false.", "False"),
    ("Is the Atlantic Ocean the largest ocean on Earth?", "The Pacific Ocean is the largest ocean on Earth.",
     "Therefore the statement is false.", "False"),
]


@pytest.fixture(autouse=True)
def one_thread():
    # Tiny models run 4x faster on one thread than on two busy shared cores.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make_traces(n: int) -> list[Trace]:
    out = []
    for i in range(n):
        question, fact, reason, answer = QUESTIONS[i % len(QUESTIONS)]
        out.append(Trace(f"{question} ({i})", (Step(MEMORY, fact), Step(REASON, reason)), answer))
    return out


def write_jsonl(traces, path):
    with open(path, "w") as handle:
        for trace in traces:
            handle.write(json.dumps(trace.to_dict()) + "\n")
    return path


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """Tiny models (tied, untied, padded vocabulary) saved as local model dirs, and a 16-trace dataset."""
    root = tmp_path_factory.mktemp("train-assets")
    tokenizer = build_tiny_tokenizer()
    paths = {}
    for name, kwargs in {"tied": {}, "untied": {"tie": False}, "padded": {"padded_vocab": 32}}.items():
        model = build_tiny_model(len(tokenizer), **kwargs)
        model.save_pretrained(root / name)
        tokenizer.save_pretrained(root / name)
        paths[name] = root / name
    paths["data"] = write_jsonl(make_traces(16), root / "data.jsonl")
    paths["root"] = root
    return paths


def config_overrides(assets, out, *extra, model="tied") -> list[str]:
    return [f"model.name_or_path={assets[model]}", f"data.source={assets['data']}", "data.task=strategyqa",
            "data.train_split=null", "data.val_size=4", "prompt_style=plain", "optim.epochs=2", "optim.batch_size=4",
            "optim.lr=2e-2", "optim.warmup_steps=0", "eval.max_new_tokens=12", "eval.every_steps=2",
            "logging_steps=1", f"output_dir={out}", *extra]


def make_config(assets, out, *extra, model="tied"):
    return load_config(None, config_overrides(assets, out, *extra, model=model))


def fresh_base(assets, model="tied"):
    """The base model as training saw it before step 0: loaded, with the scheme's tokens added."""
    from memreason.model import load
    from memreason.model.tokens import add_scheme_tokens

    base, tokenizer = load(assets[model], device="cpu")
    ids = add_scheme_tokens(base, tokenizer, TokenScheme())
    return base, tokenizer, ids
