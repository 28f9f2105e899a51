"""The ImageFolder converter on tiny trees: round trip, and every bad-input case."""
import numpy as np
import pytest

pytest.importorskip("ffcv", reason="FFCV is installed by `make test`; install the [ffcv] extra")
from ffcv.fields.decoders import IntDecoder, SimpleRGBImageDecoder  # noqa: E402
from ffcv.loader import Loader, OrderOption  # noqa: E402
from PIL import Image  # noqa: E402

from kdengine.data import scan_image_folder, write_image_folder  # noqa: E402


def make_tree(root, classes=("cat", "dog"), per_class=3, size=(20, 16)):
    rng = np.random.default_rng(0)
    expected = []
    for label, name in enumerate(classes):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            pixels = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / name / f"{i}.png")  # lossless
            expected.append((pixels, label))
    return expected


def read_beton(path):
    loader = Loader(str(path), batch_size=1, num_workers=1, order=OrderOption.SEQUENTIAL, drop_last=False,
                    pipelines={"image": [SimpleRGBImageDecoder()], "label": [IntDecoder()],
                               "index": [IntDecoder()]})
    got = [(x[0].copy(), int(y[0, 0]), int(i[0, 0])) for x, y, i in loader]  # FFCV reuses its batch buffers
    assert [i for _, _, i in got] == list(range(len(got)))
    return [(x, y) for x, y, _ in got]


def test_raw_round_trip_is_bit_exact(tmp_path):
    expected = make_tree(tmp_path / "src")
    path, skipped = write_image_folder(tmp_path / "src", tmp_path / "out.beton", write_mode="raw", num_workers=1)
    assert skipped == []
    got = read_beton(path)
    assert [label for _, label in got] == [label for _, label in expected]
    for (image, _), (pixels, _) in zip(got, expected):
        np.testing.assert_array_equal(image, pixels)


def test_unreadable_image_fails_naming_the_file_or_is_skipped(tmp_path):
    make_tree(tmp_path / "src")
    (tmp_path / "src" / "dog" / "broken.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    with pytest.raises(ValueError, match=r"unreadable image .*broken\.jpg"):
        write_image_folder(tmp_path / "src", tmp_path / "out.beton", num_workers=1)
    assert not (tmp_path / "out.beton").exists()
    path, skipped = write_image_folder(tmp_path / "src", tmp_path / "out.beton", on_error="skip",
                                       write_mode="raw", num_workers=1)
    assert [p.name for p, _ in skipped] == ["broken.jpg"]
    assert len(read_beton(path)) == 6


def test_bad_trees(tmp_path):
    with pytest.raises(FileNotFoundError, match="is not a directory"):
        scan_image_folder(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="has no class folders"):
        scan_image_folder(tmp_path / "empty")
    make_tree(tmp_path / "src")
    (tmp_path / "src" / "zebra").mkdir()
    (tmp_path / "src" / "zebra" / "notes.txt").write_text("no images here")
    with pytest.raises(ValueError, match=r"class folder .*zebra has no images"):
        scan_image_folder(tmp_path / "src")


def test_existing_output_refused_before_any_work(tmp_path):
    make_tree(tmp_path / "src")
    (tmp_path / "out.beton").write_bytes(b"keep")
    with pytest.raises(FileExistsError, match="overwrite"):
        write_image_folder(tmp_path / "src", tmp_path / "out.beton")
    assert (tmp_path / "out.beton").read_bytes() == b"keep"
    with pytest.raises(ValueError, match="on_error must be"):
        write_image_folder(tmp_path / "src", tmp_path / "new.beton", on_error="ignore")
