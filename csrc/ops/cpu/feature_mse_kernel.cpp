// CPU kernels of feature_mse: one read of both inputs forward, one read + one write backward.
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

constexpr int64_t kGrain = 1 << 15;

// sum (s - t)^2 over n <= kGrain elements: kLanes accumulators in acc_t, the total in double.
template <typename scalar_t, typename acc_t = at::opmath_type<scalar_t>>
KDENGINE_CPU_CLONES double sum_squared_difference(const scalar_t* s, const scalar_t* t, int64_t n) {
  acc_t lane[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    for (int64_t l = 0; l < kLanes; ++l) {
      const acc_t d = to_acc(s[i + l]) - to_acc(t[i + l]);
      lane[l] += d * d;
    }
  }
  for (int64_t l = 0; i < n; ++i, ++l) {
    const acc_t d = to_acc(s[i]) - to_acc(t[i]);
    lane[l] += d * d;
  }
  double total = 0;
  for (int64_t l = 0; l < kLanes; ++l) total += static_cast<double>(lane[l]);
  return total;
}

// out = scale * (s - t) over n elements.
template <typename scalar_t, typename acc_t>
KDENGINE_CPU_CLONES void scaled_difference(const scalar_t* s, const scalar_t* t, acc_t scale,
                                           int64_t n, scalar_t* out) {
  for (int64_t i = 0; i < n; ++i) out[i] = static_cast<scalar_t>(scale * (to_acc(s[i]) - to_acc(t[i])));
}

// Both inputs in one dense layout, so they can be walked as flat arrays.
std::pair<at::Tensor, at::Tensor> flat_pair(const at::Tensor& feat_s, const at::Tensor& feat_t) {
  if (feat_s.dim() == 4) {
    const auto dense = dense_feature(feat_s);
    return {dense.first, in_layout(feat_t, dense.second)};
  }
  return {feat_s.contiguous(), feat_t.contiguous()};
}

at::Tensor feature_mse_cpu(const at::Tensor& feat_s, const at::Tensor& feat_t) {
  check_feature_pair("feature_mse", feat_s, feat_t, /*require_4d=*/false);
  at::Tensor s, t;
  std::tie(s, t) = flat_pair(feat_s, feat_t);
  const int64_t N = s.numel();
  at::Tensor out = at::empty({}, s.options());
  if (N == 0) return out.fill_(std::numeric_limits<double>::quiet_NaN());  // as F.mse_loss
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, s.scalar_type(), "feature_mse_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* sp = s.const_data_ptr<scalar_t>();
    const scalar_t* tp = t.const_data_ptr<scalar_t>();
    // Lanes in acc_t inside a grain, grains summed in double: no drift at 50M elements.
    const double total = at::parallel_reduce(
        0, N, kGrain, 0.0,
        [&](int64_t begin, int64_t end, double running) {
          for (int64_t g0 = begin; g0 < end; g0 += kGrain) {
            running += sum_squared_difference(sp + g0, tp + g0, std::min(end, g0 + kGrain) - g0);
          }
          return running;
        },
        std::plus<double>());
    out.fill_(total / static_cast<double>(N));
  });
  return out;
}

at::Tensor feature_mse_backward_cpu(const at::Tensor& grad, const at::Tensor& feat_s,
                                    const at::Tensor& feat_t) {
  check_feature_pair("_feature_mse_backward", feat_s, feat_t, /*require_4d=*/false);
  TORCH_CHECK(grad.numel() == 1, "_feature_mse_backward: grad must be a scalar, got shape ",
              grad.sizes());
  at::Tensor s, t;
  std::tie(s, t) = flat_pair(feat_s, feat_t);
  const int64_t N = s.numel();
  at::Tensor out = empty_like_cached(s);
  if (N == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, s.scalar_type(), "feature_mse_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const acc_t scale = static_cast<acc_t>(2.0 * grad.item<double>() / static_cast<double>(N));
    const scalar_t* sp = s.const_data_ptr<scalar_t>();
    const scalar_t* tp = t.const_data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    at::parallel_for(0, N, kGrain, [&](int64_t begin, int64_t end) {
      scaled_difference(sp + begin, tp + begin, scale, end - begin, op + begin);
    });
  });
  return out;
}

}  // namespace
}  // namespace cpu
}  // namespace kdengine

TORCH_LIBRARY_IMPL(kdengine, CPU, m) {
  m.impl("feature_mse", &kdengine::cpu::feature_mse_cpu);
  m.impl("_feature_mse_backward", &kdengine::cpu::feature_mse_backward_cpu);
}
