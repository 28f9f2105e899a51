// CPU kernel of adm_maps: S of every pixel and its sum over the valid pixels in one read of each
// input, then the two maps from the per-image mean.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <optional>
#include <tuple>
#include <vector>

#include "../adm_maps.h"
#include "pixel_cosine.h"

namespace kdengine {
namespace cpu {
namespace {

constexpr double kCosEps = 1e-8;  // F.cosine_similarity's default

// Units [begin, end) of (image, pixel chunk): S of each pixel (parked in sim, the attn_co
// buffer, until the means are known) and, per unit, the sum of S and the number of pixels over
// its valid pixels into sums[2 * unit], sums[2 * unit + 1]. valid: nullptr for "every pixel".
template <typename scalar_t, typename acc_t = at::opmath_type<scalar_t>>
KDENGINE_CPU_CLONES void similarity_units(const scalar_t* s, const scalar_t* t, const bool* valid,
                                          Layout layout, int64_t C, int64_t HW, int64_t chunks,
                                          int64_t tiles_per_chunk, acc_t* sim, acc_t* sums,
                                          int64_t begin, int64_t end) {
  acc_t dot[kTile], ns[kTile], nt[kTile];
  for (int64_t unit = begin; unit < end; ++unit) {
    const int64_t b = unit / chunks;
    const int64_t p_begin = std::min(HW, (unit % chunks) * tiles_per_chunk * kTile);
    const int64_t p_end = std::min(HW, p_begin + tiles_per_chunk * kTile);
    const scalar_t* sb = s + b * C * HW;
    const scalar_t* tb = t + b * C * HW;
    acc_t total = 0, count = 0;
    for (int64_t p0 = p_begin; p0 < p_end; p0 += kTile) {
      const int64_t n = std::min(kTile, p_end - p0);
      channel_sums_tile(sb, tb, layout, C, HW, p0, n, dot, ns, nt);
      for (int64_t p = 0; p < n; ++p) {
        const int64_t px = b * HW + p0 + p;
        const acc_t cos = cosine_from_sums(dot[p], std::sqrt(ns[p]), std::sqrt(nt[p]),
                                           static_cast<acc_t>(kCosEps));
        sim[px] = cos;
        if (valid == nullptr || valid[px]) {
          total += cos;
          count += acc_t(1);
        }
      }
    }
    sums[2 * unit] = total;
    sums[2 * unit + 1] = count;
  }
}

template <typename scalar_t>
void adm_maps_kernel(const scalar_t* s, const scalar_t* t, const bool* valid, Layout layout,
                     int64_t B, int64_t C, int64_t HW, double eps,
                     at::opmath_type<scalar_t>* attn_co, at::opmath_type<scalar_t>* attn_di) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t chunks = pixel_chunks(B, HW, at::get_num_threads());
  const int64_t tiles = (HW + kTile - 1) / kTile;
  const int64_t tiles_per_chunk = (tiles + chunks - 1) / chunks;
  std::vector<acc_t> sums(2 * B * chunks, acc_t(0));
  at::parallel_for(0, B * chunks, 1, [&](int64_t begin, int64_t end) {
    similarity_units<scalar_t>(s, t, valid, layout, C, HW, chunks, tiles_per_chunk, attn_co,
                               sums.data(), begin, end);
  });
  at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      acc_t total = 0, count = 0;
      for (int64_t k = 0; k < chunks; ++k) {
        total += sums[2 * (b * chunks + k)];
        count += sums[2 * (b * chunks + k) + 1];
      }
      // An image without valid pixels has mean 0: its maps stay finite (and unused).
      const acc_t mean = count > acc_t(0) ? total / count : acc_t(0);
      const acc_t den_co = acc_t(1) + mean + static_cast<acc_t>(eps);
      const acc_t den_di = (acc_t(1) - mean) + static_cast<acc_t>(eps);
      for (int64_t p = b * HW; p < (b + 1) * HW; ++p) {
        const acc_t cos = attn_co[p];
        attn_co[p] = (acc_t(1) + cos) / den_co;
        attn_di[p] = (acc_t(1) - cos) / den_di;
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor> adm_maps_cpu(const at::Tensor& feat_s, const at::Tensor& feat_t,
                                                const std::optional<at::Tensor>& valid,
                                                double eps) {
  check_adm_maps(feat_s, feat_t, valid);
  at::Tensor s;
  Layout layout;
  std::tie(s, layout) = dense_feature(feat_s);
  const at::Tensor t = in_layout(feat_t, layout);
  const at::Tensor v = dense_valid(valid);
  const int64_t B = s.size(0), C = s.size(1), HW = s.size(2) * s.size(3);
  at::Tensor attn_co, attn_di;
  std::tie(attn_co, attn_di) = adm_maps_outputs(s);
  if (B * HW == 0) return {attn_co, attn_di};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, s.scalar_type(), "adm_maps_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    adm_maps_kernel<scalar_t>(s.const_data_ptr<scalar_t>(), t.const_data_ptr<scalar_t>(),
                              v.defined() ? v.const_data_ptr<bool>() : nullptr, layout, B, C, HW,
                              eps, attn_co.data_ptr<acc_t>(), attn_di.data_ptr<acc_t>());
  });
  return {attn_co, attn_di};
}

}  // namespace
}  // namespace cpu
}  // namespace kdengine

TORCH_LIBRARY_IMPL(kdengine, CPU, m) {
  m.impl("adm_maps", &kdengine::cpu::adm_maps_cpu);
}
