import json

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
