// The CUDA kernels of the codec and their launchers. The element math is blpa/codec_math.h,
// shared with the CPU path; these files only decide how threads walk the tensor:
//   kernel_common.cuh        the grid, a group's channels, loads and stores, the codes' words
//   pack_kernels.cuh         the codes' offsets, pack's table, pack_kernel (and fused forward)
//   unpack_kernels.cuh       unpack_kernel: x_hat', r' and the mask from the codes
//   bn_backward_kernels.cuh  the BatchNorm-and-ReLU backward from the codes, NCHW and NHWC
//
// Two compilers read them, through this file. nvcc builds it for the GPU through codec_kernels.cu, which
// supplies what a launch needs from CUDA and LibTorch; g++ builds it for the tests'
// emulator (tests/cuda_emulator.h), which runs every thread of a grid on the CPU, so the
// kernels' walks are tested where there is no GPU. The includer defines:
//   BLPA_KERNELS_NAMESPACE  where the launchers of codec_kernels.h are defined
//   BLPA_KERNEL_TARGET      a namespace with: Stream, sm_count(device),
//                           current_stream(device), DeviceGuard(device), launch_check(),
//                           and the device functions load<V>(p) and store(p, v): one
//                           vector access, which on the GPU faults unless p is aligned
//   BLPA_LAUNCH(grid, block, stream, kernel)(args)   a kernel launch
//
// Layout: each pack thread handles groups of 8 consecutive elements, grid-stride (unpack: 4).
//   8-bit: 8 codes = one 8-byte store     4-bit: 8 codes = one 4-byte store,
//   element 2j in the low nibble and 2j+1 in the high nibble of byte j
//   2-bit: 8 codes = one 2-byte store, element 4j+t in bits 2t, 2t+1 of byte j.
// A thread owns whole bytes, so two codes that share a byte are written by one thread.
// A group's elements are loaded/stored as one vector when the pointer is aligned: 8 floats
// as two 16-byte accesses, 8 bf16 as one (4 for unpack: 16 or 8 bytes); the last, partial
// group and misaligned tensors take the scalar path. NHWC (channels-last) tensors are walked
// in the same memory order; only the channel of an element differs (i % channels), and the
// BatchNorm backward walks them by rows of channels (bn_nhwc_*). Every per-element loop is
// unrolled over the whole group with a guard, so the small arrays stay in registers
// (a loop bounded by n put them in local memory: check `-Xptxas -v` for 0 bytes of stack).
#pragma once

#include "kernel_common.cuh"
#include "pack_kernels.cuh"
#include "unpack_kernels.cuh"
#include "bn_backward_kernels.cuh"
