"""The PAT/OFA recipe features: AdamW and its weight-decay groups, gradient clipping, EMA of the
student, mixup / cutmix / label smoothing as soft targets, RandAugment, random erasing and
resizing on the device-resident loader, and a ViT student trained with them."""
import json
import math

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from omegaconf import OmegaConf

from kdengine.data import DeviceLoader
from kdengine.data.augment import (
    RAND_AUGMENT_OPS,
    BatchMix,
    RandAugment,
    RandomErasing,
    parse_rand_augment,
)
from kdengine.engine import Trainer, load_config
from kdengine.engine import checkpoint as ckpt
from kdengine.engine.config import ConfigError, OptimConfig
from kdengine.engine.ema import ModelEma
from kdengine.engine.setup import Precision
from kdengine.engine.step import JointStep, build_optimizer
from kdengine.methods import KD, Method, build_method
from kdengine.models import create_model
from kdengine.models.base import ModelOutput
from tests.models.timm_layouts import vit

CPU = torch.device("cpu")


def _optim(**kw):
    return OmegaConf.structured(OptimConfig(**kw))


class _Tiny(nn.Module):
    """Conv + BN + linear: weights, biases, 1-D norm parameters and integer buffers."""

    def __init__(self, classes=3):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.head = nn.Linear(4, classes)

    def forward(self, x):
        f = F.relu(self.bn(self.conv(x)))
        return ModelOutput(self.head(f.mean((2, 3))), [f])


def _vanilla(models, classes=3):
    return build_method("vanilla", models, roles=["student"] * len(models), num_classes=classes)


# ---------------------------------------------------------------------------------- optimizer


def test_adamw_takes_no_weight_decay_on_biases_and_1d_parameters():
    model = create_model("deit_tiny_patch16_224", num_classes=3, img_size=32)
    method = _vanilla([model])
    opt = build_optimizer(_optim(name="adamw", lr=5e-4, weight_decay=0.05), [model], [None], [True], method, CPU)
    assert isinstance(opt, torch.optim.AdamW)
    decay, no_decay = opt.param_groups
    names = {id(p): n for n, p in model.named_parameters()}
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    assert all(p.ndim > 1 and not names[id(p)].endswith(".bias") for p in decay["params"])
    assert all(p.ndim <= 1 or names[id(p)].endswith(".bias") for p in no_decay["params"])
    assert {names[id(p)] for p in no_decay["params"]} >= {"norm.weight", "head.bias", "blocks.0.norm1.weight"}
    assert "cls_token" in {names[id(p)] for p in decay["params"]}  # 3-D: decayed, as timm does without a skip list
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))
    assert decay["initial_lr"] == no_decay["initial_lr"] == 5e-4


def test_sgd_keeps_one_group_per_model_unless_asked_to_split():
    models = [_Tiny(), _Tiny()]
    method = _vanilla(models)
    opt = build_optimizer(_optim(), models, [None, 0.01], [True, True], method, CPU)
    assert isinstance(opt, torch.optim.SGD) and not opt.defaults["nesterov"]
    assert [len(g["params"]) for g in opt.param_groups] == [6, 6]
    assert [g["initial_lr"] for g in opt.param_groups] == [0.05, 0.01]
    split = build_optimizer(_optim(nesterov=True, decay_1d=False), models, [None, 0.01], [True, True], method, CPU)
    assert split.defaults["nesterov"]
    assert [(len(g["params"]), g["weight_decay"]) for g in split.param_groups] == \
        [(2, 5e-4), (4, 0.0), (2, 5e-4), (4, 0.0)]  # conv.weight, head.weight | biases, bn


def _step(models, method, optimizer, **kw):
    return JointStep(models, method, optimizer, Precision(CPU, None, False), ["student"] * len(models), **kw)


def test_gradient_clipping_bounds_the_total_norm():
    torch.manual_seed(0)
    model = _Tiny()
    method = _vanilla([model])
    opt = build_optimizer(_optim(), [model], [None], [True], method, CPU)
    step = _step([model], method, opt, clip_grad=0.01)
    step(torch.randn(8, 3, 8, 8), torch.randint(0, 3, (8,)))
    norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in model.parameters()]))
    assert norm == pytest.approx(0.01, rel=1e-4)


