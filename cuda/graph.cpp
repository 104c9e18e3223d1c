#include "graph.h"

#include "memory_stats.h"

#include <ATen/core/CachingHostAllocator.h>
#include <ATen/cuda/CUDAEvent.h>
#include <ATen/cuda/CUDAGraph.h>
#include <c10/cuda/CUDACachingAllocator.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <stdexcept>
#include <string>

namespace blpa::cuda {

struct Graph::Impl {
  std::unique_ptr<at::cuda::CUDAGraph> graph;
  int64_t pool_bytes = 0;
};

Graph::Graph() : impl_(std::make_unique<Impl>()) {}
Graph::~Graph() = default;

namespace {

// `later` runs what is queued next only after what `first` has queued so far.
void follow(const c10::cuda::CUDAStream& later, const c10::cuda::CUDAStream& first) {
  at::cuda::CUDAEvent done;
  done.record(first);
  done.block(later);
}

// The pinned-memory allocator's routing to the graph's pool, in the PyTorch releases that
// have it (detected here; the others have nothing to undo).
template <typename HostAllocator, typename Pool>
void abandon_host(HostAllocator* host, Pool pool) {
  if constexpr (requires(HostAllocator* a, Pool p) {
                  a->end_allocate_to_pool(p);
                  a->release_pool(p);
                }) {
    try {
      host->end_allocate_to_pool(pool);
    } catch (const std::exception&) {
    }
    try {
      host->release_pool(pool);
    } catch (const std::exception&) {
    }
  }
}

// After a capture that failed: the allocators stop routing the capturing stream's
// allocations to the graph's pool, and the pool is released. The PyTorch releases before 2.12
// skip all of it when cudaStreamEndCapture fails (a capture that a synchronisation
// invalidated): then the device allocator's routing is still on, and this undoes the rest
// too. Later ones end the routing themselves, and some release the pool; getPoolUseCount
// says whether that is still to do.
void abandon(c10::DeviceIndex device, decltype(at::cuda::graph_pool_handle()) pool) {
  bool routed = false;
  try {
    c10::cuda::CUDACachingAllocator::endAllocateToPool(device, pool);
    routed = true;
  } catch (const std::exception&) {  // routing had ended
  }
  if (routed) abandon_host(at::getHostAllocator(at::kCUDA), pool);
  try {
    if (c10::cuda::CUDACachingAllocator::getPoolUseCount(device, pool) > 0)
      c10::cuda::CUDACachingAllocator::releasePool(device, pool);
  } catch (const std::exception&) {
  }
  (void)cudaGetLastError();  // the invalidated capture's error is not the next launch's
}

}  // namespace

void Graph::capture(int device_index, const std::function<void()>& body) {
  const auto device = static_cast<c10::DeviceIndex>(device_index);
  const c10::cuda::CUDAGuard device_guard(device);
  auto main = c10::cuda::getCurrentCUDAStream(device);
  // As torch.cuda.graph does: the eager blocks cached so far cannot serve the capture (its
  // allocations come from the graph's own pool), so they go back to the device first.
  c10::cuda::device_synchronize();
  c10::cuda::CUDACachingAllocator::emptyCache();
  // Capture needs a stream other than the legacy default one; it starts after the work
  // already queued on the main stream, and the main stream continues after it.
  auto side = c10::cuda::getStreamFromPool(/*isHighPriority=*/false, device);
  follow(side, main);
  const int64_t before = reserved_bytes(device);
  auto graph = std::make_unique<at::cuda::CUDAGraph>();
  const auto pool = at::cuda::graph_pool_handle();
  std::string failure;
  {
    c10::cuda::CUDAStreamGuard guard(side);
    try {
      // Thread-local mode: only this thread may not call what capture forbids. Global mode
      // would also fail the capture when a loader thread allocates pinned memory meanwhile
      // (cudaHostAlloc); the backward's kernels, launched by autograd's device thread on
      // this stream, are captured either way.
      graph->capture_begin(pool, cudaStreamCaptureModeThreadLocal);
      try {
        body();
      } catch (...) {
        // End the capture so that the stream is usable again; its own error is secondary.
        try {
          graph->capture_end();
        } catch (...) {
        }
        throw;
      }
      graph->capture_end();
    } catch (const c10::Error& e) {
      failure = e.what_without_backtrace();
    } catch (const std::exception& e) {
      failure = e.what();
    }
    if (!failure.empty()) {
      graph.reset();  // its reset() first: it releases the pool when its capture ended
      abandon(device, pool);
    }
  }
  follow(main, side);
  if (!failure.empty()) throw std::runtime_error(failure.substr(0, failure.find('\n')));
  impl_->pool_bytes = reserved_bytes(device) - before;
  impl_->graph = std::move(graph);
}

void Graph::replay() {
  if (!impl_->graph) throw std::logic_error("blpa::cuda::Graph::replay before a successful capture");
  impl_->graph->replay();
}

bool Graph::captured() const { return impl_->graph != nullptr; }

int64_t Graph::pool_bytes() const { return impl_->pool_bytes; }

}  // namespace blpa::cuda
