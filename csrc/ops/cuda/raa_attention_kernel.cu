// CUDA implementation of raa_attention and its backward: the CPU ops' checks, then the kernels
// of kernels/raa_attention.cuh on the current stream (no host synchronisation; capturable in a
// graph).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "../../kernels/raa_attention.cuh"
#include "../raa_attention.h"
#include "kernel_utils.h"

namespace kdengine {
namespace cuda_impl {
namespace {

template <typename T>
kernels::RaaInputs<kernel_scalar_t<T>> raa_inputs(const at::Tensor& q, const at::Tensor& k,
                                                  const at::Tensor& v, const at::Tensor& pos,
                                                  const RaaShape& s) {
  kernels::RaaInputs<kernel_scalar_t<T>> in{};
  in.q = kernel_ptr<T>(q);
  in.k = kernel_ptr<T>(k);
  in.v = kernel_ptr<T>(v);
  in.pos = kernel_ptr<T>(pos);
  in.q_sb = q.stride(0);
  in.q_sn = q.stride(1);
  in.k_sb = k.stride(0);
  in.k_sn = k.stride(1);
  in.v_sb = v.stride(0);
  in.v_sn = v.stride(1);
  in.pos_sb = s.batch_pos ? s.D : 0;
  in.pos_sn = s.batch_pos ? 0 : s.D;
  in.B = s.B;
  in.N = s.N;
  in.D = s.D;
  in.heads = s.heads;
  return in;
}

std::tuple<at::Tensor, at::Tensor> raa_attention_cuda(const at::Tensor& q_, const at::Tensor& k_,
                                                      const at::Tensor& v_,
                                                      const at::Tensor& pos_, int64_t heads) {
  const RaaShape s = check_raa_attention("raa_attention", q_, k_, v_, pos_, heads);
  const c10::cuda::CUDAGuard guard(q_.device());
  const auto dtype = q_.scalar_type();
  const at::Tensor q = raa_rows(q_, dtype), k = raa_rows(k_, dtype), v = raa_rows(v_, dtype);
  const at::Tensor pos = pos_.contiguous();
  at::Tensor out = at::empty({s.B, s.N, s.D}, q.options());
  at::Tensor lse = at::empty({s.B, heads, s.N}, q.options().dtype(at::toOpMathType(dtype)));
  if (out.numel() == 0) return {out, lse};
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "raa_attention_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    C10_CUDA_CHECK(kernels::launch_raa_attention_forward<kernel_scalar_t<scalar_t>>(
        raa_inputs<scalar_t>(q, k, v, pos, s), kernel_mutable_ptr<scalar_t>(out),
        lse.mutable_data_ptr<acc_t>(), stream));
  });
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> raa_attention_backward_cuda(
    const at::Tensor& grad_out_, const at::Tensor& q_, const at::Tensor& k_, const at::Tensor& v_,
    const at::Tensor& pos_, const at::Tensor& lse_, int64_t heads) {
  const RaaShape s = check_raa_attention_backward(grad_out_, q_, k_, v_, pos_, lse_, heads);
  const c10::cuda::CUDAGuard guard(q_.device());
  const auto dtype = q_.scalar_type();
  const auto acc_type = at::toOpMathType(dtype);
  const at::Tensor q = raa_rows(q_, dtype), k = raa_rows(k_, dtype), v = raa_rows(v_, dtype);
  const at::Tensor grad_out = raa_rows(grad_out_, dtype);
  const at::Tensor pos = pos_.contiguous();
  const at::Tensor lse = lse_.to(acc_type).contiguous();
  at::Tensor gq = at::empty({s.B, s.N, s.D}, q.options());
  at::Tensor gk = at::empty_like(gq), gv = at::empty_like(gq);
  at::Tensor gpos = at::empty(pos.sizes(), pos.options());
  if (gq.numel() == 0) return {gq, gk, gv, gpos.zero_()};
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "raa_attention_backward_cuda", [&] {
    using kscalar_t = kernel_scalar_t<scalar_t>;
    using acc_t = at::opmath_type<scalar_t>;
    // From the caching allocator on this stream: stream-ordered reuse, graph-private pool.
    const at::Tensor workspace = at::empty(
        {kernels::raa_attention_backward_workspace_size<kscalar_t>(s.B, s.N, s.D, heads)},
        q.options().dtype(acc_type));
    C10_CUDA_CHECK(kernels::launch_raa_attention_backward<kscalar_t>(
        raa_inputs<scalar_t>(q, k, v, pos, s), kernel_ptr<scalar_t>(grad_out),
        grad_out.stride(0), grad_out.stride(1), lse.const_data_ptr<acc_t>(),
        kernel_mutable_ptr<scalar_t>(gq), kernel_mutable_ptr<scalar_t>(gk),
        kernel_mutable_ptr<scalar_t>(gv), kernel_mutable_ptr<scalar_t>(gpos),
        workspace.mutable_data_ptr<acc_t>(), stream));
  });
  return {gq, gk, gv, gpos};
}

}  // namespace
}  // namespace cuda_impl
}  // namespace kdengine

TORCH_LIBRARY_IMPL(kdengine, CUDA, m) {
  m.impl("raa_attention", &kdengine::cuda_impl::raa_attention_cuda);
  m.impl("_raa_attention_backward", &kdengine::cuda_impl::raa_attention_backward_cuda);
}
