// CPU kernels of adm_pool: similarity and weighted pooling in one read of each input.
//
// The attention denominators are per-image constants, so
//   pooled_s[b,c] = sum_hw (1 + S) relu(s) / (HW * (1 + mean S + eps))
//   pooled_t[b,c] = sum_hw (1 - S) relu(t) / (HW * (mean(1 - S) + eps))
// and one pass can accumulate the numerators while S is computed pixel by pixel.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <tuple>

#include <vector>

#include "../checks.h"
#include "buffer_cache.h"
#include "pixel_cosine.h"
#include "stream_store.h"

namespace kdengine {
namespace cpu {
namespace {

constexpr double kCosEps = 1e-8;  // F.cosine_similarity's default

// Accumulates acc[c] += sum_p w[p] * relu(x[c, p]) over n pixels of an NCHW tile.
template <typename scalar_t, typename acc_t>
inline void weighted_relu_sums_nchw(const scalar_t* x, int64_t C, int64_t HW, int64_t p0,
                                    int64_t n, const acc_t* w, acc_t* acc) {
  for (int64_t c = 0; c < C; ++c) {
    const scalar_t* xr = x + c * HW + p0;
    acc_t lane[kRowLanes] = {};
    int64_t p = 0;
    for (; p + kRowLanes <= n; p += kRowLanes) {
      for (int64_t l = 0; l < kRowLanes; ++l) {
        lane[l] += w[p + l] * std::max(to_acc(xr[p + l]), acc_t(0));
      }
    }
    for (int64_t l = 0; p < n; ++p, ++l) lane[l] += w[p] * std::max(to_acc(xr[p]), acc_t(0));
    acc_t total = 0;
    for (int64_t l = 0; l < kRowLanes; ++l) total += lane[l];
    acc[c] += total;
  }
}

// Units [begin, end) of (image, pixel chunk): S of each pixel (parked in attn_co), its sum per
// unit, and the numerators sum_p (1 +- S) relu(x) per channel into partial[unit, 2, C].
// out[i] = x[i] > 0 ? scale * w[i] : 0: one NCHW row (w = the attention row) or one NHWC pixel
// (w = the pooled gradient row). The product is computed unconditionally so the loop is a select.
template <typename scalar_t, typename acc_t>
KDENGINE_CPU_CLONES void masked_scaled_row(const scalar_t* x, const acc_t* w, acc_t scale,
                                           int64_t n, scalar_t* out) {
  for (int64_t i = 0; i < n; ++i) {
    const acc_t value = scale * w[i];
    out[i] = static_cast<scalar_t>(to_acc(x[i]) > acc_t(0) ? value : acc_t(0));
  }
}

template <typename scalar_t, typename acc_t = at::opmath_type<scalar_t>>
KDENGINE_CPU_CLONES void forward_units(const scalar_t* s, const scalar_t* t, Layout layout,
                                       int64_t C, int64_t HW, int64_t chunks,
                                       int64_t tiles_per_chunk, acc_t* partial_data,
                                       acc_t* sim_sum, acc_t* attn_co, int64_t begin,
                                       int64_t end) {
  acc_t dot[kTile], ns[kTile], nt[kTile], w_co[kTile], w_di[kTile];
  for (int64_t unit = begin; unit < end; ++unit) {
    const int64_t b = unit / chunks;
    const int64_t p_begin = std::min(HW, (unit % chunks) * tiles_per_chunk * kTile);
    const int64_t p_end = std::min(HW, p_begin + tiles_per_chunk * kTile);
    acc_t* acc_s = partial_data + unit * 2 * C;
    acc_t* acc_t_ = acc_s + C;
    acc_t* sim = attn_co + b * HW;  // raw S is parked here until the means are known
    acc_t sim_total = 0;
    const scalar_t* sb = s + b * C * HW;
    const scalar_t* tb = t + b * C * HW;
    for (int64_t p0 = p_begin; p0 < p_end; p0 += kTile) {
      const int64_t n = std::min(kTile, p_end - p0);
      channel_sums_tile(sb, tb, layout, C, HW, p0, n, dot, ns, nt);
      for (int64_t p = 0; p < n; ++p) {
        const acc_t cos = cosine_from_sums(dot[p], std::sqrt(ns[p]), std::sqrt(nt[p]),
                                           static_cast<acc_t>(kCosEps));
        sim[p0 + p] = cos;
        sim_total += cos;
        w_co[p] = acc_t(1) + cos;
        w_di[p] = acc_t(1) - cos;
      }
      if (layout == Layout::kNCHW) {
        weighted_relu_sums_nchw(sb, C, HW, p0, n, w_co, acc_s);
        weighted_relu_sums_nchw(tb, C, HW, p0, n, w_di, acc_t_);
      } else {
        for (int64_t p = 0; p < n; ++p) {
          const scalar_t* sp = sb + (p0 + p) * C;
          const scalar_t* tp = tb + (p0 + p) * C;
          for (int64_t c = 0; c < C; ++c) {
            acc_s[c] += w_co[p] * std::max(to_acc(sp[c]), acc_t(0));
            acc_t_[c] += w_di[p] * std::max(to_acc(tp[c]), acc_t(0));
          }
        }
      }
    }
    sim_sum[unit] = sim_total;
  }
}

template <typename scalar_t>
void adm_pool_forward_kernel(const scalar_t* s, const scalar_t* t, Layout layout, int64_t B,
                             int64_t C, int64_t HW, double eps, scalar_t* pooled_s,
                             scalar_t* pooled_t, at::opmath_type<scalar_t>* attn_co,
                             at::opmath_type<scalar_t>* attn_di) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t chunks = pixel_chunks(B, HW, at::get_num_threads());
  const int64_t tiles = (HW + kTile - 1) / kTile;
  const int64_t tiles_per_chunk = (tiles + chunks - 1) / chunks;
  // Per (image, chunk): numerators for student and teacher, and the sum of S.
  std::vector<acc_t> partial(B * chunks * 2 * C, acc_t(0));
  std::vector<acc_t> sim_sum(B * chunks, acc_t(0));

