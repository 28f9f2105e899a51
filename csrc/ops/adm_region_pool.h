// Argument checks and outputs of adm_region_pool, shared by its CPU and CUDA implementations.
// Messages name the op, the argument and the shapes, as checks.h does for the other ops.
#pragma once

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>

#include <utility>

#include "checks.h"

namespace kdengine {

// Whether a pixel's label is pooled: one of the num_classes classes and not the ignore index.
// Every backend applies this same rule, so labels outside [0, num_classes) are skipped rather
// than checked (a check would need a host synchronisation on the GPU).
template <typename index_t>
inline bool pooled_label(index_t label, index_t num_classes, index_t ignore_index) {
  return label >= 0 && label < num_classes && label != ignore_index;
}

// feat [B, C, H, W] floating; attn [B, H, W] floating and labels [B, H, W] int64 on its device.
inline void check_region_inputs(const char* op, const at::Tensor& feat, const at::Tensor& attn,
                                const at::Tensor& labels) {
  check_floating(op, "feat", feat);
  TORCH_CHECK(feat.dim() == 4, op, ": feat must be [B, C, H, W], got shape ", feat.sizes());
  check_floating(op, "attn", attn);
  check_pixel_map(op, "attn", attn, feat);
  TORCH_CHECK(labels.defined(), op, ": labels is undefined");
  TORCH_CHECK(labels.scalar_type() == at::kLong, op, ": labels must be an int64 tensor, got ",
              labels.scalar_type());
  check_pixel_map(op, "labels", labels, feat);
}

inline void check_adm_region_pool(const at::Tensor& feat, const at::Tensor& attn,
                                  const at::Tensor& labels, int64_t num_classes) {
  constexpr const char* op = "adm_region_pool";
  check_region_inputs(op, feat, attn, labels);
  TORCH_CHECK(num_classes >= 1, op, ": num_classes must be at least 1, got ", num_classes);
}

// Arguments of _adm_region_pool_backward(grad_pooled [B, K, C], feat, attn, labels, count [B, K]).
inline void check_adm_region_pool_backward(const at::Tensor& grad_pooled, const at::Tensor& feat,
                                           const at::Tensor& attn, const at::Tensor& labels,
                                           const at::Tensor& count) {
  constexpr const char* op = "_adm_region_pool_backward";
  check_region_inputs(op, feat, attn, labels);
  TORCH_CHECK(grad_pooled.dim() == 3 && grad_pooled.size(0) == feat.size(0) &&
                  grad_pooled.size(2) == feat.size(1),
              op, ": grad_pooled must be [B, K, C] with B = ", feat.size(0), " and C = ",
              feat.size(1), ", got ", grad_pooled.sizes());
  TORCH_CHECK(grad_pooled.device() == feat.device(), op, ": grad_pooled is on ",
              grad_pooled.device(), " but the feature is on ", feat.device());
  TORCH_CHECK(count.dim() == 2 && count.size(0) == grad_pooled.size(0) &&
                  count.size(1) == grad_pooled.size(1),
              op, ": count must be [B, K] = [", grad_pooled.size(0), ", ", grad_pooled.size(1),
              "], got ", count.sizes());
  TORCH_CHECK(count.device() == feat.device(), op, ": count is on ", count.device(),
              " but the feature is on ", feat.device());
}

// pooled [B, K, C] in feat's dtype and count [B, K] int64, uninitialised.
inline std::pair<at::Tensor, at::Tensor> adm_region_pool_outputs(const at::Tensor& feat,
                                                                 int64_t num_classes) {
  const int64_t B = feat.size(0), C = feat.size(1);
  return {at::empty({B, num_classes, C}, feat.options()),
          at::empty({B, num_classes}, feat.options().dtype(at::kLong))};
}

// grad_pooled / count per (image, class, channel) in the accumulation type: what every pixel of
// that class receives before its attention weight and relu mask. Classes without pixels divide
// by 1 (no pixel reads them).
inline at::Tensor region_grad_scale(const at::Tensor& grad_pooled, const at::Tensor& count,
                                    at::ScalarType acc_type) {
  return (grad_pooled.to(acc_type) / count.clamp_min(1).to(acc_type).unsqueeze(-1)).contiguous();
}

}  // namespace kdengine
