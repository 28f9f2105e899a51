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

#include "../checks.h"
#include "buffer_cache.h"
#include "pixel_cosine.h"

namespace kdengine {
namespace cpu {
namespace {

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
      acc_t dot[kTile], ns[kTile], nt[kTile];
      for (int64_t unit = begin; unit < end; ++unit) {
        const int64_t b = unit / tiles;
        const int64_t p0 = (unit % tiles) * kTile;
        const int64_t n = std::min(kTile, HW - p0);
        const scalar_t* sb = sp + b * C * HW;
        const scalar_t* tb = tp + b * C * HW;
        if (layout == Layout::kNCHW) {
          channel_sums_nchw(sb, tb, C, HW, p0, n, dot, ns, nt);
        } else {
          for (int64_t p = 0; p < n; ++p) {
            channel_sums_nhwc(sb + (p0 + p) * C, tb + (p0 + p) * C, C, dot[p], ns[p], nt[p]);
          }
        }
        for (int64_t p = 0; p < n; ++p) {
          const acc_t a = std::sqrt(ns[p]), c = std::sqrt(nt[p]);
          out[b * HW + p0 + p] =
              static_cast<scalar_t>(cosine_from_sums(dot[p], a, c, static_cast<acc_t>(eps)));
          ns_out[b * HW + p0 + p] = a;
          nt_out[b * HW + p0 + p] = c;
        }
      }
    });
  });
  return {sim, norm_s, norm_t};
}

std::tuple<at::Tensor, at::Tensor> cosine_similarity_map_backward_cpu(
    const at::Tensor& grad, const at::Tensor& feat_s, const at::Tensor& feat_t,
    const at::Tensor& sim, const at::Tensor& norm_s, const at::Tensor& norm_t, double eps) {
  constexpr const char* op = "_cosine_similarity_map_backward";
  check_feature_pair(op, feat_s, feat_t);
  check_pixel_map(op, "grad", grad, feat_s);
  check_pixel_map(op, "sim", sim, feat_s);
  check_pixel_map(op, "norm_s", norm_s, feat_s);
  check_pixel_map(op, "norm_t", norm_t, feat_s);
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
    const acc_t e = static_cast<acc_t>(eps);
    // Per pixel: grad_s = k_cross * t - k_s * s, grad_t = k_cross * s - k_t * t.
    auto coefficients = [&](int64_t bp, acc_t& k_cross, acc_t& k_s, acc_t& k_t) {
      const acc_t a = std::max(nsp[bp], e), c = std::max(ntp[bp], e);
      k_cross = gp[bp] / (a * c);
      k_s = nsp[bp] > e ? gp[bp] * simp[bp] / (a * a) : acc_t(0);
      k_t = ntp[bp] > e ? gp[bp] * simp[bp] / (c * c) : acc_t(0);
    };
    if (layout == Layout::kNCHW) {
      at::parallel_for(0, B * C, 1, [&](int64_t begin, int64_t end) {
        for (int64_t bc = begin; bc < end; ++bc) {
          const int64_t b = bc / C;
          for (int64_t p = 0; p < HW; ++p) {
            acc_t k_cross, k_s, k_t;
            coefficients(b * HW + p, k_cross, k_s, k_t);
            const acc_t x = to_acc(sp[bc * HW + p]), y = to_acc(tp[bc * HW + p]);
            gs[bc * HW + p] = static_cast<scalar_t>(k_cross * y - k_s * x);
            gt[bc * HW + p] = static_cast<scalar_t>(k_cross * x - k_t * y);
          }
        }
      });
    } else {
      at::parallel_for(0, B * HW, 1, [&](int64_t begin, int64_t end) {
        for (int64_t bp = begin; bp < end; ++bp) {
          acc_t k_cross, k_s, k_t;
          coefficients(bp, k_cross, k_s, k_t);
          for (int64_t c = 0; c < C; ++c) {
            const acc_t x = to_acc(sp[bp * C + c]), y = to_acc(tp[bp * C + c]);
            gs[bp * C + c] = static_cast<scalar_t>(k_cross * y - k_s * x);
            gt[bp * C + c] = static_cast<scalar_t>(k_cross * x - k_t * y);
          }
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
