"""Tests of memreason.train.arguments: the validated trainer_args pass-through and experiment tracking."""

import importlib.machinery
import json
import sys
import types

import pytest

from memreason.errors import ConfigError
from memreason.train import load_config, main
from memreason.train.arguments import SET_BY_MEMREASON, check_reporting, check_trainer_args, training_arguments
from train_fixtures import assets  # noqa: F401  (fixture)
from train_fixtures import config_overrides
from train_fixtures import one_thread  # noqa: F401  (autouse fixture)


def test_unknown_and_memreason_owned_trainer_args_are_refused_all_at_once():
    problems = check_trainer_args({"adam_epsilom": 1e-6, "learning_rate": 1e-3, "save_steps": 5,
                                   "adam_beta2": "not a number", "optim": "adamw_torch", "tf32": False})
    assert problems == [
        "trainer_args.adam_epsilom: not a transformers TrainingArguments field (did you mean adam_epsilon?)",
        "trainer_args.learning_rate: memreason sets it: set optim.lr",
        "trainer_args.save_steps: memreason sets it: set eval.every_steps",
        "trainer_args.adam_beta2: expected float, got 'not a number'",
    ]
    assert check_trainer_args({"optim": "adamw_torch", "adam_beta2": 0.95, "dataloader_num_workers": 0}) == []


def test_every_field_memreason_refuses_exists_in_training_arguments():
    import dataclasses

    from transformers import TrainingArguments

    names = {f.name for f in dataclasses.fields(TrainingArguments)}
    assert set(SET_BY_MEMREASON) <= names  # a renamed field upstream would otherwise pass through unnoticed


def test_config_builder_lists_trainer_args_and_tracker_problems_with_the_others(assets, tmp_path):
    with pytest.raises(ConfigError) as caught:
        load_config(None, config_overrides(assets, tmp_path / "run", "optim.lr=-1", "trainer_args.seed=3",
                                           "report_to=[tensorbored]"))
    message = str(caught.value)
    assert message.startswith("3 config errors: ")
    assert "optim.lr must be > 0" in message and "trainer_args.seed: memreason sets it: set seed" \
        in message and "unknown tracker 'tensorbored' (did you mean 'tensorboard'?)" in message


def test_a_tracker_whose_package_is_missing_is_a_config_error(monkeypatch):
    import transformers.integrations.integration_utils as integrations

    monkeypatch.setattr(integrations, "get_available_reporting_integrations", lambda: [])
    assert check_reporting(["tensorboard"], None) == [
        "report_to: 'tensorboard' needs the tensorboard package (pip install tensorboard)"]
    assert check_reporting(["none", "wandb"], None)[0] == "report_to: 'none' and 'all' stand alone, got ['none', 'wandb']"
    assert check_reporting([], "") == ["run_name must not be empty (null = the output_dir's name)"]


def test_trainer_args_reach_training_arguments_typed_and_a_refused_value_is_a_config_error(assets, tmp_path):
    cfg = load_config(None, config_overrides(assets, tmp_path / "run", "trainer_args.adam_beta2=0.95",
                                             "trainer_args.optim=adafactor", "trainer_args.eval_on_start=true",
                                             "run_name=try-1"))
    args = training_arguments(cfg, tmp_path / "run", progress=False)
    assert args.adam_beta2 == 0.95 and args.optim == "adafactor" and args.eval_on_start is True
    assert args.run_name == "try-1" and args.report_to == [] and args.learning_rate == cfg.optim.lr
    bad = load_config(None, config_overrides(assets, tmp_path / "run", "trainer_args.optim=no_such_optimizer"))
    with pytest.raises(ConfigError, match="TrainingArguments refused trainer_args.optim"):
        training_arguments(bad, tmp_path / "run", progress=False)


class _RecordingWriter:
    """Stands in for tensorboardX.SummaryWriter (neither tensorboard nor tensorboardX is installed here)."""

    instances: list = []

    def __init__(self, log_dir=None, **kwargs):
        self.log_dir, self.scalars, self.texts = log_dir, [], {}
        _RecordingWriter.instances.append(self)

    def add_scalar(self, tag, value, global_step=None):
        self.scalars.append((tag, value, global_step))

    def add_text(self, tag, text, global_step=None):
        self.texts[tag] = text

    def __getattr__(self, name):  # flush, close, add_hparams, ...
        return lambda *args, **kwargs: None


def test_report_to_tensorboard_sends_every_logged_value_to_the_run_tensorboard_dir(assets, tmp_path, monkeypatch):
    fake = types.ModuleType("tensorboardX")
    fake.__spec__ = importlib.machinery.ModuleSpec("tensorboardX", None)
    fake.SummaryWriter = _RecordingWriter
    monkeypatch.setitem(sys.modules, "tensorboardX", fake)
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # transformers tries this one first
    _RecordingWriter.instances.clear()
    run = main(load_config(None, config_overrides(assets, tmp_path / "run", "optim.max_steps=4", "report_to=[tensorboard]",
                                                  "run_name=tb-check")), progress=False)
    (writer,) = _RecordingWriter.instances
    assert writer.log_dir == str(run / "tensorboard")
    assert json.loads(writer.texts["args"])["run_name"] == "tb-check"
    logged = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    losses = [(r["step"], r["loss"]) for r in logged if "loss" in r]
    assert [(step, value) for tag, value, step in writer.scalars if tag == "train/loss"] == losses == \
        [(step, losses[step - 1][1]) for step in (1, 2, 3, 4)]
    accuracies = [(r["step"], r["eval_val_accuracy"]) for r in logged if "eval_val_accuracy" in r]
    assert [(step, value) for tag, value, step in writer.scalars if tag == "eval/val_accuracy"] == accuracies
    assert len(accuracies) == 2


def test_report_to_tensorboard_writes_event_files_that_tensorboard_reads(assets, tmp_path):
    pytest.importorskip("tensorboard", reason="tensorboard is not installed in this environment")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = main(load_config(None, config_overrides(assets, tmp_path / "run", "optim.max_steps=2",
                                                  "report_to=[tensorboard]")), progress=False)
    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    assert [event.step for event in events.Scalars("train/loss")] == [1, 2]
