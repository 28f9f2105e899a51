"""The loader options the PAT / OFA recipes need: the validation crop ratio (``val_crop_pct``),
the training crop's interpolation (``interpolation``) and RandAugment / random erasing on the
FFCV loader; and that with these options at their defaults the batches are those of before.

``recipe_loaders_reference.npz`` holds the batches :func:`reference_batches` gave before the
options existed (written once with the loaders of that time; its ``platform`` entry says where).
"""
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("ffcv", reason="FFCV is installed by `make test`; install the [ffcv] extra")
from PIL import Image  # noqa: E402

from kdengine.data import (  # noqa: E402
    DeviceLoader,
    EmbeddedSpec,
    LoaderConfig,
    generate,
    make_loader,
    write_embedded,
    write_image_folder,
)
from kdengine.data._loading import Normalizer, batch_generator  # noqa: E402
from kdengine.data.augment import BatchAugment  # noqa: E402

# numba's dispatcher finaliser raises a harmless KeyError when FFCV's pipelines are collected
pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
REFERENCE = Path(__file__).with_name("recipe_loaders_reference.npz")
RA = "rand-m9-mstd0.5-inc1"
RAW = dict(mean=(0, 0, 0), std=(1, 1, 1))  # "normalised" images are the 0..255 values themselves


def platform() -> str:
    return f"{torch.__version__}|{torch.backends.cpu.get_cpu_capability()}"


def noise_set(n=8, h=20, w=20, seed=0):
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (n, h, w, 3), dtype=np.uint8)
    masks = (rng.random((n, h, w)) < 0.5).astype(np.uint8)
    return images, np.arange(n, dtype=np.int64), masks


def image_tree(root, sizes=((20, 16), (24, 30), (17, 17), (13, 26), (31, 22), (16, 16)), seed=1):
    """PNGs of random pixels in two class folders (c0 / c1, alternating); returns the pixels."""
    rng = np.random.default_rng(seed)
    pixels = []
    for k, (h, w) in enumerate(sizes):
        (root / f"c{k % 2}").mkdir(parents=True, exist_ok=True)
        px = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        Image.fromarray(px).save(root / f"c{k % 2}" / f"{k}.png")
        pixels.append(px)
    return pixels


def write_tree(root, pixels, path):
    """A raw .beton of ``pixels`` (uint8 HxWx3 each) in this order (index k = pixels[k])."""
    for k, px in enumerate(pixels):
        (root / f"c{int(k >= len(pixels) // 2)}").mkdir(parents=True, exist_ok=True)
        Image.fromarray(px).save(root / f"c{int(k >= len(pixels) // 2)}" / f"{k:03d}.png")
    return write_image_folder(root, path, write_mode="raw", num_workers=1)[0]


DEVICE_CASES = {
    "dev_imagenet_train": dict(pipeline="imagenet_train", resolution=12, fields=("image", "mask", "index")),
    "dev_imagenet_train_ra": dict(pipeline="imagenet_train", resolution=12, randaugment=RA, random_erasing=0.5),
    "dev_imagenet_val": dict(pipeline="imagenet_val", resolution=12, fields=("image", "mask", "index")),
    "dev_imagenet_val_nores": dict(pipeline="imagenet_val", resolution=17),
    "dev_cifar_train_ra": dict(pipeline="cifar_train", crop_padding=2, randaugment=RA, random_erasing=0.5),
}


def reference_batches(tmp_path, explicit: bool = False) -> dict:
    """Device-loader batches of :data:`DEVICE_CASES` and FFCV ``imagenet_val`` batches of
    :func:`image_tree`, keyed ``case/batch/field``. ``explicit``: pass the new options' defaults
    (``val_crop_pct=0.875``, ``interpolation="bilinear"``) rather than leaving them out."""
    images, labels, masks = noise_set()
    out = {}
    for name, kw in DEVICE_CASES.items():
        kw = dict(kw)
        fields = kw.pop("fields", ("image", "label"))
        if explicit and kw["pipeline"] == "imagenet_val":
            kw["val_crop_pct"] = 0.875
        if explicit and kw["pipeline"] == "imagenet_train":
            kw["interpolation"] = "bilinear"
        loader = DeviceLoader.from_arrays(images, labels, masks, batch_size=4, seed=3, fields=fields, **kw)
        loader.set_epoch(1)
        for b, batch in enumerate(loader):
            for f, x in zip(fields, batch):
                out[f"{name}/{b}/{f}"] = x.numpy()
    root = tmp_path / "tree"
    image_tree(root)
    path, _ = write_image_folder(root, tmp_path / "tree.beton", write_mode="raw", num_workers=1)
    loader = make_loader(path, pipeline="imagenet_val", batch_size=4, resolution=12, num_workers=1,
                         device_resident=False, fields=("image", "index"),
                         **({"val_crop_pct": 0.875} if explicit else {}))
    loader.set_epoch(0)
    for b, batch in enumerate(loader):
        for f, x in zip(("image", "index"), batch):
            out[f"ffcv_imagenet_val/{b}/{f}"] = x.numpy()
    return out


