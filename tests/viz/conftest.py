import shutil

import pytest

from kdengine.engine import Trainer, load_config
from kdengine.engine.checkpoint import epoch_checkpoint_name
from tests.engine.conftest import TINY


def _train(overrides):
    trainer = Trainer(load_config(overrides=overrides), progress=False)
    trainer.fit()
    return trainer.run_dir


@pytest.fixture(scope="session")
def tiny_runs(tmp_path_factory):
    """Two tiny runs with a WRN-16-2 teacher (128 channels) and a ResNet-8 student (64): DML+ADM
    (its connector maps the student for S) with a checkpoint kept after each of its 2 epochs, and
    DML (no connector: a least-squares map)."""
    root = tmp_path_factory.mktemp("viz-runs")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("KDENGINE_CACHE", str(root / "cache"))
        base = [o for o in TINY if not o.startswith("train.epochs")] + [
            f"train.output_dir={root / 'runs'}", "models.0.name=wrn_16_2"]
        # per-epoch checkpoints as train.keep_checkpoints keeps them: the same (deterministic) run
        # stopped one step after its first epoch (6 steps each), and finished
        adm = _train(base + ["method.name=dml+adm", "train.run_name=adm", "train.epochs=2"])
        part = _train(base + ["method.name=dml+adm", "train.run_name=part", "train.epochs=2", "train.max_steps=7"])
        shutil.copy(part / "checkpoint.pt", adm / epoch_checkpoint_name(1))
        shutil.copy(adm / "checkpoint.pt", adm / epoch_checkpoint_name(2))
        dml = _train(base + ["method.name=dml", "train.run_name=dml", "train.epochs=1"])
        yield {"adm": adm, "dml": dml, "root": root}
