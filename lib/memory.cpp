#include "blpa/memory.h"

#include <c10/core/CPUAllocator.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <atomic>
#include <mutex>
#include <unordered_map>
#include <utility>

#include "blpa/loader.h"  // on_loader_thread

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
    // The data loader's batches, made beside the step, are not the step's: counted, a step's
    // stored bytes took in one batch or none as the workers happened to run.
    const bool counted = !data::on_loader_thread();
    const int64_t limit = limit_.load();
    if (counted && limit > 0 && current_.load() + static_cast<int64_t>(n) > limit)
      C10_THROW_ERROR(OutOfMemoryError, "blpa: CPU memory budget of " + std::to_string(limit) + " bytes exceeded");
    c10::DataPtr inner = base_->allocate(n);
    void* data = inner.get();
    const c10::Device device = inner.device();
    if (data == nullptr) return inner;
    TORCH_CHECK(inner.get_context() == data, "blpa: unexpected CPU allocation layout");
    inner.release_context();
    {
      std::lock_guard<std::mutex> lock(mutex_);
      sizes_[data] = counted ? static_cast<int64_t>(n) : 0;
    }
    if (counted) add(static_cast<int64_t>(n));
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

// The scopes' log. Each open scope starts from a fresh allocator peak; when it closes, the
// allocator's peak is its own, and is folded into the scope around it. The overall peak is
// charged to the innermost scope that reached it (a scope reaching only its child's peak
// leaves the charge with the child).
struct Recording {
  struct Frame {
    std::string name;
    int64_t max;
  };
  explicit Recording(const c10::Device& d) : device(d) {}
  void charge(int64_t bytes, const std::string& name) {
    if (bytes > best) best = bytes, best_scope = name;
  }
  c10::Device device;
  std::mutex mutex;
  std::vector<Frame> open;
  std::vector<ScopePeak> closed;
  int64_t best = 0;
  std::string best_scope;
};

namespace {
std::atomic<Recording*> active_recording{nullptr};
}  // namespace

Scope::Scope(const std::string& name, const char* phase) {
  Recording* r = active_recording.load(std::memory_order_acquire);
  if (r == nullptr) return;
  std::lock_guard<std::mutex> lock(r->mutex);
  const int64_t p = peak(r->device);
  if (r->open.empty())
    r->charge(p, "");
  else
    r->open.back().max = std::max(r->open.back().max, p);
  reset_peak(r->device);
  r->open.push_back({name + " " + phase, allocated(r->device)});
  open_ = true;
}

Scope::~Scope() {
  Recording* r = open_ ? active_recording.load(std::memory_order_acquire) : nullptr;
  if (r == nullptr) return;
  std::lock_guard<std::mutex> lock(r->mutex);
  if (r->open.empty()) return;  // opened under an earlier recorder
  Recording::Frame f = std::move(r->open.back());
  r->open.pop_back();
  f.max = std::max(f.max, peak(r->device));
  r->charge(f.max, f.name);
  if (!r->open.empty()) r->open.back().max = std::max(r->open.back().max, f.max);
  r->closed.push_back({std::move(f.name), f.max, static_cast<int>(r->open.size())});
}

PeakRecorder::PeakRecorder(const c10::Device& device) : r_(std::make_unique<Recording>(device)) {
  Recording* none = nullptr;
  TORCH_CHECK(active_recording.compare_exchange_strong(none, r_.get()), "blpa: only one PeakRecorder at a time");
  std::lock_guard<std::mutex> lock(r_->mutex);
  reset_peak(device);
  r_->best = allocated(device);
}

PeakRecorder::~PeakRecorder() { active_recording.store(nullptr, std::memory_order_release); }

std::vector<ScopePeak> PeakRecorder::scopes() const {
  std::lock_guard<std::mutex> lock(r_->mutex);
  return r_->closed;
}

int64_t PeakRecorder::peak() const {
  std::lock_guard<std::mutex> lock(r_->mutex);
  return std::max(r_->best, memory::peak(r_->device));
}

std::string PeakRecorder::peak_scope() const {
  std::lock_guard<std::mutex> lock(r_->mutex);
  if (memory::peak(r_->device) > r_->best) return r_->open.empty() ? "" : r_->open.back().name;
  return r_->best_scope;
}

}  // namespace blpa::memory
