// The codec's device kernels as a table of launchers (cuda/codec_kernels.h). lib/codec.cpp
// sends the work of CUDA tensors to CUDA's table. A test may send the work of CPU tensors to
// a table of its own: the tests' emulator runs the CUDA kernels' source on the CPU
// (tests/cuda_emulator.h), so that the CUDA path of the codec, from its checks and
// allocations to the kernels' walks, runs on machines without a GPU.
#pragma once

#include <cstdint>

#include "codec_kernels.h"

namespace blpa {

struct KernelTable {
  void (*compute_offsets)(const cuda::OffsetParams&);
  void (*channel_coding)(const cuda::ChannelParams&);
  int64_t (*pack_workspace)(const cuda::PackParams&);
  void (*pack)(const cuda::PackParams&);
  void (*unpack)(const cuda::UnpackParams&);
  int64_t (*bn_workspace)(const cuda::BnBackwardParams&);
  void (*bn_relu_backward)(const cuda::BnBackwardParams&);
};

// For tests: the codec's work on CPU tensors goes to `kernels` instead of its CPU loops; null
// (the default) restores the loops. Set it while no codec call runs.
void set_cpu_kernels(const KernelTable* kernels);

}  // namespace blpa
