// The element math of the K-bit sign-preserving quantiser (docs/method.md, "Quantiser";
// DESIGN.md 1.3). This is the only definition: the CPU path (lib/codec.cpp) and the CUDA
// kernels (cuda/codec_kernels.cuh) both call these functions, so they cannot drift apart.
//
// B = 2^K bins of width d = window / B over a window centred `lift` above the channel's b;
// width and lift are properties of the codes (the paper's: 6 units of x_hat and 0, for every
// K). Callers compute d once with bin_width.
//
// Bit-identical CPU/GPU results rest on using only IEEE-exact operations here:
// float subtraction, division and multiplication, comparisons, floor and float->int
// truncation, and fmaf where it is written out (one rounding, the same on either side). No
// multiply-add is fused unless written: the CUDA sources are compiled with --fmad=false and
// the CPU sources with -ffp-contract=off.
#pragma once

#include <c10/util/BFloat16.h>
#if defined(__CUDACC__)
#include <cuda_bf16.h>  // __float2bfloat16_rn
#endif

#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>

#if defined(__CUDACC__)
#define BLPA_HD __host__ __device__ __forceinline__
#else
#define BLPA_HD inline
#endif

namespace blpa::codec {

constexpr float kPaperWindow = 6.0f;  // the published method's window, in units of x_hat
constexpr float kGuard = 1e-6f;       // v < kGuard counts as "not positive"

BLPA_HD int num_bins(int bits) { return 1 << bits; }
// d = window / 2^K. For the paper's window this is the constant 6 / 2^K of the published
// method, to the bit (one IEEE division either way).
BLPA_HD float bin_width(float window, int bits) { return window / static_cast<float>(1 << bits); }

// floor(y) for y already clamped to a range where int conversion is defined. Both ways are
// exact, so they give the same bits: VectorFloor uses floorf, one instruction where the target
// has one (CUDA; x86 from SSE4.1 on: the CPU loops' AVX2 and AVX-512 copies); otherwise
// truncate and correct, which baseline x86-64 (SSE2) vectorises and floorf would not.
template <bool VectorFloor = false>
BLPA_HD int floor_small(float y) {
  if constexpr (VectorFloor) return static_cast<int>(floorf(y));
  const int t = static_cast<int>(y);  // truncates toward zero
  return t - (y < static_cast<float>(t) ? 1 : 0);
}

// Per-channel offset s_c = max(1, B/2 - floor((b_c + lift) / d)), also capped at B - 1 so
// that the bin edge at v = 0 lies inside the window for every channel (otherwise a strongly
// negative b_c would push it out and positive values would be clamped below it, losing the
// mask). b_c = beta_c / gamma_c. A NaN b_c gives s_c = 1. d: bin_width(window, bits).
// With lift 0 this is the published formula to the bit (b + 0 is b, or +0 for b = -0).
BLPA_HD int offset(float b, int bits, float d, float lift) {
  const int half = num_bins(bits) / 2;
  const int top = num_bins(bits) - 1;
  const float lim = static_cast<float>(half + 1);  // beyond +-lim the answer is pinned anyway
  float y = (b + lift) / d;
  y = y < lim ? y : lim;  // NaN -> lim -> s = 1
  y = y > -lim ? y : -lim;
  int s = half - floor_small(y);
  s = s > 1 ? s : 1;
  return s < top ? s : top;
}

// code = clamp(floor((v - guard) / d) + s, 0, B - 1).
// The floor is taken before s is added: floor(y + s) in float could round y = -tiny up to s
// and turn the mask on for a negative value. NaN and -Inf encode as 0, +Inf as B - 1.
// Since 1 <= s <= B - 1, code >= s exactly when v - guard >= 0, for every K and window.
template <bool VectorFloor = false>
BLPA_HD uint32_t code_of(float y, int s, int bits) {
  const int top = num_bins(bits) - 1;
  const float lim = static_cast<float>(top + 1);
  y = y > -lim ? y : -lim;  // NaN -> -lim -> code 0
  y = y < lim ? y : lim;
  int code = floor_small<VectorFloor>(y) + s;
  code = code > 0 ? code : 0;
  code = code < top ? code : top;
  return static_cast<uint32_t>(code);
}

template <bool VectorFloor = false>
BLPA_HD uint32_t encode(float v, int s, int bits, float d) {
  return code_of<VectorFloor>((v - kGuard) / d, s, bits);
}

// A float's bits and back, on the host and the device.
BLPA_HD float float_of_bits(uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
#endif
}

BLPA_HD uint32_t bits_of_float(float f) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(f);
#else
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return u;
#endif
}

