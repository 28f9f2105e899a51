// CUDA implementation of adm_pool and its backward: the CPU ops' checks, then the kernels of
// kernels/adm_pool.cuh on the current stream (no host synchronisation; capturable in a graph).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "../../kernels/adm_pool.cuh"
#include "../checks.h"
#include "kernel_utils.h"

namespace kdengine {
namespace cuda_impl {
namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> adm_pool_cuda(const at::Tensor& feat_s,
                                                                         const at::Tensor& feat_t,
                                                                         double eps) {
  check_feature_pair("adm_pool", feat_s, feat_t);
  const c10::cuda::CUDAGuard guard(feat_s.device());
  // Named variables, not a structured binding: lambdas cannot capture those in C++17.
  const std::pair<at::Tensor, Layout> dense = dense_feature(feat_s);
  const at::Tensor& s = dense.first;
  const kernels::Layout layout = kernel_layout(dense.second);
  const at::Tensor t = in_layout(feat_t, dense.second);
  const int64_t B = s.size(0), C = s.size(1), H = s.size(2), W = s.size(3);
  at::Tensor pooled_s, pooled_t, attn_co, attn_di;
  std::tie(pooled_s, pooled_t, attn_co, attn_di) = adm_pool_outputs(s, eps);
  if (s.numel() == 0) return {pooled_s, pooled_t, attn_co, attn_di};
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, s.scalar_type(), "adm_pool_cuda", [&] {
    using kscalar_t = kernel_scalar_t<scalar_t>;
    using acc_t = at::opmath_type<scalar_t>;
    // From the caching allocator on this stream: stream-ordered reuse, graph-private pool.
    const at::Tensor workspace = at::empty(
        {kernels::adm_pool_forward_workspace_size<kscalar_t>(layout, B, C, H * W)},
        attn_co.options());
    C10_CUDA_CHECK(kernels::launch_adm_pool_forward<kscalar_t>(
        kernel_ptr<scalar_t>(s), kernel_ptr<scalar_t>(t), layout, B, C, H * W, eps,
        kernel_mutable_ptr<scalar_t>(pooled_s), kernel_mutable_ptr<scalar_t>(pooled_t),
        attn_co.mutable_data_ptr<acc_t>(), attn_di.mutable_data_ptr<acc_t>(),
        workspace.mutable_data_ptr<acc_t>(), stream));
  });
  return {pooled_s, pooled_t, attn_co, attn_di};
}

at::Tensor adm_pool_backward_cuda(const at::Tensor& grad_pooled, const at::Tensor& feat,
                                  const at::Tensor& attn) {
  check_adm_pool_backward(grad_pooled, feat, attn);
  const c10::cuda::CUDAGuard guard(feat.device());
  const std::pair<at::Tensor, Layout> dense = dense_feature(feat);
  const at::Tensor& x = dense.first;
  const kernels::Layout layout = kernel_layout(dense.second);
  const int64_t B = x.size(0), C = x.size(1), HW = x.size(2) * x.size(3);
  const auto acc_type = at::toOpMathType(x.scalar_type());
  const at::Tensor g = grad_pooled.to(acc_type).contiguous();
  const at::Tensor a = attn.to(acc_type).contiguous();
  at::Tensor grad = at::empty_like(x);  // same layout as the input it differentiates
  if (x.numel() == 0) return grad;
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "adm_pool_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    C10_CUDA_CHECK(kernels::launch_adm_pool_backward<kernel_scalar_t<scalar_t>>(
        g.const_data_ptr<acc_t>(), kernel_ptr<scalar_t>(x), a.const_data_ptr<acc_t>(),
        layout, B, C, HW, kernel_mutable_ptr<scalar_t>(grad), stream));
  });
  return grad;
}

}  // namespace
}  // namespace cuda_impl
}  // namespace kdengine

TORCH_LIBRARY_IMPL(kdengine, CUDA, m) {
  m.impl("adm_pool", &kdengine::cuda_impl::adm_pool_cuda);
  m.impl("_adm_pool_backward", &kdengine::cuda_impl::adm_pool_backward_cuda);
}
