import json
import shutil

import pytest
import torch

from conftest import build_tiny_model, build_tiny_tokenizer
from memreason.errors import ModelLoadError
from memreason.model.runs import RunInfo, is_run_dir, load_run
from memreason.model.tokens import TokenScheme
from memreason.traces import MEMORY, REASON, Step, Trace


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A finished lora+tokens run of a tiny tied model, 3 evaluations (steps 2, 4, 6)."""
    from memreason.train import load_config, main

    root = tmp_path_factory.mktemp("runs")
    tokenizer = build_tiny_tokenizer()
    build_tiny_model(len(tokenizer)).save_pretrained(root / "base")
    tokenizer.save_pretrained(root / "base")
    with open(root / "data.jsonl", "w") as handle:
        for i in range(16):
            trace = Trace(f"Is Paris the capital of France? ({i})",
                          (Step(MEMORY, "Paris is the capital of France."), Step(REASON, "So it is true.")), "True")
            handle.write(json.dumps(trace.to_dict()) + "\n")
    torch.set_num_threads(1)
    cfg = load_config(None, [f"model.name_or_path={root / 'base'}", f"data.source={root / 'data.jsonl'}",
                             "data.task=strategyqa", "data.train_split=null", "data.val_size=4", "optim.epochs=2",
                             "optim.batch_size=4", "optim.lr=1e-2", "optim.warmup_steps=0", "eval.every_steps=2",
                             "eval.max_new_tokens=6", f"output_dir={root / 'run'}"])
    return main(cfg, progress=False)


def test_run_info_describes_the_run(run):
    _, tokenizer, info = load_run(run, device="cpu")
    data = json.loads((run / "run.json").read_text())
    assert isinstance(info, RunInfo) and info.run_dir == run and info.checkpoint == "best"
    assert info.base_model == data["base_model"] and info.task == "strategyqa"
    assert info.prompt_style == "chat"  # auto, and the tiny tokenizer has a chat template
    assert info.scheme == TokenScheme() and info.mode == "lora+tokens"
    assert list(info.token_ids) == tokenizer.convert_tokens_to_ids(TokenScheme().tokens())
    assert info.step == data["best"]["step"]


def test_loaded_model_is_a_peft_model_in_eval_mode(run):
    from peft import PeftModel

    model, _, _ = load_run(run, device="cpu")
    assert isinstance(model, PeftModel) and not model.training


def test_merged_run_computes_what_the_adapter_computes(run):
    from peft import PeftModel

    adapter, _, info = load_run(run, device="cpu")
    merged, _, _ = load_run(run, device="cpu", merge=True)
    assert not isinstance(merged, PeftModel) and not merged.training
    ids = torch.tensor([[5, 6, info.token_ids[0], info.token_ids[-1], 7]])  # control-token rows included
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, adapter(ids).logits, rtol=1e-4, atol=1e-5)


def test_each_checkpoint_loads_its_own_weights(run):
    best, _, best_info = load_run(run, device="cpu", checkpoint="best")
    same, _, same_info = load_run(run, device="cpu", checkpoint=f"checkpoint-{best_info.step}")
    other_step = next(s for s in (2, 4, 6) if s != best_info.step and (run / "checkpoints" / f"checkpoint-{s}").is_dir())
    other, _, _ = load_run(run, device="cpu", checkpoint=f"checkpoint-{other_step}")
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        assert torch.equal(best(ids).logits, same(ids).logits)
        assert not torch.equal(best(ids).logits, other(ids).logits)
    assert same_info.step == best_info.step


def test_is_run_dir(run, tmp_path):
    assert is_run_dir(run) and is_run_dir(str(run))
    assert not is_run_dir(tmp_path) and not is_run_dir(tmp_path / "missing")


def test_missing_run_dir_is_a_clear_error(tmp_path):
    with pytest.raises(ModelLoadError, match="run directory not found"):
        load_run(tmp_path / "nope")
    with pytest.raises(ModelLoadError, match="not a training run"):
        load_run(tmp_path)


def test_corrupt_or_foreign_run_json_is_a_clear_error(run, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(run, broken)
    (broken / "run.json").write_text("{not json")
    with pytest.raises(ModelLoadError, match="corrupt"):
        load_run(broken)
    (broken / "run.json").write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(ModelLoadError, match="not a memreason run"):
        load_run(broken)


def test_missing_adapter_and_unknown_checkpoint_are_clear_errors(run, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(run, broken)
    (broken / "best" / "adapter_model.safetensors").unlink()
    with pytest.raises(ModelLoadError, match="holds no adapter"):
        load_run(broken)
    with pytest.raises(ModelLoadError, match="no checkpoint 'checkpoint-99'"):
        load_run(broken, checkpoint="checkpoint-99")


def test_unfinished_run_points_at_its_checkpoints(run, tmp_path):
    unfinished = tmp_path / "unfinished"
    shutil.copytree(run, unfinished)
    data = json.loads((unfinished / "run.json").read_text())
    data["status"] = "training"
    (unfinished / "run.json").write_text(json.dumps(data))
    shutil.rmtree(unfinished / "best")
    with pytest.raises(ModelLoadError, match="has not finished training.*checkpoint='checkpoint-6'"):
        load_run(unfinished)


def test_changed_token_ids_are_refused(run, tmp_path):
    moved = tmp_path / "moved"
    shutil.copytree(run, moved)
    data = json.loads((moved / "run.json").read_text())
    data["token_ids"] = [i + 1 for i in data["token_ids"]]
    (moved / "run.json").write_text(json.dumps(data))
    with pytest.raises(ModelLoadError, match="was the base model replaced"):
        load_run(moved)
