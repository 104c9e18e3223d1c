// The CUDA pack's division-free path, codec::fused_code and, next to a bin edge,
// codec::near_code, composed as the kernel composes them, against codec::encode, whose codes
// they must give: on every bf16 value and on fp32 values at, and a few ulps beside, every bin
// edge, for every width, several windows and divisors from the clamp's 1e-8 to 1e6. And the
// error bound fused_code's tolerance rests on, measured with margin, and the edge thresholds
// near_code decides by. Compiled with -ffp-contract=off (tests/CMakeLists.txt), as the kernels
// are.
#include <blpa/codec_math.h>

#include <catch2/catch.hpp>
#include <cmath>
#include <cstdint>
#include <limits>
#include <random>
#include <vector>

namespace {

namespace codec = blpa::codec;

struct Tally {
  int64_t checked = 0, near = 0, wrong = 0;
  int64_t moved = 0;  // elements whose near or far is not the formula check_one states
  double worst_margin = 0;  // the largest |y + 1/2 - (y_e + s)| / tol seen where y + 1/2 is in [-2, B + 1]
};

// The kernel's per-block table of edge thresholds.
std::vector<float> thresholds(int bits, float d) {
  std::vector<float> t(codec::edge_thresholds(bits));
  for (int i = 0; i < static_cast<int>(t.size()); ++i) t[i] = codec::edge_threshold(i - codec::num_bins(bits) - 1, d);
  return t;
}

// One value through the kernel's path (cuda/pack_kernels.cuh, pack_kernel) and through
// encode; y and y_e as each computes them.
void check_one(float v, float g, float d, int s, int bits, const std::vector<float>& edges, Tally& t) {
  const float guard_d = codec::kGuard / d, tol = codec::scaled_tolerance(bits, guard_d);
  const codec::FusedChannel f = codec::fused_channel(g, s, d, guard_d);  // the kernel's table
  const float scale = f.scale, bias = f.bias;
  const uint32_t exact = codec::encode(v / g, s, bits, d);
  uint32_t got = codec::fused_code(v, scale, bias, codec::far_limit(tol), bits);
  ++t.checked;
  // Near exactly where y lies within tol of a half-integer (y + 1/2, encode's floor argument
  // plus s, within tol of an integer), measured in double, or is NaN or infinite; beyond 2^22
  // either (fused's rounding by adds is not exact there, and the code is an end's either way).
  const double y = std::fma(v, scale, bias);
  const bool near = !(std::abs(y - (std::floor(y) + 0.5)) > tol);
  if (!(std::abs(y) > 0x1p22) && near != (got == codec::kNearEdge)) ++t.moved;
  if (got == codec::kNearEdge) {
    ++t.near;
    got = codec::near_code(v, g != 1.0f ? v / g : v, scale, bias, edges.data(), bits, d);
  }
  if (got != exact) ++t.wrong;
  const float y_e = (v / g - codec::kGuard) / d;
  const double top = codec::num_bins(bits) - 1;
  if (std::isfinite(y_e) && y + 0.5 >= -2.0 && y + 0.5 <= top + 2.0)
    t.worst_margin = std::max(t.worst_margin, std::abs(static_cast<double>(y_e) + s - (y + 0.5)) / tol);
}

// At 8 bits, guard / d = 0.49999994, just under the 1/2 where the kernel stops fusing: s - G
// rounds to s - 1/2 for odd s from 3 on, whose nearest integer (to even) is not s, and
// (s - 1/2) - G to s - 1 from s = 2 on.
constexpr float kNarrowWindow = 0.000512000057f;
// guard / d >= 1/2 at every width: the kernel divides for every element (a NaN scale); and
// at 8 bits just over 1/2 (0.502), next to kNarrowWindow's 0.49999994.
constexpr float kDividingWindow = 1e-6f, kJustDividingWindow = 0.00051f;

std::vector<float> divisors() {
  std::vector<float> g{1e-8f, 3.7e-5f, 0.01f, 0.3f, 1.0f, 1.7f, 123.4f, 1e6f};
  std::mt19937 rng(7);
  std::lognormal_distribution<float> spread(0.0f, 1.5f);
  for (int i = 0; i < 8; ++i) g.push_back(spread(rng));
  return g;
}

}  // namespace

TEST_CASE("codec: the fused pack gives encode's codes on every bf16 value", "[codec-math]") {
  for (int bits : {8, 4, 2})
    for (float window : {6.0f, 2.5f, 7.3f, 40.0f, kNarrowWindow, kDividingWindow, kJustDividingWindow}) {
      const float d = codec::bin_width(window, bits);
      const auto edges = thresholds(bits, d);
      for (float g : divisors()) {
        CAPTURE(bits, window, g);
        Tally t;
        const int s = 1 + static_cast<int>(std::fmod(g * 1e4f, static_cast<float>(codec::num_bins(bits) - 1)));
        for (uint32_t u = 0; u < 0x10000u; ++u) check_one(codec::float_of_bits(u << 16), g, d, s, bits, edges, t);
        CHECK(t.wrong == 0);
        CHECK(t.moved == 0);
        CHECK(t.worst_margin <= 0.5);  // the bound is half the tolerance
        if (g == 1.0f) CHECK(t.near > 0);  // bf16 values on bin edges: near_code decides them
        if (window == kDividingWindow) CHECK(t.near == t.checked);
      }
    }
}

