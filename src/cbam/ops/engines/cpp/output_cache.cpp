// Outputs of the fused CBAM passes (out, dx) in memory blocks that are kept for reuse when freed.
// A fresh allocation of tens of MB comes from mmap: the kernel zeroes every 4 KB page on first touch,
// which costs more than the pass that fills it. Freed blocks wait here, by exact size, up to a limit
// of cached bytes (a block beyond it goes back to the system); empty_output_cache() returns them all.
#include <ATen/EmptyTensor.h>
#include <ATen/core/Tensor.h>
#include <c10/core/Allocator.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <unordered_map>
#include <vector>

namespace output_cache {

struct Block {
  void* data;
  size_t bytes;
};

class Cache final : public c10::Allocator {
 public:
  at::DataPtr allocate(size_t bytes) override {
    Block* block = take(bytes);
    if (block == nullptr) {
      void* data = nullptr;
      if (posix_memalign(&data, 64, std::max<size_t>(bytes, 64)) != 0) throw std::bad_alloc();
      block = new Block{data, bytes};
    }
    return {block->data, block, &give, at::Device(at::kCPU)};
  }

  void copy_data(void* dest, const void* src, std::size_t count) const override { std::memcpy(dest, src, count); }

  void set_limit(size_t bytes) {
    std::lock_guard<std::mutex> hold(lock_);
    limit_ = bytes;
    trim();
  }

  size_t cached() {
    std::lock_guard<std::mutex> hold(lock_);
    return cached_;
  }

  static Cache& instance() {
    static Cache* cache = new Cache();  // never destroyed: tensors may be freed during interpreter exit
    return *cache;
  }

 private:
  Block* take(size_t bytes) {
    std::lock_guard<std::mutex> hold(lock_);
    auto found = free_.find(bytes);
    if (found == free_.end() || found->second.empty()) return nullptr;
    Block* block = found->second.back();
    found->second.pop_back();
    cached_ -= bytes;
    return block;
  }

  static void give(void* context) {
    Block* block = static_cast<Block*>(context);
    Cache& cache = instance();
    std::lock_guard<std::mutex> hold(cache.lock_);
    if (cache.cached_ + block->bytes > cache.limit_) {
      release(block);
      return;
    }
    cache.free_[block->bytes].push_back(block);
    cache.cached_ += block->bytes;
  }

  static void release(Block* block) {
    std::free(block->data);
    delete block;
  }

  void trim() {  // with lock_ held: drop blocks until the cached bytes fit the limit
    for (auto& [bytes, blocks] : free_) {
      while (cached_ > limit_ && !blocks.empty()) {
        release(blocks.back());
        blocks.pop_back();
        cached_ -= bytes;
      }
    }
  }

  std::mutex lock_;
  std::unordered_map<size_t, std::vector<Block*>> free_;
  size_t cached_ = 0;
  size_t limit_ = size_t(256) << 20;  // replaced by CBAM_OUTPUT_CACHE_MB when the extension loads
};

// A CPU tensor shaped, typed and laid out like x (contiguous, or with x's strides where x, a pass's
// input, is not: channels-last), in a cached block.
at::Tensor empty_like(const at::Tensor& x) {
  const auto keys = c10::DispatchKeySet(c10::DispatchKey::CPU);
  if (x.is_contiguous())
    return at::detail::empty_generic(x.sizes(), &Cache::instance(), keys, x.scalar_type(), at::MemoryFormat::Contiguous);
  return at::detail::empty_strided_generic(x.sizes(), x.strides(), &Cache::instance(), keys, x.scalar_type());
}

void set_limit(size_t bytes) { Cache::instance().set_limit(bytes); }

size_t cached() { return Cache::instance().cached(); }

}  // namespace output_cache
