"""The loaders (FFCV-backed and device-resident) on a tiny embedded .beton: augmentations, order,
determinism, resolution schedule, validation crop, bad input. Sharding across real ranks is in
test_loaders_distributed.py."""
import numpy as np
import pytest
import torch

pytest.importorskip("ffcv", reason="FFCV is installed by `make test`; install the [ffcv] extra")

from kdengine.data import (  # noqa: E402
    IMAGENET_MEAN,
    IMAGENET_STD,
    DeviceLoader,
    EmbeddedSpec,
    FFCVLoader,
    LoaderConfig,
    beton_info,
    generate,
    make_loader,
    write_embedded,
)
from kdengine.data import loaders as loaders_module  # noqa: E402
from kdengine.data.loaders import auto_resident, resident_bytes  # noqa: E402

SPEC = EmbeddedSpec(train_per_class=5, val_per_class=1, seed=5)  # 50 training images, 32 px
N = 50
ALL = ("image", "label", "mask", "index")
# numba's dispatcher finaliser raises a harmless KeyError when FFCV's recompiled pipelines are
# collected; pytest would report it as a warning against whichever test happens to run then
pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
MEAN = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
STD = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)


@pytest.fixture(scope="module")
def data():
    return generate(SPEC, "train")


@pytest.fixture(scope="module")
def beton(tmp_path_factory):
    return write_embedded(SPEC, "train", tmp_path_factory.mktemp("loaders") / "train.beton", num_workers=1)


def load(path, **kw):
    kw.setdefault("num_workers", 1)
    kw.setdefault("batch_size", 16)
    return make_loader(path, **kw)


def pixels(images):
    """Normalised float images back to 0..255 NHWC (float)."""
    return (images.float() * STD + MEAN).permute(0, 2, 3, 1)


def epoch(loader, e=0, start=0):
    loader.set_epoch(e, start)
    return list(loader)


def cat(batches, i):
    return torch.cat([b[i] for b in batches])


# ---------------------------------------------------------------------------------- shapes


@pytest.mark.parametrize("pipeline", ["cifar_train", "cifar_val", "imagenet_train", "imagenet_val"])
@pytest.mark.parametrize("resident", [False, True], ids=["ffcv", "device"])
def test_shapes_dtypes_ranges(beton, pipeline, resident):
    fields = ALL if resident or pipeline.endswith("val") else ("image", "label", "index")
    loader = load(beton, pipeline=pipeline, device_resident=resident, fields=fields, resolution=40)
    assert isinstance(loader, DeviceLoader if resident else FFCVLoader)
    side = 40 if pipeline.startswith("imagenet") else 32
    train = pipeline.endswith("train")
    assert len(loader) == (N // 16 if train else -(-N // 16)) and loader.dataset_size == N
    assert loader.num_samples == (48 if train else 50) and loader.batch_size == 16
    batches = epoch(loader)
    assert len(batches) == len(loader)
    lo, hi = ((0 - MEAN) / STD).min().item(), ((255 - MEAN) / STD).max().item()
    for batch in batches:
        got = dict(zip(fields, batch))
        b = len(got["label"])
        assert got["image"].shape == (b, 3, side, side) and got["image"].dtype == torch.float32
        assert lo - 1e-4 <= got["image"].min() and got["image"].max() <= hi + 1e-4
        assert got["label"].dtype == torch.int64 and got["label"].shape == (b,)
        assert 0 <= got["label"].min() and got["label"].max() < 10
        assert got["index"].dtype == torch.int64
        if "mask" in got:
            assert got["mask"].shape == (b, side, side) and got["mask"].dtype == torch.uint8
            assert set(got["mask"].unique().tolist()) <= {0, 1}
    index = cat(batches, fields.index("index"))
    assert len(set(index.tolist())) == len(index)  # no sample twice in an epoch


@pytest.mark.parametrize("resident", [False, True], ids=["ffcv", "device"])
def test_val_is_exact_and_in_order_with_fresh_tensors(beton, data, resident):
    images, labels, masks = data
    loader = load(beton, pipeline="cifar_val", device_resident=resident, fields=ALL, batch_size=7)
    batches = epoch(loader)  # all kept: a reused buffer would show as wrong early batches
    np.testing.assert_array_equal(cat(batches, 3).numpy(), np.arange(N))
    np.testing.assert_array_equal(cat(batches, 1).numpy(), labels)
    np.testing.assert_array_equal(cat(batches, 2).numpy(), masks)
    np.testing.assert_allclose(pixels(cat(batches, 0)).numpy(), images, atol=1e-3)


def test_channels_last_and_dtype(beton):
    loader = load(beton, pipeline="cifar_val", device_resident=True, channels_last=True, dtype=torch.bfloat16)
    x, _ = next(iter(loader))
    assert x.dtype == torch.bfloat16 and x.is_contiguous(memory_format=torch.channels_last)
    loader = load(beton, pipeline="cifar_val", device_resident=True)  # CPU default: contiguous NCHW
    assert next(iter(loader))[0].is_contiguous()


# ---------------------------------------------------------------------------------- augmentation


def _binary_images(n=24, size=12, seed=0):
    """Images whose red channel is 0 or 255 with the mask = (red == 255): any crop or flip that
    moves mask and image alike keeps them in agreement."""
    rng = np.random.default_rng(seed)
    masks = (rng.random((n, size, size)) < 0.4).astype(np.uint8)
    images = rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8)
    images[..., 0] = masks * 255
    return images, masks


