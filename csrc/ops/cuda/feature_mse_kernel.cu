// CUDA implementation of feature_mse and its backward: the CPU ops' checks, then the kernels of
// kernels/feature_mse.cuh on the current stream. The backward reads the incoming gradient from
// device memory, so neither direction synchronises with the host.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <limits>

#include "../../kernels/feature_mse.cuh"
#include "../checks.h"
#include "kernel_utils.h"

namespace kdengine {
namespace cuda_impl {
namespace {

// Both inputs in one dense layout, so they can be walked as flat arrays (as the CPU op).
std::pair<at::Tensor, at::Tensor> flat_pair(const at::Tensor& feat_s, const at::Tensor& feat_t) {
  if (feat_s.dim() == 4) {
    const std::pair<at::Tensor, Layout> dense = dense_feature(feat_s);
    return {dense.first, in_layout(feat_t, dense.second)};
  }
  return {feat_s.contiguous(), feat_t.contiguous()};
}

at::Tensor feature_mse_cuda(const at::Tensor& feat_s, const at::Tensor& feat_t) {
  check_feature_pair("feature_mse", feat_s, feat_t, /*require_4d=*/false);
  const c10::cuda::CUDAGuard guard(feat_s.device());
  const std::pair<at::Tensor, at::Tensor> flat = flat_pair(feat_s, feat_t);
  const at::Tensor& s = flat.first;
  const at::Tensor& t = flat.second;
  const int64_t N = s.numel();
  at::Tensor out = at::empty({}, s.options());
  if (N == 0) return out.fill_(std::numeric_limits<double>::quiet_NaN());  // as F.mse_loss
  const auto acc_type = at::toOpMathType(s.scalar_type());
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, s.scalar_type(), "feature_mse_cuda", [&] {
    using kscalar_t = kernel_scalar_t<scalar_t>;
    using acc_t = at::opmath_type<scalar_t>;
    // From the caching allocator on this stream: stream-ordered reuse, graph-private pool.
    const at::Tensor workspace =
        at::empty({kernels::feature_mse_forward_workspace_size<kscalar_t>(N)},
                  s.options().dtype(acc_type));
    C10_CUDA_CHECK(kernels::launch_feature_mse_forward<kscalar_t>(
        kernel_ptr<scalar_t>(s), kernel_ptr<scalar_t>(t), N, kernel_mutable_ptr<scalar_t>(out),
        workspace.mutable_data_ptr<acc_t>(), stream));
  });
  return out;
}

at::Tensor feature_mse_backward_cuda(const at::Tensor& grad, const at::Tensor& feat_s,
                                     const at::Tensor& feat_t) {
  constexpr const char* op = "_feature_mse_backward";
  check_feature_pair(op, feat_s, feat_t, /*require_4d=*/false);
  TORCH_CHECK(grad.numel() == 1, op, ": grad must be a scalar, got shape ", grad.sizes());
  check_same_device(op, "grad", grad, feat_s);
  const c10::cuda::CUDAGuard guard(feat_s.device());
  const std::pair<at::Tensor, at::Tensor> flat = flat_pair(feat_s, feat_t);
  const at::Tensor& s = flat.first;
  const at::Tensor& t = flat.second;
  const int64_t N = s.numel();
  at::Tensor out = at::empty_like(s);
  if (N == 0) return out;
  // Read by the kernel from device memory: no .item(), no host synchronisation.
  const at::Tensor g = grad.to(at::toOpMathType(s.scalar_type()));
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, s.scalar_type(), "feature_mse_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    C10_CUDA_CHECK(kernels::launch_feature_mse_backward<kernel_scalar_t<scalar_t>>(
        g.const_data_ptr<acc_t>(), kernel_ptr<scalar_t>(s), kernel_ptr<scalar_t>(t), N,
        kernel_mutable_ptr<scalar_t>(out), stream));
  });
  return out;
}

}  // namespace
}  // namespace cuda_impl
}  // namespace kdengine

TORCH_LIBRARY_IMPL(kdengine, CUDA, m) {
  m.impl("feature_mse", &kdengine::cuda_impl::feature_mse_cuda);
  m.impl("_feature_mse_backward", &kdengine::cuda_impl::feature_mse_backward_cuda);
}
