// Schemas of the detached feature MSE: mean((feat_s - feat_t)^2), no gradient into feat_t.
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(kdengine, m) {
  m.def("feature_mse(Tensor feat_s, Tensor feat_t) -> Tensor");
  // grad_s = grad * 2 * (feat_s - feat_t) / numel, in feat_s's layout.
  m.def("_feature_mse_backward(Tensor grad, Tensor feat_s, Tensor feat_t) -> Tensor");
  // (mse, grad_s) with grad_s = grad_weight * 2 * (feat_s - feat_t) / numel: the forward that
  // also writes the gradient a backward with incoming gradient grad_weight would (CPU only).
  m.def("_feature_mse_and_grad(Tensor feat_s, Tensor feat_t, float grad_weight) -> (Tensor, Tensor)");
}
