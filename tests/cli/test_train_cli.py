import json
import os
import re
import subprocess
import sys

import pytest
import torch

from conftest import build_tiny_model, build_tiny_tokenizer
from memreason.cli import main


@pytest.mark.parametrize("argv, message", [
    (["optim.lrr=1"], "unknown config key 'optim.lrr' (did you mean optim.lr?)"),
    (["optim.epochs=many"], "optim.epochs: expected a number, got 'many'"),
    (["mode=everything"], "mode: expected one of"),
    (["scheme.n_prefix=-1"], "n_prefix must be an integer >= 0"),
    (["data.source=/no/such.json", "data.task=strategyqa"], "dataset file not found"),
    (["--config", "/no/such/recipe.yaml"], "config file not found"),
    (["optim.lr=nan"], "optim.lr: expected a finite number, got 'nan'"),
    (["trainer_args.learning_rate=1e-3"], "trainer_args.learning_rate: memreason sets it: set optim.lr"),
    (["trainer_args.adam_epsilom=1e-6"], "trainer_args.adam_epsilom: not a transformers TrainingArguments "
                                         "field (did you mean adam_epsilon?)"),
    (["report_to=[tensorbored]"], "report_to: unknown tracker 'tensorbored' (did you mean 'tensorboard'?)"),
])
def test_bad_config_prints_one_line_and_exits_2(capsys, argv, message):
    assert main(["train", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("memreason train: error: ") and message in err
    assert len(err.splitlines()) == 1


def test_train_verb_runs_a_recipe_with_overrides_and_reports_the_run(tmp_path, capsys):
    torch.set_num_threads(1)
    tokenizer = build_tiny_tokenizer()
    build_tiny_model(len(tokenizer)).save_pretrained(tmp_path / "base")
    tokenizer.save_pretrained(tmp_path / "base")
    with open(tmp_path / "data.json", "w") as handle:  # the paper's JSON format
        json.dump([{"question": f"Is Paris in France? {i}", "answer": "True", "split": "train",
                    "cot_steps": ["[rag]: Paris is the capital of France.", "[reason]: So it is true."]}
                   for i in range(8)], handle)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"model: {{name_or_path: {tmp_path / 'base'}}}\n"
                      f"data: {{source: {tmp_path / 'data.json'}, task: strategyqa, val_size: 2}}\n"
                      "prompt_style: plain\noptim: {epochs: 1, batch_size: 2, warmup_steps: 0}\n"
                      "eval: {max_new_tokens: 4}\n")
    out = tmp_path / "run"
    assert main(["train", "--config", str(recipe), "--no-progress", "optim.lr=1e-3", f"output_dir={out}"]) == 0
    printed = capsys.readouterr().out
    assert f"run: {out}" in printed and "best checkpoint: checkpoint-3" in printed
    info = json.loads((out / "run.json").read_text())
    assert info["status"] == "complete" and info["data"]["n_train"] == 6
    assert "lr: 0.001" in (out / "config.yaml").read_text()
    # a second plain call refuses to overwrite; --resume returns the finished run
    assert main(["train", "--config", str(recipe), "--no-progress", "optim.lr=1e-3", f"output_dir={out}"]) == 2
    assert "--resume" in capsys.readouterr().err
    assert main(["train", "--config", str(recipe), "--no-progress", "--resume", "optim.lr=1e-3",
                 f"output_dir={out}"]) == 0


def test_training_logs_one_readable_line_per_log_event_above_the_progress_bar(tmp_path):
    tokenizer = build_tiny_tokenizer()
    build_tiny_model(len(tokenizer)).save_pretrained(tmp_path / "base")
    tokenizer.save_pretrained(tmp_path / "base")
    with open(tmp_path / "data.jsonl", "w") as handle:
        for i in range(8):
            handle.write(json.dumps({"question": f"Is Paris in France? {i}", "answer": "True",
                                     "steps": [{"kind": "memory", "text": "Paris is in France."}]}) + "\n")
    out = tmp_path / "run"
    command = [sys.executable, "-m", "memreason.cli", "train", f"model.name_or_path={tmp_path / 'base'}",
               f"data.source={tmp_path / 'data.jsonl'}", "data.task=strategyqa", "data.train_split=null",
               "data.val_size=2", "prompt_style=plain", "optim.max_steps=3", "optim.batch_size=2",
               "optim.warmup_steps=0", "eval.every_steps=3", "eval.max_new_tokens=4", "logging_steps=1",
               f"output_dir={out}"]  # with the progress bar
    result = subprocess.run(command, capture_output=True, text=True, timeout=240,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert "{'loss'" not in result.stdout + result.stderr and "'grad_norm'" not in result.stderr  # no raw dicts
    lines = [line for line in result.stderr.split("\n") if re.search(r"step \d+/3  ", line)]
    # what a terminal shows on that line: after the bar is cleared (\r) and the cursor moved (ESC[A)
    visible = [re.sub(r"\x1b\[[0-9;]*[A-Za-z]", "", line.split("\r")[-1]) for line in lines]
    assert visible and all(re.match(r"step \d+/3  ", v) for v in visible), lines  # never inside a bar line
    steps = [v for v in visible if "  loss " in v]
    assert [v.split()[1] for v in steps] == ["1/3", "2/3", "3/3"]
    assert all("  lr " in v and "  grad-norm " in v for v in steps)
    assert sum("val-accuracy" in v for v in visible) == 1 and sum("  done" in v for v in visible) == 1
    assert "| 3/3 [" in result.stderr  # the training progress bar was drawn
    # no dependency bars: neither transformers' "Loading weights" nor the nested validation bar (its ESC[A)
    assert "Loading weights" not in result.stderr and "\x1b[A" not in result.stderr
