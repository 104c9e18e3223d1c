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

}  // namespace blpa::memory
