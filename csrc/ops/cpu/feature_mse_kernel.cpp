// CPU kernels of feature_mse: one read of both inputs forward, one read + one write backward;
// and _feature_mse_and_grad, the forward that also writes the gradient for a weight the caller
// names, so that a backward with that weight has nothing left to compute.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <tuple>

#include "../checks.h"
#include "buffer_cache.h"
#include "pixel_cosine.h"
#include "stream_store.h"

namespace kdengine {
namespace cpu {
namespace {

constexpr int64_t kGrain = 1 << 15;

// lane[l] += (s - t)^2 over n elements, kLanes accumulators in acc_t (lane: kLanes of them); with
// WriteOut, also out = scale * (s - t). A grain run in pieces whose lengths are multiples of
// kLanes adds the same terms to the same lanes in the same order as one call over the grain.
template <bool WriteOut, typename scalar_t, typename acc_t = at::opmath_type<scalar_t>>
KDENGINE_CPU_CLONES void squared_difference_lanes(const scalar_t* s, const scalar_t* t, int64_t n,
                                                  acc_t scale, scalar_t* out, acc_t* lane) {
  acc_t acc[kLanes];
  for (int64_t l = 0; l < kLanes; ++l) acc[l] = lane[l];
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    for (int64_t l = 0; l < kLanes; ++l) {
      const acc_t d = to_acc(s[i + l]) - to_acc(t[i + l]);
      acc[l] += d * d;
      if (WriteOut) out[i + l] = static_cast<scalar_t>(scale * d);
    }
  }
  for (int64_t l = 0; i < n; ++i, ++l) {
    const acc_t d = to_acc(s[i]) - to_acc(t[i]);
    acc[l] += d * d;
    if (WriteOut) out[i] = static_cast<scalar_t>(scale * d);
  }
  for (int64_t l = 0; l < kLanes; ++l) lane[l] = acc[l];
}

// sum (s - t)^2 over the grain [g0, g0 + n) (n <= kGrain), lanes in acc_t and their total in
// double; with WriteOut, also out[g0 + i] = scale * (s - t), streamed when `stream`.
template <bool WriteOut, typename scalar_t, typename acc_t = at::opmath_type<scalar_t>>
double grain_squared_difference(const scalar_t* s, const scalar_t* t, int64_t g0, int64_t n,
                                acc_t scale, scalar_t* out, bool stream) {
  acc_t lane[kLanes] = {};
  if (WriteOut) {
    blocked_output(out, g0, g0 + n, stream, [&](int64_t first, int64_t m, scalar_t* dst) {
      squared_difference_lanes<true>(s + first, t + first, m, scale, dst, lane);
    });
  } else {
    squared_difference_lanes<false>(s + g0, t + g0, n, scale, out, lane);
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

// sum (s - t)^2 over N elements (grains summed in double: no drift at 50M elements); with
// WriteOut, also grad = scale * (s - t). The grains and their order do not depend on WriteOut,
// so both give the same bits.
template <bool WriteOut, typename scalar_t, typename acc_t = at::opmath_type<scalar_t>>
double squared_difference_total(const scalar_t* s, const scalar_t* t, int64_t N, acc_t scale,
                                scalar_t* grad) {
  const bool stream = WriteOut && use_stream_stores(N * static_cast<int64_t>(sizeof(scalar_t)));
  return at::parallel_reduce(
      0, N, kGrain, 0.0,
      [&](int64_t begin, int64_t end, double running) {
        for (int64_t g0 = begin; g0 < end; g0 += kGrain) {
          running += grain_squared_difference<WriteOut>(s, t, g0, std::min(end, g0 + kGrain) - g0,
                                                        scale, grad, stream);
        }
        return running;
      },
      std::plus<double>());
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
    const double total = squared_difference_total<false>(
        s.const_data_ptr<scalar_t>(), t.const_data_ptr<scalar_t>(), N, acc_t(0), static_cast<scalar_t*>(nullptr));
    out.fill_(total / static_cast<double>(N));
  });
  return out;
}

// The gradient's scale for an incoming gradient `grad` (the value of d loss / d mse): 2 grad / N,
// rounded once to acc_t. Forward-with-gradient and backward use it alike, so for the same grad
// they write the same bits.
template <typename acc_t>
acc_t gradient_scale(double grad, int64_t N) {
  return static_cast<acc_t>(2.0 * grad / static_cast<double>(N));
}

std::tuple<at::Tensor, at::Tensor> feature_mse_and_grad_cpu(const at::Tensor& feat_s,
                                                            const at::Tensor& feat_t,
                                                            double grad_weight) {
  check_feature_pair("_feature_mse_and_grad", feat_s, feat_t, /*require_4d=*/false);
  at::Tensor s, t;
  std::tie(s, t) = flat_pair(feat_s, feat_t);
  const int64_t N = s.numel();
  at::Tensor out = at::empty({}, s.options());
  at::Tensor grad = empty_like_cached(s);
  if (N == 0) return {out.fill_(std::numeric_limits<double>::quiet_NaN()), grad};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, s.scalar_type(), "feature_mse_and_grad_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const double total = squared_difference_total<true>(
        s.const_data_ptr<scalar_t>(), t.const_data_ptr<scalar_t>(), N,
        gradient_scale<acc_t>(grad_weight, N), grad.data_ptr<scalar_t>());
    out.fill_(total / static_cast<double>(N));
  });
  return {out, grad};
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
    const acc_t scale = gradient_scale<acc_t>(grad.item<double>(), N);
    const scalar_t* sp = s.const_data_ptr<scalar_t>();
    const scalar_t* tp = t.const_data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    const bool stream = use_stream_stores(N * static_cast<int64_t>(sizeof(scalar_t)));
    at::parallel_for(0, N, kGrain, [&](int64_t begin, int64_t end) {
      blocked_output(op, begin, end, stream, [&](int64_t first, int64_t m, scalar_t* dst) {
        scaled_difference(sp + first, tp + first, scale, m, dst);
      });
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
  m.impl("_feature_mse_and_grad", &kdengine::cpu::feature_mse_and_grad_cpu);
}