class _Gated(Method):
    """Two models, each its own CE; model 0's optimizer step is gated off."""

    def __init__(self):
        super().__init__(["student", "student"], 3)
        self.register_buffer("gates", torch.tensor([0.0, 1.0]))

    def losses(self, outputs, target, terms):
        for m, out in enumerate(outputs):
            terms[f"ce/{m}"] = F.cross_entropy(out.logits, target)

    def step_gates(self):
        return self.gates


def test_a_gated_model_keeps_its_weights_and_adam_state():
    torch.manual_seed(0)
    models, method = [_Tiny(), _Tiny()], _Gated()
    opt = build_optimizer(_optim(name="adamw", lr=1e-2), models, [None, None], [True, True], method, CPU)
    step = _step(models, method, opt)
    x, y = torch.randn(8, 3, 8, 8), torch.randint(0, 3, (8,))
    method.gates.fill_(1.0)
    step(x, y)  # both step once: Adam state exists
    before = [{k: v.clone() for k, v in m.state_dict().items()} for m in models]
    state0 = {k: v.clone() for k, v in opt.state[models[0].conv.weight].items()}
    method.gates.copy_(torch.tensor([0.0, 1.0]))
    step(x, y)
    for k, v in models[0].state_dict().items():
        if v.is_floating_point() and "running" not in k:
            assert torch.equal(v, before[0][k]), k
    for k, v in opt.state[models[0].conv.weight].items():
        assert torch.equal(v, state0[k]), k
    assert not torch.equal(models[1].conv.weight, before[1]["conv.weight"])


# ---------------------------------------------------------------------------------- EMA


def test_ema_follows_timm_model_ema_v2():
    torch.manual_seed(0)
    model = _Tiny()
    ema = ModelEma(model, 0.9)
    start = {k: v.clone() for k, v in ema.state_dict().items()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p))
    model.train()(torch.randn(4, 3, 8, 8))  # moves the BN statistics and counter
    ema.update()
    for k, v in model.state_dict().items():
        got = ema.state_dict()[k]
        if v.is_floating_point():  # decay * ema + (1 - decay) * model, buffers included
            assert torch.allclose(got, 0.9 * start[k] + 0.1 * v, atol=1e-6), k
        else:
            assert torch.equal(got, v), k
    assert not any(p.requires_grad for p in ema.module.parameters()) and not ema.module.training
    with pytest.raises(ValueError, match="decay"):
        ModelEma(model, 1.0)


# ---------------------------------------------------------------------------------- mixup / cutmix


def test_label_smoothing_targets_give_torchs_label_smoothing_cross_entropy():
    mix = BatchMix(5, label_smoothing=0.1)
    images, labels = torch.randn(6, 3, 4, 4), torch.tensor([0, 1, 2, 3, 4, 0])
    out, targets = mix(images, labels, step=0)
    assert out is images and targets.shape == (6, 5)
    assert torch.allclose(targets.sum(1), torch.ones(6))
    z = torch.randn(6, 5)
    assert F.cross_entropy(z, targets) == pytest.approx(F.cross_entropy(z, labels, label_smoothing=0.1).item(),
                                                        rel=1e-6)


def test_mixup_blends_the_batch_with_its_reverse_and_the_targets_alike():
    mix = BatchMix(4, mixup=0.8)
    images, labels = torch.randn(6, 3, 5, 5), torch.tensor([0, 1, 2, 3, 0, 1])
    lam, cut, _ = mix.params(7, 5, 5, CPU)
    assert not cut and 0 < lam < 1
    out, targets = mix(images, labels, step=7)
    assert torch.allclose(out, lam * images + (1 - lam) * images.flip(0), atol=1e-6)
    onehot = F.one_hot(labels, 4).float()
    assert torch.allclose(targets, lam * onehot + (1 - lam) * onehot.flip(0))
    again, _ = mix(images, labels, step=7)
    other, _ = mix(images, labels, step=8)
    assert torch.equal(out, again) and not torch.equal(out, other)  # the step is the seed


