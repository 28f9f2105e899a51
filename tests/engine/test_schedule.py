"""Learning-rate schedules (per-step multipliers)."""
import math

import pytest
from omegaconf import OmegaConf

from kdengine.engine.config import OptimConfig
from kdengine.engine.schedule import lr_lambda


def _cfg(**kw):
    return OmegaConf.structured(OptimConfig(**kw))


def test_multistep_decays_at_the_milestone_epochs():
    f = lr_lambda(_cfg(schedule="multistep", milestones=[2, 4], gamma=0.1), steps_per_epoch=10, epochs=6)
    assert [f(s) for s in (0, 19, 20, 39, 40, 59)] == pytest.approx([1, 1, 0.1, 0.1, 0.01, 0.01])


def test_step_and_constant():
    f = lr_lambda(_cfg(schedule="step", step_size=30, gamma=0.1), steps_per_epoch=5, epochs=100)
    assert f(149) == 1 and f(150) == pytest.approx(0.1) and f(300) == pytest.approx(0.01)
    g = lr_lambda(_cfg(schedule="constant"), steps_per_epoch=5, epochs=3)
    assert {g(s) for s in range(15)} == {1.0}


def test_cosine_ends_at_zero_and_warmup_ramps_linearly():
    f = lr_lambda(_cfg(schedule="cosine"), steps_per_epoch=10, epochs=2)
    assert f(0) == 1 and f(10) == pytest.approx(0.5) and f(20) == pytest.approx(0.0, abs=1e-12)
    w = lr_lambda(_cfg(schedule="constant", warmup_epochs=0.5), steps_per_epoch=10, epochs=2)
    assert [w(s) for s in range(6)] == pytest.approx([0.2, 0.4, 0.6, 0.8, 1.0, 1.0])
    assert all(not math.isnan(f(s)) for s in range(25))


def test_warmup_starts_from_warmup_lr_and_cosine_ends_at_min_lr():
    cfg = _cfg(schedule="cosine", lr=0.1, warmup_epochs=1, warmup_lr=0.01, min_lr=0.001)
    f = lr_lambda(cfg, steps_per_epoch=4, epochs=10)
    cosine = [0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * s / 40)) for s in range(41)]  # relative to the base
    ramp = [0.1 + (cosine[s] - 0.1) * (s + 1) / 4 for s in range(4)]  # from warmup_lr / lr = 0.1
    assert [f(s) for s in range(4)] == pytest.approx(ramp)
    assert [f(s) for s in range(4, 41)] == pytest.approx(cosine[4:])
    assert 0.1 * f(40) == pytest.approx(0.001)
    # another group's base: the same absolute start and end rates
    g = lr_lambda(cfg, steps_per_epoch=4, epochs=10, base_lr=0.02)
    assert 0.02 * g(40) == pytest.approx(0.001) and 0.02 * g(0) < 0.1 * f(0)


def test_the_defaults_keep_the_warmup_from_zero_exactly():
    f = lr_lambda(_cfg(schedule="cosine", warmup_epochs=0.5), steps_per_epoch=10, epochs=2)
    for s in range(25):
        value = 0.5 * (1.0 + math.cos(math.pi * min(s, 20) / 20))
        if s < 5:
            value *= (s + 1) / 5
        assert f(s) == value  # bit for bit the formula before warmup_lr and min_lr existed


def test_per_epoch_is_timms_t_in_epochs_cosine_with_warmup():
    """timm's CosineLRScheduler(t_initial=epochs, lr_min, warmup_t, warmup_lr_init,
    warmup_prefix=False), stepped once per epoch, written out: the PAT / OFA recipes."""
    from kdengine.engine.config import load_config

    cfg = load_config(overrides=["optim.lr=0.05", "optim.min_lr=0.001", "optim.warmup_epochs=3",
                                 "optim.warmup_lr=0.0001", "optim.per_epoch=true"])
    epochs, spe = 10, 7
    factor = lr_lambda(cfg.optim, spe, epochs)
    for epoch in range(epochs):
        if epoch < 3:
            expected = 0.0001 + epoch * (0.05 - 0.0001) / 3
        else:
            expected = 0.001 + 0.5 * (0.05 - 0.001) * (1 + math.cos(math.pi * epoch / epochs))
        for step in range(epoch * spe, (epoch + 1) * spe):  # constant within the epoch
            assert 0.05 * factor(step) == pytest.approx(expected, rel=1e-12), (epoch, step)
