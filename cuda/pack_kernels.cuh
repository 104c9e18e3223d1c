// pack: the codes' per-channel offsets, pack's table of channel constants, pack_kernel (with
// the unit's fused forward), and their launchers.
#pragma once

#include "kernel_common.cuh"

namespace BLPA_KERNELS_NAMESPACE {

namespace {

__global__ void offsets_kernel(OffsetParams p) {
  for (int64_t c = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; c < p.channels;
       c += int64_t{gridDim.x} * blockDim.x)
    p.offsets[c] = static_cast<uint8_t>(codec::offset(p.b[c], p.bits, codec::bin_width(p.window, p.bits), p.lift));
}

__global__ void channel_kernel(ChannelParams p) {
  for (int64_t c = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; c < p.channels;
       c += int64_t{gridDim.x} * blockDim.x) {
    const float gamma = p.gamma[c];
    const float g = gamma < p.gamma_min ? p.gamma_min : gamma;  // NaN stays NaN, as clamp_min
    const float b = p.centred ? __fdiv_rn(p.beta[c], g) : 0.0f;
    p.g[c] = g;
    p.b[c] = b;
    p.offsets[c] = static_cast<uint8_t>(codec::offset(b, p.bits, codec::bin_width(p.window, p.bits), p.lift));
  }
}

// What pack needs per channel and per bit width: each channel's scale 1 / (divisor_c d) and
// bias (s_c - 1/2) - kGuard / d (codec::fused_code), the edge thresholds of d
// (codec::near_code) and, for the fused forward (Affine), invstd (written out), alpha and
// shift. A window narrower than 2^(bits+1) guards (guard_d >= 1/2) is outside the fused
// code's bound: its scales are NaN (every element a near edge, which divides) and its biases
// s_c - 1/2.
struct PackTable {
  float *scale, *bias, *alpha, *shift, *edges;
};

// A launch's bin width d and guard kGuard / d, made once by each thread that fills a table.
struct PackBins {
  float d, guard_d;
};

template <int Bits>
__device__ __forceinline__ PackBins pack_bins(const PackParams& p) {
  const float d = codec::bin_width(p.window, Bits);
  return {d, codec::kGuard / d};
}

// Channel c's entries of t, and p.invstd[c] where write_invstd.
template <bool Affine>
__device__ __forceinline__ void pack_channel(const PackParams& p, const PackBins& bins, const PackTable& t, int64_t c,
                                             bool write_invstd) {
  const float g = p.divisor ? p.divisor[c] : 1.0f;
  const codec::FusedChannel f = codec::fused_channel(g, p.offsets[c], bins.d, bins.guard_d);
  t.scale[c] = f.scale;
  t.bias[c] = f.bias;
  if constexpr (Affine) {
    const float invstd = codec::bn_invstd(p.var[c], p.eps);
    const codec::BnAffine a = codec::bn_affine(p.mean[c], invstd, g, p.beta[c]);
    if (write_invstd) p.invstd[c] = invstd;
    t.alpha[c] = a.alpha;
    t.shift[c] = a.shift;
  }
}

template <int Bits>
__device__ __forceinline__ void pack_edge(const PackBins& bins, const PackTable& t, int i) {
  t.edges[i] = codec::edge_threshold(i - (1 << Bits) - 1, bins.d);
}

// The table in p.workspace (pack_table_floats(channels) floats), once for a launch of pack_kernel.
__host__ __device__ __forceinline__ PackTable workspace_table(float* w, int64_t channels) {
  return {w, w + channels, w + 2 * channels, w + 3 * channels, w + 4 * channels};
}

template <int Bits, bool Affine>
__global__ void pack_table_kernel(PackParams p) {
  const PackTable t = workspace_table(p.workspace, p.channels);
  const PackBins bins = pack_bins<Bits>(p);
  const int64_t stride = int64_t{gridDim.x} * blockDim.x;
  for (int64_t c = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; c < p.channels; c += stride)
    pack_channel<Affine>(p, bins, t, c, true);
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < codec::edge_thresholds(Bits); i += stride)
    pack_edge<Bits>(bins, t, static_cast<int>(i));
}

// Whether pack's table takes a launch of its own (pack_table_kernel) rather than each block
// making its own copy in shared memory before a barrier: where the copies would cost more.
// Per block a copy is the channels' entries (a division each, with a square root and a
// division more for the fused forward: some 50 instructions a channel) and the edge
// thresholds (some 60 each); the launch, about 2 us of a GPU, is some 2M warp-instruction
// slots of an H200 (132 SMs x 4 schedulers x 1.98 GHz). So: past blocks x (channels + edges)
// of about 2^20 (a ResNet-152 layer of 2,048 channels on the 2,112 blocks of a large tensor
// has 4.4M; a ResNet-164 layer of 64 channels 0.2M), and past the copy's 2,048 channels.
constexpr int kOwnTableChannels = 2048;
constexpr int64_t kTableWork = int64_t{1} << 20;

bool pack_table_launch(const PackParams& p, int blocks) {
  return p.channels > kOwnTableChannels || int64_t{blocks} * (p.channels + codec::edge_thresholds(p.bits)) > kTableWork;
}

// The word of N codes of Bits bits, code k at bits [Bits k, Bits (k + 1)), from their biased
// values b_k = code_k + kRoundMagicBits (codec::fused's): the sum of b_k << (Bits k) less the
// sum of kRoundMagicBits << (Bits k), modulo 2^32, which is the sum of code_k << (Bits k) with
// no carries between codes. One shift-and-add an element (LEA), where taking each code out of
// its biased value first and or-ing it in took three.
template <int Bits, int N>
__device__ __forceinline__ uint32_t code_word(const uint32_t* biased) {
  uint32_t w = 0, bias = 0;
#pragma unroll
  for (int k = 0; k < N; ++k) {
    w += biased[k] << (Bits * k);
    bias += codec::kRoundMagicBits << (Bits * k);
  }
  return w - bias;
}

// The blocks of pack_kernel an SM holds at once (__launch_bounds__): kStreamBlocks (64
// registers a thread) where a thread loads kPackUnroll groups, 3 where it loads 4 (bf16's
// common-path kernels then take 66 to 79 registers; at 64 those of NHWC spilled 76 to 204
// bytes), so that a thread has as many bytes of loads in flight as the float32 pack's (64),
// and an SM 1.5 times the bf16 pack's of kPackUnroll.
constexpr int pack_resident_blocks(int unroll) { return unroll == kPackUnroll ? kStreamBlocks : 3; }

// Affine: the unit's fused forward (PackParams::mean): the values packed are a = T(fma(x,
// alpha_c, shift_c)) of the loaded x, not x. Common: every group of the launch is whole, its
// tensors aligned for vector access and its index math 32-bit (pack_common_path), so that the
// kernel holds none of the other paths' branches and registers (the kernel for the rest holds
// them all: on an H200 it executed about twice the instructions per element of the common
// path, and ptxas spilled some of its registers). Unroll: the groups a thread loads before it
// encodes any, kPackUnroll but for bf16's common path under PackParams::unroll 4 (a
// measurement, pack_unroll).
template <int Bits, typename T, bool NHWC, bool Affine, bool Common, int Unroll>
__global__ void __launch_bounds__(kThreads, pack_resident_blocks(Unroll)) pack_kernel(PackParams p, Index ix) {
  const T* v = static_cast<const T*>(p.v);
  T* relu = static_cast<T*>(p.relu);
  const int64_t groups = (p.numel + kGroup - 1) / kGroup;
  const bool vec = Common || elems_aligned<T, kGroup>(v);
  const bool relu_vec = Common || elems_aligned<T, kGroup>(relu);
  // The table: in p.workspace (pack_table_kernel ran), or made here (p.workspace null; block 0
  // writes invstd).
  constexpr int own_channels = (Affine ? 4 : 2) * kOwnTableChannels;
  __shared__ float4 own_vectors[(own_channels + codec::edge_thresholds(Bits) + 3) / 4];  // float4: rows' loads
  PackTable table;
  if (p.workspace) {
    table = workspace_table(p.workspace, p.channels);
  } else {
    float* own = reinterpret_cast<float*>(own_vectors);
    table = {own, own + kOwnTableChannels, Affine ? own + 2 * kOwnTableChannels : nullptr,
             Affine ? own + 3 * kOwnTableChannels : nullptr, own + own_channels};
    const PackBins bins = pack_bins<Bits>(p);
    for (int c = threadIdx.x; c < p.channels; c += blockDim.x) pack_channel<Affine>(p, bins, table, c, blockIdx.x == 0);
    for (int i = threadIdx.x; i < codec::edge_thresholds(Bits); i += blockDim.x) pack_edge<Bits>(bins, table, i);
    __syncthreads();
  }
  // NHWC rows of 8 channels read the table's values as vectors: aligned where channels % 8 == 0
  // and the workspace is (as the caching allocator's blocks are; the shared copy is). (No
  // offsets are read here.)
  const bool rows = NHWC && (Common || nhwc_rows<kGroup>(p.channels, nullptr, p.workspace, nullptr));
  const float d = codec::bin_width(p.window, Bits);
  const float limit = codec::far_limit(codec::scaled_tolerance(Bits, codec::kGuard / d));
  // The common path's index math in 32 bits (its numel is below 2^31, so every e0 a thread
  // forms, at most Unroll - 1 grids' widths of groups past the end, 3 x 8 x 4,096 elements an
  // SM of the capped grid, is below 2^32).
  using I = std::conditional_t<Common, uint32_t, int64_t>;
  const I numel = static_cast<I>(p.numel), stride = static_cast<I>(gridDim.x) * blockDim.x;
  // NHWC on the common path: every group a thread takes is the same row of 8 channels as its
  // first (one_row_grid: one group a thread, or a grid a whole number of rows wide),
  // whose scales and biases it reads once here (reading them for each group, and finding the
  // row, took some 12 instructions a group). Elsewhere each group reads its own.
  constexpr bool kOneRow = Common && NHWC;
  const I first = static_cast<I>(blockIdx.x) * blockDim.x + threadIdx.x;
  float sc[kGroup], bi[kGroup];
  GroupAt row{};
  if constexpr (kOneRow) {
    row = common_group_at<NHWC>(first * kGroup, ix);
    channel_values<kGroup, NHWC>(table.scale, row, 0, ix, sc);
    channel_values<kGroup, NHWC>(table.bias, row, 0, ix, bi);
  }
  for (I g0 = first; g0 < static_cast<I>(groups); g0 += Unroll * stride) {
    PackRaw<T> raws[Unroll];  // each group's elements, loaded first
#pragma unroll
    for (int u = 0; u < Unroll; ++u) {
      const I e0 = (g0 + u * stride) * kGroup;
      // (A common launch's groups are whole, but a thread's last turn may reach past the end.)
      if (Common ? e0 < numel : vec && e0 + kGroup <= numel) {
        raws[u] = target::load<PackRaw<T>>(v + e0);
      } else if (!Common) {
        raws[u] = PackRaw<T>{};  // (set_raw_elem keeps a word's other half)
#pragma unroll
        for (int k = 0; k < kGroup; ++k) set_raw_elem<T>(raws[u], k, e0 + k < numel ? v[e0 + k] : zero<T>());
      }
    }
#pragma unroll
    for (int u = 0; u < Unroll; ++u) {
      const I e0 = (g0 + u * stride) * kGroup;
      if (e0 >= numel) break;  // so are the later groups
      const int n = Common ? kGroup : static_cast<int>(min(int64_t{kGroup}, p.numel - e0));
      PackRaw<T>& raw = raws[u];
      const GroupAt at = kOneRow ? row : Common ? common_group_at<NHWC>(e0, ix) : group_at<kGroup, NHWC>(rows, e0, n, ix);
      float x[kGroup];
      widen_raw(raw, x);
      if constexpr (Affine) {  // raw becomes a: the BatchNorm's output, rounded to T
        float al[kGroup], sh[kGroup];
        channel_values<kGroup, NHWC>(table.alpha, at, e0, ix, al);
        channel_values<kGroup, NHWC>(table.shift, at, e0, ix, sh);
#pragma unroll
        for (int k = 0; k < kGroup; ++k) x[k] = fmaf(x[k], al[k], sh[k]);
        round_raw(x, raw);
        widen_raw(raw, x);
      }
      if (relu) {  // the unit's ReLU, written where it may alias v: this thread has read it
        const PackRaw<T> y = relu_raw(raw, x);
        if (relu_vec && n == kGroup) {
          target::store(relu + e0, y);
        } else {
#pragma unroll
          for (int k = 0; k < kGroup; ++k)
            if (k < n) relu[e0 + k] = raw_elem<T>(y, k);
        }
      }
      if constexpr (!kOneRow) {
        channel_values<kGroup, NHWC>(table.scale, at, e0, ix, sc);
        channel_values<kGroup, NHWC>(table.bias, at, e0, ix, bi);
      }
      // Next to a bin edge: decided by the edge thresholds, dividing only by a divisor other
      // than 1 (v / 1 is v), with the channel known from the group's layout. About 1 element
      // in 1,000 of float32 activations; but a bf16 value divided by 1 (no divisor, or gamma =
      // 1 as initialised) is often exactly on an edge: 1 in 6 of N(0,1) values at 8 bits, 1 in
      // 85 at 4. Biased as fused's codes.
      auto exact = [&](int k) {
        float t = x[k];
        if (p.divisor) {
          const float g = p.divisor[element_channel<NHWC>(at, e0, k, ix)];
          if (g != 1.0f) t = __fdiv_rn(t, g);
        }
        return codec::near_code<true>(x[k], t, sc[k], bi[k], table.edges, Bits, d) + codec::kRoundMagicBits;
      };
      // The common path makes every code of the group first, then tests the group once: a test
      // and branch for each element cost some 4 instructions an element and made each
      // element's chain of dependent instructions wait for the one before (on an H200 the pack
      // issued once in 14 cycles per warp). The general kernel tests each element as it goes,
      // which keeps fewer values live in its registers (with the group's test they spilled).
      uint32_t q[kGroup];
      bool near = false;
#pragma unroll
      for (int k = 0; k < kGroup; ++k) {
        const codec::Fused f = codec::fused(x[k], sc[k], bi[k], limit, Bits);
        q[k] = f.biased;
        if constexpr (Common)
          near |= !f.far;
        else if (!f.far)
          q[k] = exact(k);
      }
      if (Common && near) {
#pragma unroll
        for (int k = 0; k < kGroup; ++k)
          if (!codec::fused(x[k], sc[k], bi[k], limit, Bits).far) q[k] = exact(k);
      }

      // q holds each code plus kRoundMagicBits (fused's biased codes, and near_code's made so).
      if (n == kGroup) {
        if constexpr (Bits == 8) {
          target::store(p.codes + e0, uint2{code_word<8, 4>(q), code_word<8, 4>(q + 4)});
        } else if constexpr (Bits == 4) {
          target::store(p.codes + e0 / 2, code_word<4, kGroup>(q));
        } else {
          static_assert(Bits == 2, "codes are 8, 4 or 2 bits");
          target::store(p.codes + e0 / 4, static_cast<uint16_t>(code_word<2, kGroup>(q)));
        }
      } else {  // a tensor's last elements, fewer than a group (not on the common path)
#pragma unroll
        for (int k = 0; k < kGroup; ++k) q[k] -= codec::kRoundMagicBits;
        uint8_t* out = p.codes + e0 * Bits / 8;
        if constexpr (Bits == 8) {
#pragma unroll
          for (int k = 0; k < kGroup; ++k)
            if (k < n) out[k] = static_cast<uint8_t>(q[k]);
        } else if constexpr (Bits == 4) {
#pragma unroll
          for (int k = 0; k < kGroup; k += 2) {  // the padding nibble past an odd count is 0
            const uint32_t hi = k + 1 < n ? q[k + 1] : 0u;
            if (k < n) out[k / 2] = static_cast<uint8_t>(q[k] | hi << 4);
          }
        } else {
          uint32_t w = 0;  // codes past n are 0: the padding of the last byte
#pragma unroll
          for (int k = 0; k < kGroup; ++k) w |= (k < n ? q[k] : 0u) << (2 * k);
          out[0] = static_cast<uint8_t>(w);
          if (n > 4) out[1] = static_cast<uint8_t>(w >> 8);
        }
      }
    }
  }
}

// A launch of a thread a channel (offsets_kernel, channel_kernel).
template <typename Params>
void launch_per_channel(void (*kernel)(Params), const Params& p) {
  if (p.channels == 0) return;
  const target::DeviceGuard guard(p.device);  // a launch goes to the current device
  const Launch l = launch_config(p.channels, p.device);
  BLPA_LAUNCH(l.blocks, kThreads, l.stream, kernel)(p);
  target::launch_check();
}

}  // namespace

