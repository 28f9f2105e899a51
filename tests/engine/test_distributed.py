"""The engine under torch.distributed: two gloo ranks on CPU train one model replica each."""
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from .conftest import TINY


def _rank(rank: int, world: int, init_file: str, out_dir: str, cache: str, overrides=None) -> None:
    os.environ["KDENGINE_CACHE"] = cache
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        from kdengine.engine import Trainer, load_config

        torch.set_num_threads(1)
        cfg = load_config(overrides=(TINY if overrides is None else overrides)
                          + [f"train.output_dir={out_dir}", "train.run_name=ddp", "train.epochs=1"])
        try:
            trainer = Trainer(cfg, progress=False)
        except Exception as exc:  # what a rank's set-up refused, for the test to read
            torch.save({"error": f"{type(exc).__name__}: {exc}"}, os.path.join(out_dir, f"rank{rank}.pt"))
            return
        summary = trainer.fit()
        torch.save({"weights": [m.state_dict() for m in trainer.models],
                    "method": trainer.method.state_dict(),
                    "steps_per_epoch": trainer.steps_per_epoch, "summary": summary},
                   os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_two_gloo_ranks_stay_in_sync(tmp_path):
    cache = str(tmp_path / "cache")
    out_dir = str(tmp_path / "runs")
    os.makedirs(out_dir)
    mp.spawn(_rank, args=(2, str(tmp_path / "init"), out_dir, cache), nprocs=2, join=True)
    r0, r1 = (torch.load(os.path.join(out_dir, f"rank{r}.pt"), weights_only=False) for r in (0, 1))
    for a, b in zip(r0["weights"] + [r0["method"]], r1["weights"] + [r1["method"]]):
        for key in a:
            assert torch.equal(a[key], b[key]), key  # DDP and the method's gradient average agree
    # Each rank trains on half of the 96 samples: 48 / 16 = 3 steps an epoch.
    assert r0["steps_per_epoch"] == r1["steps_per_epoch"] == 3
    assert r0["summary"]["status"] == "completed"
    assert os.path.isfile(os.path.join(out_dir, "ddp", "checkpoint.pt"))
    assert r0["summary"]["last"]["ensemble/top1"] >= 0  # rank 0 logged the (all-reduced) evaluation


@pytest.mark.slow
def test_segmentation_under_two_gloo_ranks(tmp_path):
    """A segmentation run (dense ADM, mIoU all-reduced) stays in sync across ranks; SyncBatchNorm,
    which torch runs on GPUs only, is refused on the CPU with the setting named."""
    from .test_segmentation_engine import SEG_TINY

    cache = str(tmp_path / "cache")
    for name, extra in (("plain", []), ("sync_bn", ["train.sync_bn=true"])):
        out_dir = str(tmp_path / name)
        os.makedirs(out_dir)
        overrides = SEG_TINY + ["method.name=dml+adm", *extra]
        mp.spawn(_rank, args=(2, str(tmp_path / f"init-{name}"), out_dir, cache, overrides), nprocs=2, join=True)
        r0, r1 = (torch.load(os.path.join(out_dir, f"rank{r}.pt"), weights_only=False) for r in (0, 1))
        if name == "sync_bn":
            assert "train.sync_bn=true needs CUDA" in r0["error"] and "train.sync_bn=true needs CUDA" in r1["error"]
            continue
        for a, b in zip(r0["weights"] + [r0["method"]], r1["weights"] + [r1["method"]]):
            for key in a:
                assert torch.equal(a[key], b[key]), key
        assert r0["summary"]["last"]["student/miou"] >= 0  # rank 0 logged the (all-reduced) evaluation
