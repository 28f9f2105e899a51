// Schemas of ADM's class-region pooling for dense prediction and its backward.
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(kdengine, m) {
  // pooled [B, K, C] (feat's dtype) = sum over the pixels of class k of attn * relu(feat),
  // divided by count [B, K] (int64, the class's pixels; pooled is 0 where it is 0). A pixel is
  // pooled when 0 <= label < num_classes and label != ignore_index.
  m.def("adm_region_pool(Tensor feat, Tensor attn, Tensor labels, int num_classes, int ignore_index=255) -> (Tensor, Tensor)");
  // grad_feat[b,c,p] = grad_pooled[b,k,c] / count[b,k] * attn[b,p] * (feat[b,c,p] > 0) at the
  // pooled pixels p of class k, 0 elsewhere.
  m.def("_adm_region_pool_backward(Tensor grad_pooled, Tensor feat, Tensor attn, Tensor labels, Tensor count, int ignore_index) -> Tensor");
}
