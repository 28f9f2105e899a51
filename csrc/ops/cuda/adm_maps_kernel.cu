// CUDA implementation of adm_maps: the CPU op's checks, then the kernels of kernels/adm_maps.cuh
// on the current stream (no host synchronisation; capturable in a graph).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <optional>

#include "../../kernels/adm_maps.cuh"
#include "../adm_maps.h"
#include "kernel_utils.h"

namespace kdengine {
namespace cuda_impl {
namespace {

std::tuple<at::Tensor, at::Tensor> adm_maps_cuda(const at::Tensor& feat_s, const at::Tensor& feat_t,
                                                 const std::optional<at::Tensor>& valid,
                                                 double eps) {
  check_adm_maps(feat_s, feat_t, valid);
  const c10::cuda::CUDAGuard guard(feat_s.device());
  // Named variables, not a structured binding: lambdas cannot capture those in C++17.
  const std::pair<at::Tensor, Layout> dense = dense_feature(feat_s);
  const at::Tensor& s = dense.first;
  const kernels::Layout layout = kernel_layout(dense.second);
  const at::Tensor t = in_layout(feat_t, dense.second);
  const at::Tensor v = dense_valid(valid);
  const int64_t B = s.size(0), C = s.size(1), HW = s.size(2) * s.size(3);
  at::Tensor attn_co, attn_di;
  std::tie(attn_co, attn_di) = adm_maps_outputs(s);
  if (B * HW == 0) return {attn_co, attn_di};
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, s.scalar_type(), "adm_maps_cuda", [&] {
    using kscalar_t = kernel_scalar_t<scalar_t>;
    using acc_t = at::opmath_type<scalar_t>;
    // From the caching allocator on this stream: stream-ordered reuse, graph-private pool.
    const at::Tensor workspace = at::empty(
        {kernels::adm_maps_workspace_size<kscalar_t>(layout, B, HW)}, attn_co.options());
    C10_CUDA_CHECK(kernels::launch_adm_maps<kscalar_t>(
        kernel_ptr<scalar_t>(s), kernel_ptr<scalar_t>(t),
        v.defined() ? v.const_data_ptr<bool>() : nullptr, layout, B, C, HW, eps,
        attn_co.mutable_data_ptr<acc_t>(), attn_di.mutable_data_ptr<acc_t>(),
        workspace.mutable_data_ptr<acc_t>(), stream));
  });
  return {attn_co, attn_di};
}

}  // namespace
}  // namespace cuda_impl
}  // namespace kdengine

TORCH_LIBRARY_IMPL(kdengine, CUDA, m) {
  m.impl("adm_maps", &kdengine::cuda_impl::adm_maps_cuda);
}
