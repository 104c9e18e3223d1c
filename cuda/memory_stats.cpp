#include "memory_stats.h"

#include <ATen/Context.h>
#include <c10/cuda/CUDACachingAllocator.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAGuard.h>

#include <algorithm>

namespace blpa::cuda {
namespace {

const c10::CachingAllocator::Stat& all_pools(const c10::CachingAllocator::StatArray& a) {
  return a[static_cast<size_t>(c10::CachingAllocator::StatType::AGGREGATE)];
}

// torch::Device("cuda") has index -1: the current device. The caching allocator exists only
// once CUDA is initialised (the first CUDA tensor does it); a query may come before that.
c10::DeviceIndex resolve(int device) {
  at::globalContext().lazyInitDevice(c10::DeviceType::CUDA);
  return device >= 0 ? static_cast<c10::DeviceIndex>(device) : c10::cuda::current_device();
}

}  // namespace

int64_t allocated_bytes(int device) {
  return all_pools(c10::cuda::CUDACachingAllocator::getDeviceStats(resolve(device)).allocated_bytes).current;
}

int64_t peak_bytes(int device) {
  return all_pools(c10::cuda::CUDACachingAllocator::getDeviceStats(resolve(device)).allocated_bytes).peak;
}

int64_t reserved_bytes(int device) {
  return all_pools(c10::cuda::CUDACachingAllocator::getDeviceStats(resolve(device)).reserved_bytes).current;
}

void reset_peak_bytes(int device) { c10::cuda::CUDACachingAllocator::resetPeakStats(resolve(device)); }

void set_limit_bytes(int device, int64_t bytes) {
  size_t free = 0, total = 0;
  const c10::DeviceIndex d = resolve(device);
  c10::cuda::CUDAGuard guard(d);
  C10_CUDA_CHECK(cudaMemGetInfo(&free, &total));
  const double fraction = bytes > 0 ? std::min(1.0, static_cast<double>(bytes) / static_cast<double>(total)) : 1.0;
  c10::cuda::CUDACachingAllocator::setMemoryFraction(fraction, d);
}

void empty_cache() {
  resolve(-1);
  c10::cuda::CUDACachingAllocator::emptyCache();
}

}  // namespace blpa::cuda
