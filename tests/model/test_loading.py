import subprocess
import sys
import time

import pytest
import torch

from memreason.errors import ModelLoadError
from memreason.model import load
from memreason.model.loading import resolve_dtype


def _save_tiny(tmp_path, tiny_model, tiny_tokenizer):
    tiny_model.save_pretrained(tmp_path / "tiny")
    tiny_tokenizer.save_pretrained(tmp_path / "tiny")
    return tmp_path / "tiny"


def test_local_directory_loads_with_identical_logits(tmp_path, tiny_model, tiny_tokenizer):
    path = _save_tiny(tmp_path, tiny_model, tiny_tokenizer)
    model, tokenizer = load(path, device="cpu")
    ids = tokenizer("Paris is the capital of France.", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        assert torch.equal(model(ids).logits, tiny_model(ids).logits)
    assert not model.training and tokenizer.pad_token_id is not None


def test_missing_pad_token_falls_back_to_eos_never_id_zero(tmp_path, tiny_model, tiny_tokenizer):
    tiny_tokenizer.pad_token = None
    path = _save_tiny(tmp_path, tiny_model, tiny_tokenizer)
    _, tokenizer = load(path, device="cpu")
    assert tokenizer.pad_token_id == tokenizer.eos_token_id != 0


@pytest.mark.parametrize("name", ["./no/such/dir", "/tmp/memreason-missing-model", "~/missing-model", "a/b/c",
                                  "missing.gguf"])
def test_missing_path_is_a_clear_error(name):
    with pytest.raises(ModelLoadError, match="not found"):
        load(name, device="cpu")


def test_directory_without_config_is_a_clear_error(tmp_path):
    with pytest.raises(ModelLoadError, match="no config.json"):
        load(tmp_path, device="cpu")


@pytest.mark.parametrize("offline", ["1", ""])
def test_unreachable_hub_says_to_pass_a_local_path(monkeypatch, offline):
    monkeypatch.setenv("HF_HUB_OFFLINE", offline)
    with pytest.raises(ModelLoadError, match="no network access to the model hub.*pass a local path"):
        load("memreason-test-org/does-not-exist", device="cpu")


def test_unknown_dtype_is_refused():
    with pytest.raises(ModelLoadError, match="unknown dtype"):
        resolve_dtype("float8", "cpu")
    assert resolve_dtype("auto", "cpu") == torch.float32
    assert resolve_dtype("bf16", "cpu") == torch.bfloat16


@pytest.mark.smollm2
def test_default_model_loads_fast_the_second_time_with_identical_logits(tmp_path, monkeypatch):
    monkeypatch.setenv("MEMREASON_CACHE", str(tmp_path / "cache"))
    start = time.perf_counter()
    first, tokenizer = load(None, device="cpu")
    first_s = time.perf_counter() - start
    start = time.perf_counter()
    second, _ = load(None, device="cpu")
    second_s = time.perf_counter() - start
    assert second_s < first_s / 3, (first_s, second_s)
    ids = tokenizer("The capital of France is", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        assert torch.equal(first(ids).logits, second(ids).logits)
    assert first.config.model_type == "llama" and first.config.num_hidden_layers == 30
    assert "quantization_config" not in second.config.to_dict()


@pytest.mark.smollm2
def test_concurrent_first_conversions_do_not_corrupt_the_cache(tmp_path):
    cache = tmp_path / "cache"
    code = ("import sys; from pathlib import Path; from memreason.model.loading import convert_gguf, "
            "default_gguf_path; print(convert_gguf(default_gguf_path()))")
    env = {**__import__("os").environ, "MEMREASON_CACHE": str(cache)}
    procs = [subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for _ in range(2)]
    outputs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1][-500:] for o in outputs]
    paths = {o[0].strip() for o in outputs}
    assert len(paths) == 1
    models = list((cache / "models").iterdir())
    assert len(models) == 1, models  # no leftover temporary directories
    from transformers import AutoModelForCausalLM

    reloaded = AutoModelForCausalLM.from_pretrained(paths.pop())
    assert reloaded.config.num_hidden_layers == 30
