// CPU kernels of raa_attention: one task per (batch, head), the head's whole sequence (N <= 256
// tokens of d <= 128 channels) in thread-local fp32 buffers (fp64 for fp64 input).
//
// Forward per head, with Q = (q + pos)_h, K = (k + pos)_h, s = 1 / sqrt(d):
//   S = s Q K^T, P = softmax_rows(S), out = P V, lse = rowwise log-sum-exp of S.
// Backward recomputes P = exp(S - lse) from the inputs (nothing but lse is saved) and, with
// dP = dO V^T and Delta_i = sum_j P_ij dP_ij (exact here: the whole row is in the buffer),
//   dS = P o (dP - Delta), dQ = s dS K, dK = s dS^T Q, dV = P^T dO, dpos = dQ + dK
// summed over the batch (pos [N, D]) or over the tokens (pos [B, 1, D]).
//
// The products run through a register-tiled micro-kernel: kMR rows x kNR columns of C in vector
// accumulators, per step one row of B and kMR broadcast elements of A (A read row-major or, for
// the P^T and dS^T products, column-major, so no N x N matrix is ever transposed). K^T and V^T
// are written transposed while they are loaded. Buffer rows are padded to kPad elements, so no
// product has a column tail; the softmax exponentials use a polynomial that vectorises.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <initializer_list>
#include <limits>
#include <tuple>
#include <vector>

#include "../raa_attention.h"
#include "buffer_cache.h"
#include "pixel_cosine.h"  // KDENGINE_CPU_CLONES, to_acc

// The 64-byte vectors below are passed between force-inlined helpers only; no ABI is involved.
#pragma GCC diagnostic ignored "-Wpsabi"