# ---------------------------------------------------------------------------------- defaults


def test_defaults_give_the_batches_of_before(tmp_path):
    ref = np.load(REFERENCE)
    got = reference_batches(tmp_path / "a")
    assert sorted(got) == sorted(k for k in ref.files if k != "platform")
    same_platform = str(ref["platform"]) == platform()
    for key, value in got.items():
        if same_platform or value.dtype.kind != "f":
            np.testing.assert_array_equal(value, ref[key], err_msg=key)  # bit-identical
        else:  # another CPU / torch: resampling may round differently in the last bits
            np.testing.assert_allclose(value, ref[key], atol=1e-4, rtol=0, err_msg=key)
    explicit = reference_batches(tmp_path / "b", explicit=True)
    for key, value in got.items():
        np.testing.assert_array_equal(explicit[key], value, err_msg=key)


# ---------------------------------------------------------------------------------- val_crop_pct


def test_val_crop_pct_device_box_and_resize():
    images, labels, masks = noise_set(n=6, h=20, w=26)
    # val_crop_pct 0.6 of the short side 20: side int(12.0) = 12, top (20 - 12) // 2 = 4, left (26 - 12) // 2 = 7
    crop, crop_m = images[:, 4:16, 7:19], masks[:, 4:16, 7:19]
    kw = dict(pipeline="imagenet_val", batch_size=6, fields=("image", "mask"), val_crop_pct=0.6, **RAW)
    x, m = next(iter(DeviceLoader.from_arrays(images, labels, masks, resolution=12, **kw)))
    assert torch.equal(x, torch.from_numpy(crop).permute(0, 3, 1, 2).float())
    assert torch.equal(m, torch.from_numpy(crop_m))
    # resized to 9: the torch reference of timm's Resize + CenterCrop on the crop
    x, m = next(iter(DeviceLoader.from_arrays(images, labels, masks, resolution=9, **kw)))
    want = F.interpolate(torch.from_numpy(crop).permute(0, 3, 1, 2).float(), size=(9, 9), mode="bilinear",
                         align_corners=False, antialias=True).clamp(0, 255)
    torch.testing.assert_close(x, want, atol=1e-4, rtol=0)
    want_m = F.interpolate(torch.from_numpy(crop_m)[:, None].float(), size=(9, 9), mode="nearest")[:, 0]
    assert torch.equal(m, want_m.to(torch.uint8))
    # the default is 0.875: side int(17.5) = 17 from (1, 4)
    x, _ = next(iter(DeviceLoader.from_arrays(images, labels, masks, resolution=17,
                                              **{**kw, "val_crop_pct": None})))
    assert torch.equal(x, torch.from_numpy(images[:, 1:18, 4:21]).permute(0, 3, 1, 2).float())


@pytest.fixture(scope="module")
def embedded(tmp_path_factory):
    spec = EmbeddedSpec(train_per_class=1, val_per_class=1, seed=5)  # 10 images, 32 px, with masks
    path = write_embedded(spec, "train", tmp_path_factory.mktemp("emb") / "train.beton", num_workers=1)
    return path, generate(spec, "train")


@pytest.mark.parametrize("resident", [False, True], ids=["ffcv", "device"])
def test_val_crop_pct_both_loaders_exact_crop(embedded, resident):
    path, (images, _, masks) = embedded
    # 0.5 of 32 px: side 16 from (8, 8); at resolution 16 nothing is resampled
    loader = make_loader(path, pipeline="imagenet_val", batch_size=10, num_workers=1, resolution=16,
                         device_resident=resident, fields=("image", "mask", "index"), val_crop_pct=0.5, **RAW)
    x, m, idx = next(iter(loader))
    assert torch.equal(idx, torch.arange(10))
    assert torch.equal(x, torch.from_numpy(images[:, 8:24, 8:24]).permute(0, 3, 1, 2).float())
    assert torch.equal(m, torch.from_numpy(masks[:, 8:24, 8:24]))


