import pytest

# A run small enough for a unit test: 4 classes of 16-px embedded images, two small models.
TINY = [
    "data.embedded.size=16", "data.embedded.num_classes=4", "data.embedded.train_per_class=24",
    "data.embedded.val_per_class=8", "data.batch_size=16", "data.num_workers=1", "data.device_resident=true",
    "models.0.name=resnet8", "models.1.name=resnet8", "train.epochs=2", "train.device=cpu",
    "train.tensorboard=false", "train.log_every=2", "optim.lr=0.05",
]


@pytest.fixture
def tiny(tmp_path, monkeypatch):
    """Overrides for a tiny run writing into tmp_path (and the dataset cache there too)."""
    monkeypatch.setenv("KDENGINE_CACHE", str(tmp_path / "cache"))
    return TINY + [f"train.output_dir={tmp_path / 'runs'}"]
