// Schemas of the per-pixel cosine similarity map S[b,h,w] = cos(feat_s[b,:,h,w], feat_t[b,:,h,w]).
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(kdengine, m) {
  // Returns sim [B, H, W] in the input dtype and the unclamped channel norms norm_s, norm_t
  // [B, H, W] in fp32 (float64 for float64 input), saved for backward.
  m.def("cosine_similarity_map(Tensor feat_s, Tensor feat_t, float eps=1e-08) -> (Tensor, Tensor, Tensor)");
  m.def("_cosine_similarity_map_backward(Tensor grad, Tensor feat_s, Tensor feat_t, Tensor sim, "
        "Tensor norm_s, Tensor norm_t, float eps) -> (Tensor, Tensor)");
}