void compute_offsets(const OffsetParams& p) { launch_per_channel(offsets_kernel, p); }

void channel_coding(const ChannelParams& p) { launch_per_channel(channel_kernel, p); }

int pack_blocks(const PackParams& p) { return row_blocks(p.numel, kGroup, p.channels, p.nhwc, p.device); }

int64_t pack_workspace(const PackParams& p) {
  if (p.numel == 0) return 0;
  static_assert(pack_table_floats(0) == codec::edge_thresholds(8), "pack's table holds 8-bit edge thresholds");
  return pack_table_launch(p, pack_blocks(p)) ? pack_table_floats(p.channels) : 0;
}

// Whether every group of pack's launch of `blocks` takes the common path (pack_kernel's
// Common): whole groups (numel a multiple of kGroup), v and the ReLU output aligned for one
// vector access a group, 32-bit index math, and each group's channels known from its layout:
// NHWC rows of kGroup channels with the table aligned for vector reads and each thread's
// groups in one row (one_row_grid), or NCHW planes of a multiple of kGroup elements. Every
// layer of the networks in NHWC (CUDA's default); in NCHW not ImageNet's 14 x 14 and 7 x 7
// planes, nor odd test shapes and misaligned views.
bool pack_common_path(const PackParams& p, const Index& ix, int blocks) {
  if (p.general) return false;
  const bool whole = p.numel % kGroup == 0 && ix.narrow;
  const uintptr_t vector = p.bf16 ? alignof(Elems<c10::BFloat16, kGroup>) : alignof(Elems<float, kGroup>);
  const bool vec = aligned(p.v, vector) && (!p.relu || aligned(p.relu, vector));
  const bool layout = p.nhwc ? nhwc_rows<kGroup>(p.channels, nullptr, p.workspace, nullptr) &&
                                   one_row_grid(blocks, p.numel / kGroup, kGroup, p.channels)
                             : p.plane % kGroup == 0;
  return whole && vec && layout;
}