TEST_CASE("codec: the fused pack gives encode's codes at and beside every bin edge in fp32", "[codec-math]") {
  for (int bits : {8, 4, 2})
    for (float window : {6.0f, 2.5f, 7.3f, kNarrowWindow}) {
      const float d = codec::bin_width(window, bits);
      const auto edges = thresholds(bits, d);
      const int reach = codec::num_bins(bits) + 2;
      for (float g : divisors()) {
        CAPTURE(bits, window, g);
        Tally t;
        for (int k = -reach; k <= reach; ++k) {
          // v with v / g at the edge k d + guard, then the 16 floats on either side of it.
          float v = static_cast<float>((k * static_cast<double>(d) + codec::kGuard) * g);
          for (int i = 0; i < 16; ++i) v = std::nextafter(v, -std::numeric_limits<float>::infinity());
          for (int i = 0; i < 33; ++i, v = std::nextafter(v, std::numeric_limits<float>::infinity()))
            check_one(v, g, d, 1 + (k + reach) % (codec::num_bins(bits) - 1), bits, edges, t);
        }
        CHECK(t.wrong == 0);
        CHECK(t.moved == 0);
        CHECK(t.worst_margin <= 0.5);
        CHECK(t.near > 0);  // the edges are where near_code decides
      }
    }
}

TEST_CASE("codec: the fused pack gives encode's codes on random and extreme fp32 values", "[codec-math]") {
  const float inf = std::numeric_limits<float>::infinity(), nan = std::numeric_limits<float>::quiet_NaN();
  const float big = std::numeric_limits<float>::max(), tiny = std::numeric_limits<float>::denorm_min();
  std::mt19937 rng(11);
  std::normal_distribution<float> normal(0.0f, 3.0f);
  for (int bits : {8, 4, 2}) {
    const float d = codec::bin_width(6.0f, bits);
    const auto edges = thresholds(bits, d);
    for (float g : divisors()) {
      CAPTURE(bits, g);
      Tally t;
      for (float v : {0.0f, -0.0f, inf, -inf, nan, big, -big, tiny, -tiny, 1e-30f, -1e-30f, 1e30f, -1e30f})
        check_one(v, g, d, 2, bits, edges, t);
      for (int i = 0; i < 20000; ++i)
        check_one(normal(rng) * g, g, d, 1 + i % (codec::num_bins(bits) - 1), bits, edges, t);
      CHECK(t.wrong == 0);
      CHECK(t.moved == 0);
      CHECK(t.worst_margin <= 0.5);
      // Activation-like values are rarely near an edge: about 2 tol of a bin's width each (8
      // bits: tol = 2.5e-4), where bf16 values above were often: on edges (v / d an integer)
      // and, the many tiny ones, at the edge at v = guard.
      CHECK(t.near <= t.checked / 500);
    }
  }
  // Divisors whose 1 / (g d) is no normal float divide for every value; so do g <= 0 and NaN.
  const float d = codec::bin_width(6.0f, 4);
  const auto edges = thresholds(4, d);
  for (float g : {0.0f, -1.0f, nan, inf, 1e-38f, 3e38f}) {
    CAPTURE(g);
    CHECK(codec::channel_scale(g, d) == 0.0f);
    CHECK(std::isnan(codec::fused_scale(g, d)));
    Tally t;
    for (float v : {1.0f, -2.5f, 0.0f, 1e30f, nan}) check_one(v * (g > 0 && g < inf ? g : 1.0f), g, d, 3, 4, edges, t);
    CHECK(t.near == t.checked);
    CHECK(t.wrong == 0);
    CHECK(t.moved == 0);
  }
}

TEST_CASE("codec: edge thresholds are the least floats whose quotient reaches each integer", "[codec-math]") {
  // encode's floor of w / d is at least n exactly when w >= edge_threshold(n, d): so
  // (w / d) >= n at the threshold and not one float below it. Every n near_code reads, for
  // every width and windows from tiny to wide (d from 2^-12 to 64: the d > 2 of the widest is
  // where n = 0's threshold is no longer -0).
  for (int bits : {8, 4, 2})
    for (float window : {6.0f, 2.5f, 7.3f, 40.0f, 1e-3f, 256.0f}) {
      const float d = codec::bin_width(window, bits);
      const int b = codec::num_bins(bits);
      for (int n = -b - 1; n <= b; ++n) {
        CAPTURE(bits, window, n);
        const float w = codec::edge_threshold(n, d), below = codec::float_step(w, -1);
        CHECK(w / d >= static_cast<float>(n));
        CHECK_FALSE(below / d >= static_cast<float>(n));
        CHECK(below < w);
      }
    }
  // float_step walks the floats in order, across zero and the subnormals.
  const float tiny = std::numeric_limits<float>::denorm_min();
  CHECK(codec::float_step(0.0f, -1) == 0.0f);  // -0
  CHECK(std::signbit(codec::float_step(0.0f, -1)));
  CHECK(codec::float_step(-0.0f, -1) == -tiny);
  CHECK(codec::float_step(-tiny, 1) == 0.0f);
  CHECK(codec::float_step(1.0f, 1) == std::nextafter(1.0f, 2.0f));
  CHECK(codec::float_step(-1.0f, 1) == std::nextafter(-1.0f, 0.0f));
}

