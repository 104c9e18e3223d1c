// CPU path of the codec and the one dispatch point to the CUDA kernels.
#include "blpa/codec.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/record_function.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <type_traits>
#include <vector>

#include "blpa/codec_dispatch.h"
#include "blpa/codec_math.h"
#include "blpa/kernel_table.h"

namespace blpa {
namespace {

using codec::decode;
using codec::encode;

// The per-thread loops below are plain C++ that GCC vectorises. Each is compiled three times,
// for baseline x86-64 (SSE2), AVX2 with FMA and AVX-512, and the widest the CPU has is chosen at
// run time (as LibTorch's DispatchStub does; BLPA_CODEC_ISA=base|avx2 lowers the choice, for
// tests and measurements). The bits do not depend on the choice: the loops use IEEE-exact
// operations only, no contraction into FMA (-ffp-contract=off; std::fma where written), and sums whose
// order is written out (their lanes), which GCC may not reorder. BLPA_INLINE puts a loop's
// helpers and lambdas into the ISA's copy of it.
#define BLPA_INLINE __attribute__((always_inline))

enum class Isa { base, avx2, avx512 };

Isa detect_isa() {
#if defined(__x86_64__) && defined(__GNUC__)
  __builtin_cpu_init();
  const bool avx512 = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
  const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  Isa best = avx512 ? Isa::avx512 : avx2 ? Isa::avx2 : Isa::base;
  if (const char* cap = std::getenv("BLPA_CODEC_ISA")) {  // may lower the choice, never raise it
    const std::string want = cap;
    if (want == "base") best = Isa::base;
    if (want == "avx2" && best == Isa::avx512) best = Isa::avx2;
    if (!want.empty() && want != "base" && want != "avx2" && want != "avx512")  // a typo ran the widest, unsaid
      std::fprintf(stderr, "blpa: BLPA_CODEC_ISA=%s is not base, avx2 or avx512: ignored\n", cap);
  }
  return best;
#else
  return Isa::base;
#endif
}

Isa cpu_isa() {
  static const Isa isa = detect_isa();
  return isa;
}

// Whether the CUDA pack and unpack take their kernels for any shape at every launch, not the
// common path's where it applies: BLPA_CODEC_GENERAL=1 in the environment, to measure one
// against the other (and to run the general kernels' tests on the common shapes).
bool codec_general() {
  static const bool general = [] {
    const char* v = std::getenv("BLPA_CODEC_GENERAL");
    if (!v || !*v) return false;
    TORCH_CHECK(std::string(v) == "0" || std::string(v) == "1", "BLPA_CODEC_GENERAL must be 0 or 1, got '", v, "'");
    return *v == '1';
  }();
  return general;
}

// The groups of 8 a thread of the CUDA bf16 pack loads at once on its common path:
// BLPA_PACK_UNROLL=2 or 4 in the environment, for measurements (4: as many bytes in flight a
// thread as the float32 pack's 2 groups, at 3 blocks an SM instead of 4); 0 (the kernels'
// default, 2) without it.
int pack_unroll() {
  static const int chosen = [] {
    const char* v = std::getenv("BLPA_PACK_UNROLL");
    if (!v || !*v) return 0;
    TORCH_CHECK(std::string(v) == "2" || std::string(v) == "4", "BLPA_PACK_UNROLL must be 2 or 4, got '", v, "'");
    return *v - '0';
  }();
  return chosen;
}

// f's argument: whether floorf is one vector instruction in this copy (codec::floor_small).
using VectorFloor = std::true_type;
using NoVectorFloor = std::false_type;

#if defined(__x86_64__) && defined(__GNUC__)
template <typename F>
__attribute__((target("avx2,fma"))) void run_avx2(const F& f) {
  f(VectorFloor{});
}
template <typename F>
__attribute__((target("avx2,fma,avx512f,avx512bw,avx512vl,avx512dq"))) void run_avx512(const F& f) {
  f(VectorFloor{});
}
#endif

// Runs f (a lambda marked BLPA_INLINE, taking VectorFloor or NoVectorFloor) in the copy for
// the CPU's ISA.
template <typename F>
void with_isa(const F& f) {
#if defined(__x86_64__) && defined(__GNUC__)
  switch (cpu_isa()) {
    case Isa::avx512: return run_avx512(f);
    case Isa::avx2: return run_avx2(f);
    case Isa::base: break;
  }
#endif
  f(NoVectorFloor{});
}

// Work is split into element ranges that start on a byte boundary of the packed codes, so
// no two threads ever write the same byte (two 4-bit or four 2-bit codes share one).
constexpr int64_t kGrain = 1 << 15;
// Elements per block of the per-thread loops: small stack buffers that stay in L1.
constexpr int kBlock = 256;

// Where element i of the tensor's memory lies. NCHW: channel (i / plane) % channels, so a
// channel's elements come in runs of `plane`. NHWC (channels_last): channel i % channels.
struct Layout {
  int64_t numel, plane, channels;
  bool nhwc;
};

Layout layout_of(at::IntArrayRef sizes, bool nhwc) {
  TORCH_CHECK(sizes.size() >= 2, "blpa codec: expected a tensor with at least 2 dims (N x C x ...), got ",
              sizes.size(), " dims");
  int64_t plane = 1;
  for (size_t d = 2; d < sizes.size(); ++d) plane *= sizes[d];
  int64_t numel = sizes[0] * sizes[1] * plane;
  return {numel, plane, sizes[1], nhwc};
}

// Whether t is stored channels-last: false for a contiguous (NCHW) tensor, also one that is
// both (C == 1 or H * W == 1: the same memory order), true for a 4-D channels-last one.
bool stored_nhwc(const at::Tensor& t, const char* what) {
  if (t.is_contiguous()) return false;
  if (t.dim() == 4 && t.is_contiguous(at::MemoryFormat::ChannelsLast)) return true;
  TORCH_CHECK(false, "blpa codec: ", what, " must be contiguous (NCHW) or, if 4-D, channels-last contiguous ",
              "(NHWC); got sizes ", t.sizes(), " and strides ", t.strides(), " (call .contiguous() or "
              ".contiguous(at::MemoryFormat::ChannelsLast))");
}

// Calls f(begin, end, c) for each run of elements in [e0, e1) that share channel c (NCHW).
template <typename F>
BLPA_INLINE inline void for_each_channel_run(const Layout& l, int64_t e0, int64_t e1, F&& f) {
  while (e0 < e1) {
    const int64_t p = l.plane > 0 ? e0 / l.plane : 0;
    const int64_t end = std::min(e1, (p + 1) * l.plane);
    f(e0, end, p % l.channels);
    e0 = end;
  }
}

// Per-channel values laid out for NHWC blocks: entry j is channel j % C's, for j < C + kBlock,
// so that the values of elements [i, i + kBlock) are the contiguous entries from i % C on.
template <typename V, typename Src>
std::vector<V> repeat_channels(int64_t channels, Src&& src) {
  std::vector<V> out(channels + kBlock);
  for (int64_t j = 0; j < channels + kBlock; ++j) out[j] = src(j % channels);
  return out;
}

// Per-channel values for the CPU loops: [C] (NCHW) or repeat_channels (NHWC).
template <typename V, typename Src>
std::vector<V> per_channel(const Layout& l, Src&& src) {
  if (l.nhwc) return repeat_channels<V>(l.channels, src);
  std::vector<V> out(l.channels);
  for (int64_t c = 0; c < l.channels; ++c) out[c] = src(c);
  return out;
}

// Calls f(i, n, at) for the blocks of at most kBlock elements of [e0, e1), each in one
// channel run (NCHW) or anywhere (NHWC); at is the first index into a per-channel array:
// the channel itself (NCHW: one value for the block) or its index in repeat_channels (NHWC:
// one value per element).
template <typename F>
BLPA_INLINE inline void for_each_block(const Layout& l, int64_t e0, int64_t e1, F&& f) {
  if (l.nhwc) {
    for (int64_t i = e0; i < e1; i += kBlock) f(i, static_cast<int>(std::min<int64_t>(kBlock, e1 - i)), i % l.channels);
    return;
  }
  for_each_channel_run(l, e0, e1, [&](int64_t b, int64_t e, int64_t c) BLPA_INLINE {
    for (int64_t i = b; i < e; i += kBlock) f(i, static_cast<int>(std::min<int64_t>(kBlock, e - i)), c);
  });
}

// Codes per byte: 1, 2 or 4. Element j of a byte sits at bits [j*Bits, (j+1)*Bits).
template <int Bits>
constexpr int kPerByte = 8 / Bits;

// Writes the n codes q of elements [i, i + n) into the packed data. A byte is begun
// (assigned, its unused high bits 0) at its first element and finished (or'ed into) by the
// elements that follow, which the same thread writes next.
template <int Bits>
BLPA_INLINE inline void store_codes(uint8_t* out, int64_t i, int n, const uint8_t* q) {
  if constexpr (Bits == 8) {
    std::copy(q, q + n, out + i);
  } else {
    constexpr int per = kPerByte<Bits>;
    int k = 0;
    for (; k < n && (i + k) % per; ++k)
      out[(i + k) / per] = static_cast<uint8_t>(out[(i + k) / per] | q[k] << ((i + k) % per * Bits));
    uint8_t* o = out + (i + k) / per;
    const int bytes = (n - k) / per;
    for (int j = 0; j < bytes; ++j) {
      uint8_t byte = 0;
      for (int t = 0; t < per; ++t) byte = static_cast<uint8_t>(byte | q[k + per * j + t] << (t * Bits));
      o[j] = byte;
    }
    k += per * bytes;
    if (k < n) {  // the first elements of a byte: the next block or the zero padding ends it
      uint8_t byte = 0;
      for (int t = 0; k + t < n; ++t) byte = static_cast<uint8_t>(byte | q[k + t] << (t * Bits));
      o[bytes] = byte;
    }
  }
}

// Reads the n codes of elements [i, i + n) into q, one per byte.
template <int Bits>
BLPA_INLINE inline void read_codes(const uint8_t* data, int64_t i, int n, uint8_t* q) {
  if constexpr (Bits == 8) {
    std::copy(data + i, data + i + n, q);
  } else {
    constexpr int per = kPerByte<Bits>, mask = (1 << Bits) - 1;
    int k = 0;
    for (; k < n && (i + k) % per; ++k)  // the run starts inside a byte
      q[k] = (data[(i + k) / per] >> ((i + k) % per * Bits)) & mask;
    const uint8_t* src = data + (i + k) / per;
    const int bytes = (n - k) / per;
    for (int j = 0; j < bytes; ++j)
      for (int t = 0; t < per; ++t) q[k + per * j + t] = (src[j] >> (t * Bits)) & mask;
    k += per * bytes;
    // The run ends inside a byte: fewer than per codes are left. (Bounded by per rather than
    // by n, so that GCC 13 does not vectorise this loop into stores past q and warn of them.)
    for (int t = 0; t < per - 1; ++t)
      if (k + t < n) q[k + t] = (src[bytes] >> (t * Bits)) & mask;
  }
}

// A per-channel value of element k of a block: one value for the block (NCHW, hoisted by the
// caller into a local) or one per element (NHWC, from repeat_channels).
template <bool NHWC, typename V>
BLPA_INLINE inline V at_k(const V* p, int k) {
  return p[NHWC ? k : 0];
}

struct PackArgs {
  const void* v;
  const float* div;       // NCHW: [C]; NHWC: repeat_channels
  const int32_t* s;       // the offsets, as div
  uint8_t* out;
  void* relu;             // null, or v itself: receives max(v, 0) in v's type
  float d;
};

// div: the per-channel divisor (all ones when the caller gave none; x / 1 is exact).
// VF: encode's floor is floorf (codec::floor_small).
template <int Bits, typename T, bool NHWC, bool VF>
BLPA_INLINE inline void pack_range(const PackArgs& a, const Layout& l, int64_t e0, int64_t e1) {
  const T* v = static_cast<const T*>(a.v);
  T* relu = static_cast<T*>(a.relu);
  uint8_t q[kBlock];
  for_each_block(l, e0, e1, [&](int64_t i, int n, int64_t at) BLPA_INLINE {
    if constexpr (NHWC) {  // x is __restrict only here: the ReLU below writes v
      const T* __restrict x = v + i;
      const int32_t* __restrict s = a.s + at;
      const float* __restrict dc = a.div + at;
      for (int k = 0; k < n; ++k)
        q[k] = static_cast<uint8_t>(codec::encode<VF>(codec::widen(x[k]) / dc[k], s[k], Bits, a.d));
    } else {
      const T* __restrict x = v + i;
      const int32_t s = a.s[at];
      const float dc = a.div[at];
      for (int k = 0; k < n; ++k)
        q[k] = static_cast<uint8_t>(codec::encode<VF>(codec::widen(x[k]) / dc, s, Bits, a.d));
    }
    store_codes<Bits>(a.out, i, n, q);
    if (relu) {  // v itself, once the block is encoded
      T* y = relu + i;
      for (int k = 0; k < n; ++k) y[k] = codec::widen(y[k]) < 0.0f ? codec::round_to<T>(0.0f) : y[k];
    }
  });
}

template <int Bits, typename T, bool NHWC>
void pack_cpu(const PackArgs& a, const Layout& l) {
  constexpr int per = kPerByte<Bits>;
  at::parallel_for(0, (l.numel + per - 1) / per, kGrain, [&](int64_t pb, int64_t pe) {
    with_isa([&](auto vector_floor) BLPA_INLINE {
      pack_range<Bits, T, NHWC, decltype(vector_floor)::value>(a, l, pb * per, std::min(pe * per, l.numel));
    });
  });
}

// The unit's BatchNorm of the fused forward (bn_relu_pack), before the pack: a = T(fma(x,
// alpha_c, shift_c)) into `a`, both in x's layout. alpha, shift: [C] (NCHW) or
// repeat_channels (NHWC).
// std::fma is one instruction in the AVX2 and AVX-512 copies (which have FMA), a call in the
// SSE2 one: the same bits either way.
template <typename T, bool NHWC>
void bn_apply_cpu(const T* x, T* a, const float* alpha, const float* shift, const Layout& l) {
  at::parallel_for(0, l.numel, kGrain, [&](int64_t e0, int64_t e1) {
    with_isa([&](auto) BLPA_INLINE {
      for_each_block(l, e0, e1, [&](int64_t i, int n, int64_t at) BLPA_INLINE {
        const T* __restrict xi = x + i;
        T* __restrict ai = a + i;
        const float* __restrict al = alpha + at;
        const float* __restrict sh = shift + at;
        for (int k = 0; k < n; ++k)
          ai[k] = codec::round_to<T>(std::fma(codec::widen(xi[k]), at_k<NHWC>(al, k), at_k<NHWC>(sh, k)));
      });
    });
  });
}

struct UnpackArgs {
  const uint8_t* data;
  const int32_t* s;      // NCHW: [C]; NHWC: repeat_channels
  const float* b;        // as s (zeros unless x_hat is asked for)
  const float* gamma;    // as s (zeros unless r is asked for)
  void* x_hat;           // null or the output
  void* r;
  bool* mask;
  float d;
};

template <int Bits, typename T, bool NHWC>
BLPA_INLINE inline void unpack_range(const UnpackArgs& a, const Layout& l, int64_t e0, int64_t e1) {
  T* x_hat = static_cast<T*>(a.x_hat);
  T* r = static_cast<T*>(a.r);
  uint8_t q[kBlock];
  for_each_block(l, e0, e1, [&](int64_t i, int n, int64_t at) BLPA_INLINE {
    read_codes<Bits>(a.data, i, n, q);
    const int32_t* __restrict sp = a.s + at;
    if (x_hat) {
      const float* __restrict bp = a.b + at;
      T* __restrict y = x_hat + i;
      if constexpr (NHWC) {
        for (int k = 0; k < n; ++k) y[k] = codec::round_to<T>(codec::decode(q[k], sp[k], a.d) - bp[k]);
      } else {
        const int32_t s = sp[0];
        const float bc = bp[0];
        for (int k = 0; k < n; ++k) y[k] = codec::round_to<T>(codec::decode(q[k], s, a.d) - bc);
      }
    }
    if (r) {
      const float* __restrict gp = a.gamma + at;
      T* __restrict y = r + i;
      auto relu = [](float t) { return t > 0.0f ? t : 0.0f; };  // never NaN: decode is a number
      if constexpr (NHWC) {
        for (int k = 0; k < n; ++k) y[k] = codec::round_number_to<T>(relu(gp[k] * codec::decode(q[k], sp[k], a.d)));
      } else {
        const int32_t s = sp[0];
        const float g = gp[0];
        for (int k = 0; k < n; ++k) y[k] = codec::round_number_to<T>(relu(g * codec::decode(q[k], s, a.d)));
      }
    }
    if (a.mask) {
      bool* __restrict m = a.mask + i;
      for (int k = 0; k < n; ++k) m[k] = codec::mask(q[k], at_k<NHWC>(sp, k));
    }
  });
}

template <int Bits, typename T, bool NHWC>
void unpack_cpu(const UnpackArgs& a, const Layout& l) {
  at::parallel_for(0, l.numel, kGrain, [&](int64_t e0, int64_t e1) {
    with_isa([&](auto) BLPA_INLINE { unpack_range<Bits, T, NHWC>(a, l, e0, e1); });
  });
}

struct BnArgs {
  const uint8_t* data;
  const int32_t* s;  // [C] offsets
  const float* b;    // [C]
  const float* g;    // [C]
  const float* invstd;
  const void* grad;  // g_r
  void* g_x;
  float* g_g;        // [C]
  float* g_beta;     // [C]
  int64_t batch;
  float d;
};

// The sums of a channel are taken in kLanes float lanes per block of kBlock elements of a
// plane (element h of the plane, h = 0 .. H*W - 1, goes to lane h % kLanes of the block
// h / kBlock), each block's lanes then added in lane order to double accumulators, blocks in
// order of n and h. The order depends on neither the layout nor the thread count: NCHW and
// NHWC give the same bits, and so do runs.
constexpr int kLanes = 8;
// kLanes floats added lane by lane: one AVX register, two SSE ones (GCC's vector extension,
// so that the adds vectorise in every ISA's copy).
using Lanes = float __attribute__((vector_size(kLanes * sizeof(float))));

// g_a and x_hat' of one element.
template <typename T>
BLPA_INLINE inline void bn_terms(uint8_t q, T grad, int32_t s, float bc, float d, float& ga, float& xh) {
  const float gv = codec::widen(grad);               // read unconditionally, so that the select vectorises
  ga = codec::mask(q, s) ? gv : 0.0f;                 // a select: a masked NaN gradient is 0
  xh = codec::decode(q, s, d) - bc;
}

// NCHW: one channel at a time; its planes are read twice (the sums, then g_x) while they are
// still in cache.
template <int Bits, typename T>
BLPA_INLINE inline void bn_channels_nchw(const BnArgs& a, const Layout& l, int64_t c0, int64_t c1) {
  const T* grad = static_cast<const T*>(a.grad);
  T* g_x = static_cast<T*>(a.g_x);
  const double m = static_cast<double>(a.batch * l.plane);
  uint8_t q[kBlock];
  alignas(32) float ga[kBlock], xh[kBlock];
  for (int64_t c = c0; c < c1; ++c) {
    const int32_t s = a.s[c];
    const float bc = a.b[c];
    // Calls f(first element, length) for each block of the channel, decoded into ga and xh
    // (zero-padded to a multiple of kLanes).
    auto blocks = [&](auto&& f) BLPA_INLINE {
      for (int64_t n = 0; n < a.batch; ++n) {
        const int64_t base = (n * l.channels + c) * l.plane;
        for (int64_t i = 0; i < l.plane; i += kBlock) {
          const int len = static_cast<int>(std::min<int64_t>(kBlock, l.plane - i));
          read_codes<Bits>(a.data, base + i, len, q);
          const T* __restrict gr = grad + base + i;
          for (int k = 0; k < len; ++k) bn_terms(q[k], gr[k], s, bc, a.d, ga[k], xh[k]);
          for (int k = len; k % kLanes; ++k) ga[k] = xh[k] = 0.0f;
          f(base + i, len);
        }
      }
    };
    double sum_a = 0.0, sum_ax = 0.0;
    blocks([&](int64_t, int len) BLPA_INLINE {
      Lanes la = {}, lax = {};
      for (int k = 0; k < len; k += kLanes) {
        Lanes a, x;
        std::memcpy(&a, ga + k, sizeof a);
        std::memcpy(&x, xh + k, sizeof x);
        la += a;
        lax += a * x;
      }
      for (int t = 0; t < kLanes; ++t) sum_a += la[t], sum_ax += lax[t];
    });
    a.g_beta[c] = static_cast<float>(sum_a);
    a.g_g[c] = static_cast<float>(sum_ax);
    const float mean_a = static_cast<float>(sum_a / m), mean_ax = static_cast<float>(sum_ax / m);
    const float scale = a.g[c] * a.invstd[c];
    blocks([&](int64_t first, int len) BLPA_INLINE {
      T* __restrict out = g_x + first;
      for (int k = 0; k < len; ++k) out[k] = codec::round_to<T>(scale * (ga[k] - mean_a - xh[k] * mean_ax));
    });
  }
}

// NHWC, the sums, in the NCHW walk's order without its strided reads. A chunk is one block
// of kBlock rows (pixels) of one sample: chunk k = n * blocks + (h / kBlock), the order in
// which the NCHW walk visits blocks. Each chunk puts its rows' terms into its own kLanes x C
// float lanes (row h into lane h % kLanes, rows in order, all channels side by side so that
// the adds vectorise over channels); chunks are independent, so they run in parallel, and
// their rows are contiguous whatever C is (a split over channels made rows of a few
// channels, 7x slower than NCHW at C = 16).
//
// Within a chunk, whose first row is a multiple of kLanes, element j of a run of kLanes rows
// (kLanes x C elements, contiguous) is row j / C's channel j % C: it goes to lane cell j. So
// a chunk is read in runs of kLanes x C elements, each added elementwise to the cells.
template <int Bits, typename T>
BLPA_INLINE inline void bn_lanes_nhwc(const BnArgs& a, const Layout& l, int64_t k0, int64_t k1, int64_t first,
                                      float* lanes_a, float* lanes_ax) {
  const T* grad = static_cast<const T*>(a.grad);
  const int64_t C = l.channels, blocks = (l.plane + kBlock - 1) / kBlock, span = kLanes * C;
  std::vector<int32_t> s(span);
  std::vector<float> b(span), ga(span), xh(span);
  std::vector<uint8_t> q(span);
  for (int64_t j = 0; j < span; ++j) s[j] = a.s[j % C], b[j] = a.b[j % C];
  for (int64_t k = k0; k < k1; ++k) {
    const int64_t n = k / blocks, h0 = k % blocks * kBlock, h1 = std::min(l.plane, h0 + kBlock);
    float* __restrict la = lanes_a + (k - first) * span;
    float* __restrict lax = lanes_ax + (k - first) * span;
    std::fill(la, la + span, 0.0f);
    std::fill(lax, lax + span, 0.0f);
    const int64_t start = (n * l.plane + h0) * C, count = (h1 - h0) * C;
    for (int64_t off = 0; off < count; off += span) {
      const int m = static_cast<int>(std::min(span, count - off));
      read_codes<Bits>(a.data, start + off, m, q.data());
      const T* __restrict gr = grad + start + off;
      for (int j = 0; j < m; ++j) bn_terms(q[j], gr[j], s[j], b[j], a.d, ga[j], xh[j]);
      for (int j = 0; j < m; ++j) {
        la[j] += ga[j];
        lax[j] += ga[j] * xh[j];
      }
    }
  }
}

// Adds chunks [0, count) of the lanes to channels [c0, c1)'s double sums, chunk by chunk and
// lane by lane: the NCHW walk's additions, in its order.
inline void bn_reduce_lanes(const float* lanes_a, const float* lanes_ax, int64_t count, int64_t channels, int64_t c0,
                            int64_t c1, double* sum_a, double* sum_ax) {
  for (int64_t c = c0; c < c1; ++c)
    for (int64_t k = 0; k < count; ++k)
      for (int t = 0; t < kLanes; ++t) {
        sum_a[c] += lanes_a[(k * kLanes + t) * channels + c];
        sum_ax[c] += lanes_ax[(k * kLanes + t) * channels + c];
      }
}

// NHWC, g_x of elements [e0, e1) given the sums; per-channel values from repeat_channels.
struct BnApplyNhwc {
  const int32_t* s;
  const float *b, *scale, *mean_a, *mean_ax;
};

template <int Bits, typename T>
BLPA_INLINE inline void bn_apply_nhwc(const BnArgs& a, const BnApplyNhwc& p, const Layout& l, int64_t e0, int64_t e1) {
  const T* grad = static_cast<const T*>(a.grad);
  T* g_x = static_cast<T*>(a.g_x);
  uint8_t q[kBlock];
  for_each_block(l, e0, e1, [&](int64_t i, int n, int64_t at) BLPA_INLINE {
    read_codes<Bits>(a.data, i, n, q);
    const T* gr = grad + i;  // g_x may be g_r itself: no __restrict
    T* out = g_x + i;
    const int32_t* __restrict s = p.s + at;
    const float* __restrict bc = p.b + at;
    const float* __restrict scale = p.scale + at;
    const float* __restrict mean_a = p.mean_a + at;
    const float* __restrict mean_ax = p.mean_ax + at;
    for (int k = 0; k < n; ++k) {
      float ga, xh;
      bn_terms(q[k], gr[k], s[k], bc[k], a.d, ga, xh);
      out[k] = codec::round_to<T>(scale[k] * (ga - mean_a[k] - xh * mean_ax[k]));
    }
  });
}

template <int Bits, typename T, bool NHWC>
void bn_relu_backward_cpu(const BnArgs& a, const Layout& l) {
  if constexpr (!NHWC) {
    at::parallel_for(0, l.channels, 1, [&](int64_t c0, int64_t c1) {
      with_isa([&](auto) BLPA_INLINE { bn_channels_nchw<Bits, T>(a, l, c0, c1); });
    });
  } else {
    // The chunks' lanes in groups of at most kChunks (a bounded scratch: 2 x 8 x C floats a
    // chunk), each group reduced into the sums before the next, in order.
    constexpr int64_t kChunks = 64;
    const int64_t chunks = a.batch * ((l.plane + kBlock - 1) / kBlock);
    const int64_t group = std::min(chunks, kChunks);
    std::vector<double> sum_a(l.channels), sum_ax(l.channels);
    std::vector<float> lanes_a(group * kLanes * l.channels), lanes_ax(lanes_a.size());
    for (int64_t first = 0; first < chunks; first += group) {
      const int64_t last = std::min(chunks, first + group);
      at::parallel_for(first, last, 1, [&](int64_t k0, int64_t k1) {
        with_isa([&](auto) BLPA_INLINE {
          bn_lanes_nhwc<Bits, T>(a, l, k0, k1, first, lanes_a.data(), lanes_ax.data());
        });
      });
      at::parallel_for(0, l.channels, 16, [&](int64_t c0, int64_t c1) {
        bn_reduce_lanes(lanes_a.data(), lanes_ax.data(), last - first, l.channels, c0, c1, sum_a.data(),
                        sum_ax.data());
      });
    }
    const double m = static_cast<double>(a.batch * l.plane);
    std::vector<float> mean_a(l.channels), mean_ax(l.channels), scale(l.channels);
    for (int64_t c = 0; c < l.channels; ++c) {  // as the NCHW path
      a.g_beta[c] = static_cast<float>(sum_a[c]);
      a.g_g[c] = static_cast<float>(sum_ax[c]);
      mean_a[c] = static_cast<float>(sum_a[c] / m);
      mean_ax[c] = static_cast<float>(sum_ax[c] / m);
      scale[c] = a.g[c] * a.invstd[c];
    }
    auto s = repeat_channels<int32_t>(l.channels, [&](int64_t c) { return a.s[c]; });
    auto b = repeat_channels<float>(l.channels, [&](int64_t c) { return a.b[c]; });
    auto sc = repeat_channels<float>(l.channels, [&](int64_t c) { return scale[c]; });
    auto ma = repeat_channels<float>(l.channels, [&](int64_t c) { return mean_a[c]; });
    auto max = repeat_channels<float>(l.channels, [&](int64_t c) { return mean_ax[c]; });
    const BnApplyNhwc p{s.data(), b.data(), sc.data(), ma.data(), max.data()};
    at::parallel_for(0, l.numel, kGrain, [&](int64_t e0, int64_t e1) {
      with_isa([&](auto) BLPA_INLINE { bn_apply_nhwc<Bits, T>(a, p, l, e0, e1); });
    });
  }
}

void check_element_type(at::ScalarType dtype, const char* what) {
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16, "blpa codec: ", what,
              " must be float32 or bfloat16, got ", dtype);
}

// codec::dispatch for a tensor's dtype (`what` names it in the error).
template <typename F>
void dispatch(int bits, at::ScalarType dtype, bool nhwc, const char* what, F&& f) {
  check_element_type(dtype, what);
  codec::dispatch(bits, dtype == at::kBFloat16, nhwc, std::forward<F>(f));
}

void check_channel_vector(const at::Tensor& t, const char* name, const at::Tensor& like, int64_t channels) {
  TORCH_CHECK(t.defined(), "blpa codec: ", name, " is required for the requested output");
  TORCH_CHECK(t.scalar_type() == at::kFloat && t.dim() == 1 && t.numel() == channels && t.is_contiguous(),
              "blpa codec: ", name, " must be a contiguous float32 vector of ", channels, " channels, got ",
              t.scalar_type(), " ", t.sizes());
  TORCH_CHECK(t.device() == like.device(), "blpa codec: ", name, " is on ", t.device(), " but the codes are on ",
              like.device());
}

#if BLPA_WITH_CUDA
constexpr KernelTable kCudaKernels{cuda::compute_offsets, cuda::channel_coding, cuda::pack_workspace,
                                   cuda::pack,            cuda::unpack,         cuda::bn_workspace,
                                   cuda::bn_relu_backward};
#endif

std::atomic<const KernelTable*> cpu_kernels{nullptr};

// The kernels that take t's work: CUDA's for a CUDA tensor; for a CPU tensor none (the CPU
// loops), unless a test set others (set_cpu_kernels). Their `device` argument is t's index.
const KernelTable* kernels_for(const at::Tensor& t) {
  if (t.is_cuda()) {
#if BLPA_WITH_CUDA
    return &kCudaKernels;
#else
    TORCH_CHECK(false, "blpa was built without its CUDA kernels (BLPA_CUDA=OFF or no matching toolkit); "
                       "rebuild with -DBLPA_CUDA=ON to use CUDA tensors");
#endif
  }
  return t.is_cpu() ? cpu_kernels.load(std::memory_order_acquire) : nullptr;
}

}  // namespace

