// CUDA kernels of feature_mse: mean((s - t)^2) over N elements with no gradient into t.
//
// Forward: a deterministic two-stage reduction. feature_mse_partial_kernel (a grid whose size
// depends on N only) leaves one opmath partial sum per block in the workspace;
// feature_mse_finish_kernel adds them in double and writes the mean in scalar_t. Backward:
// grad_s = grad * 2 (s - t) / N with grad read from device memory, so nothing waits on the host.
// Both read each input once with 16-byte vectors when N and the pointers allow.
#pragma once

#include "common.cuh"

namespace kdengine {
namespace kernels {
namespace detail {

constexpr int64_t kMseMaxBlocks = 1024;         // partial sums: enough blocks to fill any GPU
constexpr int64_t kMseElementsPerThread = 64;  // fewer blocks for small N

// Blocks of the partial-sum kernel: a function of N only, so the result is the same on every GPU
// and the workspace size is known before the launch.
inline int64_t feature_mse_blocks(int64_t N) {
  return min64(ceil_div(N, kThreads * kMseElementsPerThread), kMseMaxBlocks);
}

template <typename scalar_t, int kVec>
__global__ void __launch_bounds__(kThreads)
    feature_mse_partial_kernel(const scalar_t* __restrict__ s, const scalar_t* __restrict__ t,
                               int64_t nvec, opmath_t<scalar_t>* __restrict__ partial) {
  using acc_t = opmath_t<scalar_t>;
  __shared__ acc_t scratch[kWarps];
  acc_t sum = 0;
  for (int64_t v = int64_t(blockIdx.x) * kThreads + threadIdx.x; v < nvec;
       v += int64_t(gridDim.x) * kThreads) {
    const Vec<scalar_t, kVec> x = load_vec<kVec>(s + v * kVec);
    const Vec<scalar_t, kVec> y = load_vec<kVec>(t + v * kVec);
#pragma unroll
    for (int j = 0; j < kVec; ++j) {
      const acc_t d = to_acc(x.v[j]) - to_acc(y.v[j]);
      sum += d * d;
    }
  }
  sum = block_sum(sum, scratch);
  if (threadIdx.x == 0) partial[blockIdx.x] = sum;
}

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    feature_mse_finish_kernel(const opmath_t<scalar_t>* __restrict__ partial, int64_t blocks,
                              int64_t N, scalar_t* __restrict__ out) {
  using acc_t = opmath_t<scalar_t>;
  __shared__ double scratch[kWarps];
  double sum = 0;
  for (int64_t k = threadIdx.x; k < blocks; k += kThreads) sum += static_cast<double>(partial[k]);
  sum = block_sum(sum, scratch);
  if (threadIdx.x == 0) out[0] = from_acc<scalar_t>(static_cast<acc_t>(sum / static_cast<double>(N)));
}

// grad_s = (2 grad / N) (s - t), the scale formed in double as in the CPU kernel.
template <typename scalar_t, int kVec>
__global__ void __launch_bounds__(kThreads)
    feature_mse_backward_kernel(const opmath_t<scalar_t>* __restrict__ grad,
                                const scalar_t* __restrict__ s, const scalar_t* __restrict__ t,
                                int64_t N, int64_t nvec, scalar_t* __restrict__ grad_s) {
  using acc_t = opmath_t<scalar_t>;
  const acc_t scale =
      static_cast<acc_t>(2.0 * static_cast<double>(grad[0]) / static_cast<double>(N));
  for (int64_t v = int64_t(blockIdx.x) * kThreads + threadIdx.x; v < nvec;
       v += int64_t(gridDim.x) * kThreads) {
    const Vec<scalar_t, kVec> x = load_vec<kVec>(s + v * kVec);
    const Vec<scalar_t, kVec> y = load_vec<kVec>(t + v * kVec);
    Vec<scalar_t, kVec> out;
#pragma unroll
    for (int j = 0; j < kVec; ++j) {
      out.v[j] = from_acc<scalar_t>(scale * (to_acc(x.v[j]) - to_acc(y.v[j])));
    }
    store_vec(grad_s + v * kVec, out);
  }
}

}  // namespace detail

// Workspace of launch_feature_mse_forward, in elements of opmath_t<scalar_t>.
template <typename scalar_t>
int64_t feature_mse_forward_workspace_size(int64_t N) {
  return detail::feature_mse_blocks(N);
}

// out[0] = mean((s - t)^2) in scalar_t over N >= 1 elements of s and t (one dense layout shared
// by both). workspace: feature_mse_forward_workspace_size(N) elements, no initialisation
// needed. Two kernels on `stream`; deterministic. Returns cudaGetLastError().
template <typename scalar_t>
cudaError_t launch_feature_mse_forward(const scalar_t* s, const scalar_t* t, int64_t N,
                                       scalar_t* out, opmath_t<scalar_t>* workspace,
                                       cudaStream_t stream) {
  if (N < 1) return cudaErrorInvalidValue;
  constexpr int V = vec_width<scalar_t>();
  const int64_t blocks = detail::feature_mse_blocks(N);
  if (N % V == 0 && is_aligned(s) && is_aligned(t)) {
    detail::feature_mse_partial_kernel<scalar_t, V>
        <<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(s, t, N / V, workspace);
  } else {
    detail::feature_mse_partial_kernel<scalar_t, 1>
        <<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(s, t, N, workspace);
  }
  detail::feature_mse_finish_kernel<scalar_t><<<1, kThreads, 0, stream>>>(workspace, blocks, N, out);
  return cudaGetLastError();
}

// grad_s = grad[0] * 2 (s - t) / N over N >= 1 elements, grad a single opmath_t<scalar_t> in
// device memory. One kernel on `stream`. Returns cudaGetLastError().
template <typename scalar_t>
cudaError_t launch_feature_mse_backward(const opmath_t<scalar_t>* grad, const scalar_t* s,
                                        const scalar_t* t, int64_t N, scalar_t* grad_s,
                                        cudaStream_t stream) {
  if (N < 1) return cudaErrorInvalidValue;
  constexpr int V = vec_width<scalar_t>();
  if (N % V == 0 && is_aligned(s) && is_aligned(t) && is_aligned(grad_s)) {
    detail::feature_mse_backward_kernel<scalar_t, V>
        <<<elementwise_grid(N / V), kThreads, 0, stream>>>(grad, s, t, N, N / V, grad_s);
  } else {
    detail::feature_mse_backward_kernel<scalar_t, 1>
        <<<elementwise_grid(N), kThreads, 0, stream>>>(grad, s, t, N, N, grad_s);
  }
  return cudaGetLastError();
}

// Explicit instantiations of every launcher above for one scalar type T (see adm_pool.cuh).
#define KDENGINE_INSTANTIATE_FEATURE_MSE(T)                                                     \
  template int64_t kdengine::kernels::feature_mse_forward_workspace_size<T>(int64_t);          \
  template cudaError_t kdengine::kernels::launch_feature_mse_forward<T>(                       \
      const T*, const T*, int64_t, T*, kdengine::kernels::opmath_t<T>*, cudaStream_t);         \
  template cudaError_t kdengine::kernels::launch_feature_mse_backward<T>(                      \
      const kdengine::kernels::opmath_t<T>*, const T*, const T*, int64_t, T*, cudaStream_t);

}  // namespace kernels
}  // namespace kdengine