void pack(const PackParams& p) {
  if (p.numel == 0) return;
  const target::DeviceGuard guard(p.device);  // a launch goes to the current device
  const Launch l{pack_blocks(p), target::current_stream(p.device)};
  const Launch lt = launch_config(std::max<int64_t>(p.channels, codec::edge_thresholds(p.bits)), p.device);
  const Index ix = index_of(p.numel, p.plane, p.channels);
  const bool table = pack_table_launch(p, l.blocks);
  TORCH_CHECK(!table || p.workspace, "blpa codec: pack needs a workspace of pack_workspace(p) floats here");
  // A thread stores a group's codes as one word (kGroup * bits / 8 bytes), with no scalar path.
  TORCH_CHECK(aligned(p.codes, kGroup * p.bits / 8), "blpa codec: pack's codes must be aligned to ",
              kGroup * p.bits / 8, " bytes");
  TORCH_CHECK(p.unroll == 0 || p.unroll == kPackUnroll || p.unroll == 4, "blpa codec: pack loads ", kPackUnroll,
              " or 4 groups a thread, not ", p.unroll);
  PackParams q = p;
  if (!table) q.workspace = nullptr;  // each block makes its own copy
  const bool common = pack_common_path(q, ix, l.blocks);
  dispatch(p.bits, p.bf16, p.nhwc, [&](auto k, auto t, auto layout) {
    constexpr int K = decltype(k)::value;
    using T = decltype(t);
    constexpr bool L = decltype(layout)::value;
    auto launch = [&](auto affine, auto common_path) {
      constexpr bool A = decltype(affine)::value, C = decltype(common_path)::value;
      if (table) BLPA_LAUNCH(lt.blocks, kThreads, lt.stream, pack_table_kernel<K, A>)(q);
      if constexpr (C && std::is_same_v<T, c10::BFloat16>) {  // (4 is instantiated for these alone)
        if (p.unroll == 4) {
          BLPA_LAUNCH(l.blocks, kThreads, l.stream, pack_kernel<K, T, L, A, C, 4>)(q, ix);
          return;
        }
      }
      BLPA_LAUNCH(l.blocks, kThreads, l.stream, pack_kernel<K, T, L, A, C, kPackUnroll>)(q, ix);
    };
    using Yes = std::true_type;
    using No = std::false_type;
    if (p.mean)
      common ? launch(Yes{}, Yes{}) : launch(Yes{}, No{});
    else
      common ? launch(No{}, Yes{}) : launch(No{}, No{});
  });
  target::launch_check();
}

}  // namespace BLPA_KERNELS_NAMESPACE
