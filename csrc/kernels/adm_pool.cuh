// CUDA kernels of adm_pool: ADM's consensus / divergence attention and weighted pooling (paper
// Eq. 6-8) in one read of each input forward, one read and one write backward.
//
// The attention denominators are per-image constants, so
//   pooled_s[b,c] = sum_hw (1 + S) relu(s) / (HW * (1 + mean S + eps))
//   pooled_t[b,c] = sum_hw (1 - S) relu(t) / (HW * ((1 - mean S) + eps))
// and the numerators can accumulate while S is computed pixel by pixel. Forward:
//  1. adm_pool_partial_kernel, one block per (image, chunk of consecutive pixel tiles). For each
//     tile of P pixels it stages the C x P values of both inputs in shared memory (16-byte loads,
//     4 in flight per thread), computes S of the P pixels (channel_sums), then adds
//     (1 +- S) relu(x) over the tile to the chunk's per-channel numerators. Per chunk it leaves
//     the numerators [2, C] and the sum of S in the workspace (deterministic partials, no
//     atomics), and parks the raw S of its pixels in attn_co.
//  2. adm_pool_finish_kernel, per image: mean S from the chunks' sums, pooled_s / pooled_t from
//     the chunks' numerators, attn_co / attn_di from the parked S.
// When C is so large that one pixel of both inputs does not fit the shared-memory budget, the
// tiles are read from global memory twice instead (the second read mostly hits L2).
#pragma once

#include "common.cuh"

