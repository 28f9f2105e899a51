"""`kdengine data write` (each source, round trip through the written file; one-line error exits)
and `kdengine bench data` (a tiny set: one real run that appends rows; --no-save appends none)."""
import csv
import pickle

import numpy as np
import pytest

pytest.importorskip("ffcv", reason="FFCV is installed by `make test`; install the [ffcv] extra")
from ffcv.fields.decoders import IntDecoder, SimpleRGBImageDecoder  # noqa: E402
from ffcv.loader import Loader, OrderOption  # noqa: E402
from ffcv.reader import Reader  # noqa: E402
from PIL import Image  # noqa: E402

from kdengine import cli  # noqa: E402
from kdengine.data import EmbeddedSpec, generate  # noqa: E402


def read_beton(path):
    pipelines = {name: None for name in Reader(str(path)).field_names}  # other fields (mask, index) off
    pipelines.update(image=[SimpleRGBImageDecoder()], label=[IntDecoder()])
    loader = Loader(str(path), batch_size=1, num_workers=1, order=OrderOption.SEQUENTIAL, drop_last=False,
                    pipelines=pipelines)
    images, labels = [], []
    for x, y in loader:
        images.extend(x.copy())  # FFCV reuses its batch buffers
        labels.extend(int(v) for v in y[:, 0])
    return images, labels


def one_line_error(capsys, *needles):
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if "error:" in line]
    assert len(lines) == 1, err
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def make_cifar10(root, per_batch=3):
    rng = np.random.default_rng(0)
    root.mkdir(parents=True)
    batches = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        data = rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8)
        labels = rng.integers(0, 10, per_batch).tolist()
        with open(root / name, "wb") as f:
            pickle.dump({b"data": data, b"labels": labels}, f)
        batches[name] = (data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1), labels)
    with open(root / "batches.meta", "wb") as f:
        pickle.dump({b"label_names": [f"c{i}".encode() for i in range(10)]}, f)
    return batches