def test_cutmix_pastes_a_box_of_the_reversed_batch_and_lam_is_the_kept_area():
    mix = BatchMix(3, cutmix=1.0, label_smoothing=0.1)
    images, labels = torch.randn(4, 3, 16, 16), torch.tensor([0, 1, 2, 0])
    for step in range(20):
        lam, cut, (top, bottom, left, right) = mix.params(step, 16, 16, CPU)
        out, targets = mix(images, labels, step)
        inside = torch.zeros(16, 16, dtype=torch.bool)
        inside[top:bottom, left:right] = True
        assert cut and lam == pytest.approx(1 - inside.float().mean().item())
        assert torch.equal(out[..., inside], images.flip(0)[..., inside])
        assert torch.equal(out[..., ~inside], images[..., ~inside])
        smooth = F.one_hot(labels, 3).float() * 0.9 + 0.1 / 3
        assert torch.allclose(targets, lam * smooth + (1 - lam) * smooth.flip(0))


def test_mix_draws_follow_timm_probabilities():
    both = BatchMix(3, mixup=0.8, cutmix=1.0, switch_prob=0.5, mix_prob=0.5)
    draws = [both.params(s, 8, 8, CPU) for s in range(400)]
    mixed = [(lam, cut) for lam, cut, _ in draws if lam < 1]
    assert 0.4 < len(mixed) / 400 < 0.6  # mix_prob
    assert 0.35 < np.mean([bool(c) for _, c in mixed]) < 0.65  # switch_prob
    mixup_lams = [float(lam) for lam, c in mixed if not c]
    assert 0.4 < np.mean(mixup_lams) < 0.6  # Beta(0.8, 0.8) has mean 0.5
    off = BatchMix(3, mixup=0.8, mix_prob=0.0)
    images = torch.randn(2, 3, 4, 4)
    assert not off.mixes and off(images, torch.tensor([0, 1]), 0)[0] is images


# ---------------------------------------------------------------------------------- RandAugment


def test_parse_rand_augment_reads_timms_strings():
    spec = parse_rand_augment("rand-m9-mstd0.5-inc1")
    assert (spec.magnitude, spec.num_layers, spec.magnitude_std, spec.increasing, spec.prob) == (9, 2, 0.5, True, 0.5)
    assert parse_rand_augment("rand-n3-m7-p0.8").num_layers == 3
    assert parse_rand_augment("rand-mstd101").magnitude_std == math.inf
    for bad in ("auto-m9", "rand-m9-x1", "rand-tweights"):
        with pytest.raises(ValueError, match="RandAugment"):
            parse_rand_augment(bad)


def _pil_reference():
    """Each op as timm applies it to a PIL image (bilinear for the geometric ones)."""
    Image = pytest.importorskip("PIL.Image")
    from PIL import ImageEnhance, ImageOps

    fill = dict(fillcolor=(128, 128, 128), resample=Image.BILINEAR)

    def affine(data):
        return lambda im, a: im.transform(im.size, Image.AFFINE, data(im, a), **fill)

    def solarize_add(im, add):
        return im.point([min(255, i + int(add)) if i < 128 else i for i in range(256)] * 3)

    return {
        "AutoContrast": lambda im, a: ImageOps.autocontrast(im),
        "Equalize": lambda im, a: ImageOps.equalize(im),
        "Invert": lambda im, a: ImageOps.invert(im),
        "Rotate": lambda im, a: im.rotate(a, **fill),
        "Posterize": lambda im, a: ImageOps.posterize(im, int(a)),
        "Solarize": lambda im, a: ImageOps.solarize(im, int(a)),
        "SolarizeAdd": solarize_add,
        "Color": lambda im, a: ImageEnhance.Color(im).enhance(a),
        "Contrast": lambda im, a: ImageEnhance.Contrast(im).enhance(a),
        "Brightness": lambda im, a: ImageEnhance.Brightness(im).enhance(a),
        "Sharpness": lambda im, a: ImageEnhance.Sharpness(im).enhance(a),
        "ShearX": affine(lambda im, a: (1, a, 0, 0, 1, 0)),
        "ShearY": affine(lambda im, a: (1, 0, 0, a, 1, 0)),
        "TranslateXRel": affine(lambda im, a: (1, 0, a * im.size[0], 0, 1, 0)),
        "TranslateYRel": affine(lambda im, a: (1, 0, 0, 0, 1, a * im.size[1])),
    }


