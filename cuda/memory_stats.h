// The CUDA caching allocator's statistics, behind a header without CUDA or torch includes.
#pragma once

#include <cstdint>

namespace blpa::cuda {

// device: an index, or -1 for the current device.
int64_t allocated_bytes(int device);
int64_t peak_bytes(int device);
// What the caching allocator holds from the device, in use or cached (its pools included).
int64_t reserved_bytes(int device);
void reset_peak_bytes(int device);
// Caps the caching allocator at `bytes` of the device (0: no cap).
void set_limit_bytes(int device, int64_t bytes);
void empty_cache();

}  // namespace blpa::cuda