namespace kdengine {
namespace cpu {
namespace {

// Forced inlining: the helpers must be compiled into each target clone of their caller.
#if defined(__GNUC__)
#define KDENGINE_RAA_INLINE inline __attribute__((always_inline))
#else
#define KDENGINE_RAA_INLINE inline
#endif

constexpr int64_t kPad = 16;  // buffer rows are padded to a multiple of one AVX-512 fp32 vector
constexpr int kMR = 4;        // rows of the micro-tile
constexpr int kNR = 32;       // columns of the micro-tile: two AVX-512 fp32 vectors per row
constexpr int64_t kLanesR = 16;  // independent accumulators of the row reductions

inline int64_t round_up(int64_t n, int64_t m) { return (n + m - 1) / m * m; }

// 64-byte vectors of GCC's vector extension: one zmm register in the AVX-512 clone, four xmm
// registers in the baseline one. Explicit vectors, because left to itself GCC may vectorise the
// reduction loop of a product instead of its columns, and then shuffles more than it computes.
template <typename T>
struct Simd;
template <>
struct Simd<float> {
  typedef float vec __attribute__((vector_size(64)));
  typedef float unaligned __attribute__((vector_size(64), aligned(4), may_alias));
};
template <>
struct Simd<double> {
  typedef double vec __attribute__((vector_size(64)));
  typedef double unaligned __attribute__((vector_size(64), aligned(8), may_alias));
};
template <typename T>
constexpr int kLanes = 64 / sizeof(T);
template <typename T>
using vec_t = typename Simd<T>::vec;

template <typename T>
KDENGINE_RAA_INLINE vec_t<T> vload(const T* p) {
  return *reinterpret_cast<const typename Simd<T>::unaligned*>(p);
}
template <typename T>
KDENGINE_RAA_INLINE void vstore(T* p, vec_t<T> v) {
  *reinterpret_cast<typename Simd<T>::unaligned*>(p) = v;
}

// c[r, j] = alpha * sum_kk A[r, kk] b[kk, j] for r < R, j < NC (a multiple of the lanes), where
// A[r, kk] = a[r * lda + kk], or a[kk * lda + r] when kTransA.
template <int R, int NC, bool kTransA, typename acc_t>
KDENGINE_RAA_INLINE void micro_tile(const acc_t* a, int64_t lda, const acc_t* b, int64_t ldb,
                                    int64_t K, acc_t alpha, acc_t* c, int64_t ldc) {
  constexpr int L = kLanes<acc_t>;
  constexpr int NV = NC / L;
  vec_t<acc_t> acc[R][NV];
  for (int r = 0; r < R; ++r) {
    for (int u = 0; u < NV; ++u) acc[r][u] = vec_t<acc_t>{};
  }
  for (int64_t kk = 0; kk < K; ++kk) {
    vec_t<acc_t> bv[NV];
    for (int u = 0; u < NV; ++u) bv[u] = vload(b + kk * ldb + u * L);
    for (int r = 0; r < R; ++r) {
      const acc_t x = kTransA ? a[kk * lda + r] : a[r * lda + kk];
      for (int u = 0; u < NV; ++u) acc[r][u] += x * bv[u];
    }
  }
  for (int r = 0; r < R; ++r) {
    for (int u = 0; u < NV; ++u) vstore(c + r * ldc + u * L, alpha * acc[r][u]);
  }
}

// Columns [j, j + NC) of C = alpha A B for all M rows.
template <int NC, bool kTransA, typename acc_t>
KDENGINE_RAA_INLINE void gemm_columns(int64_t M, int64_t K, acc_t alpha, const acc_t* a,
                                      int64_t lda, const acc_t* b, int64_t ldb, acc_t* c,
                                      int64_t ldc) {
  const int64_t row_step = kTransA ? 1 : lda;  // where row i of A starts
  int64_t i = 0;
  for (; i + kMR <= M; i += kMR) {
    micro_tile<kMR, NC, kTransA>(a + i * row_step, lda, b, ldb, K, alpha, c + i * ldc, ldc);
  }
  const acc_t* ai = a + i * row_step;
  acc_t* ci = c + i * ldc;
  switch (M - i) {
    case 3: micro_tile<3, NC, kTransA>(ai, lda, b, ldb, K, alpha, ci, ldc); break;
    case 2: micro_tile<2, NC, kTransA>(ai, lda, b, ldb, K, alpha, ci, ldc); break;
    case 1: micro_tile<1, NC, kTransA>(ai, lda, b, ldb, K, alpha, ci, ldc); break;
    default: break;
  }
}

// C [M, cols] = alpha A B with B [K, cols] and C row-major, A [M, K] row-major or, when kTransA,
// stored as its transpose [K, M]; cols is a multiple of kPad.
template <bool kTransA, typename acc_t>
KDENGINE_RAA_INLINE void gemm(int64_t M, int64_t cols, int64_t K, acc_t alpha, const acc_t* a,
                              int64_t lda, const acc_t* b, int64_t ldb, acc_t* c, int64_t ldc) {
  int64_t j = 0;
  for (; j + kNR <= cols; j += kNR) {
    gemm_columns<kNR, kTransA>(M, K, alpha, a, lda, b + j, ldb, c + j, ldc);
  }
  for (; j < cols; j += kPad) {
    gemm_columns<kPad, kTransA>(M, K, alpha, a, lda, b + j, ldb, c + j, ldc);
  }
}

// exp(x) as 2^n exp(r), n = round(x / ln 2), r = x - n ln 2 in two parts, exp(r) by Cephes'
// expf polynomial (about 1 ulp); x is clamped to the range where 2^n is a normal float. Plain
// arithmetic and bit moves, so loops over it vectorise.
KDENGINE_RAA_INLINE float exp_poly(float x) {
  x = std::min(std::max(x, -87.0f), 88.0f);
  const float n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;  // round to nearest
  const float r = (x - n * 0.693359375f) - n * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
}
// fp64 is for gradcheck, not speed.
KDENGINE_RAA_INLINE double exp_poly(double x) { return std::exp(x); }

template <typename acc_t>
KDENGINE_RAA_INLINE acc_t row_max(const acc_t* x, int64_t n) {  // n: a multiple of kLanesR
  acc_t lane[kLanesR];
  for (int64_t l = 0; l < kLanesR; ++l) lane[l] = x[l];
  for (int64_t j = kLanesR; j < n; j += kLanesR) {
    for (int64_t l = 0; l < kLanesR; ++l) lane[l] = lane[l] < x[j + l] ? x[j + l] : lane[l];
  }
  acc_t m = lane[0];
  for (int64_t l = 1; l < kLanesR; ++l) m = m < lane[l] ? lane[l] : m;
  return m;
}

template <typename acc_t>
KDENGINE_RAA_INLINE acc_t row_sum(const acc_t* x, int64_t n) {  // n: a multiple of kLanesR
  acc_t lane[kLanesR] = {};
  for (int64_t j = 0; j < n; j += kLanesR) {
    for (int64_t l = 0; l < kLanesR; ++l) lane[l] += x[j + l];
  }
  acc_t total = 0;
  for (int64_t l = 0; l < kLanesR; ++l) total += lane[l];
  return total;
}

// Everything one (batch, head) task needs to find its slices.
template <typename scalar_t>
struct Inputs {
  const scalar_t *q, *k, *v, *pos;
  int64_t q_sb, q_sn, k_sb, k_sn, v_sb, v_sn;  // batch and token strides (channel stride 1)
  int64_t pos_sb, pos_sn;                      // [N, D]: (0, D); [B, 1, D]: (D, 0)
  RaaShape s;
  int64_t Np, dp;  // N and d rounded up to kPad

