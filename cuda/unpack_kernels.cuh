// unpack: x_hat', r' and the mask from the codes (unpack_kernel), and its launcher.
#pragma once

#include "kernel_common.cuh"

namespace BLPA_KERNELS_NAMESPACE {

namespace {

// Unpack writes up to three tensors and reads one byte or less per element, so its stores
// decide its speed. A thread takes groups of 16 bytes of output (4 floats, 8 bf16), so that a
// warp's store instruction covers 512 contiguous bytes (with 8 floats per thread, each store
// instruction left every other 16 bytes out and unpack ran at half the copy bandwidth on an
// H200). It takes kUnpackUnroll such groups at a time, a grid's width of threads apart, and
// loads all their codes before decoding any, so that their loads are in flight together (one
// group at a time, a thread waited a load's latency for every 16 bytes it wrote).
template <typename T>
constexpr int kUnpackGroup = 16 / static_cast<int>(sizeof(T));
constexpr int kUnpackUnroll = 4;

// codec::code_origin of the offset of each of a group's G elements: where the group is a row
// of channels, byte_code_float of each offset's byte.
template <int G, bool NHWC>
__device__ __forceinline__ void channel_origins(const uint8_t* offsets, const GroupAt& at, int64_t e0, const Index& ix,
                                                float out[G]) {
  if constexpr (NHWC && G % 4 == 0) {
    if (at.how == GroupAt::row) {
      // The bytes as words (nhwc_rows checked their alignment for G bytes).
      const auto w = target::load<Elems<uint32_t, G / 4>>(reinterpret_cast<const uint32_t*>(offsets + at.c0));
#pragma unroll
      for (int k = 0; k < G; ++k) out[k] = byte_code_float(w.v[k / 4], k % 4);
      return;
    }
  }
  int s[G];
  channel_values<G, NHWC>(offsets, at, e0, ix, s);
#pragma unroll
  for (int k = 0; k < G; ++k) out[k] = codec::code_origin(s[k]);
}

// Common: every group whole and aligned, as pack_kernel's (unpack_common_path).
template <int Bits, typename T, bool NHWC, bool Common>
__global__ void __launch_bounds__(kThreads, kStreamBlocks) unpack_kernel(UnpackParams p, Index ix) {
  constexpr int G = kUnpackGroup<T>, U = kUnpackUnroll;
  T* x_hat = static_cast<T*>(p.x_hat);
  T* r = static_cast<T*>(p.r);
  const int64_t groups = (p.numel + G - 1) / G;
  const bool vec = Common || ((!x_hat || elems_aligned<T, G>(x_hat)) && (!r || elems_aligned<T, G>(r)));
  const bool word_codes = Common || aligned(p.codes, G * Bits / 8);  // codes from pack always are
  const float d = codec::bin_width(p.window, Bits);
  const float* b = x_hat ? p.b : nullptr;
  const float* gamma = r ? p.gamma : nullptr;
  const bool rows = NHWC && (Common || nhwc_rows<G>(p.channels, p.offsets, b, gamma));
  // The common path's index math in 32 bits, as pack's (every e0 a thread forms is at most
  // U - 1 grid widths of groups past numel < 2^31, so below 2^32).
  using I = std::conditional_t<Common, uint32_t, int64_t>;
  const I numel = static_cast<I>(p.numel), stride = static_cast<I>(gridDim.x) * blockDim.x;
  // NHWC on the common path: every group a thread takes is the same row of G channels as its
  // first (one_row_grid), whose origins, b and gamma it reads once here. Elsewhere each group
  // reads its own.
  constexpr bool kOneRow = Common && NHWC;
  const I first = static_cast<I>(blockIdx.x) * blockDim.x + threadIdx.x;
  float origin[G], bk[G], gk[G];
  GroupAt row{};
  if constexpr (kOneRow) {
    row = common_group_at<NHWC>(first * G, ix);
    channel_origins<G, NHWC>(p.offsets, row, 0, ix, origin);
    if (x_hat) channel_values<G, NHWC>(b, row, 0, ix, bk);
    if (r) channel_values<G, NHWC>(gamma, row, 0, ix, gk);
  }
  for (I g0 = first; g0 < static_cast<I>(groups); g0 += U * stride) {
    uint64_t words[U];  // the codes of each group, loaded first
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const I e0 = (g0 + u * stride) * G;
      words[u] = 0;
      if (Common ? e0 < numel : e0 + G <= numel && word_codes) {  // (as pack's)
        words[u] = read_code_word<Bits, G>(p.codes, e0);
      } else if (!Common) {
#pragma unroll
        for (int k = 0; k < G; ++k)
          if (e0 + k < p.numel) words[u] |= uint64_t{read_code<Bits>(p.codes, e0 + k)} << (Bits * k);
      }
    }
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const I e0 = (g0 + u * stride) * G;
      if (e0 >= numel) break;  // so are the later groups
      const int n = Common ? G : static_cast<int>(min(int64_t{G}, p.numel - e0));
      float q[G];  // decoded as codec::decode_by_steps: no int conversions
      code_floats<Bits, G>(words[u], q);
      const GroupAt at = kOneRow ? row : Common ? common_group_at<NHWC>(e0, ix) : group_at<G, NHWC>(rows, e0, n, ix);
      if constexpr (!kOneRow) channel_origins<G, NHWC>(p.offsets, at, e0, ix, origin);
      const bool full = vec && n == G;

      // r' is never NaN (max(g v', 0) with v' a number): its rounding skips the NaN check.
      auto store = [&](T* dst, const float y[G], bool never_nan) {
        Elems<T, G> out;
#pragma unroll
        for (int k = 0; k < G; ++k) out.v[k] = never_nan ? codec::round_number_to<T>(y[k]) : codec::round_to<T>(y[k]);
        if (full) {
          target::store(dst + e0, out);
        } else {
#pragma unroll
          for (int k = 0; k < G; ++k)
            if (k < n) dst[e0 + k] = out.v[k];
        }
      };

      if (x_hat) {
        float y[G];
        if constexpr (!kOneRow) channel_values<G, NHWC>(b, at, e0, ix, bk);
#pragma unroll
        for (int k = 0; k < G; ++k) y[k] = codec::decode_by_steps(q[k], origin[k], d) - bk[k];
        store(x_hat, y, false);
      }
      if (r) {
        float y[G];
        if constexpr (!kOneRow) channel_values<G, NHWC>(gamma, at, e0, ix, gk);
#pragma unroll
        for (int k = 0; k < G; ++k) {
          const float t = __fmul_rn(gk[k], codec::decode_by_steps(q[k], origin[k], d));
          y[k] = t > 0.0f ? t : 0.0f;
        }
        store(r, y, true);
      }
      if (p.mask) {
#pragma unroll
        for (int k = 0; k < G; ++k)
          if (k < n) p.mask[e0 + k] = codec::mask_by_steps(q[k], origin[k]);
      }
    }
  }
}

}  // namespace