def _view(padded, dy, dx, flip, size=12):
    crop = padded[dy:dy + size, dx:dx + size]
    return crop[:, ::-1] if flip else crop


@pytest.mark.parametrize("padding_mode", ["fill", "reflect"])
def test_translate_flip_is_a_shift_of_the_source_and_masks_follow(padding_mode):
    images, masks = _binary_images()
    loader = DeviceLoader.from_arrays(images, np.arange(24), masks, pipeline="cifar_train", batch_size=8,
                                      fields=ALL, crop_padding=3, padding_mode=padding_mode)
    p = 3
    pad = "constant" if padding_mode == "fill" else "reflect"
    flips = shifts = 0
    for x, _, m, idx in epoch(loader, 2):
        px = pixels(x).round().to(torch.uint8).numpy()
        for out, mask, i in zip(px, m.numpy(), idx.tolist()):
            src = np.pad(images[i], ((p, p), (p, p), (0, 0)), mode=pad)
            if padding_mode == "fill":  # the border is the mean colour
                border = np.ones((12 + 2 * p, 12 + 2 * p), bool)
                border[p:-p, p:-p] = False
                src[border] = np.round(IMAGENET_MEAN).astype(np.uint8)
            src_m = np.pad(masks[i], p, mode=pad)
            found = [(dy, dx, f) for dy in range(2 * p + 1) for dx in range(2 * p + 1) for f in (0, 1)
                     if np.array_equal(out, _view(src, dy, dx, f))]
            assert found, f"sample {i} is no shift/flip of its source"
            dy, dx, f = found[0]
            np.testing.assert_array_equal(mask, _view(src_m, dy, dx, f))
            flips += f
            shifts += (dy, dx) != (p, p)
    assert 0 < flips < 24 and shifts > 12  # both augmentations happen, not always


def test_random_resized_crop_masks_follow_images():
    images, masks = _binary_images(n=16, size=24)
    loader = DeviceLoader.from_arrays(images, np.zeros(16, np.int64), masks, pipeline="imagenet_train", batch_size=16,
                                      fields=("image", "mask"), resolution=20)
    x, m = next(iter(loader))
    red = pixels(x)[..., 0]
    assert x.shape == (16, 3, 20, 20)
    # nearest (mask) and bilinear (image) sampling agree away from edges
    agree = ((red > 127) == m.bool()).float().mean()
    assert agree > 0.85
    assert not torch.equal(m, torch.from_numpy(masks[:, 2:22, 2:22]))  # really cropped / resized


