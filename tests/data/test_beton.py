"""Writing the embedded dataset to FFCV .beton files: round trip, atomicity, refusal, cache."""
import numpy as np
import pytest

ffcv = pytest.importorskip("ffcv", reason="FFCV is installed by `make test`; install the [ffcv] extra")

from ffcv.fields.decoders import IntDecoder, NDArrayDecoder, SimpleRGBImageDecoder  # noqa: E402
from ffcv.loader import Loader, OrderOption  # noqa: E402

from kdengine.data import BETON_VERSION, EmbeddedSpec, atomic_beton, embedded_beton, generate, write_embedded  # noqa: E402

SPEC = EmbeddedSpec(train_per_class=6, val_per_class=2, seed=3)


def read_all(path):
    loader = Loader(str(path), batch_size=32, num_workers=1, order=OrderOption.SEQUENTIAL, drop_last=False,
                    pipelines={"image": [SimpleRGBImageDecoder()], "label": [IntDecoder()],
                               "mask": [NDArrayDecoder()], "index": [IntDecoder()]})
    images, labels, masks, index = zip(*[(x.copy(), y.copy(), m.copy(), i.copy())
                                         for x, y, m, i in loader])  # buffers are reused
    np.testing.assert_array_equal(np.concatenate(index)[:, 0], np.arange(loader.reader.num_samples))
    return np.concatenate(images), np.concatenate(labels)[:, 0], np.concatenate(masks)


def test_raw_round_trip_is_bit_exact(tmp_path):
    path = write_embedded(SPEC, "train", tmp_path / "train.beton", num_workers=1)
    images, labels, masks = generate(SPEC, "train")
    got_images, got_labels, got_masks = read_all(path)
    np.testing.assert_array_equal(got_images, images)
    np.testing.assert_array_equal(got_labels, labels)
    np.testing.assert_array_equal(got_masks, masks)


def test_jpeg_round_trip_within_jpeg_tolerance(tmp_path):
    path = write_embedded(SPEC, "val", tmp_path / "val.beton", write_mode="jpg", jpeg_quality=95,
                          num_workers=1)
    images, labels, _ = generate(SPEC, "val")
    got_images, got_labels, _ = read_all(path)
    np.testing.assert_array_equal(got_labels, labels)
    error = np.abs(got_images.astype(np.int16) - images.astype(np.int16))
    assert error.mean() < 6 and error.max() > 0  # lossy, but close


def test_existing_output_is_refused_unless_overwrite(tmp_path):
    path = tmp_path / "train.beton"
    path.write_bytes(b"keep me")
    with pytest.raises(FileExistsError, match="overwrite"):
        write_embedded(SPEC, "train", path, num_workers=1)
    assert path.read_bytes() == b"keep me"
    write_embedded(SPEC, "train", path, overwrite=True, num_workers=1)
    assert read_all(path)[0].shape == (SPEC.count("train"), 32, 32, 3)


def test_a_failed_write_leaves_nothing_behind(tmp_path):
    path = tmp_path / "out.beton"
    with pytest.raises(RuntimeError, match="interrupted"):
        with atomic_beton(path) as tmp:
            tmp.write_bytes(b"half a file")
            raise RuntimeError("interrupted")
    assert list(tmp_path.iterdir()) == []


def test_bad_options():
    with pytest.raises(ValueError, match="write_mode must be one of"):
        write_embedded(SPEC, "train", "unused.beton", write_mode="png")
    with pytest.raises(ValueError, match="jpeg_quality"):
        write_embedded(SPEC, "train", "unused.beton", jpeg_quality=0)


def test_embedded_beton_is_cached_by_spec(tmp_path, monkeypatch):
    monkeypatch.setenv("KDENGINE_CACHE", str(tmp_path))
    path = embedded_beton(SPEC, "val")
    assert path.parent == tmp_path / SPEC.key() and path.exists()
    assert f"beton{BETON_VERSION}" in path.name  # a file of an older layout is never reused
    mtime = path.stat().st_mtime_ns
    assert embedded_beton(SPEC, "val") == path and path.stat().st_mtime_ns == mtime  # not rewritten