TEST_CASE("codec: decode by float steps gives decode's bits and the mask for every code and offset", "[codec-math]") {
  // The GPU's kernels decode with code_float, code_origin and decode_by_steps (no int
  // conversion). Every code and offset of each width, for windows from narrow to wide and
  // with a bin width whose half is the smallest normal float.
  for (int bits : {8, 4, 2})
    for (float window : {6.0f, 2.5f, 7.3f, 40.0f, kNarrowWindow, 1e-30f, std::ldexp(1.0f, -125 + bits)}) {
      const float d = codec::bin_width(window, bits);
      int64_t wrong = 0, wrong_mask = 0;
      for (int s = 0; s <= codec::num_bins(bits); ++s)
        for (uint32_t q = 0; q < static_cast<uint32_t>(codec::num_bins(bits)); ++q) {
          const float got = codec::decode_by_steps(codec::code_float(q), codec::code_origin(s), d);
          wrong += codec::bits_of_float(got) != codec::bits_of_float(codec::decode(q, s, d));
          wrong_mask += codec::mask_by_steps(codec::code_float(q), codec::code_origin(s)) != codec::mask(q, s);
        }
      CAPTURE(bits, window);
      CHECK(wrong == 0);
      CHECK(wrong_mask == 0);
    }
}

TEST_CASE("codec: far_limit is the least float at or above 1/2 - tol", "[codec-math]") {
  // fused's |e| < limit must be 1/2 - |e| > tol exactly, for every tolerance the kernels use.
  std::vector<float> tols{0x1p-20f, 1e-5f, 3e-4f, 0.1f};
  for (int bits : {8, 4, 2})
    for (float window : {6.0f, 2.5f, 7.3f, 40.0f, kNarrowWindow}) {
      const float d = codec::bin_width(window, bits);
      tols.push_back(codec::scaled_tolerance(bits, codec::kGuard / d));
    }
  for (float tol : tols) {
    CAPTURE(tol);
    const float limit = codec::far_limit(tol), below = std::nextafter(limit, 0.0f);
    CHECK(0.5f - limit <= tol);  // exact: limit is in [1/4, 1/2]
    CHECK(0.5f - below > tol);
  }
}

TEST_CASE("codec: round_number_to rounds numbers as round_to and round_to_own_nan is round_to on the host",
          "[codec-math]") {
  // round_number_to skips the NaN check (unpack's r', never NaN); round_to_own_nan keeps the
  // device's NaN on the device, and on the host (and the emulator) is round_to, as is each
  // half of bf16_pair_word_own_nan.
  std::mt19937 rng(3);
  std::uniform_int_distribution<uint32_t> any;
  using limits = std::numeric_limits<float>;
  std::vector<float> values{0.0f, -0.0f, limits::infinity(), -limits::infinity(), limits::denorm_min(), limits::max(),
                            codec::float_of_bits(0x3F808000u), codec::float_of_bits(0x3F818000u)};  // ties
  for (int i = 0; i < 200000; ++i) values.push_back(codec::float_of_bits(any(rng)));
  int64_t numbers = 0;
  float previous = 1.0f;
  for (float f : values) {
    REQUIRE(codec::round_to_own_nan<c10::BFloat16>(f).x == codec::round_to<c10::BFloat16>(f).x);
    const uint32_t pair = codec::bf16_pair_word_own_nan(f, previous);
    REQUIRE((pair & 0xFFFFu) == codec::round_to<c10::BFloat16>(f).x);
    REQUIRE(pair >> 16 == codec::round_to<c10::BFloat16>(previous).x);
    previous = f;
    if (f != f) continue;
    ++numbers;
    REQUIRE(codec::round_number_to<c10::BFloat16>(f).x == codec::round_to<c10::BFloat16>(f).x);
    REQUIRE(codec::round_number_to<c10::BFloat16>(f).x == c10::BFloat16(f).x);  // LibTorch's rounding
  }
  CHECK(numbers > 199000);
  CHECK(codec::round_to_own_nan<c10::BFloat16>(std::numeric_limits<float>::quiet_NaN()).x == 0x7FC0);
  CHECK(codec::round_to_own_nan<float>(1.5f) == 1.5f);
  CHECK(codec::round_number_to<float>(1.5f) == 1.5f);
}