int64_t packed_bytes(int64_t numel, int bits) { return (numel * bits + 7) / 8; }

const char* cpu_isa_name() {
  switch (cpu_isa()) {
    case Isa::base: return "base";
    case Isa::avx2: return "avx2";
    case Isa::avx512: return "avx512";
  }
  return "?";
}

void set_cpu_kernels(const KernelTable* kernels) { cpu_kernels.store(kernels, std::memory_order_release); }

void check_format(const CodeFormat& f) {
  TORCH_CHECK(f.bits == 8 || f.bits == 4 || f.bits == 2, "blpa codec: bits must be 8, 4 or 2, got ", f.bits);
  TORCH_CHECK(std::isfinite(f.window) && f.window >= kMinWindow, "blpa codec: the window must be a positive width "
              "of at least ", kMinWindow, " (in units of x_hat), got ", f.window);
  TORCH_CHECK(std::isfinite(f.lift), "blpa codec: the window's lift must be finite, got ", f.lift);
}

CodeFormat default_format(int bits) {
  switch (bits) {
    case 8: return {8, 12.0f, 0.0f};
    case 4: return {4, 6.0f, 1.0f};
    case 2: return {2, 4.0f, 1.0f};
  }
  TORCH_CHECK(false, "blpa codec: bits must be 8, 4 or 2, got ", bits);
}

