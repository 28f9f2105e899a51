"""The engine's segmentation task (data.task=segmentation): metrics, schedule, configuration, the
embedded segmentation data, training, evaluation, resume, the sweep table and the pictures."""
import json
import math

import numpy as np
import pytest
import torch

from kdengine.engine import Trainer, load_config
from kdengine.engine.config import ConfigError, num_classes_of
from kdengine.engine.metrics import confusion_matrix, pixel_accuracy, primary_metric, segmentation_scores
from kdengine.engine.schedule import lr_lambda

# 4 shape classes (+ background) at 32 px: the smallest run whose 4 x 4 feature grid still
# separates object and background.
SEG_TINY = [
    "data.task=segmentation", "data.embedded.size=32", "data.embedded.num_classes=4",
    "data.embedded.train_per_class=8", "data.embedded.val_per_class=4", "data.batch_size=8", "data.num_workers=1",
    "models.0.name=deeplabv3_resnet18", "models.0.kwargs={width: 8, head_channels: 16}",
    "models.1.name=pspnet_resnet18", "models.1.kwargs={width: 8, head_channels: 8}",
    "train.epochs=2", "train.device=cpu", "train.tensorboard=false", "train.log_every=2", "optim.lr=0.02",
    "optim.schedule=poly",
]


@pytest.fixture
def seg_tiny(tmp_path, monkeypatch):
    monkeypatch.setenv("KDENGINE_CACHE", str(tmp_path / "cache"))
    return SEG_TINY + [f"train.output_dir={tmp_path / 'runs'}"]


# ----------------------------------------------------------------------------------- metrics


def test_confusion_matrix_and_scores_against_a_loop():
    gen = torch.Generator().manual_seed(0)
    k = 4
    target = torch.randint(0, k, (3, 5, 6), generator=gen)
    target[0, 0, :] = 255  # ignored
    pred = torch.randint(0, k, (3, 5, 6), generator=gen)
    conf = confusion_matrix(pred, target, k, 255)
    expected = np.zeros((k, k), np.int64)
    for t, p in zip(target.flatten().tolist(), pred.flatten().tolist()):
        if t != 255:
            expected[t, p] += 1
    assert np.array_equal(conf.numpy(), expected)
    scores = segmentation_scores(conf)
    ious = []
    for c in range(k):
        tp = expected[c, c]
        union = expected[c, :].sum() + expected[:, c].sum() - tp
        ious.append(tp / union)
    assert scores["miou"] == pytest.approx(100 * np.mean(ious))
    assert scores["pixel_accuracy"] == pytest.approx(100 * np.trace(expected) / expected.sum())


def test_a_class_in_neither_labels_nor_predictions_is_left_out_of_the_mean():
    target = torch.tensor([[[0, 0, 1, 1]]])
    pred = torch.tensor([[[0, 1, 1, 1]]])
    scores = segmentation_scores(confusion_matrix(pred, target, 3))
    assert math.isnan(scores["iou"][2])
    assert scores["miou"] == pytest.approx(100 * (1 / 2 + 2 / 3) / 2)


def test_confusion_matrix_refuses_labels_outside_the_classes():
    with pytest.raises(ValueError, match="labels >= num_classes=3"):
        confusion_matrix(torch.zeros(1, 2, 2, dtype=torch.long), torch.full((1, 2, 2), 7), 3)


def test_pixel_accuracy_counts_labelled_pixels_at_the_logit_grid():
    logits = torch.zeros(1, 2, 2, 2)
    logits[0, 1, 0, :] = 1.0  # row 0 predicts class 1, row 1 class 0
    labels = torch.tensor([[[1, 1, 1, 1], [1, 1, 1, 1], [0, 0, 255, 255], [0, 0, 255, 255]]])
    # nearest-downsampled to 2 x 2: [[1, 1], [0, 255]]: 3 labelled pixels, all right
    assert float(pixel_accuracy(logits, labels)) == 1.0
    labels[0, 0, 0] = 0  # the sampled pixel of (0, 0) becomes class 0: 2 of 3
    assert float(pixel_accuracy(logits, labels)) == pytest.approx(2 / 3)


def test_primary_metric():
    assert primary_metric({"student/top1": 1.0}) == "top1"
    assert primary_metric({"student/miou": 1.0, "student/pixel_accuracy": 2.0}) == "miou"


def test_poly_schedule():
    cfg = load_config(overrides=["optim.schedule=poly", "optim.power=0.9"])
    factor = lr_lambda(cfg.optim, steps_per_epoch=10, epochs=3)
    assert factor(0) == 1.0
    assert factor(15) == pytest.approx((1 - 15 / 30) ** 0.9)
    assert factor(30) == 0.0


