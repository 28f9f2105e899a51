// CUDA kernels of adm_region_pool: for each image and class k, the attention-weighted relu of the
// feature summed over the pixels labelled k, divided by their number; and its backward.
//
// Forward, deterministic (no floating-point atomics), one read of the feature:
//  1. region_pool_partial_kernel, block (image, pixel chunk, channel block). The block stages the
//     chunk's classes (-1 where a pixel is not pooled) and attention weights in shared memory and
//     counts the pixels of each class (integer shared atomics: exact in any order). Each thread
//     owns kVec channels (NHWC: consecutive channels of a pixel; NCHW: one channel, whose row it
//     reads kVec pixels at a time) and walks the chunk's pixels in order with one running sum per
//     channel; where the class changes, the sum is added to the chunk's partial row of the class
//     it belonged to (rows of the classes present are cleared first, by the same thread). Label
//     maps are piecewise constant, so a chunk sees few runs. Partials [B, chunks, K, C] and counts
//     [B, chunks, K] go to the workspace; rows of absent classes are neither written nor read.
//  2. region_pool_finish_kernel, block (image * class, channel block): the chunks' counts and the
//     partial rows of the chunks where the class is present, summed in chunk order.
// Backward: one elementwise pass, grad = scale[b, k, c] * attn[b, p] * (feat > 0) at the pooled
// pixels (scale = grad_pooled / count, computed by the caller), 0 elsewhere.
#pragma once

#include "common.cuh"

