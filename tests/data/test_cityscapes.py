"""Cityscapes: the labelId -> train-id table, the scan of the standard layout, and a fake tree
written to a .beton and read back bit-exactly through the seg_val loader."""
import importlib.util

import numpy as np
import pytest
import torch
from PIL import Image

from kdengine.data.beton import OutputExistsError
from kdengine.data.cityscapes import (
    CITYSCAPES_CLASSES,
    IGNORE_INDEX,
    LABEL_ID_TO_TRAIN_ID,
    scan_cityscapes,
    to_train_ids,
    write_cityscapes,
)
from kdengine.errors import SettingError

needs_ffcv = pytest.mark.skipif(importlib.util.find_spec("ffcv") is None,
                                reason="FFCV is installed by `make test`; install the [ffcv] extra")
pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")

# cityscapesScripts' labels.py, written out independently of the module: name -> (labelId, trainId)
OFFICIAL = {
    "road": (7, 0), "sidewalk": (8, 1), "building": (11, 2), "wall": (12, 3), "fence": (13, 4), "pole": (17, 5),
    "traffic light": (19, 6), "traffic sign": (20, 7), "vegetation": (21, 8), "terrain": (22, 9), "sky": (23, 10),
    "person": (24, 11), "rider": (25, 12), "car": (26, 13), "truck": (27, 14), "bus": (28, 15), "train": (31, 16),
    "motorcycle": (32, 17), "bicycle": (33, 18),
}
CITIES = ("aachen", "bochum", "zurich")
H, W = 64, 128
MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1) * 255
STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1) * 255


def test_label_table_is_the_official_mapping():
    assert LABEL_ID_TO_TRAIN_ID.dtype == np.uint8 and LABEL_ID_TO_TRAIN_ID.shape == (256,)
    expected = np.full(256, 255, dtype=np.uint8)
    for label_id, train_id in OFFICIAL.values():
        expected[label_id] = train_id
    assert np.array_equal(LABEL_ID_TO_TRAIN_ID, expected)
    assert CITYSCAPES_CLASSES == tuple(sorted(OFFICIAL, key=lambda k: OFFICIAL[k][1]))
    assert IGNORE_INDEX == 255
    ids = np.array([[7, 0, 33], [255, 26, 6]], dtype=np.uint8)
    assert np.array_equal(to_train_ids(ids), [[0, 255, 18], [255, 13, 255]])
    with pytest.raises(ValueError, match="label_ids must be uint8"):
        to_train_ids(ids.astype(np.int64))
    with pytest.raises(ValueError):  # read-only: nobody rewrites the mapping by accident
        LABEL_ID_TO_TRAIN_ID[0] = 1


def make_tree(root, split="val", per_city=2, size=(H, W), seed=0):
    """A fake Cityscapes tree; returns the images and label ids in scan order."""
    rng = np.random.default_rng(seed)
    images, ids = [], []
    for city in CITIES:
        for k in range(per_city):
            name = f"{city}_{k:06d}_000019"
            image = rng.integers(0, 256, (*size, 3), dtype=np.uint8)
            label = rng.integers(0, 34, size, dtype=np.uint8)
            label[0, :4] = 255  # out-of-range ids are ignored too
            for kind, arr, suffix in (("leftImg8bit", image, "leftImg8bit"), ("gtFine", label, "gtFine_labelIds")):
                folder = root / kind / split / city
                folder.mkdir(parents=True, exist_ok=True)
                Image.fromarray(arr).save(folder / f"{name}_{suffix}.png")
            images.append(image)
            ids.append(label)
    return np.stack(images), np.stack(ids)


def test_scan_pairs_sorted(tmp_path):
    make_tree(tmp_path)
    pairs = scan_cityscapes(tmp_path, "val")
    assert len(pairs) == 6
    assert [p[0].parent.name for p in pairs] == [c for c in CITIES for _ in range(2)]
    for image, label in pairs:
        assert image.name.replace("leftImg8bit.png", "gtFine_labelIds.png") == label.name
        assert image.parent.name == label.parent.name and label.parts[-4] == "gtFine"
    assert pairs == sorted(pairs)


def test_scan_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="root.*not a directory"):
        scan_cityscapes(tmp_path / "nope", "val")
    make_tree(tmp_path)
    with pytest.raises(FileNotFoundError, match="leftImg8bit/train"):
        scan_cityscapes(tmp_path, "train")
    with pytest.raises(ValueError, match="split must be"):
        scan_cityscapes(tmp_path, "../val")
    (tmp_path / "leftImg8bit" / "test" / "x").mkdir(parents=True)
    (tmp_path / "gtFine" / "test").mkdir(parents=True)
    with pytest.raises(ValueError, match="no images"):
        scan_cityscapes(tmp_path, "test")
    (tmp_path / "gtFine" / "val" / "bochum" / "bochum_000001_000019_gtFine_labelIds.png").unlink()
    with pytest.raises(FileNotFoundError, match="bochum_000001_000019_leftImg8bit.png.*no label file"):
        scan_cityscapes(tmp_path, "val")


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    root = tmp_path_factory.mktemp("cityscapes")
    images, ids = make_tree(root)
    return root, images, ids


@pytest.fixture(scope="module")
def beton(tree):
    root, _, _ = tree
    return write_cityscapes(root, "val", root / "val.beton", num_workers=1)


