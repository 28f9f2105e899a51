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