  Inputs(const at::Tensor& q_, const at::Tensor& k_, const at::Tensor& v_, const at::Tensor& p,
         const RaaShape& shape)
      : q(q_.const_data_ptr<scalar_t>()),
        k(k_.const_data_ptr<scalar_t>()),
        v(v_.const_data_ptr<scalar_t>()),
        pos(p.const_data_ptr<scalar_t>()),
        q_sb(q_.stride(0)), q_sn(q_.stride(1)),
        k_sb(k_.stride(0)), k_sn(k_.stride(1)),
        v_sb(v_.stride(0)), v_sn(v_.stride(1)),
        pos_sb(shape.batch_pos ? shape.D : 0), pos_sn(shape.batch_pos ? 0 : shape.D),
        s(shape), Np(round_up(shape.N, kPad)), dp(round_up(shape.d, kPad)) {}

  // Asks for the rows of head h of sample b of x ahead of their use: the head's d channels are a
  // short piece of every row, a pattern the hardware prefetchers do not follow far enough.
  KDENGINE_RAA_INLINE void prefetch(const scalar_t* x, int64_t sb, int64_t sn, int64_t b,
                                    int64_t h) const {
    constexpr int64_t kLine = 64 / sizeof(scalar_t);  // elements per cache line
    for (int64_t i = 0; i < s.N; ++i) {
      const scalar_t* xr = x + b * sb + i * sn + h * s.d;
      for (int64_t c = 0; c < s.d; c += kLine) __builtin_prefetch(xr + c);
    }
  }

