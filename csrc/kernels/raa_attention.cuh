// CUDA kernels of raa_attention: multi-head attention with a positional encoding added to the
// queries and keys, one thread block per (batch, head) and the head's key/value sequence
// (N <= 256 tokens of d <= 128 channels) in shared memory.
//
// With Q = (q + pos)_h, K = (k + pos)_h, s = 1 / sqrt(d), per (b, h):
//   forward   S = s Q K^T, P = softmax_rows(S), out = P V, lse_i = log sum_j exp(S_ij)
//   backward  P = exp(S - lse), dP = dO V^T, Delta_i = sum_j P_ij dP_ij, dS = P o (dP - Delta),
//             dQ = s dS K, dK = s dS^T Q, dV = P^T dO, dpos = dQ + dK reduced over the batch
//             (pos [N, D]) or the tokens (pos [B, 1, D]).
// Nothing N x N is written to global memory; only lse [B, heads, N] is saved for the backward.
//
// Each kernel is a "row pass": its 8 warps take kRaaRows rows at a time (query rows forward and
// for dQ, key rows for dK / dV) and stream the other side of the product from shared memory,
// where the block stages it as [chunk, d + 1] tiles in the accumulation type (the odd row stride
// keeps lanes that read different rows of one column on different banks). The whole sequence is
// one chunk whenever it fits the device's opt-in shared-memory limit (PAT's N = 64 at any head
// dim; N = 256 at d = 64 on an H100's 227 KB); otherwise it is streamed in chunks of a multiple of
// 32 tokens, with an online softmax forward and two passes over the chunks for dQ. In a row pass lane l owns the keys l, l + 32, ... of a chunk for the
// scores and the channels l, l + 32, ... of a row for the outputs, so the probabilities go
// through a per-warp row of shared memory between the two products.
//
// Backward: raa_backward_dq_kernel (rows = queries) writes dQ and Delta; raa_backward_dkdv_kernel
// (rows = keys, tiles = queries) writes dK and dV and adds dK to the dQ already in the fp32
// workspace; raa_pos_grad_kernel sums that workspace over the batch or the tokens in a fixed
// order. Everything is deterministic; nothing synchronises with the host.
#pragma once

#include "common.cuh"