@needs_ffcv
def test_write_and_read_back_bit_exact(tree, beton):
    from kdengine.data.segmentation import make_segmentation_loader

    _, images, ids = tree
    for resident in (True, False):
        loader = make_segmentation_loader(str(beton), pipeline="seg_val", batch_size=4, num_workers=1,
                                          device_resident=resident)
        assert (len(loader), loader.dataset_size, loader.resolution(), loader.resident) == (2, 6, H, resident)
        batches = list(loader)
        assert [len(b) for b in batches] == [2, 2]
        got_x = torch.cat([b[0] for b in batches])
        got_y = torch.cat([b[1] for b in batches])
        assert got_x.dtype == torch.float32 and got_x.shape == (6, 3, H, W)
        assert got_y.dtype == torch.int64 and got_y.shape == (6, H, W)
        # labels: the official mapping of the ids, computed here from the table above
        expected = np.full(ids.shape, 255, dtype=np.int64)
        for label_id, train_id in OFFICIAL.values():
            expected[ids == label_id] = train_id
        assert np.array_equal(got_y.numpy(), expected)
        # images: exactly the PNGs' pixels (raw storage), normalised
        want = (torch.from_numpy(images).permute(0, 3, 1, 2).float() - MEAN) / STD
        torch.testing.assert_close(got_x, want, rtol=0, atol=1e-5)
        assert torch.equal((got_x * STD + MEAN).round().to(torch.uint8).permute(0, 2, 3, 1),
                           torch.from_numpy(images))


@needs_ffcv
def test_write_jpg_is_lossy_for_images_only(tree, tmp_path):
    from kdengine.data.segmentation import make_segmentation_loader

    root, images, ids = tree
    path = write_cityscapes(root, "val", tmp_path / "val-jpg.beton", num_workers=1, write_mode="jpg",
                            jpeg_quality=95)
    loader = make_segmentation_loader(str(path), pipeline="seg_val", batch_size=6, num_workers=1,
                                      device_resident=True)
    x, y = next(iter(loader))
    assert np.array_equal(y.numpy(), LABEL_ID_TO_TRAIN_ID[ids].astype(np.int64))  # labels stay lossless
    import cv2

    pixels = (x * STD + MEAN).permute(0, 2, 3, 1)
    # the same JPEG round trip through OpenCV (FFCV decodes with its own libjpeg-turbo: close, not equal)
    trip = np.stack([cv2.cvtColor(cv2.imdecode(cv2.imencode(".jpg", cv2.cvtColor(im, cv2.COLOR_RGB2BGR),
                                                            [cv2.IMWRITE_JPEG_QUALITY, 95])[1], cv2.IMREAD_COLOR),
                                  cv2.COLOR_BGR2RGB) for im in images])
    assert (pixels - torch.from_numpy(images).float()).abs().mean() > 10  # lossy (noise compresses badly)
    assert (pixels - torch.from_numpy(trip).float()).abs().mean() < 3


@needs_ffcv
def test_write_refuses_and_leaves_nothing(tree, beton, tmp_path):
    root, _, _ = tree
    with pytest.raises(OutputExistsError):
        write_cityscapes(root, "val", beton, num_workers=1)
    with pytest.raises(SettingError, match="write_mode"):
        write_cityscapes(root, "val", tmp_path / "a.beton", write_mode="proportion")
    with pytest.raises(SettingError, match="jpeg_quality"):
        write_cityscapes(root, "val", tmp_path / "a.beton", jpeg_quality=0)
    assert list(tmp_path.iterdir()) == []


@needs_ffcv
def test_write_errors_name_the_file(tmp_path):
    make_tree(tmp_path, per_city=1)
    out = tmp_path / "out" / "val.beton"
    # a label that is a colour image (e.g. the *_color.png put in its place)
    label = tmp_path / "gtFine" / "val" / "bochum" / "bochum_000000_000019_gtFine_labelIds.png"
    good = label.read_bytes()
    Image.fromarray(np.zeros((H, W, 3), np.uint8)).save(label)
    with pytest.raises(ValueError, match="bochum_000000_000019_gtFine_labelIds.png.*mode 'RGB'"):
        write_cityscapes(tmp_path, "val", out, num_workers=1)
    label.write_bytes(good)
    # images of two sizes: the label field has one shape
    image = tmp_path / "leftImg8bit" / "val" / "zurich" / "zurich_000000_000019_leftImg8bit.png"
    good_image = image.read_bytes()
    Image.fromarray(np.zeros((H, W + 2, 3), np.uint8)).save(image)
    Image.fromarray(np.zeros((H, W + 2), np.uint8)).save(label.parents[1] / "zurich" / image.name.replace(
        "leftImg8bit.png", "gtFine_labelIds.png"))
    with pytest.raises(ValueError, match=r"zurich_000000_000019_leftImg8bit.png' is 64x130.*one size"):
        write_cityscapes(tmp_path, "val", out, num_workers=1)
    assert not out.exists()
    # a truncated PNG: the header reads, the pixels do not (found inside FFCV's worker process)
    image.write_bytes(good_image[: len(good_image) // 2])
    (label.parents[1] / "zurich" / image.name.replace("leftImg8bit.png", "gtFine_labelIds.png")).write_bytes(
        (label.parents[1] / "aachen" / "aachen_000000_000019_gtFine_labelIds.png").read_bytes())
    with pytest.raises(ValueError, match="cannot decode.*zurich_000000_000019_leftImg8bit.png.*truncated"):
        write_cityscapes(tmp_path, "val", out, num_workers=1)
    assert not out.exists() and list(out.parent.iterdir()) == []