// Whether every group of unpack's launch of `blocks` takes the common path (unpack_kernel's
// Common), as pack_common_path: whole groups of `group` elements, the outputs aligned for one
// vector store a group and the codes for one word, 32-bit index math, NHWC rows (each
// thread's groups in one row) or NCHW planes of whole groups.
bool unpack_common_path(const UnpackParams& p, const Index& ix, int group, int blocks) {
  if (p.general) return false;
  const bool whole = p.numel % group == 0 && ix.narrow;
  constexpr uintptr_t vector = 16;  // a group's output, 16 bytes of either type (Elems<T, kUnpackGroup<T>>)
  const bool vec = (!p.x_hat || aligned(p.x_hat, vector)) && (!p.r || aligned(p.r, vector)) &&
                   aligned(p.codes, group * p.bits / 8);
  const float* b = p.x_hat ? p.b : nullptr;
  const float* gamma = p.r ? p.gamma : nullptr;
  const bool rows =
      group == 8 ? nhwc_rows<8>(p.channels, p.offsets, b, gamma) : nhwc_rows<4>(p.channels, p.offsets, b, gamma);
  const bool layout = p.nhwc ? rows && one_row_grid(blocks, p.numel / group, group, p.channels) : p.plane % group == 0;
  return whole && vec && layout;
}

void unpack(const UnpackParams& p) {
  if (p.numel == 0) return;
  const target::DeviceGuard guard(p.device);  // a launch goes to the current device
  const int group = p.bf16 ? kUnpackGroup<c10::BFloat16> : kUnpackGroup<float>;
  const Launch l{row_blocks(p.numel, group, p.channels, p.nhwc, p.device), target::current_stream(p.device)};
  const Index ix = index_of(p.numel, p.plane, p.channels);
  const bool common = unpack_common_path(p, ix, group, l.blocks);
  dispatch(p.bits, p.bf16, p.nhwc, [&](auto k, auto t, auto layout) {
    constexpr int K = decltype(k)::value;
    using T = decltype(t);
    constexpr bool L = decltype(layout)::value;
    if (common)
      BLPA_LAUNCH(l.blocks, kThreads, l.stream, unpack_kernel<K, T, L, true>)(p, ix);
    else
      BLPA_LAUNCH(l.blocks, kThreads, l.stream, unpack_kernel<K, T, L, false>)(p, ix);
  });
  target::launch_check();
}

}  // namespace BLPA_KERNELS_NAMESPACE
