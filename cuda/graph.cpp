#include "graph.h"

#include <ATen/cuda/CUDAEvent.h>
#include <ATen/cuda/CUDAGraph.h>
#include <c10/cuda/CUDACachingAllocator.h>
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

int64_t reserved(c10::DeviceIndex d) {
  const auto& s = c10::cuda::CUDACachingAllocator::getDeviceStats(d).reserved_bytes;
  return s[static_cast<size_t>(c10::CachingAllocator::StatType::AGGREGATE)].current;
}

// `later` runs what is queued next only after what `first` has queued so far.
void follow(const c10::cuda::CUDAStream& later, const c10::cuda::CUDAStream& first) {
  at::cuda::CUDAEvent done;
  done.record(first);
  done.block(later);
}

}  // namespace

void Graph::capture(const std::function<void()>& body) {
  const auto device = c10::cuda::current_device();
  auto main = c10::cuda::getCurrentCUDAStream(device);
  // Capture needs a stream other than the legacy default one; it starts after the work
  // already queued on the main stream, and the main stream continues after it.
  auto side = c10::cuda::getStreamFromPool(/*isHighPriority=*/false, device);
  follow(side, main);
  const int64_t before = reserved(device);
  auto graph = std::make_unique<at::cuda::CUDAGraph>();
  std::string failure;
  {
    c10::cuda::CUDAStreamGuard guard(side);
    try {
      graph->capture_begin();
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
  }
  if (!failure.empty()) {
    follow(main, side);
    throw std::runtime_error(failure.substr(0, failure.find('\n')));
  }
  follow(main, side);
  impl_->pool_bytes = reserved(device) - before;
  impl_->graph = std::move(graph);
}

void Graph::replay() {
  if (!impl_->graph) throw std::logic_error("blpa::cuda::Graph::replay before a successful capture");
  impl_->graph->replay();
}

bool Graph::captured() const { return impl_->graph != nullptr; }

int64_t Graph::pool_bytes() const { return impl_->pool_bytes; }

}  // namespace blpa::cuda