@pytest.mark.parametrize("resident", [False, True], ids=["ffcv", "device"])
def test_validation_centre_crop(beton, data, resident):
    images, _, masks = data
    # 32 px: the crop is int(224/256 * 32) = 28 px from (2, 2); at resolution 28 nothing is resampled
    loader = load(beton, pipeline="imagenet_val", device_resident=resident, fields=("image", "mask", "index"),
                  resolution=28)
    batches = epoch(loader)
    np.testing.assert_array_equal(cat(batches, 2).numpy(), np.arange(N))
    np.testing.assert_allclose(pixels(cat(batches, 0)).numpy(), images[:, 2:30, 2:30], atol=1e-3)
    np.testing.assert_array_equal(cat(batches, 1).numpy(), masks[:, 2:30, 2:30])


# ---------------------------------------------------------------------------------- order, determinism


def test_device_loader_is_a_function_of_seed_epoch_batch(data):
    images, labels, masks = data
    def make(seed=0):
        return DeviceLoader.from_arrays(images, labels, masks, batch_size=8, fields=ALL, seed=seed)

    a, b = make(), make()
    full = epoch(a, 3)
    again = epoch(b, 3)
    for x, y in zip(full, again):
        assert all(torch.equal(u, v) for u, v in zip(x, y))
    resumed = epoch(b, 3, start=2)  # a run resumed at batch 2 of epoch 3
    assert len(resumed) == len(full) - 2
    for x, y in zip(full[2:], resumed):
        assert all(torch.equal(u, v) for u, v in zip(x, y))
    other_epoch, other_seed = epoch(a, 4), epoch(make(seed=1), 3)
    assert not torch.equal(full[0][3], other_epoch[0][3]) and not torch.equal(full[0][3], other_seed[0][3])
    # without set_epoch, iterations run the next epochs
    c = make()
    c.set_epoch(3)
    list(c)
    assert c.epoch == 4 and torch.equal(next(iter(c))[3], other_epoch[0][3])


def test_orders(beton):
    seq = load(beton, pipeline="cifar_train", order="sequential", device_resident=True, fields=("index",))
    np.testing.assert_array_equal(cat(epoch(seq, 5), 0).numpy(), np.arange(48))
    ffcv = load(beton, pipeline="cifar_train", fields=("index",), device_resident=False, seed=7)
    dev = load(beton, pipeline="cifar_train", fields=("index",), device_resident=True, seed=7)
    e0, e1 = cat(epoch(ffcv, 0), 0), cat(epoch(ffcv, 1), 0)
    assert not torch.equal(e0, e1) and not torch.equal(e0, torch.arange(48))
    assert torch.equal(cat(epoch(dev, 1), 0), e1)  # one order rule for both loaders
    assert torch.equal(cat(epoch(ffcv, 1, start=1), 0), e1[16:])  # FFCV skips batches too
    assert torch.equal(cat(epoch(ffcv, 1), 0), e1)


def test_quasi_random_order_is_a_repeatable_permutation(beton):
    loader = load(beton, pipeline="cifar_val", order="quasi_random", fields=("index",), device_resident=False,
                  os_cache=False)
    e2 = cat(epoch(loader, 2), 0)
    assert sorted(e2.tolist()) == list(range(N))
    assert not torch.equal(cat(epoch(loader, 0), 0), e2)
    assert torch.equal(cat(epoch(loader, 2), 0), e2)  # the same epoch again: the same order


def test_in_process_shards_are_disjoint_and_cover(data):
    images, labels, _ = data
    for n, drop_last in ((50, False), (47, False), (47, True)):
        got = []
        for rank in range(3):
            loader = DeviceLoader.from_arrays(images[:n], labels[:n], batch_size=4, fields=("index",),
                                              distributed=True, rank=rank, world_size=3, drop_last=drop_last)
            got.append(cat(epoch(loader, 1), 0).tolist())
        flat = sum(got, [])
        assert len(flat) == len(set(flat))
        if drop_last:
            assert len({len(g) for g in got}) == 1  # equal batch counts on every rank
        else:
            assert sorted(flat) == list(range(n))


