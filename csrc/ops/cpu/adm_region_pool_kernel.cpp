// CPU kernels of adm_region_pool: attention-weighted relu sums per (image, class) in one read of
// the feature, and the backward in one read and one write.
//
// Forward: units of (image, pixel chunk) each accumulate their own partial sums [K, C] and pixel
// counts [K] (no shared writes, a fixed summation order), reduced per image afterwards. NCHW: a
// per-pixel scatter into the partial would serialise on the adds into the same class, so each
// channel row of a tile is reduced per class instead: label maps are piecewise constant, a tile
// holds few classes, and for each the row's weighted relu sum over the tile, with the weights of
// the other pixels zeroed, is one vectorised dot product (tiles with many classes, e.g. noisy
// labels, are reduced run by run). NHWC: each pixel's channel vector is added to its class's row.
// The backward writes each NHWC pixel as one vector (its class's scales times its weight), and
// each NCHW row tile by tile, selecting each pixel's scale among the tile's few classes (a gather
// from the row's per-class table where a tile holds many).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <memory>
#include <tuple>
#include <vector>

#include "../adm_region_pool.h"
#include "buffer_cache.h"
#include "pixel_cosine.h"

namespace kdengine {
namespace cpu {
namespace {

// Elements the partial sums of all units may take together: with many threads and few images
// the units are fewer rather than the buffer larger (K * C can be 150 classes x 2048 channels).
constexpr int64_t kPartialBudget = int64_t(1) << 24;
// Classes a tile may hold for the per-class reduction of its NCHW rows; beyond, run by run.
constexpr int64_t kMaskedClasses = 4;

// A maximal run [begin, end) of consecutive pixels with one class (-1: pooled nowhere).
struct Run {
  int64_t begin, end, klass;
};

// Appends the runs of classes klass[0, n) to `runs` (a new run starts at p = 0).
inline void append_runs(const int64_t* klass, int64_t n, std::vector<Run>& runs) {
  for (int64_t p = 0; p < n; ++p) {
    if (p > 0 && runs.back().klass == klass[p]) {
      ++runs.back().end;
    } else {
      runs.push_back({p, p + 1, klass[p]});
    }
  }
}

// sum_p w[p] * relu(x[p]) over n pixels, with independent lanes so that it vectorises.
template <typename scalar_t, typename acc_t>
KDENGINE_CPU_CLONES acc_t weighted_relu_sum(const scalar_t* x, const acc_t* w, int64_t n) {
  acc_t lane[kRowLanes] = {};
  int64_t p = 0;
  for (; p + kRowLanes <= n; p += kRowLanes) {
    for (int64_t l = 0; l < kRowLanes; ++l) lane[l] += w[p + l] * std::max(to_acc(x[p + l]), acc_t(0));
  }
  for (int64_t l = 0; p < n; ++p, ++l) lane[l] += w[p] * std::max(to_acc(x[p]), acc_t(0));
  acc_t total = 0;
  for (int64_t l = 0; l < kRowLanes; ++l) total += lane[l];
  return total;
}

template <typename scalar_t, typename acc_t = at::opmath_type<scalar_t>>
KDENGINE_CPU_CLONES void region_units(const scalar_t* x, const acc_t* attn, const int64_t* labels,
                                      Layout layout, int64_t C, int64_t HW, int64_t K,
                                      int64_t ignore_index, int64_t chunks,
                                      int64_t tiles_per_chunk, acc_t* partial, int64_t* counts,
                                      int64_t begin, int64_t end) {
  int64_t klass[kTile];  // the tile's pooled class per pixel, -1 where not pooled
  acc_t w[kTile];
  int64_t present[kMaskedClasses];     // NCHW: the tile's classes, when few
  acc_t masked[kMaskedClasses][kTile];  // NCHW: w where the pixel has class present[j], else 0
  std::vector<Run> runs;
  runs.reserve(kTile);
  for (int64_t unit = begin; unit < end; ++unit) {
    const int64_t b = unit / chunks;
    const int64_t p_begin = std::min(HW, (unit % chunks) * tiles_per_chunk * kTile);
    const int64_t p_end = std::min(HW, p_begin + tiles_per_chunk * kTile);
    const scalar_t* xb = x + b * C * HW;
    acc_t* acc = partial + unit * K * C;
    int64_t* cnt = counts + unit * K;
    std::fill(acc, acc + K * C, acc_t(0));
    std::fill(cnt, cnt + K, int64_t(0));
    for (int64_t p0 = p_begin; p0 < p_end; p0 += kTile) {
      const int64_t n = std::min(kTile, p_end - p0);
      for (int64_t p = 0; p < n; ++p) {
        const int64_t label = labels[b * HW + p0 + p];
        const bool pooled = pooled_label<int64_t>(label, K, ignore_index);
        klass[p] = pooled ? label : -1;
        w[p] = attn[b * HW + p0 + p];
        if (pooled) ++cnt[label];
      }
      if (layout == Layout::kNHWC) {
        for (int64_t p = 0; p < n; ++p) {
          if (klass[p] < 0) continue;
          const scalar_t* xp = xb + (p0 + p) * C;
          acc_t* acc_k = acc + klass[p] * C;
          const acc_t wp = w[p];
          for (int64_t c = 0; c < C; ++c) acc_k[c] += wp * std::max(to_acc(xp[c]), acc_t(0));
        }
        continue;
      }
      runs.clear();
      append_runs(klass, n, runs);
      int64_t classes = 0;
      bool many = false;
      for (const Run& r : runs) {
        if (r.klass < 0 || std::find(present, present + classes, r.klass) != present + classes) continue;
        if (classes == kMaskedClasses) {
          many = true;
          break;
        }
        present[classes++] = r.klass;
      }
      if (!many) {
        for (int64_t j = 0; j < classes; ++j) {
          for (int64_t p = 0; p < n; ++p) masked[j][p] = klass[p] == present[j] ? w[p] : acc_t(0);
        }
        for (int64_t c = 0; c < C; ++c) {
          const scalar_t* row = xb + c * HW + p0;
          acc_t* acc_c = acc + c * K;
          for (int64_t j = 0; j < classes; ++j) acc_c[present[j]] += weighted_relu_sum(row, masked[j], n);
        }
      } else {
        for (int64_t c = 0; c < C; ++c) {
          const scalar_t* row = xb + c * HW + p0;
          acc_t* acc_c = acc + c * K;
          for (const Run& r : runs) {
            if (r.klass >= 0) acc_c[r.klass] += weighted_relu_sum(row + r.begin, w + r.begin, r.end - r.begin);
          }
        }
      }
    }
  }
}

template <typename scalar_t>
void region_pool_forward_kernel(const scalar_t* x, const at::opmath_type<scalar_t>* attn,
                                const int64_t* labels, Layout layout, int64_t B, int64_t C,
                                int64_t HW, int64_t K, int64_t ignore_index, scalar_t* pooled,
                                int64_t* count) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t per_unit = std::max<int64_t>(1, K * C);
  const int64_t affordable = std::max<int64_t>(1, kPartialBudget / (B * per_unit));
  const int64_t chunks = std::min(pixel_chunks(B, HW, at::get_num_threads()), affordable);
  const int64_t tiles = (HW + kTile - 1) / kTile;
  const int64_t tiles_per_chunk = (tiles + chunks - 1) / chunks;
  // Uninitialised: every unit clears its own part.
  std::unique_ptr<acc_t[]> partial(new acc_t[B * chunks * K * C]);
  std::unique_ptr<int64_t[]> counts(new int64_t[B * chunks * K]);
  at::parallel_for(0, B * chunks, 1, [&](int64_t begin, int64_t end) {
    region_units<scalar_t>(x, attn, labels, layout, C, HW, K, ignore_index, chunks,
                           tiles_per_chunk, partial.get(), counts.get(), begin, end);
  });
  const bool nchw = layout == Layout::kNCHW;
  at::parallel_for(0, B * K, 1, [&](int64_t begin, int64_t end) {
    for (int64_t bk = begin; bk < end; ++bk) {
      const int64_t b = bk / K, k = bk % K;
      int64_t total = 0;
      for (int64_t u = 0; u < chunks; ++u) total += counts[(b * chunks + u) * K + k];
      count[bk] = total;
      const acc_t inv = total > 0 ? acc_t(1) / static_cast<acc_t>(total) : acc_t(0);
      for (int64_t c = 0; c < C; ++c) {
        acc_t sum = 0;
        for (int64_t u = 0; u < chunks; ++u) {
          const acc_t* acc = partial.get() + (b * chunks + u) * K * C;
          sum += nchw ? acc[c * K + k] : acc[k * C + c];
        }
        pooled[bk * C + c] = static_cast<scalar_t>(total > 0 ? sum * inv : acc_t(0));
      }
    }
  });
}

// The pooled classes of one kTile-pixel tile of an image: `count` of them in `klass`, or more
// than kMaskedClasses (then `klass` is incomplete).
struct TileClasses {
  int64_t count;
  int32_t klass[kMaskedClasses];
};

// One tile of an NCHW row: out[p] = x[p] > 0 ? table[klass[p]] * a[p] : 0, with table the row's
// scale per class and 0 at index K (pixels pooled nowhere). A gather from the table does not
// vectorise well, so for a tile with few classes the scale is selected class by class.
template <typename scalar_t, typename acc_t>
KDENGINE_CPU_CLONES void backward_tile_nchw(const scalar_t* x, const acc_t* a, const int32_t* klass,
                                            const TileClasses& classes, const acc_t* table,
                                            int64_t n, scalar_t* out) {
  acc_t value[kTile];
  if (classes.count <= kMaskedClasses) {
    std::fill(value, value + n, acc_t(0));
    for (int64_t j = 0; j < classes.count; ++j) {
      const int32_t k = classes.klass[j];
      const acc_t scale = table[k];
      for (int64_t p = 0; p < n; ++p) value[p] = klass[p] == k ? scale : value[p];
    }
  } else {
    for (int64_t p = 0; p < n; ++p) value[p] = table[klass[p]];
  }
  // The product is computed unconditionally so that the loop is a select.
  for (int64_t p = 0; p < n; ++p) {
    const acc_t v = value[p] * a[p];
    out[p] = static_cast<scalar_t>(to_acc(x[p]) > acc_t(0) ? v : acc_t(0));
  }
}

// One NHWC pixel of class k: out[c] = x[c] > 0 ? scale_k[c] * a : 0.
template <typename scalar_t, typename acc_t>
KDENGINE_CPU_CLONES void backward_pixel_nhwc(const scalar_t* x, acc_t a, const acc_t* scale_k,
                                             int64_t C, scalar_t* out) {
  for (int64_t c = 0; c < C; ++c) {
    const acc_t value = scale_k[c] * a;
    out[c] = static_cast<scalar_t>(to_acc(x[c]) > acc_t(0) ? value : acc_t(0));
  }
}

std::tuple<at::Tensor, at::Tensor> adm_region_pool_cpu(const at::Tensor& feat,
                                                       const at::Tensor& attn,
                                                       const at::Tensor& labels,
                                                       int64_t num_classes, int64_t ignore_index) {
  check_adm_region_pool(feat, attn, labels, num_classes);
  at::Tensor x;
  Layout layout;
  std::tie(x, layout) = dense_feature(feat);
  const int64_t B = x.size(0), C = x.size(1), HW = x.size(2) * x.size(3);
  at::Tensor pooled, count;
  std::tie(pooled, count) = adm_region_pool_outputs(x, num_classes);
  if (B * HW == 0) {
    pooled.zero_();
    count.zero_();
    return {pooled, count};
  }
  const auto acc_type = at::toOpMathType(x.scalar_type());
  const at::Tensor a = attn.to(acc_type).contiguous();
  const at::Tensor l = labels.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "adm_region_pool_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    region_pool_forward_kernel<scalar_t>(x.const_data_ptr<scalar_t>(), a.const_data_ptr<acc_t>(),
                                         l.const_data_ptr<int64_t>(), layout, B, C, HW,
                                         num_classes, ignore_index, pooled.data_ptr<scalar_t>(),
                                         count.data_ptr<int64_t>());
  });
  return {pooled, count};
}

