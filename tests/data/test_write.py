"""kdengine.data.write.write, the library behind `kdengine data write`: one dispatch per source,
checks before any long work, and errors that name the library's settings (the CLI's flags are
tests/test_cli_data.py's)."""
import numpy as np
import pytest

pytest.importorskip("ffcv", reason="FFCV is installed by `make test`; install the [ffcv] extra")

from kdengine.data import OutputExistsError, UnreadableImageError, beton, generate  # noqa: E402
from kdengine.data.embedded import EmbeddedSpec  # noqa: E402
from kdengine.data.write import WriteOptions, write  # noqa: E402
from kdengine.errors import SettingError  # noqa: E402

TINY = dict(size=16, num_classes=2, per_class=3, seed=1)
ONE_WORKER = WriteOptions(num_workers=1)


def test_embedded_reports_generation_and_writes_the_split(tmp_path):
    stages = []
    result = write("embedded", tmp_path / "e.beton", ONE_WORKER, split="val",
                   progress=lambda stage, done, total: stages.append((stage, done, total)), **TINY)
    assert result.samples == 6 and result.write_mode == "raw" and result.source_format == "embedded"
    assert stages[-1] == ("generating images", 6, 6)
    assert result.size_bytes == (tmp_path / "e.beton").stat().st_size


@pytest.mark.parametrize("options, settings, setting", [
    (WriteOptions(jpeg_quality=0), {}, "jpeg_quality"),
    (WriteOptions(write_mode="png"), {}, "write_mode"),
    (WriteOptions(compress_probability=1.5), {}, "compress_probability"),
    (WriteOptions(chunk_size=0), {}, "chunk_size"),
    (WriteOptions(num_workers=0), {}, "num_workers"),
    (None, {"per_class": 0}, "per_class"),
    (None, {"num_classes": 11}, "num_classes"),
    (None, {"split": "test"}, "split"),
])
def test_bad_settings_are_named_as_the_library_spells_them(tmp_path, monkeypatch, options, settings, setting):
    monkeypatch.setattr(beton, "generate", _never)  # every check runs before the generation
    with pytest.raises(SettingError) as info:
        write("embedded", tmp_path / "o.beton", options, **{**TINY, **settings})
    assert info.value.setting == setting
    assert str(info.value).startswith(setting) and "--" not in str(info.value)
    assert not (tmp_path / "o.beton").exists()


def test_existing_output_is_refused_before_any_work(tmp_path, monkeypatch):
    out = tmp_path / "o.beton"
    out.write_bytes(b"keep me")
    monkeypatch.setattr(beton, "generate", _never)
    with pytest.raises(OutputExistsError) as info:
        write("embedded", out, ONE_WORKER, **TINY)
    assert info.value.path == out and "overwrite=True" in str(info.value) and "--" not in str(info.value)
    assert out.read_bytes() == b"keep me"


def test_imagefolder_unreadable_image_names_the_setting(tmp_path):
    from PIL import Image

    (tmp_path / "src" / "a").mkdir(parents=True)
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "src" / "a" / "ok.png")
    (tmp_path / "src" / "a" / "bad.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(UnreadableImageError) as info:
        write("imagefolder", tmp_path / "o.beton", ONE_WORKER, source=tmp_path / "src")
    assert info.value.path.name == "bad.jpg" and len(info.value.skipped) == 1
    assert "on_error='skip'" in str(info.value) and "--" not in str(info.value)
    result = write("imagefolder", tmp_path / "o.beton", ONE_WORKER, source=tmp_path / "src", on_error="skip",
                   progress=lambda *report: None)
    assert result.samples == 1 and [p.name for p, _ in result.skipped] == ["bad.jpg"]


def test_unknown_format_and_settings(tmp_path):
    with pytest.raises(SettingError, match="source_format must be one of"):
        write("parquet", tmp_path / "o.beton")
    with pytest.raises(TypeError, match=r"unexpected settings \['size'\]"):
        write("cifar", tmp_path / "o.beton", source=tmp_path, size=32)
    with pytest.raises(SettingError, match="source is required"):
        write("imagefolder", tmp_path / "o.beton")


def test_generate_reports_progress_in_order():
    spec = EmbeddedSpec(num_classes=2, size=16, train_per_class=600, seed=2)
    reports = []
    images, _, _ = generate(spec, "train", workers=2, progress=lambda done, total: reports.append((done, total)))
    assert [total for _, total in reports] == [1200] * len(reports)
    assert [done for done, _ in reports] == sorted(done for done, _ in reports) and reports[-1][0] == 1200
    assert len(reports) > 1  # 16-px images: 1024 per chunk
    np.testing.assert_array_equal(images, generate(spec, "train", workers=1)[0])


def _never(*args, **kwargs):
    raise AssertionError("generation started before the checks finished")
