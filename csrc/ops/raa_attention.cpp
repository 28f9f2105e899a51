// Schemas of PAT's region-aware attention (fused multi-head attention with a positional encoding
// added to queries and keys) and its backward.
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(kdengine, m) {
  // q, k, v [B, N, D]; pos [N, D] (token-indexed) or [B, 1, D] (batch-indexed, the authors'
  // code). Per head h of d = D / heads channels:
  //   out_h = softmax((q + pos)_h (k + pos)_h^T / sqrt(d)) v_h
  // Returns out [B, N, D] in the input dtype and the log-sum-exp of each score row,
  // lse [B, heads, N] in fp32 (float64 for float64 input), saved for backward.
  m.def("raa_attention(Tensor q, Tensor k, Tensor v, Tensor pos, int heads) -> (Tensor, Tensor)");
  // Gradients (grad_q, grad_k, grad_v, grad_pos) from the inputs and the saved lse: the
  // probabilities are recomputed, grad_pos = grad_q + grad_k summed over the batch ([N, D]) or
  // over the tokens ([B, 1, D]).
  m.def(
      "_raa_attention_backward(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor pos, "
      "Tensor lse, int heads) -> (Tensor, Tensor, Tensor, Tensor)");
}