at::Tensor adm_region_pool_backward_cpu(const at::Tensor& grad_pooled, const at::Tensor& feat,
                                        const at::Tensor& attn, const at::Tensor& labels,
                                        const at::Tensor& count, int64_t ignore_index) {
  check_adm_region_pool_backward(grad_pooled, feat, attn, labels, count);
  at::Tensor x;
  Layout layout;
  std::tie(x, layout) = dense_feature(feat);
  const int64_t B = x.size(0), C = x.size(1), HW = x.size(2) * x.size(3);
  const int64_t K = grad_pooled.size(1);
  at::Tensor grad = empty_like_cached(x);  // same layout as the input it differentiates
  if (x.numel() == 0) return grad;
  const auto acc_type = at::toOpMathType(x.scalar_type());
  const at::Tensor scale = region_grad_scale(grad_pooled, count, acc_type);  // [B, K, C]
  const at::Tensor a = attn.to(acc_type).contiguous();
  const at::Tensor l = labels.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "adm_region_pool_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const acc_t* sp = scale.const_data_ptr<acc_t>();
    const acc_t* ap = a.const_data_ptr<acc_t>();
    const int64_t* lp = l.const_data_ptr<int64_t>();
    scalar_t* out = grad.data_ptr<scalar_t>();
    if (layout == Layout::kNCHW) {
      // Each pixel's class (K where it is pooled nowhere) and each tile's classes, then row by row.
      const int64_t tiles = (HW + kTile - 1) / kTile;
      std::vector<int32_t> klass(B * HW);
      std::vector<TileClasses> tile_classes(B * tiles);
      at::parallel_for(0, B * tiles, 1, [&](int64_t begin, int64_t end) {
        for (int64_t bt = begin; bt < end; ++bt) {
          const int64_t b = bt / tiles, p0 = (bt % tiles) * kTile;
          TileClasses& tc = tile_classes[bt];
          tc.count = 0;
          for (int64_t p = b * HW + p0; p < b * HW + std::min(HW, p0 + kTile); ++p) {
            const bool pooled = pooled_label<int64_t>(lp[p], K, ignore_index);
            klass[p] = static_cast<int32_t>(pooled ? lp[p] : K);
            if (!pooled || tc.count > kMaskedClasses ||
                std::find(tc.klass, tc.klass + tc.count, klass[p]) != tc.klass + tc.count) {
              continue;
            }
            if (tc.count < kMaskedClasses) tc.klass[tc.count] = klass[p];
            ++tc.count;
          }
        }
      });
      at::parallel_for(0, B * C, 1, [&](int64_t begin, int64_t end) {
        std::vector<acc_t> table(K + 1, acc_t(0));
        for (int64_t bc = begin; bc < end; ++bc) {
          const int64_t b = bc / C, c = bc % C;
          for (int64_t k = 0; k < K; ++k) table[k] = sp[(b * K + k) * C + c];
          for (int64_t t = 0; t < tiles; ++t) {
            const int64_t p0 = t * kTile;
            backward_tile_nchw(xp + bc * HW + p0, ap + b * HW + p0, klass.data() + b * HW + p0,
                               tile_classes[b * tiles + t], table.data(), std::min(kTile, HW - p0),
                               out + bc * HW + p0);
          }
        }
      });
    } else {
      at::parallel_for(0, B * HW, 1, [&](int64_t begin, int64_t end) {
        for (int64_t bp = begin; bp < end; ++bp) {
          const int64_t label = lp[bp];
          scalar_t* o = out + bp * C;
          if (!pooled_label<int64_t>(label, K, ignore_index)) {
            std::fill(o, o + C, static_cast<scalar_t>(0));
            continue;
          }
          backward_pixel_nhwc(xp + bp * C, ap[bp], sp + ((bp / HW) * K + label) * C, C, o);
        }
      });
    }
  });
  return grad;
}

}  // namespace
}  // namespace cpu
}  // namespace kdengine

TORCH_LIBRARY_IMPL(kdengine, CPU, m) {
  m.impl("adm_region_pool", &kdengine::cpu::adm_region_pool_cpu);
  m.impl("_adm_region_pool_backward", &kdengine::cpu::adm_region_pool_backward_cpu);
}