int64_t Codes::numel() const {
  int64_t n = 1;
  for (auto s : sizes) n *= s;
  return n;
}

int64_t Codes::bytes() const {
  return (data.defined() ? data.nbytes() : 0) + (offsets.defined() ? offsets.nbytes() : 0);
}

namespace {

// The BatchNorm that bn_relu_pack applies before it packs: pack_impl's v is its input x.
struct BnInput {
  const at::Tensor &mean, &var, &beta;
  float eps;
  at::Tensor invstd;  // [C], written
};

// offsets: the channels' offsets of b when the caller has them (channel_coding), else undefined.
// relu: receives max(v, 0): v itself (pack_relu_), undefined (pack), or with bn a new tensor
// like x, which receives max(a, 0) for the a whose codes are packed.
Codes pack_impl(const at::Tensor& v, const at::Tensor& b, const CodeFormat& f, const at::Tensor& divisor,
                const at::Tensor& relu, const at::Tensor& offsets = {}, const BnInput* bn = nullptr) {
  RECORD_FUNCTION(bn ? "blpa::bn_relu_pack" : relu.defined() ? "blpa::pack_relu_" : "blpa::pack",
                  std::vector<c10::IValue>());  // a scope in --profile
  check_format(f);
  check_element_type(v.scalar_type(), "pack's activations");
  const bool nhwc = stored_nhwc(v, "pack's activations");
  const Layout l = layout_of(v.sizes(), nhwc);
  check_channel_vector(b, "b = beta / gamma", v, l.channels);
  if (divisor.defined()) check_channel_vector(divisor, "divisor", v, l.channels);
  if (bn) {
    TORCH_CHECK(divisor.defined(), "blpa codec: bn_relu_pack needs gamma");
    check_channel_vector(bn->mean, "the batch mean", v, l.channels);
    check_channel_vector(bn->var, "the batch variance", v, l.channels);
    check_channel_vector(bn->beta, "beta", v, l.channels);
    check_channel_vector(bn->invstd, "invstd", v, l.channels);
  }

  Codes out;
  out.format = f;
  out.sizes = v.sizes().vec();
  out.channels_last = nhwc;
  const auto u8 = v.options().dtype(at::kByte);
  out.data = at::empty({packed_bytes(l.numel, f.bits)}, u8);
  const bool have_offsets = offsets.defined();
  if (have_offsets) {
    TORCH_CHECK(offsets.scalar_type() == at::kByte && offsets.dim() == 1 && offsets.numel() == l.channels &&
                    offsets.is_contiguous() && offsets.device() == v.device(),
                "blpa codec: the offsets must be a contiguous uint8 vector of ", l.channels, " channels on ",
                v.device());
    out.offsets = offsets;
  } else {
    out.offsets = at::empty({l.channels}, u8);
  }
  const KernelTable* k = kernels_for(v);
  TORCH_CHECK(k || v.is_cpu(), "blpa codec: unsupported device ", v.device());
  const float d = f.bin_width();
  if (!have_offsets) {  // an empty tensor's too: its codes are whole, as any other's
    if (k)
      k->compute_offsets({b.data_ptr<float>(), out.offsets.data_ptr<uint8_t>(), l.channels, f.bits, f.window, f.lift,
                          v.get_device()});
    else
      for (int64_t c = 0; c < l.channels; ++c)
        out.offsets.data_ptr<uint8_t>()[c] = static_cast<uint8_t>(codec::offset(b.data_ptr<float>()[c], f.bits, d,
                                                                                 f.lift));
  }
  if (l.numel == 0) return out;

  if (k) {
    const int dev = v.get_device();
    cuda::PackParams p{v.data_ptr(), divisor.defined() ? divisor.data_ptr<float>() : nullptr,
                       out.offsets.data_ptr<uint8_t>(), out.data.data_ptr<uint8_t>(), l.numel, l.plane, l.channels,
                       f.bits, f.window, dev, relu.defined() ? relu.data_ptr() : nullptr,
                       v.scalar_type() == at::kBFloat16, nhwc};
    if (bn) {
      p.mean = bn->mean.data_ptr<float>();
      p.var = bn->var.data_ptr<float>();
      p.beta = bn->beta.data_ptr<float>();
      p.eps = bn->eps;
      p.invstd = bn->invstd.data_ptr<float>();
    }
    p.general = codec_general();
    p.unroll = pack_unroll();
    at::Tensor workspace;  // only where pack makes its table in a launch of its own
    if (const int64_t floats = k->pack_workspace(p)) {
      workspace = at::empty({floats}, v.options().dtype(at::kFloat));
      p.workspace = workspace.data_ptr<float>();
    }
    k->pack(p);
    return out;
  }
  const uint8_t* op = out.offsets.data_ptr<uint8_t>();
  const float* dp = divisor.defined() ? divisor.data_ptr<float>() : nullptr;
  void* values = v.data_ptr();  // the values packed: v, or with bn the a made from it
  if (bn) {
    const float *mp = bn->mean.data_ptr<float>(), *vp = bn->var.data_ptr<float>();
    const float* betap = bn->beta.data_ptr<float>();
    float* ip = bn->invstd.data_ptr<float>();
    std::vector<codec::BnAffine> affine(l.channels);
    for (int64_t c = 0; c < l.channels; ++c) {
      ip[c] = codec::bn_invstd(vp[c], bn->eps);
      affine[c] = codec::bn_affine(mp[c], ip[c], dp[c], betap[c]);
    }
    const auto alpha = per_channel<float>(l, [&](int64_t c) { return affine[c].alpha; });
    const auto shift = per_channel<float>(l, [&](int64_t c) { return affine[c].shift; });
    dispatch(f.bits, v.scalar_type(), nhwc, "pack's activations", [&](auto, auto t, auto layout) {
      using T = decltype(t);
      bn_apply_cpu<T, decltype(layout)::value>(static_cast<const T*>(v.data_ptr()), static_cast<T*>(relu.data_ptr()),
                                               alpha.data(), shift.data(), l);
    });
    values = relu.data_ptr();  // then packed, and its ReLU applied, in place
  }
  const auto div = per_channel<float>(l, [&](int64_t c) { return dp ? dp[c] : 1.0f; });
  const auto s = per_channel<int32_t>(l, [&](int64_t c) { return static_cast<int32_t>(op[c]); });
  const PackArgs args{values, div.data(), s.data(), out.data.data_ptr<uint8_t>(),
                      relu.defined() ? values : nullptr, d};
  dispatch(f.bits, v.scalar_type(), nhwc, "pack's activations", [&](auto k, auto t, auto layout) {
    pack_cpu<decltype(k)::value, decltype(t), decltype(layout)::value>(args, l);
  });
  return out;
}

// An in-place write that autograd sees, as it sees ATen's own (relu_, add_): a tensor that a
// backward saved and the codec then changed fails that backward instead of using the new values.
void written_in_place(const at::Tensor& t) { t.unsafeGetTensorImpl()->bump_version(); }

}  // namespace

