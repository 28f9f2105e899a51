"""What the engine records for the pictures: a checkpoint per epoch (train.keep_checkpoints) and the
ECE of every model per epoch. Each test skips, saying so, until the engine has the hook."""
import pytest
import torch

from kdengine.engine import Trainer, load_config
from kdengine.engine.checkpoint import epoch_checkpoints
from kdengine.engine.config import TrainConfig
from kdengine.viz.analysis import calibration_of
from kdengine.viz.runs import load_checkpoint, read_records, validation_data
from tests.engine.conftest import TINY


def test_a_checkpoint_is_kept_per_epoch_when_asked(tmp_path, monkeypatch):
    if "keep_checkpoints" not in TrainConfig.__dataclass_fields__:
        pytest.skip("train.keep_checkpoints is not in the engine yet")
    monkeypatch.setenv("KDENGINE_CACHE", str(tmp_path / "cache"))
    base = TINY + [f"train.output_dir={tmp_path / 'runs'}", "method.name=vanilla"]
    trainer = Trainer(load_config(overrides=base + ["train.run_name=kept", "train.keep_checkpoints=true"]),
                      progress=False)
    trainer.fit()
    kept = epoch_checkpoints(trainer.run_dir)
    assert [e for e, _ in kept] == [1, 2]
    assert [load_checkpoint(p, "cpu").epoch for _, p in kept] == [1, 2]
    last = torch.load(trainer.run_dir / "checkpoint.pt", weights_only=False)["models"]
    again = torch.load(kept[-1][1], weights_only=False)["models"]
    assert all(torch.equal(a[k], b[k]) for a, b in zip(last, again) for k in a)
    plain = Trainer(load_config(overrides=base + ["train.run_name=plain", "train.epochs=1"]), progress=False)
    plain.fit()
    assert epoch_checkpoints(plain.run_dir) == []


def test_ece_is_logged_per_epoch(tiny_runs):
    val = [r for r in read_records(tiny_runs["adm"]) if r["split"] == "val"]
    if "teacher/ece" not in val[-1]:
        pytest.skip("the engine does not log {model}/ece per epoch yet")
    assert all(f"{t}/ece" in r for r in val for t in ("teacher", "student", "ensemble"))
    loaded = load_checkpoint(tiny_runs["adm"] / "checkpoint.pt", "cpu")
    diagrams = calibration_of(loaded, validation_data(loaded.cfg, loaded.precision))
    for tag, d in diagrams.items():
        assert val[-1][f"{tag}/ece"] == pytest.approx(d["ece"], abs=1e-4)
