"""Experiment configuration: defaults, YAML files, dotted overrides, validation messages."""
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from kdengine.data import LOADER_PIPELINES
from kdengine.engine.config import DATA_RECIPES, ConfigError, ExperimentConfig, load_config, parse_override

REPO = Path(__file__).resolve().parents[2]
CONFIGS = sorted((REPO / "configs").rglob("*.yaml"))


def test_defaults_are_the_embedded_default():
    cfg = load_config()
    assert cfg.data.dataset == "embedded"
    assert cfg.method.name == "dml+adm"
    assert [m.role for m in cfg.models] == ["teacher", "student"]


def test_default_yaml_spells_out_the_defaults():
    cfg = load_config(str(REPO / "configs" / "embedded" / "default.yaml"))
    assert OmegaConf.to_container(cfg) == OmegaConf.to_container(OmegaConf.structured(ExperimentConfig))


@pytest.mark.parametrize("path", CONFIGS, ids=[str(p.relative_to(REPO / "configs")) for p in CONFIGS])
def test_every_shipped_config_loads_and_validates(path):
    cfg = load_config(str(path))
    assert cfg.models and cfg.method.name


def test_overrides_are_typed_and_reach_list_items():
    cfg = load_config(overrides=["optim.lr=0.2", "models.1.name=resnet8", "train.max_steps=7",
                                 "method.options={adm: {alpha: 0.5}}", "data.mean=[1, 2, 3]"])
    assert cfg.optim.lr == 0.2 and isinstance(cfg.optim.lr, float)
    assert cfg.models[1].name == "resnet8"
    assert cfg.train.max_steps == 7
    assert cfg.method.options.adm.alpha == 0.5
    assert list(cfg.data.mean) == [1, 2, 3]


def test_parse_override_reads_yaml_values():
    assert parse_override("a.b=null") == ("a.b", None)
    assert parse_override("a=[1, 2]") == ("a", [1, 2])
    assert parse_override("x=true") == ("x", True)
    with pytest.raises(ConfigError, match="key=value"):
        parse_override("train.epochs")


def test_unknown_key_lists_the_valid_keys():
    with pytest.raises(ConfigError) as info:
        load_config(overrides=["train.epoch=3"])
    message = str(info.value)
    assert "train.epoch" in message and "epochs" in message and "did you mean 'epochs'" in message
    assert "max_steps" in message  # the list of valid keys of that section


def test_unknown_key_in_a_file_lists_the_valid_keys(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("optim:\n  learning_rate: 0.1\n")
    with pytest.raises(ConfigError, match=r"learning_rate.*valid keys here: .*\blr\b"):
        load_config(str(path))


@pytest.mark.parametrize(
    "override, pattern",
    [
        ("train.epochs=abc", "train.epochs"),
        ("train.epochs=0", r"train.epochs=0 must be > 0"),
        ("optim.schedule=linear", "optim.schedule='linear' is not valid; choose one of: multistep"),
        ("models.0.role=mentor", "models.0.role='mentor'"),
        ("models.0.name=resnet9000", "is not a zoo model; available: .*resnet8x4"),
        ("method.name=magic", "method.name='magic' is not valid; choose one of: .*dml"),
        ("data.dataset=beton", "data.dataset=beton needs data.train_path"),
        ("train.device=tpu", "train.device='tpu'"),
        ("data.mean=[1, 2]", "data.mean must list 3"),
    ],
)
def test_bad_values_name_the_key(override, pattern):
    with pytest.raises(ConfigError, match=pattern):
        load_config(overrides=[override])


def test_every_data_recipe_has_its_loader_pipelines():
    for recipe in DATA_RECIPES:
        assert f"{recipe}_train" in LOADER_PIPELINES and f"{recipe}_val" in LOADER_PIPELINES


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="^config file .*nope.yaml: no such file"):
        load_config(str(tmp_path / "nope.yaml"))
    bad = tmp_path / "list.yaml"
    bad.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(str(bad))
