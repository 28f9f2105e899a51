// Building blocks shared by kdengine's framework-free CUDA kernels: the layout flag, opmath types
// and conversions, 16-byte vector loads, deterministic reductions, and the per-pixel channel sums
// that cosine_similarity_map and adm_pool both need.
//
// Nothing here allocates, synchronises with the host or depends on a framework, so the launchers
// built on it can run inside CUDA-graph capture. Conversions use the explicit intrinsics only
// (torch builds with __CUDA_NO_HALF_CONVERSIONS__ and friends).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace kdengine {
namespace kernels {

// Memory layout of a [B, C, H, W] feature: contiguous (NCHW) or channels_last (NHWC).
enum class Layout : int { kNCHW = 0, kNHWC = 1 };

constexpr int kThreads = 256;  // threads per block of every kernel
constexpr int kWarps = kThreads / 32;
constexpr int kVecBytes = 16;  // widest global load / store

// Accumulation type: fp32 for fp32/fp16/bf16, fp64 for fp64 (as at::opmath_type).
template <typename scalar_t>
struct OpMath {
  using type = float;
};
template <>
struct OpMath<double> {
  using type = double;
};
template <typename scalar_t>
using opmath_t = typename OpMath<scalar_t>::type;

// Elements of scalar_t in one 16-byte vector.
template <typename scalar_t>
constexpr int vec_width() {
  return kVecBytes / static_cast<int>(sizeof(scalar_t));
}

__host__ __device__ __forceinline__ int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

__host__ __device__ __forceinline__ int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }

inline bool is_aligned(const void* p) { return reinterpret_cast<uintptr_t>(p) % kVecBytes == 0; }

// Smallest power of two >= n (n >= 1).
inline int pow2_ceil(int64_t n) {
  int p = 1;
  while (p < n) p <<= 1;
  return p;
}

// ------------------------------------------------------------------------------ conversions

