// Schemas of ADM's fused similarity + weighted pooling (Eq. 6-8) and its backward.
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(kdengine, m) {
  // Returns pooled_s, pooled_t [B, C] in the input dtype and the attention maps
  // attn_co, attn_di [B, H, W] in fp32 (float64 for float64 input), saved for backward.
  m.def("adm_pool(Tensor feat_s, Tensor feat_t, float eps=1e-05) -> (Tensor, Tensor, Tensor, Tensor)");
  // grad_feat[b,c,h,w] = grad_pooled[b,c] * attn[b,h,w] / (H*W) * (feat[b,c,h,w] > 0)
  m.def("_adm_pool_backward(Tensor grad_pooled, Tensor feat, Tensor attn) -> Tensor");
}
