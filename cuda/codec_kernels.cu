// CUDA kernels of the codec. The element math is blpa/codec_math.h, shared with the CPU
// path; this file only decides how threads walk the tensor.
//
// Layout: each pack thread handles groups of 8 consecutive elements, grid-stride (unpack: 4).
//   8-bit: 8 codes = one 8-byte store     4-bit: 8 codes = one 4-byte store,
//   element 2j in the low nibble and 2j+1 in the high nibble of byte j.
// A thread owns whole bytes, so two codes that share a byte are written by one thread.
// Floats are loaded/stored as float4 when the pointer is 16-byte aligned; the last,
// partial group and misaligned tensors take the scalar path. Every per-element loop is
// unrolled over the whole group with a guard, so the small arrays stay in registers
// (a loop bounded by n put them in local memory: check `-Xptxas -v` for 0 bytes of stack).
#include "codec_kernels.h"

#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>

#include <algorithm>

#include "blpa/codec_math.h"

namespace blpa::cuda {
namespace {

constexpr int kGroup = 8;
constexpr int kThreads = 256;

struct Launch {
  int blocks;
  cudaStream_t stream;
};

// One helper for every launch: empty work returns early, the grid is capped (grid-stride
// loops cover the rest) and the stream is LibTorch's current one for the device.
Launch launch_config(int64_t work_items, int device) {
  static int sm_count[64] = {};
  if (device < 64 && sm_count[device] == 0)
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&sm_count[device], cudaDevAttrMultiProcessorCount, device));
  const int64_t cap = int64_t{device < 64 ? sm_count[device] : 132} * 16;
  const int64_t blocks = std::min<int64_t>((work_items + kThreads - 1) / kThreads, cap);
  return {static_cast<int>(std::max<int64_t>(blocks, 1)), c10::cuda::getCurrentCUDAStream(device).stream()};
}

__device__ __forceinline__ bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15) == 0; }

// Where a group of n elements starting at e0 lies: the channel of its first element, and
// whether all n share it (a group straddles two planes only at a plane's end). Below 2^32
// elements the index math is 32-bit: the GPU emulates 64-bit division in software, and with
// it the kernels were bound by integer instructions, not by memory.
struct Group {
  int64_t c0;
  bool one_channel;
};

__device__ __forceinline__ Group locate(int64_t e0, int n, int64_t plane, int64_t channels, bool narrow) {
  if (narrow) {
    const uint32_t e = static_cast<uint32_t>(e0), pl = static_cast<uint32_t>(plane);
    const uint32_t q = e / pl;
    return {static_cast<int64_t>(q % static_cast<uint32_t>(channels)), e - q * pl + n <= pl};
  }
  const int64_t q = e0 / plane;
  return {q % channels, e0 - q * plane + n <= plane};
}

__device__ __forceinline__ bool narrow_indices(int64_t numel) { return numel <= int64_t{0xFFFFFFF0}; }

// The channel of element e, for the rare groups that straddle two planes.
__device__ __forceinline__ int64_t channel_at(int64_t e, int64_t plane, int64_t channels) {
  return (e / plane) % channels;
}

// The offset of each of the G elements of a group.
template <int G>
__device__ __forceinline__ void group_offsets(const uint8_t* offsets, const Group& gr, int64_t e0, int64_t plane,
                                              int64_t channels, int s[G]) {
  if (gr.one_channel) {
    const int sc = offsets[gr.c0];
#pragma unroll
    for (int k = 0; k < G; ++k) s[k] = sc;
  } else {
#pragma unroll
    for (int k = 0; k < G; ++k) s[k] = offsets[channel_at(e0 + k, plane, channels)];
  }
}

__global__ void offsets_kernel(OffsetParams p) {
  for (int64_t c = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; c < p.channels;
       c += int64_t{gridDim.x} * blockDim.x)
    p.offsets[c] = static_cast<uint8_t>(codec::offset(p.b[c], p.bits));
}