namespace kdengine {
namespace kernels {

// The inputs of one call: q, k, v [B, N, D] with unit channel stride, any batch / token strides
// (in elements); pos [N, D] (pos_sb = 0, pos_sn = D) or [B, 1, D] (pos_sb = D, pos_sn = 0).
template <typename scalar_t>
struct RaaInputs {
  const scalar_t* q;
  const scalar_t* k;
  const scalar_t* v;
  const scalar_t* pos;
  int64_t q_sb, q_sn, k_sb, k_sn, v_sb, v_sn, pos_sb, pos_sn;
  int64_t B, N, D, heads;
};

namespace detail {

constexpr int kRaaRows = 4;           // rows a warp handles together
constexpr int kRaaKeysPerLane = 8;    // a chunk holds at most 32 * 8 = 256 tokens
constexpr int kRaaColsPerLane = 4;    // a head has at most 32 * 4 = 128 channels
constexpr int64_t kRaaMaxTokens = 32 * kRaaKeysPerLane;
constexpr int64_t kRaaMaxHeadDim = 32 * kRaaColsPerLane;
constexpr int64_t kRaaDefaultSmem = 48 * 1024;  // above it a kernel needs the opt-in attribute

// The shared-memory layout of one row pass.
struct RaaPlan {
  int chunk;   // tokens per staged chunk
  int chunks;  // chunks per sequence
  int d;       // head dim
  int stride;  // row stride of the staged tiles, d + 1
  int64_t smem_bytes;
};

// Shared memory of a row pass in elements: two [chunk, stride] tiles, `vectors` arrays of chunk
// values, and per warp `rows` [kRaaRows, d] row tiles and `scratch` [kRaaRows, chunk] rows.
inline int64_t raa_pass_elements(int64_t chunk, int64_t d, int vectors, int rows, int scratch) {
  return 2 * chunk * (d + 1) + vectors * chunk + kWarps * kRaaRows * (rows * d + scratch * chunk);
}

// The largest chunk (the whole sequence, else a multiple of 32 tokens) whose pass fits `budget`
// bytes; smem_bytes > budget when not even 32 tokens fit.
template <typename acc_t>
inline RaaPlan raa_plan(int64_t N, int64_t d, int vectors, int rows, int scratch, int64_t budget) {
  const auto bytes = [&](int64_t chunk) {
    const int64_t elements = raa_pass_elements(chunk, d, vectors, rows, scratch);
    return elements * static_cast<int64_t>(sizeof(acc_t));
  };
  int64_t chunk = N;
  while (chunk > 32 && bytes(chunk) > budget) chunk = (chunk - 1) / 32 * 32;
  RaaPlan plan{};
  plan.chunk = static_cast<int>(chunk);
  plan.chunks = static_cast<int>(ceil_div(N, chunk));
  plan.d = static_cast<int>(d);
  plan.stride = static_cast<int>(d + 1);
  plan.smem_bytes = bytes(chunk);
  return plan;
}

__device__ __forceinline__ float raa_exp(float x) { return expf(x); }
__device__ __forceinline__ double raa_exp(double x) { return exp(x); }
__device__ __forceinline__ float raa_log(float x) { return logf(x); }
__device__ __forceinline__ double raa_log(double x) { return log(x); }

template <typename T>
__device__ __forceinline__ T warp_max(T v) {
  for (int o = 16; o > 0; o >>= 1) {
    const T w = __shfl_xor_sync(0xffffffffu, v, o);
    v = v < w ? w : v;
  }
  return v;
}

// Block-wide: dst[j * stride + c] = x[(j0 + j) * sn + c] (+ p[(j0 + j) * psn + c] when p) for
// j < n, c < d; x and p point at the (b, h) head's first element.
template <typename scalar_t, typename acc_t>
__device__ void raa_load_tile(const scalar_t* __restrict__ x, int64_t sn,
                              const scalar_t* __restrict__ p, int64_t psn, int j0, int n, int d,
                              int stride, acc_t* __restrict__ dst) {
  for (int idx = threadIdx.x; idx < n * d; idx += kThreads) {
    const int j = idx / d, c = idx - j * d;
    acc_t value = to_acc(x[(j0 + j) * sn + c]);
    if (p != nullptr) value += to_acc(p[(j0 + j) * psn + c]);
    dst[j * stride + c] = value;
  }
}

// Block-wide: dst[j] = x[j0 + j] for j < n.
template <typename acc_t>
__device__ void raa_load_vector(const acc_t* __restrict__ x, int j0, int n,
                                acc_t* __restrict__ dst) {
  for (int j = threadIdx.x; j < n; j += kThreads) dst[j] = x[j0 + j];
}

// Warp-wide: rows r0 .. r0 + kRaaRows - 1 of a head (+ pos) into dst [kRaaRows, d]; rows at or
// past N read as zero. Ends with __syncwarp().
template <typename scalar_t, typename acc_t>
__device__ void raa_load_rows(const scalar_t* __restrict__ x, int64_t sn,
                              const scalar_t* __restrict__ p, int64_t psn, int r0, int N, int d,
                              acc_t* __restrict__ dst) {
  const int lane = threadIdx.x & 31;
#pragma unroll
  for (int r = 0; r < kRaaRows; ++r) {
    const int i = r0 + r;
    for (int c = lane; c < d; c += 32) {
      acc_t value = 0;
      if (i < N) {
        value = to_acc(x[i * sn + c]);
        if (p != nullptr) value += to_acc(p[i * psn + c]);
      }
      dst[r * d + c] = value;
    }
  }
  __syncwarp();
}

// acc[r][t] = sum_c rows[r * d + c] * tile[(lane + 32 t) * stride + c] for the n tokens of a
// staged tile (zero for the lane's tokens past n).
template <typename acc_t>
__device__ __forceinline__ void raa_row_dots(const acc_t* __restrict__ rows,
                                             const acc_t* __restrict__ tile, int n, int d,
                                             int stride, acc_t (&acc)[kRaaRows][kRaaKeysPerLane]) {
  const int lane = threadIdx.x & 31;
#pragma unroll
  for (int r = 0; r < kRaaRows; ++r) {
#pragma unroll
    for (int t = 0; t < kRaaKeysPerLane; ++t) acc[r][t] = 0;
  }
  for (int c = 0; c < d; ++c) {
    acc_t x[kRaaRows];
#pragma unroll
    for (int r = 0; r < kRaaRows; ++r) x[r] = rows[r * d + c];  // a broadcast read
#pragma unroll
    for (int t = 0; t < kRaaKeysPerLane; ++t) {
      if (32 * t < n) {  // warp-uniform: skips the token slots a short chunk does not have
        const int j = lane + 32 * t;
        const acc_t y = j < n ? tile[j * stride + c] : acc_t(0);
#pragma unroll
        for (int r = 0; r < kRaaRows; ++r) acc[r][t] += x[r] * y;
      }
    }
  }
}

// out[r][t] += sum_j w[r * chunk + j] * tile[j * stride + lane + 32 t] over the n tokens of a
// staged tile, for the lane's channels c = lane + 32 t < d.
template <typename acc_t>
__device__ __forceinline__ void raa_weighted_rows(const acc_t* __restrict__ w, int chunk,
                                                  const acc_t* __restrict__ tile, int n, int d,
                                                  int stride,
                                                  acc_t (&out)[kRaaRows][kRaaColsPerLane]) {
  const int lane = threadIdx.x & 31;
  for (int j = 0; j < n; ++j) {
    acc_t x[kRaaRows];
#pragma unroll
    for (int r = 0; r < kRaaRows; ++r) x[r] = w[r * chunk + j];  // a broadcast read
#pragma unroll
    for (int t = 0; t < kRaaColsPerLane; ++t) {
      const int c = lane + 32 * t;
      if (32 * t < d) {  // warp-uniform
        const acc_t y = c < d ? tile[j * stride + c] : acc_t(0);
#pragma unroll
        for (int r = 0; r < kRaaRows; ++r) out[r][t] += x[r] * y;
      }
    }
  }
}

// Iterations of a row pass: every warp runs the same number, so block barriers inside match.
__device__ __forceinline__ int raa_iterations(int N) {
  return static_cast<int>(ceil_div(ceil_div(N, kRaaRows), kWarps));
}

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    raa_forward_kernel(RaaInputs<scalar_t> in, RaaPlan plan, scalar_t* __restrict__ out,
                       opmath_t<scalar_t>* __restrict__ lse) {
  using acc_t = opmath_t<scalar_t>;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  const int N = static_cast<int>(in.N), d = plan.d, chunk = plan.chunk, stride = plan.stride;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  acc_t* kt = reinterpret_cast<acc_t*>(smem_raw);  // K chunk [chunk, stride]
  acc_t* vt = kt + chunk * stride;                 // V chunk [chunk, stride]
  acc_t* qs = vt + chunk * stride + warp * kRaaRows * (d + chunk);  // this warp's Q rows
  acc_t* ps = qs + kRaaRows * d;                                    // its probabilities
  const int64_t b = blockIdx.x / in.heads, h = blockIdx.x % in.heads;
  const scalar_t* qh = in.q + b * in.q_sb + h * d;
  const scalar_t* kh = in.k + b * in.k_sb + h * d;
  const scalar_t* vh = in.v + b * in.v_sb + h * d;
  const scalar_t* ph = in.pos + b * in.pos_sb + h * d;
  const acc_t scale = acc_t(1) / sqrt(static_cast<acc_t>(d));
  const acc_t neg_inf = -static_cast<acc_t>(INFINITY);

  const int iterations = raa_iterations(N);
  for (int it = 0; it < iterations; ++it) {
    const int r0 = (it * kWarps + warp) * kRaaRows;  // rows past N are computed, not stored
    raa_load_rows(qh, in.q_sn, ph, in.pos_sn, r0, N, d, qs);
    acc_t m[kRaaRows], l[kRaaRows], o[kRaaRows][kRaaColsPerLane];
#pragma unroll
    for (int r = 0; r < kRaaRows; ++r) {
      m[r] = neg_inf;
      l[r] = 0;
#pragma unroll
      for (int t = 0; t < kRaaColsPerLane; ++t) o[r][t] = 0;
    }
    for (int ch = 0; ch < plan.chunks; ++ch) {
      const int j0 = ch * chunk, n = min(chunk, N - j0);
      if (plan.chunks > 1 || it == 0) {
        __syncthreads();  // every warp is done with the previous chunk
        raa_load_tile(kh, in.k_sn, ph, in.pos_sn, j0, n, d, stride, kt);
        raa_load_tile(vh, in.v_sn, static_cast<const scalar_t*>(nullptr), 0, j0, n, d, stride, vt);
        __syncthreads();
      }
      acc_t s[kRaaRows][kRaaKeysPerLane];
      raa_row_dots(qs, kt, n, d, stride, s);
#pragma unroll
      for (int r = 0; r < kRaaRows; ++r) {
        acc_t chunk_max = neg_inf;
#pragma unroll
        for (int t = 0; t < kRaaKeysPerLane; ++t) {
          s[r][t] *= scale;
          if (lane + 32 * t < n) chunk_max = chunk_max < s[r][t] ? s[r][t] : chunk_max;
        }
        chunk_max = warp_max(chunk_max);
        const acc_t m_new = m[r] < chunk_max ? chunk_max : m[r];
        const acc_t alpha = raa_exp(m[r] - m_new);  // 0 on the first chunk (m = -inf)
        acc_t sum = 0;
#pragma unroll
        for (int t = 0; t < kRaaKeysPerLane; ++t) {
          const int j = lane + 32 * t;
          if (j < n) {
            const acc_t p = raa_exp(s[r][t] - m_new);
            ps[r * chunk + j] = p;
            sum += p;
          }
        }
        l[r] = l[r] * alpha + warp_sum(sum);
        m[r] = m_new;
#pragma unroll
        for (int t = 0; t < kRaaColsPerLane; ++t) o[r][t] *= alpha;
      }
      __syncwarp();
      raa_weighted_rows(ps, chunk, vt, n, d, stride, o);
      __syncwarp();  // ps is rewritten by the next chunk
    }
#pragma unroll
    for (int r = 0; r < kRaaRows; ++r) {
      const int i = r0 + r;
      if (i >= N) continue;
      const acc_t inv = acc_t(1) / l[r];
      scalar_t* dst = out + (b * in.N + i) * in.D + h * d;
#pragma unroll
      for (int t = 0; t < kRaaColsPerLane; ++t) {
        const int c = lane + 32 * t;
        if (c < d) dst[c] = from_acc<scalar_t>(o[r][t] * inv);
      }
      if (lane == 0) lse[(b * in.heads + h) * in.N + i] = m[r] + raa_log(l[r]);
    }
  }
}

// dQ rows and Delta. grad_q in scalar_t; dq_ws [B, N, D] and delta [B, heads, N] in acc_t.
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    raa_backward_dq_kernel(RaaInputs<scalar_t> in, const scalar_t* __restrict__ grad_out,
                           int64_t go_sb, int64_t go_sn, const opmath_t<scalar_t>* __restrict__ lse,
                           RaaPlan plan, scalar_t* __restrict__ grad_q,
                           opmath_t<scalar_t>* __restrict__ dq_ws,
                           opmath_t<scalar_t>* __restrict__ delta_ws) {
  using acc_t = opmath_t<scalar_t>;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  const int N = static_cast<int>(in.N), d = plan.d, chunk = plan.chunk, stride = plan.stride;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  acc_t* kt = reinterpret_cast<acc_t*>(smem_raw);  // K chunk [chunk, stride]
  acc_t* vt = kt + chunk * stride;                 // V chunk [chunk, stride]
  acc_t* qs = vt + chunk * stride + warp * kRaaRows * (2 * d + chunk);  // this warp's Q rows
  acc_t* gs = qs + kRaaRows * d;                                        // its dO rows
  acc_t* ws = gs + kRaaRows * d;                                        // its dS rows
  const int64_t b = blockIdx.x / in.heads, h = blockIdx.x % in.heads;
  const scalar_t* qh = in.q + b * in.q_sb + h * d;
  const scalar_t* kh = in.k + b * in.k_sb + h * d;
  const scalar_t* vh = in.v + b * in.v_sb + h * d;
  const scalar_t* ph = in.pos + b * in.pos_sb + h * d;
  const scalar_t* gh = grad_out + b * go_sb + h * d;
  const acc_t* lse_bh = lse + (b * in.heads + h) * in.N;
  const acc_t scale = acc_t(1) / sqrt(static_cast<acc_t>(d));
  const bool single = plan.chunks == 1;

  const int iterations = raa_iterations(N);
  for (int it = 0; it < iterations; ++it) {
    const int r0 = (it * kWarps + warp) * kRaaRows;
    raa_load_rows(qh, in.q_sn, ph, in.pos_sn, r0, N, d, qs);
    raa_load_rows(gh, go_sn, static_cast<const scalar_t*>(nullptr), 0, r0, N, d, gs);
    acc_t row_lse[kRaaRows], delta[kRaaRows];
#pragma unroll
    for (int r = 0; r < kRaaRows; ++r) {
      row_lse[r] = r0 + r < N ? lse_bh[r0 + r] : acc_t(0);
      delta[r] = 0;
    }
    acc_t p[kRaaRows][kRaaKeysPerLane], dp[kRaaRows][kRaaKeysPerLane];
    // P and dP of the chunk in the tiles (staged by the caller).
    const auto probabilities = [&](int n) {
      raa_row_dots(qs, kt, n, d, stride, p);
      raa_row_dots(gs, vt, n, d, stride, dp);
#pragma unroll
      for (int r = 0; r < kRaaRows; ++r) {
#pragma unroll
        for (int t = 0; t < kRaaKeysPerLane; ++t) {
          p[r][t] = lane + 32 * t < n ? raa_exp(p[r][t] * scale - row_lse[r]) : acc_t(0);
        }
      }
    };
    const auto stage = [&](int j0, int n) {
      __syncthreads();
      raa_load_tile(kh, in.k_sn, ph, in.pos_sn, j0, n, d, stride, kt);
      raa_load_tile(vh, in.v_sn, static_cast<const scalar_t*>(nullptr), 0, j0, n, d, stride, vt);
      __syncthreads();
    };
    // Pass 1: Delta over all chunks.
    for (int ch = 0; ch < plan.chunks; ++ch) {
      const int j0 = ch * chunk, n = min(chunk, N - j0);
      if (!single || it == 0) stage(j0, n);
      probabilities(n);
#pragma unroll
      for (int r = 0; r < kRaaRows; ++r) {
#pragma unroll
        for (int t = 0; t < kRaaKeysPerLane; ++t) delta[r] += p[r][t] * dp[r][t];
      }
    }
#pragma unroll
    for (int r = 0; r < kRaaRows; ++r) delta[r] = warp_sum(delta[r]);
    // Pass 2: dQ = sum_j dS_ij K_j (one chunk: P and dP are still in registers).
    acc_t dq[kRaaRows][kRaaColsPerLane];
#pragma unroll
    for (int r = 0; r < kRaaRows; ++r) {
#pragma unroll
      for (int t = 0; t < kRaaColsPerLane; ++t) dq[r][t] = 0;
    }
    for (int ch = 0; ch < plan.chunks; ++ch) {
      const int j0 = ch * chunk, n = min(chunk, N - j0);
      if (!single) {
        stage(j0, n);
        probabilities(n);
      }
#pragma unroll
      for (int r = 0; r < kRaaRows; ++r) {
#pragma unroll
        for (int t = 0; t < kRaaKeysPerLane; ++t) {
          const int j = lane + 32 * t;
          if (j < n) ws[r * chunk + j] = p[r][t] * (dp[r][t] - delta[r]);
        }
      }
      __syncwarp();
      raa_weighted_rows(ws, chunk, kt, n, d, stride, dq);
      __syncwarp();
    }
#pragma unroll
    for (int r = 0; r < kRaaRows; ++r) {
      const int i = r0 + r;
      if (i >= N) continue;
      const int64_t row = (b * in.N + i) * in.D + h * d;
#pragma unroll
      for (int t = 0; t < kRaaColsPerLane; ++t) {
        const int c = lane + 32 * t;
        if (c < d) {
          const acc_t g = dq[r][t] * scale;
          grad_q[row + c] = from_acc<scalar_t>(g);
          dq_ws[row + c] = g;
        }
      }
      if (lane == 0) delta_ws[(b * in.heads + h) * in.N + i] = delta[r];
    }
  }
}

// dK and dV rows (rows = keys, tiles = queries); adds dK to dq_ws, which then holds dQ + dK.
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    raa_backward_dkdv_kernel(RaaInputs<scalar_t> in, const scalar_t* __restrict__ grad_out,
                             int64_t go_sb, int64_t go_sn,
                             const opmath_t<scalar_t>* __restrict__ lse,
                             const opmath_t<scalar_t>* __restrict__ delta_ws, RaaPlan plan,
                             scalar_t* __restrict__ grad_k, scalar_t* __restrict__ grad_v,
                             opmath_t<scalar_t>* __restrict__ dq_ws) {
  using acc_t = opmath_t<scalar_t>;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  const int N = static_cast<int>(in.N), d = plan.d, chunk = plan.chunk, stride = plan.stride;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  acc_t* qt = reinterpret_cast<acc_t*>(smem_raw);  // Q chunk [chunk, stride]
  acc_t* gt = qt + chunk * stride;                 // dO chunk [chunk, stride]
  acc_t* lse_t = gt + chunk * stride;              // lse of the chunk's queries
  acc_t* delta_t = lse_t + chunk;                  // their Delta
  acc_t* ks = delta_t + chunk + warp * kRaaRows * (2 * d + 2 * chunk);  // this warp's K rows
  acc_t* vs = ks + kRaaRows * d;                                        // its V rows
  acc_t* pw = vs + kRaaRows * d;       // its P^T rows [kRaaRows, chunk]
  acc_t* dsw = pw + kRaaRows * chunk;  // its dS^T rows
  const int64_t b = blockIdx.x / in.heads, h = blockIdx.x % in.heads;
  const scalar_t* qh = in.q + b * in.q_sb + h * d;
  const scalar_t* kh = in.k + b * in.k_sb + h * d;
  const scalar_t* vh = in.v + b * in.v_sb + h * d;
  const scalar_t* ph = in.pos + b * in.pos_sb + h * d;
  const scalar_t* gh = grad_out + b * go_sb + h * d;
  const acc_t* lse_bh = lse + (b * in.heads + h) * in.N;
  const acc_t* delta_bh = delta_ws + (b * in.heads + h) * in.N;
  const acc_t scale = acc_t(1) / sqrt(static_cast<acc_t>(d));

  const int iterations = raa_iterations(N);
  for (int it = 0; it < iterations; ++it) {
    const int r0 = (it * kWarps + warp) * kRaaRows;
    raa_load_rows(kh, in.k_sn, ph, in.pos_sn, r0, N, d, ks);
    raa_load_rows(vh, in.v_sn, static_cast<const scalar_t*>(nullptr), 0, r0, N, d, vs);
    acc_t dk[kRaaRows][kRaaColsPerLane], dv[kRaaRows][kRaaColsPerLane];
#pragma unroll
    for (int r = 0; r < kRaaRows; ++r) {
#pragma unroll
      for (int t = 0; t < kRaaColsPerLane; ++t) dk[r][t] = dv[r][t] = 0;
    }
    for (int ch = 0; ch < plan.chunks; ++ch) {
      const int i0 = ch * chunk, n = min(chunk, N - i0);
      if (plan.chunks > 1 || it == 0) {
        __syncthreads();
        raa_load_tile(qh, in.q_sn, ph, in.pos_sn, i0, n, d, stride, qt);
        raa_load_tile(gh, go_sn, static_cast<const scalar_t*>(nullptr), 0, i0, n, d, stride, gt);
        raa_load_vector(lse_bh, i0, n, lse_t);
        raa_load_vector(delta_bh, i0, n, delta_t);
        __syncthreads();
      }
      acc_t st[kRaaRows][kRaaKeysPerLane], dpt[kRaaRows][kRaaKeysPerLane];
      raa_row_dots(ks, qt, n, d, stride, st);   // S^T: keys x queries
      raa_row_dots(vs, gt, n, d, stride, dpt);  // dP^T = V dO^T
#pragma unroll
      for (int r = 0; r < kRaaRows; ++r) {
#pragma unroll
        for (int t = 0; t < kRaaKeysPerLane; ++t) {
          const int i = lane + 32 * t;
          if (i < n) {
            const acc_t p = raa_exp(st[r][t] * scale - lse_t[i]);
            pw[r * chunk + i] = p;
            dsw[r * chunk + i] = p * (dpt[r][t] - delta_t[i]);
          }
        }
      }
      __syncwarp();
      raa_weighted_rows(pw, chunk, gt, n, d, stride, dv);   // dV = P^T dO
      raa_weighted_rows(dsw, chunk, qt, n, d, stride, dk);  // dK = dS^T Q (scaled below)
      __syncwarp();
    }
#pragma unroll
    for (int r = 0; r < kRaaRows; ++r) {
      const int j = r0 + r;
      if (j >= N) continue;
      const int64_t row = (b * in.N + j) * in.D + h * d;
#pragma unroll
      for (int t = 0; t < kRaaColsPerLane; ++t) {
        const int c = lane + 32 * t;
        if (c < d) {
          const acc_t g = dk[r][t] * scale;
          grad_k[row + c] = from_acc<scalar_t>(g);
          grad_v[row + c] = from_acc<scalar_t>(dv[r][t]);
          dq_ws[row + c] += g;  // written by this (b, h)'s dQ block in the previous kernel
        }
      }
    }
  }
}

// grad_pos[a, i] = sum_r ws[(a * R + r) * I + i] in a fixed order: [N, D] pos sums over the batch
// (A = 1, R = B, I = N * D), [B, 1, D] pos over the tokens (A = B, R = N, I = D).
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    raa_pos_grad_kernel(const opmath_t<scalar_t>* __restrict__ ws, int64_t A, int64_t R, int64_t I,
                        scalar_t* __restrict__ grad_pos) {
  using acc_t = opmath_t<scalar_t>;
  for (int64_t idx = int64_t(blockIdx.x) * kThreads + threadIdx.x; idx < A * I;
       idx += int64_t(gridDim.x) * kThreads) {
    const int64_t a = idx / I, i = idx - a * I;
    const acc_t* src = ws + a * R * I + i;
    acc_t sum = 0;
    for (int64_t r = 0; r < R; ++r) sum += src[r * I];
    grad_pos[idx] = from_acc<scalar_t>(sum);
  }
}

// The opt-in shared-memory limit of the current device (0 on error).
inline int64_t raa_smem_budget() {
  int device = 0, optin = 0;
  if (cudaGetDevice(&device) != cudaSuccess) return 0;
  const cudaDeviceAttr attr = cudaDevAttrMaxSharedMemoryPerBlockOptin;
  if (cudaDeviceGetAttribute(&optin, attr, device) != cudaSuccess) return 0;
  return optin > kRaaDefaultSmem ? optin : kRaaDefaultSmem;
}

// Launches `kernel` with the plan's dynamic shared memory, opting in above the 48 KB default.
template <typename Kernel, typename... Args>
inline cudaError_t raa_launch(Kernel kernel, const RaaPlan& plan, int64_t budget, int64_t blocks,
                              cudaStream_t stream, Args... args) {
  if (plan.smem_bytes > budget) return cudaErrorInvalidConfiguration;
  if (plan.smem_bytes > kRaaDefaultSmem) {
    const cudaError_t err = cudaFuncSetAttribute(
        kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(plan.smem_bytes));
    if (err != cudaSuccess) return err;
  }
  kernel<<<static_cast<unsigned>(blocks), kThreads, static_cast<size_t>(plan.smem_bytes), stream>>>(
      args...);
  return cudaGetLastError();
}

inline bool raa_shape_ok(int64_t B, int64_t N, int64_t D, int64_t heads) {
  return B >= 1 && N >= 1 && heads >= 1 && D >= heads && D % heads == 0 && N <= kRaaMaxTokens &&
         D / heads <= kRaaMaxHeadDim;
}

}  // namespace detail

// Forward: out [B, N, D] (contiguous, scalar_t) and lse [B, heads, N] (opmath_t). One kernel on
// `stream`; cudaErrorInvalidValue for shapes outside B, N >= 1, heads | D, N <= 256,
// D / heads <= 128. Returns the launch's error.
template <typename scalar_t>
cudaError_t launch_raa_attention_forward(const RaaInputs<scalar_t>& in, scalar_t* out,
                                         opmath_t<scalar_t>* lse, cudaStream_t stream) {
  using acc_t = opmath_t<scalar_t>;
  if (!detail::raa_shape_ok(in.B, in.N, in.D, in.heads)) return cudaErrorInvalidValue;
  const int64_t budget = detail::raa_smem_budget();
  const detail::RaaPlan plan = detail::raa_plan<acc_t>(in.N, in.D / in.heads, 0, 1, 1, budget);
  return detail::raa_launch(detail::raa_forward_kernel<scalar_t>, plan, budget, in.B * in.heads,
                            stream, in, plan, out, lse);
}

// Workspace of launch_raa_attention_backward, in elements of opmath_t<scalar_t>.
template <typename scalar_t>
int64_t raa_attention_backward_workspace_size(int64_t B, int64_t N, int64_t D, int64_t heads) {
  return B * N * D + B * heads * N;
}

// Backward: grad_q, grad_k, grad_v [B, N, D] (contiguous) and grad_pos (pos's shape, contiguous)
// in scalar_t from grad_out (unit channel stride, batch / token strides go_sb, go_sn) and the
// forward's lse. workspace: raa_attention_backward_workspace_size elements, no initialisation
// needed. Three kernels on `stream`, deterministic. Returns the first launch error.
template <typename scalar_t>
cudaError_t launch_raa_attention_backward(const RaaInputs<scalar_t>& in, const scalar_t* grad_out,
                                          int64_t go_sb, int64_t go_sn,
                                          const opmath_t<scalar_t>* lse, scalar_t* grad_q,
                                          scalar_t* grad_k, scalar_t* grad_v, scalar_t* grad_pos,
                                          opmath_t<scalar_t>* workspace, cudaStream_t stream) {
  using acc_t = opmath_t<scalar_t>;
  if (!detail::raa_shape_ok(in.B, in.N, in.D, in.heads)) return cudaErrorInvalidValue;
  const int64_t budget = detail::raa_smem_budget();
  const int64_t d = in.D / in.heads, blocks = in.B * in.heads;
  acc_t* dq_ws = workspace;                      // [B, N, D]: dQ, then dQ + dK
  acc_t* delta_ws = workspace + in.B * in.N * in.D;  // [B, heads, N]
  const detail::RaaPlan plan_dq = detail::raa_plan<acc_t>(in.N, d, 0, 2, 1, budget);
  cudaError_t err = detail::raa_launch(detail::raa_backward_dq_kernel<scalar_t>, plan_dq, budget,
                                       blocks, stream, in, grad_out, go_sb, go_sn, lse, plan_dq,
                                       grad_q, dq_ws, delta_ws);
  if (err != cudaSuccess) return err;
  const detail::RaaPlan plan_dkdv = detail::raa_plan<acc_t>(in.N, d, 2, 2, 2, budget);
  err = detail::raa_launch(detail::raa_backward_dkdv_kernel<scalar_t>, plan_dkdv, budget, blocks,
                           stream, in, grad_out, go_sb, go_sn, lse,
                           static_cast<const acc_t*>(delta_ws), plan_dkdv, grad_k, grad_v, dq_ws);
  if (err != cudaSuccess) return err;
  const bool batch_pos = in.pos_sb != 0;
  const int64_t A = batch_pos ? in.B : 1, R = batch_pos ? in.N : in.B;
  const int64_t I = batch_pos ? in.D : in.N * in.D;
  detail::raa_pos_grad_kernel<scalar_t><<<elementwise_grid(A * I), kThreads, 0, stream>>>(
      dq_ws, A, R, I, grad_pos);
  return cudaGetLastError();
}

// Explicit instantiations of every launcher above for one scalar type T (the CI compile check
// uses it for all four types).
#define KDENGINE_INSTANTIATE_RAA_ATTENTION(T)                                                    \
  template cudaError_t kdengine::kernels::launch_raa_attention_forward<T>(                       \
      const kdengine::kernels::RaaInputs<T>&, T*, kdengine::kernels::opmath_t<T>*, cudaStream_t); \
  template int64_t kdengine::kernels::raa_attention_backward_workspace_size<T>(                  \
      int64_t, int64_t, int64_t, int64_t);                                                       \
  template cudaError_t kdengine::kernels::launch_raa_attention_backward<T>(                      \
      const kdengine::kernels::RaaInputs<T>&, const T*, int64_t, int64_t,                        \
      const kdengine::kernels::opmath_t<T>*, T*, T*, T*, T*, kdengine::kernels::opmath_t<T>*,    \
      cudaStream_t);

}  // namespace kernels
}  // namespace kdengine