# ----------------------------------------------------------------------------------- configuration


def test_config_checks_the_task_against_the_models():
    with pytest.raises(ConfigError, match="models.0.name=deeplabv3_resnet18 does not fit data.task=classification"):
        load_config(overrides=["models.0.name=deeplabv3_resnet18"])
    with pytest.raises(ConfigError, match="models.0.name=wrn_16_2 does not fit data.task=segmentation"):
        load_config(overrides=["data.task=segmentation"])
    with pytest.raises(ConfigError, match="data.task"):
        load_config(overrides=["data.task=detection"])


def test_config_checks_the_segmentation_options(seg_tiny):
    cfg = load_config(overrides=seg_tiny)
    assert num_classes_of(cfg) == 5  # the shapes and the background
    bad = {"data.crop_size=[32]": "data.crop_size", "data.scale_range=[2.0, 1.0]": "data.scale_range",
           "data.ignore_index=300": "data.ignore_index", "data.mixup=0.8": "classification option",
           "method.options={seg: {ignore_index: 0}}": "differs from data.ignore_index",
           "data.dataset=beton": "needs data.crop_size"}
    for override, message in bad.items():
        with pytest.raises(ConfigError, match=message):
            load_config(overrides=[*seg_tiny, override])
    with pytest.raises(ConfigError, match="data.train_path"):
        load_config(overrides=[*seg_tiny, "data.dataset=beton", "data.crop_size=[32, 32]"])


def test_the_cityscapes_configs_load():
    from pathlib import Path

    for path in sorted(Path(__file__).parents[2].joinpath("configs", "cityscapes").glob("*.yaml")):
        cfg = load_config(str(path))
        assert cfg.data.task == "segmentation" and num_classes_of(cfg) == 19, path
        assert cfg.optim.schedule == "poly" and cfg.train.sync_bn, path


def test_embedded_segmentation_labels_are_the_class_on_the_object():
    from kdengine.data import EmbeddedSpec, generate
    from kdengine.engine.datasets import embedded_segmentation

    spec = EmbeddedSpec(num_classes=3, size=32, train_per_class=2, val_per_class=2, seed=0)
    images, labels, masks = generate(spec, "val")
    seg_images, maps = embedded_segmentation(spec, "val")
    assert np.array_equal(seg_images, images)
    for i in range(len(labels)):
        assert set(np.unique(maps[i])) <= {0, labels[i] + 1}
        assert np.array_equal(maps[i] > 0, masks[i] > 0)


# ----------------------------------------------------------------------------------- training


@pytest.mark.parametrize("method", ["dml+adm", "vanilla"])
def test_trains_evaluates_and_reports_miou(seg_tiny, method, capsys):
    from kdengine.cli import main

    trainer = Trainer(load_config(overrides=[*seg_tiny, f"method.name={method}", "train.epochs=1"]), progress=False)
    summary = trainer.fit()
    assert summary["status"] == "completed"
    last = summary["last"]
    for tag in ("teacher", "student", "ensemble"):
        assert 0 <= last[f"{tag}/miou"] <= 100 and 0 <= last[f"{tag}/pixel_accuracy"] <= 100
        assert math.isfinite(last[f"{tag}/loss"])
        assert f"{tag}/iou/background" in last and f"{tag}/iou/disc" in last
    assert summary["best"]["student"] == last["student/miou"]
    train = [r for r in trainer.log.records() if r["split"] == "train"][0]
    assert 0 <= train["student/pixel_accuracy"] <= 100
    if method == "dml+adm":
        assert {"co/1", "di/0", "feat/1", "kl/0"} <= set(train)
    # kdengine eval of the checkpoint gives the numbers the run logged, with the per-class table
    assert main(["eval", str(trainer.run_dir)]) == 0
    out = capsys.readouterr().out
    assert "IoU per class" in out and "background" in out and f"{last['student/miou']:.2f}" in out


def test_a_resumed_segmentation_run_equals_an_uninterrupted_one(seg_tiny, tmp_path):
    whole = Trainer(load_config(overrides=[*seg_tiny, "train.run_name=whole"]), progress=False)
    whole.fit()
    first = Trainer(load_config(overrides=[*seg_tiny, "train.run_name=part", "train.max_steps=3"]), progress=False)
    first.fit()
    rest = Trainer(load_config(overrides=[*seg_tiny, "train.run_name=part", "train.resume=auto"]), progress=False)
    rest.fit()
    a = [r for r in whole.log.records() if r["split"] == "val"]
    b = [r for r in rest.log.records() if r["split"] == "val"]
    assert [r["student/miou"] for r in a] == [r["student/miou"] for r in b]
    for key, value in whole.models[1].state_dict().items():
        assert torch.equal(rest.models[1].state_dict()[key], value), key