Codes pack(const at::Tensor& v, const at::Tensor& b, const CodeFormat& f, const at::Tensor& divisor) {
  return pack_impl(v, b, f, divisor, {});
}

Codes pack_relu_(at::Tensor& a, const at::Tensor& b, const CodeFormat& f, const at::Tensor& divisor) {
  Codes codes = pack_impl(a, b, f, divisor, a);
  written_in_place(a);
  return codes;
}

Codes pack(const at::Tensor& v, const ChannelCoding& cc, const at::Tensor& divisor) {
  return pack_impl(v, cc.b, cc.format, divisor, {}, cc.offsets);
}

Codes pack_relu_(at::Tensor& a, const ChannelCoding& cc) {
  Codes codes = pack_impl(a, cc.b, cc.format, cc.g, a, cc.offsets);
  written_in_place(a);
  return codes;
}

BnPacked bn_relu_pack(const at::Tensor& x, const at::Tensor& mean, const at::Tensor& var, float eps,
                      const at::Tensor& beta, const ChannelCoding& cc) {
  check_element_type(x.scalar_type(), "bn_relu_pack's input");
  const bool nhwc = stored_nhwc(x, "bn_relu_pack's input");
  TORCH_CHECK(x.numel() > 0, "blpa codec: bn_relu_pack needs at least one element, as a BatchNorm in training does");
  BnPacked out;
  out.r = at::empty_like(x, nhwc ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous);
  out.invstd = at::empty_like(mean);
  const BnInput bn{mean, var, beta, eps, out.invstd};
  out.codes = pack_impl(x, cc.b, cc.format, cc.g, out.r, cc.offsets, &bn);
  return out;
}

