#include "memory_stats.h"

#include <c10/cuda/CUDACachingAllocator.h>

namespace blpa::cuda {
namespace {

const c10::CachingAllocator::Stat& all_pools(const c10::CachingAllocator::StatArray& a) {
  return a[static_cast<size_t>(c10::CachingAllocator::StatType::AGGREGATE)];
}

}  // namespace

int64_t allocated_bytes(int device) {
  return all_pools(c10::cuda::CUDACachingAllocator::getDeviceStats(device).allocated_bytes).current;
}

int64_t peak_bytes(int device) {
  return all_pools(c10::cuda::CUDACachingAllocator::getDeviceStats(device).allocated_bytes).peak;
}

void reset_peak_bytes(int device) { c10::cuda::CUDACachingAllocator::resetPeakStats(device); }

}  // namespace blpa::cuda
