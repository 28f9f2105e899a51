// Glue between the torch CUDA ops (csrc/ops/cuda/*.cu) and the framework-free kernels in
// csrc/kernels: scalar types, pointers and the layout flag.
#pragma once

#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <type_traits>

#include "../../kernels/common.cuh"
#include "../checks.h"

namespace kdengine {
namespace cuda_impl {

// The kernels' scalar type of a torch scalar type: at::Half -> __half, at::BFloat16 ->
// __nv_bfloat16 (the same 16 bits), float and double unchanged.
template <typename T>
struct KernelScalar {
  using type = T;
};
template <>
struct KernelScalar<at::Half> {
  using type = __half;
};
template <>
struct KernelScalar<at::BFloat16> {
  using type = __nv_bfloat16;
};
template <typename T>
using kernel_scalar_t = typename KernelScalar<T>::type;

// Both sides must agree on the accumulation type: it is the dtype of the saved maps and norms.
static_assert(sizeof(at::Half) == sizeof(__half) && sizeof(at::BFloat16) == sizeof(__nv_bfloat16));
static_assert(std::is_same_v<at::opmath_type<at::Half>, kernels::opmath_t<__half>>);
static_assert(std::is_same_v<at::opmath_type<at::BFloat16>, kernels::opmath_t<__nv_bfloat16>>);
static_assert(std::is_same_v<at::opmath_type<float>, kernels::opmath_t<float>>);
static_assert(std::is_same_v<at::opmath_type<double>, kernels::opmath_t<double>>);

template <typename T>
const kernel_scalar_t<T>* kernel_ptr(const at::Tensor& t) {
  return reinterpret_cast<const kernel_scalar_t<T>*>(t.const_data_ptr<T>());
}

template <typename T>
kernel_scalar_t<T>* kernel_mutable_ptr(const at::Tensor& t) {
  return reinterpret_cast<kernel_scalar_t<T>*>(t.mutable_data_ptr<T>());
}

inline kernels::Layout kernel_layout(Layout layout) {
  return layout == Layout::kNHWC ? kernels::Layout::kNHWC : kernels::Layout::kNCHW;
}

// Small tensors (gradients, saved maps) are read by the kernels through raw pointers, so they
// must live on the feature's GPU; the CPU ops convert them silently, here it would be a crash.
inline void check_same_device(const char* op, const char* name, const at::Tensor& t,
                              const at::Tensor& feat) {
  TORCH_CHECK(t.device() == feat.device(), op, ": ", name, " is on ", t.device(),
              " but the feature is on ", feat.device());
}

}  // namespace cuda_impl
}  // namespace kdengine
