// Large CPU output buffers (the gradients of whole feature maps) without page faults.
//
// A fresh 200 MB tensor costs more to fault in than the kernel takes to fill it: glibc maps every
// allocation above 32 MB anew, and the kernel zeroes it page by page on first touch. Training
// loops ask for the same sizes every step, so the CPU kernels take such buffers from a size-keyed
// cache of huge-page-advised blocks; a block returns to the cache when its tensor dies.
// KDENGINE_CPU_BUFFER_CACHE_MB bounds what the cache keeps (default 1024; 0 turns it off).
#pragma once

#include <ATen/core/Tensor.h>

namespace kdengine {
namespace cpu {

// An uninitialised tensor with the sizes, strides, dtype and device of `like` (a dense tensor).
at::Tensor empty_like_cached(const at::Tensor& like);

// Bytes the cache holds now (for tests and `kdengine info`).
int64_t buffer_cache_bytes();

}  // namespace cpu
}  // namespace kdengine