ARGS = {"AutoContrast": 0, "Equalize": 0, "Invert": 0, "Rotate": -24.3, "Posterize": 2, "Solarize": 103,
        "SolarizeAdd": 99, "Color": 1.7, "Contrast": 0.4, "Brightness": 1.45, "Sharpness": 0.2, "ShearX": 0.27,
        "ShearY": -0.12, "TranslateXRel": -0.31, "TranslateYRel": 0.4}


@pytest.mark.parametrize("name", RAND_AUGMENT_OPS)
def test_each_rand_augment_op_gives_pils_pixels(name):
    from PIL import Image

    reference = _pil_reference()[name]
    rng = np.random.default_rng(RAND_AUGMENT_OPS.index(name))
    xs = np.clip(rng.normal(120, 60, (3, 18, 22, 3)) + 50 * np.sin(np.arange(22) / 3)[None, None, :, None], 0, 255)
    xs = xs.astype(np.uint8)
    expected = np.stack([np.asarray(reference(Image.fromarray(x), ARGS[name])) for x in xs])
    # the ops of one layer, every image drawing `name` with the argument above
    augment = RandAugment("rand-m9", fill=(128, 128, 128))
    batch = torch.from_numpy(xs).permute(0, 3, 1, 2).float()
    ops = torch.full((3,), RAND_AUGMENT_OPS.index(name))
    got = augment._layer(batch, ops, torch.full((3,), float(ARGS[name]), dtype=torch.float64))
    assert np.array_equal(got.permute(0, 2, 3, 1).numpy().astype(np.uint8), expected)


def test_rand_augment_draws_timms_arguments():
    augment = RandAugment("rand-m9-mstd0.5-inc1")
    ops, args = augment.draw(4000, torch.Generator().manual_seed(0))
    assert ops.shape == (2, 4000)
    assert 0.45 < (ops == -1).float().mean() < 0.55  # each op applied with p = 0.5
    counts = torch.bincount(ops[ops >= 0], minlength=len(RAND_AUGMENT_OPS))
    assert counts.min() > 0.7 * counts.float().mean()
    rotate = args[ops == RAND_AUGMENT_OPS.index("Rotate")]
    assert rotate.abs().max() <= 30 and 0.3 < (rotate > 0).float().mean() < 0.7
    assert rotate.abs().mean() == pytest.approx(27, abs=0.3)  # magnitude ~9 of 10, times 30 degrees
    posterize = args[ops == RAND_AUGMENT_OPS.index("Posterize")]
    assert set(posterize.tolist()) <= {0.0, 1.0, 2.0}  # increasing: 4 - int(m / 10 * 4) at m ~ 9


def test_random_erasing_boxes_follow_timm():
    erase = RandomErasing(0.25)
    boxes = erase.boxes(4000, 32, 32, torch.Generator().manual_seed(0))
    top, left, h, w = boxes
    on = h > 0
    assert 0.2 < on.float().mean() < 0.3
    area = (h * w)[on].float() / (32 * 32)
    assert area.min() >= 0.01 and area.max() <= 0.38  # 2% to 1/3 of the image, before rounding the sides
    assert ((top + h)[on] <= 32).all() and ((left + w)[on] <= 32).all() and (h[on] < 32).all()


def _arrays(n=12, size=16, seed=0):
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8)
    return images, np.arange(n) % 3, (rng.random((n, size, size)) > 0.5).astype(np.uint8)


def _batches(loader, epoch=0, start=0):
    loader.set_epoch(epoch, start)
    return list(loader)


