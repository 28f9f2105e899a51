// CUDA implementation of cosine_similarity_map and its backward: the CPU ops' checks, then the
// kernels of kernels/cosine_similarity_map.cuh on the current stream (no host synchronisation).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "../../kernels/cosine_similarity_map.cuh"
#include "../checks.h"
#include "kernel_utils.h"

namespace kdengine {
namespace cuda_impl {
namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor> cosine_similarity_map_cuda(const at::Tensor& feat_s,
                                                                          const at::Tensor& feat_t,
                                                                          double eps) {
  check_feature_pair("cosine_similarity_map", feat_s, feat_t);
  const c10::cuda::CUDAGuard guard(feat_s.device());
  // Named variables, not a structured binding: lambdas cannot capture those in C++17.
  const std::pair<at::Tensor, Layout> dense = dense_feature(feat_s);
  const at::Tensor& s = dense.first;
  const kernels::Layout layout = kernel_layout(dense.second);
  const at::Tensor t = in_layout(feat_t, dense.second);
  const int64_t B = s.size(0), C = s.size(1), H = s.size(2), W = s.size(3);
  const auto acc_type = at::toOpMathType(s.scalar_type());
  at::Tensor sim = at::empty({B, H, W}, s.options());
  at::Tensor norm_s = at::empty({B, H, W}, s.options().dtype(acc_type));
  at::Tensor norm_t = at::empty({B, H, W}, s.options().dtype(acc_type));
  if (s.numel() == 0) return {sim, norm_s, norm_t};
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, s.scalar_type(), "cosine_similarity_map_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    C10_CUDA_CHECK(kernels::launch_cosine_similarity_map_forward<kernel_scalar_t<scalar_t>>(
        kernel_ptr<scalar_t>(s), kernel_ptr<scalar_t>(t), layout, B, C, H * W, eps,
        kernel_mutable_ptr<scalar_t>(sim), norm_s.mutable_data_ptr<acc_t>(),
        norm_t.mutable_data_ptr<acc_t>(), stream));
  });
  return {sim, norm_s, norm_t};
}

std::tuple<at::Tensor, at::Tensor> cosine_similarity_map_backward_cuda(
    const at::Tensor& grad, const at::Tensor& feat_s, const at::Tensor& feat_t,
    const at::Tensor& sim, const at::Tensor& norm_s, const at::Tensor& norm_t, double eps) {
  check_cosine_similarity_map_backward(grad, feat_s, feat_t, sim, norm_s, norm_t);
  const c10::cuda::CUDAGuard guard(feat_s.device());
  const std::pair<at::Tensor, Layout> dense = dense_feature(feat_s);
  const at::Tensor& s = dense.first;
  const kernels::Layout layout = kernel_layout(dense.second);
  const at::Tensor t = in_layout(feat_t, dense.second);
  const int64_t B = s.size(0), C = s.size(1), HW = s.size(2) * s.size(3);
  const auto acc_type = at::toOpMathType(s.scalar_type());
  const at::Tensor g = grad.to(acc_type).contiguous();
  const at::Tensor S = sim.to(acc_type).contiguous();
  const at::Tensor Ns = norm_s.to(acc_type).contiguous();
  const at::Tensor Nt = norm_t.to(acc_type).contiguous();
  at::Tensor grad_s = at::empty_like(s);
  at::Tensor grad_t = at::empty_like(t);
  if (s.numel() == 0) return {grad_s, grad_t};
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, s.scalar_type(), "cosine_similarity_map_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    C10_CUDA_CHECK(kernels::launch_cosine_similarity_map_backward<kernel_scalar_t<scalar_t>>(
        g.const_data_ptr<acc_t>(), kernel_ptr<scalar_t>(s), kernel_ptr<scalar_t>(t),
        S.const_data_ptr<acc_t>(), Ns.const_data_ptr<acc_t>(), Nt.const_data_ptr<acc_t>(), layout,
        B, C, HW, eps, kernel_mutable_ptr<scalar_t>(grad_s), kernel_mutable_ptr<scalar_t>(grad_t),
        stream));
  });
  return {grad_s, grad_t};
}

}  // namespace
}  // namespace cuda_impl
}  // namespace kdengine

TORCH_LIBRARY_IMPL(kdengine, CUDA, m) {
  m.impl("cosine_similarity_map", &kdengine::cuda_impl::cosine_similarity_map_cuda);
  m.impl("_cosine_similarity_map_backward",
         &kdengine::cuda_impl::cosine_similarity_map_backward_cuda);
}
