// What the codec's kernels share (cuda/codec_kernels.cuh, which says what its includer
// defines): the launch's grid, the index math that finds a group's channels, a group's
// loads and stores, and the words the codes are read as.
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
// before it encodes any, so that their loads are in flight together (bf16's common path may
// take 4 instead: pack_kernel's Unroll).
constexpr int kPackUnroll = 2;
// pack and unpack: blocks an SM must hold at once (at most 64 registers a thread), so that
// their unrolled loads do not cost them the warps that hide those loads' latency.
constexpr int kStreamBlocks = 4;

struct Launch {
  int blocks;
  target::Stream stream;
};

// The grid cap: 16 blocks of kThreads per SM, two to four waves of the 4 to 8 an SM holds at
// once (pack and unpack are held to 4 by __launch_bounds__; about five of 3 for the bf16 pack
// that loads 4 groups a thread, BLPA_PACK_UNROLL=4).
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

using codec::dispatch;  // blpa/codec_dispatch.h: one kernel per (K, T, NHWC), as the CPU path's

}  // namespace

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

}  // namespace BLPA_KERNELS_NAMESPACE
