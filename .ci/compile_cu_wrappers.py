#!/usr/bin/env python3
"""Compiles every csrc/ops/cuda/*.cu wrapper with nvcc against the installed torch's headers.

The CPU wheel of torch ships the CUDA headers of ATen/c10 but not c10's generated
``cuda_cmake_macros.h``; ``-DC10_CUDA_NO_CMAKE_CONFIGURE_FILE`` tells c10 to do without it. Only
compilation is checked (``-c``, for sm_90): nothing is linked or loaded, so no GPU is needed. Run
by ``make gpu-preflight``; exits 0 with a message when nvcc is missing unless
KDENGINE_REQUIRE_NVCC=1.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def main() -> int:
    nvcc = os.environ.get("NVCC") or shutil.which("nvcc") or "/usr/local/cuda/bin/nvcc"
    if not Path(nvcc).exists() and not shutil.which(nvcc):
        msg = "compile_cu_wrappers: nvcc not found"
        if os.environ.get("KDENGINE_REQUIRE_NVCC") == "1":
            print(msg + " and KDENGINE_REQUIRE_NVCC=1", file=sys.stderr)
            return 1
        print(msg + ": skipped")
        return 0
    from torch.utils.cpp_extension import include_paths

    includes = [*include_paths(), sysconfig.get_paths()["include"], str(REPO / "csrc")]
    flags = ["-std=c++17", "-O0", "-gencode", "arch=compute_90,code=sm_90", "-DC10_CUDA_NO_CMAKE_CONFIGURE_FILE",
             "-D__CUDA_NO_HALF_OPERATORS__", "-D__CUDA_NO_HALF_CONVERSIONS__", "-D__CUDA_NO_BFLOAT16_CONVERSIONS__",
             "-D__CUDA_NO_HALF2_OPERATORS__", "-DTORCH_EXTENSION_NAME=_C", "--expt-relaxed-constexpr",
             "-Xcompiler", "-fPIC", *(f"-I{p}" for p in includes)]
    units = sorted((REPO / "csrc" / "ops" / "cuda").glob("*.cu"))
    if not units:
        print("compile_cu_wrappers: no csrc/ops/cuda/*.cu", file=sys.stderr)
        return 1

    def compile_one(unit: Path):
        t0 = time.time()
        with tempfile.TemporaryDirectory() as tmp:
            proc = subprocess.run([nvcc, *flags, "-c", str(unit), "-o", str(Path(tmp) / "unit.o")],
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        return unit, proc.returncode, proc.stdout, time.time() - t0

    failed = 0
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
        for unit, code, out, secs in pool.map(compile_one, units):
            rel = unit.relative_to(REPO)
            if code == 0:
                print(f"  ok    {rel} ({secs:.0f} s)")
            else:
                failed += 1
                print(f"  FAIL  {rel}\n" + "\n".join("        " + line for line in out.splitlines()[-40:]))
    print(f"compile_cu_wrappers: {len(units) - failed}/{len(units)} wrappers compile")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