def test_sweep_table_of_segmentation_runs_shows_miou(tmp_path):
    from kdengine.sweep.plan import merge_plan, plan_runs
    from kdengine.sweep.table import to_csv, to_markdown, write_tables

    sweep = tmp_path / "sw"
    runs = plan_runs(["method.name=dml,dml+adm", "train.seed=0,1"])
    merge_plan(sweep, None, runs, "train.seed")
    for i, run in enumerate(runs):
        d = sweep / run.name
        d.mkdir(parents=True)
        (d / "config.yaml").write_text("train: {epochs: 1}\n")
        (d / "metrics.jsonl").write_text(json.dumps({"epoch": 0, "split": "val", "student/miou": 40.0 + i,
                                                     "student/pixel_accuracy": 90.0}) + "\n")
    table, _ = write_tables(sweep)
    assert table.metric == "miou"
    assert "student mIoU (last)" in to_markdown(table) and "miou_last_mean" in to_csv(table)
    row = {tuple(r.values.values()): r for r in table.rows}[("dml",)]
    assert row.stats["student"]["last"][0] == pytest.approx(40.5)


def test_segmentation_pictures(seg_tiny):
    from kdengine import ops
    from kdengine.viz.analysis import analyze_run
    from kdengine.viz.runs import load_checkpoint, validation_data
    from kdengine.viz.segmaps import compute_segmentation_maps, object_iou_scores

    trainer = Trainer(load_config(overrides=[*seg_tiny, "method.name=dml+adm", "train.epochs=1"]), progress=False)
    trainer.fit()
    loaded = load_checkpoint(trainer.run_dir / "checkpoint.pt", "cpu")
    data = validation_data(loaded.cfg, loaded.precision, limit=6)
    maps = compute_segmentation_maps(loaded, data, keep_pixels=2)
    assert maps.labels.shape == (6, 32, 32) and maps.pixels.shape == (2, 32, 32, 3)
    pair = maps.pairs[0]
    assert pair.mapping == "ADM connector"
    # S is the cosine of the connector-mapped student head feature and the teacher's
    images, labels, _ = next(iter(data.batches()))
    with torch.no_grad():
        out_t, out_s = (m(images) for m in loaded.models)
        mapped = loaded.adm.losses[0].head_connector(out_s.head_feature)
        expected = ops.cosine_similarity_map_reference(mapped, out_t.head_feature)
    assert torch.allclose(pair.sim, expected, atol=1e-5)
    scores = object_iou_scores(maps)
    assert {"similar/teacher~student", "discrepant/teacher~student", "foreground/student", "whole image"} <= set(scores)
    result = analyze_run(trainer.run_dir, ["maps", "iou"], device="cpu", images=3, iou_images=6)
    assert result["files"]["maps"][0].is_file() and result["iou"]["epochs"][0]["epoch"] == 1


def test_object_iou_scores_on_known_regions():
    from kdengine.viz.segmaps import SegMapSet, SegPairMaps, object_iou_scores

    labels = torch.zeros(1, 4, 4, dtype=torch.long)
    labels[0, :2, :] = 3  # the object: the top half
    sim = torch.full((1, 4, 4), -1.0)
    sim[0, :2, :] = 1.0  # similar exactly on the object
    pred = labels.clone()
    pred[0, 1, :] = 0  # the student finds half the object
    pair = SegPairMaps(0, 1, "teacher~student", "identity", sim, sim, sim)
    maps = SegMapSet(["teacher", "student"], labels, labels > 0, {"teacher": labels.clone(), "student": pred},
                     np.zeros((0, 4, 4, 3), np.uint8), [pair], 255)
    scores = object_iou_scores(maps)
    assert scores["similar/teacher~student"] == pytest.approx(100.0)
    assert scores["discrepant/teacher~student"] == pytest.approx(0.0)
    assert scores["foreground/teacher"] == pytest.approx(100.0)
    assert scores["foreground/student"] == pytest.approx(50.0)
    assert scores["whole image"] == pytest.approx(50.0)
    assert scores["pixel_accuracy/student"] == pytest.approx(100 * 12 / 16)