ChannelCoding channel_coding(const at::Tensor& gamma, const at::Tensor& beta, float gamma_min, const CodeFormat& f,
                             bool centred) {
  check_format(f);
  TORCH_CHECK(gamma.dim() == 1, "blpa codec: gamma must be a vector, got ", gamma.sizes());
  const int64_t channels = gamma.numel();
  check_channel_vector(gamma, "gamma", gamma, channels);
  check_channel_vector(beta, "beta", gamma, channels);
  const auto f32 = gamma.options().requires_grad(false);
  ChannelCoding cc{at::empty({channels}, f32), at::empty({channels}, f32), at::empty({channels}, f32.dtype(at::kByte)),
                   f};
  const float* gp = gamma.data_ptr<float>();
  const float* bp = beta.data_ptr<float>();
  if (const KernelTable* k = kernels_for(gamma)) {
    k->channel_coding({gp, bp, gamma_min, centred, cc.g.data_ptr<float>(), cc.b.data_ptr<float>(),
                       cc.offsets.data_ptr<uint8_t>(), channels, f.bits, f.window, f.lift, gamma.get_device()});
    return cc;
  }
  TORCH_CHECK(gamma.is_cpu(), "blpa codec: unsupported device ", gamma.device());
  float* g = cc.g.data_ptr<float>();
  float* b = cc.b.data_ptr<float>();
  uint8_t* s = cc.offsets.data_ptr<uint8_t>();
  const float d = f.bin_width();
  for (int64_t c = 0; c < channels; ++c) {
    g[c] = gp[c] < gamma_min ? gamma_min : gp[c];  // NaN stays NaN, as clamp_min
    b[c] = centred ? bp[c] / g[c] : 0.0f;
    s[c] = static_cast<uint8_t>(codec::offset(b[c], f.bits, d, f.lift));
  }
  return cc;
}