template <int Bits>
__global__ void pack_kernel(PackParams p) {
  const int64_t groups = (p.numel + kGroup - 1) / kGroup;
  const bool vec = aligned16(p.v), narrow = narrow_indices(p.numel);
  for (int64_t g = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; g < groups; g += int64_t{gridDim.x} * blockDim.x) {
    const int64_t e0 = g * kGroup;
    const int n = static_cast<int>(min(int64_t{kGroup}, p.numel - e0));
    float x[kGroup];
    if (vec && n == kGroup) {
      const float4 a = reinterpret_cast<const float4*>(p.v + e0)[0];
      const float4 b = reinterpret_cast<const float4*>(p.v + e0)[1];
      x[0] = a.x, x[1] = a.y, x[2] = a.z, x[3] = a.w, x[4] = b.x, x[5] = b.y, x[6] = b.z, x[7] = b.w;
    } else {
#pragma unroll
      for (int k = 0; k < kGroup; ++k) x[k] = k < n ? p.v[e0 + k] : 0.0f;
    }
    const Group gr = locate(e0, n, p.plane, p.channels, narrow);
    int s[kGroup];
    group_offsets<kGroup>(p.offsets, gr, e0, p.plane, p.channels, s);
    if (p.divisor) {
#pragma unroll
      for (int k = 0; k < kGroup; ++k)
        x[k] = __fdiv_rn(x[k], p.divisor[gr.one_channel ? gr.c0 : channel_at(e0 + k, p.plane, p.channels)]);
    }
    uint32_t q[kGroup];
#pragma unroll
    for (int k = 0; k < kGroup; ++k) q[k] = codec::encode(x[k], s[k], Bits);

    if constexpr (Bits == 8) {
      uint8_t* out = p.codes + e0;
      if (n == kGroup) {
        uint2 w;
        w.x = q[0] | q[1] << 8 | q[2] << 16 | q[3] << 24;
        w.y = q[4] | q[5] << 8 | q[6] << 16 | q[7] << 24;
        *reinterpret_cast<uint2*>(out) = w;
      } else {
#pragma unroll
        for (int k = 0; k < kGroup; ++k)
          if (k < n) out[k] = static_cast<uint8_t>(q[k]);
      }
    } else {
      uint8_t* out = p.codes + e0 / 2;
      if (n == kGroup) {
        uint32_t w = 0;
#pragma unroll
        for (int k = 0; k < kGroup; ++k) w |= q[k] << (4 * k);
        *reinterpret_cast<uint32_t*>(out) = w;
      } else {
#pragma unroll
        for (int k = 0; k < kGroup; k += 2) {  // the padding nibble past an odd count is 0
          const uint32_t hi = k + 1 < n ? q[k + 1] : 0u;
          if (k < n) out[k / 2] = static_cast<uint8_t>(q[k] | hi << 4);
        }
      }
    }
  }
}

// Unpack writes up to three float tensors and reads one byte or less per element, so its
// stores decide its speed: a thread takes 4 elements, one float4, so that a warp's stores
// cover 512 contiguous bytes (with 8 per thread, each store instruction left every other
// 16 bytes out and unpack ran at half the copy bandwidth on an H200).
constexpr int kUnpackGroup = 4;

