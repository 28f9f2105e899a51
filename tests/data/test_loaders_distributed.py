"""distributed=True under a real torch.distributed (gloo) group of two spawned ranks: each rank's
shard of an epoch is disjoint from the other's and together they cover the set, for the FFCV and
the device-resident loader alike."""
import json

import pytest
import torch.distributed as dist
import torch.multiprocessing as mp

pytest.importorskip("ffcv", reason="FFCV is installed by `make test`; install the [ffcv] extra")

from kdengine.data import (  # noqa: E402
    EmbeddedSpec,
    epoch_order,  # noqa: E402
    make_loader,
    write_embedded,
)

WORLD = 2


def _rank(rank, path, store, out):
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=WORLD)
    try:
        got = {}
        for name, kw in {"ffcv": dict(pipeline="cifar_val", order="random", device_resident=False),
                         "device": dict(pipeline="cifar_train", device_resident=True)}.items():
            loader = make_loader(path, batch_size=4, num_workers=1, fields=("index", "label"), distributed=True,
                                 **kw)
            loader.set_epoch(1)
            got[name] = {"index": [i for idx, _ in loader for i in idx.tolist()], "len": len(loader),
                         "num_samples": loader.num_samples}
        with open(f"{out}.{rank}", "w") as f:
            json.dump(got, f)
    finally:
        dist.destroy_process_group()


def test_two_ranks_get_disjoint_covering_shards(tmp_path):
    spec = EmbeddedSpec(train_per_class=2, val_per_class=1, seed=2)
    path = write_embedded(spec, "train", tmp_path / "d.beton", num_workers=1)  # 20 samples
    n = spec.count("train")
    out = tmp_path / "shard"
    mp.start_processes(_rank, args=(str(path), str(tmp_path / "store"), str(out)), nprocs=WORLD,
                       start_method="spawn")
    ranks = [json.loads((tmp_path / f"shard.{r}").read_text()) for r in range(WORLD)]
    for name in ("ffcv", "device"):
        a, b = (r[name]["index"] for r in ranks)
        assert not set(a) & set(b), name
        assert ranks[0][name]["len"] == ranks[1][name]["len"] and len(a) == ranks[0][name]["num_samples"]
    # the FFCV val loader yields everything once; the device train loader 10 per rank, of which
    # drop_last keeps two full batches of 4
    assert sorted(ranks[0]["ffcv"]["index"] + ranks[1]["ffcv"]["index"]) == list(range(n))
    a, b = ranks[0]["device"]["index"], ranks[1]["device"]["index"]
    assert len(a) == len(b) == 8 and len(set(a + b)) == 16
    # one order rule for both loaders: the shards of the same epoch permutation
    perm = epoch_order(n, "random", 0, 1)
    for rank, r in enumerate(ranks):
        assert r["ffcv"]["index"] == perm[rank::WORLD].tolist()
        assert r["device"]["index"] == perm[rank::WORLD][:8].tolist()
