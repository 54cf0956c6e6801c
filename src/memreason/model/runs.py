"""Reading a trained run back: ``load_run(run_dir)`` rebuilds the model ``memreason train`` trained.

A run directory (see ``memreason.train``) stores only what training changed: a PEFT adapter (LoRA factors
and/or the new token rows, safetensors), or the whole model for ``mode: full``; plus the tokenizer with the
added tokens and ``run.json``. Loading re-creates the base model, adds the scheme's tokens exactly as
training did (same ids; rows initialised from the same group words, which is what ``mode: lora`` trained
with), and applies the adapter. Trainable-token rows are absolute values, so whatever the new rows held
before, the adapter's rows replace them.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

from memreason.errors import ModelLoadError
from memreason.model.tokens import TokenScheme

logger = logging.getLogger(__name__)

RUN_FORMAT = "memreason-run/1"


@dataclass(frozen=True)
class RunInfo:
    """What a trained run is.

    Args:
        base_model (str): the base model it was trained from (a name ``memreason.model.load`` accepts).
        scheme (TokenScheme): its control-token scheme.
        prompt_style (str): ``plain`` or ``chat`` (resolved at training time).
        task (str): the task it was trained on (prompt instruction and answer scoring).
        run_dir (Path): the run directory.
        checkpoint (str): which weights were loaded: ``best``, ``last`` or ``checkpoint-N``.
        mode (str): ``full``, ``lora``, ``tokens`` or ``lora+tokens``.
        token_ids (tuple[int, ...]): the ids of the scheme's tokens, in ``scheme.tokens()`` order.
        step (int | None): the optimiser step of the loaded weights.
        val_accuracy (float | None): validation accuracy measured at that step, when known.
    """

    base_model: str
    scheme: TokenScheme
    prompt_style: str
    task: str
    run_dir: Path
    checkpoint: str
    mode: str = "lora+tokens"
    token_ids: tuple[int, ...] = ()
    step: int | None = None
    val_accuracy: float | None = None


def is_run_dir(path) -> bool:
    """Whether ``path`` is a directory written by ``memreason train``."""
    try:
        return (Path(path) / "run.json").is_file()
    except (TypeError, OSError):
        return False


def read_run(run_dir) -> dict:
    """The parsed ``run.json`` of a run directory.

    Raises:
        ModelLoadError: no run there, or an unreadable / foreign ``run.json``.
    """
    run_dir = Path(run_dir)
    path = run_dir / "run.json"
    if not run_dir.is_dir():
        raise ModelLoadError(f"run directory not found: {run_dir}")
    if not path.is_file():
        raise ModelLoadError(f"{run_dir} is not a training run (no run.json); train one with `memreason train`")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ModelLoadError(f"{path} is corrupt: {exc}") from None
    if not isinstance(data, dict) or data.get("format") != RUN_FORMAT:
        raise ModelLoadError(f"{path} is not a memreason run description (expected format {RUN_FORMAT!r})")
    missing = [k for k in ("base_model", "task", "prompt_style", "scheme", "mode", "token_ids") if k not in data]
    if missing:
        raise ModelLoadError(f"{path} is corrupt: missing {', '.join(missing)}")
    return data


def _weights_dir(run_dir: Path, data: dict, checkpoint: str) -> tuple[Path, dict]:
    if checkpoint in ("best", "last"):
        if data.get("status") != "complete" or not (run_dir / checkpoint).is_dir():
            latest = sorted((run_dir / "checkpoints").glob("checkpoint-*"),
                            key=lambda p: int(p.name.split("-")[-1]) if p.name.split("-")[-1].isdigit() else -1)
            hint = f"; load a checkpoint instead, e.g. checkpoint={latest[-1].name!r}" if latest else ""
            raise ModelLoadError(f"{run_dir} has not finished training (no {checkpoint}/ weights){hint}")
        return run_dir / checkpoint, data.get(checkpoint) or {}
    path = run_dir / "checkpoints" / checkpoint
    if not path.is_dir():
        raise ModelLoadError(f"no checkpoint {checkpoint!r} in {run_dir / 'checkpoints'}; "
                             "use 'best', 'last' or an existing checkpoint-N")
    step = checkpoint.split("-")[-1]
    return path, {"step": int(step)} if step.isdigit() else {}


def load_run(run_dir, *, dtype="auto", device="auto", checkpoint: str = "best", merge: bool = False):
    """Load a trained run, ready for ``generate``.

    Args:
        run_dir (str | Path): a directory written by ``memreason train``.
        dtype (str | torch.dtype, default "auto"), device (str, default "auto"): as in ``memreason.model.load``.
        checkpoint (str, default "best"): ``best`` (highest validation accuracy), ``last``, or
            ``checkpoint-N`` from ``checkpoints/``.
        merge (bool, default False): fold the adapter into the base weights (inference only). Unmerged,
            PEFT rebuilds the whole embedding matrix on every forward to splice in the new token rows,
            which dominates the cost of a decode step on a small model.

    Returns:
        (model, tokenizer, RunInfo): a ``PeftModel`` (a plain model for ``mode: full`` or ``merge=True``) in eval mode on
        ``device``, the run's tokenizer (with the control tokens), and what the run is.

    Raises:
        ModelLoadError: missing or corrupt run directory, missing weights, or a base model whose
            tokenizer no longer gives the control tokens the ids they were trained with.
    """
    from transformers import AutoTokenizer

    from memreason.errors import ConfigError
    from memreason.model import load
    from memreason.model.loading import resolve_device, resolve_dtype
    from memreason.model.tokens import add_scheme_tokens

    run_dir = Path(run_dir)
    data = read_run(run_dir)
    try:
        scheme = TokenScheme(**data["scheme"])
    except (TypeError, ConfigError) as exc:
        raise ModelLoadError(f"{run_dir / 'run.json'} has an invalid scheme: {exc}") from None
    weights, entry = _weights_dir(run_dir, data, checkpoint)
    device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, device)

    try:
        tokenizer = AutoTokenizer.from_pretrained(run_dir / "tokenizer")
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"cannot read the run's tokenizer in {run_dir / 'tokenizer'}: {exc}") from None
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token

    if data["mode"] == "full":
        from transformers import AutoModelForCausalLM

        if not (weights / "config.json").is_file():
            raise ModelLoadError(f"{weights} holds no model weights (config.json missing)")
        try:
            model = AutoModelForCausalLM.from_pretrained(weights, dtype=torch_dtype, device_map=device)
        except (OSError, ValueError, RuntimeError) as exc:
            raise ModelLoadError(f"cannot load the fine-tuned model in {weights}: {exc}") from None
    else:
        from peft import PeftModel

        if not (weights / "adapter_config.json").is_file() or not (weights / "adapter_model.safetensors").is_file():
            raise ModelLoadError(f"{weights} holds no adapter (adapter_config.json / adapter_model.safetensors missing)")
        base, base_tokenizer = load(data["base_model"], dtype=torch_dtype, device="cpu")
        ids = add_scheme_tokens(base, base_tokenizer, scheme)
        if list(ids) != list(data["token_ids"]) or tokenizer.convert_tokens_to_ids(scheme.tokens()) != list(ids):
            raise ModelLoadError(f"the base model {data['base_model']!r} gives the control tokens ids {ids}, but the "
                                 f"run was trained with {data['token_ids']}; was the base model replaced?")
        try:
            model = PeftModel.from_pretrained(base, weights)
        except (OSError, ValueError, RuntimeError, KeyError) as exc:
            raise ModelLoadError(f"cannot apply the adapter in {weights}: {exc}") from None
        if merge:
            model = model.merge_and_unload()
        model.to(device)
    model.eval()
    if hasattr(model, "config"):
        model.config.use_cache = True
    info = RunInfo(base_model=data["base_model"], scheme=scheme, prompt_style=data["prompt_style"],
                   task=data["task"], run_dir=run_dir, checkpoint=checkpoint, mode=data["mode"],
                   token_ids=tuple(data["token_ids"]), step=entry.get("step"),
                   val_accuracy=entry.get("val_accuracy"))
    logger.info("loaded run %s (%s, step %s) on %s", run_dir, checkpoint, info.step, device)
    return model, tokenizer, info
