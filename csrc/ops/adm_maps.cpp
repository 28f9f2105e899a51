// Schema of the dense ADM attention maps (the paper's Eq. 7-8 with the means over valid pixels).
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(kdengine, m) {
  // Returns attn_co, attn_di [B, H, W] in fp32 (float64 for float64 input); no gradient.
  //   S = cos(feat_s, feat_t) over channels (eps 1e-8), mean_v = mean of S over valid pixels
  //   (0 when an image has none), attn_co = (1 + S) / (1 + mean_v + eps),
  //   attn_di = (1 - S) / ((1 - mean_v) + eps).
  m.def("adm_maps(Tensor feat_s, Tensor feat_t, Tensor? valid=None, float eps=1e-05) -> (Tensor, Tensor)");
}
