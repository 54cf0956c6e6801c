"""Tests of the training recipe (memreason.train.recipe) on tiny random Llama models (a few seconds each),
plus SmolLM2 checks."""

import json
import math
import os
import signal
import socket
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import build_tiny_tokenizer
from memreason.errors import ConfigError, DataError
from memreason.model.tokens import TokenScheme, format_target
from memreason.train import TrainRecipe, encode, load_config, main
from train_fixtures import QUESTIONS, assets  # noqa: F401  (fixture)
from train_fixtures import config_overrides
from train_fixtures import fresh_base as _fresh_base
from train_fixtures import make_config as _config
from train_fixtures import one_thread  # noqa: F401  (autouse fixture)


@pytest.fixture(scope="module")
def trained(assets):
    """One lora+tokens run on the tied tiny model, uninterrupted; the in-memory recipe is kept."""
    cfg = _config(assets, assets["root"] / "run-tied", "optim.epochs=16", "optim.lr=1e-2", "lora.target=all",
                  "eval.every_steps=24")
    recipe = TrainRecipe(cfg, progress=False)
    recipe.setup()
    recipe.train()
    return recipe


# --- objectives ----------------------------------------------------------------------------------------


def test_text_objective_trains_every_token_of_a_record_without_a_prompt_or_eos(assets, tmp_path):
    corpus = tmp_path / "corpus.jsonl"
    sentences = [f"Paris is the capital of France ({i})." for i in range(12)]
    corpus.write_text("".join(json.dumps({"question": s, "steps": [], "answer": "x"}) + "\n" for s in sentences))
    cfg = load_config(None, [f"model.name_or_path={assets['tied']}", f"data.source={corpus}", "data.task=freeform",
                             "data.train_split=null", "data.val_size=2", "data.objective=text", "scheme.style=direct",
                             "mode=lora", "optim.max_steps=2", "optim.batch_size=4", "optim.warmup_steps=0",
                             "eval.every_steps=2", f"output_dir={tmp_path / 'run'}"])
    recipe = TrainRecipe(cfg, progress=False)
    recipe.setup()
    rows = recipe.trainer.train_dataset.rows
    texts = {recipe.tokenizer.decode(r["input_ids"]) for r in rows}
    assert texts <= set(sentences) and len(rows) == 10
    assert all(r["labels"] == r["input_ids"] and r["n_prompt"] == 0 for r in rows)
    recipe.train()
    info = json.loads((tmp_path / "run" / "run.json").read_text())
    assert info["status"] == "complete" and "val_loss" in info["best"]
    assert not (tmp_path / "run" / "val_generations.jsonl").exists()  # nothing to generate for plain text


# --- a trained run -----------------------------------------------------------------------------------


def test_lora_tokens_training_changes_only_lora_weights_and_the_new_rows(trained, assets):
    base, _, ids = _fresh_base(assets)
    model = trained.trainer.model
    embedding = model.get_input_embeddings()
    merged = embedding.token_adapter.get_merged_weights(["default"])  # what the forward pass uses
    original = base.get_input_embeddings().weight
    n_old = original.shape[0] - len(ids)
    assert torch.equal(merged[:n_old], original[:n_old])             # original vocabulary: bit-identical
    assert not torch.equal(merged[ids], original[ids])              # the new rows trained
    head = model.get_output_embeddings().token_adapter.get_merged_weights(["default"])
    assert torch.equal(head, merged)  # tied: the output head uses the same trained rows
    base_state = base.state_dict()
    changed = []
    for name, value in model.named_parameters():
        key = name.replace("base_model.model.", "", 1)
        for wrapper in (".token_adapter", ".base_layer", ".original_module"):  # PEFT's wrapping modules
            key = key.replace(wrapper, "")
        if "lora_" in name or "trainable_tokens" in name:
            changed.append(name)
            continue
        assert torch.equal(value, base_state[key]), name  # every base weight untouched
    assert any("lora_B" in n for n in changed) and any("trainable_tokens_delta" in n for n in changed)
    lora_b = [p for n, p in model.named_parameters() if "lora_B" in n]
    assert all(p.abs().sum() > 0 for p in lora_b)  # LoRA B starts at zero: non-zero means it trained


