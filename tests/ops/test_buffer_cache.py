"""The CPU kernels' cache of large output buffers: reuse, layout, and the off switch."""
import os
import subprocess
import sys

import pytest
import torch

from kdengine.info import cpu_buffer_cache_bytes, cpu_buffer_cache_limit_mb
from kdengine.ops import available_impls, feature_mse

needs_cpu_ops = pytest.mark.skipif("cpu" not in available_impls(torch.device("cpu")), reason="extension not built")


def _grad_of_mse(s, t):
    s = s.detach().requires_grad_()
    feature_mse(s, t, impl="cpu").backward()
    return s.grad


@needs_cpu_ops
def test_large_gradients_reuse_a_cached_block():
    s, t = torch.randn(4, 64, 32, 32), torch.randn(4, 64, 32, 32)  # 1 MiB
    first = _grad_of_mse(s, t)
    expected = 2 * (s - t) / s.numel()
    torch.testing.assert_close(first, expected)
    ptr = first.data_ptr()
    del first  # its block goes back to the cache...
    assert cpu_buffer_cache_bytes() >= s.numel() * 4
    second = _grad_of_mse(s + 1, t)  # ...and serves the next request of that size
    assert second.data_ptr() == ptr
    torch.testing.assert_close(second, 2 * (s + 1 - t) / s.numel())


@needs_cpu_ops
def test_cached_gradients_keep_channels_last():
    s = torch.randn(4, 64, 32, 32).contiguous(memory_format=torch.channels_last)
    g = _grad_of_mse(s, torch.zeros_like(s))
    assert g.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(g, 2 * s / s.numel())


@needs_cpu_ops
def test_cache_can_be_turned_off():
    code = (
        "import torch, kdengine; from kdengine.info import cpu_buffer_cache_bytes\n"
        "s = torch.randn(4, 64, 32, 32, requires_grad=True)\n"
        "kdengine.ops.feature_mse(s, torch.zeros(4, 64, 32, 32), impl='cpu').backward()\n"
        "del s\n"
        "print(cpu_buffer_cache_bytes())\n"
    )
    env = dict(os.environ, KDENGINE_CPU_BUFFER_CACHE_MB="0")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "0"


@pytest.mark.parametrize("value, mb", [(None, 1024), ("0", 0), ("256", 256), ("64MB", 64), ("-5", 0), ("off", 0)])
def test_limit_is_read_as_the_extension_reads_it(monkeypatch, value, mb):
    if value is None:
        monkeypatch.delenv("KDENGINE_CPU_BUFFER_CACHE_MB", raising=False)
    else:
        monkeypatch.setenv("KDENGINE_CPU_BUFFER_CACHE_MB", value)
    assert cpu_buffer_cache_limit_mb() == mb