// The same codes from one fused multiply-add where they are certain: encode(v / g, s, bits, d)
// takes two divisions per element, which were most of the CUDA pack's instructions (an IEEE
// division is a reciprocal, its refinement and a check), so the GPU packs from
//   y = fma(v, scale, bias),  scale = channel_scale(g, d) = 1 / (g d),  bias = (s - 1/2) - G,
// G = kGuard / d, each of scale, G and bias rounded once per channel: y + 1/2 is encode's
// floor argument with s added, and the code is clamp(rint(y), 0, B - 1) wherever y lies
// farther than tol from every half-integer (y + 1/2 from every integer; fused_code). Next to a
// bin edge, encode's floor is decided exactly without dividing by d (near_code, from edge
// thresholds). (The 1/2 is in the bias so that rounding to nearest, which a GPU does by adds,
// gives the floor: floor(y + 1/2) is rint(y) away from the half-integers.)
//
// Why rint(y) is encode's floor plus s elsewhere. With unit roundoff u = 2^-24,
// Y = (v / g - kGuard) / d exactly, P = Y + G = v / (g d): encode's three roundings give
// y_e = Y (1 + 2e) + P e', so |y_e - Y| <= u (3 |Y| + G); the fma's rounding and those of g d,
// its reciprocal, G and bias (|s - 1/2 - G| <= s + 1/2 + G, s >= 1) give
// |y - (Y + s - 1/2)| <= 2u |P| + u G + u (s + 1/2 + G) + u |Y + s - 1/2|
// <= u (3 |Y| + 2 s + 4 G + 1); together |y + 1/2 - (y_e + s)| <= u (6 |Y| + 2 s + 5 G + 1)
// to first order. Where y + 1/2 lies in [-2, B + 1], |Y| <= B + 2 and s <= B - 1, so this is
// at most u (8 B + 11 + 5 G), under half of
//   tol = 2^-20 (B + 2 + G) = u (16 B + 32 + 16 G)   (scaled_tolerance),
// which leaves the second-order terms, and the absolute error of an underflowing product
// (2^-150), far inside tol. So where y + 1/2 is farther than tol from every integer, no
// integer lies between it and y_e + s and the floors agree. Beyond [-2, B + 1] both clamp to
// the same end: y and Y + s - 1/2 agree to a few u relative, and the nearest end of the codes
// is over a unit away. An infinite y, NaN v, and the channels that divide (scale NaN), are
// near edges by construction (fused's e is NaN, and every comparison with NaN is false), which
// near_code gives encode's codes by dividing.
// channel_scale returns 0 for channels whose g d or 1 / (g d) is not a normal float, or
// g <= 0 or NaN, where the relative bounds do not hold; fused_scale makes that NaN. Callers
// divide for every element when G >= 1/2 (a window narrower than 2^(bits+1) kGuard), where
// near_code's floor(bias) + 1 would no longer be s.
// Tested, fused_code and near_code together as the kernel calls them, against encode on every
// bf16 value and on fp32 values at and beside bin edges (tests/test_codec_math.cpp).
BLPA_HD float channel_scale(float g, float d) {
  const float scale = 1.0f / (g * d);
  return scale >= 0x1p-125f && scale <= 0x1p125f ? scale : 0.0f;  // NaN -> 0
}

// channel_scale, with NaN where the channel must divide: a NaN y is a near edge.
BLPA_HD float fused_scale(float g, float d) {
  const float scale = channel_scale(g, d);
  return scale != 0.0f ? scale : float_of_bits(0x7FC00000u);
}

// (s - 1/2) - G, one rounding (s - 1/2 is exact): in [s - 1, s - 1/2] for 0 <= G < 1/2.
BLPA_HD float channel_bias(int s, float guard_d) { return (static_cast<float>(s) - 0.5f) - guard_d; }

// A channel's constants for fused_code, given its divisor g and offset s, d and guard_d =
// kGuard / d: scale = fused_scale(g, d) and bias = channel_bias(s, guard_d); or, for a window
// narrower than 2^(bits+1) guards (guard_d >= 1/2, outside the fused code's bound), a NaN
// scale (every element a near edge, which divides) and bias s - 1/2. The CUDA pack's table.
struct FusedChannel {
  float scale, bias;
};
BLPA_HD FusedChannel fused_channel(float g, int s, float d, float guard_d) {
  if (guard_d < 0.5f) return {fused_scale(g, d), channel_bias(s, guard_d)};
  return {fused_scale(0.0f, d), static_cast<float>(s) - 0.5f};
}

