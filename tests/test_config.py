import pytest

from memreason.config import config_to_dict
from memreason.train.config import TrainConfig, build_config, load_config, save_config
from memreason.errors import ConfigError
from memreason.model.tokens import TokenScheme


def test_defaults_are_the_papers_method_on_the_embedded_model():
    cfg = load_config(None)
    assert cfg.mode == "lora+tokens" and cfg.scheme == TokenScheme("paper", 3, 4)
    assert (cfg.lora.r, cfg.lora.alpha, cfg.lora.dropout, cfg.lora.target) == (16, 16, 0.05, "mlp")
    assert cfg.optim.lr == 2e-4 and cfg.data.val_fraction == 0.1 and cfg.model.name_or_path is None


def test_overrides_are_read_as_the_declared_types():
    cfg = load_config(None, ["optim.lr=1e-4", "optim.epochs=2", "scheme.n_special=0", "data.val_size=5",
                             "eval.every_steps=null", "data.skip_invalid=true", "model.name_or_path=./m",
                             "output_dir=runs/x"])
    assert cfg.optim.lr == 1e-4 and isinstance(cfg.optim.lr, float)
    assert cfg.optim.epochs == 2.0 and cfg.scheme.n_special == 0 and cfg.data.val_size == 5
    assert cfg.eval.every_steps is None and cfg.data.skip_invalid is True
    assert cfg.model.name_or_path == "./m" and cfg.output_dir == "runs/x"


def test_yaml_file_then_overrides(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("optim:\n  lr: 2e-4\n  epochs: 4\nscheme: {style: compact}\nmode: lora\n")
    cfg = load_config(path, ["optim.epochs=1"])
    assert cfg.optim.lr == 2e-4 and cfg.optim.epochs == 1.0  # "2e-4" is a str in YAML 1.1; read as a number
    assert cfg.scheme.style == "compact" and cfg.mode == "lora"


def test_saved_config_loads_back_equal(tmp_path):
    cfg = load_config(None, ["scheme.style=compact", "optim.lr=3e-4", "data.marker_allocation=random"])
    save_config(cfg, tmp_path / "c.yaml")
    assert load_config(tmp_path / "c.yaml") == cfg


@pytest.mark.parametrize("override, message", [
    (["optim.lrr=1"], r"unknown config key 'optim.lrr' \(did you mean optim.lr\?\)"),
    (["colour=red"], "unknown config key 'colour'"),
    (["optim.epochs=many"], "optim.epochs: expected a number, got 'many'"),
    (["optim.batch_size=2.5"], "optim.batch_size: expected an integer"),
    (["mode=lora-tokens"], r"mode: expected one of .* got 'lora-tokens' \(did you mean 'lora\+tokens'\?\)"),
    (["scheme.n_prefix=-1"], "n_prefix must be an integer >= 0"),
    (["scheme.n_special=-3"], "n_special must be an integer >= 0"),
    (["data.source=/no/such/file.json", "data.task=strategyqa"], "dataset file not found: /no/such/file.json"),
    (["data.source=bundled:strategyqaa"], "unknown bundled dataset 'strategyqaa'"),
    (["data.val_fraction=0"], "never on the test split"),
    (["optim.lr=0"], "optim.lr must be > 0"),
    (["optim", ], "not of the form key=value"),
    (["optim=3"], "optim is a section"),
    (["scheme.style=plain"], "adds no tokens; use mode=lora"),
    (["data.task=strategyqq"], "data.task: unknown task 'strategyqq'"),
    (["lora.target=mlps"], "lora.target: expected one of"),
])
def test_bad_configs_raise_one_config_error_naming_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, override)


def test_unknown_key_in_a_yaml_file_names_the_full_dotted_key(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("eval:\n  every_step: 10\n")
    with pytest.raises(ConfigError, match=r"unknown config key 'eval.every_step' \(did you mean eval.every_steps\?\)"):
        load_config(path)


def test_wrong_type_in_a_yaml_file_is_refused(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("optim:\n  batch_size: [1, 2]\n")
    with pytest.raises(ConfigError, match="optim.batch_size: expected an integer"):
        load_config(path)


def test_missing_or_broken_yaml_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")
    (tmp_path / "bad.yaml").write_text("optim: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(tmp_path / "bad.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(tmp_path / "list.yaml")


def test_random_marker_allocation_needs_a_scheme_that_writes_kinds():
    with pytest.raises(ConfigError, match="writes no kind markers"):
        load_config(None, ["data.marker_allocation=random", "scheme.n_special=0"])


def test_build_config_accepts_a_partial_dict_and_fills_defaults():
    cfg = build_config({"optim": {"epochs": 1}})
    assert isinstance(cfg, TrainConfig) and cfg.optim.epochs == 1.0 and cfg.optim.batch_size == 8
    assert config_to_dict(cfg)["scheme"] == {"style": "paper", "n_prefix": 3, "n_special": 4}


def test_every_config_problem_is_listed_at_once(tmp_path):
    with pytest.raises(ConfigError) as info:
        load_config(None, ["optim.lr=nan", "optim.batch_size=0", "nosuch=1", "lora.r=x"])
    message = str(info.value)
    assert "config errors" in message
    for part in ("optim.lr: expected a finite number", "unknown config key 'nosuch'", "lora.r: expected an integer"):
        assert part in message


@pytest.mark.parametrize("text", ["", "# only a comment\n", "[]\n", "false\n"])
def test_an_empty_or_non_mapping_config_file_is_an_error_not_the_defaults(tmp_path, text):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match="empty|expected a mapping"):
        load_config(path)


def test_yaml_syntax_errors_keep_their_line_and_column(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("optim:\n  lr: 1e-4\n  epochs: [1\n")
    with pytest.raises(ConfigError, match=r"not valid YAML at line \d+, column \d+"):
        load_config(path)


def test_defaults_include_lets_a_variant_state_only_its_difference(tmp_path):
    (tmp_path / "base.yaml").write_text("optim:\n  lr: 1.0e-3\n  epochs: 2\noutput_dir: runs/base\n")
    (tmp_path / "variant.yaml").write_text("defaults: base.yaml\noptim:\n  epochs: 1\n")
    cfg = load_config(tmp_path / "variant.yaml", ["output_dir=runs/v"], check_data=False)
    assert (cfg.optim.lr, cfg.optim.epochs, cfg.output_dir) == (1e-3, 1, "runs/v")
    (tmp_path / "loop.yaml").write_text("defaults: loop.yaml\n")
    with pytest.raises(ConfigError, match="cycle"):
        load_config(tmp_path / "loop.yaml")


def test_load_settings_builds_any_settings_dataclass_with_list_overrides():
    from dataclasses import dataclass, field

    from memreason.config import load_settings

    @dataclass
    class Sweep:
        layers: list[int] = field(default_factory=lambda: [1, 2])
        tau: float = 1.0
        name: str | None = None

    sweep = load_settings(Sweep, None, ["layers=[3, 5]", "tau=2", "name=null"])
    assert (sweep.layers, sweep.tau, sweep.name) == ([3, 5], 2.0, None)
    with pytest.raises(ConfigError, match=r"layers\[1\]: expected an integer"):
        load_settings(Sweep, None, ["layers=[3, x]"])
