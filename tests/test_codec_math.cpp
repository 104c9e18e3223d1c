// codec::encode_scaled, the CUDA pack's division-free path, against codec::encode, whose
// codes it must give wherever it gives one: on every bf16 value and on fp32 values at, and a
// few ulps beside, every bin edge, for every width, several windows and divisors from the
// clamp's 1e-8 to 1e6. And the error bound its tolerance rests on, measured with margin.
// Compiled with -ffp-contract=off (tests/CMakeLists.txt), as the kernels are.
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
  int64_t checked = 0, divided = 0, wrong = 0;
  double worst_margin = 0;  // the largest |y - y'| / tol seen where |y'| is within reach
};

// One value through both paths; y and y' as the kernel and encode compute them.
void check_one(float v, float g, float d, int s, int bits, Tally& t) {
  const float scale = codec::channel_scale(g, d), guard_d = codec::kGuard / d;
  const float tol = codec::scaled_tolerance(bits, guard_d);
  const uint32_t exact = codec::encode(v / g, s, bits, d);
  const uint32_t fast = codec::encode_scaled(v, scale, guard_d, tol, s, bits);
  ++t.checked;
  if (fast == codec::kNearEdge) {
    ++t.divided;
    return;
  }
  if (fast != exact) ++t.wrong;
  const float y = (v / g - codec::kGuard) / d, y_fast = v * scale - guard_d;
  const float reach = static_cast<float>(codec::num_bins(bits) + 1);
  if (std::isfinite(y) && std::abs(y_fast) <= reach)
    t.worst_margin = std::max(t.worst_margin, static_cast<double>(std::abs(y - y_fast)) / tol);
}

std::vector<float> divisors() {
  std::vector<float> g{1e-8f, 3.7e-5f, 0.01f, 0.3f, 1.0f, 1.7f, 123.4f, 1e6f};
  std::mt19937 rng(7);
  std::lognormal_distribution<float> spread(0.0f, 1.5f);
  for (int i = 0; i < 8; ++i) g.push_back(spread(rng));
  return g;
}

}  // namespace

TEST_CASE("codec: products give encode's codes on every bf16 value", "[codec-math]") {
  for (int bits : {8, 4, 2})
    for (float window : {6.0f, 2.5f, 7.3f, 40.0f}) {
      const float d = codec::bin_width(window, bits);
      for (float g : divisors()) {
        CAPTURE(bits, window, g);
        Tally t;
        const int s = 1 + static_cast<int>(std::fmod(g * 1e4f, static_cast<float>(codec::num_bins(bits) - 1)));
        for (uint32_t u = 0; u < 0x10000u; ++u) check_one(codec::float_of_bits(u << 16), g, d, s, bits, t);
        CHECK(t.wrong == 0);
        CHECK(t.worst_margin <= 0.5);  // the bound is half the tolerance
      }
    }
}

TEST_CASE("codec: products give encode's codes at and beside every bin edge in fp32", "[codec-math]") {
  for (int bits : {8, 4, 2})
    for (float window : {6.0f, 2.5f, 7.3f}) {
      const float d = codec::bin_width(window, bits);
      const int reach = codec::num_bins(bits) + 2;
      for (float g : divisors()) {
        CAPTURE(bits, window, g);
        Tally t;
        for (int k = -reach; k <= reach; ++k) {
          // v with v / g at the edge k d + guard, then the 16 floats on either side of it.
          float v = static_cast<float>((k * static_cast<double>(d) + codec::kGuard) * g);
          for (int i = 0; i < 16; ++i) v = std::nextafter(v, -std::numeric_limits<float>::infinity());
          for (int i = 0; i < 33; ++i, v = std::nextafter(v, std::numeric_limits<float>::infinity()))
            check_one(v, g, d, 1, bits, t);
        }
        CHECK(t.wrong == 0);
        CHECK(t.worst_margin <= 0.5);
        CHECK(t.divided > 0);  // the edges are where it divides
      }
    }
}

TEST_CASE("codec: products give encode's codes on random and extreme fp32 values", "[codec-math]") {
  const float inf = std::numeric_limits<float>::infinity(), nan = std::numeric_limits<float>::quiet_NaN();
  const float big = std::numeric_limits<float>::max(), tiny = std::numeric_limits<float>::denorm_min();
  std::mt19937 rng(11);
  std::normal_distribution<float> normal(0.0f, 3.0f);
  for (int bits : {8, 4, 2}) {
    const float d = codec::bin_width(6.0f, bits);
    for (float g : divisors()) {
      CAPTURE(bits, g);
      Tally t;
      for (float v : {0.0f, -0.0f, inf, -inf, nan, big, -big, tiny, -tiny, 1e-30f, -1e-30f, 1e30f, -1e30f})
        check_one(v, g, d, 2, bits, t);
      for (int i = 0; i < 20000; ++i) check_one(normal(rng) * g, g, d, 1 + i % (codec::num_bins(bits) - 1), bits, t);
      CHECK(t.wrong == 0);
      CHECK(t.worst_margin <= 0.5);
      // Activation-like values divide rarely: about 2 tol of a bin's width each (8 bits:
      // tol = 2.5e-4), where every bf16 value above did often, its many tiny ones near the
      // edge at v = guard.
      CHECK(t.divided <= t.checked / 500);
    }
  }
  // Divisors whose 1 / (g d) is no normal float divide for every value; so do g <= 0 and NaN.
  for (float g : {0.0f, -1.0f, nan, inf, 1e-38f, 3e38f}) {
    CAPTURE(g);
    CHECK(codec::channel_scale(g, codec::bin_width(6.0f, 4)) == 0.0f);
    CHECK(codec::encode_scaled(1.0f, 0.0f, 1.0f, 1e-3f, 1, 4) == codec::kNearEdge);
  }
}
