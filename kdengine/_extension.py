"""Loads the compiled extension kdengine._C and tells which backends it carries.

Importing _C registers the ``torch.ops.kdengine`` operators. When it is missing (a source
checkout that was never built) every op falls back to its pure-PyTorch reference.
"""
from __future__ import annotations

import importlib.util
import os
import re
import warnings

import torch  # noqa: F401  (loads libc10/libtorch, which _C links against)

try:
    from . import _C  # noqa: F401  (registers torch.ops.kdengine.*)

    BUILD_INFO: dict = dict(_C.build_info())
    LOAD_ERROR: str | None = None
except ImportError as exc:  # not built, or built against another torch
    BUILD_INFO = {"version": None, "torch_version": None, "backends": [], "cuda_archs": ""}
    LOAD_ERROR = str(exc)
    if os.environ.get("KDENGINE_REQUIRE_EXTENSION") == "1":
        raise
    warnings.warn(
        f"kdengine._C could not be loaded ({exc}); kdengine ops use the PyTorch reference. "
        "Build it with `pip install --no-build-isolation -e .`.",
        RuntimeWarning,
        stacklevel=2,
    )

HAS_CPU_OPS: bool = "cpu" in BUILD_INFO["backends"]
HAS_CUDA_OPS: bool = "cuda" in BUILD_INFO["backends"]
HAS_TRITON: bool = importlib.util.find_spec("triton") is not None

#: The variable bounding the CPU kernels' cache of large output buffers, in MiB (read once by the
#: extension, at its first allocation; 0 or less turns the cache off).
CPU_BUFFER_CACHE_ENV = "KDENGINE_CPU_BUFFER_CACHE_MB"
CPU_BUFFER_CACHE_DEFAULT_MB = 1024


def cpu_buffer_cache_limit_mb() -> int:
    """The CPU output-buffer cache's bound in MiB, read as the extension reads it (C's ``atoll``:
    the leading integer, 0 when there is none).

    Returns:
        The bound, 0 when the cache is off.
    """
    value = os.environ.get(CPU_BUFFER_CACHE_ENV)
    if value is None:
        return CPU_BUFFER_CACHE_DEFAULT_MB
    leading = re.match(r"\s*[+-]?\d+", value)
    return max(int(leading.group()), 0) if leading else 0


def cpu_buffer_cache_bytes() -> int | None:
    """Bytes the CPU output-buffer cache holds now.

    Returns:
        The byte count, or None without the compiled CPU kernels.
    """
    return _C.cpu_buffer_cache_bytes() if HAS_CPU_OPS else None