BLPA_HD float scaled_tolerance(int bits, float guard_d) {
  return 0x1p-20f * (static_cast<float>(num_bins(bits)) + 2.0f + guard_d);
}

// The least float at or above 1/2 - tol, for tol < 1/4: a float e in [0, 1/2] lies below it
// exactly when 1/2 - e > tol (1/2 - e is exact there). Once per launch.
BLPA_HD float far_limit(float tol) {
  const float limit = 0.5f - tol;  // rounded: one float up where it rounded down
  const uint32_t u = bits_of_float(limit);
  return 0.5f - limit > tol ? float_of_bits(u + 1) : limit;
}

// 1.5 x 2^23: for |y| <= 2^22, y + kRoundMagic is the float kRoundMagic + n for y's nearest
// integer n (ties to even; the sum lies where floats are the integers), n is that float's bits
// less kRoundMagic's, and subtracting kRoundMagic again gives n exactly: rounding by adds,
// with no conversion (a GPU's conversions run 16 a cycle per multiprocessor, its adds 128).
constexpr float kRoundMagic = 12582912.0f;
constexpr uint32_t kRoundMagicBits = 0x4B400000u;

// fused_code's answer where the caller must decide exactly (no code is that large).
constexpr uint32_t kNearEdge = 0xFFFFFFFFu;

// fused_code's code plus kRoundMagicBits (the bits of the float that rounded it: the CUDA pack
// takes the constant off a word of codes at once), and whether it is certain (far from every
// edge); where not far, biased is some code's, which the caller replaces.
struct Fused {
  uint32_t biased;
  bool far;
};

// encode(v / g, s, bits, d) from y = fma(v, scale, bias) (bias = channel_bias: y + 1/2 is
// encode's floor argument plus s), far unless y lies within tol of a half-integer or is NaN or
// infinite (beyond 2^22, either; see below); limit = far_limit(tol). With r = y + kRoundMagic,
// the float of y's nearest integer n, and e = y - (r - kRoundMagic) = y - n (exact) for
// |y| <= 2^22, y is far exactly when |e| < limit, and then n is floor(y + 1/2), encode's floor
// plus s (above). The code is n clamped to [0, B - 1], as encode clamps, taken as r clamped to
// kRoundMagic + [0, B - 1] (floats there are the integers, in order). Beyond 2^22 (or below
// -2^22) the rounding is not exact, but r lies beyond kRoundMagic + B (below kRoundMagic), so
// the code is B - 1 (0) whether y is taken as far or near; a NaN or infinite y makes e NaN, a
// near edge. At the ends of the window (y + 1/2 within tol of 0 or B, where encode's floor
// clamps to the same code either side) and beyond it, an element next to a half-integer is
// near as any other, and decided exactly (few in float32; bf16 values beyond the window with
// gamma 1 land on half-integers more often). Without branches or conversions, so that a GPU
// predicates it in its FMA and ALU pipes (the fma, three adds, one compare and two clamps an
// element): two conversions an element (rintf and a floor to int, as before 2026-12-04) ran
// on the pipe of 16 a cycle, the bound of the bf16 pack (scripts/sass-hot-path.sh), and the
// 1/2 taken off and the NaN test of 2026-12-04 two more instructions an element.
BLPA_HD Fused fused(float v, float scale, float bias, float limit, int bits) {
  const float y = fmaf(v, scale, bias);
  const float r = y + kRoundMagic;
  const float e = y - (r - kRoundMagic);  // NaN for NaN or infinite y
  const float code = fminf(fmaxf(r, kRoundMagic), kRoundMagic + static_cast<float>(num_bins(bits) - 1));
  return {bits_of_float(code), fabsf(e) < limit};
}

// fused's code where it is far, else kNearEdge.
BLPA_HD uint32_t fused_code(float v, float scale, float bias, float limit, int bits) {
  const Fused f = fused(v, scale, bias, limit, bits);
  return f.far ? f.biased - kRoundMagicBits : kNearEdge;
}

// The next float above (step +1) or below (-1) f, with -0 just below +0; f finite.
BLPA_HD float float_step(float f, int step) {
  const uint32_t u = bits_of_float(f);
  const uint32_t ordered = u & 0x80000000u ? 0x7FFFFFFFu - (u & 0x7FFFFFFFu) : u + 0x80000000u;
  const uint32_t o = ordered + static_cast<uint32_t>(step);
  return float_of_bits(o & 0x80000000u ? o - 0x80000000u : 0x80000000u | (0x7FFFFFFFu - o));
}

