"""Loads the compiled extension kdengine._C and tells which backends it carries.

Importing _C registers the ``torch.ops.kdengine`` operators. When it is missing (a source
checkout that was never built) every op falls back to its pure-PyTorch reference.
"""
from __future__ import annotations

import importlib.util
import os
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
