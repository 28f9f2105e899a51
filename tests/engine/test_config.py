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
        ("optim.name=lamb", "optim.name='lamb' is not valid; choose one of: sgd, adamw"),
        ("optim.clip_grad=0", "optim.clip_grad=0.0 must be > 0"),
        ("optim.min_lr=0.1", "optim.min_lr=0.1 must be below optim.lr=0.05"),
        (["optim.schedule=constant", "optim.min_lr=0.001"], "optim.min_lr is the end of the cosine schedule"),
        ("train.label_smoothing=1", r"train.label_smoothing=1.0 must be in \[0, 1\)"),
        ("train.ema_decay=1.5", r"train.ema_decay=1.5 must be in \(0, 1\)"),
        ("data.mixup=-1", "data.mixup=-1.0 must be >= 0"),
        ("data.switch_prob=2", r"data.switch_prob=2.0 must be in \[0, 1\]"),
        ("data.random_erasing=1.5", r"data.random_erasing=1.5 must be in \[0, 1\]"),
        ("data.randaugment=rand-q3", "data.randaugment: RandAugment spec 'rand-q3': unknown section 'q3'"),
        ("data.resolution=0", "data.resolution=0 must be > 0"),
    ],
)
def test_bad_values_name_the_key(override, pattern):
    with pytest.raises(ConfigError, match=pattern):
        load_config(overrides=override if isinstance(override, list) else [override])


def test_the_recipe_options_load():
    cfg = load_config(overrides=["optim.name=adamw", "optim.clip_grad=5", "optim.warmup_lr=5e-7", "optim.min_lr=1e-5",
                                 "data.randaugment=rand-m9-mstd0.5-inc1", "data.random_erasing=0.25",
                                 "data.mixup=0.8", "data.cutmix=1.0", "train.label_smoothing=0.1",
                                 "train.ema_decay=0.9998", "data.resolution=224"])
    assert (cfg.optim.name, cfg.optim.clip_grad, cfg.train.ema_decay, cfg.data.resolution) == ("adamw", 5, 0.9998, 224)


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
