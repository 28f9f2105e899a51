// kdengine._C: loading this module registers the kdengine:: torch ops (the TORCH_LIBRARY
// fragments in csrc/ops) and exposes what was compiled.
#include <pybind11/pybind11.h>
#include <torch/version.h>

#include "ops/cpu/buffer_cache.h"

#ifndef KDENGINE_VERSION
#define KDENGINE_VERSION "0+unknown"
#endif
#ifndef KDENGINE_CUDA_ARCHS
#define KDENGINE_CUDA_ARCHS ""
#endif

namespace py = pybind11;

PYBIND11_MODULE(_C, m) {
  m.doc() = "kdengine compiled operators (CPU always; CUDA when built with a CUDA toolkit)";
  m.def("build_info", [] {
    py::dict info;
    info["version"] = KDENGINE_VERSION;
    info["torch_version"] = TORCH_VERSION;
    py::list backends;
    backends.append("cpu");
#ifdef KDENGINE_WITH_CUDA
    backends.append("cuda");
#endif
    info["backends"] = backends;
    info["cuda_archs"] = KDENGINE_CUDA_ARCHS;
    // Whether at::parallel_for in the CPU kernels runs on torch's intra-op threads: the header
    // template is serial unless this file set was compiled with OpenMP.
#ifdef _OPENMP
    info["openmp"] = true;
#else
    info["openmp"] = false;
#endif
    return info;
  }, "Version, torch version built against, compiled backends and CUDA architectures.");
  m.def("cpu_buffer_cache_bytes", &kdengine::cpu::buffer_cache_bytes,
        "Bytes held by the CPU kernels' cache of large output buffers.");
}
