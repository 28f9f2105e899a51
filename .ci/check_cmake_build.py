"""Loads the _C module that CMake built (path in argv[1]) and runs one op through it."""
import importlib.util
import sys

import torch

spec = importlib.util.spec_from_file_location("_C", sys.argv[1])
module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
info = module.build_info()
s, t = torch.randn(2, 8, 4, 4), torch.randn(2, 8, 4, 4)
pooled_s, _, _, _ = torch.ops.kdengine.adm_pool(s, t, 1e-5)
assert pooled_s.shape == (2, 8), pooled_s.shape
# Built without OpenMP, at::parallel_for would run every kernel on one thread.
assert info["openmp"] or "OpenMP" not in torch.__config__.parallel_info(), info
print(f"cmake build OK: {info}")