// The least float w with (w / d) >= n in float, d > 0 a normal float: encode's floor of w / d
// is at least n exactly when w >= edge_threshold(n, d) (the rounded division is monotone). It
// lies within a few floats of n d rounded, or for n = 0 of -d/2 of the least subnormal (where
// w / d rounds to -0; a d over 2 puts that below -0); the steps check each candidate by the
// division.
BLPA_HD float edge_threshold(int n, float d) {
  const float target = static_cast<float>(n);
  float w = n != 0 ? target * d : -0.5f * d * float_of_bits(1);
  for (int i = 0; i < 16 && !(w / d >= target); ++i) w = float_step(w, 1);
  for (int i = 0; i < 16 && float_step(w, -1) / d >= target; ++i) w = float_step(w, -1);
  return w;
}

// edge_threshold(n, d) for n = -(B + 1) .. B, at index n + B + 1.
BLPA_HD constexpr int edge_thresholds(int bits) { return 2 * (1 << bits) + 2; }

// encode(t, s, bits, d), t = v / g, where fused_code(v, scale, bias, tol, bits) gave
// kNearEdge; thresholds: edge_thresholds(bits) of edge_threshold. Where y (near an edge) is a
// number in [-3, B + 1), y + 1/2 lies within tol of the integer N = floor(y) + 1, in
// [-2, B + 1], and (bound above) y_e + s within 1.5 tol of N, so encode's floor is n - 1 or n
// for n = N - s, in -(B + 1) .. B: n exactly when t - kGuard >= edge_threshold(n, d).
// Elsewhere (a y beyond the window, whose code fused gives but may leave here) and for a NaN y
// (NaN v, or a channel that divides), it divides.
template <bool VectorFloor = false>
BLPA_HD uint32_t near_code(float v, float t, float scale, float bias, const float* thresholds, int bits, float d) {
  const float y = fmaf(v, scale, bias);
  // bias = (s - 1/2) - G rounded, in [s - 1, s - 1/2] for G < 1/2 (s - 1/2 where the caller
  // divides for every element): its floor is s - 1. (Its nearest integer plus 1 is not: s - G
  // - 1/2 can be s - 1/2, which rounds to the even neighbour.)
  const int s = static_cast<int>(floorf(bias)) + 1, top = num_bins(bits) - 1;
  if (!(y >= -3.0f && y < static_cast<float>(top + 2))) return encode<VectorFloor>(t, s, bits, d);
  const int n = static_cast<int>(floorf(y)) + 1 - s;
  const int code = (t - kGuard >= thresholds[n + num_bins(bits) + 1] ? n : n - 1) + s;
  return static_cast<uint32_t>(code < 0 ? 0 : code > top ? top : code);
}

// Dequantised v' = (code - s + 0.5) * d: the centre of the code's bin.
BLPA_HD float decode(uint32_t code, int s, float d) {
  return (static_cast<float>(static_cast<int>(code) - s) + 0.5f) * d;
}

// The ReLU mask: exact, since a bin edge sits at v = 0 (up to the guard).
BLPA_HD bool mask(uint32_t code, int s) { return static_cast<int>(code) >= s; }

// decode without an int conversion, which a GPU runs at 16 a cycle per multiprocessor
// against 64 to 128 adds, compares or bitwise operations (its kernels use these).
// code_float(code) is the float 2^23 + code, whose low mantissa bits are the code, and
// code_origin(s), per channel, 2^23 + s: their difference, code - s, is exact (code < 256,
// 0 <= s <= 256), and so is (code - s) d + d/2 before fmaf's one rounding (d/2 is exact for
// any d >= 2^-125). So decode_by_steps gives decode's bits, and mask_by_steps (code_float(code)
// >= code_origin(s)) is mask.
BLPA_HD float code_float(uint32_t code) { return float_of_bits(0x4B000000u | code); }
BLPA_HD float code_origin(int s) { return code_float(static_cast<uint32_t>(s)); }
BLPA_HD float decode_by_steps(float code, float origin, float d) { return fmaf(code - origin, d, 0.5f * d); }
BLPA_HD bool mask_by_steps(float code, float origin) { return code >= origin; }