template <int Bits>
__global__ void unpack_kernel(UnpackParams p) {
  constexpr int G = kUnpackGroup;
  const int64_t groups = (p.numel + G - 1) / G;
  const bool vec = (!p.x_hat || aligned16(p.x_hat)) && (!p.r || aligned16(p.r)) && (!p.grad || aligned16(p.grad));
  const bool narrow = narrow_indices(p.numel);
  for (int64_t g = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; g < groups; g += int64_t{gridDim.x} * blockDim.x) {
    const int64_t e0 = g * G;
    const int n = static_cast<int>(min(int64_t{G}, p.numel - e0));
    uint32_t q[G];
    if constexpr (Bits == 8) {
      const uint8_t* in = p.codes + e0;
      if (n == G) {
        const uint32_t w = *reinterpret_cast<const uint32_t*>(in);
#pragma unroll
        for (int k = 0; k < G; ++k) q[k] = (w >> (8 * k)) & 0xFF;
      } else {
#pragma unroll
        for (int k = 0; k < G; ++k) q[k] = k < n ? in[k] : 0u;
      }
    } else {
      const uint8_t* in = p.codes + e0 / 2;
      if (n == G) {
        const uint32_t w = *reinterpret_cast<const uint16_t*>(in);
#pragma unroll
        for (int k = 0; k < G; ++k) q[k] = (w >> (4 * k)) & 0xF;
      } else {
#pragma unroll
        for (int k = 0; k < G; ++k) q[k] = k < n ? (in[k / 2] >> (4 * (k & 1))) & 0xF : 0u;
      }
    }
    const Group gr = locate(e0, n, p.plane, p.channels, narrow);
    int s[G];
    group_offsets<G>(p.offsets, gr, e0, p.plane, p.channels, s);
    const bool full = vec && n == G;

    auto store = [&](float* dst, const float y[G]) {
      if (full) {
        *reinterpret_cast<float4*>(dst + e0) = make_float4(y[0], y[1], y[2], y[3]);
      } else {
#pragma unroll
        for (int k = 0; k < G; ++k)
          if (k < n) dst[e0 + k] = y[k];
      }
    };
    // Channel parameters are looked up per element only when a group straddles two planes.
    auto channel_of = [&](int k) { return gr.one_channel ? gr.c0 : channel_at(e0 + k, p.plane, p.channels); };

    if (p.x_hat) {
      float y[G];
#pragma unroll
      for (int k = 0; k < G; ++k) y[k] = codec::decode(q[k], s[k], Bits) - p.b[channel_of(k)];
      store(p.x_hat, y);
    }
    if (p.r) {
      float y[G];
#pragma unroll
      for (int k = 0; k < G; ++k) {
        const float t = __fmul_rn(p.gamma[channel_of(k)], codec::decode(q[k], s[k], Bits));
        y[k] = t > 0.0f ? t : 0.0f;
      }
      store(p.r, y);
    }
    if (p.mask) {
#pragma unroll
      for (int k = 0; k < G; ++k)
        if (k < n) p.mask[e0 + k] = codec::mask(q[k], s[k]);
    }
    if (p.grad) {
      float y[G];
      if (full) {
        const float4 a = *reinterpret_cast<const float4*>(p.grad + e0);
        y[0] = a.x, y[1] = a.y, y[2] = a.z, y[3] = a.w;
      } else {
#pragma unroll
        for (int k = 0; k < G; ++k) y[k] = k < n ? p.grad[e0 + k] : 0.0f;
      }
#pragma unroll
      for (int k = 0; k < G; ++k) y[k] = codec::mask(q[k], s[k]) ? y[k] : 0.0f;
      store(p.grad, y);
    }
  }
}

}  // namespace

void compute_offsets(const OffsetParams& p) {
  if (p.channels == 0) return;
  const Launch l = launch_config(p.channels, p.device);
  offsets_kernel<<<l.blocks, kThreads, 0, l.stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void pack(const PackParams& p) {
  if (p.numel == 0) return;
  const Launch l = launch_config((p.numel + kGroup - 1) / kGroup, p.device);
  if (p.bits == 8)
    pack_kernel<8><<<l.blocks, kThreads, 0, l.stream>>>(p);
  else
    pack_kernel<4><<<l.blocks, kThreads, 0, l.stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void unpack(const UnpackParams& p) {
  if (p.numel == 0) return;
  const Launch l = launch_config((p.numel + kUnpackGroup - 1) / kUnpackGroup, p.device);
  if (p.bits == 8)
    unpack_kernel<8><<<l.blocks, kThreads, 0, l.stream>>>(p);
  else
    unpack_kernel<4><<<l.blocks, kThreads, 0, l.stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace blpa::cuda
