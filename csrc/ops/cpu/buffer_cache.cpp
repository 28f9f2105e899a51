#include "buffer_cache.h"

#include <ATen/ATen.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <cstdlib>
#include <map>
#include <mutex>
#include <string>

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace kdengine {
namespace cpu {
namespace {

constexpr size_t kMinCachedBytes = size_t(1) << 20;  // below this, malloc is cheap enough
constexpr size_t kAlignment = size_t(2) << 20;       // huge-page aligned

class BufferCache {
 public:
  static BufferCache& instance() {
    // Leaked on purpose: tensors may return blocks during interpreter shutdown.
    static BufferCache* cache = new BufferCache();
    return *cache;
  }

  void* acquire(size_t bytes) {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      auto it = free_.find(bytes);
      if (it != free_.end()) {
        void* block = it->second;
        free_.erase(it);
        cached_bytes_ -= bytes;
        return block;
      }
    }
    void* block = nullptr;
    const size_t rounded = (bytes + kAlignment - 1) / kAlignment * kAlignment;
    TORCH_CHECK(posix_memalign(&block, kAlignment, rounded) == 0 && block != nullptr,
                "kdengine: out of memory allocating a ", bytes, "-byte CPU buffer");
#if defined(__linux__) && defined(MADV_HUGEPAGE)
    madvise(block, rounded, MADV_HUGEPAGE);  // advice only: failure just means small pages
#endif
    return block;
  }

  void release(void* block, size_t bytes) {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      if (cached_bytes_ + bytes <= limit_bytes_) {
        free_.emplace(bytes, block);
        cached_bytes_ += bytes;
        return;
      }
    }
    std::free(block);
  }

  bool enabled() const { return limit_bytes_ > 0; }

  int64_t cached_bytes() {
    std::lock_guard<std::mutex> lock(mutex_);
    return static_cast<int64_t>(cached_bytes_);
  }

 private:
  BufferCache() {
    const char* env = std::getenv("KDENGINE_CPU_BUFFER_CACHE_MB");
    const long long mb = env ? std::atoll(env) : 1024;
    limit_bytes_ = mb > 0 ? static_cast<size_t>(mb) << 20 : 0;
  }

  std::mutex mutex_;
  std::multimap<size_t, void*> free_;
  size_t cached_bytes_ = 0;
  size_t limit_bytes_ = 0;
};

}  // namespace

at::Tensor empty_like_cached(const at::Tensor& like) {
  const size_t bytes = static_cast<size_t>(like.numel()) * like.element_size();
  BufferCache& cache = BufferCache::instance();
  if (bytes < kMinCachedBytes || !cache.enabled() || !like.is_non_overlapping_and_dense()) {
    return at::empty_like(like);
  }
  void* block = cache.acquire(bytes);
  // Strides of a dense tensor address exactly numel elements from the block's start.
  return at::from_blob(
      block, like.sizes(), like.strides(),
      [bytes](void* data) { BufferCache::instance().release(data, bytes); },
      like.options());
}

int64_t buffer_cache_bytes() { return BufferCache::instance().cached_bytes(); }

}  // namespace cpu
}  // namespace kdengine