// The unit's BatchNorm in training, as its fused forward (blpa::bn_relu_pack) computes it
// from the batch mean and biased variance: a = fma(x, alpha, shift) per element, with
// invstd = 1 / sqrt(var + eps), alpha = g invstd and shift = beta - mean alpha (an fma: one
// rounding) per channel. Division and square root are IEEE on both sides (nvcc's defaults
// -prec-div and -prec-sqrt), so the CPU and the GPU give the same bits. invstd is 0 where
// var + eps is 0, as LibTorch's (a constant channel with eps 0).
struct BnAffine {
  float alpha, shift;
};

BLPA_HD float bn_invstd(float var, float eps) {
  const float v = var + eps;
  return v == 0.0f ? 0.0f : 1.0f / sqrtf(v);
}

BLPA_HD BnAffine bn_affine(float mean, float invstd, float g, float beta) {
  const float alpha = g * invstd;
  return {alpha, fmaf(-mean, alpha, beta)};
}

// Activations and gradients are float32 or bfloat16; the math above is float. A bf16 value
// widens to float exactly; a float result is rounded to bf16 once, to nearest-even with NaN
// as 0x7FC0: c10::BFloat16(float)'s rounding on the host, written out here so that the CPU
// loops vectorise. The device rounds with its conversion instruction (one, where the integer
// rounding took four), which rounds every number to nearest-even too and gives another NaN
// (0x7FFF), replaced here by 0x7FC0.
BLPA_HD float widen(float x) { return x; }
BLPA_HD float widen(c10::BFloat16 x) { return float_of_bits(static_cast<uint32_t>(x.x) << 16); }

// The bf16 bits of f, not NaN, rounded to nearest-even (on the host a NaN could come out as
// anything: -0 for 0x7FFFFFFF); bf16_bits, of any f.
BLPA_HD uint16_t bf16_bits_of_number(float f) {
#if defined(__CUDA_ARCH__)
  return __bfloat16_as_ushort(__float2bfloat16_rn(f));
#else
  const uint32_t u = bits_of_float(f);
  return static_cast<uint16_t>((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
#endif
}

// (A select of the 32-bit rounding: written as f != f ? 0x7FC0 : bf16_bits_of_number(f), it
// cost the fused bf16 packs 0.8 to 1.6 instructions an element, scripts/sass-hot-path.sh.)
BLPA_HD uint16_t bf16_bits(float f) {
  const uint32_t rounded = bf16_bits_of_number(f);
  return static_cast<uint16_t>(f != f ? 0x7FC0u : rounded);
}

template <typename T>
BLPA_HD T round_to(float f);
template <>
BLPA_HD float round_to<float>(float f) {
  return f;
}
template <>
BLPA_HD c10::BFloat16 round_to<c10::BFloat16>(float f) {
  return c10::BFloat16(bf16_bits(f), c10::BFloat16::from_bits());
}

// round_to of a value that is never NaN (unpack's r' = max(g v', 0)): the same bits, without
// the NaN check, a compare and a select per value on either device.
template <typename T>
BLPA_HD T round_number_to(float f) {
  if constexpr (std::is_same_v<T, c10::BFloat16>)
    return c10::BFloat16(bf16_bits_of_number(f), c10::BFloat16::from_bits());
  else
    return f;
}

// round_to, except that on the device a NaN comes out as the conversion makes it (0x7FFF),
// without the check: for g_x, whose NaNs need not carry the CPU's bits.
template <typename T>
BLPA_HD T round_to_own_nan(float f) {
#if defined(__CUDA_ARCH__)
  return round_number_to<T>(f);
#else
  return round_to<T>(f);
#endif
}

// round_to_own_nan<bf16> of a and b as one 32-bit word, a's bits in the low half. On the
// device one conversion rounds both (__floats2bfloat162_rn: from sm_80 one F2FP of the ALU
// pipe, where rounding them one at a time took two of the pipe that runs 16 a cycle per
// multiprocessor), and its word is kept whole (taken apart into two 16-bit values and put
// back together it cost a byte permute more a pair; scripts/sass-hot-path.sh).
BLPA_HD uint32_t bf16_pair_word_own_nan(float a, float b) {
#if defined(__CUDA_ARCH__)
  const __nv_bfloat162 pair = __floats2bfloat162_rn(a, b);  // (below sm_80, the same bits its own way)
  uint32_t w;
  memcpy(&w, &pair, sizeof w);
  return w;
#else
  return uint32_t{bf16_bits(a)} | uint32_t{bf16_bits(b)} << 16;
#endif
}

}  // namespace blpa::codec