def test_loader_augmentations_are_deterministic_and_leave_the_crops_as_they_were():
    images, labels, _ = _arrays()
    plain = DeviceLoader.from_arrays(images, labels, batch_size=4, seed=3)
    nothing = DeviceLoader.from_arrays(images, labels, batch_size=4, seed=3, randaugment="rand-m9-p0")
    for (a, _), (b, _) in zip(_batches(plain), _batches(nothing)):
        assert torch.equal(a, b)  # RandAugment's draws come after the crop and flip draws
    kw = dict(batch_size=4, seed=3, randaugment="rand-m9-mstd0.5-inc1", random_erasing=0.5)
    first = _batches(DeviceLoader.from_arrays(images, labels, **kw), epoch=1)
    again = DeviceLoader.from_arrays(images, labels, **kw)
    assert all(torch.equal(a, b) for (a, _), (b, _) in zip(first, _batches(again, epoch=1)))
    resumed = _batches(DeviceLoader.from_arrays(images, labels, **kw), epoch=1, start=2)
    assert torch.equal(resumed[0][0], first[2][0])
    assert not torch.equal(first[0][0], _batches(plain, epoch=1)[0][0])


def test_random_erasing_fills_boxes_with_normal_noise_and_keeps_the_rest():
    images, labels, _ = _arrays(n=64)
    plain = _batches(DeviceLoader.from_arrays(images, labels, batch_size=64))[0][0]
    erased = _batches(DeviceLoader.from_arrays(images, labels, batch_size=64, random_erasing=1.0))[0][0]
    changed = (plain != erased).any(1)  # [B, H, W]
    assert changed.flatten(1).any(1).float().mean() > 0.9  # nearly every image got a box
    noise = erased.permute(0, 2, 3, 1)[changed]
    assert abs(noise.mean()) < 0.1 and noise.std() == pytest.approx(1, abs=0.1)


def test_resize_upscales_the_cifar_pipelines_and_their_masks():
    images, labels, masks = _arrays()
    fields = ("image", "label", "mask")
    kw = dict(batch_size=4, seed=1, fields=fields, mean=(0, 0, 0), std=(1, 1, 1))
    plain = _batches(DeviceLoader.from_arrays(images, labels, masks, **kw))
    big = DeviceLoader.from_arrays(images, labels, masks, resize=40, **kw)
    assert big.resolution() == 40
    for (x, _, m), (y, _, n) in zip(plain, _batches(big)):
        assert y.shape[2:] == (40, 40) and n.shape[1:] == (40, 40)
        assert torch.allclose(y, F.interpolate(x, size=(40, 40), mode="bilinear", align_corners=False), atol=1e-4)
        assert torch.equal(n, F.interpolate(m[:, None].float(), size=(40, 40), mode="nearest")[:, 0].to(n.dtype))
    val = DeviceLoader.from_arrays(images, labels, pipeline="cifar_val", batch_size=4, resize=32)
    assert _batches(val)[0][0].shape[2:] == (32, 32)
    with pytest.raises(ValueError, match="training augmentations"):
        DeviceLoader.from_arrays(images, labels, pipeline="cifar_val", batch_size=4, random_erasing=0.25)
    with pytest.raises(ValueError, match="resize is for cifar"):
        DeviceLoader.from_arrays(images, labels, pipeline="imagenet_train", batch_size=4, resize=32)


# ---------------------------------------------------------------------------------- training


def _timm_vit_file(path, classes):
    """A timm-layout ViT-S/16 state dict (names and shapes from timm's definition, random values)."""
    g = torch.Generator().manual_seed(0)
    shapes = vit(384, img=32, num_classes=classes)
    state = {k: torch.randn(s, generator=g) * 0.02 for k, s in shapes.items()}
    torch.save(state, path)
    return path


RECIPE = ["data.embedded.size=32", "models.0.name=vit_small_patch16_224", "models.0.kwargs={img_size: 32}",
          "models.1.name=deit_tiny_patch16_224", "models.1.kwargs={img_size: 32, drop_path_rate: 0.1}",
          "method.name=kd", "optim.name=adamw", "optim.lr=5e-4", "optim.weight_decay=0.05", "optim.clip_grad=5",
          "optim.warmup_epochs=1", "optim.warmup_lr=5e-7", "optim.min_lr=1e-5", "data.mixup=0.8",
          "data.cutmix=1.0", "train.label_smoothing=0.1", "train.ema_decay=0.99"]