namespace kdengine {
namespace kernels {
namespace detail {

__host__ __device__ __forceinline__ int64_t max64(int64_t a, int64_t b) { return a > b ? a : b; }

constexpr int64_t kRegionMaxChunk = 1024;  // pixels staged per block
// Fewer pixels per block would make clearing and adding the partial rows of the classes present
// (per chunk: C values each) cost as much as reading the chunk.
constexpr int64_t kRegionMinChunk = 64;
constexpr int64_t kRegionTargetThreads = int64_t(1) << 18;  // threads in flight to aim for
constexpr int64_t kRegionPartialBudget = int64_t(1) << 25;  // workspace elements to stay under

// How region_pool_partial_kernel splits the work; a pure function of dtype, layout and shape, so
// the workspace size can be computed before the launch.
struct RegionPoolTiling {
  int64_t chunk;    // pixels per block, a multiple of vec
  int64_t chunks;   // blocks per image along the pixels
  int64_t units;    // channel units: NHWC ceil(C / vec) groups of vec channels, NCHW C channels
  int64_t cblocks;  // blocks along the channels
  int threads;      // threads per block: the units rounded up to a warp, at most kThreads
  int vec;          // elements per step: NHWC channels per thread, NCHW pixels per load
};

template <typename scalar_t>
inline RegionPoolTiling region_pool_tiling(Layout layout, int64_t B, int64_t C, int64_t HW,
                                           int64_t K) {
  const bool nhwc = layout == Layout::kNHWC;
  constexpr int V = vec_width<scalar_t>();
  RegionPoolTiling t{};
  t.vec = (nhwc ? C % V == 0 : HW % V == 0) ? V : 1;
  t.units = nhwc ? C / t.vec : C;
  const int64_t warps = ceil_div(t.units < 1 ? 1 : t.units, 32);
  t.threads = static_cast<int>(32 * min64(warps, kWarps));
  t.cblocks = ceil_div(t.units < 1 ? 1 : t.units, t.threads);
  // Enough chunks to keep the GPU busy, few enough that the partials stay within the budget.
  const int64_t wanted = ceil_div(kRegionTargetThreads, B * t.cblocks * t.threads);
  const int64_t affordable = kRegionPartialBudget / (B * (K * C < 1 ? 1 : K * C));
  const int64_t chunks = min64(wanted, affordable < 1 ? 1 : affordable);
  t.chunk = ceil_div(ceil_div(HW, chunks < 1 ? 1 : chunks), t.vec) * t.vec;
  // Both bounds are multiples of every vec; a chunk never exceeds the (vec-rounded) image.
  t.chunk = min64(max64(t.chunk, kRegionMinChunk), kRegionMaxChunk);
  t.chunk = min64(t.chunk, ceil_div(HW, t.vec) * t.vec);
  t.chunks = ceil_div(HW, t.chunk);
  return t;
}

// Shared memory of region_pool_partial_kernel: weights, classes and the per-class counts.
template <typename scalar_t>
inline int64_t region_pool_smem_bytes(const RegionPoolTiling& t, int64_t K) {
  return t.chunk * static_cast<int64_t>(sizeof(opmath_t<scalar_t>) + sizeof(int)) +
         K * static_cast<int64_t>(sizeof(int));
}

template <typename scalar_t, int kVec>
__device__ __forceinline__ Vec<scalar_t, kVec> load_maybe_vec(const scalar_t* p, bool aligned) {
  if (aligned) return load_vec<kVec>(p);
  Vec<scalar_t, kVec> v;
#pragma unroll
  for (int j = 0; j < kVec; ++j) v.v[j] = p[j];
  return v;
}

template <typename scalar_t, int kVec, bool kNHWC>
__global__ void __launch_bounds__(kThreads)
    region_pool_partial_kernel(const scalar_t* __restrict__ feat,
                               const opmath_t<scalar_t>* __restrict__ attn,
                               const int64_t* __restrict__ labels, int64_t C, int64_t HW, int64_t K,
                               int64_t ignore_index, RegionPoolTiling tiling, bool aligned,
                               opmath_t<scalar_t>* __restrict__ partial,
                               int* __restrict__ counts) {
  using acc_t = opmath_t<scalar_t>;
  extern __shared__ __align__(16) unsigned char smem[];
  acc_t* weight = reinterpret_cast<acc_t*>(smem);               // [chunk]
  int* klass = reinterpret_cast<int*>(weight + tiling.chunk);   // [chunk], -1: not pooled
  int* count = klass + tiling.chunk;                            // [K]
  const int tid = threadIdx.x;
  const int nthreads = blockDim.x;
  const int64_t b = blockIdx.x / tiling.chunks;
  const int64_t chunk = blockIdx.x % tiling.chunks;
  const int64_t slot = b * tiling.chunks + chunk;
  const int64_t p_begin = chunk * tiling.chunk;
  const int n = static_cast<int>(min64(tiling.chunk, HW - p_begin));

  for (int64_t k = tid; k < K; k += nthreads) count[k] = 0;
  __syncthreads();
  for (int i = tid; i < n; i += nthreads) {
    const int64_t px = b * HW + p_begin + i;
    const int64_t label = labels[px];
    const bool pooled = label >= 0 && label < K && label != ignore_index;
    klass[i] = pooled ? static_cast<int>(label) : -1;
    weight[i] = attn[px];
    if (pooled) atomicAdd(count + label, 1);
  }
  __syncthreads();
  if (blockIdx.y == 0) {
    for (int64_t k = tid; k < K; k += nthreads) counts[slot * K + k] = count[k];
  }
  const int64_t unit = static_cast<int64_t>(blockIdx.y) * nthreads + tid;
  if (unit >= tiling.units) return;  // no __syncthreads() below

  acc_t* rows = partial + slot * K * C;
  // NHWC: channels [c0, c0 + kVec) of every pixel; NCHW: channel c0, kVec pixels per load.
  const int64_t c0 = kNHWC ? unit * kVec : unit;
  constexpr int kOwned = kNHWC ? kVec : 1;  // channels this thread owns
  for (int64_t k = 0; k < K; ++k) {
    if (count[k] == 0) continue;
#pragma unroll
    for (int j = 0; j < kOwned; ++j) rows[k * C + c0 + j] = acc_t(0);
  }
  acc_t sum[kOwned];
#pragma unroll
  for (int j = 0; j < kOwned; ++j) sum[j] = acc_t(0);
  int current = -1;  // the class the running sums belong to
  // Every thread of the block sees the same class sequence, so the branches do not diverge.
  const auto visit = [&](int i) {
    const int k = klass[i];
    if (k != current) {
      if (current >= 0) {
#pragma unroll
        for (int j = 0; j < kOwned; ++j) {
          rows[current * C + c0 + j] += sum[j];
          sum[j] = acc_t(0);
        }
      }
      current = k;
    }
    return k >= 0;
  };
  if constexpr (kNHWC) {
    const scalar_t* x = feat + (b * HW + p_begin) * C + c0;
    for (int i = 0; i < n; ++i) {
      if (!visit(i)) continue;
      const Vec<scalar_t, kVec> v = load_maybe_vec<scalar_t, kVec>(x + i * C, aligned);
      const acc_t w = weight[i];
#pragma unroll
      for (int j = 0; j < kVec; ++j) sum[j] += w * relu(to_acc(v.v[j]));
    }
  } else {
    const scalar_t* x = feat + (b * C + c0) * HW + p_begin;
    for (int i0 = 0; i0 < n; i0 += kVec) {  // n is a multiple of kVec (HW and chunk are)
      const Vec<scalar_t, kVec> v = load_maybe_vec<scalar_t, kVec>(x + i0, aligned);
#pragma unroll
      for (int j = 0; j < kVec; ++j) {
        if (visit(i0 + j)) sum[0] += weight[i0 + j] * relu(to_acc(v.v[j]));
      }
    }
  }
  if (current >= 0) {
#pragma unroll
    for (int j = 0; j < kOwned; ++j) rows[current * C + c0 + j] += sum[j];
  }
}

// Block (b * K + k, y): channels y * kThreads + tid of pooled[b, k, :]; thread 0 of y = 0 also
// writes count[b, k].
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    region_pool_finish_kernel(const opmath_t<scalar_t>* __restrict__ partial,
                              const int* __restrict__ counts, int64_t C, int64_t K,
                              int64_t chunks, scalar_t* __restrict__ pooled,
                              int64_t* __restrict__ count) {
  using acc_t = opmath_t<scalar_t>;
  const int64_t bk = blockIdx.x;
  const int64_t b = bk / K, k = bk % K;
  const int64_t c = static_cast<int64_t>(blockIdx.y) * kThreads + threadIdx.x;
  int64_t total = 0;
  acc_t sum = 0;
  for (int64_t j = 0; j < chunks; ++j) {
    const int64_t slot = b * chunks + j;
    const int n = counts[slot * K + k];
    if (n == 0) continue;  // the partial row was not written
    total += n;
    if (c < C) sum += partial[(slot * K + k) * C + c];
  }
  if (c < C) {
    pooled[bk * C + c] = from_acc<scalar_t>(total > 0 ? sum / static_cast<acc_t>(total) : acc_t(0));
  }
  if (blockIdx.y == 0 && threadIdx.x == 0) count[bk] = total;
}

// grad over kVec consecutive elements per step (kVec | B*C*HW and aligned pointers, or 1).
template <typename scalar_t, int kVec, bool kNHWC>
__global__ void __launch_bounds__(kThreads)
    region_pool_backward_kernel(const opmath_t<scalar_t>* __restrict__ scale,
                                const scalar_t* __restrict__ feat,
                                const opmath_t<scalar_t>* __restrict__ attn,
                                const int64_t* __restrict__ labels, int64_t C, int64_t HW,
                                int64_t K, int64_t ignore_index, int64_t nvec,
                                scalar_t* __restrict__ grad_feat) {
  using acc_t = opmath_t<scalar_t>;
  for (int64_t v = int64_t(blockIdx.x) * kThreads + threadIdx.x; v < nvec;
       v += int64_t(gridDim.x) * kThreads) {
    const int64_t i = v * kVec;
    const Vec<scalar_t, kVec> x = load_vec<kVec>(feat + i);
    Vec<scalar_t, kVec> out;
#pragma unroll
    for (int j = 0; j < kVec; ++j) {
      const int64_t e = i + j;
      int64_t b, c, px;  // image, channel, pixel b * HW + p
      if constexpr (kNHWC) {
        px = e / C;
        c = e - px * C;
        b = px / HW;
      } else {
        const int64_t bc = e / HW;
        b = bc / C;
        c = bc - b * C;
        px = b * HW + (e - bc * HW);
      }
      const int64_t label = labels[px];
      const bool pooled = label >= 0 && label < K && label != ignore_index;
      acc_t g = acc_t(0);
      if (pooled && to_acc(x.v[j]) > acc_t(0)) g = scale[(b * K + label) * C + c] * attn[px];
      out.v[j] = from_acc<scalar_t>(g);
    }
    store_vec(grad_feat + i, out);
  }
}

}  // namespace detail

// Largest num_classes the forward kernel takes (its per-class counts live in shared memory).
constexpr int64_t kRegionPoolMaxClasses = 4096;

// Workspace of launch_adm_region_pool_forward, in bytes.
template <typename scalar_t>
int64_t adm_region_pool_forward_workspace_size(Layout layout, int64_t B, int64_t C, int64_t HW,
                                               int64_t K) {
  if (B < 1 || HW < 1 || K < 1) return 0;
  const detail::RegionPoolTiling t = detail::region_pool_tiling<scalar_t>(layout, B, C, HW, K);
  const int64_t partial_bytes =
      B * t.chunks * K * C * static_cast<int64_t>(sizeof(opmath_t<scalar_t>));
  return ceil_div(partial_bytes, kVecBytes) * kVecBytes +
         B * t.chunks * K * static_cast<int64_t>(sizeof(int));
}

// Forward of adm_region_pool for a feature [B, C, HW] (NCHW) or [B, HW, C] (NHWC), B, HW >= 1,
// C >= 0, 1 <= K <= kRegionPoolMaxClasses.
//   attn:      [B, HW] in opmath_t<scalar_t>;  labels: [B, HW] int64 (pooled when in [0, K) and
//              != ignore_index).
//   pooled:    [B, K, C] in scalar_t;  count: [B, K] int64.
//   workspace: adm_region_pool_forward_workspace_size(layout, B, C, HW, K) bytes, 16-byte
//              aligned, no initialisation needed.
// Two kernels on `stream`; deterministic. Returns cudaGetLastError().
template <typename scalar_t>
cudaError_t launch_adm_region_pool_forward(const scalar_t* feat, const opmath_t<scalar_t>* attn,
                                           const int64_t* labels, Layout layout, int64_t B,
                                           int64_t C, int64_t HW, int64_t K, int64_t ignore_index,
                                           scalar_t* pooled, int64_t* count, void* workspace,
                                           cudaStream_t stream) {
  using acc_t = opmath_t<scalar_t>;
  if (B < 1 || C < 0 || HW < 1 || K < 1 || K > kRegionPoolMaxClasses) return cudaErrorInvalidValue;
  const detail::RegionPoolTiling t = detail::region_pool_tiling<scalar_t>(layout, B, C, HW, K);
  const int64_t partial_bytes = B * t.chunks * K * C * static_cast<int64_t>(sizeof(acc_t));
  acc_t* partial = static_cast<acc_t*>(workspace);
  int* counts = reinterpret_cast<int*>(static_cast<unsigned char*>(workspace) +
                                       ceil_div(partial_bytes, kVecBytes) * kVecBytes);
  const bool nhwc = layout == Layout::kNHWC;
  // The vector path's loads start at multiples of vec elements of the image: 16-byte aligned
  // when the base is.
  const bool aligned = t.vec > 1 && is_aligned(feat);
  const dim3 grid(static_cast<unsigned>(B * t.chunks), static_cast<unsigned>(t.cblocks));
  const size_t smem = static_cast<size_t>(detail::region_pool_smem_bytes<scalar_t>(t, K));
  constexpr int V = vec_width<scalar_t>();
  const auto launch = [&](auto vec, auto nhwc_tag) {
    detail::region_pool_partial_kernel<scalar_t, decltype(vec)::value, decltype(nhwc_tag)::value>
        <<<grid, t.threads, smem, stream>>>(feat, attn, labels, C, HW, K, ignore_index, t, aligned,
                                            partial, counts);
  };
  if (t.vec > 1 && nhwc) {
    launch(VecWidth<V>{}, IsNHWC<true>{});
  } else if (t.vec > 1) {
    launch(VecWidth<V>{}, IsNHWC<false>{});
  } else if (nhwc) {
    launch(VecWidth<1>{}, IsNHWC<true>{});
  } else {
    launch(VecWidth<1>{}, IsNHWC<false>{});
  }
  const dim3 finish_grid(static_cast<unsigned>(B * K),
                         static_cast<unsigned>(ceil_div(C < 1 ? 1 : C, kThreads)));
  detail::region_pool_finish_kernel<scalar_t>
      <<<finish_grid, kThreads, 0, stream>>>(partial, counts, C, K, t.chunks, pooled, count);
  return cudaGetLastError();
}

// Backward of adm_region_pool: grad_feat[b,c,p] = scale[b,k,c] * attn[b,p] * (feat > 0) where
// pixel p is pooled with class k, else 0. scale [B, K, C] (grad_pooled / count) and attn [B, HW]
// in opmath_t<scalar_t>, labels [B, HW] int64; feat and grad_feat in `layout`, B, C, HW >= 1.
// One kernel on `stream`. Returns cudaGetLastError().
template <typename scalar_t>
cudaError_t launch_adm_region_pool_backward(const opmath_t<scalar_t>* scale, const scalar_t* feat,
                                            const opmath_t<scalar_t>* attn, const int64_t* labels,
                                            Layout layout, int64_t B, int64_t C, int64_t HW,
                                            int64_t K, int64_t ignore_index, scalar_t* grad_feat,
                                            cudaStream_t stream) {
  if (B < 1 || C < 1 || HW < 1 || K < 1) return cudaErrorInvalidValue;
  constexpr int V = vec_width<scalar_t>();
  const int64_t N = B * C * HW;
  const bool vectorised = N % V == 0 && is_aligned(feat) && is_aligned(grad_feat);
  const int64_t nvec = vectorised ? N / V : N;
  dispatch_vec_layout<V>(vectorised, layout, [&](auto vec, auto nhwc) {
    detail::region_pool_backward_kernel<scalar_t, decltype(vec)::value, decltype(nhwc)::value>
        <<<elementwise_grid(nvec), kThreads, 0, stream>>>(scale, feat, attn, labels, C, HW, K,
                                                          ignore_index, nvec, grad_feat);
  });
  return cudaGetLastError();
}

// Explicit instantiations of every launcher above for one scalar type T, for a translation unit
// that wants them compiled in one place (the CI compile check uses it for all four types).
#define KDENGINE_INSTANTIATE_ADM_REGION_POOL(T)                                                   \
  template int64_t kdengine::kernels::adm_region_pool_forward_workspace_size<T>(                  \
      kdengine::kernels::Layout, int64_t, int64_t, int64_t, int64_t);                             \
  template cudaError_t kdengine::kernels::launch_adm_region_pool_forward<T>(                      \
      const T*, const kdengine::kernels::opmath_t<T>*, const int64_t*, kdengine::kernels::Layout, \
      int64_t, int64_t, int64_t, int64_t, int64_t, T*, int64_t*, void*, cudaStream_t);            \
  template cudaError_t kdengine::kernels::launch_adm_region_pool_backward<T>(                     \
      const kdengine::kernels::opmath_t<T>*, const T*, const kdengine::kernels::opmath_t<T>*,     \
      const int64_t*, kdengine::kernels::Layout, int64_t, int64_t, int64_t, int64_t, int64_t, T*, \
      cudaStream_t);

}  // namespace kernels
}  // namespace kdengine
