"""The CIFAR python-pickle converter on tiny generated sets in the real layouts."""
import pickle

import numpy as np
import pytest

pytest.importorskip("ffcv", reason="FFCV is installed by `make test`; install the [ffcv] extra")

from ffcv.fields.decoders import IntDecoder, SimpleRGBImageDecoder  # noqa: E402
from ffcv.loader import Loader, OrderOption  # noqa: E402

from kdengine.data import read_cifar, write_cifar  # noqa: E402


def _dump(path, obj):
    with open(path, "wb") as f:
        pickle.dump(obj, f)


def make_cifar10(root, per_batch=4, seed=0):
    """cifar-10-batches-py: data_batch_1..5, test_batch, batches.meta, CHW rows of 3072 bytes."""
    rng = np.random.default_rng(seed)
    source = root / "cifar-10-batches-py"
    source.mkdir()
    expected = {"train": ([], []), "test": ([], [])}
    for name, split in [(f"data_batch_{i}", "train") for i in range(1, 6)] + [("test_batch", "test")]:
        data = rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8)
        labels = rng.integers(0, 10, per_batch).tolist()
        _dump(source / name, {b"data": data, b"labels": labels, b"batch_label": name.encode()})
        expected[split][0].append(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
        expected[split][1].extend(labels)
    _dump(source / "batches.meta", {b"label_names": [f"class{i}".encode() for i in range(10)]})
    return source, {k: (np.concatenate(v[0]), np.array(v[1])) for k, v in expected.items()}


def make_cifar100(root, n=6, seed=1):
    rng = np.random.default_rng(seed)
    source = root / "cifar-100-python"
    source.mkdir()
    expected = {}
    for split in ("train", "test"):
        data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        fine = rng.integers(0, 100, n).tolist()
        _dump(source / split, {b"data": data, b"fine_labels": fine, b"coarse_labels": [0] * n})
        expected[split] = (data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1), np.array(fine))
    _dump(source / "meta", {b"fine_label_names": [f"f{i}".encode() for i in range(100)]})
    return source, expected


def read_beton(path):
    loader = Loader(str(path), batch_size=16, num_workers=1, order=OrderOption.SEQUENTIAL, drop_last=False,
                    pipelines={"image": [SimpleRGBImageDecoder()], "label": [IntDecoder()],
                               "index": [IntDecoder()]})
    images, labels, index = zip(*[(x.copy(), y.copy(), i.copy()) for x, y, i in loader])  # buffers are reused
    np.testing.assert_array_equal(np.concatenate(index)[:, 0], np.arange(loader.reader.num_samples))
    return np.concatenate(images), np.concatenate(labels)[:, 0]


@pytest.mark.parametrize("make", [make_cifar10, make_cifar100], ids=["cifar10", "cifar100"])
@pytest.mark.parametrize("split", ["train", "test"])
def test_round_trip_is_bit_exact(tmp_path, make, split):
    source, expected = make(tmp_path)
    images, labels, names = read_cifar(source, split)
    np.testing.assert_array_equal(images, expected[split][0])
    assert len(names) in (10, 100)
    path = write_cifar(source, split, tmp_path / f"{split}.beton", num_workers=1)
    got_images, got_labels = read_beton(path)
    np.testing.assert_array_equal(got_images, expected[split][0])
    np.testing.assert_array_equal(got_labels, expected[split][1])


def test_bad_sources_name_the_problem(tmp_path):
    with pytest.raises(FileNotFoundError, match="is not a directory"):
        read_cifar(tmp_path / "nowhere", "train")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no CIFAR layout found"):
        read_cifar(tmp_path / "empty", "train")
    source, _ = make_cifar10(tmp_path)
    (source / "data_batch_3").unlink()
    with pytest.raises(FileNotFoundError, match="data_batch_3"):
        read_cifar(source, "train")
    (source / "test_batch").write_bytes(b"not a pickle")
    with pytest.raises(ValueError, match="test_batch: not a readable CIFAR pickle"):
        read_cifar(source, "test")
    with pytest.raises(ValueError, match="split must be"):
        read_cifar(source, "val")
