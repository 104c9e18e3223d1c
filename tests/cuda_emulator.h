// A CUDA emulator for the codec's kernels (cuda/codec_kernels.cuh), so that their walks over
// a tensor run in the tests on any machine: the same source, compiled by g++, every thread of
// a grid run on the CPU. Blocks run one after another; the threads of a block are fibers on
// one OS thread that switch only at __syncthreads and the warp shuffles, so a block's shared
// memory can be a static array and a barrier needs no atomics.
//
// What it checks that the GPU would enforce: every vector access (load/store) is aligned to
// its size, a shuffle's mask names only live lanes of the warp, and no block deadlocks at a
// barrier (each reported as an exception from the launch). What it cannot check: the device
// compiler's code (the math functions under __CUDA_ARCH__ in codec_math.h, --fmad=false),
// memory ordering between threads other than at barriers, and speed.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <functional>
#include <stdexcept>
#include <string>

// The CUDA built-ins the kernels use, in the namespace where the emulated kernels live (so
// that they never meet CUDA's own in another translation unit of the same program).
namespace blpa::emulated {

struct uint3 {
  unsigned x = 0, y = 0, z = 0;
};
struct dim3 {
  dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
  unsigned x, y, z;
};
struct alignas(8) float2 {
  float x, y;
};
struct alignas(16) float4 {
  float x, y, z, w;
};
struct alignas(8) uint2 {
  unsigned x, y;
};
inline float2 make_float2(float x, float y) { return {x, y}; }
inline float4 make_float4(float x, float y, float z, float w) { return {x, y, z, w}; }

// The running thread's coordinates, set by the emulator before it resumes a thread.
inline uint3 threadIdx, blockIdx;
inline dim3 blockDim, gridDim;

inline float __fdiv_rn(float a, float b) { return a / b; }  // IEEE division, as the device's
inline float __fmul_rn(float a, float b) { return a * b; }
inline unsigned __umulhi(unsigned a, unsigned b) { return static_cast<unsigned>((uint64_t{a} * b) >> 32); }
// Byte k of the result is byte (s >> 4k) & 7 of y:x (x's four bytes first).
inline unsigned __byte_perm(unsigned x, unsigned y, unsigned s) {
  const uint64_t xy = (uint64_t{y} << 32) | x;
  unsigned out = 0;
  for (int k = 0; k < 4; ++k) out |= static_cast<unsigned>((xy >> (8 * ((s >> (4 * k)) & 7))) & 0xFF) << (8 * k);
  return out;
}
template <typename T>
T min(T a, T b) {
  return b < a ? b : a;
}

// The multiprocessors the launch configuration sees (grid_cap): few, so that the kernels'
// grid-stride loops take several turns even on small tensors.
inline int sm_count = 2;

// Runs body once for every thread of grid x block (threadIdx etc. set). Throws what a thread
// threw, or std::runtime_error for a deadlock or a bad shuffle.
void run(dim3 grid, dim3 block, const std::function<void()>& body);
// __syncthreads: waits for the live threads of the running block.
void sync_threads();
// __shfl_down_sync on 8 bytes: lane l gets lane l + delta's value (its own past lane 31).
uint64_t shuffle_down(uint64_t value, unsigned delta, unsigned mask);
// Throws unless p is aligned to `bytes` (a misaligned vector access faults on the GPU).
void check_aligned(const void* p, size_t bytes, const char* what);
// What the emulator has run so far: launches, and threads over all of them.
struct Counters {
  int64_t launches = 0, threads = 0;
};
Counters counters();

// The kernel target of codec_kernels.cuh (BLPA_KERNEL_TARGET).
namespace target {
using Stream = int;
inline int sm_count(int) { return emulated::sm_count; }
inline Stream current_stream(int) { return 0; }
struct DeviceGuard {
  explicit DeviceGuard(int) {}
};
inline void launch_check() {}
template <typename V>
V load(const void* p) {
  check_aligned(p, alignof(V), "load");
  V v;
  std::memcpy(static_cast<void*>(&v), p, sizeof v);
  return v;
}
template <typename V>
void store(void* p, const V& v) {
  check_aligned(p, alignof(V), "store");
  std::memcpy(p, static_cast<const void*>(&v), sizeof v);
}
}  // namespace target

// BLPA_LAUNCH(grid, block, stream, kernel)(args...): the kernel on every thread, args copied
// as a launch copies them.
template <typename... Params>
auto launch(dim3 grid, dim3 block, target::Stream, void (*kernel)(Params...)) {
  return [=](auto... args) { run(grid, block, [&] { kernel(args...); }); };
}

inline void __syncthreads() { sync_threads(); }

template <typename T>
T __shfl_down_sync(unsigned mask, T value, unsigned delta) {
  static_assert(sizeof(T) <= 8, "the emulator shuffles up to 8 bytes");
  uint64_t bits = 0;
  std::memcpy(&bits, &value, sizeof value);
  bits = shuffle_down(bits, delta, mask);
  std::memcpy(&value, &bits, sizeof value);
  return value;
}

}  // namespace blpa::emulated

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static  // one block runs at a time, on one OS thread

#define BLPA_KERNELS_NAMESPACE blpa::emulated
#define BLPA_KERNEL_TARGET ::blpa::emulated::target
#define BLPA_LAUNCH(grid, block, stream, ...) ::blpa::emulated::launch(grid, block, stream, __VA_ARGS__)
