// CUDA implementation of adm_region_pool and its backward: the CPU ops' checks, then the kernels
// of kernels/adm_region_pool.cuh on the current stream (no host synchronisation; capturable in a
// graph).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "../../kernels/adm_region_pool.cuh"
#include "../adm_region_pool.h"
#include "kernel_utils.h"

namespace kdengine {
namespace cuda_impl {
namespace {

std::tuple<at::Tensor, at::Tensor> adm_region_pool_cuda(const at::Tensor& feat,
                                                        const at::Tensor& attn,
                                                        const at::Tensor& labels,
                                                        int64_t num_classes,
                                                        int64_t ignore_index) {
  check_adm_region_pool(feat, attn, labels, num_classes);
  TORCH_CHECK(num_classes <= kernels::kRegionPoolMaxClasses,
              "adm_region_pool: the CUDA kernel takes num_classes <= ",
              kernels::kRegionPoolMaxClasses, ", got ", num_classes);
  const c10::cuda::CUDAGuard guard(feat.device());
  const std::pair<at::Tensor, Layout> dense = dense_feature(feat);
  const at::Tensor& x = dense.first;
  const kernels::Layout layout = kernel_layout(dense.second);
  const int64_t B = x.size(0), C = x.size(1), HW = x.size(2) * x.size(3);
  at::Tensor pooled, count;
  std::tie(pooled, count) = adm_region_pool_outputs(x, num_classes);
  if (B * HW == 0) {
    pooled.zero_();
    count.zero_();
    return {pooled, count};
  }
  const auto acc_type = at::toOpMathType(x.scalar_type());
  const at::Tensor a = attn.to(acc_type).contiguous();
  const at::Tensor l = labels.contiguous();
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "adm_region_pool_cuda", [&] {
    using kscalar_t = kernel_scalar_t<scalar_t>;
    using acc_t = at::opmath_type<scalar_t>;
    // Bytes from the caching allocator on this stream (16-byte aligned blocks).
    const at::Tensor workspace = at::empty(
        {kernels::adm_region_pool_forward_workspace_size<kscalar_t>(layout, B, C, HW, num_classes)},
        x.options().dtype(at::kByte));
    C10_CUDA_CHECK(kernels::launch_adm_region_pool_forward<kscalar_t>(
        kernel_ptr<scalar_t>(x), a.const_data_ptr<acc_t>(), l.const_data_ptr<int64_t>(), layout, B,
        C, HW, num_classes, ignore_index, kernel_mutable_ptr<scalar_t>(pooled),
        count.mutable_data_ptr<int64_t>(), workspace.mutable_data_ptr(), stream));
  });
  return {pooled, count};
}

at::Tensor adm_region_pool_backward_cuda(const at::Tensor& grad_pooled, const at::Tensor& feat,
                                         const at::Tensor& attn, const at::Tensor& labels,
                                         const at::Tensor& count, int64_t ignore_index) {
  check_adm_region_pool_backward(grad_pooled, feat, attn, labels, count);
  const c10::cuda::CUDAGuard guard(feat.device());
  const std::pair<at::Tensor, Layout> dense = dense_feature(feat);
  const at::Tensor& x = dense.first;
  const kernels::Layout layout = kernel_layout(dense.second);
  const int64_t B = x.size(0), C = x.size(1), HW = x.size(2) * x.size(3);
  const int64_t K = grad_pooled.size(1);
  at::Tensor grad = at::empty_like(x);  // same layout as the input it differentiates
  if (x.numel() == 0) return grad;
  const auto acc_type = at::toOpMathType(x.scalar_type());
  const at::Tensor scale = region_grad_scale(grad_pooled, count, acc_type);  // [B, K, C]
  const at::Tensor a = attn.to(acc_type).contiguous();
  const at::Tensor l = labels.contiguous();
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "adm_region_pool_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    C10_CUDA_CHECK(kernels::launch_adm_region_pool_backward<kernel_scalar_t<scalar_t>>(
        scale.const_data_ptr<acc_t>(), kernel_ptr<scalar_t>(x), a.const_data_ptr<acc_t>(),
        l.const_data_ptr<int64_t>(), layout, B, C, HW, K, ignore_index,
        kernel_mutable_ptr<scalar_t>(grad), stream));
  });
  return grad;
}

}  // namespace
}  // namespace cuda_impl
}  // namespace kdengine

TORCH_LIBRARY_IMPL(kdengine, CUDA, m) {
  m.impl("adm_region_pool", &kdengine::cuda_impl::adm_region_pool_cuda);
  m.impl("_adm_region_pool_backward", &kdengine::cuda_impl::adm_region_pool_backward_cuda);
}
