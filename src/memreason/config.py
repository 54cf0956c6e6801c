"""Training configuration: typed dataclasses, their YAML form, and the loader that checks both.

A recipe is a YAML file whose keys mirror ``TrainConfig`` (nested sections ``model``, ``data``, ``scheme``,
``lora``, ``optim``, ``eval``); anything left out takes the default written here. Command-line overrides
are dotted ``key=value`` pairs applied on top (``optim.lr=1e-4 scheme.n_special=0``). Every key is
checked: an unknown key, a value of the wrong type or out of range raises one ``ConfigError`` naming the
key, before any model is loaded (nanoGPT's configurator and torchtune's validation, STYLE.md).

Usage::

    cfg = load_config("configs/demo.yaml", ["optim.epochs=1", "output_dir=runs/try"])
    save_config(cfg, run_dir / "config.yaml")      # the resolved recipe travels with every run
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union

from memreason.errors import ConfigError
from memreason.model.tokens import TokenScheme

Mode = Literal["full", "lora", "tokens", "lora+tokens"]
MODES = ("full", "lora", "tokens", "lora+tokens")
LORA_TARGETS = {
    "mlp": ["gate_proj", "up_proj", "down_proj"],
    "attention": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "all": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
}


@dataclass
class ModelConfig:
    """Which base model, in which precision, on which device.

    Args:
        name_or_path (str | None): ``None`` = the embedded SmolLM2-135M-Instruct; else a local dir, a
            ``.gguf`` file or a hub id (see ``memreason.model.load``).
        dtype (str): ``auto`` (bf16 on a bf16-capable GPU, else fp32), ``float32``, ``bfloat16``, ``float16``.
            For ``mode: full`` a half dtype means fp32 master weights with half-precision autocast.
        device (str): ``auto``, ``cpu``, ``cuda``, ``cuda:1``, ... (under ``accelerate launch``/``torchrun``
            each process takes its own GPU and this is ignored).
    """

    name_or_path: str | None = None
    dtype: str = "auto"
    device: str = "auto"


@dataclass
class DataConfig:
    """What the model is trained on and how the validation split is carved.

    Args:
        source (str): ``bundled:<name>``, a paper-format ``.json`` / our ``.jsonl`` file, or ``hf:<id or dir>``.
        task (str | None): the task deciding prompt and answer scoring; ``None`` only for bundled data,
            which knows its own.
        train_split (str | None): records of this split are the training pool (``None`` = all records).
        val_fraction (float): share of the training pool held out for validation (checkpoint selection).
        val_size (int | None): an exact number of validation examples instead of ``val_fraction``.
        seed (int): seeds the validation split and the random marker allocation.
        marker_allocation ("gold" | "random"): ``random`` shuffles the memory/reason kinds across all
            training steps (same counts, seeded): the paper's Table 2 ablation.
        max_length (int): longest prompt + target + EOS in tokens; longer examples are dropped and
            counted, never truncated (a truncated example would be trained to stop before its answer).
        on_unknown_tag ("error" | "drop"), skip_invalid (bool): passed to the loader.
        objective ("trace" | "text"): ``trace`` trains answers (prompt = question, target = formatted
            trace). ``text`` trains plain language modelling on each record's ``question`` field (no
            prompt, no EOS, loss on every token): the knowledge stage of the synthetic world. Its best
            checkpoint is chosen by validation loss, since there are no answers to generate.
    """

    source: str = "bundled:strategyqa"
    task: str | None = None
    train_split: str | None = "train"
    val_fraction: float = 0.1
    val_size: int | None = None
    seed: int = 0
    marker_allocation: Literal["gold", "random"] = "gold"
    max_length: int = 1024
    on_unknown_tag: Literal["error", "drop"] = "error"
    skip_invalid: bool = False
    objective: Literal["trace", "text"] = "trace"


@dataclass
class LoraSettings:
    """LoRA on the chosen projections of every layer (the paper: r=16, alpha=16, dropout 0.05, MLP)."""

    r: int = 16
    alpha: int = 16
    dropout: float = 0.05
    target: Literal["mlp", "attention", "all"] = "mlp"


@dataclass
class OptimConfig:
    """Optimiser and schedule.

    Args:
        lr (float): peak learning rate (AdamW).
        epochs (float): passes over the training split.
        max_steps (int | None): stop after this many optimiser steps instead (smoke tests, benchmarks).
        batch_size (int): examples per device per forward pass (length-grouped, so padding stays small).
        grad_accum (int): forward passes per optimiser step.
        warmup_steps (float): >= 1: optimiser steps of linear warmup; < 1: a fraction of all steps. Must be
            smaller than the number of steps (the original's 1000-step warmup outlasted its training,
            spec disentangle.md §10 B11).
        weight_decay (float), max_grad_norm (float).
        activation_checkpointing (bool): recompute activations in the backward pass: ~20-30% slower, much
            less memory (long sequences or large models on a small GPU).
        scheduler (str): a transformers schedule name: ``cosine``, ``linear``, ``constant_with_warmup``, ...
    """

    lr: float = 2e-4
    epochs: float = 3.0
    max_steps: int | None = None
    batch_size: int = 8
    grad_accum: int = 1
    warmup_steps: float = 0.05
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    activation_checkpointing: bool = False
    scheduler: Literal["cosine", "linear", "constant", "constant_with_warmup", "cosine_with_restarts",
                       "polynomial"] = "cosine"


@dataclass
class EvalConfig:
    """Validation during training: loss, and accuracy of greedy generations (which picks the best checkpoint).

    Args:
        every_steps (int | None): evaluate and checkpoint every N optimiser steps; ``None`` = every epoch.
        max_new_tokens (int), batch_size (int): generation settings.
        val_limit (int | None): generate for at most this many validation questions (loss uses all).
    """

    every_steps: int | None = None
    max_new_tokens: int = 256
    batch_size: int = 16
    val_limit: int | None = None


@dataclass
class TrainConfig:
    """One training run. See configs/demo.yaml for a commented example.

    Args:
        model, data, scheme, lora, optim, eval: the sections above; ``scheme`` is a ``TokenScheme``
            (``style`` paper | compact | plain | direct, ``n_prefix`` P, ``n_special`` S).
        prompt_style ("auto" | "plain" | "chat"): the paper's ``Question: ...`` prompt or the model's chat
            template; ``auto`` = chat when the tokenizer has a template.
        mode ("full" | "lora" | "tokens" | "lora+tokens"): what is trained. ``lora+tokens`` (the paper):
            LoRA plus the new control-token rows; ``tokens``: the new rows only; ``lora``: LoRA only (new
            rows stay at their initialisation); ``full``: every weight.
        output_dir (str): the run directory (checkpoints, adapter, metrics, curves).
        seed (int): seeds model init of the adapters, dropout and data order.
        save_total_limit (int | None): checkpoints kept for resuming (the best one is always kept).
        logging_steps (int): log the training loss every N optimiser steps.
    """

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    scheme: TokenScheme = field(default_factory=TokenScheme)
    prompt_style: Literal["auto", "plain", "chat"] = "auto"
    mode: Mode = "lora+tokens"
    lora: LoraSettings = field(default_factory=LoraSettings)
    optim: OptimConfig = field(default_factory=OptimConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    output_dir: str = "runs/train"
    seed: int = 0
    save_total_limit: int | None = 2
    logging_steps: int = 5


# ---------------------------------------------------------------------------------------------------------
# dict <-> dataclass, with a type check per key


def _type_name(tp) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if tp is type(None):
        return "null"
    if tp is float:
        return "a number"
    if tp is int:
        return "an integer"
    if tp is bool:
        return "true/false"
    if tp is str:
        return "a string"
    return getattr(tp, "__name__", str(tp))


_NULLS = ("null", "none", "~", "")


def _coerce(value: Any, tp, key: str, from_text: bool) -> Any:
    """Check ``value`` against the annotation ``tp`` and return it in canonical form.

    ``from_text`` is True for command-line overrides, whose values arrive as strings.

    Raises:
        ConfigError: naming ``key``, the expected type and the value received.
    """
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        options = typing.get_args(tp)
        if type(None) in options and (value is None or (from_text and str(value).strip().lower() in _NULLS)):
            return None
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(value, option, key, from_text)
            except ConfigError:
                continue
        raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")
    if origin is Literal:
        allowed = typing.get_args(tp)
        if value in allowed:
            return value
        close = difflib.get_close_matches(str(value), [str(a) for a in allowed], n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ConfigError(f"{key}: expected one of {', '.join(repr(a) for a in allowed)}, got {value!r}{hint}")
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in ("true", "false", "yes", "no"):
            return value.strip().lower() in ("true", "yes")
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, str):
            try:
                return int(value.strip())
            except ValueError:
                pass
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "2e-4" as a string; accept any float literal
            try:
                return float(value.strip())
            except ValueError:
                pass
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        if from_text:
            return str(value)
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    raise TypeError(f"unsupported config annotation {tp!r} for {key}")  # a bug in this module, not user input


def _build(cls, data: Any, prefix: str, from_text: bool = False):
    """Build dataclass ``cls`` from a (possibly partial) mapping, checking every key and value."""
    if isinstance(data, cls):
        return data
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping of keys, got {data!r}")
    kwargs = {}
    for key, value in data.items():
        full = f"{prefix}{key}"
        tp = _field_type(cls, key, prefix)
        if dataclasses.is_dataclass(tp):
            kwargs[key] = _build(tp, value, f"{full}.", from_text)
        else:
            kwargs[key] = _coerce(value, tp, full, from_text)
    try:
        return cls(**kwargs)
    except ConfigError as exc:  # a section that checks itself (TokenScheme): say which section
        if not prefix:
            raise
        raise ConfigError(f"{prefix.rstrip('.')}: {exc}") from None


def _field_type(cls, key, prefix: str):
    """The declared type of field ``key`` of ``cls``; an unknown key is an error naming the closest one."""
    names = [f.name for f in dataclasses.fields(cls)]
    if key not in names:
        close = difflib.get_close_matches(str(key), names, n=1)
        hint = f" (did you mean {prefix}{close[0]}?)" if close else ""
        raise ConfigError(f"unknown config key {prefix + str(key)!r}{hint}; known keys here: {', '.join(names)}")
    return typing.get_type_hints(cls)[key]


def config_to_dict(cfg) -> dict:
    """A plain dict (YAML/JSON-ready) of a config dataclass, nested sections included."""
    return dataclasses.asdict(cfg)


def _set_dotted(tree: dict, dotted: str, value: str) -> None:
    parts = dotted.split(".")
    node = tree
    for part in parts[:-1]:
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"override {dotted!r}: {part!r} is not a section")
        node = child
    node[parts[-1]] = value


def _validate(cfg: TrainConfig, check_data: bool = True) -> None:
    """Range and cross-field checks that types alone cannot express.

    Raises:
        ConfigError: the first problem found, naming the key and the fix.
    """
    d, o, e, lo = cfg.data, cfg.optim, cfg.eval, cfg.lora
    if not 0 <= d.val_fraction < 1:
        raise ConfigError(f"data.val_fraction must be in [0, 1), got {d.val_fraction}")
    if d.val_size is not None and d.val_size < 1:
        raise ConfigError(f"data.val_size must be >= 1 (or null to use data.val_fraction), got {d.val_size}")
    if d.val_size is None and d.val_fraction == 0:
        raise ConfigError("data.val_fraction is 0: checkpoints are chosen on a validation split carved from the "
                          "training data, never on the test split; use e.g. data.val_fraction=0.1")
    if d.max_length < 8:
        raise ConfigError(f"data.max_length must be >= 8 tokens, got {d.max_length}")
    for key, value in (("optim.lr", o.lr), ("optim.epochs", o.epochs)):
        if value <= 0:
            raise ConfigError(f"{key} must be > 0, got {value}")
    for key, value in (("optim.batch_size", o.batch_size), ("optim.grad_accum", o.grad_accum),
                       ("eval.max_new_tokens", e.max_new_tokens), ("eval.batch_size", e.batch_size),
                       ("lora.r", lo.r), ("lora.alpha", lo.alpha), ("logging_steps", cfg.logging_steps)):
        if value < 1:
            raise ConfigError(f"{key} must be >= 1, got {value}")
    for key, value in (("optim.warmup_steps", o.warmup_steps), ("optim.weight_decay", o.weight_decay),
                       ("optim.max_grad_norm", o.max_grad_norm)):
        if value < 0:
            raise ConfigError(f"{key} must be >= 0, got {value}")
    if not 0 <= lo.dropout < 1:
        raise ConfigError(f"lora.dropout must be in [0, 1), got {lo.dropout}")
    if o.max_steps is not None and o.max_steps < 1:
        raise ConfigError(f"optim.max_steps must be >= 1 (or null to train for optim.epochs), got {o.max_steps}")
    if e.every_steps is not None and e.every_steps < 1:
        raise ConfigError(f"eval.every_steps must be >= 1 (or null for every epoch), got {e.every_steps}")
    if e.val_limit is not None and e.val_limit < 1:
        raise ConfigError(f"eval.val_limit must be >= 1 (or null for the whole validation split), got {e.val_limit}")
    if cfg.save_total_limit is not None and cfg.save_total_limit < 1:
        raise ConfigError(f"save_total_limit must be >= 1 (or null to keep every checkpoint), got {cfg.save_total_limit}")
    if not cfg.output_dir.strip():
        raise ConfigError("output_dir must not be empty")
    if cfg.mode in ("tokens", "lora+tokens") and not cfg.scheme.tokens():
        raise ConfigError(f"mode {cfg.mode!r} trains the new control-token rows, but scheme.style "
                          f"{cfg.scheme.style!r} adds no tokens; use mode=lora (or full) for plain/direct ablations")
    if d.marker_allocation == "random" and not cfg.scheme.labels_steps:
        raise ConfigError("data.marker_allocation=random shuffles memory/reason markers, but scheme "
                          f"{cfg.scheme.style!r} (n_special={cfg.scheme.n_special}) writes no kind markers")
    if check_data:
        _check_source(d)


def _check_source(d: DataConfig) -> None:
    """A missing dataset is a config error, found before any model loads."""
    from memreason.data import BUNDLED
    from memreason.tasks import get_task

    if d.source.startswith("bundled:"):
        name = d.source.split(":", 1)[1]
        if name not in BUNDLED:
            raise ConfigError(f"data.source: unknown bundled dataset {name!r}; choose one of "
                              + ", ".join(f"bundled:{n}" for n in BUNDLED))
    elif d.source.startswith("hf:"):
        local = d.source[3:].split(":", 1)[0]
        if local.startswith((".", "/", "~")) and not Path(local).expanduser().exists():
            raise ConfigError(f"data.source: dataset directory not found: {local}")
        if d.task is None:
            raise ConfigError("data.task is required for hf: datasets (strategyqa, commonsenseqa, truthfulqa, freeform)")
    else:
        if not Path(d.source).expanduser().is_file():
            raise ConfigError(f"data.source: dataset file not found: {d.source}")
        if d.task is None:
            raise ConfigError("data.task is required for dataset files (strategyqa, commonsenseqa, truthfulqa, freeform)")
    if d.task is not None:
        try:
            get_task(d.task)
        except KeyError as exc:
            raise ConfigError(f"data.task: {exc.args[0]}") from None


def build_config(data: dict | None = None) -> TrainConfig:
    """A validated ``TrainConfig`` from a (possibly partial) nested dict.

    Raises:
        ConfigError: unknown key, wrong type, or a value out of range.
    """
    cfg = _build(TrainConfig, data or {}, "")
    _validate(cfg)
    return cfg


def load_config(path: str | Path | None, overrides: list[str] | tuple[str, ...] = (), *,
                check_data: bool = True) -> TrainConfig:
    """Read a YAML recipe, apply ``key=value`` overrides, and validate the result.

    Args:
        path: a YAML file, or ``None`` to start from the defaults.
        overrides: dotted assignments such as ``"optim.lr=1e-4"`` or ``"data.val_size=null"``; values are
            read as the type the key declares.
        check_data (bool, default True): also check that ``data.source`` exists. Only for validating a
            recipe whose dataset lives elsewhere (the paper recipes name the paper's files).

    Returns:
        TrainConfig

    Raises:
        ConfigError: missing or unparsable file, unknown key, wrong type, value out of range, missing dataset.
    """
    import yaml

    tree: dict = {}
    if path is not None:
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise ConfigError(f"config file not found: {path}") from None
        except (IsADirectoryError, UnicodeDecodeError) as exc:
            raise ConfigError(f"cannot read config file {path}: {exc}") from None
        try:
            tree = yaml.safe_load(text) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path} is not valid YAML: {str(exc).splitlines()[0]}") from None
        if not isinstance(tree, dict):
            raise ConfigError(f"{path}: expected a mapping of config keys at the top level")
    # file values are typed YAML; override values are text, coerced to each key's declared type
    cfg_file = _build(TrainConfig, tree, "")
    merged = config_to_dict(cfg_file)
    text_tree: dict = {}
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"override {item!r} is not of the form key=value")
        _set_dotted(text_tree, key.strip(), value.strip())
    cfg = _merge_overrides(merged, text_tree)
    _validate(cfg, check_data)
    return cfg


def _merge_overrides(base: dict, overrides: dict) -> TrainConfig:
    # Build the override tree alone first (so an unknown key or a bad value names itself), then merge.
    checked = _build_partial(TrainConfig, overrides, "")
    _deep_update(base, checked)
    return _build(TrainConfig, base, "")


def _build_partial(cls, data: dict, prefix: str) -> dict:
    out = {}
    for key, value in data.items():
        full = f"{prefix}{key}"
        tp = _field_type(cls, key, prefix)
        if dataclasses.is_dataclass(tp):
            if not isinstance(value, dict):
                raise ConfigError(f"{full} is a section; set one of its keys, e.g. {full}.{dataclasses.fields(tp)[0].name}=...")
            out[key] = _build_partial(tp, value, f"{full}.")
        else:
            out[key] = _coerce(value, tp, full, from_text=True)
    return out


def _deep_update(base: dict, updates: dict) -> None:
    for key, value in updates.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            _deep_update(base[key], value)
        else:
            base[key] = value


def save_config(cfg: TrainConfig, path: str | Path) -> None:
    """Write the resolved config as YAML (loadable again with ``load_config``)."""
    import yaml

    Path(path).write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False), encoding="utf-8")
