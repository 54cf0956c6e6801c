"""Every shipped settings file under configs/ loads and validates (litgpt's config-hub test), found
recursively: training recipes (configs/*.yaml, paper/, ablations/) with ``memreason train``, and each other
verb's files (world/, inject/, rebalance/, eval/) with that verb's settings class."""

import importlib
import re
from pathlib import Path

import pytest
import yaml

from memreason.config import load_settings
from memreason.train.config import load_config

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
# directory under configs/ -> (the verb whose --config reads it, "module:SettingsClass")
VERB_DIRS = {"world": ("world ablate", "memreason.experiments.world_ablation:AblateConfig"),
             "inject": ("inject sweep", "memreason.experiments.injection_sweep:SweepConfig"),
             "rebalance": ("rebalance eval", "memreason.experiments.rebalance_mmlu:RebalanceSettings"),
             "eval": ("eval", "memreason.evaluate:EvalJob")}
_ALL = sorted(p for p in CONFIGS.rglob("*.yaml") if "accelerate" not in p.relative_to(CONFIGS).parts)
RECIPES = [p for p in _ALL if p.relative_to(CONFIGS).parts[0] not in VERB_DIRS]
VERB_FILES = [p for p in _ALL if p.relative_to(CONFIGS).parts[0] in VERB_DIRS]
ACCELERATE = sorted((CONFIGS / "accelerate").glob("*.yaml"))


def _settings_class(path):
    module, name = VERB_DIRS[path.relative_to(CONFIGS).parts[0]][1].split(":")
    return getattr(importlib.import_module(module), name)


def test_the_recipe_search_is_recursive_and_finds_the_shipped_recipes():
    names = {p.relative_to(CONFIGS).as_posix() for p in RECIPES}
    assert {"demo.yaml", "paper/llama31_8b_strategyqa.yaml", "ablations/demo_s0.yaml"} <= names
    assert not any(name.startswith("accelerate/") for name in names)


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.relative_to(CONFIGS).as_posix())
def test_recipe_validates(path):
    cfg = load_config(path, check_data=False)
    if cfg.data.source.startswith("bundled:"):
        load_config(path)  # the shipped data must exist too
    assert Path(cfg.output_dir).parts[0] == "runs"


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.relative_to(CONFIGS).as_posix())
def test_recipe_opens_with_its_exact_command_and_an_override_example(path):
    header = []
    for line in path.read_text().splitlines():
        if not line.startswith("#"):
            break
        header.append(line)
    relative = path.relative_to(CONFIGS.parent).as_posix()
    commands = [line for line in header if f"memreason train --config {relative}" in line]
    assert any(line.rstrip().endswith(relative) for line in commands), f"{relative}: no plain command"
    overrides = [line for line in commands if re.search(rf"{re.escape(relative)} \S+=\S+", line)]
    assert overrides, f"{relative}: no override example"
    for line in overrides:  # the override example itself must be valid
        pairs = line.split(relative, 1)[1].split()
        load_config(path, pairs, check_data=False)


@pytest.mark.parametrize("path", ACCELERATE, ids=lambda p: p.name)
def test_accelerate_configs_are_yaml_that_names_a_distributed_type_and_a_launch_command(path):
    data = yaml.safe_load(path.read_text())
    assert data["distributed_type"] in {"MULTI_GPU", "FSDP"} and data["num_processes"] >= 2
    assert f"accelerate launch --config_file configs/accelerate/{path.name}" in path.read_text()


@pytest.mark.parametrize("path", VERB_FILES, ids=lambda p: p.relative_to(CONFIGS).as_posix())
def test_verb_settings_file_validates_and_opens_with_its_command(path):
    load_settings(_settings_class(path), path)
    verb = VERB_DIRS[path.relative_to(CONFIGS).parts[0]][0]
    relative = path.relative_to(CONFIGS.parent).as_posix()
    assert f"memreason {verb} --config {relative}" in path.read_text(), f"{relative}: no command line"


def test_every_verb_directory_ships_a_settings_file():
    assert {p.relative_to(CONFIGS).parts[0] for p in VERB_FILES} == set(VERB_DIRS)


def test_ablation_recipes_state_only_their_difference_from_the_demo():
    for path in sorted((CONFIGS / "ablations").glob("*.yaml")):
        data = yaml.safe_load(path.read_text())
        assert data.pop("defaults") == "../demo.yaml"
        keys = sum(len(v) if isinstance(v, dict) else 1 for v in data.values())
        assert keys <= 4, f"{path.name} restates {keys} keys"