def test_trained_model_emits_the_markers(trained, assets):
    from memreason.generate import generate_texts
    from memreason.prompts import render_prompt
    from memreason.tasks import get_task

    prompts = [render_prompt(q, get_task("strategyqa"), trained.tokenizer, "plain") for q, *_ in QUESTIONS]
    first_line = "<prefix_0><prefix_1><prefix_2><memory_0><memory_1><memory_2><memory_3>"  # every target's start
    texts = [g.text for g in generate_texts(trained.trainer.model, trained.tokenizer, prompts, max_new_tokens=7)]
    assert texts == [first_line] * len(prompts)
    base, tokenizer, _ = _fresh_base(assets)  # control: before training, the new rows are never emitted
    untrained = [g.text for g in generate_texts(base, tokenizer, prompts, max_new_tokens=7)]
    assert not any("<prefix_0>" in text or "<memory_0>" in text for text in untrained)


def test_reloading_the_run_reproduces_greedy_generations_and_logits(trained):
    from memreason.generate import generate_texts
    from memreason.model.runs import load_run

    model, tokenizer, info = load_run(trained.run_dir, device="cpu", checkpoint="last")
    prompts = [f"Question: {q}\n" for q, *_ in QUESTIONS]
    live = generate_texts(trained.trainer.model, trained.tokenizer, prompts, max_new_tokens=16)
    again = generate_texts(model, tokenizer, prompts, max_new_tokens=16)
    assert [g.text for g in again] == [g.text for g in live]
    ids = tokenizer(prompts[0], return_tensors="pt")["input_ids"]
    trained.trainer.model.eval()
    with torch.no_grad():
        assert torch.equal(model(ids).logits, trained.trainer.model(ids).logits)
    assert info.checkpoint == "last" and info.step == trained.trainer.state.global_step


