"""What a trained run is, and reading it back.

``RunInfo`` is the one description of a run: ``memreason train`` writes it as ``run.json`` with
``RunInfo.to_json`` and everything that reads a run uses ``RunInfo.from_json``, so the file's schema is
written down once (``RUN_FORMAT``). ``load_run(run_dir)`` rebuilds the model the run trained.

A run directory (see ``memreason.train.recipe``) stores only what training changed: a PEFT adapter (LoRA
factors and/or the new token rows, safetensors), or the whole model for ``mode: full``; plus the tokenizer
with the added tokens and ``run.json``. Loading re-creates the base model, adds the scheme's tokens exactly
as training did (same ids; rows initialised from the same group words, which is what ``mode: lora``
trained with), and applies the adapter. Trainable-token rows are absolute values, so whatever the new rows
held before, the adapter's rows replace them.

Other tools can open ``best/`` and ``last/`` too: each holds the adapter, the tokenizer with the control
tokens, and an ``adapter_config.json`` whose ``base_model_name_or_path`` names the base (see
``adapter_base_name``), so ``peft.AutoPeftModelForCausalLM.from_pretrained("runs/demo/best")`` works.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from memreason.errors import ConfigError, ModelLoadError
from memreason.model.tokens import TokenScheme

logger = logging.getLogger(__name__)

RUN_FORMAT = "memreason-run/1"
# training: in progress, or killed (a kill -9 leaves no chance to say so); failed / interrupted: an
# exception or Ctrl-C stopped it (``error`` says which); complete: best/ and last/ exist.
STATUSES = ("training", "complete", "failed", "interrupted")
# The embedded default (memreason.model.loading.DEFAULT_MODEL) is a Q4_1 GGUF of this hub model.
EMBEDDED_BASE_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"


def adapter_base_name(base_model: str) -> str:
    """The ``base_model_name_or_path`` a run's adapters carry, for tools other than memreason.

    The embedded default is named by the hub id of the model its GGUF file was quantized from
    (``HuggingFaceTB/SmolLM2-135M-Instruct``): PEFT's auto classes fetch that original when the hub is
    reachable, whose outputs are close to, not identical with, the Q4_1-dequantized weights the run was
    trained on. For the exact base, load the run with ``memreason.load(run_dir)`` or apply the adapter to
    ``memreason.model.loading.resolve_checkpoint(None)`` (the cached conversion of the embedded GGUF).
    A local directory is named by its absolute path, a ``.gguf`` file by its cached conversion (a
    directory ``from_pretrained`` reads) and a hub id by itself.
    """
    from memreason.model.loading import DEFAULT_MODEL, resolve_checkpoint

    if base_model == DEFAULT_MODEL:
        return EMBEDDED_BASE_HUB_ID
    path = Path(base_model).expanduser()
    if path.suffix == ".gguf" and path.is_file():  # transformers loads the cached conversion, not the file
        return str(Path(resolve_checkpoint(path)).resolve())
    return str(path.resolve()) if path.exists() else base_model


@dataclass(frozen=True)
class SavedWeights:
    """One exported set of weights (``best/`` or ``last/``) and the validation metrics measured on it.

    Args:
        checkpoint (str): the Trainer checkpoint it was copied from, ``checkpoint-N``.
        step (int): its optimiser step.
        val_accuracy, val_answer_rate, val_format_rate, val_loss (float | None): measured at that step
            (None when that evaluation did not compute it).
    """

    checkpoint: str
    step: int
    val_accuracy: float | None = None
    val_answer_rate: float | None = None
    val_format_rate: float | None = None
    val_loss: float | None = None

    def to_dict(self) -> dict:
        return {key: value for key, value in asdict(self).items() if value is not None}

    @classmethod
    def from_dict(cls, data: dict) -> "SavedWeights":
        names = {f.name for f in fields(cls)}
        return cls(**{key: value for key, value in data.items() if key in names})


@dataclass(frozen=True)
class RunInfo:
    """What a trained run is: the content of ``run.json``, plus which weights ``load_run`` loaded.

    Args:
        base_model (str): the base model it was trained from (a name ``memreason.model.load`` accepts).
        task (str): the task it was trained on (prompt instruction and answer scoring).
        prompt_style (str): ``plain`` or ``chat`` (resolved at training time).
        scheme (TokenScheme): its control-token scheme.
        mode (str): ``full``, ``lora``, ``tokens`` or ``lora+tokens``.
        token_ids (tuple[int, ...]): the ids of the scheme's tokens, in ``scheme.tokens()`` order.
        status (str): one of ``STATUSES``.
        task_version, vocab_size, seed, dtype, amp, world_size, trainable_parameters: as trained.
        data (dict): dataset source, split sizes, dropped examples, validation ids, marker allocation.
        versions (dict): memreason, torch, transformers and peft versions.
        best, last (SavedWeights | None): the exported weights, once the run is complete.
        global_step (int | None), train_seconds (float | None): set when training ends.
        error (str | None): why a failed or interrupted run stopped.
        run_dir (Path | None): the run directory it was read from (not stored in run.json).
        checkpoint (str | None): which weights ``load_run`` loaded: ``best``, ``last`` or ``checkpoint-N``.
        step (int | None): the optimiser step of the loaded weights.
        val_accuracy (float | None): validation accuracy measured at that step, when known.
    """

    base_model: str
    task: str
    prompt_style: str
    scheme: TokenScheme
    mode: str = "lora+tokens"
    token_ids: tuple[int, ...] = ()
    status: str = "training"
    task_version: int | None = None
    vocab_size: int | None = None
    seed: int | None = None
    dtype: str | None = None
    amp: str | None = None
    world_size: int = 1
    data: dict = field(default_factory=dict)
    trainable_parameters: int | None = None
    versions: dict = field(default_factory=dict)
    best: SavedWeights | None = None
    last: SavedWeights | None = None
    global_step: int | None = None
    train_seconds: float | None = None
    error: str | None = None
    run_dir: Path | None = None
    checkpoint: str | None = None
    step: int | None = None
    val_accuracy: float | None = None

    # -- run.json ------------------------------------------------------------------------------------

    def to_dict(self) -> dict:
        """The JSON object of ``run.json`` (``format`` first; the loaded-weights fields are left out)."""
        out: dict[str, Any] = {
            "format": RUN_FORMAT, "status": self.status, "base_model": self.base_model, "task": self.task,
            "task_version": self.task_version, "prompt_style": self.prompt_style, "scheme": self.scheme.to_dict(),
            "mode": self.mode, "tokens": self.scheme.tokens(), "token_ids": list(self.token_ids),
            "vocab_size": self.vocab_size, "seed": self.seed, "dtype": self.dtype, "amp": self.amp,
            "world_size": self.world_size, "data": self.data, "trainable_parameters": self.trainable_parameters,
            "versions": self.versions, "best": self.best.to_dict() if self.best else None,
            "last": self.last.to_dict() if self.last else None,
        }
        for key in ("global_step", "train_seconds", "error"):
            if getattr(self, key) is not None:
                out[key] = getattr(self, key)
        return out

    def to_json(self, run_dir) -> Path:
        """Write ``run_dir/run.json`` atomically (a kill never leaves half a file). Returns its path."""
        from memreason.io import write_json

        path = Path(run_dir) / "run.json"
        write_json(path, self.to_dict(), indent=2)
        return path

    @classmethod
    def from_dict(cls, data: Any, *, source: str = "run.json") -> "RunInfo":
        """A RunInfo from the parsed JSON object of a ``run.json``.

        Raises:
            ModelLoadError: a foreign format, missing keys, or values of the wrong shape.
        """
        if not isinstance(data, dict) or data.get("format") != RUN_FORMAT:
            raise ModelLoadError(f"{source} is not a memreason run description (expected format {RUN_FORMAT!r})")
        missing = [k for k in ("base_model", "task", "prompt_style", "scheme", "mode", "token_ids") if k not in data]
        if missing:
            raise ModelLoadError(f"{source} is corrupt: missing {', '.join(missing)}")
        status = data.get("status", "training")
        if status not in STATUSES:
            raise ModelLoadError(f"{source} is corrupt: status {status!r} is not one of {', '.join(STATUSES)}")
        try:
            scheme = TokenScheme(**data["scheme"])
        except (TypeError, ConfigError) as exc:
            raise ModelLoadError(f"{source} has an invalid scheme: {exc}") from None
        names = {f.name for f in fields(cls)} - {"run_dir", "checkpoint", "step", "val_accuracy"}
        values = {key: data[key] for key in names if key in data}
        try:
            values.update(scheme=scheme, status=status, token_ids=tuple(int(i) for i in data["token_ids"]),
                          best=SavedWeights.from_dict(data["best"]) if data.get("best") else None,
                          last=SavedWeights.from_dict(data["last"]) if data.get("last") else None)
        except (TypeError, ValueError, AttributeError) as exc:
            raise ModelLoadError(f"{source} is corrupt: {exc}") from None
        return cls(**values)

    @classmethod
    def from_json(cls, run_dir) -> "RunInfo":
        """Read ``run_dir/run.json``; ``run_dir`` is set on the result.

        Raises:
            ModelLoadError: no run there, or an unreadable / foreign / corrupt ``run.json``.
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
        return replace(cls.from_dict(data, source=str(path)), run_dir=run_dir)


