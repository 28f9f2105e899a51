"""`kdengine viz RUN_DIR`'s analyses on tiny runs: the numbers in iou.json and calibration.json
against independent computations and the engine's own evaluation."""
import json

import pytest
import torch
import torch.nn.functional as F

from kdengine.data import EmbeddedSpec, generate
from kdengine.viz.analysis import analyze_run, iou_scores
from kdengine.viz.calibration import expected_calibration_error
from kdengine.viz.maps import compute_maps
from kdengine.viz.regions import cam_region, iou, mean_iou, similarity_regions
from kdengine.viz.runs import load_checkpoint, read_records, validation_data


@pytest.fixture(scope="module")
def analysed(tiny_runs):
    return analyze_run(tiny_runs["adm"], device="cpu", images=3, iou_images=24)


def test_every_picture_and_its_numbers_are_written(analysed, tiny_runs):
    run = tiny_runs["adm"]
    for name in ("curves.png", "maps.png", "iou.png", "iou.json", "calibration.png", "calibration.json"):
        assert (run / name).stat().st_size > 0, name
    assert set(analysed["files"]) == {"curves", "maps", "iou", "calibration"}
    assert analysed["checkpoint"]["epoch"] == 2 and analysed["mappings"] == {"teacher~student": "ADM connector"}


def test_iou_over_the_kept_epochs(analysed, tiny_runs):
    result = json.loads((tiny_runs["adm"] / "iou.json").read_text())
    assert result["checkpoints"] == "per epoch" and result["images"] == 24
    assert [r["epoch"] for r in result["epochs"]] == [1, 2]
    # the whole image's IoU with the object is the object's area share
    e = load_checkpoint(tiny_runs["adm"] / "checkpoint.pt", "cpu").cfg.data.embedded
    _, _, masks = generate(EmbeddedSpec(e.num_classes, e.size, e.train_per_class, e.val_per_class, e.seed), "val")
    share = 100 * masks[:24].reshape(24, -1).mean(1).mean()
    for row in result["epochs"]:
        assert row["whole image"] == pytest.approx(share, rel=1e-5)
        for key in ("cam/teacher", "cam/student", "similar/teacher~student", "discrepant/teacher~student"):
            assert 0 <= row[key] <= 100
    # the last epoch's numbers, recomputed from the maps
    loaded = load_checkpoint(tiny_runs["adm"] / "checkpoint.pt", "cpu")
    maps = compute_maps(loaded, validation_data(loaded.cfg, loaded.precision, limit=24), keep_pixels=0)
    similar, discrepant = similarity_regions(maps.pairs[0].sim, (16, 16))
    last = result["epochs"][-1]
    assert last["similar/teacher~student"] == pytest.approx(mean_iou(iou(similar, maps.masks)), rel=1e-6)
    assert last["discrepant/teacher~student"] == pytest.approx(mean_iou(iou(discrepant, maps.masks)), rel=1e-6)
    assert last["cam/student"] == pytest.approx(mean_iou(iou(cam_region(maps.cams["student"], (16, 16)),
                                                             maps.masks)), rel=1e-6)
    assert iou_scores(maps) == pytest.approx({k: v for k, v in last.items() if k != "epoch"})


def test_calibration_matches_the_engine_evaluation(analysed, tiny_runs):
    run = tiny_runs["adm"]
    saved = json.loads((run / "calibration.json").read_text())
    assert saved["epoch"] == 2 and list(saved["models"]) == ["teacher", "student", "ensemble"]
    val = [r for r in read_records(run) if r["split"] == "val"][-1]
    for tag, d in saved["models"].items():
        # the bins' correct count is the top-1 the trainer logged for the same epoch
        correct = sum(a * n for a, n in zip(d["accuracy"], d["count"]) if n)
        assert 100 * correct / sum(d["count"]) == pytest.approx(val[f"{tag}/top1"], abs=1e-6)
    # the ECE, independently from the concatenated probabilities
    loaded = load_checkpoint(run / "checkpoint.pt", "cpu")
    probs, labels = [], []
    with torch.no_grad():
        for images, y, _ in validation_data(loaded.cfg, loaded.precision).batches():
            probs.append(torch.stack([F.softmax(m(images).logits, 1) for m in loaded.models]))
            labels.append(y)
    probs, labels = torch.cat(probs, 1), torch.cat(labels)
    for i, tag in enumerate(loaded.tags):
        assert saved["models"][tag]["ece"] == pytest.approx(expected_calibration_error(probs[i], labels), abs=1e-4)
    assert saved["models"]["ensemble"]["ece"] == pytest.approx(expected_calibration_error(probs.mean(0), labels),
                                                               abs=1e-4)


def test_a_run_without_checkpoint_gets_its_curves_only(tiny_runs, tmp_path):
    run = tmp_path / "metrics-only"
    run.mkdir()
    (run / "metrics.jsonl").write_text((tiny_runs["dml"] / "metrics.jsonl").read_text())
    result = analyze_run(run)
    assert list(result["files"]) == ["curves"] and "curves only" in result["notes"][0]
    with pytest.raises(FileNotFoundError, match="checkpoint.pt"):
        analyze_run(run, kinds=["maps"])
    with pytest.raises(ValueError, match="unknown kind"):
        analyze_run(run, kinds=["nope"])
