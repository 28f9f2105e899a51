// CUDA kernels of cosine_similarity_map: S[b,p] = <s, t> / (max(|s|, eps) max(|t|, eps)) over
// the channels of each pixel, and its backward.
//
// Forward: one block per (image, tile of pixels); channel_sums reduces the tile's channels
// straight from global memory (each input read once), then one thread per pixel writes S in
// scalar_t and the unclamped norms in opmath_t.
// Backward, with a = max(|s|, eps), c = max(|t|, eps) and g the incoming gradient:
//   grad_s = k_cross t - k_s s,  grad_t = k_cross s - k_t t,   k_cross = g / (a c),
//   k_s = |s| > eps ? g S / a^2 : 0,   k_t = |t| > eps ? g S / c^2 : 0,
// elementwise once the per-pixel S and norms saved by the forward are known (one read of each
// input, one write of each gradient, 16-byte vectors).
#pragma once

#include "common.cuh"

namespace kdengine {
namespace kernels {
namespace detail {

constexpr int kCosTileNCHW = 64;  // pixels per block: 64 consecutive elements of a channel row
constexpr int kCosTileNHWC = 8;   // pixels per block: 32 threads per pixel's channel vector

// Pixels per forward block: a power of two, no larger than the image needs.
inline int cosine_tile(Layout layout, int64_t HW) {
  const int p = layout == Layout::kNHWC ? kCosTileNHWC : kCosTileNCHW;
  return HW < p ? pow2_ceil(HW) : p;
}

template <typename scalar_t, bool kNHWC>
__global__ void __launch_bounds__(kThreads)
    cosine_map_forward_kernel(const scalar_t* __restrict__ feat_s,
                              const scalar_t* __restrict__ feat_t, int64_t C, int64_t HW, int pm,
                              int64_t tiles, opmath_t<scalar_t> eps, scalar_t* __restrict__ sim,
                              opmath_t<scalar_t>* __restrict__ norm_s,
                              opmath_t<scalar_t>* __restrict__ norm_t) {
  using acc_t = opmath_t<scalar_t>;
  __shared__ acc_t red[3 * kWarps * kCosTileNCHW];  // channel_sums_scratch(pm) for pm <= 64
  const int64_t b = blockIdx.x / tiles;
  const int64_t p0 = (blockIdx.x % tiles) * pm;
  const int n = static_cast<int>(min64(pm, HW - p0));
  const int64_t pixel_stride = kNHWC ? C : 1;
  const int64_t channel_stride = kNHWC ? 1 : HW;
  const int64_t base = b * C * HW + p0 * pixel_stride;
  const ChannelSums<acc_t> sums = channel_sums<kNHWC>(feat_s + base, feat_t + base, pixel_stride,
                                                      channel_stride, C, n, pm, red);
  const int tid = threadIdx.x;
  if (tid < n) {
    const int64_t px = b * HW + p0 + tid;
    const acc_t a = sqrt(sums.ns), c = sqrt(sums.nt);
    sim[px] = from_acc<scalar_t>(cosine_from_sums(sums.dot, a, c, eps));
    norm_s[px] = a;
    norm_t[px] = c;
  }
}

// The backward's per-pixel coefficients (see the top of the file), as in the CPU kernel.
template <typename acc_t>
struct CosineCoefficients {
  acc_t cross, s, t;
};

template <typename acc_t>
__device__ __forceinline__ CosineCoefficients<acc_t> cosine_coefficients(
    const acc_t* __restrict__ grad, const acc_t* __restrict__ sim,
    const acc_t* __restrict__ norm_s, const acc_t* __restrict__ norm_t, int64_t px, acc_t eps) {
  const acc_t g = grad[px], ns = norm_s[px], nt = norm_t[px];
  const acc_t a = clamp_min(ns, eps), c = clamp_min(nt, eps);
  return {g / (a * c), ns > eps ? g * sim[px] / (a * a) : acc_t(0),
          nt > eps ? g * sim[px] / (c * c) : acc_t(0)};
}

// kVec consecutive elements per step; kVec only needs kVec | B*C*HW: the (channel, pixel)
// position advances per element.
template <typename scalar_t, int kVec, bool kNHWC>
__global__ void __launch_bounds__(kThreads)
    cosine_map_backward_kernel(const opmath_t<scalar_t>* __restrict__ grad,
                               const scalar_t* __restrict__ feat_s,
                               const scalar_t* __restrict__ feat_t,
                               const opmath_t<scalar_t>* __restrict__ sim,
                               const opmath_t<scalar_t>* __restrict__ norm_s,
                               const opmath_t<scalar_t>* __restrict__ norm_t, int64_t C,
                               int64_t HW, int64_t nvec, opmath_t<scalar_t> eps,
                               scalar_t* __restrict__ grad_s, scalar_t* __restrict__ grad_t) {
  using acc_t = opmath_t<scalar_t>;
  for (int64_t v = int64_t(blockIdx.x) * kThreads + threadIdx.x; v < nvec;
       v += int64_t(gridDim.x) * kThreads) {
    const int64_t i = v * kVec;
    const Vec<scalar_t, kVec> xs = load_vec<kVec>(feat_s + i);
    const Vec<scalar_t, kVec> xt = load_vec<kVec>(feat_t + i);
    Vec<scalar_t, kVec> out_s, out_t;
    if constexpr (kNHWC) {
      int64_t px = i / C, c = i - px * C;  // pixel b * HW + p, channel c
      CosineCoefficients<acc_t> k = cosine_coefficients(grad, sim, norm_s, norm_t, px, eps);
#pragma unroll
      for (int j = 0; j < kVec; ++j, ++c) {
        if (c == C) {
          c = 0;
          ++px;
          k = cosine_coefficients(grad, sim, norm_s, norm_t, px, eps);
        }
        const acc_t x = to_acc(xs.v[j]), y = to_acc(xt.v[j]);
        out_s.v[j] = from_acc<scalar_t>(k.cross * y - k.s * x);
        out_t.v[j] = from_acc<scalar_t>(k.cross * x - k.t * y);
      }
    } else {
      int64_t bc = i / HW, p = i - bc * HW;  // row b * C + c, pixel p
      int64_t image = (bc / C) * HW;  // first pixel of image b
#pragma unroll
      for (int j = 0; j < kVec; ++j, ++p) {
        if (p == HW) {
          p = 0;
          ++bc;
          image = (bc / C) * HW;
        }
        const CosineCoefficients<acc_t> k =
            cosine_coefficients(grad, sim, norm_s, norm_t, image + p, eps);
        const acc_t x = to_acc(xs.v[j]), y = to_acc(xt.v[j]);
        out_s.v[j] = from_acc<scalar_t>(k.cross * y - k.s * x);
        out_t.v[j] = from_acc<scalar_t>(k.cross * x - k.t * y);
      }
    }
    store_vec(grad_s + i, out_s);
    store_vec(grad_t + i, out_t);
  }
}

}  // namespace detail

// Forward of cosine_similarity_map for features [B, C, HW] (NCHW) or [B, HW, C] (NHWC), B, C,
// HW >= 1: sim [B, HW] in scalar_t, the unclamped channel norms norm_s, norm_t [B, HW] in
// opmath_t<scalar_t>. One kernel on `stream`. Returns cudaGetLastError().
template <typename scalar_t>
cudaError_t launch_cosine_similarity_map_forward(const scalar_t* feat_s, const scalar_t* feat_t,
                                                 Layout layout, int64_t B, int64_t C, int64_t HW,
                                                 double eps, scalar_t* sim,
                                                 opmath_t<scalar_t>* norm_s,
                                                 opmath_t<scalar_t>* norm_t, cudaStream_t stream) {
  using acc_t = opmath_t<scalar_t>;
  if (B < 1 || C < 1 || HW < 1) return cudaErrorInvalidValue;
  const int pm = detail::cosine_tile(layout, HW);
  const int64_t tiles = ceil_div(HW, pm);
  const dim3 grid(static_cast<unsigned>(B * tiles));
  if (layout == Layout::kNHWC) {
    detail::cosine_map_forward_kernel<scalar_t, true><<<grid, kThreads, 0, stream>>>(
        feat_s, feat_t, C, HW, pm, tiles, static_cast<acc_t>(eps), sim, norm_s, norm_t);
  } else {
    detail::cosine_map_forward_kernel<scalar_t, false><<<grid, kThreads, 0, stream>>>(
        feat_s, feat_t, C, HW, pm, tiles, static_cast<acc_t>(eps), sim, norm_s, norm_t);
  }
  return cudaGetLastError();
}

// Backward of cosine_similarity_map: grad [B, HW], sim, norm_s, norm_t (as saved by the forward)
// in opmath_t<scalar_t>; feat_s, feat_t, grad_s, grad_t in `layout`, B, C, HW >= 1. One kernel
// on `stream`. Returns cudaGetLastError().
template <typename scalar_t>
cudaError_t launch_cosine_similarity_map_backward(
    const opmath_t<scalar_t>* grad, const scalar_t* feat_s, const scalar_t* feat_t,
    const opmath_t<scalar_t>* sim, const opmath_t<scalar_t>* norm_s,
    const opmath_t<scalar_t>* norm_t, Layout layout, int64_t B, int64_t C, int64_t HW, double eps,
    scalar_t* grad_s, scalar_t* grad_t, cudaStream_t stream) {
  using acc_t = opmath_t<scalar_t>;
  if (B < 1 || C < 1 || HW < 1) return cudaErrorInvalidValue;
  constexpr int V = vec_width<scalar_t>();
  const int64_t N = B * C * HW;
  const bool vectorised = N % V == 0 && is_aligned(feat_s) && is_aligned(feat_t) &&
                          is_aligned(grad_s) && is_aligned(grad_t);
  const int64_t nvec = vectorised ? N / V : N;
  dispatch_vec_layout<V>(vectorised, layout, [&](auto vec, auto nhwc) {
    detail::cosine_map_backward_kernel<scalar_t, decltype(vec)::value, decltype(nhwc)::value>
        <<<elementwise_grid(nvec), kThreads, 0, stream>>>(grad, feat_s, feat_t, sim, norm_s,
                                                          norm_t, C, HW, nvec,
                                                          static_cast<acc_t>(eps), grad_s, grad_t);
  });
  return cudaGetLastError();
}

// Explicit instantiations of every launcher above for one scalar type T (see adm_pool.cuh).
#define KDENGINE_INSTANTIATE_COSINE_SIMILARITY_MAP(T)                                           \
  template cudaError_t kdengine::kernels::launch_cosine_similarity_map_forward<T>(              \
      const T*, const T*, kdengine::kernels::Layout, int64_t, int64_t, int64_t, double, T*,     \
      kdengine::kernels::opmath_t<T>*, kdengine::kernels::opmath_t<T>*, cudaStream_t);          \
  template cudaError_t kdengine::kernels::launch_cosine_similarity_map_backward<T>(             \
      const kdengine::kernels::opmath_t<T>*, const T*, const T*,                                \
      const kdengine::kernels::opmath_t<T>*, const kdengine::kernels::opmath_t<T>*,             \
      const kdengine::kernels::opmath_t<T>*, kdengine::kernels::Layout, int64_t, int64_t,       \
      int64_t, double, T*, T*, cudaStream_t);

}  // namespace kernels
}  // namespace kdengine