namespace kdengine {
namespace kernels {
namespace detail {

constexpr int64_t kAdmSmemBudget = 48 * 1024;  // the default limit: no opt-in attribute needed
constexpr int64_t kAdmMaxTile = 64;            // pixels per tile
constexpr int64_t kAdmTargetBlocks = 1024;     // enough blocks for a few waves on an H100

// How adm_pool_partial_kernel splits the pixels; a pure function of dtype, layout and shape, so
// the workspace size can be computed before the launch.
struct AdmPoolTiling {
  int64_t tile;             // pixels per tile (P)
  int64_t tiles;            // tiles per image
  int64_t tiles_per_chunk;  // tiles one block walks through
  int64_t chunks;           // blocks per image
  int64_t row_stride;       // NCHW: shared-memory row stride in elements, odd (bank conflicts)
  int64_t tile_bytes;       // bytes of one input's shared tile, a multiple of 16; 0 if !cached
  int64_t smem_bytes;       // dynamic shared memory per block
  int pm;                   // power of two >= tile: the pixel slots of channel_sums
  bool cached;              // tiles staged in shared memory (else read from global twice)
};

template <typename scalar_t>
inline AdmPoolTiling adm_pool_tiling(Layout layout, int64_t B, int64_t C, int64_t HW) {
  using acc_t = opmath_t<scalar_t>;
  const bool nhwc = layout == Layout::kNHWC;
  const auto row_stride = [](int64_t p) { return p | 1; };
  const auto tile_bytes = [&](int64_t p) {
    const int64_t elems = nhwc ? p * C : C * row_stride(p);
    return ceil_div(elems * static_cast<int64_t>(sizeof(scalar_t)), kVecBytes) * kVecBytes;
  };
  const auto smem_bytes = [&](int64_t p, bool cached) {
    const int pm = pow2_ceil(p);  // channel_sums scratch, S of the tile, phase-2 scratch:
    const int64_t acc_elems = channel_sums_scratch(pm) + pm + 2 * kThreads;
    return (cached ? 2 * tile_bytes(p) : 0) + acc_elems * static_cast<int64_t>(sizeof(acc_t));
  };

  AdmPoolTiling t{};
  int64_t max_tile = 0;
  for (int64_t p = min64(kAdmMaxTile, HW); p >= 1 && max_tile == 0; --p) {
    if (smem_bytes(p, true) <= kAdmSmemBudget) max_tile = p;
  }
  t.cached = max_tile > 0;
  // Uncached: NCHW tiles span a 128-byte row segment per channel; NHWC pixels are contiguous.
  if (!t.cached) max_tile = min64(HW, nhwc ? 8 : 32);
  // NCHW rows are copied with 16-byte vectors when every tile starts on a vector boundary.
  const int64_t v = vec_width<scalar_t>();
  const bool vec_rows = t.cached && !nhwc && HW % v == 0 && max_tile >= v;
  if (vec_rows) max_tile -= max_tile % v;
  t.tile = ceil_div(HW, ceil_div(HW, max_tile));  // equal tiles rather than a short last one
  if (vec_rows) t.tile = ceil_div(t.tile, v) * v;
  t.tiles = ceil_div(HW, t.tile);
  t.pm = pow2_ceil(t.tile);
  t.row_stride = row_stride(t.tile);
  t.tile_bytes = t.cached ? tile_bytes(t.tile) : 0;
  t.smem_bytes = smem_bytes(t.tile, t.cached);
  // Several blocks per image when B alone does not fill the GPU; no chunk is left empty.
  t.chunks = min64(t.tiles, ceil_div(kAdmTargetBlocks, B));
  t.tiles_per_chunk = ceil_div(t.tiles, t.chunks);
  t.chunks = ceil_div(t.tiles, t.tiles_per_chunk);
  return t;
}

// Copies pixels [p0, p0 + n) of one image of both inputs (s, t: the image's base) into shared
// memory: NHWC as the contiguous [n, C] block, NCHW as [C, row_stride] rows. kVec-wide loads
// need kVec | C (NHWC) or kVec | HW, p0, n (NCHW) and 16-byte aligned bases.
template <int kVec, bool kNHWC, typename scalar_t>
__device__ void load_tile_pair(const scalar_t* __restrict__ s, const scalar_t* __restrict__ t,
                               scalar_t* __restrict__ tile_s, scalar_t* __restrict__ tile_t,
                               int64_t C, int64_t HW, int64_t p0, int n, int64_t row_stride) {
  constexpr int kUnroll = 2;  // loads issued before the first store: 4 x 16 bytes in flight
  const int64_t per_row = kNHWC ? n * C / kVec : n / kVec;
  const int64_t total = kNHWC ? per_row : C * per_row;
  for (int64_t base = threadIdx.x; base < total; base += int64_t(kThreads) * kUnroll) {
    Vec<scalar_t, kVec> vs[kUnroll], vt[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t i = base + u * kThreads;
      if (i < total) {
        const int64_t off = kNHWC ? p0 * C + i * kVec
                                  : (i / per_row) * HW + p0 + (i % per_row) * kVec;
        vs[u] = load_vec<kVec>(s + off);
        vt[u] = load_vec<kVec>(t + off);
      }
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t i = base + u * kThreads;
      if (i < total) {
        if constexpr (kNHWC) {
          store_vec(tile_s + i * kVec, vs[u]);
          store_vec(tile_t + i * kVec, vt[u]);
        } else {
          // Odd row stride: element-wise stores (a row start is not 16-byte aligned).
          const int64_t c = i / per_row;
          const int64_t off = c * row_stride + (i - c * per_row) * kVec;
#pragma unroll
          for (int j = 0; j < kVec; ++j) {
            tile_s[off + j] = vs[u].v[j];
            tile_t[off + j] = vt[u].v[j];
          }
        }
      }
    }
  }
}

// Adds sum_p (1 + S[p]) relu(s[c, p]) to num_s[c] and sum_p (1 - S[p]) relu(t[c, p]) to
// num_t[c] over the n pixels of a tile (element (c, p) at p * pixel_stride + c * channel_stride);
// `first` overwrites instead. With C < kThreads the pixels are split over kThreads / C thread
// groups combined through `red` (2 * kThreads elements). Every thread of the block must call it.
template <typename scalar_t, typename acc_t>
__device__ void accumulate_weighted_relu(const scalar_t* __restrict__ s,
                                         const scalar_t* __restrict__ t, int64_t pixel_stride,
                                         int64_t channel_stride, int64_t C, int n,
                                         const acc_t* sim, acc_t* red, acc_t* num_s, acc_t* num_t,
                                         bool first) {
  const int tid = threadIdx.x;
  const int64_t groups = C >= kThreads ? 1 : kThreads / C;
  if (groups == 1) {
    for (int64_t c = tid; c < C; c += kThreads) {
      acc_t us = 0, ut = 0;
      for (int p = 0; p < n; ++p) {
        const int64_t off = p * pixel_stride + c * channel_stride;
        us += (acc_t(1) + sim[p]) * relu(to_acc(s[off]));
        ut += (acc_t(1) - sim[p]) * relu(to_acc(t[off]));
      }
      num_s[c] = first ? us : num_s[c] + us;
      num_t[c] = first ? ut : num_t[c] + ut;
    }
    return;
  }
  const int64_t g = tid / C, c = tid % C;  // tid = g * C + c
  acc_t us = 0, ut = 0;
  if (g < groups) {
    for (int64_t p = g; p < n; p += groups) {
      const int64_t off = p * pixel_stride + c * channel_stride;
      us += (acc_t(1) + sim[p]) * relu(to_acc(s[off]));
      ut += (acc_t(1) - sim[p]) * relu(to_acc(t[off]));
    }
  }
  red[tid] = us;
  red[kThreads + tid] = ut;
  __syncthreads();
  if (tid < C) {
    us = 0;
    ut = 0;
    for (int64_t k = 0; k < groups; ++k) {
      us += red[k * C + tid];
      ut += red[kThreads + k * C + tid];
    }
    num_s[tid] = first ? us : num_s[tid] + us;
    num_t[tid] = first ? ut : num_t[tid] + ut;
  }
}

// Three resident blocks per SM (the shared-memory budget allows 3 on an A100, 4 on an H100)
// caps registers at 85 per thread.
constexpr int kAdmPartialMinBlocks = 3;

template <typename scalar_t, int kVec, bool kNHWC, bool kCached>
__global__ void __launch_bounds__(kThreads, kAdmPartialMinBlocks)
    adm_pool_partial_kernel(const scalar_t* __restrict__ feat_s,
                            const scalar_t* __restrict__ feat_t, int64_t C, int64_t HW,
                            AdmPoolTiling tiling, opmath_t<scalar_t>* __restrict__ sim_raw,
                            opmath_t<scalar_t>* __restrict__ numerators,
                            opmath_t<scalar_t>* __restrict__ sim_sums) {
  using acc_t = opmath_t<scalar_t>;
  extern __shared__ __align__(16) unsigned char smem[];
  scalar_t* tile_s = reinterpret_cast<scalar_t*>(smem);
  scalar_t* tile_t = reinterpret_cast<scalar_t*>(smem + tiling.tile_bytes);
  acc_t* red = reinterpret_cast<acc_t*>(smem + 2 * tiling.tile_bytes);
  acc_t* sim = red + channel_sums_scratch(tiling.pm);  // S of the tile's pixels
  acc_t* red2 = sim + tiling.pm;

  const int tid = threadIdx.x;
  const int64_t b = blockIdx.x / tiling.chunks;
  const int64_t chunk = blockIdx.x % tiling.chunks;
  const int64_t tile_begin = chunk * tiling.tiles_per_chunk;
  const int64_t tile_end = min64(tiling.tiles, tile_begin + tiling.tiles_per_chunk);
  const scalar_t* s = feat_s + b * C * HW;
  const scalar_t* t = feat_t + b * C * HW;
  acc_t* num_s = numerators + (b * tiling.chunks + chunk) * 2 * C;
  acc_t* num_t = num_s + C;
  // Element (c, p) of a tile: NHWC [P, C] in both memories; NCHW [C, row_stride] when staged,
  // the image's [C, HW] rows when not.
  const int64_t pixel_stride = kNHWC ? C : 1;
  const int64_t channel_stride = kNHWC ? 1 : (kCached ? tiling.row_stride : HW);

  acc_t sim_total = 0;  // thread 0: sum of S over the chunk
  for (int64_t tile = tile_begin; tile < tile_end; ++tile) {
    const int64_t p0 = tile * tiling.tile;
    const int n = static_cast<int>(min64(tiling.tile, HW - p0));
    const scalar_t* xs = s + p0 * pixel_stride;
    const scalar_t* xt = t + p0 * pixel_stride;
    if constexpr (kCached) {
      load_tile_pair<kVec, kNHWC>(s, t, tile_s, tile_t, C, HW, p0, n, tiling.row_stride);
      __syncthreads();
      xs = tile_s;
      xt = tile_t;
    }
    const ChannelSums<acc_t> sums =
        channel_sums<kNHWC>(xs, xt, pixel_stride, channel_stride, C, n, tiling.pm, red);
    if (tid < n) {
      const acc_t cos =
          cosine_from_sums(sums.dot, sqrt(sums.ns), sqrt(sums.nt), static_cast<acc_t>(kCosEps));
      sim[tid] = cos;
      sim_raw[b * HW + p0 + tid] = cos;
    }
    __syncthreads();
    if (tid == 0) {
      for (int p = 0; p < n; ++p) sim_total += sim[p];
    }
    accumulate_weighted_relu(xs, xt, pixel_stride, channel_stride, C, n, sim, red2, num_s, num_t,
                             tile == tile_begin);
    __syncthreads();  // the next tile overwrites the shared tile, sim and the scratch
  }
  if (tid == 0) sim_sums[b * tiling.chunks + chunk] = sim_total;
}

// Block (b, j): pooled values of channels and attention values of pixels, index i = j * kThreads
// + tid over [0, C + HW). Every block of image b derives the same mean S from the chunk sums.
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    adm_pool_finish_kernel(const opmath_t<scalar_t>* __restrict__ numerators,
                           const opmath_t<scalar_t>* __restrict__ sim_sums, int64_t C, int64_t HW,
                           int64_t chunks, int64_t blocks_per_image, opmath_t<scalar_t> eps,
                           scalar_t* __restrict__ pooled_s, scalar_t* __restrict__ pooled_t,
                           opmath_t<scalar_t>* __restrict__ attn_co,
                           opmath_t<scalar_t>* __restrict__ attn_di) {
  using acc_t = opmath_t<scalar_t>;
  __shared__ acc_t scratch[kWarps];
  const int64_t b = blockIdx.x / blocks_per_image;
  const int64_t i = (blockIdx.x % blocks_per_image) * kThreads + threadIdx.x;
  acc_t part = 0;
  for (int64_t k = threadIdx.x; k < chunks; k += kThreads) part += sim_sums[b * chunks + k];
  const acc_t mean_sim = block_sum(part, scratch) / static_cast<acc_t>(HW);
  const acc_t den_co = acc_t(1) + mean_sim + eps;
  const acc_t den_di = (acc_t(1) - mean_sim) + eps;
  if (i < C) {
    acc_t ns = 0, nt = 0;
    for (int64_t k = 0; k < chunks; ++k) {
      const acc_t* num = numerators + (b * chunks + k) * 2 * C;
      ns += num[i];
      nt += num[C + i];
    }
    pooled_s[b * C + i] = from_acc<scalar_t>(ns / (static_cast<acc_t>(HW) * den_co));
    pooled_t[b * C + i] = from_acc<scalar_t>(nt / (static_cast<acc_t>(HW) * den_di));
  } else if (i < C + HW) {
    const int64_t px = b * HW + (i - C);
    const acc_t cos = attn_co[px];
    attn_co[px] = (acc_t(1) + cos) / den_co;
    attn_di[px] = (acc_t(1) - cos) / den_di;
  }
}

// grad_feat = grad_pooled[b, c] * attn[b, p] / HW * (feat > 0) over kVec consecutive elements
// per step; kVec only needs kVec | B*C*HW: the (channel, pixel) position advances per element.
// The products are ordered as in the CPU kernel of each layout.
template <typename scalar_t, int kVec, bool kNHWC>
__global__ void __launch_bounds__(kThreads)
    adm_pool_backward_kernel(const opmath_t<scalar_t>* __restrict__ grad_pooled,
                             const scalar_t* __restrict__ feat,
                             const opmath_t<scalar_t>* __restrict__ attn, int64_t C, int64_t HW,
                             int64_t nvec, opmath_t<scalar_t> inv_hw,
                             scalar_t* __restrict__ grad_feat) {
  using acc_t = opmath_t<scalar_t>;
  for (int64_t v = int64_t(blockIdx.x) * kThreads + threadIdx.x; v < nvec;
       v += int64_t(gridDim.x) * kThreads) {
    const int64_t i = v * kVec;
    const Vec<scalar_t, kVec> x = load_vec<kVec>(feat + i);
    Vec<scalar_t, kVec> out;
    if constexpr (kNHWC) {
      int64_t bp = i / C, c = i - bp * C;  // pixel b * HW + p, channel c
      acc_t w = attn[bp] * inv_hw;
      const acc_t* g = grad_pooled + (bp / HW) * C;
#pragma unroll
      for (int j = 0; j < kVec; ++j, ++c) {
        if (c == C) {
          c = 0;
          ++bp;
          w = attn[bp] * inv_hw;
          g = grad_pooled + (bp / HW) * C;
        }
        out.v[j] = from_acc<scalar_t>(to_acc(x.v[j]) > acc_t(0) ? w * g[c] : acc_t(0));
      }
    } else {
      int64_t bc = i / HW, p = i - bc * HW;  // row b * C + c, pixel p
      acc_t scale = grad_pooled[bc] * inv_hw;
      const acc_t* a = attn + (bc / C) * HW;
#pragma unroll
      for (int j = 0; j < kVec; ++j, ++p) {
        if (p == HW) {
          p = 0;
          ++bc;
          scale = grad_pooled[bc] * inv_hw;
          a = attn + (bc / C) * HW;
        }
        out.v[j] = from_acc<scalar_t>(to_acc(x.v[j]) > acc_t(0) ? scale * a[p] : acc_t(0));
      }
    }
    store_vec(grad_feat + i, out);
  }
}

}  // namespace detail

// Workspace of launch_adm_pool_forward, in elements of opmath_t<scalar_t>.
template <typename scalar_t>
int64_t adm_pool_forward_workspace_size(Layout layout, int64_t B, int64_t C, int64_t HW) {
  const detail::AdmPoolTiling tiling = detail::adm_pool_tiling<scalar_t>(layout, B, C, HW);
  return B * tiling.chunks * (2 * C + 1);
}

// Forward of adm_pool for features [B, C, HW] (NCHW) or [B, HW, C] (NHWC), B, C, HW >= 1.
//   pooled_s, pooled_t: [B, C] in scalar_t.
//   attn_co, attn_di:   [B, HW] in opmath_t<scalar_t> (S eps 1e-8, denominators eps `eps`).
//   workspace:          adm_pool_forward_workspace_size(layout, B, C, HW) elements, no
//                       initialisation needed.
// Two kernels on `stream`; deterministic. Returns cudaGetLastError().
template <typename scalar_t>
cudaError_t launch_adm_pool_forward(const scalar_t* feat_s, const scalar_t* feat_t, Layout layout,
                                    int64_t B, int64_t C, int64_t HW, double eps,
                                    scalar_t* pooled_s, scalar_t* pooled_t,
                                    opmath_t<scalar_t>* attn_co, opmath_t<scalar_t>* attn_di,
                                    opmath_t<scalar_t>* workspace, cudaStream_t stream) {
  using acc_t = opmath_t<scalar_t>;
  if (B < 1 || C < 1 || HW < 1) return cudaErrorInvalidValue;
  const bool nhwc = layout == Layout::kNHWC;
  const detail::AdmPoolTiling tiling = detail::adm_pool_tiling<scalar_t>(layout, B, C, HW);
  acc_t* numerators = workspace;                            // [B, chunks, 2, C]
  acc_t* sim_sums = workspace + B * tiling.chunks * 2 * C;  // [B, chunks]
  constexpr int V = vec_width<scalar_t>();
  const bool vectorised = tiling.cached && is_aligned(feat_s) && is_aligned(feat_t) &&
                          (nhwc ? C % V == 0 : HW % V == 0 && tiling.tile % V == 0);
  dispatch_vec_layout<V>(vectorised, layout, [&](auto vec, auto nhwc_tag) {
    constexpr bool kNHWC = decltype(nhwc_tag)::value;
    const dim3 grid(static_cast<unsigned>(B * tiling.chunks));
    const size_t smem = static_cast<size_t>(tiling.smem_bytes);
    if (tiling.cached) {
      detail::adm_pool_partial_kernel<scalar_t, decltype(vec)::value, kNHWC, true>
          <<<grid, kThreads, smem, stream>>>(feat_s, feat_t, C, HW, tiling, attn_co, numerators,
                                             sim_sums);
    } else {
      detail::adm_pool_partial_kernel<scalar_t, 1, kNHWC, false>
          <<<grid, kThreads, smem, stream>>>(feat_s, feat_t, C, HW, tiling, attn_co, numerators,
                                             sim_sums);
    }
  });
  const int64_t blocks_per_image = ceil_div(C + HW, kThreads);
  detail::adm_pool_finish_kernel<scalar_t>
      <<<static_cast<unsigned>(B * blocks_per_image), kThreads, 0, stream>>>(
          numerators, sim_sums, C, HW, tiling.chunks, blocks_per_image, static_cast<acc_t>(eps),
          pooled_s, pooled_t, attn_co, attn_di);
  return cudaGetLastError();
}

// Backward of adm_pool for one input: grad_feat[b,c,p] = grad_pooled[b,c] * attn[b,p] / HW *
// (feat[b,c,p] > 0). grad_pooled [B, C] and attn [B, HW] in opmath_t<scalar_t>; feat and
// grad_feat in `layout`, B, C, HW >= 1. One kernel on `stream`. Returns cudaGetLastError().
template <typename scalar_t>
cudaError_t launch_adm_pool_backward(const opmath_t<scalar_t>* grad_pooled, const scalar_t* feat,
                                     const opmath_t<scalar_t>* attn, Layout layout, int64_t B,
                                     int64_t C, int64_t HW, scalar_t* grad_feat,
                                     cudaStream_t stream) {
  using acc_t = opmath_t<scalar_t>;
  if (B < 1 || C < 1 || HW < 1) return cudaErrorInvalidValue;
  constexpr int V = vec_width<scalar_t>();
  const int64_t N = B * C * HW;
  const bool vectorised = N % V == 0 && is_aligned(feat) && is_aligned(grad_feat);
  const int64_t nvec = vectorised ? N / V : N;
  const acc_t inv_hw = acc_t(1) / static_cast<acc_t>(HW);
  dispatch_vec_layout<V>(vectorised, layout, [&](auto vec, auto nhwc) {
    detail::adm_pool_backward_kernel<scalar_t, decltype(vec)::value, decltype(nhwc)::value>
        <<<elementwise_grid(nvec), kThreads, 0, stream>>>(grad_pooled, feat, attn, C, HW, nvec,
                                                          inv_hw, grad_feat);
  });
  return cudaGetLastError();
}

// Explicit instantiations of every launcher above for one scalar type T, for a translation unit
// that wants them compiled in one place (the CI compile check uses it for all four types).
#define KDENGINE_INSTANTIATE_ADM_POOL(T)                                                         \
  template int64_t kdengine::kernels::adm_pool_forward_workspace_size<T>(                        \
      kdengine::kernels::Layout, int64_t, int64_t, int64_t);                                     \
  template cudaError_t kdengine::kernels::launch_adm_pool_forward<T>(                            \
      const T*, const T*, kdengine::kernels::Layout, int64_t, int64_t, int64_t, double, T*, T*,  \
      kdengine::kernels::opmath_t<T>*, kdengine::kernels::opmath_t<T>*,                          \
      kdengine::kernels::opmath_t<T>*, cudaStream_t);                                            \
  template cudaError_t kdengine::kernels::launch_adm_pool_backward<T>(                           \
      const kdengine::kernels::opmath_t<T>*, const T*, const kdengine::kernels::opmath_t<T>*,    \
      kdengine::kernels::Layout, int64_t, int64_t, int64_t, T*, cudaStream_t);

}  // namespace kernels
}  // namespace kdengine