def test_run_directory_holds_a_small_adapter_tokenizer_config_metrics_and_curves(trained, assets):
    run = trained.run_dir
    info = json.loads((run / "run.json").read_text())
    assert info["status"] == "complete" and info["prompt_style"] == "plain" and info["mode"] == "lora+tokens"
    assert (run / "checkpoints" / info["best"]["checkpoint"]).is_dir()
    assert info["best"]["val_accuracy"] == max(
        json.loads(line)["eval_val_accuracy"] for line in (run / "metrics.jsonl").read_text().splitlines()
        if "eval_val_accuracy" in line)
    weights = load_file(run / "best" / "adapter_model.safetensors")
    deltas = [k for k in weights if "trainable_tokens_delta" in k]
    assert len(deltas) == 1 and weights[deltas[0]].shape == (15, 64)  # tied: one [n_new, hidden] tensor
    assert not any(k.endswith(("embed_tokens.weight", "lm_head.weight")) for k in weights)  # no full matrices
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(run / "tokenizer")
    assert tokenizer.convert_tokens_to_ids(TokenScheme().tokens()) == info["token_ids"]
    assert TokenScheme(**json.loads((run / "scheme.json").read_text())) == TokenScheme()
    assert load_config(run / "config.yaml") == trained.cfg
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert any("loss" in r for r in rows) and any("eval_loss" in r for r in rows)
    assert (run / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    generations = [json.loads(line) for line in (run / "val_generations.jsonl").read_text().splitlines()]
    assert len(generations) == 4 * len([r for r in rows if "eval_val_accuracy" in r])


def test_untied_model_trains_separate_input_and_output_rows_and_keeps_the_old_ones(assets, tmp_path):
    run = main(_config(assets, tmp_path / "run", "optim.epochs=1", model="untied"), progress=False)
    base, _, ids = _fresh_base(assets, "untied")
    weights = load_file(run / "last" / "adapter_model.safetensors")
    deltas = sorted(k for k in weights if "trainable_tokens_delta" in k)
    assert len(deltas) == 2 and any("lm_head" in k for k in deltas) and any("embed_tokens" in k for k in deltas)
    from memreason.model.runs import load_run

    model, _, _ = load_run(run, device="cpu", checkpoint="last")
    for layer, original in ((model.get_input_embeddings(), base.get_input_embeddings().weight),
                            (model.get_output_embeddings(), base.get_output_embeddings().weight)):
        merged = layer.token_adapter.get_merged_weights(["default"])
        assert torch.equal(merged[:ids[0]], original[:ids[0]])
        assert not torch.equal(merged[ids], original[ids])


def test_padded_vocabulary_model_trains_the_padding_rows_the_new_ids_point_at(assets, tmp_path):
    run = main(_config(assets, tmp_path / "run", "optim.epochs=1", model="padded"), progress=False)
    base, tokenizer, ids = _fresh_base(assets, "padded")
    rows = base.get_input_embeddings().weight.shape[0]
    assert ids == list(range(len(tokenizer) - 15, len(tokenizer))) and ids[-1] < rows - 1  # inside the padding
    info = json.loads((run / "run.json").read_text())
    assert info["token_ids"] == ids
    from memreason.model.runs import load_run

    model, _, _ = load_run(run, device="cpu", checkpoint="last")
    merged = model.get_input_embeddings().token_adapter.get_merged_weights(["default"])
    original = base.get_input_embeddings().weight
    assert merged.shape[0] == rows  # the matrix did not grow
    assert not torch.equal(merged[ids], original[ids])
    unused = [i for i in range(rows) if i not in ids]
    assert torch.equal(merged[unused], original[unused])


class _Interrupt(Exception):
    pass


def test_resume_after_interruption_ends_at_the_same_weights(assets, tmp_path):
    from transformers import TrainerCallback

    class StopAfterSave(TrainerCallback):
        def on_save(self, args, state, control, **kwargs):
            if state.global_step == 4:  # 12 examples / batch 4 = 3 steps per epoch: step 4 is mid-epoch 2
                raise _Interrupt()

    extra = ("optim.epochs=2", "data.val_size=4", "data.seed=1")
    straight = main(_config(assets, tmp_path / "a", *extra), progress=False)
    cfg = _config(assets, tmp_path / "b", *extra)
    recipe = TrainRecipe(cfg, progress=False)
    recipe.setup()
    with pytest.raises(_Interrupt):
        recipe.train(callbacks=[StopAfterSave()])
    assert not (tmp_path / "b" / "last").exists()
    with pytest.raises(ConfigError, match="--resume"):
        main(cfg, progress=False)
    resumed = main(cfg, resume=True, progress=False)
    a, b = load_file(straight / "last" / "adapter_model.safetensors"), load_file(resumed / "last" / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    steps = [json.loads(line)["step"] for line in (resumed / "metrics.jsonl").read_text().splitlines()
             if "loss" in line and "eval" not in line and "train_loss" not in line]
    assert steps == sorted(set(steps)) == list(range(1, 7))  # no step logged twice across the interruption


def test_run_json_is_what_run_info_writes_and_reads(trained):
    from memreason.model.runs import RunInfo

    written = json.loads((trained.run_dir / "run.json").read_text())
    info = RunInfo.from_json(trained.run_dir)
    assert info.to_dict() == written and info == replace(trained.info, run_dir=trained.run_dir)
    assert info.status == "complete" and info.best.checkpoint == written["best"]["checkpoint"]
    assert info.last.step == written["last"]["step"] == written["global_step"] == trained.trainer.state.global_step


def test_best_and_last_carry_the_tokenizer_and_open_with_peft_auto_class(trained, assets):
    from peft import AutoPeftModelForCausalLM
    from transformers import AutoTokenizer

    from memreason.generate import generate_texts
    from memreason.model.runs import load_run

    run = trained.run_dir
    for name in ("best", "last"):
        adapter = json.loads((run / name / "adapter_config.json").read_text())
        assert adapter["base_model_name_or_path"] == str(Path(assets["tied"]).resolve())  # the real base
        tokenizer = AutoTokenizer.from_pretrained(run / name)
        assert tokenizer.convert_tokens_to_ids(TokenScheme().tokens()) == list(trained.token_ids)
    model = AutoPeftModelForCausalLM.from_pretrained(run / "last")  # never imports memreason's loader
    tokenizer = AutoTokenizer.from_pretrained(run / "last")
    ours, our_tokenizer, _ = load_run(run, device="cpu", checkpoint="last")
    prompts = [f"Question: {q}\n" for q, *_ in QUESTIONS]
    theirs = [g.text for g in generate_texts(model, tokenizer, prompts, max_new_tokens=7)]
    assert theirs == [g.text for g in generate_texts(ours, our_tokenizer, prompts, max_new_tokens=7)]
    assert all(text.startswith("<prefix_0><prefix_1><prefix_2><memory_0>") for text in theirs)  # the new tokens
    ids = tokenizer(prompts[0], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        assert torch.equal(model(ids).logits, ours(ids).logits)


def test_adapters_name_their_base_by_absolute_path_when_given_a_relative_one(assets, tmp_path, monkeypatch):
    monkeypatch.chdir(assets["root"])
    run = main(_config(assets, tmp_path / "run", "optim.max_steps=1", "eval.every_steps=1", "eval.max_new_tokens=2",
                       "model.name_or_path=tied"), progress=False)
    for name in ("best", "last"):
        adapter = json.loads((run / name / "adapter_config.json").read_text())
        assert adapter["base_model_name_or_path"] == str((assets["root"] / "tied").resolve())


def test_a_failure_after_the_model_loads_marks_the_run_and_allows_a_rerun_or_resume(assets, tmp_path):
    from transformers import TrainerCallback

    from memreason.model.runs import RunInfo

    class Fail(TrainerCallback):
        def __init__(self, step, error):
            self.step, self.error = step, error

        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == self.step:
                raise self.error

    cfg = _config(assets, tmp_path / "a", "optim.max_steps=4", "eval.every_steps=4")
    recipe = TrainRecipe(cfg, progress=False)
    recipe.setup()
    with pytest.raises(RuntimeError, match="disk on fire"):
        recipe.train(callbacks=[Fail(1, RuntimeError("disk on fire"))])
    info = RunInfo.from_json(tmp_path / "a")
    assert info.status == "failed" and info.error == "RuntimeError: disk on fire" and info.global_step == 1
    run = main(cfg, progress=False)  # nothing was checkpointed: a plain rerun starts again
    assert RunInfo.from_json(run).status == "complete"
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines() if '"loss"' in line
             and "train_loss" not in line]
    assert steps == [1, 2, 3, 4]

    cfg = _config(assets, tmp_path / "b", "optim.max_steps=4", "eval.every_steps=2")
    recipe = TrainRecipe(cfg, progress=False)
    recipe.setup()
    with pytest.raises(KeyboardInterrupt):
        recipe.train(callbacks=[Fail(3, KeyboardInterrupt())])
    assert RunInfo.from_json(tmp_path / "b").status == "interrupted"
    with pytest.raises(ConfigError, match="--resume"):  # checkpoint-2 exists: a plain rerun would lose it
        main(cfg, progress=False)
    assert RunInfo.from_json(main(cfg, resume=True, progress=False)).status == "complete"


_KILL_AT_STEP = """
import os, signal, sys
import torch
torch.set_num_threads(1)
from transformers import TrainerCallback
from memreason.train import TrainRecipe, load_config

class Kill(TrainerCallback):
    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == 6:  # after checkpoint-4 and step 5's log, before step 6 is logged or saved
            os.kill(os.getpid(), signal.SIGKILL)

recipe = TrainRecipe(load_config(None, sys.argv[1:]), progress=False)
recipe.setup()
recipe.train(callbacks=[Kill()])
"""


def test_train_resume_after_kill_9_reaches_the_same_weights(assets, tmp_path):
    from memreason.cli import main as cli_main

    extra = ("optim.epochs=3", "data.seed=1")  # 3 steps per epoch, checkpoints every 2 steps
    straight = main(_config(assets, tmp_path / "a", *extra), progress=False)
    overrides = config_overrides(assets, tmp_path / "b", *extra)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    killed = subprocess.run([sys.executable, "-c", _KILL_AT_STEP, *overrides], capture_output=True, text=True,
                            timeout=240, env=env)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    run = tmp_path / "b"
    assert json.loads((run / "run.json").read_text())["status"] == "training"  # no chance to say otherwise
    assert max(json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()) == 5
    # what a kill in the middle of a save and in the middle of an append leave behind
    (run / "checkpoints" / "checkpoint-6").mkdir()
    (run / "checkpoints" / "checkpoint-6" / "adapter_model.safetensors").write_bytes(b"half a file")
    with open(run / "metrics.jsonl", "a") as handle:
        handle.write('{"step": 6, "lo')
    assert cli_main(["train", "--no-progress", *overrides]) == 2  # without --resume: refused, nothing touched
    assert cli_main(["train", "--no-progress", "--resume", *overrides]) == 0
    a, b = load_file(straight / "last" / "adapter_model.safetensors"), load_file(run / "last" / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()
             if '"loss"' in line and "eval" not in line and "train_loss" not in line]
    assert steps == list(range(1, 10))  # the torn line and step 5's first log are gone, nothing twice


def test_resume_refuses_a_changed_config_and_returns_a_complete_run_unchanged(trained):
    cfg = trained.cfg
    stamp = (trained.run_dir / "run.json").stat().st_mtime_ns
    assert main(cfg, resume=True, progress=False) == trained.run_dir
    assert (trained.run_dir / "run.json").stat().st_mtime_ns == stamp
    changed = load_config(None, [f"{k}={v}" for k, v in [("optim.lr", "1e-3")]] + [f"output_dir={cfg.output_dir}"])
    with pytest.raises(ConfigError, match="differs from the saved one"):
        main(changed, resume=True, progress=False)


@pytest.mark.parametrize("mode", ["tokens", "lora", "full"])
def test_other_modes_train_what_they_say_and_reload_exactly(assets, tmp_path, mode):
    from memreason.model.runs import load_run

    recipe = TrainRecipe(_config(assets, tmp_path / "run", "optim.epochs=1", f"mode={mode}"), progress=False)
    recipe.setup()
    run = recipe.train()
    model = recipe.trainer.model.eval()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    if mode == "tokens":
        assert trainable and all("trainable_tokens_delta" in n for n in trainable)
        base, _, ids = _fresh_base(assets)
        rows_in = model.get_input_embeddings().get_merged_weights(["default"])
        rows_out = model.get_output_embeddings().get_merged_weights(["default"])
        assert torch.equal(rows_in, rows_out)  # tied: the head emits with the trained rows too
        assert not torch.equal(rows_in[ids], base.get_input_embeddings().weight[ids])
        assert torch.equal(rows_in[:ids[0]], base.get_input_embeddings().weight[:ids[0]])
    elif mode == "lora":
        assert trainable and all("lora_" in n for n in trainable)
        base, _, ids = _fresh_base(assets)  # new rows stay at their group-word initialisation
        assert torch.equal(model.get_input_embeddings().weight[ids], base.get_input_embeddings().weight[ids])
    else:
        assert len(trainable) == len(list(model.parameters()))
        assert (run / "last" / "model.safetensors").is_file()
    reloaded, tokenizer, info = load_run(run, device="cpu", checkpoint="last")
    ids = tokenizer("Question: Is Paris the capital of France?\n", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, model(ids).logits)
    assert info.mode == mode


def test_activation_checkpointing_trains_to_the_same_weights(assets, tmp_path):
    plain = main(_config(assets, tmp_path / "a", "optim.max_steps=2", "eval.every_steps=2"), progress=False)
    recipe = TrainRecipe(_config(assets, tmp_path / "b", "optim.max_steps=2", "eval.every_steps=2",
                                 "optim.activation_checkpointing=true"), progress=False)
    recipe.setup()
    saved = recipe.train()
    assert recipe.trainer.model.get_base_model().is_activation_checkpointing  # the flag took effect
    a, b = load_file(plain / "last" / "adapter_model.safetensors"), load_file(saved / "last" / "adapter_model.safetensors")
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-6)


def test_warmup_longer_than_training_is_refused(assets, tmp_path):
    recipe = TrainRecipe(_config(assets, tmp_path / "run", "optim.warmup_steps=1000"), progress=False)
    with pytest.raises(ConfigError, match="never reach optim.lr"):
        recipe.setup()


def test_over_long_examples_are_dropped_and_counted_never_truncated(assets, tmp_path):
    full = TrainRecipe(_config(assets, tmp_path / "a"), progress=False)
    full.setup()
    lengths = sorted(len(r["input_ids"]) for r in full.trainer.train_dataset.rows)
    limit = lengths[len(lengths) // 2]
    cut = TrainRecipe(_config(assets, tmp_path / "b", f"data.max_length={limit}"), progress=False)
    cut.setup()
    kept = [r["input_ids"] for r in cut.trainer.train_dataset.rows]
    assert cut.info.data["dropped_too_long"]["train"] == sum(n > limit for n in lengths) > 0
    assert max(map(len, kept)) <= limit
    assert all(ids[-1] == cut.tokenizer.eos_token_id for ids in kept)  # every kept example ends its answer
    with pytest.raises(DataError, match="every training example is longer than data.max_length=20"):
        TrainRecipe(_config(assets, tmp_path / "c", "data.max_length=20"), progress=False).setup()


def test_random_allocation_run_trains_on_shuffled_markers_with_the_same_validation_split(assets, tmp_path):
    gold = TrainRecipe(_config(assets, tmp_path / "g"), progress=False)
    gold.setup()
    shuffled = TrainRecipe(_config(assets, tmp_path / "r", "data.marker_allocation=random"), progress=False)
    shuffled.setup()
    assert gold.info.data["val_ids"] == shuffled.info.data["val_ids"]
    assert [r["input_ids"] for r in gold.trainer.eval_dataset.rows] == \
           [r["input_ids"] for r in shuffled.trainer.eval_dataset.rows]
    assert sorted(map(len, (r["input_ids"] for r in gold.trainer.train_dataset.rows))) == \
           sorted(map(len, (r["input_ids"] for r in shuffled.trainer.train_dataset.rows)))
    assert [r["input_ids"] for r in gold.trainer.train_dataset.rows] != \
           [r["input_ids"] for r in shuffled.trainer.train_dataset.rows]


# --- scale-out: two processes, gloo, CPU ----------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_process_cpu_run_writes_the_same_adapter_format_with_a_sane_loss(assets, tmp_path, trained):
    out = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
               str(_free_port()), "-m", "memreason.cli", "train", "--no-progress",
               f"model.name_or_path={assets['tied']}", f"data.source={assets['data']}", "data.task=strategyqa",
               "data.train_split=null", "data.val_size=4", "prompt_style=plain", "optim.epochs=2",
               "optim.batch_size=2", "optim.lr=2e-2", "optim.warmup_steps=0", "eval.max_new_tokens=8", "lora.target=all",
               "logging_steps=1", f"output_dir={out}"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=240, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("run: ") == 1  # only the first process reports
    info = json.loads((out / "run.json").read_text())
    assert info["world_size"] == 2 and info["status"] == "complete"
    assert info["global_step"] == 6  # 12 examples / (2 per process x 2 processes) x 2 epochs
    ours = load_file(out / "best" / "adapter_model.safetensors")
    single = load_file(trained.run_dir / "best" / "adapter_model.safetensors")
    assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in single.items()}
    losses = [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()
              if '"loss"' in line]
    assert all(math.isfinite(x) for x in losses)
    assert losses[0] < math.log(len(build_tiny_tokenizer()) + 15) + 1 and losses[-1] < losses[0]


# --- the real model ------------------------------------------------------------------------------------


@pytest.mark.smollm2
def test_smollm2_tokens_and_targets_round_trip_through_its_tokenizer():
    from memreason.data import load_traces
    from memreason.model import load
    from memreason.model.tokens import add_scheme_tokens, parse

    model, tokenizer = load(None, dtype="float32", device="cpu")
    ids = add_scheme_tokens(model, tokenizer, TokenScheme())
    assert ids == list(range(49152, 49167))
    traces, _ = load_traces("bundled:strategyqa", split="train")
    for trace in traces[:20]:
        target = format_target(trace, TokenScheme())
        decoded = tokenizer.decode(encode(tokenizer, target), skip_special_tokens=True)  # as generation decodes
        assert parse(decoded, question=trace.question, answer=trace.answer) == trace


@pytest.mark.smollm2
def test_smollm2_three_steps_lower_the_target_loss_and_save_a_small_adapter(tmp_path):
    torch.set_num_threads(2)
    cfg = load_config(None, ["data.val_size=2", "prompt_style=plain", "optim.max_steps=3", "optim.batch_size=8",
                             "optim.lr=1e-3", "optim.warmup_steps=0", "eval.max_new_tokens=4",
                             "eval.every_steps=3", "data.max_length=160", f"output_dir={tmp_path / 'run'}",
                             "logging_steps=1"])
    run = main(cfg, progress=False)
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if "loss" in r]
    assert len(losses) == 3 and losses[-1] < losses[0]
    weights = load_file(run / "best" / "adapter_model.safetensors")
    assert weights["base_model.model.model.embed_tokens.token_adapter.trainable_tokens_delta"].shape == (15, 576)
    assert (run / "best" / "adapter_model.safetensors").stat().st_size < 20e6  # not the 113 MB embedding
    adapter = json.loads((run / "best" / "adapter_config.json").read_text())
    assert adapter["base_model_name_or_path"] == "HuggingFaceTB/SmolLM2-135M-Instruct"  # not a cache path