  at::parallel_for(0, B * chunks, 1, [&](int64_t begin, int64_t end) {
    forward_units<scalar_t>(s, t, layout, C, HW, chunks, tiles_per_chunk, partial.data(),
                            sim_sum.data(), attn_co, begin, end);
  });

  at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      acc_t sim_total = 0;
      for (int64_t k = 0; k < chunks; ++k) sim_total += sim_sum[b * chunks + k];
      const acc_t mean_sim = sim_total / static_cast<acc_t>(HW);
      const acc_t den_co = acc_t(1) + mean_sim + static_cast<acc_t>(eps);
      const acc_t den_di = (acc_t(1) - mean_sim) + static_cast<acc_t>(eps);
      for (int64_t c = 0; c < C; ++c) {
        acc_t num_s = 0, num_t = 0;
        for (int64_t k = 0; k < chunks; ++k) {
          num_s += partial[(b * chunks + k) * 2 * C + c];
          num_t += partial[(b * chunks + k) * 2 * C + C + c];
        }
        pooled_s[b * C + c] = static_cast<scalar_t>(num_s / (static_cast<acc_t>(HW) * den_co));
        pooled_t[b * C + c] = static_cast<scalar_t>(num_t / (static_cast<acc_t>(HW) * den_di));
      }
      for (int64_t p = 0; p < HW; ++p) {
        const acc_t cos = attn_co[b * HW + p];
        attn_co[b * HW + p] = (acc_t(1) + cos) / den_co;
        attn_di[b * HW + p] = (acc_t(1) - cos) / den_di;
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> adm_pool_cpu(const at::Tensor& feat_s,
                                                                        const at::Tensor& feat_t,
                                                                        double eps) {
  check_feature_pair("adm_pool", feat_s, feat_t);
  at::Tensor s;
  Layout layout;
  std::tie(s, layout) = dense_feature(feat_s);
  const at::Tensor t = in_layout(feat_t, layout);
  const int64_t B = s.size(0), C = s.size(1), H = s.size(2), W = s.size(3);
  at::Tensor pooled_s, pooled_t, attn_co, attn_di;
  std::tie(pooled_s, pooled_t, attn_co, attn_di) = adm_pool_outputs(s, eps);
  if (s.numel() == 0) return {pooled_s, pooled_t, attn_co, attn_di};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, s.scalar_type(), "adm_pool_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    adm_pool_forward_kernel<scalar_t>(s.const_data_ptr<scalar_t>(), t.const_data_ptr<scalar_t>(),
                                      layout, B, C, H * W, eps, pooled_s.data_ptr<scalar_t>(),
                                      pooled_t.data_ptr<scalar_t>(), attn_co.data_ptr<acc_t>(),
                                      attn_di.data_ptr<acc_t>());
  });
  return {pooled_s, pooled_t, attn_co, attn_di};
}

at::Tensor adm_pool_backward_cpu(const at::Tensor& grad_pooled, const at::Tensor& feat,
                                 const at::Tensor& attn) {
  check_adm_pool_backward(grad_pooled, feat, attn);
  at::Tensor x;
  Layout layout;
  std::tie(x, layout) = dense_feature(feat);
  const int64_t B = x.size(0), C = x.size(1), HW = x.size(2) * x.size(3);
  const auto acc_type = at::toOpMathType(x.scalar_type());
  const at::Tensor g = grad_pooled.to(acc_type).contiguous();
  const at::Tensor a = attn.to(acc_type).contiguous();
  at::Tensor grad = empty_like_cached(x);  // same layout as the input it differentiates
  if (x.numel() == 0) return grad;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "adm_pool_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const acc_t* gp = g.const_data_ptr<acc_t>();
    const acc_t* ap = a.const_data_ptr<acc_t>();
    scalar_t* out = grad.data_ptr<scalar_t>();
    const acc_t inv_hw = acc_t(1) / static_cast<acc_t>(HW);
    // The output as rows: NCHW [B*C, HW] rows weighted by the image's attention row and scaled by
    // the pooled gradient; NHWC [B*HW, C] rows weighted by the pooled gradient row and scaled by
    // the pixel's attention.
    const bool nchw = layout == Layout::kNCHW;
    const int64_t rows = nchw ? B * C : B * HW, len = nchw ? HW : C;
    const bool stream = use_stream_stores(x.numel() * static_cast<int64_t>(sizeof(scalar_t)));
    // Elements [first, first + m) of the output, row piece by row piece.
    const auto block = [&](int64_t first, int64_t m, scalar_t* dst) {
      for (int64_t done = 0; done < m;) {
        const int64_t e = first + done, row = e / len, col = e % len;
        const int64_t n = std::min(len - col, m - done);
        const acc_t* w = nchw ? ap + (row / C) * HW : gp + (row / HW) * C;
        const acc_t scale = (nchw ? gp[row] : ap[row]) * inv_hw;
        masked_scaled_row(xp + e, w + col, scale, n, dst + done);
        done += n;
      }
    };
    at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
      blocked_output(out, begin * len, end * len, stream, block);
    });
  });
  return grad;
}

}  // namespace
}  // namespace cpu
}  // namespace kdengine

TORCH_LIBRARY_IMPL(kdengine, CPU, m) {
  m.impl("adm_pool", &kdengine::cpu::adm_pool_cpu);
  m.impl("_adm_pool_backward", &kdengine::cpu::adm_pool_backward_cpu);
}