namespace {

void check_codes(const Codes& codes, const Layout& l) {
  TORCH_CHECK(codes.data.numel() == packed_bytes(l.numel, codes.format.bits) && codes.offsets.numel() == l.channels,
              "blpa codec: codes are inconsistent with their shape");
  TORCH_CHECK(!codes.channels_last || codes.sizes.size() == 4, "blpa codec: channels-last codes must be 4-D, got ",
              codes.sizes.size(), " dims");
  TORCH_CHECK(codes.offsets.device() == codes.data.device(), "blpa codec: the codes' offsets are on ",
              codes.offsets.device(), " but their data on ", codes.data.device());
}

void unpack_into(const Codes& codes, const at::Tensor& b, const at::Tensor& gamma, at::ScalarType dtype,
                 const Unpacked& u) {
  const CodeFormat& f = codes.format;
  check_format(f);
  const Layout l = layout_of(codes.sizes, codes.channels_last);
  check_codes(codes, l);
  if (l.numel == 0) return;
  const float* bp = u.x_hat.defined() ? b.data_ptr<float>() : nullptr;
  const float* gp = u.r.defined() ? gamma.data_ptr<float>() : nullptr;
  const uint8_t* data = codes.data.data_ptr<uint8_t>();
  const uint8_t* offsets = codes.offsets.data_ptr<uint8_t>();
  void* x_hat = u.x_hat.defined() ? u.x_hat.data_ptr() : nullptr;
  void* r = u.r.defined() ? u.r.data_ptr() : nullptr;
  bool* mask = u.mask.defined() ? u.mask.data_ptr<bool>() : nullptr;
  if (const KernelTable* k = kernels_for(codes.data)) {
    k->unpack({data, offsets, bp, gp, x_hat, r, mask, l.numel, l.plane, l.channels, f.bits, f.window,
               codes.data.get_device(), dtype == at::kBFloat16, l.nhwc, codec_general()});
    return;
  }
  auto s = per_channel<int32_t>(l, [&](int64_t c) { return static_cast<int32_t>(offsets[c]); });
  auto bv = per_channel<float>(l, [&](int64_t c) { return bp ? bp[c] : 0.0f; });
  auto gv = per_channel<float>(l, [&](int64_t c) { return gp ? gp[c] : 0.0f; });
  const UnpackArgs args{data, s.data(), bv.data(), gv.data(), x_hat, r, mask, f.bin_width()};
  dispatch(f.bits, dtype, l.nhwc, "unpack's dtype", [&](auto k, auto t, auto layout) {
    unpack_cpu<decltype(k)::value, decltype(t), decltype(layout)::value>(args, l);
  });
}

}  // namespace

