// CUDA kernels of adm_maps: ADM's consensus / divergence maps with the means over valid pixels
// (paper Eq. 7-8 for dense prediction), one read of each input.
//
//  1. adm_maps_partial_kernel, one block per (image, tile of pixels): S of the tile's pixels from
//     channel_sums (straight from global memory), parked in attn_co, and the tile's sum of S and
//     number of pixels over its valid pixels in the workspace (deterministic partials, no
//     atomics).
//  2. adm_maps_finish_kernel, per image: mean S over the valid pixels from the tiles' partials
//     (0 when the image has none), then attn_co = (1 + S) / (1 + mean + eps) and
//     attn_di = (1 - S) / ((1 - mean) + eps) from the parked S.
#pragma once

#include "common.cuh"

namespace kdengine {
namespace kernels {
namespace detail {

constexpr int kMapsTileNCHW = 64;  // pixels per block: 64 consecutive elements of a channel row
constexpr int kMapsTileNHWC = 8;   // pixels per block: 32 threads per pixel's channel vector

// Pixels per partial block: a power of two, no larger than the image needs.
inline int adm_maps_tile(Layout layout, int64_t HW) {
  const int p = layout == Layout::kNHWC ? kMapsTileNHWC : kMapsTileNCHW;
  return HW < p ? pow2_ceil(HW) : p;
}

template <typename scalar_t, bool kNHWC>
__global__ void __launch_bounds__(kThreads)
    adm_maps_partial_kernel(const scalar_t* __restrict__ feat_s,
                            const scalar_t* __restrict__ feat_t, const bool* __restrict__ valid,
                            int64_t C, int64_t HW, int pm, int64_t tiles,
                            opmath_t<scalar_t>* __restrict__ sim,
                            opmath_t<scalar_t>* __restrict__ partial) {
  using acc_t = opmath_t<scalar_t>;
  __shared__ acc_t red[3 * kWarps * kMapsTileNCHW];  // channel_sums_scratch(pm) for pm <= 64
  __shared__ acc_t tile_sim[kMapsTileNCHW];           // S of the valid pixels, 0 elsewhere
  __shared__ acc_t tile_valid[kMapsTileNCHW];         // 1 for the valid pixels, 0 elsewhere
  const int64_t b = blockIdx.x / tiles;
  const int64_t tile = blockIdx.x % tiles;
  const int64_t p0 = tile * pm;
  const int n = static_cast<int>(min64(pm, HW - p0));
  const int64_t pixel_stride = kNHWC ? C : 1;
  const int64_t channel_stride = kNHWC ? 1 : HW;
  const int64_t base = b * C * HW + p0 * pixel_stride;
  const ChannelSums<acc_t> sums = channel_sums<kNHWC>(feat_s + base, feat_t + base, pixel_stride,
                                                      channel_stride, C, n, pm, red);
  const int tid = threadIdx.x;
  if (tid < n) {
    const int64_t px = b * HW + p0 + tid;
    const acc_t cos = cosine_from_sums(sums.dot, sqrt(sums.ns), sqrt(sums.nt),
                                       static_cast<acc_t>(kCosEps));
    sim[px] = cos;
    const bool ok = valid == nullptr || valid[px];
    tile_sim[tid] = ok ? cos : acc_t(0);
    tile_valid[tid] = ok ? acc_t(1) : acc_t(0);
  }
  __syncthreads();
  if (tid == 0) {
    acc_t total = 0, count = 0;
    for (int p = 0; p < n; ++p) {
      total += tile_sim[p];
      count += tile_valid[p];
    }
    partial[2 * (b * tiles + tile)] = total;
    partial[2 * (b * tiles + tile) + 1] = count;
  }
}

// Block (b, j): the maps of pixels j * kThreads + tid of image b. Every block of an image
// derives the same mean from the tiles' partials (a fixed reduction order).
template <typename acc_t>
__global__ void __launch_bounds__(kThreads)
    adm_maps_finish_kernel(const acc_t* __restrict__ partial, int64_t HW, int64_t tiles,
                           int64_t blocks_per_image, acc_t eps, acc_t* __restrict__ attn_co,
                           acc_t* __restrict__ attn_di) {
  __shared__ acc_t scratch[kWarps];
  const int64_t b = blockIdx.x / blocks_per_image;
  const int64_t p = (blockIdx.x % blocks_per_image) * kThreads + threadIdx.x;
  acc_t total = 0, count = 0;
  for (int64_t k = threadIdx.x; k < tiles; k += kThreads) {
    total += partial[2 * (b * tiles + k)];
    count += partial[2 * (b * tiles + k) + 1];
  }
  total = block_sum(total, scratch);
  count = block_sum(count, scratch);
  // An image without valid pixels has mean 0: its maps stay finite (and unused).
  const acc_t mean = count > acc_t(0) ? total / count : acc_t(0);
  const acc_t den_co = acc_t(1) + mean + eps;
  const acc_t den_di = (acc_t(1) - mean) + eps;
  if (p < HW) {
    const acc_t cos = attn_co[b * HW + p];
    attn_co[b * HW + p] = (acc_t(1) + cos) / den_co;
    attn_di[b * HW + p] = (acc_t(1) - cos) / den_di;
  }
}

}  // namespace detail

// Workspace of launch_adm_maps, in elements of opmath_t<scalar_t>.
template <typename scalar_t>
int64_t adm_maps_workspace_size(Layout layout, int64_t B, int64_t HW) {
  if (HW < 1) return 0;
  return 2 * B * ceil_div(HW, detail::adm_maps_tile(layout, HW));
}

// adm_maps for features [B, C, HW] (NCHW) or [B, HW, C] (NHWC), B, HW >= 1, C >= 0.
//   valid:            [B, HW] bools, or nullptr for "every pixel is valid".
//   attn_co, attn_di: [B, HW] in opmath_t<scalar_t> (S eps 1e-8, denominators eps `eps`).
//   workspace:        adm_maps_workspace_size(layout, B, HW) elements, no initialisation needed.
// Two kernels on `stream`; deterministic. Returns cudaGetLastError().
template <typename scalar_t>
cudaError_t launch_adm_maps(const scalar_t* feat_s, const scalar_t* feat_t, const bool* valid,
                            Layout layout, int64_t B, int64_t C, int64_t HW, double eps,
                            opmath_t<scalar_t>* attn_co, opmath_t<scalar_t>* attn_di,
                            opmath_t<scalar_t>* workspace, cudaStream_t stream) {
  using acc_t = opmath_t<scalar_t>;
  if (B < 1 || C < 0 || HW < 1) return cudaErrorInvalidValue;
  const int pm = detail::adm_maps_tile(layout, HW);
  const int64_t tiles = ceil_div(HW, pm);
  const dim3 grid(static_cast<unsigned>(B * tiles));
  if (layout == Layout::kNHWC) {
    detail::adm_maps_partial_kernel<scalar_t, true>
        <<<grid, kThreads, 0, stream>>>(feat_s, feat_t, valid, C, HW, pm, tiles, attn_co, workspace);
  } else {
    detail::adm_maps_partial_kernel<scalar_t, false>
        <<<grid, kThreads, 0, stream>>>(feat_s, feat_t, valid, C, HW, pm, tiles, attn_co, workspace);
  }
  const int64_t blocks_per_image = ceil_div(HW, kThreads);
  detail::adm_maps_finish_kernel<acc_t>
      <<<static_cast<unsigned>(B * blocks_per_image), kThreads, 0, stream>>>(
          workspace, HW, tiles, blocks_per_image, static_cast<acc_t>(eps), attn_co, attn_di);
  return cudaGetLastError();
}

// Explicit instantiations of every launcher above for one scalar type T, for a translation unit
// that wants them compiled in one place (the CI compile check uses it for all four types).
#define KDENGINE_INSTANTIATE_ADM_MAPS(T)                                                          \
  template int64_t kdengine::kernels::adm_maps_workspace_size<T>(kdengine::kernels::Layout,       \
                                                                 int64_t, int64_t);               \
  template cudaError_t kdengine::kernels::launch_adm_maps<T>(                                     \
      const T*, const T*, const bool*, kdengine::kernels::Layout, int64_t, int64_t, int64_t,      \
      double, kdengine::kernels::opmath_t<T>*, kdengine::kernels::opmath_t<T>*,                   \
      kdengine::kernels::opmath_t<T>*, cudaStream_t);

}  // namespace kernels
}  // namespace kdengine