def test_a_vit_student_trains_with_the_vit_recipe_and_resumes_exactly(tiny, tmp_path):
    teacher = _timm_vit_file(tmp_path / "vit_small_timm.pth", classes=4)
    overrides = tiny + RECIPE + [f"models.0.checkpoint={teacher}"]
    full = Trainer(load_config(overrides=overrides + ["train.run_name=full"]), progress=False)
    loaded = torch.load(teacher)
    assert all(torch.equal(v, loaded[k]) for k, v in full.models[0].state_dict().items())  # strict, as written
    summary = full.fit()
    assert summary["status"] == "completed" and isinstance(full.optimizer, torch.optim.AdamW)
    records = [json.loads(line) for line in (full.run_dir / "metrics.jsonl").read_text().splitlines()]
    val = [r for r in records if r["split"] == "val"]
    for tag in ("teacher", "student", "student_ema"):
        assert 0 <= val[-1][f"{tag}/top1"] <= 100 and math.isfinite(val[-1][f"{tag}/loss"])
        assert summary["best"][tag] == max(r[f"{tag}/top1"] for r in val)
    assert "ensemble" in summary["best"] and "student_ema" in full.ema_tags
    state = ckpt.load(full.run_dir / "checkpoint.pt")
    ema = full.emas[0].state_dict()
    assert state["ema"][0].keys() == ema.keys()
    assert not torch.equal(ema["head.weight"], full.models[1].state_dict()["head.weight"])
    assert full.scheduler.get_last_lr()[0] == pytest.approx(1e-5)  # cosine to min_lr

    k = full.steps_per_epoch + 2  # stop inside the second epoch, then continue
    Trainer(load_config(overrides=overrides + ["train.run_name=cut", f"train.max_steps={k}"]), progress=False).fit()
    resumed = Trainer(load_config(overrides=overrides + ["train.run_name=cut", "train.resume=auto"]), progress=False)
    resumed.fit()
    for a, b in zip([*full.models, full.emas[0].module], [*resumed.models, resumed.emas[0].module]):
        for key, value in a.state_dict().items():
            assert torch.equal(value, b.state_dict()[key]), key


def test_methods_whose_target_feeds_only_cross_entropy_take_soft_targets():
    from kdengine.methods import DKD, DML, KDCL, FitNet, SwitOKD, Vanilla

    assert all(m.soft_targets for m in (Vanilla, DML, KD, FitNet))
    assert not any(m.soft_targets for m in (KDCL, SwitOKD, DKD))  # they read class indices


def test_dml_adm_trains_on_mixed_batches(tiny):
    trainer = Trainer(load_config(overrides=tiny + ["method.name=dml+adm", "data.mixup=0.8", "data.cutmix=1.0",
                                                    "train.label_smoothing=0.1", "train.max_steps=2"]),
                      progress=False)
    summary = trainer.fit()
    assert summary["status"] == "max_steps"
    assert all(torch.isfinite(p).all() for m in trainer.models for p in m.parameters())


def test_soft_targets_need_a_method_that_takes_them(tiny):
    with pytest.raises(ConfigError, match="data.mixup=0.8 train on soft targets.*method kdcl"):
        Trainer(load_config(overrides=tiny + ["method.name=kdcl", "data.mixup=0.8"]), progress=False)


def test_the_defaults_add_nothing(tiny):
    trainer = Trainer(load_config(overrides=tiny), progress=False)
    assert trainer.mix is None and trainer.emas == [] and trainer.step.clip_grad is None
    assert isinstance(trainer.optimizer, torch.optim.SGD) and len(trainer.optimizer.param_groups) == 2
    assert trainer.train_loader.config.randaugment is None and trainer.train_loader.config.resize is None


def test_the_loader_augmentations_reach_the_device_loader(tiny):
    trainer = Trainer(load_config(overrides=tiny + ["data.resolution=24", "data.randaugment=rand-m9-mstd0.5-inc1",
                                                    "data.random_erasing=0.25"]), progress=False)
    train, val = trainer.train_loader, trainer.val_loader
    assert (train.config.randaugment, train.config.random_erasing, train.config.resize) == \
        ("rand-m9-mstd0.5-inc1", 0.25, 24)
    assert val.config.resize == 24 and val.config.randaugment is None and not val.config.random_erasing
    train.set_epoch(0)
    images, _, _ = next(iter(train))
    assert images.shape[2:] == (24, 24)
    assert trainer.fit()["status"] == "completed"