# ---------------------------------------------------------------------------------- resolution


@pytest.mark.parametrize("resident", [False, True], ids=["ffcv", "device"])
def test_resolution_schedule(beton, resident):
    loader = load(beton, pipeline="imagenet_train", device_resident=resident, resolution=lambda e: 24 + 8 * e)
    for e in (0, 1, 1):  # FFCV regenerates its pipeline once, when the size changes
        x, _ = epoch(loader, e)[0]
        assert x.shape[2:] == (24 + 8 * e, 24 + 8 * e) and loader.resolution(e) == 24 + 8 * e
    bad = load(beton, pipeline="imagenet_train", device_resident=True, resolution=lambda e: 0 if e == 3 else 16)
    with pytest.raises(ValueError, match=r"resolution\(3\) must be a positive int, got 0"):
        bad.set_epoch(3)


# ---------------------------------------------------------------------------------- auto, errors


def test_auto_residency(beton, monkeypatch):
    assert isinstance(load(beton, pipeline="cifar_train"), DeviceLoader)
    info = beton_info(beton)
    config = lambda pipeline, fields=("image", "label"): LoaderConfig(pipeline, 16, fields=fields)  # noqa: E731
    assert resident_bytes(info) == N * (32 * 32 * 4 + 16)
    assert resident_bytes(info, ALL) == N * (32 * 32 * 5 + 16)
    assert auto_resident(info, config("cifar_val")) and not auto_resident(info, config("imagenet_train"))
    monkeypatch.setattr(loaders_module, "CPU_RESIDENT_BUDGET", resident_bytes(info))  # just fits
    assert auto_resident(info, config("cifar_train")) and not auto_resident(info, config("cifar_train", ALL))


def test_bad_input_names_argument_and_value(beton, tmp_path, data):
    with pytest.raises(ValueError, match=r"pipeline must be one of .* got 'cifar'"):
        load(beton, pipeline="cifar")
    with pytest.raises(FileNotFoundError, match=r"path: no \.beton file at .*nowhere\.beton"):
        load(tmp_path / "nowhere.beton", pipeline="cifar_val")
    (tmp_path / "junk.beton").write_bytes(b"not a beton at all" * 10)
    with pytest.raises(ValueError, match=r"junk\.beton' is not a readable FFCV \.beton"):
        load(tmp_path / "junk.beton", pipeline="cifar_val")
    with pytest.raises(ValueError, match=r"order must be one of .* got 'shuffled'"):
        load(beton, pipeline="cifar_val", order="shuffled")
    with pytest.raises(ValueError, match=r"fields must be distinct names .* got \('image', 'labels'\)"):
        load(beton, pipeline="cifar_val", fields=("image", "labels"))
    with pytest.raises(ValueError, match=r"mean must be 3 numbers .* got 2"):
        load(beton, pipeline="cifar_val", mean=(1, 2))
    with pytest.raises(ValueError, match="batch_size must be a positive int, got 0"):
        load(beton, pipeline="cifar_val", batch_size=0)
    with pytest.raises(ValueError, match="dtype must be a floating"):
        load(beton, pipeline="cifar_val", dtype=torch.int32)
    with pytest.raises(ValueError, match="device_resident must be True, False or 'auto', got 'yes'"):
        load(beton, pipeline="cifar_val", device_resident="yes")
    with pytest.raises(ValueError, match="per-epoch schedule .* only for 'imagenet_train'"):
        load(beton, pipeline="imagenet_val", resolution=lambda e: 32)
    with pytest.raises(ValueError, match="gives no batches: this rank has 50 samples"):
        load(beton, pipeline="cifar_train", batch_size=64, device_resident=True)
    with pytest.raises(RuntimeError, match="initialised torch.distributed"):
        load(beton, pipeline="cifar_train", distributed=True)
    with pytest.raises(ValueError, match=r"start_batch must be an int in \[0, 3\]"):
        load(beton, pipeline="cifar_train", device_resident=True).set_epoch(0, 4)
    with pytest.raises(ValueError, match="'mask' with pipeline 'cifar_train' is not supported by the FFCV loader"
                                         ".*device_resident=True"):
        load(beton, pipeline="cifar_train", device_resident=False, fields=ALL)
    with pytest.raises(ValueError, match="padding_mode='reflect' is only available on the device-resident"):
        load(beton, pipeline="cifar_train", device_resident=False, padding_mode="reflect")


