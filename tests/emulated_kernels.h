// The codec's CUDA kernels (cuda/codec_kernels.cuh) compiled for the CPU and run by the
// tests' emulator (cuda_emulator.h), as a blpa::KernelTable. Installed for CPU tensors, it
// sends the codec's work through the CUDA path. With BLPA_TEST_KERNELS=emulated in the
// environment every codec call of the test program takes it (CTest runs the codec's, the
// unit's and the networks' tests so, as emulated-cuda/...); EmulatedKernels installs it for
// a scope (the CUDA test that compares the GPU's bits with the emulator's).
#pragma once

#include "blpa/kernel_table.h"

namespace blpa::testing {

const KernelTable& emulated_kernels();

// The multiprocessors the emulated launchers size their grids by (2 unless set): a GPU's
// count makes the emulator split the BatchNorm backward's sums as that GPU does.
void set_emulated_multiprocessors(int count);

// While it lives, the codec's work on CPU tensors runs the emulated CUDA kernels.
class EmulatedKernels {
 public:
  EmulatedKernels() { set_cpu_kernels(&emulated_kernels()); }
  ~EmulatedKernels() { set_cpu_kernels(installed_by_environment() ? &emulated_kernels() : nullptr); }
  EmulatedKernels(const EmulatedKernels&) = delete;
  EmulatedKernels& operator=(const EmulatedKernels&) = delete;

  // Whether BLPA_TEST_KERNELS=emulated installed them for the whole program.
  static bool installed_by_environment();
};

}  // namespace blpa::testing