  // Head h of sample b of x (+ pos when with_pos) in the accumulation type: as rows
  // dst[i * dp + c] or, when kTransposed, as columns dst[c * Np + i].
  template <bool kTransposed, typename acc_t>
  KDENGINE_RAA_INLINE void load(const scalar_t* x, int64_t sb, int64_t sn, bool with_pos, int64_t b,
                                int64_t h, acc_t* dst) const {
    const int64_t row_stride = kTransposed ? 1 : dp, col_stride = kTransposed ? Np : 1;
    for (int64_t i = 0; i < s.N; ++i) {
      const scalar_t* xr = x + b * sb + i * sn + h * s.d;
      acc_t* out = dst + i * row_stride;
      if (with_pos) {
        const scalar_t* pr = pos + b * pos_sb + i * pos_sn + h * s.d;
        for (int64_t c = 0; c < s.d; ++c) out[c * col_stride] = to_acc(xr[c]) + to_acc(pr[c]);
      } else {
        for (int64_t c = 0; c < s.d; ++c) out[c * col_stride] = to_acc(xr[c]);
      }
    }
  }
};

template <typename scalar_t, typename acc_t = at::opmath_type<scalar_t>>
KDENGINE_CPU_CLONES void forward_units(const Inputs<scalar_t>& in, int64_t begin, int64_t end,
                                       scalar_t* out, acc_t* lse) {
  const int64_t N = in.s.N, d = in.s.d, D = in.s.D, H = in.s.heads, Np = in.Np, dp = in.dp;
  const acc_t scale = acc_t(1) / std::sqrt(static_cast<acc_t>(d));
  // Zero-initialised once: the padding columns are never written and must read as 0.
  std::vector<acc_t> buf(3 * N * dp + d * Np + N * Np, acc_t(0));
  acc_t* qp = buf.data();  // Q [N, dp]
  acc_t* vb = qp + N * dp;  // V [N, dp]
  acc_t* o = vb + N * dp;   // out [N, dp]
  acc_t* kt = o + N * dp;   // K^T [d, Np]
  acc_t* p = kt + d * Np;   // S, then P [N, Np]
  for (int64_t unit = begin; unit < end; ++unit) {
    const int64_t b = unit / H, h = unit % H;
    if (unit + 1 < end) {  // the next task's inputs arrive while this one computes
      const int64_t nb = (unit + 1) / H, nh = (unit + 1) % H;
      in.prefetch(in.q, in.q_sb, in.q_sn, nb, nh);
      in.prefetch(in.k, in.k_sb, in.k_sn, nb, nh);
      in.prefetch(in.v, in.v_sb, in.v_sn, nb, nh);
    }
    in.template load<false>(in.q, in.q_sb, in.q_sn, true, b, h, qp);
    in.template load<true>(in.k, in.k_sb, in.k_sn, true, b, h, kt);
    in.template load<false>(in.v, in.v_sb, in.v_sn, false, b, h, vb);
    gemm<false>(N, Np, d, scale, qp, dp, kt, Np, p, Np);  // S = s Q K^T
    acc_t* lse_row = lse + unit * N;
    for (int64_t i = 0; i < N; ++i) {
      acc_t* row = p + i * Np;
      for (int64_t j = N; j < Np; ++j) row[j] = -std::numeric_limits<acc_t>::infinity();
      const acc_t m = row_max(row, Np);
      for (int64_t j = 0; j < Np; ++j) row[j] = exp_poly(row[j] - m);
      for (int64_t j = N; j < Np; ++j) row[j] = acc_t(0);
      const acc_t sum = row_sum(row, Np);
      const acc_t inv = acc_t(1) / sum;
      for (int64_t j = 0; j < Np; ++j) row[j] *= inv;
      lse_row[i] = m + std::log(sum);
    }
    gemm<false>(N, dp, N, acc_t(1), p, Np, vb, dp, o, dp);  // out = P V
    for (int64_t i = 0; i < N; ++i) {
      scalar_t* dst = out + (b * N + i) * D + h * d;
      for (int64_t c = 0; c < d; ++c) dst[c] = static_cast<scalar_t>(o[i * dp + c]);
    }
  }
}

template <typename scalar_t, typename acc_t = at::opmath_type<scalar_t>>
KDENGINE_CPU_CLONES void backward_units(const Inputs<scalar_t>& in, const scalar_t* grad_out,
                                        int64_t go_sb, int64_t go_sn, const acc_t* lse,
                                        int64_t begin, int64_t end, scalar_t* gq, scalar_t* gk,
                                        scalar_t* gv, acc_t* gpos) {
  const int64_t N = in.s.N, d = in.s.d, D = in.s.D, H = in.s.heads, Np = in.Np, dp = in.dp;
  const bool batch_pos = in.s.batch_pos;
  const acc_t scale = acc_t(1) / std::sqrt(static_cast<acc_t>(d));
  std::vector<acc_t> buf(6 * N * dp + 2 * d * Np + 2 * N * Np + Np, acc_t(0));
  acc_t* qp = buf.data();   // Q [N, dp]
  acc_t* kp = qp + N * dp;  // K [N, dp]
  acc_t* go = kp + N * dp;  // dO [N, dp]
  acc_t* dq = go + N * dp;  // dQ, dK, dV [N, dp]
  acc_t* dk = dq + N * dp;
  acc_t* dv = dk + N * dp;
  acc_t* kt = dv + N * dp;  // K^T, V^T [d, Np]
  acc_t* vt = kt + d * Np;
  acc_t* p = vt + d * Np;   // S, then P [N, Np]
  acc_t* ds = p + N * Np;   // dP, then dS [N, Np]
  acc_t* prod = ds + N * Np;  // one row of P o dP
  for (int64_t unit = begin; unit < end; ++unit) {
    const int64_t b = unit / H, h = unit % H;
    if (unit + 1 < end) {
      const int64_t nb = (unit + 1) / H, nh = (unit + 1) % H;
      in.prefetch(in.q, in.q_sb, in.q_sn, nb, nh);
      in.prefetch(in.k, in.k_sb, in.k_sn, nb, nh);
      in.prefetch(in.v, in.v_sb, in.v_sn, nb, nh);
      in.prefetch(grad_out, go_sb, go_sn, nb, nh);
    }
    in.template load<false>(in.q, in.q_sb, in.q_sn, true, b, h, qp);
    in.template load<false>(in.k, in.k_sb, in.k_sn, true, b, h, kp);
    in.template load<true>(in.k, in.k_sb, in.k_sn, true, b, h, kt);
    in.template load<true>(in.v, in.v_sb, in.v_sn, false, b, h, vt);
    in.template load<false>(grad_out, go_sb, go_sn, false, b, h, go);
    gemm<false>(N, Np, d, scale, qp, dp, kt, Np, p, Np);      // S = s Q K^T, as forward
    gemm<false>(N, Np, d, acc_t(1), go, dp, vt, Np, ds, Np);  // dP = dO V^T
    const acc_t* lse_row = lse + unit * N;
    for (int64_t i = 0; i < N; ++i) {
      acc_t* prow = p + i * Np;
      acc_t* drow = ds + i * Np;
      const acc_t l = lse_row[i];
      for (int64_t j = 0; j < Np; ++j) prow[j] = exp_poly(prow[j] - l);
      for (int64_t j = N; j < Np; ++j) prow[j] = acc_t(0);
      for (int64_t j = 0; j < Np; ++j) prod[j] = prow[j] * drow[j];
      const acc_t delta = row_sum(prod, Np);
      for (int64_t j = 0; j < Np; ++j) drow[j] = prow[j] * (drow[j] - delta);
    }
    gemm<true>(N, dp, N, acc_t(1), p, Np, go, dp, dv, dp);  // dV = P^T dO
    gemm<false>(N, dp, N, scale, ds, Np, kp, dp, dq, dp);   // dQ = s dS K
    gemm<true>(N, dp, N, scale, ds, Np, qp, dp, dk, dp);    // dK = s dS^T Q
    acc_t* gp = gpos + (batch_pos ? b * D : 0) + h * d;
    for (int64_t i = 0; i < N; ++i) {
      const int64_t row = (b * N + i) * D + h * d;
      const acc_t* dqr = dq + i * dp;
      const acc_t* dkr = dk + i * dp;
      const acc_t* dvr = dv + i * dp;
      acc_t* gpr = batch_pos ? gp : gp + i * D;
      for (int64_t c = 0; c < d; ++c) {
        gq[row + c] = static_cast<scalar_t>(dqr[c]);
        gk[row + c] = static_cast<scalar_t>(dkr[c]);
        gv[row + c] = static_cast<scalar_t>(dvr[c]);
        gpr[c] += dqr[c] + dkr[c];
      }
    }
  }
}

// Splits the B * heads tasks into one contiguous range per thread (fewer when there are fewer
// tasks) and calls fn(chunk, begin, end) for each.
template <typename Fn>
void for_each_chunk(int64_t units, int64_t chunks, const Fn& fn) {
  at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) fn(c, c * units / chunks, (c + 1) * units / chunks);
  });
}

