"""The maps behind the pictures: CAMs, S against the cosine_similarity_map op, ADM's maps, the
least-squares map, on random models and on tiny trained runs."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from kdengine import ops
from kdengine.engine.checkpoint import epoch_checkpoints
from kdengine.models import create_model
from kdengine.viz.maps import (
    class_activation_map,
    compute_maps,
    least_squares_map,
    linear_head,
    model_pairs,
    pair_maps,
    plot_maps,
)
from kdengine.viz.runs import load_checkpoint, validation_data


@pytest.mark.parametrize("name", ["resnet8", "wrn_16_2"])
def test_cam_spread_over_the_map_is_the_logit(name):
    model = create_model(name, num_classes=5).eval()
    with torch.no_grad():
        out = model(torch.randn(3, 3, 16, 16))
    head = linear_head(model)
    assert head is model.head
    pred = out.logits.argmax(1)
    cam = class_activation_map(out.features[-1], head.weight, pred)
    assert cam.shape == (3, *out.features[-1].shape[-2:])
    logit = out.logits.gather(1, pred[:, None]).squeeze(1)
    assert torch.allclose(cam.mean(dim=(1, 2)) + head.bias[pred], logit, atol=1e-5)


def test_linear_head_only_for_a_linear_classifier():
    class Model(nn.Module):
        def __init__(self, head):
            super().__init__()
            self.classifier = head

        @property
        def head(self):
            return self.classifier

    assert isinstance(linear_head(Model(nn.Sequential(nn.Dropout(0.2), nn.Linear(4, 2)))), nn.Linear)
    assert linear_head(Model(nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2)))) is None
    assert linear_head(nn.Linear(2, 2)) is None  # no head at all


def test_s_is_cosine_similarity_map_and_adm_maps_are_the_reference():
    torch.manual_seed(0)
    fs, ft = torch.randn(2, 6, 4, 4), torch.randn(2, 6, 4, 4)
    sim, co, di = pair_maps(fs, ft, eps=1e-5)
    assert torch.equal(sim, ops.cosine_similarity_map(fs, ft))
    assert torch.allclose(sim, F.cosine_similarity(fs, ft, dim=1), atol=1e-6)
    ref_co, ref_di = ops.adm_attention_reference(fs, ft, 1e-5)
    assert torch.equal(co, ref_co) and torch.equal(di, ref_di)


def test_least_squares_recovers_an_exact_linear_map():
    torch.manual_seed(0)
    weight, bias = torch.randn(5, 3), torch.randn(5)
    fs = torch.randn(10, 3, 4, 4)
    ft = torch.einsum("nchw,dc->ndhw", fs, weight) + bias.view(1, -1, 1, 1)
    w, b = least_squares_map(fs, ft, ridge=0.0)
    assert torch.allclose(w, weight, atol=1e-4) and torch.allclose(b, bias, atol=1e-4)


def test_pairs_follow_adm_then_roles():
    assert model_pairs(["teacher", "student", "student"], None) == [(0, 1), (0, 2)]
    assert model_pairs(["student", "student", "student"], None) == [(0, 1), (0, 2), (1, 2)]


def test_adm_run_maps_use_its_connector(tiny_runs):
    loaded = load_checkpoint(tiny_runs["adm"] / "checkpoint.pt", device="cpu")
    assert loaded.epoch == 2 and loaded.adm is not None
    data = validation_data(loaded.cfg, loaded.precision, limit=20)
    maps = compute_maps(loaded, data, keep_pixels=3)
    assert maps.labels.shape == (20,) and maps.masks.shape == (20, 16, 16) and maps.pixels.shape == (3, 16, 16, 3)
    (pair,) = maps.pairs
    assert pair.name == "teacher~student" and pair.mapping == "ADM connector"
    # S, independently: the run's connector on the student's last stage against the teacher's
    images, labels, _ = next(data.batches())
    with torch.no_grad():
        out_t, out_s = (m(images) for m in loaded.models)
        mapped = loaded.adm.losses[0].connectors[-1](out_s.features[-1])
        expected = ops.cosine_similarity_map(mapped, out_t.features[-1])
    assert mapped.shape[1] == 128 and torch.allclose(pair.sim, expected, atol=1e-5)
    assert pair.attn_co.mean(dim=(1, 2)).sub(1).abs().max() < 1e-3  # A_co averages to 1 per image
    for tag, out in zip(loaded.tags, (out_t, out_s)):
        pred = out.logits.argmax(1)
        assert torch.allclose(maps.cams[tag].mean(dim=(1, 2)) + linear_head(loaded.models[loaded.tags.index(tag)])
                              .bias[pred], out.logits.gather(1, pred[:, None]).squeeze(1), atol=1e-4)
    # the displayed pixels are the generated images (the validation pipeline only normalises)
    from kdengine.data import EmbeddedSpec, generate

    e = loaded.cfg.data.embedded
    raw, _, masks = generate(EmbeddedSpec(e.num_classes, e.size, e.train_per_class, e.val_per_class, e.seed), "val")
    assert (abs(maps.pixels.astype(int) - raw[:3].astype(int)) <= 1).all()
    assert torch.equal(maps.masks, torch.from_numpy(masks[:20]))


def test_dml_run_maps_use_a_least_squares_map(tiny_runs, tmp_path):
    loaded = load_checkpoint(tiny_runs["dml"] / "checkpoint.pt", device="cpu")
    assert loaded.adm is None
    maps = compute_maps(loaded, validation_data(loaded.cfg, loaded.precision, limit=24), keep_pixels=4)
    (pair,) = maps.pairs
    assert pair.mapping == "least squares"
    assert any("least-squares" in n for n in maps.notes)
    assert pair.sim.shape == (24, 4, 4) and pair.sim.abs().max() <= 1 + 1e-5
    path = plot_maps(maps, tmp_path / "maps.png", images=4, class_names=["a", "b", "c", "d"], title="t")
    from PIL import Image

    width, height = Image.open(path).size
    assert width > height  # 6 columns (image, S, A_co, A_di, 2 CAMs) by 4 rows


def test_epoch_checkpoints_are_found_in_order(tiny_runs):
    found = epoch_checkpoints(tiny_runs["adm"])
    assert [e for e, _ in found] == [1, 2]
    assert [load_checkpoint(p, "cpu").epoch for _, p in found] == [1, 2]
