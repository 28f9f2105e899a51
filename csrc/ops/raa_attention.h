// Argument checks and input views of raa_attention, shared by its CPU and CUDA implementations.
// Messages name the op, the argument and the shapes, as checks.h does for the ADM ops.
#pragma once

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>

#include "checks.h"

namespace kdengine {

// What the kernels keep on chip per (batch, head): the whole key/value sequence.
constexpr int64_t kRaaMaxTokens = 256;
constexpr int64_t kRaaMaxHeadDim = 128;

struct RaaShape {
  int64_t B, N, D, heads, d;  // d = D / heads
  bool batch_pos;             // pos is [B, 1, D] (one vector per sample) rather than [N, D]
};

// q, k, v [B, N, D] of one dtype and device, pos [N, D] or [B, 1, D], heads | D, and the
// kernels' limits N <= 256, D / heads <= 128.
inline RaaShape check_raa_attention(const char* op, const at::Tensor& q, const at::Tensor& k,
                                    const at::Tensor& v, const at::Tensor& pos, int64_t heads) {
  check_floating(op, "q", q);
  check_floating(op, "k", k);
  check_floating(op, "v", v);
  check_floating(op, "pos", pos);
  TORCH_CHECK(q.dim() == 3, op, ": q must be [B, N, D], got shape ", q.sizes());
  const char* names[] = {"k", "v", "pos"};
  const at::Tensor* others[] = {&k, &v, &pos};
  for (int i = 0; i < 3; ++i) {
    TORCH_CHECK(others[i]->scalar_type() == q.scalar_type(), op, ": ", names[i],
                " must have q's dtype ", q.scalar_type(), ", got ", others[i]->scalar_type());
    TORCH_CHECK(others[i]->device() == q.device(), op, ": ", names[i], " is on ",
                others[i]->device(), " but q is on ", q.device());
  }
  TORCH_CHECK(k.sizes() == q.sizes(), op, ": k must have q's shape [B, N, D] = ", q.sizes(),
              ", got ", k.sizes());
  TORCH_CHECK(v.sizes() == q.sizes(), op, ": v must have q's shape [B, N, D] = ", q.sizes(),
              ", got ", v.sizes());
  RaaShape s{q.size(0), q.size(1), q.size(2), heads, 0, pos.dim() == 3};
  TORCH_CHECK(heads >= 1 && s.D >= heads && s.D % heads == 0, op, ": heads = ", heads,
              " must divide D = ", s.D, " (q's last dim, q ", q.sizes(), ") and be >= 1");
  s.d = s.D / heads;
  const bool token_pos = pos.dim() == 2 && pos.size(0) == s.N && pos.size(1) == s.D;
  const bool batch_pos =
      pos.dim() == 3 && pos.size(0) == s.B && pos.size(1) == 1 && pos.size(2) == s.D;
  TORCH_CHECK(token_pos || batch_pos, op, ": pos must be [N, D] = [", s.N, ", ", s.D,
              "] (token-indexed) or [B, 1, D] = [", s.B, ", 1, ", s.D,
              "] (batch-indexed) for q ", q.sizes(), ", got ", pos.sizes());
  TORCH_CHECK(s.N <= kRaaMaxTokens, op, ": q has N = ", s.N, " tokens (q ", q.sizes(),
              "); the kernels take at most ", kRaaMaxTokens);
  TORCH_CHECK(s.d <= kRaaMaxHeadDim, op, ": the head dim D / heads = ", s.D, " / ", heads, " = ",
              s.d, " exceeds the kernels' ", kRaaMaxHeadDim);
  return s;
}

// The backward's extra arguments: grad_out of q's shape, lse [B, heads, N] on q's device.
inline RaaShape check_raa_attention_backward(const at::Tensor& grad_out, const at::Tensor& q,
                                             const at::Tensor& k, const at::Tensor& v,
                                             const at::Tensor& pos, const at::Tensor& lse,
                                             int64_t heads) {
  constexpr const char* op = "_raa_attention_backward";
  const RaaShape s = check_raa_attention(op, q, k, v, pos, heads);
  check_floating(op, "grad_out", grad_out);
  TORCH_CHECK(grad_out.sizes() == q.sizes(), op, ": grad_out must have q's shape [B, N, D] = ",
              q.sizes(), ", got ", grad_out.sizes());
  TORCH_CHECK(grad_out.device() == q.device(), op, ": grad_out is on ", grad_out.device(),
              " but q is on ", q.device());
  check_floating(op, "lse", lse);
  TORCH_CHECK(lse.dim() == 3 && lse.size(0) == s.B && lse.size(1) == heads && lse.size(2) == s.N,
              op, ": lse must be [B, heads, N] = [", s.B, ", ", heads, ", ", s.N, "], got ",
              lse.sizes());
  TORCH_CHECK(lse.device() == q.device(), op, ": lse is on ", lse.device(), " but q is on ",
              q.device());
  return s;
}

// A [B, N, D] input as the kernels read it: rows of unit stride along D, any batch and token
// strides (k, v = projection.chunk(2, -1) are read in place); other strides are copied once.
inline at::Tensor raa_rows(const at::Tensor& t, at::ScalarType dtype) {
  const at::Tensor x = t.scalar_type() == dtype ? t : t.to(dtype);
  return x.stride(2) == 1 || x.size(2) == 1 ? x : x.contiguous();
}

}  // namespace kdengine