Unpacked unpack(const Codes& codes, const at::Tensor& b, const at::Tensor& gamma, unsigned outputs,
                at::ScalarType dtype) {
  TORCH_CHECK(codes.defined(), "blpa codec: unpack of empty codes");
  RECORD_FUNCTION("blpa::unpack", std::vector<c10::IValue>());
  check_element_type(dtype, "unpack's dtype");
  const auto opts = codes.data.options().dtype(dtype).memory_format(
      codes.channels_last ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous);
  Unpacked u;
  if (outputs & kXhat) {
    check_channel_vector(b, "b = beta / gamma", codes.data, codes.channels());
    u.x_hat = at::empty(codes.sizes, opts);
  }
  if (outputs & kRelu) {
    check_channel_vector(gamma, "gamma", codes.data, codes.channels());
    u.r = at::empty(codes.sizes, opts);
  }
  if (outputs & kMask) u.mask = at::empty(codes.sizes, opts.dtype(at::kBool));
  unpack_into(codes, b, gamma, dtype, u);
  return u;
}

namespace {

void check_grad(const Codes& codes, const at::Tensor& grad) {
  TORCH_CHECK((grad.scalar_type() == at::kFloat || grad.scalar_type() == at::kBFloat16) &&
                  grad.sizes().vec() == codes.sizes && grad.device() == codes.data.device(),
              "blpa codec: the gradient must be float32 or bfloat16 of shape ", at::IntArrayRef(codes.sizes), " on ",
              codes.data.device(), ", got ", grad.scalar_type(), " ", grad.sizes(), " on ", grad.device());
  const bool dense = codes.channels_last ? grad.is_contiguous(at::MemoryFormat::ChannelsLast) : grad.is_contiguous();
  TORCH_CHECK(dense, "blpa codec: the gradient must be ", codes.channels_last ? "channels-last contiguous (NHWC)" :
              "contiguous (NCHW)", " like its codes, got strides ", grad.strides());
}

// The channels a thread of the CUDA NHWC BatchNorm backward takes in a row:
// BLPA_BN_NHWC_VECTOR=4 or 8 in the environment, for measurements; 0 (the kernels' default,
// 8) without it.
int bn_nhwc_vector() {
  static const int chosen = [] {
    const char* v = std::getenv("BLPA_BN_NHWC_VECTOR");
    if (!v || !*v) return 0;
    TORCH_CHECK(std::string(v) == "4" || std::string(v) == "8", "BLPA_BN_NHWC_VECTOR must be 4 or 8, got '", v,
                "'");
    return *v - '0';
  }();
  return chosen;
}

// The row blocks an SM of the CUDA NHWC BatchNorm backward: BLPA_BN_NHWC_BLOCKS=N (1 to 64) in
// the environment, for measurements (16: the grid before it filled one wave); 0 (the kernels'
// default, as many as an SM holds at once) without it.
int bn_nhwc_blocks() {
  static const int chosen = [] {
    const char* v = std::getenv("BLPA_BN_NHWC_BLOCKS");
    if (!v || !*v) return 0;
    char* end = nullptr;
    const long n = std::strtol(v, &end, 10);
    TORCH_CHECK(*end == '\0' && n >= 1 && n <= 64, "BLPA_BN_NHWC_BLOCKS must be 1 to 64, got '", v, "'");
    return static_cast<int>(n);
  }();
  return chosen;
}

}  // namespace