def test_a_field_the_file_lacks(tmp_path):
    from ffcv.fields import IntField, RGBImageField
    from ffcv.writer import DatasetWriter

    old = tmp_path / "old.beton"  # the layout before the index field (and without masks)
    images = np.zeros((4, 8, 8, 3), np.uint8)
    DatasetWriter(str(old), {"image": RGBImageField(write_mode="raw"), "label": IntField()},
                  num_workers=1).from_indexed_dataset([(im, 0) for im in images])
    with pytest.raises(ValueError, match=r"has no field 'index'; its fields are \['image', 'label'\].*rewrite"):
        load(old, pipeline="cifar_val", fields=("image", "index"), batch_size=2)
    with pytest.raises(ValueError, match=r"has no field 'mask'"):
        load(old, pipeline="cifar_val", fields=("image", "mask"), batch_size=2)


def test_from_arrays_checks_shapes():
    images = np.zeros((4, 8, 8, 3), np.uint8)
    with pytest.raises(ValueError, match=r"images must be uint8 \[N, H, W, 3\] .*float32 \(4, 8, 8, 3\)"):
        DeviceLoader.from_arrays(images.astype(np.float32), np.zeros(4), batch_size=2)
    with pytest.raises(ValueError, match=r"labels must be integers \[N=4\], got torch.int64 \(3,\)"):
        DeviceLoader.from_arrays(images, np.zeros(3, np.int64), batch_size=2)
    with pytest.raises(ValueError, match=r"masks must be .* \[4, 8, 8\] like the images, got torch.uint8 \(4, 8, 9\)"):
        DeviceLoader.from_arrays(images, np.zeros(4, np.int64), np.zeros((4, 8, 9), np.uint8), batch_size=2)
    with pytest.raises(ValueError, match="'mask' is asked for but masks=None"):
        DeviceLoader.from_arrays(images, np.zeros(4, np.int64), batch_size=2, fields=("image", "mask"))
    with pytest.raises(ValueError, match="crop_padding=8 must be smaller than the images"):
        DeviceLoader.from_arrays(images, np.zeros(4, np.int64), batch_size=2, crop_padding=8,
                                 padding_mode="reflect")


@pytest.mark.cuda
@pytest.mark.parametrize("pipeline", ["cifar_train", "imagenet_train"])
def test_device_loader_on_cuda_gives_the_cpu_batches(data, pipeline):
    """Each batch's draws reach the GPU from pinned memory without a host sync, and are the CPU's."""
    images, labels, masks = data

    def make(device):
        return DeviceLoader.from_arrays(images, labels, masks, pipeline=pipeline, batch_size=8, fields=ALL,
                                        resolution=24, device=device)

    for on_cpu, on_gpu in zip(epoch(make("cpu"), 1), epoch(make("cuda"), 1)):
        image, label, mask, index = (x.cpu() for x in on_gpu)
        assert torch.equal(label, on_cpu[1]) and torch.equal(index, on_cpu[3])
        if pipeline == "cifar_train":  # a gather: exact
            assert torch.equal(image, on_cpu[0]) and torch.equal(mask, on_cpu[2])
        else:  # bilinear resampling: the GPU's arithmetic may differ in the last bits
            torch.testing.assert_close(image, on_cpu[0], atol=1e-3, rtol=0)
            assert (mask != on_cpu[2]).float().mean() < 0.01
