// Argument checks shared by every kdengine op schema and backend.
// Messages name the op, the argument and the shapes, so a user can find the bad call.
#pragma once

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>

#include <tuple>
#include <c10/util/Exception.h>

namespace kdengine {

inline void check_floating(const char* op, const char* name, const at::Tensor& t) {
  TORCH_CHECK(t.defined(), op, ": ", name, " is undefined");
  TORCH_CHECK(at::isFloatingType(t.scalar_type()), op, ": ", name,
              " must be a floating tensor (float32, float16, bfloat16 or float64), got ",
              t.scalar_type());
}

// feat_s and feat_t of an [B, C, H, W] feature pair: same shape, dtype and device.
inline void check_feature_pair(const char* op, const at::Tensor& feat_s, const at::Tensor& feat_t,
                               bool require_4d = true) {
  check_floating(op, "feat_s", feat_s);
  check_floating(op, "feat_t", feat_t);
  if (require_4d) {
    TORCH_CHECK(feat_s.dim() == 4, op, ": feat_s must be [B, C, H, W], got shape ", feat_s.sizes());
    TORCH_CHECK(feat_t.dim() == 4, op, ": feat_t must be [B, C, H, W], got shape ", feat_t.sizes());
  }
  TORCH_CHECK(feat_s.sizes() == feat_t.sizes(), op,
              ": feat_s and feat_t must have the same shape, got feat_s ", feat_s.sizes(),
              " and feat_t ", feat_t.sizes());
  TORCH_CHECK(feat_s.scalar_type() == feat_t.scalar_type(), op,
              ": feat_s and feat_t must have the same dtype, got feat_s ", feat_s.scalar_type(),
              " and feat_t ", feat_t.scalar_type());
  TORCH_CHECK(feat_s.device() == feat_t.device(), op,
              ": feat_s and feat_t must be on the same device, got feat_s on ", feat_s.device(),
              " and feat_t on ", feat_t.device());
}

// A per-pixel map [B, H, W] that belongs to a [B, C, H, W] feature.
inline void check_pixel_map(const char* op, const char* name, const at::Tensor& map,
                            const at::Tensor& feat) {
  TORCH_CHECK(map.defined(), op, ": ", name, " is undefined");
  TORCH_CHECK(map.dim() == 3 && map.size(0) == feat.size(0) && map.size(1) == feat.size(2) &&
                  map.size(2) == feat.size(3),
              op, ": ", name, " must be [B, H, W] = [", feat.size(0), ", ", feat.size(2), ", ",
              feat.size(3), "] to match the feature ", feat.sizes(), ", got ", map.sizes());
  TORCH_CHECK(map.device() == feat.device(), op, ": ", name, " is on ", map.device(),
              " but the feature is on ", feat.device());
}

// Arguments of _adm_pool_backward(grad_pooled [B, C], feat [B, C, H, W], attn [B, H, W]).
inline void check_adm_pool_backward(const at::Tensor& grad_pooled, const at::Tensor& feat,
                                    const at::Tensor& attn) {
  constexpr const char* op = "_adm_pool_backward";
  check_floating(op, "feat", feat);
  TORCH_CHECK(feat.dim() == 4, op, ": feat must be [B, C, H, W], got shape ", feat.sizes());
  TORCH_CHECK(grad_pooled.dim() == 2 && grad_pooled.size(0) == feat.size(0) &&
                  grad_pooled.size(1) == feat.size(1),
              op, ": grad_pooled must be [B, C] = [", feat.size(0), ", ", feat.size(1),
              "], got ", grad_pooled.sizes());
  TORCH_CHECK(grad_pooled.device() == feat.device(), op, ": grad_pooled is on ",
              grad_pooled.device(), " but the feature is on ", feat.device());
  check_pixel_map(op, "attn", attn, feat);
}

// Arguments of _cosine_similarity_map_backward: the feature pair and four [B, H, W] maps.
inline void check_cosine_similarity_map_backward(const at::Tensor& grad, const at::Tensor& feat_s,
                                                 const at::Tensor& feat_t, const at::Tensor& sim,
                                                 const at::Tensor& norm_s,
                                                 const at::Tensor& norm_t) {
  constexpr const char* op = "_cosine_similarity_map_backward";
  check_feature_pair(op, feat_s, feat_t);
  check_pixel_map(op, "grad", grad, feat_s);
  check_pixel_map(op, "sim", sim, feat_s);
  check_pixel_map(op, "norm_s", norm_s, feat_s);
  check_pixel_map(op, "norm_t", norm_t, feat_s);
}

// Memory layouts the kernels read without a copy.
enum class Layout { kNCHW, kNHWC };

// Returns a tensor the kernels can read directly (contiguous or channels_last) and its layout.
// Other strides (slices, transposes) are copied once into the contiguous layout.
inline std::pair<at::Tensor, Layout> dense_feature(const at::Tensor& feat) {
  if (feat.is_contiguous()) return {feat, Layout::kNCHW};
  if (feat.is_contiguous(at::MemoryFormat::ChannelsLast)) return {feat, Layout::kNHWC};
  return {feat.contiguous(), Layout::kNCHW};
}

// The second tensor of a pair in the first one's layout (a copy only when they differ).
inline at::Tensor in_layout(const at::Tensor& feat, Layout layout) {
  return layout == Layout::kNHWC ? feat.contiguous(at::MemoryFormat::ChannelsLast)
                                 : feat.contiguous();
}

// The outputs of adm_pool for a dense feature s: pooled_s, pooled_t [B, C] in s's dtype and the
// attention maps [B, H, W] in its accumulation type. With C = 0 every pixel's vectors are zero,
// S = 0, so the results are complete already: zero pools and maps of 1 / (1 + eps).
inline std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> adm_pool_outputs(
    const at::Tensor& s, double eps) {
  const int64_t B = s.size(0), C = s.size(1), H = s.size(2), W = s.size(3);
  const auto acc_options = s.options().dtype(at::toOpMathType(s.scalar_type()));
  at::Tensor pooled_s = at::empty({B, C}, s.options());
  at::Tensor pooled_t = at::empty({B, C}, s.options());
  at::Tensor attn_co = at::empty({B, H, W}, acc_options);
  at::Tensor attn_di = at::empty({B, H, W}, acc_options);
  if (C == 0) {
    pooled_s.zero_();
    pooled_t.zero_();
    attn_co.fill_(1.0 / (1.0 + eps));
    attn_di.fill_(1.0 / (1.0 + eps));
  }
  return {pooled_s, pooled_t, attn_co, attn_di};
}

}  // namespace kdengine
