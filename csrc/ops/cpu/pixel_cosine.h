// Per-pixel channel reductions shared by the CPU kernels of cosine_similarity_map and adm_pool:
// dot(s, t), |s|^2 and |t|^2 over C for a run of pixels, in either memory layout.
// Loops keep kLanes independent accumulators so the compiler vectorises them without
// reassociating a single float sum (no -ffast-math needed).
#pragma once

#include <ATen/OpMathType.h>

#include "../checks.h"
#include <algorithm>
#include <cmath>
#include <cstdint>

// Hot loops are compiled twice, for AVX-512 machines (x86-64-v4) and for any x86-64, and the
// loader picks the clone the CPU supports (GCC function multiversioning). Measured here: the
// channel reductions run ~3x faster in the AVX-512 clone on the same loop.
#if defined(__x86_64__) && defined(__linux__) && defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 11
#define KDENGINE_CPU_CLONES __attribute__((target_clones("arch=x86-64-v4", "default")))
#else
#define KDENGINE_CPU_CLONES
#endif

namespace kdengine {
namespace cpu {

// Independent accumulators of the reductions: 32 fp32 lanes are two AVX-512 registers, enough
// to hide the add latency (8 lanes ran the 50M-element feature MSE at half the bandwidth).
constexpr int64_t kLanes = 32;
// Short reductions (one NCHW row of a kTile-pixel tile) keep 8 lanes: 32 would leave most of a
// 49-pixel row (7x7 maps) to the scalar tail.
constexpr int64_t kRowLanes = 8;
// Pixels handled together in the NCHW layout: a [C, kTile] block of both inputs stays in L2
// between the similarity pass and the pooling pass, so memory is read once.
constexpr int64_t kTile = 64;

template <typename scalar_t>
inline at::opmath_type<scalar_t> to_acc(scalar_t v) {
  return static_cast<at::opmath_type<scalar_t>>(v);
}

// NCHW: pixels [p0, p0 + n) of one image (s, t point at the image's [C, HW] block).
// Writes dot/ns/nt for the n pixels (n <= kTile).
template <typename scalar_t, typename acc_t = at::opmath_type<scalar_t>>
inline void channel_sums_nchw(const scalar_t* s, const scalar_t* t, int64_t C, int64_t HW,
                              int64_t p0, int64_t n, acc_t* dot, acc_t* ns, acc_t* nt) {
  std::fill(dot, dot + n, acc_t(0));
  std::fill(ns, ns + n, acc_t(0));
  std::fill(nt, nt + n, acc_t(0));
  for (int64_t c = 0; c < C; ++c) {
    const scalar_t* sr = s + c * HW + p0;
    const scalar_t* tr = t + c * HW + p0;
    for (int64_t p = 0; p < n; ++p) {
      const acc_t a = to_acc(sr[p]);
      const acc_t b = to_acc(tr[p]);
      dot[p] += a * b;
      ns[p] += a * a;
      nt[p] += b * b;
    }
  }
}

// NHWC: one pixel's channel vectors s[0..C), t[0..C).
template <typename scalar_t, typename acc_t = at::opmath_type<scalar_t>>
inline void channel_sums_nhwc(const scalar_t* s, const scalar_t* t, int64_t C, acc_t& dot,
                              acc_t& ns, acc_t& nt) {
  acc_t d[kLanes] = {}, a2[kLanes] = {}, b2[kLanes] = {};
  int64_t c = 0;
  for (; c + kLanes <= C; c += kLanes) {
    for (int64_t l = 0; l < kLanes; ++l) {
      const acc_t a = to_acc(s[c + l]);
      const acc_t b = to_acc(t[c + l]);
      d[l] += a * b;
      a2[l] += a * a;
      b2[l] += b * b;
    }
  }
  for (int64_t l = 0; c < C; ++c, ++l) {
    const acc_t a = to_acc(s[c]);
    const acc_t b = to_acc(t[c]);
    d[l] += a * b;
    a2[l] += a * a;
    b2[l] += b * b;
  }
  dot = ns = nt = acc_t(0);
  for (int64_t l = 0; l < kLanes; ++l) {
    dot += d[l];
    ns += a2[l];
    nt += b2[l];
  }
}

// dot/ns/nt of the n pixels [p0, p0 + n) of one image (sb, tb: the image's block) in either layout.
template <typename scalar_t, typename acc_t = at::opmath_type<scalar_t>>
inline void channel_sums_tile(const scalar_t* sb, const scalar_t* tb, Layout layout, int64_t C,
                              int64_t HW, int64_t p0, int64_t n, acc_t* dot, acc_t* ns, acc_t* nt) {
  if (layout == Layout::kNCHW) {
    channel_sums_nchw(sb, tb, C, HW, p0, n, dot, ns, nt);
  } else {
    for (int64_t p = 0; p < n; ++p) {
      channel_sums_nhwc(sb + (p0 + p) * C, tb + (p0 + p) * C, C, dot[p], ns[p], nt[p]);
    }
  }
}

// Cosine as F.cosine_similarity: dot / (max(|s|, eps) * max(|t|, eps)).
template <typename acc_t>
inline acc_t cosine_from_sums(acc_t dot, acc_t norm_s, acc_t norm_t, acc_t eps) {
  return dot / (std::max(norm_s, eps) * std::max(norm_t, eps));
}

// How to split B images x HW pixels over threads: chunks of whole tiles per image, enough
// units to keep every thread busy when B is small (B=1 segmentation maps).
inline int64_t pixel_chunks(int64_t B, int64_t HW, int64_t threads) {
  const int64_t tiles = (HW + kTile - 1) / kTile;
  const int64_t wanted = std::max<int64_t>(1, (4 * threads + B - 1) / B);
  return std::min(tiles, wanted);
}

}  // namespace cpu
}  // namespace kdengine