BnGrads bn_relu_backward(const Codes& codes, const at::Tensor& b, const at::Tensor& g, const at::Tensor& invstd,
                         at::Tensor g_r, bool in_place, std::optional<float> gamma_min) {
  TORCH_CHECK(codes.defined(), "blpa codec: bn_relu_backward of empty codes");
  RECORD_FUNCTION("blpa::bn_relu_backward", std::vector<c10::IValue>());
  const CodeFormat& f = codes.format;
  check_format(f);
  check_grad(codes, g_r);
  const Layout l = layout_of(codes.sizes, codes.channels_last);
  check_codes(codes, l);
  check_channel_vector(b, "b = beta / gamma", codes.data, l.channels);
  check_channel_vector(g, "gamma", codes.data, l.channels);
  check_channel_vector(invstd, "invstd", codes.data, l.channels);
  const auto f32 = g_r.options().dtype(at::kFloat);
  BnGrads out{in_place ? g_r : at::empty_like(g_r), at::empty({l.channels}, f32), at::empty({l.channels}, f32)};
  if (in_place) written_in_place(g_r);
  const int64_t batch = codes.sizes[0];
  const uint8_t* data = codes.data.data_ptr<uint8_t>();
  const uint8_t* offsets = codes.offsets.data_ptr<uint8_t>();
  if (l.numel == 0) {
    out.g_g.zero_();
    out.g_beta.zero_();
    return out;
  }
  if (const KernelTable* k = kernels_for(g_r)) {
    cuda::BnBackwardParams p{data, offsets, b.data_ptr<float>(), g.data_ptr<float>(), invstd.data_ptr<float>(),
                             g_r.data_ptr(), out.g_x.data_ptr(), nullptr, out.g_g.data_ptr<float>(),
                             out.g_beta.data_ptr<float>(), gamma_min.has_value(), gamma_min.value_or(0.0f), batch,
                             l.channels, l.plane, f.bits, f.window, g_r.get_device(),
                             g_r.scalar_type() == at::kBFloat16, l.nhwc, bn_nhwc_vector(), bn_nhwc_blocks()};
    const at::Tensor partials = at::empty({k->bn_workspace(p)}, f32.dtype(at::kDouble));
    p.partials = partials.data_ptr<double>();
    k->bn_relu_backward(p);
    return out;
  }
  std::vector<int32_t> s(offsets, offsets + l.channels);
  const BnArgs args{data, s.data(), b.data_ptr<float>(), g.data_ptr<float>(), invstd.data_ptr<float>(),
                    g_r.data_ptr(), out.g_x.data_ptr(), out.g_g.data_ptr<float>(), out.g_beta.data_ptr<float>(),
                    batch, f.bin_width()};
  dispatch(f.bits, g_r.scalar_type(), l.nhwc, "the gradient", [&](auto k, auto t, auto layout) {
    bn_relu_backward_cpu<decltype(k)::value, decltype(t), decltype(layout)::value>(args, l);
  });
  if (gamma_min) {  // the clamp's gradient, as threshold_backward: none where g <= gamma_min
    const float* gp = g.data_ptr<float>();
    float* gg = out.g_g.data_ptr<float>();
    for (int64_t c = 0; c < l.channels; ++c)
      if (gp[c] <= *gamma_min) gg[c] = 0.0f;
  }
  return out;
}

at::Tensor code_values(const Codes& codes) {
  const int64_t n = codes.numel();
  const int bits = codes.format.bits;
  // The codes in memory order, viewed with the logical N, C, H, W indexing.
  auto logical = [&](const at::Tensor& flat) {
    if (!codes.channels_last) return flat.view(codes.sizes);
    const auto& z = codes.sizes;
    return flat.view({z[0], z[2], z[3], z[1]}).permute({0, 3, 1, 2});
  };
  if (bits == 8) return logical(codes.data);
  std::vector<at::Tensor> fields;  // element j of each byte, j = 0 .. 8 / bits - 1
  for (int shift = 0; shift < 8; shift += bits)
    fields.push_back(at::bitwise_and(at::bitwise_right_shift(codes.data, shift), (1 << bits) - 1));
  return logical(at::stack(fields, 1).flatten().narrow(0, 0, n));
}

int codec_parallel_threads(int64_t tasks) {
  std::vector<std::atomic<int>> seen(static_cast<size_t>(std::max(1, at::get_num_threads())));
  at::parallel_for(0, tasks, 1, [&](int64_t, int64_t) {
    const int t = at::get_thread_num();
    if (t >= 0 && t < static_cast<int>(seen.size())) seen[t].store(1);
  });
  int n = 0;
  for (const auto& s : seen) n += s.load();
  return n;
}

}  // namespace blpa
