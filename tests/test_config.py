import re
import tomllib
from pathlib import Path

import pytest
from flwr.common.config import flatten_dict, validate_fields_in_config

from elora_fed.config import RunConfig, load_config, parse_override
from elora_fed.errors import ConfigError

PYPROJECT = Path(__file__).parents[1] / "pyproject.toml"


def test_pyproject_is_a_valid_flower_app_with_the_dataclass_defaults():
    pyproject = tomllib.loads(PYPROJECT.read_text())
    valid, errors, _ = validate_fields_in_config(pyproject)
    assert valid, errors
    assert flatten_dict(pyproject["tool"]["flwr"]["app"]["config"]) == RunConfig().to_flat()


def test_unknown_key_is_named_with_a_suggestion():
    with pytest.raises(ConfigError, match=r"unknown config key 'modle.precision'; did you mean 'model.precision'"):
        RunConfig.from_flat({"modle.precision": "nf4"})


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("model.precision", "int8", "not one of fp32, bf16, nf4"),
        ("model.compute_dtype", "fp16", "not one of auto, fp32, bf16"),
        ("adapter.rank", 0, "out of range"),
        ("adapter.rank", 2.5, "must be int"),
        ("data.seq_len", True, "must be int"),
        ("data.seq_len", 1, "out of range"),
        ("data.val_fraction", 0.6, None),
        ("data.source", "classification", "needs data.path"),
    ],
)
def test_bad_values_are_rejected_by_name(key, value, message):
    overrides = {key: value, "data.test_fraction": 0.5} if key == "data.val_fraction" else {key: value}
    with pytest.raises(ConfigError, match=message or "leaves no training samples"):
        RunConfig.from_flat(overrides)


def test_ints_widen_to_float_and_overrides_apply_on_presets():
    config = load_config("demo", {"adapter.dropout": 0, "model.name": "tiny-random"})
    assert config.adapter.dropout == 0.0 and isinstance(config.adapter.dropout, float)
    assert config.data.num_clients == 24 and config.model.name == "tiny-random"
    assert RunConfig.from_flat(config.to_flat()) == config


def test_unknown_preset():
    with pytest.raises(ConfigError, match="unknown preset 'big'"):
        load_config("big")


def test_overrides_parse_like_flower_run_config():
    assert parse_override("adapter.rank=8") == ("adapter.rank", 8)
    assert parse_override("model.precision='nf4'") == ("model.precision", "nf4")
    assert parse_override("model.name=tiny-random") == ("model.name", "tiny-random")
    assert parse_override("data.val_fraction=0.2") == ("data.val_fraction", 0.2)
    with pytest.raises(ConfigError, match="key=value"):
        parse_override("adapter.rank")


def test_readme_config_reference_lists_every_key_with_its_default():
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    rows = dict(re.findall(r"^\| `([a-z_.]+)` \| `([^`]*)` \|", readme, flags=re.MULTILINE))
    defaults = RunConfig().to_flat()
    assert set(rows) == set(defaults)
    for key, value in defaults.items():
        assert tomllib.loads(f"v = {rows[key]}")["v"] == value, key


def test_a_flwr_run_config_applies_its_preset_beneath_the_keys_it_changes():
    from elora_fed.config import from_run_config

    flat = {**RunConfig().to_flat(), "preset": "demo", "train.rounds": 5}
    config = from_run_config(flat)
    assert config.preset == "demo" and config.train.rounds == 5  # explicit key wins
    assert config.data.num_clients == 24 and config.data.seq_len == 64  # the preset's
    assert from_run_config(RunConfig().to_flat()) == RunConfig()
    with pytest.raises(ConfigError, match="unknown preset 'dmeo'"):
        from_run_config({**RunConfig().to_flat(), "preset": "dmeo"})


def test_a_section_built_directly_is_validated():
    from elora_fed.data.config import DataConfig
    from elora_fed.model.config import TrainConfig

    with pytest.raises(ConfigError, match="'data.seq_len' = 0 is out of range"):
        DataConfig(seq_len=0)
    with pytest.raises(ConfigError, match="train.lr"):
        TrainConfig(lr=-1.0)
    assert DataConfig(seq_len=32).seq_len == 32
