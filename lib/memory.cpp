#include "blpa/memory.h"

#include <c10/core/CPUAllocator.h>
#include <c10/util/Exception.h>

#include <atomic>
#include <mutex>
#include <unordered_map>

#if BLPA_WITH_CUDA
#include "memory_stats.h"
#else
namespace blpa::cuda {  // a build without the CUDA library: every CUDA query is a clear error
[[noreturn]] inline int64_t unavailable() { TORCH_CHECK(false, "blpa was built without CUDA"); }
inline int64_t allocated_bytes(int) { unavailable(); }
inline int64_t peak_bytes(int) { unavailable(); }
inline void reset_peak_bytes(int) { unavailable(); }
inline void set_limit_bytes(int, int64_t) { unavailable(); }
inline void empty_cache() { unavailable(); }
}  // namespace blpa::cuda
#endif

namespace blpa::memory {
namespace {

// Wraps the CPU allocator and counts bytes. The data pointer stays its own context (some
// LibTorch code relies on that), so sizes are looked up in a side table on release.
class CountingAllocator final : public c10::Allocator {
 public:
  explicit CountingAllocator(c10::Allocator* base) : base_(base), base_free_(base->raw_deleter()) {
    TORCH_CHECK(base_free_ != nullptr, "blpa: the CPU allocator has no raw deleter; cannot count allocations");
  }

  c10::DataPtr allocate(size_t n) override {
    const int64_t limit = limit_.load();
    if (limit > 0 && current_.load() + static_cast<int64_t>(n) > limit)
      C10_THROW_ERROR(OutOfMemoryError, "blpa: CPU memory budget of " + std::to_string(limit) + " bytes exceeded");
    c10::DataPtr inner = base_->allocate(n);
    void* data = inner.get();
    const c10::Device device = inner.device();
    if (data == nullptr) return inner;
    TORCH_CHECK(inner.get_context() == data, "blpa: unexpected CPU allocation layout");
    inner.release_context();
    {
      std::lock_guard<std::mutex> lock(mutex_);
      sizes_[data] = static_cast<int64_t>(n);
    }
    add(static_cast<int64_t>(n));
    return {data, data, &release, device};
  }

  c10::DeleterFnPtr raw_deleter() const override { return &release; }

  void copy_data(void* dest, const void* src, std::size_t count) const override { default_copy_data(dest, src, count); }

  int64_t current() const { return current_.load(); }
  int64_t peak() const { return peak_.load(); }
  void reset_peak() { peak_.store(current_.load()); }
  void set_limit(int64_t bytes) { limit_.store(bytes); }

 private:
  static CountingAllocator* self;

  static void release(void* data) {
    if (data == nullptr) return;
    int64_t n = 0;
    {
      std::lock_guard<std::mutex> lock(self->mutex_);
      auto it = self->sizes_.find(data);
      if (it != self->sizes_.end()) {
        n = it->second;
        self->sizes_.erase(it);
      }
    }
    self->current_.fetch_sub(n);
    self->base_free_(data);
  }

  void add(int64_t n) {
    const int64_t now = current_.fetch_add(n) + n;
    int64_t p = peak_.load();
    while (now > p && !peak_.compare_exchange_weak(p, now)) {
    }
  }

  friend CountingAllocator* counter();
  c10::Allocator* base_;
  c10::DeleterFnPtr base_free_;
  std::mutex mutex_;
  std::unordered_map<void*, int64_t> sizes_;
  std::atomic<int64_t> current_{0}, peak_{0}, limit_{0};
};

CountingAllocator* CountingAllocator::self = nullptr;

CountingAllocator* counter() {
  static CountingAllocator* instance = [] {
    auto* a = new CountingAllocator(c10::GetCPUAllocator());  // lives for the process
    CountingAllocator::self = a;
    c10::SetCPUAllocator(a, /*priority=*/100);
    return a;
  }();
  return instance;
}

}  // namespace

void install_cpu_counter() { counter(); }

int64_t allocated(const c10::Device& device) {
  return device.is_cuda() ? cuda::allocated_bytes(device.index()) : counter()->current();
}

int64_t peak(const c10::Device& device) {
  return device.is_cuda() ? cuda::peak_bytes(device.index()) : counter()->peak();
}

void reset_peak(const c10::Device& device) {
  if (device.is_cuda())
    cuda::reset_peak_bytes(device.index());
  else
    counter()->reset_peak();
}

void set_limit(const c10::Device& device, int64_t bytes) {
  if (device.is_cuda())
    cuda::set_limit_bytes(device.index(), bytes);
  else
    counter()->set_limit(bytes);
}

void release_cached(const c10::Device& device) {
  if (device.is_cuda()) cuda::empty_cache();
}

}  // namespace blpa::memory
