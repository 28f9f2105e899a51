"""The segmentation pipelines: seg_train_transform against an independent per-image computation
(F.interpolate, pad, crop, flip), the loaders' determinism, resume and sharding, and the same
batches from in-memory arrays, a .beton held on the device and a .beton streamed by FFCV."""
import importlib.util

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from kdengine.data import KDLoader
from kdengine.data._loading import AUGMENT_STREAM, seed_for
from kdengine.data.segmentation import (
    SEG_PIPELINES,
    SegmentationLoader,
    make_segmentation_loader,
    seg_train_transform,
)

needs_ffcv = pytest.mark.skipif(importlib.util.find_spec("ffcv") is None,
                                reason="FFCV is installed by `make test`; install the [ffcv] extra")
pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")

MEAN = (0.485 * 255, 0.456 * 255, 0.406 * 255)
STD = (0.229 * 255, 0.224 * 255, 0.225 * 255)
FILL = tuple(round(m) for m in MEAN)
N, H, W = 10, 24, 40


def dataset(n=N, h=H, w=W, seed=0):
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, h, w, 3), generator=g, dtype=torch.uint8)
    labels = torch.randint(0, 19, (n, h, w), generator=g, dtype=torch.uint8)
    labels[:, :2] = 255
    return images, labels


def reference(images, labels, u, crop, scale_range, flip, ignore, fill, exact_nearest=True):
    """The transform per image the plain way: resize the whole image (F.interpolate; the labels by
    integer nearest-exact indexing or F.interpolate's), pad bottom / right, crop, flip; ``u`` are
    the [B, 4] draws (scale, top, left, flip)."""
    ch, cw = crop
    lo, hi = scale_range
    out_x, out_y = [], []
    for b in range(len(images)):
        s = lo + (hi - lo) * float(u[b, 0])
        h, w = images.shape[1:3]
        nh, nw = int(h * s + 0.5), int(w * s + 0.5)
        x = F.interpolate(images[b].permute(2, 0, 1)[None].double(), size=(nh, nw), mode="bilinear",
                          align_corners=False)[0]
        if exact_nearest:  # floor((q + 0.5) * in / out) in integers
            rows = torch.clamp((2 * torch.arange(nh) + 1) * h // (2 * nh), max=h - 1)
            cols = torch.clamp((2 * torch.arange(nw) + 1) * w // (2 * nw), max=w - 1)
            y = labels[b][rows[:, None], cols[None, :]].double()
        else:  # the same rule in float32, which misses some exact ties
            y = F.interpolate(labels[b][None, None].double(), size=(nh, nw), mode="nearest-exact")[0, 0]
        ph, pw = max(nh, ch), max(nw, cw)
        canvas_x = torch.tensor(fill, dtype=torch.float64).view(3, 1, 1).repeat(1, ph, pw)
        canvas_y = torch.full((ph, pw), float(ignore), dtype=torch.float64)
        canvas_x[:, :nh, :nw], canvas_y[:nh, :nw] = x, y
        top = int(float(u[b, 1]) * (max(nh - ch, 0) + 1))
        left = int(float(u[b, 2]) * (max(nw - cw, 0) + 1))
        x, y = canvas_x[:, top:top + ch, left:left + cw], canvas_y[top:top + ch, left:left + cw]
        if flip and float(u[b, 3]) < 0.5:
            x, y = x.flip(-1), y.flip(-1)
        out_x.append(x.permute(1, 2, 0))
        out_y.append(y)
    return torch.stack(out_x), torch.stack(out_y).long()


def draws(seed, b):
    return torch.rand((b, 4), generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


# ---------------------------------------------------------------------------------- the transform


def test_identity_at_scale_one_full_crop_no_flip():
    images, labels = dataset()
    x, y = seg_train_transform(images, labels, torch.Generator().manual_seed(3), crop_size=(H, W),
                               scale_range=(1.0, 1.0), flip=False)
    assert x.dtype == torch.uint8 and y.dtype == torch.int64
    assert torch.equal(x, images) and torch.equal(y, labels.long())


@pytest.mark.parametrize("crop,scale_range", [((16, 24), (0.5, 2.0)), ((40, 64), (0.5, 1.5)), ((20, 20), (1.3, 1.7)),
                                              ((24, 40), (0.5, 0.5)), ((24, 40), (2.0, 2.0))])
def test_matches_resize_pad_crop_flip(crop, scale_range):
    images, labels = dataset()
    x, y = seg_train_transform(images, labels, torch.Generator().manual_seed(11), crop_size=crop,
                               scale_range=scale_range, ignore_index=250, fill=FILL)
    want_x, want_y = reference(images, labels, draws(11, N), crop, scale_range, True, 250, FILL)
    assert x.shape == (N, *crop, 3) and y.shape == (N, *crop)
    assert torch.equal(y, want_y)
    # F.interpolate's float32 "nearest-exact" rounds some exact ties down: a few rows / columns
    _, interp_y = reference(images, labels, draws(11, N), crop, scale_range, True, 250, FILL, exact_nearest=False)
    assert (y != interp_y).float().mean() < 0.05
    diff = (x.double() - want_x.round()).abs()
    assert diff.max() <= 1 and (diff > 0).float().mean() < 0.01  # float32 vs float64 near .5 only


def test_flip_moves_image_and_label_together():
    images, labels = dataset()
    x, y = seg_train_transform(images, labels, torch.Generator().manual_seed(5), crop_size=(H, W),
                               scale_range=(1.0, 1.0), flip=True)
    flipped = draws(5, N)[:, 3] < 0.5
    assert 0 < flipped.sum() < N
    for b in range(N):
        dims = [1] if flipped[b] else []
        assert torch.equal(x[b], images[b].flip(dims) if dims else images[b])
        assert torch.equal(y[b], labels[b].long().flip(dims) if dims else labels[b].long())


def test_padding_is_ignore_and_fill():
    images, labels = dataset()
    x, y = seg_train_transform(images, labels, torch.Generator().manual_seed(2), crop_size=(H, W),
                               scale_range=(0.5, 0.5), flip=False, ignore_index=255, fill=(1, 2, 3))
    h, w = H // 2, W // 2
    pad = torch.ones(H, W, dtype=torch.bool)
    pad[:h, :w] = False
    assert (y[:, pad] == 255).all() and (x[:, pad] == torch.tensor([1, 2, 3], dtype=torch.uint8)).all()
    # the scaled image sits top-left: every second pixel of the input (nearest-exact at 1/2)
    assert torch.equal(y[:, :h, :w], labels[:, 1::2, 1::2].long())


def test_labels_only_take_input_values():
    images, _ = dataset()
    values = torch.tensor([3, 7, 200], dtype=torch.uint8)
    labels = values[torch.randint(0, 3, (N, H, W), generator=torch.Generator().manual_seed(1))]
    for seed in range(4):
        _, y = seg_train_transform(images, labels.long(), torch.Generator().manual_seed(seed), crop_size=(30, 50),
                                   scale_range=(0.3, 2.5))
        assert set(y.unique().tolist()) <= {3, 7, 200, 255}


def test_transform_is_a_function_of_the_generator():
    images, labels = dataset()

    def run(seed):
        return seg_train_transform(images, labels, torch.Generator().manual_seed(seed), crop_size=(16, 16))

    a, b, c = run(4), run(4), run(5)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])


def test_transform_bad_input():
    images, labels = dataset(n=2)
    g = torch.Generator()
    with pytest.raises(ValueError, match="images must be a uint8"):
        seg_train_transform(images.float(), labels, g, crop_size=8)
    with pytest.raises(ValueError, match=r"labels must be an integer tensor \[B, H, W\] = \[2, 24, 40\]"):
        seg_train_transform(images, labels[:, :3], g, crop_size=8)
    with pytest.raises(ValueError, match="crop_size"):
        seg_train_transform(images, labels, g, crop_size=(0, 8))
    with pytest.raises(ValueError, match="scale_range"):
        seg_train_transform(images, labels, g, crop_size=8, scale_range=(2.0, 1.0))
    with pytest.raises(ValueError, match="fill"):
        seg_train_transform(images, labels, g, crop_size=8, fill=(1, 2))


# ---------------------------------------------------------------------------------- loaders from arrays


def load(source, **kw):
    kw.setdefault("batch_size", 4)
    kw.setdefault("num_workers", 1)
    kw.setdefault("crop_size", (16, 24))
    return make_segmentation_loader(source, **kw)


def run_epoch(loader, e=0, start=0):
    loader.set_epoch(e, start)
    return list(loader)


def same(a, b):
    return len(a) == len(b) and all(torch.equal(x, y) for p, q in zip(a, b) for x, y in zip(p, q))


def test_train_batches_follow_the_transform():
    images, labels = dataset()
    loader = load((images.numpy(), labels.numpy()), pipeline="seg_train", seed=7)
    assert isinstance(loader, KDLoader) and isinstance(loader, SegmentationLoader)
    assert (len(loader), loader.num_samples, loader.dataset_size, loader.resolution(0)) == (2, 8, N, 16)
    batches = run_epoch(loader, 1)
    for b, (x, y, idx) in enumerate(batches):
        assert x.shape == (4, 3, 16, 24) and x.dtype == torch.float32 and idx.dtype == torch.int64
        g = torch.Generator().manual_seed(seed_for(7, AUGMENT_STREAM, 1, 0, 1, b))
        want_x, want_y = seg_train_transform(images[idx], labels[idx], g, crop_size=(16, 24), fill=MEAN)
        assert torch.equal(y, want_y)
        want = (want_x.permute(0, 3, 1, 2).float() - torch.tensor(MEAN).view(1, 3, 1, 1)) / \
            torch.tensor(STD).view(1, 3, 1, 1)
        torch.testing.assert_close(x, want, rtol=0, atol=1e-5)
    assert len(set(torch.cat([b[2] for b in batches]).tolist())) == 8  # drop_last: 2 full batches


def test_determinism_and_exact_resume():
    images, labels = dataset()
    a = load((images, labels), pipeline="seg_train", seed=3, batch_size=3)
    b = load((images, labels), pipeline="seg_train", seed=3, batch_size=3)
    e2 = run_epoch(a, 2)
    assert same(e2, run_epoch(b, 2))
    assert same(run_epoch(b, 2, start=1), e2[1:])  # resumed mid-epoch: the rest of the same epoch
    assert not same(run_epoch(b, 3), e2)  # another epoch: another order and other crops
    c = load((images, labels), pipeline="seg_train", seed=4, batch_size=3)
    assert not same(run_epoch(c, 2), e2)
    # without set_epoch, each iteration is the next epoch
    fresh = load((images, labels), pipeline="seg_train", seed=3, batch_size=3)
    list(fresh), list(fresh)
    assert same(list(fresh), e2)


@pytest.mark.parametrize("pipeline", SEG_PIPELINES)
def test_sharding_covers_the_set_disjointly(pipeline):
    images, _ = dataset(n=11)
    labels = torch.arange(11, dtype=torch.uint8).view(11, 1, 1).expand(11, H, W).contiguous()  # label = index
    kw = dict(pipeline=pipeline, batch_size=2, seed=1, crop_size=(H, W), scale_range=(1.0, 1.0))

    def seen(loader, e):
        loader.set_epoch(e)
        return [int(b[1][i].max()) for b in loader for i in range(len(b[1]))]  # padding-free: label = index

    for e in (0, 1):
        single = seen(load((images, labels), **kw), e)
        shards = [seen(load((images, labels), distributed=True, rank=r, world_size=2, **kw), e) for r in (0, 1)]
        assert not set(shards[0]) & set(shards[1])
        if pipeline == "seg_val":  # all 11, in order, split 6 / 5
            assert single == list(range(11)) and sorted(shards[0] + shards[1]) == single
            assert (len(shards[0]), len(shards[1])) == (6, 5)
        else:  # drop_last: 10 of the epoch's permutation, whole batches of 2 per rank
            assert len(single) == 10 and len(set(single)) == 10
            assert len(shards[0]) == len(shards[1]) == 4
            full = seen(load((images, labels), **{**kw, "batch_size": 1}), e)
            assert set(shards[0]) | set(shards[1]) <= set(full[:10])


def test_val_loader_whole_images_in_order():
    images, labels = dataset()
    loader = load((images, labels), pipeline="seg_val", batch_size=4, channels_last=True, dtype=torch.bfloat16)
    assert loader.resolution() == H and len(loader) == 3 and loader.num_samples == N
    batches = list(loader)
    assert [len(b) for b in batches] == [2, 2, 2] and [b[0].shape[0] for b in batches] == [4, 4, 2]
    x = torch.cat([b[0] for b in batches])
    assert x.dtype == torch.bfloat16 and x.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(torch.cat([b[1] for b in batches]), labels.long())
    mean, std = torch.tensor(MEAN).view(1, 3, 1, 1), torch.tensor(STD).view(1, 3, 1, 1)
    want = (images.permute(0, 3, 1, 2).float() - mean) / std
    torch.testing.assert_close(x.float(), want, rtol=0, atol=3e-2)  # bf16: 8 bits of mantissa


def test_host_arrays_and_device_arrays_agree():
    images, labels = dataset()
    a = run_epoch(load((images, labels), pipeline="seg_train", device_resident=True), 1)
    b = run_epoch(load((images, labels), pipeline="seg_train", device_resident=False), 1)
    assert same(a, b)


def test_bad_options_fail_at_construction():
    images, labels = dataset(n=4)
    src = (images, labels)
    cases = [
        (dict(pipeline="seg_test"), "pipeline must be one of"),
        (dict(pipeline="seg_train", batch_size=0), "batch_size"),
        (dict(pipeline="seg_train", crop_size=(16, -1)), "crop_size"),
        (dict(pipeline="seg_train", scale_range=(0, 1)), "scale_range"),
        (dict(pipeline="seg_train", ignore_index=-1), "ignore_index"),
        (dict(pipeline="seg_train", order="quasi_random"), "order must be one of"),
        (dict(pipeline="seg_train", device_resident="yes"), "device_resident"),
        (dict(pipeline="seg_train", flip=1), "flip"),
        (dict(pipeline="seg_train", mean=(1, 2)), "mean"),
        (dict(pipeline="seg_train", rank=0, world_size=2), "distributed=True"),
        (dict(pipeline="seg_train", batch_size=5), "gives no batches"),
    ]
    for kw, message in cases:
        with pytest.raises(ValueError, match=message):
            load(src, **kw)
    with pytest.raises(ValueError, match=r"source\[1\] \(labels\) must be integers \[N, H, W\]"):
        load((images, labels[:, :3]), pipeline="seg_val")
    with pytest.raises(ValueError, match=r"must lie in \[0, 255\]"):
        load((images, labels.long() - 1), pipeline="seg_val")
    with pytest.raises(ValueError, match=r"source\[0\] \(images\) must be uint8"):
        load((images.float(), labels), pipeline="seg_val")
    with pytest.raises(ValueError, match="pair"):
        load((images, labels, labels), pipeline="seg_val")
    with pytest.raises(ValueError, match="start_batch"):
        load(src, pipeline="seg_val").set_epoch(0, 5)


# ---------------------------------------------------------------------------------- .beton sources


@pytest.fixture(scope="module")
def beton(tmp_path_factory):
    pytest.importorskip("ffcv", reason="FFCV is installed by `make test`; install the [ffcv] extra")
    from ffcv.fields import IntField, NDArrayField, RGBImageField
    from ffcv.writer import DatasetWriter

    images, labels = dataset()

    class Samples:
        def __len__(self):
            return N

        def __getitem__(self, i):
            return images[i].numpy(), labels[i].numpy(), i

    path = tmp_path_factory.mktemp("seg") / "set.beton"
    fields = {"image": RGBImageField(write_mode="raw"), "label": NDArrayField(dtype=np.dtype("uint8"), shape=(H, W)),
              "index": IntField()}
    DatasetWriter(str(path), fields, num_workers=1).from_indexed_dataset(Samples())
    return path


@needs_ffcv
@pytest.mark.parametrize("pipeline", SEG_PIPELINES)
def test_arrays_resident_and_streamed_beton_give_the_same_batches(beton, pipeline):
    images, labels = dataset()
    kw = dict(pipeline=pipeline, seed=9, batch_size=3)
    arrays = load((images, labels), **kw)
    resident = load(str(beton), device_resident=True, **kw)
    streamed = load(str(beton), device_resident=False, **kw)
    assert resident.resident and not streamed.resident
    for e, start in ((0, 0), (1, 0), (1, 2)):
        want = run_epoch(arrays, e, start)
        assert same(run_epoch(resident, e, start), want)
        assert same(run_epoch(streamed, e, start), want)
    if pipeline == "seg_train":
        auto = load(str(beton), **kw)  # a tiny set: held on the device
        assert auto.resident and same(run_epoch(auto, 1), run_epoch(arrays, 1))


@needs_ffcv
def test_beton_without_segmentation_fields(tmp_path):
    from kdengine.data import EmbeddedSpec, write_embedded

    path = write_embedded(EmbeddedSpec(train_per_class=1, val_per_class=1), "val", tmp_path / "e.beton",
                          num_workers=1)
    with pytest.raises(ValueError, match="'label' field .* must be an NDArrayField uint8"):
        load(str(path), pipeline="seg_val")
    with pytest.raises(FileNotFoundError, match="no .beton file"):
        load(str(tmp_path / "missing.beton"), pipeline="seg_val")