__device__ __forceinline__ float to_acc(float v) { return v; }
__device__ __forceinline__ double to_acc(double v) { return v; }
__device__ __forceinline__ float to_acc(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_acc(__nv_bfloat16 v) { return __bfloat162float(v); }

// scalar_t from its opmath value, rounded to nearest even (as c10::Half / c10::BFloat16 do).
template <typename scalar_t>
struct FromAcc;
template <>
struct FromAcc<float> {
  __device__ static float apply(float v) { return v; }
};
template <>
struct FromAcc<double> {
  __device__ static double apply(double v) { return v; }
};
template <>
struct FromAcc<__half> {
  __device__ static __half apply(float v) { return __float2half_rn(v); }
};
template <>
struct FromAcc<__nv_bfloat16> {
  __device__ static __nv_bfloat16 apply(float v) { return __float2bfloat16_rn(v); }
};
template <typename scalar_t>
__device__ __forceinline__ scalar_t from_acc(opmath_t<scalar_t> v) {
  return FromAcc<scalar_t>::apply(v);
}

// relu with std::max(x, 0)'s semantics (a NaN stays NaN), as the CPU kernels.
template <typename acc_t>
__device__ __forceinline__ acc_t relu(acc_t x) {
  return x < acc_t(0) ? acc_t(0) : x;
}

// ------------------------------------------------------------------------------ vectors

// N consecutive elements moved as one aligned load/store (N = 1: a plain scalar access).
template <typename T, int N>
struct alignas(sizeof(T) * N) Vec {
  T v[N];
};

template <int N, typename T>
__device__ __forceinline__ Vec<T, N> load_vec(const T* p) {
  return *reinterpret_cast<const Vec<T, N>*>(p);
}

template <int N, typename T>
__device__ __forceinline__ void store_vec(T* p, const Vec<T, N>& v) {
  *reinterpret_cast<Vec<T, N>*>(p) = v;
}

// ------------------------------------------------------------------------------ launch helpers

// Template arguments for dispatch_vec_layout's launch callback.
template <int V>
struct VecWidth {
  static constexpr int value = V;
};
template <bool kNHWC>
struct IsNHWC {
  static constexpr bool value = kNHWC;
};

// Turns the runtime vector width (V when `vectorised`, else 1) and layout into template
// arguments: calls launch(VecWidth<kVec>{}, IsNHWC<kNHWC>{}), where the callback reads them
// as decltype(vec)::value and decltype(nhwc)::value.
template <int V, typename Launch>
void dispatch_vec_layout(bool vectorised, Layout layout, const Launch& launch) {
  const bool nhwc = layout == Layout::kNHWC;
  if (vectorised && nhwc) {
    launch(VecWidth<V>{}, IsNHWC<true>{});
  } else if (vectorised) {
    launch(VecWidth<V>{}, IsNHWC<false>{});
  } else if (nhwc) {
    launch(VecWidth<1>{}, IsNHWC<true>{});
  } else {
    launch(VecWidth<1>{}, IsNHWC<false>{});
  }
}

// Blocks of a grid-stride elementwise kernel over `items` work items.
inline dim3 elementwise_grid(int64_t items) {
  constexpr int64_t kMaxBlocks = 1 << 16;  // many waves of resident blocks on any GPU
  const int64_t blocks = ceil_div(items, kThreads);
  return dim3(static_cast<unsigned>(blocks < kMaxBlocks ? blocks : kMaxBlocks));
}

// ------------------------------------------------------------------------------ reductions
// Fixed shuffle patterns and fixed summation orders: results are bitwise reproducible.

template <typename T>
__device__ __forceinline__ T warp_sum(T v) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// Sum of v over the block, returned to every thread. scratch: kWarps elements of shared memory.
template <typename T>
__device__ T block_sum(T v, T* scratch) {
  v = warp_sum(v);
  if ((threadIdx.x & 31) == 0) scratch[threadIdx.x >> 5] = v;
  __syncthreads();
  T total = 0;
  for (int w = 0; w < kWarps; ++w) total += scratch[w];
  __syncthreads();  // scratch may be reused by the caller
  return total;
}

// ------------------------------------------------------------------------------ channel sums

constexpr double kCosEps = 1e-8;  // F.cosine_similarity's default, used by adm_pool

template <typename acc_t>
struct ChannelSums {
  acc_t dot, ns, nt;  // <s, t>, |s|^2, |t|^2 over the channels of one pixel
};

// max(norm, eps) with std::max's semantics (a NaN norm stays NaN), as the CPU kernels.
template <typename acc_t>
__device__ __forceinline__ acc_t clamp_min(acc_t norm, acc_t eps) {
  return norm < eps ? eps : norm;
}

// Cosine as F.cosine_similarity: dot / (max(|s|, eps) * max(|t|, eps)).
template <typename acc_t>
__device__ __forceinline__ acc_t cosine_from_sums(acc_t dot, acc_t norm_s, acc_t norm_t, acc_t eps) {
  return dot / (clamp_min(norm_s, eps) * clamp_min(norm_t, eps));
}

// Elements of shared memory channel_sums needs: 3 sums x kWarps partials x pm pixels.
__host__ __device__ __forceinline__ int64_t channel_sums_scratch(int pm) {
  return 3 * kWarps * static_cast<int64_t>(pm);
}

// Channel sums of the n <= pm pixels of a tile; pm is a power of two <= kThreads. Element (c, p)
// of the tile is s[p * pixel_stride + c * channel_stride] (global memory or a shared copy).
//
// The block is split into pm pixels x G = kThreads / pm channel groups; a thread sums channels
// g, g + G, ... of its pixel. The thread order follows the memory order, so reads are coalesced
// (global) or free of bank conflicts (shared): NHWC puts g in the low thread bits (a pixel's
// channels are contiguous), NCHW puts p there (a channel's pixels are contiguous). Lanes of one
// warp that share a pixel are combined with shuffles, warps through `red` (channel_sums_scratch
// elements of shared memory).
//
// Returns the sums of pixel threadIdx.x in threads threadIdx.x < n (other threads: unspecified).
// Every thread of the block must call it; it ends after one __syncthreads(), and the caller must
// synchronise again before the next call reuses `red`.
template <bool kNHWC, typename scalar_t, typename acc_t = opmath_t<scalar_t>>
__device__ ChannelSums<acc_t> channel_sums(const scalar_t* __restrict__ s,
                                           const scalar_t* __restrict__ t, int64_t pixel_stride,
                                           int64_t channel_stride, int64_t C, int n, int pm,
                                           acc_t* red) {
  const int tid = threadIdx.x;
  const int groups = kThreads / pm;
  const int p = kNHWC ? tid / groups : tid % pm;
  const int g = kNHWC ? tid % groups : tid / pm;
  acc_t dot = 0, ns = 0, nt = 0;
  if (p < n) {
    const scalar_t* sp = s + p * pixel_stride;
    const scalar_t* tp = t + p * pixel_stride;
#pragma unroll 4
    for (int64_t c = g; c < C; c += groups) {
      const acc_t x = to_acc(sp[c * channel_stride]);
      const acc_t y = to_acc(tp[c * channel_stride]);
      dot += x * y;
      ns += x * x;
      nt += y * y;
    }
  }
  // Lanes of a warp with the same pixel differ exactly in the lane bits [lo, hi).
  const int lo = kNHWC ? 1 : pm;
  const int hi = kNHWC ? (groups < 32 ? groups : 32) : 32;
  for (int o = lo; o < hi; o <<= 1) {
    dot += __shfl_xor_sync(0xffffffffu, dot, o);
    ns += __shfl_xor_sync(0xffffffffu, ns, o);
    nt += __shfl_xor_sync(0xffffffffu, nt, o);
  }
  // One lane per (warp, pixel) publishes; `slot` numbers the warps that hold pixel p.
  const int lane = tid & 31, warp = tid >> 5;
  const int slot = kNHWC ? g / 32 : (pm < 32 ? warp : g);
  const int slots = kNHWC ? (groups > 32 ? groups / 32 : 1) : (pm < 32 ? kWarps : groups);
  const bool publishes = (lane & ((hi - 1) & ~(lo - 1))) == 0;
  if (publishes && p < n) {
    red[(0 * kWarps + slot) * pm + p] = dot;
    red[(1 * kWarps + slot) * pm + p] = ns;
    red[(2 * kWarps + slot) * pm + p] = nt;
  }
  __syncthreads();
  ChannelSums<acc_t> out{0, 0, 0};
  if (tid < n) {
    for (int k = 0; k < slots; ++k) {
      out.dot += red[(0 * kWarps + k) * pm + tid];
      out.ns += red[(1 * kWarps + k) * pm + tid];
      out.nt += red[(2 * kWarps + k) * pm + tid];
    }
  }
  return out;
}

}  // namespace kernels
}  // namespace kdengine
