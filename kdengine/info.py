"""What this installation of kdengine has: versions, the compiled extension and its backends, the
CPU output-buffer cache, devices, Triton and FFCV (``kdengine info`` prints :func:`report`)."""
from __future__ import annotations

import importlib.util
import platform

import torch

from . import _extension
from ._extension import cpu_buffer_cache_bytes, cpu_buffer_cache_limit_mb
from ._version import __version__

__all__ = ["cpu_buffer_cache_bytes", "cpu_buffer_cache_limit_mb", "report"]


def report() -> list[tuple[str, str]]:
    """The facts ``kdengine info`` shows.

    Returns:
        ``(name, value)`` rows, in display order.
    """
    rows = [("kdengine", __version__), ("python", platform.python_version()), ("torch", torch.__version__)]
    built = _extension.BUILD_INFO
    if _extension.LOAD_ERROR:
        rows.append(("extension", f"not loaded: {_extension.LOAD_ERROR} (ops use the reference)"))
    else:
        rows.append(("extension", f"kdengine._C {built['version']} built against torch {built['torch_version']}"))
        rows.append(("compiled backends", ", ".join(built["backends"])))
        if built["cuda_archs"]:
            rows.append(("CUDA archs", built["cuda_archs"]))
    threads = str(torch.get_num_threads())
    if not _extension.LOAD_ERROR and not built.get("openmp", False):
        threads += " (the compiled CPU kernels run on one: built without OpenMP)"
    rows.append(("CPU threads", threads))
    held = cpu_buffer_cache_bytes()
    if held is not None:
        rows.append(("CPU buffer cache", f"{held / 2**20:.0f} of {cpu_buffer_cache_limit_mb()} MiB held "
                                         f"({_extension.CPU_BUFFER_CACHE_ENV})"))
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            rows.append((f"cuda:{i}", f"{p.name}, {p.total_memory / 2**30:.0f} GiB, sm_{p.major}{p.minor}"))
    else:
        rows.append(("CUDA devices", f"none (torch CUDA build: {torch.version.cuda or 'no'})"))
    if _extension.HAS_TRITON:
        import triton

        rows.append(("triton", triton.__version__))
    else:
        rows.append(("triton", "not installed"))
    rows.append(("ffcv", "installed" if importlib.util.find_spec("ffcv") else "not installed"))
    return rows
