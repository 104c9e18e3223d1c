// The CUDA kernels of the codec and their launchers. The element math is blpa/codec_math.h,
// shared with the CPU path; this file only decides how threads walk the tensor.
//
// Two compilers read this file. nvcc builds it for the GPU through codec_kernels.cu, which
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

#include <c10/util/BFloat16.h>

#include <algorithm>
#include <cstdint>
#include <numeric>
#include <type_traits>

#include "codec_kernels.h"

#include "blpa/codec_dispatch.h"
#include "blpa/codec_math.h"

namespace BLPA_KERNELS_NAMESPACE {
using namespace ::blpa::cuda;  // the parameter structs of codec_kernels.h
namespace {

namespace target = BLPA_KERNEL_TARGET;

constexpr int kGroup = 8;
constexpr int kThreads = 256;
// pack: a thread loads this many groups of kGroup elements, a grid's width of threads apart,
// before it encodes any, so that their loads are in flight together.
constexpr int kPackUnroll = 2;
// pack and unpack: blocks an SM must hold at once (at most 64 registers a thread), so that
// their unrolled loads do not cost them the warps that hide those loads' latency.
constexpr int kStreamBlocks = 4;

struct Launch {
  int blocks;
  target::Stream stream;
};

// The grid cap: 16 blocks of kThreads per SM, two to four waves of the 4 to 8 an SM holds at
// once (pack and unpack are held to 4 by __launch_bounds__).
int64_t grid_cap(int device) { return int64_t{target::sm_count(device)} * 16; }

// One helper for every launch: empty work returns early, the grid is capped (grid-stride
// loops cover the rest) and the stream is LibTorch's current one for the device.
Launch launch_config(int64_t work_items, int device) {
  const int64_t blocks = std::min<int64_t>((work_items + kThreads - 1) / kThreads, grid_cap(device));
  return {static_cast<int>(std::max<int64_t>(blocks, 1)), target::current_stream(device)};
}

__host__ __device__ __forceinline__ bool aligned(const void* p, uintptr_t bytes) {
  return (reinterpret_cast<uintptr_t>(p) & (bytes - 1)) == 0;
}

// Division by a divisor fixed for a launch, as a multiply-high, an add and a shift instead of
// the GPU's 32-bit division (a reciprocal and about 15 integer instructions; 64-bit division
// is a call): Granlund and Montgomery's method, as LibTorch's IntDivider. For 1 <= d < 2^31,
// s the least shift with 2^s >= d and m = floor(2^32 (2^s - d) / d) + 1 (< 2^32, as
// 2^s < 2 d), n / d = (umulhi(n, m) + n) >> s for every n < 2^31, where the add cannot
// overflow. Tested against division in tests/emulated_kernels.cpp.
struct Divider {
  uint32_t m = 1, s = 0;
};

Divider make_divider(int64_t d) {
  Divider v;
  while ((int64_t{1} << v.s) < d) ++v.s;
  v.m = static_cast<uint32_t>(((uint64_t{1} << 32) * ((uint64_t{1} << v.s) - static_cast<uint64_t>(d))) /
                                  static_cast<uint64_t>(d) +
                              1);
  return v;
}

__device__ __forceinline__ uint32_t divide(uint32_t n, const Divider& v) {
  return (__umulhi(n, v.m) + n) >> v.s;
}

// A launch's index math: below 2^31 - 8 elements (`narrow`) the channel of an element comes
// from 32-bit multiply-high divisions by plane and channels; above, from 64-bit division. (The
// padding lanes of the last group ask for the channels of up to 7 indices past the end.)
struct Index {
  int64_t plane, channels;
  Divider by_plane, by_channels;
  bool narrow;
};

Index index_of(int64_t numel, int64_t plane, int64_t channels) {
  const bool narrow = numel <= (int64_t{1} << 31) - 8;
  return {plane, channels, narrow ? make_divider(plane) : Divider{}, narrow ? make_divider(channels) : Divider{},
          narrow};
}

// n mod d, given n / d.
__device__ __forceinline__ uint32_t remainder(uint32_t n, uint32_t quotient, int64_t d) {
  return n - quotient * static_cast<uint32_t>(d);
}

// n mod channels: the channel of NHWC element n, or of NCHW plane n (n < 2^31 where narrow).
__device__ __forceinline__ int64_t channel_of(int64_t n, const Index& ix) {
  if (ix.narrow) {
    const uint32_t u = static_cast<uint32_t>(n);
    return remainder(u, divide(u, ix.by_channels), ix.channels);
  }
  return n % ix.channels;
}

// Where a group of n elements starting at e0 lies: the channel of its first element, and
// whether all n share it (a group straddles two planes only at a plane's end).
struct Group {
  int64_t c0;
  bool one_channel;
};

__device__ __forceinline__ Group locate(int64_t e0, int n, const Index& ix) {
  if (ix.narrow) {
    const uint32_t e = static_cast<uint32_t>(e0), q = divide(e, ix.by_plane);
    return {channel_of(q, ix), remainder(e, q, ix.plane) + n <= static_cast<uint32_t>(ix.plane)};
  }
  const int64_t q = e0 / ix.plane;
  return {channel_of(q, ix), e0 - q * ix.plane + n <= ix.plane};
}

// The channel of NCHW element e, for the rare groups that straddle two planes.
__device__ __forceinline__ int64_t channel_at(int64_t e, const Index& ix) {
  return channel_of(ix.narrow ? int64_t{divide(static_cast<uint32_t>(e), ix.by_plane)} : e / ix.plane, ix);
}

// NHWC: the channel of each of the G elements of a group from e0: consecutive channels,
// wrapping at `channels`.
template <int G>
__device__ __forceinline__ void nhwc_channels(int64_t e0, const Index& ix, int64_t ch[G]) {
  int64_t c = channel_of(e0, ix);
#pragma unroll
  for (int k = 0; k < G; ++k) {
    ch[k] = c;
    c = c + 1 == ix.channels ? 0 : c + 1;
  }
}

// N elements of type T as one aligned access: 8 floats are two 16-byte loads, 8 bf16 one.
template <typename T, int N>
struct alignas(N * sizeof(T) < 16 ? N * sizeof(T) : 16) Elems {
  T v[N];
};

template <typename T, int N>
__host__ __device__ __forceinline__ bool elems_aligned(const void* p) {
  return aligned(p, alignof(Elems<T, N>));
}

// The 2 W bf16 values of W 32-bit words (value 2k in word k's low half, little-endian) widened
// to float: the low half shifted up, the high half masked, one instruction a value where
// extracting each half first took two.
template <int W>
__device__ __forceinline__ void widen_bf16_words(const uint32_t* w, float out[2 * W]) {
#pragma unroll
  for (int k = 0; k < W; ++k) {
    out[2 * k] = codec::float_of_bits(w[k] << 16);
    out[2 * k + 1] = codec::float_of_bits(w[k] & 0xFFFF0000u);
  }
}

// The V values of e widened to float; bf16 pairs from their words.
template <typename T, int V>
__device__ __forceinline__ void widen_elems(const Elems<T, V>& e, float out[V]) {
  if constexpr (std::is_same_v<T, c10::BFloat16> && V % 2 == 0) {
    uint32_t w[V / 2];
    memcpy(w, &e, sizeof w);
    widen_bf16_words<V / 2>(w, out);
  } else {
#pragma unroll
    for (int k = 0; k < V; ++k) out[k] = codec::widen(e.v[k]);
  }
}

// NHWC with channels a multiple of G (every layer of the networks): a group of G elements
// from e0 (a multiple of G) holds channels c0 .. c0 + G - 1, whose per-channel values are
// read as vectors where `rows` (the kernel checks the arrays' alignment once) instead of
// element by element, which cost a load and 64-bit index math per element.
template <int G>
__host__ __device__ __forceinline__ bool nhwc_rows(int64_t channels, const void* offsets, const float* b,
                                                   const float* gamma) {
  return channels % G == 0 && elems_aligned<uint8_t, G>(offsets) && (!b || elems_aligned<float, G>(b)) &&
         (!gamma || elems_aligned<float, G>(gamma));
}

// Where the per-channel values of a group of G elements from e0 (n of them in the tensor)
// come from: channel c0 for all (NCHW, but at a plane's end), channels c0 .. c0 + G - 1 (NHWC
// rows), or each element's own channel (the rest).
struct GroupAt {
  enum How { one_channel, row, per_element } how;
  int64_t c0;
};

template <int G, bool NHWC>
__device__ __forceinline__ GroupAt group_at(bool rows, int64_t e0, int n, const Index& ix) {
  if constexpr (NHWC) {
    if (rows) return {GroupAt::row, channel_of(e0, ix)};
    return {GroupAt::per_element, 0};
  } else {
    const Group gr = locate(e0, n, ix);
    return {gr.one_channel ? GroupAt::one_channel : GroupAt::per_element, gr.c0};
  }
}

// group_at for a launch whose groups all take the common path (pack_common_path): 32-bit
// index math, an NHWC group a row of G channels and an NCHW one in a single channel (its plane
// a multiple of G). Each kind of group is then known where the kernel is compiled.
template <bool NHWC>
__device__ __forceinline__ GroupAt common_group_at(int64_t e0, const Index& ix) {
  const uint32_t e = static_cast<uint32_t>(e0);
  if constexpr (NHWC) {
    return {GroupAt::row, remainder(e, divide(e, ix.by_channels), ix.channels)};
  } else {
    const uint32_t plane = divide(e, ix.by_plane);
    return {GroupAt::one_channel, remainder(plane, divide(plane, ix.by_channels), ix.channels)};
  }
}

// a[channel] for each of the group's G elements: one load, one vector load, or G loads.
template <int G, bool NHWC, typename V, typename Out>
__device__ __forceinline__ void channel_values(const V* a, const GroupAt& at, int64_t e0, const Index& ix,
                                               Out out[G]) {
  if (!NHWC && at.how == GroupAt::one_channel) {  // (NHWC groups are never one channel, nor NCHW rows)
    const Out v = a[at.c0];
#pragma unroll
    for (int k = 0; k < G; ++k) out[k] = v;
  } else if (NHWC && at.how == GroupAt::row) {
    const auto w = target::load<Elems<V, G>>(a + at.c0);
#pragma unroll
    for (int k = 0; k < G; ++k) out[k] = w.v[k];
  } else if constexpr (NHWC) {
    int64_t ch[G];
    nhwc_channels<G>(e0, ix, ch);
#pragma unroll
    for (int k = 0; k < G; ++k) out[k] = a[ch[k]];
  } else {
#pragma unroll
    for (int k = 0; k < G; ++k) out[k] = a[channel_at(e0 + k, ix)];
  }
}

// The channel of element e0 + k of a group.
template <bool NHWC>
__device__ __forceinline__ int64_t element_channel(const GroupAt& at, int64_t e0, int k, const Index& ix) {
  if (!NHWC && at.how == GroupAt::one_channel) return at.c0;
  if (NHWC && at.how == GroupAt::row) return at.c0 + k;
  return NHWC ? channel_of(e0 + k, ix) : channel_at(e0 + k, ix);
}

template <typename T>
__device__ __forceinline__ T zero() {
  return codec::round_to<T>(0.0f);
}

// pack's group of kGroup elements as it loads, rounds and stores them: floats, or bf16 as
// kGroup / 2 32-bit words, element 2k in word k's low half. (Held as 16-bit values, as
// Elems<bf16, 8>, each pair was put back together into a word before it was widened: a byte
// permute more an element, scripts/sass-hot-path.sh.)
template <typename T>
using PackRaw = std::conditional_t<std::is_same_v<T, c10::BFloat16>, Elems<uint32_t, kGroup / 2>, Elems<float, kGroup>>;

__device__ __forceinline__ void widen_raw(const Elems<float, kGroup>& r, float x[kGroup]) {
#pragma unroll
  for (int k = 0; k < kGroup; ++k) x[k] = r.v[k];
}

__device__ __forceinline__ void widen_raw(const Elems<uint32_t, kGroup / 2>& r, float x[kGroup]) {
  widen_bf16_words<kGroup / 2>(r.v, x);
}

// Element k of r, and r with element k set to e (the general kernel's scalar path).
template <typename T>
__device__ __forceinline__ T raw_elem(const PackRaw<T>& r, int k) {
  if constexpr (std::is_same_v<T, c10::BFloat16>)
    return c10::BFloat16(static_cast<uint16_t>(r.v[k / 2] >> (16 * (k % 2))), c10::BFloat16::from_bits());
  else
    return r.v[k];
}

template <typename T>
__device__ __forceinline__ void set_raw_elem(PackRaw<T>& r, int k, T e) {
  if constexpr (std::is_same_v<T, c10::BFloat16>) {
    const int shift = 16 * (k % 2);
    r.v[k / 2] = (r.v[k / 2] & ~(0xFFFFu << shift)) | uint32_t{e.x} << shift;
  } else {
    r.v[k] = e;
  }
}

// a rounded to T into r, own NaNs (the fused forward's BatchNorm output): bf16 pairs by one
// conversion into their word.
__device__ __forceinline__ void round_raw(const float a[kGroup], Elems<float, kGroup>& r) {
#pragma unroll
  for (int k = 0; k < kGroup; ++k) r.v[k] = codec::round_to_own_nan<float>(a[k]);
}

__device__ __forceinline__ void round_raw(const float a[kGroup], Elems<uint32_t, kGroup / 2>& r) {
#pragma unroll
  for (int k = 0; k < kGroup / 2; ++k) r.v[k] = codec::bf16_pair_word_own_nan(a[2 * k], a[2 * k + 1]);
}

// The unit's ReLU of r, whose values widened are x: v < 0 ? 0 : v, keeping -0 and NaN. bf16
// pairs in their words, clearing a negative value's half.
__device__ __forceinline__ Elems<float, kGroup> relu_raw(const Elems<float, kGroup>& r, const float x[kGroup]) {
  Elems<float, kGroup> y;
#pragma unroll
  for (int k = 0; k < kGroup; ++k) y.v[k] = x[k] < 0.0f ? 0.0f : r.v[k];
  return y;
}

__device__ __forceinline__ Elems<uint32_t, kGroup / 2> relu_raw(const Elems<uint32_t, kGroup / 2>& r,
                                                                const float x[kGroup]) {
  Elems<uint32_t, kGroup / 2> y = r;
#pragma unroll
  for (int k = 0; k < kGroup / 2; ++k) {
    if (x[2 * k] < 0.0f) y.v[k] &= 0xFFFF0000u;
    if (x[2 * k + 1] < 0.0f) y.v[k] &= 0x0000FFFFu;
  }
  return y;
}

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

// Affine: the unit's fused forward (PackParams::mean): the values packed are a = T(fma(x,
// alpha_c, shift_c)) of the loaded x, not x. Common: every group of the launch is whole, its
// tensors aligned for vector access and its index math 32-bit (pack_common_path), so that the
// kernel holds none of the other paths' branches and registers (the kernel for the rest holds
// them all: on an H200 it executed about twice the instructions per element of the common
// path, and ptxas spilled some of its registers).
template <int Bits, typename T, bool NHWC, bool Affine, bool Common>
__global__ void __launch_bounds__(kThreads, kStreamBlocks) pack_kernel(PackParams p, Index ix) {
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
  // forms, at most a grid's width of groups past the end, is below 2^32).
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
  for (I g0 = first; g0 < static_cast<I>(groups); g0 += kPackUnroll * stride) {
    PackRaw<T> raws[kPackUnroll];  // each group's elements, loaded first
#pragma unroll
    for (int u = 0; u < kPackUnroll; ++u) {
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
    for (int u = 0; u < kPackUnroll; ++u) {
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

// The codes of 4 consecutive elements from e (a multiple of 4) as one 32-bit (8-bit codes),
// 16-bit (4-bit) or 8-bit (2-bit) word, and the code of one element.
template <int Bits>
__device__ __forceinline__ void read_codes4(const uint8_t* codes, int64_t e, uint32_t q[4]) {
  uint32_t w;
  if constexpr (Bits == 8)
    w = target::load<uint32_t>(codes + e);
  else if constexpr (Bits == 4)
    w = target::load<uint16_t>(codes + e / 2);
  else
    w = codes[e / 4];
#pragma unroll
  for (int k = 0; k < 4; ++k) q[k] = (w >> (Bits * k)) & ((1u << Bits) - 1);
}

template <int Bits>
__device__ __forceinline__ uint32_t read_code(const uint8_t* codes, int64_t e) {
  if constexpr (Bits == 8) {
    return codes[e];
  } else {
    constexpr int shift = Bits == 4 ? 1 : 2;  // e / codes per byte
    return (codes[e >> shift] >> (Bits * (e & ((1 << shift) - 1)))) & ((1u << Bits) - 1);
  }
}

// codec::code_float of byte j of `word`, 2^23 + the byte, by one byte permute: the byte, then
// 0, 0 and 0x4B, where extracting the byte and setting the exponent took two instructions.
__device__ __forceinline__ float byte_code_float(uint32_t word, int j) {
  return codec::float_of_bits(__byte_perm(word, 0x4B000000u, 0x7650u | j));
}

// codec::code_float of each of the N codes of `word` (code k at bit Bits * k): the codes are
// spread one to a byte (8 / Bits masks of the word, each one or two instructions), then each
// made a float by byte_code_float, where extracting a code and setting its exponent took two
// or three instructions each.
template <int Bits, int N>
__device__ __forceinline__ void code_floats(uint64_t word, float out[N]) {
  constexpr int per_byte = 8 / Bits, per_half = 32 / Bits;
  constexpr uint32_t low = 0x01010101u * ((1u << Bits) - 1);  // each byte's low Bits bits
#pragma unroll
  for (int h = 0; h * per_half < N; ++h) {
    const uint32_t half = static_cast<uint32_t>(word >> (32 * h));
#pragma unroll
    for (int f = 0; f < per_byte; ++f) {
      const uint32_t spread = (half >> (Bits * f)) & low;  // byte j: code h * per_half + j * per_byte + f
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const int k = h * per_half + j * per_byte + f;
        if (k < N) out[k] = byte_code_float(spread, j);
      }
    }
  }
}

// Bytes that hold 4 codes: read_codes4's word, whose alignment the fast paths check.
__host__ __device__ __forceinline__ uintptr_t code_word_bytes(int bits) { return 4 * bits / 8; }

// The codes of G consecutive elements from e (a multiple of G) as one word of G * Bits / 8
// bytes (1 to 8), which must be aligned to its size: code k is bits Bits * k up of the word.
template <int Bits, int G>
__device__ __forceinline__ uint64_t read_code_word(const uint8_t* codes, int64_t e) {
  constexpr int bytes = G * Bits / 8;
  const uint8_t* at = codes + e * Bits / 8;
  if constexpr (bytes == 8) {
    return target::load<uint64_t>(at);
  } else if constexpr (bytes == 4) {
    return target::load<uint32_t>(at);
  } else if constexpr (bytes == 2) {
    return target::load<uint16_t>(at);
  } else {
    static_assert(bytes == 1, "a group's codes are 1, 2, 4 or 8 bytes");
    return *at;
  }
}

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

// The BatchNorm-and-ReLU backward from the codes. A 2-D grid: blockIdx.y is the channel, so
// its constants are loaded once per thread, and blockIdx.x splits the channel's N planes so
// that a few channels still fill the GPU (one block per channel, as LibTorch's NCHW
// BatchNorm kernels do, leaves most SMs idle for the 16 to 64 channels of early layers).
// When a plane is a multiple of 4 elements, a thread takes 4 at a time: one float4 of g_r
// (8 bytes in bf16) and 2 or 4 bytes of codes.
constexpr int kBnThreads = 256;

struct ChannelWalk {
  uint32_t per_plane;  // steps per plane: plane / 4 (vector path) or plane
  uint32_t steps;      // per_plane * batch (< 2^31)
  Divider by_per_plane;
  bool vec;
};

__device__ __forceinline__ int64_t walk_element(const ChannelWalk& w, uint32_t j, int64_t c, int64_t channels,
                                               int64_t plane) {
  const uint32_t n = divide(j, w.by_per_plane), k = j - n * w.per_plane;
  return (int64_t{n} * channels + c) * plane + (w.vec ? 4 * int64_t{k} : int64_t{k});
}

// Walks this block's share of channel c: four(e, q[4], g) per 4 elements (vector path) or
// one(e, q, g) per element, with the codes q and the gradient g (widened to float) read at
// element e.
template <int Bits, typename T, typename Four, typename One>
__device__ __forceinline__ void walk_channel(const BnBackwardParams& p, const ChannelWalk& w, int64_t c, Four four,
                                             One one) {
  const T* grad = static_cast<const T*>(p.grad);
  for (uint32_t j = blockIdx.x * blockDim.x + threadIdx.x; j < w.steps; j += gridDim.x * blockDim.x) {
    const int64_t e = walk_element(w, j, c, p.channels, p.plane);
    if (w.vec) {
      uint32_t q[4];
      read_codes4<Bits>(p.codes, e, q);
      const auto g = target::load<Elems<T, 4>>(grad + e);
      float gf[4];
      widen_elems<T, 4>(g, gf);
      four(e, q, make_float4(gf[0], gf[1], gf[2], gf[3]));
    } else {
      one(e, read_code<Bits>(p.codes, e), codec::widen(grad[e]));
    }
  }
}

// Adds a and b over the 32 lanes of a warp; lane 0 holds the sums.
__device__ __forceinline__ void warp_sum(double& a, double& b) {
#pragma unroll
  for (int d = 16; d > 0; d /= 2) {
    a += __shfl_down_sync(0xFFFFFFFFu, a, d);
    b += __shfl_down_sync(0xFFFFFFFFu, b, d);
  }
}

// The GPU's BatchNorm backward works with u = q - s (codec::code_float(q) -
// codec::code_origin(s): x_hat' is u d + d/2 - b_c) rather than with x_hat': per element, the
// sums take g_a and g_a u, and g_x is scale g_a + (base + slope u), with base and slope per
// channel (bn_coefficients). The algebra is the CPU path's; the rounding differs (the GPU
// rounds no x_hat' * mean(g_a x_hat') per element), within the agreement the tests ask.

// Adds g_a and g_a u of one element to sum_a and sum_au (g_a u rounded once, with the add):
// the mask is u >= 0, which is codec::mask_by_steps (compared on u rather than on q and
// origin, some of the BatchNorm kernels take 0.1 to 0.6 fewer instructions an element).
// q: codec::code_float(q); origin: codec::code_origin(s).
__device__ __forceinline__ void bn_terms(float q, float grad, float origin, float& sum_a, float& sum_au) {
  const float u = q - origin;
  const float ga = u >= 0.0f ? grad : 0.0f;  // a select: a masked NaN gradient is 0
  sum_a += ga;
  sum_au = fmaf(ga, u, sum_au);
}

// Channel c's sum g_a x_hat' from its sums of g_a and g_a u, in double.
__device__ __forceinline__ double bn_sum_ax(const BnBackwardParams& p, int64_t c, double sum_a, double sum_au,
                                            float d) {
  return double{d} * sum_au + (0.5 * d - p.b[c]) * sum_a;
}

// g_beta and g_g of channel c from its sums. The clamp's gradient, as threshold_backward:
// none where g = max(gamma, gamma_min) <= gamma_min; a NaN g passes its (NaN) gradient.
__device__ __forceinline__ void bn_write_grads(const BnBackwardParams& p, int64_t c, double sum_a, double sum_ax) {
  p.g_beta[c] = static_cast<float>(sum_a);
  p.g_g[c] = p.mask_g_g && p.g[c] <= p.gamma_min ? 0.0f : static_cast<float>(sum_ax);
}

// g_x = scale (g_a - mean_a - x_hat' mean_ax), x_hat' = u d + (d/2 - b_c), as scale g_a +
// (base + slope u): base and slope from the means in double, rounded once.
struct BnCoefficients {
  float scale, base, slope;
};
__device__ __forceinline__ BnCoefficients bn_coefficients(const BnBackwardParams& p, int64_t c, double sum_a,
                                                          double sum_ax, double m, float d) {
  const float scale = __fmul_rn(p.g[c], p.invstd[c]);
  const double mean_a = sum_a / m, mean_ax = sum_ax / m;
  return {scale, static_cast<float>(-double{scale} * (mean_a + mean_ax * (0.5 * d - p.b[c]))),
          static_cast<float>(-double{scale} * mean_ax * d)};
}

// g_x of one element from its channel's coefficients (q and origin as bn_terms').
__device__ __forceinline__ float bn_g_x(float q, float grad, float origin, const BnCoefficients& k) {
  const float u = q - origin;
  const float ga = u >= 0.0f ? grad : 0.0f;
  return fmaf(k.scale, ga, fmaf(k.slope, u, k.base));
}

// Channel c's block sums in p.partials: gridDim.x of sum g_a, then gridDim.x of sum g_a u.
__device__ __forceinline__ double* channel_partials(const BnBackwardParams& p, int64_t c) {
  return p.partials + 2 * int64_t{gridDim.x} * c;
}

// Per channel (blockIdx.y, striding by gridDim.y past 65535 channels): this block's sum g_a
// and sum g_a u, into its own slot of p.partials. A thread adds up to 4 terms in float,
// then in double; every block writes its slots, also one that found no elements.
template <int Bits, typename T>
__global__ void bn_reduce_kernel(BnBackwardParams p, ChannelWalk w) {
  __shared__ double part[2][kBnThreads / 32];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  for (int64_t c = blockIdx.y; c < p.channels; c += gridDim.y) {
    const float s = codec::code_origin(p.offsets[c]);
    double sum_a = 0.0, sum_au = 0.0;
    walk_channel<Bits, T>(
        p, w, c,
        [&](int64_t, const uint32_t q[4], float4 g) {
          float a = 0.0f, au = 0.0f;
          bn_terms(codec::code_float(q[0]), g.x, s, a, au), bn_terms(codec::code_float(q[1]), g.y, s, a, au);
          bn_terms(codec::code_float(q[2]), g.z, s, a, au), bn_terms(codec::code_float(q[3]), g.w, s, a, au);
          sum_a += a, sum_au += au;
        },
        [&](int64_t, uint32_t q, float g) {
          float a = 0.0f, au = 0.0f;
          bn_terms(codec::code_float(q), g, s, a, au);
          sum_a += a, sum_au += au;
        });
    // Block sum: within each warp by shuffles, then across the warps by warp 0.
    warp_sum(sum_a, sum_au);
    if (lane == 0) part[0][warp] = sum_a, part[1][warp] = sum_au;
    __syncthreads();
    if (warp == 0) {
      sum_a = lane < kBnThreads / 32 ? part[0][lane] : 0.0;
      sum_au = lane < kBnThreads / 32 ? part[1][lane] : 0.0;
      warp_sum(sum_a, sum_au);
      if (lane == 0) {
        double* slots = channel_partials(p, c);
        slots[blockIdx.x] = sum_a;
        slots[gridDim.x + blockIdx.x] = sum_au;
      }
    }
    __syncthreads();  // part[] is reused by the next channel
  }
}

// Every block of channel c adds the channel's gridDim.x partial sums the same way (warp 0,
// lane l taking slots l, l + 32, ..., then the shuffle tree), so all agree, and so do runs.
// Its thread 0 makes the channel's coefficients, once for the block (a double division is a
// sequence of some 20 FP64 instructions; every thread dividing cost as much as its elements).
template <int Bits, typename T>
__global__ void bn_apply_kernel(BnBackwardParams p, ChannelWalk w) {
  T* grad_in = static_cast<T*>(p.grad_in);
  __shared__ BnCoefficients shared;
  const double m = static_cast<double>(w.steps) * (w.vec ? 4 : 1);  // elements in a channel
  const float d = codec::bin_width(p.window, Bits);
  for (int64_t c = blockIdx.y; c < p.channels; c += gridDim.y) {
    if (threadIdx.x < 32) {
      const double* slots = channel_partials(p, c);
      double a = 0.0, au = 0.0;
      for (unsigned k = threadIdx.x; k < gridDim.x; k += 32) a += slots[k], au += slots[gridDim.x + k];
      warp_sum(a, au);
      if (threadIdx.x == 0) {
        const double ax = bn_sum_ax(p, c, a, au, d);
        shared = bn_coefficients(p, c, a, ax, m, d);
        if (blockIdx.x == 0) bn_write_grads(p, c, a, ax);
      }
    }
    __syncthreads();
    const BnCoefficients k = shared;
    __syncthreads();  // shared is rewritten for the next channel
    const float s = codec::code_origin(p.offsets[c]);
    auto g_x = [&](uint32_t q, float grad) { return bn_g_x(codec::code_float(q), grad, s, k); };
    walk_channel<Bits, T>(
        p, w, c,
        [&](int64_t e, const uint32_t q[4], float4 g) {
          Elems<T, 4> out;
          out.v[0] = codec::round_to_own_nan<T>(g_x(q[0], g.x));
          out.v[1] = codec::round_to_own_nan<T>(g_x(q[1], g.y));
          out.v[2] = codec::round_to_own_nan<T>(g_x(q[2], g.z));
          out.v[3] = codec::round_to_own_nan<T>(g_x(q[3], g.w));
          target::store(grad_in + e, out);
        },
        [&](int64_t e, uint32_t q, float g) { grad_in[e] = codec::round_to_own_nan<T>(g_x(q, g)); });
  }
}

// The BatchNorm-and-ReLU backward of channels-last tensors: the batch * plane rows of `channels`
// elements. A lane takes V consecutive channels of a row: V = 8 where the channels are a
// multiple of 8 and the tensors aligned for it (every layer of the networks), so that a row's 8
// gradients are one vector access and their codes one word (V = 4 alike where p.nhwc_vector
// asks: nhwc_vector); else V = 1, an element at a time. A block is 32 lanes (threadIdx.x) by
// kNhwcR warps (threadIdx.y). The lanes of a warp read consecutive memory: `lanes` vectors of V
// channels (C / V rounded up to a power of two, at most 32) of 32 / lanes consecutive rows, so
// that a layer of 16 channels leaves no lane idle. blockIdx.x tiles the channels and blockIdx.y
// strides over the rows, a thread taking kNhwcRows of its rows at a time: their loads first, so
// that several are in flight. Each thread adds each batch of kNhwcRows terms of a channel in
// float and the batches in double (as bn_reduce_kernel: a double add per term, with its
// conversion from float, bound the kernel by those instructions); a block adds its threads of a
// channel in order of warp, then row within the warp, into the block's slot of p.partials
// (channel c's gridDim.y slots of sum g_a, then gridDim.y of sum g_a u, at 2 * gridDim.y * c, as
// channel_partials); bn_nhwc_total_kernel adds a channel's slots with a block of threads and
// writes the channel's coefficients after them (nhwc_coefficients), and bn_nhwc_apply_kernel
// writes g_x from them.
constexpr int kNhwcR = 8, kNhwcRows = 4, kNhwcVector = 8;

// The blocks of the reduce and the apply that an SM holds at once, as their launch bounds make
// sure: 2 at 8 channels a lane (ptxas gives them 92 to 121 registers a thread, 256 threads a
// block, 64K registers an SM; `BLPA_SASS_RESOURCES=1 scripts/sass-hot-path.sh` lists them), 3
// at 4 (56 to 70), 5 at one (31 to 48). bn_nhwc_grid sizes the grid by them: a count in the
// source, not asked of the runtime, so that the tests' emulator makes the GPU's grid and sums.
constexpr int nhwc_resident_blocks(int v) { return v == kNhwcVector ? 2 : v == 4 ? 3 : 5; }

struct NhwcWalk {
  int64_t rows;  // batch * plane
  int lanes;     // vectors of channels a warp covers in one row: a power of two, up to 32
};

// A thread's first channel (c, a multiple of V, and its lane among the warp's vectors) and
// first row; a block covers kNhwcR * 32 / lanes rows.
struct NhwcThread {
  int64_t c;
  int lane;
  int64_t r0;
};

template <int V>
__device__ __forceinline__ NhwcThread nhwc_thread(const NhwcWalk& w) {
  const int lane = static_cast<int>(threadIdx.x) & (w.lanes - 1), sub = static_cast<int>(threadIdx.x) / w.lanes;
  return {(int64_t{blockIdx.x} * w.lanes + lane) * V, lane,
          (int64_t{blockIdx.y} * kNhwcR + threadIdx.y) * (32 / w.lanes) + sub};
}

// This thread's rows of channels t.c .. t.c + V - 1, kNhwcRows at a time: the codes q (as
// codec::code_float) and the gradients g (widened to float) of each row's V elements from e
// are loaded first, then use(e, q, g) runs for each row, in row order, and batch() after each
// kNhwcRows rows.
template <int Bits, typename T, int V, typename Use, typename Batch>
__device__ __forceinline__ void walk_rows(const BnBackwardParams& p, const NhwcWalk& w, const NhwcThread& t, Use use,
                                          Batch batch) {
  const T* grad = static_cast<const T*>(p.grad);
  const int64_t c = t.c, stride = int64_t{gridDim.y} * kNhwcR * (32 / w.lanes);
  for (int64_t r0 = t.r0; r0 < w.rows; r0 += kNhwcRows * stride) {
    uint64_t words[kNhwcRows];  // V codes a row (rows past the end are neither loaded nor used)
    Elems<T, V> gs[kNhwcRows];
#pragma unroll
    for (int u = 0; u < kNhwcRows; ++u) {
      const int64_t e = (r0 + u * stride) * p.channels + c;
      if (r0 + u * stride >= w.rows) continue;
      if constexpr (V == 1) {
        words[u] = read_code<Bits>(p.codes, e), gs[u].v[0] = grad[e];
      } else {
        words[u] = read_code_word<Bits, V>(p.codes, e), gs[u] = target::load<Elems<T, V>>(grad + e);
      }
    }
#pragma unroll
    for (int u = 0; u < kNhwcRows; ++u) {
      if (r0 + u * stride >= w.rows) continue;
      float q[V], g[V];
      code_floats<Bits, V>(words[u], q);
      widen_elems<T, V>(gs[u], g);
      use((r0 + u * stride) * p.channels + c, q, g);
    }
    batch();
  }
}

template <int Bits, typename T, int V>
__global__ void __launch_bounds__(kNhwcR * 32, nhwc_resident_blocks(V))
    bn_nhwc_reduce_kernel(BnBackwardParams p, NhwcWalk w) {
  static_assert(V <= kNhwcR, "a warp adds each of a thread's channels");
  __shared__ double part[2][V][kNhwcR][32];  // V = 8: 32 KB
  const NhwcThread t = nhwc_thread<V>(w);
  const int64_t c = t.c;
  double sum_a[V] = {}, sum_au[V] = {};
  if (c < p.channels) {
    float s[V], batch_a[V] = {}, batch_au[V] = {};
#pragma unroll
    for (int k = 0; k < V; ++k) s[k] = codec::code_origin(p.offsets[c + k]);
    walk_rows<Bits, T, V>(
        p, w, t,
        [&](int64_t, const float* q, const float* g) {
#pragma unroll
          for (int k = 0; k < V; ++k) bn_terms(q[k], g[k], s[k], batch_a[k], batch_au[k]);
        },
        [&] {
#pragma unroll
          for (int k = 0; k < V; ++k) {
            sum_a[k] += batch_a[k], sum_au[k] += batch_au[k];
            batch_a[k] = 0.0f, batch_au[k] = 0.0f;
          }
        });
  }
  // The block's sums: every thread's, then one barrier, then channel c + k's by warp k: lane j
  // adds column j over the warps, then the lanes of one vector of channels (j, j + lanes, ...)
  // add theirs by a shuffle tree, leaving the block's sum in lane j < lanes. (A channel at a
  // time by warp 0 alone took 2 V barriers; then lanes below `lanes` adding their 8 x 32 / lanes
  // terms one after another made chains of 128 dependent double adds at 16 channels.)
#pragma unroll
  for (int k = 0; k < V; ++k) {
    part[0][k][threadIdx.y][threadIdx.x] = sum_a[k];
    part[1][k][threadIdx.y][threadIdx.x] = sum_au[k];
  }
  __syncthreads();
  const int k = static_cast<int>(threadIdx.y), j = static_cast<int>(threadIdx.x);
  if (k < V) {  // the whole warp: it shuffles
    double a = 0.0, ax = 0.0;
#pragma unroll
    for (int r = 0; r < kNhwcR; ++r) a += part[0][k][r][j], ax += part[1][k][r][j];
    for (int offset = 16; offset >= w.lanes; offset /= 2) {
      a += __shfl_down_sync(0xffffffffu, a, offset);
      ax += __shfl_down_sync(0xffffffffu, ax, offset);
    }
    if (j < w.lanes && c < p.channels) {
      double* slots = p.partials + 2 * int64_t{gridDim.y} * (c + k);
      slots[blockIdx.y] = a;
      slots[gridDim.y + blockIdx.y] = ax;
    }
  }
}

// The channels' coefficients after the `slots` row-block sums of each: where
// bn_nhwc_total_kernel writes them, [channels] of 3 floats in the 2 * channels doubles there.
__host__ __device__ __forceinline__ BnCoefficients* nhwc_coefficients(const BnBackwardParams& p, int64_t slots) {
  static_assert(sizeof(BnCoefficients) <= 2 * sizeof(double));
  return reinterpret_cast<BnCoefficients*>(p.partials + 2 * slots * p.channels);
}

// Per channel (blockIdx.x, striding by gridDim.x), a block adds the channel's `slots` row-block
// sums (thread t taking slots t, t + blockDim.x, ...; then each warp's shuffle tree, then warp 0
// over the warps' sums: a fixed order), writes g_beta and g_g, and the coefficients, in double
// rounded to float, once per channel (each thread of the apply dividing its channels' sums
// cost more than its elements: 16 double divisions a thread where V = 8). (One thread per
// channel adding its slots one by one waited on each load in turn: 2 x 2,112 of them for the
// 16 channels of ResNet-164's first stage on an H200.)
__global__ void bn_nhwc_total_kernel(BnBackwardParams p, int64_t slots) {
  __shared__ double part[2][32];  // a sum per warp: up to 1,024 threads
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, warps = blockDim.x / 32;
  BnCoefficients* coefficients = nhwc_coefficients(p, slots);
  const double m = static_cast<double>(p.batch * p.plane);
  const float d = codec::bin_width(p.window, p.bits);
  for (int64_t c = blockIdx.x; c < p.channels; c += gridDim.x) {
    const double* own = p.partials + 2 * slots * c;
    double a = 0.0, au = 0.0;
    for (int64_t k = threadIdx.x; k < slots; k += blockDim.x) a += own[k], au += own[slots + k];
    warp_sum(a, au);
    if (lane == 0) part[0][warp] = a, part[1][warp] = au;
    __syncthreads();
    if (warp == 0) {
      a = lane < warps ? part[0][lane] : 0.0;
      au = lane < warps ? part[1][lane] : 0.0;
      warp_sum(a, au);
      if (lane == 0) {
        const double ax = bn_sum_ax(p, c, a, au, d);
        coefficients[c] = bn_coefficients(p, c, a, ax, m, d);
        bn_write_grads(p, c, a, ax);
      }
    }
    __syncthreads();  // part[] is reused by the next channel
  }
}

// Threads for bn_nhwc_total_kernel's block: a warp per 32 slots, up to 1,024 threads, so
// that a thread adds a few of the slots of each sum at most (bn_nhwc_grid: 264 on an H200 at
// 8 channels a lane, as its registers allow 2 blocks an SM).
int nhwc_total_threads(int64_t slots) { return 32 * static_cast<int>(std::clamp<int64_t>((slots + 31) / 32, 1, 32)); }

template <int Bits, typename T, int V>
__global__ void __launch_bounds__(kNhwcR * 32, nhwc_resident_blocks(V))
    bn_nhwc_apply_kernel(BnBackwardParams p, NhwcWalk w) {
  const NhwcThread t = nhwc_thread<V>(w);
  const int64_t c = t.c;
  if (c >= p.channels) return;
  T* grad_in = static_cast<T*>(p.grad_in);
  const BnCoefficients* coefficients = nhwc_coefficients(p, gridDim.y);
  BnCoefficients k[V];
  float s[V];
#pragma unroll
  for (int j = 0; j < V; ++j) k[j] = coefficients[c + j], s[j] = codec::code_origin(p.offsets[c + j]);
  // grad_in may be grad: each element is read and then written by this thread alone.
  walk_rows<Bits, T, V>(
      p, w, t,
      [&](int64_t e, const float* q, const float* g) {
        Elems<T, V> out;
#pragma unroll
        for (int j = 0; j < V; ++j) out.v[j] = codec::round_to_own_nan<T>(bn_g_x(q[j], g[j], s[j], k[j]));
        if constexpr (V == 1)
          grad_in[e] = out.v[0];
        else
          target::store(grad_in + e, out);
      },
      [] {});
}

using codec::dispatch;  // blpa/codec_dispatch.h: one kernel per (K, T, NHWC), as the CPU path's

}  // namespace

void compute_offsets(const OffsetParams& p) {
  if (p.channels == 0) return;
  const target::DeviceGuard guard(p.device);  // a launch goes to the current device
  const Launch l = launch_config(p.channels, p.device);
  BLPA_LAUNCH(l.blocks, kThreads, l.stream, offsets_kernel)(p);
  target::launch_check();
}

void channel_coding(const ChannelParams& p) {
  if (p.channels == 0) return;
  const target::DeviceGuard guard(p.device);  // a launch goes to the current device
  const Launch l = launch_config(p.channels, p.device);
  BLPA_LAUNCH(l.blocks, kThreads, l.stream, channel_kernel)(p);
  target::launch_check();
}

// The grid of pack or unpack (groups of `group` elements): launch_config's, and where it is
// capped (a thread takes several groups, a grid's width apart) for NHWC rows of channels
// rounded down to a multiple of the blocks whose threads span a whole number of rows
// (m = C / gcd(C, kThreads group): 1 for every power of two up to kThreads group channels,
// 2,048 for pack and bf16 unpack, 1,024 for float32 unpack), so that each thread's groups lie
// in one row (the kernels' kOneRow). Where m exceeds the grid the launch takes the general
// kernel (one_row_grid, in pack_common_path and unpack_common_path).
int row_blocks(int64_t numel, int group, int64_t channels, bool nhwc, int device) {
  const int64_t groups = (numel + group - 1) / group;
  int64_t blocks = launch_config(groups, device).blocks;
  if (nhwc && channels % group == 0 && groups > blocks * kThreads) {
    const int64_t m = channels / std::gcd<int64_t>(channels, int64_t{kThreads} * group);
    if (blocks >= m) blocks -= blocks % m;
  }
  return static_cast<int>(blocks);
}

// Whether every group a thread of a grid of `blocks` takes lies in the row of its first: it
// takes one group at most, or the grid is a whole number of rows of channels wide.
bool one_row_grid(int blocks, int64_t groups, int group, int64_t channels) {
  return groups <= int64_t{blocks} * kThreads || int64_t{blocks} * kThreads * group % channels == 0;
}

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
      BLPA_LAUNCH(l.blocks, kThreads, l.stream, pack_kernel<K, T, L, A, C>)(q, ix);
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

namespace {

struct BnGrid {
  ChannelWalk walk;
  dim3 grid;
};

BnGrid bn_grid(const BnBackwardParams& p) {
  const int64_t per_channel = p.batch * p.plane;  // > 0: the caller handles empty tensors
  TORCH_CHECK(per_channel < (int64_t{1} << 31), "blpa: BatchNorm backward supports up to 2^31 elements per channel, got ",
              per_channel);
  ChannelWalk w;
  // The vector path reads 4 codes as one 32-bit (8-bit codes), 16-bit (4-bit) or 8-bit word,
  // and 4 elements of g_r as 16 (float) or 8 (bf16) bytes.
  const uintptr_t elems4 = p.bf16 ? 8 : 16;
  w.vec = p.plane % 4 == 0 && aligned(p.grad, elems4) && aligned(p.grad_in, elems4) &&
          aligned(p.codes, code_word_bytes(p.bits));
  w.per_plane = static_cast<uint32_t>(w.vec ? p.plane / 4 : p.plane);
  w.steps = static_cast<uint32_t>(w.per_plane * p.batch);
  w.by_per_plane = make_divider(w.per_plane);
  // The capped grid of the other kernels, split over the channels; past 65535 channels a
  // block takes several (gridDim.y stride).
  const int64_t per_channel_blocks = std::clamp<int64_t>((grid_cap(p.device) + p.channels - 1) / p.channels, 1,
                                                         (int64_t{w.steps} + kBnThreads - 1) / kBnThreads);
  return {w, dim3(static_cast<unsigned>(per_channel_blocks), static_cast<unsigned>(std::min<int64_t>(p.channels, 65535)))};
}

// NHWC: the channels a lane takes in a row (kNhwcVector, or 4 where p.nhwc_vector asks, where
// the channels and every pointer allow the vector accesses, else 1). With 4, the kernels hold
// about 60 registers instead of about 95: twice the warps an SM holds, for about a third more
// instructions an element (scripts/sass-hot-path.sh); which is faster, a GPU must tell.
int nhwc_vector(const BnBackwardParams& p) {
  TORCH_CHECK(p.nhwc_vector == 0 || p.nhwc_vector == 4 || p.nhwc_vector == kNhwcVector,
              "blpa: the BatchNorm backward takes 4 or 8 channels a thread, not ", p.nhwc_vector);
  const int v = p.nhwc_vector ? p.nhwc_vector : kNhwcVector;
  const uintptr_t bytes = std::min(16, v * (p.bf16 ? 2 : 4));  // Elems<T, v>'s alignment
  const bool vec = p.channels % v == 0 && aligned(p.grad, bytes) && aligned(p.grad_in, bytes) &&
                   aligned(p.codes, v * p.bits / 8);
  return vec ? v : 1;
}

// NHWC: the vectors of channels a warp covers in a row (C / V rounded up to a power of two,
// at most 32).
int nhwc_lanes(const BnBackwardParams& p) {
  const int v = nhwc_vector(p);
  const int64_t vectors = (p.channels + v - 1) / v;
  int lanes = 1;
  while (lanes < 32 && lanes < vectors) lanes *= 2;
  return lanes;
}

// NHWC: the channel tiles by the row blocks. The row blocks fill one wave: the blocks an SM
// holds at once (p.nhwc_blocks_per_sm where given, for measurements) times the SMs, over the
// tiles; each thread strides over its rows. (The cap of the other launches, 16 blocks an SM,
// made 8 waves, and a thread of a 16-channel layer of ResNet-164 at batch 128 took one row, 8
// elements, beside its block's epilogue: 16 conversions and shared stores, a barrier, the
// warps' sums; and 2,112 partial sums a channel for the total kernel to add.)
dim3 bn_nhwc_grid(const BnBackwardParams& p) {
  const int lanes = nhwc_lanes(p), v = nhwc_vector(p);
  const int64_t tile = int64_t{lanes} * v, tiles = (p.channels + tile - 1) / tile;
  const int64_t rows = p.batch * p.plane, block_rows = kNhwcR * (32 / lanes);
  TORCH_CHECK(tiles < (int64_t{1} << 31), "blpa: BatchNorm backward supports fewer than 2^31 tiles of ", tile,
              " channels, got ", p.channels, " channels");
  const int per_sm = p.nhwc_blocks_per_sm > 0 ? p.nhwc_blocks_per_sm : nhwc_resident_blocks(v);
  const int64_t wave = int64_t{per_sm} * target::sm_count(p.device);
  const int64_t row_blocks =
      std::clamp<int64_t>(wave / tiles, 1, std::min<int64_t>((rows + block_rows - 1) / block_rows, 65535));
  return dim3(static_cast<unsigned>(tiles), static_cast<unsigned>(row_blocks));
}

}  // namespace

int64_t bn_workspace(const BnBackwardParams& p) {
  if (p.channels == 0 || p.batch * p.plane == 0) return 0;
  // NHWC: each row block's two sums per channel, then the coefficients (3 floats in 2 doubles).
  if (p.nhwc) return 2 * (int64_t{bn_nhwc_grid(p).y} + 1) * p.channels;
  // The grid depends on the pointers' alignment (the vector path takes 4 elements a step):
  // size the workspace with the p that bn_relu_backward will get.
  return 2 * int64_t{bn_grid(p).grid.x} * p.channels;
}

void bn_relu_backward(const BnBackwardParams& p) {
  // No elements: the grids below would be empty (the caller gives zero gradients).
  if (p.channels == 0 || p.batch * p.plane == 0) return;
  const target::DeviceGuard guard(p.device);  // a launch goes to the current device
  const target::Stream stream = target::current_stream(p.device);
  if (p.nhwc) {
    const dim3 grid = bn_nhwc_grid(p), block(32, kNhwcR);
    const NhwcWalk w{p.batch * p.plane, nhwc_lanes(p)};
    const int blocks = static_cast<int>(std::min<int64_t>(p.channels, grid_cap(p.device)));
    auto run = [&](auto k, auto t, auto v) {
      constexpr int Bits = decltype(k)::value, V = decltype(v)::value;
      using T = decltype(t);
      BLPA_LAUNCH(grid, block, stream, bn_nhwc_reduce_kernel<Bits, T, V>)(p, w);
      target::launch_check();
      BLPA_LAUNCH(blocks, nhwc_total_threads(grid.y), stream, bn_nhwc_total_kernel)(p, grid.y);
      target::launch_check();
      BLPA_LAUNCH(grid, block, stream, bn_nhwc_apply_kernel<Bits, T, V>)(p, w);
    };
    dispatch(p.bits, p.bf16, true, [&](auto k, auto t, auto) {
      const int v = nhwc_vector(p);
      if (v == kNhwcVector)
        run(k, t, std::integral_constant<int, kNhwcVector>{});
      else if (v == 4)
        run(k, t, std::integral_constant<int, 4>{});
      else
        run(k, t, std::integral_constant<int, 1>{});
    });
    target::launch_check();
    return;
  }
  const auto [w, grid] = bn_grid(p);
  dispatch(p.bits, p.bf16, false, [&, w = w, grid = grid](auto k, auto t, auto) {
    BLPA_LAUNCH(grid, kBnThreads, stream, bn_reduce_kernel<decltype(k)::value, decltype(t)>)(p, w);
    target::launch_check();
    BLPA_LAUNCH(grid, kBnThreads, stream, bn_apply_kernel<decltype(k)::value, decltype(t)>)(p, w);
  });
  target::launch_check();
}

}  // namespace BLPA_KERNELS_NAMESPACE