def is_run_dir(path) -> bool:
    """Whether ``path`` is a directory written by ``memreason train``."""
    try:
        return (Path(path) / "run.json").is_file()
    except (TypeError, OSError):
        return False


def _weights_dir(info: RunInfo, checkpoint: str) -> tuple[Path, SavedWeights | None]:
    run_dir = info.run_dir
    if checkpoint in ("best", "last"):
        if info.status != "complete" or not (run_dir / checkpoint).is_dir():
            latest = sorted((run_dir / "checkpoints").glob("checkpoint-*"),
                            key=lambda p: int(p.name.split("-")[-1]) if p.name.split("-")[-1].isdigit() else -1)
            hint = f"; load a checkpoint instead, e.g. checkpoint={latest[-1].name!r}" if latest else ""
            raise ModelLoadError(f"{run_dir} has not finished training (no {checkpoint}/ weights){hint}")
        return run_dir / checkpoint, getattr(info, checkpoint)
    path = run_dir / "checkpoints" / checkpoint
    if not path.is_dir():
        raise ModelLoadError(f"no checkpoint {checkpoint!r} in {run_dir / 'checkpoints'}; "
                             "use 'best', 'last' or an existing checkpoint-N")
    step = checkpoint.split("-")[-1]
    return path, SavedWeights(checkpoint, int(step)) if step.isdigit() else None


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

    from memreason.model import load
    from memreason.model.loading import resolve_device, resolve_dtype
    from memreason.model.tokens import add_scheme_tokens

    run_dir = Path(run_dir)
    info = RunInfo.from_json(run_dir)
    scheme = info.scheme
    weights, entry = _weights_dir(info, checkpoint)
    device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, device)

    try:
        tokenizer = AutoTokenizer.from_pretrained(run_dir / "tokenizer")
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"cannot read the run's tokenizer in {run_dir / 'tokenizer'}: {exc}") from None
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token

    if info.mode == "full":
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
        base, base_tokenizer = load(info.base_model, dtype=torch_dtype, device="cpu")
        ids = add_scheme_tokens(base, base_tokenizer, scheme)
        if list(ids) != list(info.token_ids) or tokenizer.convert_tokens_to_ids(scheme.tokens()) != list(ids):
            raise ModelLoadError(f"the base model {info.base_model!r} gives the control tokens ids {ids}, but the "
                                 f"run was trained with {list(info.token_ids)}; was the base model replaced?")
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
    info = replace(info, checkpoint=checkpoint, step=entry.step if entry else None,
                   val_accuracy=entry.val_accuracy if entry else None)
    logger.info("loaded run %s (%s, step %s) on %s", run_dir, checkpoint, info.step, device)
    return model, tokenizer, info