int64_t num_chunks(int64_t units) {
  return std::max<int64_t>(1, std::min<int64_t>(units, at::get_num_threads()));
}

// An uninitialised contiguous [B, N, D] output from the buffer cache, which needs a contiguous
// template of that shape and dtype: the first contiguous one of `likes` (every output would
// otherwise be page-faulted in anew on each call; measured: as long as the backward kernel
// itself at B = 128, N = 64, D = 512).
at::Tensor empty_rows(std::initializer_list<const at::Tensor*> likes) {
  for (const at::Tensor* like : likes) {
    const int64_t N = like->size(1), D = like->size(2);
    if (like->stride(0) == N * D && like->stride(1) == D && like->stride(2) == 1) {
      return empty_like_cached(*like);
    }
  }
  return at::empty((*likes.begin())->sizes(), (*likes.begin())->options());
}

std::tuple<at::Tensor, at::Tensor> raa_attention_cpu(const at::Tensor& q_, const at::Tensor& k_,
                                                     const at::Tensor& v_, const at::Tensor& pos_,
                                                     int64_t heads) {
  const RaaShape s = check_raa_attention("raa_attention", q_, k_, v_, pos_, heads);
  const auto dtype = q_.scalar_type();
  const at::Tensor q = raa_rows(q_, dtype), k = raa_rows(k_, dtype), v = raa_rows(v_, dtype);
  const at::Tensor pos = pos_.contiguous();
  at::Tensor out = empty_rows({&q, &k, &v});
  at::Tensor lse = at::empty({s.B, heads, s.N}, q.options().dtype(at::toOpMathType(dtype)));
  if (out.numel() == 0) return {out, lse};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "raa_attention_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const Inputs<scalar_t> in(q, k, v, pos, s);
    scalar_t* o = out.data_ptr<scalar_t>();
    acc_t* l = lse.data_ptr<acc_t>();
    const int64_t units = s.B * heads;
    for_each_chunk(units, num_chunks(units), [&](int64_t, int64_t begin, int64_t end) {
      forward_units<scalar_t>(in, begin, end, o, l);
    });
  });
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> raa_attention_backward_cpu(
    const at::Tensor& grad_out_, const at::Tensor& q_, const at::Tensor& k_, const at::Tensor& v_,
    const at::Tensor& pos_, const at::Tensor& lse_, int64_t heads) {
  const RaaShape s = check_raa_attention_backward(grad_out_, q_, k_, v_, pos_, lse_, heads);
  const auto dtype = q_.scalar_type();
  const auto acc_type = at::toOpMathType(dtype);
  const at::Tensor q = raa_rows(q_, dtype), k = raa_rows(k_, dtype), v = raa_rows(v_, dtype);
  const at::Tensor grad_out = raa_rows(grad_out_, dtype);
  const at::Tensor pos = pos_.contiguous();
  const at::Tensor lse = lse_.to(acc_type).contiguous();
  at::Tensor gq = empty_rows({&grad_out, &q, &k, &v});
  at::Tensor gk = empty_rows({&grad_out, &q, &k, &v});
  at::Tensor gv = empty_rows({&grad_out, &q, &k, &v});
  if (gq.numel() == 0) {
    return {gq, gk, gv, at::zeros(pos.sizes(), pos.options())};
  }
  const int64_t units = s.B * heads;
  const int64_t chunks = num_chunks(units);
  // dpos accumulates in the accumulation type: [B, D] for a batch-indexed pos (each task owns
  // its (b, h) slice), one [N, D] partial per chunk for a token-indexed one (summed below in a
  // fixed order).
  at::Tensor gpos_acc = s.batch_pos ? at::zeros({s.B, s.D}, q.options().dtype(acc_type))
                                    : at::zeros({chunks, s.N, s.D}, q.options().dtype(acc_type));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "raa_attention_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const Inputs<scalar_t> in(q, k, v, pos, s);
    const scalar_t* go = grad_out.const_data_ptr<scalar_t>();
    const acc_t* l = lse.const_data_ptr<acc_t>();
    acc_t* gp = gpos_acc.data_ptr<acc_t>();
    const int64_t chunk_stride = s.batch_pos ? 0 : s.N * s.D;
    for_each_chunk(units, chunks, [&](int64_t chunk, int64_t begin, int64_t end) {
      backward_units<scalar_t>(in, go, grad_out.stride(0), grad_out.stride(1), l, begin, end,
                               gq.data_ptr<scalar_t>(), gk.data_ptr<scalar_t>(),
                               gv.data_ptr<scalar_t>(), gp + chunk * chunk_stride);
    });
  });
  const at::Tensor gpos = s.batch_pos ? gpos_acc.view({s.B, 1, s.D}) : gpos_acc.sum(0);
  return {gq, gk, gv, gpos.to(dtype).contiguous()};
}

}  // namespace
}  // namespace cpu
}  // namespace kdengine

TORCH_LIBRARY_IMPL(kdengine, CPU, m) {
  m.impl("raa_attention", &kdengine::cpu::raa_attention_cpu);
  m.impl("_raa_attention_backward", &kdengine::cpu::raa_attention_backward_cpu);
}