def make_tree(root, per_class=2):
    rng = np.random.default_rng(1)
    expected = []
    for label, name in enumerate(("ant", "bee")):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            pixels = rng.integers(0, 256, (12, 20, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / name / f"{i}.png")  # lossless
            expected.append((pixels, label))
    return expected


# ------------------------------------------------------------------------------ data write


def test_write_embedded_round_trip(tmp_path, capsys):
    out = tmp_path / "emb.beton"
    argv = ["data", "write", "embedded", str(out), "--size", "16", "--num-classes", "2", "--per-class", "3",
            "--seed", "4", "--num-workers", "1"]
    assert cli.main(argv) == 0
    assert f"wrote 6 samples to {out}" in capsys.readouterr().out
    images, labels = read_beton(out)
    want_images, want_labels, _ = generate(EmbeddedSpec(num_classes=2, size=16, train_per_class=3, seed=4), "train")
    assert labels == want_labels.tolist()
    np.testing.assert_array_equal(np.stack(images), want_images)  # raw by default: bit-exact

    # an existing output is refused (and left alone) without --overwrite
    before = out.read_bytes()
    assert cli.main(argv) == 1
    one_line_error(capsys, "exists", "--overwrite")
    assert out.read_bytes() == before
    assert cli.main(argv + ["--overwrite", "--split", "val"]) == 0  # --per-class applies to the split written
    assert "wrote 6 samples" in capsys.readouterr().out


def test_write_cifar_round_trip(tmp_path, capsys):
    batches = make_cifar10(tmp_path / "cifar-10-batches-py")
    out = tmp_path / "test.beton"
    assert cli.main(["data", "write", "cifar", str(tmp_path / "cifar-10-batches-py"), str(out),
                     "--split", "test", "--num-workers", "1"]) == 0
    images, labels = read_beton(out)
    want_images, want_labels = batches["test_batch"]
    assert labels == want_labels
    np.testing.assert_array_equal(np.stack(images), want_images)


def test_write_imagefolder_skips_and_reports_unreadable(tmp_path, capsys):
    expected = make_tree(tmp_path / "src")
    (tmp_path / "src" / "bee" / "broken.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    out = tmp_path / "tree.beton"
    base = ["data", "write", "imagefolder", str(tmp_path / "src"), str(out), "--num-workers", "1"]

    assert cli.main(base) == 1  # default --on-error fail: names the file, writes nothing
    one_line_error(capsys, "broken.jpg", "--on-error skip")
    assert not out.exists()

    assert cli.main(base + ["--on-error", "skip", "--write-mode", "raw"]) == 0
    captured = capsys.readouterr()
    assert "skipped 1 unreadable image(s)" in captured.err and "broken.jpg" in captured.err
    assert "wrote 4 samples" in captured.out
    images, labels = read_beton(out)
    assert labels == [label for _, label in expected]
    for image, (pixels, _) in zip(images, expected):
        np.testing.assert_array_equal(image, pixels)


def test_write_imagefolder_max_resolution_and_jpeg(tmp_path, capsys):
    make_tree(tmp_path / "src")
    out = tmp_path / "small.beton"
    assert cli.main(["data", "write", "imagefolder", str(tmp_path / "src"), str(out), "--max-resolution", "10",
                     "--write-mode", "jpg", "--jpeg-quality", "75", "--chunk-size", "1", "--num-workers", "1"]) == 0
    images, labels = read_beton(out)
    assert labels == [0, 0, 1, 1]
    assert all(max(image.shape[:2]) == 10 for image in images)  # longer side 20 -> 10


@pytest.mark.parametrize("argv, needles", [
    (["cifar", "{tmp}/missing", "{tmp}/o.beton"], ["missing", "is not a directory"]),
    (["imagefolder", "{tmp}/missing", "{tmp}/o.beton"], ["missing", "is not a directory"]),
    (["embedded", "{tmp}/o.beton", "--jpeg-quality", "0"], ["--jpeg-quality"]),
    (["embedded", "{tmp}/o.beton", "--compress-probability", "1.5"], ["--compress-probability"]),
    (["embedded", "{tmp}/o.beton", "--num-classes", "11"], ["--num-classes must be in 1..10"]),
    (["embedded", "{tmp}/o.beton", "--per-class", "0"], ["--per-class must be at least 1"]),
    (["imagefolder", "{tmp}", "{tmp}/o.beton", "--max-resolution", "0"], ["--max-resolution"]),
    (["embedded", "{tmp}/o.beton", "--chunk-size", "0"], ["--chunk-size"]),
    (["embedded", "{tmp}"], ["is a directory"]),
])
def test_write_errors_are_one_line(tmp_path, capsys, argv, needles):
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    assert cli.main(["data", "write", *argv]) == 1
    one_line_error(capsys, *needles)
    assert not (tmp_path / "o.beton").exists()


@pytest.mark.parametrize("argv", [
    ["embedded", "o.beton", "--write-mode", "png"],
    ["cifar", "src", "o.beton", "--split", "val"],
    ["imagefolder", "src"],  # no output
    ["parquet", "src", "o.beton"],
    ["embedded", "o.beton", "--size", "big"],
])
def test_bad_options_are_usage_errors(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["data", "write", *argv])
    assert exit_info.value.code == 2
    assert "usage: kdengine data write" in capsys.readouterr().err


def test_write_help_names_the_sources(capsys):
    with pytest.raises(SystemExit):
        cli.main(["data", "write", "--help"])
    out = capsys.readouterr().out
    for word in ("embedded", "cifar", "imagefolder", "examples:", "--overwrite"):
        assert word in out


# ------------------------------------------------------------------------------ bench data


TINY = ["--num-images", "24", "--batch-size", "8", "--epochs", "2", "--workers", "1"]


def test_bench_data_appends_rows(tmp_path, capsys):
    out_csv = tmp_path / "data.csv"
    assert cli.main(["bench", "data", *TINY, "--cache-root", str(tmp_path / "cache"), "--output", str(out_csv)]) == 0
    out = capsys.readouterr().out
    assert "pil-dataloader" in out and "ffcv" in out and f"appended 2 rows to {out_csv}" in out
    rows = list(csv.DictReader(open(out_csv)))
    assert [r["loader"] for r in rows] == ["pil-dataloader", "ffcv"]
    for r in rows:
        for column in ("commit", "torch_version", "ffcv_version", "device_name", "cpu_cores", "workers",
                       "median_img_s", "p20_img_s", "p80_img_s", "speedup_vs_baseline", "cpu_ms_per_img",
                       "loadavg_1m_start"):
            assert r[column] != "", column
        assert r["workers"] == "1" and r["batch_size"] == "8" and r["epochs"] == "2"
        assert r["output"] == "float32 8x3x224x224 contiguous normalised"
        assert float(r["min_img_s"]) <= float(r["median_img_s"]) <= float(r["max_img_s"])
    assert rows[0]["speedup_vs_baseline"] == "1.0"
    assert rows[1]["implementation"] == "kdengine.data.loaders.make_loader"
    # the image set is cached by its parameters: ImageFolder tree and .beton next to it
    (cached,) = (tmp_path / "cache").iterdir()
    assert len(list((cached / "images").glob("*/*.jpg"))) == 24
    assert (cached / "ffcv-jpg-q90.beton").exists()


def test_bench_data_no_save(tmp_path, capsys, monkeypatch):
    """--no-save appends nothing. The FFCV side is swapped for a second baseline here (its JIT
    compilation costs ~20 s; the real pipeline runs in test_bench_data_appends_rows)."""
    from kdengine.bench import data as bench_data

    monkeypatch.setattr(bench_data, "ffcv_loader", lambda beton, batch, workers: (
        bench_data.baseline_loader(beton.parent / "images", batch, workers), "stub"))
    out_csv = tmp_path / "data.csv"
    assert cli.main(["bench", "data", *TINY, "--workers", "0", "--cache-root", str(tmp_path),
                     "--output", str(out_csv), "--no-save"]) == 0
    out = capsys.readouterr().out
    assert "median img/s" in out and "appended" not in out
    assert not out_csv.exists()


def test_bench_data_rejects_bad_sizes(tmp_path, capsys):
    assert cli.main(["bench", "data", "--num-images", "4", "--batch-size", "8", "--cache-root", str(tmp_path),
                     "--no-save"]) == 1
    one_line_error(capsys, "--num-images")


def test_random_resized_crop_box_stays_inside():
    import random

    from kdengine.bench.data import random_resized_crop_box

    rnd = random.Random(0)
    for height, width in [(350, 400), (30, 500), (500, 30), (224, 224)]:
        for _ in range(200):
            top, left, h, w = random_resized_crop_box(height, width, rnd)
            assert 0 <= top and top + h <= height and 0 <= left and left + w <= width and h > 0 and w > 0
