// CPU kernels of cosine_similarity_map and its backward.
//
// Backward with n_s = max(|s|, eps), n_t = max(|t|, eps), S = <s, t> / (n_s n_t):
//   dS/ds = t / (n_s n_t) - [|s| > eps] S s / n_s^2      (and symmetrically for t)
// which is elementwise once the per-pixel S and norms saved by the forward are known.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <tuple>
#include <vector>

#include "../checks.h"
#include "buffer_cache.h"
#include "pixel_cosine.h"

namespace kdengine {
namespace cpu {
namespace {

// Tiles [begin, end) of (image, kTile pixels): S and both channel norms of each pixel.
template <typename scalar_t, typename acc_t = at::opmath_type<scalar_t>>
KDENGINE_CPU_CLONES void forward_tiles(const scalar_t* sp, const scalar_t* tp, Layout layout,
                                       int64_t C, int64_t HW, double eps, scalar_t* out,
                                       acc_t* ns_out, acc_t* nt_out, int64_t begin, int64_t end) {
  const int64_t tiles = (HW + kTile - 1) / kTile;
  acc_t dot[kTile], ns[kTile], nt[kTile];
  for (int64_t unit = begin; unit < end; ++unit) {
    const int64_t b = unit / tiles;
    const int64_t p0 = (unit % tiles) * kTile;
    const int64_t n = std::min(kTile, HW - p0);
    const scalar_t* sb = sp + b * C * HW;
    const scalar_t* tb = tp + b * C * HW;
    channel_sums_tile(sb, tb, layout, C, HW, p0, n, dot, ns, nt);
    for (int64_t p = 0; p < n; ++p) {
      const acc_t a = std::sqrt(ns[p]), c = std::sqrt(nt[p]);
      out[b * HW + p0 + p] =
          static_cast<scalar_t>(cosine_from_sums(dot[p], a, c, static_cast<acc_t>(eps)));
      ns_out[b * HW + p0 + p] = a;
      nt_out[b * HW + p0 + p] = c;
    }
  }
}

// One NCHW channel row: per-pixel coefficients.
template <typename scalar_t, typename acc_t>
KDENGINE_CPU_CLONES void gradient_row_nchw(const scalar_t* x, const scalar_t* y, const acc_t* k_cross,
                                           const acc_t* k_s, const acc_t* k_t, int64_t n,
                                           scalar_t* gs, scalar_t* gt) {
  for (int64_t i = 0; i < n; ++i) {
    const acc_t a = to_acc(x[i]), b = to_acc(y[i]);
    gs[i] = static_cast<scalar_t>(k_cross[i] * b - k_s[i] * a);
    gt[i] = static_cast<scalar_t>(k_cross[i] * a - k_t[i] * b);
  }
}

// One NHWC pixel: its coefficients apply to every channel.
template <typename scalar_t, typename acc_t>
KDENGINE_CPU_CLONES void gradient_row_nhwc(const scalar_t* x, const scalar_t* y, acc_t k_cross,
                                           acc_t k_s, acc_t k_t, int64_t n, scalar_t* gs,
                                           scalar_t* gt) {
  for (int64_t i = 0; i < n; ++i) {
    const acc_t a = to_acc(x[i]), b = to_acc(y[i]);
    gs[i] = static_cast<scalar_t>(k_cross * b - k_s * a);
    gt[i] = static_cast<scalar_t>(k_cross * a - k_t * b);
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> cosine_similarity_map_cpu(const at::Tensor& feat_s,
                                                                         const at::Tensor& feat_t,
                                                                         double eps) {
  check_feature_pair("cosine_similarity_map", feat_s, feat_t);
  at::Tensor s;
  Layout layout;
  std::tie(s, layout) = dense_feature(feat_s);
  const at::Tensor t = in_layout(feat_t, layout);
  const int64_t B = s.size(0), C = s.size(1), H = s.size(2), W = s.size(3), HW = H * W;
  const auto acc_type = at::toOpMathType(s.scalar_type());
  at::Tensor sim = at::empty({B, H, W}, s.options());
  at::Tensor norm_s = at::empty({B, H, W}, s.options().dtype(acc_type));
  at::Tensor norm_t = at::empty({B, H, W}, s.options().dtype(acc_type));
  if (sim.numel() == 0) return {sim, norm_s, norm_t};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, s.scalar_type(), "cosine_similarity_map_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* sp = s.const_data_ptr<scalar_t>();
    const scalar_t* tp = t.const_data_ptr<scalar_t>();
    scalar_t* out = sim.data_ptr<scalar_t>();
    acc_t* ns_out = norm_s.data_ptr<acc_t>();
    acc_t* nt_out = norm_t.data_ptr<acc_t>();
    const int64_t tiles = (HW + kTile - 1) / kTile;
    at::parallel_for(0, B * tiles, 1, [&](int64_t begin, int64_t end) {
      forward_tiles(sp, tp, layout, C, HW, eps, out, ns_out, nt_out, begin, end);
    });
  });
  return {sim, norm_s, norm_t};
}

std::tuple<at::Tensor, at::Tensor> cosine_similarity_map_backward_cpu(
    const at::Tensor& grad, const at::Tensor& feat_s, const at::Tensor& feat_t,
    const at::Tensor& sim, const at::Tensor& norm_s, const at::Tensor& norm_t, double eps) {
  check_cosine_similarity_map_backward(grad, feat_s, feat_t, sim, norm_s, norm_t);
  at::Tensor s;
  Layout layout;
  std::tie(s, layout) = dense_feature(feat_s);
  const at::Tensor t = in_layout(feat_t, layout);
  const int64_t B = s.size(0), C = s.size(1), HW = s.size(2) * s.size(3);
  const auto acc_type = at::toOpMathType(s.scalar_type());
  const at::Tensor g = grad.to(acc_type).contiguous();
  const at::Tensor S = sim.to(acc_type).contiguous();
  const at::Tensor Ns = norm_s.to(acc_type).contiguous();
  const at::Tensor Nt = norm_t.to(acc_type).contiguous();
  at::Tensor grad_s = empty_like_cached(s);
  at::Tensor grad_t = empty_like_cached(t);
  if (s.numel() == 0) return {grad_s, grad_t};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, s.scalar_type(), "cosine_similarity_map_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* sp = s.const_data_ptr<scalar_t>();
    const scalar_t* tp = t.const_data_ptr<scalar_t>();
    scalar_t* gs = grad_s.data_ptr<scalar_t>();
    scalar_t* gt = grad_t.data_ptr<scalar_t>();
    const acc_t* gp = g.const_data_ptr<acc_t>();
    const acc_t* simp = S.const_data_ptr<acc_t>();
    const acc_t* nsp = Ns.const_data_ptr<acc_t>();
    const acc_t* ntp = Nt.const_data_ptr<acc_t>();
    // Per pixel: grad_s = k_cross * t - k_s * s, grad_t = k_cross * s - k_t * t.
    std::vector<acc_t> k_cross(B * HW), k_s(B * HW), k_t(B * HW);
    const acc_t e = static_cast<acc_t>(eps);
    at::parallel_for(0, B * HW, 1 << 12, [&](int64_t begin, int64_t end) {
      for (int64_t bp = begin; bp < end; ++bp) {
        const acc_t a = std::max(nsp[bp], e), c = std::max(ntp[bp], e);
        k_cross[bp] = gp[bp] / (a * c);
        k_s[bp] = nsp[bp] > e ? gp[bp] * simp[bp] / (a * a) : acc_t(0);
        k_t[bp] = ntp[bp] > e ? gp[bp] * simp[bp] / (c * c) : acc_t(0);
      }
    });
    if (layout == Layout::kNCHW) {
      at::parallel_for(0, B * C, 1, [&](int64_t begin, int64_t end) {
        for (int64_t bc = begin; bc < end; ++bc) {
          const int64_t pixel0 = (bc / C) * HW;
          gradient_row_nchw(sp + bc * HW, tp + bc * HW, k_cross.data() + pixel0, k_s.data() + pixel0,
                            k_t.data() + pixel0, HW, gs + bc * HW, gt + bc * HW);
        }
      });
    } else {
      at::parallel_for(0, B * HW, 1, [&](int64_t begin, int64_t end) {
        for (int64_t bp = begin; bp < end; ++bp) {
          gradient_row_nhwc(sp + bp * C, tp + bp * C, k_cross[bp], k_s[bp], k_t[bp], C, gs + bp * C,
                            gt + bp * C);
        }
      });
    }
  });
  return {grad_s, grad_t};
}

}  // namespace
}  // namespace cpu
}  // namespace kdengine

TORCH_LIBRARY_IMPL(kdengine, CPU, m) {
  m.impl("cosine_similarity_map", &kdengine::cpu::cosine_similarity_map_cpu);
  m.impl("_cosine_similarity_map_backward", &kdengine::cpu::cosine_similarity_map_backward_cpu);
}
