// The codec's kernels (codec_kernels.cuh) built for the GPU: what a launch needs from the
// CUDA runtime and LibTorch. The tests build the same kernels for their CPU emulator.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <atomic>

namespace blpa::cuda::gpu {

using Stream = cudaStream_t;

int sm_count(int device) {
  static std::atomic<int> cache[64] = {};  // ranks may run as threads
  TORCH_CHECK(device >= 0, "blpa codec: no CUDA device index (", device, ")");
  int n = device < 64 ? cache[device].load(std::memory_order_relaxed) : 0;
  if (n == 0) {
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, device));
    if (device < 64) cache[device].store(n, std::memory_order_relaxed);
  }
  return n;
}

Stream current_stream(int device) { return c10::cuda::getCurrentCUDAStream(device).stream(); }

struct DeviceGuard {
  explicit DeviceGuard(int device) : guard(static_cast<c10::DeviceIndex>(device)) {}
  c10::cuda::CUDAGuard guard;
};

void launch_check() { C10_CUDA_KERNEL_LAUNCH_CHECK(); }

template <typename V>
__device__ __forceinline__ V load(const void* p) {
  return *static_cast<const V*>(p);
}

template <typename V>
__device__ __forceinline__ void store(void* p, const V& v) {
  *static_cast<V*>(p) = v;
}

}  // namespace blpa::cuda::gpu

#define BLPA_KERNELS_NAMESPACE blpa::cuda
#define BLPA_KERNEL_TARGET ::blpa::cuda::gpu
#define BLPA_LAUNCH(grid, block, stream, ...) __VA_ARGS__<<<grid, block, 0, stream>>>
#include "codec_kernels.cuh"

namespace blpa::cuda {

int multiprocessors(int device) { return gpu::sm_count(device); }

}  // namespace blpa::cuda
