// A CUDA graph of everything a function launches on the current device: captured once on a
// side stream, replayed on the current stream. Behind a header without CUDA or torch
// includes, like memory_stats.h.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>

namespace blpa::cuda {

class Graph {
 public:
  Graph();
  ~Graph();
  Graph(const Graph&) = delete;
  Graph& operator=(const Graph&) = delete;

  // Runs `body` once under stream capture on CUDA device `device` (thread-local mode: anything
  // this thread does that would synchronise with the host, or allocate outside the graph's
  // private pool, makes it fail). Frees the allocator's cached blocks first, as
  // torch.cuda.graph does. Throws std::runtime_error with the reason when capture fails; the
  // graph is then left empty, its pool released and the device usable.
  void capture(int device, const std::function<void()>& body);
  // Launches the captured work on the current stream; nothing is synchronised.
  void replay();
  bool captured() const;
  // The bytes the caching allocator reserved while capturing (the graph's private pool).
  int64_t pool_bytes() const;

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace blpa::cuda