@pytest.fixture(scope="module")
def short20(tmp_path_factory):
    """Images of several shapes with the short side 20 (so one crop side fits them all)."""
    rng = np.random.default_rng(4)
    sizes = [(20, 26), (26, 20), (20, 20), (20, 33), (29, 20), (20, 21)]
    pixels = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in sizes]
    root = tmp_path_factory.mktemp("short20")
    return write_tree(root / "tree", pixels, root / "short20.beton"), pixels


def test_val_crop_pct_ffcv_variable_sizes(short20):
    path, pixels = short20

    def batch(res):
        loader = make_loader(path, pipeline="imagenet_val", batch_size=6, num_workers=1, resolution=res,
                             device_resident=False, fields=("image", "index"), val_crop_pct=0.6, **RAW)
        x, idx = next(iter(loader))
        assert torch.equal(idx, torch.arange(6))
        return x

    # side int(0.6 * 20) = 12, centred: ((h - 12) // 2, (w - 12) // 2)
    crops = torch.stack([torch.from_numpy(p[(p.shape[0] - 12) // 2:][:12, (p.shape[1] - 12) // 2:][:, :12])
                         for p in pixels]).permute(0, 3, 1, 2).float()
    assert torch.equal(batch(12), crops)
    # halved by OpenCV's area filter: 2x2 means, rounded to integers
    halved = F.interpolate(crops, size=(6, 6), mode="area")
    assert (batch(6) - halved).abs().max() <= 0.5


def test_empty_or_bad_val_crop_pct_is_refused(short20):
    images, labels, _ = noise_set()
    with pytest.raises(ValueError, match=r"val_crop_pct=0\.04: the centre crop of a 20x20 image is empty"):
        DeviceLoader.from_arrays(images, labels, pipeline="imagenet_val", batch_size=4, val_crop_pct=0.04)
    with pytest.raises(ValueError, match=r"val_crop_pct=0\.04: the centre crop of a 20x20 image is empty"):
        make_loader(short20[0], pipeline="imagenet_val", batch_size=4, num_workers=1, device_resident=False,
                    val_crop_pct=0.04)
    for bad in (0, 1.5, -0.9, True, "0.9"):
        with pytest.raises(ValueError, match=r"val_crop_pct must be a number in \(0, 1\]"):
            LoaderConfig("imagenet_val", 4, val_crop_pct=bad)
    with pytest.raises(ValueError, match="val_crop_pct=0.9 is for the 'imagenet_val' pipeline, not 'cifar_val'"):
        LoaderConfig("cifar_val", 4, val_crop_pct=0.9)
    assert LoaderConfig("imagenet_val", 4, val_crop_pct=1).crop_ratio == 1.0


# ---------------------------------------------------------------------------------- interpolation


@pytest.fixture
def grid_calls(monkeypatch):
    """Every ``F.grid_sample`` call's ``(input, grid, mode)``, the call itself unchanged."""
    calls, real = [], F.grid_sample

    def spy(input, grid, mode="bilinear", padding_mode="zeros", align_corners=None):
        calls.append((input.clone(), grid.clone(), mode, padding_mode, align_corners))
        return real(input, grid, mode=mode, padding_mode=padding_mode, align_corners=align_corners)

    monkeypatch.setattr(torch.nn.functional, "grid_sample", spy)
    return calls


def _train_epoch(interpolation, epoch=1, n=12):
    images, labels, masks = noise_set(n=n)
    loader = DeviceLoader.from_arrays(images, labels, masks, pipeline="imagenet_train", batch_size=4, seed=3,
                                      resolution=16, fields=("image", "mask", "index"),
                                      interpolation=interpolation, **RAW)
    loader.set_epoch(epoch)
    return images, list(loader)


def test_bicubic_is_grid_sample_bicubic_on_the_same_crops(grid_calls):
    images, bilinear = _train_epoch("bilinear")
    bilinear_calls = [c for c in grid_calls if c[2] == "bilinear"]
    grid_calls.clear()
    _, bicubic = _train_epoch("bicubic")
    bicubic_calls = [c for c in grid_calls if c[2] == "bicubic"]
    assert len(bilinear_calls) == len(bicubic_calls) == len(bicubic) == 3
    overshoot = False
    for (x, m, idx), (y, n, idx2), lin, cub in zip(bilinear, bicubic, bilinear_calls, bicubic_calls):
        source = torch.from_numpy(images[idx.numpy()]).permute(0, 3, 1, 2).float()
        assert torch.equal(idx, idx2) and torch.equal(m, n)  # the same samples, crops and flips
        assert torch.equal(cub[0], source) and torch.equal(lin[1], cub[1])  # the same grid
        assert cub[3:] == ("border", False)
        raw = F.grid_sample(source, cub[1], mode="bicubic", padding_mode="border", align_corners=False)
        assert torch.equal(y, raw.clamp(0, 255))  # clamped to the uint8 range
        assert torch.equal(x, F.grid_sample(source, lin[1], mode="bilinear", padding_mode="border",
                                            align_corners=False))
        overshoot |= bool((raw < 0).any() or (raw > 255).any())
        assert not torch.equal(x, y)
    assert overshoot  # noise images ring: the clamp matters


def test_random_interpolation_picks_one_of_the_two_per_image():
    kinds = []
    for epoch in (1, 2, 3):
        _, bilinear = _train_epoch("bilinear", epoch)
        _, bicubic = _train_epoch("bicubic", epoch)
        _, mixed = _train_epoch("random", epoch)
        for (x, m, _), (y, _, _), (z, k, _) in zip(bilinear, bicubic, mixed):
            assert torch.equal(k, m)  # the pick is drawn after the crops and flips: they are as they were
            for a, b, c in zip(x, y, z):
                is_lin, is_cub = torch.equal(c, a), torch.equal(c, b)
                assert is_lin != is_cub  # exactly one of the two (they differ on noise images)
                kinds.append(is_cub)
    assert 0.25 < np.mean(kinds) < 0.75  # both, about half each (36 images)
    # the same epoch again: the same picks
    _, again = _train_epoch("random", 3)
    assert all(torch.equal(a[0], b[0]) for a, b in zip(again, mixed))


def test_interpolation_errors_and_auto_residency(embedded, short20):
    path = embedded[0]
    with pytest.raises(ValueError, match="interpolation='random': only the device-resident loader has it"):
        make_loader(path, pipeline="imagenet_train", batch_size=4, num_workers=1, device_resident=False,
                    interpolation="random")
    # "auto" picks the loader that has it for a set of one image size, and keeps FFCV for bilinear
    auto = dict(pipeline="imagenet_train", batch_size=4, num_workers=1, resolution=16)
    assert isinstance(make_loader(path, interpolation="bicubic", **auto), DeviceLoader)
    assert not isinstance(make_loader(path, **auto), DeviceLoader)
    with pytest.raises(ValueError, match="interpolation='bicubic': only the device-resident loader has it"):
        make_loader(short20[0], interpolation="bicubic", **auto)  # several image sizes: FFCV, which refuses
    with pytest.raises(ValueError, match=r"interpolation must be one of \('bilinear', 'bicubic', 'random'\), "
                                         "got 'nearest'"):
        LoaderConfig("imagenet_train", 4, interpolation="nearest")
    with pytest.raises(ValueError, match="interpolation='bicubic' is for the 'imagenet_train' pipeline"):
        LoaderConfig("cifar_train", 4, interpolation="bicubic")


# ---------------------------------------------------------------------------------- FFCV augmentations


def _expected(config, decoded, epoch, b):
    """What the device loader's augmentation (the shared BatchAugment) makes of a decoded batch."""
    decoded = torch.from_numpy(decoded).to(config.device)
    return BatchAugment(config, Normalizer(config)).nhwc(decoded, batch_generator(config, epoch, b))


@pytest.fixture(scope="module")
def mirrored(tmp_path_factory):
    """16 px images symmetric left-right: FFCV's unseeded flip leaves them as they are."""
    rng = np.random.default_rng(7)
    half = rng.integers(0, 256, (12, 16, 8, 3), dtype=np.uint8)
    pixels = np.concatenate([half, half[:, :, ::-1]], axis=2)
    root = tmp_path_factory.mktemp("mirrored")
    return write_tree(root / "tree", list(pixels), root / "mirrored.beton"), pixels


def test_ffcv_randaugment_is_seeded_resumable_and_the_device_loaders_function(mirrored):
    path, pixels = mirrored
    kw = dict(pipeline="cifar_train", batch_size=4, num_workers=1, device_resident=False, crop_padding=0, seed=5,
              fields=("image", "index"), randaugment=RA, random_erasing=0.5)
    loader = make_loader(path, **kw)
    loader.set_epoch(1)
    first = list(loader)
    assert len(first) == 3
    for b, (x, idx) in enumerate(first):
        assert torch.equal(x, _expected(loader.config, pixels[idx.numpy()], 1, b))
    again = make_loader(path, **kw)
    again.set_epoch(1)
    assert all(torch.equal(a[0], b[0]) for a, b in zip(first, again))
    loader.set_epoch(1, 1)  # resumed at batch 1 of epoch 1
    resumed = list(loader)
    assert len(resumed) == 2 and all(torch.equal(a[0], b[0]) for a, b in zip(first[1:], resumed))
    loader.set_epoch(2)
    x, idx = next(iter(loader))
    assert torch.equal(x, _expected(loader.config, pixels[idx.numpy()], 2, 0))
    mean = torch.tensor(loader.config.mean).view(1, 3, 1, 1)
    std = torch.tensor(loader.config.std).view(1, 3, 1, 1)
    changed = 0
    for x, idx in first:
        plain = (torch.from_numpy(pixels[idx.numpy()]).permute(0, 3, 1, 2).float() - mean) / std
        changed += int(((x - plain).abs().flatten(1).amax(1) > 1e-4).sum())
    assert changed >= 6  # RandAugment / erasing really act (of 12 images; 2 ops at p 0.5, erasing at 0.5)


def test_ffcv_imagenet_train_augments_after_its_crop(tmp_path):
    """One colour per image: any crop, resize and flip of it is that colour, so the decoded batch is
    known without FFCV's (unseeded) draws."""
    colours = np.random.default_rng(9).integers(0, 256, (8, 3), dtype=np.uint8)
    sizes = [(20, 16), (24, 30), (17, 17), (13, 26), (31, 22), (16, 16), (40, 20), (18, 19)]
    pixels = [np.broadcast_to(c, (h, w, 3)).copy() for c, (h, w) in zip(colours, sizes)]
    path = write_tree(tmp_path / "tree", pixels, tmp_path / "flat.beton")
    loader = make_loader(path, pipeline="imagenet_train", batch_size=4, num_workers=1, device_resident=False,
                         resolution=12, fields=("image", "index"), randaugment="rand-m9-mstd0.5-inc1-n3",
                         random_erasing=0.5, seed=2)
    loader.set_epoch(4)
    full = list(loader)
    for b, (x, idx) in enumerate(full):
        decoded = np.broadcast_to(colours[idx.numpy()][:, None, None], (len(idx), 12, 12, 3))
        assert torch.equal(x, _expected(loader.config, np.ascontiguousarray(decoded), 4, b))
    loader.set_epoch(4, 1)
    assert torch.equal(next(iter(loader))[0], full[1][0])


def test_ffcv_without_augmentations_keeps_its_plain_path(mirrored):
    path, pixels = mirrored
    loader = make_loader(path, pipeline="cifar_train", batch_size=4, num_workers=1, device_resident=False,
                         crop_padding=0, fields=("image", "index"), **RAW)
    for x, idx in loader:
        assert torch.equal(x, torch.from_numpy(pixels[idx.numpy()]).permute(0, 3, 1, 2).float())


@pytest.mark.cuda
def test_recipe_options_on_cuda(mirrored):
    """The per-image interpolation pick reaches the GPU without a host sync and is the CPU's; the
    FFCV loader augments on the GPU as the shared function does there (erasing noise is drawn on
    the device, so the CPU's differs)."""
    images, labels, masks = noise_set(n=12)

    def make(device):
        loader = DeviceLoader.from_arrays(images, labels, masks, pipeline="imagenet_train", batch_size=4, seed=3,
                                          resolution=16, fields=("image", "index"), interpolation="random",
                                          device=device)
        loader.set_epoch(1)
        return list(loader)

    for (x, i), (y, j) in zip(make("cpu"), make("cuda")):
        assert torch.equal(i, j.cpu())
        torch.testing.assert_close(y.cpu(), x, atol=1e-3, rtol=0)
    path, pixels = mirrored
    loader = make_loader(path, pipeline="cifar_train", batch_size=4, num_workers=1, device_resident=False,
                         crop_padding=0, seed=5, fields=("image", "index"), randaugment=RA, random_erasing=0.5,
                         device="cuda")
    loader.set_epoch(1)
    for b, (x, idx) in enumerate(loader):
        torch.testing.assert_close(x, _expected(loader.config, pixels[idx.cpu().numpy()], 1, b), atol=1e-4, rtol=0)
