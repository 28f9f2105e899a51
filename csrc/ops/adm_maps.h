// Argument checks and outputs of adm_maps, shared by its CPU and CUDA implementations.
// Messages name the op, the argument and the shapes, as checks.h does for the other ops.
#pragma once

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>

#include <optional>
#include <utility>

#include "checks.h"

namespace kdengine {

// feat_s, feat_t [B, C, H, W] (same shape, dtype, device) and valid: absent, or a bool [B, H, W]
// map on their device.
inline void check_adm_maps(const at::Tensor& feat_s, const at::Tensor& feat_t,
                           const std::optional<at::Tensor>& valid) {
  constexpr const char* op = "adm_maps";
  check_feature_pair(op, feat_s, feat_t);
  if (valid.has_value() && valid->defined()) {
    TORCH_CHECK(valid->scalar_type() == at::kBool, op, ": valid must be a bool tensor, got ",
                valid->scalar_type());
    check_pixel_map(op, "valid", *valid, feat_s);
  }
}

// The valid map as the kernels read it (contiguous bool), or an undefined tensor for "all".
inline at::Tensor dense_valid(const std::optional<at::Tensor>& valid) {
  if (!valid.has_value() || !valid->defined()) return at::Tensor();
  return valid->contiguous();
}

// attn_co, attn_di [B, H, W] in the accumulation type of s (fp32, fp64 for fp64), uninitialised.
inline std::pair<at::Tensor, at::Tensor> adm_maps_outputs(const at::Tensor& s) {
  const auto options = s.options().dtype(at::toOpMathType(s.scalar_type()));
  const auto size = std::vector<int64_t>{s.size(0), s.size(2), s.size(3)};
  return {at::empty(size, options), at::empty(size, options)};
}

}  // namespace kdengine
