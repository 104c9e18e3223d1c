// Allocation-level memory measurement: bytes currently allocated and the peak, for the CPU
// (a counting wrapper around LibTorch's CPU allocator) and CUDA (the caching allocator's
// own statistics). Used to measure what autograd keeps, never to estimate it.
#pragma once

#include <c10/core/Device.h>

#include <cstdint>

namespace blpa::memory {

// Installs the counting CPU allocator (idempotent). Only allocations made after the first
// call are counted, so call it before building models and tensors.
void install_cpu_counter();

int64_t allocated(const c10::Device& device);
int64_t peak(const c10::Device& device);
void reset_peak(const c10::Device& device);

// A memory budget for real out-of-memory behaviour: beyond `bytes` allocated, allocations
// throw c10::OutOfMemoryError (CPU: by the counting allocator; CUDA: the caching
// allocator's memory fraction). 0 removes the limit.
void set_limit(const c10::Device& device, int64_t bytes);
// Returns cached but unused device memory to the driver (CUDA); nothing to do on the CPU.
void release_cached(const c10::Device& device);

}  // namespace blpa::memory
