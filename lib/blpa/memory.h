// Allocation-level memory measurement: bytes currently allocated and the peak, for the CPU
// (a counting wrapper around LibTorch's CPU allocator, which leaves out what the data
// loader's worker threads allocate) and CUDA (the caching allocator's own statistics). Used
// to measure what autograd keeps, never to estimate it.
#pragma once

#include <c10/core/Device.h>

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

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

// Where a step's memory peaks. Code that runs a named part of a step (a unit's forward or
// backward, the stem) opens a Scope for its duration. While a PeakRecorder exists, each scope's
// own peak (the most bytes allocated at any moment inside it, nested scopes included) is
// logged when it closes; otherwise a Scope costs one atomic load. Scopes nest; the innermost
// open one is charged. The recorder resets the allocator's peak at every scope boundary, so
// while it records, read the step's peak from it, not from peak().
class Scope {
 public:
  Scope(const std::string& name, const char* phase);  // logged as "name phase"
  ~Scope();
  Scope(const Scope&) = delete;
  Scope& operator=(const Scope&) = delete;

 private:
  bool open_ = false;
};

struct ScopePeak {
  std::string name;  // "block3.u2 backward"
  int64_t peak = 0;  // bytes allocated at the scope's highest point
  int depth = 0;     // how many scopes were open around it
};

struct Recording;

class PeakRecorder {
 public:
  explicit PeakRecorder(const c10::Device& device);  // one at a time; starts from the current allocation
  ~PeakRecorder();
  PeakRecorder(const PeakRecorder&) = delete;
  PeakRecorder& operator=(const PeakRecorder&) = delete;
  // Every closed scope, in the order they closed.
  std::vector<ScopePeak> scopes() const;
  // The highest allocation since construction, inside scopes or not.
  int64_t peak() const;
  // The innermost scope open at that moment ("" if none was).
  std::string peak_scope() const;

 private:
  std::unique_ptr<Recording> r_;
};

}  // namespace blpa::memory
