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


# A complete run.json as `memreason train` wrote it before RunInfo wrote it (memreason 0.1.0, tiny model).
_OLD_RUN_JSON = {
    "format": "memreason-run/1", "status": "complete", "base_model": "/tmp/base", "task": "strategyqa",
    "task_version": 1, "prompt_style": "plain", "scheme": {"style": "paper", "n_prefix": 3, "n_special": 4},
    "mode": "lora+tokens", "tokens": TokenScheme().tokens(), "token_ids": list(range(323, 338)),
    "vocab_size": 338, "seed": 0, "dtype": "float32", "amp": None, "world_size": 1,
    "data": {"source": "/tmp/data.jsonl", "n_train": 12, "n_val": 4, "n_val_generated": 4,
             "dropped_too_long": {"train": 0, "val": 0}, "val_ids": ["a", "b", "c", "d"], "marker_allocation": "gold"},
    "trainable_parameters": 19392, "versions": {"memreason": "0.1.0", "torch": "2.13.0+cpu",
                                                "transformers": "5.23.0", "peft": "0.21.2"},
    "best": {"checkpoint": "checkpoint-4", "step": 4, "val_accuracy": 0.75, "val_answer_rate": 1.0,
             "val_format_rate": 1.0, "val_loss": 2.5},
    "last": {"checkpoint": "checkpoint-6", "step": 6, "val_accuracy": 0.5, "val_answer_rate": 1.0,
             "val_format_rate": 0.75, "val_loss": 2.4},
    "train_seconds": 3.2, "global_step": 6,
}


def test_a_run_json_written_before_run_info_wrote_it_loads_and_writes_back_the_same(tmp_path):
    from memreason.model.runs import SavedWeights

    info = RunInfo.from_dict(_OLD_RUN_JSON)
    assert info.status == "complete" and info.scheme == TokenScheme() and info.token_ids == tuple(range(323, 338))
    assert info.best == SavedWeights("checkpoint-4", 4, 0.75, 1.0, 1.0, 2.5) and info.last.step == 6
    assert info.to_dict() == _OLD_RUN_JSON
    (tmp_path / "run").mkdir()
    info.to_json(tmp_path / "run")
    assert json.loads((tmp_path / "run" / "run.json").read_text()) == _OLD_RUN_JSON
    assert RunInfo.from_json(tmp_path / "run").run_dir == tmp_path / "run"


def test_a_run_info_round_trips_through_run_json_in_every_status(tmp_path):
    (tmp_path / "run").mkdir()
    for status, error in (("training", None), ("failed", "RuntimeError: out of memory"), ("interrupted", "KeyboardInterrupt")):
        info = RunInfo(base_model="b", task="strategyqa", prompt_style="chat", scheme=TokenScheme("compact"),
                       mode="tokens", token_ids=(7, 8, 9), status=status, error=error, global_step=3)
        info.to_json(tmp_path / "run")
        again = RunInfo.from_json(tmp_path / "run")
        assert again.to_dict() == info.to_dict() and again.status == status and again.error == error


def test_an_unknown_status_is_a_corrupt_run_json():
    with pytest.raises(ModelLoadError, match="status 'done' is not one of"):
        RunInfo.from_dict({**_OLD_RUN_JSON, "status": "done"})


def test_adapters_name_the_real_base_model(tmp_path):
    from memreason.model.loading import DEFAULT_MODEL
    from memreason.model.runs import EMBEDDED_BASE_HUB_ID, adapter_base_name

    assert adapter_base_name(DEFAULT_MODEL) == EMBEDDED_BASE_HUB_ID == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert adapter_base_name("meta-llama/Llama-3.1-8B-Instruct") == "meta-llama/Llama-3.1-8B-Instruct"
    (tmp_path / "base").mkdir()
    assert adapter_base_name(str(tmp_path / "base")) == str((tmp_path / "base").resolve())
